"""What a person at a terminal sees: a live progress line, then a readable report."""

from __future__ import annotations

import sys
from typing import TextIO

from callmon.callresult import CallResult, Sample, Status
from probes.call import Progress


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    ms = value * 1000
    return f"{ms:.1f} ms" if abs(ms) < 10 else f"{ms:.0f} ms"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f} %"


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class LiveLine:
    """One line rewritten in place each second (only on a terminal)."""

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._active = stream.isatty()

    def __call__(self, progress: Progress) -> None:
        if not self._active:
            return
        text = f"{progress.phase} {progress.elapsed_s:5.1f} s"
        if progress.remaining_s is not None:
            text += f", {progress.remaining_s:4.0f} s left"
        if progress.sample is not None:
            text += "  " + _sample_line(progress.sample)
        self._stream.write("\r\x1b[2K" + text)
        self._stream.flush()

    def close(self) -> None:
        if self._active:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()


def _sample_line(s: Sample) -> str:
    return (
        f"rtt {_ms(s.rtt_s)}  jitter a/v {_ms(s.audio.jitter_s)}/{_ms(s.video.jitter_s)}  "
        f"loss a/v {_pct(s.audio.loss)}/{_pct(s.video.loss)}  "
        f"{s.video.fps:.0f} fps  A/V {_ms(s.av_offset_s)}"
        + ("" if s.reliable else "  [probe overloaded]")
    )


def render(result: CallResult) -> str:
    """Return the human report of a finished call."""
    p, s = result.phases, result.summary
    a, v = s.audio, s.video
    lines = [
        f"callmon probe: {result.target.url} ({result.target.signaling})",
        f"status: {result.status.upper()}",
    ]
    if result.failure is not None:
        lines.append(f"  failed in {result.failure.phase}: {result.failure.reason}")
    for d in result.degradations:
        lines.append(f"  {d.metric} = {d.value:.4g} ({d.comparison} {d.threshold:g})")
    lines += [
        "",
        "connect (from call start)",
        f"  offer ready {_ms(p.offer_s)}, answer {_ms(p.answer_s)}, ICE {_ms(p.ice_s)}, "
        f"DTLS {_ms(p.dtls_s)}",
        f"  first packet audio {_ms(p.first_rtp_audio_s)} / video {_ms(p.first_rtp_video_s)}, "
        f"first frame audio {_ms(p.first_frame_audio_s)} / video {_ms(p.first_frame_video_s)}",
        f"  connect time {_ms(p.connect_s)} (target {_ms(result.thresholds.connect_s)})",
    ]
    if result.status is not Status.FAILED or s.media_s > 0:
        lines += [
            "",
            f"media over {s.media_s:.1f} s"
            + (f" ({s.unreliable_s} s unreliable: probe overloaded)" if s.unreliable_s else ""),
            f"  {'':8}{'loss':>9}{'jitter':>9}{'jitter90':>10}{'delay':>9}{'kbps':>8}",
        ]
        for name, m in (("audio", a), ("video", v)):
            kbps = "-" if m.bitrate_bps is None else f"{m.bitrate_bps / 1000:.0f}"
            lines.append(
                f"  {name:8}{_pct(m.loss):>9}{_ms(m.jitter_s):>9}{_ms(m.jitter_p90_s):>10}"
                f"{_ms(m.delay_s):>9}{kbps:>8}"
            )
        lines += [
            f"  RTT {_ms(s.rtt_s)} (p90 {_ms(s.rtt_p90_s)}), MOS {_num(s.mos)} "
            f"(p10 {_num(s.mos_p10)})",
            f"  A/V offset {_ms(s.av_offset_s)} (range {_ms(s.av_offset_min_s)} .. "
            f"{_ms(s.av_offset_max_s)}, {s.av_offset_samples} samples; + = audio ahead)",
            f"  video: {v.frames} frames, {_num(v.fps, 1)} fps, {v.freezes} freezes "
            f"({v.freeze_s:.2f} s), {v.gaps} gaps > 600 ms; probe's own decoder recovery "
            f"{v.recovery} ({v.recovery_s:.2f} s)",
            f"  audio: {a.gaps} gaps > 200 ms ({a.gap_s:.2f} s); retransmissions recovered "
            f"{a.recovered + v.recovered} of {a.lost + v.lost} lost packets",
        ]
    return "\n".join(lines)
