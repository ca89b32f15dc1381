"""The model registry: promote a gated candidate to production, or roll back.

Layout (paths from ``cfg.registry``)::

    models/production/   model.onnx, model_card.json, model_card.md   <- served
    models/previous/     the production directory before the last promote/rollback

``promote`` installs exactly the bytes the gate accepted: ``reports/gate.json`` must
say ``passed`` and name the sha256 of the current candidate ``model.onnx``; the copy
is hashed again before it goes live. The new directory is built beside
``production_dir`` and swapped in with one ``renameat2(RENAME_EXCHANGE)`` on Linux, so
a serving process watching ``production_dir/model.onnx`` sees either the complete old
or the complete new directory, never a missing file. Where the exchange is not
supported the fallback is :func:`pipeline.atomic.replace_dir` (two renames).
``rollback`` exchanges ``previous_dir`` and ``production_dir`` the same way, so a
second rollback undoes the first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_dir, replace_dir, sha256_file, write_json, write_text
from pipeline.config import Config
from pipeline.contract import MODEL_CARD_JSON as CARD_JSON
from pipeline.contract import MODEL_CARD_MD as CARD_MD
from pipeline.contract import MODEL_FILE
from pipeline.errors import PromotionError
from pipeline.json_io import read_json

log = logging.getLogger("pipeline.registry")

PLACEHOLDER = "NO_PREVIOUS_MODEL.txt"

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _renameat2() -> Any | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        fn.restype = ctypes.c_int
    return fn


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``RENAME_EXCHANGE``).

    Returns False (nothing changed) where the kernel, libc or filesystem lacks it.
    """
    fn = _renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"renameat2({a}, {b}, RENAME_EXCHANGE): {os.strerror(err)}")


def swap_in(new: Path, dest: Path) -> Path | None:
    """Make directory ``new`` be ``dest``; return where the old ``dest`` went (or None).

    The old directory is left at the returned temporary path (a sibling of ``dest``)
    for the caller to keep or delete.
    """
    if not dest.exists():
        os.replace(new, dest)
        return None
    if exchange_dirs(new, dest):
        return new  # ``new`` now names the old directory
    aside = dest.with_name(f".{dest.name}.aside.{os.getpid()}")
    if aside.exists():
        shutil.rmtree(aside)
    shutil.copytree(dest, aside)
    replace_dir(new, dest)
    return aside


@contextmanager
def _staging_dir(dest: Path) -> Iterator[Path]:
    """An empty directory beside ``dest`` (same filesystem, so renames are atomic)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    os.chmod(tmp, 0o755)
    try:
        yield tmp
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path, "report") if Path(path).is_file() else {}


def check_gate(report_path: Path, candidate: Path) -> dict[str, Any]:
    """The gate report, if it passed *this* candidate; else :class:`PromotionError`."""
    report = read_json(report_path, "gate report", "run the gate stage first")
    if report.get("passed") is not True:
        reasons = "; ".join(report.get("reasons", [])) or "no reasons recorded"
        raise PromotionError(f"{report_path}: the gate did not pass ({reasons})")
    if not candidate.is_file():
        raise PromotionError(f"{candidate}: candidate ONNX missing")
    sha = sha256_file(candidate)
    if report.get("candidate_sha256") != sha:
        raise PromotionError(
            f"{candidate} (sha256 {sha[:12]}) is not the model the gate passed "
            f"({str(report.get('candidate_sha256'))[:12]}); re-run the gate"
        )
    return report


def build_card(
    onnx_path: Path, gate: dict[str, Any], evaluation: dict[str, Any], parity: dict[str, Any]
) -> dict[str, Any]:
    """The model card: provenance from the ONNX metadata, figures from the reports."""
    from pipeline.export import read_metadata

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
        "input_contract": meta.get("input_contract"),
        "output_contract": meta.get("output_contract"),
        "libraries": {
            k: meta.get(k) for k in ("torch_version", "onnx_version", "onnxruntime_version")
        },
    }


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


def _placeholder(prev: Path) -> None:
    """An empty ``previous_dir`` after the first promotion.

    dvc.yaml declares it as an output of the promote stage, and DVC fails a stage
    whose declared output is missing; rollback still refuses (no model.onnx in it).
    """
    with atomic_dir(prev) as tmp:
        write_text(tmp / PLACEHOLDER, "No previous production model yet (first promotion).\n")


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
    if current.is_file() and sha256_file(current) == gate["candidate_sha256"]:
        log.info("promote: %s is already the production model", candidate)
        return _optional_json(prod / CARD_JSON)
    with _staging_dir(prod) as staging:
        staged = staging / MODEL_FILE
        shutil.copyfile(candidate, staged)
        with open(staged, "rb+") as fh:
            os.fsync(fh.fileno())
        if sha256_file(staged) != gate["candidate_sha256"]:
            raise PromotionError(f"{candidate} changed while being promoted; re-run the gate")
        card = build_card(
            staged,
            gate,
            _optional_json(cfg.evaluate.metrics_path),
            _optional_json(cfg.export.parity_path),
        )
        write_json(staging / CARD_JSON, card)
        write_text(staging / CARD_MD, card_markdown(card))
        old = swap_in(staging, prod)
        if old is not None:
            replace_dir(old, prev)
        elif not prev.exists():
            _placeholder(prev)
    log.info("promote: %s is now in production (%s)", card["version"], prod)
    return card


def rollback(cfg: Config) -> str:
    """Exchange ``previous_dir`` and ``production_dir``; return the restored sha256."""
    prod = Path(cfg.registry.production_dir)
    prev = Path(cfg.registry.previous_dir)
    if not (prev / MODEL_FILE).is_file():
        raise PromotionError(f"{prev / MODEL_FILE}: no previous model to roll back to")
    sha = sha256_file(prev / MODEL_FILE)
    if not prod.exists():
        os.replace(prev, prod)
    elif not exchange_dirs(prev, prod):
        # No atomic exchange here: move production to a side name, then swap in.
        staging = prod.with_name(f".{prod.name}.rollback.{os.getpid()}")
        if staging.exists():
            shutil.rmtree(staging)
        shutil.copytree(prev, staging)
        old = swap_in(staging, prod)
        if old is not None:
            replace_dir(old, prev)
    log.info("rollback: production is now %s", sha[:12])
    return sha
