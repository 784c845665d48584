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

    def mark(self) -> float:
        if self.at is None:
            self.at = self.clock()
        return self.at


# Periods of a repeating blackout whose record is kept.
RECORDS_KEPT = 100


class Forwarder:
    """One medium's path from assembled frames to the echo track."""

    def __init__(
        self,
        kind: str,
        clock_rate: int,
        track: ForwardTrack,
        origin: MediaOrigin,
        request_keyframe: Callable[[], None],
    ) -> None:
        self.kind = kind
        self._time_base = fractions.Fraction(1, clock_rate)
        self._track = track
        self._origin = origin
        self._request_keyframe = request_keyframe
        self._timestamp_origin: int | None = None
        self._waiting_keyframe = kind == "video"
        self._last_pli = -1e9
        self._blackout: Blackout | None = None
        self._epoch: float | None = None
        self._resumed: set[int] = set()
        self._resume_asked: set[int] = set()
        self._last_forwarded: float | None = None
        self.forwarded = 0
        self.records: dict[int, BlackoutRecord] = {}
        "What each period of the blackout did, by period."

    def set_blackout(self, blackout: Blackout | None, epoch: float | None = None) -> None:
        """Apply a blackout, timed from `epoch` (monotonic), or from media start if None."""
        self._blackout = blackout
        self._epoch = epoch
        self._resumed.clear()
        self._resume_asked.clear()
        self.records = {}

    def on_frame(self, frame: EncodedFrame) -> None:
        t = frame.complete_at - self._origin.mark()
        period = self._blacked_out(frame)
        if period is not None:
            record = self.records.get(period)
            if record is None:
                record = self.records[period] = BlackoutRecord(last_before_at=self._last_forwarded)
                while len(self.records) > RECORDS_KEPT:
                    del self.records[min(self.records)]
            record.frames_dropped += 1
            if self.kind == "video":
                self._waiting_keyframe = True
                self._ask_resume(period)
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
        self._last_forwarded = t
        for record in self.records.values():
            if record.first_after_at is None:
                record.first_after_at = t

    def _blacked_out(self, frame: EncodedFrame) -> int | None:
        """Return the blackout period this frame falls in, if it is to be dropped."""
        b = self._blackout
        if b is None:
            return None
        epoch = self._epoch if self._epoch is not None else self._origin.mark()
        t = frame.complete_at - epoch
        period = b.period(t)
        if period is None or period in self._resumed:
            return None
        # Video resumes early on the keyframe asked for just before the end (see
        # RESUME_LEAD_S), so the picture comes back whole and close to the end.
        if self.kind == "video" and frame.keyframe and t >= b.end_s(period) - RESUME_LEAD_S:
            self._resumed.add(period)
            return None
        return period

    def _ask_resume(self, period: int) -> None:
        """Ask upstream for a keyframe timed to arrive as the period ends."""
        if period in self._resume_asked or self._blackout is None:
            return
        self._resume_asked.add(period)
        epoch = self._epoch if self._epoch is not None else self._origin.mark()
        when = epoch + self._blackout.end_s(period) - RESUME_LEAD_S
        loop = asyncio.get_running_loop()
        loop.call_later(max(0.0, when - self._origin.clock()), self.keyframe_upstream)

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
