"""What every bench script shares: table cells, statistics, ports, child processes, the report.

The scripts import it as a top-level module (`import benchkit`), as they import their other
siblings: `python bench/x.py` puts bench/ first on sys.path. It needs nothing beyond the
standard library, so a script that must not pull in aiortc or aiohttp can still use it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

LOOPBACK = "127.0.0.1"

Goal = dict[str, Any]
"One goal of a report: its `goal` text, its `value` and whether it is `ok`."


# --- statistics -------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float | None:
    """Return the median, or None for no values."""
    return statistics.median(values) if values else None


def spread(values: Sequence[float]) -> dict[str, float | int | None]:
    """Return median, min, max and count of `values`."""
    return {
        "median": median(values),
        "min": min(values, default=None),
        "max": max(values, default=None),
        "n": len(values),
    }


def percentile(values: Sequence[float], q: float) -> float | None:
    """Return the nearest-rank q-quantile (0 < q <= 1), or None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered), max(1, math.ceil(q * len(ordered)))) - 1]


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """Return numerator / denominator, or None when either is missing or zero."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


# --- table cells and tables -------------------------------------------------------------------


def fmt(value: object, digits: int = 2) -> str:
    """Format a table cell: '-' for missing, integers as such, floats to `digits`."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ms(value: float | None) -> str:
    """Format seconds as milliseconds with one decimal."""
    return "-" if value is None else f"{value * 1000:.1f}"


def verdict(ok: bool | None) -> str:
    """Format a goal or check: PASS, FAIL, or '-' where nothing was judged."""
    return "-" if ok is None else "PASS" if ok else "FAIL"


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a plain fixed-width table: first column left-aligned, the others right."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    rule = "-" * len(line(["-" * w for w in widths]))
    return "\n".join([f"\n{title}", rule, line(headers), rule, *map(line, rows), rule])


# --- the command line -------------------------------------------------------------------------


def argument_parser(
    description: str, quick_help: str, default_out: Path
) -> argparse.ArgumentParser:
    """Start a bench's argument parser with the options all of them take first."""
    found = argparse.ArgumentParser(description=description)
    found.add_argument("--quick", action="store_true", help=quick_help)
    found.add_argument("--out", type=Path, default=default_out, help="JSON file to write")
    return found


def add_subset(parser: argparse.ArgumentParser, option: str, names: Sequence[str]) -> None:
    """Add an option that picks some of `names`, comma-separated; all of them by default."""
    parser.add_argument(
        option, default=",".join(names), help=f"comma-separated subset of {','.join(names)}"
    )


def subset(
    parser: argparse.ArgumentParser, text: str, names: Sequence[str], noun: str
) -> tuple[str, ...]:
    """Split a comma-separated subset of `names`; exit with a usage error on any other name."""
    chosen = tuple(name for name in text.split(",") if name)
    unknown = set(chosen) - set(names)
    if unknown:
        parser.error(f"unknown {noun}(s): {', '.join(sorted(unknown))}")
    return chosen


# --- ports, logs and child processes ----------------------------------------------------------


def free_port() -> int:
    """Return a TCP port on loopback that was free a moment ago."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 30) -> str:
    """Return the last lines of a log file ('' when it cannot be read)."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


async def start_logged(
    argv: Sequence[str], log: Path, cwd: Path | None = None
) -> asyncio.subprocess.Process:
    """Start `argv` with no stdin and its output in `log`, in a session of its own."""
    with log.open("wb") as output:
        return await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Own session: Ctrl-C reaches only the bench, which stops its children in order.
            start_new_session=True,
        )


async def wait_ready(
    process: asyncio.subprocess.Process,
    ready: Callable[[], Awaitable[bool]],
    timeout_s: float,
    interval_s: float,
) -> float | None:
    """Poll `ready` until it says yes; return the seconds that took.

    Returns None as soon as the process has ended, or once `timeout_s` has passed: the
    caller says what did not start, with its log.
    """
    start = time.monotonic()
    while True:
        if await ready():
            return time.monotonic() - start
        if process.returncode is not None or time.monotonic() - start > timeout_s:
            return None
        await asyncio.sleep(interval_s)


def cancel_on_sigterm() -> None:
    """Make SIGTERM cancel the running task, so every `finally` runs as on Ctrl-C."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)


@contextlib.contextmanager
def workdir(prefix: str, keep: bool) -> Iterator[Path]:
    """Yield a scratch directory; remove it afterwards unless `keep` (then say where it is)."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield directory
    finally:
        if keep:
            print(f"kept {directory}")
        else:
            shutil.rmtree(directory, ignore_errors=True)


# --- the report -------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """Describe this machine: CPU count and model, kernel, memory."""
    model = None
    with open("/proc/cpuinfo") as cpuinfo:
        for row in cpuinfo:
            if row.startswith("model name"):
                model = row.split(":", 1)[1].strip()
                break
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "memory_total_mb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2**20,
    }


def versions(packages: Sequence[str], sqlite: bool = False) -> dict[str, str]:
    """Return the versions of Python, of SQLite if asked, and of the installed `packages`."""
    found = {"python": platform.python_version()}
    if sqlite:
        found["sqlite"] = sqlite3.sqlite_version
    return found | {name: metadata.version(name) for name in packages}


def new_report(settings: DataclassInstance, **environment: Any) -> dict[str, Any]:
    """Start a report: the command as run, the date, `environment`, then the settings."""
    chosen = dataclasses.asdict(settings)
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "argv": sys.argv,
        "python_executable": sys.executable,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        **environment,
        # The output path is written as text: JSON has no Path.
        "settings": {**{k: v for k, v in chosen.items() if k != "out"}, "out": str(chosen["out"])},
    }


def write_report(path: Path, report: Mapping[str, Any]) -> None:
    """Write the JSON report, creating its directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as out:
        json.dump(report, out, indent=1, default=str)
        out.write("\n")


async def section(
    report: dict[str, Any], name: str, body: Awaitable[dict[str, Any]], timed: bool = False
) -> None:
    """Run one section into report[name]; a failure is recorded and the next section runs.

    With `timed`, the section's wall time goes into it as `elapsed_s`.
    """
    print(f"\n== {name}", flush=True)
    started = time.monotonic()
    try:
        report[name] = await body
    except Exception as exc:  # any failure of one section must not lose the others
        print(f"  ! section {name} failed: {exc.__class__.__name__}: {exc}", flush=True)
        report[name] = {"error": f"{exc.__class__.__name__}: {exc}"}
    if timed:
        report[name]["elapsed_s"] = time.monotonic() - started


def run_and_report(
    body: Coroutine[Any, Any, None],
    report: dict[str, Any],
    out: Path,
    goals: Callable[[Mapping[str, Any]], list[Goal]],
    started: float,
    digits: int,
    finishing: Callable[[dict[str, Any]], None] | None = None,
) -> int:
    """Run the bench, write the JSON whatever happens, print the goals; return the exit code.

    `body` fills `report` as it goes, so a run cut short still leaves a partial report.
    `started` is when the bench began; `digits` is the precision of the goal values;
    `finishing` adds last entries to the report just before it is written. Exits 130 when
    interrupted, 1 when a goal failed, else 0.
    """
    code = 0
    try:
        asyncio.run(body)
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\ninterrupted: everything started was stopped; the report is partial")
        report["interrupted"] = True
        code = 130
    finally:
        report["goals"] = goals(report)
        report["elapsed_s"] = time.monotonic() - started
        if finishing is not None:
            finishing(report)
        write_report(out, report)
    print(
        table(
            "Goals",
            ["goal", "value", "verdict"],
            [[g["goal"], fmt(g["value"], digits), verdict(g["ok"])] for g in report["goals"]],
        )
    )
    print(f"\n{report['elapsed_s']:.0f} s; wrote {out}")
    if code == 0 and not all(g["ok"] for g in report["goals"]):
        code = 1
    return code
