"""Hold N concurrent probe calls in one process, so bench/probe.py can measure it from outside.

    python bench/hold.py --url http://127.0.0.1:PORT/whip --calls N --duration S

Every call runs `probes.call.run_call` in this one event loop with loopback ICE. Prints
one JSON line `{"event": "ready", ...}` as soon as every call holds media (or has ended),
which is when the measuring process may start its steady window, and one JSON line
`{"event": "done", "calls": [...]}` with each call's status at the end. Exits 0 when
every call was ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence

from callmon.callresult import CallResult, Signaling, Status
from probes.call import CallOptions, Progress, run_call
from probes.ice import IceOptions
from probes.media import shared_loops


def _emit(event: str, **fields: object) -> None:
    """Print one JSON line; flush, since the reader waits on it."""
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def _call_record(result: CallResult) -> dict[str, object]:
    """Return the few numbers of a call that tell whether it really flowed."""
    summary = result.summary
    return {
        "status": str(result.status),
        "failure": None if result.failure is None else result.failure.reason,
        "connect_s": result.phases.connect_s,
        "media_s": summary.media_s,
        "video_fps": summary.video.fps,
        "video_frames": summary.video.frames,
        "audio_packets": summary.audio.packets,
        "audio_loss": summary.audio.loss,
        "video_loss": summary.video.loss,
        "unreliable_s": summary.unreliable_s,
        "loop_lag_max_s": summary.loop_lag_max_s,
        "session": result.target.session,
    }


async def hold(url: str, calls: int, duration_s: float, host: str) -> list[CallResult]:
    """Run `calls` concurrent calls of `duration_s`; announce when all of them hold media."""
    # Encode the media loops before any call starts, so no call's connect waits for it.
    shared_loops()
    options = CallOptions(
        url=url,
        signaling=Signaling.WHIP,
        duration_s=duration_s,
        ice=IceOptions(hosts=(host,)),
    )
    settled: set[int] = set()

    def settle(index: int) -> None:
        before = len(settled)
        settled.add(index)
        if len(settled) == calls and before < calls:
            _emit("ready", calls=calls)

    def on_progress(index: int) -> Callable[[Progress], None]:
        def note(progress: Progress) -> None:
            if progress.phase == "holding":
                settle(index)

        return note

    async def one(index: int) -> CallResult:
        try:
            return await run_call(options, on_progress(index))
        finally:
            settle(index)

    return list(await asyncio.gather(*(one(i) for i in range(calls))))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, hold the calls, print the closing JSON line."""
    parser = argparse.ArgumentParser(description="Hold N concurrent probe calls in one process.")
    parser.add_argument("--url", required=True, help="WHIP endpoint of the reflector")
    parser.add_argument("--calls", type=int, default=1, help="concurrent calls")
    parser.add_argument("--duration", type=float, default=30.0, metavar="S", help="media held")
    parser.add_argument("--host", default="127.0.0.1", help="the only ICE host candidate")
    args = parser.parse_args(argv)
    if args.calls < 1 or args.duration <= 0:
        parser.error("--calls and --duration must be positive")
    results = asyncio.run(hold(args.url, args.calls, args.duration, args.host))
    _emit("done", calls=[_call_record(r) for r in results])
    return 0 if all(r.status is Status.OK for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
