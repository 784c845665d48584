"""Event-loop lag watch: the probe's own overload must not pass for network trouble.

A task asks to wake every INTERVAL_S and records how late it woke. A late loop delays
every packet arrival it timestamps, which reads as jitter, gaps or freezes; seconds in
which the lag crossed the limit are marked unreliable.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

INTERVAL_S = 0.05


class LoopLag:
    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._window_max = 0.0
        self.max = 0.0

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(INTERVAL_S)
            lag = max(0.0, time.monotonic() - before - INTERVAL_S)
            self._window_max = max(self._window_max, lag)
            self.max = max(self.max, lag)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def take_window(self) -> float:
        """Return the largest lag since the last call."""
        lag, self._window_max = self._window_max, 0.0
        return lag
