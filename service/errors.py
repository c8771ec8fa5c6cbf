"""Every error leaves as OpenAI's envelope {"error": {"message", "type", "param", "code"}}.

Client mistakes are 4xx naming the offending field in ``param`` and in the message; nothing a
client sends can produce a 500 or a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.problems import Problem

log = logging.getLogger("chargen.service")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",  # what OpenAI sends for a bad key (code: invalid_api_key)
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


# The status of each Problem code (service/problems.py) the generation and session code raise.
STATUS_OF_PROBLEM = {
    "prompt_too_long": 400,
    "unknown_characters": 400,
    "too_many_chars": 400,
    "too_many_stop_strings": 400,
    "empty_stop_string": 400,
    "stop_string_too_long": 400,
    "too_many_choices": 400,
    "choices_with_session": 400,
    "unknown_token": 400,
    "session_not_found": 404,
    "model_not_found": 404,
    "session_busy": 409,
    "model_mismatch": 409,
    "model_version_retired": 409,
    "invalid_session_state": 409,
    "lease_lost": 409,
    "capacity": 429,
    "key_stream_limit": 429,
    "engine_error": 500,
    "store_unavailable": 503,
    "draining": 503,
    "engine_stopped": 503,
    "interrupted": 503,
}


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)

    @classmethod
    def of(cls, problem: Problem) -> ApiError:
        headers = None if problem.retry_after_s is None else {"Retry-After": str(problem.retry_after_s)}
        return cls(STATUS_OF_PROBLEM[problem.code], problem.message, problem.param, problem.code, headers)


def _printable(text: str | None) -> str | None:
    # A client can put lone surrogates in JSON ("\ud800") and they reach messages through field
    # names; they cannot be encoded as UTF-8, so escape them rather than fail with a 500.
    return None if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": _printable(message), "type": kind, "param": _printable(param), "code": code}}


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorEnvelope(BaseModel):
    """OpenAI's error shape; every 4xx/5xx of the API has this body."""

    error: ErrorDetail


def error_response(description: str) -> dict[str, Any]:
    return {"model": ErrorEnvelope, "description": description}


# Declared on every API route (main.py passes it to include_router), so the OpenAPI document says
# what the service really answers and schemathesis can check error bodies against it.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: error_response("invalid request: a field out of range, malformed JSON, unknown characters, ..."),
    401: error_response("API keys are configured and the request has no valid Authorization: Bearer key"),
    404: error_response("unknown route, session (or one owned by another key) or model"),
    405: error_response("method not allowed on this route"),
    409: error_response("the session is in use by another request, was saved by another model, or its version retired"),
    413: error_response("body larger than CHARGEN_MAX_BODY_BYTES"),
    429: error_response("at capacity, or the API key's concurrent stream limit; see Retry-After"),
    503: error_response("the session store is unavailable, or the service is starting or shutting down"),
}


def validation_to_api_error(err: RequestValidationError) -> ApiError:
    """Pydantic's first complaint, as a 400 naming the field (``body`` for the body as a whole)."""
    first = err.errors()[0] if err.errors() else {"loc": ("body",), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ()) if not isinstance(part, int)]
    where = loc[0] if loc else "body"
    param = ".".join(loc[1:]) if len(loc) > 1 else where
    kind = first.get("type", "")
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        return ApiError(400, f"body is not valid JSON ({ctx.get('error', 'parse error')})", "body", "invalid_json")
    if kind == "missing" and param == "body":
        return ApiError(400, "body: a JSON object is required", "body", "missing_body")
    if kind == "model_attributes_type" or (kind.endswith("_type") and param == "body"):
        return ApiError(400, "body must be a JSON object", "body", "invalid_body")
    if kind == "extra_forbidden":
        return ApiError(400, f"{param}: unknown field", param, "unknown_field")
    message = str(first.get("msg", "invalid value"))
    return ApiError(400, f"{param}: {message}", param, "invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, err: ApiError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(Problem)
    async def on_problem(request: Request, problem: Problem) -> JSONResponse:
        return await on_api_error(request, ApiError.of(problem))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        api = validation_to_api_error(err)
        return JSONResponse(api.body(), status_code=api.status)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else "request failed"
        param = code = None
        if err.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}"
        if err.status_code == 400 and message == "There was an error parsing the body":
            # FastAPI's answer when json.loads fails other than by syntax: invalid UTF-8, nesting
            # deeper than the parser's recursion limit, an integer of thousands of digits
            message = "body could not be parsed as JSON (invalid UTF-8, nested too deeply, or a number too long)"
            param, code = "body", "invalid_json"
        return JSONResponse(
            error_body(err.status_code, message, param, code),
            status_code=err.status_code,
            headers=getattr(err, "headers", None),
        )

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(error_body(500, "internal server error"), status_code=500)
