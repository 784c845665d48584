"""The probe's numbers against ground truth the reflector injected, over real calls.

Each test asks the reflector (a separate `callmon reflector` process) to impair one call,
holds a real WebRTC call through it on loopback, and compares what the probe measured
with what the reflector reports it did.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import Reflector, applied, call

from callmon.callresult import CallResult, Status


def _dump(result: CallResult) -> str:
    s = result.summary
    return (
        f"status={result.status} failure={result.failure} degradations={result.degradations}\n"
        f"phases={result.phases}\naudio={s.audio}\nvideo={s.video}\n"
        f"av={s.av_offset_s} ({s.av_offset_min_s}..{s.av_offset_max_s}) "
        f"unreliable={s.unreliable_s} lag={s.loop_lag_max_s}"
    )


async def test_clean_call_is_ok_with_nothing_to_report(reflector: Reflector) -> None:
    result = await call(reflector.url, 8)
    s = result.summary
    assert result.status is Status.OK, _dump(result)
    assert s.video.freezes == 0, _dump(result)
    assert s.video.gaps == 0, _dump(result)
    assert s.audio.gaps == 0, _dump(result)
    assert s.av_offset_s is not None
    assert abs(s.av_offset_s) <= 0.010, _dump(result)
    assert s.av_offset_samples >= 6
    assert s.audio.lost == 0
    assert s.video.lost == 0
    assert s.audio.loss == 0
    assert s.video.loss == 0
    # 15 fps and 50 packets/s come back whole
    assert s.video.fps is not None
    assert 14 <= s.video.fps <= 15.5
    assert s.audio.packets >= 8 * 50 - 10
    assert s.video.corrupt_frames == 0
    # milestones in order, all from one start instant, and well within the target
    p = result.phases
    milestones = [p.offer_s, p.answer_s, p.ice_s, p.dtls_s]
    assert all(m is not None for m in milestones), p
    assert milestones == sorted(milestones), p  # type: ignore[type-var]
    assert p.dtls_s is not None
    assert p.first_rtp_audio_s is not None
    assert p.first_rtp_video_s is not None
    assert p.connect_s is not None
    assert p.dtls_s <= min(p.first_rtp_audio_s, p.first_rtp_video_s)
    assert p.connect_s == max(p.first_frame_audio_s or 0, p.first_frame_video_s or 0)
    assert p.connect_s < 0.6
    assert result.route is not None
    assert result.route.local_candidate == "host"
    assert result.route.remote_address.startswith("127.0.0.1:")
    assert len(result.samples) == 8
    assert [round(s.t_s) for s in result.samples] == list(range(1, 9))


@pytest.mark.parametrize(
    ("query", "expected"),
    [("audio_delay_ms=150", -0.150), ("video_delay_ms=150", +0.150)],
    ids=["audio-behind", "audio-ahead"],
)
async def test_av_offset_matches_an_injected_delay(
    reflector: Reflector, query: str, expected: float
) -> None:
    result = await call(f"{reflector.url}?{query}", 6)
    truth = await applied(result)
    kind = "audio" if "audio" in query else "video"
    assert truth["applied"][kind]["delay_min_s"] >= 0.150
    s = result.summary
    assert s.av_offset_s is not None, _dump(result)
    assert s.av_offset_s == pytest.approx(expected, abs=0.010), _dump(result)
    # each second's offset, not only the median, is within bounds
    offsets = [x.av_offset_s for x in result.samples if x.av_offset_s is not None]
    assert len(offsets) >= 4
    assert all(abs(o - expected) <= 0.015 for o in offsets), offsets
    # the delayed medium's own round trip shows the delay
    delayed = getattr(s, kind).delay_s
    assert delayed is not None
    assert delayed == pytest.approx(0.150, abs=0.010)
    assert any(d.metric == "av_offset_s" for d in result.degradations) == (expected > 0)


async def test_video_blackout_is_exactly_one_freeze_of_its_length(reflector: Reflector) -> None:
    result = await call(f"{reflector.url}?video_blackout=3:0.8", 7)
    truth = (await applied(result))["applied"]["video"]["blackout"]
    v = result.summary.video
    assert v.freezes == 1, _dump(result)
    assert v.freeze_s == pytest.approx(0.8, abs=0.1), _dump(result)
    # the freeze is the gap the reflector really left between the frames it sent
    assert truth["frames_dropped"] >= 10
    assert v.freeze_s == pytest.approx(truth["interval_s"], abs=0.02), (truth, _dump(result))
    assert v.gaps == 1  # over 600 ms
    assert v.recovery == 0, "the reflector resumed at a keyframe: nothing to recover"
    assert result.summary.audio.gaps == 0
    frozen = [s.t_s for s in result.samples if s.video.freezes]
    assert len(frozen) == 1, frozen
    assert 3 < frozen[0] <= 5, frozen
    assert result.status is Status.DEGRADED
    assert [d.metric for d in result.degradations] == ["video.freezes"]


async def test_audio_blackout_is_exactly_one_gap_of_its_length(reflector: Reflector) -> None:
    result = await call(f"{reflector.url}?audio_blackout=3:0.8", 7)
    truth = (await applied(result))["applied"]["audio"]["blackout"]
    a = result.summary.audio
    assert a.gaps == 1, _dump(result)
    assert a.gap_s == pytest.approx(0.8, abs=0.1), _dump(result)
    # a gap is the silence between packets: their interval less one packet's 20 ms
    assert a.gap_s == pytest.approx(truth["interval_s"] - 0.020, abs=0.01), truth
    assert result.summary.video.freezes == 0
    assert result.status is Status.DEGRADED
    assert [d.metric for d in result.degradations] == ["audio.gaps"]


async def test_loss_is_measured_per_medium_on_first_transmission(reflector: Reflector) -> None:
    result = await call(f"{reflector.url}?loss=0.05&seed=7", 20)
    truth = (await applied(result))["applied"]
    for kind in ("audio", "video"):
        media = getattr(result.summary, kind)
        sent, dropped = truth[kind]["packets_sent"], truth[kind]["packets_dropped"]
        assert media.loss == pytest.approx(0.05, abs=0.015), (kind, _dump(result))
        # the probe counted the very packets the reflector dropped (less any dropped
        # after the last one that arrived, which no receiver can see)
        assert dropped - 3 <= media.lost <= dropped, (kind, media.lost, dropped)
        assert media.expected == pytest.approx(sent, abs=5)
    video = result.summary.video
    # aiortc retransmits video on NACK: most losses come back, each RTX risking 5 % too
    assert video.recovered >= 0.8 * video.lost
    assert video.residual_loss is not None
    assert video.loss is not None
    assert video.residual_loss < video.loss
    assert result.summary.audio.recovered == 0  # no NACK for audio
    # a chirp whose packets were lost is not timed (rebuilt, it paired with one seconds
    # away and read as a false A/V offset of whole seconds)
    offsets = [x.av_offset_s for x in result.samples if x.av_offset_s is not None]
    assert offsets, "most chirps came through whole"
    assert all(abs(o) < 0.05 for o in offsets), offsets
    assert result.status is Status.DEGRADED
    assert {"audio.loss", "video.loss"} <= {d.metric for d in result.degradations}


async def test_jitter_matches_rfc3550_over_the_applied_delays(reflector: Reflector) -> None:
    result = await call(f"{reflector.url}?jitter_ms=40&seed=3", 10)
    truth = (await applied(result))["applied"]
    for kind in ("audio", "video"):
        expected = truth[kind]["rfc3550_jitter_s"]
        measured = getattr(result.summary, kind).jitter_s
        # uniform 0-40 ms, order kept: E|d1 - d2| is a little under 40/3 ms
        assert 0.008 < expected < 0.014, expected
        assert measured == pytest.approx(expected, rel=0.25), (kind, expected, _dump(result))
    assert result.summary.video.freezes == 0
    assert result.summary.audio.gaps == 0


async def test_the_probes_own_overload_is_not_reported_as_the_services(
    reflector: Reflector,
) -> None:
    """A 300 ms stall of the probe's own event loop must not page anyone."""
    loop = asyncio.get_running_loop()
    loop.call_later(3.5, time.sleep, 0.3)  # blocks the whole loop: sending and receiving
    result = await call(reflector.url, 7)
    stalled = [s for s in result.samples if not s.reliable]
    assert stalled, "the stall was not noticed"
    assert max(s.loop_lag_s for s in stalled) >= 0.25
    assert result.summary.unreliable_s == len(stalled) <= 2
    assert result.summary.video.freezes == 0, _dump(result)
    assert result.summary.audio.gaps == 0, _dump(result)
    assert result.status is Status.OK, _dump(result)
