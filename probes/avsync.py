"""A/V offset from the round trips of aligned content (ITU-R BT.1359 sign).

Each chirp's round trip is compared with the round trips of the video frames sent within
WINDOW_S of it: offset = video delay - audio delay, positive when audio arrives ahead of
video. Pairing waits until those frames have had time to arrive.
"""

from __future__ import annotations

from collections import deque

from probes.measures import median

WINDOW_S = 0.25
TIMEOUT_S = 2.0


class AvSync:
    def __init__(self) -> None:
        self._video: deque[tuple[float, float]] = deque(maxlen=15 * 20)
        self._pending: deque[tuple[float, float, float]] = deque(maxlen=30)

    def video(self, sent_at: float, delay: float) -> None:
        self._video.append((sent_at, delay))

    def audio(self, sent_instant: float, delay: float, now: float) -> None:
        self._pending.append((sent_instant, delay, now))

    def resolve(self, now: float) -> list[float]:
        """Return offsets for the chirps whose video neighbours are in (or timed out)."""
        offsets: list[float] = []
        newest = self._video[-1][0] if self._video else float("-inf")
        while self._pending:
            instant, audio_delay, found_at = self._pending[0]
            if newest < instant + WINDOW_S and now - found_at < TIMEOUT_S:
                break
            self._pending.popleft()
            near = [d for s, d in self._video if abs(s - instant) <= WINDOW_S]
            video_delay = median(near)
            if video_delay is not None:
                offsets.append(video_delay - audio_delay)
        return offsets
