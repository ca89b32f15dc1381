"""Model switch under concurrent load: zero failed requests, and the served sha256 changes."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

from pipeline.core.atomic import sha256_file

from .conftest import LiveServer

N_CLIENTS = 4
SWAPS = 6


def wait_for_sha(client: httpx.Client, sha: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while client.get("/v1/model").json()["sha256"] != sha:
        assert time.monotonic() < deadline, f"server never switched to {sha[:12]}"
        time.sleep(0.02)


def test_switch_under_concurrent_requests(
    live: LiveServer,
    production_dir: Path,
    onnx_models: tuple[Path, Path],
    install_model: Callable[[Path, Path], None],
) -> None:
    sha_a, sha_b = (sha256_file(p) for p in onnx_models)
    assert sha_a != sha_b
    payload = {"images": np.random.default_rng(0).integers(0, 256, (2, 28, 28)).tolist()}
    stop = threading.Event()
    lock = threading.Lock()
    seen: Counter[str] = Counter()
    errors: list[str] = []

    def fire() -> None:
        with live.client() as c:
            while not stop.is_set():
                try:
                    resp = c.post("/v1/predict", json=payload)
                except httpx.HTTPError as err:  # a dropped connection is a failure too
                    with lock:
                        errors.append(repr(err))
                    continue
                with lock:
                    if resp.status_code != 200:
                        errors.append(f"{resp.status_code} {resp.text[:200]}")
                    else:
                        seen[resp.json()["model_sha256"]] += 1

    threads = [threading.Thread(target=fire) for _ in range(N_CLIENTS)]
    for t in threads:
        t.start()
    try:
        with live.client() as c:
            wait_for_sha(c, sha_a)
            for i in range(SWAPS):
                model, sha = (onnx_models[1], sha_b) if i % 2 == 0 else (onnx_models[0], sha_a)
                install_model(model, production_dir)  # atomic rename of the whole dir
                wait_for_sha(c, sha)
                time.sleep(0.2)  # let requests run on the new model
            final = c.get("/v1/model").json()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert errors == []
    assert seen[sha_a] > 0 and seen[sha_b] > 0, seen
    assert set(seen) == {sha_a, sha_b}
    assert final["sha256"] == sha_a and final["reloads"] == 1 + SWAPS
    assert final["last_reload_error"] is None
