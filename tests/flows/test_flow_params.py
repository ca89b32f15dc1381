"""flows.params_file: a run's profile/overrides composed into params.yaml, as DVC's -S does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from flows.params_file import prepare_params, restore_params
from pipeline.core.config import load_config
from pipeline.core.errors import ConfigError
from pipeline.core.profiles import compose_text

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """The project's conf/ and its default params.yaml, in a directory of their own."""
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "params.yaml").write_text(compose_text(tmp_path, []))
    return tmp_path


def test_the_committed_params_yaml_is_the_default_composition() -> None:
    """params.yaml is generated: in git it must be what `dvc exp run` composes by default."""
    committed = subprocess.run(
        ["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True
    )
    conf_changed = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", "conf"], cwd=ROOT, capture_output=True
    )
    if committed.returncode != 0 or conf_changed.returncode != 0:
        pytest.skip("not a git checkout, or conf/ has uncommitted changes")
    assert committed.stdout == compose_text(ROOT, ["profile=default"])


def test_profile_and_overrides_compose_the_real_values(repo: Path) -> None:
    before = (repo / "params.yaml").read_text()
    prepared = prepare_params(repo, "quick", {"gate.min_accuracy": 0.9999, "train.epochs": 3})
    raw = yaml.safe_load((repo / "params.yaml").read_text())
    assert prepared.changed and prepared.original_text == before
    # The file holds the values the stages use: the profile's, then the override on top.
    assert raw["profile"] == "quick"
    assert raw["train"]["width"] == 12 and raw["train"]["augment"]["enabled"] is False
    assert raw["train"]["epochs"] == 3 and raw["gate"]["min_accuracy"] == 0.9999
    assert load_config(repo / "params.yaml").params_hash() == prepared.cfg.params_hash()


def test_same_text_as_dvc_exp_run(repo: Path) -> None:
    """The flow writes what DVC's own `exp run -S` composition writes, byte for byte."""
    from dvc.utils.hydra import compose_and_dump

    expected = repo / "expected.yaml"
    overrides = ["profile=quick", "train.seed=7"]
    compose_and_dump(expected, str(repo / "conf"), None, "config", str(repo), overrides)
    prepare_params(repo, "quick", {"train.seed": 7})
    assert (repo / "params.yaml").read_text() == expected.read_text()


def test_nothing_asked_leaves_the_file_alone(repo: Path) -> None:
    stat = (repo / "params.yaml").stat()
    prepared = prepare_params(repo, None, None)
    assert not prepared.changed and prepared.overrides == []
    assert (repo / "params.yaml").stat().st_mtime_ns == stat.st_mtime_ns
    assert not restore_params(repo / "params.yaml", prepared)


def test_restore_puts_back_the_original_bytes(repo: Path) -> None:
    before = (repo / "params.yaml").read_bytes()
    prepared = prepare_params(repo, "quick", {"train.seed": 7})
    assert (repo / "params.yaml").read_bytes() != before
    assert restore_params(repo / "params.yaml", prepared)
    assert (repo / "params.yaml").read_bytes() == before


@pytest.mark.parametrize(
    ("profile", "params", "message"),
    [
        (None, {"train.batch_size": 0}, "train.batch_size"),
        (None, {"train.epochs": "3"}, "train.epochs"),
        (None, {"train.no_such_key": 1}, "no_such_key"),
        ("nonexistent", None, "known profiles: default, .*quick"),
        (None, {"profiles.quick.train.epochs": 1}, "profiles"),
        ("quick", {"profile": "default"}, "given both"),
        (None, {"train..epochs": 1}, "not a dotted parameter name"),
    ],
)
def test_bad_runs_are_refused_before_the_file_changes(
    repo: Path, profile: str | None, params: dict[str, object] | None, message: str
) -> None:
    before = (repo / "params.yaml").read_bytes()
    with pytest.raises(ConfigError, match=message):
        prepare_params(repo, profile, params)
    assert (repo / "params.yaml").read_bytes() == before


def test_missing_params_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        prepare_params(tmp_path, None, None)


def test_cli_profile_composes_without_touching_params_yaml(repo: Path) -> None:
    from pipeline.cli import build_parser, config_from_args

    before = (repo / "params.yaml").read_bytes()
    args = build_parser().parse_args(
        [
            "--params",
            str(repo / "params.yaml"),
            "--profile",
            "quick",
            "--set",
            "train.seed=3",
            "gate",
        ]
    )
    cfg = config_from_args(args, {})
    assert (cfg.profile, cfg.train.width, cfg.train.seed) == ("quick", 12, 3)
    assert (repo / "params.yaml").read_bytes() == before
