"""pipeline/core/dirswap.py: swaps, leftovers, journals that cannot be replayed, the CLI.

The kill-at-every-point property of ingest, promote and rollback is in test_crash.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.dirswap import journal_path, locked, recover, replacing
from pipeline.core.errors import SwapRecoveryError

ROOT = Path(__file__).resolve().parents[2]


def contents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


def hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_replacing_installs_every_directory_and_leaves_nothing(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x").write_text("old a")
    with replacing([a, b]) as (new_a, new_b):
        (new_a / "x").write_text("new a")
        (new_b / "y").write_text("new b")
        assert contents(a) == {"x": "old a"} and not b.exists()  # nothing visible yet
    assert contents(a) == {"x": "new a"} and contents(b) == {"y": "new b"}
    assert hidden(tmp_path) == []


def test_an_error_while_building_changes_nothing(tmp_path: Path) -> None:
    a = tmp_path / "data" / "a"
    with pytest.raises(RuntimeError), replacing([a]) as (new_a,):
        (new_a / "x").write_text("half")
        raise RuntimeError("parse failed")
    assert not (tmp_path / "data").exists()  # not even the parent this created


def test_recover_removes_leftovers_of_this_and_earlier_versions_only(tmp_path: Path) -> None:
    dest = tmp_path / "production"
    dest.mkdir()
    junk = [
        ".production.1a2b3c4d.tmp",  # a staging directory (also mkdtemp's old names)
        ".production.aside-1a2b3c4d.tmp",  # the exchange fallback's side name
        ".production.old.4242",  # pipeline/core/atomic.py replace_dir, before
        ".production.aside.4242",  # pipeline/release/promote.py swap_in, before
        ".production.rollback.4242",  # pipeline/release/promote.py rollback, before
        "..production.journal.x1y2z3w4.tmp",  # a journal being written
    ]
    for name in junk:
        (tmp_path / name).mkdir() if "journal" not in name else (tmp_path / name).write_text("")
    (tmp_path / f"{junk[0]}/model.onnx").write_bytes(b"12 MB in real life")
    kept = [".gitignore", ".production-notes", ".previous.1a2b3c4d.tmp"]  # not ours / other dest
    for name in kept:
        (tmp_path / name).write_text("keep")
    done = recover(dest, [dest])
    assert len(done) == len(junk)
    assert hidden(tmp_path) == sorted(kept)


def test_a_journal_that_matches_no_state_is_refused(tmp_path: Path) -> None:
    a = tmp_path / "a"
    a.mkdir()
    journal = journal_path(a)
    journal.write_text(
        json.dumps(
            {
                "format": "mnist-mlops/dirswap-v1",
                "dests": ["a"],
                "paths": {".a.00000000.tmp": [1, 2], "a": [3, 4], ".a.aside-0.tmp": None},
                "steps": [["exchange", ".a.00000000.tmp", "a", ".a.aside-0.tmp"]],
                "cleanup": [".a.00000000.tmp"],
            }
        )
    )
    with pytest.raises(SwapRecoveryError, match="no state this interrupted swap can leave"):
        recover(a, [a])
    assert journal.exists() and a.exists()  # left for a person to look at
    journal.write_text("{not json")
    with pytest.raises(SwapRecoveryError, match="unreadable swap journal"):
        recover(a, [a])


def test_lock_is_reentrant_within_a_process(tmp_path: Path) -> None:
    a = tmp_path / "a"
    with locked(a), locked(a), replacing([a]) as (new,):  # would deadlock if not re-entrant
        (new / "x").write_text("1")
    assert contents(a) == {"x": "1"}


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_cli_recover_finishes_a_killed_rollback(tmp_path: Path) -> None:
    """The real CLI in subprocesses: rollback SIGKILLed at its exchange, then `recover`."""
    models = tmp_path / "models"
    for name, text in (("production", "model B"), ("previous", "model A")):
        (models / name).mkdir(parents=True)
        (models / name / "model.onnx").write_text(text)
    sets = ["--params", str(ROOT / "params.yaml")]
    sets += ["--set", f"registry.production_dir={models / 'production'}"]
    sets += ["--set", f"registry.previous_dir={models / 'previous'}"]
    sets += ["--set", f"data.raw_dir={tmp_path / 'data' / 'raw'}"]
    sets += ["--set", f"data.prepared_dir={tmp_path / 'data' / 'prepared'}"]
    inject_script = ROOT / "tests" / "helpers" / "fault_inject.py"
    inject = [str(inject_script), "--log", str(tmp_path / "ops.log")]
    killed = cli(
        tmp_path, *inject, "--kill-at", "1", "--match", "exchange(", "--", *sets, "rollback"
    )
    assert killed.returncode == -9, killed.stderr
    assert (models / ".production.journal").exists()
    assert (models / "production" / "model.onnx").read_text() == "model B"  # killed before

    proc = cli(tmp_path, "-m", "pipeline", *sets, "recover")
    assert proc.returncode == 0, proc.stderr
    assert "finished the interrupted swap" in proc.stderr
    # Rolled forward: the journal records a rollback that had all it needed.
    assert (models / "production" / "model.onnx").read_text() == "model A"
    assert (models / "previous" / "model.onnx").read_text() == "model B"
    assert hidden(models) == []
    assert "nothing to do" in cli(tmp_path, "-m", "pipeline", *sets, "recover").stderr

    # An unrecoverable journal: one named line from the CLI, exit 1.
    (models / ".production.journal").write_text("{")
    proc = cli(tmp_path, "-m", "pipeline", *sets, "recover")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: SwapRecoveryError: ") and "unreadable swap journal" in last
