"""Agents and the monitor over real sockets: schedules, continuous calls, the spool, and
what happens when the monitor or the target goes away and comes back."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import Reflector, free_port, start_reflector, stop
from monitorkit import OPERATOR_TOKEN, PROBES, config_document
from test_monitor_process import start as start_monitor

from probes.agent import Agent
from probes.agentconfig import AgentConfig, parse_agent_config
from probes.spool import Spool


class Monitor:
    """`callmon monitor` as a process on a fixed port, to kill and start again."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db = tmp / "data" / "monitor.sqlite3"
        self.config = tmp / "monitor.yaml"
        document = config_document(self.db)
        for probe in document["probes"]:
            probe["interval_s"] = 5
        self.config.write_text(yaml.safe_dump(document))
        self.log = tmp / "monitor.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = start_monitor(self.config, self.port, self.log)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def rows(self, sql: str) -> list[Any]:
        with sqlite3.connect(self.db) as db:
            return db.execute(sql).fetchall()


@pytest.fixture
def monitor(tmp_path: Path) -> Iterator[Monitor]:
    m = Monitor(tmp_path)
    m.start()
    yield m
    m.stop()


def agent_config(
    tmp: Path, monitor_url: str, targets: list[dict[str, Any]], token: str = PROBES["probe-eu"][1]
) -> AgentConfig:
    return parse_agent_config(
        {
            "monitor": {"url": monitor_url, "token": token},
            "region": "eu-west",
            "spool": str(tmp / "agent.spool"),
            "listen": f"127.0.0.1:{free_port()}",
            "ice": {"hosts": ["127.0.0.1"]},
            "targets": targets,
        }
    )


class Recorded(Agent):
    """An agent that remembers the id of everything it spooled (the test's ledger)."""

    def __init__(self, config: AgentConfig) -> None:
        super().__init__(config)
        self.ids: list[str] = []
        put = self.spool.put

        async def recording_put(document: Any) -> None:
            self.ids.append(document["id"])
            await put(document)

        self.spool.put = recording_put  # type: ignore[method-assign]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as http:
        yield http


async def operator_get(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url, headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"}) as r:
        return await r.json()


async def test_an_agent_probes_on_schedule_and_continuously(
    tmp_path: Path, monitor: Monitor, reflector: Reflector, session: aiohttp.ClientSession
) -> None:
    config = agent_config(
        tmp_path,
        monitor.url,
        [
            {"name": "live", "url": reflector.url, "mode": "continuous"},
            {
                "name": "sched",
                "url": reflector.url,
                "interval_s": 3,
                "splay_s": 0.5,
                "duration_s": 1,
            },
        ],
    )
    agent = Recorded(config)
    async with agent.running():
        await asyncio.sleep(8)
        assert config.listen is not None
        base = f"http://{config.listen[0]}:{config.listen[1]}"
        async with session.get(base + "/healthz") as response:
            health = await response.json()
        async with session.get(base + "/metrics") as response:
            metrics = await response.text()
    assert health["status"] == "ok"
    assert health["targets"]["sched"] == "ok"
    assert 'callmon_agent_calls_total{status="ok",target="sched"}' in metrics
    assert "process_cpu_seconds_total" in metrics
    assert "callmon_agent_event_loop_lag_seconds" in metrics

    stored = dict(monitor.rows("SELECT id, kind FROM results"))
    assert set(agent.ids) == set(stored), "everything spooled reached the monitor"
    kinds = list(stored.values())
    assert kinds.count("samples") >= 5, "the continuous call streamed its seconds"
    assert kinds.count("result") >= 3, "two scheduled calls, and the continuous call's end"
    # the continuous call's final result carries no samples: they were streamed
    finals = [
        json.loads(body)
        for (body,) in monitor.rows("SELECT body FROM results WHERE kind = 'result'")
    ]
    continuous = [f for f in finals if f["duration_s"] == 3600]
    assert len(continuous) == 1
    assert continuous[0]["samples"] == []
    assert continuous[0]["summary"]["media_s"] > 5
    assert (await operator_get(session, monitor.url + "/api/v1/incidents"))["incidents"] == []


async def test_a_monitor_killed_while_agents_run_loses_and_doubles_nothing(
    tmp_path: Path, monitor: Monitor, reflector: Reflector
) -> None:
    config = agent_config(
        tmp_path,
        monitor.url,
        [
            {"name": "live", "url": reflector.url, "mode": "continuous"},
            {"name": "sched", "url": reflector.url, "interval_s": 2, "splay_s": 0, "duration_s": 1},
        ],
    )
    agent = Recorded(config)
    async with agent.running():
        await asyncio.sleep(3)
        monitor.kill()
        await asyncio.sleep(3)  # results pile up in the spool meanwhile
        waiting, _ = await agent.spool.depth()
        assert waiting > 0
        monitor.start()
        await asyncio.sleep(4)
    stored = monitor.rows("SELECT id, COUNT(*) FROM results GROUP BY id")
    assert all(count == 1 for _, count in stored)
    assert {i for i, _ in stored} == set(agent.ids), "every spooled entry arrived once"
    spool = await Spool(config.spool).open()
    assert await spool.depth() == (0, 0), "the spool is empty: the monitor has everything"
    await spool.close()


async def test_an_agent_restarted_with_a_full_spool_replays_it_in_order(
    tmp_path: Path, reflector: Reflector
) -> None:
    down = Monitor(tmp_path)  # not started: unreachable
    targets = [
        {"name": "sched", "url": reflector.url, "interval_s": 2, "splay_s": 0, "duration_s": 1}
    ]
    first = Recorded(agent_config(tmp_path, down.url, targets))
    async with first.running():
        await asyncio.sleep(5)
    assert len(first.ids) >= 2
    down.start()
    try:
        second = Recorded(agent_config(tmp_path, down.url, targets))
        async with second.running():
            await asyncio.sleep(2)
        ordered = [i for (i,) in down.rows("SELECT id FROM results ORDER BY rowid")]
        assert ordered[: len(first.ids)] == first.ids, "replayed in order"
        assert set(ordered) == set(first.ids) | set(second.ids)
    finally:
        down.stop()


async def test_a_continuous_call_survives_a_reflector_restart(
    tmp_path: Path, monitor: Monitor
) -> None:
    process, target = start_reflector(tmp_path)
    port = int(target.url.split(":")[2].split("/")[0])
    config = agent_config(
        tmp_path, monitor.url, [{"name": "live", "url": target.url, "mode": "continuous"}]
    )
    agent = Recorded(config)
    try:
        async with agent.running():
            await asyncio.sleep(4)
            stop(process)
            await asyncio.sleep(2)
            process, _ = start_reflector(tmp_path, port=port)
            await asyncio.sleep(6)
    finally:
        stop(process)
    finals = [
        json.loads(b)
        for (b,) in monitor.rows("SELECT body FROM results WHERE kind = 'result' ORDER BY rowid")
    ]
    failed = [f for f in finals if f["status"] == "failed"]
    assert failed, "the interruption is reported as such"
    assert failed[0]["failure"]["phase"] == "call"
    # the reflector hangs up its calls when it stops: the probe says so at once
    assert "the target hung up" in failed[0]["failure"]["reason"]
    calls = monitor.rows("SELECT DISTINCT call_id FROM samples")
    assert len(calls) >= 2, "a new call streamed after the restart"
    last = monitor.rows("SELECT body FROM samples ORDER BY at DESC, t_s DESC LIMIT 1")
    assert json.loads(last[0][0])["video"]["frames"] > 10, "and it carries media"


def run_agent_cli(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "callmon.cli", "agent", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_misconfigured_agent_fails_fast_with_a_clear_message(
    tmp_path: Path, monitor: Monitor
) -> None:
    missing = run_agent_cli(tmp_path / "nope.yaml")
    assert missing.returncode == 64
    assert "cannot read" in missing.stderr

    def write(**changes: Any) -> Path:
        document: dict[str, Any] = {
            "monitor": {"url": monitor.url, "token": PROBES["probe-eu"][1]},
            "region": "eu-west",
            "spool": str(tmp_path / "s.spool"),
            "listen": "none",
            "targets": [{"name": "t", "url": "http://127.0.0.1:1/whip"}],
        }
        document.update(changes)
        path = tmp_path / "agent.yaml"
        path.write_text(yaml.safe_dump(document))
        return path

    bad_url = run_agent_cli(write(monitor={"url": "ftp://monitor", "token": "x"}))
    assert bad_url.returncode == 64
    assert "monitor.url: 'ftp://monitor' is not an http(s) URL" in bad_url.stderr
    bad_target = run_agent_cli(write(targets=[{"name": "t", "url": "not a url"}]))
    assert bad_target.returncode == 64
    assert "targets[0].url" in bad_target.stderr
    bad_token = run_agent_cli(write(monitor={"url": monitor.url, "token": "wrong"}))
    assert bad_token.returncode == 64
    assert "refuses this agent's token (HTTP 401)" in bad_token.stderr
    operator = run_agent_cli(write(monitor={"url": monitor.url, "token": OPERATOR_TOKEN}))
    assert operator.returncode == 64
    assert "operator token" in operator.stderr


def test_the_readme_agent_example_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("## Agents") :]
    start = section.index("```yaml") + len("```yaml")
    example = yaml.safe_load(section[start : section.index("```", start)])
    (tmp_path / "agent-eu.token").write_text("cm_example\n")
    config = parse_agent_config(example, base=tmp_path)
    assert config.monitor_token == "cm_example"
    assert [t.mode for t in config.targets] == ["continuous", "scheduled"]
    assert config.targets[1].thresholds.jitter_s == 0.05
