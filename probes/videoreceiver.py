"""What the probe makes of received video: frames delivered, decoded, frozen, late.

Two timelines are kept apart. The *delivered* timeline (frames the network completed,
each moved back by however late the probe itself sent it) feeds the W3C freeze rule:
that is the service's doing. The *decoded* timeline adds the probe's own decoder: when a
frame was lost and the reference chain broke, the time until the next keyframe decodes is
the probe's recovery, reported separately.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import av
import numpy as np

from probes import markers
from probes.assembler import EncodedFrame
from probes.measures import FreezeDetector
from probes.media import SendLog, SentFrame

GAP_S = 0.6  # Agora's native-SDK video freeze: a rendering gap over 600 ms


@dataclass(slots=True)
class VideoCounts:
    frames: int = 0
    freezes: int = 0
    freeze_s: float = 0.0
    max_freeze_s: float = 0.0
    gaps: int = 0
    recovery: int = 0
    recovery_s: float = 0.0
    corrupt: int = 0
    repeated: int = 0
    delays: list[float] = field(default_factory=list)


class VideoReceiver:
    """Decode frames, read their markers, and time them against the send log."""

    def __init__(
        self,
        log: SendLog,
        request_keyframe: Callable[[], None],
        on_delay: Callable[[SentFrame, float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._request_keyframe = request_keyframe
        self._on_delay = on_delay
        self._clock = clock
        self._decoder = av.CodecContext.create("libvpx", "r")
        self._freezes = FreezeDetector()
        self._last_delivered: float | None = None
        self._last_n = -1
        self._recovering_since: float | None = None
        self.first_frame_at: float | None = None
        self.total = VideoCounts()
        self.window = VideoCounts()

    def on_frame(self, frame: EncodedFrame) -> None:
        sent, decoded = self._decode(frame) if frame.decodable else (None, False)
        now = self._clock()

        # delivered timeline: the service's freezes
        if sent is None or sent.n > self._last_n:
            instant = frame.complete_at
            if sent is not None:
                self._last_n = sent.n
                instant -= max(0.0, sent.sent_at - sent.due_at)
                delay = frame.complete_at - sent.sent_at
                self.window.delays.append(delay)
                self._on_delay(sent, delay)
            self._deliver(instant)
        else:
            self._count("repeated")

        # decoded timeline: the probe's own recovery
        if decoded:
            if self.first_frame_at is None:
                self.first_frame_at = now
            self._count("frames")
            if self._recovering_since is not None:
                self._count("recovery")
                self._add("recovery_s", now - self._recovering_since)
                self._recovering_since = None
        elif self._recovering_since is None and self.first_frame_at is not None:
            self._recovering_since = frame.complete_at

    def _decode(self, frame: EncodedFrame) -> tuple[SentFrame | None, bool]:
        packet = av.Packet(frame.data)
        try:
            pictures = self._decoder.decode(packet)
        except av.FFmpegError:
            self._request_keyframe()
            return None, False
        sent: SentFrame | None = None
        decoded = False
        for picture in pictures:
            assert isinstance(picture, av.VideoFrame)
            decoded = True
            plane = picture.planes[0]
            luma = np.frombuffer(memoryview(plane), np.uint8).reshape(
                picture.height, plane.line_size
            )
            number = markers.read_frame_number(luma[:, : picture.width])
            if number is None:
                self._count("corrupt")
                continue
            sent = self._log.find_frame(number, frame.complete_at)
        return sent, decoded

    def _deliver(self, instant: float) -> None:
        last, self._last_delivered = self._last_delivered, instant
        if last is not None and instant - last > GAP_S:
            self._count("gaps")
        freeze = self._freezes.add(instant)
        if freeze is not None:
            self._count("freezes")
            self._add("freeze_s", freeze)
            for counts in (self.total, self.window):
                counts.max_freeze_s = max(counts.max_freeze_s, freeze)

    def _count(self, name: str) -> None:
        for counts in (self.total, self.window):
            setattr(counts, name, getattr(counts, name) + 1)

    def _add(self, name: str, value: float) -> None:
        for counts in (self.total, self.window):
            setattr(counts, name, getattr(counts, name) + value)

    def take_window(self) -> VideoCounts:
        window, self.window = self.window, VideoCounts()
        return window
