"""Bounds on what one client can make the service hold: time, concurrency, memory, access.

Pure ASGI middlewares (no body buffering) and one uvicorn protocol, outermost first as
:func:`pipeline.serving.server.create_app` installs them:

- :class:`DeadlineMiddleware`: the whole request body must arrive within
  ``body_timeout_s`` (else 408 and the connection closes); a client that disconnects
  mid-body ends its request quietly (one log line, no traceback);
- :class:`AuthMiddleware`: ``Authorization: Bearer <token>`` on the predict endpoints
  when a token is configured (401 otherwise);
- :class:`AdmissionMiddleware`: at most ``max_inflight_requests`` predict requests and
  ``max_inflight_bytes`` of their bodies at once; beyond, 503 with ``Retry-After``
  before the body is read;
- :class:`WorkSlots`: a semaphore around image decodes and thread-pool inferences; a
  request that cannot get a slot within ``queue_timeout_s`` gets 503 + ``Retry-After``;
- :func:`header_timeout_protocol`: uvicorn's h11 protocol, closing connections whose
  request headers do not arrive within ``header_timeout_s`` (uvicorn itself only times
  out idle keep-alive connections, and the ASGI app never sees a request until its
  headers are complete).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("pipeline.serving")

PREDICT_PREFIX = "/v1/predict"
RETRY_AFTER_S = 1


def is_predict(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    return scope["type"] == "http" and path.startswith(PREDICT_PREFIX)


async def send_error(
    send: Send,
    status: int,
    error: str,
    detail: Any,
    headers: list[tuple[bytes, bytes]] | None = None,
    close: bool = True,
) -> None:
    """A complete JSON error response ``{"error", "detail"}``."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    extra = list(headers or [])
    if close:  # an unread body makes the connection unusable
        extra.append((b"connection", b"close"))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *extra,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def discard_body(receive: Receive) -> None:
    """Read and drop the rest of the body (bounded by the inner size and time limits).

    Closing a socket with unread data makes the kernel send a reset, and the client
    would lose the error response we are about to send.
    """
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


class BodyTimeout(HTTPException):
    """The body did not arrive within the deadline (408).

    An HTTP exception so that FastAPI's form parser re-raises it instead of turning it
    into a 400, and the app's handler renders it; the connection is closed after it.
    """

    error = "body_timeout"

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408,
            detail=f"the request body did not arrive within {timeout_s:g} s",
            headers={"Connection": "close"},
        )


class DeadlineMiddleware:
    """Time-limit the body; end quietly when the client goes away mid-request."""

    def __init__(self, app: ASGIApp, body_timeout_s: float) -> None:
        self.app = app
        self.timeout = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        body_done = started = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # e.g. a wait for disconnect after the body: not time-limited
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                log.info("%s %s: body not received within %.1f s", *_who(scope), self.timeout)
                raise BodyTimeout(self.timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, timed_receive, tracking_send)
        except BodyTimeout as err:  # raised outside the app's handlers (e.g. while draining)
            if not started:
                await send_error(send, 408, err.error, err.detail)
        except ClientDisconnect:
            # Nobody is left to answer; a traceback here would only be noise.
            log.info("%s %s: client disconnected before the body was complete", *_who(scope))


def _who(scope: Scope) -> tuple[str, str]:
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "?"
    return peer, f"{scope.get('method', '')} {scope.get('path', '')}"


class AuthMiddleware:
    """Bearer token on the predict endpoints; everything else stays open (probes, metrics)."""

    def __init__(self, app: ASGIApp, token: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.expected is None or not is_predict(scope):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        await discard_body(receive)
        said = "missing" if not given else "wrong"
        await send_error(
            send,
            401,
            "unauthorized",
            f"{said} bearer token: send 'Authorization: Bearer <token>'",
            headers=[(b"www-authenticate", b"Bearer")],
        )


class Admission:
    """Counts of admitted predict requests and their body bytes (event-loop only)."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self.shed: dict[str, int] = {}

    def refuse_reason(self, size: int) -> str | None:
        if self.requests >= self.max_requests:
            return f"{self.requests} requests in flight (limit {self.max_requests})"
        if self.bytes + size > self.max_bytes:
            return f"{self.bytes} body bytes in flight (limit {self.max_bytes})"
        return None


class AdmissionMiddleware:
    """503 + ``Retry-After`` when the in-flight request or byte budget is spent."""

    def __init__(
        self,
        app: ASGIApp,
        admission: Admission,
        unknown_size: int,
        on_shed: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.admission = admission
        self.unknown_size = unknown_size  # reserved for a body without Content-Length
        self.on_shed = on_shed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_predict(scope):
            await self.app(scope, receive, send)
            return
        size = self.unknown_size
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit():
                size = min(int(value), self.unknown_size)
        adm = self.admission
        reason = adm.refuse_reason(size)
        if reason is not None:
            kind = "requests" if "requests" in reason else "bytes"
            adm.shed[kind] = adm.shed.get(kind, 0) + 1
            if self.on_shed is not None:
                self.on_shed(kind)
            await discard_body(receive)
            await send_error(
                send,
                503,
                "overloaded",
                f"the service is busy ({reason}); retry later",
                headers=[(b"retry-after", str(RETRY_AFTER_S).encode())],
            )
            return
        adm.requests += 1
        adm.bytes += size
        try:
            await self.app(scope, receive, send)
        finally:
            adm.requests -= 1
            adm.bytes -= size


class Overloaded(Exception):
    """No work slot became free within the queue timeout."""


class WorkSlots:
    """At most ``size`` decodes/inferences at once; wait at most ``timeout_s`` for one."""

    def __init__(self, size: int, timeout_s: float) -> None:
        self.size = size
        self.timeout_s = timeout_s
        self._sem = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        try:
            await asyncio.wait_for(self._sem.acquire(), self.timeout_s)
        except TimeoutError:
            raise Overloaded(
                f"all {self.size} work slots stayed busy for {self.timeout_s:g} s"
            ) from None
        try:
            yield
        finally:
            self._sem.release()


def header_timeout_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes a connection whose request headers are late.

    The timer runs from the connection's start (or from the first byte after a
    keep-alive pause, which uvicorn already times) until a request's headers are
    parsed; a slow-headers client gets its connection closed.
    """

    class HeaderTimeoutH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            self._arm()

        def data_received(self, data: bytes) -> None:
            before = self.cycle
            if self._waiting_for_headers() and self._header_timer is None:
                self._arm()
            super().data_received(data)
            if self.cycle is not before:  # a request's headers are complete
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _waiting_for_headers(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expired(self) -> None:
            self._header_timer = None
            if self._waiting_for_headers() and not self.transport.is_closing():
                peer = "%s:%d" % self.client if self.client else "?"  # noqa: UP031
                log.info("%s: request headers not received within %.1f s; closing", peer, timeout_s)
                self.transport.close()

    return HeaderTimeoutH11Protocol
