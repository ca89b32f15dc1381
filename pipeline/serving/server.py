"""``python -m pipeline serve``: FastAPI on uvicorn over the production ONNX model.

Endpoints: ``POST /v1/predict`` (JSON batch), ``POST /v1/predict/image`` (PNG/JPEG
upload), ``GET /healthz`` (liveness), ``GET /readyz`` (503 until a model is loaded, or
while the production model file is missing), ``GET /v1/model`` (ONNX metadata, sha256,
provider), ``GET /metrics`` (Prometheus), ``GET /openapi.json`` (+ ``/docs`` unless
``serve.docs`` is false).

Every client mistake gets a 4xx with ``{"error": code, "detail": message}``; load
limits answer 503 with ``Retry-After``. The body size cap is enforced by
:class:`BodyLimitMiddleware` before anything is parsed; time, concurrency, memory and
token checks are in :mod:`pipeline.serving.guards`. A background task polls
``production_dir/model.onnx`` every ``reload_interval_s`` and hot-swaps the model (see
:mod:`pipeline.serving.model_store`); a file that breaks the model contract is refused
and the old model stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.config import RegistryConfig, ServeConfig
from pipeline.errors import ConfigError, ImageDecodeError
from pipeline.serving.guards import (
    RETRY_AFTER_S,
    Admission,
    AdmissionMiddleware,
    AuthMiddleware,
    DeadlineMiddleware,
    Overloaded,
    WorkSlots,
    header_timeout_protocol,
    send_error,
)
from pipeline.serving.imaging import to_mnist
from pipeline.serving.metrics import CONTENT_TYPE, Metrics, MetricsMiddleware
from pipeline.serving.model_store import (
    MODEL_FILE,
    REPORTED_DECIMALS,
    ModelStore,
    ServedModel,
    is_confident,
)
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

log = logging.getLogger("pipeline.serving")

# Bodies up to this size (a handful of images) are parsed and run on the event loop:
# a thread hop costs more than the work. Bigger batches go to the thread pool so one
# large request cannot stall the others (onnxruntime releases the GIL while it runs).
INLINE_BODY_BYTES = 32 * 1024


class ApiError(StarletteHTTPException):
    """A client error with a machine-readable code; rendered as ``{"error", "detail"}``."""

    def __init__(
        self, status_code: int, error: str, detail: Any, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.error = error


def _overloaded(err: Overloaded) -> ApiError:
    return ApiError(
        503, "overloaded", f"{err}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


class BodyTooLarge(ApiError):
    def __init__(self, limit: int, seen: int | None = None) -> None:
        said = f"request body is {seen} bytes" if seen is not None else "request body is larger"
        super().__init__(413, "body_too_large", f"{said}; the limit is {limit} bytes")


class BodyLimitMiddleware:
    """Reject bodies over ``max_bytes`` before any parsing.

    A declared ``Content-Length`` over the cap is answered 413 without buffering a
    byte; otherwise (e.g. chunked uploads) ``receive`` is wrapped and counts bytes as
    they stream in, raising :class:`BodyTooLarge` the moment the cap is passed.

    Before a 413 goes out, the rest of the body is read and discarded (up to
    ``DRAIN_FACTOR * max_bytes``): closing a socket with unread data makes the kernel
    send a reset, and the client would lose the 413 and see a connection error.
    """

    DRAIN_FACTOR = 4

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def _drain(self, receive: Receive, already: int) -> None:
        budget = self.DRAIN_FACTOR * self.max_bytes - already
        while budget > 0:
            message = await receive()
            if message["type"] != "http.request":
                return
            budget -= len(message.get("body", b""))
            if not message.get("more_body", False):
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    detail = "Content-Length is not a number"
                    await send_error(send, 400, "bad_content_length", detail)
                    return
        if declared is not None and declared > self.max_bytes:
            err = BodyTooLarge(self.max_bytes, declared)
            await self._drain(receive, 0)
            await send_error(send, 413, err.error, err.detail)
            return
        seen = 0
        started = overflowed = False

        async def limited_receive() -> Message:
            nonlocal seen, overflowed
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    if message.get("more_body", False):
                        overflowed = True
                    raise BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started, overflowed
            if message["type"] == "http.response.start":
                started = True
                if overflowed:  # the app rendered our BodyTooLarge: drain first
                    overflowed = False
                    await self._drain(receive, seen)
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as err:
            if started:
                raise
            if overflowed:
                await self._drain(receive, seen)
            await send_error(send, 413, err.error, err.detail)


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


def _require_model(store: ModelStore) -> ServedModel:
    model = store.current  # one read: this request keeps this model even if swapped
    if model is None:
        raise ApiError(503, "not_ready", store.state.last_error or "no model loaded yet")
    return model


async def _poll_forever(store: ModelStore, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await run_in_threadpool(store.poll)
        except Exception:
            log.exception("model poll failed; will retry")


# --- registry follower (serve --follow) ---------------------------------------------------


async def _follow_forever(follower: RegistryFollower, store: ModelStore) -> None:
    """Poll the registry; after an install, reload the store at once (not at its next poll)."""
    while True:
        try:
            if await run_in_threadpool(follower.poll):
                await run_in_threadpool(store.poll)
        except Exception:
            log.exception("registry poll failed; will retry")
        await asyncio.sleep(follower.interval_s)


def _registry_version(follower: RegistryFollower | None, model: ServedModel) -> str | None:
    return follower.version_of(model.sha256) if follower is not None else None


def create_app(
    serve: ServeConfig,
    store: ModelStore,
    poll: bool = True,
    token: str | None = None,
    follower: RegistryFollower | None = None,
) -> FastAPI:
    """The ASGI app. ``poll=False`` disables the background reload task (tests).

    ``token``: when given, the predict endpoints require ``Authorization: Bearer <token>``.

    With a ``follower`` the app also polls the registry (``serve --follow``) and names
    the registry version in every prediction, ``/readyz`` and ``/v1/model``.
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(store.poll)
        if store.current is None:  # (a loaded model was logged by poll, with its provider)
            log.warning(
                "no model at %s (%s); /readyz answers 503 until one appears",
                store.path,
                store.state.last_error,
            )
        task = asyncio.create_task(_poll_forever(store, serve.reload_interval_s)) if poll else None
        follow = asyncio.create_task(_follow_forever(follower, store)) if follower else None
        try:
            yield
        finally:
            for running in (task, follow):
                if running is not None:
                    running.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await running

    app = FastAPI(
        title="MNIST digit classifier",
        version="1",
        description="onnxruntime inference on the production model; hot-swapped on promotion.",
        lifespan=lifespan,
        # Swagger UI / ReDoc come from a CDN: serve.docs=false on offline machines.
        docs_url="/docs" if serve.docs else None,
        redoc_url="/redoc" if serve.docs else None,
    )
    metrics = Metrics(store)
    admission = Admission(serve.max_inflight_requests, serve.max_inflight_bytes)
    slots = WorkSlots(serve.max_concurrent_work, serve.queue_timeout_s)
    # add_middleware wraps: the last added is the outermost.
    app.add_middleware(
        AdmissionMiddleware,
        admission=admission,
        unknown_size=serve.max_body_bytes,
        on_shed=lambda kind: metrics.shed.labels(kind).inc(),
    )
    app.add_middleware(AuthMiddleware, token=token)
    app.add_middleware(BodyLimitMiddleware, max_bytes=serve.max_body_bytes)
    app.add_middleware(DeadlineMiddleware, body_timeout_s=serve.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = getattr(exc, "error", None) or _http_code(exc.status_code)
        if exc.status_code == 503 and code == "overloaded":
            metrics.shed.labels("work_slots").inc()
        return JSONResponse(
            {"error": code, "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    @app.get("/healthz", response_model=Health, summary="liveness")
    async def healthz() -> dict[str, Any]:
        model = store.current
        return {
            "status": "ok",
            "model_loaded": model is not None,
            "provider": model.provider if model else None,
            "model_sha256": model.sha256 if model else None,
        }

    def _model_or_503() -> ServedModel:
        if follower is not None and store.current is None:
            why = follower.state.error or "waiting for the first model from the registry"
            raise ApiError(503, "not_ready", f"registry {follower.git_url}: {why}")
        return _require_model(store)

    @app.get("/readyz", response_model=Readiness, responses={503: ERRORS[503]}, summary="readiness")
    async def readyz() -> dict[str, Any]:
        model = _model_or_503()
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
            "registry_version": _registry_version(follower, model),
            "registry": follower.status() if follower else None,
        }

    @app.get("/v1/model", response_model=ModelInfo, responses={503: ERRORS[503]})
    async def model_info() -> dict[str, Any]:
        model = _model_or_503()
        return {
            **model.describe(),
            "reloads": store.state.reloads,
            "failed_reloads": store.state.failed_reloads,
            "last_reload_error": store.state.last_error,
            "model_file_missing": store.state.missing,
            "registry_version": _registry_version(follower, model),
            "registry": follower.status() if follower else None,
        }

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post(
        "/v1/predict",
        response_model=PredictResponse,
        responses={k: ERRORS[k] for k in (400, 401, 408, 413, 422, 503)},
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": predict_request_schema(serve.max_batch)}
                },
            }
        },
        summary="classify a batch of 28x28 images (raw pixels 0..255)",
    )
    async def predict(request: Request) -> JSONResponse:
        model = _model_or_503()
        version = _registry_version(follower, model)
        body = await request.body()
        if len(body) <= INLINE_BODY_BYTES:
            result = _predictions(model, parse_batch(body, serve.max_batch), version)
        else:
            try:
                async with slots.slot():
                    images = await run_in_threadpool(parse_batch, body, serve.max_batch)
                    del body  # the pixels are parsed: let the JSON text go
                    result = await run_in_threadpool(_predictions, model, images, version)
            except Overloaded as err:
                raise _overloaded(err) from None
        return JSONResponse(result)

    @app.post(
        "/v1/predict/image",
        response_model=PredictResponse,
        responses={k: ERRORS[k] for k in (401, 408, 413, 422, 503)},
        summary="classify one PNG/JPEG of a digit (any size; MNIST-style preprocessing)",
    )
    async def predict_image(
        file: UploadFile = File(description="PNG or JPEG, dark ink on light or the reverse"),  # noqa: B008
    ) -> JSONResponse:
        model = _model_or_503()
        data = await file.read()
        try:
            async with slots.slot():
                image = await run_in_threadpool(
                    to_mnist, data, serve.max_image_pixels, serve.max_image_side
                )
        except ImageDecodeError as err:
            raise ApiError(422, "bad_image", f"{file.filename or 'upload'}: {err}") from err
        except Overloaded as err:
            raise _overloaded(err) from None
        return JSONResponse(_predictions(model, image[None], _registry_version(follower, model)))

    metrics.route_paths = frozenset(getattr(r, "path", "") for r in app.routes)
    return app


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}.get(
        status, f"http_{status}"
    )


def build_store(serve: ServeConfig, registry: RegistryConfig) -> ModelStore:
    return ModelStore(
        registry.production_dir / MODEL_FILE,
        device=serve.device,
        intra_op_threads=serve.intra_op_threads,
    )


LOOPBACK_NAMES = ("localhost",)


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``; anything else can be reached from outside."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: assume reachable
        return False


def resolve_token(serve: ServeConfig, host: str, token: str | None) -> str | None:
    """The bearer token to require, or None. Raises :class:`ConfigError` when a
    non-loopback bind has no token and ``serve.allow_unauthenticated`` is false."""
    if token:
        return token
    if is_loopback(host):
        log.info("no %s set: predict endpoints are open (loopback only)", serve.auth_token_env)
        return None
    if serve.allow_unauthenticated:
        log.warning("serving %s WITHOUT authentication (serve.allow_unauthenticated)", host)
        return None
    raise ConfigError(
        f"refusing to serve on {host} without a token: set the environment variable "
        f"{serve.auth_token_env} (bearer token for /v1/predict*), bind 127.0.0.1, or set "
        "serve.allow_unauthenticated=true"
    )


def uvicorn_config(app: FastAPI, serve: ServeConfig, **kwargs: Any) -> Any:
    """``uvicorn.Config`` with the h11 protocol that times out slow request headers."""
    import uvicorn

    kwargs.setdefault("access_log", serve.access_log)
    return uvicorn.Config(app, http=header_timeout_protocol(serve.header_timeout_s), **kwargs)


def run_server(
    serve: ServeConfig,
    registry: RegistryConfig,
    host: str | None,
    port: int | None,
    token: str | None = None,
    follower: RegistryFollower | None = None,
) -> None:
    """Serve until interrupted. Starts even without a model (readiness says so).

    ``token`` comes from the environment variable named by ``serve.auth_token_env``
    (read by the CLI). Raises :class:`ConfigError` for a non-loopback bind without one.
    With a ``follower`` the served file is the one it installs (``serve --follow``).
    """
    import uvicorn

    bind = host or serve.host
    token = resolve_token(serve, bind, token)
    if follower is not None:
        store = ModelStore(
            follower.model_path, device=serve.device, intra_op_threads=serve.intra_op_threads
        )
    else:
        store = build_store(serve, registry)
    app = create_app(serve, store, token=token, follower=follower)
    # Access logging (serve.access_log) costs ~10% at batch 1; errors are always logged.
    config = uvicorn_config(
        app, serve, host=bind, port=serve.port if port is None else port, log_level="info"
    )
    uvicorn.Server(config).run()
