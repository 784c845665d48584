"""Echo encoded media back without decoding it.

Decoding and re-encoding an echo costs about 0.16 core per call and adds the receive
jitter buffer's skew between audio and video. Instead each received frame, as assembled
by probes.assembler, becomes an `av.Packet` that aiortc's sender only re-packetizes
(its `pack()` path): no codec work, and no A/V offset of the reflector's own.

A keyframe request from the far end is passed upstream as a PLI, since only the original
sender can produce one. A blackout drops one medium's frames for a while; video resumes
at a keyframe requested ahead of time, so the picture comes back whole and close to the
blackout's end.
"""

from __future__ import annotations

import asyncio
import fractions
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from av.packet import Packet

from probes.assembler import EncodedFrame
from reflector.impairment import Blackout

# Video resumes after a blackout at the first keyframe from this long before its end, and
# the keyframe is asked for at that instant: it comes back with the sender's next frame,
# within one frame interval (15 fps). The extra 20 ms keep the request ahead of a frame
# due at exactly that boundary, which would otherwise be a delta frame and cost a whole
# frame interval more.
RESUME_LEAD_S = 1 / 15 + 0.020
PLI_MIN_INTERVAL_S = 0.1


class ForwardTrack(MediaStreamTrack):
    """A track whose `recv()` yields the encoded frames pushed into it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._queue: asyncio.Queue[Packet[Any] | None] = asyncio.Queue()

    def push(self, packet: Packet[Any]) -> None:
        self._queue.put_nowait(packet)

    def end(self) -> None:
        self._queue.put_nowait(None)

    async def recv(self) -> Packet[Any]:
        packet = await self._queue.get()
        if packet is None:
            self.stop()
            raise MediaStreamError
        return packet


@dataclass(slots=True)
class BlackoutRecord:
    """What a blackout really did, measured at the reflector's send side."""

    frames_dropped: int = 0
    last_before_at: float | None = None
    "Media time (s) the last frame before the blackout was forwarded."
    first_after_at: float | None = None
    "Media time (s) the first frame after it was forwarded."

    def as_dict(self) -> dict[str, object]:
        interval = (
            None
            if self.last_before_at is None or self.first_after_at is None
            else self.first_after_at - self.last_before_at
        )
        return {
            "frames_dropped": self.frames_dropped,
            "last_before_s": self.last_before_at,
            "first_after_s": self.first_after_at,
            "interval_s": interval,
        }


class MediaOrigin:
    """The instant media started for a call (its first received frame), shared by media."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.at: float | None = None
        self.listeners: list[Callable[[float], None]] = []

    def mark(self) -> float:
        if self.at is None:
            self.at = self.clock()
            for listener in self.listeners:
                listener(self.at)
        return self.at


class Forwarder:
    """One medium's path from assembled frames to the echo track."""

    def __init__(
        self,
        kind: str,
        clock_rate: int,
        track: ForwardTrack,
        origin: MediaOrigin,
        request_keyframe: Callable[[], None],
        blackout: Blackout | None,
    ) -> None:
        self.kind = kind
        self._time_base = fractions.Fraction(1, clock_rate)
        self._track = track
        self._origin = origin
        self._request_keyframe = request_keyframe
        self._blackout = blackout
        self._timestamp_origin: int | None = None
        self._waiting_keyframe = kind == "video"
        self._last_pli = -1e9
        self.forwarded = 0
        self.record = BlackoutRecord() if blackout else None
        if blackout and kind == "video":
            origin.listeners.append(self._schedule_resume)

    def on_frame(self, frame: EncodedFrame) -> None:
        t = frame.complete_at - self._origin.mark()
        if self._in_blackout(t, frame):
            assert self.record is not None
            self.record.frames_dropped += 1
            return
        if self.kind == "video" and not self._video_may_pass(frame):
            return
        if self._timestamp_origin is None:
            self._timestamp_origin = frame.timestamp
        packet = av.Packet(frame.data)
        packet.pts = frame.timestamp - self._timestamp_origin
        packet.time_base = self._time_base
        self._track.push(packet)
        self.forwarded += 1
        if self.record is not None and self._blackout is not None:
            if t < self._blackout.start_s:
                self.record.last_before_at = t
            elif self.record.first_after_at is None:
                self.record.first_after_at = t

    def _in_blackout(self, t: float, frame: EncodedFrame) -> bool:
        b = self._blackout
        if b is None or t < b.start_s:
            return False
        if self.kind == "audio":
            return t < b.end_s
        return (
            self.record is not None
            and self.record.first_after_at is None
            and not (frame.keyframe and t >= b.end_s - RESUME_LEAD_S)
        )

    def _video_may_pass(self, frame: EncodedFrame) -> bool:
        """Forward only a decodable chain: from a keyframe, with nothing lost since."""
        if not frame.decodable:
            self._waiting_keyframe = True
        elif frame.keyframe:
            self._waiting_keyframe = False
        if self._waiting_keyframe:
            self.keyframe_upstream()
            return False
        return True

    def keyframe_upstream(self) -> None:
        now = self._origin.clock()
        if now - self._last_pli >= PLI_MIN_INTERVAL_S:
            self._last_pli = now
            self._request_keyframe()

    def _schedule_resume(self, origin_at: float) -> None:
        assert self._blackout is not None
        loop = asyncio.get_running_loop()
        resume = origin_at + self._blackout.end_s - RESUME_LEAD_S
        loop.call_later(max(0.0, resume - self._origin.clock()), self.keyframe_upstream)
