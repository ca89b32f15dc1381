"""``python -m pipeline serve``: FastAPI on uvicorn over the production ONNX model.

Endpoints: ``POST /v1/predict`` (JSON batch), ``POST /v1/predict/image`` (PNG/JPEG
upload), ``GET /healthz`` (liveness), ``GET /readyz`` (503 until a model is loaded, or
while the production model file is missing), ``GET /v1/model`` (ONNX metadata, sha256,
provider), ``GET /metrics`` (Prometheus), ``GET /openapi.json`` (+ ``/docs`` unless
``serve.docs`` is false).

Every client mistake gets a 4xx with ``{"error": code, "detail": message}``; load
limits answer 503 with ``Retry-After``. A background task polls
``production_dir/model.onnx`` every ``reload_interval_s`` and hot-swaps the model (see
:mod:`pipeline.serving.model_store`); a file that breaks the model contract is refused
and the old model stays.

This module builds the app and runs it; the parts live next to it: the routes in
:mod:`pipeline.serving.routes`, the error bodies in :mod:`pipeline.serving.errors`, the
middleware stack (body size cap, time, concurrency, memory and token checks, metrics) in
:mod:`pipeline.serving.middleware` and :mod:`pipeline.serving.guards`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from pipeline.core.config import RegistryConfig, ServeConfig
from pipeline.core.errors import ConfigError
from pipeline.serving.errors import add_error_handlers
from pipeline.serving.guards import WorkSlots, header_timeout_protocol
from pipeline.serving.metrics import Metrics
from pipeline.serving.middleware import add_middleware_stack
from pipeline.serving.model_store import MODEL_FILE, ModelStore
from pipeline.serving.routes import ServingState, include_routes, parse_batch

if TYPE_CHECKING:
    from pipeline.serving.follower import RegistryFollower

# parse_batch lives with the routes; tests and docs import it from here too.
__all__ = [
    "build_store",
    "create_app",
    "is_loopback",
    "parse_batch",
    "resolve_token",
    "run_server",
    "uvicorn_config",
]

log = logging.getLogger("pipeline.serving")


# --- background reloads -------------------------------------------------------------------


async def _poll_forever(store: ModelStore, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            await run_in_threadpool(store.poll)
        except Exception:
            log.exception("model poll failed; will retry")


async def _follow_forever(follower: RegistryFollower, store: ModelStore) -> None:
    """Poll the registry; after an install, reload the store at once (not at its next poll)."""
    while True:
        try:
            if await run_in_threadpool(follower.poll):
                await run_in_threadpool(store.poll)
        except Exception:
            log.exception("registry poll failed; will retry")
        await asyncio.sleep(follower.interval_s)


async def _load_first_model(store: ModelStore) -> None:
    """Load the model before serving; without one, start anyway and say so once."""
    await run_in_threadpool(store.poll)
    if store.current is None:  # (a loaded model was logged by poll, with its provider)
        log.warning(
            "no model at %s (%s); /readyz answers 503 until one appears",
            store.path,
            store.state.last_error,
        )


def _start_pollers(
    store: ModelStore, interval_s: float | None, follower: RegistryFollower | None
) -> list[asyncio.Task[None]]:
    """The background tasks: the file poll (every ``interval_s``; None = off), the follower."""
    tasks = []
    if interval_s is not None:
        tasks.append(asyncio.create_task(_poll_forever(store, interval_s)))
    if follower is not None:
        tasks.append(asyncio.create_task(_follow_forever(follower, store)))
    return tasks


async def _stop(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel each task and wait until it has ended, in order."""
    for task in tasks:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# --- the app --------------------------------------------------------------------------------


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
        await _load_first_model(store)
        tasks = _start_pollers(store, serve.reload_interval_s if poll else None, follower)
        try:
            yield
        finally:
            await _stop(tasks)

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
    add_middleware_stack(app, serve, metrics, token)
    add_error_handlers(app, metrics)
    slots = WorkSlots(serve.max_concurrent_work, serve.queue_timeout_s)
    include_routes(app, ServingState(serve, store, slots, metrics, follower))
    metrics.route_paths = frozenset(getattr(r, "path", "") for r in app.routes)
    return app


# --- running it ---------------------------------------------------------------------------


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
