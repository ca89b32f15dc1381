"""Downloads against a real HTTP mirror on loopback that fails on purpose.

``data.mirrors`` must be https:// (checked by :class:`pipeline.core.config.Config`); the
library takes any base URL, so these tests serve plain HTTP on 127.0.0.1.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import pipeline.data.sources as sources
from pipeline.core.config import DataConfig, config_from_dict
from pipeline.core.errors import ConfigError, DownloadError
from pipeline.data.ingest import ingest
from pipeline.data.sources import FileSpec, SplitFiles, all_specs, download


@dataclass
class Mirror:
    """Serves ``root`` at ``url``; the first ``len(script)`` requests misbehave as scripted."""

    root: Path
    url: str = ""
    script: list[str] = field(default_factory=list)  # "500" | "reset" | "truncate"
    requests: list[str] = field(default_factory=list)


def _handler(mirror: Mirror) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            mirror.requests.append(self.path)
            fault = mirror.script.pop(0) if mirror.script else None
            path = mirror.root / self.path.rsplit("/", 1)[-1]
            if fault == "500" or not path.is_file():
                self.send_error(500 if fault else 404)
                return
            body = path.read_bytes()
            if fault == "reset":  # RST instead of a response
                linger = struct.pack("ii", 1, 0)
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.connection.close()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if fault == "truncate" else body)
            if fault == "truncate":
                self.close_connection = True

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output quiet

    return Handler


@pytest.fixture
def served(
    idx_source: tuple[Path, dict[str, SplitFiles]],
) -> Iterator[tuple[Mirror, dict[str, SplitFiles]]]:
    root, specs = idx_source
    mirror = Mirror(root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(mirror))
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}/mnist/"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield mirror, specs
    server.shutdown()
    server.server_close()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The backoff delays ``download`` asked for (without waiting them)."""
    delays: list[float] = []
    monkeypatch.setattr(sources.time, "sleep", delays.append)
    return delays


def first_spec(specs: dict[str, SplitFiles]) -> FileSpec:
    return specs["train"].labels


def test_transient_failures_are_retried_with_backoff(
    served: tuple[Mirror, dict[str, SplitFiles]], tmp_path: Path, sleeps: list[float]
) -> None:
    mirror, specs = served
    spec = first_spec(specs)
    mirror.script = ["500", "reset", "truncate"]
    got = download(spec, [mirror.url], tmp_path, retries=4, backoff_s=0.5)
    assert got.read_bytes() == (mirror.root / spec.name).read_bytes()
    assert len(mirror.requests) == 4
    assert sleeps == [0.5, 1.0, 2.0]


def test_all_attempts_failing_names_file_and_attempts(
    served: tuple[Mirror, dict[str, SplitFiles]], tmp_path: Path, sleeps: list[float]
) -> None:
    mirror, specs = served
    spec = first_spec(specs)
    mirror.script = ["500"] * 6
    second = mirror.url.replace("/mnist/", "/other/")
    with pytest.raises(DownloadError) as info:
        download(spec, [mirror.url, second], tmp_path, retries=3, backoff_s=0.1)
    message = str(info.value)
    assert spec.name in message and "6 download attempts failed (2 mirrors x 3)" in message
    assert "/other/" in message and "\n" not in message
    assert len(mirror.requests) == 6 and sleeps == [0.1, 0.2] * 2
    assert not (tmp_path / spec.name).exists()


def test_next_mirror_is_used_when_one_keeps_failing(
    served: tuple[Mirror, dict[str, SplitFiles]], tmp_path: Path, sleeps: list[float]
) -> None:
    mirror, specs = served
    spec = first_spec(specs)
    mirror.script = ["reset", "reset"]
    download(spec, [mirror.url, mirror.url.replace("/mnist/", "/b/")], tmp_path, retries=2)
    assert [r.split("/")[1] for r in mirror.requests] == ["mnist", "mnist", "b"]


def test_ingest_from_a_flaky_mirror(
    served: tuple[Mirror, dict[str, SplitFiles]], tmp_path: Path, sleeps: list[float]
) -> None:
    mirror, specs = served
    mirror.script = ["500", "truncate", "reset"]
    cfg = DataConfig(
        mirrors=(mirror.url,),
        raw_dir=tmp_path / "raw",
        prepared_dir=tmp_path / "prepared",
        download_retries=4,
    )
    result = ingest(cfg, specs)
    assert result.counts == {"train": 200, "test": 100}
    assert len(mirror.requests) == len(all_specs(specs)) + 3


def test_params_accept_only_https_mirrors() -> None:
    with pytest.raises(ConfigError, match="https"):
        config_from_dict({"data": {"mirrors": ["http://127.0.0.1:8000/"]}})
