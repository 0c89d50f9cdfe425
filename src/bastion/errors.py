"""Errors that carry their HTTP status and OpenAI error type, rendered by one handler."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException


class APIError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": _text(self.message), "type": self.type,
                          "code": _text(self.code), "param": _text(self.param)}}


def _text(value: str | None) -> str | None:
    """A string that encodes as UTF-8: a message may quote what the client sent (a model name,
    an unknown argument), and a lone surrogate in it must not turn a 4xx into a 500."""
    if value is None or value.isascii():
        return value
    return value.encode("utf-8", "replace").decode("utf-8")


class InvalidRequestError(APIError):
    status = 400
    type = "invalid_request_error"


class NotFoundError(APIError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFoundError(NotFoundError):
    code = "model_not_found"


class PayloadTooLargeError(APIError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"


class AuthorizationError(APIError):
    status = 403
    type = "authorization_error"
    code = "insufficient_permissions"


# Longer waits than this are not worth a client's automatic retry: it should give up and say so
CLIENT_PATIENCE_S = 60.0


class RateLimitError(APIError):
    """429 with the spec's retry_after in the body, Retry-After and the OpenAI SDKs'
    retry-after-ms (which they prefer); a quota that frees only after CLIENT_PATIENCE_S (tokens
    per hour) adds `x-should-retry: false`, so the SDKs do not retry what cannot succeed."""

    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, code: str, retry_after: float,
                 headers: dict[str, str] | None = None) -> None:
        self.retry_after = max(1, math.ceil(retry_after))
        extra = {"Retry-After": str(self.retry_after),
                 "retry-after-ms": str(max(1, math.ceil(retry_after * 1000)))}
        if retry_after > CLIENT_PATIENCE_S:
            extra["x-should-retry"] = "false"
        super().__init__(message, code=code, headers={**(headers or {}), **extra})

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["error"]["retry_after"] = self.retry_after
        return body


class QuotaExceededError(APIError):
    """A standing quota (not a rate) is used up: a 403, which no client retries, since only
    deleting something frees it."""

    status = 403
    type = "insufficient_quota"
    code = "insufficient_quota"


class ModelError(APIError):
    status = 500
    type = "model_error"


class ServiceUnavailableError(APIError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


_TYPE_PARTS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}


def _is_type_part(part: str) -> bool:
    """Union branches appear in pydantic locations as type names: 'str', 'list[int]', ..."""
    return part in _TYPE_PARTS or "[" in part or "-" in part


def _param_from_loc(loc: tuple[Any, ...]) -> str | None:
    """('body', 'messages', 0, 'content', 'list[...]', 0) -> 'messages[0].content[0]'."""
    out = ""
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, int):
            out += f"[{p}]"
        elif _is_type_part(str(p)):
            continue
        else:
            out += f".{p}" if out else str(p)
    return out or None


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("The request body is invalid.")
    # In a union every branch reports; the deepest location is the most specific complaint.
    first = max(errors, key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return InvalidRequestError(
            f"The request body is not valid JSON: {ctx.get('error', 'parse error')}.",
            code="invalid_json")
    loc = tuple(first.get("loc", ()))
    param = _param_from_loc(loc)
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if first.get("type") == "missing" and not param:
        return InvalidRequestError("The request has no body: send a JSON object.",
                                   code="missing_body")
    if first.get("type") == "missing":
        message = f"Missing required parameter: '{param}'."
        return InvalidRequestError(message, param=param, code="missing_required_parameter")
    if first.get("type") == "extra_forbidden":
        return InvalidRequestError(f"Unrecognized request argument supplied: {param}",
                                   param=param, code="unknown_parameter")
    if not param:
        return InvalidRequestError(f"The request body must be a JSON object: {msg}.",
                                   code="invalid_body")
    value = first.get("input")
    if first.get("type") == "value_error" or isinstance(value, (dict, list)):
        message = f"Invalid value for '{param}': {msg}."
    else:
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        message = f"Invalid value for '{param}': {msg} (got {shown})."
    extra = len(errors) - 1
    if extra:
        message += f" ({extra} more error{'s' if extra > 1 else ''} in the request.)"
    return InvalidRequestError(message, param=param, code="invalid_value")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err: APIError = NotFoundError("Unknown URL: no route matches this path.",
                                          code="unknown_url")
        elif exc.status_code == 405:
            err = InvalidRequestError("Method not allowed for this URL.", code="method_not_allowed")
            err.status = 405
        elif exc.status_code == 400:  # FastAPI could not decode the body at all
            err = InvalidRequestError("The request body could not be parsed as JSON (it is "
                                      "malformed or nested too deeply).", code="invalid_json")
        else:
            err = InvalidRequestError(str(exc.detail))
            err.status = exc.status_code
        return error_response(err)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        logging.getLogger("bastion").exception("unhandled error")
        return error_response(APIError("The server had an error while processing your request."))


class ConflictError(APIError):
    """The resource is in a state that forbids the request (a file a running job reads)."""

    status = 409
    type = "invalid_request_error"
    code = "conflict"


class UpstreamError(APIError):
    """An upstream server's 4xx, relayed with its status and message (the client's to fix)."""

    type = "invalid_request_error"

    def __init__(self, message: str, *, status: int, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)
        self.status = status


class BadGatewayError(APIError):
    """An upstream server failed, refused this server's credentials or answered nonsense."""

    status = 502
    type = "server_error"
    code = "upstream_error"


class UpstreamUnavailableError(ServiceUnavailableError):
    """No replica of an upstream model can be reached."""

    code = "upstream_unavailable"


# --- engine errors: ONE table from the engines' transport-free errors to what a client sees ----
# Keyed by each engine error class's `kind` (engines/base.py: EngineError and its subclasses):
# this module sits below the engines, so it names their kinds rather than importing them.
ENGINE_ERRORS: dict[str, type[APIError]] = {
    "input": InvalidRequestError,  # ModelInputError: 400 invalid_request_error
    "refused": UpstreamError,  # UpstreamRefused: an upstream's 4xx, with its status
    "unavailable": ServiceUnavailableError,  # ModelUnavailable: 503 server_error
    "bad_gateway": BadGatewayError,  # UpstreamFailure: 502 server_error
    "failure": ModelError,  # ModelFailure, and EngineError itself: 500 model_error
}


def engine_api_error(exc: Exception) -> APIError:
    """The APIError (status, type, code) for an engine error; the error's own code and param
    win over the row's defaults."""
    cls = ENGINE_ERRORS.get(getattr(exc, "kind", "failure"), ModelError)
    message = getattr(exc, "message", str(exc))
    code, param = getattr(exc, "code", None), getattr(exc, "param", None)
    if cls is UpstreamError:
        return UpstreamError(message, status=getattr(exc, "status", 400), code=code, param=param)
    return cls(message, code=code, param=param)
