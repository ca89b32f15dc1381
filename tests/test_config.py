from pathlib import Path

import pytest
import yaml

from pipeline.config import Config, config_from_dict, load_config, to_dict
from pipeline.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def raw_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def test_params_yaml_loads_into_frozen_dataclasses() -> None:
    cfg = load_config(ROOT / "params.yaml")
    assert isinstance(cfg, Config)
    assert cfg.train.augment.scale_range == tuple(raw_params()["train"]["augment"]["scale_range"])
    assert isinstance(cfg.data.raw_dir, Path)
    with pytest.raises(AttributeError):
        cfg.train.epochs = 3  # type: ignore[misc]


def test_every_params_key_is_known() -> None:
    """params.yaml and the dataclasses describe the same keys, nothing silently ignored."""
    raw = raw_params()
    resolved = to_dict(load_config(ROOT / "params.yaml"))
    for section, values in raw.items():
        if isinstance(values, dict) and section != "profiles":
            assert set(values) == set(resolved[section]), section


def test_profile_is_merged_over_base_and_override_wins() -> None:
    quick = config_from_dict(raw_params(), {"profile": "quick"})
    # Explicit: the workspace file may hold another profile (after `dvc exp run -S`).
    base = config_from_dict(raw_params(), {"profile": "default"})
    assert quick.profile == "quick"
    assert quick.train != base.train
    assert quick.data == base.data
    forced = config_from_dict(raw_params(), {"profile": "quick", "train.epochs": 7})
    assert forced.train.epochs == 7
    assert quick.params_hash() != base.params_hash()


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"train.bogus": 1}, "train.bogus"),
        ({"train.batch_size": 0}, "train.batch_size"),
        ({"train.batch_size": "64"}, "train.batch_size"),
        ({"train.epochs": 2.5}, "train.epochs"),
        ({"train.lr": -1.0}, "train.lr"),
        ({"train.model": "resnet152"}, "train.model"),
        ({"train.augment.scale_range": [1.2, 0.8]}, "train.augment.scale_range"),
        ({"gate.min_accuracy": 1.5}, "gate.min_accuracy"),
        ({"export.opset": 11}, "export.opset"),
        ({"data.mirrors": ["http://example.com/"]}, "data.mirrors"),
        ({"profile": "nope"}, "profile"),
        ({"serve": 3}, "serve"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config_from_dict(raw_params(), overrides)


def test_unknown_section_and_bad_profile_are_errors() -> None:
    with pytest.raises(ConfigError, match="trian"):
        config_from_dict({**raw_params(), "trian": {}})
    bad = raw_params()
    bad["profiles"]["broken"] = {"train": {"epochs": -1}}
    with pytest.raises(ConfigError, match=r"profiles\.broken.*train\.epochs"):
        config_from_dict(bad)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
