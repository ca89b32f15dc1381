"""Device selection and per-device runtime settings of the train stage.

``select_device`` is pure logic (the CUDA probe is injectable) so it is unit-tested
without a GPU; ``configure_runtime`` applies the process-wide torch knobs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.core.errors import ConfigError

DeviceRequest = Literal["auto", "cpu", "cuda"]


def select_device(
    requested: DeviceRequest,
    is_cuda_available: Callable[[], bool] = torch.cuda.is_available,
) -> torch.device:
    """Map ``train.device`` to a torch device.

    ``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU raises
    :class:`ConfigError` (an explicit request must not silently fall back).
    """
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        if not is_cuda_available():
            raise ConfigError(
                "train.device: 'cuda' requested but no CUDA device is available "
                "(use 'auto' or 'cpu')"
            )
        return torch.device("cuda")
    if requested == "auto":
        return torch.device("cuda" if is_cuda_available() else "cpu")
    raise ConfigError(f"train.device: unknown device {requested!r} (auto | cpu | cuda)")


@dataclass(frozen=True)
class RuntimeInfo:
    """What the run actually uses: recorded in the metrics JSON."""

    device: str
    device_name: str
    num_threads: int
    amp_dtype: str | None  # "bfloat16" with train.amp where bf16 is native, else None
    channels_last: bool
    compile: bool


def resolve_threads(requested: int, cpu_count: int | None = None) -> int:
    """``train.num_threads``: 0 means every core this process may use."""
    if requested > 0:
        return requested
    if cpu_count is not None:
        return max(1, cpu_count)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def configure_runtime(
    device: torch.device,
    num_threads: int,
    amp: bool,
    channels_last: bool,
    compile_model: bool,
) -> RuntimeInfo:
    """Apply torch's process-wide settings for training on ``device``.

    CPU: all cores (intra-op threads), flush denormals (tiny gradients late in a
    OneCycle schedule otherwise hit the slow denormal path). CUDA: cudnn autotuning
    and TF32 matmuls. With ``amp`` the training loop autocasts to bf16 on CUDA and on
    CPUs that compute bf16 natively (:func:`cpu_has_bf16`); elsewhere bf16 would be
    emulated, slower than float32, so it stays off there.
    """
    threads = resolve_threads(num_threads)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name()
    return RuntimeInfo(
        device=device.type,
        device_name=name,
        num_threads=threads,
        amp_dtype="bfloat16" if amp and (device.type == "cuda" or cpu_has_bf16()) else None,
        channels_last=channels_last,
        compile=compile_model,
    )


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX) for oneDNN's convs.

    On a 2-core AMD EPYC with AVX512-BF16, bf16 autocast trains the default profile about
    1.2x faster per epoch than float32, augmentation included (docs/benchmarks.md).
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def _cpu_name() -> str:
    """The ``model name`` line of /proc/cpuinfo, or ``cpu`` where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        # Only a label for the metrics JSON; a missing /proc must not stop training.
        return "cpu"
    return "cpu"
