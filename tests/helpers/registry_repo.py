"""A small real git + DVC + GTO world for the registry tests (imported by test modules).

``World`` holds a bare git repository (``origin``), a local-directory DVC remote and any
number of checkouts cloned from origin. Each checkout is a real DVC project whose
``dvc.yaml`` has the pipeline's ``gate`` and ``promote`` paths and its ``artifacts:``
section, but whose stages are a tiny script: ``train`` copies one of a few real,
contract-conforming ONNX files (picked by ``train.seed``) to the candidate, ``gate``
passes it unless ``gate.min_accuracy`` is above its fixed accuracy, ``promote`` installs
it with a model card. ``params.yaml`` is the project's own, so the real config loads it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DVC = [sys.executable, "-m", "dvc"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@localhost",
    "DVC_NO_ANALYTICS": "1",
}
ARTIFACT = "mnist-classifier"

STAGE_SCRIPT = textwrap.dedent(
    '''
    """Fake stages: `python stage.py <stage>`; real ONNX files, real hashes."""
    import hashlib, json, shutil, sys
    from pathlib import Path

    import yaml

    ACCURACY = {0: 0.991, 1: 0.992, 2: 0.993, 3: 0.994}


    def sha(path):
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()


    def dump(path, obj):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\\n")


    stage, p = sys.argv[1], yaml.safe_load(Path("params.yaml").read_text())
    seed = p["train"]["seed"]
    if stage == "train":
        Path("models/candidate").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f"pool/{seed}.onnx", "models/candidate/model.onnx")
        dump("metrics/eval/metrics.json", {"accuracy": ACCURACY[seed], "loss": 0.03})
    elif stage == "gate":
        acc, floor = ACCURACY[seed], p["gate"]["min_accuracy"]
        ok = acc >= floor
        dump("reports/gate.json", {
            "passed": ok, "candidate_sha256": sha("models/candidate/model.onnx"),
            "candidate_accuracy": acc, "n": 100,
            "reasons": [] if ok else [f"candidate accuracy {acc} < floor {floor}"],
            "checks": [{"name": "min_accuracy", "passed": ok, "message": "floor"}],
        })
        if not ok:
            sys.exit("gate rejected")
    elif stage == "promote":
        gate = json.loads(Path("reports/gate.json").read_text())
        assert gate["passed"] and gate["candidate_sha256"] == sha("models/candidate/model.onnx")
        prod, prev = Path("models/production"), Path("models/previous")
        if prod.exists():
            if prev.exists():
                shutil.rmtree(prev)
            prod.rename(prev)
        prev.mkdir(parents=True, exist_ok=True)
        prod.mkdir(parents=True)
        shutil.copyfile("models/candidate/model.onnx", prod / "model.onnx")
        dump(prod / "model_card.json", {
            "version": f"seed{seed}-{gate['candidate_sha256'][:12]}",
            "sha256": gate["candidate_sha256"],
            "dataset_version": "d" * 64, "params_hash": "p" * 64,
            "metrics": {"onnx_test_accuracy": gate["candidate_accuracy"]},
        })
    '''
)

DVC_YAML = {
    "stages": {
        "train": {
            "cmd": "python stage.py train",
            "deps": ["stage.py", "pool"],
            "params": ["train.seed"],
            "outs": ["models/candidate/model.onnx"],
            "metrics": [{"metrics/eval/metrics.json": {"cache": False}}],
        },
        "gate": {
            "cmd": "python stage.py gate",
            "deps": ["stage.py", "models/candidate/model.onnx"],
            "params": ["gate.min_accuracy"],
            "metrics": [{"reports/gate.json": {"cache": False}}],
        },
        "promote": {
            "cmd": "python stage.py promote",
            "deps": ["stage.py", "reports/gate.json", "models/candidate/model.onnx"],
            "outs": [
                {"models/production": {"persist": True}},
                {"models/previous": {"persist": True}},
            ],
        },
    },
}


def env() -> dict[str, str]:
    bin_dir = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **GIT_ENV,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }


def sh(argv: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; fail the test with its output when ``check`` and it fails."""
    proc = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, env=env(), stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_pool(directory: Path) -> list[Path]:
    """Four small exported ONNX models (seeds 0..3) following the contract."""
    import torch

    from pipeline.handoff.export import export_onnx
    from pipeline.training.model_io import LoadedModel
    from pipeline.training.models import build_model

    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for seed in range(4):
        torch.manual_seed(seed)
        module = build_model("cnn", width=4).eval()
        model = LoadedModel(module=module, name="cnn", width=4, mean=0.1307, std=0.3081, meta={})
        out.append(
            export_onnx(model, directory / f"{seed}.onnx", metadata={"model_version": f"s{seed}"})
        )
    return out


@dataclass
class World:
    root: Path
    pool: Path
    origin: Path = field(init=False)
    remote: Path = field(init=False)

    def __post_init__(self) -> None:
        self.origin = self.root / "origin.git"
        self.remote = self.root / "dvc-remote"

    def create(self) -> Path:
        """origin (bare) + DVC remote + a seed commit pushed from a first checkout."""
        self.remote.mkdir(parents=True)
        sh(["git", "init", "-q", "--bare", "-b", "main", str(self.origin)], self.root)
        seed = self.root / "seed"
        sh(["git", "init", "-q", "-b", "main", str(seed)], self.root)
        shutil.copyfile(ROOT / "params.yaml", seed / "params.yaml")
        (seed / "stage.py").write_text(STAGE_SCRIPT)
        shutil.copytree(self.pool, seed / "pool")
        spec = dict(DVC_YAML)
        spec["artifacts"] = yaml.safe_load((ROOT / "dvc.yaml").read_text())["artifacts"]
        (seed / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
        sh([*DVC, "init", "-q"], seed)
        sh([*DVC, "config", "core.analytics", "false"], seed)
        sh([*DVC, "config", "core.autostage", "true"], seed)
        # Committed as an absolute path: every clone (and `dvc get`) finds the remote.
        sh([*DVC, "remote", "add", "-d", "shared", str(self.remote)], seed)
        sh(["git", "add", "-A"], seed)
        sh(["git", "commit", "-q", "-m", "project"], seed)
        sh(["git", "remote", "add", "origin", str(self.origin)], seed)
        sh(["git", "push", "-q", "origin", "main"], seed)
        return seed

    def clone(self, name: str) -> Path:
        dest = self.root / name
        sh(["git", "clone", "-q", str(self.origin), str(dest)], self.root)
        return dest


def set_params(checkout: Path, **dotted: object) -> None:
    """Edit params.yaml in place (``train__seed=1`` sets ``train.seed``)."""
    path = checkout / "params.yaml"
    data = yaml.safe_load(path.read_text())
    for key, value in dotted.items():
        section, leaf = key.split("__")
        data[section][leaf] = value
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def repro(checkout: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return sh([*DVC, "repro", "-q"], checkout, check=check)


def pipeline_cli(
    checkout: Path, *args: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return sh([sys.executable, "-m", "pipeline", *args], checkout, check=check)


def remote_tags(origin: Path) -> list[str]:
    out = sh(["git", "ls-remote", "--tags", str(origin)], origin).stdout
    return sorted(
        line.split("\t")[1].removeprefix("refs/tags/")
        for line in out.splitlines()
        if not line.endswith("^{}")
    )


def gto_show(repo: Path | str) -> dict[str, object]:
    out = sh([sys.executable, "-m", "gto.cli", "show", "--json", "-r", str(repo)], Path.cwd())
    return json.loads(out.stdout)
