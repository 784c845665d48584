"""The probe's synthetic media: pre-encoded marker loops, the tracks that send them, and
the log of what was sent when.

Encoding at run time costs about 0.1 core per call; the probe instead encodes one loop of
marker video (VP8, frame numbers drawn in, a keyframe every GOP_FRAMES) and one loop of
chirped audio (Opus) once per process, and every call sends those packets on a real-time
schedule. A keyframe request makes the video jump to the next keyframe of the loop, so
the picture recovers within one frame interval instead of at the next loop keyframe.

Each packet's send instant is logged with its content (loop index), so the receive side
can tell how long each frame and each chirp took to come back, whatever the target did
to RTP timestamps or sequence numbers.
"""

from __future__ import annotations

import asyncio
import fractions
import functools
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc import RTCRtpSender, RTCRtpTransceiver
from aiortc.mediastreams import MediaStreamTrack
from av.packet import Packet

from probes import markers
from probes.assembler import vp8_keyframe

FPS = 15
VIDEO_CLOCK = 90_000
GOP_FRAMES = 15
LOOP_FRAMES = 300
VIDEO_BITRATE = 250_000

AUDIO_RATE = 48_000
PACKET_SAMPLES = 960  # 20 ms
AUDIO_LOOP_PACKETS = 200  # 4 s: four chirp symbols, one a second
AUDIO_BITRATE = 48_000
ANALYSIS_RATE = 16_000  # chirps are found at 16 kHz, a third of the work of 48 kHz
DECIMATION = AUDIO_RATE // ANALYSIS_RATE
CHIRP_PERIOD_S = 1.0
# Chirps sit 200 ms into each second, clear of the loop's wrap-around; at 15 fps that
# instant is frame 3 of each second, the frame they are aligned with.
CHIRP_OFFSET_S = 0.2

CODECS = {"audio": "audio/opus", "video": "video/VP8"}
"The one codec per medium callmon sends and forwards (the loops are encoded in it)."
CLOCK_RATES = {"audio": AUDIO_RATE, "video": VIDEO_CLOCK}

VIDEO_TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK)
AUDIO_TIME_BASE = fractions.Fraction(1, AUDIO_RATE)


@dataclass(frozen=True)
class Chirp:
    """Where a chirp sits in the decoded audio loop, as the codec really delivers it."""

    packet: int
    "Loop index of the packet whose decoded samples start the chirp."
    offset_s: float
    "Offset of the chirp start within that packet's decoded samples."
    symbol: int


@dataclass(frozen=True)
class MediaLoops:
    video: tuple[bytes, ...]
    "VP8 frames, index = frame number drawn in the picture."
    audio: tuple[bytes, ...]
    "Opus packets of 20 ms."
    chirps: dict[int, Chirp]
    "Chirps by the loop index of their packet."


@functools.cache
def shared_loops() -> MediaLoops:
    """Encode the loops once per process (about half a second)."""
    return MediaLoops(
        video=_encode_video(), audio=(audio := _encode_audio()), chirps=_calibrate(audio)
    )


def _encode_video() -> tuple[bytes, ...]:
    codec = av.CodecContext.create("libvpx", "w")
    assert isinstance(codec, av.VideoCodecContext)
    codec.width = markers.WIDTH
    codec.height = markers.HEIGHT
    codec.bit_rate = VIDEO_BITRATE
    codec.pix_fmt = "yuv420p"
    codec.framerate = fractions.Fraction(FPS, 1)
    codec.time_base = fractions.Fraction(1, FPS)
    codec.gop_size = GOP_FRAMES
    codec.options = {
        "deadline": "realtime",
        "cpu-used": "-6",
        "lag-in-frames": "0",
        "static-thresh": "1",
        "undershoot-pct": "100",
        "overshoot-pct": "15",
    }
    frames: list[bytes] = []
    for number in range(LOOP_FRAMES):
        frame = av.VideoFrame.from_ndarray(markers.draw_frame(number), format="yuv420p")
        frame.pts = number
        if number % GOP_FRAMES == 0:
            frame.pict_type = av.video.frame.PictureType.I
        encoded = b"".join(bytes(p) for p in codec.encode(frame))
        if vp8_keyframe(encoded) != (number % GOP_FRAMES == 0):
            raise RuntimeError(f"VP8 loop frame {number}: keyframe placement not honoured")
        frames.append(encoded)
    return tuple(frames)


def _encode_audio() -> tuple[bytes, ...]:
    codec = av.CodecContext.create("libopus", "w")
    assert isinstance(codec, av.AudioCodecContext)
    codec.sample_rate = AUDIO_RATE
    codec.layout = "mono"
    codec.format = "s16"
    codec.bit_rate = AUDIO_BITRATE
    codec.time_base = AUDIO_TIME_BASE
    codec.options = {"application": "voip"}
    seconds = AUDIO_LOOP_PACKETS * PACKET_SAMPLES / AUDIO_RATE
    signal = markers.audio_signal(
        seconds, rate=AUDIO_RATE, period_s=CHIRP_PERIOD_S, offset_s=CHIRP_OFFSET_S
    )
    pcm = np.clip(signal * 32767, -32768, 32767).astype(np.int16)
    packets: list[bytes] = []
    for i in range(AUDIO_LOOP_PACKETS):
        chunk = pcm[i * PACKET_SAMPLES : (i + 1) * PACKET_SAMPLES].reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(chunk, format="s16", layout="mono")
        frame.sample_rate = AUDIO_RATE
        frame.pts = i * PACKET_SAMPLES
        packets.extend(bytes(p) for p in codec.encode(frame))
    packets.extend(bytes(p) for p in codec.encode(None))
    # The encoder's look-ahead yields one packet more than frames; the loop keeps exactly
    # one packet per 20 ms so its period is exact.
    return tuple(packets[:AUDIO_LOOP_PACKETS])


def _calibrate(audio: tuple[bytes, ...]) -> dict[int, Chirp]:
    """Decode the loop as a receiver would and note where each chirp lands.

    The codec delays the chirp (Opus look-ahead) and the decimation shifts it; measuring
    through the same decoder the receiver uses cancels both exactly.
    """
    decoder = AudioDecoder()
    detector = markers.ChirpDetector(rate=ANALYSIS_RATE)
    found: dict[int, Chirp] = {}
    per_packet = PACKET_SAMPLES // DECIMATION
    # Three laps: the middle one is decoded from steady state, wrap-around included, and
    # the third flushes the detector's last block.
    for n in range(3 * len(audio)):
        for detection in detector.push(n * per_packet, decoder.decode(audio[n % len(audio)])):
            index, offset = divmod(detection.position, per_packet)
            if len(audio) <= index < 2 * len(audio):
                packet = int(index) % len(audio)
                found[packet] = Chirp(packet, offset / ANALYSIS_RATE, detection.symbol)
    expected = round(AUDIO_LOOP_PACKETS * PACKET_SAMPLES / AUDIO_RATE / CHIRP_PERIOD_S)
    if len(found) != expected:
        raise RuntimeError(f"audio loop calibration found {len(found)} chirps, not {expected}")
    return found


class AudioDecoder:
    """Decode Opus packets to mono float samples at ANALYSIS_RATE."""

    def __init__(self) -> None:
        self._codec = av.CodecContext.create("libopus", "r")
        assert isinstance(self._codec, av.AudioCodecContext)
        # Without a layout, mono packets come back as interleaved stereo.
        self._codec.layout = "mono"

    def decode(self, payload: bytes) -> np.ndarray:
        try:
            frames = self._codec.decode(av.Packet(payload))
        except av.FFmpegError:
            return _NO_SAMPLES
        out = [self._analysis(frame) for frame in frames if isinstance(frame, av.AudioFrame)]
        if len(out) == 1:
            return out[0]
        return np.concatenate(out) if out else _NO_SAMPLES

    @staticmethod
    def _analysis(frame: av.AudioFrame) -> np.ndarray:
        """Fold to mono and average every DECIMATION samples, scaled to [-1, 1]."""
        array = frame.to_ndarray()
        channels = array.shape[0] if frame.format.is_planar else array.size // frame.samples
        if frame.format.is_planar:  # (channels, n)
            mono = array.sum(axis=0, dtype=np.float32)
        else:  # packed: (1, n * channels), interleaved
            mono = array.reshape(frame.samples, channels).sum(axis=1, dtype=np.float32)
        full_scale = 32768.0 if frame.format.name.startswith("s16") else 1.0
        scale = full_scale * DECIMATION * channels
        usable = frame.samples - frame.samples % DECIMATION
        decimated: np.ndarray = mono[:usable].reshape(-1, DECIMATION).sum(axis=1)
        return decimated / np.float32(scale)


_NO_SAMPLES = np.zeros(0, dtype=np.float32)


def prefer_codec(transceiver: RTCRtpTransceiver) -> None:
    """Negotiate only callmon's codec for this medium (and its RTX).

    The probe's loops are pre-encoded in it and the reflector forwards without
    transcoding, so offering or accepting anything else could only fail later.
    """
    wanted = CODECS[transceiver.kind].lower()
    capabilities = RTCRtpSender.getCapabilities(transceiver.kind).codecs
    chosen = [c for c in capabilities if c.mimeType.lower() == wanted]
    rtx = [c for c in capabilities if c.mimeType.lower().endswith("/rtx")]
    transceiver.setCodecPreferences(chosen + rtx)


# --- what was sent, when -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SentFrame:
    n: int
    "Running frame count since media started."
    index: int
    "Loop index (the frame number in the picture)."
    sent_at: float
    "Monotonic send instant."
    due_at: float
    "When the schedule wanted it sent; sent_at - due_at is the probe's own lateness."


@dataclass(frozen=True, slots=True)
class SentChirp:
    symbol: int
    instant: float
    "Monotonic instant of the chirp start, on the decoded-audio scale (see Chirp)."
    lateness: float


class SendLog:
    """Recent sends, searchable by content; bounded to the last ~30 s."""

    def __init__(self) -> None:
        self.frames: deque[SentFrame] = deque(maxlen=FPS * 30)
        self.chirps: deque[SentChirp] = deque(maxlen=30)

    def find_frame(self, index: int, before: float) -> SentFrame | None:
        """Return the latest frame sent with loop index `index` at or before `before`."""
        for sent in reversed(self.frames):
            if sent.index == index and sent.sent_at <= before:
                return sent
        return None

    def find_chirp(self, symbol: int, before: float) -> SentChirp | None:
        for sent in reversed(self.chirps):
            if sent.symbol == symbol and sent.instant <= before:
                return sent
        return None

    def frames_between(self, start: float, end: float) -> list[SentFrame]:
        return [f for f in self.frames if start <= f.sent_at <= end]


class MediaClock:
    """The one schedule both tracks follow, so chirps stay aligned with their frames."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.now = clock
        self.origin: float | None = None

    def start(self) -> float:
        if self.origin is None:
            self.origin = self.now()
        return self.origin

    async def wait(self, offset_s: float) -> float:
        """Sleep until `offset_s` after the origin; return the due instant."""
        due = self.start() + offset_s
        delay = due - self.now()
        if delay > 0:
            await asyncio.sleep(delay)
        return due


class LoopVideoTrack(MediaStreamTrack):
    """Sends the VP8 loop at FPS, jumping to the next keyframe when one is requested."""

    kind = "video"

    def __init__(self, loops: MediaLoops, clock: MediaClock, log: SendLog) -> None:
        super().__init__()
        self._loops = loops
        self._clock = clock
        self._log = log
        self._n = 0
        self._index = 0
        self._keyframe_wanted = False
        self.keyframes_forced = 0

    def request_keyframe(self) -> None:
        self._keyframe_wanted = True

    async def recv(self) -> Packet[Any]:
        due = await self._clock.wait(self._n / FPS)
        if self._keyframe_wanted:
            self._keyframe_wanted = False
            if self._index % GOP_FRAMES:
                self._index = (self._index // GOP_FRAMES + 1) * GOP_FRAMES % LOOP_FRAMES
                self.keyframes_forced += 1
        packet = av.Packet(self._loops.video[self._index])
        packet.pts = self._n * (VIDEO_CLOCK // FPS)
        packet.time_base = VIDEO_TIME_BASE
        self._log.frames.append(SentFrame(self._n, self._index, self._clock.now(), due))
        self._n += 1
        self._index = (self._index + 1) % LOOP_FRAMES
        return packet


class LoopAudioTrack(MediaStreamTrack):
    """Sends the Opus loop in 20 ms packets."""

    kind = "audio"

    def __init__(self, loops: MediaLoops, clock: MediaClock, log: SendLog) -> None:
        super().__init__()
        self._loops = loops
        self._clock = clock
        self._log = log
        self._n = 0

    async def recv(self) -> Packet[Any]:
        due = await self._clock.wait(self._n * PACKET_SAMPLES / AUDIO_RATE)
        index = self._n % len(self._loops.audio)
        packet = av.Packet(self._loops.audio[index])
        packet.pts = self._n * PACKET_SAMPLES
        packet.time_base = AUDIO_TIME_BASE
        sent_at = self._clock.now()
        chirp = self._loops.chirps.get(index)
        if chirp is not None:
            self._log.chirps.append(
                SentChirp(chirp.symbol, sent_at + chirp.offset_s, sent_at - due)
            )
        self._n += 1
        return packet
