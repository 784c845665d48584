"""`callmon agent`: probes one region's targets, on a schedule or continuously.

Scheduled targets get a call every interval (with random splay so agents spread out),
at most `concurrency` at once; each call is bounded in time, so one target's trouble never
holds another's schedule. Continuous targets hold one long call whose seconds are shipped
as they come; when it breaks, the interruption is reported (a failed result, with the
phase and why) and a new call starts at once, then with backoff.

Everything goes through the spool (probes.spool): nothing is lost while the monitor is
away. The agent serves its own /metrics (calls, spool, delivery, event-loop lag, CPU) and
/healthz.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler

import callmon
from callmon.callresult import CallResult, Phase, ProbeInfo, SampleBatch, Status, Target
from callmon.tasks import TaskGroup
from callmon.times import now_iso
from probes.agentconfig import AgentConfig, TargetConfig
from probes.call import CallOptions, ProbeCall, Progress
from probes.looplag import LoopLag
from probes.media import shared_loops
from probes.spool import Courier, Spool

log = logging.getLogger("callmon.agent")

RECONNECT_S = (0.5, 1.0, 2.0, 5.0, 10.0)
"Waits before each new attempt of a continuous call that keeps failing."
CONTINUOUS_MEDIA_TIMEOUT_S = 2.0
SHUTDOWN_S = 10.0
"How long a stopping agent waits for its calls to end and report."
"A continuous call whose media stops this long is broken: report it and call again."


class AgentError(Exception):
    """The agent cannot work as configured (for example, the monitor refuses its token)."""


class AgentMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # CPU seconds, memory: is the agent itself healthy?
        self.calls = Counter(
            "callmon_agent_calls",
            "Calls held, by target and status.",
            ["target", "status"],
            registry=r,
        )
        self.interruptions = Counter(
            "callmon_agent_interruptions",
            "Continuous calls that broke and were called again.",
            ["target"],
            registry=r,
        )
        self.spool = Gauge(
            "callmon_agent_spool_entries", "Entries waiting for the monitor.", registry=r
        )
        self.refused = Gauge(
            "callmon_agent_spool_refused_entries",
            "Entries the monitor refused for good.",
            registry=r,
        )
        self.delivered = Counter(
            "callmon_agent_delivered_entries", "Entries the monitor acknowledged.", registry=r
        )
        self.delivery_failures = Counter(
            "callmon_agent_delivery_failures",
            "Failed attempts to deliver to the monitor.",
            registry=r,
        )
        self.loop_lag = Gauge(
            "callmon_agent_event_loop_lag_seconds",
            "Largest event-loop lag over the last scrape interval.",
            registry=r,
        )


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.spool = Spool(config.spool)
        self._slots = asyncio.Semaphore(config.concurrency)
        self._tasks = TaskGroup()
        self._calls: set[ProbeCall] = set()
        self._lag = LoopLag()
        self.last_status: dict[str, str] = {}
        self.courier: Courier | None = None
        self._counted = (0, 0)
        self._stopping = False
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()

    async def check_monitor(self, http: aiohttp.ClientSession) -> str:
        """Ask the monitor who this token is; fail fast when it refuses the token."""
        url = self.config.monitor_url + "/api/v1/whoami"
        headers = {"Authorization": f"Bearer {self.config.monitor_token}"}
        try:
            async with http.get(url, headers=headers, timeout=aiohttp.ClientTimeout(total=5)) as r:
                if r.status in (401, 403):
                    raise AgentError(
                        f"the monitor at {self.config.monitor_url} refuses this "
                        f"agent's token (HTTP {r.status}): check monitor.token"
                    )
                if r.status != 200:
                    return f"the monitor answered {r.status}; results wait in the spool"
                identity: dict[str, Any] = await r.json()
        except (aiohttp.ClientError, TimeoutError) as exc:
            return (
                f"the monitor is unreachable ({exc.__class__.__name__}); results wait in the spool"
            )
        if identity.get("role") != "probe":
            raise AgentError("monitor.token is an operator token; give the agent a probe token")
        if identity.get("region") != self.config.region:
            log.warning(
                "the token's region is %s, the configuration says %s: the monitor "
                "files results under %s",
                identity.get("region"),
                self.config.region,
                identity.get("region"),
            )
        return f"monitor ok: probe {identity.get('name')} in {identity.get('region')}"

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Run until the block exits, then stop every call cleanly."""
        shared_loops()  # encode the media before the first call is timed
        await self.spool.open()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            log.info(await self.check_monitor(http))
            self.courier = Courier(
                self.spool, http, self.config.monitor_url, self.config.monitor_token
            )
            runner = await self._serve_health()
            self._lag.start()
            self._tasks.spawn(self.courier.run())
            for target in self.config.targets:
                if target.mode == "continuous":
                    self._tasks.spawn(self._continuous(target))
                else:
                    self._tasks.spawn(self._scheduled(target))
            try:
                yield
            finally:
                # Calls in progress end at their next second and report: the last seconds
                # and the final results are spooled, not lost to the shutdown.
                self._stopping = True
                for call in list(self._calls):
                    call.stop()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), SHUTDOWN_S)
                await self._tasks.close()
                # what is already spooled stays for the next start; try once to deliver it
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.courier.send_once(), 2)
                await self._lag.stop()
                if runner is not None:
                    await runner.cleanup()
        await self.spool.close()

    # --- the two modes ----------------------------------------------------------------

    async def _scheduled(self, target: TargetConfig) -> None:
        next_at = time.monotonic() + random.uniform(0, target.splay_s)
        while not self._stopping:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            # the next start is fixed before this call runs: a slow call does not push the
            # schedule back, and no backlog of missed calls builds up
            next_at += target.interval_s
            next_at += random.uniform(0, target.splay_s) if target.splay_s else 0.0
            async with self._slots:
                if self._stopping:
                    return
                result = await self._call(target, self._options(target))
            await self._report(target, result)

    async def _continuous(self, target: TargetConfig) -> None:
        failures = 0
        while not self._stopping:
            call_id = str(uuid.uuid4())
            started_at = now_iso()
            pending: list[Any] = []

            def on_progress(progress: Progress, pending: list[Any] = pending) -> None:
                if progress.sample is not None:
                    pending.append(progress.sample)

            async def ship(
                call_id: str = call_id, started_at: str = started_at, pending: list[Any] = pending
            ) -> None:
                if pending:
                    batch = SampleBatch(
                        id=str(uuid.uuid4()),
                        call_id=call_id,
                        started_at=started_at,
                        target=Target(url=target.url, signaling=target.kind),
                        probe=self._probe_info(),
                        samples=list(pending),
                    )
                    pending.clear()
                    await self.spool.put(batch.to_dict())

            options = self._options(target, call_id=call_id)
            shipper = asyncio.create_task(self._ship_every(ship))
            try:
                result = await self._call(target, options, on_progress)
            finally:
                shipper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await shipper
                await ship()
            await self._report(target, result)
            if self._stopping:
                return
            if result.failure is None or result.failure.phase is Phase.CALL:
                # it connected and held media: a break after that is a fresh trouble, so
                # call again at once rather than after the backoff of earlier failures
                failures = 0
            if result.status is Status.FAILED:
                self.metrics.interruptions.labels(target.name).inc()
                await asyncio.sleep(RECONNECT_S[min(failures, len(RECONNECT_S) - 1)])
                failures += 1

    async def _ship_every(self, ship: Any) -> None:
        while True:
            await asyncio.sleep(self.config.batch_s)
            await ship()

    # --- helpers ---------------------------------------------------------------------------

    def _options(self, target: TargetConfig, call_id: str | None = None) -> CallOptions:
        continuous = target.mode == "continuous"
        return CallOptions(
            url=target.url,
            signaling=target.kind,
            duration_s=target.duration_s,
            token=target.token,
            ice=target.ice,
            thresholds=target.thresholds,
            region=self.config.region,
            overload_lag_s=self.config.overload_lag_s,
            media_timeout_s=CONTINUOUS_MEDIA_TIMEOUT_S if continuous else 5.0,
            call_id=call_id,
            keep_samples=not continuous,
        )

    async def _call(
        self, target: TargetConfig, options: CallOptions, on_progress: Any = None
    ) -> CallResult:
        call = ProbeCall(options, on_progress)
        self._calls.add(call)
        self._active += 1
        self._idle.clear()
        try:
            return await call.run()
        finally:
            self._calls.discard(call)

    async def _report(self, target: TargetConfig, result: CallResult) -> None:
        """Spool a call's result; the call counts as active until it is spooled."""
        try:
            self.metrics.calls.labels(target.name, result.status.value).inc()
            self.last_status[target.name] = result.status.value
            if result.failure is not None:
                failure = result.failure
                log.warning("%s: failed in %s: %s", target.name, failure.phase, failure.reason)
            await self.spool.put(result.to_dict())
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def _probe_info(self) -> ProbeInfo:
        return ProbeInfo(
            version=callmon.__version__, host=socket.gethostname(), region=self.config.region
        )

    # --- health --------------------------------------------------------------------------

    async def _serve_health(self) -> web.AppRunner | None:
        if self.config.listen is None:
            return None
        app = web.Application()
        metrics_handler = make_aiohttp_handler(self.metrics.registry)

        async def metrics(request: web.Request) -> web.StreamResponse:
            await self._refresh_gauges()
            return await metrics_handler(request)

        async def healthz(request: web.Request) -> web.Response:
            waiting, refused = await self.spool.depth()
            stats = self.courier.stats if self.courier else None
            healthy = stats is None or stats.last_error is None or waiting == 0
            return web.json_response(
                {
                    "status": "ok" if healthy else "degraded",
                    "region": self.config.region,
                    "spool": waiting,
                    "refused": refused,
                    "last_delivery": stats.last_delivery if stats else None,
                    "last_error": stats.last_error if stats and not healthy else None,
                    "targets": self.last_status,
                    "loop_lag_max_s": self._lag.max,
                }
            )

        app.router.add_get("/metrics", metrics)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app)
        await runner.setup()
        host, port = self.config.listen
        await web.TCPSite(runner, host, port).start()
        return runner

    async def _refresh_gauges(self) -> None:
        waiting, refused = await self.spool.depth()
        self.metrics.spool.set(waiting)
        self.metrics.refused.set(refused)
        if self.courier is not None:
            stats = self.courier.stats
            # the courier keeps plain counts; the counters catch up at each scrape
            self.metrics.delivered.inc(stats.delivered - self._counted[0])
            self.metrics.delivery_failures.inc(stats.failures - self._counted[1])
            self._counted = (stats.delivered, stats.failures)
        self.metrics.loop_lag.set(self._lag.take_window())


async def run_agent(config: AgentConfig, stop: asyncio.Event) -> None:
    """Run an agent until `stop` is set."""
    agent = Agent(config)
    async with agent.running():
        await stop.wait()
