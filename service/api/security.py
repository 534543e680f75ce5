"""Optional Bearer API keys, compared in constant time (no early exit that leaks how much of a key matched)."""

from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from service.api.errors import APIError


def key_matches(given: str, keys: list[str]) -> bool:
    """Every configured key is compared (no short-circuit), each with hmac.compare_digest."""
    given_b = given.encode("utf-8", errors="replace")
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(given_b, key.encode("utf-8"))
    return ok


def require_api_key(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    keys = connection.app.state.server.api_keys
    if not keys:
        return
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if not header:
        raise APIError(401, "missing API key: send `Authorization: Bearer <key>`", code="missing_api_key")
    if scheme.lower() != "bearer" or not key_matches(token.strip(), keys):
        raise APIError(401, "invalid API key", code="invalid_api_key")
