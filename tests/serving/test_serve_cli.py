"""``python -m pipeline serve`` for real: startup log names the provider; it serves."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from pipeline.core.atomic import sha256_file
from pipeline.serving.model_store import MODEL_FILE

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_serve_command(tmp_path: Path, production_dir: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pipeline",
                "serve",
                "--port",
                str(port),
                "--set",
                f"registry.production_dir={production_dir}",
            ],
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            ready = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    ready = httpx.get(f"{url}/readyz", timeout=2)
                    break
                except httpx.TransportError:
                    time.sleep(0.2)
            assert ready is not None and ready.status_code == 200, log_path.read_text()
            assert ready.json()["model_sha256"] == sha256_file(production_dir / MODEL_FILE)
            resp = httpx.post(f"{url}/v1/predict", json={"images": [[[0] * 28] * 28]})
            assert resp.status_code == 200
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    text = log_path.read_text()
    assert "on CPUExecutionProvider (requested CPUExecutionProvider; previously no model)" in text
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal.
    assert "Application shutdown complete" in text
    assert proc.returncode in (0, -15), text


def test_non_loopback_bind_needs_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if k != "MNIST_SERVE_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ConfigError: refusing to serve on 0.0.0.0 without a token: set the environment "
        "variable MNIST_SERVE_TOKEN (bearer token for /v1/predict*), bind 127.0.0.1, or set "
        "serve.allow_unauthenticated=true"
    )
