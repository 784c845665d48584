"""`callmon monitor`: the aiohttp application and its background loops.

State lives under AppKeys (no module globals). Resources whose start can fail half-way
(the store, the pipeline, the HTTP client for notifications, the clock and delivery
loops) are set up in one cleanup context, torn down in reverse on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import prometheus_client
from aiohttp import web

from monitor.api import CONFIG, METRICS, PIPELINE, STORE, TOKENS, routes
from monitor.auth import Tokens
from monitor.config import MonitorConfig
from monitor.errors import error
from monitor.metrics import Metrics, serve_metrics
from monitor.notify import Deliverer
from monitor.pipeline import Pipeline
from monitor.store import SqliteStore

DELIVERER = web.AppKey("deliverer", Deliverer)
Clock = Callable[[], float]


def create_app(
    config: MonitorConfig, *, clock: Clock = time.time, tick_interval_s: float | None = 1.0
) -> web.Application:
    """Build the monitor. `tick_interval_s=None` leaves the clock to the caller (tests)."""
    # `_created` series double every counter and histogram line and no dashboard of ours
    # reads them; prometheus_client only offers a process-wide switch.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[_count_ingest, _json_errors, _revalidate_static],
    )
    app[CONFIG] = config
    app[TOKENS] = Tokens.from_config(config)
    app[METRICS] = Metrics()
    app.add_routes(routes)
    registry = app[METRICS].registry

    async def metrics(request: web.Request) -> web.Response:
        return await serve_metrics(request, registry)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/", _index)
    app.router.add_static("/static/", WEB, append_version=True)
    app.router.add_get("/api/v1/openapi.json", _openapi)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        store = await SqliteStore(config.database).open()
        http = aiohttp.ClientSession()
        deliverer = Deliverer(
            store,
            {c.name: c for c in config.channels},
            config.delivery,
            app[METRICS],
            http,
            clock,
            config.public_url,
        )
        pipeline = Pipeline(config, store, app[METRICS], clock, on_commit=deliverer.wake)
        app[STORE] = store
        app[PIPELINE] = pipeline
        app[DELIVERER] = deliverer
        tasks: list[asyncio.Task[None]] = []
        try:
            await pipeline.start()
            tasks.append(asyncio.create_task(deliverer.run()))
            if tick_interval_s is not None:
                tasks.append(asyncio.create_task(_ticker(pipeline, tick_interval_s)))
            yield
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await pipeline.stop()
            await http.close()
            await store.close()

    app.cleanup_ctx.append(lifecycle)
    return app


WEB = Path(__file__).with_name("web")
"The web UI: plain HTML, CSS and JavaScript, no build step and nothing from a CDN."


async def _index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})


async def _openapi(request: web.Request) -> web.Response:
    from monitor.openapi import document_text

    return web.Response(text=document_text(), content_type="application/json")


async def _ticker(pipeline: Pipeline, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        with contextlib.suppress(Exception):  # a failed tick is retried on the next one
            await pipeline.tick()


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _count_ingest(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path != "/api/v1/results":
        return await handler(request)
    counter = request.app[METRICS].ingest_requests
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        counter.labels(str(exc.status)).inc()
        raise
    except Exception:
        counter.labels("500").inc()
        raise
    counter.labels(str(response.status)).inc()
    return response


@web.middleware
async def _revalidate_static(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Make browsers check the UI's files on each load (cheap: ETag), never run stale ones."""
    response = await handler(request)
    if request.path.startswith("/static/"):
        response.headers["Cache-Control"] = "no-cache"
    return response


@web.middleware
async def _json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give aiohttp's own "no such route" the same JSON shape as the API's errors."""
    try:
        return await handler(request)
    except web.HTTPNotFound as exc:
        if exc.content_type == "application/json":
            raise
        raise error(web.HTTPNotFound, f"no route {request.method} {request.path}") from None
    except web.HTTPMethodNotAllowed as exc:
        if exc.content_type == "application/json":
            raise
        allowed = ", ".join(sorted(exc.allowed_methods))
        raise web.HTTPMethodNotAllowed(
            request.method,
            exc.allowed_methods,
            text=json.dumps({"error": f"{request.method} is not allowed here; allowed: {allowed}"}),
            content_type="application/json",
        ) from None
