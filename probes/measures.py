"""Metric definitions, as the field defines them (see shared/reference/measurements.md).

Pure computations with time passed in, so each is tested against numbers worked out by
hand: RFC 3550 interarrival jitter, sequence accounting for loss on first transmission
and recovery by retransmission, the W3C freeze rule, and the simplified E-model MOS.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Sequence


class Rfc3550Jitter:
    """Interarrival jitter, RFC 3550 section 6.4.1 / appendix A.8, in seconds."""

    def __init__(self, clock_rate: int) -> None:
        self._rate = clock_rate
        self._transit: float | None = None
        self.value = 0.0

    def update(self, arrival: float, rtp_timestamp: int) -> None:
        """Feed one packet received in order (`rtp_timestamp` unwrapped)."""
        transit = arrival - rtp_timestamp / self._rate
        if self._transit is not None:
            d = abs(transit - self._transit)
            self.value += (d - self.value) / 16
        self._transit = transit


def rfc3550_jitter_of_delays(delays: Sequence[float]) -> list[float]:
    """Return the running RFC 3550 jitter over a sequence of one-way delays (seconds).

    D(i-1, i) reduces to the difference of consecutive delays when the send spacing equals
    the RTP timestamp spacing: this is the ground truth for a path that adds `delays`.
    """
    jitter = 0.0
    out: list[float] = []
    for previous, current in itertools.pairwise(delays):
        jitter += (abs(current - previous) - jitter) / 16
        out.append(jitter)
    return out


class SequenceAccount:
    """Loss on first transmission and recovery by retransmission, from sequence numbers.

    aiortc's own counters mix the RTX stream into the media stream; this keeps them apart:
    a primary packet counts as received, a gap as lost, and an RTX packet carrying a
    sequence number still missing as recovered.
    """

    # Missing sequence numbers remembered for recovery; older gaps stay lost.
    HISTORY = 2048

    def __init__(self) -> None:
        self._base: int | None = None
        self.highest: int | None = None
        "Highest extended sequence number seen."
        self.received = 0
        self.recovered = 0
        self.duplicates = 0
        self._missing: deque[int] = deque()
        self._missing_set: set[int] = set()

    def _extend(self, seq: int) -> int:
        if self.highest is None:
            return seq
        delta = (seq - self.highest) % 65536
        if delta >= 32768:
            delta -= 65536
        return self.highest + delta

    def on_packet(self, seq: int) -> bool:
        """Count a packet's first transmission; return True if it came in order."""
        ext = self._extend(seq)
        if self._base is None or self.highest is None:
            self._base = self.highest = ext
            self.received += 1
            return True
        if ext > self.highest:
            for missing in range(self.highest + 1, ext):
                self._remember(missing)
            self.highest = ext
            self.received += 1
            return True
        if ext in self._missing_set:  # late, out of order: not lost after all
            self._missing_set.discard(ext)
            self.received += 1
        else:
            self.duplicates += 1
        return False

    def on_retransmission(self, seq: int) -> None:
        """Count an RTX packet carrying original sequence number `seq`."""
        ext = self._extend(seq)
        if ext in self._missing_set:
            self._missing_set.discard(ext)
            self.recovered += 1

    def _remember(self, ext: int) -> None:
        self._missing.append(ext)
        self._missing_set.add(ext)
        while len(self._missing) > self.HISTORY:
            self._missing_set.discard(self._missing.popleft())

    @property
    def expected(self) -> int:
        if self._base is None or self.highest is None:
            return 0
        return self.highest - self._base + 1

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)


class FreezeDetector:
    """W3C webrtc-stats freeze rule over the instants frames became available.

    A freeze is an interval between consecutive frames >= max(3 * avg, avg + 150 ms), avg
    being the mean of the last 30 intervals; libwebrtc needs 5 intervals before judging.
    An interval over 5 s is a pause, not a freeze. Freeze intervals do not feed the average.
    """

    def __init__(self, *, window: int = 30, min_samples: int = 5, pause_s: float = 5.0) -> None:
        self._intervals: deque[float] = deque(maxlen=window)
        self._min_samples = min_samples
        self._pause_s = pause_s
        self._last: float | None = None

    def add(self, instant: float) -> float | None:
        """Feed one frame; return the freeze length if the interval it ends is a freeze."""
        last, self._last = self._last, instant
        if last is None:
            return None
        interval = instant - last
        if interval < 0:
            return None
        if len(self._intervals) >= self._min_samples:
            avg = sum(self._intervals) / len(self._intervals)
            if interval >= max(3 * avg, avg + 0.150):
                return None if interval > self._pause_s else interval
        self._intervals.append(interval)
        return None

    @property
    def last(self) -> float | None:
        return self._last


def mos(rtt_s: float | None, jitter_s: float | None, loss: float | None) -> float | None:
    """Estimate MOS with the simplified E-model used in VoIP monitors (Twilio's SDK)."""
    if rtt_s is None or jitter_s is None or loss is None:
        return None
    latency_ms = rtt_s * 1000 + 2 * jitter_s * 1000 + 10
    r = 94.768 - (latency_ms / 40 if latency_ms < 160 else (latency_ms - 120) / 10)
    r = max(r - 2.5 * loss * 100, 6.52)
    return 1 + 0.035 * r + 7e-6 * r * (r - 60) * (100 - r)


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the q-th percentile (0..100, linear interpolation), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float | None:
    return percentile(values, 50)
