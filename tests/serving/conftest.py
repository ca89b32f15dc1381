"""Fixtures for the serving tests: small ONNX models and a real uvicorn on loopback.

The models follow the export contract (input ``image`` float32 [N,1,28,28] raw pixels
0..255, outputs ``logits`` and ``probabilities`` [N,10], provenance in metadata_props).
They are tiny ``cnn`` models (width 4) with seeded random weights: the tests check the
service, not accuracy.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from pipeline.core.config import ServeConfig
from pipeline.core.dirswap import atomic_dir
from pipeline.handoff.export import export_onnx
from pipeline.serving.model_store import MODEL_FILE, ModelStore
from pipeline.serving.server import create_app, uvicorn_config
from pipeline.training.model_io import LoadedModel
from pipeline.training.models import build_model

MEAN, STD = 0.1307, 0.3081


def tiny_model(seed: int) -> LoadedModel:
    torch.manual_seed(seed)
    module = build_model("cnn", width=4).eval()
    return LoadedModel(module=module, name="cnn", width=4, mean=MEAN, std=STD, meta={})


def export_model(model: LoadedModel, dest: Path, version: str) -> Path:
    """Export with the project's exporter, as the export stage does."""
    return export_onnx(model, dest, metadata={"model_version": version, "git_commit": "test"})


def with_metadata(src: Path, dest: Path, **props: str) -> Path:
    """A copy of the ONNX file ``src`` with extra ``metadata_props``."""
    import onnx

    proto = onnx.load(str(src))
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(dest))
    return dest


@pytest.fixture(scope="session")
def onnx_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two different exported models (seeds 0 and 1), built once per session."""
    root = tmp_path_factory.mktemp("onnx")
    return (
        export_model(tiny_model(0), root / "a" / MODEL_FILE, "test-a"),
        export_model(tiny_model(1), root / "b" / MODEL_FILE, "test-b"),
    )


def install(model: Path, production_dir: Path) -> None:
    """Replace ``production_dir`` atomically (rename of the whole directory), as promote does."""
    with atomic_dir(production_dir) as tmp:
        (tmp / MODEL_FILE).write_bytes(model.read_bytes())


@pytest.fixture
def install_model() -> Callable[[Path, Path], None]:
    """``install_model(model_file, production_dir)``: the atomic directory swap."""
    return install


@pytest.fixture
def production_dir(tmp_path: Path, onnx_models: tuple[Path, Path]) -> Path:
    prod = tmp_path / "production"
    install(onnx_models[0], prod)
    return prod


@dataclass
class LiveServer:
    url: str
    store: ModelStore
    serve: ServeConfig
    server: uvicorn.Server
    thread: threading.Thread

    def client(self, timeout: float = 10.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)


TEST_SERVE = replace(
    ServeConfig(), max_batch=8, max_body_bytes=200_000, reload_interval_s=0.05, device="cpu"
)


def start_server(
    store: ModelStore, serve: ServeConfig = TEST_SERVE, token: str | None = None
) -> LiveServer:
    """uvicorn.Server in a thread on a free loopback port; returns once it accepts."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn_config(
        create_app(serve, store, token=token), serve, log_level="warning", lifespan="on"
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return LiveServer(f"http://127.0.0.1:{port}", store, serve, server, thread)


def stop_server(live: LiveServer) -> None:
    live.server.should_exit = True
    live.thread.join(timeout=10)


@pytest.fixture
def server_factory() -> Iterator[Callable[..., LiveServer]]:
    started: list[LiveServer] = []

    def make(
        store: ModelStore, serve: ServeConfig = TEST_SERVE, token: str | None = None
    ) -> LiveServer:
        live = start_server(store, serve, token)
        started.append(live)
        return live

    yield make
    for live in started:
        stop_server(live)


@pytest.fixture
def live(production_dir: Path, server_factory: Callable[..., LiveServer]) -> LiveServer:
    """A running server on the first test model."""
    return server_factory(ModelStore(production_dir / MODEL_FILE, device="cpu"))
