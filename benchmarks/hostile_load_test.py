"""Bounded hostile-input load test of the inference service, loopback only.

    python benchmarks/hostile_load_test.py --duration 20 --out docs/bench/hostile.json

Starts ``python -m pipeline serve`` on a free 127.0.0.1 port (as ``load_test.py`` does)
and keeps ``--concurrency`` clients busy for ``--duration`` seconds with a fixed mix of
valid requests (single-image JSON batches and small PNG uploads) and hostile ones: the
~2 KB JPEG whose header claims 6000x6000, the ~150 KB 6300x6300 PNG, a PNG whose header
claims 10x its data, an ONNX file posted as an image, and malformed JSON. The server's
RSS is sampled with psutil every 20 ms. Reports requests and statuses per kind, the p99
of the valid requests, shed 503s and the RSS peak; exits 1 unless: every valid request
got 200, every hostile one a 4xx, no 5xx at all (a 503 from load shedding counts as a
failure here: the limits are sized so that this load is not shed), the RSS peak stays
under ``--max-rss-mib`` and the valid requests' p99 under ``--max-p99-ms``.

The hostile files come from ``tests/helpers/hostile.py`` (loaded by path).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import psutil
from load_test import ROOT, default_model, local_server, percentile_ms
from machine import cpu_model, load_average


def _hostile_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "hostile", ROOT / "tests" / "helpers" / "hostile.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def request_mix() -> list[tuple[str, str, bytes, bool]]:
    """``(kind, endpoint, body, valid)``, in the order the clients cycle through them.

    Two thirds valid; each hostile kind once per 15 requests.
    """
    from PIL import Image

    h = _hostile_module()
    rng = np.random.default_rng(0)
    digit = rng.integers(0, 256, (28, 28)).tolist()
    json_body = json.dumps({"images": [digit]}).encode()
    buf = io.BytesIO()
    Image.fromarray(np.asarray(h.digit_image(112))).save(buf, "PNG")
    png = buf.getvalue()
    valid = [("valid_json", "json", json_body, True), ("valid_png", "image", png, True)]
    hostile = [
        ("lying_jpeg_6000", "image", h.lying_jpeg(), False),
        ("huge_png_6300", "image", h.huge_png(), False),
        ("lying_png_2000", "image", h.lying_png(), False),
        ("onnx_as_image", "image", h.three_class_onnx(), False),
        ("bad_json", "json", b'{"images": [[[1, 2', False),
    ]
    mix: list[tuple[str, str, bytes, bool]] = []
    for item in hostile:
        mix += [valid[0], valid[1], valid[0], valid[1], valid[0], valid[1], valid[0], item]
        mix += [valid[1], item] if item[0] == "lying_jpeg_6000" else []
    # 2/3 valid overall; hostile requests are spread out rather than bunched.
    return mix


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self.samples: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            with contextlib.suppress(psutil.Error):
                rss = self.proc.memory_info().rss
                self.samples.append(rss)
                self.peak = max(self.peak, rss)
            time.sleep(self.every_s)


async def drive(
    url: str, mix: list[tuple[str, str, bytes, bool]], concurrency: int, duration: float
) -> dict[str, Any]:
    by_kind: dict[str, dict[str, int]] = {}
    valid_latency: list[float] = []
    latency_by_kind: dict[str, list[float]] = {}
    timeout = aiohttp.ClientTimeout(total=30)
    connector = aiohttp.TCPConnector(limit=concurrency)

    async def one(session: aiohttp.ClientSession, i: int) -> None:
        kind, endpoint, body, valid = mix[i % len(mix)]
        start = time.perf_counter()
        try:
            if endpoint == "json":
                req = session.post(
                    url + "/v1/predict", data=body, headers={"content-type": "application/json"}
                )
            else:
                form = aiohttp.FormData()
                form.add_field("file", body, filename=kind, content_type="application/octet-stream")
                req = session.post(url + "/v1/predict/image", data=form)
            async with req as resp:
                await resp.read()
                status = str(resp.status)
        except (aiohttp.ClientError, TimeoutError) as err:
            status = type(err).__name__
        elapsed = time.perf_counter() - start
        counts = by_kind.setdefault(kind, {})
        counts[status] = counts.get(status, 0) + 1
        latency_by_kind.setdefault(kind, []).append(elapsed)
        if valid and status == "200":
            valid_latency.append(elapsed)

    async def worker(session: aiohttp.ClientSession, w: int, until: float) -> None:
        i = w * 7  # workers start at different points of the mix
        while time.perf_counter() < until:
            await one(session, i)
            i += 1

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session, w, start + duration) for w in range(concurrency)))
        wall = time.perf_counter() - start
    statuses: dict[str, int] = {}
    for counts in by_kind.values():
        for status, n in counts.items():
            statuses[status] = statuses.get(status, 0) + n
    return {
        "duration_s": round(wall, 3),
        "concurrency": concurrency,
        "requests": sum(statuses.values()),
        "statuses": dict(sorted(statuses.items())),
        "by_kind": by_kind,
        "valid_ok": len(valid_latency),
        "valid_p50_ms": percentile_ms(valid_latency, 50),
        "valid_p99_ms": percentile_ms(valid_latency, 99),
        "valid_max_ms": percentile_ms(valid_latency, 100),
        "p99_ms_by_kind": {k: percentile_ms(v, 99) for k, v in sorted(latency_by_kind.items())},
    }


def verdict(
    result: dict[str, Any],
    mix: list[tuple[str, str, bytes, bool]],
    max_rss_mib: float,
    max_p99: float,
) -> list[str]:
    valid_kinds = {kind for kind, _, _, valid in mix if valid}
    problems = []
    for kind, counts in result["by_kind"].items():
        for status, n in counts.items():
            ok = status == "200" if kind in valid_kinds else status.startswith("4")
            if not ok:
                problems.append(f"{kind}: {n} x {status}")
    fives = sum(n for s, n in result["statuses"].items() if s.startswith("5"))
    if fives:
        problems.append(f"{fives} 5xx answers (503 shed: {result['statuses'].get('503', 0)})")
    if result["rss_peak_mib"] > max_rss_mib:
        problems.append(f"RSS peak {result['rss_peak_mib']} MiB > {max_rss_mib}")
    if result["valid_p99_ms"] is None or result["valid_p99_ms"] > max_p99:
        problems.append(f"valid p99 {result['valid_p99_ms']} ms > {max_p99}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", type=Path, help="ONNX model (default: production)")
    parser.add_argument("--max-rss-mib", type=float, default=1536.0)
    parser.add_argument("--max-p99-ms", type=float, default=50.0)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="serve.* override")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    args = parser.parse_args(argv)
    mix = request_mix()
    load_before = load_average()
    started: list[subprocess.Popen[bytes]] = []
    with local_server((args.model or default_model()).resolve(), args.sets, started) as url:
        sampler = RssSampler(started[0].pid)
        rss_start = sampler.proc.memory_info().rss
        sampler.start()
        try:
            result = asyncio.run(drive(url, mix, args.concurrency, args.duration))
        finally:
            sampler.stop.set()
            sampler.join()
    import onnxruntime
    import PIL

    mib = 1024 * 1024
    result.update(
        benchmark="hostile_load_test",
        rss_start_mib=round(rss_start / mib, 1),
        rss_peak_mib=round(sampler.peak / mib, 1),
        rss_samples=len(sampler.samples),
        mix=[kind for kind, *_ in mix],
        server_sets=args.sets,
        hardware={
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "machine": platform.machine(),
        },
        versions={
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "pillow": PIL.__version__,
        },
        load_average_before=load_before,
        load_average_after=load_average(),
        note="client and server share the machine's CPUs (loopback)",
    )
    problems = verdict(result, mix, args.max_rss_mib, args.max_p99_ms)
    result["problems"] = problems
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['requests']} requests in {result['duration_s']} s at concurrency "
        f"{args.concurrency}; statuses {result['statuses']}; valid p50/p99/max "
        f"{result['valid_p50_ms']}/{result['valid_p99_ms']}/{result['valid_max_ms']} ms; "
        f"server RSS {result['rss_start_mib']} -> peak {result['rss_peak_mib']} MiB; "
        f"load {load_before} -> {result['load_average_after']}"
    )
    for kind, counts in sorted(result["by_kind"].items()):
        print(f"  {kind:18s} {counts}  p99 {result['p99_ms_by_kind'][kind]} ms")
    for problem in problems:
        print(f"FAIL: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
