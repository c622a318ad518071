"""Every error, everywhere, leaves as the OpenAI envelope with the right status.

FastAPI's default 422 `{"detail": [...]}` would give the OpenAI SDK an error with no code,
param or type, so validation errors become 400 envelopes naming the field.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from clawrouter.api.middleware import note_error
from clawrouter.api.schemas import EditBody, GenerationBody, ImageURL
from clawrouter.errors import (
    ClawError, ClientGone, InvalidRequest, MethodNotAllowed, RouteNotFound, internal_error,
)

log = logging.getLogger("clawrouter.api")


class EnvelopeResponse(Response):
    """`error` as every path sends it (`ClawError.rendered`), header names lowercased as
    Starlette's own responses have them."""

    def __init__(self, error: ClawError) -> None:
        body, headers = error.rendered()
        super().__init__(body, status_code=error.status)
        self.raw_headers = [(name.lower(), value) for name, value in headers]


def error_response(error: ClawError, request: Request | None = None) -> Response:
    if request is not None:
        note_error(request.scope.setdefault("state", {}), error)
    return EnvelopeResponse(error)


# The first element of a FastAPI location says where the value came from; ours start with the
# field. Later string elements that name no field are pydantic's union members ('str', 'ImageURL').
_SOURCES = frozenset({"body", "query", "path", "header", "cookie"})
_FIELDS = frozenset(name for model in (GenerationBody, EditBody, ImageURL)
                    for name in model.model_fields)
_PYDANTIC_OBJECT = re.compile(r"a valid dictionary( or instance of \w+)?")


def _param(loc: tuple[Any, ...]) -> str | None:
    """`('images', 0, 'ImageURL', 'image_url')` → `images[0][image_url]`; `('query', 'limit')`
    → `limit`."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in _SOURCES:
        parts = parts[1:]
    if not parts:
        return None
    nested = [p for p in parts[1:] if p.isdigit() or p in _FIELDS]
    return parts[0] + "".join(f"[{p}]" for p in nested)


def _validation_error(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    if not errors:
        return InvalidRequest("Invalid request.", code="invalid_type")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return InvalidRequest(f"Malformed JSON body: {first.get('msg', 'cannot parse')}.",
                              code="invalid_json")
    # Of a union's alternatives, the one that got furthest says best what was wrong.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    loc = tuple(first.get("loc", ()))
    param = _param(loc)
    if param is None and loc in ((), ("body",)):
        return InvalidRequest("The request body must be a JSON object, such as "
                              '{"prompt": "a red fox"}.', code="invalid_json")
    if param is None:
        return InvalidRequest(f"Invalid request: {first.get('msg', 'invalid value')}.",
                              code="invalid_type")
    if first.get("type") == "missing":
        return InvalidRequest(f"Missing required field '{param}'.", param=param,
                              code="missing_field")
    alike = [e for e in errors if len(e.get("loc", ())) == len(first.get("loc", ()))
             and _param(tuple(e.get("loc", ()))) == param]
    return InvalidRequest(f"Invalid value for '{param}': {_wants(alike)}.", param=param,
                          code="invalid_type")


def _wants(errors: list[Any]) -> str:
    """One message for a value that failed every alternative of a union."""
    msgs = list(dict.fromkeys(_PYDANTIC_OBJECT.sub("an object", e.get("msg", "invalid value"))
                              for e in errors))
    prefix = "Input should be "
    if len(msgs) > 1 and all(m.startswith(prefix) for m in msgs):
        return prefix + " or ".join(m.removeprefix(prefix) for m in msgs)
    return msgs[0]


def install(app: FastAPI) -> None:
    @app.exception_handler(ClawError)
    async def _claw(request: Request, exc: ClawError) -> Response:
        return error_response(exc, request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return error_response(_validation_error(exc), request)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if isinstance(exc.__cause__, ClawError):  # FastAPI wraps errors raised reading a body
            return error_response(exc.__cause__, request)
        if exc.status_code == 404:
            return error_response(RouteNotFound(
                f"Unknown route: {request.method} {request.url.path}. See GET /v1/models and "
                "POST /v1/images/generations."), request)
        if exc.status_code == 405:
            allow = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow", "")
            if "GET" in allow.split(", ") and "HEAD" not in allow:
                allow += ", HEAD"  # answered by `HeadAsGet`
            return error_response(MethodNotAllowed(
                f"Method {request.method} is not allowed on {request.url.path}"
                + (f"; use {allow}." if allow else "."), headers={"allow": allow} if allow else {}),
                request)
        status = exc.status_code if 400 <= exc.status_code <= 599 else 500
        err = InvalidRequest(str(exc.detail), status=status, code="http_error")
        return error_response(err, request)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # Starlette's, reading a body its client left
    async def _gone(request: Request, _: Exception) -> Response:
        # Nobody hears it; the log and metrics say the client closed, not that we failed, or
        # what the connection told it before closing (a 408 for a body too slow).
        state = request.scope.setdefault("state", {})
        state.setdefault("error_code", "client_closed")
        return Response(status_code=state.get("refused_status", 499))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.url.path,
                  exc_info=(type(exc), exc, exc.__traceback__))
        rid = request.scope.get("state", {}).get("request_id", "")
        # Not retryable: a bug met after a payment left would be retried into another one.
        # Starlette sends this from outside every middleware, so the request id is added here.
        return error_response(internal_error(
            rid, headers={"x-should-retry": "false", "x-request-id": rid}), request)
