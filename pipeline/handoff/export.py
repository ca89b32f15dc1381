"""ONNX export of the candidate model, with the normalisation inside the graph.

The exported graph follows :mod:`pipeline.core.contract` (see ``docs/model-handoff.md``),
with a dynamic batch axis. It computes ``(image / 255 - mean) / std`` with the mean/std
stored in the model file, so a consumer needs no constants. ``metadata_props`` carry
provenance (see :data:`METADATA_KEYS`). The export stage writes the file only after it
passed the parity check against PyTorch (:mod:`pipeline.handoff.parity`).

Calibration and abstention: the stage reads ``evaluate.quality_path`` (written
by evaluate for this very model file) and puts the temperature fitted on the validation
split into the graph (:func:`pipeline.quality.calibration.with_temperature`): ``probabilities``
is ``softmax(logits / T)``, ``logits`` are unchanged. ``metadata_props`` gain
``temperature``, ``confidence_threshold`` (top probability at or above it: confident;
what the service's ``confident`` flag follows) and ``quality``, the compact JSON
summary of :meth:`pipeline.quality.report.QualityReport.compact`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from pipeline.core.atomic import sha256_file, write_bytes, write_json
from pipeline.core.config import Config
from pipeline.core.contract import (
    IMAGE_SIDE,
    INPUT_CONTRACT,
    INPUT_NAME,
    NUM_CLASSES,
    OUTPUT_CONTRACT,
    OUTPUT_NAMES,
    PIXEL_MAX,
)
from pipeline.core.errors import ArtifactError, ModelFileError, ParityError
from pipeline.core.json_io import read_json
from pipeline.handoff.parity import check_parity
from pipeline.training.model_io import LoadedModel, load_model_file, wrap

log = logging.getLogger("pipeline.handoff.export")

# Keys written into metadata_props by the export stage (export_onnx always writes the
# contract keys; the rest come from the stage runner).
METADATA_KEYS = (
    "model_version",
    "git_commit",
    "dataset_sha256",
    "params_hash",
    "source_model_sha256",
    "model_name",
    "model_width",
    "normalization_mean",
    "normalization_std",
    "test_metrics",
    "torch_version",
    "onnx_version",
    "onnxruntime_version",
    "opset",
    "input_contract",
    "output_contract",
    "class_labels",
    "temperature",
    "confidence_threshold",
    "quality",
)

# Largest batch the dynamic dimension admits; far above anything a service sends.
_MAX_BATCH = 1 << 20


def contract_metadata(model: LoadedModel, opset: int) -> dict[str, str]:
    """Metadata every exported file carries, whoever calls :func:`export_onnx`."""
    import onnx
    import onnxruntime

    return {
        "model_name": model.name,
        "model_width": str(model.width),
        "normalization_mean": repr(model.mean),
        "normalization_std": repr(model.std),
        "opset": str(opset),
        "input_contract": INPUT_CONTRACT,
        "output_contract": OUTPUT_CONTRACT,
        "class_labels": ",".join(str(i) for i in range(NUM_CLASSES)),
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "onnxruntime_version": onnxruntime.__version__,
    }


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter's optimiser passes log every rewrite at INFO; keep stage output readable."""
    logging.disable(logging.INFO)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def export_onnx(
    model: LoadedModel,
    dest: Path,
    opset: int = 18,
    metadata: Mapping[str, str] | None = None,
    temperature: float | None = None,
) -> Path:
    """Export ``model`` to ``dest`` (atomically) with the dynamo exporter; return ``dest``.

    ``metadata`` entries are added to ``metadata_props`` over the contract keys of
    :func:`contract_metadata`. ``temperature`` (a positive float; None: plain softmax)
    divides the logits inside the ``probabilities`` output only. The result passes
    ``onnx.checker.check_model(full_check=True)``. Raises :class:`ModelFileError` if
    export or the check fails, ``opset < 18`` or the temperature is not positive.
    """
    import onnx

    if opset < 18:
        raise ModelFileError(f"opset {opset} is too old; the export needs opset >= 18")
    bad = {k: v for k, v in (metadata or {}).items() if not isinstance(v, str)}
    if bad:
        raise ModelFileError(f"metadata values must be strings, got {sorted(bad)}")
    module: torch.nn.Module = wrap(model)
    if temperature is not None:
        from pipeline.quality.calibration import with_temperature

        try:
            module = with_temperature(module, temperature)
        except ValueError as err:
            raise ModelFileError(f"cannot export with temperature {temperature}: {err}") from err
    # Batch 2 as the example: a size-1 example dimension would be specialised to 1.
    example = torch.full((2, 1, IMAGE_SIDE, IMAGE_SIDE), PIXEL_MAX / 2)
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    try:
        with _quiet_exporter_logs():
            program = torch.onnx.export(
                module,
                (example,),
                dynamo=True,
                opset_version=opset,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={INPUT_NAME: {0: batch}},
                external_data=False,
                optimize=True,
                verbose=False,
            )
    except Exception as err:  # the exporter raises many internal types; name the model
        raise ModelFileError(f"ONNX export of model {model.name!r} failed: {err}") from err
    if program is None:  # only the legacy exporter returns None
        raise ModelFileError("torch.onnx.export returned no program")
    proto = program.model_proto
    props = {**contract_metadata(model, opset), **dict(metadata or {})}
    del proto.metadata_props[:]
    for key in sorted(props):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, props[key]
    proto.doc_string = f"MNIST classifier ({model.name}). {INPUT_CONTRACT}. {OUTPUT_CONTRACT}."
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ModelFileError(f"exported ONNX graph fails the checker: {err}") from err
    return write_bytes(Path(dest), proto.SerializeToString())


def git_commit(cwd: Path) -> str:
    """``git rev-parse HEAD`` in ``cwd``; ``"unknown"`` outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and commit else "unknown"


def model_version(source_sha256: str, now: datetime | None = None) -> str:
    """``YYYYmmddTHHMMSSZ-<first 12 hex of the model file sha256>``."""
    stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{source_sha256[:12]}"


def stage_metadata(
    cfg: Config,
    model: LoadedModel,
    source_sha256: str,
    dataset_sha256: str,
    commit: str,
    eval_metrics: Mapping[str, Any],
) -> dict[str, str]:
    """The provenance half of ``metadata_props`` (the contract half is added by export)."""
    tested = {k: eval_metrics[k] for k in ("accuracy", "loss", "n") if k in eval_metrics}
    if eval_metrics.get("model_sha256") not in (None, source_sha256):
        raise ModelFileError(
            f"{cfg.evaluate.run_info_path} belongs to another model "
            f"({eval_metrics.get('model_sha256')}), not {source_sha256}; re-run evaluate"
        )
    return {
        "model_version": model_version(source_sha256),
        "git_commit": commit,
        "dataset_sha256": dataset_sha256,
        "params_hash": cfg.params_hash(),
        "source_model_sha256": source_sha256,
        "test_metrics": json.dumps(tested, sort_keys=True),
    }


def quality_metadata(cfg: Config, source_sha256: str) -> tuple[float, dict[str, str]]:
    """``(temperature, metadata)`` from ``evaluate.quality_path`` for the model ``source_sha256``.

    ``metadata``: ``temperature`` and ``confidence_threshold`` as ``repr`` of the floats
    (exact round trip), ``quality`` the compact JSON summary. Raises
    :class:`ArtifactError` when the file is missing or malformed and
    :class:`ModelFileError` when it was written for another model file.
    """
    path = Path(cfg.evaluate.quality_path)
    quality = read_json(path, "quality report", "run evaluate")
    if quality.get("model_sha256") != source_sha256:
        raise ModelFileError(
            f"{path} belongs to another model ({quality.get('model_sha256')}), "
            f"not {source_sha256}; re-run evaluate"
        )
    try:
        temperature = float(quality["temperature"])
        threshold = float(quality["confidence_threshold"])
        compact = dict(quality["compact"])
    except (KeyError, TypeError, ValueError) as err:
        raise ArtifactError(f"{path}: malformed quality report ({err!r}); re-run evaluate") from err
    if not (math.isfinite(temperature) and temperature > 0 and 0.0 <= threshold <= 1.0):
        raise ArtifactError(
            f"{path}: temperature {temperature} must be > 0 and confidence threshold "
            f"{threshold} in [0, 1]; re-run evaluate"
        )
    return temperature, {
        "temperature": repr(temperature),
        "confidence_threshold": repr(threshold),
        "quality": json.dumps(compact, separators=(",", ":"), sort_keys=True),
    }


def _quantize_stage(cfg: Config, fp32_path: Path) -> dict[str, Any]:
    """INT8 variant, kept at ``export.int8_path`` only if its accuracy gate passes."""
    from pipeline.data.dataset import load_split
    from pipeline.handoff.quantize import calibration_sample, compare_int8, quantize_int8

    train = load_split(cfg.data.prepared_dir, "train")
    test = load_split(cfg.data.prepared_dir, "test")
    calib = calibration_sample(train.images, cfg.export.calibration_samples, cfg.train.seed)
    dest = Path(cfg.export.int8_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".int8.", dir=dest.parent) as tmp:
        staged = quantize_int8(fp32_path, Path(tmp) / dest.name, calib)
        report = compare_int8(
            fp32_path,
            staged,
            test.images,
            test.labels,
            max_drop=cfg.gate.max_regression,
            calibration_samples=len(calib),
        )
        if report.passed:
            staged.replace(dest)
        else:
            dest.unlink(missing_ok=True)
            log.warning(
                "export: INT8 model dropped: accuracy %.4f vs fp32 %.4f (allowed drop %.4f)",
                report.int8_accuracy,
                report.fp32_accuracy,
                report.max_drop,
            )
    return report.to_dict()


def run_export_stage(cfg: Config, cwd: Path | None = None) -> dict[str, Any]:
    """Export, check parity on the whole test set, and only then install the ONNX file.

    On a parity failure ``metrics/parity.json`` records it, any older file at
    ``cfg.export.onnx_path`` is removed (so no stale model can be gated), and
    :class:`ParityError` is raised. With ``export.quantize`` an INT8 variant is made
    and reported under ``int8`` (see :mod:`pipeline.handoff.quantize`). Returns the report.
    """
    from pipeline.data.dataset import dataset_version, load_split

    # Outputs of an earlier run go first: if this run fails at any point, no older
    # ONNX file (with its matching parity report) may be left for the gate to pass.
    for stale in (cfg.export.onnx_path, cfg.export.int8_path, cfg.export.parity_path):
        Path(stale).unlink(missing_ok=True)
    model = load_model_file(cfg.train.model_path)
    source_sha = sha256_file(cfg.train.model_path)
    meta = stage_metadata(
        cfg,
        model,
        source_sha256=source_sha,
        dataset_sha256=dataset_version(cfg.data.prepared_dir),
        commit=git_commit(cwd or Path.cwd()),
        # The numbers from dvclive's metrics.json, what was evaluated from run.json.
        eval_metrics={
            **read_json(cfg.evaluate.run_info_path, "evaluation run info", "run evaluate"),
            **read_json(
                Path(cfg.evaluate.live_dir) / "metrics.json", "evaluation metrics", "run evaluate"
            ),
        },
    )
    temperature, quality_meta = quality_metadata(cfg, source_sha)
    meta.update(quality_meta)
    test = load_split(cfg.data.prepared_dir, "test")
    dest = Path(cfg.export.onnx_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export.", dir=dest.parent) as tmp:
        staged = Path(tmp) / dest.name
        t0 = time.perf_counter()
        export_onnx(model, staged, opset=cfg.export.opset, metadata=meta, temperature=temperature)
        export_s = time.perf_counter() - t0
        report = check_parity(
            model,
            staged,
            test.images,
            test.labels,
            batch_sizes=cfg.export.parity_batch_sizes,
            atol=cfg.export.parity_atol,
            temperature=temperature,
        )
        payload = {**report.to_dict(), "export_seconds": round(export_s, 3)}
        payload.update(model_version=meta["model_version"], opset=cfg.export.opset)
        write_json(cfg.export.parity_path, payload)
        if not report.passed:
            dest.unlink(missing_ok=True)
            raise ParityError(report.failure_message())
        staged.replace(dest)  # same directory: an atomic rename
    if cfg.export.quantize:
        payload["int8"] = _quantize_stage(cfg, dest)
        write_json(cfg.export.parity_path, payload)
    log.info(
        "export: %s (%s), onnx accuracy %.4f, max |dlogit| %.2e",
        dest,
        meta["model_version"],
        report.onnx_accuracy,
        report.max_abs_diff,
    )
    return payload
