"""``serve --follow <git-url>``: serve whatever version the registry has in a stage.

A service machine needs no pipeline checkout: only the git URL of the project (where GTO
keeps its tags) and access to the DVC remote (``--dvc-remote-url`` or a DVC config file,
DVC's normal ``--config``). Every ``interval_s`` the follower

1. lists the remote's tags (``git ls-remote --tags``, no clone) and resolves the version
   assigned to the stage with GTO's tag format (:mod:`pipeline.release.tags`);
2. when that version differs from the installed one, fetches the version's production
   directory (``model.onnx`` + ``model_card.json``) with ``dvc get --rev <tag>`` into a
   temporary directory, checks the model's sha256 against its model card and loads it
   with onnxruntime (contract included);
3. installs the directory with the registry's directory swap
   (:func:`pipeline.core.dirswap.replacing`) at ``model_dir/current``, which the server's
   :class:`~pipeline.serving.model_store.ModelStore` watches and hot-swaps from.

Nothing here raises into the server: an unreachable git remote, an unreachable DVC
remote or a bad file leaves the installed model serving and sets :attr:`FollowState.error`
(shown by ``/readyz`` and ``/v1/model``). A version whose file failed verification is not
fetched again; a fetch that failed for a network reason is retried at the next poll.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.core.atomic import write_json
from pipeline.core.config import Config
from pipeline.core.contract import MODEL_FILE
from pipeline.core.errors import ModelFileError, RegistryError
from pipeline.handoff.onnx_runtime import Device
from pipeline.release.tags import (
    StageAssignment,
    parse_ls_remote,
    parse_tags,
    registration_tag,
    stage_assignment,
)
from pipeline.release.vcs import run
from pipeline.release.verdict import checked_card

log = logging.getLogger("pipeline.serving.follower")

INSTALLED = "current"
REGISTRY_JSON = "registry.json"


@dataclass
class FollowState:
    """What the follower knows; JSON-ready via :meth:`RegistryFollower.status`."""

    version: str | None = None
    commit: str | None = None
    sha256: str | None = None
    installed_at: float | None = None
    wanted: str | None = None  # the version the registry has in the stage
    last_check: float | None = None
    last_success: float | None = None
    error: str | None = None
    checks: int = 0
    switches: int = 0
    rejected: dict[str, str] = field(default_factory=dict)  # "version@commit" -> why


class RegistryFollower:
    """Polls a git URL for the stage's version and installs it under ``model_dir``."""

    def __init__(
        self,
        git_url: str,
        artifact: str,
        stage: str,
        model_dir: Path,
        production_dir: Path = Path("models/production"),
        dvc_remote_url: str | None = None,
        dvc_config: Path | None = None,
        interval_s: float = 10.0,
        timeout_s: float = 120.0,
        device: Device = "auto",
        intra_op_threads: int = 1,
    ) -> None:
        self.git_url = git_url
        self.artifact = artifact
        self.stage = stage
        self.model_dir = Path(model_dir).resolve()
        self.production_dir = Path(production_dir)
        self.dvc_remote_url = dvc_remote_url
        self.dvc_config = dvc_config
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.device: Device = device
        self.intra_op_threads = intra_op_threads
        self.state = FollowState()
        self._lock = threading.Lock()
        self._versions: dict[str, str] = {}  # model sha256 -> registry version
        self._adopt_installed()

    @property
    def model_path(self) -> Path:
        """The file the :class:`ModelStore` watches."""
        return self.model_dir / INSTALLED / MODEL_FILE

    def version_of(self, sha256: str) -> str | None:
        """The registry version of a served model (by its sha256), if it came from here."""
        return self._versions.get(sha256)

    def status(self) -> dict[str, Any]:
        state = asdict(self.state)
        return {
            "git_url": self.git_url,
            "artifact": self.artifact,
            "stage": self.stage,
            "interval_s": self.interval_s,
            **state,
        }

    def _adopt_installed(self) -> None:
        """After a restart, the installed version keeps serving (and naming itself)."""
        info_path = self.model_dir / INSTALLED / REGISTRY_JSON
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            return
        if info.get("git_url") != self.git_url or info.get("artifact") != self.artifact:
            return
        self.state.version = info.get("version")
        self.state.commit = info.get("commit")
        self.state.sha256 = info.get("sha256")
        if self.state.sha256 and self.state.version:
            self._versions[self.state.sha256] = self.state.version

    # --- one poll ----------------------------------------------------------------------

    def resolve(self) -> StageAssignment:
        """The version in the stage, from ``git ls-remote``; :class:`RegistryError` if none."""
        result = run(
            ["git", "ls-remote", "--tags", self.git_url], None, self.timeout_s, check=False
        )
        if not result.ok:
            raise RegistryError(f"git remote {self.git_url} unreachable: {result.why(2)}")
        tags = parse_tags(self.artifact, parse_ls_remote(result.stdout))
        found = stage_assignment(tags, self.stage)
        if found is None:
            raise RegistryError(
                f"no version of {self.artifact} is in stage {self.stage!r} at {self.git_url}"
            )
        return found

    def _fetch(self, wanted: StageAssignment, dest: Path) -> None:
        argv = [
            sys.executable,
            "-m",
            "dvc",
            "get",
            self.git_url,
            str(self.production_dir),
            "--rev",
            registration_tag(self.artifact, wanted.version),
            "-o",
            str(dest),
        ]
        if self.dvc_remote_url:
            argv += ["--remote-config", f"url={self.dvc_remote_url}"]
        if self.dvc_config:
            argv += ["--config", str(self.dvc_config)]
        result = run(argv, None, self.timeout_s * 5, check=False)
        if not result.ok:
            raise RegistryError(
                f"cannot fetch {wanted.version} through DVC: {result.why(2)} (is the DVC "
                "remote reachable? set it with --dvc-remote-url or --dvc-config)"
            )

    def _verify(self, wanted: StageAssignment, directory: Path) -> str:
        """sha256 against the model card, then a full onnxruntime load (contract checked)."""
        from pipeline.serving.model_store import load_model

        try:
            sha = str(checked_card(directory)["sha256"])
        except ModelFileError as err:
            raise ModelFileError(f"{wanted.version}: {err}") from err
        load_model(directory / MODEL_FILE, self.device, self.intra_op_threads)
        return sha

    def poll(self) -> bool:
        """One check; True when a new version was installed. Never raises."""
        with self._lock:
            self.state.last_check = time.time()
            self.state.checks += 1
            try:
                return self._poll()
            except (RegistryError, ModelFileError, OSError) as err:
                if str(err) != self.state.error:  # once per new reason, not every poll
                    log.warning("registry: %s (still serving %s)", err, self.state.version)
                self.state.error = str(err)
                return False

    def _poll(self) -> bool:
        wanted = self.resolve()
        self.state.wanted = wanted.version
        key = f"{wanted.version}@{wanted.commit}"
        if wanted.version == self.state.version and wanted.commit == self.state.commit:
            self.state.error = None
            self.state.last_success = time.time()
            return False
        if key in self.state.rejected:
            self.state.error = f"{wanted.version} rejected: {self.state.rejected[key]}"
            return False
        self.model_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".fetch.", dir=self.model_dir))
        try:
            target = staging / "dir"
            self._fetch(wanted, target)
            try:
                sha = self._verify(wanted, target)
            except ModelFileError as err:
                self.state.rejected[key] = str(err)
                raise
            write_json(
                target / REGISTRY_JSON,
                {
                    "git_url": self.git_url,
                    "artifact": self.artifact,
                    "stage": self.stage,
                    "version": wanted.version,
                    "commit": wanted.commit,
                    "tag": wanted.tag,
                    "sha256": sha,
                    "fetched_at": time.time(),
                },
            )
            self._install(target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._versions[sha] = wanted.version
        previous = self.state.version
        self.state.version, self.state.commit, self.state.sha256 = (
            wanted.version,
            wanted.commit,
            sha,
        )
        self.state.installed_at = self.state.last_success = time.time()
        self.state.error = None
        self.state.switches += 1
        log.info(
            "registry: %s %s is %s (was %s)", self.artifact, self.stage, wanted.version, previous
        )
        return True

    def _install(self, directory: Path) -> None:
        from pipeline.core.dirswap import replacing

        with replacing([self.model_dir / INSTALLED]) as (staged,):
            shutil.copytree(directory, staged, dirs_exist_ok=True)


def follower_from_args(cfg: Config, args: Any) -> RegistryFollower:
    """The follower for ``serve --follow`` (CLI options over ``registry:`` settings)."""
    reg = cfg.registry
    return RegistryFollower(
        git_url=args.follow,
        artifact=reg.artifact,
        stage=reg.stage,
        model_dir=args.model_dir or reg.follow_dir,
        production_dir=reg.production_dir,
        dvc_remote_url=args.dvc_remote_url,
        dvc_config=args.dvc_config,
        interval_s=args.interval or reg.follow_interval_s,
        timeout_s=reg.command_timeout_s,
        device=cfg.serve.device,
        intra_op_threads=cfg.serve.intra_op_threads,
    )
