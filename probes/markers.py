"""Draw and read synthetic media markers that survive a round trip through WebRTC codecs.

Video frames carry their 16-bit frame number as a barcode of 40 large blocks in the top
128 rows (Gray code, its complement and a CRC-8, so a damaged frame reads as None rather
than as a wrong number), above a moving texture that keeps the VP8 encoder as busy as a
real camera would. Audio carries 40 ms linear chirps (400-4000 Hz) whose direction and
sign encode a 2-bit symbol; `ChirpDetector` finds them in decoded audio by normalised
cross-correlation and places each start to a fraction of a sample.

Pure numpy: nothing here touches aiortc or PyAV, so the probe can pre-render media and
run detectors in any thread.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "BARCODE_HEIGHT",
    "BARCODE_WIDTH",
    "CHIRP_AMPLITUDE",
    "CHIRP_HIGH_HZ",
    "CHIRP_LOW_HZ",
    "CHIRP_SECONDS",
    "HEIGHT",
    "WIDTH",
    "ChirpDetector",
    "Detection",
    "audio_signal",
    "chirp",
    "draw_frame",
    "read_frame_number",
]

FloatArray = npt.NDArray[np.float32]
ByteArray = npt.NDArray[np.uint8]

WIDTH = 320
HEIGHT = 240

# Barcode geometry: 32x32 blocks stay on whole VP8 macroblocks (16x16), so each block is
# coded as flat macroblocks and survives even the coarsest quantiser.
_BLOCK = 32
_BLOCK_COLUMNS = 10
_BLOCK_ROWS = 4
BARCODE_WIDTH = _BLOCK * _BLOCK_COLUMNS
BARCODE_HEIGHT = _BLOCK * _BLOCK_ROWS
# Sample only the centre of each block: edges are where ringing and chroma bleed land.
_SAMPLE_FROM = 8
_SAMPLE_TO = 24
_SAMPLE_PIXELS = (_SAMPLE_TO - _SAMPLE_FROM) ** 2
# Video-range luma (BT.601 "studio swing"), which is what decoders hand back.
_LUMA_ONE = 235
_LUMA_ZERO = 16
_LUMA_THRESHOLD = 126
_NEUTRAL_CHROMA = 128
# texture cell size: coarse enough to move with the stripes, fine enough to cost bits
_CELL = 8

CHIRP_SECONDS = 0.040
CHIRP_LOW_HZ = 400.0
CHIRP_HIGH_HZ = 4000.0
CHIRP_AMPLITUDE = 0.5
_TAPER_SECONDS = 0.002
# -40 dBFS: audible as hiss only if you listen for it, but enough that neither the
# encoder's DTX nor a service's silence suppression ever sees digital silence.
_BACKGROUND_RMS = 0.01
# Windows quieter than -80 dBFS are scored as if they were that loud, which avoids
# dividing by zero on digital silence and keeps decoder dither from looking like a chirp.
_FLOOR_RMS = 1e-4
# Detector blocks carry at least this much new audio, trading latency for FFT overhead.
_MIN_BLOCK_SECONDS = 0.25


def _crc8_table() -> tuple[int, ...]:
    """Build the byte-at-a-time lookup table for CRC-8 with polynomial 0x07."""
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_CRC8_TABLE = _crc8_table()


def _crc8(data: bytes) -> int:
    """Return the CRC-8 (polynomial 0x07, initial value 0, no reflection) of data."""
    crc = 0
    for byte in data:
        crc = _CRC8_TABLE[crc ^ byte]
    return crc


def _code(number: int) -> bytes:
    """Return the 5 barcode bytes of number: Gray code, its complement, CRC-8 of the Gray code."""
    gray = number ^ (number >> 1)
    gray_bytes = gray.to_bytes(2, "big")
    return gray_bytes + (gray ^ 0xFFFF).to_bytes(2, "big") + bytes([_crc8(gray_bytes)])


def _hash_cells(x: npt.NDArray[np.uint32], y: npt.NDArray[np.uint32]) -> npt.NDArray[np.uint32]:
    """Return a deterministic pseudo-random byte per (x, y) cell (an integer hash, no RNG)."""
    h = x * np.uint32(0x9E3779B1) + y * np.uint32(0x85EBCA77)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h & np.uint32(0xFF)


def draw_frame(number: int, width: int = WIDTH, height: int = HEIGHT) -> ByteArray:
    """Draw frame `number` as one yuv420p image of shape (height * 3 // 2, width).

    The layout is the one `av.VideoFrame.from_ndarray(image, format="yuv420p")` takes:
    the luma plane, then the U and V planes packed row after row.
    """
    if not 0 <= number <= 0xFFFF:
        raise ValueError(f"frame number {number} is outside 0..65535")
    if width < BARCODE_WIDTH or height <= BARCODE_HEIGHT or width % 2 or height % 2:
        raise ValueError(
            f"frame size {width}x{height} must be even and at least "
            f"{BARCODE_WIDTH}x{BARCODE_HEIGHT + 2}"
        )
    image = np.empty((height * 3 // 2, width), dtype=np.uint8)
    flat = image.reshape(-1)
    luma = flat[: width * height].reshape(height, width)
    chroma_size = (width // 2) * (height // 2)
    u = flat[width * height : width * height + chroma_size].reshape(height // 2, width // 2)
    v = flat[width * height + chroma_size :].reshape(height // 2, width // 2)

    # texture: diagonal stripes drifting 1 px per frame (motion the encoder can predict)
    # plus 8x8 pseudo-random cells scrolling 3 px per frame (detail it has to code)
    ramp = (np.arange(width + height) + number) % 32
    stripes = (40 + 5 * np.abs(ramp - 16)).astype(np.uint8)
    # row y of the stripes is ramp[y : y + width]: a strided view, nothing computed per pixel
    diagonal = np.lib.stride_tricks.sliding_window_view(stripes, width)[:height]
    first_cell = 3 * number // _CELL
    cell_columns = (np.arange(width) + 3 * number) // _CELL - first_cell
    table = _hash_cells(
        np.arange(first_cell, first_cell + int(cell_columns[-1]) + 1, dtype=np.uint32),
        np.arange((height + _CELL - 1) // _CELL, dtype=np.uint32)[:, np.newaxis],
    )
    cells = (table * np.uint32(5) >> np.uint32(4)).astype(np.uint8)[:, cell_columns]
    np.add(diagonal, np.repeat(cells, _CELL, axis=0)[:height], out=luma)

    # colour: slow hue drift, so the chroma planes are not free either
    cx = np.arange(width // 2)[np.newaxis, :] / (width // 2)
    cy = np.arange(height // 2)[:, np.newaxis] / (height // 2)
    u[:] = np.rint(128 + 48 * np.sin(2 * np.pi * (cx + number / 90)))
    v[:] = np.rint(128 + 48 * np.cos(2 * np.pi * (cy + number / 120)))

    # barcode: one block per bit, row by row, most significant bit first
    bits = np.unpackbits(np.frombuffer(_code(number), dtype=np.uint8))
    levels = np.where(bits, _LUMA_ONE, _LUMA_ZERO).astype(np.uint8)
    levels = levels.reshape(_BLOCK_ROWS, _BLOCK_COLUMNS)
    luma[:BARCODE_HEIGHT, :BARCODE_WIDTH] = np.repeat(
        np.repeat(levels, _BLOCK, axis=0), _BLOCK, axis=1
    )
    u[: BARCODE_HEIGHT // 2, : BARCODE_WIDTH // 2] = _NEUTRAL_CHROMA
    v[: BARCODE_HEIGHT // 2, : BARCODE_WIDTH // 2] = _NEUTRAL_CHROMA
    return image


def read_frame_number(y_plane: ByteArray) -> int | None:
    """Read the frame number from a decoded luma plane, or None if the barcode is not intact.

    `y_plane` is the (height, width) luma plane; a view of a wider, padded buffer is fine.
    None means the complement or CRC check failed: the frame is damaged or not ours.
    """
    area = y_plane[:BARCODE_HEIGHT, :BARCODE_WIDTH]
    if area.shape != (BARCODE_HEIGHT, BARCODE_WIDTH):
        raise ValueError(f"luma plane {y_plane.shape} is smaller than the barcode")
    # Sum the central 16 rows of each block row, then the central 16 columns of each
    # block: two reductions over views, no per-block Python work.
    rows = area.reshape(_BLOCK_ROWS, _BLOCK, BARCODE_WIDTH)[:, _SAMPLE_FROM:_SAMPLE_TO, :]
    column_sums = rows.sum(axis=1, dtype=np.uint32)
    blocks = column_sums.reshape(_BLOCK_ROWS, _BLOCK_COLUMNS, _BLOCK)[:, :, _SAMPLE_FROM:_SAMPLE_TO]
    bits = blocks.sum(axis=2) >= _LUMA_THRESHOLD * _SAMPLE_PIXELS
    code = np.packbits(bits).tobytes()
    gray = code[0] << 8 | code[1]
    if gray ^ (code[2] << 8 | code[3]) != 0xFFFF or _crc8(code[:2]) != code[4]:
        return None
    number = gray
    number ^= number >> 8
    number ^= number >> 4
    number ^= number >> 2
    number ^= number >> 1
    return number


def chirp(symbol: int, rate: int) -> FloatArray:
    """Return the 40 ms chirp for symbol 0..3 at `rate` samples per second, amplitude 0.5.

    Bit 0 of the symbol is the direction (0: 400 -> 4000 Hz, 1: 4000 -> 400 Hz), bit 1 the
    sign (1: inverted waveform). The ends are tapered with a 2 ms raised cosine so the
    chirp does not click and its spectrum stays inside the band.
    """
    if symbol not in range(4):
        raise ValueError(f"chirp symbol {symbol} is outside 0..3")
    if rate <= 2 * CHIRP_HIGH_HZ:
        raise ValueError(f"sample rate {rate} cannot carry a {CHIRP_HIGH_HZ:.0f} Hz chirp")
    start_hz, end_hz = (
        (CHIRP_LOW_HZ, CHIRP_HIGH_HZ) if symbol & 1 == 0 else (CHIRP_HIGH_HZ, CHIRP_LOW_HZ)
    )
    t = np.arange(round(CHIRP_SECONDS * rate)) / rate
    sweep = (end_hz - start_hz) / CHIRP_SECONDS
    wave = np.sin(2 * np.pi * (start_hz * t + sweep / 2 * t**2))
    taper_length = round(_TAPER_SECONDS * rate)
    taper = 0.5 - 0.5 * np.cos(np.pi * (np.arange(taper_length) + 0.5) / taper_length)
    wave[:taper_length] *= taper
    wave[-taper_length:] *= taper[::-1]
    sign = -1.0 if symbol & 2 else 1.0
    return (sign * CHIRP_AMPLITUDE * wave).astype(np.float32)


def audio_signal(
    seconds: float,
    rate: int = 48000,
    period_s: float = 1.0,
    offset_s: float = 0.2,
    seed: int = 1,
) -> FloatArray:
    """Return `seconds` of mono float32 audio: quiet noise with a chirp every `period_s`.

    Chirp k has symbol k % 4 and starts at sample round((k * period_s + offset_s) * rate);
    only chirps that fit entirely are included. The -40 dBFS background noise is seeded,
    so the same arguments always give the same samples.
    """
    if period_s <= 0:
        raise ValueError(f"chirp period {period_s} s must be positive")
    length = round(seconds * rate)
    signal = (np.random.default_rng(seed).standard_normal(length) * _BACKGROUND_RMS).astype(
        np.float32
    )
    templates = [chirp(symbol, rate) for symbol in range(4)]
    chirp_length = len(templates[0])
    k = 0
    while (start := round((k * period_s + offset_s) * rate)) + chirp_length <= length:
        if start >= 0:
            signal[start : start + chirp_length] += templates[k % 4]
        k += 1
    return np.clip(signal, -1.0, 1.0)


@dataclass(frozen=True)
class Detection:
    """A chirp found by `ChirpDetector`."""

    position: float
    "Start of the chirp, in samples of the detector's rate on the caller's timeline."
    symbol: int
    "Symbol 0..3 (bit 0: downward sweep, bit 1: inverted waveform)."
    score: float
    "Normalised correlation with the template at the peak, 0..1 (1 for a clean chirp)."


class ChirpDetector:
    """Find chirps in a stream of decoded mono audio, reporting each one once.

    Audio is buffered and analysed in blocks of 0.25-0.5 s (0.47 s at 16 kHz), so a chirp
    is reported up to about 0.55 s after it starts (call `flush` at the end of a stream).
    Each block takes one FFT, correlated with the upward and downward templates in the
    frequency domain. A start position is reported when its normalised score reaches the
    threshold and is the highest within one chirp length either side. Each position is
    scored exactly once (blocks overlap by one chirp length of samples, not of scores), so
    the decision never depends on where the block boundaries fall. Memory is fixed: one
    block of samples and one block of scores.
    """

    def __init__(self, rate: int = 16000, threshold: float = 0.5) -> None:
        """Prepare the templates and buffers for audio at `rate` samples per second."""
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold {threshold} is outside (0, 1]")
        self.rate = rate
        self.threshold = threshold
        templates = np.stack([chirp(0, rate), chirp(1, rate)]).astype(np.float64)
        templates /= np.sqrt(np.sum(templates**2, axis=1, keepdims=True))
        self._length = templates.shape[1]
        # Suppress anything within one chirp length of a stronger peak: that is the extent
        # of the template's own correlation side lobes.
        self._guard = self._length
        self._fft_size = 1 << (round(_MIN_BLOCK_SECONDS * rate) + self._length - 1).bit_length()
        # starts whose whole chirp lies inside one FFT block (no circular wrap-around)
        self._hop = self._fft_size - self._length + 1
        self._spectra = np.conj(np.fft.rfft(templates, self._fft_size)).astype(np.complex64)
        self._energy_floor = self._length * _FLOOR_RMS**2
        self._samples = np.zeros(self._fft_size, dtype=np.float32)
        self._filled = 0
        self._start: int | None = None
        # Scores (and signed correlations) for the previous 2 * guard starts, then this
        # block's starts; starts before the stream began count as silence.
        history = 2 * self._guard + self._hop
        self._squared_scores = np.zeros(history, dtype=np.float32)
        self._correlations = np.zeros((2, history), dtype=np.float32)

    def push(self, position: int, samples: npt.NDArray[np.floating | np.int16]) -> list[Detection]:
        """Add decoded samples whose first one is at `position`; return the chirps now found.

        `samples` are 1-D float (full scale 1.0) or int16. Positions are on the caller's
        own timeline at the detector's rate (unwrapped, e.g. RTP timestamps rescaled).
        A gap since the previous push (lost packets) is filled with silence; samples at
        positions already pushed are ignored.
        """
        data = self._as_float(samples)
        if self._start is None:
            self._start = position
        end = self._start + self._filled
        if position + len(data) <= end:
            return []
        detections: list[Detection] = []
        if position < end:
            data = data[end - position :]
        elif position > end:
            detections += self._fill_silence(position - end)
        detections += self._append(data)
        return detections

    def flush(self) -> list[Detection]:
        """Decide on everything pushed so far by padding with silence; return the chirps found.

        The padding moves the timeline on: later pushes that start before its end are
        ignored up to that point.
        """
        if self._start is None:
            return []
        end = self._start + self._filled
        detections: list[Detection] = []
        # every start before `end` is decided once the buffer starts a guard beyond it
        while self._start < end + self._guard:
            detections += self._fill_silence(self._fft_size - self._filled)
        return detections

    @staticmethod
    def _as_float(samples: npt.NDArray[np.floating | np.int16]) -> FloatArray:
        """Convert one channel of float or int16 samples to float32 at full scale 1.0."""
        array = np.asarray(samples)
        if array.ndim != 1:
            raise ValueError(f"samples must be one mono channel, got shape {array.shape}")
        if array.dtype == np.int16:
            return array.astype(np.float32) * np.float32(1 / 32768)
        return array.astype(np.float32, copy=False)

    def _append(self, data: FloatArray) -> list[Detection]:
        """Buffer samples, analysing each block as it fills."""
        detections: list[Detection] = []
        offset = 0
        while offset < len(data):
            take = min(self._fft_size - self._filled, len(data) - offset)
            self._samples[self._filled : self._filled + take] = data[offset : offset + take]
            self._filled += take
            offset += take
            if self._filled == self._fft_size:
                detections += self._analyse_block()
        return detections

    def _fill_silence(self, count: int) -> list[Detection]:
        """Buffer `count` samples of silence, analysing each block as it fills."""
        assert self._start is not None
        detections: list[Detection] = []
        while count > 0:
            # Once only silence is buffered and nothing pending can reach the threshold,
            # more silence cannot change any decision: skip it instead of analysing it, so
            # a long outage (or a timestamp jump) costs nothing.
            if (
                count >= 2 * self._guard
                and self._filled >= self._length - 1
                and not self._samples[: self._filled].any()
                and self._squared_scores[self._hop :].max() < self.threshold**2
            ):
                self._start += count
                self._squared_scores[self._hop :] = 0
                self._correlations[:, self._hop :] = 0
                return detections
            take = min(self._fft_size - self._filled, count)
            self._samples[self._filled : self._filled + take] = 0
            self._filled += take
            count -= take
            if self._filled == self._fft_size:
                detections += self._analyse_block()
        return detections

    def _analyse_block(self) -> list[Detection]:
        """Score every start in the full buffer, decide the settled ones, keep the tail."""
        assert self._start is not None
        length, guard, hop = self._length, self._guard, self._hop
        samples = self._samples

        # correlate with both templates at every start whose chirp fits in the block
        correlations = np.fft.irfft(np.fft.rfft(samples) * self._spectra, self._fft_size)
        power = np.empty(self._fft_size + 1, dtype=np.float64)
        power[0] = 0.0
        np.cumsum(np.square(samples, dtype=np.float64), out=power[1:])
        energy = np.maximum(power[length : length + hop] - power[:hop], self._energy_floor)

        # shift the history and append this block; scores stay squared (no square roots
        # over the whole block), which ranks and thresholds the same
        self._squared_scores[: 2 * guard] = self._squared_scores[hop:]
        self._correlations[:, : 2 * guard] = self._correlations[:, hop:]
        current = self._correlations[:, 2 * guard :]
        current[:] = correlations[:, :hop]
        self._squared_scores[2 * guard :] = np.maximum(
            np.square(current[0]), np.square(current[1])
        ) / energy.astype(np.float32)

        # decide the starts whose whole +/- guard neighbourhood is now scored
        origin = self._start - 2 * guard
        scores = self._squared_scores
        detections = []
        for index in np.flatnonzero(scores[guard : guard + hop] >= self.threshold**2) + guard:
            score = scores[index]
            if score <= scores[index - guard : index].max():
                continue
            if score < scores[index + 1 : index + guard + 1].max():
                continue
            detections.append(self._detection(origin, int(index), float(np.sqrt(score))))

        # keep the samples of starts not yet scored
        samples[: length - 1] = samples[hop:]
        self._filled = length - 1
        self._start += hop
        return detections

    def _detection(self, origin: int, index: int, score: float) -> Detection:
        """Describe the peak at history `index`, whose position is `origin` + index."""
        up, down = self._correlations[:, index]
        direction = 0 if abs(up) >= abs(down) else 1
        peak = self._correlations[direction, index - 1 : index + 2].astype(np.float64)
        inverted = peak[1] < 0
        if inverted:
            peak = -peak
        # parabola through the peak and its neighbours for a sub-sample start
        curvature = peak[0] - 2 * peak[1] + peak[2]
        shift = float(0.5 * (peak[0] - peak[2]) / curvature) if curvature < 0 else 0.0
        return Detection(
            position=origin + index + min(max(shift, -0.5), 0.5),
            symbol=direction | (2 if inverted else 0),
            score=min(score, 1.0),
        )
