"""Fault injection for the crash tests: SIGKILL the process at its k-th filesystem step.

Installed in the process under test only (a forked child, or this file run as a
wrapper around the real CLI); the library has no hook for it. It wraps the calls
through which the pipeline changes files -- ``os.rename``, ``os.replace``,
``os.unlink``, ``os.rmdir`` (so also every deletion inside ``shutil.rmtree``),
:func:`pipeline.core.dirswap.exchange_dirs` (``renameat2``), ``shutil.copyfile``,
``Path.write_bytes`` and ``Path.write_text`` (the atomic writers write their temp file
with it) -- each call being one *kill point*. Each point is appended to a log as it is
reached, before it runs; at point ``kill_at`` the process kills itself with SIGKILL
instead of running it (no cleanup, no ``finally``: as ``kill -9`` or a power cut of
the process would).

Wrapper usage (the real CLI in a subprocess)::

    python tests/helpers/fault_inject.py --log ops.txt --kill-at 3 [--match TEXT] -- STAGE ARGS...

``--match``: only points whose name contains TEXT count (e.g. ``-> checkpoints/last.pt``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Random parts of staging and temp names, so that runs give comparable names.
_RANDOM = re.compile(r"(\.|aside-)[A-Za-z0-9_]{8}\.tmp")


def _short(path: Any) -> str:
    p = Path(os.fsdecode(path))
    # Inside shutil.rmtree the path is a bare name relative to a directory descriptor.
    name = f"{p.parent.name}/{p.name}" if p.parent.name else p.name
    return _RANDOM.sub(r"\1*.tmp", name)


def install(log: Path, kill_at: int | None, match: str = "") -> None:
    """Wrap the file-changing calls of this process; kill it at counted point ``kill_at``."""
    import pipeline.core.dirswap as dirswap

    count = 0
    out = open(log, "a", buffering=1)  # noqa: SIM115 - open until the process ends

    def point(name: str) -> None:
        nonlocal count
        if match not in name:
            return
        count += 1
        out.write(name + "\n")
        out.flush()
        if kill_at is not None and count == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def two(label: str, fn: Callable[..., Any], sep: str) -> Callable[..., Any]:
        def wrapper(a: Any, b: Any, *args: Any, **kwargs: Any) -> Any:
            point(f"{label}({_short(a)} {sep} {_short(b)})")
            return fn(a, b, *args, **kwargs)

        return wrapper

    def one(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(path: Any, *args: Any, **kwargs: Any) -> Any:
            point(f"{label}({_short(path)})")
            return fn(path, *args, **kwargs)

        return wrapper

    def method(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(self: Path, *args: Any, **kwargs: Any) -> Any:
            point(f"{label}({_short(self)})")
            return fn(self, *args, **kwargs)

        return wrapper

    os.rename = two("rename", os.rename, "->")
    os.replace = two("replace", os.replace, "->")
    os.unlink = one("unlink", os.unlink)
    os.remove = os.unlink
    os.rmdir = one("rmdir", os.rmdir)
    dirswap.exchange_dirs = two("exchange", dirswap.exchange_dirs, "<->")
    shutil.copyfile = two("copy", shutil.copyfile, "->")
    Path.write_bytes = method("write", Path.write_bytes)  # type: ignore[method-assign]
    Path.write_text = method("write", Path.write_text)  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log", type=Path, required=True)
    parser.add_argument("--kill-at", type=int)
    parser.add_argument("--match", default="")
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    install(args.log, args.kill_at, args.match)
    from pipeline.cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
