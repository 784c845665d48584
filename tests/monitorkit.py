"""What the monitor tests share: a clock to turn by hand, a real monitor on a real socket,
real notification receivers that fail on purpose, and builders of probe results."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from callmon.callresult import (
    AudioSample,
    CallResult,
    Failure,
    Phase,
    Phases,
    ProbeInfo,
    Sample,
    SampleBatch,
    Status,
    Target,
    VideoSample,
)
from monitor.api import PIPELINE, STORE
from monitor.app import DELIVERER, create_app
from monitor.config import MonitorConfig, parse_config, token_digest
from monitor.pipeline import Pipeline
from monitor.store import Store

PROBES = {
    "probe-eu": ("eu-west", "tok-probe-eu"),
    "probe-us": ("us-east", "tok-probe-us"),
}
OPERATOR_TOKEN = "tok-operator-alice"
TARGET_A = "https://a.example/whip"
TARGET_B = "https://b.example/whip"


class Clock:
    """Unix time that moves only when a test says so."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Receiver:
    """A notification endpoint on loopback that records requests and fails on demand."""

    url: str = ""
    fail_with: list[int] = field(default_factory=list)
    "Statuses to answer first, in order; then 200 (202 for PagerDuty-style paths)."
    received: list[dict[str, Any]] = field(default_factory=list)
    headers: list[Mapping[str, str]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.fail_with:
            return web.Response(status=self.fail_with.pop(0), text="failing on purpose")
        self.received.append(body)
        self.headers.append(dict(request.headers))
        return web.Response(status=202 if request.path.endswith("enqueue") else 200, text="ok")


@contextlib.asynccontextmanager
async def receiver(path: str = "/hook") -> AsyncIterator[Receiver]:
    sink = Receiver()
    app = web.Application()
    app.router.add_post(path, sink.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    sink.url = f"http://127.0.0.1:{runner.addresses[0][1]}{path}"
    try:
        yield sink
    finally:
        await runner.cleanup()


def config_document(database: Path, **extra: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "database": str(database),
        "listen": "127.0.0.1:0",
        "probes": [
            {"name": name, "region": region, "token_sha256": token_digest(token), "interval_s": 60}
            for name, (region, token) in PROBES.items()
        ],
        "operators": [{"name": "alice", "token_sha256": token_digest(OPERATOR_TOKEN)}],
    }
    document.update(extra)
    return document


@dataclass
class Monitor:
    url: str
    app: web.Application
    http: aiohttp.ClientSession

    @property
    def pipeline(self) -> Pipeline:
        return self.app[PIPELINE]

    @property
    def store(self) -> Store:
        return self.app[STORE]

    async def deliver(self) -> None:
        """Run delivery passes until nothing is due now."""
        while await self.app[DELIVERER].deliver_due():
            pass

    async def send(self, probe: str, body: Any, **headers: str) -> aiohttp.ClientResponse:
        token = PROBES[probe][1] if probe in PROBES else probe
        response = await self.http.post(
            self.url + "/api/v1/results",
            data=json.dumps(body),
            headers={
                "Authorization": f"Bearer {token}",
                "Content-Type": "application/json",
                **headers,
            },
        )
        await response.read()
        return response

    async def api(
        self, method: str, path: str, body: Any = None, token: str = OPERATOR_TOKEN
    ) -> tuple[int, Any]:
        async with self.http.request(
            method, self.url + path, json=body, headers={"Authorization": f"Bearer {token}"}
        ) as response:
            text = await response.text()
            return response.status, json.loads(text) if text else None


@contextlib.asynccontextmanager
async def monitor(config: MonitorConfig, clock: Clock) -> AsyncIterator[Monitor]:
    """Run the monitor on a real socket with the clock in the test's hands."""
    app = create_app(config, clock=clock, tick_interval_s=None)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as http:
            yield Monitor(f"http://127.0.0.1:{runner.addresses[0][1]}", app, http)
    finally:
        await runner.cleanup()


def make_config(tmp_path: Path, **extra: Any) -> MonitorConfig:
    return parse_config(config_document(tmp_path / "monitor.sqlite3", **extra))


# --- probe results ----------------------------------------------------------------------------


def sample(
    t: float,
    *,
    jitter: float = 0.005,
    video_jitter: float = 0.005,
    loss: float = 0.0,
    freezes: int = 0,
    reliable: bool = True,
    av: float | None = 0.0,
    mos: float = 4.4,
) -> Sample:
    """Build one second; `jitter` is audio's."""
    return Sample(
        t_s=t,
        reliable=reliable,
        rtt_s=0.02,
        av_offset_s=av,
        mos=mos,
        audio=AudioSample(packets=50, jitter_s=jitter, loss=loss),
        video=VideoSample(
            packets=30,
            jitter_s=video_jitter,
            loss=loss,
            frames=15,
            fps=15.0,
            freezes=freezes,
            freeze_s=0.3 * freezes,
        ),
    )


def result(
    target: str = TARGET_A,
    *,
    status: Status = Status.OK,
    samples: list[Sample] | None = None,
    connect_s: float = 0.1,
    result_id: str | None = None,
) -> dict[str, Any]:
    failure = (
        Failure(phase=Phase.ICE, reason="ICE did not connect") if status is Status.FAILED else None
    )
    body = CallResult(
        id=result_id or str(uuid.uuid4()),
        started_at="2027-01-15T08:00:00.000Z",
        target=Target(url=target),
        probe=ProbeInfo(version="0.1.0", host="probe"),
        duration_s=5.0,
        status=status,
        failure=failure,
        phases=Phases(connect_s=None if failure else connect_s, offer_s=0.01),
        samples=samples if samples is not None else [sample(float(t)) for t in range(1, 4)],
    )
    return body.to_dict()


def batch(call_id: str, samples: list[Sample], target: str = TARGET_A) -> dict[str, Any]:
    return SampleBatch(
        id=str(uuid.uuid4()),
        call_id=call_id,
        started_at="2027-01-15T08:00:00.000Z",
        target=Target(url=target),
        probe=ProbeInfo(version="0.1.0", host="probe"),
        samples=samples,
    ).to_dict()
