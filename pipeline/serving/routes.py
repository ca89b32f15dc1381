"""The HTTP routes of the service, declared on an ``APIRouter`` (normally ``app.router``).

Every route reads what it needs (config, model store, work slots, metrics, registry
follower) from ``request.app.state.serving``, a :class:`ServingState` that
:func:`include_routes` puts there. It is read directly rather than through ``Depends``:
solving one per request costs about a third of a whole ``/healthz``.

The handlers carry no docstrings on purpose: FastAPI would publish them as the
operations' descriptions in ``/openapi.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response

from pipeline.core.config import ServeConfig
from pipeline.core.errors import ImageDecodeError
from pipeline.serving.errors import ApiError, overloaded
from pipeline.serving.guards import Overloaded, WorkSlots
from pipeline.serving.imaging import to_mnist
from pipeline.serving.metrics import CONTENT_TYPE, Metrics
from pipeline.serving.model_store import REPORTED_DECIMALS, ModelStore, ServedModel, is_confident
from pipeline.serving.schemas import (
    ERRORS,
    Health,
    ModelInfo,
    PredictResponse,
    Readiness,
    predict_request_schema,
)

if TYPE_CHECKING:
    from pipeline.serving.follower import RegistryFollower

# Bodies up to this size (a handful of images) are parsed and run on the event loop:
# a thread hop costs more than the work. Bigger batches go to the thread pool so one
# large request cannot stall the others (onnxruntime releases the GIL while it runs).
INLINE_BODY_BYTES = 32 * 1024


@dataclass(frozen=True)
class ServingState:
    """What the routes share for the app's lifetime.

    ``slots`` bounds image decodes and thread-pool inferences; ``follower`` is set under
    ``serve --follow`` and names the registry version in the answers.
    """

    serve: ServeConfig
    store: ModelStore
    slots: WorkSlots
    metrics: Metrics
    follower: RegistryFollower | None = None


def state_of(request: Request) -> ServingState:
    """The :class:`ServingState` of the app serving ``request``."""
    state: ServingState = request.app.state.serving
    return state


def include_routes(app: FastAPI, state: ServingState) -> None:
    """Attach ``state`` to ``app`` and add the routes of :func:`add_routes` to it.

    The routes go on ``app.router`` itself rather than through ``include_router``: newer
    FastAPI includes a router lazily, which puts one more matching layer in front of
    every request and hides the route paths from ``app.routes`` (read for metrics labels).
    """
    app.state.serving = state
    add_routes(app.router, state.serve.max_batch)


def add_routes(router: APIRouter, max_batch: int) -> None:
    """Declare the service's routes on ``router``; ``max_batch`` goes into the request schema."""
    router.add_api_route(
        "/healthz", healthz, methods=["GET"], response_model=Health, summary="liveness"
    )
    router.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        response_model=Readiness,
        responses={503: ERRORS[503]},
        summary="readiness",
    )
    router.add_api_route(
        "/v1/model",
        model_info,
        methods=["GET"],
        response_model=ModelInfo,
        responses={503: ERRORS[503]},
    )
    router.add_api_route("/metrics", prometheus, methods=["GET"], include_in_schema=False)
    router.add_api_route(
        "/v1/predict",
        predict,
        methods=["POST"],
        response_model=PredictResponse,
        responses={k: ERRORS[k] for k in (400, 401, 408, 413, 422, 503)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": predict_request_schema(max_batch)}},
            }
        },
        summary="classify a batch of 28x28 images (raw pixels 0..255)",
    )
    router.add_api_route(
        "/v1/predict/image",
        predict_image,
        methods=["POST"],
        response_model=PredictResponse,
        responses={k: ERRORS[k] for k in (401, 408, 413, 422, 503)},
        summary="classify one PNG/JPEG of a digit (any size; MNIST-style preprocessing)",
    )


# --- request parsing and answers ------------------------------------------------------------


def _reject_constant(name: str) -> float:
    raise ApiError(422, "bad_value", f"{name} is not allowed; pixels must be finite numbers")


def parse_batch(body: bytes, max_batch: int) -> npt.NDArray[np.float32]:
    """``{"images": [...]}`` JSON bytes -> ``(N, 28, 28) float32`` in ``[0, 255]``.

    Raises :class:`ApiError` (400 for bad JSON, 422 for a valid JSON that is not a
    valid batch). Conversion is one ``np.asarray`` call; the checks are vectorised.
    """
    try:
        obj = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        # ValueError covers JSONDecodeError and undecodable (non-UTF) bytes.
        raise ApiError(400, "invalid_json", f"body is not valid JSON: {err}") from err
    if not isinstance(obj, dict) or "images" not in obj:
        raise ApiError(422, "bad_request", 'body must be a JSON object {"images": [...]}')
    extra = sorted(set(obj) - {"images"})
    if extra:
        raise ApiError(422, "bad_request", f"unknown fields {extra}; only 'images' is allowed")
    images = obj["images"]
    if not isinstance(images, list):
        raise ApiError(422, "bad_type", f"'images' must be a list, got {type(images).__name__}")
    if not images:
        raise ApiError(422, "empty_batch", "'images' is empty; send 1 or more images")
    if len(images) > max_batch:
        raise ApiError(
            422, "batch_too_large", f"{len(images)} images in one request; the limit is {max_batch}"
        )
    try:
        arr = np.asarray(images)
    except (ValueError, OverflowError, TypeError) as err:
        # numpy >= 1.24 refuses ragged nesting with ValueError.
        raise ApiError(
            422, "bad_shape", f"every image must be a 28x28 array of numbers ({err})"
        ) from err
    if arr.ndim != 3 or arr.shape[1:] != (28, 28):
        raise ApiError(
            422,
            "bad_shape",
            f"images must have shape [N, 28, 28]; got {list(arr.shape)}",
        )
    if arr.dtype.kind not in "iuf" or (b"true" in body or b"false" in body):
        # Strings, nulls, objects, booleans. (Strings would make the dtype non-numeric,
        # and the only key allowed is "images", so a JSON true/false literal is a pixel.)
        kind = "booleans" if arr.dtype.kind in "biuf" else f"non-numbers ({arr.dtype})"
        raise ApiError(422, "bad_type", f"pixels must be numbers; got {kind}")
    lo, hi = float(arr.min()), float(arr.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
        raise ApiError(422, "out_of_range", f"pixels must be in [0, 255]; got min {lo}, max {hi}")
    return arr.astype(np.float32)


def _predictions(
    model: ServedModel, images: npt.NDArray[np.float32], registry_version: str | None = None
) -> dict[str, Any]:
    """The :class:`PredictResponse` body for ``images`` ``(N, 28, 28)``: one entry per image."""
    _, probs = model.predict(images)
    digits = probs.argmax(axis=1)
    rounded = np.round(probs.astype(np.float64), REPORTED_DECIMALS).tolist()
    threshold = model.confidence_threshold
    return {
        "model_sha256": model.sha256,
        "model_version": model.version,
        "registry_version": registry_version,
        "provider": model.provider,
        "confidence_threshold": threshold,
        "predictions": [
            {
                "digit": int(d),
                "probability": float(p[d]),
                "probabilities": p,
                "confident": is_confident(p[d], threshold),
            }
            for d, p in zip(digits.tolist(), rounded, strict=True)
        ],
    }


def _model_or_503(state: ServingState) -> ServedModel:
    """The model to answer with, or a 503 ``not_ready`` saying why there is none.

    The model is read once: the request keeps it even if a hot swap happens meanwhile.
    """
    follower, store = state.follower, state.store
    if follower is not None and store.current is None:
        why = follower.state.error or "waiting for the first model from the registry"
        raise ApiError(503, "not_ready", f"registry {follower.git_url}: {why}")
    model = store.current
    if model is None:
        raise ApiError(503, "not_ready", store.state.last_error or "no model loaded yet")
    return model


def _registry_version(state: ServingState, model: ServedModel) -> str | None:
    return state.follower.version_of(model.sha256) if state.follower is not None else None


def _registry_status(state: ServingState) -> dict[str, Any] | None:
    return state.follower.status() if state.follower else None


# --- handlers ---------------------------------------------------------------------------------


async def healthz(request: Request) -> dict[str, Any]:
    state = state_of(request)
    model = state.store.current
    return {
        "status": "ok",
        "model_loaded": model is not None,
        "provider": model.provider if model else None,
        "model_sha256": model.sha256 if model else None,
    }


async def readyz(request: Request) -> dict[str, Any]:
    state = state_of(request)
    model = _model_or_503(state)
    store = state.store
    if store.state.missing is not None:
        # Still answering with the loaded model, but the deployment is broken.
        raise ApiError(
            503, "model_missing", f"{store.state.missing}; still serving sha256={model.sha256}"
        )
    rejected = store.state.last_error
    return {
        "status": "ready",
        "model_loaded": True,
        "provider": model.provider,
        "model_sha256": model.sha256,
        "detail": f"last reload refused, serving the previous model: {rejected}"
        if rejected
        else None,
        "registry_version": _registry_version(state, model),
        "registry": _registry_status(state),
    }


async def model_info(request: Request) -> dict[str, Any]:
    state = state_of(request)
    model = _model_or_503(state)
    reload_state = state.store.state
    return {
        **model.describe(),
        "reloads": reload_state.reloads,
        "failed_reloads": reload_state.failed_reloads,
        "last_reload_error": reload_state.last_error,
        "model_file_missing": reload_state.missing,
        "registry_version": _registry_version(state, model),
        "registry": _registry_status(state),
    }


async def prometheus(request: Request) -> Response:
    return Response(state_of(request).metrics.render(), media_type=CONTENT_TYPE)


async def predict(request: Request) -> JSONResponse:
    state = state_of(request)
    model = _model_or_503(state)
    version = _registry_version(state, model)
    max_batch = state.serve.max_batch
    body = await request.body()
    if len(body) <= INLINE_BODY_BYTES:
        result = _predictions(model, parse_batch(body, max_batch), version)
    else:
        try:
            async with state.slots.slot():
                images = await run_in_threadpool(parse_batch, body, max_batch)
                del body  # the pixels are parsed: let the JSON text go
                result = await run_in_threadpool(_predictions, model, images, version)
        except Overloaded as err:
            raise overloaded(err) from None
    return JSONResponse(result)


async def predict_image(
    request: Request,
    file: UploadFile = File(description="PNG or JPEG, dark ink on light or the reverse"),  # noqa: B008
) -> JSONResponse:
    state = state_of(request)
    model = _model_or_503(state)
    serve = state.serve
    data = await file.read()
    try:
        async with state.slots.slot():
            image = await run_in_threadpool(
                to_mnist, data, serve.max_image_pixels, serve.max_image_side
            )
    except ImageDecodeError as err:
        raise ApiError(422, "bad_image", f"{file.filename or 'upload'}: {err}") from err
    except Overloaded as err:
        raise overloaded(err) from None
    return JSONResponse(_predictions(model, image[None], _registry_version(state, model)))
