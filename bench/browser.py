"""Headless Chromium as the reference WebRTC client: its fake media, its page, its launch.

Chromium reads fake capture from files written here with the probe's own content (the
marker video loop as .y4m, the chirped audio loop as .wav). bench/page.html holds N WHIP
calls and POSTs its state to the `PageServer` every second; `--dump-dom` would return
before any call connected.
"""

from __future__ import annotations

import asyncio
import contextlib
import wave
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from aiohttp import web
from benchkit import start_logged

from probes import markers, media

PAGE = Path(__file__).resolve().parent / "page.html"
CHROMIUM = "/usr/bin/chromium"
# From /work/shared/reference/targets.md, plus --allow-loopback-in-peer-connection so
# Chromium offers 127.0.0.1 candidates as the reflector does. It still prefers the pair
# from its eth0 address (higher priority) to 127.0.0.1: both stay inside this host.
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-default-browser-check",
    "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,OptimizationHints,Translate",
    "--use-fake-device-for-media-stream",
    "--use-fake-ui-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection",
)


@dataclass(frozen=True)
class FakeMedia:
    video: Path
    audio: Path


def write_fake_media(directory: Path) -> FakeMedia:
    """Write the probe's own media as Chromium fake-capture files (.y4m and .wav)."""
    video = directory / "markers.y4m"
    with video.open("wb") as out:
        header = f"YUV4MPEG2 W{markers.WIDTH} H{markers.HEIGHT} F{media.FPS}:1 Ip A1:1 C420jpeg"
        out.write(header.encode() + b"\n")
        for number in range(media.LOOP_FRAMES):
            out.write(b"FRAME\n")
            out.write(markers.draw_frame(number).tobytes())
    audio = directory / "chirps.wav"
    seconds = media.AUDIO_LOOP_PACKETS * media.PACKET_SAMPLES / media.AUDIO_RATE
    signal_ = markers.audio_signal(
        seconds,
        rate=media.AUDIO_RATE,
        period_s=media.CHIRP_PERIOD_S,
        offset_s=media.CHIRP_OFFSET_S,
    )
    pcm = np.clip(signal_ * 32767, -32768, 32767).astype("<i2")
    with wave.open(str(audio), "wb") as out_wave:
        out_wave.setnchannels(1)
        out_wave.setsampwidth(2)
        out_wave.setframerate(media.AUDIO_RATE)
        out_wave.writeframes(pcm.tobytes())
    return FakeMedia(video=video, audio=audio)


PageStatus = dict[str, Any]
"What a Chromium page last POSTed."


class PageServer:
    """Serve bench/page.html and keep the latest status each page run POSTs back."""

    def __init__(self) -> None:
        self.base = ""
        self.latest: dict[str, PageStatus] = {}
        self._changed = asyncio.Condition()

    def app(self) -> web.Application:
        """Build the aiohttp application."""
        app = web.Application()
        app.router.add_get("/page.html", self._page)
        app.router.add_post("/status/{run}", self._status)
        return app

    async def _page(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(PAGE)

    async def _status(self, request: web.Request) -> web.Response:
        status: PageStatus = await request.json()
        async with self._changed:
            self.latest[request.match_info["run"]] = status
            self._changed.notify_all()
        return web.Response(text="ok\n")

    async def wait(
        self, run: str, predicate: Callable[[PageStatus], bool], timeout_s: float
    ) -> PageStatus:
        """Wait until the run's latest status satisfies `predicate`; return that status."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: run in self.latest and predicate(self.latest[run]))
            return self.latest[run]


@contextlib.asynccontextmanager
async def page_server(host: str) -> AsyncIterator[PageServer]:
    """Serve the Chromium page on a free port of `host` until the block exits."""
    server = PageServer()
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, 0)
        await site.start()
        server.base = f"http://{host}:{runner.addresses[0][1]}"
        yield server
    finally:
        await runner.cleanup()


def flowing(status: PageStatus, calls: int) -> bool:
    """Tell whether all of a page's calls are connected and decode audio and video."""
    rows = status.get("inbound", [])
    return (
        status.get("connected", 0) >= calls
        and len(rows) == calls
        and all(r["frames_decoded"] > 0 and r["audio_samples"] > 0 for r in rows)
    )


def flow_rates(before: PageStatus, after: PageStatus) -> tuple[float, dict[str, list[float]]]:
    """Return the time between two page statuses and each call's receive rates over it."""
    elapsed = after["t"] - before["t"]
    rates: dict[str, list[float]] = {
        "video_fps": [],
        "video_packets_per_s": [],
        "audio_packets_per_s": [],
        "audio_samples_per_s": [],
    }
    if elapsed <= 0:
        return elapsed, rates
    for a, b in zip(before["inbound"], after["inbound"], strict=False):
        rates["video_fps"].append((b["frames_decoded"] - a["frames_decoded"]) / elapsed)
        rates["video_packets_per_s"].append((b["video_packets"] - a["video_packets"]) / elapsed)
        rates["audio_packets_per_s"].append((b["audio_packets"] - a["audio_packets"]) / elapsed)
        rates["audio_samples_per_s"].append((b["audio_samples"] - a["audio_samples"]) / elapsed)
    return elapsed, rates


async def launch(url: str, profile: Path, fake: FakeMedia, log: Path) -> asyncio.subprocess.Process:
    """Start headless Chromium on `url` with a fresh profile and the fake media files."""
    argv = [
        CHROMIUM,
        *FLAGS,
        f"--user-data-dir={profile}",
        f"--use-file-for-fake-video-capture={fake.video}",
        f"--use-file-for-fake-audio-capture={fake.audio}",
        url,
    ]
    # Its own session: Ctrl-C reaches only the bench, which stops the whole tree itself.
    return await start_logged(argv, log)
