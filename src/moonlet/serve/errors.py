"""Every error the server returns, in OpenAI's shape and with OpenAI's status codes:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "temperature", "code": null}}

400 bad input (malformed JSON, wrong types, out-of-range values, empty messages, unsupported
parameters, prompt longer than the context), 401 missing/wrong API key, 404 unknown model or route,
413 body too large, 429 queue full, 503 shutting down, 500 anything unexpected (the server logs it and
keeps serving). Clients (the `openai` package included) turn these into typed exceptions.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("moonlet.serve")

_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
         415: "invalid_request_error", 429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """Raised by routes; rendered by the handler below."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPE.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    return APIError(status, message, param, code).response()


def _loc(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location ('body', 'messages', 0, 'role') -> OpenAI's param ('messages[0].role')."""
    parts = [p for p in loc if p != "body"]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not p.startswith(("function-", "union[", "str", "list[", "int", "json-")):
            out += ("." if out else "") + p
    return out or None


def validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        detail = next(e for e in errors if e.get("type") == "json_invalid").get("ctx", {}).get("error", "")
        return APIError(400, "We could not parse the JSON body of your request: "
                        f"{detail or 'not valid JSON'}. Send a JSON object.", code="invalid_json")
    if any(e.get("type") == "missing" and tuple(e.get("loc", ())) == ("body",) for e in errors):
        return APIError(400, "the request has no body: send a JSON object", code="invalid_json")
    if any(e.get("type") in ("model_attributes_type", "dict_type") and tuple(e.get("loc", ())) == ("body",)
           for e in errors):
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    # the first problem, named the way OpenAI names parameters; unions report one error per member,
    # so prefer a message that is not about a union member's type
    e = errors[0]
    param = _loc(tuple(e.get("loc", ())))
    msg = e.get("msg", "invalid value")
    if e.get("type") == "missing":
        msg = f"missing required parameter: '{param}'"
        code = "missing_required_parameter"
    else:
        got = e.get("input")
        try:
            got_s = json.dumps(got)[:80]
        except (TypeError, ValueError):
            got_s = repr(got)[:80]
        msg = f"invalid value for '{param}': {msg} (got {got_s})"
        code = "invalid_value" if e.get("type", "").endswith(("_than", "_than_equal", "value_error")) else "invalid_type"
    return APIError(400, msg, param=param, code=code)


def install(app: FastAPI) -> None:
    """Route every error path through OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"unknown route: {request.method} {request.url.path}"
        elif exc.status_code == 405:
            msg = f"method {request.method} is not allowed on {request.url.path}"
        else:
            msg = str(exc.detail)
        return APIError(exc.status_code, msg, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error ({type(exc).__name__}); the server keeps running",
                        code="internal_error").response()
