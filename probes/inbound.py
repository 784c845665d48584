"""RTP-level accounting of one received medium: loss, recovery, jitter, bitrate.

Fed by the arrival tap (every packet, RTX included, before any buffering), so the
numbers describe what the network delivered, not what the probe's buffers made of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiortc.rtp import RtpPacket

from probes.assembler import Unwrapper
from probes.measures import Rfc3550Jitter, SequenceAccount


@dataclass(frozen=True, slots=True)
class InboundWindow:
    """Counts since the previous window."""

    packets: int
    lost: int
    recovered: int
    expected: int
    payload_bytes: int

    @property
    def loss(self) -> float | None:
        return self.lost / self.expected if self.expected > 0 else None


class InboundStream:
    """Accounting for one medium's primary stream and its retransmissions."""

    def __init__(self, clock_rate: int) -> None:
        self._clock_rate = clock_rate
        self.account = SequenceAccount()
        self.jitter = Rfc3550Jitter(clock_rate)
        self._timestamps = Unwrapper(32)
        self.first_at: float | None = None
        "Arrival of the first primary packet (monotonic)."
        self.ssrc: int | None = None
        self.restarts = 0
        "Times the target's source changed (a new SSRC)."
        self._payload_bytes = 0
        self._carried = InboundWindow(0, 0, 0, 0, 0)
        self._mark = self._carried

    def on_packet(self, packet: RtpPacket, arrival: float, *, retransmission: bool) -> None:
        if retransmission:
            if len(packet.payload) >= 2:
                self.account.on_retransmission(int.from_bytes(packet.payload[:2], "big"))
            return
        if self.ssrc is None:
            self.ssrc = packet.ssrc
            self.first_at = arrival
        elif packet.ssrc != self.ssrc:
            # A new source (the target restarted its sender): account it afresh rather
            # than read a random sequence jump as thousands of lost packets.
            self._carried = self.totals()
            self._payload_bytes = 0
            self.account = SequenceAccount()
            self.jitter = Rfc3550Jitter(self._clock_rate)
            self._timestamps = Unwrapper(32)
            self.ssrc = packet.ssrc
            self.restarts += 1
        if self.account.on_packet(packet.sequence_number):
            self.jitter.update(arrival, self._timestamps.unwrap(packet.timestamp))
        self._payload_bytes += len(packet.payload)

    def totals(self) -> InboundWindow:
        a, c = self.account, self._carried
        return InboundWindow(
            c.packets + a.received,
            c.lost + a.lost,
            c.recovered + a.recovered,
            c.expected + a.expected,
            c.payload_bytes + self._payload_bytes,
        )

    def take_window(self) -> InboundWindow:
        """Return the counts since the last call."""
        now, mark = self.totals(), self._mark
        self._mark = now
        return InboundWindow(
            now.packets - mark.packets,
            max(0, now.lost - mark.lost),
            now.recovered - mark.recovered,
            now.expected - mark.expected,
            now.payload_bytes - mark.payload_bytes,
        )
