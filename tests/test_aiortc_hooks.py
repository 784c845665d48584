"""The hooks into aiortc's internals: each works, and fails loudly when its target moves."""

from __future__ import annotations

import asyncio

import pytest
from aiortc import RTCPeerConnection

from probes import aiortc_hooks
from probes.assembler import FrameAssembler
from probes.ice import IceOptions, resolve_hosts


def candidates(sdp: str) -> list[str]:
    return [line.split(" ")[4] for line in sdp.splitlines() if line.startswith("a=candidate")]


async def offer_candidates(hosts: tuple[str, ...] | None) -> list[str]:
    pc = RTCPeerConnection(IceOptions().configuration())
    pc.addTransceiver("audio")
    try:
        with aiortc_hooks.host_addresses(hosts):
            await pc.setLocalDescription(await pc.createOffer())
        return candidates(pc.localDescription.sdp)
    finally:
        await pc.close()


async def test_host_candidates_follow_the_context_and_only_it() -> None:
    assert await offer_candidates(("127.0.0.1",)) == ["127.0.0.1"]
    # outside the block aioice's default holds again: never loopback
    assert "127.0.0.1" not in await offer_candidates(None)
    # two calls in parallel, each with its own choice
    pinned, default = await asyncio.gather(offer_candidates(("127.0.0.1",)), offer_candidates(None))
    assert pinned == ["127.0.0.1"]
    assert "127.0.0.1" not in default


def test_interfaces_resolve_to_their_addresses() -> None:
    assert resolve_hosts(("lo",))[0] == "127.0.0.1"
    assert resolve_hosts(("127.0.0.1", "lo")).count("127.0.0.1") == 1  # no duplicates
    with pytest.raises(ValueError, match="neither an IP address nor an interface"):
        resolve_hosts(("nosuch0",))


async def test_receiver_hooks_take_and_refuse_a_moved_attribute() -> None:
    pc = RTCPeerConnection(IceOptions().configuration())
    receiver = pc.addTransceiver("video").receiver
    buffer = FrameAssembler("video", lambda frame: None)
    aiortc_hooks.replace_frame_buffer(receiver, buffer)
    assert receiver._RTCRtpReceiver__jitter_buffer is buffer  # type: ignore[attr-defined]
    aiortc_hooks.disable_bitrate_estimator(receiver)
    assert receiver._RTCRtpReceiver__remote_bitrate_estimator is None  # type: ignore[attr-defined]
    # if aiortc renamed it, the hook must say so rather than set a dead attribute
    del receiver._RTCRtpReceiver__jitter_buffer  # type: ignore[attr-defined]
    with pytest.raises(aiortc_hooks.HookError, match="jitter_buffer"):
        aiortc_hooks.replace_frame_buffer(receiver, buffer)
    await pc.close()


def test_versions_are_pinned() -> None:
    import aioice
    import aiortc

    assert {"aiortc": aiortc.__version__, "aioice": aioice.__version__} == aiortc_hooks.PINNED
