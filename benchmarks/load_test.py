"""Bounded HTTP load test of the inference service, loopback only.

    python benchmarks/load_test.py --duration 20 --out docs/bench/serving.json

Starts ``python -m pipeline serve`` on a free 127.0.0.1 port over the production model
(``--model`` to pick another ONNX file; ``--url`` to hit a server that is already
running on loopback), then for each concurrency level (default 1, 8, 32) keeps that
many single-image requests in flight for ``--duration`` seconds with an aiohttp client
(after a short unrecorded warm-up) and reports p50/p95/p99 latency, requests/s and the
error count (any non-200 or transport error). Images are real MNIST test digits when
``data/prepared`` exists, otherwise random pixels. Writes JSON with the hardware,
versions and ``uptime`` load, and prints a Markdown table. Exits 1 on any error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import aiohttp
import numpy as np
from machine import cpu_model, load_average

ROOT = Path(__file__).resolve().parents[1]


def payloads(endpoint: str, n: int = 64) -> list[tuple[bytes, str]]:
    """Pre-encoded request bodies (the client must not measure its own JSON encoding)."""
    path = ROOT / "data" / "prepared" / "test_images.npy"
    if path.is_file():
        images = np.load(path, mmap_mode="r")[:n].astype(np.uint8)
    else:
        images = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    out = []
    for img in images:
        if endpoint == "json":
            out.append((json.dumps({"images": [img.tolist()]}).encode(), "application/json"))
        else:
            from PIL import Image

            buf = io.BytesIO()
            Image.fromarray(255 - img).resize((112, 112)).save(buf, "PNG")
            out.append((buf.getvalue(), "image/png"))
    return out


def percentile_ms(samples: list[float], q: float) -> float | None:
    return round(float(np.percentile(samples, q)) * 1000, 3) if samples else None


async def run_level(
    url: str, endpoint: str, bodies: list[tuple[bytes, str]], concurrency: int, duration: float
) -> dict[str, Any]:
    path = "/v1/predict" if endpoint == "json" else "/v1/predict/image"
    latencies: list[float] = []
    errors: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)

    async def one(session: aiohttp.ClientSession, i: int) -> tuple[float, str | None]:
        body, ctype = bodies[i % len(bodies)]
        start = time.perf_counter()
        try:
            if endpoint == "json":
                req = session.post(url + path, data=body, headers={"content-type": ctype})
            else:
                form = aiohttp.FormData()
                form.add_field("file", body, filename="digit.png", content_type=ctype)
                req = session.post(url + path, data=form)
            async with req as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as err:
            return time.perf_counter() - start, type(err).__name__
        return time.perf_counter() - start, None if status == 200 else f"HTTP {status}"

    async def worker(session: aiohttp.ClientSession, w: int, until: float, record: bool) -> None:
        i = w
        while time.perf_counter() < until:
            elapsed, err = await one(session, i)
            i += concurrency
            if not record:
                continue
            if err is None:
                latencies.append(elapsed)
            else:
                errors[err] = errors.get(err, 0) + 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        warm_until = time.perf_counter() + min(1.0, duration / 4)
        await asyncio.gather(*(worker(session, w, warm_until, False) for w in range(concurrency)))
        start = time.perf_counter()
        until = start + duration
        await asyncio.gather(*(worker(session, w, until, True) for w in range(concurrency)))
        wall = time.perf_counter() - start
    n_err = sum(errors.values())
    return {
        "concurrency": concurrency,
        "duration_s": round(wall, 3),
        "requests": len(latencies) + n_err,
        "ok": len(latencies),
        "errors": n_err,
        "error_kinds": errors,
        "requests_per_s": round((len(latencies) + n_err) / wall, 1),
        "p50_ms": percentile_ms(latencies, 50),
        "p95_ms": percentile_ms(latencies, 95),
        "p99_ms": percentile_ms(latencies, 99),
        "max_ms": percentile_ms(latencies, 100),
        "load_average_after": load_average(),
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def default_model() -> Path:
    for candidate in (
        ROOT / "models" / "production" / "model.onnx",
        ROOT / "models" / "candidate" / "model.onnx",
    ):
        if candidate.is_file():
            return candidate
    raise SystemExit("no model: pass --model PATH (no models/production or candidate ONNX)")


@contextlib.contextmanager
def local_server(
    model: Path, extra_sets: list[str], started: list[subprocess.Popen[bytes]] | None = None
) -> Iterator[str]:
    """``python -m pipeline serve`` over a private copy of ``model`` on a free port.

    ``started`` receives the server process (e.g. to measure its memory)."""
    with tempfile.TemporaryDirectory() as tmp:
        prod = Path(tmp) / "production"
        prod.mkdir()
        shutil.copyfile(model, prod / "model.onnx")
        port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "pipeline",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--set",
            f"registry.production_dir={prod}",
        ]
        for item in extra_sets:
            cmd += ["--set", item]
        log = open(Path(tmp) / "server.log", "w+")  # noqa: SIM115 - read back on failure
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if started is not None:
            started.append(proc)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc, log)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: io.TextIOBase) -> None:
    import httpx

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        time.sleep(0.2)
    raise SystemExit("server did not become ready within 60 s")


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| concurrency | requests | errors | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["levels"]:
        lines.append(
            f"| {r['concurrency']} | {r['requests']} | {r['errors']} | {r['requests_per_s']} "
            f"| {r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['max_ms']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--endpoint", choices=["json", "image"], default="json")
    parser.add_argument("--model", type=Path, help="ONNX model (default: production)")
    parser.add_argument("--url", help="existing server on loopback, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--set", dest="sets", action="append", default=[], help="serve.* override for the server"
    )
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("--url must be a loopback address")
    bodies = payloads(args.endpoint)
    load_before = load_average()
    with contextlib.ExitStack() as stack:
        url = args.url or stack.enter_context(
            local_server((args.model or default_model()).resolve(), args.sets)
        )
        import httpx

        model = httpx.get(f"{url}/v1/model", timeout=10).json()
        levels = [
            asyncio.run(run_level(url, args.endpoint, bodies, c, args.duration))
            for c in args.concurrency
        ]
    import fastapi
    import onnxruntime
    import uvicorn

    result = {
        "benchmark": "load_test",
        "endpoint": args.endpoint,
        "single_image_requests": True,
        "levels": levels,
        "total_errors": sum(r["errors"] for r in levels),
        "model": {k: model.get(k) for k in ("sha256", "version", "provider", "path")},
        "server_sets": args.sets,
        "hardware": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "machine": platform.machine(),
            "gpu": "none (not measured)",
        },
        "versions": {
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "fastapi": fastapi.__version__,
            "uvicorn": uvicorn.__version__,
            "aiohttp": aiohttp.__version__,
            "numpy": np.__version__,
        },
        "load_average_before": load_before,
        "note": "client and server share the machine's CPUs (loopback)",
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(
        f"load average before {load_before}; model {model.get('sha256', '')[:12]} "
        f"on {model.get('provider')}"
    )
    return 1 if result["total_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
