"""The validate stage: dataset statistics checked by a Great Expectations 1.x suite.

Three tables per split are validated, each by its own expectation suite:

- ``images``: one row per image (label, mean, std, min, max, ink): schema, row count,
  label set, no nulls/NaNs, value ranges, and drift (KL divergence) of the class and
  per-image intensity distributions against the committed reference profile;
- ``classes``: one row per label present: all ten present, class balance band;
- ``summary``: one row: sample count and the pixel mean/std bands.

Outputs (``validate.report_dir``, replaced as a whole): ``result.json`` (every
expectation with its observed value), ``image_summary.csv.gz`` and ``data_docs/`` (GX
Data Docs HTML); and the statistics JSON (``validate.stats_path``, a DVC metrics file).
A failure raises :class:`DataValidationError` naming each failed expectation.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.core.atomic import write_json
from pipeline.core.config import ValidateConfig
from pipeline.core.contract import NUM_CLASSES
from pipeline.core.dirswap import atomic_dir
from pipeline.core.errors import DataValidationError, SourceError
from pipeline.core.json_io import read_json
from pipeline.data.stats import compute_stats

log = logging.getLogger(__name__)

IMAGE_COLUMNS = ["split", "label", "mean", "std", "min", "max", "ink"]


@dataclass(frozen=True)
class ValidationResult:
    success: bool
    stats: dict[str, Any]
    checks: list[dict[str, Any]]  # one per expectation
    report_dir: Path

    @property
    def failures(self) -> list[dict[str, Any]]:
        return [c for c in self.checks if not c["success"]]

    def summary(self) -> str:
        ok = sum(c["success"] for c in self.checks)
        return f"{ok}/{len(self.checks)} expectations passed; report in {self.report_dir}"


def load_reference(path: Path) -> dict[str, Any]:
    profile = read_json(path, "reference profile", "see scripts/make_reference_profile.py")
    if set(profile.get("splits", {})) != {"train", "test"}:
        raise SourceError(f"{path}: reference profile must describe splits 'train' and 'test'")
    return profile


def class_table(images: pd.DataFrame) -> pd.DataFrame:
    counts = images["label"].value_counts().sort_index()
    return pd.DataFrame(
        {
            "label": counts.index.astype("int64"),
            "count": counts.to_numpy(),
            "fraction": (counts / counts.sum()).to_numpy(),
        }
    )


def summary_table(split_stats: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "count": split_stats["count"],
                "pixel_mean": split_stats["pixel_mean"],
                "pixel_std": split_stats["pixel_std"],
            }
        ]
    )


def build_suites(cfg: ValidateConfig, reference: dict[str, Any]) -> dict[str, list[Any]]:
    """Expectations per table name (``{split}.images`` etc.)."""
    import great_expectations.expectations as gxe

    suites: dict[str, list[Any]] = {}
    expected = {"train": cfg.expected_train_count, "test": cfg.expected_test_count}
    for split, count in expected.items():
        ref = reference["splits"][split]
        suites[f"{split}.images"] = [
            gxe.ExpectTableColumnsToMatchOrderedList(column_list=IMAGE_COLUMNS),
            gxe.ExpectTableRowCountToEqual(value=count),
            gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(NUM_CLASSES))),
            gxe.ExpectColumnDistinctValuesToEqualSet(
                column="label", value_set=list(range(NUM_CLASSES))
            ),
            *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in IMAGE_COLUMNS],
            *[
                gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0.0, max_value=1.0)
                for c in ("mean", "std", "min", "max", "ink")
            ],
            gxe.ExpectColumnKLDivergenceToBeLessThan(
                column="label", partition_object=ref["labels"], threshold=cfg.max_label_kl
            ),
            gxe.ExpectColumnKLDivergenceToBeLessThan(
                column="mean", partition_object=ref["image_mean"], threshold=cfg.max_intensity_kl
            ),
        ]
        suites[f"{split}.classes"] = [
            gxe.ExpectTableRowCountToEqual(value=NUM_CLASSES),
            gxe.ExpectColumnValuesToBeBetween(
                column="fraction",
                min_value=cfg.min_class_fraction,
                max_value=cfg.max_class_fraction,
            ),
        ]
        suites[f"{split}.summary"] = [
            gxe.ExpectColumnValuesToBeBetween(column="count", min_value=count, max_value=count),
            gxe.ExpectColumnValuesToBeBetween(
                column="pixel_mean",
                min_value=cfg.pixel_mean_range[0],
                max_value=cfg.pixel_mean_range[1],
            ),
            gxe.ExpectColumnValuesToBeBetween(
                column="pixel_std",
                min_value=cfg.pixel_std_range[0],
                max_value=cfg.pixel_std_range[1],
            ),
        ]
    return suites


def _jsonable(value: Any) -> Any:
    """GX results may hold numpy scalars, inf and NaN; make them strict-JSON safe."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def run_suites(
    tables: dict[str, pd.DataFrame], suites: dict[str, list[Any]], docs_dir: Path
) -> list[dict[str, Any]]:
    """Validate each table with its suite through one GX checkpoint; build Data Docs."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    context.add_data_docs_site(
        site_name="mnist",
        site_config={
            "class_name": "SiteBuilder",
            "store_backend": {
                "class_name": "TupleFilesystemStoreBackend",
                "base_directory": str(docs_dir.resolve()),
            },
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        },
    )
    source = context.data_sources.add_pandas("mnist")
    definitions = []
    for name, expectations in suites.items():
        asset = source.add_dataframe_asset(name=name)
        batch_def = asset.add_batch_definition_whole_dataframe(f"{name}.all")
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for expectation in expectations:
            suite.add_expectation(expectation)
        definitions.append(
            context.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=batch_def, suite=suite)
            )
        )
    checks: list[dict[str, Any]] = []
    for definition in definitions:
        # One checkpoint run per table: each needs its own dataframe as batch parameter.
        checkpoint = context.checkpoints.add(
            gx.Checkpoint(
                name=f"{definition.name}.checkpoint",
                validation_definitions=[definition],
                actions=[gx.checkpoint.UpdateDataDocsAction(name="docs", site_names=["mnist"])],
                result_format={"result_format": "SUMMARY"},
            )
        )
        result = checkpoint.run(batch_parameters={"dataframe": tables[definition.name]})
        for run_result in result.run_results.values():
            for r in run_result.results:
                cfg = r.expectation_config
                if cfg is None:  # GX always sets it for suite results; be explicit for mypy
                    raise DataValidationError(f"{definition.name}: result without expectation")
                kwargs = {k: v for k, v in cfg.kwargs.items() if k not in {"batch_id"}}
                checks.append(
                    _jsonable(
                        {
                            "table": definition.name,
                            "expectation": cfg.type,
                            "column": kwargs.get("column"),
                            "success": bool(r.success),
                            "observed_value": r.result.get("observed_value"),
                            "unexpected_count": r.result.get("unexpected_count"),
                            "partial_unexpected_list": r.result.get("partial_unexpected_list"),
                            "details": r.result.get("details"),
                            "kwargs": {k: v for k, v in kwargs.items() if k != "partition_object"},
                            "exception": (r.exception_info or {}).get("exception_message")
                            if r.exception_info and r.exception_info.get("raised_exception")
                            else None,
                        }
                    )
                )
    return checks


def describe_failure(check: dict[str, Any]) -> str:
    what = f"{check['table']}: {check['expectation']}"
    if check["column"]:
        what += f"({check['column']})"
    observed = check["observed_value"]
    if observed is None and check["unexpected_count"]:
        observed = (
            f"{check['unexpected_count']} unexpected, e.g. {check['partial_unexpected_list']}"
        )
    elif observed is None:
        observed = check.get("details") or check.get("exception")
    bounds = {k: v for k, v in check["kwargs"].items() if k not in {"column"}}
    return f"{what}: observed {observed}; expected {bounds}"


def run_validation(prepared_dir: Path, cfg: ValidateConfig) -> ValidationResult:
    """Compute statistics, validate them, write the reports; raise on any failure."""
    reference = load_reference(cfg.reference_profile)
    stats, images = compute_stats(prepared_dir)
    tables: dict[str, pd.DataFrame] = {}
    for split in ("train", "test"):
        part = images[images["split"] == split].reset_index(drop=True)
        tables[f"{split}.images"] = part
        tables[f"{split}.classes"] = class_table(part)
        tables[f"{split}.summary"] = summary_table(stats[split])
    suites = build_suites(cfg, reference)
    with atomic_dir(cfg.report_dir) as out:
        checks = run_suites(tables, suites, out / "data_docs")
        success = all(c["success"] for c in checks)
        images.to_csv(out / "image_summary.csv.gz", index=False, float_format="%.6f")
        (out / "result.json").write_text(
            json.dumps(
                {
                    "success": success,
                    "checks": checks,
                    "failed": [describe_failure(c) for c in checks if not c["success"]],
                },
                indent=2,
                sort_keys=True,
            )
            + "\n"
        )
    stats["validation"] = {
        "success": success,
        "expectations": len(checks),
        "failed": sum(not c["success"] for c in checks),
    }
    write_json(cfg.stats_path, stats)
    result = ValidationResult(
        success=success, stats=stats, checks=checks, report_dir=cfg.report_dir
    )
    if not success:
        lines = [describe_failure(c) for c in result.failures]
        raise DataValidationError(
            f"{len(lines)} of {len(checks)} expectations failed (report: "
            f"{cfg.report_dir / 'result.json'}):\n  " + "\n  ".join(lines),
            failures=result.failures,
        )
    return result
