"""Admin authentication: a static bearer key, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Unauthorized


def require_admin(request: Request) -> None:
    """FastAPI dependency: 401 unless `Authorization: Bearer KEY` matches --api-key (when one is set)."""
    key: str | None = request.app.state.config.api_key
    if not key:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.strip().encode()):
        raise Unauthorized(
            "admin endpoints need 'Authorization: Bearer <api key>' (the key given with --api-key / SERVICE_API_KEY)",
            headers={"WWW-Authenticate": "Bearer"},
        )
