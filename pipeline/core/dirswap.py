"""Crash-consistent directory swaps: staging beside the destination, a journal, exchanges.

Used by ingest (``data/raw`` + ``data/prepared``), promote and rollback
(``models/production`` + ``models/previous``) and :func:`atomic_dir`.

A swap, under an exclusive ``flock`` on the destination's parent directory:

1. recovery: an interrupted earlier swap (its journal is still there) is finished, and
   orphaned staging directories of the destinations are deleted;
2. the new directories are built in staging directories beside their destinations
   (``.<name>.<random>.tmp``, same filesystem) and fsynced;
3. the journal ``.<anchor>.journal`` is written atomically: the identity
   (``st_dev``, ``st_ino``) of every path involved and the list of steps;
4. the steps run: ``exchange`` is one ``renameat2(RENAME_EXCHANGE)`` (the destination
   is the complete old or the complete new directory at every instant), ``move`` one
   rename onto an absent path;
5. the replaced directories (now under the staging names) are deleted, then the journal.

A kill at any point leaves either no journal (nothing changed but orphaned staging
directories, deleted on the next run) or a journal from which the next run rolls
*forward*: it simulates the steps from the recorded identities, finds the state the
paths are in, and performs the remaining steps. A swap of several directories is
therefore all-or-nothing once recovery has run; between two of its exchanges a kill
leaves each directory complete, the set mixed until the next run.

Where the filesystem lacks ``RENAME_EXCHANGE`` an exchange falls back to three renames
through an aside path (the destination is briefly absent); the journal covers those
intermediate states too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.atomic import UMASK, write_bytes
from pipeline.core.errors import SwapRecoveryError

log = logging.getLogger("pipeline.core.dirswap")

JOURNAL_FORMAT = "mnist-mlops/dirswap-v1"
_STAGING_SUFFIX = ".tmp"
# Side names that earlier versions of the atomic writes and of promote left behind.
_LEGACY_MARKERS = ("old", "aside", "rollback")

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2

Ident = tuple[int, int] | None  # (st_dev, st_ino) of a path, None when it is absent
State = dict[str, Ident]


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


def journal_path(anchor: Path) -> Path:
    """Where the journal of swaps anchored at ``anchor`` lives (beside it)."""
    anchor = Path(anchor)
    return anchor.with_name(f".{anchor.name}.journal")


def _ident(path: Path) -> Ident:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return (st.st_dev, st.st_ino)


def _as_ident(value: Any) -> Ident:
    """An identity read back from JSON (a list of two ints, or null)."""
    return None if value is None else (int(value[0]), int(value[1]))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (the data must precede the journal)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# -- locking -------------------------------------------------------------------------

_held: dict[str, tuple[int, int]] = {}  # parent dir -> (fd, depth): re-entrant per process


@contextlib.contextmanager
def locked(anchor: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``anchor``'s parent directory (created if absent).

    Serialises swaps and recoveries of one directory between processes (a concurrent
    recovery must not delete another process's staging directory); re-entrant within
    a process; released by the kernel if the process dies.
    """
    parent = Path(anchor).parent
    parent.mkdir(parents=True, exist_ok=True)
    key = str(parent.resolve())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        try:
            yield
        finally:
            fd, depth = _held[key]
            _held[key] = (fd, depth - 1)
        return
    fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held[key] = (fd, 1)
        try:
            yield
        finally:
            del _held[key]
    finally:
        os.close(fd)  # closing the last descriptor releases the flock


# -- the journal and its replay -------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    """A primitive: ``exchange`` a and b (aside: the fallback's side name) or ``rename``."""

    kind: str
    a: str
    b: str
    aside: str = ""


def _apply(state: State, op: _Op) -> State:
    """The identities after ``op`` (paths as journal keys)."""
    new = dict(state)
    if op.kind == "exchange":
        new[op.a], new[op.b] = state[op.b], state[op.a]
    else:
        new[op.b], new[op.a] = state[op.a], None
    return new


def _fallback(op: _Op) -> list[_Op]:
    """An exchange as three renames through ``aside``."""
    return [_Op("rename", op.b, op.aside), _Op("rename", op.a, op.b), _Op("rename", op.aside, op.a)]


def _plan(initial: State, steps: Sequence[_Op]) -> list[tuple[State, list[_Op]]]:
    """Every state a kill can leave, with the primitives that finish the swap from it."""
    plan: list[tuple[State, list[_Op]]] = []
    state = initial
    for i, op in enumerate(steps):
        later = list(steps[i + 1 :])
        plan.append((state, [op, *later]))
        if op.kind == "exchange":
            sub = state
            renames = _fallback(op)
            for j in range(2):
                sub = _apply(sub, renames[j])
                plan.append((sub, [*renames[j + 1 :], *later]))
        state = _apply(state, op)
    plan.append((state, []))
    return plan


def _current(base: Path, keys: Sequence[str]) -> State:
    return {key: _ident(base / key) for key in keys}


def _find(
    plan: list[tuple[State, list[_Op]]], now: State, cleanup: Sequence[str]
) -> list[_Op] | None:
    for state, remaining in plan:
        if state == now:
            return remaining
    # Killed while deleting the replaced directories: those may be partly or wholly gone.
    final = plan[-1][0]
    if all(now[k] == v or (k in cleanup and now[k] is None) for k, v in final.items()):
        return []
    return None


def _run(base: Path, op: _Op) -> None:
    a, b = base / op.a, base / op.b
    if op.kind == "rename":
        os.rename(a, b)
    elif not exchange_dirs(a, b):
        for sub in _fallback(op):
            os.rename(base / sub.a, base / sub.b)


def _finish(journal: Path, data: dict[str, Any]) -> None:
    """Perform the remaining steps of ``data`` from the state on disk; delete the journal."""
    base = journal.parent
    steps = [_Op(*s) for s in data["steps"]]
    initial: State = {k: _as_ident(v) for k, v in data["paths"].items()}
    cleanup: list[str] = data["cleanup"]
    remaining = _find(_plan(initial, steps), _current(base, list(initial)), cleanup)
    if remaining is None:
        now = {k: v is not None for k, v in _current(base, list(initial)).items()}
        raise SwapRecoveryError(
            f"{journal}: the directories are in no state this interrupted swap can leave "
            f"(present: {now}); restore them by hand (dvc checkout) and delete the journal"
        )
    for op in remaining:
        _run(base, op)
    for key in {op.a for op in steps} | {op.b for op in steps}:
        _fsync_dir((base / key).parent)
    for key in cleanup:
        _remove(base / key)
    journal.unlink()
    _fsync_dir(base)


def _orphans(dest: Path) -> list[Path]:
    """Staging and side directories of ``dest`` (this and earlier versions), journal temps."""
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    name = dest.name
    journal_tmp = f".{journal_path(dest).name}."
    found = []
    for entry in dest.parent.iterdir():
        n = entry.name
        if (
            n.startswith(f".{name}.")
            and (
                n.endswith(_STAGING_SUFFIX)
                or any(n.startswith(f".{name}.{m}.") for m in _LEGACY_MARKERS)
            )
        ) or (n.startswith(journal_tmp) and n.endswith(_STAGING_SUFFIX)):
            found.append(entry)
    return sorted(found)


def recover(anchor: Path, dests: Sequence[Path]) -> list[str]:
    """Finish an interrupted swap anchored at ``anchor``; delete orphans of ``dests``.

    Returns what was done (one line each; empty when there was nothing to do). Takes the
    lock. Raises :class:`SwapRecoveryError` when the journal is unreadable or the paths
    match no state of its swap.
    """
    done: list[str] = []
    with locked(anchor):
        journal = journal_path(anchor)
        if journal.exists():
            try:
                data = json.loads(journal.read_text())
                if data.get("format") != JOURNAL_FORMAT:
                    raise ValueError(f"format {data.get('format')!r}")
            except (ValueError, OSError) as err:
                raise SwapRecoveryError(f"{journal}: unreadable swap journal: {err}") from err
            _finish(journal, data)
            done.append(f"finished the interrupted swap of {', '.join(data['dests'])}")
        for dest in dests:
            for orphan in _orphans(Path(dest)):
                _remove(orphan)
                done.append(f"removed leftover {orphan}")
    for line in done:
        log.warning("recovery: %s", line)
    return done


# -- building and committing a swap ---------------------------------------------------


def staging_dir(dest: Path) -> Path:
    """Create an empty directory beside ``dest`` (same filesystem), ordinary mode."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    path = dest.with_name(f".{dest.name}.{secrets.token_hex(4)}{_STAGING_SUFFIX}")
    path.mkdir(mode=0o777 & ~UMASK)
    return path


@dataclass
class Swap:
    """Steps over paths beside ``anchor``, committed together with :meth:`commit`.

    Build the new directories with :meth:`stage`, declare the steps with
    :meth:`install` (staged -> destination), :meth:`exchange` or :meth:`move`, then
    :meth:`commit`. The caller holds :func:`locked` on ``anchor``.
    """

    anchor: Path
    staged: list[Path] = field(default_factory=list)
    steps: list[tuple[str, Path, Path]] = field(default_factory=list)
    committed: bool = False
    journaled: bool = False

    def stage(self, dest: Path) -> Path:
        path = staging_dir(dest)
        self.staged.append(path)
        return path

    def exchange(self, a: Path, b: Path) -> None:
        self.steps.append(("exchange", Path(a), Path(b)))

    def move(self, a: Path, b: Path) -> None:
        self.steps.append(("move", Path(a), Path(b)))

    def install(self, staged: Path, dest: Path) -> None:
        """``staged`` becomes ``dest``; the old ``dest`` (if any) ends up at ``staged``."""
        dest = Path(dest)
        if dest.exists() or dest.is_symlink():
            self.exchange(staged, dest)
        else:
            self.move(staged, dest)

    def abort(self) -> None:
        """Delete the staging directories (only before the journal exists)."""
        if not self.journaled:
            for path in self.staged:
                if path.exists():
                    shutil.rmtree(path)

    def commit(self) -> None:
        """Journal, run the steps, delete what they replaced (the staging names), unjournal."""
        journal = journal_path(self.anchor)
        base = journal.parent
        for path in self.staged:
            _fsync_tree(path)
        keys: dict[Path, str] = {}

        def key(path: Path) -> str:
            if path not in keys:
                keys[path] = os.path.relpath(path, base)
            return keys[path]

        steps: list[list[str]] = []
        for kind, a, b in self.steps:
            if kind == "exchange":
                aside = b.with_name(f".{b.name}.aside-{secrets.token_hex(4)}{_STAGING_SUFFIX}")
                steps.append(["exchange", key(a), key(b), key(aside)])
            else:
                steps.append(["rename", key(a), key(b)])
        paths = {k: _ident(p) for p, k in keys.items()}
        data = {
            "format": JOURNAL_FORMAT,
            "dests": sorted({s[2] for s in steps}),
            "paths": paths,
            "steps": steps,
            "cleanup": [key(p) for p in self.staged],
        }
        write_bytes(journal, (json.dumps(data, indent=1) + "\n").encode())
        self.journaled = True
        _finish(journal, data)
        self.committed = True


@contextlib.contextmanager
def swapping(anchor: Path, dests: Sequence[Path]) -> Iterator[Swap]:
    """Lock, recover, and yield a :class:`Swap` to fill and commit.

    On an exception before the journal is written the staging directories (and parent
    directories this created, if still empty) are removed: the destinations are untouched.
    """
    parents = {Path(d).parent for d in dests}
    missing = [p for p in parents if not p.exists()]
    with locked(anchor):
        recover(anchor, dests)
        swap = Swap(Path(anchor))
        try:
            yield swap
        except BaseException:
            swap.abort()
            for parent in missing:
                with contextlib.suppress(OSError):
                    parent.rmdir()  # only if still empty
            raise


@contextlib.contextmanager
def replacing(dests: Sequence[Path]) -> Iterator[list[Path]]:
    """Yield an empty staging directory per destination; install them all on success.

    All destinations must share a parent (one lock, one journal). Afterwards every
    destination is its new directory and the old ones are deleted; on an exception
    nothing under the destinations changed.
    """
    dests = [Path(d) for d in dests]
    with swapping(dests[0], dests) as swap:
        staged = [swap.stage(d) for d in dests]
        yield staged
        for path, dest in zip(staged, dests, strict=True):
            swap.install(path, dest)
        swap.commit()


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside ``dest``; swap it in on success.

    One journalled ``renameat2(RENAME_EXCHANGE)``: at every moment ``dest`` is the
    complete old or the complete new directory, and a kill leaves nothing the next swap
    does not clean up. On an exception the temporary directory is removed and ``dest``
    is untouched.
    """
    with replacing([Path(dest)]) as (tmp,):
        yield tmp
