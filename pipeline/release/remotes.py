"""Are the git and DVC remotes there? Checked before anything is pushed or pulled.

Each check either returns the remote's URL or raises
:class:`pipeline.core.errors.RemoteUnreachable` with one line that says what to configure,
e.g. a fresh clone whose default DVC remote is a directory that does not exist yet
(where ``dvc pull`` would say "Everything is up to date" and then fail).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pipeline.core.errors import RegistryError, RemoteUnreachable
from pipeline.release.vcs import dvc, git


def git_remote_url(repo: Path, remote: str) -> str:
    """The URL of git remote ``remote`` (a name, or already a URL/path)."""
    if "/" in remote or ":" in remote:
        return remote
    result = git(repo, "remote", "get-url", remote, check=False)
    if not result.ok:
        raise RemoteUnreachable(
            f"no git remote named {remote!r} in {repo}: add it with "
            f"`git remote add {remote} <url>`, or set registry.git_remote: null in "
            "params.yaml to record locally only"
        )
    return result.stdout.strip()


def check_git_remote(repo: Path | None, remote: str, timeout_s: float) -> str:
    """Contact the git remote (``git ls-remote``); return its URL."""
    url = git_remote_url(repo, remote) if repo is not None else remote
    try:
        result = git(repo, "ls-remote", "--heads", remote, timeout_s=timeout_s, check=False)
    except RegistryError as err:
        raise RemoteUnreachable(f"git remote {remote!r} ({url}) did not answer: {err}") from err
    if not result.ok:
        raise RemoteUnreachable(
            f"git remote {remote!r} ({url}) is unreachable: {result.why(2)}; check the URL "
            f"(`git remote set-url {remote} <url>`), the network and the credentials"
        )
    return url


def dvc_remote_url(repo: Path, remote: str | None) -> tuple[str, str]:
    """``(name, url)`` of DVC remote ``remote`` (None: the default remote)."""
    from dvc.config import Config as DvcConfig

    # DVC's own merged config (system, global, repo, local), as `dvc push` sees it.
    conf = _dvc_config(repo, DvcConfig)
    remotes = {name: str(opts.get("url", "")) for name, opts in conf.get("remote", {}).items()}
    name = remote or conf.get("core", {}).get("remote")
    if name is None or name not in remotes:
        what = f"no DVC remote named {name!r}" if name else "no default DVC remote"
        raise RemoteUnreachable(
            f"{what} in {repo}: add one with `dvc remote add -d <name> <url>` "
            "(s3://..., ssh://..., or a shared directory)"
        )
    return name, remotes[name]


def _dvc_config(repo: Path, cls: Any) -> Any:
    return cls(dvc_dir=str(Path(repo) / ".dvc"), validate=True)


def check_dvc_remote(repo: Path, remote: str | None, timeout_s: float) -> str:
    """Check that the DVC remote exists (a directory) or answers (``dvc ls-url``)."""
    name, url = dvc_remote_url(repo, remote)
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = Path(parsed.path if parsed.scheme == "file" else url)
        if not path.is_absolute():
            path = (repo / ".dvc" / path).resolve()  # DVC resolves it from .dvc/
        if not path.is_dir():
            raise RemoteUnreachable(
                f"DVC remote {name!r} is the directory {path}, which does not exist: create "
                f"it (`mkdir -p {path}`) or point the remote at the shared storage "
                f"(`dvc remote modify --local {name} url <url>`)"
            )
        return str(path)
    result = dvc(repo, "ls-url", url, timeout_s=timeout_s, check=False)
    if not result.ok:
        raise RemoteUnreachable(
            f"DVC remote {name!r} ({url}) is unreachable: {result.why(2)}; check the URL "
            f"(`dvc remote modify --local {name} url <url>`) and its credentials"
        )
    return url
