"""Fault injection with ground truth: what the reflector does to the media it echoes.

Parameters come from the WHIP URL's query string, per call. Delay, jitter and loss act on
the wire (each outgoing RTP packet, retransmissions included, after the sender and
before SRTP), so the probe sees what a real network would show: late packets, sequence
gaps, retransmissions that may or may not make it. Blackouts act on frames (see
reflector.forwarder): the echo of one medium stops, without sequence gaps.

Every decision is recorded, so a test computes the exact value the probe should report.
"""

from __future__ import annotations

import asyncio
import math
import random
import struct
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiortc.rtp import is_rtcp

from probes.aiortc_hooks import RtpSend
from probes.measures import rfc3550_jitter_of_delays

# asyncio may fire a timer up to its clock resolution early; within this, a packet is due.
TIMER_SLACK_S = 0.0005
# Per-packet records kept per stream for GET ?packets=1 (about 30 minutes of audio).
MAX_RECORDS = 100_000


@dataclass(frozen=True)
class Blackout:
    start_s: float
    "Seconds after the epoch: media start for a call's own, the change for a live one."
    duration_s: float
    every_s: float | None = None
    "Repeat every this many seconds; once if None."

    def period(self, t: float) -> int | None:
        """Return which repetition `t` (seconds after the epoch) falls in, if any."""
        if t < self.start_s:
            return None
        k = int((t - self.start_s) // self.every_s) if self.every_s else 0
        return k if t < self.end_s(k) else None

    def start_at(self, k: int) -> float:
        return self.start_s + k * (self.every_s or 0.0)

    def end_s(self, k: int = 0) -> float:
        return self.start_at(k) + self.duration_s


@dataclass(frozen=True, kw_only=True)
class Impairment:
    audio_delay_ms: float = 0.0
    video_delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss: float = 0.0
    seed: int | None = None
    video_blackout: Blackout | None = None
    audio_blackout: Blackout | None = None

    PARAMETERS = (
        "audio_delay_ms",
        "video_delay_ms",
        "jitter_ms",
        "loss",
        "seed",
        "video_blackout",
        "audio_blackout",
    )

    @classmethod
    def from_query(cls, query: Mapping[str, str]) -> Impairment:
        """Parse query parameters; raise ValueError naming the parameter at fault."""
        unknown = sorted(set(query) - set(cls.PARAMETERS))
        if unknown:
            raise ValueError(
                f"unknown parameter {unknown[0]!r} (known: {', '.join(cls.PARAMETERS)})"
            )
        values: dict[str, Any] = {}
        for name in ("audio_delay_ms", "video_delay_ms", "jitter_ms"):
            if name in query:
                values[name] = _number(name, query[name], 0, 10_000)
        if "loss" in query:
            values["loss"] = _number("loss", query["loss"], 0, 1)
        if "seed" in query:
            try:
                values["seed"] = int(query["seed"])
            except ValueError:
                raise ValueError(f"seed: {query['seed']!r} is not an integer") from None
        for name in ("video_blackout", "audio_blackout"):
            if name in query:
                values[name] = _blackout(name, query[name])
        return cls(**values)

    def delay_s(self, kind: str) -> float:
        return (self.audio_delay_ms if kind == "audio" else self.video_delay_ms) / 1000

    def blackout(self, kind: str) -> Blackout | None:
        return self.audio_blackout if kind == "audio" else self.video_blackout

    @property
    def on_wire(self) -> bool:
        return bool(self.audio_delay_ms or self.video_delay_ms or self.jitter_ms or self.loss)

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            name: getattr(self, name)
            for name in ("audio_delay_ms", "video_delay_ms", "jitter_ms", "loss", "seed")
        }
        for name in ("video_blackout", "audio_blackout"):
            b: Blackout | None = getattr(self, name)
            out[name] = (
                None
                if b is None
                else {"start_s": b.start_s, "duration_s": b.duration_s, "every_s": b.every_s}
            )
        return out


def _number(name: str, text: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a number") from None
    if not math.isfinite(value) or not low <= value <= high:
        raise ValueError(f"{name}: {text} is outside {low:g}..{high:g}")
    return value


def _blackout(name: str, text: str) -> Blackout:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"{name}: expected START:DURATION[:EVERY] in seconds, got {text!r}")
    start, duration = _number(name, parts[0], 0, 86_400), _number(name, parts[1], 0, 86_400)
    every = _number(name, parts[2], 0.1, 86_400) if len(parts) == 3 else None
    if every is not None and every <= duration:
        raise ValueError(f"{name}: EVERY must be longer than DURATION")
    return Blackout(start, duration, every)


@dataclass(slots=True)
class _Stream:
    """One outgoing SSRC and what was done to it."""

    kind: str
    retransmission: bool
    rng: random.Random
    sent: int = 0
    dropped: int = 0
    last_due: float = 0.0
    queue: deque[tuple[float, float, bytes, int, int]] = field(default_factory=deque)
    "(due, queued_at, data, sequence, timestamp) waiting to go out, in order."
    records: list[tuple[int, int, float | None]] = field(default_factory=list)
    "(sequence, RTP timestamp, applied delay in s or None if dropped)."
    draining: bool = False


class WireImpairment:
    """Delay, jitter and loss on a peer connection's outgoing RTP, with a record of each."""

    def __init__(
        self,
        impairment: Impairment,
        streams: Mapping[int, tuple[str, bool]],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """`streams` maps each outgoing SSRC to (kind, is_retransmission)."""
        self.impairment = impairment
        self._loop = loop
        self._summary: dict[str, object] | None = None
        base = (
            impairment.seed
            if impairment.seed is not None
            else random.SystemRandom().randrange(2**32)
        )
        # One generator per stream, so a stream's draws depend on its own packets only.
        self._streams = {
            ssrc: _Stream(kind, rtx, random.Random(f"{base}:{kind}:{rtx}"))
            for ssrc, (kind, rtx) in streams.items()
        }

    def wrap(self, send: RtpSend) -> RtpSend:
        async def impaired(data: bytes) -> None:
            stream = None if is_rtcp(data) or len(data) < 12 else self._streams.get(_ssrc(data))
            if stream is None:  # RTCP and unknown streams are not impaired
                await send(data)
                return
            if not self.impairment.on_wire and not stream.queue:
                # nothing to do (a live impairment may come later): straight through
                stream.sent += 1
                await send(data)
                return
            self._apply(stream, data, send)

        return impaired

    def _apply(self, stream: _Stream, data: bytes, send: RtpSend) -> None:
        seq, timestamp = struct.unpack_from("!HI", data, 2)
        impairment = self.impairment
        stream.sent += 1
        if impairment.loss and stream.rng.random() < impairment.loss:
            stream.dropped += 1
            self._record(stream, seq, timestamp, None)
            return
        now = self._loop.time()
        delay = impairment.delay_s(stream.kind)
        if impairment.jitter_ms:
            delay += stream.rng.uniform(0, impairment.jitter_ms / 1000)
        # Order is kept within a stream, as on a network path without reordering.
        due = max(now + delay, stream.last_due)
        stream.last_due = due
        stream.queue.append((due, now, data, seq, timestamp))
        if not stream.draining:
            stream.draining = True
            self._loop.call_at(due, self._drain_soon, stream, send)

    def _drain_soon(self, stream: _Stream, send: RtpSend) -> None:
        self._loop.create_task(self._drain(stream, send))

    async def _drain(self, stream: _Stream, send: RtpSend) -> None:
        while stream.queue:
            due, queued_at, data, seq, timestamp = stream.queue[0]
            now = self._loop.time()
            if due > now + TIMER_SLACK_S:
                self._loop.call_at(due, self._drain_soon, stream, send)
                return
            stream.queue.popleft()
            self._record(stream, seq, timestamp, now - queued_at)
            try:
                await send(data)
            except ConnectionError:
                stream.queue.clear()
                break
        stream.draining = False

    @staticmethod
    def _record(stream: _Stream, seq: int, timestamp: int, delay: float | None) -> None:
        if len(stream.records) < MAX_RECORDS:
            stream.records.append((seq, timestamp, delay))

    def forget_packets(self) -> None:
        """Keep the totals, drop the per-packet records (memory for ended calls)."""
        if self._summary is None:
            self._summary = self.report()
            for stream in self._streams.values():
                stream.records = []

    def report(self, *, packets: bool = False) -> dict[str, object]:
        """Return what was applied per medium; with `packets`, every packet's fate."""
        if self._summary is not None:
            return self._summary
        out: dict[str, object] = {}
        for kind in ("audio", "video"):
            media = [s for s in self._streams.values() if s.kind == kind and not s.retransmission]
            rtx = [s for s in self._streams.values() if s.kind == kind and s.retransmission]
            delays = [d for s in media for _, _, d in s.records if d is not None]
            running = rfc3550_jitter_of_delays(delays)
            entry: dict[str, object] = {
                "packets_sent": sum(s.sent for s in media),
                "packets_dropped": sum(s.dropped for s in media),
                "retransmissions_sent": sum(s.sent for s in rtx),
                "retransmissions_dropped": sum(s.dropped for s in rtx),
                "delay_min_s": min(delays, default=None),
                "delay_mean_s": (sum(delays) / len(delays)) if delays else None,
                "delay_max_s": max(delays, default=None),
                # The mean of the running RFC 3550 estimate, the way a receiver sampling
                # its jitter once a second would see it on average.
                "rfc3550_jitter_s": (sum(running) / len(running)) if running else None,
            }
            if packets:
                entry["packets"] = [
                    {"seq": seq, "timestamp": ts, "delay_s": delay}
                    for s in media
                    for seq, ts, delay in s.records
                ]
            out[kind] = entry
        return out


def _ssrc(data: bytes) -> int:
    ssrc: int = struct.unpack_from("!I", data, 8)[0]
    return ssrc
