"""pipeline/release/tags.py: GTO tag parsing, registrations, stage assignment, version bumps.

Pure functions over ``(tag name, commit)`` pairs: no git repository is needed. Tag names
are written by hand in GTO's documented format (``<artifact>@vX.Y.Z`` registers,
``<artifact>@vX.Y.Z!`` / ``!#N`` deregisters, ``<artifact>#<stage>#N`` assigns,
``<artifact>#<stage>!#N`` unassigns, ``<dir>=<artifact>`` for an artifact in a folder),
so the expectations do not come from the parser under test.
"""

from __future__ import annotations

import pytest
from gto.constants import Action

from pipeline.core.config import RegistryConfig
from pipeline.release.tags import (
    RegistryTag,
    StageAssignment,
    next_version,
    parse_ls_remote,
    parse_tags,
    registration_tag,
    registrations,
    stage_assignment,
)

ART = "mnist-classifier"
STAGE = "production"
# Commits of three registered versions.
C1, C2, C3 = ("1" * 40, "2" * 40, "3" * 40)
REGISTERED = [(f"{ART}@v1.0.0", C1), (f"{ART}@v1.1.0", C2), (f"{ART}@v1.2.0", C3)]
COMMIT_OF = {"v1.0.0": C1, "v1.1.0": C2, "v1.2.0": C3}


def tags_of(*refs: tuple[str, str]) -> list[RegistryTag]:
    return parse_tags(ART, refs)


def versions_of(*names: str) -> list[RegistryTag]:
    """Registration-family tags (commit irrelevant for version bumps)."""
    return tags_of(*((name, C1) for name in names))


# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "action", "version", "stage", "counter"),
    [
        # GTO's registration, simple and counted (a re-registration gets a counter).
        (f"{ART}@v1.2.3", Action.REGISTER, "v1.2.3", None, None),
        (f"{ART}@v1.2.3#6", Action.REGISTER, "v1.2.3", None, 6),
        # Deregistration: `!` after the version, with or without a counter.
        (f"{ART}@v1.2.3!", Action.DEREGISTER, "v1.2.3", None, None),
        (f"{ART}@v1.2.3!#7", Action.DEREGISTER, "v1.2.3", None, 7),
        # Full semver: pre-release and build metadata are part of the version.
        (f"{ART}@v2.0.0-rc.1+build.5", Action.REGISTER, "v2.0.0-rc.1+build.5", None, None),
        # Stage assignment / unassignment with the artifact-wide counter.
        (f"{ART}#production#3", Action.ASSIGN, None, "production", 3),
        (f"{ART}#production!#4", Action.UNASSIGN, None, "production", 4),
        (f"{ART}#staging#12", Action.ASSIGN, None, "staging", 12),
        # GTO's simple (counterless) stage tag parses, with no counter.
        (f"{ART}#production", Action.ASSIGN, None, "production", None),
        # Artifact deprecation: no version, no stage.
        (f"{ART}@deprecated", Action.DEPRECATE, None, None, None),
    ],
)
def test_parses_gto_tags_of_the_artifact(
    name: str, action: Action, version: str | None, stage: str | None, counter: int | None
) -> None:
    assert tags_of((name, C2)) == [
        RegistryTag(
            name=name, commit=C2, action=action, version=version, stage=stage, counter=counter
        )
    ]


@pytest.mark.parametrize(
    "name",
    [
        # Not GTO tags at all.
        "v1.0.0",
        "release-2024-05",
        ART,
        # Malformed versions: GTO needs `v` + full semver without leading zeros.
        f"{ART}@1.2.3",
        f"{ART}@v1.2",
        f"{ART}@v01.2.3",
        f"{ART}@vX",
        f"{ART}@v1.2.3-",
        f"{ART}@v1.2.3 ",
        f"{ART}@@v1.2.3",
        f"{ART}@v1.2.3@v1.2.4",
        f"{ART}@v1.2.3!!",
        f"{ART}@v1.2.3#",
        # GTO shortcuts (`gto show name@latest`) are not tag names.
        f"{ART}@latest",
        f"{ART}@greatest",
        # Malformed stage tags.
        f"{ART}#production#x",
        f"{ART}#production#3#4",
        f"{ART}#-production#1",
        # Other artifacts, including ones whose names contain or extend ours.
        "other-model@v1.0.0",
        "other-model#production#1",
        f"{ART}-v2@v9.0.0",
        f"{ART}-v2#production#9",
        f"old-{ART}@v9.0.0",
        "MNIST-classifier@v9.0.0",  # names are case-sensitive
        # The same name in a folder is a different artifact (`models:mnist-classifier`).
        f"models={ART}@v9.0.0",
        f"models={ART}#production#9",
    ],
)
def test_ignores_foreign_and_malformed_tags(name: str) -> None:
    assert tags_of((name, C1)) == []


def test_artifact_in_a_folder_is_matched_by_its_full_name() -> None:
    # GTO writes `models:mnist-classifier` as `models=mnist-classifier` in tag names.
    found = parse_tags(f"models:{ART}", [(f"models={ART}@v1.0.0", C1), (f"{ART}@v2.0.0", C2)])
    assert [(t.name, t.version, t.commit) for t in found] == [
        (f"models={ART}@v1.0.0", "v1.0.0", C1)
    ]


def test_parse_keeps_input_order_and_drops_only_foreign_tags() -> None:
    refs = [
        (f"{ART}#production#2", C2),
        ("v3.0.0", C3),
        (f"{ART}@v1.1.0", C2),
        ("other-model@v1.0.0", C1),
        (f"{ART}@v1.0.0", C1),
    ]
    assert [t.name for t in tags_of(*refs)] == [
        f"{ART}#production#2",
        f"{ART}@v1.1.0",
        f"{ART}@v1.0.0",
    ]


def test_legacy_created_tag_is_ignored_not_fatal() -> None:
    assert tags_of((f"{ART}@created", C1), (f"{ART}@v1.0.0", C1)) == tags_of((f"{ART}@v1.0.0", C1))


def test_registration_tag_is_gto_register_format() -> None:
    assert registration_tag(ART, "v1.4.0") == "mnist-classifier@v1.4.0"
    assert tags_of((registration_tag(ART, "v1.4.0"), C1))[0].action == Action.REGISTER


# --- registrations ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("refs", "expected"),
    [
        ([], {}),
        (REGISTERED, {"v1.0.0": C1, "v1.1.0": C2, "v1.2.0": C3}),
        # Deregistered versions are left out, in either deregistration form.
        ([*REGISTERED, (f"{ART}@v1.1.0!", C2)], {"v1.0.0": C1, "v1.2.0": C3}),
        ([*REGISTERED, (f"{ART}@v1.2.0!#9", C3)], {"v1.0.0": C1, "v1.1.0": C2}),
        # Stage tags and deprecation register nothing.
        ([(f"{ART}#production#1", C1), (f"{ART}@deprecated", C1)], {}),
        # A version deregistered that was never registered here changes nothing else.
        ([(f"{ART}@v1.0.0", C1), (f"{ART}@v5.0.0!", C2)], {"v1.0.0": C1}),
    ],
)
def test_registrations(refs: list[tuple[str, str]], expected: dict[str, str]) -> None:
    found = registrations(tags_of(*refs))
    assert {version: tag.commit for version, tag in found.items()} == expected
    assert all(tag.name == f"{ART}@{version}" for version, tag in found.items())


# --- stage assignment ------------------------------------------------------------------


def assign(n: int, commit: str, stage: str = STAGE) -> tuple[str, str]:
    return (f"{ART}#{stage}#{n}", commit)


def unassign(n: int, commit: str, stage: str = STAGE) -> tuple[str, str]:
    return (f"{ART}#{stage}!#{n}", commit)


@pytest.mark.parametrize(
    ("stage_refs", "stage", "expected"),
    [
        pytest.param([], STAGE, None, id="no-stage-tags"),
        pytest.param([assign(1, C1)], STAGE, ("v1.0.0", 1), id="first-promotion"),
        pytest.param(
            [assign(1, C1), assign(2, C2)], STAGE, ("v1.1.0", 2), id="newer-promotion-wins"
        ),
        # A rollback is a new tag (higher counter) at an older version's commit.
        pytest.param(
            [assign(1, C1), assign(2, C2), assign(3, C1)], STAGE, ("v1.0.0", 3), id="rollback"
        ),
        # The counter is compared as a number: #10 is newer than #9 (not as strings).
        pytest.param([assign(9, C2), assign(10, C1)], STAGE, ("v1.0.0", 10), id="counter-10>9"),
        pytest.param(
            [assign(10, C1), assign(9, C2), assign(11, C3), assign(2, C2)],
            STAGE,
            ("v1.2.0", 11),
            id="input-order-irrelevant",
        ),
        # The highest counter wins, not the highest version.
        pytest.param([assign(4, C3), assign(5, C1)], STAGE, ("v1.0.0", 5), id="not-by-semver"),
        # Counters are artifact-wide: other stages' tags interleave and are ignored.
        pytest.param(
            [assign(1, C1), assign(2, C2, "staging"), assign(3, C3, "staging")],
            STAGE,
            ("v1.0.0", 1),
            id="other-stage-ignored",
        ),
        pytest.param(
            [assign(1, C1), assign(2, C2, "staging"), assign(3, C3)],
            "staging",
            ("v1.1.0", 2),
            id="asked-stage-only",
        ),
        pytest.param([assign(1, C1)], "staging", None, id="stage-never-assigned"),
        # Unassigning the version the stage holds leaves the stage empty.
        pytest.param([assign(1, C1), unassign(2, C1)], STAGE, None, id="unassigned"),
        pytest.param(
            [assign(1, C1), unassign(2, C1), assign(3, C2)],
            STAGE,
            ("v1.1.0", 3),
            id="assigned-after-unassign",
        ),
        pytest.param(
            [assign(1, C1), unassign(2, C1), assign(3, C1)],
            STAGE,
            ("v1.0.0", 3),
            id="reassigned-same-version",
        ),
        # An unassignment of another stage does not touch this one.
        pytest.param(
            [assign(1, C1), assign(2, C2, "staging"), unassign(3, C2, "staging")],
            STAGE,
            ("v1.0.0", 1),
            id="other-stage-unassign",
        ),
        # Foreign stage tags (other artifact, malformed) never win, whatever their counter.
        pytest.param(
            [
                assign(1, C1),
                ("other-model#production#99", C2),
                (f"{ART}-v2#production#99", C3),
                (f"{ART}#production#x99", C2),
            ],
            STAGE,
            ("v1.0.0", 1),
            id="foreign-stage-tags",
        ),
    ],
)
def test_stage_assignment(
    stage_refs: list[tuple[str, str]], stage: str, expected: tuple[str, int] | None
) -> None:
    tags = tags_of(*REGISTERED, *stage_refs)
    got = stage_assignment(tags, stage)
    if expected is None:
        assert got is None
        return
    version, counter = expected
    commit = COMMIT_OF[version]
    assert got == StageAssignment(
        version=version, commit=commit, tag=f"{ART}#{stage}#{counter}", counter=counter
    )


def test_stage_assignment_reads_any_iterable_once() -> None:
    # registry.py and the follower pass lists; a generator must work as well (read once).
    tags = tags_of(*REGISTERED, assign(1, C1), assign(2, C3))
    got = stage_assignment(iter(tags), STAGE)
    assert got is not None and got.version == "v1.2.0"


# --- version bumps, as record() does them: next_version(local tags, registry.bump) ------


@pytest.mark.parametrize("bump", ["major", "minor", "patch"])
def test_first_version_is_v1_0_0_whatever_the_bump(bump: str) -> None:
    assert next_version([], bump) == "v1.0.0"
    # Tags that register nothing (stages, deprecation, foreign) do not start the count.
    only_others = tags_of(
        assign(1, C1), (f"{ART}@deprecated", C1), ("other-model@v4.0.0", C1), ("v7.0.0", C1)
    )
    assert next_version(only_others, bump) == "v1.0.0"


@pytest.mark.parametrize(
    ("names", "bump", "expected"),
    [
        ([f"{ART}@v1.0.0"], "major", "v2.0.0"),
        ([f"{ART}@v1.0.0"], "minor", "v1.1.0"),
        ([f"{ART}@v1.0.0"], "patch", "v1.0.1"),
        ([f"{ART}@v1.4.2"], "major", "v2.0.0"),
        ([f"{ART}@v1.4.2"], "minor", "v1.5.0"),
        ([f"{ART}@v1.4.2"], "patch", "v1.4.3"),
        # From the highest version ever registered, compared as semver (not as strings,
        # not by list order).
        ([f"{ART}@v1.10.0", f"{ART}@v1.9.0"], "minor", "v1.11.0"),
        ([f"{ART}@v1.9.0", f"{ART}@v1.10.0"], "patch", "v1.10.1"),
        ([f"{ART}@v2.0.0", f"{ART}@v1.99.0"], "minor", "v2.1.0"),
        # A deregistered version still counts: its `@vX.Y.Z` tag name stays taken.
        ([f"{ART}@v1.0.0", f"{ART}@v1.1.0", f"{ART}@v1.1.0!"], "minor", "v1.2.0"),
        ([f"{ART}@v1.0.0", f"{ART}@v1.1.0", f"{ART}@v1.1.0!#3"], "patch", "v1.1.1"),
        # Even a deregistration alone (registration tag gone) proves the name was used.
        ([f"{ART}@v1.0.0", f"{ART}@v1.5.0!#4"], "minor", "v1.6.0"),
        # A release ranks above its pre-release; build metadata is dropped by a bump.
        ([f"{ART}@v1.0.0-rc.1", f"{ART}@v1.0.0"], "minor", "v1.1.0"),
        ([f"{ART}@v1.0.0+build.7"], "patch", "v1.0.1"),
        # Stage tags and foreign versions do not move the count.
        ([f"{ART}@v1.2.0", f"{ART}#production#8", "other-model@v9.0.0"], "minor", "v1.3.0"),
        ([f"{ART}@v1.2.0", f"{ART}-v2@v9.0.0", f"models={ART}@v9.0.0"], "major", "v2.0.0"),
    ],
)
def test_next_version(names: list[str], bump: str, expected: str) -> None:
    assert next_version(versions_of(*names), bump) == expected


def test_default_bump_of_record_is_minor() -> None:
    # record() calls next_version(local_tags(...), cfg.registry.bump).
    bump = RegistryConfig().bump
    assert bump == "minor"
    assert next_version(versions_of(f"{ART}@v1.0.0"), bump) == "v1.1.0"


def test_next_version_never_reuses_a_tag_name() -> None:
    # Whatever was registered or deregistered, the bumped name is a new tag name.
    names = [f"{ART}@v1.0.0", f"{ART}@v1.1.0", f"{ART}@v1.1.0!", f"{ART}@v1.0.1"]
    for bump in ("major", "minor", "patch"):
        new = registration_tag(ART, next_version(versions_of(*names), bump))
        assert new not in names


# --- git ls-remote output (the follower's view) -----------------------------------------

# Annotated tags: the tag object's sha on the ref line, the commit on the `^{}` line.
LS_REMOTE = "\n".join(
    [
        f"{'a' * 40}\tHEAD",
        f"{'b' * 40}\trefs/heads/main",
        f"{'c' * 40}\trefs/tags/{ART}#production#1",
        f"{C1}\trefs/tags/{ART}#production#1^{{}}",
        f"{'d' * 40}\trefs/tags/{ART}#production#2",
        f"{C2}\trefs/tags/{ART}#production#2^{{}}",
        f"{'e' * 40}\trefs/tags/{ART}@v1.0.0",
        f"{C1}\trefs/tags/{ART}@v1.0.0^{{}}",
        f"{'0' * 40}\trefs/tags/{ART}@v1.1.0",
        f"{C2}\trefs/tags/{ART}@v1.1.0^{{}}",
        f"{C3}\trefs/tags/lightweight",
        "",
        f"{'9' * 40}\trefs/pull/7/head",
    ]
)


def test_parse_ls_remote_peels_annotated_tags_and_skips_other_refs() -> None:
    # Sorted by tag name.
    assert parse_ls_remote(LS_REMOTE) == [
        ("lightweight", C3),  # no `^{}` line: the ref's own sha is the commit
        (f"{ART}#production#1", C1),
        (f"{ART}#production#2", C2),
        (f"{ART}@v1.0.0", C1),
        (f"{ART}@v1.1.0", C2),
    ]


@pytest.mark.parametrize("text", ["", "\n\n", "a" * 40 + "\trefs/heads/main\n"])
def test_parse_ls_remote_without_tags(text: str) -> None:
    assert parse_ls_remote(text) == []


def test_stage_from_ls_remote_uses_peeled_commits() -> None:
    # Registration and stage tags are different tag objects; only the peeled commits
    # connect the stage tag to its version.
    got = stage_assignment(parse_tags(ART, parse_ls_remote(LS_REMOTE)), STAGE)
    assert got == StageAssignment("v1.1.0", C2, f"{ART}#production#2", 2)
