"""Named errors of the pipeline.

Every failure a user can cause (bad config, bad data, a diverging run, a model that
fails its gate) has its own exception type, so that callers and tests can tell them
apart and the CLI can print one clear line and exit non-zero.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Base class of every error this package raises on purpose."""

    exit_code: int = 1


class ConfigError(PipelineError):
    """params.yaml (or an override) has an unknown key, a wrong type or a bad value."""

    exit_code = 2


class SourceError(PipelineError):
    """A dataset source is unusable: a missing file, a failed download."""


class MissingFileError(SourceError):
    """One of the four MNIST files is not in the source directory."""


class DownloadError(SourceError):
    """Every mirror failed for a file, after retries."""


class ChecksumError(SourceError):
    """A file's md5 or sha256 differs from the pinned value."""


class IdxFormatError(PipelineError):
    """An IDX file violates the format: gzip, magic number, shape or length."""


class DataValidationError(PipelineError):
    """The dataset statistics failed one or more Great Expectations checks."""

    def __init__(self, message: str, failures: list[dict[str, object]] | None = None) -> None:
        super().__init__(message)
        self.failures = failures or []


class NonFiniteLossError(PipelineError):
    """Training produced a NaN or Inf loss."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, unreadable or belongs to another configuration."""


class ArtifactError(PipelineError):
    """A JSON file an earlier stage writes (metrics, report, manifest) is missing or malformed."""


class ModelFileError(PipelineError):
    """A model file (state dict, ONNX) is missing or malformed."""


class ParityError(PipelineError):
    """onnxruntime and PyTorch disagree beyond tolerance."""


class GateRejected(PipelineError):
    """The candidate model failed the evaluation gate."""

    def __init__(self, message: str, reasons: list[str] | None = None) -> None:
        super().__init__(message)
        self.reasons = reasons or []


class PromotionError(PipelineError):
    """Promotion or rollback cannot proceed (no passed gate, nothing to roll back)."""


class ImageDecodeError(PipelineError):
    """An image file or upload cannot be decoded, is not PNG/JPEG, is too large or blank."""


class OrchestrationError(PipelineError):
    """A DVC command run by the Prefect flow failed, or DVC and the flow disagree afterwards."""


class SwapRecoveryError(PipelineError):
    """An interrupted directory swap cannot be finished: its journal is unreadable or the
    directories are in a state the swap cannot have left."""


class DvcCommandError(PipelineError):
    """A DVC command run by the CLI (e.g. ``dvc commit`` after a resumed training) failed."""


class RegistryError(PipelineError):
    """Recording, rolling back or following a model version failed (git, GTO or DVC)."""


class RemoteUnreachable(RegistryError):
    """A git or DVC remote is missing from the configuration or cannot be reached."""


class ClusterError(PipelineError):
    """The Dask cluster of a sweep is unreachable, has no workers, or lost every trial."""


class SweepError(PipelineError):
    """A hyperparameter sweep ended without a single completed trial."""
