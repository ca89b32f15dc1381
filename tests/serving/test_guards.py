"""Operations and bounds of the service, against a real uvicorn on loopback: timeouts,
load shedding, in-flight limits, bearer token, metrics, readiness, docs switch."""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageDraw

from pipeline.core.errors import ConfigError
from pipeline.serving.guards import Overloaded, WorkSlots
from pipeline.serving.model_store import MODEL_FILE, ModelStore
from pipeline.serving.server import is_loopback, resolve_token
from tests.helpers.hostile import huge_png, lying_jpeg, lying_png, three_class_onnx

from .conftest import TEST_SERVE, LiveServer

Factory = Callable[..., LiveServer]


def png_digit() -> bytes:
    img = Image.new("L", (120, 160), 255)
    ImageDraw.Draw(img).line([(30, 20), (90, 20), (50, 140)], fill=0, width=10)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def raw_connect(live: LiveServer) -> socket.socket:
    host, port = live.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def partial_post(live: LiveServer, declared: int, sent: bytes) -> socket.socket:
    """A POST /v1/predict that declares ``declared`` body bytes and sends only ``sent``."""
    sock = raw_connect(live)
    head = (
        f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    sock.sendall(head + sent)
    return sock


def read_all(sock: socket.socket) -> bytes:
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def store(production_dir: Path) -> ModelStore:
    return ModelStore(production_dir / MODEL_FILE, device="cpu")


@pytest.fixture
def capture_uvicorn_errors() -> Iterator[list[logging.LogRecord]]:
    """uvicorn.error does not propagate to the root logger (caplog): listen on it directly."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    loggers = [logging.getLogger("uvicorn.error"), logging.getLogger("pipeline.serving")]
    for lg in loggers:
        lg.addHandler(handler)
    old = loggers[1].level
    loggers[1].setLevel(logging.INFO)
    yield records
    loggers[1].setLevel(old)
    for lg in loggers:
        lg.removeHandler(handler)


def test_slow_body_gets_408_and_disconnect_is_quiet(
    store: ModelStore, server_factory: Factory, capture_uvicorn_errors: list[logging.LogRecord]
) -> None:
    live = server_factory(store, replace(TEST_SERVE, body_timeout_s=0.5))
    sock = partial_post(live, 1000, b'{"images": [')
    start = time.monotonic()
    reply = read_all(sock)
    assert time.monotonic() - start < 5
    assert reply.startswith(b"HTTP/1.1 408 ") and b'"error":"body_timeout"' in reply.replace(
        b" ", b""
    )
    sock.close()

    # The same through the multipart parser of the image endpoint.
    sock = raw_connect(live)
    sock.sendall(
        b"POST /v1/predict/image HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
        b"Content-Type: multipart/form-data; boundary=xx\r\n\r\n--xx\r\n"
        b'Content-Disposition: form-data; name="file"; filename="d.png"\r\n\r\n\x89PNG'
    )
    reply = read_all(sock)
    assert reply.startswith(b"HTTP/1.1 408 ") and b"body_timeout" in reply, reply[:300]
    sock.close()

    # A client that goes away mid-body: one info line, no traceback, server fine.
    sock = partial_post(live, 1000, b'{"images": [')
    time.sleep(0.1)
    sock.close()
    time.sleep(0.3)
    with live.client() as client:
        assert client.get("/healthz").status_code == 200
    texts = [r.getMessage() for r in capture_uvicorn_errors]
    assert not any(r.exc_info for r in capture_uvicorn_errors), texts
    assert not any("Exception in ASGI application" in t for t in texts), texts
    assert any("client disconnected before the body was complete" in t for t in texts), texts


def test_slow_headers_are_cut_off(store: ModelStore, server_factory: Factory) -> None:
    live = server_factory(store, replace(TEST_SERVE, header_timeout_s=0.5))
    idle = raw_connect(live)  # sends nothing at all
    slow = raw_connect(live)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # never finishes the headers
    start = time.monotonic()
    assert read_all(idle) == b"" and read_all(slow) == b""  # closed by the server
    assert time.monotonic() - start < 5
    # A normal keep-alive client is unaffected by the timer.
    with live.client() as client:
        for _ in range(3):
            assert client.get("/healthz").status_code == 200
            time.sleep(0.3)


def test_inflight_limits_shed_with_503_and_retry_after(
    store: ModelStore, server_factory: Factory
) -> None:
    live = server_factory(
        store, replace(TEST_SERVE, max_inflight_requests=1, max_inflight_bytes=150_000)
    )
    holder = partial_post(live, 100, b'{"images": [')  # admitted, body never completes
    time.sleep(0.2)
    with live.client() as client:
        resp = client.post("/v1/predict", json={"images": [[[0] * 28] * 28]})
        assert resp.status_code == 503, resp.text
        assert resp.headers["retry-after"] == "1"
        assert resp.json()["error"] == "overloaded" and "requests in flight" in resp.text
        assert client.get("/readyz").status_code == 200  # probes are never shed
    holder.close()
    time.sleep(0.3)
    with live.client() as client:
        ok = client.post("/v1/predict", json={"images": [[[0] * 28] * 28]})
        assert ok.status_code == 200
        # Byte budget: one declared 160 kB body does not fit into 150 kB.
        big = client.post(
            "/v1/predict", content=b" " * 160_000, headers={"content-type": "application/json"}
        )
        assert big.status_code == 503 and "body bytes in flight" in big.text
        metrics = client.get("/metrics").text
    assert 'mnist_requests_shed_total{reason="requests"} 1.0' in metrics
    assert 'mnist_requests_shed_total{reason="bytes"} 1.0' in metrics


def test_work_slots_wait_then_refuse() -> None:
    async def scenario() -> tuple[float, bool]:
        slots = WorkSlots(1, 0.2)
        async with slots.slot():
            start = time.monotonic()
            try:
                async with slots.slot():
                    pass
            except Overloaded:
                return time.monotonic() - start, True
        return 0.0, False

    waited, refused = asyncio.run(scenario())
    assert refused and 0.15 < waited < 2


def test_hostile_uploads_get_4xx(live: LiveServer) -> None:
    with live.client() as client:
        for name, data, says in [
            ("lying.jpg", lying_jpeg(), "6000x6000 = 36000000 pixels"),
            ("huge.png", huge_png(), "6300x6300 = 39690000 pixels"),
            ("lying.png", lying_png(), "corrupt or truncated PNG"),
            ("three.onnx", three_class_onnx(), "not an image"),
        ]:
            resp = client.post("/v1/predict/image", files={"file": (name, data)})
            assert resp.status_code == 422, resp.text
            assert says in resp.json()["detail"]


def test_bearer_token(store: ModelStore, server_factory: Factory) -> None:
    live = server_factory(store, token="s3cret")
    batch = {"images": [[[0] * 28] * 28]}
    with live.client() as client:
        missing = client.post("/v1/predict", json=batch)
        assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
        assert "missing bearer token" in missing.json()["detail"]
        wrong = client.post(
            "/v1/predict/image",
            files={"file": ("d.png", png_digit())},
            headers={"Authorization": "Bearer nope"},
        )
        assert wrong.status_code == 401 and "wrong bearer token" in wrong.text
        auth = {"Authorization": "Bearer s3cret"}
        assert client.post("/v1/predict", json=batch, headers=auth).status_code == 200
        image = client.post(
            "/v1/predict/image", files={"file": ("d.png", png_digit())}, headers=auth
        )
        assert image.status_code == 200
        metrics = client.get("/metrics").text
    for status, n in (("401", 1), ("200", 1)):
        labels = f'method="POST",route="/v1/predict",status="{status}"'
        assert f"mnist_http_requests_total{{{labels}}} {n}.0" in metrics
    with live.client() as client:
        for path in ("/healthz", "/readyz", "/v1/model", "/metrics", "/openapi.json"):
            assert client.get(path).status_code == 200, path


def test_auth_is_required_off_loopback() -> None:
    serve = TEST_SERVE
    assert resolve_token(serve, "127.0.0.1", None) is None
    assert resolve_token(serve, "::1", None) is None
    assert resolve_token(serve, "0.0.0.0", "t") == "t"
    with pytest.raises(ConfigError, match="refusing to serve on 0.0.0.0 without a token"):
        resolve_token(serve, "0.0.0.0", None)
    with pytest.raises(ConfigError, match="MNIST_SERVE_TOKEN"):
        resolve_token(serve, "my-host.example", None)
    assert resolve_token(replace(serve, allow_unauthenticated=True), "0.0.0.0", None) is None
    assert is_loopback("127.0.0.2") and is_loopback("localhost") and not is_loopback("10.0.0.1")


def test_metrics_endpoint(live: LiveServer) -> None:
    with live.client() as client:
        assert client.post("/v1/predict", json={"images": [[[0] * 28] * 28]}).status_code == 200
        assert client.post("/v1/predict", json={"images": []}).status_code == 422
        assert client.get("/nope").status_code == 404
        text = client.get("/metrics").text
        sha = client.get("/v1/model").json()["sha256"]
    assert 'mnist_http_requests_total{method="POST",route="/v1/predict",status="200"} 1.0' in text
    assert 'mnist_http_requests_total{method="POST",route="/v1/predict",status="422"} 1.0' in text
    assert 'mnist_http_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    # One observation in the latency histogram; which bucket depends on the machine's
    # load (a first request on a busy CI runner can take over 50 ms), so not asserted.
    labels = 'method="POST",route="/v1/predict",status="200"'
    assert f'mnist_http_request_duration_seconds_bucket{{le="+Inf",{labels}}} 1.0' in text
    assert f"mnist_http_request_duration_seconds_count{{{labels}}} 1.0" in text
    assert "mnist_http_requests_in_flight 1.0" in text  # the scrape itself
    info = f'provider="CPUExecutionProvider",sha256="{sha}",version="test-a"'
    assert f"mnist_model_info{{{info}}} 1.0" in text
    assert 'mnist_model_reloads_total{result="ok"} 1.0' in text
    assert 'mnist_model_reloads_total{result="failed"} 0.0' in text
    assert "mnist_model_file_missing 0.0" in text


def test_readiness_reports_missing_and_refused_models(
    live: LiveServer,
    production_dir: Path,
    tmp_path: Path,
    install_model: Callable[[Path, Path], None],
    onnx_models: tuple[Path, Path],
) -> None:
    batch = {"images": [[[0] * 28] * 28]}
    with live.client() as client:
        shutil.rmtree(production_dir)
        deadline = time.monotonic() + 10
        while (ready := client.get("/readyz")).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert ready.status_code == 503 and ready.json()["error"] == "model_missing"
        assert "ONNX model not found; still serving sha256=" in ready.json()["detail"]
        assert client.post("/v1/predict", json=batch).status_code == 200  # keeps answering
        assert "not found" in client.get("/v1/model").json()["model_file_missing"]
        assert "mnist_model_file_missing 1.0" in client.get("/metrics").text

        wrong = tmp_path / "three.onnx"
        wrong.write_bytes(three_class_onnx())
        install_model(wrong, production_dir)  # back, but breaking the contract
        deadline = time.monotonic() + 10
        while client.get("/v1/model").json()["failed_reloads"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text  # the previous (good) model serves
        assert "last reload refused" in ready.json()["detail"]
        assert "[N,10]" in ready.json()["detail"]
        info = client.get("/v1/model").json()
        assert info["sha256"] != "" and "breaks the model contract" in info["last_reload_error"]
        assert info["metadata"]["model_version"] == "test-a"
        resp = client.post("/v1/predict", json=batch).json()
        assert len(resp["predictions"][0]["probabilities"]) == 10
        assert 'mnist_model_reloads_total{result="failed"} 1.0' in client.get("/metrics").text


def test_docs_can_be_turned_off(store: ModelStore, server_factory: Factory) -> None:
    on = server_factory(store)
    off = server_factory(store, replace(TEST_SERVE, docs=False))
    with httpx.Client(base_url=on.url) as client:
        assert client.get("/docs").status_code == 200
    with httpx.Client(base_url=off.url) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").status_code == 200
