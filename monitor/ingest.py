"""`POST /api/v1/results`: probes deliver call results and per-second sample batches.

The body is one `callmon.call/v1` result, one `callmon.samples/v1` batch, or a JSON list
of them. Everything is validated before anything is stored: a bad item is a 400 naming
its field (`[3].samples[0].audio.loss`) and the whole request stores nothing. The probe's
name and region come from its token. A 200 means committed to disk; sending the same ids
again gets the same answer and stores nothing twice.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from callmon.callresult import (
    SAMPLES_SCHEMA,
    SCHEMA,
    CallResult,
    ContractError,
    SampleBatch,
)
from monitor.errors import bad_request, error, too_large
from monitor.pipeline import Item

MAX_ITEMS = 1000
MAX_ID = 128


def parse_items(document: Any) -> list[Item]:
    """Validate a request body; raise ContractError naming the first bad field."""
    if isinstance(document, list):
        if not document:
            raise ContractError("", "an empty list stores nothing")
        if len(document) > MAX_ITEMS:
            raise ContractError("", f"a batch holds at most {MAX_ITEMS} items")
        return [_item(entry, f"[{i}]") for i, entry in enumerate(document)]
    return [_item(document, "")]


def _item(entry: Any, path: str) -> Item:
    if not isinstance(entry, dict):
        raise ContractError(path, "expected an object")
    schema = entry.get("schema")
    field = f"{path}.schema" if path else "schema"
    # The document is kept as sent once it validates: only checked, never converted.
    if schema == SCHEMA:
        CallResult.check(entry, path)
        _check_id(entry["id"], path)
        return Item(entry["id"], "result", entry["target"]["url"], entry)
    if schema == SAMPLES_SCHEMA:
        SampleBatch.check(entry, path)
        _check_id(entry["id"], path)
        return Item(entry["id"], "samples", entry["target"]["url"], entry)
    raise ContractError(field, f"expected {SCHEMA!r} or {SAMPLES_SCHEMA!r}")


def _check_id(value: str, path: str) -> None:
    if not 0 < len(value) <= MAX_ID:
        raise ContractError(f"{path}.id" if path else "id", f"must be 1 to {MAX_ID} characters")


async def read_json(request: web.Request, limit: int) -> Any:
    """Read a JSON body, refusing it (413) before reading when it is announced too big."""
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit, request.content_length)
    if request.content_type != "application/json":
        raise error(
            web.HTTPUnsupportedMediaType,
            f"Content-Type must be application/json, not {request.content_type or 'none'}",
        )
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:  # chunked, no length announced
        raise too_large(limit, None) from None
    try:
        return orjson.loads(raw)
    except ValueError as exc:
        raise bad_request(f"body is not JSON: {exc}") from None
