"""Record a stage's current outputs in ``dvc.lock`` with the real DVC (``dvc commit``).

Used by the command line only (``python -m pipeline resume``): the stage functions run
without DVC. After ``train --resume`` finishes an interrupted run, ``dvc.lock`` still
describes the outputs of the last *completed* ``dvc repro``; until the resumed outputs
are committed, the next ``dvc repro`` sees the train stage as changed and replaces the
resumed model (re-running it, or restoring an older one from DVC's run cache).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from pipeline.core.errors import DvcCommandError

TRAIN_STAGE = "train"


def require_dvc_project(root: Path) -> None:
    """:class:`DvcCommandError` unless ``root`` holds ``dvc.yaml`` (checked before training)."""
    if not (Path(root) / "dvc.yaml").is_file():
        raise DvcCommandError(
            f"no dvc.yaml in {Path(root).resolve()}: run `python -m pipeline resume` from the "
            "project root, or `python -m pipeline train --resume` outside DVC"
        )


def dvc_commit(stage: str, root: Path) -> str:
    """Run ``dvc commit --force <stage>`` in ``root``; return DVC's output.

    ``--force`` because DVC otherwise asks for confirmation when the stage's dependencies
    or parameters differ from ``dvc.lock`` (they do, after a resumed run with new
    parameters). Raises :class:`DvcCommandError` with DVC's last error line on failure.
    """
    argv = [sys.executable, "-m", "dvc", "commit", "--force", stage]
    proc = subprocess.run(argv, cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {proc.returncode}"
        raise DvcCommandError(f"`dvc commit --force {stage}` failed in {root}: {reason}")
    return (proc.stdout + proc.stderr).strip()
