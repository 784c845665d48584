"""The `callmon` command as a user runs it: exit codes, JSON contract, the demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import Reflector, free_port

from callmon.callresult import CallResult, Status

CALLMON = [sys.executable, "-m", "callmon.cli"]


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CALLMON, *args], capture_output=True, text=True, timeout=timeout)


def test_probe_json_is_the_contract_and_exit_code_follows_status(reflector: Reflector) -> None:
    done = run("probe", reflector.url, "--duration", "2", "--json", "--ice-host", "127.0.0.1")
    assert done.returncode == 0, done.stderr
    result = CallResult.from_dict(json.loads(done.stdout))
    assert result.status is Status.OK
    assert len(result.samples) == 2

    degraded = run(
        "probe",
        reflector.url + "?video_delay_ms=150",
        "--duration",
        "2",
        "--json",
        "--ice-host",
        "127.0.0.1",
    )
    assert degraded.returncode == 1, degraded.stderr
    assert json.loads(degraded.stdout)["degradations"][0]["metric"] == "av_offset_s"

    failed = run("probe", f"http://127.0.0.1:{free_port()}/whip", "--json", "--timeout", "2")
    assert failed.returncode == 2
    assert json.loads(failed.stdout)["failure"]["phase"] == "signaling"


def test_probe_report_is_readable(reflector: Reflector) -> None:
    done = run(
        "probe",
        reflector.url + "?audio_blackout=1:0.5",
        "--duration",
        "3",
        "--ice-host",
        "127.0.0.1",
        "--threshold",
        "audio_gaps=1",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "status: OK" in done.stdout
    assert "audio: 1 gaps > 200 ms" in done.stdout
    assert "connect time" in done.stdout


def test_usage_errors_exit_64_with_a_message() -> None:
    for args, message in [
        (["probe"], "the following arguments are required: url"),
        (["probe", "http://x", "--signaling", "sip"], "invalid choice: 'sip'"),
        (["probe", "http://x", "--threshold", "jitter=1"], "KEY one of connect_s"),
        (["probe", "http://x", "--ice-host", "nosuchif0"], "neither an IP address"),
        (["probe", "http://x", "--relay-only"], "relay-only needs a TURN server"),
        (["probe", "http://x", "--ice-server", "turn:127.0.0.1:3478"], "needs a username"),
    ]:
        done = run(*args)
        assert done.returncode == 64, (args, done.stderr)
        assert message in done.stderr, (args, done.stderr)


def test_the_demo_tells_the_whole_story(tmp_path: Path) -> None:
    """The README's first command: a degraded reflector opens an incident, notifies the
    sink, and the incident resolves when the degradation ends."""
    base = free_port_block(5)
    done = run(
        "demo",
        "--tour",
        "--duration",
        "0",
        "--dir",
        str(tmp_path / "demo"),
        "--base-port",
        str(base),
        timeout=240,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert f"monitor      http://127.0.0.1:{base}" in out
    assert "tour: incident open" in out
    assert ">> webhook: trigger" in out
    assert ">> webhook: resolve" in out
    assert "tour: resolved" in out
    assert (tmp_path / "demo" / "monitor.sqlite3").exists()


def free_port_block(count: int) -> int:
    """Return a port p such that p .. p+count-1 are free now."""
    import socket

    for base in range(20000, 30000, 17):
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free block of ports")
