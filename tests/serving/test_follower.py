"""Tests of pipeline/serving/follower.py: ``serve --follow`` against a real registry.

A bare git repository with GTO tags and a local DVC remote (tests/helpers/registry_repo.py) play
the project's remotes; a checkout records versions into them. The service side has no
checkout: only the git URL. It keeps serving through an unreachable git remote, an
unreachable DVC remote and a corrupted model file, and says why in /readyz and /v1/model.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pipeline.core.config import ServeConfig, load_config
from pipeline.release.registry import record
from pipeline.serving.follower import RegistryFollower
from pipeline.serving.model_store import ModelStore
from pipeline.serving.server import create_app
from tests.helpers.registry_repo import World, make_pool, repro, set_params

SERVE = replace(ServeConfig(), device="cpu", reload_interval_s=0.05)
IMAGE = [[[0.0] * 28] * 28]


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pool")
    make_pool(directory)
    return directory


def promote_and_record(checkout: Path, seed: int) -> str:
    set_params(checkout, train__seed=seed)
    repro(checkout)
    result = record(load_config(checkout / "params.yaml"), checkout)
    assert result.version is not None
    return result.version


def predict_version(client: TestClient) -> str | None:
    response = client.post("/v1/predict", json={"images": IMAGE})
    assert response.status_code == 200, response.text
    version: str | None = response.json()["registry_version"]
    return version


def test_follower_switches_versions_and_keeps_serving_through_failures(
    tmp_path: Path, pool: Path
) -> None:
    world = World(tmp_path, pool)
    world.create()
    a = world.clone("a")
    assert promote_and_record(a, 0) == "v1.0.0"

    service = tmp_path / "service"  # no checkout: only the git URL
    follower = RegistryFollower(
        git_url=str(world.origin),
        artifact="mnist-classifier",
        stage="production",
        model_dir=service / "models",
        interval_s=3600,  # the test drives the polls
        timeout_s=60,
        device="cpu",
    )
    store = ModelStore(follower.model_path, device="cpu")
    with TestClient(create_app(SERVE, store, follower=follower)) as client:
        follower.poll()  # waits for the start-up poll (same lock) or does it
        store.poll()
        assert predict_version(client) == "v1.0.0"
        ready = client.get("/readyz").json()
        assert ready["registry_version"] == "v1.0.0" and ready["registry"]["error"] is None
        served_sha = client.get("/v1/model").json()["sha256"]
        assert served_sha == hashlib.sha256(follower.model_path.read_bytes()).hexdigest()

        # 1. The git remote disappears: keep serving v1.0.0, say why.
        hidden = tmp_path / "origin-away.git"
        world.origin.rename(hidden)
        assert follower.poll() is False
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert "unreachable" in ready.json()["registry"]["error"], ready.json()
        assert predict_version(client) == "v1.0.0"
        hidden.rename(world.origin)

        # 2. A new version, but the DVC remote is gone: keep serving, say why.
        assert promote_and_record(a, 1) == "v1.1.0"
        away = tmp_path / "remote-away"
        world.remote.rename(away)
        assert follower.poll() is False
        info = client.get("/v1/model").json()
        assert "cannot fetch v1.1.0 through DVC" in info["registry"]["error"], info["registry"]
        assert info["registry_version"] == "v1.0.0" and info["registry"]["wanted"] == "v1.1.0"
        assert predict_version(client) == "v1.0.0"
        away.rename(world.remote)

        # 3. The remote is back: the next poll installs v1.1.0 and the store swaps to it.
        assert follower.poll() is True
        store.poll()
        assert predict_version(client) == "v1.1.0"
        assert client.get("/readyz").json()["registry"]["error"] is None

        # 4. A corrupted file on the DVC remote: rejected (hash), v1.1.0 keeps serving.
        assert promote_and_record(a, 2) == "v1.2.0"
        model = a / "models" / "production" / "model.onnx"
        md5 = hashlib.md5(model.read_bytes()).hexdigest()
        blob = world.remote / "files" / "md5" / md5[:2] / md5[2:]
        assert blob.is_file(), sorted(p.name for p in world.remote.rglob("*"))
        blob.chmod(0o644)
        blob.write_bytes(blob.read_bytes()[:-100] + b"\0" * 100)
        assert follower.poll() is False
        error = client.get("/readyz").json()["registry"]["error"]
        assert "differs from its model card" in error, error
        assert predict_version(client) == "v1.1.0"
        assert follower.poll() is False  # not fetched again: the version stays rejected
        assert "v1.2.0 rejected" in client.get("/readyz").json()["registry"]["error"]


def test_no_model_yet_is_503_with_the_reason(tmp_path: Path) -> None:
    follower = RegistryFollower(
        git_url=str(tmp_path / "nowhere.git"),
        artifact="mnist-classifier",
        stage="production",
        model_dir=tmp_path / "models",
        interval_s=3600,
        timeout_s=30,
        device="cpu",
    )
    store = ModelStore(follower.model_path, device="cpu")
    with TestClient(create_app(SERVE, store, follower=follower)) as client:
        follower.poll()
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "unreachable" in response.json()["detail"], response.json()
        assert client.post("/v1/predict", json={"images": IMAGE}).status_code == 503
