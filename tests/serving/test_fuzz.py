"""Property-based fuzzing from the service's own OpenAPI document (schemathesis 4).

Requests for every operation are generated from ``/openapi.json``, valid ones
(positive mode) and schema-violating ones (negative mode), and sent to a real uvicorn.
The server must never answer 5xx, and its content types must match the document.

(Schemathesis' ``pytest.from_fixture`` breaks on pytest 9, so the strategies are
driven by a Hypothesis ``@given`` inside the test instead.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import content_type_conformance, not_a_server_error

from pipeline.serving.model_store import MODEL_FILE, ModelStore

from .conftest import install, start_server, stop_server


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, onnx_models: tuple[Path, Path]
) -> Iterator[tuple[schemathesis.BaseSchema, str]]:
    prod = tmp_path_factory.mktemp("fuzz") / "production"
    install(onnx_models[0], prod)
    live = start_server(ModelStore(prod / MODEL_FILE, device="cpu"))
    try:
        yield schemathesis.openapi.from_url(f"{live.url}/openapi.json"), live.url
    finally:
        stop_server(live)


@pytest.mark.slow
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_errors(api: tuple[schemathesis.BaseSchema, str], mode: GenerationMode) -> None:
    schema, url = api
    labels = {op.ok().label for op in schema.get_all_operations()}  # type: ignore[union-attr]
    assert {"POST /v1/predict", "POST /v1/predict/image", "GET /v1/model"} <= labels
    seen: set[str] = set()

    @given(case=schema.as_strategy(generation_mode=mode))
    @settings(
        max_examples=100,
        deadline=None,
        database=None,
        # 28x28 nested arrays are large examples by Hypothesis standards.
        suppress_health_check=list(HealthCheck),
    )
    def run(case: schemathesis.Case) -> None:
        seen.add(case.operation.label)
        case.call_and_validate(
            base_url=url, checks=[not_a_server_error, content_type_conformance], timeout=30
        )

    run()
    # Every operation was exercised; negative mode needs something to break, so only
    # the operations with a request body get negative cases.
    with_body = {"POST /v1/predict", "POST /v1/predict/image"}
    assert seen == (labels if mode is GenerationMode.POSITIVE else with_body)
