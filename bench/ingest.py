"""Benchmark the monitor's durable ingest against a bare aiohttp handler, and its /metrics.

    python bench/ingest.py [--quick] [--out bench/results/ingest.json]

Starts the real monitor (`callmon monitor`, its own process, a fresh SQLite file in a temp
dir, 10 probe tokens in 3 regions) and, side by side, bench/ingest_bare.py (a bare aiohttp
app that only parses the same JSON body: the reference). The load comes from this process:
an aiohttp client on keep-alive connections posting what probes post, alternately a
scheduled call's `callmon.call/v1` result (10 per-second samples) and a continuous call's
`callmon.samples/v1` batch (5 samples), from every probe to 10 targets, 1 request in 20 a
resend of an id already acknowledged.

1. Throughput: closed loop at 1, 4, 16, 64 requests in flight (quick: 1, 16), each level
   for a fixed window on both servers, alternating which goes first, repeated; medians.
   Goal: the monitor's request rate >= 40 % of the bare handler's (best level of each,
   and per level).
2. Latency at half rate: open loop (sends on a fixed schedule, latency counted from the
   scheduled instant, so a stall is not hidden by the sender waiting) at 50 % of the
   monitor's best rate, on both servers. Goal: the monitor's p99 < 50 ms.
3. Correctness: after the monitor stops, its SQLite file (opened read-only) holds every
   id it answered 200 exactly once, with the received_at it answered and all samples;
   every resend got a byte-identical answer.
4. /metrics with 1,000 target x region series (100 targets x 10 regions, another fresh
   monitor): 20 scrapes with gzip (as Prometheus asks) and 20 without; body size and
   series lines; ingest latency with and without a scrape every second.
5. Resources: the monitor's CPU (cores) and peak RSS in the max-rate window, from /proc
   (bench/proctree.py), with the bare server's and this load generator's beside them.

If an ingest goal is missed (or with --profile always), one more max-rate window runs
under py-spy and the monitor's hot spots are printed. Prints tables and writes every
number to one JSON file. Exits 1 when a goal is missed, 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import gzip
import json
import os
import random
import secrets
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import benchkit
import yaml
from benchkit import LOOPBACK, fmt, median, ms, percentile, ratio, table, verdict
from proctree import Usage, Watched, Window, measure_window, stop_process

from callmon.callresult import (
    AudioSummary,
    CallResult,
    Phases,
    ProbeInfo,
    Route,
    SampleBatch,
    Status,
    Summary,
    Target,
    VideoSummary,
)
from callmon.times import iso_or_none as iso
from monitor.config import token_digest

ROOT = Path(__file__).resolve().parent.parent
# tests/ is not an installed package; under `mypy bench` alone it is not on mypy's path.
sys.path.insert(0, str(ROOT / "tests"))
from monitorkit import sample  # type: ignore[import-not-found, unused-ignore]  # noqa: E402

BENCH = Path(__file__).resolve().parent
BARE = BENCH / "ingest_bare.py"
DEFAULT_OUT = BENCH / "results" / "ingest.json"
INGEST_PATH = "/api/v1/results"

REGIONS = ("eu-west", "us-east", "ap-south")
LOAD_PROBES = 10
LOAD_TARGETS = 10
RESULT_SAMPLES = 10
BATCH_SAMPLES = 5
RESEND_EVERY = 20
"One request in this many resends an id the server already acknowledged."
RESEND_POOL = 4096
"Acknowledged requests a resend picks from (the latest ones, roughly)."

METRICS_TARGETS = 100
METRICS_REGIONS = 10
"One probe token per region: 100 x 10 = 1,000 target x region series."
FEED_BATCH = 50
"Results per request when feeding the /metrics monitor (a JSON list body)."
SCRAPES = 20
SCRAPE_INGEST_RATE = 50.0
"Requests/s offered while measuring how a scrape delays ingest."
SCRAPE_EVERY_S = 5.0
"Scrape interval while measuring ingest beside scrapes (Prometheus setups use 5 to 60 s)."

RAMP_S = 1.0
"Load runs this long before a window opens (connections, caches): not counted."
STARTUP_TIMEOUT_S = 20.0
TIMEOUT = aiohttp.ClientTimeout(total=60)
PROFILE_RATE_HZ = 100

BUSY_CORES = 0.9
"A process using this much CPU over a window is taken as the limit of the rate."

GOAL_RATIO = 0.40
GOAL_P99_S = 0.050
HALF = 0.5


@dataclass(frozen=True)
class Settings:
    quick: bool
    levels: tuple[int, ...]
    "Requests in flight, closed loop."
    window_s: float
    "Measured window of each run."
    reps: int
    "Runs per level and server (and of the half-rate phase); tables show medians."
    profile: str
    "auto (when an ingest goal fails), always or never."
    out: Path
    keep_workdir: bool


def parse_settings(argv: Sequence[str] | None) -> Settings:
    """Turn the command line into settings; --quick shrinks levels, windows and repeats."""
    parser = benchkit.argument_parser(
        "Benchmark the monitor's durable ingest against a bare aiohttp handler.",
        "levels 1,16; 4 s windows; 1 rep",
        DEFAULT_OUT,
    )
    parser.add_argument("--levels", help="comma-separated requests in flight (1,4,16,64)")
    parser.add_argument("--window", type=float, metavar="S", help="window per run (10; quick 4)")
    parser.add_argument("--reps", type=int, help="runs per level and server (3; quick 1)")
    parser.add_argument("--profile", choices=("auto", "always", "never"), default="auto")
    parser.add_argument("--keep-workdir", action="store_true", help="keep logs, DBs, profile")
    args = parser.parse_args(argv)
    default_levels = "1,16" if args.quick else "1,4,16,64"
    try:
        levels = tuple(int(v) for v in (args.levels or default_levels).split(","))
    except ValueError:
        parser.error("--levels: expected integers, e.g. 1,4,16")
    window_s = args.window or (4.0 if args.quick else 10.0)
    if window_s < 2 or any(level < 1 for level in levels):
        parser.error("--window must be >= 2 s and levels >= 1")
    return Settings(
        quick=args.quick,
        levels=levels,
        window_s=window_s,
        reps=args.reps or (1 if args.quick else 3),
        profile=args.profile,
        out=args.out,
        keep_workdir=args.keep_workdir,
    )


# --- small helpers ---------------------------------------------------------------------------


def _status_mb(pid: int, field: str) -> float | None:
    """Return one kB field of /proc/PID/status (VmRSS, VmHWM, ...) in MB."""
    with contextlib.suppress(OSError, ValueError), open(f"/proc/{pid}/status") as status:
        for row in status:
            if row.startswith(field + ":"):
                return int(row.split()[1]) / 1024
    return None


def peak_rss_mb(pid: int) -> float | None:
    """Return a process's peak RSS so far (VmHWM), MB."""
    return _status_mb(pid, "VmHWM")


def rss_mb(pid: int) -> float | None:
    """Return a process's current RSS (VmRSS), MB."""
    return _status_mb(pid, "VmRSS")


# --- what probes send ---------------------------------------------------------------------

ID = "@ID@"
CALL = "@CALL@"
T_MARK = 9_000_000.0
"Batch samples are built at T_MARK + k and their t_s filled in per request."


@dataclass(frozen=True)
class Probe:
    name: str
    region: str
    token: str


@dataclass(frozen=True)
class Request:
    id: str
    kind: str
    "result or samples"
    probe: int
    "Index into Load.probes."
    call_id: str
    "The call the samples belong to (a result's own id)."
    samples: int
    body: bytes
    resend: bool = False


def _template(body: Mapping[str, Any]) -> str:
    """Turn a body built with placeholders into a %-format string: cheap per request."""
    text = json.dumps(body).replace("%", "%%")
    text = text.replace(f'"{ID}"', '"%(id)s"').replace(f'"{CALL}"', '"%(call)s"')
    for k in range(1, BATCH_SAMPLES + 1):
        text = text.replace(json.dumps(T_MARK + k), f"%(t{k})s")
    return text


def call_result_body(target: str) -> dict[str, Any]:
    """Build a healthy scheduled call's result as a probe sends it (all fields filled)."""
    return CallResult(
        id=ID,
        started_at="2027-01-15T08:00:00.000Z",
        target=Target(url=target, session=f"{target}/resource/4f1c2a"),
        probe=ProbeInfo(version="0.1.0", host="probe-host"),
        duration_s=float(RESULT_SAMPLES),
        status=Status.OK,
        phases=Phases(
            offer_s=0.012,
            answer_s=0.048,
            ice_s=0.091,
            dtls_s=0.132,
            first_rtp_audio_s=0.161,
            first_rtp_video_s=0.178,
            first_frame_audio_s=0.183,
            first_frame_video_s=0.241,
            connect_s=0.241,
        ),
        route=Route(
            local_candidate="host", remote_candidate="host", remote_address="10.0.0.2:4000"
        ),
        summary=Summary(
            media_s=float(RESULT_SAMPLES),
            rtt_s=0.02,
            rtt_p90_s=0.022,
            av_offset_s=0.004,
            av_offset_min_s=-0.002,
            av_offset_max_s=0.009,
            av_offset_samples=RESULT_SAMPLES,
            mos=4.4,
            mos_p10=4.38,
            audio=AudioSummary(
                packets=500,
                expected=500,
                loss=0.0,
                residual_loss=0.0,
                jitter_s=0.005,
                jitter_p90_s=0.006,
                bitrate_bps=32_000.0,
                delay_s=0.041,
            ),
            video=VideoSummary(
                packets=310,
                expected=310,
                loss=0.0,
                residual_loss=0.0,
                jitter_s=0.006,
                jitter_p90_s=0.008,
                bitrate_bps=480_000.0,
                delay_s=0.045,
                frames=150,
                fps=15.0,
            ),
        ),
        samples=[
            sample(float(t), jitter=0.004 + 0.001 * (t % 3)) for t in range(1, RESULT_SAMPLES + 1)
        ],
    ).to_dict()


def batch_body(target: str) -> dict[str, Any]:
    """Build one continuous call's batch of per-second samples, t_s left to fill in."""
    return SampleBatch(
        id=ID,
        call_id=CALL,
        started_at="2027-01-15T08:00:00.000Z",
        target=Target(url=target),
        probe=ProbeInfo(version="0.1.0", host="probe-host"),
        samples=[sample(T_MARK + k) for k in range(1, BATCH_SAMPLES + 1)],
    ).to_dict()


class Load:
    """Requests as probes make them: results and batches from every probe to every target.

    Ids are unique over the whole bench. Each (probe, target) is one continuous call whose
    batches carry consecutive seconds. Every RESEND_EVERY-th request resends an id that
    the server it goes to has already acknowledged, from the same probe.
    """

    def __init__(self, probes: Sequence[Probe], targets: Sequence[str], prefix: str) -> None:
        self.probes = list(probes)
        self.targets = list(targets)
        self.prefix = prefix
        self.headers = [
            {"Authorization": f"Bearer {p.token}", "Content-Type": "application/json"}
            for p in probes
        ]
        self._result = [_template(call_result_body(t)) for t in targets]
        self._batch = [_template(batch_body(t)) for t in targets]
        self._count = 0
        self._ids = 0
        self._seconds: dict[tuple[int, int], int] = {}
        "Seconds sent so far per continuous call (probe, target)."
        self.random = random.Random(1)
        self.sizes = {kind: len(self.item(kind, 0, 0).body) for kind in ("result", "samples")}
        "Body size of each kind, bytes (of two items never sent)."

    def item(self, kind: str, probe: int, target: int) -> Request:
        """Make a new item of `kind` from `probe` about `target`."""
        self._ids += 1
        item_id = f"{self.prefix}-{self._ids:08d}"
        if kind == "result":
            body = self._result[target] % {"id": item_id}
            return Request(item_id, kind, probe, item_id, RESULT_SAMPLES, body.encode())
        stream = (probe, target)
        first = self._seconds.get(stream, 0)
        self._seconds[stream] = first + BATCH_SAMPLES
        call_id = f"{self.prefix}-call-{probe:02d}-{target:03d}"
        values = {"id": item_id, "call": call_id}
        values.update({f"t{k}": f"{first + k}.0" for k in range(1, BATCH_SAMPLES + 1)})
        body = self._batch[target] % values
        return Request(item_id, kind, probe, call_id, BATCH_SAMPLES, body.encode())

    def next(self, ledger: Ledger) -> Request:
        """Return the next request for the server `ledger` keeps account of."""
        n = self._count
        self._count += 1
        if n % RESEND_EVERY == RESEND_EVERY - 1 and ledger.recent:
            return dataclasses.replace(self.random.choice(ledger.recent), resend=True)
        kind = "result" if n % 2 == 0 else "samples"
        probes = len(self.probes)
        return self.item(kind, (n // 2) % probes, (n // (2 * probes)) % len(self.targets))


@dataclass
class Ledger:
    """What one server answered: the first answer per id; resends checked against it.

    Only the monitor's ledger keeps answers (for section 3), and without request bodies:
    a ledger that grows by gigabytes slows this process's garbage collector, which then
    shows up as the servers' latency.
    """

    keep_answers: bool
    answers: dict[str, tuple[Request, bytes]] = field(default_factory=dict)
    "Id -> (the request without its body, its first 200 answer, raw bytes)."
    acknowledged: int = 0
    "New ids answered 200."
    recent: list[Request] = field(default_factory=list)
    "Acknowledged requests a resend may pick (bounded)."
    statuses: Counter[int] = field(default_factory=Counter)
    "By HTTP status; 0 = no answer (connection error, timeout)."
    failed: list[dict[str, Any]] = field(default_factory=list)
    "The first few requests not answered 200."
    resends: int = 0
    "Resends answered 200."
    mismatches: int = 0
    "Resends whose answer differs from the first one."
    mismatch_examples: list[dict[str, Any]] = field(default_factory=list)

    def record(self, request: Request, status: int, answer: bytes) -> None:
        """Account for one answer."""
        self.statuses[status] += 1
        if status != 200:
            if len(self.failed) < 10:
                self.failed.append(
                    {"id": request.id, "status": status, "answer": answer[:300].decode("replace")}
                )
            return
        if request.resend:
            self.resends += 1
            if self.keep_answers and answer != self.answers[request.id][1]:
                self.mismatches += 1
                if len(self.mismatch_examples) < 10:
                    first = self.answers[request.id][1].decode()
                    example = {"id": request.id, "first": first, "resend": answer.decode()}
                    self.mismatch_examples.append(example)
            return
        self.acknowledged += 1
        if self.keep_answers:
            self.answers[request.id] = (dataclasses.replace(request, body=b""), answer)
        if len(self.recent) < RESEND_POOL:
            self.recent.append(request)
        else:
            self.recent[self.acknowledged % RESEND_POOL] = request


# --- the servers --------------------------------------------------------------------------


@dataclass(frozen=True)
class Server:
    name: str
    url: str
    "Base URL."
    pid: int
    log: Path
    database: Path | None = None

    @property
    def ingest(self) -> str:
        return self.url + INGEST_PATH


@contextlib.asynccontextmanager
async def server_process(
    name: str, argv: Sequence[str], port: int, workdir: Path, database: Path | None = None
) -> AsyncIterator[Server]:
    """Run a server process on loopback until it accepts connections; stop it on exit."""
    log = workdir / f"{name}.log"
    process = await benchkit.start_logged(argv, log, cwd=ROOT)

    async def accepting() -> bool:
        try:
            _, writer = await asyncio.open_connection(LOOPBACK, port)
            writer.close()
            await writer.wait_closed()
        except OSError:
            return False
        return True

    try:
        if await benchkit.wait_ready(process, accepting, STARTUP_TIMEOUT_S, 0.05) is None:
            raise RuntimeError(f"{name} did not start:\n{benchkit.log_tail(log)}")
        yield Server(name, f"http://{LOOPBACK}:{port}", process.pid, log, database)
    finally:
        await stop_process(process)


def make_probes(count: int, regions: Sequence[str]) -> list[Probe]:
    """Mint probe tokens, spread over `regions` round robin."""
    return [
        Probe(f"probe-{i:02d}", regions[i % len(regions)], f"cm_bench_{secrets.token_hex(16)}")
        for i in range(count)
    ]


@contextlib.asynccontextmanager
async def monitor_process(
    workdir: Path, name: str, probes: Sequence[Probe]
) -> AsyncIterator[Server]:
    """Run `callmon monitor` with a fresh SQLite file and these probes' tokens."""
    database = workdir / f"{name}.sqlite3"
    config = workdir / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": str(database),
                "probes": [
                    {"name": p.name, "region": p.region, "token_sha256": token_digest(p.token)}
                    for p in probes
                ],
            }
        )
    )
    port = benchkit.free_port()
    argv = [sys.executable, "-m", "callmon.cli", "monitor", "--config", str(config)]
    argv += ["--listen", f"{LOOPBACK}:{port}"]
    async with server_process(name, argv, port, workdir, database) as server:
        yield server


@contextlib.asynccontextmanager
async def bare_process(workdir: Path) -> AsyncIterator[Server]:
    """Run bench/ingest_bare.py, the reference."""
    port = benchkit.free_port()
    argv = [sys.executable, str(BARE), "--listen", f"{LOOPBACK}:{port}"]
    async with server_process("bare", argv, port, workdir) as server:
        yield server


# --- one run --------------------------------------------------------------------------------


@dataclass(slots=True)
class Done:
    scheduled: float
    "When the request was due (closed loop: when it was sent)."
    sent: float
    end: float
    status: int
    "HTTP status; 0 when no answer came (connection error, timeout)."
    answer: bytes
    request: Request


async def post(
    http: aiohttp.ClientSession, url: str, load: Load, ledger: Ledger, request: Request
) -> Done:
    """Send one request, read the whole answer and enter it in the ledger."""
    sent = time.perf_counter()
    try:
        async with http.post(url, data=request.body, headers=load.headers[request.probe]) as r:
            status, answer = r.status, await r.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        status, answer = 0, repr(exc).encode()
    ledger.record(request, status, answer)
    return Done(sent, sent, time.perf_counter(), status, answer, request)


def session(limit: int) -> aiohttp.ClientSession:
    """Return a client session with keep-alive connections (`limit` 0 = no limit)."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit), timeout=TIMEOUT)


def summarize(done: Sequence[Done], seconds: float) -> dict[str, Any]:
    """Return rates and latency percentiles of the requests in one window."""
    ok = [d for d in done if d.status == 200]
    new = [d for d in ok if not d.request.resend]
    latency = [d.end - d.scheduled for d in done]
    service = [d.end - d.sent for d in done]
    lag = [d.sent - d.scheduled for d in done]
    return {
        "seconds": seconds,
        "requests": len(done),
        "ok": len(ok),
        "errors": len(done) - len(ok),
        "resends": len(ok) - len(new),
        "req_per_s": len(ok) / seconds,
        "results_per_s": sum(d.request.kind == "result" for d in new) / seconds,
        "batches_per_s": sum(d.request.kind == "samples" for d in new) / seconds,
        "samples_per_s": sum(d.request.samples for d in new) / seconds,
        "p50_s": percentile(latency, 0.50),
        "p90_s": percentile(latency, 0.90),
        "p99_s": percentile(latency, 0.99),
        "max_s": max(latency, default=None),
        "over_goal_share": ratio(sum(v >= GOAL_P99_S for v in latency), len(latency)),
        "service_p99_s": percentile(service, 0.99),
        "send_lag_p99_s": percentile(lag, 0.99),
    }


def usage_record(window: Window) -> dict[str, Any]:
    """Summarise each watched process over a window: cores, RSS and PSS."""
    out: dict[str, Any] = {"window_s": window.seconds}
    watched = 0.0
    for name, usage in window.usage.items():
        watched += usage.cpu_s
        out[name] = _usage(usage, window.seconds)
    # a process that exits mid-window loses its last partial interval: never below zero
    out["others_cores"] = max(0.0, (window.all_processes_s - watched) / window.seconds)
    out["steal_cores"] = window.steal_s / window.seconds
    return out


def _usage(usage: Usage, seconds: float) -> dict[str, Any]:
    return {
        "cores": usage.cpu_s / seconds,
        "system_share": ratio(usage.system_s, usage.cpu_s),
        "rss_mb_max": max(usage.rss_mb, default=None),
        "rss_mb_median": median(usage.rss_mb),
        "pss_mb_median": median(usage.pss_mb),
    }


def settle() -> None:
    """Collect this process's garbage, then exempt what survives from later collections.

    Otherwise every collection during a window walks all that earlier runs left (ledgers,
    templates): pauses of the load generator that would be booked as server latency.
    """
    gc.collect()
    gc.freeze()


def watching(servers: Sequence[Server]) -> list[Watched]:
    """Watch every server and this load generator."""
    return [
        *(Watched(s.name, s.pid, descendants=False) for s in servers),
        Watched("bench", os.getpid(), descendants=False),
    ]


async def closed_loop(
    server: Server,
    level: int,
    load: Load,
    ledger: Ledger,
    window_s: float,
    watched: Sequence[Watched],
    profile_to: Path | None = None,
) -> dict[str, Any]:
    """Keep `level` requests in flight; measure the window after RAMP_S; drain the rest."""
    done: list[Done] = []
    stopping = False

    async def worker(http: aiohttp.ClientSession) -> None:
        while not stopping:
            done.append(await post(http, server.ingest, load, ledger, load.next(ledger)))

    profiler_error: str | None = None
    settle()
    async with session(max(level, 100)) as http:
        workers = [asyncio.create_task(worker(http)) for _ in range(level)]
        try:
            await asyncio.sleep(RAMP_S)
            start = time.perf_counter()
            if profile_to is None:
                window = await measure_window(watched, window_s)
            else:
                window, profiler_error = await asyncio.gather(
                    measure_window(watched, window_s), py_spy(server.pid, window_s, profile_to)
                )
            end = time.perf_counter()
        finally:
            stopping = True
            await asyncio.gather(*workers)  # in-flight requests finish and are accounted
    in_window = [d for d in done if start <= d.end < end]
    record = {
        "server": server.name,
        "level": level,
        **summarize(in_window, end - start),
        "usage": usage_record(window),
        "peak_rss_mb": peak_rss_mb(server.pid),
    }
    if profile_to is not None:
        record["profiler_error"] = profiler_error
    return record


async def open_loop(
    server: Server,
    rate: float,
    window_s: float,
    load: Load,
    ledger: Ledger,
    watched: Sequence[Watched],
) -> dict[str, Any]:
    """Send at `rate` on a fixed schedule, whatever the answers; latency from schedule."""
    done: list[Done] = []
    interval = 1.0 / rate
    pending: set[asyncio.Task[None]] = set()

    async def one(http: aiohttp.ClientSession, request: Request, due: float) -> None:
        finished = await post(http, server.ingest, load, ledger, request)
        finished.scheduled = due
        done.append(finished)

    async def measure() -> Window:
        await asyncio.sleep(max(0.0, begin + RAMP_S - time.perf_counter()))
        return await measure_window(watched, window_s)

    settle()
    async with session(0) as http:
        begin = time.perf_counter() + 0.05
        meter = asyncio.create_task(measure())
        try:
            for i in range(round((RAMP_S + window_s) * rate)):
                due = begin + i * interval
                delay = due - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                task = asyncio.create_task(one(http, load.next(ledger), due))
                pending.add(task)
                task.add_done_callback(pending.discard)
            window = await meter
            await asyncio.gather(*pending)
        finally:
            meter.cancel()
            for task in pending:
                task.cancel()
    start = begin + RAMP_S
    in_window = [d for d in done if start <= d.scheduled < start + window_s]
    return {
        "server": server.name,
        "offered_per_s": rate,
        **summarize(in_window, window_s),
        "usage": usage_record(window),
    }


# --- 1. throughput ------------------------------------------------------------------------------

LEVEL_KEYS = ("req_per_s", "results_per_s", "batches_per_s", "samples_per_s", "p50_s", "p99_s")


def level_summary(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Return the medians over one (level, server)'s repeated runs."""
    out: dict[str, Any] = {k: median([r[k] for r in runs if r[k] is not None]) for k in LEVEL_KEYS}
    out["req_per_s_min"] = min(r["req_per_s"] for r in runs)
    out["req_per_s_max"] = max(r["req_per_s"] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    out["server_cores"] = median([r["usage"][r["server"]]["cores"] for r in runs])
    out["bench_cores"] = median([r["usage"]["bench"]["cores"] for r in runs])
    out["others_cores"] = median([r["usage"]["others_cores"] for r in runs])
    out["rss_mb_max"] = max(r["usage"][r["server"]]["rss_mb_max"] or 0.0 for r in runs)
    out["limited_by"] = limited_by(out["server_cores"], out["bench_cores"], out["others_cores"])
    return out


def limited_by(server: float, client: float, others: float) -> str:
    """Name what held the rate: a saturated server, client or machine; else waiting."""
    found = [
        name for name, cores in (("server", server), ("client", client)) if cores >= BUSY_CORES
    ]
    if server + client + others >= BUSY_CORES * (os.cpu_count() or 1):
        found.append("machine")
    return "+".join(found) or "waiting"


def print_throughput(section: Mapping[str, Any]) -> None:
    """Print monitor and bare side by side per level, then each run."""
    rows = []
    for level in section["levels"]:
        m, b = level["monitor"], level["bare"]
        rows.append(
            [
                str(level["level"]),
                f"{m['req_per_s']:.0f}",
                f"{b['req_per_s']:.0f}",
                f"{level['ratio']:.0%}",
                verdict(level["ok"]),
                f"{m['results_per_s']:.0f}",
                f"{m['batches_per_s']:.0f}",
                f"{m['samples_per_s']:.0f}",
                f"{ms(m['p50_s'])} / {ms(m['p99_s'])}",
                f"{ms(b['p50_s'])} / {ms(b['p99_s'])}",
                f"{fmt(m['server_cores'])} / {fmt(b['server_cores'])}",
                f"{fmt(m['bench_cores'])} / {fmt(b['bench_cores'])}",
                f"{fmt(m['others_cores'])} / {fmt(b['others_cores'])}",
                f"{m['limited_by']} / {b['limited_by']}",
            ]
        )
    print(
        table(
            f"1. Closed-loop ingest, {section['window_s']:g} s windows, median of "
            f"{section['reps']} run(s) per cell (results = call results; monitor / bare)",
            [
                "in flight",
                "monitor req/s",
                "bare req/s",
                "ratio",
                f">= {GOAL_RATIO:.0%}",
                "results/s",
                "batches/s",
                "samples/s",
                "monitor p50 / p99 ms",
                "bare p50 / p99 ms",
                "server cores",
                "client cores",
                "others cores",
                f"limit (>= {BUSY_CORES} core)",
            ],
            rows,
        )
    )
    if any("client" in v["bare"]["limited_by"] for v in section["levels"]):
        print(
            "  the load generator was saturated in bare runs: the bare rate is a lower bound of"
            " the handler's, so the ratios are upper bounds"
        )
    best = section["best"]
    print(
        f"  best level: monitor {best['monitor_req_per_s']:.0f} req/s at "
        f"{best['monitor_level']} in flight, bare {best['bare_req_per_s']:.0f} req/s at "
        f"{best['bare_level']}: {best['ratio']:.0%} (goal >= {GOAL_RATIO:.0%}: "
        f"{verdict(best['ok'])})"
    )
    rows = [
        [
            f"{r['level']} {r['server']} #{r['rep']}",
            f"{r['req_per_s']:.0f}",
            str(r["errors"]),
            str(r["resends"]),
            ms(r["p50_s"]),
            ms(r["p99_s"]),
            ms(r["max_s"]),
            fmt(r["usage"][r["server"]]["cores"]),
            fmt(r["usage"]["bench"]["cores"]),
            fmt(r["usage"]["others_cores"]),
        ]
        for r in section["runs"]
    ]
    print(
        table(
            "   Every run, in the order run",
            [
                "run",
                "req/s",
                "errors",
                "resends",
                "p50 ms",
                "p99 ms",
                "max ms",
                "server cores",
                "client cores",
                "others",
            ],
            rows,
        )
    )


async def throughput(
    settings: Settings, servers: Mapping[str, Server], load: Load, ledgers: Mapping[str, Ledger]
) -> dict[str, Any]:
    """Measure section 1: every level on both servers, alternating who goes first."""
    watched = watching(list(servers.values()))
    runs: list[dict[str, Any]] = []
    for rep in range(1, settings.reps + 1):
        for i, level in enumerate(settings.levels):
            order = ("monitor", "bare") if (rep + i) % 2 else ("bare", "monitor")
            for name in order:
                print(f"  throughput: {level} in flight, {name}, run {rep}", flush=True)
                run = await closed_loop(
                    servers[name], level, load, ledgers[name], settings.window_s, watched
                )
                runs.append({"rep": rep, **run})
    levels: list[dict[str, Any]] = []
    for level in settings.levels:
        sides = {
            name: level_summary([r for r in runs if r["level"] == level and r["server"] == name])
            for name in ("monitor", "bare")
        }
        level_ratio = ratio(sides["monitor"]["req_per_s"], sides["bare"]["req_per_s"])
        levels.append(
            {
                "level": level,
                **sides,
                "ratio": level_ratio,
                "ok": level_ratio is not None and level_ratio >= GOAL_RATIO,
            }
        )
    best_m = max(levels, key=lambda v: v["monitor"]["req_per_s"])
    best_b = max(levels, key=lambda v: v["bare"]["req_per_s"])
    best_ratio = ratio(best_m["monitor"]["req_per_s"], best_b["bare"]["req_per_s"])
    section = {
        "window_s": settings.window_s,
        "ramp_s": RAMP_S,
        "reps": settings.reps,
        "levels": levels,
        "best": {
            "monitor_level": best_m["level"],
            "monitor_req_per_s": best_m["monitor"]["req_per_s"],
            "bare_level": best_b["level"],
            "bare_req_per_s": best_b["bare"]["req_per_s"],
            "ratio": best_ratio,
            "ok": best_ratio is not None and best_ratio >= GOAL_RATIO,
        },
        "runs": runs,
    }
    print_throughput(section)
    return section


# --- 2. latency at half the monitor's maximum rate --------------------------------------------


def print_half_rate(section: Mapping[str, Any]) -> None:
    """Print the open-loop phase of both servers and the latency goal."""
    rows = []
    for name in ("monitor", "bare"):
        s = section[name]
        rows.append(
            [
                name,
                f"{section['rate']:.0f}",
                f"{s['req_per_s']:.0f}",
                ms(s["p50_s"]),
                ms(s["p90_s"]),
                ms(s["p99_s"]),
                ms(s["max_s"]),
                f"{s['over_goal_share']:.1%}",
                ms(s["send_lag_p99_s"]),
                str(s["errors"]),
                fmt(s["server_cores"]),
                fmt(s["bench_cores"]),
            ]
        )
    print(
        table(
            f"2. Open loop at {HALF:.0%} of the monitor's best rate, {section['window_s']:g} s, "
            f"median of {section['reps']} run(s) (latency from the scheduled send)",
            [
                "server",
                "offered/s",
                "answered/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "max ms",
                f">= {ms(GOAL_P99_S)} ms",
                "send lag p99",
                "errors",
                "server cores",
                "client cores",
            ],
            rows,
        )
    )
    print(
        f"  monitor p99 {ms(section['monitor']['p99_s'])} ms, goal < {ms(GOAL_P99_S)} ms: "
        f"{verdict(section['ok'])}"
    )


async def half_rate(
    settings: Settings,
    servers: Mapping[str, Server],
    load: Load,
    ledgers: Mapping[str, Ledger],
    max_rate: float,
) -> dict[str, Any]:
    """Measure section 2: open loop at half the monitor's best rate, on both servers."""
    rate = HALF * max_rate
    watched = watching(list(servers.values()))
    runs: list[dict[str, Any]] = []
    for rep in range(1, settings.reps + 1):
        for name in ("monitor", "bare") if rep % 2 else ("bare", "monitor"):
            print(f"  half rate: {rate:.0f} req/s, {name}, run {rep}", flush=True)
            run = await open_loop(
                servers[name], rate, settings.window_s, load, ledgers[name], watched
            )
            runs.append({"rep": rep, **run})
    section: dict[str, Any] = {"rate": rate, "window_s": settings.window_s, "reps": settings.reps}
    for name in ("monitor", "bare"):
        mine = [r for r in runs if r["server"] == name]
        keys = (
            "req_per_s",
            "p50_s",
            "p90_s",
            "p99_s",
            "max_s",
            "over_goal_share",
            "send_lag_p99_s",
        )
        section[name] = {k: median([r[k] for r in mine if r[k] is not None]) for k in keys}
        section[name]["errors"] = sum(r["errors"] for r in mine)
        section[name]["server_cores"] = median([r["usage"][name]["cores"] for r in mine])
        section[name]["bench_cores"] = median([r["usage"]["bench"]["cores"] for r in mine])
    p99 = section["monitor"]["p99_s"]
    section["ok"] = p99 is not None and p99 < GOAL_P99_S
    section["runs"] = runs
    print_half_rate(section)
    return section


# --- 3. correctness ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    results: dict[str, tuple[int, float]]
    "Id -> (rows with that id, received_at)."
    samples: dict[str, int]
    "Call id -> sample rows."
    incidents: int
    size_mb: float


def read_store(database: Path) -> Stored:
    """Open the stopped monitor's file read-only and read what it holds."""
    db = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        results = {
            i: (n, at)
            for i, n, at in db.execute(
                "SELECT id, COUNT(*), MIN(received_at) FROM results GROUP BY id"
            )
        }
        samples = dict(db.execute("SELECT call_id, COUNT(*) FROM samples GROUP BY call_id"))
        (incidents,) = db.execute("SELECT COUNT(*) FROM incidents").fetchone()
    finally:
        db.close()
    return Stored(results, samples, int(incidents), database.stat().st_size / 2**20)


def check_answer(request: Request, answer: bytes, probes: Sequence[Probe]) -> str | None:
    """Return what is wrong with a 200 answer to `request`, or None."""
    try:
        data = json.loads(answer)
        (receipt,) = data["results"]
    except (ValueError, KeyError, TypeError):
        return f"not one receipt: {answer[:200]!r}"
    probe = probes[request.probe]
    if (data.get("probe"), data.get("region")) != (probe.name, probe.region):
        return f"answered for {data.get('probe')}/{data.get('region')}, sent as {probe.name}"
    if receipt.get("id") != request.id:
        return f"receipt for {receipt.get('id')!r}"
    return None


def print_correctness(section: Mapping[str, Any]) -> None:
    """Print each check with its counts."""
    rows = [[c["check"], fmt(c["value"]), verdict(c["ok"])] for c in section["checks"]]
    print(
        table(
            "3. Correctness under load (the monitor's SQLite file, read-only)",
            ["check", "value", "verdict"],
            rows,
        )
    )
    for problem in section["problems"][:10]:
        print(f"  ! {problem}")


async def correctness(ledger: Ledger, database: Path, probes: Sequence[Probe]) -> dict[str, Any]:
    """Check section 3: acknowledged ids stored once with their time, samples, resends."""
    store = await asyncio.to_thread(read_store, database)
    stored, samples = store.results, store.samples
    problems: list[str] = []
    missing = duplicated = wrong_time = bad_answers = 0
    expected_samples: Counter[str] = Counter()
    for item_id, (request, answer) in ledger.answers.items():
        wrong = check_answer(request, answer, probes)
        if wrong is not None:
            bad_answers += 1
            problems.append(f"{item_id}: {wrong}")
            continue
        expected_samples[request.call_id] += request.samples
        row = stored.get(item_id)
        if row is None:
            missing += 1
            problems.append(f"{item_id}: answered 200 but not stored")
            continue
        count, received_at = row
        duplicated += count != 1
        answered_at = json.loads(answer)["results"][0]["received_at"]
        if iso(received_at) != answered_at:
            wrong_time += 1
            problems.append(f"{item_id}: stored at {iso(received_at)}, answered {answered_at}")
    unacknowledged = [i for i in stored if i not in ledger.answers]
    sample_mismatch = {
        call: (samples.get(call, 0), n)
        for call, n in expected_samples.items()
        if samples.get(call, 0) != n
    }
    for call, (got, want) in list(sample_mismatch.items())[:5]:
        problems.append(f"{call}: {got} sample rows, {want} acknowledged")
    for m in ledger.mismatch_examples:
        problems.append(f"resend {m['id']}: {m['first']} then {m['resend']}")
    non_200 = sum(n for status, n in ledger.statuses.items() if status != 200)
    acknowledged = len(ledger.answers)
    mismatched = ledger.mismatches
    checks: list[tuple[str, int, bool | None]] = [
        ("ids answered 200 (distinct)", acknowledged, acknowledged > 0),
        ("answers with a wrong probe, region or id", bad_answers, bad_answers == 0),
        ("answered ids missing from the file", missing, missing == 0),
        ("answered ids stored more than once", duplicated, duplicated == 0),
        ("stored received_at != answered", wrong_time, wrong_time == 0),
        ("sample rows checked", sum(expected_samples.values()), None),
        ("calls whose sample rows != acknowledged", len(sample_mismatch), not sample_mismatch),
        ("resends answered 200", ledger.resends, ledger.resends > 0),
        ("resends answered differently", mismatched, mismatched == 0),
        ("requests not answered 200", non_200, non_200 == 0),
        ("stored ids never acknowledged", len(unacknowledged), len(unacknowledged) <= non_200),
        ("incidents opened (healthy load: expect 0)", store.incidents, None),
    ]
    section = {
        "checks": [{"check": c, "value": v, "ok": ok} for c, v, ok in checks],
        "ok": all(ok is not False for _, _, ok in checks),
        "statuses": {str(k): v for k, v in sorted(ledger.statuses.items())},
        "failed_requests": ledger.failed,
        "problems": problems[:50],
        "database_mb": store.size_mb,
        "rows": {"results": len(stored), "sample_calls": len(samples)},
    }
    print_correctness(section)
    return section


# --- 4. /metrics with 1,000 series ---------------------------------------------------------------


async def scrape_once(
    http: aiohttp.ClientSession, url: str, encoding: str
) -> tuple[dict[str, Any], bytes]:
    """GET /metrics once; return the time to the last byte, the sizes, and the text."""
    start = time.perf_counter()
    async with http.get(url, headers={"Accept-Encoding": encoding}) as response:
        body = await response.read()
        response.raise_for_status()
        coding = response.headers.get("Content-Encoding", "identity")
    seconds = time.perf_counter() - start
    text = gzip.decompress(body) if coding == "gzip" else body
    return {"seconds": seconds, "wire_bytes": len(body), "bytes": len(text)}, text


def series_of(text: bytes) -> dict[str, int]:
    """Count sample lines, and the target x region pairs of callmon_call_success."""
    lines = [line for line in text.decode().splitlines() if line and not line.startswith("#")]
    pairs = {line.split(" ")[0] for line in lines if line.startswith("callmon_call_success{")}
    families = {line.split("{")[0].split(" ")[0] for line in lines}
    return {"series_lines": len(lines), "success_pairs": len(pairs), "families": len(families)}


def scrape_stats(scrapes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    times = [s["seconds"] for s in scrapes]
    return {
        "n": len(times),
        "median_s": median(times),
        "p99_s": percentile(times, 0.99),
        "max_s": max(times, default=None),
        "wire_bytes": scrapes[-1]["wire_bytes"] if scrapes else None,
        "bytes": scrapes[-1]["bytes"] if scrapes else None,
    }


def print_scrape(section: Mapping[str, Any]) -> None:
    """Print the scrape timings and how a scrape delays ingest."""
    rows = [
        [
            label,
            str(s["n"]),
            ms(s["median_s"]),
            ms(s["p99_s"]),
            ms(s["max_s"]),
            f"{s['wire_bytes']:,}",
            f"{s['bytes']:,}",
        ]
        for label, s in (("gzip", section["gzip"]), ("identity", section["identity"]))
    ]
    series = section["series"]
    print(
        table(
            f"4. /metrics with {series['success_pairs']} target x region series: "
            f"{series['series_lines']:,} sample lines in {series['families']} families",
            ["Accept-Encoding", "scrapes", "median ms", "p99 ms", "max ms", "wire B", "body B"],
            rows,
        )
    )
    feed = section["feed"]
    print(
        f"  fed {feed['results']} results in {feed['requests']} list requests of "
        f"{FEED_BATCH}: {feed['results_per_s']:.0f} results/s, p50 request {ms(feed['p50_s'])} ms;"
        f" monitor RSS then {fmt(feed['monitor_rss_mb_after'], 1)} MB"
    )
    rows = [
        [
            label,
            f"{s['req_per_s']:.0f}",
            ms(s["p50_s"]),
            ms(s["p99_s"]),
            ms(s["max_s"]),
            f"{s['over_goal_share']:.1%}",
            str(s["errors"]),
        ]
        for label, s in (
            ("no scrapes", section["ingest_quiet"]),
            (f"a scrape every {SCRAPE_EVERY_S:g} s", section["ingest_scraped"]),
        )
    ]
    print(
        table(
            f"   Ingest at {SCRAPE_INGEST_RATE:g} req/s (open loop) on that monitor",
            [
                "while",
                "answered/s",
                "p50 ms",
                "p99 ms",
                "max ms",
                f">= {ms(GOAL_P99_S)} ms",
                "errors",
            ],
            rows,
        )
    )


async def scrape(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Measure section 4: a fresh monitor fed 1,000 series, then timed scrapes."""
    probes = make_probes(METRICS_REGIONS, [f"region-{i:02d}" for i in range(METRICS_REGIONS)])
    targets = [f"https://sfu-{j:03d}.bench.example/whip" for j in range(METRICS_TARGETS)]
    load = Load(probes, targets, f"m{secrets.token_hex(3)}")
    ledger = Ledger(keep_answers=False)
    async with (
        monitor_process(workdir, "metrics", probes) as server,
        session(0) as http,
        # the body as sent: gzip is measured, not undone by the client
        aiohttp.ClientSession(auto_decompress=False, timeout=TIMEOUT) as scraper_http,
    ):
        # feed one result per target and region, FEED_BATCH to a request
        started = time.perf_counter()
        request_times = []
        for p in range(len(probes)):
            for first in range(0, len(targets), FEED_BATCH):
                items = [load.item("result", p, t) for t in range(first, first + FEED_BATCH)]
                body = b"[" + b",".join(i.body for i in items) + b"]"
                t0 = time.perf_counter()
                async with http.post(server.ingest, data=body, headers=load.headers[p]) as r:
                    answer = await r.read()
                    if r.status != 200:
                        raise RuntimeError(f"feeding /metrics: {r.status} {answer[:300]!r}")
                request_times.append(time.perf_counter() - t0)
        fed_s = time.perf_counter() - started
        fed_rss_mb = rss_mb(server.pid)
        url = server.url + "/metrics"
        zipped = [(await scrape_once(scraper_http, url, "gzip"))[0] for _ in range(SCRAPES)]
        plain = [(await scrape_once(scraper_http, url, "identity"))[0] for _ in range(SCRAPES)]
        series = series_of((await scrape_once(scraper_http, url, "gzip"))[1])
        watched = watching([server])
        quiet = await open_loop(
            server, SCRAPE_INGEST_RATE, settings.window_s, load, ledger, watched
        )
        during: list[dict[str, Any]] = []

        async def scraper() -> None:
            await asyncio.sleep(RAMP_S)  # the first scrape as the window opens
            while True:
                started = time.perf_counter()
                during.append((await scrape_once(scraper_http, url, "gzip"))[0])
                await asyncio.sleep(max(0.0, started + SCRAPE_EVERY_S - time.perf_counter()))

        task = asyncio.create_task(scraper())
        try:
            scraped = await open_loop(
                server, SCRAPE_INGEST_RATE, settings.window_s, load, ledger, watched
            )
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    section = {
        "targets": len(targets),
        "regions": len(probes),
        "feed": {
            "results": len(probes) * len(targets),
            "requests": len(request_times),
            "seconds": fed_s,
            "results_per_s": len(probes) * len(targets) / fed_s,
            "p50_s": median(request_times),
            "max_s": max(request_times),
            "monitor_rss_mb_after": fed_rss_mb,
        },
        "series": series,
        "gzip": scrape_stats(zipped),
        "identity": scrape_stats(plain),
        "ingest_quiet": quiet,
        "ingest_scraped": scraped,
        "scrapes_during_ingest": scrape_stats(during),
        "ingest_statuses": {str(k): v for k, v in ledger.statuses.items()},
    }
    print_scrape(section)
    return section


# --- 5. resources ------------------------------------------------------------------------------


def resources(section: Mapping[str, Any], rss: Mapping[str, Any]) -> dict[str, Any]:
    """Report section 5: CPU and memory per level, from the throughput windows."""
    rows = []
    levels = []
    for level in section["levels"]:
        m, b = level["monitor"], level["bare"]
        levels.append(
            {
                "level": level["level"],
                "monitor_cores": m["server_cores"],
                "monitor_rss_mb_max": m["rss_mb_max"],
                "bare_cores": b["server_cores"],
                "bare_rss_mb_max": b["rss_mb_max"],
                "client_cores_monitor_runs": m["bench_cores"],
                "client_cores_bare_runs": b["bench_cores"],
                "monitor_cpu_ms_per_request": ratio(m["server_cores"] * 1000, m["req_per_s"]),
                "bare_cpu_ms_per_request": ratio(b["server_cores"] * 1000, b["req_per_s"]),
            }
        )
        row = levels[-1]
        at_max = level["level"] == section["best"]["monitor_level"]
        rows.append(
            [
                f"{level['level']}{' (max)' if at_max else ''}",
                fmt(row["monitor_cores"]),
                fmt(row["monitor_cpu_ms_per_request"], 3),
                fmt(row["monitor_rss_mb_max"], 1),
                fmt(row["bare_cores"]),
                fmt(row["bare_cpu_ms_per_request"], 3),
                fmt(row["bare_rss_mb_max"], 1),
                f"{fmt(row['client_cores_monitor_runs'])} / {fmt(row['client_cores_bare_runs'])}",
            ]
        )
    print(
        table(
            "5. CPU and memory per level (medians of the windows; RSS = peak of 1 s samples)",
            [
                "in flight",
                "monitor cores",
                "CPU ms/req",
                "RSS MB",
                "bare cores",
                "CPU ms/req",
                "RSS MB",
                "client cores (m / b)",
            ],
            rows,
        )
    )
    best = next(v for v in levels if v["level"] == section["best"]["monitor_level"])
    print(
        f"  monitor at its max rate: {fmt(best['monitor_cores'])} cores, peak RSS "
        f"{fmt(best['monitor_rss_mb_max'], 1)} MB; RSS {fmt(rss['start_mb'], 1)} MB before "
        f"the load, {fmt(rss['end_mb'], 1)} MB after {rss['items']:,} stored items "
        f"(VmHWM {fmt(rss['hwm_mb'], 1)} MB)"
    )
    return {"levels": levels, "at_max_rate": best, "monitor_rss": dict(rss)}


# --- where the monitor's time goes ----------------------------------------------------------------


async def py_spy(pid: int, seconds: float, out: Path) -> str | None:
    """Sample `pid` with py-spy for `seconds` into collapsed stacks; return an error or None."""
    if shutil.which("py-spy") is None:
        return "py-spy not installed (pip install py-spy)"
    log = out.with_suffix(".log")
    with log.open("wb") as output:
        # --nonblocking: sampling must not pause the monitor it measures
        argv = ["record", "--pid", str(pid), "--duration", str(round(seconds))]
        argv += ["--rate", str(PROFILE_RATE_HZ), "--format", "raw", "--nolineno"]
        argv += ["--nonblocking", "--output", str(out)]
        process = await asyncio.create_subprocess_exec(
            "py-spy", *argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        code = await process.wait()
    finally:
        await stop_process(process)
    return None if code == 0 else f"py-spy exited {code}: {benchkit.log_tail(log, 5)}"


CATEGORIES = (
    ("callmon/callresult.py", "validation (callmon.callresult)"),
    ("monitor/ingest.py", "request body (monitor.ingest)"),
    ("monitor/api.py", "answer (monitor.api)"),
    ("monitor/store.py", "SQLite (monitor.store)"),
    ("sqlite3", "SQLite (monitor.store)"),
    ("monitor/pipeline.py", "pipeline and rules"),
    ("monitor/rules.py", "pipeline and rules"),
    ("monitor/metrics.py", "metrics"),
    ("prometheus_client", "metrics"),
    ("json/", "json (stdlib)"),
    ("aiohttp/", "aiohttp"),
    ("multidict", "aiohttp"),
    ("yarl", "aiohttp"),
    ("asyncio/", "asyncio"),
    ("concurrent/", "threads"),
    ("threading.py", "threads"),
    ("monitor/", "monitor, other"),
)


def _file(frame: str) -> str:
    return frame[frame.rfind("(") + 1 : -1] if frame.endswith(")") else frame


def _label(frame: str) -> str | None:
    path = _file(frame)
    return next((label for prefix, label in CATEGORIES if prefix in path), None)


def category(frames: Sequence[str]) -> str:
    """Name the part of the monitor a stack's time goes to: its innermost known frame.

    Library frames without a label (typing, inspect, dataclasses) count for the code that
    called them; JSON is named with its caller (parsing a body, encoding rows, answering).
    """
    labels = [label for label in map(_label, reversed(frames)) if label is not None]
    if not labels:
        return "other"
    if labels[0] == "json (stdlib)":
        caller = next((label for label in labels if label != "json (stdlib)"), "other")
        return f"json, for {caller}"
    return labels[0]


def hot_spots(collapsed: Path, top: int = 15) -> dict[str, Any]:
    """Read py-spy's collapsed stacks: self time by category and function, inclusive time."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    by_category: Counter[str] = Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        by_category[category(frames)] += n
        for frame in set(frames):
            inclusive[frame] += n

    def share(counter: Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, n / total) for name, n in counter.most_common(k)]

    return {
        "samples": total,
        "by_category": share(by_category, 20),
        "self_by_function": share(own, top),
        "inclusive_by_function": share(inclusive, top + 10),
    }


def print_profile(section: Mapping[str, Any]) -> None:
    """Print where the monitor's sampled CPU went."""
    spots = section["hot_spots"]
    rows = [[label, f"{part:.1%}"] for label, part in spots["by_category"]]
    print(
        table(
            f"   Monitor profile (py-spy, {PROFILE_RATE_HZ} Hz, {section['run']['level']} in "
            f"flight, {section['run']['req_per_s']:.0f} req/s, {spots['samples']} samples of "
            "busy threads)",
            ["part (innermost known frame)", "share"],
            rows,
        )
    )
    print(
        table(
            "   Hottest functions (self)",
            ["function (file)", "self"],
            [[name[:110], f"{part:.1%}"] for name, part in spots["self_by_function"]],
        )
    )
    print(
        table(
            "   Hottest functions (inclusive)",
            ["function (file)", "inclusive"],
            [[name[:110], f"{part:.1%}"] for name, part in spots["inclusive_by_function"]],
        )
    )


async def profile(
    settings: Settings,
    servers: Mapping[str, Server],
    load: Load,
    ledger: Ledger,
    level: int,
    workdir: Path,
) -> dict[str, Any]:
    """Run one more max-rate window on the monitor under py-spy; summarise its stacks."""
    out = workdir / "monitor-profile.txt"
    print(f"  profile: {level} in flight, monitor under py-spy", flush=True)
    watched = watching(list(servers.values()))
    run = await closed_loop(
        servers["monitor"], level, load, ledger, settings.window_s, watched, profile_to=out
    )
    if run["profiler_error"] is not None or not out.exists():
        print(f"  ! profile: {run['profiler_error']}")
        return {"error": run["profiler_error"], "run": run}
    section = {"run": run, "hot_spots": hot_spots(out), "collapsed": str(out)}
    print_profile(section)
    return section


# --- the run -------------------------------------------------------------------------------------


def _filesystem(path: Path) -> str | None:
    """Return the filesystem type holding `path` (the fsync cost depends on it)."""
    best, kind = "", None
    with open("/proc/mounts") as mounts:
        for row in mounts:
            fields = row.split()
            mount = fields[1]
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def environment(workdir: Path) -> dict[str, Any]:
    """Describe the machine and the versions under test."""
    packages = ("callmon", "aiohttp", "prometheus_client", "PyYAML", "multidict", "yarl")
    return {
        "machine": {
            **benchkit.machine(),
            "loadavg_at_start": os.getloadavg(),
            "workdir": str(workdir),
            "workdir_filesystem": _filesystem(workdir),
        },
        "versions": benchkit.versions(packages, sqlite=True),
    }


async def warm_up(servers: Mapping[str, Server], load: Load, ledgers: Mapping[str, Ledger]) -> None:
    """Send a few requests to each server; a monitor that refuses the bodies stops the bench."""
    async with session(0) as http:
        for name, server in servers.items():
            for _ in range(50):
                done = await post(
                    http, server.ingest, load, ledgers[name], load.next(ledgers[name])
                )
                if done.status != 200:
                    raise RuntimeError(f"{name} answered {done.status}: {done.answer[:500]!r}")


async def run(settings: Settings, report: dict[str, Any]) -> None:
    """Run every section in order, filling `report` as each finishes."""
    benchkit.cancel_on_sigterm()
    with benchkit.workdir("callmon-ingest-", settings.keep_workdir) as workdir:
        report.update(environment(workdir))
        probes = make_probes(LOAD_PROBES, REGIONS)
        targets = [f"https://sfu-{j:02d}.bench.example/whip" for j in range(LOAD_TARGETS)]
        load = Load(probes, targets, f"i{secrets.token_hex(3)}")
        report["load"] = {
            "probes": len(probes),
            "regions": list(REGIONS),
            "targets": len(targets),
            "body_bytes": load.sizes,
            "result_samples": RESULT_SAMPLES,
            "batch_samples": BATCH_SAMPLES,
            "resend_every": RESEND_EVERY,
        }
        ledgers = {"monitor": Ledger(keep_answers=True), "bare": Ledger(keep_answers=False)}
        async with (
            monitor_process(workdir, "monitor", probes) as monitor,
            bare_process(workdir) as bare,
        ):
            servers = {"monitor": monitor, "bare": bare}
            rss = {"start_mb": rss_mb(monitor.pid)}
            await warm_up(servers, load, ledgers)
            await benchkit.section(
                report, "throughput", throughput(settings, servers, load, ledgers)
            )
            if "error" in report["throughput"]:
                return
            best = report["throughput"]["best"]
            await benchkit.section(
                report,
                "half_rate",
                half_rate(settings, servers, load, ledgers, best["monitor_req_per_s"]),
            )
            rss.update(
                end_mb=rss_mb(monitor.pid),
                hwm_mb=peak_rss_mb(monitor.pid),
                items=ledgers["monitor"].acknowledged,
            )
            missed = not best["ok"] or not report["half_rate"].get("ok", False)
            if settings.profile == "always" or (settings.profile == "auto" and missed):
                await benchkit.section(
                    report,
                    "profile",
                    profile(
                        settings, servers, load, ledgers["monitor"], best["monitor_level"], workdir
                    ),
                )
        print("\n== resources", flush=True)
        report["resources"] = resources(report["throughput"], rss)
        assert monitor.database is not None
        await benchkit.section(
            report, "correctness", correctness(ledgers["monitor"], monitor.database, probes)
        )
        await benchkit.section(report, "scrape", scrape(settings, workdir))


def goals(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Collect every goal with its value and verdict."""
    found: list[dict[str, Any]] = []
    for name in ("throughput", "half_rate", "correctness", "scrape"):
        if name not in report or "error" in report[name]:
            error = report.get(name, {}).get("error", "did not run")
            found.append({"goal": f"section {name} ran", "value": error, "ok": False})
    t = report.get("throughput", {})
    if "best" in t:
        found.append(
            {
                "goal": f"durable ingest >= {GOAL_RATIO:.0%} of bare req/s (best level each: "
                f"{t['best']['monitor_level']} vs {t['best']['bare_level']})",
                "value": t["best"]["ratio"],
                "ok": t["best"]["ok"],
            }
        )
        for level in t["levels"]:
            found.append(
                {
                    "goal": f"durable ingest >= {GOAL_RATIO:.0%} of bare req/s at "
                    f"{level['level']} in flight",
                    "value": level["ratio"],
                    "ok": level["ok"],
                }
            )
    h = report.get("half_rate", {})
    if "ok" in h:
        found.append(
            {
                "goal": f"monitor p99 < {ms(GOAL_P99_S)} ms at {h['rate']:.0f} req/s "
                f"({HALF:.0%} of its max), s",
                "value": h["monitor"]["p99_s"],
                "ok": h["ok"],
            }
        )
    for check in report.get("correctness", {}).get("checks", []):
        if check["ok"] is not None:
            found.append({"goal": f"correctness: {check['check']}", **check})
            found[-1].pop("check")
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench, print tables, write the JSON; exit 1 if a goal failed, 130 on Ctrl-C."""
    settings = parse_settings(argv)
    started = time.monotonic()
    report = benchkit.new_report(settings)
    report["goals_set"] = {"ratio_min": GOAL_RATIO, "p99_max_s": GOAL_P99_S, "half_of_max": HALF}
    return benchkit.run_and_report(
        run(settings, report), report, settings.out, goals, started=started, digits=3
    )


if __name__ == "__main__":
    sys.exit(main())
