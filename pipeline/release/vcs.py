"""git and DVC command lines: the one way this project runs another program.

The registry and the flows talk to the real ``git`` and ``dvc`` (this interpreter's
``python -m dvc``) so that what they do is exactly what a person would type, in one
environment (:func:`command_env`). Two ways to run:

- :func:`run`: output captured, with a timeout; a failure raises
  :class:`pipeline.core.errors.RegistryError` carrying the command's last lines;
- :func:`stream_command`: each output line handed to a callback as it arrives (the flows
  pass the Prefect run logger), with the last lines kept for messages.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import RegistryError

LineSink = Callable[[str], None]

TAIL_LINES = 30


@dataclass(frozen=True)
class CommandResult:
    """A finished command: its argv, exit status and last output lines (for messages)."""

    argv: tuple[str, ...]
    returncode: int
    tail: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.returncode == 0


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


def command_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for git, DVC and the stages: this interpreter first on ``PATH``.

    ``PYTHONUNBUFFERED`` makes the stages' output arrive line by line, not at exit.
    """
    env = dict(os.environ if base is None else base)
    # Never wait for a password or a host-key prompt: a missing credential is an error.
    env.setdefault("GIT_TERMINAL_PROMPT", "0")
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes")
    bin_dir = str(Path(sys.executable).parent)
    path = env.get("PATH", "")
    env["PATH"] = bin_dir + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def stream_command(
    argv: Sequence[str],
    cwd: Path,
    sink: LineSink,
    env: Mapping[str, str] | None = None,
) -> CommandResult:
    """Run ``argv`` in ``cwd``, pass each output line (no newline) to ``sink`` as it comes.

    stderr is merged into stdout so the lines keep their order. Carriage returns end a
    line too (progress bars). If anything interrupts the reading (an exception in
    ``sink``, a cancelled task), the child process is killed, never left running.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env) if env is not None else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,  # universal newlines: \r, \n and \r\n all end a line
        encoding="utf-8",
        errors="replace",
        bufsize=1,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if not line.strip():
                continue
            tail.append(line)
            sink(line)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    return CommandResult(tuple(argv), returncode, tuple(tail))


def dvc_argv(*args: str) -> list[str]:
    """``python -m dvc ARGS`` with this interpreter: the DVC installed beside the project."""
    return [sys.executable, "-m", "dvc", *args]


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
            env={**command_env(), **(env or {})},
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
    return run(dvc_argv(*args), repo, timeout_s, check)
