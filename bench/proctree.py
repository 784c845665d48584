"""CPU and memory of process trees, read from /proc, and stopping what the bench started.

CPU is utime + stime per (pid, start time), so a reused pid never counts twice; memory is
PSS (shared pages split between the processes sharing them, so a tree's sum is its real
footprint) and RSS from smaps_rollup.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
SAMPLE_INTERVAL_S = 1.0
STOP_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    start: int
    "Start time in clock ticks: tells a reused pid apart."
    user: int
    "utime, clock ticks."
    system: int
    "stime, clock ticks (on loopback this includes delivering what the process sends)."


def process_table() -> dict[int, ProcStat]:
    """Read /proc/<pid>/stat of every process."""
    found: dict[int, ProcStat] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:  # it exited between scandir and the read
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = text[text.rindex(")") + 2 :].split()
        pid = int(entry.name)
        ppid, utime, stime, start = (int(fields[i]) for i in (1, 11, 12, 19))
        found[pid] = ProcStat(pid=pid, ppid=ppid, start=start, user=utime, system=stime)
    return found


def tree(processes: Mapping[int, ProcStat], root: int) -> list[ProcStat]:
    """Return `root` and all its descendants that are alive in `processes`."""
    children: dict[int, list[int]] = {}
    for stat in processes.values():
        children.setdefault(stat.ppid, []).append(stat.pid)
    found: list[ProcStat] = []
    pending = [root]
    while pending:
        pid = pending.pop()
        if pid in processes:
            found.append(processes[pid])
            pending.extend(children.get(pid, ()))
    return found


def memory_kb(pid: int) -> tuple[int, int] | None:
    """Return (PSS, RSS) of a process in kB from smaps_rollup, or None if it is gone."""
    pss = rss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for row in rollup:
                if row.startswith("Pss:"):
                    pss = int(row.split()[1])
                elif row.startswith("Rss:"):
                    rss = int(row.split()[1])
    except (OSError, ValueError):
        return None
    return pss, rss


def steal_ticks() -> int:
    """Return the CPU time the hypervisor gave to others, clock ticks, from /proc/stat."""
    with open("/proc/stat") as stat:
        values = stat.readline().split()[1:]
    return int(values[7]) if len(values) > 7 else 0


async def stop_process(
    process: asyncio.subprocess.Process, timeout_s: float = STOP_TIMEOUT_S
) -> int | None:
    """Terminate a process we started, killing it if it outlives `timeout_s`.

    Returns its exit code: the caller may report how the process ended.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
    return process.returncode


async def stop_tree(process: asyncio.subprocess.Process) -> None:
    """Stop a process we started and every descendant it left behind."""
    # Note the descendants first: once the root is gone they are reparented out of sight.
    descendants = tree(process_table(), process.pid)
    await stop_process(process)
    alive = process_table()
    for stat in descendants:
        current = alive.get(stat.pid)
        if current is not None and current.start == stat.start:
            with contextlib.suppress(ProcessLookupError):
                os.kill(stat.pid, signal.SIGKILL)


@dataclass(frozen=True)
class Watched:
    name: str
    pid: int
    descendants: bool
    "Count the whole process tree, not the process alone."


@dataclass
class Usage:
    """One watched process (tree) over a window."""

    cpu_s: float = 0.0
    "CPU time (utime + stime) gained over the whole window."
    system_s: float = 0.0
    "The stime part of it."
    cores: list[float] = field(default_factory=list)
    "CPU per sampling interval, in cores (10 ms ticks: coarse for single seconds)."
    pss_mb: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    processes: list[int] = field(default_factory=list)


@dataclass
class Window:
    """What `measure_window` saw."""

    seconds: float
    "Wall time covered, first to last sample."
    usage: dict[str, Usage]
    "By watched name."
    all_processes_s: float
    "CPU time of every process on the machine. Not /proc/stat's busy time: that is sampled"
    " at timer ticks, and a tickless idle CPU misses most of these sub-tick packet bursts."
    steal_s: float
    "Time the hypervisor ran other guests (tick-sampled)."


def _members(watched: Watched, processes: Mapping[int, ProcStat]) -> list[ProcStat]:
    if watched.descendants:
        return tree(processes, watched.pid)
    return [processes[watched.pid]] if watched.pid in processes else []


async def measure_window(watched: Sequence[Watched], seconds: float) -> Window:
    """Sample CPU and memory of each watched tree every SAMPLE_INTERVAL_S for `seconds`.

    CPU is the utime+stime each (pid, start time) gained since the previous sample; a
    process born in an interval counts whole, one that exits loses its last partial
    interval. Memory is the tree's summed PSS and RSS at each sample.
    """
    usage = {w.name: Usage() for w in watched}
    processes = process_table()
    previous = {
        w.name: {(p.pid, p.start): (p.user, p.system) for p in _members(w, processes)}
        for w in watched
    }
    everyone = {(p.pid, p.start): p.user + p.system for p in processes.values()}
    all_processes_s = 0.0
    steal_start = steal_ticks()
    start = last = time.monotonic()
    intervals = max(1, round(seconds / SAMPLE_INTERVAL_S))
    for k in range(1, intervals + 1):
        await asyncio.sleep(max(0.0, start + k * SAMPLE_INTERVAL_S - time.monotonic()))
        now = time.monotonic()
        elapsed = now - last
        last = now
        processes = process_table()
        now_everyone = {(p.pid, p.start): p.user + p.system for p in processes.values()}
        gained_all = sum(t - everyone.get(key, 0) for key, t in now_everyone.items())
        all_processes_s += gained_all * CLOCK_TICK_S
        everyone = now_everyone
        for w in watched:
            members = _members(w, processes)
            current = {(p.pid, p.start): (p.user, p.system) for p in members}
            before = previous[w.name]
            user = sum(u - before.get(key, (0, 0))[0] for key, (u, _) in current.items())
            system = sum(s - before.get(key, (0, 0))[1] for key, (_, s) in current.items())
            gained = user + system
            previous[w.name] = current
            memory = [m for m in (memory_kb(p.pid) for p in members) if m is not None]
            u = usage[w.name]
            u.cpu_s += gained * CLOCK_TICK_S
            u.system_s += system * CLOCK_TICK_S
            u.cores.append(gained * CLOCK_TICK_S / elapsed)
            u.pss_mb.append(sum(m[0] for m in memory) / 1024)
            u.rss_mb.append(sum(m[1] for m in memory) / 1024)
            u.processes.append(len(members))
    return Window(
        seconds=last - start,
        usage=usage,
        all_processes_s=all_processes_s,
        steal_s=(steal_ticks() - steal_start) * CLOCK_TICK_S,
    )
