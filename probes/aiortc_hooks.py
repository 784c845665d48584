"""Every place callmon reaches into aiortc's and aioice's private parts, in one module.

aiortc has no public API for what an honest probe and a cheap reflector need: packet
arrival times before the jitter buffer, a jitter buffer that does not hold audio four
packets deep, keyframe requests routed to a pre-encoded source, or host candidates on
loopback. These hooks touch private attributes, so the versions are pinned in
pyproject.toml and checked here at import: a version bump fails loudly instead of
measuring something else. tests/test_aiortc_hooks.py exercises each hook.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol

import aioice
import aioice.ice
import aiortc
from aioice.candidate import Candidate
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender
from aiortc.rtcdtlstransport import RTCDtlsTransport
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from aiortc.rtp import RtpPacket

PINNED = {"aiortc": "1.16.0", "aioice": "0.13.0"}


class HookError(RuntimeError):
    """aiortc's internals moved: the hooks must be revisited before measuring anything."""


def _check_versions() -> None:
    found = {"aiortc": aiortc.__version__, "aioice": aioice.__version__}
    if found != PINNED:
        raise HookError(f"callmon's aiortc hooks are written for {PINNED}, found {found}")


_check_versions()


def _private(obj: object, cls: type, name: str) -> str:
    attr = f"_{cls.__name__}__{name}"
    if not hasattr(obj, attr):
        raise HookError(f"{cls.__name__} has no private attribute {name!r} any more")
    return attr


# --- receive side -----------------------------------------------------------------------


class FrameBuffer(Protocol):
    """What aiortc's receiver calls in place of its JitterBuffer."""

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        """Take one depayloaded packet (`packet._data` set); return (send_pli, None).

        Complete frames leave through the buffer's own callback, never through aiortc's
        decoder thread, which stays idle until the receiver stops it.
        """
        ...


def tap_rtp(receiver: RTCRtpReceiver, on_packet: Callable[[RtpPacket, float], None]) -> None:
    """Call `on_packet(packet, arrival)` for every RTP packet, RTX included, on arrival.

    `arrival` is `time.monotonic()` taken before aiortc handles the packet, so it excludes
    the receiver's own buffering. aiortc's DTLS transport handles one datagram at a time,
    so the frame buffer may read the same instant for the packet it is handed next.
    """
    original = receiver._handle_rtp_packet

    async def handle(packet: RtpPacket, arrival_time_ms: int) -> None:
        on_packet(packet, time.monotonic())
        await original(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle  # type: ignore[method-assign]


def replace_frame_buffer(receiver: RTCRtpReceiver, buffer: FrameBuffer) -> None:
    """Replace the receiver's JitterBuffer (before it starts receiving)."""
    setattr(receiver, _private(receiver, RTCRtpReceiver, "jitter_buffer"), buffer)


def disable_bitrate_estimator(receiver: RTCRtpReceiver) -> None:
    """Stop computing REMB: pure-Python work per video packet that no callmon peer uses.

    The reflector forwards pre-encoded media and the probe sends pre-encoded loops, so
    neither can act on a bitrate estimate.
    """
    setattr(receiver, _private(receiver, RTCRtpReceiver, "remote_bitrate_estimator"), None)


def receiver_codecs(receiver: RTCRtpReceiver) -> dict[int, RTCRtpCodecParameters]:
    """Return the negotiated codecs by payload type (filled when receiving starts)."""
    codecs: dict[int, RTCRtpCodecParameters] = getattr(
        receiver, _private(receiver, RTCRtpReceiver, "codecs")
    )
    return codecs


def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> Coroutine[Any, Any, None]:
    """Ask the remote sender of `media_ssrc` for a keyframe (RTCP PLI)."""
    return receiver._send_rtcp_pli(media_ssrc)


# --- send side --------------------------------------------------------------------------


def on_keyframe_request(sender: RTCRtpSender, callback: Callable[[], None]) -> None:
    """Route PLI/FIR received for this sender to `callback`.

    With pre-encoded packets aiortc only sets a flag its encoder would read, so without
    this hook a keyframe request is silently ignored.
    """
    if not callable(getattr(sender, "_send_keyframe", None)):
        raise HookError("RTCRtpSender has no _send_keyframe any more")
    sender._send_keyframe = callback  # type: ignore[method-assign]


def sender_ssrcs(sender: RTCRtpSender) -> tuple[int, int]:
    """Return the sender's (media SSRC, RTX SSRC)."""
    return sender._ssrc, sender._rtx_ssrc


def dtls_transport(pc: RTCPeerConnection) -> RTCDtlsTransport:
    """Return the one DTLS transport of a max-bundle peer connection."""
    transports = {t.sender.transport for t in pc.getTransceivers()}
    if len(transports) != 1:
        raise HookError(f"expected one bundled DTLS transport, found {len(transports)}")
    (transport,) = transports
    return transport


def selected_candidates(pc: RTCPeerConnection) -> tuple[Candidate, Candidate] | None:
    """Return the (local, remote) candidates of the nominated ICE pair, if there is one."""
    ice = dtls_transport(pc).transport
    connection = getattr(ice, "_connection", None)
    nominated = getattr(connection, "_nominated", None)
    if not isinstance(nominated, dict):
        raise HookError("aioice Connection has no _nominated pairs any more")
    pair = nominated.get(1)
    return None if pair is None else (pair.local_candidate, pair.remote_candidate)


RtpSend = Callable[[bytes], Coroutine[Any, Any, None]]


def wrap_rtp_send(transport: RTCDtlsTransport, wrap: Callable[[RtpSend], RtpSend]) -> None:
    """Interpose on every plaintext RTP/RTCP packet the transport sends (before SRTP)."""
    transport._send_rtp = wrap(transport._send_rtp)  # type: ignore[method-assign,assignment]


# --- ICE host candidates ----------------------------------------------------------------

_host_addresses: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "callmon_host_addresses", default=None
)
_stock_get_host_addresses = aioice.ice.get_host_addresses


def _get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    chosen = _host_addresses.get()
    if chosen is None:
        return _stock_get_host_addresses(use_ipv4, use_ipv6)
    return list(chosen)


# aioice looks the function up in its module at gathering time; the replacement only
# changes anything inside `host_addresses()` below, whose context variable follows the
# gathering tasks aiortc spawns from setLocalDescription.
aioice.ice.get_host_addresses = _get_host_addresses


@contextlib.contextmanager
def host_addresses(addresses: tuple[str, ...] | None) -> Iterator[None]:
    """Gather host candidates on exactly `addresses` (loopback allowed) within the block.

    `None` keeps aioice's default: every interface address except 127.0.0.1.
    """
    token = _host_addresses.set(addresses)
    try:
        yield
    finally:
        _host_addresses.reset(token)
