"""pipeline.core.profiles on a real git + DVC repository with Hydra composition enabled.

The stage is a one-liner that records ``train.width``; what matters is what DVC sees:
the composed values in params.yaml, dvc.lock and ``dvc params diff``, a profile switch
that re-runs the stage, and a refused run that leaves params.yaml byte-identical.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.core.errors import ConfigError
from pipeline.core.profiles import compose_config, compose_text, hydra_override, main, overrides_for

ROOT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@localhost",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@localhost",
    "PYTHONPATH": str(ROOT),
}
DVC_YAML = """\
stages:
  train:
    cmd: {python} -c "import yaml; p = yaml.safe_load(open('params.yaml'))['train']; \
open('width.txt', 'w').write(str(p['width']))" && sleep {sleep}
    params: [train.width, train.epochs]
    outs: [width.txt]
"""


def sh(repo: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, cwd=repo, env=ENV, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv}: {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_repo(tmp_path: Path, sleep: float = 0) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(ROOT / "conf", repo / "conf")
    (repo / "params.yaml").write_text(compose_text(repo, []))
    (repo / "dvc.yaml").write_text(DVC_YAML.format(python=sys.executable, sleep=sleep))
    sh(repo, "git", "init", "-q")
    sh(repo, sys.executable, "-m", "dvc", "init", "-q")
    sh(repo, sys.executable, "-m", "dvc", "config", "hydra.enabled", "true")
    sh(repo, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    sh(repo, sys.executable, "-m", "dvc", "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "default run")
    return repo


def exp_run(repo: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return sh(
        repo, sys.executable, "-m", "pipeline.core.profiles", "exp-run", *overrides, check=False
    )


def test_overrides_are_hydra_syntax() -> None:
    assert overrides_for("quick", {"train.lr": 0.05, "data.source": None}) == [
        "profile=quick",
        "train.lr=0.05",
        "data.source=null",
    ]
    assert hydra_override("validate.pixel_mean_range", [0.1, 0.2]) == (
        "validate.pixel_mean_range=[0.1, 0.2]"
    )
    with pytest.raises(ConfigError, match="profile"):
        hydra_override("profile", 3)


def composed_width(profile: str) -> int:
    """``train.width`` of ``profile`` as conf/ composes it (the test follows conf/)."""
    return compose_config(ROOT, profile, {}).train.width


def test_compose_config_puts_explicit_params_over_the_profile() -> None:
    cfg = compose_config(ROOT, "quick", {"train.epochs": 3, "quality.target_precision": 0.99})
    assert (cfg.profile, cfg.train.epochs, cfg.quality.target_precision) == ("quick", 3, 0.99)
    assert cfg.train.width == composed_width("quick")
    with pytest.raises(ConfigError, match="known profiles"):
        compose_config(ROOT, "no-such-profile", {})
    with pytest.raises(ConfigError, match="train.epochs"):
        compose_config(ROOT, None, {"train.epochs": 0})


def test_quick_then_default_retrains_and_dvc_sees_the_real_values(tmp_path: Path) -> None:
    default_w, quick_w = composed_width("default"), composed_width("quick")
    assert default_w != quick_w
    repo = make_repo(tmp_path)
    assert (repo / "width.txt").read_text() == str(default_w)

    assert exp_run(repo, "profile=quick").returncode == 0
    assert (repo / "width.txt").read_text() == str(quick_w)
    diff = sh(repo, sys.executable, "-m", "dvc", "params", "diff", "--md").stdout
    assert "train.width" in diff and str(default_w) in diff and str(quick_w) in diff
    assert "train.epochs" in diff
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train.width"] == quick_w

    # An explicit -S always wins over the profile.
    assert exp_run(repo, "profile=quick", "train.epochs=3").returncode == 0
    assert yaml.safe_load((repo / "params.yaml").read_text())["train"]["epochs"] == 3

    # Back to the default profile: DVC sees changed params and re-runs the stage.
    out = exp_run(repo, "profile=default")
    assert out.returncode == 0
    assert (repo / "width.txt").read_text() == str(default_w)
    assert sh(repo, sys.executable, "-m", "dvc", "params", "diff").stdout.strip() == ""


def test_a_refused_run_leaves_params_yaml_byte_identical(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, sleep=8)
    before = (repo / "params.yaml").read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-f"],
        cwd=repo,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3)  # the holder is inside its stage, holding DVC's lock
        refused = exp_run(repo, "profile=quick")
        assert refused.returncode != 0
        assert "restored" in refused.stdout
        assert (repo / "params.yaml").read_bytes() == before
    finally:
        holder.wait(timeout=60)


def test_unknown_profile_is_refused_before_dvc_runs(tmp_path: Path, monkeypatch, capsys) -> None:
    repo = make_repo(tmp_path)
    before = (repo / "params.yaml").read_bytes()
    monkeypatch.chdir(repo)
    assert main(["exp-run", "profile=nope"]) == 2
    err = capsys.readouterr().err
    assert "known profiles: " in err
    assert all(name in err for name in ("default", "fast", "quick"))
    assert (repo / "params.yaml").read_bytes() == before
    assert main(["check"]) == 0
    assert main(["check", "profile=quick"]) == 1


@pytest.mark.parametrize(
    ("profile", "gated"), [("default", True), ("fast", False), ("quick", False)]
)
def test_only_the_robustness_trained_profile_has_robustness_floors(
    profile: str, gated: bool
) -> None:
    """The default profile trains every augmentation family and its gate checks them;
    fast and quick train without them, so their suite is reported, not gated."""
    cfg = compose_config(ROOT, profile, {})
    aug = cfg.train.augment
    # Every degradation family (outlier exposure is not one).
    shares = [p for name, p in aug.shares().items() if name != "outliers"]
    assert len(shares) == 8
    if gated:
        assert all(p > 0 for p in shares) and aug.enabled
        assert cfg.gate.min_robust_accuracy is not None and cfg.gate.max_ece is not None
    else:
        assert not aug.enabled or all(p == 0 for p in shares)
        assert cfg.gate.min_robust_accuracy is None and cfg.gate.max_ece is None
        assert cfg.gate.robust_floors == {}
