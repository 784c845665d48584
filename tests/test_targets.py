"""Check that the real third-party peers of tests/targets.py start and carry a call."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aioice.ice
import pytest
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from targets import coturn, janus_in_namespace, list_namespaces, log_tail

# Generous: relay-to-relay between two aiortc peers sometimes takes ~0.5 s, and CI
# machines are slow and busy.
CONNECT_TIMEOUT = 10.0
SIGNALING_TIMEOUT = 10.0


@contextlib.contextmanager
def show_log_on_failure(*paths: Path) -> Iterator[None]:
    """Print the tails of `paths` if the block fails, so pytest shows why."""
    try:
        yield
    except BaseException:
        for path in paths:
            print(f"--- {path} ---\n{log_tail(path)}")
        raise


async def wait_for(condition: Callable[[], bool], within: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test naming `what` after `within` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.01)


def candidate_lines(sdp: str) -> list[list[str]]:
    """Return the fields of every a=candidate line of `sdp`."""
    return [
        line.removeprefix("a=candidate:").split()
        for line in sdp.splitlines()
        if line.startswith("a=candidate:")
    ]


def record_states(pc: RTCPeerConnection) -> tuple[list[str], list[str]]:
    """Return lists that collect every connection and ICE connection state of `pc`."""
    connection_states: list[str] = []
    ice_states: list[str] = []

    @pc.on("connectionstatechange")
    def on_connection_state() -> None:
        connection_states.append(pc.connectionState)

    @pc.on("iceconnectionstatechange")
    def on_ice_state() -> None:
        ice_states.append(pc.iceConnectionState)

    return connection_states, ice_states


# ---------------------------------------------------------------------------
# Janus
# ---------------------------------------------------------------------------


async def janus_request(
    http: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> dict[str, Any]:
    """POST one Janus API request and return its reply, failing on a Janus error."""
    async with http.post(url, json={**body, "transaction": secrets.token_hex(6)}) as response:
        response.raise_for_status()
        reply: dict[str, Any] = await response.json(content_type=None)
    assert reply["janus"] in ("success", "ack"), reply
    return reply


async def janus_event(
    http: aiohttp.ClientSession, session_url: str, wanted: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Long-poll the session until an event satisfies `wanted`; return that event."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SIGNALING_TIMEOUT
    seen: list[dict[str, Any]] = []
    while (remaining := deadline - loop.time()) > 0:
        timeout = aiohttp.ClientTimeout(total=remaining)
        try:
            async with http.get(f"{session_url}?maxev=1", timeout=timeout) as response:
                response.raise_for_status()
                payload = await response.json(content_type=None)
        except TimeoutError:
            break
        # maxev=1 answers one object; be lenient in case a list comes back.
        events: list[dict[str, Any]] = payload if isinstance(payload, list) else [payload]
        for event in events:
            if wanted(event):
                return event
            seen.append(event)
    pytest.fail(f"no matching Janus event within {SIGNALING_TIMEOUT} s; got {seen}")


async def test_it_runs_an_echotest_call_against_janus_in_a_namespace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connect a real aiortc peer to Janus's EchoTest over the veth pair."""
    async with janus_in_namespace(workdir=tmp_path) as target:
        with show_log_on_failure(target.log_path, tmp_path / "janus.out"):
            janus_address = urlsplit(target.url).hostname

            # aioice would otherwise offer every interface's address; only the veth's
            # host end can reach Janus.
            def host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
                return [target.host_address]

            monkeypatch.setattr(aioice.ice, "get_host_addresses", host_addresses)

            async with contextlib.AsyncExitStack() as stack:
                http = await stack.enter_async_context(
                    aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
                )

                # the gateway loaded exactly what the harness configured
                async with http.get(f"{target.url}/info") as response:
                    info = await response.json(content_type=None)
                assert info["janus"] == "server_info"
                assert list(info["plugins"]) == ["janus.plugin.echotest"]
                assert list(info["transports"]) == ["janus.transport.http"]
                assert not info["events"]
                assert not info["loggers"]
                assert info["ice-lite"] is False
                assert info["full-trickle"] is False

                # create a session and attach the EchoTest plugin
                session = await janus_request(http, target.url, {"janus": "create"})
                session_url = f"{target.url}/{session['data']['id']}"
                handle = await janus_request(
                    http, session_url, {"janus": "attach", "plugin": "janus.plugin.echotest"}
                )
                handle_url = f"{session_url}/{handle['data']['id']}"

                # offer audio and video from a real aiortc peer
                pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
                stack.push_async_callback(pc.close)
                connection_states, ice_states = record_states(pc)
                pc.addTransceiver("audio", direction="sendrecv")
                pc.addTransceiver("video", direction="sendrecv")
                await pc.setLocalDescription(await pc.createOffer())
                offer = pc.localDescription
                assert {fields[4] for fields in candidate_lines(offer.sdp)} == {target.host_address}
                await janus_request(
                    http,
                    handle_url,
                    {
                        "janus": "message",
                        "body": {"audio": True, "video": True},
                        "jsep": {"type": offer.type, "sdp": offer.sdp},
                    },
                )

                # apply Janus's answer, which carries its candidates (half-trickle)
                answer_event = await janus_event(http, session_url, lambda e: "jsep" in e)
                jsep = answer_event["jsep"]
                assert jsep["type"] == "answer"
                assert {fields[4] for fields in candidate_lines(jsep["sdp"])} == {janus_address}
                await pc.setRemoteDescription(
                    RTCSessionDescription(sdp=jsep["sdp"], type=jsep["type"])
                )

                # both ends see the call up: aiortc's DTLS and Janus's webrtcup
                await wait_for(
                    lambda: pc.connectionState == "connected", CONNECT_TIMEOUT, "connected"
                )
                await janus_event(http, session_url, lambda e: e.get("janus") == "webrtcup")

                destroyed = await janus_request(http, session_url, {"janus": "destroy"})
                assert destroyed["janus"] == "success"
                await pc.close()
                assert connection_states == ["connecting", "connected", "closed"]
                assert ice_states == ["checking", "completed", "closed"]

    assert target.namespace not in await list_namespaces()


# ---------------------------------------------------------------------------
# coturn
# ---------------------------------------------------------------------------


async def test_it_relays_a_data_channel_through_coturn(tmp_path: Path) -> None:
    """Connect two relay-only aiortc peers through coturn and echo a message."""
    async with coturn(workdir=tmp_path) as target:
        with show_log_on_failure(target.log_path, tmp_path / "turnserver.out"):

            def relay_only() -> RTCConfiguration:
                server = RTCIceServer(
                    urls=[target.url], username=target.username, credential=target.password
                )
                return RTCConfiguration(
                    iceServers=[server], iceTransportPolicy=RTCIceTransportPolicy.RELAY
                )

            async with contextlib.AsyncExitStack() as stack:
                caller = RTCPeerConnection(relay_only())
                stack.push_async_callback(caller.close)
                callee = RTCPeerConnection(relay_only())
                stack.push_async_callback(callee.close)
                connection_states, _ = record_states(caller)

                # the callee echoes whatever arrives on the caller's channel
                @callee.on("datachannel")
                def on_datachannel(channel: RTCDataChannel) -> None:
                    @channel.on("message")
                    def on_message(message: str | bytes) -> None:
                        channel.send(message)

                channel = caller.createDataChannel("probe")
                received: list[str | bytes] = []

                @channel.on("message")
                def on_echo(message: str | bytes) -> None:
                    received.append(message)

                # exchange offer and answer in-process; gathering completes inside
                # setLocalDescription, so the descriptions carry every candidate
                await caller.setLocalDescription(await caller.createOffer())
                await callee.setRemoteDescription(caller.localDescription)
                await callee.setLocalDescription(await callee.createAnswer())
                await caller.setRemoteDescription(callee.localDescription)

                for pc in (caller, callee):
                    sdp = pc.localDescription.sdp
                    assert "typ relay" in sdp
                    assert "typ host" not in sdp
                    assert {fields[7] for fields in candidate_lines(sdp)} == {"relay"}
                    assert pc.sctp is not None
                    gatherer = pc.sctp.transport.transport.iceGatherer
                    assert {c.type for c in gatherer.getLocalCandidates()} == {"relay"}

                await wait_for(
                    lambda: (
                        caller.connectionState == "connected"
                        and callee.connectionState == "connected"
                    ),
                    CONNECT_TIMEOUT,
                    "both peers connected",
                )
                await wait_for(
                    lambda: channel.readyState == "open", CONNECT_TIMEOUT, "channel open"
                )
                channel.send("ping")
                await wait_for(lambda: received == ["ping"], CONNECT_TIMEOUT, "echo")
                assert connection_states == ["connecting", "connected"]

                # coturn's side of the story: one relay allocation per peer
                await wait_for(
                    lambda: target.log_path.read_text().count("ALLOCATE processed, success") == 2,
                    CONNECT_TIMEOUT,
                    "two allocations in the coturn log",
                )
