"""The model registry: promote a gated candidate to production, or roll back.

Layout (paths from ``cfg.registry``)::

    models/production/   model.onnx, model_card.json, model_card.md   <- served
    models/previous/     the production directory before the last promote/rollback

``promote`` installs exactly the bytes the gate accepted: ``reports/gate.json`` must
say ``passed`` and name the sha256 of the current candidate ``model.onnx``; the copy
is hashed again before it goes live. The new directory is built beside
``production_dir``; then, under one journal (:mod:`pipeline.core.dirswap`), one
``renameat2(RENAME_EXCHANGE)`` swaps it with production and a second swaps the old
production with previous. A serving process watching ``production_dir/model.onnx``
sees the complete old or the complete new directory, never a missing file; a kill
between the two exchanges is completed by the next promote, rollback or
``python -m pipeline recover``, so ``previous_dir`` always exists and ends up holding
the replaced model. ``rollback`` exchanges ``previous_dir`` and ``production_dir``
the same way, so a second rollback undoes the first.
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.core.atomic import sha256_file, write_json, write_text
from pipeline.core.config import Config
from pipeline.core.contract import MODEL_CARD_JSON as CARD_JSON
from pipeline.core.contract import MODEL_CARD_MD as CARD_MD
from pipeline.core.contract import MODEL_FILE
from pipeline.core.dirswap import Swap, recover, swapping
from pipeline.core.errors import PromotionError
from pipeline.core.json_io import read_json
from pipeline.release.verdict import passed_report, passed_this

log = logging.getLogger("pipeline.release.promote")

PLACEHOLDER = "NO_PREVIOUS_MODEL.txt"


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path, "report") if Path(path).is_file() else {}


def check_gate(report_path: Path, candidate: Path) -> dict[str, Any]:
    """The gate report, if it passed *this* candidate; else :class:`PromotionError`."""
    report = passed_report(report_path)
    if not candidate.is_file():
        raise PromotionError(f"{candidate}: candidate ONNX missing")
    sha = sha256_file(candidate)
    if not passed_this(report, sha):
        raise PromotionError(
            f"{candidate} (sha256 {sha[:12]}) is not the model the gate passed "
            f"({str(report.get('candidate_sha256'))[:12]}); re-run the gate"
        )
    return report


def build_card(
    onnx_path: Path, gate: dict[str, Any], evaluation: dict[str, Any], parity: dict[str, Any]
) -> dict[str, Any]:
    """The model card: provenance from the ONNX metadata, figures from the reports."""
    from pipeline.handoff.onnx_runtime import read_metadata

    meta = read_metadata(onnx_path)
    sha = sha256_file(onnx_path)
    if parity and parity.get("onnx_sha256") != sha:
        parity = {}  # figures of another file would be misleading
    return {
        "version": meta.get("model_version", "unknown"),
        "sha256": sha,
        "size_bytes": onnx_path.stat().st_size,
        "model": meta.get("model_name"),
        "git_commit": meta.get("git_commit", "unknown"),
        "dataset_version": meta.get("dataset_sha256"),
        "params_hash": meta.get("params_hash"),
        "source_model_sha256": meta.get("source_model_sha256"),
        "opset": meta.get("opset"),
        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "metrics": {
            "onnx_test_accuracy": gate.get("candidate_accuracy"),
            "pytorch_test_accuracy": evaluation.get("accuracy"),
            "pytorch_test_loss": evaluation.get("loss"),
            "test_n": gate.get("n", evaluation.get("n")),
        },
        "gate": {
            "checks": gate.get("checks", []),
            "replaced_production_sha256": gate.get("production_sha256"),
            "replaced_production_accuracy": gate.get("production_accuracy"),
        },
        "parity": {
            "atol": parity.get("atol"),
            "max_abs_diff": parity.get("max_abs_diff"),
            "batch_sizes": parity.get("batch_sizes"),
        },
        # Robustness, calibration and abstention (export's compact summary in the ONNX
        # metadata; None for a model exported without it).
        "quality": quality_summary(meta),
        "input_contract": meta.get("input_contract"),
        "output_contract": meta.get("output_contract"),
        "libraries": {
            k: meta.get(k) for k in ("torch_version", "onnx_version", "onnxruntime_version")
        },
    }


def quality_summary(meta: dict[str, str]) -> dict[str, Any] | None:
    """The ``quality`` metadata (compact JSON, :meth:`QualityReport.compact`) as a dict.

    None when the model has none or it is not a JSON object.
    """
    raw = meta.get("quality")
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _quality_lines(q: dict[str, Any]) -> list[str]:
    """Markdown of the compact quality summary (robustness at the checked severity)."""
    s = q.get("severity_checked")
    accuracy = (q.get("robustness") or {}).get("accuracy") or {}
    at_s = ", ".join(
        f"{name} {accs[s - 1]:.4f}"
        for name, accs in accuracy.items()
        if isinstance(s, int) and isinstance(accs, list) and len(accs) >= s
    )
    return [
        "",
        "## Robustness, calibration and abstention",
        "",
        f"- test accuracy under perturbation at severity {s}: {at_s or 'n/a'}",
        f"- temperature {q.get('temperature')} (fitted on validation): test ECE "
        f"{q.get('ece_before')} before, {q.get('ece_after')} after; the `probabilities` "
        "output includes it",
        f"- confident when the top probability >= {q.get('confidence_threshold')} (target "
        f"precision {q.get('target_precision')}); test coverage {q.get('coverage')}; "
        f"non-digit probes flagged {q.get('probes_flagged')}",
    ]


def card_markdown(card: dict[str, Any]) -> str:
    """A human-readable rendering of :func:`build_card`."""
    m, p = card["metrics"], card["parity"]

    def fmt(v: Any) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = [
        f"# MNIST model {card['version']}",
        "",
        f"- model: `{card['model']}`, ONNX opset {card['opset']}, {card['size_bytes']} bytes",
        f"- sha256: `{card['sha256']}`",
        f"- git commit: `{card['git_commit']}`",
        f"- dataset version (manifest sha256): `{card['dataset_version']}`",
        f"- params hash: `{card['params_hash']}`",
        f"- promoted at: {card['promoted_at']}",
        "",
        "## Test metrics",
        "",
        f"- ONNX (onnxruntime) accuracy: {fmt(m['onnx_test_accuracy'])} on {m['test_n']} images",
        f"- PyTorch accuracy: {fmt(m['pytorch_test_accuracy'])}, "
        f"loss {fmt(m['pytorch_test_loss'])}",
        "",
        "## Parity (onnxruntime vs PyTorch, whole test set)",
        "",
        f"- max |logit difference|: {p['max_abs_diff']} (tolerance {p['atol']})",
    ]
    for bs, row in sorted((p.get("batch_sizes") or {}).items(), key=lambda kv: int(kv[0])):
        lines.append(
            f"- batch {bs}: max diff {row['max_abs_diff']:.3g}, "
            f"argmax agreement {row['argmax_agreement']:.4f}, {row['seconds']:.2f} s"
        )
    if card.get("quality"):
        lines += _quality_lines(card["quality"])
    lines += ["", "## Gate", ""]
    for c in card["gate"]["checks"]:
        lines.append(f"- {c['name']}: {'pass' if c['passed'] else 'FAIL'} - {c['message']}")
    lines += [
        "",
        "## Contract",
        "",
        f"- {card['input_contract']}",
        f"- {card['output_contract']}",
        "",
    ]
    return "\n".join(lines)


def _placeholder(swap: Swap, prev: Path) -> None:
    """An empty ``previous_dir`` after the first promotion, installed by ``swap``.

    dvc.yaml declares it as an output of the promote stage, and DVC fails a stage
    whose declared output is missing; rollback still refuses (no model.onnx in it).
    """
    tmp = swap.stage(prev)
    write_text(tmp / PLACEHOLDER, "No previous production model yet (first promotion).\n")
    swap.move(tmp, prev)


def recover_registry(cfg: Config) -> list[str]:
    """Finish an interrupted promote or rollback; remove leftover staging directories."""
    prod = Path(cfg.registry.production_dir)
    return recover(prod, [prod, Path(cfg.registry.previous_dir)])


def promote(cfg: Config) -> dict[str, Any]:
    """Install the gated candidate as production; keep the old one as previous.

    Raises :class:`PromotionError` unless the gate report passed this exact candidate.
    Promoting the model that is already in production changes nothing.
    """
    candidate = Path(cfg.export.onnx_path)
    gate = check_gate(cfg.gate.report_path, candidate)
    prod = Path(cfg.registry.production_dir)
    prev = Path(cfg.registry.previous_dir)
    current = prod / MODEL_FILE
    with swapping(prod, [prod, prev]) as swap:
        if current.is_file() and sha256_file(current) == gate["candidate_sha256"]:
            log.info("promote: %s is already the production model", candidate)
            if not prev.exists():  # e.g. deleted by hand: DVC needs the declared output
                _placeholder(swap, prev)
                swap.commit()
            return _optional_json(prod / CARD_JSON)
        staging = swap.stage(prod)
        staged = staging / MODEL_FILE
        shutil.copyfile(candidate, staged)
        if sha256_file(staged) != gate["candidate_sha256"]:
            raise PromotionError(f"{candidate} changed while being promoted; re-run the gate")
        card = build_card(
            staged,
            gate,
            _optional_json(Path(cfg.evaluate.live_dir) / "metrics.json"),
            _optional_json(cfg.export.parity_path),
        )
        write_json(staging / CARD_JSON, card)
        write_text(staging / CARD_MD, card_markdown(card))
        _install_staged(swap, staging, prod, prev)
    log.info("promote: %s is now in production (%s)", card["version"], prod)
    return card


def install_production(prod: Path, prev: Path, source: Path) -> None:
    """Copy the complete directory ``source`` in as ``prod``; the old ``prod`` becomes ``prev``.

    The same journalled swap as :func:`promote` (crash-consistent); used to put a
    registered version back (``rollback --to``).
    """
    with swapping(prod, [prod, prev]) as swap:
        staging = swap.stage(prod)
        shutil.copytree(source, staging, dirs_exist_ok=True)
        _install_staged(swap, staging, prod, prev)


def _install_staged(swap: Swap, staging: Path, prod: Path, prev: Path) -> None:
    """``staging`` becomes ``prod``, the old ``prod`` becomes ``prev``; commit the swap."""
    had_production = prod.exists()
    swap.install(staging, prod)
    if had_production:
        # ``staging`` now names the old production: it becomes previous.
        swap.install(staging, prev)
    elif not prev.exists():
        _placeholder(swap, prev)
    swap.commit()


def rollback(cfg: Config) -> str:
    """Exchange ``previous_dir`` and ``production_dir``; return the restored sha256."""
    prod = Path(cfg.registry.production_dir)
    prev = Path(cfg.registry.previous_dir)
    with swapping(prod, [prod, prev]) as swap:
        if not (prev / MODEL_FILE).is_file():
            raise PromotionError(f"{prev / MODEL_FILE}: no previous model to roll back to")
        sha = sha256_file(prev / MODEL_FILE)
        if prod.exists():
            swap.exchange(prev, prod)
        else:
            swap.move(prev, prod)
            _placeholder(swap, prev)
        swap.commit()
    log.info("rollback: production is now %s", sha[:12])
    return sha
