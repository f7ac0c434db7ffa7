"""How a failure becomes an HTTP answer: one exception-to-status table, the JSON error body every
error shares, and the app's exception handlers."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ragrt.decoding.sampling import MAX_STOP_STRINGS
from ragrt.errors import RagrtError, UserInputError
from ragrt.serve.batcher import Closed, DeadlineExceeded, QueueFull
from ragrt.serve.schemas import MAX_STOP_CHARS, ErrorResponse

log = logging.getLogger("ragrt.server")


class NotReady(RagrtError):
    """The bundle is still opening, or failed to open."""


STATUS = {UserInputError: (422, "invalid_request_error"), QueueFull: (429, "queue_full"),
          DeadlineExceeded: (503, "deadline_exceeded"), Closed: (503, "shutting_down"), NotReady: (503, "not_ready")}
INTERNAL = (500, "internal_error")
# The error answers every endpoint documents in OpenAPI.
ERRORS = {code: {"model": ErrorResponse, "description": kind}
          for code, kind in [(401, "missing or wrong API key"), (413, "request body too large"),
                             (422, "invalid request"), (429, "queue full"),
                             (503, "not ready, shutting down, or deadline passed")]}


# Fields whose pydantic errors would quote a regex or list every branch of a union: one message each.
BLANK = {"question": "the question is empty", "query": "the query is empty"}
FIELD_ERRORS = {"stop": f"give a string or a list of at most {MAX_STOP_STRINGS} strings, "
                        f"each 1 to {MAX_STOP_CHARS} characters"}


def invalid_messages(errors: list[dict]) -> list[str]:
    """One "field: what is wrong" a location, in the words the CLI uses where it has them."""
    messages: dict[str, str] = {}
    for e in errors:
        loc = [str(part) for part in e["loc"]]
        loc = loc[1:] if loc[:1] == ["body"] else loc
        field = loc[0] if loc else ""
        if field in FIELD_ERRORS:
            messages.setdefault(field, FIELD_ERRORS[field])
        elif field in BLANK and e["type"] == "string_pattern_mismatch":
            messages.setdefault(field, BLANK[field])
        else:
            messages.setdefault(".".join(loc), e["msg"])
    return [f"{where}: {msg}" if where else msg for where, msg in messages.items()]


def http_status(exc: BaseException) -> tuple[int, str]:
    """The status code and error type that answer `exc`; anything unlisted is an internal error."""
    return next((v for t, v in STATUS.items() if isinstance(exc, t)), INTERNAL)


def error_body(message: str, kind: str) -> dict:
    return {"error": {"message": message, "type": kind}}


def error(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind), status_code=status, headers=headers)


def add_error_handlers(app: FastAPI) -> None:
    """Every error answers JSON in one shape, never a traceback."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        return error(422, "; ".join(invalid_messages(exc.errors())[:3]) or "invalid request", "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, exc: HTTPException):
        if exc.status_code == 400:     # FastAPI's answer to a body that is not UTF-8 JSON
            return error(422, f"the request body is not valid JSON ({exc.detail})", "invalid_request_error")
        return error(exc.status_code, str(exc.detail), "http_error", getattr(exc, "headers", None))

    @app.exception_handler(RagrtError)
    async def ragrt_error(_: Request, exc: RagrtError):
        status, kind = http_status(exc)
        return error(status, str(exc), kind, {"Retry-After": "1"} if status in (429, 503) else None)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unexpected error")
        status, kind = INTERNAL
        return error(status, f"internal error: {type(exc).__name__}", kind)
