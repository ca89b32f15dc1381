"""pipeline/release/vcs.py: the command environment and the line-streaming runner."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from pipeline.core.errors import RegistryError
from pipeline.release.vcs import command_env, dvc_argv, run, stream_command


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_stream_command_passes_lines_in_order_as_they_arrive(tmp_path: Path) -> None:
    code = (
        "import sys, time\n"
        "print('one'); sys.stdout.flush()\n"
        "print('two on stderr', file=sys.stderr); sys.stderr.flush()\n"
        "time.sleep(1.0)\n"
        "sys.stdout.write('progress 1\\rprogress 2\\n'); sys.stdout.flush()\n"
        "sys.exit(3)\n"
    )
    seen: list[tuple[float, str]] = []
    start = time.monotonic()
    result = stream_command(_py(code), tmp_path, lambda line: seen.append((time.monotonic(), line)))
    assert [line for _, line in seen] == ["one", "two on stderr", "progress 1", "progress 2"]
    assert result.returncode == 3 and not result.ok
    assert result.tail == ("one", "two on stderr", "progress 1", "progress 2")
    # Streamed, not collected at exit: the first line came before the one-second sleep ended.
    assert seen[0][0] - start < seen[-1][0] - start - 0.5


def test_stream_command_kills_the_child_when_the_sink_fails(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    code = (
        "import os, sys, time\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "print('first', flush=True)\n"
        "time.sleep(60)\n"
    )

    def sink(line: str) -> None:
        raise RuntimeError("logger broke")

    with pytest.raises(RuntimeError, match="logger broke"):
        stream_command(_py(code), tmp_path, sink)
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_command_env_puts_this_interpreter_first() -> None:
    env = command_env({"PATH": "/usr/bin", "KEEP": "1"})
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin"]
    assert env["KEEP"] == "1" and env["PYTHONUNBUFFERED"] == "1"
    assert env["GIT_TERMINAL_PROMPT"] == "0"  # a missing credential fails, never prompts


def test_dvc_argv_is_this_interpreters_dvc() -> None:
    assert dvc_argv("status", "-q") == [sys.executable, "-m", "dvc", "status", "-q"]


def test_run_names_the_failing_command_and_its_last_lines(tmp_path: Path) -> None:
    code = "import sys; print('out'); print('the reason', file=sys.stderr); sys.exit(2)"
    with pytest.raises(RegistryError, match=r"failed: the reason$"):
        run(_py(code), tmp_path, timeout_s=30)
    result = run(_py(code), tmp_path, timeout_s=30, check=False)
    assert result.returncode == 2 and result.stdout == "out\n" and not result.ok


def test_run_times_out_with_a_named_error(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="timed out after 0.5 s"):
        run(_py("import time; time.sleep(30)"), tmp_path, timeout_s=0.5)
