"""GTO's tag format: which version of an artifact is registered where, and in which stage.

GTO keeps the registry in git tags (annotated, with a message):

- ``<artifact>@v1.2.0``: version ``v1.2.0`` registered at the tagged commit;
- ``<artifact>#<stage>#<n>``: ``<stage>`` assigned to the version at the tagged commit
  (``<artifact>#<stage>!#<n>`` unassigns); ``n`` counts every stage tag of the artifact.

Names are parsed with GTO's own parser (:func:`gto.tag.parse_name`), so anything that
reads the same tags (``gto show``, ``dvc artifacts get``) agrees with this module. This
module needs only tag names and commits, e.g. from ``git ls-remote``, so a service
machine resolves the production version without cloning.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gto.constants import Action
from gto.tag import parse_name
from semver import Version


@dataclass(frozen=True)
class RegistryTag:
    """One GTO tag of one artifact. ``commit`` is the tagged (peeled) commit sha."""

    name: str
    commit: str
    action: Action
    version: str | None = None
    stage: str | None = None
    counter: int | None = None


@dataclass(frozen=True)
class StageAssignment:
    """The version a stage points at, and the tag that says so."""

    version: str
    commit: str
    tag: str
    counter: int


def parse_tags(artifact: str, refs: Iterable[tuple[str, str]]) -> list[RegistryTag]:
    """``(tag name, commit)`` pairs -> the GTO tags of ``artifact`` (others ignored)."""
    found = []
    for name, commit in refs:
        parsed = parse_name(name, raise_on_fail=False)
        # GTO also parses its legacy ``<artifact>@created`` form, with no action: not a
        # registry event, so it is skipped like any foreign tag.
        if not parsed or parsed.get("name") != artifact or "action" not in parsed:
            continue
        found.append(
            RegistryTag(
                name=name,
                commit=commit,
                action=parsed["action"],
                version=parsed.get("version"),
                stage=parsed.get("stage"),
                counter=parsed.get("counter"),
            )
        )
    return found


def registrations(tags: Iterable[RegistryTag]) -> dict[str, RegistryTag]:
    """Registered versions (deregistered ones left out) -> their registration tag."""
    tags = list(tags)
    gone = {t.version for t in tags if t.action == Action.DEREGISTER}
    return {
        t.version: t
        for t in tags
        if t.action == Action.REGISTER and t.version is not None and t.version not in gone
    }


def stage_assignment(tags: Iterable[RegistryTag], stage: str) -> StageAssignment | None:
    """The version currently in ``stage``: the newest (highest counter) stage tag wins.

    Counters grow by one per stage tag and a pushed tag is never replaced, so the
    highest counter is the newest decision; an unassignment there means "none".
    ``record``/``rollback`` also make each new stage tag's timestamp later than the
    previous one, so GTO's own ordering (by timestamp) gives the same answer.
    """
    tags = list(tags)
    by_commit = {t.commit: t.version for t in registrations(tags).values()}
    stage_tags = [
        t
        for t in tags
        if t.stage == stage
        and t.counter is not None
        and t.action in (Action.ASSIGN, Action.UNASSIGN)
    ]
    if not stage_tags:
        return None
    newest = max(stage_tags, key=lambda t: t.counter or 0)
    version = by_commit.get(newest.commit)
    if newest.action == Action.UNASSIGN or version is None:
        return None
    return StageAssignment(version, newest.commit, newest.name, newest.counter or 0)


def next_version(tags: Iterable[RegistryTag], bump: str) -> str:
    """The next semantic version after every version ever registered (``v1.0.0`` first)."""
    seen = [
        Version.parse(t.version[1:])
        for t in tags
        if t.version is not None and t.action in (Action.REGISTER, Action.DEREGISTER)
    ]
    if not seen:
        return "v1.0.0"
    top = max(seen)
    bumped = {
        "major": top.bump_major,
        "minor": top.bump_minor,
        "patch": top.bump_patch,
    }[bump]()
    return f"v{bumped}"


def registration_tag(artifact: str, version: str) -> str:
    return f"{artifact}@{version}"


def parse_ls_remote(text: str) -> list[tuple[str, str]]:
    """``git ls-remote --tags`` output -> ``(tag name, commit)``, annotated tags peeled."""
    direct: dict[str, str] = {}
    peeled: dict[str, str] = {}
    for line in text.splitlines():
        sha, _, ref = line.strip().partition("\t")
        if not ref.startswith("refs/tags/"):
            continue
        name = ref.removeprefix("refs/tags/")
        if name.endswith("^{}"):
            peeled[name.removesuffix("^{}")] = sha
        else:
            direct[name] = sha
    return [(name, peeled.get(name, sha)) for name, sha in sorted(direct.items())]
