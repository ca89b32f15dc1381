"""Request/response shapes of the HTTP API, for the OpenAPI document.

The JSON batch of ``POST /v1/predict`` is *parsed* with numpy (see
:func:`pipeline.serving.server.parse_batch`) because validating 784 numbers per image
through pydantic would dominate the latency; :func:`predict_request_schema` still
publishes its exact JSON schema (with the configured ``max_batch``) so clients and
fuzzers see the real contract. Responses are documented here and built as plain dicts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

SIDE = 28


def predict_request_schema(max_batch: int) -> dict[str, Any]:
    """JSON schema of ``{"images": [N x 28 x 28 numbers in [0, 255]]}``, 1 <= N <= max_batch."""
    pixel = {"type": "number", "minimum": 0, "maximum": 255}
    row = {"type": "array", "items": pixel, "minItems": SIDE, "maxItems": SIDE}
    image = {"type": "array", "items": row, "minItems": SIDE, "maxItems": SIDE}
    return {
        "title": "PredictRequest",
        "type": "object",
        "additionalProperties": False,
        "required": ["images"],
        "properties": {
            "images": {
                "type": "array",
                "items": image,
                "minItems": 1,
                "maxItems": max_batch,
                "description": "Raw greyscale pixels, white ink on black as in MNIST.",
            }
        },
    }


class Prediction(BaseModel):
    digit: int = Field(ge=0, le=9, description="argmax class")
    probability: float = Field(ge=0, le=1, description="probability of `digit`")
    probabilities: list[float] = Field(
        min_length=10,
        max_length=10,
        description="softmax over digits 0..9 (6 decimals), temperature-calibrated when the "
        "model records a temperature",
    )
    confident: bool | None = Field(
        description="`probability >= confidence_threshold` (the threshold recorded in the "
        "model, chosen on validation for a target precision): false means abstain or ask a "
        "person; null when the model records no threshold"
    )


class PredictResponse(BaseModel):
    model_sha256: str = Field(description="sha256 of the ONNX file that answered")
    model_version: str | None
    registry_version: str | None = Field(
        default=None, description="registry version (GTO) of the model, with `serve --follow`"
    )
    provider: str = Field(description="onnxruntime execution provider used")
    confidence_threshold: float | None = Field(
        default=None,
        description="the model's abstention threshold (ONNX metadata `confidence_threshold`); "
        "null when it records none",
    )
    predictions: list[Prediction]


class ErrorResponse(BaseModel):
    error: str = Field(description="machine-readable code, e.g. `bad_shape`")
    detail: Any = Field(description="what was wrong, for people")


class Health(BaseModel):
    status: str
    model_loaded: bool
    provider: str | None
    model_sha256: str | None


class Readiness(Health):
    detail: str | None = Field(
        default=None, description="set when the last model reload was refused (and why)"
    )
    registry_version: str | None = None
    registry: dict[str, Any] | None = Field(
        default=None, description="`serve --follow`: registry state, last error and why"
    )


class IOSpec(BaseModel):
    name: str
    type: str
    shape: list[str]


class ModelInfo(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    path: str
    sha256: str
    size_bytes: int
    version: str | None
    provider: str
    providers_requested: list[str]
    loaded_at: float
    producer: str
    graph_name: str
    inputs: list[IOSpec]
    outputs: list[IOSpec]
    metadata: dict[str, str] = Field(description="the ONNX file's metadata_props (provenance)")
    reloads: int = Field(description="model swaps since start-up")
    failed_reloads: int = Field(description="model files refused since start-up")
    last_reload_error: str | None = Field(
        description="why the last model file was refused (contract, unreadable), if it was"
    )
    model_file_missing: str | None = Field(
        description="set while the production model file is missing (this one keeps serving)"
    )
    registry_version: str | None = None
    registry: dict[str, Any] | None = Field(
        default=None, description="`serve --follow`: registry state, last error and why"
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "malformed request (not JSON, bad Content-Length)",
        401: "missing or wrong bearer token (when the service has one)",
        408: "the body did not arrive within serve.body_timeout_s",
        413: "body larger than serve.max_body_bytes",
        422: "valid JSON/multipart but not a valid batch or image",
        503: "no model loaded yet, model file missing, or busy (with Retry-After)",
    }.items()
}
