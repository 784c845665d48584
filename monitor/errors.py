"""Error responses: JSON bodies that say what was wrong and, for bad input, which field."""

from __future__ import annotations

import json

from aiohttp import web


def error(
    status: type[web.HTTPException], message: str, *, field: str | None = None, **headers: str
) -> web.HTTPException:
    """Build an HTTP error with a JSON body `{"error": ..., "field": ...}`."""
    body: dict[str, str] = {"error": message}
    if field is not None:
        body["field"] = field
    return status(text=json.dumps(body), content_type="application/json", headers=headers)


def bad_request(message: str, field: str | None = None) -> web.HTTPException:
    return error(web.HTTPBadRequest, message, field=field)


def too_large(limit: int, actual: int | None) -> web.HTTPException:
    """Build a 413 saying the limit (and the size, when it was announced)."""
    size = "" if actual is None else f" of {actual} bytes"
    return web.HTTPRequestEntityTooLarge(
        limit,
        actual or 0,
        text=json.dumps({"error": f"body{size} exceeds the limit of {limit} bytes"}),
        content_type="application/json",
    )
