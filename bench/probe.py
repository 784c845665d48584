"""Benchmark callmon's probe: accuracy, connect phases, and CPU/memory next to Chromium.

    python bench/probe.py [--quick] [--out bench/results/probe.json]

1. Accuracy: calls through a local `callmon reflector` that injects one fault each; the
   probe's numbers against what was injected and against the reflector's own record.
2. Connect phases: milestones of calls to the reflector and to Janus's EchoTest (run in a
   network namespace by tests/targets.py); medians and min-max; the probe's
   self-overhead to first decoded media.
3. Resources: CPU and memory per concurrent call of the probe (bench/hold.py, a separate
   process) and of headless Chromium (bench/browser.py and bench/page.html: one page, N
   peer connections, fake capture from files with the probe's own media), read from /proc
   (bench/proctree.py) over a steady window, one side after the other in the same run.
   CPU is utime+stime over the whole window (10 ms ticks make single seconds too coarse);
   memory is the median of 1 s PSS samples of the whole process tree.

Prints tables and writes every number to one JSON file. Starts everything it needs and
stops it on exit, also on Ctrl-C, SIGTERM or failure. Needs root (Janus's namespace) and
/usr/bin/chromium. Exits 1 when a goal is missed, 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

# bench/ itself is first on sys.path when run as a script: its sibling modules.
import benchkit
import browser
from benchkit import LOOPBACK, fmt, median, ms, ratio, spread, table, verdict
from proctree import (
    SAMPLE_INTERVAL_S,
    Usage,
    Watched,
    Window,
    measure_window,
    stop_process,
    stop_tree,
)

from callmon.callresult import CallResult, Phases, Signaling, Status
from probes.call import CallOptions, run_call
from probes.ice import IceOptions

ROOT = Path(__file__).resolve().parent.parent
# tests/targets.py runs Janus in a namespace; tests/ is not an installed package. Under
# `mypy bench` alone tests/ is not on mypy's path (under plain `mypy` it is).
sys.path.insert(0, str(ROOT / "tests"))
from targets import (  # type: ignore[import-not-found, unused-ignore]  # noqa: E402
    janus_in_namespace,
    log_tail,
)

BENCH = Path(__file__).resolve().parent
HOLD = BENCH / "hold.py"
DEFAULT_OUT = BENCH / "results" / "probe.json"
LOOPBACK_ICE = IceOptions(hosts=(LOOPBACK,))

REFLECTOR_MAX_CALLS = 30
STARTUP_TIMEOUT_S = 15.0
# Calls announce they hold media one second into it; the steady window starts this many
# seconds into media and ends this long before the hang-up.
STEADY_FROM_S = 5.0
STEADY_TAIL_S = 3.0
FLOWING_TIMEOUT_S = 45.0

GOAL_SELF_CONNECT_S = 0.100
GOAL_CORES_PER_CALL = 0.05
GOAL_MEMORY_RATIO = 3.0

PHASE_NAMES = tuple(f.name for f in dataclasses.fields(Phases))


@dataclass(frozen=True)
class Settings:
    quick: bool
    accuracy_calls: int
    "Calls per impairment."
    connect_calls: int
    "Calls per target for the connect phases."
    hold_s: float
    "Media held per concurrency step, each side."
    concurrency: tuple[int, ...]
    sections: tuple[str, ...]
    out: Path
    keep_workdir: bool


SECTIONS = ("accuracy", "connect", "resources")


def parse_settings(argv: Sequence[str] | None) -> Settings:
    """Turn the command line into settings; --quick shrinks counts and durations."""
    parser = benchkit.argument_parser(
        "Benchmark callmon's probe: accuracy, connect phases, CPU and memory.",
        "1 call per case, 12 s holds",
        DEFAULT_OUT,
    )
    benchkit.add_subset(parser, "--sections", SECTIONS)
    parser.add_argument("--calls", type=int, help="accuracy calls per impairment (3; quick 1)")
    parser.add_argument("--connect-calls", type=int, help="calls per target (10; quick 3)")
    parser.add_argument("--hold", type=float, metavar="S", help="resource hold (30; quick 12)")
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep logs, media files and profiles"
    )
    args = parser.parse_args(argv)
    sections = benchkit.subset(parser, args.sections, SECTIONS, "section")
    hold_s = args.hold or (12.0 if args.quick else 30.0)
    if hold_s < STEADY_FROM_S + STEADY_TAIL_S + 2:
        parser.error(f"--hold must be at least {STEADY_FROM_S + STEADY_TAIL_S + 2:g} s")
    return Settings(
        quick=args.quick,
        accuracy_calls=args.calls or (1 if args.quick else 3),
        connect_calls=args.connect_calls or (3 if args.quick else 10),
        hold_s=hold_s,
        concurrency=(1, 5, 10),
        sections=sections,
        out=args.out,
        keep_workdir=args.keep_workdir,
    )


# --- small helpers ------------------------------------------------------------------------


async def get_json(url: str) -> dict[str, Any]:
    """Fetch `url` and return its JSON object."""
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.get(url) as response:
        response.raise_for_status()
        data: dict[str, Any] = await response.json()
        return data


# --- the reflector --------------------------------------------------------------------------


@dataclass(frozen=True)
class ReflectorProcess:
    url: str
    "WHIP endpoint."
    pid: int
    log: Path


@contextlib.asynccontextmanager
async def reflector_process(workdir: Path, name: str) -> AsyncIterator[ReflectorProcess]:
    """Run `callmon reflector` on loopback as a user would; stop it on exit."""
    port = benchkit.free_port()
    log = workdir / f"reflector-{name}.log"
    argv = [sys.executable, "-m", "callmon.cli", "reflector", "--listen", f"{LOOPBACK}:{port}"]
    argv += ["--ice-host", LOOPBACK, "--max-calls", str(REFLECTOR_MAX_CALLS)]
    process = await benchkit.start_logged(argv, log)
    base = f"http://{LOOPBACK}:{port}"

    async def healthy() -> bool:
        try:
            await get_json(base + "/healthz")
        except (aiohttp.ClientError, OSError):
            return False
        return True

    try:
        if await benchkit.wait_ready(process, healthy, STARTUP_TIMEOUT_S, 0.05) is None:
            raise RuntimeError(f"reflector did not start:\n{log_tail(log)}")
        yield ReflectorProcess(url=base + "/whip", pid=process.pid, log=log)
    finally:
        await stop_process(process)


# --- 1. accuracy -------------------------------------------------------------------------------

Bound = tuple[float, float]
"Allowed range of measured - reference."


def within(tolerance: float) -> Bound:
    """Return a symmetric bound."""
    return (-tolerance, tolerance)


EXACT: Bound = (0.0, 0.0)


@dataclass(frozen=True)
class Check:
    metric: str
    "Path under result.summary."
    measured: float | None
    injected: float | None = None
    "What the impairment should produce."
    truth: float | None = None
    "What the reflector reports it did."
    vs_injected: Bound | None = None
    "Bound on measured - injected (from tests/test_accuracy.py); None: not judged."
    vs_truth: Bound | None = None
    "Bound on measured - truth; None: not judged."
    vs_truth_relative: float | None = None
    "Bound on |measured - truth| as a fraction of truth; None: not judged."

    @staticmethod
    def _error(measured: float | None, reference: float | None) -> float | None:
        return None if measured is None or reference is None else measured - reference

    @property
    def error_injected(self) -> float | None:
        return self._error(self.measured, self.injected)

    @property
    def error_truth(self) -> float | None:
        return self._error(self.measured, self.truth)

    @property
    def ok(self) -> bool:
        """Tell whether every bound given holds (a missing value fails its bound)."""
        for bound, error in (
            (self.vs_injected, self.error_injected),
            (self.vs_truth, self.error_truth),
        ):
            # The 1e-9 absorbs float noise in values the result rounds to microseconds.
            if bound is not None and (
                error is None or not bound[0] - 1e-9 <= error <= bound[1] + 1e-9
            ):
                return False
        if self.vs_truth_relative is not None:
            error = self.error_truth
            if error is None or self.truth is None:
                return False
            return abs(error) <= self.vs_truth_relative * abs(self.truth)
        return True

    def as_dict(self) -> dict[str, Any]:
        """Return the check with its errors and verdict."""
        return {
            **dataclasses.asdict(self),
            "error_injected": self.error_injected,
            "error_truth": self.error_truth,
            "ok": self.ok,
        }


Applied = dict[str, Any]
CheckFn = Callable[[CallResult, Applied], list[Check]]


def _get(applied: Applied, *path: str) -> Any:
    """Return applied[path[0]][path[1]]..., or None where the record has no such entry."""
    value: Any = applied
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _difference(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def clean_checks(result: CallResult, applied: Applied) -> list[Check]:
    """Check that a call with nothing injected reports nothing."""
    s = result.summary
    return [
        Check("av_offset_s", s.av_offset_s, injected=0.0, vs_injected=within(0.010)),
        Check("audio.loss", s.audio.loss, injected=0.0, vs_injected=EXACT),
        Check("video.loss", s.video.loss, injected=0.0, vs_injected=EXACT),
        Check("video.freezes", s.video.freezes, injected=0, vs_injected=EXACT),
        Check("video.gaps", s.video.gaps, injected=0, vs_injected=EXACT),
        Check("audio.gaps", s.audio.gaps, injected=0, vs_injected=EXACT),
    ]


def delay_checks(kind: str) -> CheckFn:
    """Check the A/V offset and the delayed medium's round trip for a 150 ms delay."""
    expected = -0.150 if kind == "audio" else 0.150

    def checks(result: CallResult, applied: Applied) -> list[Check]:
        s = result.summary
        # BT.1359 sign: audio ahead is positive, so the offset is video's delay minus audio's.
        truth = _difference(
            _get(applied, "video", "delay_mean_s"), _get(applied, "audio", "delay_mean_s")
        )
        return [
            Check(
                "av_offset_s",
                s.av_offset_s,
                injected=expected,
                truth=truth,
                vs_injected=within(0.010),
                vs_truth=within(0.010),
            ),
            Check(
                f"{kind}.delay_s",
                getattr(s, kind).delay_s,
                injected=0.150,
                truth=_get(applied, kind, "delay_mean_s"),
                vs_injected=within(0.010),
            ),
        ]

    return checks


def video_blackout_checks(result: CallResult, applied: Applied) -> list[Check]:
    """Check that a 0.8 s video blackout is one freeze of the interval really left."""
    s = result.summary
    return [
        Check("video.freezes", s.video.freezes, injected=1, vs_injected=EXACT),
        Check(
            "video.freeze_s",
            s.video.freeze_s,
            injected=0.8,
            truth=_get(applied, "video", "blackout", "interval_s"),
            vs_injected=within(0.1),
            vs_truth=within(0.02),
        ),
        Check("audio.gaps", s.audio.gaps, injected=0, vs_injected=EXACT),
    ]


def audio_blackout_checks(result: CallResult, applied: Applied) -> list[Check]:
    """Check that a 0.8 s audio blackout is one gap: the packet interval less 20 ms."""
    s = result.summary
    interval = _get(applied, "audio", "blackout", "interval_s")
    return [
        Check("audio.gaps", s.audio.gaps, injected=1, vs_injected=EXACT),
        Check(
            "audio.gap_s",
            s.audio.gap_s,
            injected=0.8,
            truth=None if interval is None else interval - 0.020,
            vs_injected=within(0.1),
            vs_truth=within(0.01),
        ),
        Check("video.freezes", s.video.freezes, injected=0, vs_injected=EXACT),
    ]


def loss_checks(result: CallResult, applied: Applied) -> list[Check]:
    """Check loss per medium against 5 % and against the packets the reflector dropped."""
    found: list[Check] = []
    for kind in ("audio", "video"):
        m = getattr(result.summary, kind)
        sent = _get(applied, kind, "packets_sent")
        dropped = _get(applied, kind, "packets_dropped")
        found += [
            Check(
                f"{kind}.loss",
                m.loss,
                injected=0.05,
                truth=ratio(dropped, sent),
                vs_injected=within(0.015),
            ),
            # Packets dropped after the last one that arrived are invisible to any receiver.
            Check(f"{kind}.lost", m.lost, truth=dropped, vs_truth=(-3.0, 0.0)),
            Check(f"{kind}.expected", m.expected, truth=sent, vs_truth=within(5.0)),
        ]
    return found


def jitter_checks(result: CallResult, applied: Applied) -> list[Check]:
    """Check RFC 3550 jitter per medium against the reflector's over its applied delays."""
    found: list[Check] = []
    for kind in ("audio", "video"):
        truth = _get(applied, kind, "rfc3550_jitter_s")
        found.append(
            Check(
                f"{kind}.jitter_s",
                getattr(result.summary, kind).jitter_s,
                # E|d1 - d2| of two uniform 0-40 ms delays; keeping order lowers it a little.
                injected=0.040 / 3,
                truth=truth,
                vs_truth_relative=0.25,
            )
        )
    s = result.summary
    found.append(Check("video.freezes", s.video.freezes, injected=0, vs_injected=EXACT))
    found.append(Check("audio.gaps", s.audio.gaps, injected=0, vs_injected=EXACT))
    return found


@dataclass(frozen=True)
class Case:
    name: str
    query: str
    duration_s: float
    checks: CheckFn


CASES = (
    Case("clean", "", 8.0, clean_checks),
    Case("audio_delay_ms=150", "audio_delay_ms=150", 6.0, delay_checks("audio")),
    Case("video_delay_ms=150", "video_delay_ms=150", 6.0, delay_checks("video")),
    Case("video_blackout=3:0.8", "video_blackout=3:0.8", 7.0, video_blackout_checks),
    Case("audio_blackout=3:0.8", "audio_blackout=3:0.8", 7.0, audio_blackout_checks),
    Case("loss=0.05", "loss=0.05", 20.0, loss_checks),
    Case("jitter_ms=40", "jitter_ms=40", 10.0, jitter_checks),
)


async def accuracy_call(reflector: ReflectorProcess, case: Case, seed: int) -> dict[str, Any]:
    """Hold one impaired call and compare its numbers with injection and truth."""
    query = "&".join(q for q in (case.query, f"seed={seed}") if q)
    result = await run_call(
        CallOptions(url=f"{reflector.url}?{query}", duration_s=case.duration_s, ice=LOOPBACK_ICE)
    )
    record: dict[str, Any] = {}
    truth_error = None
    if result.target.session:
        try:
            record = await get_json(result.target.session)
        except (aiohttp.ClientError, OSError) as exc:
            truth_error = f"GET {result.target.session}: {exc}"
    applied: Applied = record.get("applied", {})
    checks = case.checks(result, applied)
    plain = result.to_dict()
    return {
        "case": case.name,
        "seed": seed,
        "status": str(result.status),
        "failure": None if result.failure is None else result.failure.reason,
        "degradations": [d["metric"] for d in plain["degradations"]],
        "truth_error": truth_error,
        "checks": [c.as_dict() for c in checks],
        "applied": applied,
        "phases": plain["phases"],
        "summary": plain["summary"],
    }


def accuracy_rows(calls: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Aggregate per (case, metric) over calls: values, largest errors, passes."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for call in calls:
        for check in call["checks"]:
            row = rows.setdefault(
                (call["case"], check["metric"]),
                {
                    "case": call["case"],
                    "metric": check["metric"],
                    "injected": check["injected"],
                    "truth": [],
                    "measured": [],
                    "error_injected": [],
                    "error_truth": [],
                    "vs_injected": check["vs_injected"],
                    "vs_truth": check["vs_truth"],
                    "vs_truth_relative": check["vs_truth_relative"],
                    "passed": 0,
                    "calls": 0,
                },
            )
            row["calls"] += 1
            row["passed"] += bool(check["ok"])
            for key in ("truth", "measured", "error_injected", "error_truth"):
                if check[key] is not None:
                    row[key].append(check[key])
    return list(rows.values())


def _worst(errors: Sequence[float]) -> float | None:
    return max(errors, key=abs) if errors else None


def _bound(bound: Sequence[float] | None) -> str:
    if bound is None:
        return "-"
    low, high = bound
    if low == -high:
        return "0" if high == 0 else f"±{high:g}"
    return f"{low:g}..{high:g}"


def print_accuracy(section: Mapping[str, Any]) -> None:
    """Print the accuracy matrix: one row per impairment and metric."""
    rows = []
    for row in section["rows"]:
        measured = row["measured"]
        rows.append(
            [
                row["case"],
                row["metric"],
                fmt(row["injected"], 4),
                fmt(median(row["truth"]), 4),
                fmt(median(measured), 4),
                f"{fmt(min(measured, default=None), 4)}..{fmt(max(measured, default=None), 4)}",
                fmt(_worst(row["error_injected"]), 4),
                _bound(row["vs_injected"]),
                fmt(_worst(row["error_truth"]), 4),
                (
                    f"±{row['vs_truth_relative']:.0%}"
                    if row["vs_truth_relative"] is not None
                    else _bound(row["vs_truth"])
                ),
                f"{row['passed']}/{row['calls']}",
            ]
        )
    print(
        table(
            f"1. Accuracy: {section['calls_per_case']} call(s) per impairment "
            "(seconds, fractions, counts; truth = reflector's record; worst = largest |error|)",
            [
                "impairment",
                "metric",
                "injected",
                "truth",
                "measured",
                "min..max",
                "worst err inj",
                "bound",
                "worst err truth",
                "bound",
                "pass",
            ],
            rows,
        )
    )
    for call in section["calls"]:
        if call["failure"] or call["truth_error"]:
            print(
                f"  ! {call['case']} seed {call['seed']}: {call['status']} "
                f"{call['failure'] or ''} {call['truth_error'] or ''}"
            )


async def accuracy(settings: Settings, reflector: ReflectorProcess) -> dict[str, Any]:
    """Measure section 1: every impairment, `accuracy_calls` calls each, one seed per call."""
    calls: list[dict[str, Any]] = []
    seed = 0
    for case in CASES:
        for _ in range(settings.accuracy_calls):
            seed += 1
            print(f"  accuracy: {case.name} (seed {seed}, {case.duration_s:g} s)", flush=True)
            calls.append(await accuracy_call(reflector, case, seed))
    rows = accuracy_rows(calls)
    section = {
        "calls_per_case": settings.accuracy_calls,
        "rows": rows,
        "checks_passed": sum(r["passed"] for r in rows),
        "checks": sum(r["calls"] for r in rows),
        "calls": calls,
    }
    print_accuracy(section)
    return section


# --- 2. connect phases -------------------------------------------------------------------------


def phase_stats(results: Sequence[CallResult]) -> dict[str, Any]:
    """Return median/min/max of each phase, and first frame minus first packet per medium."""
    stats: dict[str, Any] = {}
    for name in PHASE_NAMES:
        values = [v for r in results if (v := getattr(r.phases, name)) is not None]
        stats[name] = spread(values)
    for kind in ("audio", "video"):
        values = [
            frame - rtp
            for r in results
            if (frame := getattr(r.phases, f"first_frame_{kind}_s")) is not None
            and (rtp := getattr(r.phases, f"first_rtp_{kind}_s")) is not None
        ]
        stats[f"frame_after_rtp_{kind}_s"] = spread(values)
    return stats


def _call_brief(result: CallResult) -> dict[str, Any]:
    return {
        "status": str(result.status),
        "failure": None if result.failure is None else result.failure.reason,
        "phases": result.to_dict()["phases"],
    }


async def connect_calls(
    count: int, url: str, ice: IceOptions, signaling: Signaling, label: str
) -> list[CallResult]:
    """Hold `count` short calls one after the other."""
    results = []
    for i in range(count):
        print(f"  connect: {label} call {i + 1}/{count}", flush=True)
        results.append(
            await run_call(CallOptions(url=url, signaling=signaling, duration_s=1.0, ice=ice))
        )
    return results


def print_connect(section: Mapping[str, Any]) -> None:
    """Print the phase medians of both targets and the self-overhead goal."""
    targets = section["targets"]
    names = [*PHASE_NAMES, "frame_after_rtp_audio_s", "frame_after_rtp_video_s"]
    rows = []
    for name in names:
        row = [name]
        for target in targets.values():
            s = target["phases"][name]
            row += [ms(s["median"]), f"{ms(s['min'])}-{ms(s['max'])}"]
        rows.append(row)
    headers = ["phase (ms from call start)"]
    for label, target in targets.items():
        headers += [f"{label} median", f"{label} min-max (ok {target['ok']}/{target['calls']})"]
    print(table(f"2. Connect phases, {section['calls']} calls per target", headers, rows))
    goal = section["self_overhead"]
    print(
        f"  self-overhead to first decoded media (reflector, median connect_s): "
        f"{ms(goal['connect_s'])} ms, goal <= {ms(GOAL_SELF_CONNECT_S)} ms: "
        f"{verdict(goal['ok'])}; first frame - first RTP: audio "
        f"{ms(goal['frame_after_rtp_audio_s'])} ms, video {ms(goal['frame_after_rtp_video_s'])} ms"
    )
    for label, target in targets.items():
        for call in target["results"]:
            if call["failure"]:
                print(f"  ! {label}: {call['failure']}")


async def connect(settings: Settings, reflector: ReflectorProcess) -> dict[str, Any]:
    """Measure section 2: connect milestones against the reflector and Janus EchoTest."""
    n = settings.connect_calls
    results = {
        "reflector": await connect_calls(
            n, reflector.url, LOOPBACK_ICE, Signaling.WHIP, "reflector"
        )
    }
    janus_log = janus_error = None
    try:
        async with janus_in_namespace() as janus:
            # Janus offers no loopback candidate: the probe reaches it over the veth pair.
            ice = IceOptions(hosts=(janus.host_address,))
            results["janus"] = await connect_calls(n, janus.url, ice, Signaling.JANUS, "janus")
            if any(r.status is Status.FAILED for r in results["janus"]):
                janus_log = log_tail(janus.log_path)
    except RuntimeError as exc:  # Janus would not start: keep the reflector's numbers
        janus_error = str(exc)
        print(f"  ! janus: {exc}", flush=True)
    targets: dict[str, dict[str, Any]] = {
        label: {
            "calls": len(rs),
            "ok": sum(r.status is Status.OK for r in rs),
            "phases": phase_stats(rs),
            "results": [_call_brief(r) for r in rs],
        }
        for label, rs in results.items()
    }
    own = targets["reflector"]["phases"]
    connect_s = own["connect_s"]["median"]
    section = {
        "calls": n,
        "targets": targets,
        "janus_error": janus_error,
        "janus_log_tail": janus_log,
        "self_overhead": {
            "connect_s": connect_s,
            "goal_s": GOAL_SELF_CONNECT_S,
            "ok": None if connect_s is None else connect_s <= GOAL_SELF_CONNECT_S,
            "frame_after_rtp_audio_s": own["frame_after_rtp_audio_s"]["median"],
            "frame_after_rtp_video_s": own["frame_after_rtp_video_s"]["median"],
        },
    }
    print_connect(section)
    return section


# --- 3. resources ------------------------------------------------------------------------------


def _window_rates(before: browser.PageStatus, after: browser.PageStatus) -> dict[str, Any]:
    elapsed, rates = browser.flow_rates(before, after)
    return {"elapsed_s": elapsed, **{name: spread(values) for name, values in rates.items()}}


def usage_summary(usage: Usage, calls: int, seconds: float) -> dict[str, Any]:
    """Return one tree's CPU and memory over a window, in total and per call.

    CPU is the utime+stime gained over the whole window over its wall time: with 10 ms
    ticks a single second reads +/- 0.01 core, so the window total is the precise figure
    (and CPU time is the process's own, hardly moved by neighbours). The median of the
    1 s samples is kept beside it; memory is the median of the samples.
    """
    cores = usage.cpu_s / seconds if seconds > 0 else None
    pss = median(usage.pss_mb)
    rss = median(usage.rss_mb)
    return {
        "cores": cores,
        "cores_per_call": ratio(cores, calls),
        "cores_median_1s": median(usage.cores),
        "system_share": ratio(usage.system_s, usage.cpu_s),
        "pss_mb_median": pss,
        "rss_mb_median": rss,
        "pss_mb_per_call": ratio(pss, calls),
        "rss_mb_per_call": ratio(rss, calls),
        "processes": max(usage.processes, default=0),
        "samples": len(usage.cores),
        "cores_samples": [round(c, 4) for c in usage.cores],
        "pss_mb_samples": [round(m, 2) for m in usage.pss_mb],
    }


def window_seconds(hold_s: float) -> float:
    """Return the steady window's length for a hold of `hold_s`."""
    return hold_s - STEADY_FROM_S - STEADY_TAIL_S


def usage_record(window: Window, calls: int) -> dict[str, Any]:
    """Summarise a window: each watched tree in total and per call, and the machine's load."""
    record: dict[str, Any] = {
        name: usage_summary(u, calls, window.seconds) for name, u in window.usage.items()
    }
    watched_s = sum(u.cpu_s for u in window.usage.values())
    record["window_s"] = window.seconds
    record["machine"] = {
        "all_processes_cores": window.all_processes_s / window.seconds,
        "steal_cores": window.steal_s / window.seconds,
        # What the rest of the shared machine ran meanwhile: noise to keep in mind.
        "others_cores": (window.all_processes_s - watched_s) / window.seconds,
    }
    return record


async def read_event(stream: asyncio.StreamReader, event: str) -> dict[str, Any]:
    """Read JSON lines from hold.py until one has `event`; raise at end of output."""
    while True:
        line = await stream.readline()
        if not line:
            raise RuntimeError(f"hold.py ended without a {event!r} line")
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if isinstance(data, dict) and data.get("event") == event:
                return data


async def probe_side(
    calls: int, settings: Settings, reflector: ReflectorProcess, workdir: Path
) -> dict[str, Any]:
    """Run bench/hold.py with `calls` concurrent calls and measure it over the window."""
    log = workdir / f"hold-{calls}.log"
    with log.open("wb") as errors:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HOLD),
            "--url",
            reflector.url,
            "--calls",
            str(calls),
            "--duration",
            str(settings.hold_s),
            "--host",
            LOOPBACK,
            stdin=subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=errors,
            start_new_session=True,
        )
    try:
        assert process.stdout is not None
        try:
            await asyncio.wait_for(read_event(process.stdout, "ready"), FLOWING_TIMEOUT_S)
        except (TimeoutError, RuntimeError) as exc:
            raise RuntimeError(f"probe calls did not start: {exc!r}\n{log_tail(log)}") from None
        await asyncio.sleep(STEADY_FROM_S - 1.0)  # "ready" comes one second into media
        window = await measure_window(
            [
                Watched("side", process.pid, descendants=True),
                Watched("reflector", reflector.pid, descendants=True),
                Watched("bench", os.getpid(), descendants=False),
            ],
            window_seconds(settings.hold_s),
        )
        done = await asyncio.wait_for(read_event(process.stdout, "done"), settings.hold_s + 30)
        await process.wait()
    finally:
        await stop_process(process)
    statuses = [c["status"] for c in done["calls"]]
    fps = [c["video_fps"] for c in done["calls"] if c["video_fps"] is not None]
    return {
        **usage_record(window, calls),
        "flow": {
            "statuses": statuses,
            "ok": statuses.count("ok"),
            "flowed": len(statuses) - statuses.count("failed"),
            "failures": [c["failure"] for c in done["calls"] if c["failure"]],
            "video_fps": spread(fps),
            "unreliable_s": [c["unreliable_s"] for c in done["calls"]],
            "loop_lag_max_s": max(c["loop_lag_max_s"] for c in done["calls"]),
        },
        "calls": done["calls"],
    }


async def chromium_side(
    calls: int,
    settings: Settings,
    reflector: ReflectorProcess,
    pages: browser.PageServer,
    fake: browser.FakeMedia,
    workdir: Path,
) -> dict[str, Any]:
    """Run headless Chromium with one page of `calls` WHIP calls; measure its whole tree."""
    run = secrets.token_hex(4)
    profile = Path(tempfile.mkdtemp(prefix=f"chromium-{calls}-", dir=workdir))
    query = urllib.parse.urlencode(
        {"run": run, "whip": reflector.url, "calls": calls, "hold": settings.hold_s}
    )
    process = await browser.launch(
        f"{pages.base}/page.html?{query}", profile, fake, workdir / f"chromium-{calls}.log"
    )
    try:
        with contextlib.suppress(TimeoutError):
            await pages.wait(
                run, lambda s: browser.flowing(s, calls) or bool(s.get("done")), FLOWING_TIMEOUT_S
            )
        status = pages.latest.get(run, {})
        if not browser.flowing(status, calls):
            raise RuntimeError(
                f"Chromium's {calls} calls are not all flowing after {FLOWING_TIMEOUT_S:g} s: "
                f"connected {status.get('connected')}, errors {status.get('errors')}"
            )
        await asyncio.sleep(STEADY_FROM_S - 1.0)
        before = pages.latest[run]
        window = await measure_window(
            [
                Watched("side", process.pid, descendants=True),
                Watched("reflector", reflector.pid, descendants=True),
                Watched("bench", os.getpid(), descendants=False),
            ],
            window_seconds(settings.hold_s),
        )
        after = pages.latest[run]
        final = await pages.wait(run, lambda s: bool(s.get("done")), settings.hold_s + 30)
    finally:
        await stop_tree(process)
        if not settings.keep_workdir:
            shutil.rmtree(profile, ignore_errors=True)
    # The reflector's own count of what it echoed for each Chromium call.
    forwarded = []
    for location in final["locations"]:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            record = await get_json(location)
            forwarded.append(
                {
                    kind: _get(record, "applied", kind, "frames_forwarded")
                    for kind in ("audio", "video")
                }
                | {"ended_reason": record.get("ended_reason")}
            )
    return {
        **usage_record(window, calls),
        "flow": {
            "connected": after.get("connected"),
            "failed": final.get("failed"),
            "errors": final.get("errors"),
            "still_connected_at_window_end": browser.flowing(after, calls)
            and not after.get("done"),
            "window": _window_rates(before, after),
            "routes": sorted(set(after.get("routes", []))),
            "codecs": sorted({str(r.get("codec")) for r in after["inbound"]}),
            "reflector_forwarded": forwarded,
        },
    }


def print_resources(section: Mapping[str, Any]) -> None:
    """Print the per-call CPU and memory comparison, goals, and flow checks."""
    rows = []
    for step in section["steps"]:
        probe, chromium = step.get("probe", {}), step.get("chromium", {})
        p_side, c_side = probe.get("side", {}), chromium.get("side", {})
        rows.append(
            [
                str(step["calls"]),
                fmt(p_side.get("cores_per_call"), 4),
                fmt(c_side.get("cores_per_call"), 4),
                fmt(step["cpu_ratio"], 1),
                verdict(step["cpu_goal_ok"]),
                fmt(p_side.get("pss_mb_per_call"), 1),
                fmt(c_side.get("pss_mb_per_call"), 1),
                fmt(step["memory_ratio"], 1),
                verdict(step["memory_goal_ok"]),
                fmt(p_side.get("rss_mb_per_call"), 1),
                fmt(step["memory_ratio_vs_probe_rss"], 1),
                verdict(step["memory_goal_ok_vs_probe_rss"]),
                fmt(probe.get("reflector", {}).get("cores_per_call"), 4),
                fmt(chromium.get("reflector", {}).get("cores_per_call"), 4),
            ]
        )
    print(
        table(
            f"3. CPU and memory per concurrent call, {section['hold_s']:g} s holds, steady "
            f"window {section['window_s']:g} s (CPU over the window; MB = median PSS of "
            f"{SAMPLE_INTERVAL_S:g} s samples, RSS columns = the conservative comparison)",
            [
                "N",
                "probe cores/call",
                "chromium cores/call",
                "ratio",
                f"probe <= {GOAL_CORES_PER_CALL}",
                "probe MB/call",
                "chromium MB/call",
                "ratio",
                f">= {GOAL_MEMORY_RATIO:g}x",
                "probe RSS MB/call",
                "ratio",
                f">= {GOAL_MEMORY_RATIO:g}x",
                "reflector cores/call (probe)",
                "(chromium)",
            ],
            rows,
        )
    )
    rows = []
    for step in section["steps"]:
        for side in ("probe", "chromium"):
            run = step.get(side, {})
            if "error" in run:
                rows.append([f"{step['calls']} {side}", "ERROR: " + run["error"][:80]])
                continue
            s, m, flow = run["side"], run["machine"], run["flow"]
            if side == "probe":
                check = f"ok {flow['ok']}/{step['calls']}, fps {fmt(flow['video_fps']['min'], 1)}+"
            else:
                fps = flow["window"].get("video_fps", {})
                check = (
                    f"connected {flow['connected']}/{step['calls']}, fps "
                    f"{fmt(fps.get('min'), 1)}+, audio pkt/s "
                    f"{fmt(flow['window'].get('audio_packets_per_s', {}).get('min'), 0)}+"
                )
            rows.append(
                [
                    f"{step['calls']} {side}",
                    f"{fmt(s['cores'], 3)} ({fmt(s['cores_median_1s'], 3)})",
                    "-" if s["system_share"] is None else f"{s['system_share']:.0%}",
                    f"{fmt(s['pss_mb_median'], 1)} / {fmt(s['rss_mb_median'], 1)}",
                    str(s["processes"]),
                    fmt(run["reflector"]["cores"], 3),
                    fmt(m["all_processes_cores"], 2),
                    fmt(m["others_cores"], 3),
                    fmt(m["steal_cores"], 2),
                    check,
                ]
            )
    print(
        table(
            "   Totals per window and proof that media flowed",
            [
                "N side",
                "cores (median of 1 s)",
                "kernel",
                "PSS / RSS MB",
                "procs",
                "reflector cores",
                "all processes",
                "others",
                "steal",
                "flow",
            ],
            rows,
        )
    )
    marginal = section["marginal"]
    print(
        f"  marginal cost per added call (N={section['concurrency'][0]} -> "
        f"{section['concurrency'][-1]}): probe {fmt(marginal['probe_cores'], 4)} cores, "
        f"{fmt(marginal['probe_pss_mb'], 1)} MB; chromium {fmt(marginal['chromium_cores'], 4)} "
        f"cores, {fmt(marginal['chromium_pss_mb'], 1)} MB"
    )


def _marginal(steps: Sequence[Mapping[str, Any]], side: str, key: str) -> float | None:
    first, last = steps[0], steps[-1]
    a = first.get(side, {}).get("side", {}).get(key)
    b = last.get(side, {}).get("side", {}).get(key)
    if a is None or b is None or last["calls"] == first["calls"]:
        return None
    return float((b - a) / (last["calls"] - first["calls"]))


async def _side(side: Awaitable[dict[str, Any]], label: str) -> dict[str, Any]:
    """Run one side of a step; record its failure instead of ending the bench."""
    print(f"  resources: {label}", flush=True)
    try:
        return await side
    except (RuntimeError, TimeoutError, OSError, aiohttp.ClientError) as exc:
        print(f"  ! {label}: {exc}", flush=True)
        return {"error": f"{exc.__class__.__name__}: {exc}"}


def compare(calls: int, probe: Mapping[str, Any], chromium: Mapping[str, Any]) -> dict[str, Any]:
    """Put one concurrency step's two sides side by side, with ratios and goal verdicts.

    The probe's PSS splits the shared-library pages it shares with the reflector and the
    bench (the same Python, aiortc, PyAV, numpy), which flatters it; its RSS counts them
    whole. Chromium's tree is measured whole either way, so the ratio against the probe's
    RSS is the conservative one, and both are judged.
    """
    p = probe.get("side", {})
    c = chromium.get("side", {})
    cpu_ratio = ratio(c.get("cores_per_call"), p.get("cores_per_call"))
    memory_ratio = ratio(c.get("pss_mb_per_call"), p.get("pss_mb_per_call"))
    memory_ratio_rss = ratio(c.get("pss_mb_per_call"), p.get("rss_mb_per_call"))
    cores = p.get("cores_per_call")
    return {
        "calls": calls,
        "probe": probe,
        "chromium": chromium,
        "cpu_ratio": cpu_ratio,
        "memory_ratio": memory_ratio,
        "memory_ratio_vs_probe_rss": memory_ratio_rss,
        "cpu_goal_ok": None if cores is None else cores <= GOAL_CORES_PER_CALL,
        "memory_goal_ok": None if memory_ratio is None else memory_ratio >= GOAL_MEMORY_RATIO,
        "memory_goal_ok_vs_probe_rss": (
            None if memory_ratio_rss is None else memory_ratio_rss >= GOAL_MEMORY_RATIO
        ),
    }


async def resources(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Measure section 3: probe, then Chromium, for N = 1, 5, 10, all in this run."""
    steps: list[dict[str, Any]] = []
    fake = browser.write_fake_media(workdir)
    async with (
        reflector_process(workdir, "resources") as reflector,
        browser.page_server(LOOPBACK) as pages,
    ):
        for calls in settings.concurrency:
            probe = await _side(probe_side(calls, settings, reflector, workdir), f"probe x{calls}")
            chromium = await _side(
                chromium_side(calls, settings, reflector, pages, fake, workdir),
                f"chromium x{calls}",
            )
            steps.append(compare(calls, probe, chromium))
    section = {
        "hold_s": settings.hold_s,
        "window_s": window_seconds(settings.hold_s),
        "window_starts_s_into_media": STEADY_FROM_S,
        "concurrency": list(settings.concurrency),
        "goals": {"cores_per_call_max": GOAL_CORES_PER_CALL, "memory_ratio_min": GOAL_MEMORY_RATIO},
        "steps": steps,
        "marginal": {
            f"{side}_{name}": _marginal(steps, side, key)
            for side in ("probe", "chromium")
            for name, key in (("cores", "cores"), ("pss_mb", "pss_mb_median"))
        },
    }
    print_resources(section)
    return section


# --- the run ----------------------------------------------------------------------------------


def _command_output(*args: str) -> str | None:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def environment() -> dict[str, Any]:
    """Describe the machine and the versions under test."""
    return {
        "machine": benchkit.machine(),
        "versions": {
            **benchkit.versions(("callmon", "aiortc", "aioice", "av", "aiohttp")),
            "chromium": _command_output(browser.CHROMIUM, "--version"),
            "janus": _command_output("dpkg-query", "-W", "-f=${Version}", "janus"),
        },
    }


async def run(settings: Settings, report: dict[str, Any]) -> None:
    """Run the chosen sections in order, filling `report` as each finishes."""
    benchkit.cancel_on_sigterm()
    with benchkit.workdir("callmon-bench-", settings.keep_workdir) as workdir:
        if "accuracy" in settings.sections or "connect" in settings.sections:
            async with reflector_process(workdir, "calls") as reflector:
                if "accuracy" in settings.sections:
                    await benchkit.section(report, "accuracy", accuracy(settings, reflector))
                if "connect" in settings.sections:
                    await benchkit.section(report, "connect", connect(settings, reflector))
        if "resources" in settings.sections:
            await benchkit.section(report, "resources", resources(settings, workdir))


def goals(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Collect every goal with its value and verdict."""
    found: list[dict[str, Any]] = []
    failed = [name for name in SECTIONS if "error" in report.get(name, {})]
    for name in failed:
        found.append({"goal": f"section {name} ran", "value": report[name]["error"], "ok": False})
    if "accuracy" in report and "accuracy" not in failed:
        a = report["accuracy"]
        found.append(
            {
                "goal": "accuracy checks within the test bounds",
                "value": f"{a['checks_passed']}/{a['checks']}",
                "ok": a["checks_passed"] == a["checks"],
            }
        )
    if "connect" in report and "connect" not in failed:
        c = report["connect"]
        for label in ("reflector", "janus"):
            target = c["targets"].get(label)
            found.append(
                {
                    "goal": f"connect calls to {label} all ok",
                    "value": c.get(f"{label}_error")
                    or (target and f"{target['ok']}/{target['calls']}"),
                    "ok": target is not None and target["ok"] == target["calls"],
                }
            )
        s = c["self_overhead"]
        found.append(
            {
                "goal": f"median connect_s to the local reflector <= {GOAL_SELF_CONNECT_S} s",
                "value": s["connect_s"],
                "ok": s["ok"],
            }
        )
    for step in report.get("resources", {}).get("steps", []):
        probe, chromium = step["probe"], step["chromium"]
        found.append(
            {
                "goal": f"media flowed in all calls at N={step['calls']} (probe; Chromium)",
                "value": f"{probe.get('error') or probe['flow']['flowed']}; "
                f"{chromium.get('error') or chromium['flow']['connected']}",
                "ok": "error" not in probe
                and "error" not in chromium
                and probe["flow"]["flowed"] == step["calls"]
                and chromium["flow"]["still_connected_at_window_end"],
            }
        )
        found.append(
            {
                "goal": f"probe <= {GOAL_CORES_PER_CALL} core per call at N={step['calls']}",
                "value": step.get("probe", {}).get("side", {}).get("cores_per_call"),
                "ok": step["cpu_goal_ok"],
            }
        )
        found.append(
            {
                "goal": f"Chromium/probe memory (PSS) per call >= {GOAL_MEMORY_RATIO:g} at "
                f"N={step['calls']}",
                "value": step["memory_ratio"],
                "ok": step["memory_goal_ok"],
            }
        )
        found.append(
            {
                "goal": f"same against the probe's RSS (conservative) at N={step['calls']}",
                "value": step["memory_ratio_vs_probe_rss"],
                "ok": step["memory_goal_ok_vs_probe_rss"],
            }
        )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench, print tables, write the JSON; exit 1 if a goal failed, 130 on Ctrl-C."""
    settings = parse_settings(argv)
    started = time.monotonic()
    report = benchkit.new_report(settings, **environment())
    return benchkit.run_and_report(
        run(settings, report), report, settings.out, goals, started=started, digits=4
    )


if __name__ == "__main__":
    sys.exit(main())
