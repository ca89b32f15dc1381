"""Lineage: every promotion becomes a git commit plus GTO tags; rollback to any version.

``record`` (after a passed gate and promote, from the Prefect flow or
``python -m pipeline record``):

1. checks that ``models/production`` holds exactly the model the gate passed, that
   this model is not registered yet and that ``dvc status`` is clean;
2. commits what the run produced (``dvc.lock``, ``params.yaml`` and every output that
   dvc.yaml keeps in git: metrics, plots, reports) on the current branch (or
   ``registry.branch``), the message naming version, accuracy, dataset and params hash;
3. pushes data and models to the DVC remote *first*, so that a published tag never names
   a file the remote does not have yet;
4. registers the next semantic version (GTO tag ``<artifact>@vX.Y.Z``) and assigns it
   the stage (``<artifact>#production#N``) and pushes branch and both tags in one
   ``git push --atomic``. If another worker pushed first (a tag of that name exists, or
   the branch moved), nothing of ours is published: the local tags are dropped, the
   remote branch is merged (this run's recorded files win), and the next version is tried.
   No tag is ever forced, so no worker overwrites another's version.

``rollback`` moves the stage to any registered version (a new GTO assignment tag at that
version's commit), installs that version's model with the same directory swap as
promote, and records the new ``dvc.lock`` in a commit, so ``dvc status`` stays clean and
the next ``dvc repro`` does not re-promote. ``lineage`` gathers one version's story.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from dvc.exceptions import DvcException

from pipeline.core.atomic import sha256_file
from pipeline.core.config import Config, RegistryConfig
from pipeline.core.contract import MODEL_CARD_JSON, MODEL_FILE
from pipeline.core.errors import RegistryError, RemoteUnreachable
from pipeline.release.remotes import check_dvc_remote, check_git_remote, git_remote_url
from pipeline.release.tags import (
    RegistryTag,
    next_version,
    parse_tags,
    registration_tag,
    registrations,
    stage_assignment,
)
from pipeline.release.vcs import Result, dvc, git
from pipeline.release.verdict import checked_card, passed_report, passed_this

log = logging.getLogger("pipeline.release.registry")

Say = Callable[[str], None]

# What DVC raises when a file at a revision cannot be had (missing from cache and remote,
# remote unreachable, path not tracked at that revision).
DVC_FETCH_ERRORS: tuple[type[Exception], ...] = (DvcException, OSError, KeyError, ValueError)

# Keys written into the registration tag's message, one "key: value" per line.
MESSAGE_KEYS = ("model_sha256", "accuracy", "dataset", "params_hash", "model_version", "commit")


@dataclass(frozen=True)
class RecordResult:
    """What ``record``/``rollback`` did. ``version`` is None when nothing was recorded."""

    version: str | None
    commit: str | None
    tags: tuple[str, ...] = ()
    pushed: bool = False
    attempts: int = 0
    reason: str = ""

    def summary(self) -> str:
        if self.version is None:
            return f"nothing recorded: {self.reason}"
        where = "pushed" if self.pushed else "local only"
        return f"{self.version} at {str(self.commit)[:12]} ({', '.join(self.tags)}; {where})"


@dataclass
class _Repo:
    root: Path
    reg: RegistryConfig
    push: bool
    say: Say
    remote: str | None = None
    branch: str = ""
    created: list[str] = field(default_factory=list)

    def git(self, *args: str, check: bool = True) -> Result:
        return git(self.root, *args, timeout_s=self.reg.command_timeout_s, check=check)

    def head(self) -> str:
        return self.git("rev-parse", "HEAD").stdout.strip()


def repo_root(start: Path) -> Path:
    result = git(start, "rev-parse", "--show-toplevel", check=False)
    if not result.ok:
        raise RegistryError(f"{start} is not in a git repository: `git init` it first")
    return Path(result.stdout.strip())


def local_tags(root: Path, artifact: str) -> list[RegistryTag]:
    """GTO tags of ``artifact`` in the local repository (commits peeled)."""
    fmt = "--format=%(refname:strip=2)%09%(*objectname)%09%(objectname)"
    out = git(root, "for-each-ref", "refs/tags", fmt).stdout
    refs = []
    for line in out.splitlines():
        name, peeled, direct = [*line.split("\t"), "", ""][:3]
        refs.append((name, peeled or direct))
    return parse_tags(artifact, refs)


def tag_message(root: Path, tag: str) -> dict[str, str]:
    """``key: value`` lines of an annotated tag's message."""
    text = git(root, "for-each-ref", f"refs/tags/{tag}", "--format=%(contents)").stdout
    return parse_message(text)


def parse_message(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and re.fullmatch(r"[a-z_0-9]+", key.strip()):
            out[key.strip()] = value.strip()
    return out


def _last_stage_time(root: Path, artifact: str) -> int:
    out = git(root, "for-each-ref", "refs/tags", "--format=%(refname:strip=2)%09%(taggerdate:unix)")
    latest = 0
    for line in out.stdout.splitlines():
        name, _, stamp = line.partition("\t")
        if name.startswith(f"{artifact}#") and stamp.strip().isdigit():
            latest = max(latest, int(stamp))
    return latest


def _after_last_stage_tag(root: Path, artifact: str) -> None:
    """Wait until the clock is past the newest stage tag's second.

    GTO orders stage assignments by tag time (one-second resolution); a new assignment in
    the same second as the previous one could be shown in the wrong order by ``gto show``.
    """
    latest = _last_stage_time(root, artifact)
    while time.time() < latest + 1:
        time.sleep(0.1)


# --- reading what the run produced ----------------------------------------------------


def git_tracked_outputs(root: Path) -> list[str]:
    """Outputs dvc.yaml keeps in git (``cache: false``): metrics, plots, small reports."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8")) or {}
    found: list[str] = []
    for stage in (spec.get("stages") or {}).values():
        for key in ("outs", "metrics", "plots"):
            for entry in stage.get(key) or []:
                if isinstance(entry, dict):
                    for path, opts in entry.items():
                        if isinstance(opts, dict) and opts.get("cache") is False:
                            found.append(path)
    return found


def run_files(root: Path) -> list[str]:
    """The files a run changes that git records: lock, params, uncached outputs, ignores."""
    files = ["dvc.lock", "params.yaml", *git_tracked_outputs(root)]
    files += [
        str(p.relative_to(root))
        for p in root.rglob(".gitignore")
        if ".git" not in p.parts and ".venv" not in p.parts
    ]
    return sorted({f for f in files if (root / f).exists()})


def commit_message(version: str, card: dict[str, Any], lock_dataset: str | None) -> str:
    metrics = card.get("metrics") or {}
    accuracy = metrics.get("onnx_test_accuracy")
    acc = f"{accuracy:.4f}" if isinstance(accuracy, float) else str(accuracy)
    dataset = card.get("dataset_version") or "unknown"
    params = str(card.get("params_hash") or "unknown")
    lines = [
        f"Register model {version}: test accuracy {acc}, dataset {str(dataset)[:12]}, "
        f"params {params[:12]}",
        "",
        f"model_version: {card.get('version')}",
        f"model_sha256: {card.get('sha256')}",
        f"accuracy: {acc}",
        f"dataset: {dataset}",
        f"dataset_dvc_md5: {lock_dataset or 'unknown'}",
        f"params_hash: {params}",
    ]
    return "\n".join(lines) + "\n"


def _lock_dataset_md5(root: Path) -> str | None:
    """DVC's hash of data/prepared in dvc.lock (the dataset version as DVC knows it)."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        return None
    for stage in (lock.get("stages") or {}).values():
        for out in stage.get("outs") or []:
            if str(out.get("path", "")).rstrip("/").endswith("data/prepared"):
                return str(out.get("md5"))
    return None


# --- remotes and pushing --------------------------------------------------------------


def _prepare_remote(repo: _Repo) -> None:
    """Decide where to push: the configured git remote, if there is one and we push."""
    reg = repo.reg
    current = repo.git("symbolic-ref", "--quiet", "--short", "HEAD", check=False).stdout.strip()
    repo.branch = reg.branch or current
    if not repo.branch:
        raise RegistryError(
            "HEAD is detached: check out a branch, or set registry.branch in params.yaml"
        )
    if not repo.push:
        repo.say("not pushing (push disabled): commit and tags stay in this checkout")
        return
    if reg.git_remote is None:
        repo.say("registry.git_remote is null: recording locally only")
        return
    try:
        git_remote_url(repo.root, reg.git_remote)
    except RemoteUnreachable as err:
        # A checkout without that remote records locally (and says how to publish);
        # a remote that exists but does not answer is an error below.
        repo.say(f"recording locally only: {err}")
        return
    check_git_remote(repo.root, reg.git_remote, reg.command_timeout_s)
    repo.remote = reg.git_remote


def _drop_created_tags(repo: _Repo) -> None:
    for tag in repo.created:
        repo.git("tag", "-d", tag, check=False)
    repo.created.clear()


def _fetch(repo: _Repo) -> None:
    """Fetch every tag (remote wins over unpublished local ones) and the branch."""
    if repo.remote is None:
        return
    _drop_created_tags(repo)
    repo.git(
        "fetch",
        "--quiet",
        "--force",
        "--tags",
        repo.remote,
        f"+refs/heads/{repo.branch}:{_remote_ref(repo)}",
        check=False,  # a new remote has no such branch yet; tags were fetched anyway
    )


def _remote_ref(repo: _Repo) -> str:
    return f"refs/remotes/{_remote_name(repo)}/{repo.branch}"


def _sync(repo: _Repo, keep: list[str]) -> None:
    """Fetch; if the remote branch moved, merge it, keeping our versions of ``keep``."""
    if repo.remote is None:
        return
    _fetch(repo)
    remote_ref = _remote_ref(repo)
    if not repo.git("rev-parse", "--verify", "--quiet", remote_ref, check=False).ok:
        return
    if repo.git("merge-base", "--is-ancestor", remote_ref, "HEAD", check=False).ok:
        return
    repo.say(f"{repo.branch} moved on the remote: merging it, keeping this run's files")
    merged = repo.git("merge", "--no-ff", "--no-commit", "--no-edit", remote_ref, check=False)
    if not repo.git("rev-parse", "--verify", "--quiet", "MERGE_HEAD", check=False).ok:
        raise RegistryError(f"cannot merge the remote {repo.branch}: {merged.why(3)}")
    in_head = set(repo.git("ls-tree", "-r", "--name-only", "HEAD").stdout.split())
    for path in keep:
        if path in in_head:
            repo.git("checkout", "HEAD", "--", path)
    conflicts = repo.git("diff", "--name-only", "--diff-filter=U").stdout.split()
    if conflicts:
        repo.git("merge", "--abort", check=False)
        raise RegistryError(
            f"cannot merge the remote {repo.branch}: conflicts in {', '.join(conflicts)}; "
            "merge it by hand, then run `python -m pipeline record` again"
        )
    repo.git(
        "commit",
        "--quiet",
        "--no-verify",
        "-m",
        f"Merge {repo.remote}/{repo.branch}: keep this run's dvc.lock, params and metrics",
    )


def _remote_name(repo: _Repo) -> str:
    remote = repo.remote or "local"
    return re.sub(r"[^A-Za-z0-9._-]", "_", remote)


def _push(repo: _Repo, tags: Iterable[str]) -> Result:
    refs = [f"HEAD:refs/heads/{repo.branch}", *(f"refs/tags/{t}" for t in tags)]
    assert repo.remote is not None
    return repo.git("push", "--atomic", "--porcelain", repo.remote, *refs, check=False)


def _rejected(result: Result) -> bool:
    """A push refused because the remote moved (tag exists, non-fast-forward)."""
    text = (result.stdout + result.stderr).lower()
    return any(
        mark in text
        for mark in ("[rejected]", "already exists", "non-fast-forward", "fetch first", "atomic")
    )


def _publish(
    repo: _Repo,
    keep: list[str],
    make_tags: Callable[[list[RegistryTag]], tuple[str, list[str]]],
) -> tuple[str, list[str], int]:
    """Create tags (``make_tags``), push them with the branch; retry when rejected.

    ``make_tags`` gets the current tags and returns ``(version, created tag names)``.
    """
    reg = repo.reg
    for attempt in range(1, reg.push_attempts + 1):
        _sync(repo, keep)
        tags = local_tags(repo.root, reg.artifact)
        version, created = make_tags(tags)
        repo.created = list(created)
        if repo.remote is None:
            return version, created, attempt
        result = _push(repo, created)
        if result.ok:
            repo.created = []
            return version, created, attempt
        if not _rejected(result):
            _drop_created_tags(repo)
            raise RemoteUnreachable(
                f"git push to {repo.remote} failed: {result.why(3)}; nothing was published "
                "(run `python -m pipeline record` again once the remote is back)"
            )
        repo.say(f"push of {version} rejected (another worker was first); retrying")
    _drop_created_tags(repo)
    raise RegistryError(
        f"gave up after {reg.push_attempts} rejected pushes; run `python -m pipeline record` again"
    )


# --- record ---------------------------------------------------------------------------


def _gto_register(root: Path, artifact: str, version: str, message: str) -> str:
    from gto import api as gto

    gto.register(str(root), artifact, "HEAD", version=version, message=message)
    return registration_tag(artifact, version)


def _gto_assign(
    root: Path, artifact: str, stage: str, version: str, message: str, again: bool = False
) -> str:
    """A new stage tag for ``version``. ``again``: the version held the stage before
    (a rollback), which GTO allows only with ``force`` (a new tag, none replaced)."""
    from gto import api as gto

    _after_last_stage_tag(root, artifact)
    before = {t.name for t in local_tags(root, artifact)}
    gto.assign(
        str(root), artifact, stage, version=version, message=message, simple=False, force=again
    )
    made = [t.name for t in local_tags(root, artifact) if t.name not in before]
    if len(made) != 1:
        raise RegistryError(f"gto assign made {made}, expected one stage tag")
    return made[0]


def registered_sha(root: Path, tags: list[RegistryTag]) -> dict[str, str]:
    """model sha256 -> version, from the registration tags' messages."""
    out = {}
    for version, tag in registrations(tags).items():
        sha = tag_message(root, tag.name).get("model_sha256")
        if sha:
            out[sha] = version
    return out


def _dvc_status_clean(root: Path, timeout_s: float) -> None:
    result = dvc(root, "status", "--json", timeout_s=timeout_s)
    lines = result.stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("{")]
    status = json.loads("\n".join(lines[starts[-1] :])) if starts else {}
    if status:
        raise RegistryError(
            "dvc status is not clean (dvc.lock does not describe the workspace): run "
            "`dvc repro` first; " + json.dumps(status, sort_keys=True)[:400]
        )


def record(cfg: Config, root: Path, push: bool = True, say: Say = log.info) -> RecordResult:
    """Record the promoted model of the last run; see the module docstring.

    Returns a result with ``version=None`` (and the reason) when there is nothing new to
    record: production is not the model the gate passed (e.g. after a rollback), or that
    model is registered already. Raises :class:`PromotionError` on a rejected gate and
    :class:`RegistryError` / :class:`RemoteUnreachable` on git, GTO or DVC failures.
    """
    reg = cfg.registry
    root = repo_root(Path(root))
    prod = root / reg.production_dir
    gate = passed_report(root / cfg.gate.report_path)
    model = prod / MODEL_FILE
    if not model.is_file():
        raise RegistryError(f"{model}: no production model (run promote first)")
    card = checked_card(prod)
    sha = str(card["sha256"])
    if not passed_this(gate, sha):
        return RecordResult(None, None, reason="production is not the model the gate passed")

    repo = _Repo(root, reg, push, say)
    _prepare_remote(repo)
    _fetch(repo)
    known = registered_sha(root, local_tags(root, reg.artifact))
    if sha in known:
        return RecordResult(None, None, reason=f"this model is registered already as {known[sha]}")
    _dvc_status_clean(root, reg.command_timeout_s * 5)

    keep = run_files(root)
    dataset_md5 = _lock_dataset_md5(root)
    repo.git("add", "--", *keep)
    own_commit = not repo.git("diff", "--cached", "--quiet", check=False).ok
    if own_commit:
        # The version is known only when its tag is pushed; the message is amended then.
        guess = next_version(local_tags(root, reg.artifact), reg.bump)
        draft = commit_message(guess, card, dataset_md5)
        repo.git("commit", "--quiet", "--no-verify", "-m", draft)
    else:
        say("the run's files are committed already; registering HEAD")
    if push:
        check_dvc_remote(root, reg.dvc_remote, reg.command_timeout_s)
        say("dvc push: data and models to the DVC remote (before any tag is published)")
        args = ["push"] + (["-r", reg.dvc_remote] if reg.dvc_remote else [])
        dvc(root, *args, timeout_s=reg.command_timeout_s * 10)

    def make_tags(tags: list[RegistryTag]) -> tuple[str, list[str]]:
        version = next_version(tags, reg.bump)
        if own_commit:  # nothing of it is published yet: safe to amend (merge commits too)
            text = commit_message(version, card, dataset_md5)
            repo.git("commit", "--quiet", "--amend", "--no-verify", "--allow-empty", "-m", text)
        message = commit_message(version, card, dataset_md5) + f"commit: {repo.head()}\n"
        reg_tag = _gto_register(root, reg.artifact, version, message)
        stage_tag = _gto_assign(
            root, reg.artifact, reg.stage, version, f"{reg.stage} <- {version} (promotion)\n"
        )
        return version, [reg_tag, stage_tag]

    version, tags, attempts = _publish(repo, keep, make_tags)
    commit = repo.head()
    say(f"registered {version} at {commit[:12]} and assigned {reg.stage}: {', '.join(tags)}")
    return RecordResult(version, commit, tuple(tags), repo.remote is not None, attempts)


# --- rollback -------------------------------------------------------------------------


def _fetch_model_dir(root: Path, rel: Path, rev: str, dest: Path) -> None:
    """The directory ``rel`` as of ``rev`` into ``dest``, from the DVC cache or remote."""
    from dvc.api import DVCFileSystem

    try:
        fs = DVCFileSystem(str(root), rev=rev)
        fs.get(str(rel).rstrip("/"), str(dest), recursive=True)
    except DVC_FETCH_ERRORS as err:
        raise RegistryError(
            f"cannot get {rel} at {rev[:12]} from the DVC cache or remote: "
            f"{type(err).__name__}: {err}"
        ) from err


def install_version(cfg: Config, root: Path, version: str, commit: str, sha: str | None) -> str:
    """Put ``version``'s production directory in place with promote's directory swap."""
    from pipeline.release.promote import install_production

    prod = root / cfg.registry.production_dir
    prev = root / cfg.registry.previous_dir
    prod.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prod.name}.", suffix=".get", dir=prod.parent))
    try:
        target = staging / "dir"
        _fetch_model_dir(root, cfg.registry.production_dir, commit, target)
        got = sha256_file(target / MODEL_FILE)
        if sha is not None and got != sha:
            raise RegistryError(
                f"{version}: fetched model sha256 {got[:12]} differs from the registered "
                f"{sha[:12]}; not installed"
            )
        install_production(prod, prev, target)
        return got
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _registered(tags: list[RegistryTag], artifact: str, version: str) -> RegistryTag:
    """The registration tag of ``version`` among ``tags``; :class:`RegistryError` if none."""
    known = registrations(tags)
    if version not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise RegistryError(f"{artifact} {version} is not registered (registered: {listed})")
    return known[version]


def rollback_to(
    cfg: Config, root: Path, version: str, push: bool = True, say: Say = log.info
) -> RecordResult:
    """Move the stage to registered ``version`` and install its model; see module doc."""
    reg = cfg.registry
    root = repo_root(Path(root))
    version = version if version.startswith("v") else f"v{version}"
    repo = _Repo(root, reg, push, say)
    _prepare_remote(repo)
    _fetch(repo)
    tags = local_tags(root, reg.artifact)
    target = _registered(tags, reg.artifact, version)
    sha = tag_message(root, target.name).get("model_sha256")
    current = stage_assignment(tags, reg.stage)
    got = install_version(cfg, root, version, target.commit, sha)
    say(f"installed {version} (sha256 {got[:12]}) in {reg.production_dir}")
    dvc(
        root,
        "commit",
        "--force",
        str(reg.production_dir),
        str(reg.previous_dir),
        timeout_s=reg.command_timeout_s * 5,
    )
    keep = ["dvc.lock"]
    repo.git("add", "--", *keep)
    was = current.version if current else "none"
    if not repo.git("diff", "--cached", "--quiet", check=False).ok:
        repo.git(
            "commit",
            "--quiet",
            "--no-verify",
            "-m",
            f"Roll back {reg.artifact} {reg.stage}: {was} -> {version}\n\nmodel_sha256: {got}\n",
        )

    def make_tags(tags: list[RegistryTag]) -> tuple[str, list[str]]:
        now = stage_assignment(tags, reg.stage)
        message = f"{reg.stage} <- {version} (rollback from {now.version if now else 'none'})\n"
        tag = _gto_assign(root, reg.artifact, reg.stage, version, message, again=True)
        return version, [tag]

    _, made, attempts = _publish(repo, keep, make_tags)
    say(f"{reg.stage} is now {version} (was {was}): {', '.join(made)}")
    return RecordResult(version, target.commit, tuple(made), repo.remote is not None, attempts)


# --- lineage --------------------------------------------------------------------------


def _git_json(root: Path, rev: str, path: Path | str) -> dict[str, Any] | None:
    result = git(root, "show", f"{rev}:{path}", check=False)
    if not result.ok:
        return None
    try:
        data = json.loads(result.stdout)
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def lineage(cfg: Config, root: Path, version: str) -> dict[str, Any]:
    """Everything about ``version``: commit, stages, params, dataset, metrics, gate, card."""
    reg = cfg.registry
    root = repo_root(Path(root))
    version = version if version.startswith("v") else f"v{version}"
    tags = local_tags(root, reg.artifact)
    tag = _registered(tags, reg.artifact, version)
    commit = tag.commit
    message = tag_message(root, tag.name)
    stage_tags = sorted(
        (t for t in tags if t.commit == commit and t.stage is not None),
        key=lambda t: t.counter or 0,
    )
    params_text = git(root, "show", f"{commit}:params.yaml", check=False).stdout
    params = yaml.safe_load(params_text) if params_text else None
    card: dict[str, Any] | None
    try:
        from dvc.api import read

        card = json.loads(
            read(str(reg.production_dir / MODEL_CARD_JSON), repo=str(root), rev=commit)
        )
    except DVC_FETCH_ERRORS as err:
        card = {"error": f"model card not available: {type(err).__name__}: {err}"}
    now = stage_assignment(tags, reg.stage)
    return {
        "artifact": reg.artifact,
        "version": version,
        "tag": tag.name,
        "commit": commit,
        "commit_subject": git(root, "log", "-1", "--format=%s", commit).stdout.strip(),
        "registered": message,
        "stage_tags": [t.name for t in stage_tags],
        f"in_{reg.stage}_now": bool(now and now.version == version),
        "profile": (params or {}).get("profile"),
        "params_hash": message.get("params_hash"),
        "dataset": {
            "manifest_sha256": message.get("dataset"),
            "dvc_md5": message.get("dataset_dvc_md5"),
        },
        "test_metrics": _git_json(root, commit, Path(cfg.evaluate.live_dir) / "metrics.json"),
        "gate": _git_json(root, commit, cfg.gate.report_path),
        "model_card": card,
    }
