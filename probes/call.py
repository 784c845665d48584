"""One measured test call: connect, hold, sample every second, hang up, judge.

The outline: build the peer connection with callmon's hooks; offer; exchange over the
chosen signaling; wait for ICE, DTLS and the first decoded frame of each medium, each
with a deadline; hold for the requested duration taking one sample a second; close
everything whatever happened; summarise and evaluate against thresholds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import aiohttp
from aiortc import (
    RTCPeerConnection,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtp import RtpPacket

import callmon
from callmon.callresult import (
    AudioSample,
    AudioSummary,
    CallResult,
    Failure,
    Phase,
    Phases,
    ProbeInfo,
    Route,
    Sample,
    Signaling,
    Status,
    Summary,
    Target,
    Thresholds,
    VideoSample,
    VideoSummary,
    evaluate,
)
from callmon.tasks import TaskGroup
from callmon.times import iso
from probes import aiortc_hooks
from probes.assembler import attach
from probes.audioreceiver import AudioReceiver
from probes.avsync import AvSync
from probes.ice import IceOptions
from probes.inbound import InboundStream, InboundWindow
from probes.looplag import LoopLag
from probes.measures import median, mos, percentile
from probes.media import (
    AUDIO_RATE,
    VIDEO_CLOCK,
    LoopAudioTrack,
    LoopVideoTrack,
    MediaClock,
    MediaLoops,
    SendLog,
    SentChirp,
    SentFrame,
    prefer_codec,
    shared_loops,
)
from probes.signaling import SignalingError, SignalingSession, open_session
from probes.videoreceiver import VideoReceiver

CLOSE_TIMEOUT_S = 5.0

log = logging.getLogger("callmon.probe")


@dataclass(frozen=True, kw_only=True)
class CallOptions:
    url: str
    signaling: Signaling = Signaling.WHIP
    duration_s: float = 10.0
    "Media to hold, counted from DTLS connected."
    connect_timeout_s: float = 10.0
    "Deadline for signaling, ICE and DTLS together."
    media_timeout_s: float = 5.0
    "Deadline for each medium's first decoded frame after DTLS; also the longest mid-call stop."
    token: str | None = None
    ice: IceOptions = field(default_factory=IceOptions)
    thresholds: Thresholds = field(default_factory=Thresholds)
    region: str | None = None
    overload_lag_s: float = 0.025
    "Event-loop lag above which a second is marked unreliable."
    call_id: str | None = None
    "Id of the result; an agent that streams the seconds of a long call uses it as call id."
    keep_samples: bool = True
    "False when the seconds were already sent as they came (long-held calls)."


@dataclass(frozen=True, kw_only=True)
class Progress:
    phase: str
    elapsed_s: float
    remaining_s: float | None
    sample: Sample | None = None


class CallFailed(Exception):
    def __init__(self, phase: Phase, reason: str) -> None:
        super().__init__(reason)
        self.phase = phase
        self.reason = reason


class _Medium:
    """Everything the probe keeps for one received medium."""

    def __init__(self, kind: str, clock_rate: int) -> None:
        self.kind = kind
        self.inbound = InboundStream(clock_rate)
        self.rtx_types: set[int] | None = None
        self.rtcp_jitter_s: float | None = None
        self.rtcp_loss: float | None = None
        self.rtt_s: float | None = None


class ProbeCall:
    """A single call; `run()` returns its result and never raises for the call's own faults."""

    def __init__(
        self,
        options: CallOptions,
        on_progress: Callable[[Progress], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.options = options
        self._on_progress = on_progress or (lambda progress: None)
        self._clock = clock
        self._phases = Phases()
        self._samples: list[Sample] = []
        self._t0 = 0.0
        self._media_start: float | None = None
        self._connected = asyncio.Event()
        self._failed: asyncio.Future[CallFailed] | None = None
        self._log = SendLog()
        self._avsync = AvSync()
        self._lag = LoopLag()
        self._audio = _Medium("audio", AUDIO_RATE)
        self._video = _Medium("video", VIDEO_CLOCK)
        self._audio_rx = AudioReceiver(self._log, self._on_audio_delay, clock)
        self._video_rx = VideoReceiver(
            self._log, self._request_keyframe, self._on_video_delay, clock
        )
        self._video_receiver: RTCRtpReceiver | None = None
        self._keyframe_requests = 0
        self._last_keyframe_request = -1e9
        self._video_track: LoopVideoTrack | None = None
        self._tasks = TaskGroup()
        self._stop = asyncio.Event()
        self._closing = False
        self.id = options.call_id or str(uuid.uuid4())
        self._route: Route | None = None
        self._session_id: str | None = None

    # --- outline ---------------------------------------------------------------------

    async def run(self) -> CallResult:
        options = self.options
        loops = shared_loops()  # before the clock starts: encoding is not the target's time
        started_at = time.time()
        self._t0 = self._clock()
        self._failed = asyncio.get_running_loop().create_future()
        failure: Failure | None = None
        pc = RTCPeerConnection(options.ice.configuration())
        timeout = aiohttp.ClientTimeout(total=options.connect_timeout_s)
        self._lag.start()
        async with aiohttp.ClientSession(timeout=timeout) as http:
            session = open_session(options.signaling, options.url, http, options.token)
            try:
                await self._connect(pc, session, loops)
                await self._hold()
            except CallFailed as exc:
                failure = Failure(phase=exc.phase, reason=exc.reason)
            except Exception as exc:  # a fault in the probe or aiortc: still a result
                log.exception("probe call to %s failed unexpectedly", options.url)
                failure = Failure(
                    phase=self._current_phase(),
                    reason=f"probe error: {exc.__class__.__name__}: {exc}",
                )
            finally:
                self._session_id = session.session_id
                await self._close(pc, session)
        return self._result(started_at, failure)

    async def _connect(
        self, pc: RTCPeerConnection, session: SignalingSession, loops: MediaLoops
    ) -> None:
        options = self.options
        deadline = self._t0 + options.connect_timeout_s

        # media out: pre-encoded loops on one clock, keyframes on request
        clock = MediaClock(self._clock)
        audio_track = LoopAudioTrack(loops, clock, self._log)
        video_track = LoopVideoTrack(loops, clock, self._log)
        self._video_track = video_track
        audio = pc.addTransceiver(audio_track, direction="sendrecv")
        video = pc.addTransceiver(video_track, direction="sendrecv")
        prefer_codec(audio)
        prefer_codec(video)
        aiortc_hooks.on_keyframe_request(video.sender, video_track.request_keyframe)

        # media in: arrival taps and low-latency assembly
        self._install_receiver(audio.receiver, self._audio, self._audio_rx.on_frame)
        self._install_receiver(video.receiver, self._video, self._video_rx.on_frame)
        self._video_receiver = video.receiver
        self._senders = {"audio": audio.sender, "video": video.sender}
        self._watch_states(pc)

        # offer
        with aiortc_hooks.host_addresses(options.ice.host_addresses()):
            try:
                await asyncio.wait_for(pc.setLocalDescription(await pc.createOffer()), 10)
            except (TimeoutError, OSError, ValueError) as exc:
                raise CallFailed(Phase.OFFER, f"could not gather ICE candidates: {exc}") from exc
        self._phases.offer_s = self._since_start()

        # signaling
        try:
            answer = await asyncio.wait_for(
                session.offer(pc.localDescription.sdp), max(0.1, deadline - self._clock())
            )
        except SignalingError as exc:
            raise CallFailed(Phase.SIGNALING, str(exc)) from exc
        except TimeoutError:
            raise CallFailed(
                Phase.SIGNALING, f"no answer within {options.connect_timeout_s:g} s"
            ) from None
        self._phases.answer_s = self._since_start()
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        except Exception as exc:  # aiortc raises many kinds on bad SDP; all mean the same
            raise CallFailed(
                Phase.SIGNALING, f"malformed SDP answer: {exc.__class__.__name__}: {exc}"
            ) from exc
        silent = [t.kind for t in (audio, video) if t.currentDirection in ("sendonly", "inactive")]
        if silent:
            raise CallFailed(Phase.MEDIA, f"the answer does not send {' and '.join(silent)} back")

        # ICE and DTLS
        await self._until(self._connected.wait(), deadline, self._pending_phase)
        self._media_start = clock.start()

        # first media
        media_deadline = self._clock() + options.media_timeout_s
        await self._until(self._first_media(), media_deadline, self._missing_media)
        self._phases.connect_s = max(
            self._phases.first_frame_audio_s or 0.0, self._phases.first_frame_video_s or 0.0
        )

    async def _hold(self) -> None:
        assert self._media_start is not None
        options = self.options
        end = self._media_start + options.duration_s
        tick = 1
        while True:
            next_tick = self._media_start + tick
            if next_tick > end + 1e-6:
                break
            if await self._pause(next_tick - self._clock()):
                break
            sample = await self._sample(float(tick))
            self._samples.append(sample)
            self._on_progress(
                Progress(
                    phase="holding",
                    elapsed_s=self._since_start(),
                    remaining_s=max(0.0, end - self._clock()),
                    sample=sample,
                )
            )
            self._check_media_flowing()
            tick += 1

    def stop(self) -> None:
        """End the call at its next second (an agent shutting down or reconfigured)."""
        self._stop.set()

    async def _pause(self, delay: float) -> bool:
        """Wait until the next second; return True if the call was asked to stop."""
        try:
            await self._until(asyncio.wait_for(self._stop.wait(), max(0.0, delay)), None, None)
        except TimeoutError:
            return False
        return True

    async def _close(self, pc: RTCPeerConnection, session: SignalingSession) -> None:
        self._closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pc.close(), CLOSE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.close(), CLOSE_TIMEOUT_S)
        await self._lag.stop()
        await self._tasks.close()

    # --- setup helpers -------------------------------------------------------------------

    def _install_receiver(
        self, receiver: RTCRtpReceiver, medium: _Medium, on_frame: Callable[..., None]
    ) -> None:
        def on_packet(packet: RtpPacket, arrival: float) -> None:
            if medium.rtx_types is None:
                medium.rtx_types = {
                    pt
                    for pt, codec in aiortc_hooks.receiver_codecs(receiver).items()
                    if codec.mimeType.lower().endswith("/rtx")
                }
            retransmission = packet.payload_type in medium.rtx_types
            if not retransmission and medium.inbound.first_at is None:
                at = arrival - self._t0
                if medium.kind == "audio":
                    self._phases.first_rtp_audio_s = at
                else:
                    self._phases.first_rtp_video_s = at
            medium.inbound.on_packet(packet, arrival, retransmission=retransmission)

        attach(receiver, medium.kind, on_frame, on_packet)

    def _watch_states(self, pc: RTCPeerConnection) -> None:
        @pc.on("iceconnectionstatechange")
        def on_ice() -> None:
            if pc.iceConnectionState in ("completed", "connected") and self._phases.ice_s is None:
                self._phases.ice_s = self._since_start()
            elif pc.iceConnectionState == "failed":
                self._fail(Phase.ICE, "ICE failed: no candidate pair worked")

        @pc.on("connectionstatechange")
        def on_connection() -> None:
            if pc.connectionState == "connected" and self._phases.dtls_s is None:
                self._phases.dtls_s = self._since_start()
                self._route = _route(pc)
                self._connected.set()
            elif pc.connectionState == "closed" and not self._closing:
                # the target hung up (DTLS close_notify): say so now, not after a timeout
                self._fail(
                    Phase.CALL if self._phases.dtls_s is not None else Phase.DTLS,
                    f"the target hung up {self._media_age():.1f} s into media",
                )
            elif pc.connectionState == "failed":
                if self._phases.ice_s is None:
                    self._fail(Phase.ICE, "ICE failed: no candidate pair worked")
                elif self._phases.dtls_s is None:
                    self._fail(Phase.DTLS, "DTLS handshake failed")
                else:
                    self._fail(Phase.CALL, f"connection lost {self._media_age():.1f} s into media")

    def _fail(self, phase: Phase, reason: str) -> None:
        if self._failed is not None and not self._failed.done():
            self._failed.set_result(CallFailed(phase, reason))

    async def _until(
        self,
        awaitable: Awaitable[object],
        deadline: float | None,
        on_timeout: Callable[[], CallFailed] | None,
    ) -> None:
        """Await `awaitable`, unless the call fails first or the deadline passes."""
        assert self._failed is not None
        task: asyncio.Future[object] = asyncio.ensure_future(awaitable)
        watched: set[asyncio.Future[Any]] = {task, self._failed}
        timeout = None if deadline is None else max(0.0, deadline - self._clock())
        try:
            done, _ = await asyncio.wait(
                watched, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._failed in done:
            raise self._failed.result()
        if task not in done:
            assert on_timeout is not None
            raise on_timeout()
        task.result()

    def _pending_phase(self) -> CallFailed:
        limit = f"{self.options.connect_timeout_s:g} s"
        if self._phases.ice_s is None:
            return CallFailed(Phase.ICE, f"ICE did not connect within {limit}")
        return CallFailed(Phase.DTLS, f"DTLS did not complete within {limit}")

    async def _first_media(self) -> None:
        while self._audio_rx.first_frame_at is None or self._video_rx.first_frame_at is None:
            await asyncio.sleep(0.005)
            self._note_first_frames()
        self._note_first_frames()

    def _note_first_frames(self) -> None:
        if self._audio_rx.first_frame_at is not None and self._phases.first_frame_audio_s is None:
            self._phases.first_frame_audio_s = self._audio_rx.first_frame_at - self._t0
        if self._video_rx.first_frame_at is not None and self._phases.first_frame_video_s is None:
            self._phases.first_frame_video_s = self._video_rx.first_frame_at - self._t0

    def _missing_media(self) -> CallFailed:
        self._note_first_frames()
        missing = []
        for kind, medium, first_frame in (
            ("audio", self._audio, self._phases.first_frame_audio_s),
            ("video", self._video, self._phases.first_frame_video_s),
        ):
            if medium.inbound.first_at is None:
                missing.append(f"no {kind} packets")
            elif first_frame is None:
                missing.append(f"{kind} packets but no decodable {kind} frame")
        return CallFailed(
            Phase.MEDIA,
            f"{' and '.join(missing)} within {self.options.media_timeout_s:g} s of the connection",
        )

    def _check_media_flowing(self) -> None:
        """Fail the call when no media at all arrived for `media_timeout_s`."""
        recent = [s for s in self._samples[-int(self.options.media_timeout_s) :]]
        if len(recent) >= int(self.options.media_timeout_s) and all(
            s.audio.packets == 0 and s.video.packets == 0 for s in recent
        ):
            raise CallFailed(
                Phase.CALL,
                f"media stopped {self._media_age() - len(recent):.0f} s into the call "
                f"and did not come back within {self.options.media_timeout_s:g} s",
            )

    # --- callbacks from the receive path ----------------------------------------------------

    def _request_keyframe(self) -> None:
        now = self._clock()
        if self._video_receiver is None or self._video.inbound.ssrc is None:
            return
        if now - self._last_keyframe_request < 0.25:
            return
        self._last_keyframe_request = now
        self._keyframe_requests += 1
        self._tasks.spawn(aiortc_hooks.send_pli(self._video_receiver, self._video.inbound.ssrc))

    def _on_video_delay(self, sent: SentFrame, delay: float) -> None:
        self._avsync.video(sent.sent_at, delay)

    def _on_audio_delay(self, sent: SentChirp, delay: float) -> None:
        self._avsync.audio(sent.instant, delay, self._clock())

    # --- sampling ----------------------------------------------------------------------

    async def _sample(self, t_s: float) -> Sample:
        lag = self._lag.take_window()
        await self._read_rtcp()
        audio_in = self._audio.inbound.take_window()
        video_in = self._video.inbound.take_window()
        audio = self._audio_rx.take_window()
        video = self._video_rx.take_window()
        offsets = self._avsync.resolve(self._clock())
        rtt = self._audio.rtt_s if self._audio.rtt_s is not None else self._video.rtt_s
        audio_jitter = self._audio.inbound.jitter.value if audio_in.packets else None
        return Sample(
            t_s=t_s,
            reliable=lag <= self.options.overload_lag_s,
            loop_lag_s=lag,
            rtt_s=rtt,
            av_offset_s=(sum(offsets) / len(offsets)) if offsets else None,
            mos=mos(rtt, audio_jitter, audio_in.loss),
            audio=AudioSample(
                **_media_fields(audio_in, self._audio, audio.delays),
                gaps=audio.gaps,
                gap_s=audio.gap_s,
            ),
            video=VideoSample(
                **_media_fields(video_in, self._video, video.delays),
                frames=video.frames,
                fps=float(video.frames),
                freezes=video.freezes,
                freeze_s=video.freeze_s,
                gaps=video.gaps,
                recovery=video.recovery,
                recovery_s=video.recovery_s,
            ),
        )

    async def _read_rtcp(self) -> None:
        """Read what the target's RTCP receiver reports say about our streams."""
        for kind, medium, clock_rate in (
            ("audio", self._audio, AUDIO_RATE),
            ("video", self._video, VIDEO_CLOCK),
        ):
            sender: RTCRtpSender = self._senders[kind]
            try:
                report = await sender.getStats()
            except Exception:  # stats are best effort; the transport may be closing
                continue
            for stats in report.values():
                if getattr(stats, "type", None) == "remote-inbound-rtp":
                    medium.rtt_s = stats.roundTripTime
                    medium.rtcp_jitter_s = stats.jitter / clock_rate
                    medium.rtcp_loss = stats.fractionLost / 256

    # --- result ------------------------------------------------------------------------

    def _result(self, started_at: float, failure: Failure | None) -> CallResult:
        self._note_first_frames()
        options = self.options
        summary = self._summary()
        degradations = [] if failure else evaluate(self._phases, summary, options.thresholds)
        status = Status.FAILED if failure else Status.DEGRADED if degradations else Status.OK
        return CallResult(
            id=self.id,
            started_at=iso(started_at),
            target=Target(url=options.url, signaling=options.signaling, session=self._session_id),
            route=self._route,
            probe=ProbeInfo(
                version=callmon.__version__, host=socket.gethostname(), region=options.region
            ),
            duration_s=options.duration_s,
            status=status,
            failure=failure,
            degradations=degradations,
            thresholds=options.thresholds,
            phases=self._phases,
            summary=summary,
            samples=self._samples if options.keep_samples else [],
        )

    def _summary(self) -> Summary:
        reliable = [s for s in self._samples if s.reliable]
        audio_total = self._audio.inbound.totals()
        video_total = self._video.inbound.totals()
        offsets = [s.av_offset_s for s in reliable if s.av_offset_s is not None]
        rtts = [s.rtt_s for s in reliable if s.rtt_s is not None]
        moses = [s.mos for s in reliable if s.mos is not None]
        video = self._video_rx.total
        audio = self._audio_rx.total
        return Summary(
            media_s=self._media_age(),
            rtt_s=median(rtts),
            rtt_p90_s=percentile(rtts, 90),
            av_offset_s=median(offsets),
            av_offset_min_s=min(offsets, default=None),
            av_offset_max_s=max(offsets, default=None),
            av_offset_samples=len(offsets),
            mos=median(moses),
            mos_p10=percentile(moses, 10),
            unreliable_s=len(self._samples) - len(reliable),
            loop_lag_max_s=self._lag.max,
            audio=AudioSummary(
                **_summary_fields(audio_total, reliable, "audio"),
                gaps=sum(s.audio.gaps for s in reliable),
                gap_s=sum(s.audio.gap_s for s in reliable),
                max_gap_s=audio.max_gap_s,
            ),
            video=VideoSummary(
                **_summary_fields(video_total, reliable, "video"),
                frames=video.frames,
                fps=(video.frames / self._media_age()) if self._media_age() > 0 else None,
                freezes=sum(s.video.freezes for s in reliable),
                freeze_s=sum(s.video.freeze_s for s in reliable),
                max_freeze_s=video.max_freeze_s,
                gaps=sum(s.video.gaps for s in reliable),
                recovery=video.recovery,
                recovery_s=video.recovery_s,
                corrupt_frames=video.corrupt,
                keyframe_requests=self._keyframe_requests,
            ),
        )

    def _current_phase(self) -> Phase:
        p = self._phases
        for phase, reached in (
            (Phase.OFFER, p.offer_s),
            (Phase.SIGNALING, p.answer_s),
            (Phase.ICE, p.ice_s),
            (Phase.DTLS, p.dtls_s),
            (Phase.MEDIA, p.connect_s),
        ):
            if reached is None:
                return phase
        return Phase.CALL

    def _since_start(self) -> float:
        return self._clock() - self._t0

    def _media_age(self) -> float:
        return 0.0 if self._media_start is None else max(0.0, self._clock() - self._media_start)


def _route(pc: RTCPeerConnection) -> Route | None:
    pair = aiortc_hooks.selected_candidates(pc)
    if pair is None:
        return None
    local, remote = pair
    return Route(
        local_candidate=local.type,
        remote_candidate=remote.type,
        remote_address=f"{remote.host}:{remote.port}",
    )


class _MediaFields(TypedDict):
    packets: int
    lost: int
    recovered: int
    loss: float | None
    jitter_s: float | None
    rtcp_jitter_s: float | None
    rtcp_loss: float | None
    bitrate_bps: float
    delay_s: float | None


class _SummaryFields(TypedDict):
    packets: int
    expected: int
    lost: int
    recovered: int
    loss: float | None
    residual_loss: float | None
    jitter_s: float | None
    jitter_p90_s: float | None
    rtcp_jitter_s: float | None
    bitrate_bps: float | None
    delay_s: float | None


def _media_fields(window: InboundWindow, medium: _Medium, delays: list[float]) -> _MediaFields:
    return {
        "packets": window.packets,
        "lost": window.lost,
        "recovered": window.recovered,
        "loss": window.loss,
        "jitter_s": medium.inbound.jitter.value if window.packets else None,
        "rtcp_jitter_s": medium.rtcp_jitter_s,
        "rtcp_loss": medium.rtcp_loss,
        "bitrate_bps": window.payload_bytes * 8.0,
        "delay_s": median(delays),
    }


def _summary_fields(total: InboundWindow, reliable: list[Sample], kind: str) -> _SummaryFields:
    media = [getattr(s, kind) for s in reliable]
    jitters = [m.jitter_s for m in media if m.jitter_s is not None]
    rtcp = [m.rtcp_jitter_s for m in media if m.rtcp_jitter_s is not None]
    bitrates = [m.bitrate_bps for m in media]
    delays = [m.delay_s for m in media if m.delay_s is not None]
    return {
        "packets": total.packets,
        "expected": total.expected,
        "lost": total.lost,
        "recovered": total.recovered,
        "loss": total.loss,
        "residual_loss": (
            (total.lost - total.recovered) / total.expected if total.expected else None
        ),
        "jitter_s": median(jitters),
        "jitter_p90_s": percentile(jitters, 90),
        "rtcp_jitter_s": median(rtcp),
        "bitrate_bps": (sum(bitrates) / len(bitrates)) if bitrates else None,
        "delay_s": median(delays),
    }


async def run_call(
    options: CallOptions, on_progress: Callable[[Progress], None] | None = None
) -> CallResult:
    """Hold one test call and return its result."""
    return await ProbeCall(options, on_progress).run()
