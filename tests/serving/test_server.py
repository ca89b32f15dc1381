"""The HTTP service against a real uvicorn on a loopback port."""

from __future__ import annotations

import io
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw

from pipeline.core.atomic import sha256_file
from pipeline.serving.model_store import MODEL_FILE, ModelStore, load_model
from pipeline.serving.server import parse_batch

from .conftest import LiveServer, with_metadata


def png_digit(size: tuple[int, int] = (200, 300)) -> bytes:
    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).line([(50, 40), (150, 40), (90, 260)], fill="black", width=14)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with live.client() as c:
        yield c


def assert_error(resp: httpx.Response, status: int, code: str, says: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    body = resp.json()
    assert body["error"] == code, body
    assert says in json.dumps(body["detail"]), body


def test_health_ready_and_model_info(client: httpx.Client, production_dir: Path) -> None:
    sha = sha256_file(production_dir / MODEL_FILE)
    health = client.get("/healthz").json()
    assert health == {
        "status": "ok",
        "model_loaded": True,
        "provider": "CPUExecutionProvider",
        "model_sha256": sha,
    }
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    info = client.get("/v1/model").json()
    assert info["sha256"] == sha
    assert info["provider"] == "CPUExecutionProvider"
    assert info["providers_requested"] == ["CPUExecutionProvider"]
    assert info["metadata"]["model_version"] == "test-a"
    assert info["metadata"]["git_commit"] == "test"
    (inp,) = info["inputs"]
    assert inp["name"] == "image" and inp["type"] == "tensor(float)"
    assert inp["shape"][1:] == ["1", "28", "28"]
    assert {o["name"] for o in info["outputs"]} == {"logits", "probabilities"}
    assert info["reloads"] == 1 and info["last_reload_error"] is None


def test_predict_batch_matches_direct_onnxruntime(
    client: httpx.Client, production_dir: Path
) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28))
    images[1] = images[1] / 2.0 + 0.25  # floats are fine too
    resp = client.post("/v1/predict", json={"images": images.tolist()})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    _, expected = load_model(production_dir / MODEL_FILE, device="cpu").predict(
        images.astype(np.float32)
    )
    assert body["model_sha256"] == sha256_file(production_dir / MODEL_FILE)
    assert body["provider"] == "CPUExecutionProvider" and body["model_version"] == "test-a"
    assert len(body["predictions"]) == 3
    for pred, probs in zip(body["predictions"], expected, strict=True):
        assert pred["digit"] == int(probs.argmax())
        np.testing.assert_allclose(pred["probabilities"], probs, atol=1e-6)
        assert pred["probability"] == pytest.approx(float(probs.max()), abs=1e-6)


def test_predict_image_upload_png_and_jpeg(client: httpx.Client) -> None:
    png = png_digit()
    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buf, "JPEG", quality=80)
    for name, data, ctype in (("d.png", png, "image/png"), ("d.jpg", buf.getvalue(), "image/jpeg")):
        resp = client.post("/v1/predict/image", files={"file": (name, data, ctype)})
        assert resp.status_code == 200, resp.text
        (pred,) = resp.json()["predictions"]
        assert 0 <= pred["digit"] <= 9 and sum(pred["probabilities"]) == pytest.approx(1, abs=1e-4)


def test_openapi_document(client: httpx.Client) -> None:
    doc = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/predict/image", "/healthz", "/readyz", "/v1/model"} <= set(
        doc["paths"]
    )
    schema = doc["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"][
        "schema"
    ]
    assert schema["properties"]["images"]["maxItems"] == 8  # serve.max_batch of the test server


def zeros(n: int) -> list[list[list[int]]]:
    return np.zeros((n, 28, 28), dtype=int).tolist()


BAD_JSON_CASES = [
    ("not json", b"{nope", 400, "invalid_json", "not valid JSON"),
    ("not utf-8", b"\xff\xfe\x00{", 400, "invalid_json", "not valid JSON"),
    ("array body", b"[1, 2]", 422, "bad_request", '{\\"images\\"'),
    ("missing images", b'{"image": []}', 422, "bad_request", "images"),
    ("extra field", json.dumps({"images": zeros(1), "x": 1}).encode(), 422, "bad_request", "x"),
    ("images not a list", b'{"images": 5}', 422, "bad_type", "must be a list"),
    ("empty batch", b'{"images": []}', 422, "empty_batch", "empty"),
    ("batch over max", json.dumps({"images": zeros(9)}).encode(), 422, "batch_too_large", "9"),
    ("flat image", json.dumps({"images": [[0] * 784]}).encode(), 422, "bad_shape", "[1, 784]"),
    (
        "wrong size",
        json.dumps({"images": np.zeros((1, 28, 27)).tolist()}).encode(),
        422,
        "bad_shape",
        "[1, 28, 27]",
    ),
    (
        "ragged",
        json.dumps({"images": [[[0] * 28] * 27 + [[0] * 5]]}).encode(),
        422,
        "bad_shape",
        "28x28",
    ),
    ("strings", json.dumps({"images": [[["0"] * 28] * 28]}).encode(), 422, "bad_type", "numbers"),
    ("nulls", json.dumps({"images": [[[None] * 28] * 28]}).encode(), 422, "bad_type", "numbers"),
    (
        "booleans",
        json.dumps({"images": [[[True] * 28] * 28]}).encode(),
        422,
        "bad_type",
        "booleans",
    ),
    (
        "one boolean among ints",
        json.dumps({"images": [[[0] * 27 + [True]] * 28]}).encode(),
        422,
        "bad_type",
        "booleans",
    ),
    (
        "negative",
        json.dumps({"images": (np.zeros((1, 28, 28)) - 1).tolist()}).encode(),
        422,
        "out_of_range",
        "[0, 255]",
    ),
    (
        "above 255",
        json.dumps({"images": (np.zeros((1, 28, 28)) + 255.5).tolist()}).encode(),
        422,
        "out_of_range",
        "255.5",
    ),
    ("NaN", b'{"images": [[[NaN]]]}', 422, "bad_value", "NaN"),
    ("Infinity", b'{"images": [[[Infinity]]]}', 422, "bad_value", "Infinity"),
    (
        "1e999",
        (
            '{"images": ['
            + json.dumps([[0] * 28] * 27 + [[1e308] * 27 + [0]]).replace("1e+308", "1e999", 1)
            + "]}"
        ).encode(),
        422,
        "out_of_range",
        "inf",
    ),
    (
        "huge int",
        (
            '{"images": [' + json.dumps([[0] * 28] * 28).replace("0", "1" + "0" * 40, 1) + "]}"
        ).encode(),
        422,
        "bad_type",
        "numbers",
    ),
    (
        "deep nesting",
        b'{"images": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        400,
        "invalid_json",
        "JSON",
    ),
]


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [case[1:] for case in BAD_JSON_CASES],
    ids=[case[0] for case in BAD_JSON_CASES],
)
def test_bad_json_batches_get_named_4xx(
    client: httpx.Client, body: bytes, status: int, code: str, says: str
) -> None:
    resp = client.post("/v1/predict", content=body, headers={"content-type": "application/json"})
    assert_error(resp, status, code, says)


def test_body_over_limit_declared_and_streamed(client: httpx.Client, live: LiveServer) -> None:
    limit = live.serve.max_body_bytes
    big = b"x" * (limit + 1)
    assert_error(client.post("/v1/predict", content=big), 413, "body_too_large", str(limit + 1))

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer encoding
        for _ in range(4):
            yield b" " * (limit // 2)

    resp = client.post("/v1/predict", content=chunks())
    assert_error(resp, 413, "body_too_large", str(limit))
    files = {"file": ("big.png", big, "image/png")}
    assert_error(client.post("/v1/predict/image", files=files), 413, "body_too_large", "limit")
    # The service is still fine afterwards.
    assert client.post("/v1/predict", json={"images": zeros(1)}).status_code == 200


@pytest.mark.parametrize(
    ("files", "data", "code", "says"),
    [
        ({"file": ("a.txt", b"hello", "text/plain")}, None, "bad_image", "not an image"),
        ({"file": ("a.png", b"", "image/png")}, None, "bad_image", "empty file"),
        ({"file": ("a.png", png_digit()[:300], "image/png")}, None, "bad_image", "truncated"),
        (None, {"file": "just a string"}, "invalid_request", "UploadFile"),
        (None, {"other": "x"}, "invalid_request", "file"),
    ],
)
def test_bad_uploads_get_named_4xx(
    client: httpx.Client,
    files: dict[str, tuple[str, bytes, str]] | None,
    data: dict[str, str] | None,
    code: str,
    says: str,
) -> None:
    resp = client.post("/v1/predict/image", files=files, data=data)
    assert_error(resp, 422, code, says)


def test_blank_and_gif_uploads(client: httpx.Client) -> None:
    for fmt, says in (("PNG", "no digit found"), ("GIF", "unsupported image format GIF")):
        buf = io.BytesIO()
        Image.new("L", (64, 64), 255).save(buf, fmt)
        resp = client.post("/v1/predict/image", files={"file": ("x", buf.getvalue(), "image/x")})
        assert_error(resp, 422, "bad_image", says)


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert_error(client.get("/nope"), 404, "not_found", "Not Found")
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed", "Not Allowed")


def test_malformed_content_length_is_a_400(live: LiveServer) -> None:
    """httpx refuses to send it, so a raw socket: the HTTP parser answers 400, not 5xx."""
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}")
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 400"), status_line


def test_not_ready_until_a_model_appears(
    tmp_path: Path,
    onnx_models: tuple[Path, Path],
    server_factory: Callable[..., LiveServer],
    install_model: Callable[[Path, Path], None],
) -> None:
    prod = tmp_path / "production"
    live = server_factory(ModelStore(prod / MODEL_FILE, device="cpu"))
    with live.client() as c:
        assert c.get("/healthz").json()["model_loaded"] is False
        assert_error(c.get("/readyz"), 503, "not_ready", "not found")
        assert_error(c.post("/v1/predict", json={"images": zeros(1)}), 503, "not_ready", "")
        assert_error(c.get("/v1/model"), 503, "not_ready", "")
        install_model(onnx_models[0], prod)
        for _ in range(200):
            if c.get("/readyz").status_code == 200:
                break
            time.sleep(0.05)
        assert c.get("/readyz").json()["model_sha256"] == sha256_file(onnx_models[0])
        assert c.post("/v1/predict", json={"images": zeros(1)}).status_code == 200


def test_parse_batch_returns_float32_batch() -> None:
    arr = parse_batch(json.dumps({"images": zeros(2)}).encode(), max_batch=4)
    assert arr.shape == (2, 28, 28) and arr.dtype == np.float32


def test_confident_flag_follows_the_threshold_in_the_model(
    tmp_path: Path,
    onnx_models: tuple[Path, Path],
    install_model: Callable[[Path, Path], None],
    server_factory: Callable[..., LiveServer],
) -> None:
    images = np.random.default_rng(5).integers(0, 256, (8, 28, 28)).astype(np.float32)
    _, probs = load_model(onnx_models[0], device="cpu").predict(images)
    top = np.round(probs.max(axis=1).astype(np.float64), 6)
    # The threshold equals one of the reported probabilities: >= counts it confident.
    threshold = float(np.sort(top)[len(top) // 2])
    model = with_metadata(
        onnx_models[0], tmp_path / "m" / MODEL_FILE, confidence_threshold=repr(threshold)
    )
    prod = tmp_path / "prod"
    install_model(model, prod)
    live = server_factory(ModelStore(prod / MODEL_FILE, device="cpu"))
    with live.client() as client:
        body = client.post("/v1/predict", json={"images": images.tolist()}).json()
        assert body["confidence_threshold"] == threshold
        flags = [p["confident"] for p in body["predictions"]]
        assert flags == [p["probability"] >= threshold for p in body["predictions"]]
        assert flags == (top >= threshold).tolist()
        assert any(flags) and not all(flags)
        (upload,) = client.post(
            "/v1/predict/image", files={"file": ("d.png", png_digit(), "image/png")}
        ).json()["predictions"]
        assert upload["confident"] == (upload["probability"] >= threshold)
        doc = client.get("/openapi.json").json()
        assert "confident" in doc["components"]["schemas"]["Prediction"]["properties"]


def test_no_threshold_in_the_model_means_confident_null(client: httpx.Client) -> None:
    body = client.post("/v1/predict", json={"images": [[[0] * 28] * 28]}).json()
    assert body["confidence_threshold"] is None
    assert body["predictions"][0]["confident"] is None


@pytest.mark.parametrize("bad", ["high", "1.5", "-0.1", "nan"])
def test_an_unreadable_threshold_refuses_the_model(
    tmp_path: Path, onnx_models: tuple[Path, Path], bad: str
) -> None:
    from pipeline.core.errors import ModelFileError

    model = with_metadata(onnx_models[0], tmp_path / MODEL_FILE, confidence_threshold=bad)
    with pytest.raises(ModelFileError, match="confidence_threshold"):
        load_model(model, device="cpu")
