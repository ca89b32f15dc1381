"""The one configuration: ``params.yaml`` loaded into frozen, validated dataclasses.

``load_config`` is called once, at the entry point (CLI or flow), and the resulting
:class:`Config` is passed down; library code never reads files or the environment for
parameters. ``params.yaml`` groups parameters by stage. A top-level ``profile`` names
one entry of ``profiles`` whose keys are deep-merged over the base before validation,
so ``-S profile=quick`` (DVC) or ``--profile quick`` (CLI) switches the whole run.

Any unknown key, wrong type or out-of-range value raises :class:`ConfigError` naming
the dotted key, e.g. ``train.batch_size: Input should be greater than 0``.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

import yaml
from pydantic import ConfigDict, Field, ValidationError, model_validator
from pydantic.dataclasses import dataclass

from pipeline.errors import ConfigError

_STRICT = ConfigDict(extra="forbid", strict=True)

PathField = Annotated[Path, Field(strict=False)]
PosInt = Annotated[int, Field(gt=0)]
NonNegInt = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0)]
NonNegFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]

DEFAULT_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
)


@dataclass(frozen=True, config=_STRICT)
class DataConfig:
    """Where MNIST comes from and where the verified copies go."""

    source: str | None = None
    mirrors: tuple[str, ...] = DEFAULT_MIRRORS
    raw_dir: PathField = Path("data/raw")
    prepared_dir: PathField = Path("data/prepared")
    download_retries: PosInt = 3
    download_timeout_s: PosFloat = 60.0


@dataclass(frozen=True, config=_STRICT)
class ValidateConfig:
    """Expectations on the dataset statistics and where the reports go."""

    stats_path: PathField = Path("metrics/data_stats.json")
    # Holds result.json, image_summary.csv.gz and data_docs/ (GX HTML); replaced as a whole.
    report_dir: PathField = Path("reports/validation")
    reference_profile: PathField = Path("data/reference_profile.json")
    expected_train_count: PosInt = 60000
    expected_test_count: PosInt = 10000
    min_class_fraction: UnitFloat = 0.08
    max_class_fraction: UnitFloat = 0.13
    pixel_mean_range: tuple[float, float] = (0.12, 0.14)
    pixel_std_range: tuple[float, float] = (0.29, 0.33)
    max_label_kl: NonNegFloat = 0.01
    max_intensity_kl: NonNegFloat = 0.05


@dataclass(frozen=True, config=_STRICT)
class ElasticAugment:
    """Elastic deformation (Simard 2003): per image alpha uniform in [0, max_alpha] px."""

    p: UnitFloat = 0.0
    max_alpha: NonNegFloat = 34.0
    sigma: PosFloat = 4.0


@dataclass(frozen=True, config=_STRICT)
class NoiseAugment:
    """Additive Gaussian noise, sigma uniform in [0, max_sigma] on the 0..255 scale."""

    p: UnitFloat = 0.0
    max_sigma: NonNegFloat = 50.0


@dataclass(frozen=True, config=_STRICT)
class SaltPepperAugment:
    """A share uniform in [0, max_fraction] of pixels set to black or white."""

    p: UnitFloat = 0.0
    max_fraction: UnitFloat = 0.1


@dataclass(frozen=True, config=_STRICT)
class BlurAugment:
    """Gaussian blur, sigma uniform in [0, max_sigma] px."""

    p: UnitFloat = 0.0
    max_sigma: NonNegFloat = 1.5


@dataclass(frozen=True, config=_STRICT)
class FactorAugment:
    """Contrast or brightness scaled by a factor uniform in [min_factor, 1]."""

    p: UnitFloat = 0.0
    min_factor: UnitFloat = 0.2


@dataclass(frozen=True, config=_STRICT)
class ThicknessAugment:
    """Erosion or dilation (half each); per batch, radius uniform in (0, max] px."""

    p: UnitFloat = 0.0
    max_erode_px: NonNegFloat = 0.5
    max_dilate_px: NonNegFloat = 1.0


@dataclass(frozen=True, config=_STRICT)
class OcclusionAugment:
    """A black patch (side uniform in [2, max_size] px) or bar (half that thick)."""

    p: UnitFloat = 0.0
    max_size: NonNegFloat = 8.0


@dataclass(frozen=True, config=_STRICT)
class OutlierAugment:
    """Outlier exposure: a share p of each batch replaced by synthetic non-digits that are
    trained towards the uniform distribution (so the model learns to be unsure of them)."""

    p: Annotated[float, Field(ge=0, lt=1)] = 0.0


@dataclass(frozen=True, config=_STRICT)
class AugmentConfig:
    """Augmentation applied per batch on the device (see pipeline/augment.py).

    Every image gets the random affine (shift, rotation, scale, shear); each further
    family is applied to a random share ``p`` of the images (0 = off).
    """

    enabled: bool = True
    max_shift_px: NonNegFloat = 2.0
    max_rotation_deg: NonNegFloat = 10.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    max_shear: NonNegFloat = 0.0
    elastic: ElasticAugment = ElasticAugment()
    noise: NoiseAugment = NoiseAugment()
    salt_pepper: SaltPepperAugment = SaltPepperAugment()
    blur: BlurAugment = BlurAugment()
    contrast: FactorAugment = FactorAugment()
    brightness: FactorAugment = FactorAugment()
    thickness: ThicknessAugment = ThicknessAugment()
    occlusion: OcclusionAugment = OcclusionAugment()
    outliers: OutlierAugment = OutlierAugment()


@dataclass(frozen=True, config=_STRICT)
class TrainConfig:
    """Model, optimisation and runtime settings of the train stage."""

    model: Literal["mlp", "seed_cnn", "cnn"] = "cnn"
    width: PosInt = 24
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: NonNegInt = 0
    epochs: PosInt = 5
    batch_size: PosInt = 128
    eval_batch_size: PosInt = 1000
    val_size: NonNegInt = 5000
    max_train_samples: PosInt | None = None
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: PosFloat = 0.1
    momentum: UnitFloat = 0.9
    nesterov: bool = True
    weight_decay: NonNegFloat = 5e-4
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    label_smoothing: Annotated[float, Field(ge=0, lt=1)] = 0.1
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    augment: AugmentConfig = AugmentConfig()
    amp: bool = True
    channels_last: bool = True
    compile: bool = False
    num_threads: NonNegInt = 0
    checkpoint_dir: PathField = Path("models/checkpoints")
    model_path: PathField = Path("models/candidate/model.pt")
    live_dir: PathField = Path("metrics/train")  # dvclive: metrics.json, plots/metrics/*.tsv
    run_info_path: PathField = Path("reports/train/run.json")


@dataclass(frozen=True, config=_STRICT)
class EvaluateConfig:
    batch_size: PosInt = 1000
    metrics_path: PathField = Path("metrics/eval.json")
    per_class_path: PathField = Path("metrics/eval_per_class.json")
    confusion_csv: PathField = Path("reports/eval/confusion.csv")
    confusion_png: PathField = Path("reports/eval/confusion.png")
    mistakes_png: PathField = Path("reports/eval/mistakes.png")
    n_mistakes: PosInt = 36


@dataclass(frozen=True, config=_STRICT)
class QualityConfig:
    """Robustness suite, calibration and abstention (pipeline/quality.py)."""

    seed: NonNegInt = 0  # perturbed test copies and probes; never used for training
    n_images: PosInt | None = None  # test images per perturbed copy; None = all
    severity: Annotated[int, Field(ge=1, le=3)] = 2  # the severity the gate checks
    target_precision: Annotated[float, Field(gt=0, le=1)] = 0.999  # on accepted inputs
    n_probes: PosInt = 1000  # non-digit images per probe kind
    calibration_bins: PosInt = 15


@dataclass(frozen=True, config=_STRICT)
class ExportConfig:
    opset: Annotated[int, Field(ge=18)] = 18
    onnx_path: PathField = Path("models/candidate/model.onnx")
    parity_path: PathField = Path("metrics/parity.json")
    parity_batch_sizes: tuple[PosInt, ...] = (1, 7, 256)
    parity_atol: PosFloat = 1e-4
    quantize: bool = False
    int8_path: PathField = Path("models/candidate/model.int8.onnx")
    calibration_samples: PosInt = 1000


@dataclass(frozen=True, config=_STRICT)
class GateConfig:
    min_accuracy: UnitFloat = 0.99
    max_regression: UnitFloat = 0.002
    # Robustness: accuracy floor of every family at quality.severity (null = not checked),
    # with per-family overrides, e.g. {noise: 0.995}; calibration: ECE after temperature.
    min_robust_accuracy: UnitFloat | None = 0.99
    robust_floors: dict[str, UnitFloat] = Field(default_factory=dict)
    max_ece: UnitFloat | None = 0.005
    report_path: PathField = Path("reports/gate.json")


@dataclass(frozen=True, config=_STRICT)
class RegistryConfig:
    """Where the production model lives, and its one kept predecessor."""

    production_dir: PathField = Path("models/production")
    previous_dir: PathField = Path("models/previous")


@dataclass(frozen=True, config=_STRICT)
class ServeConfig:
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch: PosInt = 1024
    max_body_bytes: PosInt = 8 * 1024 * 1024
    reload_interval_s: PosFloat = 1.0
    # One thread per inference: requests are small and the event loop needs the other core.
    intra_op_threads: NonNegInt = 1
    # Decoded size cap of an uploaded image: a tiny PNG can decode to gigabytes.
    max_image_pixels: PosInt = 40_000_000


@dataclass(frozen=True, config=_STRICT)
class FlowConfig:
    """Prefect orchestration knobs (the flow wires DVC stages; see flows/)."""

    push_to_remote: bool = True
    ingest_retries: NonNegInt = 3
    ingest_retry_delay_s: NonNegFloat = 10.0


@dataclass(frozen=True, config=_STRICT)
class Config:
    profile: str = "default"
    profiles: dict[str, dict[str, Any]] = Field(default_factory=dict)
    data: DataConfig = DataConfig()
    validate: ValidateConfig = ValidateConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    quality: QualityConfig = QualityConfig()
    export: ExportConfig = ExportConfig()
    gate: GateConfig = GateConfig()
    registry: RegistryConfig = RegistryConfig()
    serve: ServeConfig = ServeConfig()
    flow: FlowConfig = FlowConfig()

    @model_validator(mode="after")
    def _check_ranges(self) -> Config:
        for name, (lo, hi) in {
            "validate.pixel_mean_range": self.validate.pixel_mean_range,
            "validate.pixel_std_range": self.validate.pixel_std_range,
            "train.augment.scale_range": self.train.augment.scale_range,
        }.items():
            if not lo <= hi:
                raise ValueError(f"{name}: lower bound {lo} exceeds upper bound {hi}")
        insecure = [m for m in self.data.mirrors if not m.startswith("https://")]
        if insecure:
            raise ValueError(f"data.mirrors: only https:// mirrors are allowed, got {insecure}")
        if self.validate.min_class_fraction > self.validate.max_class_fraction:
            raise ValueError("validate.min_class_fraction exceeds validate.max_class_fraction")
        return self

    def params_hash(self) -> str:
        """sha256 of the resolved parameters (profile applied), for provenance."""
        return hashlib.sha256(json.dumps(to_dict(self), sort_keys=True).encode()).hexdigest()


def _tuples(obj: Any) -> Any:
    """YAML gives lists; the strict schema wants tuples for fixed sequences."""
    if isinstance(obj, Mapping):
        return {k: _tuples(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return tuple(_tuples(v) for v in obj)
    return obj


def _build(cls: type[Any], values: Any, where: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, nested sections first.

    Sections are built bottom-up so the strict schema of each one checks its own keys,
    and error locations carry the full dotted path.
    """
    if not isinstance(values, Mapping):
        raise ConfigError(
            f"{where.rstrip('.') or '<root>'}: must be a mapping, got {type(values).__name__}"
        )
    hints = get_type_hints(cls, include_extras=False)
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        sub = hints.get(key)
        if isinstance(sub, type) and is_dataclass(sub):
            value = _build(sub, value, f"{where}{key}.")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValidationError as err:
        raise ConfigError(f"invalid parameters: {_format_errors(err, where)}") from err


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value, f"{where}{key}.")
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
        node = child
    node[leaf] = value


def _format_errors(err: ValidationError, where: str = "") -> str:
    lines = []
    for e in err.errors():
        loc = where + ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        got = e.get("input")
        shown = f" (got {got!r})" if isinstance(got, str | int | float | bool) else ""
        lines.append(f"{loc}: {msg}{shown}" if e["loc"] else f"{msg}")
    return "; ".join(lines)


def config_from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> Config:
    """Build a validated :class:`Config` from a parsed params mapping.

    ``overrides`` maps dotted keys (``"train.epochs"``) to values and is applied after
    the profile, so it always wins. ``profile`` may itself be overridden.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params must be a mapping at the top level, got {type(raw).__name__}")
    tree: dict[str, Any] = copy.deepcopy(dict(raw))
    overrides = dict(overrides or {})
    if "profile" in overrides:
        tree["profile"] = overrides.pop("profile")
    profile = tree.get("profile", "default")
    profiles = tree.get("profiles") or {}
    if not isinstance(profiles, Mapping):
        raise ConfigError("profiles: must be a mapping of profile name to overrides")
    if profile != "default":
        if profile not in profiles:
            known = ", ".join(["default", *profiles]) or "default"
            raise ConfigError(f"profile: unknown profile {profile!r} (known: {known})")
        patch = profiles[profile]
        if not isinstance(patch, Mapping):
            raise ConfigError(f"profiles.{profile}: must be a mapping")
        if "profile" in patch or "profiles" in patch:
            raise ConfigError(f"profiles.{profile}: may not set 'profile' or 'profiles'")
        tree = _deep_merge(tree, patch)
    for dotted, value in overrides.items():
        _set_dotted(tree, dotted, value)
    profiles_raw = tree.pop("profiles", {})
    cfg: Config = _build(Config, {**_tuples(tree), "profiles": dict(profiles_raw)}, "")
    _check_profiles_known(cfg)
    return cfg


def _check_profiles_known(cfg: Config) -> None:
    """Every profile must itself produce a valid config, so typos fail early."""
    for name, patch in cfg.profiles.items():
        if name == "default":
            raise ConfigError("profiles.default: 'default' is the base itself; do not redefine it")
        base = to_dict(cfg)
        base.pop("profile")
        base.pop("profiles")
        try:
            _build(Config, _tuples(_deep_merge(base, patch)), "")
        except ConfigError as err:
            raise ConfigError(f"profiles.{name}: {err}") from err


def load_config(
    path: Path = Path("params.yaml"), overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read and validate ``path``. Raises :class:`ConfigError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: parameters file not found") from err
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    return config_from_dict(raw or {}, overrides)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings, tuples as lists)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {k: conv(v) for k, v in asdict(cfg).items()}
