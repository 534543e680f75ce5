"""One error shape everywhere (OpenAI's `{"error": {"message", "type", "param", "code"}}`), mapped once at app
level. Messages never echo more than a short prefix of what the client sent.
"""

from __future__ import annotations

import logging
import re

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from model.errors import UserError
from service.api.protocol import ErrorBody, ErrorResponse

log = logging.getLogger("instructlm.api")

# The longest piece of client input an error message may quote.
ECHO_LIMIT = 40

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


def clip(text: str, limit: int = ECHO_LIMIT) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit] + "..."


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(status, "invalid_request_error")
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_response(err: APIError) -> Response:
    body = ErrorResponse(ErrorBody(message=err.message, type=err.type, param=err.param, code=err.code))
    return Response(content=body, status_code=err.status, headers=err.headers, media_type="application/json")


def _param_from(key: str | None) -> str | None:
    if not key:
        return None
    return key.removeprefix("$.").removeprefix("$") or None


def handle_api_error(_: Request, exc: APIError) -> Response:
    return error_response(exc)


def handle_validation(_: Request, exc: ValidationException) -> Response:
    """msgspec's messages name the field and the rule ("Expected `float` >= 0.0 - at `$.temperature`") and
    never the value; Litestar puts them in `extra`."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    message = str(first.get("message") or exc.detail)
    param = _param_from(first.get("key"))
    m = re.search(r"at `\$\.?([^`]*)`", message) or re.search(r"unknown field `([^`]*)`", message)
    if m:
        param = m.group(1) or param
    if param == "data":  # Litestar's name for the whole body
        param = None
    elif param and param not in message:
        message = f"{message} (at {param})"
    return error_response(APIError(400, clip(message, 200), param=param, code=_code_for(message)))


def _code_for(message: str) -> str:
    lowered = message.lower()
    if any(w in lowered for w in ("json", "utf-8", "truncated", "malformed", "trailing characters")):
        return "invalid_json"
    if "unknown field" in lowered:
        return "unknown_field"
    return "invalid_value"


def handle_http(_: Request, exc: HTTPException) -> Response:
    status = exc.status_code
    message = str(exc.detail) if exc.detail else _TYPES.get(status, "error")
    code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(status)
    if status == 400:
        code = _code_for(message)
        if code == "invalid_json" and "json" not in message.lower():
            message = f"the request body is not valid JSON: {message}"
    err = APIError(status, clip(message, 200), code=code, headers=dict(exc.headers or {}))
    return error_response(err)


def handle_user_error(_: Request, exc: UserError) -> Response:
    return error_response(APIError(400, clip(str(exc), 200)))


def handle_unicode(_: Request, exc: UnicodeDecodeError) -> Response:
    return error_response(
        APIError(400, f"the request body is not valid UTF-8 (byte {exc.start})", code="invalid_json")
    )


def handle_internal(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(APIError(500, "internal server error", code="internal_error"))


EXCEPTION_HANDLERS = {
    APIError: handle_api_error,
    ValidationException: handle_validation,
    HTTPException: handle_http,
    UserError: handle_user_error,
    UnicodeDecodeError: handle_unicode,
    Exception: handle_internal,
}
