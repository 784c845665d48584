"""The low-latency frame assembler, told as stories of packets."""

from __future__ import annotations

from aiortc.rtp import RtpPacket

from probes.assembler import EncodedFrame, FrameAssembler, Unwrapper


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def vp8(seq: int, ts: int, *, start: bool, marker: bool, key: bool = False) -> RtpPacket:
    packet = RtpPacket(
        payload_type=97, sequence_number=seq % 65536, timestamp=ts % 2**32, marker=int(marker)
    )
    packet.payload = bytes([0x10 if start else 0x00]) + b"p"
    # depayloaded data: the VP8 frame tag's P bit is 0 for a keyframe
    packet._data = (b"\x00" if key else b"\x01") + bytes([seq % 256])  # type: ignore[attr-defined]
    return packet


def frame_packets(first_seq: int, ts: int, count: int, key: bool = False) -> list[RtpPacket]:
    return [
        vp8(first_seq + i, ts, start=i == 0, marker=i == count - 1, key=key and i == 0)
        for i in range(count)
    ]


def video() -> tuple[FrameAssembler, list[EncodedFrame], Clock, list[bool]]:
    frames: list[EncodedFrame] = []
    clock = Clock()
    assembler = FrameAssembler("video", frames.append, max_wait_s=0.2, clock=clock)
    plis: list[bool] = []
    return assembler, frames, clock, plis


def feed(assembler: FrameAssembler, packets: list[RtpPacket], plis: list[bool]) -> None:
    for packet in packets:
        pli, nothing = assembler.add(packet)
        assert nothing is None
        plis.append(pli)


def test_it_releases_a_frame_the_moment_its_marker_arrives() -> None:
    assembler, frames, clock, plis = video()
    key = frame_packets(100, 9000, 3, key=True)
    feed(assembler, key[:2], plis)
    assert frames == []
    clock.now = 0.004
    feed(assembler, key[2:], plis)
    assert len(frames) == 1
    frame = frames[0]
    assert frame.keyframe
    assert frame.decodable
    assert frame.timestamp == 9000
    assert frame.complete_at == 0.004
    assert frame.first_at == 0.0
    assert frame.data == b"\x00\x64" + b"\x01\x65" + b"\x01\x66"
    assert plis == [False, False, False]


def test_it_waits_for_a_retransmission_then_gives_up_and_asks_for_a_keyframe() -> None:
    assembler, frames, clock, plis = video()
    feed(assembler, frame_packets(0, 0, 2, key=True), plis)
    second = frame_packets(2, 6000, 2)
    third = frame_packets(4, 12000, 2)
    feed(assembler, [second[0]], plis)  # second[1] is lost
    clock.now = 0.067
    feed(assembler, third, plis)
    assert len(frames) == 1, "a later complete frame waits behind the missing packet"
    # a retransmission within the wait fills the gap: both frames come out, intact
    clock.now = 0.1
    feed(assembler, [second[1]], plis)
    assert [f.timestamp for f in frames] == [0, 6000, 12000]
    assert all(f.decodable for f in frames)
    assert not any(plis)

    # now a packet that never comes back
    fourth = frame_packets(6, 18000, 2)
    fifth = frame_packets(8, 24000, 2)
    clock.now = 0.2
    feed(assembler, [fourth[0]], plis)
    clock.now = 0.267
    feed(assembler, fifth, plis)
    clock.now = 0.399  # still within 200 ms of blocking
    feed(assembler, frame_packets(10, 30000, 1), plis)
    assert len(frames) == 3
    clock.now = 0.401
    feed(assembler, frame_packets(11, 36000, 1), plis)
    assert [f.timestamp for f in frames] == [0, 6000, 12000, 24000, 30000, 36000]
    assert [f.decodable for f in frames[3:]] == [False, False, False]
    assert plis[-1] is True
    assert assembler.skipped == 1
    # the late packet is dropped, not delivered out of order
    feed(assembler, [fourth[1]], plis)
    assert assembler.late == 1
    assert len(frames) == 6
    # a keyframe mends the chain
    clock.now = 0.5
    feed(assembler, frame_packets(12, 42000, 2, key=True), plis)
    assert frames[-1].keyframe
    assert frames[-1].decodable


def test_it_asks_for_keyframes_at_most_every_quarter_second() -> None:
    assembler, frames, clock, plis = video()
    # start mid-stream: no frame start seen yet
    feed(assembler, [vp8(5, 0, start=False, marker=True)], plis)
    clock.now = 0.1
    feed(assembler, [vp8(6, 6000, start=False, marker=True)], plis)
    clock.now = 0.3
    feed(assembler, [vp8(7, 12000, start=False, marker=True)], plis)
    assert plis == [True, False, True]
    assert frames == []


def test_a_delta_frame_first_is_not_decodable() -> None:
    assembler, frames, _, plis = video()
    feed(assembler, frame_packets(0, 0, 1), plis)
    assert len(frames) == 1
    assert not frames[0].decodable
    assert plis == [True]


def test_audio_packets_come_out_at_once_and_late_ones_are_dropped() -> None:
    frames: list[EncodedFrame] = []
    assembler = FrameAssembler("audio", frames.append)
    for seq, ts in [(10, 0), (12, 1920), (11, 960), (13, 2880)]:
        packet = RtpPacket(payload_type=111, sequence_number=seq, timestamp=ts)
        packet._data = b"opus"  # type: ignore[attr-defined]
        assert assembler.add(packet) == (False, None)
    assert [f.timestamp for f in frames] == [0, 1920, 2880]
    assert assembler.late == 1


def test_unwrapper_extends_across_wraps_both_ways() -> None:
    unwrap = Unwrapper(16)
    assert [unwrap.unwrap(v) for v in (65534, 65535, 0, 65535, 1)] == [
        65534,
        65535,
        65536,
        65535,
        65537,
    ]
