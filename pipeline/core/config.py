"""The one configuration: ``params.yaml`` loaded into frozen, validated dataclasses.

``load_config`` is called once, at the entry point (CLI or flow), and the resulting
:class:`Config` is passed down; library code never reads files or the environment for
parameters. ``params.yaml`` groups parameters by stage; DVC composes it from ``conf/``
(Hydra: ``conf/config.yaml`` plus one profile of ``conf/profile/``, see
:mod:`pipeline.core.profiles`), so it holds the values a run really uses. ``profile`` is only
the name of the profile it was composed with.

The file is read the way DVC reads it (ruamel.yaml, YAML 1.2, safe), and more strictly:
a duplicate key, an empty or null document, or a NaN/infinite number is a
:class:`ConfigError` naming the key and line, as is any unknown key, wrong type or
out-of-range value (e.g. ``train.batch_size: Input should be greater than 0``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_type_hints

from pydantic import (
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass

from pipeline.core import dotted
from pipeline.core.errors import ConfigError

_STRICT = ConfigDict(extra="forbid", strict=True)


def _non_empty_path(value: Any) -> Any:
    # Path("") is ".": an empty string would silently mean the working directory.
    if isinstance(value, str) and not value.strip():
        raise ValueError("a path must not be empty")
    return value


PathField = Annotated[Path, Field(strict=False), BeforeValidator(_non_empty_path)]
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
    download_retries: PosInt = 3  # attempts per mirror; the only retry layer
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
    """Augmentation applied per batch on the device (see pipeline/training/augment.py).

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

    def shares(self) -> dict[str, float]:
        """``p`` of every family applied to a share of the images, outlier exposure
        included, by field name (``elastic``, ..., ``outliers``): the sections with a ``p``."""
        sections = {f.name: getattr(self, f.name) for f in fields(self)}
        return {name: section.p for name, section in sections.items() if hasattr(section, "p")}


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
    # dvclive directory: metrics.json (numbers only), plots/sklearn/confusion_matrix.json.
    live_dir: PathField = Path("metrics/eval")
    # Non-numeric information (model sha256, dataset version, n): not a DVC metric.
    run_info_path: PathField = Path("reports/eval/run.json")
    per_class_path: PathField = Path("reports/eval/per_class.json")
    confusion_png: PathField = Path("reports/eval/confusion.png")
    mistakes_png: PathField = Path("reports/eval/mistakes.png")
    n_mistakes: PosInt = 36
    # Robustness, calibration and abstention (pipeline/quality/report.py): the full report with the
    # temperature and confidence threshold export puts into the ONNX file, and the model
    # card section (Markdown).
    quality_path: PathField = Path("reports/eval/quality.json")
    quality_card_path: PathField = Path("reports/eval/quality.md")


@dataclass(frozen=True, config=_STRICT)
class QualityConfig:
    """Robustness suite, calibration and abstention (pipeline/quality/report.py)."""

    seed: NonNegInt = 0  # perturbed test copies and probes; never used for training
    n_images: PosInt | None = None  # test images per perturbed copy; None = all
    severity: Annotated[int, Field(ge=1, le=3)] = 2  # the severity the gate checks
    target_precision: Annotated[float, Field(gt=0, le=1)] = 0.998  # on accepted inputs
    n_probes: PosInt = 1000  # non-digit images per probe kind
    calibration_bins: PosInt = 15


@dataclass(frozen=True, config=_STRICT)
class ExportConfig:
    opset: Annotated[int, Field(ge=18)] = 18
    onnx_path: PathField = Path("models/candidate/model.onnx")
    parity_path: PathField = Path("metrics/parity.json")
    parity_batch_sizes: Annotated[tuple[PosInt, ...], Field(min_length=1)] = (1, 7, 256)
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
    min_robust_accuracy: UnitFloat | None = None
    robust_floors: dict[str, UnitFloat] = Field(default_factory=dict)
    max_ece: UnitFloat | None = None
    report_path: PathField = Path("reports/gate.json")


ArtifactName = Annotated[str, Field(pattern=r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")]
StageName = Annotated[str, Field(pattern=r"^[a-zA-Z0-9]([a-zA-Z0-9-_]*[a-zA-Z0-9])?$")]


@dataclass(frozen=True, config=_STRICT)
class RegistryConfig:
    """Where the production model lives, and how promotions are recorded (GTO + git + DVC).

    ``artifact`` is the model's name in dvc.yaml ``artifacts:`` and in its GTO tags
    (``<artifact>@v1.2.0``, ``<artifact>#<stage>#<n>``). ``git_remote`` names the git
    remote (or URL) that commits and tags are pushed to; null records locally only.
    ``dvc_remote`` is the DVC remote to push to (null: DVC's default). ``branch`` is the
    branch run commits are pushed to (null: the current branch).
    """

    production_dir: PathField = Path("models/production")
    previous_dir: PathField = Path("models/previous")
    artifact: ArtifactName = "mnist-classifier"
    stage: StageName = "production"
    record: bool = True
    git_remote: str | None = "origin"
    dvc_remote: str | None = None
    branch: str | None = None
    bump: Literal["major", "minor", "patch"] = "minor"
    push_attempts: PosInt = 5
    command_timeout_s: PosFloat = 120.0
    follow_interval_s: PosFloat = 10.0
    follow_dir: PathField = Path("models/followed")


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
    # Declared-size caps of an uploaded image, checked from its header before decoding:
    # a 2 KB JPEG or a 170 KB PNG can claim 36-40 M pixels (gigabytes once decoded).
    max_image_pixels: PosInt = 16_000_000
    max_image_side: PosInt = 8192
    # Image decodes and thread-pool inferences running at once; a request waits at most
    # queue_timeout_s for a slot, then gets 503 + Retry-After.
    max_concurrent_work: PosInt = 4
    queue_timeout_s: PosFloat = 2.0
    # Predict requests admitted at once (reading, queued or running), and the sum of
    # their bodies (Content-Length, or max_body_bytes when unknown): beyond, 503.
    max_inflight_requests: PosInt = 64
    max_inflight_bytes: PosInt = 64 * 1024 * 1024
    # Slow clients: the request headers, then the whole body, must arrive in time (408).
    header_timeout_s: PosFloat = 10.0
    body_timeout_s: PosFloat = 10.0
    access_log: bool = False
    # /docs and /redoc load Swagger UI/ReDoc from a CDN: turn off on offline machines.
    docs: bool = True
    # Bearer token for the predict endpoints: the NAME of the environment variable that
    # holds it (read by the CLI). Without a token the service binds loopback only,
    # unless allow_unauthenticated is true.
    auth_token_env: str = "MNIST_SERVE_TOKEN"
    allow_unauthenticated: bool = False


@dataclass(frozen=True, config=_STRICT)
class FlowConfig:
    """Prefect orchestration knobs (the flow wires DVC stages; see flows/)."""

    push_to_remote: bool = True


# Train settings a sweep may not vary: they change what is measured (the val split,
# the data), where files go, or the runtime rather than the model.
SWEEP_FIXED = frozenset(
    {
        "seed", "val_size", "max_train_samples", "eval_batch_size", "device", "num_threads",
        "checkpoint_dir", "model_path", "live_dir", "run_info_path",
    }
)  # fmt: skip


@dataclass(frozen=True, config=_STRICT)
class SweepParam:
    """One dimension of the search space: a range (``low``..``high``) or ``choices``.

    A range is sampled as the train setting's type (int or float); ``log`` samples on a
    log scale (``low`` > 0); ``step`` quantises (not with ``log``). Booleans and strings
    (``optimizer``, ``augment.enabled``) take ``choices`` only.
    """

    low: int | float | None = None
    high: int | float | None = None
    log: bool = False
    step: Annotated[int | float, Field(gt=0)] | None = None
    choices: tuple[bool | int | float | str, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> SweepParam:
        ranged = self.low is not None or self.high is not None
        if self.choices is not None:
            if ranged or self.log or self.step is not None:
                raise ValueError("give either choices or low/high (with log/step), not both")
            if not self.choices:
                raise ValueError("choices: must not be empty")
            return self
        if self.low is None or self.high is None:
            raise ValueError("needs low and high (a range) or choices")
        if self.low > self.high:
            raise ValueError(f"low {self.low} exceeds high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("log and step cannot be combined")
        return self


@dataclass(frozen=True, config=_STRICT)
class SweepConfig:
    """The hyperparameter sweep (``flows/sweep.py``, ``pipeline/sweep/search.py``).

    ``space`` maps a train setting (dotted below ``train``: ``lr``, ``augment.max_shift_px``)
    to its :class:`SweepParam`; every other train setting is the base config's. Trials run on
    Dask: ``dask_address`` (``tcp://host:8786``; the flow's parameter or the environment
    variable ``MNIST_DASK_ADDRESS`` win over it) or, when null, an embedded LocalCluster
    of ``local_workers`` processes (0 = one per CPU core).
    """

    trials: PosInt = 20
    parallelism: NonNegInt = 0  # trials at a time; 0 = the cluster's worker threads
    timeout_s: PosFloat | None = None  # no new trial starts after this (running ones finish)
    seed: NonNegInt = 0  # TPE sampler seed
    pruner: Literal["median", "halving", "none"] = "median"
    pruner_startup_trials: NonNegInt = 4  # finished trials before pruning starts (median)
    pruner_warmup_epochs: NonNegInt = 1  # epochs a trial always gets (median; halving's min)
    trial_threads: PosInt = 1  # torch threads per trial = threads per local Dask worker
    trial_retries: NonNegInt = 2  # re-submissions of a trial whose workers kept dying
    dask_address: str | None = None
    connect_timeout_s: PosFloat = 10.0
    local_workers: NonNegInt = 0
    report_dir: PathField = Path("reports/sweep")  # trials.csv/json, plots, best.yaml
    space: dict[str, SweepParam] = Field(default_factory=dict)

    @field_validator("space", mode="before")
    @classmethod
    def _build_space(cls, value: Any) -> Any:
        # Strict dataclasses take no mappings: build each entry, errors naming its key.
        if not isinstance(value, Mapping):
            return value
        out: dict[str, SweepParam] = {}
        for key, entry in value.items():
            if isinstance(entry, SweepParam):  # dataclasses.replace passes built entries
                out[key] = entry
                continue
            if not isinstance(entry, Mapping):
                raise ConfigError(f"sweep.space.{key}: must be a mapping (low/high or choices)")
            try:
                out[key] = SweepParam(**entry)
            except (ValidationError, TypeError) as err:
                detail = _format_errors(err) if isinstance(err, ValidationError) else str(err)
                raise ConfigError(f"invalid parameters: sweep.space.{key}: {detail}") from err
        return out

    @model_validator(mode="after")
    def _check_space(self) -> SweepConfig:
        # An empty space is legal here (other stages must still load); the sweep refuses it.
        for key, param in self.space.items():
            _check_sweep_param(key, param)
        return self


def _check_sweep_param(key: str, param: SweepParam) -> None:
    """``key`` must name a tunable train setting, and every bound/choice be valid for it."""
    unknown = object()
    default = dotted.get(to_dict(TrainConfig()), key, unknown)
    if default is unknown:
        raise ValueError(f"sweep.space.{key}: unknown parameter (not a setting of train)")
    # Sections and tuples (lists in the dict form) are not one tunable value.
    if key in SWEEP_FIXED or isinstance(default, dict | list):
        raise ValueError(f"sweep.space.{key}: not tunable by a sweep")
    if param.choices is None and (isinstance(default, bool | str) or default is None):
        raise ValueError(f"sweep.space.{key}: takes choices, not a range")
    if param.choices is None and isinstance(default, int):
        for name, value in (("low", param.low), ("high", param.high), ("step", param.step)):
            if value is not None and not isinstance(value, int):
                raise ValueError(f"sweep.space.{key}: an integer setting needs an integer {name}")
    values: tuple[Any, ...] = (
        param.choices if param.choices is not None else (param.low, param.high)
    )
    for value in values:
        tree = to_dict(TrainConfig())
        dotted.put(tree, key, value)
        try:
            _build(TrainConfig, _tuples(tree), "train.")
        except ConfigError as err:
            raise ValueError(f"sweep.space.{key}: {value!r} is not a valid value: {err}") from None


@dataclass(frozen=True, config=_STRICT)
class Config:
    profile: str = "default"  # the name of the conf/profile/ file params.yaml was composed with
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
    sweep: SweepConfig = SweepConfig()

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
        """sha256 of the parameters that change results, for provenance.

        Leaves out where things are (every path, the data source and mirrors: the data
        itself is identified by its own hash), how the service and the flow run, and the
        profile's name, so the same parameters hash the same on every machine.
        """
        return hashlib.sha256(json.dumps(result_params(self), sort_keys=True).encode()).hexdigest()


# Sections that say where and how things run, not what is computed.
_NOT_RESULTS = frozenset({"profile", "data", "registry", "serve", "flow", "sweep"})


def result_params(cfg: Config) -> dict[str, Any]:
    """The parameters that change results: ``cfg`` without locations and runtime knobs."""

    def keep(section: Any) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(section):
            value = getattr(section, f.name)
            if is_dataclass(value):
                out[f.name] = keep(value)
            elif not isinstance(value, Path):
                out[f.name] = to_dict_value(value)
        return out

    return {f.name: keep(getattr(cfg, f.name)) for f in fields(cfg) if f.name not in _NOT_RESULTS}


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
        if not isinstance(key, str):
            raise ConfigError(f"{where}{key!r}: parameter names must be strings")
        sub = hints.get(key)
        if isinstance(sub, type) and is_dataclass(sub):
            value = _build(sub, value, f"{where}{key}.")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValidationError as err:
        raise ConfigError(f"invalid parameters: {_format_errors(err, where)}") from err


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

    ``overrides`` maps dotted keys (``"train.epochs"``) to values; they win over ``raw``.
    """
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params must be a mapping at the top level, got {type(raw).__name__}")
    tree: dict[str, Any] = copy.deepcopy(dict(raw))
    for key, value in (overrides or {}).items():
        try:
            dotted.put(tree, key, value)
        except ValueError as err:
            raise ConfigError(str(err)) from None
    cfg: Config = _build(Config, _tuples(tree), "")
    return cfg


def _lines(text: str) -> dict[tuple[str, ...], int]:
    """1-based line of every mapping key, by dotted path (for error messages)."""
    from ruamel.yaml import YAML

    out: dict[tuple[str, ...], int] = {}

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, Mapping):
            for key in node:
                out[(*path, str(key))] = node.lc.key(key)[0] + 1  # type: ignore[attr-defined]
                walk(node[key], (*path, str(key)))

    walk(YAML(typ="rt").load(text), ())
    return out


def _non_finite(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _non_finite(value, (*path, str(key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _non_finite(value, (*path, str(i)))
    elif isinstance(node, float) and not math.isfinite(node):
        yield path


def parse_params(text: str, where: str = "params.yaml") -> dict[str, Any]:
    """Parse params text exactly as DVC does (ruamel.yaml safe), and refuse what is ambiguous.

    Raises :class:`ConfigError` for invalid YAML, a duplicate key (DVC refuses those too),
    an empty or null document, a top level that is not a mapping, and NaN or infinite
    numbers (a learning rate of ``.inf`` is never meant), each naming the key and line.
    """
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    try:
        raw = YAML(typ="safe").load(text)
    except YAMLError as err:
        first = str(err).strip().splitlines()
        mark = getattr(err, "problem_mark", None)
        at = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(err, "problem", None) or (first[0] if first else "")
        raise ConfigError(f"{where}: not valid YAML{at}: {problem}") from err
    if raw is None:
        raise ConfigError(f"{where}: empty document; expected the parameter sections")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: top level must be a mapping, got {type(raw).__name__}")
    bad = list(_non_finite(raw))
    if bad:
        lines = _lines(text)
        where_bad = ", ".join(
            f"{'.'.join(p)} (line {lines.get(p) or lines.get(p[:-1], '?')})" for p in bad
        )
        raise ConfigError(f"{where}: NaN or infinite number at {where_bad}")
    return raw


def load_config(
    path: Path = Path("params.yaml"), overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read and validate ``path``. Raises :class:`ConfigError` on any problem."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as err:
        raise ConfigError(f"{path}: parameters file not found") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read parameters file: {err}") from err
    return config_from_dict(parse_params(text, str(path)), overrides)


def to_dict_value(v: Any) -> Any:
    """JSON-ready form of one config value (paths as strings, tuples as lists)."""
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, tuple | list):
        return [to_dict_value(x) for x in v]
    if isinstance(v, dict):
        return {k: to_dict_value(x) for k, x in v.items()}
    if is_dataclass(v) and not isinstance(v, type):
        return to_dict_value(asdict(v))
    return v


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict of a config dataclass (paths as strings, tuples as lists)."""
    return {k: to_dict_value(v) for k, v in asdict(cfg).items()}
