"""The run report: markdown and a per-class table, from the stages' JSON outputs.

The stages write their results as JSON files (paths from the :class:`Config`):

====================  ===============================================  ==========
section               file                                             written by
====================  ===============================================  ==========
dataset statistics    ``validate.stats_path``                          validate
validation summary    ``validate.report_dir / "result.json"``          validate
training metrics      ``train.live_dir / "metrics.json"`` (dvclive)    train
training run          ``train.run_info_path``                          train
test metrics          ``evaluate.live_dir / "metrics.json"`` (dvclive) evaluate
test run              ``evaluate.run_info_path``                       evaluate
per-class metrics     ``evaluate.per_class_path``                      evaluate
gate decision         ``gate.report_path``                             gate
production model      ``registry.production_dir / "model_card.json"``  promote
====================  ===============================================  ==========

The metrics files hold numbers only; the run files what ran (hashes, versions, n), and
each pair is shown as one section.

Reading is defensive about *fields* (a missing optional key prints as ``n/a``) but
not about *files*: every file that is absent or not a JSON object is listed in
:attr:`RunReport.missing` and shown in the report, and the flow fails a run that
completed without one of them. No Prefect import here; :mod:`flows.training`
publishes the result as artifacts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core import dotted
from pipeline.core.config import Config
from pipeline.core.errors import ArtifactError
from pipeline.core.json_io import read_json

SECTIONS = (
    "data_stats",
    "validation",
    "train",
    "train_run",
    "eval",
    "eval_run",
    "per_class",
    "gate",
    "model_card",
)
# Sections shown inside another one: run information beside the metrics it belongs to.
_SHOWN_WITH = {"train_run": "train", "eval_run": "eval"}
PER_CLASS_COLUMNS = ("class", "precision", "recall", "f1", "support")


@dataclass(frozen=True)
class RunReport:
    """``markdown`` for a markdown artifact, ``per_class`` rows for a table artifact.

    ``missing`` names each section whose file was absent or unreadable, with the reason.
    """

    markdown: str
    per_class: list[dict[str, Any]]
    missing: dict[str, str] = field(default_factory=dict)


def report_paths(cfg: Config) -> dict[str, Path]:
    """Where each section's file lives, relative to the repository root."""
    return {
        "data_stats": Path(cfg.validate.stats_path),
        "validation": Path(cfg.validate.report_dir) / "result.json",
        "train": Path(cfg.train.live_dir) / "metrics.json",
        "train_run": Path(cfg.train.run_info_path),
        "eval": Path(cfg.evaluate.live_dir) / "metrics.json",
        "eval_run": Path(cfg.evaluate.run_info_path),
        "per_class": Path(cfg.evaluate.per_class_path),
        "gate": Path(cfg.gate.report_path),
        "model_card": Path(cfg.registry.production_dir) / "model_card.json",
    }


def read_json_object(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """``(object, None)``, or ``(None, reason)`` if the file is missing or not a JSON object."""
    try:
        return read_json(path, "file"), None
    except ArtifactError as err:
        return None, str(err)


def get(data: Mapping[str, Any], key: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; None where any level is missing."""
    return dotted.get(data, key, None)


def fmt(value: Any, digits: int = 4) -> str:
    """A table cell: floats rounded, None as ``n/a``, pipes escaped for markdown."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(v, digits) for v in value)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(rows: Sequence[tuple[str, Any]]) -> list[str]:
    out = ["| | |", "|---|---|"]
    out += [f"| {name} | {fmt(value)} |" for name, value in rows]
    return out


def _scalars(data: Mapping[str, Any], prefix: str = "", depth: int = 2) -> list[tuple[str, Any]]:
    """Flatten the scalar (and short list) leaves of ``data`` into dotted rows."""
    rows: list[tuple[str, Any]] = []
    for key in sorted(data):
        value = data[key]
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            if depth > 0:
                rows += _scalars(value, f"{name}.", depth - 1)
        elif isinstance(value, list):
            if len(value) <= 4 and all(not isinstance(v, Mapping | list) for v in value):
                rows.append((name, value))
        else:
            rows.append((name, value))
    return rows


def _data_stats(d: Mapping[str, Any]) -> list[str]:
    rows: list[tuple[str, Any]] = []
    for split in ("train", "test"):
        counts = get(d, f"{split}.class_counts")
        spread = None
        if isinstance(counts, Mapping) and counts:
            values = [v for v in counts.values() if isinstance(v, int | float)]
            spread = f"{min(values)} .. {max(values)}" if values else None
        rows += [
            (f"{split} images", get(d, f"{split}.count")),
            (f"{split} pixel mean / std", _pair(d, f"{split}.pixel_mean", f"{split}.pixel_std")),
            (f"{split} images per class (min .. max)", spread),
        ]
    rows.append(("normalisation (mean, std)", _pair(d, "normalization.mean", "normalization.std")))
    return _table(rows)


def _pair(d: Mapping[str, Any], a: str, b: str) -> str:
    return f"{fmt(get(d, a))} / {fmt(get(d, b))}"


def _list(d: Mapping[str, Any], key: str) -> list[Any]:
    value = d.get(key)
    return value if isinstance(value, list) else []


def _validation(d: Mapping[str, Any]) -> list[str]:
    checks = _list(d, "checks")
    passed = sum(1 for c in checks if isinstance(c, Mapping) and c.get("success") is True)
    lines = _table(
        [
            ("all expectations met", d.get("success")),
            ("expectations passed", f"{passed} / {len(checks)}"),
        ]
    )
    failed = _list(d, "failed")
    if failed:
        lines += ["", "Failed expectations:", ""]
        lines += [f"- {fmt(_describe_check(f))}" for f in failed]
    return lines


def _describe_check(check: Any) -> str:
    if not isinstance(check, Mapping):
        return str(check)
    parts = [str(check.get(k)) for k in ("table", "column", "expectation") if check.get(k)]
    observed = check.get("observed_value")
    return " / ".join(parts) + (f" (observed {observed})" if observed is not None else "")


def _train(d: Mapping[str, Any]) -> list[str]:
    # The train stage's keys (metrics and run information) are its own; show every scalar.
    return _table(_scalars(d))


def _eval(d: Mapping[str, Any]) -> list[str]:
    return _table(
        [
            ("accuracy", d.get("accuracy")),
            ("loss (cross-entropy)", d.get("loss")),
            ("macro F1", d.get("macro_f1")),
            ("errors", f"{fmt(d.get('errors'))} of {fmt(d.get('n'))}"),
            ("model sha256", d.get("model_sha256")),
        ]
    )


def _gate(d: Mapping[str, Any]) -> list[str]:
    passed = d.get("passed")
    verdict = "PASSED" if passed is True else "REJECTED" if passed is False else "n/a"
    lines = [
        f"**{verdict}**",
        "",
        *_table(
            [
                ("candidate accuracy (ONNX)", d.get("candidate_accuracy")),
                ("production accuracy (ONNX)", d.get("production_accuracy")),
                ("candidate sha256", d.get("candidate_sha256")),
                ("decided at", d.get("decided_at")),
            ]
        ),
    ]
    checks = _list(d, "checks")
    if checks:
        # Every check with what was measured and the threshold it was held to (robustness
        # floors per family and the ECE ceiling included, when the gate checks them).
        lines += [
            "",
            "| check | result | observed | threshold | message |",
            "|---|---|---|---|---|",
        ]
        for c in checks:
            if isinstance(c, Mapping):
                result = "pass" if c.get("passed") is True else "FAIL"
                lines.append(
                    f"| {fmt(c.get('name'))} | {result} | {fmt(c.get('observed'))} | "
                    f"{fmt(c.get('threshold'))} | {fmt(c.get('message'))} |"
                )
    quality = d.get("quality")
    if isinstance(quality, Mapping):
        lines += [
            "",
            "Quality of the ONNX candidate (robustness suite, calibration, abstention):",
            "",
            *_table(
                [
                    ("severity checked", quality.get("severity_checked")),
                    ("temperature", quality.get("temperature")),
                    ("ECE before / after", [quality.get("ece_before"), quality.get("ece_after")]),
                    ("confidence threshold", quality.get("confidence_threshold")),
                    ("test coverage at threshold", quality.get("coverage")),
                    ("non-digit probes flagged", quality.get("probes_flagged")),
                ]
            ),
        ]
    return lines


def _model_card(d: Mapping[str, Any]) -> list[str]:
    return _table(
        [
            ("version", d.get("version")),
            ("sha256", d.get("sha256")),
            ("model", d.get("model")),
            ("test accuracy (ONNX)", get(d, "metrics.onnx_test_accuracy")),
            ("promoted at", d.get("promoted_at")),
            ("git commit", d.get("git_commit")),
        ]
    )


def per_class_rows(d: Mapping[str, Any]) -> list[dict[str, Any]]:
    """``{"0": {"precision": ..}, ..}`` as table rows sorted by class; optional fields n/a."""

    def order(key: str) -> tuple[bool, int, str]:
        return (not key.isdigit(), int(key) if key.isdigit() else 0, key)

    rows = []
    for key in sorted(d, key=order):
        metrics = d[key]
        if not isinstance(metrics, Mapping):
            continue
        row: dict[str, Any] = {"class": str(key)}
        for column in PER_CLASS_COLUMNS[1:]:
            value = metrics.get(column)
            row[column] = round(value, 4) if isinstance(value, float) else value
        rows.append(row)
    return rows


_TITLES = {
    "data_stats": "Dataset statistics",
    "validation": "Data validation",
    "train": "Training",
    "eval": "Test metrics (PyTorch)",
    "gate": "Gate decision",
    "model_card": "Production model",
}
_RENDER = {
    "data_stats": _data_stats,
    "validation": _validation,
    "train": _train,
    "eval": _eval,
    "gate": _gate,
    "model_card": _model_card,
}


def build_report(
    repo: Path,
    cfg: Config,
    *,
    outcome: str,
    header: Sequence[tuple[str, Any]] = (),
) -> RunReport:
    """Read every section's file under ``repo`` and render the report.

    ``outcome`` is the first line (``Completed``, ``Failed: <reason>``); ``header``
    rows (profile, params hash, stages run) go in a table below it.
    """
    repo = Path(repo)
    loaded: dict[str, dict[str, Any] | None] = {}
    missing: dict[str, str] = {}
    paths = report_paths(cfg)
    for name in SECTIONS:
        data, problem = read_json_object(repo / paths[name])
        loaded[name] = data
        if problem is not None:
            missing[name] = problem
    lines = [f"# Training pipeline run: {outcome}", ""]
    if header:
        lines += [*_table(header), ""]
    for name, title in _TITLES.items():
        parts = [name, *(extra for extra, host in _SHOWN_WITH.items() if host == name)]
        lines += [f"## {title}", "", ", ".join(f"`{paths[p]}`" for p in parts), ""]
        absent = [p for p in parts if loaded[p] is None]
        if absent:
            lines += [f"**missing**: {missing[p]}" for p in absent]
        else:
            merged: dict[str, Any] = {}
            for p in reversed(parts):  # the metrics win over run information
                merged.update(loaded[p] or {})
            lines += _RENDER[name](merged)
        lines.append("")
    per_class = per_class_rows(loaded["per_class"]) if loaded["per_class"] is not None else []
    if missing:
        lines += ["## Missing outputs", ""]
        lines += [f"- {name}: {problem}" for name, problem in missing.items()]
        lines.append("")
    return RunReport("\n".join(lines), per_class, missing)
