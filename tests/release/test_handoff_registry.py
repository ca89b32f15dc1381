"""docs/model-handoff.md: the consumer commands, run as written against a real registry.

The bash and Python blocks of "Getting the production model from the registry" run in an
empty directory (no checkout, no project code on the path) with ``GIT_URL`` and
``DVC_REMOTE_URL`` set; they must fetch exactly the production model.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.registry_repo import ROOT, World, make_pool, pipeline_cli, repro, set_params

DOC = ROOT / "docs" / "model-handoff.md"
SECTION = "## Getting the production model from the registry"


def blocks(language: str) -> list[str]:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index(SECTION) :]
    section = section[: section.index("\n## ", len(SECTION))]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def consumer_env(world: World) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(GIT_URL=str(world.origin), DVC_REMOTE_URL=str(world.remote), DVC_NO_ANALYTICS="1")
    return env


@pytest.fixture
def world(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> World:
    pool = tmp_path_factory.mktemp("pool")
    make_pool(pool)
    w = World(tmp_path, pool)
    w.create()
    return w


def test_consumer_commands_fetch_the_production_model(world: World, tmp_path: Path) -> None:
    a = world.clone("a")
    for seed in (0, 1):
        set_params(a, train__seed=seed)
        repro(a)
        pipeline_cli(a, "record")
    pipeline_cli(a, "rollback", "--to", "v1.0.0")  # production is now the older version
    want = hashlib.sha256((a / "models/production/model.onnx").read_bytes()).hexdigest()

    [bash] = blocks("bash")
    consumer = tmp_path / "consumer"
    consumer.mkdir()
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", bash],
        cwd=consumer,
        env=consumer_env(world),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    assert "mnist-classifier@v1.0.0" in proc.stdout and "sha256 ok" in proc.stdout, proc.stdout
    for name in ("model.onnx", "latest.onnx"):
        assert hashlib.sha256((consumer / name).read_bytes()).hexdigest() == want, name

    [python] = blocks("python")
    proc = subprocess.run(
        [sys.executable, "-c", python],
        cwd=consumer,
        env=consumer_env(world),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == want, proc.stdout
