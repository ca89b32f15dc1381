"""onnxruntime against PyTorch eager on the same model, side by side, on the CPU.

    python benchmarks/bench_inference.py --out docs/bench/inference.json

The model is the production one when ``models/production/model.onnx`` was exported
from the current ``models/candidate/model.pt`` (its ``source_model_sha256`` metadata
matches; the registry keeps only the ONNX file), else the candidate (``model.pt`` plus
its ONNX export, exported to a temporary file if missing), else an untrained
model of the configured architecture (speed does not depend on the weight values;
the JSON says which). ``--pt``/``--onnx`` pick files explicitly.

PyTorch runs as its best plain eager self: the exported module (normalisation and
softmax included, exactly what the ONNX graph computes), ``eval()``, under
``torch.inference_mode()``, with 1 or all threads, in NCHW and channels_last layout.
onnxruntime runs the ONNX file with ``ORT_ENABLE_ALL`` graph optimisation; four session
configurations (1 or all threads, spin-wait on/off) are all measured and reported, and
the best one per batch size is compared. PyTorch is measured first and each
onnxruntime session alone (live thread pools of one engine slow the other down
several-fold, which would flatter whichever runs second). The figure per batch size is
the median over repeats of the mean time per call; ``uptime`` load is recorded before
and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from machine import cpu_model, load_average  # noqa: E402

from pipeline.core.atomic import sha256_file  # noqa: E402
from pipeline.core.config import load_config  # noqa: E402
from pipeline.handoff.export import export_onnx, wrap  # noqa: E402
from pipeline.handoff.onnx_runtime import read_metadata  # noqa: E402
from pipeline.training.model_io import LoadedModel, load_model_file  # noqa: E402
from pipeline.training.models import build_model  # noqa: E402

TARGETS = {1: 4.0, 1000: 10.0}


def pick_model(pt: Path | None, onnx: Path | None, tmp: Path) -> tuple[LoadedModel, Path, str]:
    """(PyTorch model, ONNX path, description of where they came from)."""
    if pt is not None:
        model = load_model_file(pt)
        if onnx is None:
            onnx = export_onnx(model, tmp / "model.onnx")
        return model, onnx, f"{pt} + {onnx}"
    cfg = load_config(ROOT / "params.yaml")
    prod_onnx = ROOT / cfg.registry.production_dir / "model.onnx"
    cand_pt, cand_onnx = ROOT / cfg.train.model_path, ROOT / cfg.export.onnx_path
    if prod_onnx.is_file() and cand_pt.is_file() and onnx is None:
        # The registry keeps only the ONNX file; its PyTorch source is the candidate
        # model.pt when the sha256 recorded at export time matches.
        source_sha = read_metadata(prod_onnx).get("source_model_sha256")
        if source_sha == sha256_file(cand_pt):
            return load_model_file(cand_pt), prod_onnx, "production (PyTorch: its source model.pt)"
    if cand_pt.is_file():
        model = load_model_file(cand_pt)
        if onnx is None:
            onnx = cand_onnx if cand_onnx.is_file() else export_onnx(model, tmp / "model.onnx")
        return model, onnx, f"candidate ({cand_pt.relative_to(ROOT)})"
    torch.manual_seed(0)
    module = build_model(cfg.train.model, cfg.train.width).eval()
    model = LoadedModel(module, cfg.train.model, cfg.train.width, 0.1307, 0.3081)
    path = export_onnx(model, tmp / "model.onnx")
    return model, path, f"untrained {cfg.train.model} width {cfg.train.width} (no trained model)"


def ort_session(path: Path, threads: int, spinning: bool) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_runner(sess: ort.InferenceSession, x: np.ndarray) -> Callable[[], Any]:
    def run() -> Any:
        return sess.run(None, {"image": x})

    return run


def measure(fn: Callable[[], Any], repeats: int, budget_s: float) -> tuple[list[float], int]:
    """Warm up, then ``repeats`` timings of about ``budget_s`` each: (seconds per call, calls)."""
    # Warm-up: oneDNN/MLAS choose kernels on the first calls, and the first PyTorch
    # calls after an export in the same process are slow (~150 ms) for a while.
    warm_until = time.perf_counter() + max(0.5, budget_s)
    warm = 0
    while warm < 10 or time.perf_counter() < warm_until:
        fn()
        warm += 1
    calls = max(1, int(budget_s / max(time_per_call(fn, 3), 1e-6)))
    return [time_per_call(fn, calls) for _ in range(repeats)], calls


def time_per_call(fn: Callable[[], Any], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def images(n: int) -> np.ndarray:
    path = ROOT / "data" / "prepared" / "test_images.npy"
    if path.is_file():
        arr = np.load(path, mmap_mode="r")[:n]
    else:
        arr = np.random.default_rng(0).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    return np.ascontiguousarray(arr, dtype=np.float32).reshape(n, 1, 28, 28)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pt", type=Path, help="PyTorch model file (model.pt)")
    parser.add_argument("--onnx", type=Path, help="its ONNX export")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 1000])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget-s", type=float, default=0.25, help="target seconds per timing")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    with tempfile.TemporaryDirectory() as tmp:
        model, onnx_path, source = pick_model(args.pt, args.onnx, Path(tmp))
        module = wrap(model)
        load_before = load_average()
        inputs = {bs: images(bs) for bs in args.batch_sizes}
        samples: dict[int, dict[str, list[float]]] = {bs: {} for bs in args.batch_sizes}
        calls: dict[int, dict[str, int]] = {bs: {} for bs in args.batch_sizes}
        reference: dict[int, np.ndarray] = {}
        # PyTorch first, before any onnxruntime session exists: the two engines' thread
        # pools (OpenMP and onnxruntime's spinning workers) slow each other down badly
        # when both are alive and alternate, so each engine is measured on its own.
        # Its thread count is tuned like onnxruntime's: all cores, or one (which wins
        # when another process keeps a core busy: an OpenMP region then waits for a
        # descheduled thread).
        # Both memory layouts: channels_last (as trained) is faster for large batches.
        layouts = {"nchw": torch.contiguous_format, "cl": torch.channels_last}
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            for layout, fmt in layouts.items():
                laid_out = module.to(memory_format=fmt)
                for bs, x in inputs.items():
                    xt = torch.from_numpy(x).contiguous(memory_format=fmt)

                    def run_torch(xt: torch.Tensor = xt, m: torch.nn.Module = laid_out) -> Any:
                        with torch.inference_mode():
                            return m(xt)

                    reference[bs] = run_torch()[1].numpy()
                    name = f"torch[threads={threads},{layout}]"
                    samples[bs][name], calls[bs][name] = measure(
                        run_torch, args.repeats, args.budget_s
                    )
        diff = 0.0
        for threads in sorted({1, cores}):
            for spin in (True, False):
                name = f"ort[threads={threads},spin={int(spin)}]"
                sess = ort_session(onnx_path, threads, spin)
                for bs, x in inputs.items():
                    # Parity on this batch (sanity: the same model on both sides).
                    out = sess.run(None, {"image": x})[1]
                    diff = max(diff, float(np.abs(out - reference[bs]).max()))
                    samples[bs][name], calls[bs][name] = measure(
                        ort_runner(sess, x), args.repeats, args.budget_s
                    )
                del sess  # its threads go before the next configuration starts
        results: dict[str, Any] = {}
        for bs in args.batch_sizes:
            medians = {name: statistics.median(v) for name, v in samples[bs].items()}
            best_ort = min((k for k in medians if k.startswith("ort")), key=medians.__getitem__)
            best_torch = min((k for k in medians if k.startswith("torch")), key=medians.__getitem__)
            speedup = medians[best_torch] / medians[best_ort]
            results[str(bs)] = {
                "batch_size": bs,
                "median_ms": {k: round(v * 1000, 4) for k, v in medians.items()},
                "min_ms": {k: round(min(v) * 1000, 4) for k, v in samples[bs].items()},
                "calls_per_timing": calls[bs],
                "repeats": args.repeats,
                "best_ort": best_ort,
                "best_torch": best_torch,
                "speedup_best_ort_vs_torch": round(speedup, 2),
                "target_speedup": TARGETS.get(bs),
                "target_met": None if bs not in TARGETS else speedup >= TARGETS[bs],
                "max_abs_prob_diff": diff,
                "ort_images_per_s": round(bs / medians[best_ort], 1),
                "torch_images_per_s": round(bs / medians[best_torch], 1),
            }
    report = {
        "benchmark": "bench_inference",
        "model_source": source,
        "model": {"name": model.name, "width": model.width},
        "onnx_path": str(onnx_path) if str(onnx_path).startswith(str(ROOT)) else "(temporary)",
        "results": results,
        "hardware": {"cpu": cpu_model(), "logical_cpus": cores, "gpu": "none (not measured)"},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
        },
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"model: {source}; load average {load_before} -> {report['load_average_after']}")
    print("| batch | best torch eager | ms | best ORT | ms | speedup | target |")
    print("|---:|---|---:|---|---:|---:|---|")
    for r in results.values():
        target = r["target_speedup"]
        verdict = (
            "-" if target is None else f">= {target}x: {'met' if r['target_met'] else 'MISSED'}"
        )
        print(
            f"| {r['batch_size']} | {r['best_torch']} | {r['median_ms'][r['best_torch']]} "
            f"| {r['best_ort']} "
            f"| {r['median_ms'][r['best_ort']]} | {r['speedup_best_ort_vs_torch']}x | {verdict} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
