"""Low-latency frame assembly in place of aiortc's JitterBuffer.

aiortc's JitterBuffer holds audio until four more packets arrived (about 80 ms) and a
video frame until the next one starts (one frame interval), which skews A/V timing by
the frame rate; and it waits for a missing video packet until 512 packets pile up, which
turns one lost packet into seconds of frozen video. The assembler releases an audio
packet as soon as it arrives and a VP8 frame as soon as its packets up to the marker bit
are in; it gives up on a missing packet after `max_wait_s` when a later frame is already
complete, marks the reference chain broken and asks for a keyframe.

Used by the probe (which decodes) and by the reflector (which forwards encoded frames).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from aiortc import RTCRtpReceiver
from aiortc.rtp import RtpPacket

from probes import aiortc_hooks
from probes.aiortc_hooks import FrameBuffer

# How far back a sequence number may jump before it counts as a restart of the stream.
MAX_MISORDER = 1000
# Packets held while waiting for a missing one, at most (about 4 s of 320x240 video).
CAPACITY = 512


@dataclass(slots=True)
class EncodedFrame:
    """One encoded frame as the network delivered it."""

    data: bytes
    timestamp: int
    "RTP timestamp, unwrapped past 2**32."
    keyframe: bool
    first_at: float
    "Arrival of its first packet (monotonic seconds)."
    complete_at: float
    "Arrival of the packet that completed it."
    decodable: bool
    "False while the reference chain is broken (a frame was lost since the last keyframe)."


@dataclass(slots=True)
class _Packet:
    timestamp: int
    marker: bool
    start: bool
    data: bytes
    arrival: float


class Unwrapper:
    """Extend 16- or 32-bit RTP counters monotonically across wraps."""

    def __init__(self, bits: int) -> None:
        self._modulo = 1 << bits
        self._half = 1 << (bits - 1)
        self._last: int | None = None

    def unwrap(self, value: int) -> int:
        if self._last is None:
            self._last = value
            return value
        delta = (value - self._last) % self._modulo
        if delta >= self._half:
            delta -= self._modulo
        extended = self._last + delta
        if delta > 0:
            self._last = extended
        return extended


def vp8_frame_start(payload: bytes) -> bool:
    """Tell whether an RTP payload starts a VP8 frame (S bit set in partition 0)."""
    return len(payload) > 0 and payload[0] & 0x1F == 0x10


def vp8_keyframe(frame_data: bytes) -> bool:
    """Tell whether VP8 frame data (descriptor stripped) is a keyframe (P bit clear)."""
    return len(frame_data) > 0 and frame_data[0] & 0x01 == 0


class FrameAssembler(FrameBuffer):
    """Assemble encoded frames from depayloaded RTP packets and hand them to `on_frame`."""

    def __init__(
        self,
        kind: str,
        on_frame: Callable[[EncodedFrame], None],
        *,
        max_wait_s: float = 0.2,
        pli_interval_s: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kind = kind
        self._on_frame = on_frame
        self._max_wait_s = max_wait_s
        self._pli_interval_s = pli_interval_s
        self._clock = clock
        self._seq = Unwrapper(16)
        self._ts = Unwrapper(32)
        self._packets: dict[int, _Packet] = {}
        self._next: int | None = None
        self._blocked_since: float | None = None
        self._chain_ok = False
        self._need_keyframe = False
        self._last_pli = -1e9
        self.frames = 0
        "Frames released."
        self.skipped = 0
        "Video frames given up on (a packet never came)."
        self.late = 0
        "Packets that arrived after their frame was released or given up."

    def add(self, packet: RtpPacket) -> tuple[bool, None]:
        now = self._clock()
        seq = self._seq.unwrap(packet.sequence_number)
        data: bytes = getattr(packet, "_data", b"")
        timestamp = self._ts.unwrap(packet.timestamp)
        if self.kind == "audio":
            return self._add_audio(seq, timestamp, data, now), None
        return self._add_video(seq, packet, timestamp, data, now), None

    # --- audio: every packet is a frame -------------------------------------------------

    def _add_audio(self, seq: int, timestamp: int, data: bytes, now: float) -> bool:
        if self._next is not None and seq < self._next:
            self.late += 1
            return False
        self._next = seq + 1
        self.frames += 1
        self._on_frame(EncodedFrame(data, timestamp, True, now, now, True))
        return False

    # --- video: packets up to the marker bit ---------------------------------------------

    def _add_video(
        self, seq: int, packet: RtpPacket, timestamp: int, data: bytes, now: float
    ) -> bool:
        if self._next is not None and seq < self._next:
            if self._next - seq > MAX_MISORDER:
                self._restart()
            else:
                self.late += 1
                return False
        start = vp8_frame_start(packet.payload)
        if self._next is None:
            if not start:  # joined mid-frame: wait for a start, and ask for a keyframe
                self._need_keyframe = True
                return self._want_keyframe(now)
            self._next = seq
        self._packets[seq] = _Packet(timestamp, bool(packet.marker), start, data, now)
        self._drain(now)
        if len(self._packets) > CAPACITY:
            self._give_up(now, force=True)
        return self._need_keyframe and self._want_keyframe(now)

    def _drain(self, now: float) -> None:
        while self._next is not None and self._release_next():
            pass
        if not self._packets:
            self._blocked_since = None
        elif self._blocked_since is None:
            self._blocked_since = now
        elif now - self._blocked_since >= self._max_wait_s:
            self._give_up(now, force=False)

    def _release_next(self) -> bool:
        """Release the frame starting at `_next` if it is complete."""
        assert self._next is not None
        first = self._packets.get(self._next)
        if first is None or not first.start:
            return False
        seq = self._next
        parts: list[_Packet] = []
        while True:
            part = self._packets.get(seq)
            if part is None or part.timestamp != first.timestamp:
                return False
            parts.append(part)
            if part.marker:
                break
            seq += 1
        for s in range(self._next, seq + 1):
            del self._packets[s]
        self._next = seq + 1
        self._blocked_since = None
        data = b"".join(p.data for p in parts)
        keyframe = vp8_keyframe(data)
        if keyframe:
            self._chain_ok = True
            self._need_keyframe = False
        elif not self._chain_ok:
            self._need_keyframe = True
        self.frames += 1
        self._on_frame(
            EncodedFrame(
                data,
                first.timestamp,
                keyframe,
                min(p.arrival for p in parts),
                max(p.arrival for p in parts),
                self._chain_ok,
            )
        )
        return True

    def _give_up(self, now: float, *, force: bool) -> None:
        """Skip to the next frame start if one is complete (or unconditionally if forced)."""
        assert self._next is not None
        starts = sorted(s for s, p in self._packets.items() if p.start and s > self._next)
        for start in starts:
            if force or self._complete_from(start):
                self._drop_before(start)
                self._next = start
                self._chain_ok = False
                self._need_keyframe = True
                self.skipped += 1
                self._blocked_since = now
                self._drain(now)
                return
        if force:
            self._restart()

    def _complete_from(self, seq: int) -> bool:
        first = self._packets[seq]
        while True:
            part = self._packets.get(seq)
            if part is None or part.timestamp != first.timestamp:
                return False
            if part.marker:
                return True
            seq += 1

    def _drop_before(self, seq: int) -> None:
        for s in [s for s in self._packets if s < seq]:
            del self._packets[s]

    def _restart(self) -> None:
        self._packets.clear()
        self._next = None
        self._blocked_since = None
        self._chain_ok = False
        self._need_keyframe = True

    def _want_keyframe(self, now: float) -> bool:
        if now - self._last_pli < self._pli_interval_s:
            return False
        self._last_pli = now
        return True


def attach(
    receiver: RTCRtpReceiver,
    kind: str,
    on_frame: Callable[[EncodedFrame], None],
    on_packet: Callable[[RtpPacket, float], None],
) -> FrameAssembler:
    """Give a receiver callmon's receive path: arrival tap, assembler, no REMB."""
    assembler = FrameAssembler(kind, on_frame)
    aiortc_hooks.tap_rtp(receiver, on_packet)
    aiortc_hooks.replace_frame_buffer(receiver, assembler)
    aiortc_hooks.disable_bitrate_estimator(receiver)
    return assembler
