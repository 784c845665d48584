"""A call that cannot work fails in the right phase, in time, and leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from av.frame import Frame
from av.packet import Packet
from conftest import LOOPBACK, call, free_port

from callmon.callresult import CallResult, Phase, Status
from probes import aiortc_hooks

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def resources() -> tuple[int, int, int]:
    """Return (tasks, open file descriptors, threads) of this process."""
    return (
        len(asyncio.all_tasks()),
        len(os.listdir("/proc/self/fd")),
        threading.active_count(),
    )


async def settled(baseline: tuple[int, int, int]) -> tuple[int, int, int]:
    """Wait (bounded) for the counts to come back down to the baseline."""
    deadline = time.monotonic() + 3
    while True:
        now = resources()
        if all(n <= b for n, b in zip(now, baseline, strict=True)) or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.05)


async def serve(handler: Handler, hang_up: Handler | None = None) -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_post("/whip", handler)
    if hang_up is not None:
        app.router.add_delete("/whip/{id}", hang_up)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/whip"
    finally:
        await runner.cleanup()


async def checked_call(url: str, budget_s: float, **options: Any) -> CallResult:
    """Call, asserting the call ended within `budget_s` and released what it took."""
    baseline = resources()
    started = time.monotonic()
    result = await call(url, 3, **options)
    elapsed = time.monotonic() - started
    assert elapsed <= budget_s, f"took {elapsed:.1f} s"
    assert await settled(baseline) <= baseline, "tasks, sockets or threads leaked"
    assert result.status is Status.FAILED
    assert result.failure is not None
    return result


async def test_closed_port_fails_in_signaling() -> None:
    result = await checked_call(f"http://127.0.0.1:{free_port()}/whip", 2)
    assert result.failure is not None
    assert result.failure.phase is Phase.SIGNALING
    assert "connection refused" in result.failure.reason
    assert result.phases.offer_s is not None
    assert result.phases.answer_s is None


@pytest.fixture
async def answers_500() -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=500, text="database on fire")

    async for url in serve(handler):
        yield url


async def test_server_error_fails_in_signaling_with_the_body(answers_500: str) -> None:
    result = await checked_call(answers_500, 2)
    assert result.failure is not None
    assert result.failure.phase is Phase.SIGNALING
    assert "HTTP 500" in result.failure.reason
    assert "database on fire" in result.failure.reason


@pytest.fixture
async def answers_garbage() -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            status=201,
            body=b"v=0\r\nthis is not an answer\r\n",
            content_type="application/sdp",
            headers={"Location": "/whip/1"},
        )

    async for url in serve(handler):
        yield url


async def test_malformed_answer_fails_in_signaling(answers_garbage: str) -> None:
    result = await checked_call(answers_garbage, 2)
    assert result.failure is not None
    assert result.failure.phase is Phase.SIGNALING
    assert "malformed SDP answer" in result.failure.reason


class Silent(MediaStreamTrack):
    """A track that is negotiated as sending but never produces anything."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    async def recv(self) -> Frame | Packet[Any]:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def aiortc_target(tracks: bool, break_ice: bool = False) -> AsyncIterator[str]:
    """A WHIP target built on aiortc that answers but never sends media.

    It closes its peer connection when the probe hangs up, so what remains open after a
    call is the probe's.
    """
    peers: list[RTCPeerConnection] = []

    async def hang_up(request: web.Request) -> web.Response:
        for pc in peers:
            await pc.close()
        return web.Response(text="bye")

    async def handler(request: web.Request) -> web.Response:
        pc = RTCPeerConnection(LOOPBACK.configuration())
        peers.append(pc)
        await pc.setRemoteDescription(
            RTCSessionDescription(sdp=(await request.text()), type="offer")
        )
        if tracks:
            for kind in ("audio", "video"):
                pc.addTrack(Silent(kind))
        with aiortc_hooks.host_addresses(("127.0.0.1",)):
            await pc.setLocalDescription(await pc.createAnswer())
        answer = pc.localDescription.sdp
        if break_ice:
            # a real answer whose candidates nobody answers on any more
            await pc.close()
        return web.Response(
            status=201,
            body=answer.encode(),
            content_type="application/sdp",
            headers={"Location": "/whip/1"},
        )

    try:
        async for url in serve(handler, hang_up):
            yield url
    finally:
        for pc in peers:
            await pc.close()


@pytest.fixture
async def never_sends() -> AsyncIterator[str]:
    async for url in aiortc_target(tracks=True):
        yield url


async def test_target_that_never_sends_media_fails_in_media(never_sends: str) -> None:
    result = await checked_call(never_sends, 5, media_timeout_s=1.5)
    assert result.failure is not None
    assert result.failure.phase is Phase.MEDIA
    assert "no audio packets and no video packets within 1.5 s" in result.failure.reason
    assert result.phases.dtls_s is not None, "it did connect: media is what failed"


@pytest.fixture
async def receive_only() -> AsyncIterator[str]:
    async for url in aiortc_target(tracks=False):
        yield url


async def test_target_that_will_not_send_fails_at_once(receive_only: str) -> None:
    result = await checked_call(receive_only, 2)
    assert result.failure is not None
    assert result.failure.phase is Phase.MEDIA
    assert "does not send audio and video back" in result.failure.reason


@pytest.fixture
async def unreachable_candidates() -> AsyncIterator[str]:
    async for url in aiortc_target(tracks=True, break_ice=True):
        yield url


async def test_unreachable_candidates_fail_in_ice(unreachable_candidates: str) -> None:
    result = await checked_call(unreachable_candidates, 5, connect_timeout_s=2.5)
    assert result.failure is not None
    assert result.failure.phase is Phase.ICE
    assert result.phases.answer_s is not None
    assert result.phases.ice_s is None
