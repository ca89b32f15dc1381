"""End to end: ``prefect.yaml`` on a real Prefect server, a process worker, the real pipeline.

Everything runs as separate processes, the way docs/orchestration.md sets it up:

- a copy of this checkout (tracked and untracked-but-not-ignored files, so uncommitted
  work is tested too) made into a fresh git repository, its DVC remote pointed at a
  temporary directory (``config.local``) so nothing is ever written to the real remote;
- ``prefect server start`` on a free loopback port, with its own ``PREFECT_HOME``
  (SQLite) and the scheduler service off, so the nightly cron cannot start a
  default-profile run in the middle of the test;
- ``prefect work-pool create``, ``prefect deploy --all --no-prompt`` from the copy,
  ``prefect worker start --pool mnist-process`` and ``prefect deployment run``.

Two runs of ``training-pipeline/manual-train`` with the quick profile: one that completes
(artifacts published, production model promoted, ``dvc status`` clean, nothing pushed),
then one with an impossible gate floor that must fail with the gate's reasons and leave
the production model and ``params.yaml`` byte-identical.

Server, worker and every process they started (flow runs, DVC, stages) are stopped in
the fixtures' teardown with bounded waits, whatever the test's outcome. On failure, the
messages carry the flow run's state, its last log lines and the worker and server logs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

ROOT = Path(__file__).resolve().parents[2]
SHARED_MNIST = (ROOT.parent / "shared" / "mnist").resolve()
BIN = Path(sys.executable).parent
PREFECT = [sys.executable, "-m", "prefect"]
DVC = [sys.executable, "-m", "dvc"]

POOL = "mnist-process"
FLOW = "training-pipeline"
MANUAL = f"{FLOW}/manual-train"
NIGHTLY = f"{FLOW}/nightly-retrain"
REPORT_KEY = "training-report"
PER_CLASS_KEY = "per-class-metrics"

SERVER_START_TIMEOUT_S = 240
COMMAND_TIMEOUT_S = 300
FIRST_RUN_TIMEOUT_S = 900  # ingest + validate + quick training + evaluate/export/gate, shared CPU
SECOND_RUN_TIMEOUT_S = 600
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

GIT_ENV = {
    "GIT_AUTHOR_NAME": "test",
    "GIT_AUTHOR_EMAIL": "test@localhost",
    "GIT_COMMITTER_NAME": "test",
    "GIT_COMMITTER_EMAIL": "test@localhost",
}


# --- processes ---------------------------------------------------------------------------


def tail(path: Path, lines: int = 60) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def run(
    argv: list[str], cwd: Path, env: Mapping[str, str], timeout: float = COMMAND_TIMEOUT_S
) -> str:
    """Run a command to completion; fail the test with its output if it fails."""
    try:
        proc = subprocess.run(
            argv,
            cwd=cwd,
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as err:
        raise AssertionError(
            f"{argv} timed out after {timeout} s:\n{err.stdout!r}\n{err.stderr!r}"
        ) from None
    if proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


@dataclass
class Background:
    """A long-running command (server, worker), its output in ``log``."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls, name: str, argv: list[str], cwd: Path, env: Mapping[str, str], log: Path
    ) -> Background:
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                cwd=cwd,
                env=dict(env),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches pytest only
            )
        return cls(name, popen, log)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGINT (a worker's graceful stop), then SIGKILL; then every process it started.

        Flow runs are started in sessions of their own and DVC and the stages under them,
        so the tree is collected first: none of them may outlive the test.
        """
        try:
            tree = psutil.Process(self.popen.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        if self.alive():
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(30)
        for proc in tree:
            try:
                proc.terminate()
            except psutil.Error:
                continue
        _, left = psutil.wait_procs(tree, timeout=10)
        for proc in left:
            try:
                proc.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(left, timeout=10)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def base_env(prefect_home: Path) -> dict[str, str]:
    """This environment without any PREFECT_* or pipeline setting, plus test settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PREFECT_") and k not in ("MNIST_PIPELINE_DIR", "MNIST_SOURCE")
    }
    env.update(GIT_ENV)
    env.update(
        PATH=str(BIN) + os.pathsep + env.get("PATH", ""),
        PYTHONUNBUFFERED="1",
        DVC_NO_ANALYTICS="1",
        PREFECT_HOME=str(prefect_home),
        PREFECT_CLI_PROMPT="false",
        PREFECT_CLI_COLORS="false",
        PREFECT_CLI_WRAP_LINES="false",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    return env


# --- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def mnist_source() -> Path:
    source = Path(os.environ.get("MNIST_SOURCE") or SHARED_MNIST).resolve()
    if not (source / "train-images-idx3-ubyte.gz").is_file():
        pytest.fail(f"the MNIST files are needed in {source} (../shared/mnist or $MNIST_SOURCE)")
    return source


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the working tree as a fresh git + DVC repository, remote in tmp."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    dest = tmp_path / "repo"
    for rel in sorted(set(filter(None, files.split("\0")))):
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree, or a directory entry
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
    assert (dest / "prefect.yaml").is_file() and (dest / "dvc.yaml").is_file()
    env = {**os.environ, **GIT_ENV}
    run(["git", "init", "-q"], dest, env)
    run(["git", "add", "-A"], dest, env)
    run(["git", "-c", "commit.gpgsign=false", "commit", "-q", "-m", "snapshot"], dest, env)
    remote = tmp_path / "dvc-remote"
    remote.mkdir()
    run([*DVC, "remote", "modify", "--local", "local", "url", str(remote)], dest, env)
    shown = run([*DVC, "remote", "list"], dest, env)
    assert str(remote) in shown, f"the copy's DVC remote is not the temporary one:\n{shown}"
    return dest


@dataclass
class Server:
    api_url: str
    process: Background
    env: dict[str, str]  # for clients: PREFECT_HOME and PREFECT_API_URL set

    def get(self, path: str) -> Any:
        response = httpx.get(self.api_url + path, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        response = httpx.post(self.api_url + path, json=dict(body), timeout=30)
        response.raise_for_status()
        return response.json()


@pytest.fixture
def prefect_server(tmp_path: Path) -> Iterator[Server]:
    """``prefect server start`` (SQLite in a temporary PREFECT_HOME), stopped at teardown."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = base_env(home)
    server_env = {
        **env,
        "PREFECT_SERVER_UI_ENABLED": "false",
        # No scheduled runs: a nightly run must not start (default profile) during the test.
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
    }
    process = Background.start(
        "server",
        [*PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        tmp_path,
        server_env,
        tmp_path / "server.log",
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            if not process.alive():
                pytest.fail(
                    f"prefect server exited ({process.popen.returncode}):\n{tail(process.log)}"
                )
            try:
                if httpx.get(f"{api_url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"prefect server not healthy after {SERVER_START_TIMEOUT_S} s:\n"
                    + tail(process.log)
                )
            time.sleep(1)
        yield Server(api_url, process, {**env, "PREFECT_API_URL": api_url})
    finally:
        process.stop()


# --- flow runs ---------------------------------------------------------------------------


def trigger(server: Server, cwd: Path, *params: str) -> str:
    """``prefect deployment run`` the manual deployment; returns the flow run id."""
    argv = [*PREFECT, "deployment", "run", MANUAL]
    for param in params:
        argv += ["--param", param]
    out = run(argv, cwd, server.env)
    match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
    assert match, f"no flow run id in the output of {argv}:\n{out}"
    return match.group(1)


def diagnostics(server: Server, worker: Background, run_id: str) -> str:
    """State, last log lines of the flow run, and the worker's and server's log tails."""
    parts = []
    try:
        flow_run = server.get(f"/flow_runs/{run_id}")
        state = flow_run.get("state") or {}
        parts.append(f"flow run {run_id}: {state.get('type')} {state.get('message')!r}")
        logs = server.post(
            "/logs/filter",
            {"logs": {"flow_run_id": {"any_": [run_id]}}, "sort": "TIMESTAMP_DESC", "limit": 80},
        )
        parts.append("flow run logs (last 80):")
        parts.extend(entry["message"] for entry in reversed(logs))
    except httpx.HTTPError as err:
        parts.append(f"(could not read the flow run from the server: {err})")
    parts.append(
        f"--- worker log ({'running' if worker.alive() else 'exited'}):\n{tail(worker.log)}"
    )
    parts.append(f"--- server log:\n{tail(server.process.log, 30)}")
    return "\n".join(parts)


def wait_final(server: Server, worker: Background, run_id: str, timeout_s: float) -> dict[str, Any]:
    """Poll the flow run until a final state; fail with diagnostics on timeout or dead worker."""
    deadline = time.monotonic() + timeout_s
    while True:
        flow_run: dict[str, Any] = server.get(f"/flow_runs/{run_id}")
        state_type = (flow_run.get("state") or {}).get("type")
        if state_type in FINAL_STATES:
            return flow_run
        if not worker.alive():
            pytest.fail(
                f"the worker exited while the run was {state_type}:\n"
                + diagnostics(server, worker, run_id)
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"flow run not finished after {timeout_s} s (state {state_type}):\n"
                + diagnostics(server, worker, run_id)
            )
        time.sleep(3)


def artifacts(server: Server, run_id: str) -> dict[str, dict[str, Any]]:
    """The flow run's artifacts by key."""
    found = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run_id]}}})
    return {a["key"]: a for a in found if a.get("key")}


def sha256_tree(directory: Path) -> dict[str, str]:
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def dvc_status(repo: Path, env: Mapping[str, str]) -> Any:
    out = run([*DVC, "status", "--json"], repo, env)
    lines = out.splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("{")]
    assert starts, f"dvc status --json printed no JSON:\n{out}"
    return json.loads("\n".join(lines[starts[-1] :]))


# --- the test's steps ---------------------------------------------------------------------


def deploy(project: Path, env: Mapping[str, str]) -> None:
    """docs/orchestration.md's setup: a process work pool, then every deployment of prefect.yaml."""
    run([*PREFECT, "work-pool", "create", POOL, "--type", "process"], project, env)
    run([*PREFECT, "deploy", "--all", "--no-prompt"], project, env)


def check_deployments(server: Server, project: Path) -> None:
    """Both deployments: entrypoint, pool, concurrency limit, pull step; the nightly cron."""
    manual = server.get(f"/deployments/name/{MANUAL}")
    nightly = server.get(f"/deployments/name/{NIGHTLY}")
    for deployment in (manual, nightly):
        assert deployment["entrypoint"] == "flows/training.py:training_pipeline"
        assert deployment["work_pool_name"] == POOL
        assert deployment["global_concurrency_limit"]["limit"] == 1, deployment
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(project)}}
        ], deployment["pull_steps"]
    assert manual["schedules"] == []
    assert nightly["parameters"] == {"profile": "default"}
    [schedule] = [s["schedule"] for s in nightly["schedules"]]
    assert (schedule["cron"], schedule["timezone"]) == ("0 2 * * *", "Europe/Berlin")


def start_worker(env: Mapping[str, str], mnist_source: Path, tmp_path: Path) -> Background:
    """``prefect worker start`` on the pool, one run at a time, log in ``worker.log``."""
    worker_env = {**env, "MNIST_SOURCE": str(mnist_source), "PREFECT_WORKER_QUERY_SECONDS": "2"}
    return Background.start(
        "worker",
        [*PREFECT, "worker", "start", "--pool", POOL, "--limit", "1"],
        tmp_path,  # not the checkout: the deployment's pull step must get the run there
        worker_env,
        tmp_path / "worker.log",
    )


def check_run_reports(server: Server, run_id: str, project: Path, why: str) -> None:
    """The run published the markdown report and the per-class table."""
    found = artifacts(server, run_id)
    assert REPORT_KEY in found and PER_CLASS_KEY in found, f"artifacts: {sorted(found)}\n{why}"
    assert found[REPORT_KEY]["type"] == "markdown"
    assert found[PER_CLASS_KEY]["type"] == "table"
    report = found[REPORT_KEY]["data"]
    assert "Training pipeline run: Completed" in report and str(project) in report, report
    assert "quick" in report, report


def check_promoted_clean_unpushed(
    project: Path, env: Mapping[str, str], tmp_path: Path, why: str
) -> None:
    """A production model is in place, ``dvc status`` is clean, the DVC remote untouched."""
    production = project / "models" / "production"
    assert (production / "model.onnx").is_file(), why
    status = dvc_status(project, env)
    assert status == {}, f"dvc status is not clean after the run: {status}"
    assert not any((tmp_path / "dvc-remote").iterdir()), "push=false, yet the remote was written"


def check_quick_run_completes(
    server: Server, worker: Background, project: Path, env: Mapping[str, str], tmp_path: Path
) -> None:
    """Quick profile, no push: completes, reports, promotes; DVC agrees."""
    run_id = trigger(server, project, "profile=quick", "push=false")
    flow_run = wait_final(server, worker, run_id, FIRST_RUN_TIMEOUT_S)
    why = diagnostics(server, worker, run_id)
    assert flow_run["state"]["type"] == "COMPLETED", why
    assert flow_run["parameters"] == {"profile": "quick", "push": False}, why
    check_run_reports(server, run_id, project, why)
    check_promoted_clean_unpushed(project, env, tmp_path, why)


def check_impossible_gate_rejects(server: Server, worker: Background, project: Path) -> None:
    """An impossible floor: the gate rejects, the run fails with the gate's reasons,
    and neither the production model nor params.yaml changes."""
    production = project / "models" / "production"
    before = sha256_tree(production)
    params_before = (project / "params.yaml").read_bytes()
    run_id = trigger(
        server, project, "profile=quick", 'params={"gate.min_accuracy": 0.9999}', "push=false"
    )
    flow_run = wait_final(server, worker, run_id, SECOND_RUN_TIMEOUT_S)
    why = diagnostics(server, worker, run_id)
    state = flow_run["state"]
    assert state["type"] == "FAILED", why
    message = state.get("message") or ""
    assert "gate rejected" in message and "floor 0.9999" in message, why
    assert sha256_tree(production) == before, "a rejected candidate changed models/production"
    assert (project / "params.yaml").read_bytes() == params_before, "params.yaml not restored"
    failed_report = artifacts(server, run_id).get(REPORT_KEY)
    assert failed_report is not None, why
    assert "Training pipeline run: Rejected" in failed_report["data"], failed_report["data"]
    assert state["name"] == "Rejected", why


# --- the test ----------------------------------------------------------------------------


def test_deployments_run_the_pipeline_through_a_worker(
    project: Path, prefect_server: Server, mnist_source: Path, tmp_path: Path
) -> None:
    server = prefect_server
    env = {**server.env, "MNIST_PIPELINE_DIR": str(project)}
    real_params = (ROOT / "params.yaml").read_bytes()

    deploy(project, env)
    check_deployments(server, project)
    worker = start_worker(env, mnist_source, tmp_path)
    try:
        # 1. Quick profile, no push: completes, reports, promotes; DVC agrees.
        check_quick_run_completes(server, worker, project, env, tmp_path)
        # 2. An impossible floor: the gate rejects, the run fails with the gate's reasons,
        # and neither the production model nor params.yaml changes.
        check_impossible_gate_rejects(server, worker, project)
    finally:
        worker.stop()

    assert (ROOT / "params.yaml").read_bytes() == real_params, "the real checkout was modified"
