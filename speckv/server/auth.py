"""API keys: with a key set, every request but `/health` needs `Authorization: Bearer <key>`
(as vLLM's `--api-key`; `/health` stays open for load balancers and orchestrators).

A plain ASGI middleware rather than a FastAPI dependency so it also covers routes FastAPI adds
itself (the docs), unknown paths (a 401, not a 404 that would map the API) and HEAD requests;
and rather than Starlette's `BaseHTTPMiddleware`, which wraps streaming responses and the
disconnect messages the handlers poll for.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse

from speckv.errors import SpecKVError
from speckv.server.protocol import error_body

OPEN_PATHS = frozenset({"/health"})


def bearer_matches(header: str | None, key: str) -> bool:
    """Whether an Authorization header carries `key` as a bearer token. The comparison takes the
    same time wherever the first difference is (hmac.compare_digest), so timing reveals no prefix
    of the key; the scheme's case does not matter (RFC 7235)."""
    if header is None:
        return False
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode(), key.encode())


class BearerAuth:
    """ASGI middleware: 401 with OpenAI's error body for a request without the key."""

    def __init__(self, app, key: str):
        if not key:
            raise SpecKVError("the API key is empty: give a non-empty key, or none to serve without one")
        self.app, self.key = app, key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        header = headers.get(b"authorization")
        if bearer_matches(header.decode("latin-1") if header is not None else None, self.key):
            return await self.app(scope, receive, send)
        body = error_body(
            "missing or incorrect API key: send the header 'Authorization: Bearer <key>'",
            "invalid_request_error",
            code="invalid_api_key",
        )
        response = JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
