"""What the probe makes of received audio: gaps, and chirps timed against the send log.

A chirp found in the decoded audio is mapped back to the packet that carried it and to
that packet's arrival instant, so its round trip excludes the probe's own decoding and
buffering; the calibration in probes.media does the same on the send side.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from probes import markers
from probes.assembler import EncodedFrame
from probes.media import (
    ANALYSIS_RATE,
    AUDIO_RATE,
    DECIMATION,
    PACKET_SAMPLES,
    AudioDecoder,
    SendLog,
    SentChirp,
)

GAP_S = 0.2  # Agora: an audio rendering pause over 200 ms is an audio freeze
CHIRP_SAMPLES = round(markers.CHIRP_SECONDS * AUDIO_RATE)
PACKET_S = PACKET_SAMPLES / AUDIO_RATE


@dataclass(slots=True)
class AudioCounts:
    gaps: int = 0
    gap_s: float = 0.0
    max_gap_s: float = 0.0
    delays: list[float] = field(default_factory=list)


class AudioReceiver:
    def __init__(
        self,
        log: SendLog,
        on_delay: Callable[[SentChirp, float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._on_delay = on_delay
        self._clock = clock
        self._decoder = AudioDecoder()
        self._detector = markers.ChirpDetector(rate=ANALYSIS_RATE)
        self._origin: int | None = None
        # (rtp timestamp, arrival) of the last few seconds, to time detected chirps
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=250)
        self.first_frame_at: float | None = None
        self.total = AudioCounts()
        self.window = AudioCounts()

    def on_frame(self, frame: EncodedFrame) -> None:
        if self._origin is None:
            self._origin = frame.timestamp
        if self._arrivals:
            _, last_at = self._arrivals[-1]
            gap = frame.complete_at - last_at - PACKET_S
            if gap > GAP_S:
                for counts in (self.total, self.window):
                    counts.gaps += 1
                    counts.gap_s += gap
                    counts.max_gap_s = max(counts.max_gap_s, gap)
        self._arrivals.append((frame.timestamp, frame.complete_at))
        samples = self._decoder.decode(frame.data)
        if samples.size and self.first_frame_at is None:
            self.first_frame_at = self._clock()
        position = round((frame.timestamp - self._origin) / DECIMATION)
        for detection in self._detector.push(position, samples):
            self._time_chirp(detection)

    def _time_chirp(self, detection: markers.Detection) -> None:
        assert self._origin is not None
        per_packet = PACKET_SAMPLES // DECIMATION
        index = int(detection.position // per_packet)
        offset = (detection.position - index * per_packet) / ANALYSIS_RATE
        carrier = self._origin + index * PACKET_SAMPLES
        # Time a chirp only when every packet it spans arrived: a chirp rebuilt around a
        # lost packet is found early or with a wrong symbol, and would then be paired
        # with a chirp seconds away, a false A/V offset.
        spans = range(carrier, carrier + CHIRP_SAMPLES + int(offset * AUDIO_RATE), PACKET_SAMPLES)
        arrived = {ts: at for ts, at in self._arrivals}
        if any(ts not in arrived for ts in spans):
            return
        instant = arrived[carrier] + offset
        sent = self._log.find_chirp(detection.symbol, instant)
        if sent is None:
            return
        delay = instant - sent.instant
        self.window.delays.append(delay)
        self._on_delay(sent, delay)

    def take_window(self) -> AudioCounts:
        window, self.window = self.window, AudioCounts()
        return window
