"""The reference for bench/ingest.py: a bare aiohttp app that only parses the ingest body.

    python bench/ingest_bare.py --listen 127.0.0.1:PORT

One route, `POST /api/v1/results`, reads the JSON body the monitor would get and answers
with a receipt of the same shape as the monitor's (one `{id, received_at}` per item). No
token check, no validation, no storage: what is left is aiohttp's own cost plus parsing
and encoding JSON with the monitor's library (orjson), the ceiling any handler in this
process model can reach.
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiohttp import web


def _ids(document: Any) -> list[str]:
    items = document if isinstance(document, list) else [document]
    return [str(item.get("id", "")) for item in items if isinstance(item, dict)]


def _iso(at: float) -> str:
    moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def post_results(request: web.Request) -> web.Response:
    """Parse the body and answer a receipt per item, as the monitor's route does."""
    document = orjson.loads(await request.read())
    received_at = _iso(time.time())
    answer = {
        "probe": "bare",
        "region": "bare",
        "results": [{"id": i, "received_at": received_at} for i in _ids(document)],
    }
    return web.Response(body=orjson.dumps(answer), content_type="application/json")


def create_app() -> web.Application:
    """Build the bare app, with the monitor's body size limit."""
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_post("/api/v1/results", post_results)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Bare aiohttp ingest reference.")
    parser.add_argument("--listen", default="127.0.0.1:8091", metavar="HOST:PORT")
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    print(f"ingest_bare: http://{host}:{port}", flush=True)
    web.run_app(create_app(), host=host, port=int(port), print=None)


if __name__ == "__main__":
    main()
