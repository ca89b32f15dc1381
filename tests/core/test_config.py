from pathlib import Path

import pytest
import yaml

from pipeline.core.config import Config, config_from_dict, load_config, result_params, to_dict
from pipeline.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


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
        if isinstance(values, dict):
            assert set(values) == set(resolved[section]), section


def test_override_wins() -> None:
    forced = config_from_dict(raw_params(), {"train.epochs": 7})
    assert forced.train.epochs == 7


def test_params_hash_ignores_locations_and_runtime_knobs() -> None:
    """Same parameters on two machines (other paths, source, server) hash the same."""
    base = config_from_dict(raw_params())
    moved = config_from_dict(
        raw_params(),
        {
            "data.source": "/home/someone/mnist",
            "data.prepared_dir": "/scratch/prepared",
            "train.model_path": "elsewhere/model.pt",
            "serve.port": 9000,
            "flow.push_to_remote": False,
            "profile": "renamed",
        },
    )
    assert moved.params_hash() == base.params_hash()
    assert config_from_dict(raw_params(), {"train.lr": 0.05}).params_hash() != base.params_hash()
    assert "source" not in str(result_params(base))


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
        ({"serve": 3}, "serve"),
    ],
)
def test_bad_values_name_the_key(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        config_from_dict(raw_params(), overrides)


def test_unknown_section_is_an_error() -> None:
    with pytest.raises(ConfigError, match="trian"):
        config_from_dict({**raw_params(), "trian": {}})


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty document"),
        ("null\n", "empty document"),
        ("# only a comment\n", "empty document"),
        ("- 1\n- 2\n", "must be a mapping"),
        ("train:\n  epochs: 1\n  epochs: 2\n", r"line 3.*duplicate key|duplicate key.*line 3"),
        ("gate:\n  min_accuracy: 0.99\ngate:\n  min_accuracy: 0.5\n", "duplicate key"),
        ("train:\n  epochs: 5\n  lr: .inf\n", r"train\.lr \(line 3\)"),
        ("train:\n  lr: .nan\n", r"train\.lr \(line 2\)"),
        ("validate:\n  pixel_mean_range: [0.1, -.inf]\n", r"validate\.pixel_mean_range\.1"),
        ("a: !!python/object:os.system 1\n", "not valid YAML"),
    ],
)
def test_ambiguous_documents_are_config_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
