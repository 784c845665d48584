"""Instants as every callmon document writes them: RFC 3339, UTC, milliseconds, `Z`."""

from __future__ import annotations

import datetime


def iso(t: float) -> str:
    """Return a Unix time as RFC 3339 UTC with milliseconds."""
    moment = datetime.datetime.fromtimestamp(t, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_or_none(t: float | None) -> str | None:
    return None if t is None else iso(t)


def now_iso() -> str:
    """Return the current instant, RFC 3339 UTC."""
    return iso(datetime.datetime.now(datetime.UTC).timestamp())
