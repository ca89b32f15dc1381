"""The oldest onnxruntime that loads the exported model, tested for real (docs/model-handoff.md).

The exporter writes ONNX IR version 10 (opset 18); onnxruntime 1.17 refuses IR 10, and
1.18 is the first release that loads and runs it. Each version is installed with uv into
a throwaway venv (needs PyPI), then loads the model and runs a batch.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

OLDEST_OK = "1.18.0"  # docs/model-handoff.md and pyproject's serve extra say >= 1.18
TOO_OLD = "1.17.3"

PROBE = """
import sys, numpy as np, onnxruntime as ort
s = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
_, p = s.run(["logits", "probabilities"], {"image": np.full((3, 1, 28, 28), 127, np.float32)})
assert p.shape == (3, 10) and abs(float(p.sum()) - 3) < 1e-4
print("loaded with onnxruntime", ort.__version__)
"""


def uv() -> list[str]:
    found = shutil.which("uv") or str(Path(sys.executable).with_name("uv"))
    if not Path(found).exists():
        pytest.fail("uv is needed to build the throwaway venvs (pip install uv)")
    return [found]


def probe(version: str, model: Path, root: Path) -> subprocess.CompletedProcess[str]:
    venv = root / f"ort-{version}"
    subprocess.run([*uv(), "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [
            *uv(),
            "pip",
            "install",
            "-q",
            "--python",
            str(python),
            f"onnxruntime=={version}",
            "numpy<2",
        ],
        check=True,
        timeout=600,
    )
    return subprocess.run(
        [str(python), "-c", PROBE, str(model)], capture_output=True, text=True, timeout=120
    )


@pytest.mark.slow
def test_oldest_onnxruntime_that_loads_the_export(
    tmp_path: Path, onnx_models: tuple[Path, Path]
) -> None:
    ok = probe(OLDEST_OK, onnx_models[0], tmp_path)
    assert ok.returncode == 0 and f"onnxruntime {OLDEST_OK}" in ok.stdout, ok.stderr
    old = probe(TOO_OLD, onnx_models[0], tmp_path)
    assert old.returncode != 0
    assert "Unsupported model IR version: 10" in old.stderr, old.stderr


if __name__ == "__main__":  # python tests/serving/test_ort_versions.py MODEL VERSION...
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        for v in sys.argv[2:]:
            r = probe(v, Path(sys.argv[1]), Path(tmp))
            print(v, "OK" if r.returncode == 0 else "FAIL", (r.stdout + r.stderr).strip()[-300:])
