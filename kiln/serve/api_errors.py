"""Errors in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` on every route.

Handlers turn FastAPI's and Starlette's own errors (bad JSON, wrong types, unknown route, wrong
method) into this shape, and anything unexpected into a 500 that names no file and has no trace.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from kiln.errors import RequestError

log = logging.getLogger("kiln.serve")

_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
    405: "invalid_request_error", 408: "timeout_error", 413: "invalid_request_error",
    500: "internal_server_error", 503: "overloaded_error",
}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @classmethod
    def bad_request(cls, e: RequestError) -> "APIError":
        return cls(400, str(e), e.param, "invalid_value")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_bytes(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, param, code)).encode()


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param(loc) -> str | None:
    """Dotted field path of a pydantic error location, without "body" and union-member tags."""
    parts = []
    for x in loc:
        x = str(x)
        if x == "body" and not parts:
            continue
        if x in _TYPE_TAGS or "[" in x or "-" in x:
            break
        parts.append(x)
    return ".".join(parts) or None


def _validation_message(errors: list[dict]) -> tuple[str, str | None]:
    err = errors[0]
    kind = err.get("type", "")
    param = _param(err.get("loc", ()))
    if kind == "json_invalid":
        ctx = err.get("ctx") or {}
        return f"the body is not valid JSON: {ctx.get('error', 'parse error')}", None
    if param is None:
        if kind in ("model_attributes_type", "dict_type", "model_type"):
            return "the body must be a JSON object", None
        if kind == "missing":
            return "the body is empty; send a JSON object", None
        return f"invalid body: {err.get('msg', 'bad value')}", None
    if kind == "missing":
        return f"{param} is required", param
    # a union reports one error per alternative: name them all
    msgs = list(dict.fromkeys(e.get("msg", "invalid value") for e in errors
                              if _param(e.get("loc", ())) == param))
    return f"{param}: {'; or '.join(msgs)}", param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError):
        return error_response(400, str(exc), exc.param, "invalid_value")

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errors = list(exc.errors())
        message, param = _validation_message(errors) if errors else ("invalid request", None)
        return error_response(400, message, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        code = None
        if exc.status_code == 404:
            message = f"no route {request.url.path!r}"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path!r}"
        elif exc.status_code == 400:  # FastAPI could not decode the body at all
            message, code = "the body is not valid JSON text (it must be UTF-8)", "invalid_json"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, None, code, getattr(exc, "headers", None))
    # Anything else unexpected is answered 500 by middleware.RequestId, which keeps the request id
    # and the connection.
