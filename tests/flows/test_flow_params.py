"""flows.params_file: a run's profile/overrides written into params.yaml, as DVC's -S does."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from flows.params_file import (
    prepare_params,
    render_overrides,
    restore_params,
    run_overrides,
)
from pipeline.config import load_config
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """The project's params.yaml with the default profile, in the project's layout.

    The workspace copy may have been rewritten by `dvc exp run -S profile=quick` (another
    profile, DVC's list layout); the tests start from the file as committed to look.
    """
    dest = tmp_path / "params.yaml"
    dest.write_text(render_overrides((ROOT / "params.yaml").read_text(), {"profile": "default"}))
    return dest


def test_round_trip_without_overrides_is_byte_identical(params_file: Path) -> None:
    text = params_file.read_text()
    assert render_overrides(text, {}) == text


def test_overrides_written_keep_comments_and_match_the_validated_config(
    params_file: Path,
) -> None:
    before = params_file.read_text()
    prepared = prepare_params(
        params_file, "quick", {"gate.min_accuracy": 0.9999, "data.source": "/srv/mnist"}
    )
    after = params_file.read_text()
    assert prepared.changed
    assert prepared.original_text == before
    # What the stages will load from the file is exactly the run's validated config.
    assert load_config(params_file).params_hash() == prepared.cfg.params_hash()
    assert prepared.cfg.profile == "quick"
    assert prepared.cfg.gate.min_accuracy == 0.9999
    raw = yaml.safe_load(after)
    assert raw["profile"] == "quick" and raw["gate"]["min_accuracy"] == 0.9999
    # Only the three overridden lines differ; every comment line survives.
    changed = [
        (a, b) for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 3, changed
    comments = [line.split("#", 1)[1] for line in before.splitlines() if "#" in line]
    kept = [line.split("#", 1)[1] for line in after.splitlines() if "#" in line]
    assert kept == comments


def test_nothing_asked_leaves_the_file_alone(params_file: Path) -> None:
    stat = params_file.stat()
    prepared = prepare_params(params_file, None, None)
    assert not prepared.changed and prepared.overrides == {}
    assert params_file.stat().st_mtime_ns == stat.st_mtime_ns
    assert not restore_params(params_file, prepared)


def test_restore_puts_back_the_original_bytes(params_file: Path) -> None:
    before = params_file.read_bytes()
    prepared = prepare_params(params_file, "quick", {"train.seed": 7})
    assert params_file.read_bytes() != before
    assert restore_params(params_file, prepared)
    assert params_file.read_bytes() == before


@pytest.mark.parametrize(
    ("profile", "params", "message"),
    [
        (None, {"train.batch_size": 0}, "train.batch_size"),
        (None, {"train.epochs": "3"}, "train.epochs"),
        (None, {"train.no_such_key": 1}, "no_such_key"),
        ("nonexistent", None, "unknown profile 'nonexistent'"),
        # quick sets train.epochs and is merged over the base: the override would be lost.
        ("quick", {"train.epochs": 3}, "profile 'quick' sets this key"),
        (None, {"profiles.quick.train.epochs": 1}, "profile definitions"),
        ("quick", {"profile": "default"}, "given both"),
        (None, {"train..epochs": 1}, "not a dotted parameter name"),
    ],
)
def test_bad_runs_are_refused_before_the_file_changes(
    params_file: Path, profile: str | None, params: dict[str, object] | None, message: str
) -> None:
    before = params_file.read_bytes()
    with pytest.raises(ConfigError, match=message):
        prepare_params(params_file, profile, params)
    assert params_file.read_bytes() == before


def test_profile_param_and_params_profile_agree() -> None:
    assert run_overrides("quick", {"profile": "quick", "train.seed": 1}) == {
        "profile": "quick",
        "train.seed": 1,
    }


def test_missing_params_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        prepare_params(tmp_path / "params.yaml", None, None)
