"""git and DVC command lines, run with a timeout and turned into named errors.

The registry talks to the real ``git`` and ``dvc`` (this interpreter's ``python -m dvc``)
so that what it does is exactly what a person would type. Output is captured; a
failure raises :class:`pipeline.errors.RegistryError` carrying the command's last lines.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import RegistryError


@dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def why(self, lines: int = 6) -> str:
        text = (self.stderr.strip() or self.stdout.strip()).splitlines()
        return " | ".join(line.strip() for line in text[-lines:]) or f"exit {self.returncode}"


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    # Never wait for a password or a host-key prompt: a missing credential is an error.
    env.setdefault("GIT_TERMINAL_PROMPT", "0")
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.update(extra or {})
    return env


def run(
    argv: Sequence[str],
    cwd: Path | None,
    timeout_s: float,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run ``argv``; :class:`RegistryError` if it fails (``check``) or times out."""
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            env=_env(env),
        )
    except subprocess.TimeoutExpired as err:
        raise RegistryError(f"`{' '.join(argv)}` timed out after {timeout_s:g} s") from err
    except FileNotFoundError as err:
        raise RegistryError(f"`{argv[0]}` is not installed: {err}") from err
    result = Result(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
    if check and not result.ok:
        raise RegistryError(f"`{' '.join(argv)}` failed: {result.why()}")
    return result


def git(repo: Path | None, *args: str, timeout_s: float = 60.0, check: bool = True) -> Result:
    return run(["git", *args], repo, timeout_s, check)


def dvc(repo: Path | None, *args: str, timeout_s: float = 600.0, check: bool = True) -> Result:
    return run([sys.executable, "-m", "dvc", *args], repo, timeout_s, check)
