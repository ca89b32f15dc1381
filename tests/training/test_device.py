"""Device selection logic (no GPU needed: the CUDA probe is injected)."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.errors import ConfigError
from pipeline.training.device import configure_runtime, cpu_has_bf16, resolve_threads, select_device


def yes() -> bool:
    return True


def no() -> bool:
    return False


@pytest.mark.parametrize(
    ("requested", "probe", "expected"),
    [
        ("auto", yes, "cuda"),
        ("auto", no, "cpu"),
        ("cpu", yes, "cpu"),
        ("cpu", no, "cpu"),
        ("cuda", yes, "cuda"),
    ],
)
def test_select_device(requested: str, probe: object, expected: str) -> None:
    assert select_device(requested, probe).type == expected  # type: ignore[arg-type]


def test_cuda_without_gpu_is_a_named_config_error() -> None:
    with pytest.raises(ConfigError, match=r"train\.device: 'cuda' requested but no CUDA"):
        select_device("cuda", no)


def test_cpu_request_never_probes_cuda() -> None:
    def explode() -> bool:
        raise AssertionError("probed")

    assert select_device("cpu", explode).type == "cpu"


def test_unknown_device_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown device"):
        select_device("tpu", no)  # type: ignore[arg-type]


def test_resolve_threads() -> None:
    assert resolve_threads(3) == 3
    assert resolve_threads(0, cpu_count=8) == 8
    assert resolve_threads(0) >= 1


def test_configure_runtime_cpu_sets_threads_and_bf16_only_where_native() -> None:
    before = torch.get_num_threads()
    try:
        info = configure_runtime(
            torch.device("cpu"), 1, amp=True, channels_last=True, compile_model=False
        )
        assert torch.get_num_threads() == 1
        assert info.device == "cpu" and info.num_threads == 1
        # Emulated bf16 would be slower than float32: autocast only where it is native.
        assert info.amp_dtype == ("bfloat16" if cpu_has_bf16() else None)
        assert info.device_name
        off = configure_runtime(
            torch.device("cpu"), 1, amp=False, channels_last=True, compile_model=False
        )
        assert off.amp_dtype is None
    finally:
        torch.set_num_threads(before)
