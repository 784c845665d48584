"""Check that the media markers survive real VP8 and Opus codecs and fail safe on damage."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from unittest import mock

import av
import numpy as np
import numpy.typing as npt
import pytest

from probes.markers import (
    HEIGHT,
    WIDTH,
    ChirpDetector,
    Detection,
    audio_signal,
    chirp,
    draw_frame,
    read_frame_number,
)
from probes.media import AudioDecoder

FPS = 15
OPUS_RATE = 48000
OPUS_FRAME = 960  # 20 ms at 48 kHz
CHIRP_OFFSET_S = 0.2
SECONDS = 6.0
CHIRPS = 6  # chirps at 0.2, 1.2, ... 5.2 s fit in 6 s


# video


def luma(image: npt.NDArray[np.uint8], height: int = HEIGHT) -> npt.NDArray[np.uint8]:
    """Return the luma plane of a yuv420p image from `draw_frame`."""
    return image[:height]


def encode_vp8(numbers: Sequence[int], bit_rate: int) -> list[bytes]:
    """Encode one frame per number with libvpx configured like aiortc's realtime encoder."""
    encoder = av.CodecContext.create("libvpx", "w")
    assert isinstance(encoder, av.VideoCodecContext)
    encoder.width = WIDTH
    encoder.height = HEIGHT
    encoder.bit_rate = bit_rate
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = Fraction(1, FPS)
    encoder.framerate = Fraction(FPS)
    encoder.gop_size = FPS  # a keyframe every second
    encoder.qmin = 2
    encoder.qmax = 56
    encoder.options = {
        "bufsize": str(bit_rate),
        "cpu-used": "-6",
        "deadline": "realtime",
        "lag-in-frames": "0",
        "minrate": str(bit_rate),
        "maxrate": str(bit_rate),
        "noise-sensitivity": "4",
        "overshoot-pct": "15",
        "partitions": "0",
        "static-thresh": "1",
        "undershoot-pct": "100",
    }
    packets: list[bytes] = []
    for index, number in enumerate(numbers):
        frame = av.VideoFrame.from_ndarray(draw_frame(number), format="yuv420p")
        frame.pts = index
        frame.time_base = encoder.time_base
        packets += [bytes(packet) for packet in encoder.encode(frame)]
    packets += [bytes(packet) for packet in encoder.encode(None)]
    return packets


def test_it_reads_back_every_number_it_draws() -> None:
    numbers = [*range(0, 65536, 251), 1, 2, 3, 32767, 32768, 65534, 65535]
    assert [read_frame_number(luma(draw_frame(number))) for number in numbers] == numbers


def test_it_reads_a_luma_plane_cut_from_a_padded_buffer() -> None:
    # decoders hand back planes whose rows are longer than the picture (line_size > width)
    padded = np.zeros((HEIGHT, 384), dtype=np.uint8)
    padded[:, :WIDTH] = luma(draw_frame(4242))
    assert read_frame_number(padded[:, :WIDTH]) == 4242


def test_it_draws_a_yuv420p_image_that_pyav_accepts() -> None:
    image = draw_frame(7)
    assert image.shape == (HEIGHT * 3 // 2, WIDTH)
    assert image.dtype == np.uint8
    frame = av.VideoFrame.from_ndarray(image, format="yuv420p")
    assert (frame.width, frame.height) == (WIDTH, HEIGHT)
    # barcode chroma is neutral, texture chroma is not
    u = frame.to_ndarray()[HEIGHT : HEIGHT + HEIGHT // 4].reshape(HEIGHT // 2, WIDTH // 2)
    assert (u[:64] == 128).all()
    assert u[64:].std() > 10
    # the texture below the barcode moves from frame to frame
    assert (luma(draw_frame(8))[128:] != luma(image)[128:]).mean() > 0.5
    assert np.array_equal(draw_frame(7), image)


def test_it_draws_other_sizes() -> None:
    image = draw_frame(65535, 640, 480)
    assert image.shape == (720, 640)
    assert read_frame_number(luma(image, 480)) == 65535


@pytest.mark.parametrize(
    ("number", "width", "height"), [(-1, 320, 240), (65536, 320, 240), (0, 318, 240), (0, 320, 128)]
)
def test_it_refuses_numbers_and_sizes_it_cannot_draw(number: int, width: int, height: int) -> None:
    with pytest.raises(ValueError, match=r"outside|frame size"):
        draw_frame(number, width, height)


def test_it_refuses_a_plane_smaller_than_the_barcode() -> None:
    with pytest.raises(ValueError, match="smaller"):
        read_frame_number(np.zeros((120, 320), dtype=np.uint8))


@pytest.mark.parametrize("bit_rate", [250_000, 100_000])
def test_it_survives_vp8_at_call_bitrates(bit_rate: int) -> None:
    numbers = [*range(300), *range(65000, 65011), *range(65525, 65536)]
    packets = encode_vp8(numbers, bit_rate)
    decoder = av.CodecContext.create("libvpx", "r")
    read: list[int | None] = []
    read_seconds = 0.0
    for packet in packets:
        for frame in decoder.decode(av.Packet(packet)):
            assert isinstance(frame, av.VideoFrame)
            plane = frame.planes[0]
            rows = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(
                frame.height, plane.line_size
            )
            started = time.perf_counter()
            read.append(read_frame_number(rows[:, : frame.width]))
            read_seconds += time.perf_counter() - started
    kbps = sum(len(packet) for packet in packets) * 8 * FPS / len(numbers) / 1000
    print(
        f"\nVP8 at {bit_rate // 1000} kbps target: {kbps:.0f} kbps spent, "
        f"read_frame_number {read_seconds / len(read) * 1e6:.1f} us per frame"
    )
    assert read == numbers
    # the texture makes the encoder spend its budget, as a camera picture would
    assert kbps > 0.7 * bit_rate / 1000


def test_it_returns_none_for_noise_and_flat_pictures() -> None:
    rng = np.random.default_rng(5)
    for _ in range(1000):
        assert read_frame_number(rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)) is None
    for level in (0, 16, 126, 235, 255):
        assert read_frame_number(np.full((HEIGHT, WIDTH), level, dtype=np.uint8)) is None


@pytest.mark.parametrize("block", range(40))
def test_it_returns_none_when_any_single_block_is_flipped(block: int) -> None:
    y = luma(draw_frame(12345)).copy()
    row, column = divmod(block, 10)
    area = y[row * 32 : row * 32 + 32, column * 32 : column * 32 + 32]
    area[:] = 251 - area  # 16 <-> 235
    assert read_frame_number(y) is None


# audio: the signal


def test_chirp_encodes_direction_and_sign() -> None:
    up, down, inverted_up, inverted_down = (chirp(symbol, 16000) for symbol in range(4))
    assert up.dtype == np.float32
    assert len(up) == 640
    assert len(chirp(0, 48000)) == 1920
    assert 0.49 < np.abs(up).max() <= 0.5
    assert np.array_equal(inverted_up, -up)
    assert np.array_equal(inverted_down, -down)
    # tapered ends: no click
    assert np.abs(up[[0, -1]]).max() < 0.01

    def crossings(wave: npt.NDArray[np.float32]) -> int:
        return int(np.count_nonzero(np.diff(np.signbit(wave))))

    # the upward chirp is low at its start and high at its end, the downward one the reverse
    assert crossings(up[:160]) < crossings(up[-160:])
    assert crossings(down[:160]) > crossings(down[-160:])
    with pytest.raises(ValueError, match="symbol"):
        chirp(4, 16000)
    with pytest.raises(ValueError, match="rate"):
        chirp(0, 8000)


def test_audio_signal_places_chirps_on_a_quiet_background() -> None:
    rate = 16000
    signal = audio_signal(3.5, rate=rate, period_s=1.0, offset_s=0.2)
    background = audio_signal(3.5, rate=rate, offset_s=100.0)
    assert signal.dtype == np.float32
    assert len(signal) == 56000
    assert np.array_equal(signal, audio_signal(3.5, rate=rate))
    assert not np.array_equal(background, audio_signal(3.5, rate=rate, offset_s=100.0, seed=2))
    # background: about -40 dBFS and never digital silence
    assert -41 < 20 * np.log10(np.sqrt(np.mean(background**2))) < -39
    assert np.count_nonzero(background == 0) < 10
    # chirps 0, 1, 2 fit, chirp 3 at 3.2 s fits too, chirp 4 at 4.2 s does not
    expected = np.zeros_like(signal)
    for k in range(4):
        start = round((k + 0.2) * rate)
        expected[start : start + 640] = chirp(k % 4, rate)
    np.testing.assert_allclose(signal - background, expected, atol=1e-6)


# audio: the detector on clean input


def push_in_chunks(
    detector: ChirpDetector, samples: npt.NDArray[np.float32], chunk: int, start: int = 0
) -> list[Detection]:
    """Push samples in chunks of `chunk`, the first at `start`; return what was found."""
    found: list[Detection] = []
    for offset in range(0, len(samples), chunk):
        found += detector.push(start + offset, samples[offset : offset + chunk])
    return found


@pytest.mark.parametrize("rate", [16000, 48000])
def test_detector_finds_clean_chirps_where_they_start(rate: int) -> None:
    detector = ChirpDetector(rate)
    found = push_in_chunks(detector, audio_signal(10.0, rate=rate), rate // 50)
    found += detector.flush()
    assert [d.symbol for d in found] == [k % 4 for k in range(10)]
    expected = [(k + 0.2) * rate for k in range(10)]
    np.testing.assert_allclose([d.position for d in found], expected, atol=0.05)
    assert min(d.score for d in found) > 0.99


@pytest.mark.parametrize("chunk", [1_000_000, 8191, 1000, 320, 37])
def test_detector_reports_each_chirp_once_whatever_the_chunking(chunk: int) -> None:
    # a chirp every 0.1 s puts chirps across every kind of block boundary
    signal = audio_signal(10.0, rate=16000, period_s=0.1, offset_s=0.0123)
    detector = ChirpDetector()
    found = push_in_chunks(detector, signal, chunk) + detector.flush()
    assert len(found) == 100
    assert [d.symbol for d in found] == [k % 4 for k in range(100)]
    expected = [round((k * 0.1 + 0.0123) * 16000) for k in range(100)]
    np.testing.assert_allclose([d.position for d in found], expected, atol=0.05)


def test_detector_keeps_the_callers_timeline_and_accepts_int16() -> None:
    signal = audio_signal(3.0, rate=16000)
    detector = ChirpDetector()
    pcm = np.round(signal * 32767).astype(np.int16)
    found = push_in_chunks(
        detector, pcm.astype(np.float32) * np.float32(1 / 32768), 320, start=10**9
    )
    found += detector.flush()
    as_int16 = ChirpDetector()
    found_int16 = [
        *as_int16.push(10**9, pcm[:20000]),
        *as_int16.push(10**9 + 20000, pcm[20000:]),
        *as_int16.flush(),
    ]
    assert [round(d.position - 10**9, 2) for d in found] == [3200, 19200, 35200]
    assert found_int16 == found


def test_detector_fills_gaps_with_silence_and_ignores_repeated_samples() -> None:
    signal = audio_signal(6.0, rate=16000)
    holed = np.zeros_like(signal)
    detector = ChirpDetector()
    found: list[Detection] = []
    for offset in range(0, len(signal), 320):
        # lost packets: the start of the second chirp, then all of the fourth
        if offset == 19200 or 48000 <= offset < 56000:
            continue
        # each chunk repeats the end of the previous one, as a retransmission would
        start = max(offset - 100, 0)
        found += detector.push(start, signal[start : offset + 320])
        holed[start : offset + 320] = signal[start : offset + 320]
    found += detector.flush()

    reference = ChirpDetector()
    expected = push_in_chunks(reference, holed, 320) + reference.flush()
    assert [d.symbol for d in found] == [d.symbol for d in expected] == [0, 1, 2, 0, 1]
    assert 0.6 < found[1].score < 0.95  # what is left of the second chirp
    # same decisions; the FFT blocks may fall elsewhere, so allow for rounding
    np.testing.assert_allclose(
        [(d.position, d.score) for d in found], [(d.position, d.score) for d in expected], atol=1e-3
    )
    np.testing.assert_allclose(
        [d.position for d in found], [3200, 19200, 35200, 67200, 83200], atol=0.05
    )


def test_detector_skips_a_long_gap_without_analysing_it() -> None:
    signal = audio_signal(2.0, rate=16000)
    detector = ChirpDetector()
    analyse = detector._analyse_block
    blocks = 0

    # Count analysed blocks rather than time the call: without the skip, this gap would
    # take days to analyse, so fail as soon as it is clearly being analysed.
    def analyse_a_few_blocks() -> list[Detection]:
        nonlocal blocks
        blocks += 1
        assert blocks < 20, "the gap is being analysed block by block"
        return analyse()

    with mock.patch.object(detector, "_analyse_block", analyse_a_few_blocks):
        found = detector.push(0, signal)
        found += detector.push(10**12, signal)
        found += detector.flush()
    assert [round(d.position, 2) for d in found] == [3200, 19200, 10**12 + 3200, 10**12 + 19200]
    assert [d.symbol for d in found] == [0, 1, 0, 1]


def test_detector_ignores_background_and_silence() -> None:
    for rate in (16000, 48000):
        background = audio_signal(20.0, rate=rate, offset_s=100.0)
        detector = ChirpDetector(rate)
        assert push_in_chunks(detector, background, rate // 50) + detector.flush() == []
        silent = ChirpDetector(rate)
        assert push_in_chunks(silent, np.zeros(rate * 5, np.float32), rate // 50) == []
        assert silent.flush() == []


def test_detector_refuses_bad_settings_and_shapes() -> None:
    with pytest.raises(ValueError, match="threshold"):
        ChirpDetector(threshold=0.0)
    with pytest.raises(ValueError, match="rate"):
        ChirpDetector(8000)
    with pytest.raises(ValueError, match="mono"):
        ChirpDetector().push(0, np.zeros((2, 320), np.float32))


# audio: through Opus


def encode_opus(signal: npt.NDArray[np.float32]) -> list[bytes]:
    """Encode 48 kHz mono audio as 20 ms libopus packets (48 kbps, voip)."""
    encoder = av.CodecContext.create("libopus", "w")
    assert isinstance(encoder, av.AudioCodecContext)
    encoder.sample_rate = OPUS_RATE
    encoder.layout = "mono"
    encoder.format = "flt"
    encoder.bit_rate = 48000
    encoder.time_base = Fraction(1, OPUS_RATE)
    encoder.options = {"application": "voip", "frame_duration": "20"}
    packets: list[bytes] = []
    for offset in range(0, len(signal), OPUS_FRAME):
        frame = av.AudioFrame.from_ndarray(
            signal[np.newaxis, offset : offset + OPUS_FRAME], format="flt", layout="mono"
        )
        frame.sample_rate = OPUS_RATE
        frame.pts = offset
        frame.time_base = encoder.time_base
        packets += [bytes(packet) for packet in encoder.encode(frame)]
    packets += [bytes(packet) for packet in encoder.encode(None)]
    return packets


# Packets and the index each was sent as (its RTP timestamp / 960); yields each decoded
# frame with the position of its first sample at the decoder's rate.
Pcm = npt.NDArray[np.float32] | npt.NDArray[np.int16]
Decode = Callable[[Sequence[tuple[int, bytes]]], Iterator[tuple[int, Pcm]]]


@dataclass(frozen=True)
class OpusPath:
    """A way to decode Opus for the detector."""

    name: str
    rate: int
    decode: Decode
    spread: float
    "Largest spread of codec delays between chirps, in samples at `rate`."


def decode_probe_16k(
    packets: Sequence[tuple[int, bytes]],
) -> Iterator[tuple[int, Pcm]]:
    """Decode as the probe does: PyAV's libopus at 48 kHz, averaged down to 16 kHz.

    FFmpeg's libopus wrapper (and so PyAV) always decodes at 48 kHz, whatever sample_rate
    is asked for; probes.media.AudioDecoder decimates by three.
    """
    decoder = AudioDecoder()
    for index, packet in packets:
        yield index * 320, decoder.decode(packet)


def decode_pyav_48k(
    packets: Sequence[tuple[int, bytes]],
) -> Iterator[tuple[int, Pcm]]:
    """Decode with PyAV's libopus decoder, which always delivers 48 kHz."""
    decoder = av.CodecContext.create("libopus", "r")
    assert isinstance(decoder, av.AudioCodecContext)
    decoder.layout = "mono"  # without it, mono packets come back as interleaved stereo
    for index, packet in packets:
        position = index * OPUS_FRAME
        for frame in decoder.decode(av.Packet(packet)):
            assert isinstance(frame, av.AudioFrame)
            samples = frame.to_ndarray()[0]
            assert len(samples) == frame.samples
            assert samples.dtype == np.int16  # the detector takes s16 as it comes
            yield position, samples
            position += frame.samples


OPUS_PATHS = [
    pytest.param(OpusPath("probe decoder at 16 kHz", 16000, decode_probe_16k, 1.0), id="probe-16k"),
    # The encoder starts in hybrid mode (SILK below 8 kHz) and switches to CELT after
    # 0.7 s; at 48 kHz SILK's upsampler places the first chirp 2 samples (44 us) early.
    pytest.param(OpusPath("PyAV libopus at 48 kHz", 48000, decode_pyav_48k, 2.5), id="pyav-48k"),
]


@pytest.fixture(scope="module")
def chirp_packets() -> list[bytes]:
    """Encode the 6 s test signal once for all Opus tests."""
    return encode_opus(audio_signal(SECONDS, rate=OPUS_RATE, offset_s=CHIRP_OFFSET_S))


def detect(path: OpusPath, packets: Sequence[tuple[int, bytes]]) -> tuple[list[Detection], float]:
    """Return the chirps found in decoded packets and the detector's CPU seconds."""
    detector = ChirpDetector(path.rate)
    found: list[Detection] = []
    cpu = 0.0
    for position, samples in path.decode(packets):
        started = time.process_time()
        found += detector.push(position, samples)
        cpu += time.process_time() - started
    started = time.process_time()
    found += detector.flush()
    cpu += time.process_time() - started
    return found, cpu


@pytest.mark.parametrize("path", OPUS_PATHS)
def test_chirps_survive_opus(path: OpusPath, chirp_packets: list[bytes]) -> None:
    found, cpu = detect(path, list(enumerate(chirp_packets)))
    assert [d.symbol for d in found] == [k % 4 for k in range(CHIRPS)]
    positions = np.array([d.position for d in found])
    np.testing.assert_allclose(np.diff(positions), path.rate, atol=path.spread)
    delays = positions - (np.arange(CHIRPS) + CHIRP_OFFSET_S) * path.rate
    print(
        f"\n{path.name}: codec delay {delays.mean():.2f} samples "
        f"(spread {np.ptp(delays):.3f}), scores {min(d.score for d in found):.3f}"
        f"..{max(d.score for d in found):.3f}, detector CPU "
        f"{cpu / SECONDS * 1e3:.2f} ms per second of audio"
    )
    assert np.ptp(delays) < path.spread
    # Opus look-ahead is 6.5 ms; a delay far from that means positions are misread
    assert 0.003 * path.rate < delays.mean() < 0.010 * path.rate


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("path", OPUS_PATHS)
def test_chirps_survive_opus_with_five_percent_loss(
    path: OpusPath, seed: int, chirp_packets: list[bytes]
) -> None:
    clean, _ = detect(path, list(enumerate(chirp_packets)))
    kept = np.random.default_rng(seed).random(len(chirp_packets)) >= 0.05
    found, _ = detect(path, [(i, p) for i, p in enumerate(chirp_packets) if kept[i]])
    print(
        f"\n{path.name}, seed {seed}: {np.count_nonzero(~kept)} packets lost, "
        f"{len(found)}/{len(clean)} chirps found, scores {[round(d.score, 2) for d in found]}"
    )
    assert len(clean) == CHIRPS
    assert len(found) >= 4
    clean_positions = np.array([d.position for d in clean])
    matches = [int(np.argmin(np.abs(clean_positions - d.position))) for d in found]
    assert len(set(matches)) == len(found)  # each chirp once
    for detection, k in zip(found, matches, strict=True):
        assert detection.symbol == clean[k].symbol
        assert abs(detection.position - clean[k].position) <= 1.0


@pytest.mark.parametrize("path", OPUS_PATHS)
@pytest.mark.parametrize("content", ["background", "silence"])
def test_opus_coded_background_and_silence_give_no_detections(path: OpusPath, content: str) -> None:
    if content == "background":
        signal = audio_signal(SECONDS, rate=OPUS_RATE, offset_s=100.0)
    else:
        signal = np.zeros(round(SECONDS * OPUS_RATE), dtype=np.float32)
    found, _ = detect(path, list(enumerate(encode_opus(signal))))
    assert found == []
