"""Client errors of the HTTP service and the handlers that render them.

Every error a route raises, and every 404/405 from routing, goes out as JSON
``{"error": code, "detail": message}`` with the exception's status and headers; request
validation errors (FastAPI's own, e.g. a missing upload field) go out as 422
``{"error": "invalid_request", "detail": [{"loc", "msg", "type"}, ...]}``.
Errors sent before routing (by the ASGI middlewares) use the same body shape, written by
:func:`pipeline.serving.guards.send_error`.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.serving.guards import RETRY_AFTER_S, Overloaded
from pipeline.serving.metrics import Metrics

# Codes for the statuses routing itself raises (no ``error`` attribute); others "http_<status>".
HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request"}


class ApiError(StarletteHTTPException):
    """A client error with a machine-readable code; rendered as ``{"error", "detail"}``."""

    def __init__(
        self, status_code: int, error: str, detail: Any, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)
        self.error = error


class BodyTooLarge(ApiError):
    """413: the request body passed the cap; ``seen`` is the declared size when known."""

    def __init__(self, limit: int, seen: int | None = None) -> None:
        said = f"request body is {seen} bytes" if seen is not None else "request body is larger"
        super().__init__(413, "body_too_large", f"{said}; the limit is {limit} bytes")


def overloaded(err: Overloaded) -> ApiError:
    """503 with ``Retry-After``: no work slot came free in time (a load limit, not a fault)."""
    return ApiError(
        503, "overloaded", f"{err}; retry later", headers={"Retry-After": str(RETRY_AFTER_S)}
    )


def error_code(exc: StarletteHTTPException) -> str:
    """The ``error`` field: an :class:`ApiError`'s own code, else one named after the status."""
    return getattr(exc, "error", None) or HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")


async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 listing each failed check as ``{"loc", "msg", "type"}`` (no echo of the input)."""
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Render HTTP and validation errors as above; count overload 503s in ``metrics.shed``.

    The admission middleware counts the 503s it sends itself; the ones counted here come
    from the routes, when no work slot came free (``reason="work_slots"``).
    """

    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = error_code(exc)
        if exc.status_code == 503 and code == "overloaded":
            metrics.shed.labels("work_slots").inc()
        return JSONResponse(
            {"error": code, "detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    app.exception_handler(StarletteHTTPException)(http_error)
    app.exception_handler(RequestValidationError)(validation_error)
