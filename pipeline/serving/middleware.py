"""The ASGI middleware stack of the HTTP service, and the request body size cap.

Outermost first, as :func:`add_middleware_stack` installs them:
:class:`~pipeline.serving.metrics.MetricsMiddleware` (counts and times every request,
refused ones included), :class:`~pipeline.serving.guards.DeadlineMiddleware` (the body
must arrive in time), :class:`BodyLimitMiddleware` (the body must fit the cap),
:class:`~pipeline.serving.guards.AuthMiddleware` (bearer token on the predict endpoints)
and :class:`~pipeline.serving.guards.AdmissionMiddleware` (in-flight request and byte
limits). All of them answer before the routes parse anything.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.core.config import ServeConfig
from pipeline.serving.errors import BodyTooLarge
from pipeline.serving.guards import (
    Admission,
    AdmissionMiddleware,
    AuthMiddleware,
    DeadlineMiddleware,
    send_error,
)
from pipeline.serving.metrics import Metrics, MetricsMiddleware


def add_middleware_stack(
    app: FastAPI, serve: ServeConfig, metrics: Metrics, token: str | None
) -> None:
    """Install the middlewares in the order of the module docstring (``token``: None = open)."""
    admission = Admission(serve.max_inflight_requests, serve.max_inflight_bytes)
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


def declared_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    """The ``Content-Length`` header as an int (the last one if repeated), None if absent.

    Raises ValueError when any ``Content-Length`` is not a number.
    """
    declared = None
    for name, value in headers:
        if name == b"content-length":
            declared = int(value)
    return declared


async def drain(receive: Receive, budget: int) -> None:
    """Read and drop the rest of the body, stopping once about ``budget`` bytes are read.

    Closing a socket with unread data makes the kernel send a reset, and the client
    would lose the 413 and see a connection error instead.
    """
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class _BodyMeter:
    """One request's body accounting, as wrapped ``receive`` and ``send`` callables.

    ``seen``: body bytes received so far; ``started``: the response has begun (too late
    for a 413 of our own); ``overflowed``: the cap was passed with more body to come, so
    the rest must be drained before any response goes out.
    """

    def __init__(self, receive: Receive, send: Send, max_bytes: int, drain_bytes: int) -> None:
        self._receive = receive
        self._send = send
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes
        self.seen = 0
        self.started = False
        self.overflowed = False

    async def receive(self) -> Message:
        """The next message; raises :class:`BodyTooLarge` once the body passes the cap."""
        message = await self._receive()
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.max_bytes:
                if message.get("more_body", False):
                    self.overflowed = True
                raise BodyTooLarge(self.max_bytes)
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if self.overflowed:  # the app rendered our BodyTooLarge: drain first
                await self.drain_rest()
        await self._send(message)

    async def drain_rest(self) -> None:
        """Drain what is left of an overflowed body (once), up to ``drain_bytes`` in all."""
        self.overflowed = False
        await drain(self._receive, self.drain_bytes - self.seen)


class BodyLimitMiddleware:
    """Reject bodies over ``max_bytes`` before any parsing.

    A declared ``Content-Length`` over the cap is answered 413 without buffering a
    byte; otherwise (e.g. chunked uploads) ``receive`` is wrapped and counts bytes as
    they stream in, raising :class:`BodyTooLarge` the moment the cap is passed. A
    ``Content-Length`` that is not a number is answered 400.

    Before a 413 goes out, the rest of the body is read and discarded (up to
    ``DRAIN_FACTOR * max_bytes``), see :func:`drain`.
    """

    DRAIN_FACTOR = 4

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            declared = declared_length(scope["headers"])
        except ValueError:
            await send_error(send, 400, "bad_content_length", "Content-Length is not a number")
            return
        if declared is not None and declared > self.max_bytes:
            err = BodyTooLarge(self.max_bytes, declared)
            await drain(receive, self.DRAIN_FACTOR * self.max_bytes)
            await send_error(send, 413, err.error, err.detail)
            return
        await self._call_metered(scope, receive, send)

    async def _call_metered(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the app on a metered body; answer 413 if it passes the cap before a response."""
        meter = _BodyMeter(receive, send, self.max_bytes, self.DRAIN_FACTOR * self.max_bytes)
        try:
            await self.app(scope, meter.receive, meter.send)
        except BodyTooLarge as err:
            if meter.started:
                raise
            if meter.overflowed:
                await meter.drain_rest()
            await send_error(send, 413, err.error, err.detail)
