"""`callmon demo`: the whole system on one machine, with one command.

A monitor (SQLite in a local folder), a reflector, and two agents in two regions probing
it continuously; a webhook sink that prints every notification it receives. Everything
listens on loopback and every ICE candidate is loopback. With `--tour` the demo degrades
the reflector by itself, so an incident opens, notifies, and resolves on screen.
Ctrl-C stops everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from aiohttp import web

from monitor.config import token_digest

REGIONS = ("eu-demo", "us-demo")


@dataclass(frozen=True)
class Ports:
    monitor: int
    reflector: int
    sink: int
    agents: tuple[int, ...]

    @classmethod
    def from_base(cls, base: int) -> Ports:
        return cls(base, base + 1, base + 2, tuple(base + 3 + i for i in range(len(REGIONS))))


def write_configs(folder: Path, ports: Ports) -> tuple[Path, list[Path], str]:
    """Write the monitor's and the agents' configurations; return them and an operator token."""
    folder.mkdir(parents=True, exist_ok=True)
    operator = "cm_" + secrets.token_urlsafe(24)
    probes = {region: "cm_" + secrets.token_urlsafe(24) for region in REGIONS}
    monitor = {
        "listen": f"127.0.0.1:{ports.monitor}",
        "database": "monitor.sqlite3",
        "public_url": f"http://127.0.0.1:{ports.monitor}",
        "probes": [
            {"name": f"agent-{r}", "region": r, "token_sha256": token_digest(t), "interval_s": 5}
            for r, t in probes.items()
        ],
        "operators": [{"name": "demo", "token_sha256": token_digest(operator)}],
        "channels": [
            {"name": "sink", "type": "webhook", "url": f"http://127.0.0.1:{ports.sink}/hook"}
        ],
        "notify": {s: ["sink"] for s in ("urgent", "important", "normal")},
        "tiers": {"normal": {"ack_s": 300, "resolve_s": 3600}},
    }
    monitor_path = folder / "monitor.yaml"
    monitor_path.write_text(yaml.safe_dump(monitor, sort_keys=False))
    agents = []
    for (region, token), port in zip(probes.items(), ports.agents, strict=True):
        agent = {
            "monitor": {"url": f"http://127.0.0.1:{ports.monitor}", "token": token},
            "region": region,
            "spool": f"agent-{region}.spool",
            "listen": f"127.0.0.1:{port}",
            "ice": {"hosts": ["127.0.0.1"]},
            "targets": [
                {
                    "name": "reflector",
                    "url": f"http://127.0.0.1:{ports.reflector}/whip",
                    "mode": "continuous",
                    "duration_s": 600,
                }
            ],
        }
        path = folder / f"agent-{region}.yaml"
        path.write_text(yaml.safe_dump(agent, sort_keys=False))
        agents.append(path)
    return monitor_path, agents, operator


@contextlib.asynccontextmanager
async def sink(port: int, say: Callable[[str], None]) -> AsyncIterator[list[dict[str, object]]]:
    """Receive the monitor's webhooks and print each one."""
    received: list[dict[str, object]] = []

    async def hook(request: web.Request) -> web.Response:
        body = await request.json()
        received.append(body)
        incident = body.get("incident", {})
        say(
            f"  >> webhook: {body.get('event')} #{incident.get('id')} "
            f"[{incident.get('severity')}, {incident.get('state')}] {incident.get('title')}"
        )
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield received
    finally:
        await runner.cleanup()


def _wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not come up; see {log}") from None
            time.sleep(0.1)


class Processes:
    """The demo's child processes, stopped together."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.children: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, *args: str, health: str | None = None) -> None:
        log = self.folder / f"{name}.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "callmon.cli", *args],
            stdout=log.open("wb"),
            stderr=subprocess.STDOUT,
            cwd=self.folder,
        )
        self.children.append(process)
        if health is not None:
            _wait_http(health, process, log, 30)

    def stop(self) -> None:
        for process in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in reversed(self.children):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


async def _impair(reflector: int, query: str | None) -> None:
    url = f"http://127.0.0.1:{reflector}/admin/impairment" + (f"?{query}" if query else "")
    request = urllib.request.Request(url, method="PUT" if query else "DELETE")
    await asyncio.to_thread(urllib.request.urlopen, request, None, 5)


async def _open_incidents(monitor: int, token: str) -> list[dict[str, object]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{monitor}/api/v1/incidents?state=open",
        headers={"Authorization": f"Bearer {token}"},
    )

    def fetch() -> list[dict[str, object]]:
        with urllib.request.urlopen(request, timeout=5) as response:
            incidents: list[dict[str, object]] = json.load(response)["incidents"]
            return incidents

    return await asyncio.to_thread(fetch)


async def run_demo(
    folder: Path,
    base_port: int,
    *,
    tour: bool,
    duration_s: float | None,
    say: Callable[[str], None] = print,
) -> int:
    """Run the demo until Ctrl-C (or `duration_s`); return 0 if the tour's story held.

    `folder` must be absolute: the children run inside it.
    """
    ports = Ports.from_base(base_port)
    monitor_config, agent_configs, operator = write_configs(folder, ports)
    processes = Processes(folder)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    async with sink(ports.sink, say) as received:
        try:
            say(f"starting the reflector, the monitor and two agents (logs in {folder}) ...")
            await asyncio.to_thread(
                processes.start,
                "reflector",
                "reflector",
                "--listen",
                f"127.0.0.1:{ports.reflector}",
                "--ice-host",
                "127.0.0.1",
                health=f"http://127.0.0.1:{ports.reflector}/healthz",
            )
            await asyncio.to_thread(
                processes.start,
                "monitor",
                "monitor",
                "--config",
                str(monitor_config),
                health=f"http://127.0.0.1:{ports.monitor}/healthz",
            )
            for path, port in zip(agent_configs, ports.agents, strict=True):
                await asyncio.to_thread(
                    processes.start,
                    path.stem,
                    "agent",
                    "--config",
                    str(path),
                    health=f"http://127.0.0.1:{port}/healthz",
                )
            _banner(say, ports, operator)
            outcome = 0
            if tour:
                outcome = await _tour(ports, operator, received, say, stop)
            if duration_s is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), duration_s)
            elif not tour:
                await stop.wait()
        finally:
            say("stopping ...")
            await asyncio.to_thread(processes.stop)
    return outcome


def _banner(say: Callable[[str], None], ports: Ports, operator: str) -> None:
    monitor = f"http://127.0.0.1:{ports.monitor}"
    say(f"""
callmon demo is running (everything on loopback):
  monitor      {monitor}   (metrics: {monitor}/metrics)
  reflector    http://127.0.0.1:{ports.reflector}/whip
  agents       {", ".join(f"http://127.0.0.1:{p}/healthz" for p in ports.agents)}
  webhook sink http://127.0.0.1:{ports.sink}/hook (deliveries are printed below)
  operator token: {operator}

degrade the reflector live, watch an incident open, then clear it:
  callmon impair http://127.0.0.1:{ports.reflector} loss=0.1
  callmon impair http://127.0.0.1:{ports.reflector} --clear
open incidents:
  curl -H 'Authorization: Bearer {operator}' {monitor}/api/v1/incidents?state=open
Ctrl-C stops everything.
""")


async def _tour(
    ports: Ports,
    operator: str,
    received: list[dict[str, object]],
    say: Callable[[str], None],
    stop: asyncio.Event,
) -> int:
    """Degrade the reflector, wait for the incident, clear it, wait for the resolution."""
    await asyncio.sleep(5)
    say("tour: 10 % packet loss on every call, from now")
    injected = time.monotonic()
    await _impair(ports.reflector, "loss=0.1")
    opened = await _until(lambda: _open_incidents(ports.monitor, operator), bool, 60, stop)
    if not opened:
        say("tour: no incident opened within 60 s")
        return 1
    say(f"tour: incident open {time.monotonic() - injected:.1f} s after the loss began")
    await asyncio.sleep(3)
    say("tour: loss removed")
    removed = time.monotonic()
    await _impair(ports.reflector, None)
    cleared = await _until(lambda: _open_incidents(ports.monitor, operator), _empty, 90, stop)
    if cleared is None:
        say("tour: the incident did not resolve within 90 s")
        return 1
    say(
        f"tour: resolved {time.monotonic() - removed:.1f} s after the loss ended; "
        f"{len(received)} webhook deliveries"
    )
    return 0


def _empty(value: list[dict[str, object]]) -> bool:
    return not value


async def _until(
    fetch: Callable[[], Awaitable[list[dict[str, object]]]],
    done: Callable[[list[dict[str, object]]], bool],
    within_s: float,
    stop: asyncio.Event,
) -> list[dict[str, object]] | None:
    """Poll until `done` holds; None if it did not in time (or the demo was stopped)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and not stop.is_set():
        value = await fetch()
        if done(value):
            return value
        await asyncio.sleep(0.5)
    return None
