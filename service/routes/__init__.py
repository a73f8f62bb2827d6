"""HTTP routes. They validate, tokenise and exchange messages with the engine; they never touch a model."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Response


def fast_json(content: Any, status_code: int = 200) -> Response:
    """A JSON response serialised by orjson; FastAPI's response_model stays on the route for the schema."""
    return Response(orjson.dumps(content), status_code=status_code, media_type="application/json")
