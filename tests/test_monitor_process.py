"""`callmon monitor` as a process: killed hard mid-stream, started again, nothing lost or
doubled; its /metrics clean under promtool; its configuration errors clear."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from conftest import free_port, wait_http
from monitorkit import OPERATOR_TOKEN, PROBES, config_document, result

from callmon.callresult import Status


def start(config: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "callmon.cli",
            "monitor",
            "--config",
            str(config),
            "--listen",
            f"127.0.0.1:{port}",
        ],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    if not wait_http(f"http://127.0.0.1:{port}/healthz", process, 15):
        process.kill()
        raise RuntimeError(log.read_text())
    return process


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "monitor.yaml"
    path.write_text(yaml.safe_dump(config_document(tmp_path / "data" / "monitor.sqlite3")))
    return path


async def test_a_hard_kill_mid_stream_loses_and_doubles_nothing(
    tmp_path: Path, config_file: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api/v1/results"
    headers = {"Authorization": f"Bearer {PROBES['probe-eu'][1]}"}
    acknowledged: dict[str, str] = {}
    sent: list[str] = []
    process = start(config_file, port, tmp_path / "monitor.log")

    async def stream(http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            body = result(status=Status.OK if len(sent) % 3 == 0 else Status.FAILED)
            sent.append(body["id"])
            try:
                async with http.post(url, json=body, headers=headers) as response:
                    if response.status == 200:
                        answer = await response.json()
                        acknowledged[body["id"]] = answer["results"][0]["received_at"]
            except aiohttp.ClientError:
                await asyncio.sleep(0.01)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        stop = asyncio.Event()
        writers = [asyncio.create_task(stream(http, stop)) for _ in range(4)]
        await asyncio.sleep(1.5)
        process.send_signal(signal.SIGKILL)  # no shutdown handler runs
        process.wait()
        killed_with = len(acknowledged)
        await asyncio.sleep(0.3)
        process = start(config_file, port, tmp_path / "monitor.log")
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*writers)
        # every id sent again after the restart is acknowledged with its first answer
        for result_id, received_at in list(acknowledged.items())[:50]:
            body = result(result_id=result_id)
            async with http.post(url, json=body, headers=headers) as response:
                assert response.status == 200
                assert (await response.json())["results"][0]["received_at"] == received_at
        async with http.get(
            f"http://127.0.0.1:{port}/api/v1/incidents",
            headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
        ) as response:
            open_incidents = (await response.json())["incidents"]
    process.terminate()
    process.wait(10)

    assert killed_with > 20, "the kill should land mid-stream"
    db = sqlite3.connect(tmp_path / "data" / "monitor.sqlite3")
    stored = dict(db.execute("SELECT id, COUNT(*) FROM results GROUP BY id").fetchall())
    assert all(count == 1 for count in stored.values()), "a result was stored twice"
    missing = [i for i in acknowledged if i not in stored]
    assert missing == [], f"{len(missing)} acknowledged results were lost"
    # one incident for the failing calls, not one per restart
    assert [i["rule"] for i in open_incidents] == ["call_failed"]
    events = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'opened'").fetchone()
    assert events == (1,)


async def test_metrics_are_clean_under_promtool(tmp_path: Path, config_file: Path) -> None:
    port = free_port()
    process = start(config_file, port, tmp_path / "monitor.log")
    try:
        async with aiohttp.ClientSession() as http:
            headers = {"Authorization": f"Bearer {PROBES['probe-eu'][1]}"}
            for status in (Status.OK, Status.FAILED, Status.FAILED):
                body = result(status=status)
                async with http.post(
                    f"http://127.0.0.1:{port}/api/v1/results", json=body, headers=headers
                ) as response:
                    assert response.status == 200
            async with http.get(f"http://127.0.0.1:{port}/metrics") as response:
                text = await response.text()
    finally:
        process.terminate()
        process.wait(10)
    assert "callmon_connect_phase_seconds_bucket" in text
    assert "callmon_incidents_open" in text
    promtool = await asyncio.create_subprocess_exec(
        "promtool",
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await promtool.communicate(text.encode())
    # promtool prints one line per lint problem; clean metrics print nothing
    assert promtool.returncode == 0, (out + err).decode()
    assert out.strip() == b"", out.decode()
    assert err.strip() == b"", err.decode()


def test_bad_configuration_fails_fast_with_the_key(tmp_path: Path) -> None:
    path = tmp_path / "monitor.yaml"
    path.write_text(json.dumps({"probes": [{"name": "p", "region": "r", "token_sha256": "x"}]}))
    done = subprocess.run(
        [sys.executable, "-m", "callmon.cli", "monitor", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 64
    assert "probes[0].token_sha256: expected 64 hex digits" in done.stderr


def test_token_command_prints_a_matching_entry() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "callmon.cli", "token", "--probe", "agent-1", "--region", "eu"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    token = lines[1].strip()
    digest = lines[-1].split(":")[1].strip()
    import hashlib

    assert hashlib.sha256(token.encode()).hexdigest() == digest


def test_the_readme_example_configuration_is_valid(tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### Configuration") :]
    example = section[
        section.index("```yaml") + 7 : section.index("```", section.index("```yaml") + 7)
    ]
    from monitor.config import parse_config

    config = parse_config(yaml.safe_load(example), base=tmp_path)
    assert [c.name for c in config.channels] == ["oncall", "slack", "pd"]
    assert config.policy.escalation.max_escalations == 3
    assert config.probes[0].region == "eu-west"
