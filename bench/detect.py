"""Benchmark end-to-end detection: live faults on the reflector to incidents in the monitor.

    python bench/detect.py [--quick] [--out bench/results/detect.json]

Everything runs as separate processes on loopback, as an operator would run it, from a
temp dir: one `callmon monitor` (a probe token per agent with `interval_s: 5`, an
operator token, a fresh SQLite file), `callmon reflector` process(es), and `callmon agent`
processes whose targets are `mode: continuous` with `ice: {hosts: [127.0.0.1]}`. A system
is ready when every agent's /healthz answers and the monitor's /metrics shows
`callmon_last_result_timestamp_seconds` from every (target, region) since the start.

1. Detection (2 agents in two regions x 1 reflector): each fault is injected live with
   `PUT /admin/impairment?...` on the reflector (every call in progress and every new
   one); `GET /api/v1/incidents?state=open` is polled every 0.2 s with the operator token
   until an incident opens; the fault stays on until the incident for an expected rule is
   target-wide (both regions) and for at least MIN_HOLD_S, then `DELETE
   /admin/impairment` removes it and the time until no incident is open is measured.
   Between faults the bench waits until nothing is open and no rule window holds a
   breach (the monitor's `conditions` table, read-only) for QUIET_S. Faults: target down
   (`down=1`), loss 10 %, jitter 50 ms (`jitter_ms=150`: the reflector draws a uniform
   delay in [0, 150] ms per packet, whose RFC 3550 jitter is about 150/3 = 50 ms), audio
   delay 250 ms, video blackout of 2 s every 10 s. 3 repeats (quick: 1), interleaved.
   Goals: target down detected <= 5 s, degradations <= 15 s (worst repeat); the
   incident target-wide. Incidents of rules unrelated to the fault are counted and listed
   (from the monitor's timeline, read-only, so none is missed between polls).
2. Clean run (4 agents in four regions x 2 reflector processes, each agent continuous
   against both): 10 minutes (quick: 2) with no fault must open 0 incidents. Reported:
   samples received, unreliable seconds, the processes' CPU from /proc
   (bench/proctree.py; cores per call), and each rule's headroom (breaching seconds,
   worst value, the most breaches any k-of-n window held).

The logs of every process are scanned for warnings and errors. Prints tables and writes
every number to one JSON file. Stops everything it started on exit, also on Ctrl-C,
SIGTERM or failure. Exits 1 when a goal is missed, 130 when interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import re
import secrets
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import benchkit
import yaml
from benchkit import LOOPBACK, fmt, median, ms, ratio, spread, table, verdict
from proctree import Watched, Window, measure_window, stop_process
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import token_digest
from monitor.rules import DEFAULT_RULES, Rule, Source, load_rules, value_at

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_OUT = BENCH / "results" / "detect.json"

PROBE_INTERVAL_S = 5
"The probes' `interval_s` in the monitor's configuration (silence is judged in these)."
CALL_S = 600.0
"Length of each continuous call before the agent starts a fresh one (as `callmon demo`)."
POLL_S = 0.2
"Open incidents are polled this often while a fault is on and while it clears."
DETECT_TIMEOUT_S = 60.0
"A fault with no incident after this long counts as not detected; it is removed."
MIN_HOLD_S = 10.0
"A fault stays on at least this long, so slower rules it trips show too."
RESOLVE_TIMEOUT_S = 150.0
QUIET_S = 5.0
"Between faults: nothing open and no breach in any rule window for this long."
QUIET_MAX_S = 120.0
"Give up waiting for quiet after this long (and say so in the report)."
SETTLE_FROM_S = 2.0
"Seconds of a fault skipped when summarising what the probes saw (the transition)."
READY_TIMEOUT_S = 90.0
"Processes up and samples from every agent and target within this."
HEALTH_TIMEOUT_S = 60.0
AGENT_STOP_S = 15.0
"An agent ends its calls and spools their results on SIGTERM (its own limit is 10 s)."
SERVER_STOP_S = 5.0
CLEAN_POLL_S = 1.0
CALIBRATE_JITTER_MS = (150, 450)
"jitter_ms values checked against the reflector's own record of the delays it applied."
CALIBRATE_S = 15.0
"Media held by each calibration call."

GOAL_HARD_S = 5.0
GOAL_DEGRADED_S = 15.0

DETECT_REGIONS = ("eu-west", "us-east")
CLEAN_REGIONS = ("eu-west", "us-east", "ap-south", "sa-east")
CLEAN_TARGETS = 2

MEDIA_RULES = ("audio_gaps", "audio_long_gap", "video_freezes", "video_long_freeze")


@dataclass(frozen=True)
class Fault:
    name: str
    query: str
    "What is PUT on /admin/impairment."
    label: str
    kind: str
    "hard or degradation: which goal applies."
    expected: tuple[str, ...]
    "Rules made to catch this fault."
    related: tuple[str, ...]
    "Rules the fault may rightly trip as well (its real consequences)."
    note: str = ""

    @property
    def goal_s(self) -> float:
        return GOAL_HARD_S if self.kind == "hard" else GOAL_DEGRADED_S


FAULTS = (
    Fault(
        "down",
        "down=1",
        "target down",
        "hard",
        ("call_failed",),
        MEDIA_RULES,
        "live calls hung up, new calls 503; media stopping may trip the media rules",
    ),
    Fault(
        "loss",
        "loss=0.1",
        "loss 10 %",
        "degradation",
        ("audio_loss_high", "video_loss_high"),
        ("mos_low", "video_freezes", "video_long_freeze"),
        "10 % of outgoing RTP dropped (retransmissions too); the E-model counts loss",
    ),
    Fault(
        "jitter",
        "jitter_ms=150",
        "jitter 50 ms nominal",
        "degradation",
        ("audio_jitter_high", "video_jitter_high"),
        ("mos_low", "av_out_of_sync", "video_freezes"),
        "jitter_ms=150: uniform delay in [0, 150] ms per packet, RFC 3550 jitter ~150/3 = 50 ms "
        "if the delays were independent (the reflector keeps order: see the calibration)",
    ),
    Fault(
        "audio_delay",
        "audio_delay_ms=250",
        "audio delay 250 ms",
        "degradation",
        ("av_out_of_sync",),
        ("audio_gaps",),
        "audio 250 ms behind video: outside BT.1359 acceptability (-185 ms); audio pauses "
        "250 ms when it starts",
    ),
    Fault(
        "blackout",
        "video_blackout=0:2:10",
        "video blackout 2 s every 10 s",
        "degradation",
        ("video_long_freeze", "video_freezes"),
        (),
        "video echo stops for 2 s from the instant of the PUT, then every 10 s",
    ),
)


@dataclass(frozen=True)
class Settings:
    quick: bool
    reps: int
    "Repeats of each fault."
    clean_s: float
    "Length of the clean run's window."
    faults: tuple[str, ...]
    sections: tuple[str, ...]
    out: Path
    keep_workdir: bool


SECTIONS = ("detection", "clean")


def parse_settings(argv: Sequence[str] | None) -> Settings:
    """Turn the command line into settings; --quick shrinks repeats and the clean run."""
    parser = benchkit.argument_parser(
        "Benchmark detection: live faults on the reflector to monitor incidents.",
        "1 repeat, 2-minute clean run",
        DEFAULT_OUT,
    )
    parser.add_argument("--reps", type=int, help="repeats per fault (3; quick 1)")
    parser.add_argument("--clean", type=float, metavar="S", help="clean run (600; quick 120)")
    fault_names = [f.name for f in FAULTS]
    benchkit.add_subset(parser, "--faults", fault_names)
    benchkit.add_subset(parser, "--sections", SECTIONS)
    parser.add_argument("--keep-workdir", action="store_true", help="keep configs, DBs, logs")
    args = parser.parse_args(argv)
    faults = benchkit.subset(parser, args.faults, fault_names, "fault")
    sections = benchkit.subset(parser, args.sections, SECTIONS, "section")
    reps = args.reps or (1 if args.quick else 3)
    clean_s = args.clean or (120.0 if args.quick else 600.0)
    if reps < 1 or clean_s < 10:
        parser.error("--reps must be >= 1 and --clean >= 10 s")
    return Settings(
        quick=args.quick,
        reps=reps,
        clean_s=clean_s,
        faults=faults,
        sections=sections,
        out=args.out,
        keep_workdir=args.keep_workdir,
    )


# --- small helpers (the ones all benches share are in bench/benchkit.py) ------------------


def pct(value: float | None) -> str:
    """Format a fraction as a percentage with one decimal."""
    return "-" if value is None else f"{value * 100:.1f} %"


def span(s: Mapping[str, Any], digits: int = 1) -> str:
    """Format a spread as 'median (min-max)'."""
    if s["median"] is None:
        return "-"
    if s["n"] == 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


PORT_FLOOR = 20_000
_given: set[int] = set()
"Ports handed out by this process (each child gets its own)."


def free_port() -> int:
    """Return a TCP port on loopback that was free a moment ago, below the ephemeral range.

    An agent binds its listener seconds after it starts (it encodes its media first); a
    port from the ephemeral range may meanwhile be taken by any outgoing connection.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(500):
        port = random.randint(PORT_FLOOR, low - 1) if low - 1 > PORT_FLOOR else 0
        if port in _given:
            continue
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            found: int = s.getsockname()[1]
        _given.add(found)
        return found
    raise RuntimeError("no free TCP port on loopback")


def say(text: str) -> None:
    """Print a progress line at once."""
    print(text, flush=True)


# --- processes ---------------------------------------------------------------------------------


@dataclass
class Child:
    """One process the bench started."""

    name: str
    role: str
    "monitor, reflector or agent."
    process: asyncio.subprocess.Process
    log: Path
    base: str
    "Base URL of its HTTP listener."
    region: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid


async def spawn(folder: Path, name: str, role: str, args: Sequence[str], port: int) -> Child:
    """Start `callmon ARGS` in `folder`, its output in NAME.log, in its own session."""
    log = folder / f"{name}.log"
    process = await benchkit.start_logged(
        [sys.executable, "-m", "callmon.cli", *args], log, cwd=folder
    )
    return Child(name, role, process, log, f"http://{LOOPBACK}:{port}")


async def wait_healthy(http: aiohttp.ClientSession, child: Child, timeout_s: float) -> float:
    """Wait until the child's /healthz answers 200; return how long it took."""

    async def healthy() -> bool:
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            async with http.get(child.base + "/healthz") as response:
                return response.status == 200
        return False

    waited = await benchkit.wait_ready(child.process, healthy, timeout_s, 0.1)
    if waited is None:
        raise RuntimeError(f"{child.name} did not come up:\n{benchkit.log_tail(child.log)}")
    return waited


BIND_ATTEMPTS = 3


async def start_child(
    http: aiohttp.ClientSession,
    folder: Path,
    name: str,
    role: str,
    args_for: Callable[[int], list[str]],
    children: list[Child],
) -> tuple[Child, float]:
    """Start a child on a fresh port, wait for its /healthz; again if the port was taken.

    Returns the child and how long it took to answer. Every child started is in
    `children` (for stopping), a failed attempt's log is kept as NAME.attemptK.log.
    """
    for attempt in range(1, BIND_ATTEMPTS + 1):
        port = free_port()
        child = await spawn(folder, name, role, args_for(port), port)
        children.append(child)
        try:
            return child, await wait_healthy(http, child, HEALTH_TIMEOUT_S)
        except RuntimeError:
            taken = "address already in use" in child.log.read_text(errors="replace")
            if attempt == BIND_ATTEMPTS or child.process.returncode is None or not taken:
                raise
            children.remove(child)
            child.log.rename(folder / f"{name}.attempt{attempt}.log")
            say(f"  {name}: port {port} was taken before it bound; starting it again")
    raise AssertionError("unreachable")


async def stop_all(children: Sequence[Child]) -> dict[str, int | None]:
    """Stop agents (together), then reflectors, then the monitor; return exit codes."""
    codes: dict[str, int | None] = {}
    for role, timeout_s in (("agent", AGENT_STOP_S), ("reflector", SERVER_STOP_S)):
        group = [c for c in children if c.role == role]
        results = await asyncio.gather(*(stop_process(c.process, timeout_s) for c in group))
        codes.update({c.name: code for c, code in zip(group, results, strict=True)})
    for child in children:
        if child.role == "monitor":
            codes[child.name] = await stop_process(child.process, SERVER_STOP_S)
    return codes


@dataclass
class System:
    """A running monitor, reflectors and agents, and how to reach them."""

    folder: Path
    http: aiohttp.ClientSession
    monitor: Child
    database: Path
    operator: str
    reflectors: list[Child]
    agents: list[Child]
    targets: list[str]
    "WHIP URLs, one per reflector (the monitor's `target` label)."
    started_wall: float
    ready_wall: float = 0.0
    startup: dict[str, Any] = field(default_factory=dict)
    exit_codes: dict[str, int | None] = field(default_factory=dict)

    @property
    def children(self) -> list[Child]:
        return [self.monitor, *self.reflectors, *self.agents]

    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.operator}"}

    async def open_incidents(self) -> list[dict[str, Any]]:
        """Return the open incidents, as an operator lists them."""
        url = self.monitor.base + "/api/v1/incidents?state=open&limit=1000"
        async with self.http.get(url, headers=self.auth()) as response:
            response.raise_for_status()
            data: dict[str, Any] = await response.json()
            found: list[dict[str, Any]] = data["incidents"]
            return found

    async def incident(self, incident_id: int) -> dict[str, Any]:
        """Return one ticket: incident, timeline, evidence."""
        url = f"{self.monitor.base}/api/v1/incidents/{incident_id}"
        async with self.http.get(url, headers=self.auth()) as response:
            response.raise_for_status()
            data: dict[str, Any] = await response.json()
            return data

    async def impair(self, query: str | None) -> float:
        """PUT (or with None, DELETE) the reflectors' live impairment; return the round trip."""
        start = time.monotonic()
        for reflector in self.reflectors:
            url = reflector.base + "/admin/impairment" + (f"?{query}" if query else "")
            method = "PUT" if query else "DELETE"
            async with self.http.request(method, url) as response:
                if response.status != 200:
                    raise RuntimeError(f"{method} {url}: {response.status} {await response.text()}")
        return time.monotonic() - start

    async def last_results(self) -> dict[tuple[str, str], float]:
        """Return callmon_last_result_timestamp_seconds by (target, region) from /metrics."""
        async with self.http.get(self.monitor.base + "/metrics") as response:
            response.raise_for_status()
            text = await response.text()
        found: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            if family.name != "callmon_last_result_timestamp_seconds":
                continue
            for s in family.samples:
                found[(s.labels["target"], s.labels["region"])] = float(s.value)
        return found

    async def agent_health(self) -> dict[str, Any]:
        """Return each agent's /healthz."""
        out: dict[str, Any] = {}
        for agent in self.agents:
            try:
                async with self.http.get(agent.base + "/healthz") as response:
                    out[agent.name] = await response.json()
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                out[agent.name] = {"error": f"{exc.__class__.__name__}: {exc}"}
        return out

    async def agent_interruptions(self) -> dict[str, float]:
        """Return each agent's callmon_agent_interruptions_total, summed over targets."""
        out: dict[str, float] = {}
        for agent in self.agents:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                async with self.http.get(agent.base + "/metrics") as response:
                    text = await response.text()
                out[agent.name] = sum(
                    float(s.value)
                    for family in text_string_to_metric_families(text)
                    if family.name == "callmon_agent_interruptions"
                    for s in family.samples
                    if s.name.endswith("_total")
                )
        return out


def write_monitor_config(
    folder: Path, port: int, tokens: Mapping[str, str], operator: str, database: Path
) -> Path:
    """Write monitor.yaml (a probe per region, interval_s 5, an operator); return its path."""
    config = folder / "monitor.yaml"
    document = {
        "listen": f"{LOOPBACK}:{port}",
        "database": str(database),
        "probes": [
            {
                "name": f"agent-{region}",
                "region": region,
                "token_sha256": token_digest(token),
                "interval_s": PROBE_INTERVAL_S,
            }
            for region, token in tokens.items()
        ],
        "operators": [{"name": "bench", "token_sha256": token_digest(operator)}],
    }
    config.write_text(yaml.safe_dump(document, sort_keys=False))
    return config


def write_agent_config(
    folder: Path, region: str, token: str, monitor: str, port: int, targets: Sequence[str]
) -> Path:
    """Write agent-REGION.yaml: continuous calls to every target, loopback candidates."""
    document = {
        "monitor": {"url": monitor, "token": token},
        "region": region,
        "spool": str(folder / f"agent-{region}.spool"),
        "listen": f"{LOOPBACK}:{port}",
        "targets": [
            {
                "name": f"reflector-{j}",
                "url": url,
                "mode": "continuous",
                "duration_s": CALL_S,
                "ice": {"hosts": [LOOPBACK]},
            }
            for j, url in enumerate(targets)
        ],
    }
    path = folder / f"agent-{region}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@contextlib.asynccontextmanager
async def running_system(
    workdir: Path, tag: str, regions: Sequence[str], reflectors: int
) -> AsyncIterator[System]:
    """Start reflectors, the monitor and one agent per region; wait until samples flow."""
    folder = workdir / tag
    folder.mkdir(parents=True)
    children: list[Child] = []
    system: System | None = None
    started_wall = time.time()
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        try:
            startup: dict[str, Any] = {}
            for j in range(reflectors):

                def reflector_args(port: int) -> list[str]:
                    return ["reflector", "--listen", f"{LOOPBACK}:{port}", "--ice-host", LOOPBACK]

                name = f"reflector-{j}"
                _, startup[name] = await start_child(
                    http, folder, name, "reflector", reflector_args, children
                )
            targets = [r.base + "/whip" for r in children]
            tokens = {region: "cm_" + secrets.token_urlsafe(24) for region in regions}
            operator = "cm_" + secrets.token_urlsafe(24)
            database = folder / "monitor.sqlite3"

            def monitor_args(port: int) -> list[str]:
                config = write_monitor_config(folder, port, tokens, operator, database)
                return ["monitor", "--config", str(config)]

            monitor, startup["monitor"] = await start_child(
                http, folder, "monitor", "monitor", monitor_args, children
            )

            def agent_args(region: str) -> Callable[[int], list[str]]:
                def args(port: int) -> list[str]:
                    token = tokens[region]
                    path = write_agent_config(folder, region, token, monitor.base, port, targets)
                    return ["agent", "--config", str(path)]

                return args

            started = await asyncio.gather(
                *(
                    start_child(http, folder, f"agent-{r}", "agent", agent_args(r), children)
                    for r in regions
                )
            )
            agents = []
            for region, (agent, waited) in zip(regions, started, strict=True):
                agent.region = region
                agents.append(agent)
                startup[agent.name] = waited
            system = System(
                folder=folder,
                http=http,
                monitor=monitor,
                database=database,
                operator=operator,
                reflectors=[c for c in children if c.role == "reflector"],
                agents=agents,
                targets=targets,
                started_wall=started_wall,
            )
            await wait_for_samples(system, regions)
            system.ready_wall = time.time()
            startup["ready_s"] = system.ready_wall - started_wall
            system.startup = startup
            yield system
        finally:
            codes = await stop_all(children)
            if system is not None:
                system.exit_codes = codes


async def wait_for_samples(system: System, regions: Sequence[str]) -> None:
    """Wait until the monitor has a result from every (target, region) since the start."""
    wanted = {(t, r) for t in system.targets for r in regions}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        seen = await system.last_results()
        missing = {k for k in wanted if seen.get(k, 0.0) < system.started_wall}
        if not missing:
            return
        dead = [c.name for c in system.children if c.process.returncode is not None]
        if dead or time.monotonic() > deadline:
            tails = "\n".join(
                f"--- {a.name}\n{benchkit.log_tail(a.log, 15)}" for a in system.agents
            )
            raise RuntimeError(
                f"no samples from {sorted(missing)} (exited: {dead or 'none'}):\n{tails}"
            )
        await asyncio.sleep(0.5)


# --- the monitor's SQLite file, read-only --------------------------------------------------------


def read_rows(database: Path, sql: str, params: tuple[float, ...] = ()) -> list[Any]:
    """Run one query on the monitor's database and return its rows.

    The file is opened read-only and closed at once: the monitor keeps writing to it (in
    WAL mode) while the bench reads.
    """
    location = f"file:{database}?mode=ro"
    with contextlib.closing(sqlite3.connect(location, uri=True, timeout=10)) as db:
        return db.execute(sql, params).fetchall()


def events_between(database: Path, start: float, end: float) -> list[dict[str, Any]]:
    """Return timeline events (with their incident's rule and scope) in [start, end]."""
    rows = read_rows(
        database,
        "SELECT e.at, e.kind, e.text, i.id, i.rule, i.scope_kind, i.target, i.region,"
        " i.severity FROM events e JOIN incidents i ON i.id = e.incident_id"
        " WHERE e.at >= ? AND e.at <= ? ORDER BY e.id",
        (start, end),
    )
    keys = ("at", "kind", "text", "incident", "rule", "scope", "target", "region", "severity")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def breaching_conditions(database: Path) -> list[dict[str, Any]]:
    """Return rule windows that hold at least one breach, or fire."""
    rows = read_rows(database, "SELECT key, state FROM conditions")
    out = []
    for key, state in rows:
        data = json.loads(state)
        if data.get("firing") or any(data.get("recent", [])):
            out.append(
                {
                    "key": key,
                    "firing": data.get("firing"),
                    "breaches": sum(bool(v) for v in data.get("recent", [])),
                    "of": len(data.get("recent", [])),
                    "last_value": data.get("last_value"),
                }
            )
    return out


@dataclass(frozen=True)
class StoredSample:
    probe: str
    region: str
    target: str
    call_id: str
    at: float
    t_s: float
    reliable: bool
    body: dict[str, Any]


def samples_between(database: Path, start: float, end: float) -> list[StoredSample]:
    """Return the seconds the monitor received in [start, end], in order of arrival."""
    rows = read_rows(
        database,
        "SELECT probe, region, target, call_id, at, t_s, reliable, body FROM samples"
        " WHERE at >= ? AND at <= ? ORDER BY at, t_s",
        (start, end),
    )
    return [
        StoredSample(p, r, t, c, at, t_s, bool(rel), json.loads(body))
        for p, r, t, c, at, t_s, rel, body in rows
    ]


def results_between(database: Path, start: float, end: float) -> list[dict[str, Any]]:
    """Return the call results (not sample batches) received in [start, end]."""
    rows = read_rows(
        database,
        "SELECT probe, region, target, received_at, status, body FROM results"
        " WHERE kind = 'result' AND received_at >= ? AND received_at <= ?"
        " ORDER BY received_at",
        (start, end),
    )
    out = []
    for probe, region, target, at, status, body in rows:
        document = json.loads(body)
        failure = document.get("failure") or {}
        out.append(
            {
                "probe": probe,
                "region": region,
                "target": target,
                "received_at": at,
                "status": status,
                "failure_phase": failure.get("phase"),
                "failure_reason": failure.get("reason"),
                "media_s": value_at(document, "summary.media_s"),
                "degradations": [d.get("metric") for d in document.get("degradations", [])],
            }
        )
    return out


# --- what the probes saw ------------------------------------------------------------------------

SEEN_METRICS = (
    ("audio_jitter_s", "audio.jitter_s"),
    ("video_jitter_s", "video.jitter_s"),
    ("audio_loss", "audio.loss"),
    ("video_loss", "video.loss"),
    ("av_offset_s", "av_offset_s"),
    ("rtt_s", "rtt_s"),
    ("mos", "mos"),
)


def seen_by_probes(samples: Sequence[StoredSample]) -> dict[str, Any]:
    """Summarise reliable seconds: medians of the rule metrics, freezes and gaps counted."""
    reliable = [s.body for s in samples if s.reliable]
    out: dict[str, Any] = {"samples": len(samples), "reliable": len(reliable)}
    for name, path in SEEN_METRICS:
        values = [v for v in (value_at(b, path) for b in reliable) if isinstance(v, int | float)]
        out[name] = median(values)
        out[name + "_max"] = max(values, default=None)
    out["video_freezes"] = sum(value_at(b, "video.freezes") or 0 for b in reliable)
    out["video_freeze_s_max"] = max(
        (value_at(b, "video.freeze_s") or 0.0 for b in reliable), default=None
    )
    out["audio_gaps"] = sum(value_at(b, "audio.gaps") or 0 for b in reliable)
    out["media_packets"] = sum(
        (value_at(b, "audio.packets") or 0) + (value_at(b, "video.packets") or 0) for b in reliable
    )
    return out


# --- 1. detection -------------------------------------------------------------------------------


@dataclass
class Seen:
    """One incident (one opening or reopening of it) seen open by the poller."""

    id: int
    reopened: int
    rule: str
    scope: str
    region: str
    target: str
    severity: str
    first_seen_s: float
    "Since injection."
    phase: str
    "fault (while injected) or recovery (after removal)."
    details: dict[str, Any]
    resolved_s: float | None = None
    "Since injection: the first poll that no longer listed it."

    def brief(self) -> str:
        where = "both regions" if self.scope == "target" else self.region
        return f"{self.rule} [{self.scope}: {where}]"


def note_incidents(
    seen: dict[tuple[int, int], Seen],
    listed: Sequence[Mapping[str, Any]],
    now_s: float,
    phase: str,
) -> list[Seen]:
    """Record incidents listed open; mark the ones no longer listed; return the new ones."""
    new = []
    current = set()
    for incident in listed:
        key = (int(incident["id"]), int(incident["reopened"]))
        current.add(key)
        if key not in seen:
            scope = incident["scope"]
            seen[key] = Seen(
                id=key[0],
                reopened=key[1],
                rule=str(incident["rule"]),
                scope=str(scope["kind"]),
                region=str(scope["region"]),
                target=str(scope["target"]),
                severity=str(incident["severity"]),
                first_seen_s=now_s,
                phase=phase,
                details=dict(incident.get("details", {})),
            )
            new.append(seen[key])
    for key, s in seen.items():
        if key not in current and s.resolved_s is None:
            s.resolved_s = now_s
    return new


async def wait_quiet(system: System) -> dict[str, Any]:
    """Wait until nothing is open and no rule window holds a breach, for QUIET_S."""
    start = time.monotonic()
    calm_since: float | None = None
    leftovers: list[dict[str, Any]] = []
    listed: list[dict[str, Any]] = []
    while True:
        listed = await system.open_incidents()
        leftovers = await asyncio.to_thread(breaching_conditions, system.database)
        now = time.monotonic()
        if listed or leftovers:
            calm_since = None
        elif calm_since is None:
            calm_since = now
        if calm_since is not None and now - calm_since >= QUIET_S:
            return {"waited_s": now - start, "quiet": True}
        if now - start > QUIET_MAX_S:
            return {
                "waited_s": now - start,
                "quiet": False,
                "open": [f"{i['rule']} [{i['scope']['kind']}]" for i in listed],
                "conditions": leftovers,
            }
        await asyncio.sleep(0.5)


async def poll_until(
    system: System,
    seen: dict[tuple[int, int], Seen],
    t0: float,
    phase: str,
    done: Callable[[Sequence[Mapping[str, Any]], float], bool],
    limit_s: float,
) -> float | None:
    """Poll open incidents every POLL_S until `done(listed, elapsed)`; return when, or None."""
    start = time.monotonic()
    k = 0
    while True:
        listed = await system.open_incidents()
        now = time.monotonic()
        note_incidents(seen, listed, now - t0, phase)
        if done(listed, now - start):
            return now - t0
        if now - start > limit_s:
            return None
        k += 1
        await asyncio.sleep(max(0.0, start + k * POLL_S - time.monotonic()))


async def run_fault(system: System, fault: Fault, rep: int) -> dict[str, Any]:
    """Inject one fault live, time the first incident, remove it, time the resolution."""
    quiet = await wait_quiet(system)
    seen: dict[tuple[int, int], Seen] = {}
    wall0 = time.time()
    t0 = time.monotonic()
    put_s = await system.impair(fault.query)

    def wide(listed: Sequence[Mapping[str, Any]]) -> bool:
        return any(i["rule"] in fault.expected and i["scope"]["kind"] == "target" for i in listed)

    def hold_done(listed: Sequence[Mapping[str, Any]], elapsed: float) -> bool:
        if elapsed >= DETECT_TIMEOUT_S:
            return True
        return wide(listed) and elapsed >= MIN_HOLD_S

    await poll_until(system, seen, t0, "fault", hold_done, DETECT_TIMEOUT_S)
    removed_s = time.monotonic() - t0
    removed_wall = time.time()
    delete_s = await system.impair(None)

    def cleared(listed: Sequence[Mapping[str, Any]], elapsed: float) -> bool:
        return not listed

    resolved_at = await poll_until(system, seen, t0, "recovery", cleared, RESOLVE_TIMEOUT_S)
    end_wall = time.time()
    events = await asyncio.to_thread(events_between, system.database, wall0, end_wall)
    samples = await asyncio.to_thread(
        samples_between, system.database, wall0 + SETTLE_FROM_S, removed_wall
    )
    record = judge_run(fault, rep, seen, events, wall0, removed_s, resolved_at)
    record["end_wall"] = end_wall
    # details of incidents the poller never saw open (opened and closed between polls)
    for entry in record["incidents"]:
        if entry["details"] is None:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                ticket = await system.incident(entry["id"])
                entry["details"] = ticket["incident"]["details"]
    record.update(
        loadavg=os.getloadavg(),
        quiet_before=quiet,
        put_s=put_s,
        delete_s=delete_s,
        seen=seen_by_probes(samples),
        seen_by_region={
            region: seen_by_probes([s for s in samples if s.region == region])
            for region in sorted({s.region for s in samples})
        },
    )
    return record


def judge_run(
    fault: Fault,
    rep: int,
    seen: Mapping[tuple[int, int], Seen],
    events: Sequence[Mapping[str, Any]],
    wall0: float,
    removed_s: float,
    resolved_s: float | None,
) -> dict[str, Any]:
    """Turn one run's polls and timeline into detection times and incident lists."""
    ordered = sorted(seen.values(), key=lambda s: (s.first_seen_s, s.id))
    first = ordered[0] if ordered else None
    expected = [s for s in ordered if s.rule in fault.expected]
    first_expected = expected[0] if expected else None
    wide = [s for s in expected if s.scope == "target"]
    opened = [e for e in events if e["kind"] in ("opened", "reopened")]
    opened_expected = [e for e in opened if e["rule"] in fault.expected]
    opened_wide = [e for e in opened_expected if e["scope"] == "target"]
    incidents = []
    for e in opened:  # every opening in the timeline, polled or not
        # the poll that first listed it came after the commit, so after the event's instant
        polled = min(
            (s for s in ordered if s.id == e["incident"] and s.first_seen_s >= e["at"] - wall0),
            key=lambda s: s.first_seen_s,
            default=None,
        )
        incidents.append(
            {
                "id": e["incident"],
                "event": e["kind"],
                "rule": e["rule"],
                "scope": e["scope"],
                "region": e["region"],
                "target": e["target"],
                "severity": e["severity"],
                "opened_s": e["at"] - wall0,
                "phase": "fault" if e["at"] - wall0 <= removed_s else "recovery",
                "polled_s": None if polled is None else polled.first_seen_s,
                "class": classify(fault, e["rule"]),
                "details": None if polled is None else polled.details,
            }
        )
    merged = [e for e in events if e["kind"] == "resolved" and "merged into" in e["text"]]
    return {
        "fault": fault.name,
        "rep": rep,
        "injected_wall": wall0,
        "first_s": None if first is None else first.first_seen_s,
        "first_rule": None if first is None else first.rule,
        "first_scope": None if first is None else first.scope,
        "first_region": None if first is None else first.region,
        "detect_s": None if first_expected is None else first_expected.first_seen_s,
        "detect_rule": None if first_expected is None else first_expected.rule,
        "detect_scope": None if first_expected is None else first_expected.scope,
        "detect_event_s": min((e["at"] - wall0 for e in opened_expected), default=None),
        "target_wide_s": None if not wide else wide[0].first_seen_s,
        "target_wide_event_s": min((e["at"] - wall0 for e in opened_wide), default=None),
        "target_wide": bool(wide),
        "held_s": removed_s,
        "resolve_s": None if resolved_s is None else resolved_s - removed_s,
        "resolved": resolved_s is not None,
        "merged_into_wider": len(merged),
        "incidents": incidents,
        "rules_fired": sorted({i["rule"] for i in incidents}),
        "unrelated": [i for i in incidents if i["class"] == "unrelated"],
        "timeline": [
            {**e, "at_s": e["at"] - wall0} for e in events if e["kind"] not in ("comment",)
        ],
    }


def classify(fault: Fault, rule: str) -> str:
    """Say whether a rule is expected, related or unrelated for a fault."""
    if rule in fault.expected:
        return "expected"
    return "related" if rule in fault.related else "unrelated"


async def attach_late(system: System, fault: Fault, run: dict[str, Any], until: float) -> None:
    """Add incidents that opened after a run's last poll and before `until` to the run.

    They opened after every incident had resolved: a reopening, or a rule that took long.
    """
    events = await asyncio.to_thread(events_between, system.database, run["end_wall"], until)
    late = []
    for e in events:
        if e["kind"] not in ("opened", "reopened"):
            continue
        details = None
        with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
            details = (await system.incident(e["incident"]))["incident"]["details"]
        late.append(
            {
                "id": e["incident"],
                "event": e["kind"],
                "rule": e["rule"],
                "scope": e["scope"],
                "region": e["region"],
                "target": e["target"],
                "severity": e["severity"],
                "opened_s": e["at"] - run["injected_wall"],
                "phase": "late",
                "polled_s": None,
                "class": classify(fault, e["rule"]),
                "details": details,
            }
        )
    run["incidents"].extend(late)
    run["late_incidents"] = len(late)
    run["rules_fired"] = sorted({i["rule"] for i in run["incidents"]})
    run["unrelated"] = [i for i in run["incidents"] if i["class"] == "unrelated"]


def fault_summary(fault: Fault, runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Aggregate one fault's repeats."""
    detect = [r["detect_s"] for r in runs if r["detect_s"] is not None]
    wide = [r["target_wide_s"] for r in runs if r["target_wide_s"] is not None]
    resolve = [r["resolve_s"] for r in runs if r["resolve_s"] is not None]
    first_rules = Counter(f"{r['first_rule']} [{r['first_scope']}]" for r in runs)
    fired: Counter[str] = Counter()
    for r in runs:
        fired.update(r["rules_fired"])
    unrelated = [{"fault": fault.name, "rep": r["rep"], **u} for r in runs for u in r["unrelated"]]
    detected_all = len(detect) == len(runs)
    worst = max(detect, default=None)
    return {
        "fault": fault.name,
        "label": fault.label,
        "query": fault.query,
        "note": fault.note,
        "kind": fault.kind,
        "expected_rules": list(fault.expected),
        "related_rules": list(fault.related),
        "goal_s": fault.goal_s,
        "runs": len(runs),
        "detect_s": spread(detect),
        "detect_event_s": spread(
            [r["detect_event_s"] for r in runs if r["detect_event_s"] is not None]
        ),
        "first_any_s": spread([r["first_s"] for r in runs if r["first_s"] is not None]),
        "target_wide_s": spread(wide),
        "resolve_s": spread(resolve),
        "first_rules": dict(first_rules),
        "rules_fired": dict(fired),
        "target_wide_all": all(r["target_wide"] for r in runs),
        "resolved_all": all(r["resolved"] for r in runs),
        "unrelated": unrelated,
        "detected_all": detected_all,
        "ok": detected_all and worst is not None and worst <= fault.goal_s,
        "seen": {
            key: median([r["seen"][key] for r in runs if r["seen"].get(key) is not None])
            for key in (
                "audio_jitter_s",
                "video_jitter_s",
                "audio_loss",
                "video_loss",
                "av_offset_s",
                "mos",
                "rtt_s",
            )
        }
        | {
            "video_freezes": sum(r["seen"]["video_freezes"] for r in runs),
            "video_freeze_s_max": max(
                (r["seen"]["video_freeze_s_max"] or 0.0 for r in runs), default=None
            ),
            "audio_gaps": sum(r["seen"]["audio_gaps"] for r in runs),
            "samples": sum(r["seen"]["samples"] for r in runs),
            "reliable": sum(r["seen"]["reliable"] for r in runs),
        },
    }


def print_detection(section: Mapping[str, Any]) -> None:
    """Print the per-fault summary, what the probes saw, every run and unrelated incidents."""
    rows = []
    for f in section["faults"]:
        rows.append(
            [
                f["label"],
                f["query"],
                f"<= {f['goal_s']:g}",
                span(f["detect_s"]),
                span(f["target_wide_s"]),
                span(f["resolve_s"]),
                ", ".join(f"{k} x{v}" for k, v in f["first_rules"].items()),
                fmt(f["target_wide_all"]),
                ", ".join(f"{k} x{v}" for k, v in sorted(f["rules_fired"].items())),
                str(len(f["unrelated"])),
                verdict(f["ok"]),
            ]
        )
    print(
        table(
            f"1. Detection: {len(section['regions'])} agents ({', '.join(section['regions'])}) x "
            f"1 reflector, faults injected live, open incidents polled every {POLL_S:g} s; "
            f"seconds, median (min-max) of {section['reps']} repeat(s)",
            [
                "fault",
                "PUT /admin/impairment?",
                "goal s",
                "detect s",
                "target-wide s",
                "resolve s",
                "first incident [scope]",
                "wide",
                "rules fired (runs)",
                "unrelated",
                "verdict",
            ],
            rows,
        )
    )
    print(
        "  detect = injection to the first poll listing an incident of an expected rule; "
        "target-wide = to one\n  listing it with scope target (both regions); resolve = "
        "removal to no incident open. Goal judged\n  on the worst repeat.\n"
        "  jitter 50 ms nominal: jitter_ms=150 is injected (a uniform [0, 150] ms delay per "
        "packet, N/3 = 50 ms of\n  RFC 3550 jitter if the delays were independent). The "
        "reflector keeps packet order, so consecutive\n  delays are correlated and less "
        "jitter is applied: see what the probes saw and the calibration below."
    )
    rows = []
    for f in section["faults"]:
        s = f["seen"]
        rows.append(
            [
                f["label"],
                ms(s["audio_jitter_s"]),
                ms(s["video_jitter_s"]),
                pct(s["audio_loss"]),
                pct(s["video_loss"]),
                ms(s["av_offset_s"]),
                ms(s["rtt_s"]),
                fmt(s["mos"]),
                str(s["video_freezes"]),
                fmt(s["video_freeze_s_max"]),
                str(s["audio_gaps"]),
                f"{s['reliable']}/{s['samples']}",
            ]
        )
    print(
        table(
            f"   What the probes saw while the fault was on (from {SETTLE_FROM_S:g} s after "
            "injection; medians of reliable seconds, median over repeats)",
            [
                "fault",
                "audio jitter ms",
                "video jitter ms",
                "audio loss",
                "video loss",
                "A/V ms",
                "RTT ms",
                "MOS",
                "freezes",
                "max freeze s",
                "audio gaps",
                "reliable/seconds",
            ],
            rows,
        )
    )
    rows = []
    for r in section["runs"]:
        rows.append(
            [
                f"{r['fault']} #{r['rep']}",
                fmt(r["quiet_before"]["waited_s"], 1)
                + ("" if r["quiet_before"]["quiet"] else " (not quiet)"),
                fmt(r["first_s"]),
                f"{r['first_rule']} [{r['first_scope']}"
                + (f" {r['first_region']}" if r["first_scope"] == "target_region" else "")
                + "]",
                fmt(r["detect_s"]),
                fmt(r["detect_event_s"]),
                fmt(r["target_wide_s"]),
                fmt(r["held_s"], 1),
                fmt(r["resolve_s"]),
                ", ".join(
                    f"{i['rule']}[{'wide' if i['scope'] == 'target' else i['region']}"
                    f"{'' if i['phase'] == 'fault' else ',' + i['phase']}]"
                    for i in r["incidents"]
                ),
            ]
        )
    print(
        table(
            "   Every run, in the order run (seconds from injection; event = the monitor's own "
            "timeline)",
            [
                "run",
                "quiet wait",
                "first",
                "first incident",
                "detect",
                "detect (event)",
                "wide",
                "held",
                "resolve",
                "incidents opened [wide: target-wide; recovery: after removal; late: later]",
            ],
            rows,
        )
    )
    unrelated = [u for f in section["faults"] for u in f["unrelated"]]
    if unrelated:
        rows = [
            [
                u["rule"],
                f"{u['fault']} #{u['rep']}",
                u["scope"] + ("" if u["scope"] == "target" else f" {u['region']}"),
                fmt(u["opened_s"]),
                u["phase"],
                u["severity"],
                describe_values(u["details"]),
            ]
            for u in unrelated
        ]
        print(
            table(
                "   Incidents of rules unrelated to the injected fault",
                ["rule", "fault", "scope", "opened s", "phase", "severity", "values (details)"],
                rows,
            )
        )
    else:
        print("  no incident opened for a rule unrelated to the injected fault")


def describe_values(details: Mapping[str, Any] | None) -> str:
    """Say, from an incident's details, each member's value against the condition."""
    if not details:
        return "-"
    members = ", ".join(
        f"{c.get('region')}: {c.get('value')!r} ({c.get('breaches')}/{c.get('evaluations')})"
        for c in details.get("conditions", [])
    )
    return f"{details.get('condition')}; {members}"


async def calibrate_jitter(system: System) -> list[dict[str, Any]]:
    """Hold a `callmon probe` call per CALIBRATE_JITTER_MS with the jitter in its own URL.

    The call's own impairment is untouched by live changes and the agents' calls are
    untouched by it. The reflector's record of the call (GET on its WHIP resource) is the
    ground truth: the RFC 3550 jitter of the delays it really applied, next to N/3 and to
    what the probe measured.
    """
    out = []
    for jitter_ms in CALIBRATE_JITTER_MS:
        url = f"{system.targets[0]}?jitter_ms={jitter_ms}&seed=7"
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "callmon.cli",
            "probe",
            url,
            "--duration",
            f"{CALIBRATE_S:g}",
            "--json",
            "--ice-host",
            LOOPBACK,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            stdout, stderr = await asyncio.wait_for(process.communicate(), CALIBRATE_S + 60)
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
        entry: dict[str, Any] = {"jitter_ms": jitter_ms, "n_over_3_s": jitter_ms / 3000}
        try:
            result = json.loads(stdout)
        except ValueError:
            entry["error"] = f"probe exit {process.returncode}: {stderr.decode()[-500:]}"
            out.append(entry)
            continue
        summary = result["summary"]
        for kind in ("audio", "video"):
            entry[f"{kind}_measured_s"] = summary[kind]["jitter_s"]
            entry[f"{kind}_measured_p90_s"] = summary[kind]["jitter_p90_s"]
        entry["status"] = result["status"]
        session = result["target"]["session"]
        if session:
            async with system.http.get(urllib.parse.urljoin(url, session)) as response:
                record = await response.json()
            for kind in ("audio", "video"):
                applied = record["applied"][kind]
                entry[f"{kind}_applied_s"] = applied.get("rfc3550_jitter_s")
                entry[f"{kind}_delay_mean_s"] = applied.get("delay_mean_s")
                entry[f"{kind}_delay_max_s"] = applied.get("delay_max_s")
        out.append(entry)
    return out


def print_calibration(rows: Sequence[Mapping[str, Any]]) -> None:
    """Print what jitter_ms=N applies and what the probe measured."""
    print(
        table(
            f"   Jitter calibration: one {CALIBRATE_S:g} s `callmon probe` call per value, the "
            "jitter in its own URL; applied = the reflector's own record of the call",
            [
                "jitter_ms",
                "N/3 ms",
                "applied audio ms",
                "measured audio ms (p90)",
                "applied video ms",
                "measured video ms (p90)",
                "mean delay a/v ms",
            ],
            [
                [
                    str(r["jitter_ms"]),
                    ms(r["n_over_3_s"]),
                    ms(r.get("audio_applied_s")),
                    f"{ms(r.get('audio_measured_s'))} ({ms(r.get('audio_measured_p90_s'))})",
                    ms(r.get("video_applied_s")),
                    f"{ms(r.get('video_measured_s'))} ({ms(r.get('video_measured_p90_s'))})",
                    f"{ms(r.get('audio_delay_mean_s'))} / {ms(r.get('video_delay_mean_s'))}",
                ]
                if "error" not in r
                else [str(r["jitter_ms"]), r["error"][:80], "", "", "", "", ""]
                for r in rows
            ],
        )
    )


async def detection(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Measure section 1: every fault, repeated, on 2 agents x 1 reflector."""
    faults = [f for f in FAULTS if f.name in settings.faults]
    runs: list[dict[str, Any]] = []
    async with running_system(workdir, "detection", DETECT_REGIONS, 1) as system:
        say(f"  ready after {system.startup['ready_s']:.1f} s; startup: {system.startup}")
        by_name = {f.name: f for f in faults}
        for rep in range(1, settings.reps + 1):
            for fault in faults:
                say(f"  {fault.name} #{rep}: waiting for quiet, then {fault.query}")
                run = await run_fault(system, fault, rep)
                if runs:
                    previous = runs[-1]
                    await attach_late(
                        system, by_name[previous["fault"]], previous, run["injected_wall"]
                    )
                runs.append(run)
                say(
                    f"    first {fmt(run['first_s'])} s ({run['first_rule']} "
                    f"[{run['first_scope']}]), expected {fmt(run['detect_s'])} s, wide "
                    f"{fmt(run['target_wide_s'])} s, resolved {fmt(run['resolve_s'])} s "
                    f"after removal; opened: {run['rules_fired']}"
                )
        first_fault = runs[0]["injected_wall"] if runs else time.time()
        startup_events = await asyncio.to_thread(events_between, system.database, 0.0, first_fault)
        startup_opened = [e for e in startup_events if e["kind"] in ("opened", "reopened")]
        for e in startup_opened:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                e["details"] = (await system.incident(e["incident"]))["incident"]["details"]
        final_quiet = await wait_quiet(system)
        if runs:
            await attach_late(system, by_name[runs[-1]["fault"]], runs[-1], time.time())
        calibration: list[dict[str, Any]] = []
        if "jitter" in settings.faults:
            say("  jitter calibration: probe calls with jitter_ms in their own URL")
            calibration = await calibrate_jitter(system)
        health = await system.agent_health()
        interruptions = await system.agent_interruptions()
        end_wall = time.time()
        results = await asyncio.to_thread(
            results_between, system.database, system.started_wall, end_wall
        )
    summaries = [
        fault_summary(fault, [r for r in runs if r["fault"] == fault.name]) for fault in faults
    ]
    section: dict[str, Any] = {
        "regions": list(DETECT_REGIONS),
        "reflectors": 1,
        "reps": settings.reps,
        "poll_s": POLL_S,
        "min_hold_s": MIN_HOLD_S,
        "detect_timeout_s": DETECT_TIMEOUT_S,
        "resolve_timeout_s": RESOLVE_TIMEOUT_S,
        "quiet_s": QUIET_S,
        "call_s": CALL_S,
        "startup": system.startup,
        "started_wall": system.started_wall,
        "startup_incidents": startup_opened,
        "startup_events": startup_events,
        "faults": summaries,
        "runs": runs,
        "final_quiet": final_quiet,
        "jitter_calibration": calibration,
        "call_results": results,
        "agent_health_at_end": health,
        "agent_interruptions": interruptions,
        "exit_codes": system.exit_codes,
        "logs": scan_logs(system.folder),
    }
    print_detection(section)
    print_startup(section)
    if calibration:
        print_calibration(calibration)
    print_logs(section["logs"])
    return section


# --- 2. clean run -------------------------------------------------------------------------------


def headroom(rules: Sequence[Rule], samples: Sequence[StoredSample]) -> list[dict[str, Any]]:
    """Replay each sample rule over the reliable seconds: breaches, worst value, fullest window.

    Per (rule, target, region) in the order the monitor received them, as its k-of-n
    windows do (a healthy run of `close_after` is ignored here: this is how close a rule
    came to opening, not whether it would have closed).
    """
    out = []
    streams: dict[tuple[str, str], list[StoredSample]] = {}
    for s in samples:
        if s.reliable:
            streams.setdefault((s.target, s.region), []).append(s)
    for rule in rules:
        if rule.source is not Source.SAMPLE:
            continue
        breaches = 0
        fullest = 0
        worst: Any = None
        evaluated = 0
        for stream in streams.values():
            window: list[bool] = []
            for s in stream:
                value = value_at(s.body, rule.metric)
                verdict_ = rule.breached(value)
                if verdict_ is None:
                    continue
                evaluated += 1
                window = [*window, verdict_][-rule.n :]
                fullest = max(fullest, sum(window))
                if verdict_:
                    breaches += 1
                if isinstance(value, int | float) and (worst is None or _worse(rule, value, worst)):
                    worst = value
        threshold = rule.threshold
        out.append(
            {
                "rule": rule.name,
                "condition": rule.describe(),
                "threshold": list(threshold) if isinstance(threshold, tuple) else threshold,
                "k": rule.k,
                "n": rule.n,
                "evaluated": evaluated,
                "breaching_seconds": breaches,
                "worst_value": worst,
                "fullest_window": fullest,
            }
        )
    return out


def _worse(rule: Rule, value: float, than: float) -> bool:
    if rule.op in ("<", "<="):
        return value < than
    if rule.op == "outside":
        return abs(value) > abs(than)
    return value > than


def usage_of(window: Window, name: str) -> dict[str, Any]:
    """Return one watched tree's CPU and memory over the window."""
    u = window.usage[name]
    return {
        "cores": u.cpu_s / window.seconds,
        "cpu_s": u.cpu_s,
        "system_share": ratio(u.system_s, u.cpu_s),
        "rss_mb_median": median(u.rss_mb),
        "pss_mb_median": median(u.pss_mb),
        "cores_max_1s": max(u.cores, default=None),
    }


async def clean(settings: Settings, workdir: Path) -> dict[str, Any]:
    """Measure section 2: no fault for the whole window; nothing may open."""
    rules = load_rules(DEFAULT_RULES)
    async with running_system(workdir, "clean", CLEAN_REGIONS, CLEAN_TARGETS) as system:
        say(f"  ready after {system.startup['ready_s']:.1f} s; running {settings.clean_s:g} s")
        calls = len(system.agents) * len(system.targets)
        watched = [
            *(Watched(a.name, a.pid, descendants=True) for a in system.agents),
            *(Watched(r.name, r.pid, descendants=True) for r in system.reflectors),
            Watched("monitor", system.monitor.pid, descendants=True),
            Watched("bench", os.getpid(), descendants=False),
        ]
        # the window starts once whatever the start-up opened has cleared (reported apart)
        settle = await wait_quiet(system)
        seen: dict[tuple[int, int], Seen] = {}
        before = {(int(i["id"]), int(i["reopened"])) for i in await system.open_incidents()}
        start_wall = time.time()
        t0 = time.monotonic()
        meter = asyncio.create_task(measure_window(watched, settings.clean_s))
        polls = 0
        try:
            while not meter.done():
                note_incidents(seen, await system.open_incidents(), time.monotonic() - t0, "clean")
                for key in before:
                    seen.pop(key, None)
                polls += 1
                if polls % max(1, round(60 / CLEAN_POLL_S)) == 0:
                    say(
                        f"  {time.monotonic() - t0:.0f} s: {len(seen)} incident(s) opened in the "
                        "window so far"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(meter), CLEAN_POLL_S)
            window = await meter
        finally:
            meter.cancel()
        end_wall = time.time()
        note_incidents(seen, await system.open_incidents(), time.monotonic() - t0, "clean")
        for key in before:
            seen.pop(key, None)
        health = await system.agent_health()
        interruptions = await system.agent_interruptions()
        events = await asyncio.to_thread(events_between, system.database, start_wall, end_wall)
        startup_events = await asyncio.to_thread(events_between, system.database, 0.0, start_wall)
        samples = await asyncio.to_thread(samples_between, system.database, start_wall, end_wall)
        results = await asyncio.to_thread(results_between, system.database, start_wall, end_wall)
        opened = [e for e in events if e["kind"] in ("opened", "reopened")]
        startup_opened = [e for e in startup_events if e["kind"] in ("opened", "reopened")]
        for e in (*opened, *startup_opened):
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
                e["details"] = (await system.incident(e["incident"]))["incident"]["details"]
    per_stream: dict[str, dict[str, Any]] = {}
    for s in samples:
        entry = per_stream.setdefault(
            f"{s.region} -> {s.target}",
            {"samples": 0, "unreliable": 0, "calls": set(), "loop_lag_max_s": 0.0},
        )
        entry["samples"] += 1
        entry["unreliable"] += 0 if s.reliable else 1
        entry["calls"].add(s.call_id)
        entry["loop_lag_max_s"] = max(entry["loop_lag_max_s"], s.body.get("loop_lag_s") or 0.0)
    for entry in per_stream.values():
        entry["calls"] = len(entry["calls"])
    agents_cores = [usage_of(window, a.name)["cores"] for a in system.agents]
    reflector_cores = [usage_of(window, r.name)["cores"] for r in system.reflectors]
    unreliable = sum(0 if s.reliable else 1 for s in samples)
    section: dict[str, Any] = {
        "regions": list(CLEAN_REGIONS),
        "agents": len(system.agents),
        "targets": len(system.targets),
        "calls": calls,
        "window_s": window.seconds,
        "asked_s": settings.clean_s,
        "started_wall": system.started_wall,
        "window_start_wall": start_wall,
        "startup": system.startup,
        "samples": len(samples),
        "samples_expected": round(calls * (end_wall - start_wall)),
        "counted_over_s": end_wall - start_wall,
        "unreliable_s": unreliable,
        "unreliable_share": ratio(unreliable, len(samples)),
        "per_stream": per_stream,
        "settle_before_window": settle,
        "incidents_opened": opened,
        "incidents_seen_open": [dataclasses.asdict(s) for s in seen.values()],
        "startup_incidents": startup_opened,
        "startup_events": startup_events,
        "ok": not opened and not seen,
        "call_results": results,
        "seen": seen_by_probes(samples),
        "headroom": headroom(rules, samples),
        "usage": {
            **{a.name: usage_of(window, a.name) for a in system.agents},
            **{r.name: usage_of(window, r.name) for r in system.reflectors},
            "monitor": usage_of(window, "monitor"),
            "bench": usage_of(window, "bench"),
            "all_processes_cores": window.all_processes_s / window.seconds,
            "others_cores": max(
                0.0,
                (window.all_processes_s - sum(u.cpu_s for u in window.usage.values()))
                / window.seconds,
            ),
            "steal_cores": window.steal_s / window.seconds,
            "loadavg_at_end": os.getloadavg(),
        },
        "probe_cores_per_call": sum(agents_cores) / calls,
        "reflector_cores_per_call": sum(reflector_cores) / calls,
        "agent_health_at_end": health,
        "agent_interruptions": interruptions,
        "exit_codes": system.exit_codes,
        "logs": scan_logs(system.folder),
    }
    print_clean(section)
    print_logs(section["logs"])
    return section


def print_startup(section: Mapping[str, Any]) -> None:
    """List incidents that opened while the system started (before any fault or window)."""
    started = section["startup"]
    for e in section["startup_incidents"]:
        closed = next(
            (
                x["at"] - e["at"]
                for x in section["startup_events"]
                if x["incident"] == e["incident"] and x["kind"] == "resolved"
            ),
            None,
        )
        print(
            f"  ! at start-up ({e['at'] - section['started_wall']:.1f} s after the first process "
            f"started; all agents delivering at {started.get('ready_s', 0):.1f} s): {e['kind']} "
            f"{e['rule']} [{e['scope']} {e['region']}] {e['severity']}, resolved after "
            f"{fmt(closed, 1)} s: {describe_values(e.get('details'))}"
        )


def print_clean(section: Mapping[str, Any]) -> None:
    """Print the clean run's outcome, its load and each rule's headroom."""
    failed = [r for r in section["call_results"] if r["status"] == "failed"]
    rows = [
        [
            f"{section['agents']} agents x {section['targets']} reflectors",
            f"{section['window_s']:.0f}",
            f"{section['samples']} / {section['samples_expected']}",
            f"{section['unreliable_s']} ({pct(section['unreliable_share'])})",
            str(len(section["call_results"])),
            str(len(failed)),
            str(len(section["startup_incidents"])),
            str(len(section["incidents_opened"])),
            verdict(section["ok"]),
        ]
    ]
    print(
        table(
            f"2. Clean run: {section['calls']} continuous calls ({', '.join(section['regions'])} "
            "each to both reflectors), no fault",
            [
                "system",
                "window s",
                "samples received / expected",
                "unreliable s",
                "calls ended",
                "failed",
                "incidents before window",
                "incidents in window",
                "0 incidents",
            ],
            rows,
        )
    )
    for e in section["incidents_opened"]:
        print(
            f"  ! {e['kind']} {e['at'] - section['window_start_wall']:.0f} s into the window: "
            f"{e['rule']} [{e['scope']} {e['region']}] {e['severity']}: "
            f"{describe_values(e.get('details'))}"
        )
    print_startup(section)
    usage = section["usage"]
    rows = []
    for name, u in usage.items():
        if not isinstance(u, dict):
            continue
        per_call = None
        if name.startswith("agent-"):
            per_call = u["cores"] / section["targets"]
        elif name.startswith("reflector-"):
            per_call = u["cores"] / section["agents"]
        rows.append(
            [
                name,
                fmt(u["cores"], 3),
                fmt(per_call, 3),
                fmt(u["cores_max_1s"]),
                fmt(u["rss_mb_median"], 0),
            ]
        )
    rows.append(["everything else", fmt(usage["others_cores"], 3), "", "", ""])
    rows.append(["all processes", fmt(usage["all_processes_cores"], 3), "", "", ""])
    rows.append(["steal", fmt(usage["steal_cores"], 3), "", "", ""])
    print(
        table(
            "   Load over the window, from /proc; cores per call: probe "
            f"{section['probe_cores_per_call']:.3f}, reflector "
            f"{section['reflector_cores_per_call']:.3f}",
            ["process (tree)", "cores", "cores/call", "max 1 s", "RSS MB"],
            rows,
        )
    )
    rows = [
        [
            stream,
            str(v["samples"]),
            str(v["unreliable"]),
            str(v["calls"]),
            ms(v["loop_lag_max_s"]),
        ]
        for stream, v in sorted(section["per_stream"].items())
    ]
    print(
        table(
            "   Seconds per call stream",
            ["region -> target", "samples", "unreliable", "calls", "max loop lag ms"],
            rows,
        )
    )
    rows = [
        [
            h["rule"],
            h["condition"],
            f"{h['k']}/{h['n']}",
            str(h["evaluated"]),
            str(h["breaching_seconds"]),
            fmt(h["worst_value"], 4),
            f"{h['fullest_window']}/{h['k']}",
        ]
        for h in section["headroom"]
    ]
    print(
        table(
            "   Rule headroom in the clean run (reliable seconds replayed per target and region)",
            [
                "rule",
                "condition",
                "k/n",
                "evaluated",
                "breaching s",
                "worst value",
                "fullest window / k",
            ],
            rows,
        )
    )


# --- logs ---------------------------------------------------------------------------------------

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (\S+) (.*)$")
"The agents' format (`%(asctime)s %(name)s %(message)s`): no level name in it."
ROUTINE = ("aiohttp.access", "aioice.ice")
"Loggers whose INFO lines are routine (each HTTP request, each ICE check)."
ALARMING = re.compile(r"Traceback|Error|error|Exception|exception|failed|warning|WARNING")
NUMBERS = re.compile(r"\d+(\.\d+)?")
BANNER = re.compile(r"^callmon (monitor|reflector) ")


def scan_logs(folder: Path) -> dict[str, Any]:
    """Count log lines by logger; keep every non-routine kind of message (numbers masked).

    Routine lines are HTTP access and ICE check lines of loggers in ROUTINE that say
    nothing alarming, the start banner and the agent's "monitor ok"; anything else (the
    agent's own warnings, aiortc's, tracebacks, the monitor's plain stderr) is kept, one
    example per kind.
    """
    out: dict[str, Any] = {}
    for log in sorted(folder.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        loggers: Counter[str] = Counter()
        kinds: Counter[str] = Counter()
        examples: dict[str, str] = {}
        for line in lines:
            match = LOG_LINE.match(line)
            logger, text = (match.group(1), match.group(2)) if match else ("-", line)
            loggers[logger] += 1
            routine = logger in ROUTINE and not ALARMING.search(text)
            if routine or BANNER.match(line) or text.startswith("monitor ok: "):
                continue
            key = f"{logger} " + NUMBERS.sub("N", text)[:120]
            kinds[key] += 1
            examples.setdefault(key, line[:400])
        out[log.stem] = {
            "lines": len(lines),
            "by_logger": dict(loggers),
            "noteworthy": sum(kinds.values()),
            "kinds": [{"count": n, "example": examples[k]} for k, n in kinds.most_common(20)],
        }
    return out


def print_logs(logs: Mapping[str, Any]) -> None:
    """Print the warnings and errors the processes logged."""
    noisy = {name: v for name, v in logs.items() if v["noteworthy"]}
    if not noisy:
        print("  logs: nothing but routine lines (HTTP access, ICE checks) in any log")
        return
    print("  logs: lines other than routine ones (count x first example, numbers vary)")
    for name, v in noisy.items():
        print(f"    {name}: {v['noteworthy']} of {v['lines']} lines")
        for kind in v["kinds"][:6]:
            print(f"      {kind['count']:>4} x {kind['example'][:200]}")


# --- the report ---------------------------------------------------------------------------------


def environment(workdir: Path) -> dict[str, Any]:
    """Describe the machine and the versions under test."""
    packages = ("callmon", "aiortc", "aioice", "av", "aiohttp", "prometheus_client", "PyYAML")
    return {
        "machine": {
            **benchkit.machine(),
            "loadavg_at_start": os.getloadavg(),
            "workdir": str(workdir),
        },
        "versions": benchkit.versions(packages, sqlite=True),
        "git": git_state(),
    }


def git_state() -> dict[str, Any]:
    """Return the commit under test and the files that differ from it (read-only git)."""

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
        )
        return done.stdout.strip()

    try:
        return {
            "head": git("rev-parse", "HEAD"),
            "subject": git("log", "-1", "--format=%s"),
            "dirty": git("status", "--porcelain").splitlines(),
        }
    except (OSError, subprocess.SubprocessError) as exc:
        return {"error": str(exc)}


async def run(settings: Settings, report: dict[str, Any]) -> None:
    """Run every section in order, filling `report` as each finishes."""
    benchkit.cancel_on_sigterm()
    with benchkit.workdir("callmon-detect-", settings.keep_workdir) as workdir:
        report.update(environment(workdir))
        if "detection" in settings.sections:
            await benchkit.section(report, "detection", detection(settings, workdir), timed=True)
        if "clean" in settings.sections:
            await benchkit.section(report, "clean", clean(settings, workdir), timed=True)


def goals(report: Mapping[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """Collect every goal with its value and verdict."""
    found: list[dict[str, Any]] = []
    for name in settings.sections:
        if name not in report or "error" in report[name]:
            error = report.get(name, {}).get("error", "did not run")
            found.append({"goal": f"section {name} ran", "value": error, "ok": False})
    d = report.get("detection", {})
    for f in d.get("faults", []):
        found.append(
            {
                "goal": f"{f['label']} detected <= {f['goal_s']:g} s (worst of {f['runs']}), s",
                "value": f["detect_s"]["max"],
                "ok": f["ok"],
            }
        )
        found.append(
            {
                "goal": f"{f['label']}: incident target-wide (both regions) every time",
                "value": f["target_wide_all"],
                "ok": f["target_wide_all"],
            }
        )
        found.append(
            {
                "goal": f"{f['label']}: every incident resolved <= {RESOLVE_TIMEOUT_S:g} s "
                "after removal",
                "value": f["resolve_s"]["max"],
                "ok": f["resolved_all"],
            }
        )
        found.append(
            {
                "goal": f"{f['label']}: no incident of an unrelated rule",
                "value": len(f["unrelated"]),
                "ok": not f["unrelated"],
            }
        )
    c = report.get("clean", {})
    if "ok" in c:
        found.append(
            {
                "goal": f"clean run of {c['window_s']:.0f} s opens 0 incidents",
                "value": len(c["incidents_opened"]),
                "ok": c["ok"],
            }
        )
    return found


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench, print tables, write the JSON; exit 1 if a goal failed, 130 on Ctrl-C."""
    settings = parse_settings(argv)
    started = time.monotonic()
    report = benchkit.new_report(settings)
    report["goals_set"] = {
        "hard_s": GOAL_HARD_S,
        "degraded_s": GOAL_DEGRADED_S,
        "clean_incidents": 0,
    }
    report["faults"] = [dataclasses.asdict(f) for f in FAULTS if f.name in settings.faults]

    def finishing(final: dict[str, Any]) -> None:
        final["git_at_end"] = git_state()  # others may change the tree during a long run

    return benchkit.run_and_report(
        run(settings, report),
        report,
        settings.out,
        lambda final: goals(final, settings),
        started=started,
        digits=2,
        finishing=finishing,
    )


if __name__ == "__main__":
    sys.exit(main())
