"""The reflector's WHIP surface: bad input gets the right status and changes nothing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from conftest import LOOPBACK, call

from callmon.callresult import Phase, Status
from probes import aiortc_hooks
from reflector.app import ReflectorConfig, running

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SDP = {**AUTH, "Content-Type": "application/sdp"}


async def make_offer() -> tuple[RTCPeerConnection, str]:
    """Return a real aiortc offer (audio and video) with loopback candidates."""
    pc = RTCPeerConnection(LOOPBACK.configuration())
    pc.addTransceiver("audio")
    pc.addTransceiver("video")
    with aiortc_hooks.host_addresses(("127.0.0.1",)):
        await pc.setLocalDescription(await pc.createOffer())
    return pc, pc.localDescription.sdp


@pytest.fixture
async def guarded() -> AsyncIterator[str]:
    """A reflector with one call slot, a small SDP limit and a token."""
    config = ReflectorConfig(
        port=0, max_calls=1, max_sdp_bytes=20_000, token=TOKEN, max_duration_s=2.0, ice=LOOPBACK
    )
    async with running(config) as url:
        yield url


async def active_calls(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(url.rsplit("/", 1)[0] + "/healthz") as response:
        count: int = (await response.json())["calls_active"]
        return count


async def test_it_refuses_bad_requests_with_the_reason_and_keeps_serving(guarded: str) -> None:
    url = guarded
    pc, offer = await make_offer()
    async with aiohttp.ClientSession() as http:
        refusals = [
            ({"Content-Type": "application/sdp"}, offer, url, 401, "bearer token"),
            ({**SDP, "Authorization": "Bearer wrong"}, offer, url, 401, "bearer token"),
            ({**AUTH, "Content-Type": "text/plain"}, offer, url, 415, "application/sdp"),
            (SDP, "hello", url, 400, "not an SDP offer"),
            (SDP, "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\nm=bogus\r\n", url, 400, "malformed SDP offer"),
            (SDP, "v=0\r\n" + "a=x\r\n" * 5000, url, 413, "exceeds 20000"),
            (SDP, offer, url + "?audio_delay=150", 400, "unknown parameter 'audio_delay'"),
            (SDP, offer, url + "?loss=lots", 400, "loss: 'lots' is not a number"),
            (SDP, offer, url + "?loss=1.5", 400, "loss: 1.5 is outside 0..1"),
            (SDP, offer, url + "?video_blackout=3", 400, "video_blackout: expected START:DURATION"),
        ]
        for headers, body, target, status, reason in refusals:
            async with http.post(target, data=body, headers=headers) as response:
                text = await response.text()
                assert response.status == status, (target, headers, text)
                assert reason in text, (status, text)
            assert await active_calls(http, url) == 0, "a refused request left a call behind"

        async with http.post(url, data=offer, headers=SDP) as response:
            assert response.status == 201, await response.text()
            assert response.content_type == "application/sdp"
            location = response.headers["Location"]
            assert (await response.text()).startswith("v=0")
        resource = url.rsplit("/whip", 1)[0] + location

        # one slot: the next caller is told to come back later
        async with http.post(url, data=offer, headers=SDP) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "5"
        async with http.patch(resource, headers=AUTH) as response:
            assert response.status == 405
            assert "DELETE" in response.headers["Allow"]
        async with http.get(url + "/nope", headers=AUTH) as response:
            assert response.status == 404
        async with http.get(resource) as response:
            assert response.status == 401
        async with http.delete(resource, headers=AUTH) as response:
            assert response.status == 200
        async with http.get(resource, headers=AUTH) as response:
            record = await response.json()
            assert record["state"] == "ended"
            assert record["ended_reason"] == "deleted"
        assert await active_calls(http, url) == 0
    await pc.close()

    # and it still serves a real call in the freed slot
    result = await call(url, 1.5, token=TOKEN)
    assert result.status is Status.OK, result.failure


async def test_it_hangs_up_calls_at_the_maximum_duration(guarded: str) -> None:
    result = await call(guarded, 6, token=TOKEN, media_timeout_s=2)
    assert result.status is Status.FAILED
    assert result.failure is not None
    assert result.failure.phase is Phase.CALL
    # the reflector's limit is 2 s; the probe notices within its media timeout
    assert 1.5 <= result.summary.media_s <= 5.0, result.summary.media_s
    async with (
        aiohttp.ClientSession() as http,
        http.get(str(result.target.session), headers=AUTH) as response,
    ):
        record = await response.json()
    assert record["ended_reason"] == "expired"


async def test_it_reports_health_and_metrics() -> None:
    async with running(ReflectorConfig(port=0, ice=LOOPBACK)) as url:
        base = url.rsplit("/whip", 1)[0]
        result = await call(url, 1.0)
        assert result.status is Status.OK
        async with aiohttp.ClientSession() as http:
            async with http.get(base + "/healthz") as response:
                health = await response.json()
            async with http.get(base + "/metrics") as response:
                metrics = await response.text()
        assert health["calls_active"] == 0
        assert health["max_calls"] == 20
        assert 'callmon_reflector_calls_total{reason="deleted"} 1.0' in metrics


async def test_a_live_impairment_reaches_calls_in_progress_and_down_plays_dead() -> None:
    async with running(ReflectorConfig(port=0, ice=LOOPBACK)) as url:
        base = url.rsplit("/whip", 1)[0]
        probe = asyncio.create_task(call(url, 8))
        await asyncio.sleep(3.0)
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "callmon.cli", "impair", base, "audio_delay_ms=150"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["calls_affected"] == 1
        result = await probe
        offsets = [s.av_offset_s for s in result.samples if s.av_offset_s is not None]
        # before the change the call was in sync; after it, audio is 150 ms behind
        assert abs(offsets[0]) < 0.01, offsets
        assert offsets[-1] == pytest.approx(-0.150, abs=0.015), offsets

        # a new call gets the live impairment from its start too
        second = await call(url, 3)
        assert second.summary.av_offset_s == pytest.approx(-0.150, abs=0.015)

        # down: calls in progress end, new ones are refused, until cleared
        probe = asyncio.create_task(call(url, 8, media_timeout_s=2))
        await asyncio.sleep(2.5)
        async with aiohttp.ClientSession() as http:
            async with http.put(base + "/admin/impairment?down=1") as response:
                assert (await response.json())["down"] is True
            broken = await probe
            assert broken.failure is not None
            assert broken.failure.phase is Phase.CALL
            refused = await call(url, 1)
            assert refused.failure is not None
            assert "HTTP 503" in refused.failure.reason
            async with http.delete(base + "/admin/impairment") as response:
                assert (await response.json()) == {
                    "impairment": None,
                    "down": False,
                    "calls_affected": 0,
                }
        healthy = await call(url, 2)
        assert healthy.status is Status.OK
