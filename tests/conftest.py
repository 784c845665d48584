"""Shared fixtures: a real reflector process on loopback, and a probe that calls it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from callmon.callresult import CallResult
from probes.call import CallOptions, run_call
from probes.ice import IceOptions

LOOPBACK = IceOptions(hosts=("127.0.0.1",))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> bool:
    """Poll `url` until it answers; False once the process ended or the time ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return True
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)  # a child process coming up, from synchronous fixture code


@dataclass(frozen=True)
class Reflector:
    url: str
    "The WHIP endpoint."
    base: str
    "http://host:port"
    log: Path


def start_reflector(
    tmp: Path, *args: str, port: int | None = None
) -> tuple[subprocess.Popen[bytes], Reflector]:
    """Start `callmon reflector` on loopback (a free port by default), wait until it serves."""
    port = port or free_port()
    log = tmp / f"reflector-{port}.log"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "callmon.cli",
            "reflector",
            "--listen",
            f"127.0.0.1:{port}",
            "--ice-host",
            "127.0.0.1",
            *args,
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    if not wait_http(base + "/healthz", process, 15):
        process.kill()
        raise RuntimeError(f"reflector did not start:\n{log.read_text()}")
    return process, Reflector(url=base + "/whip", base=base, log=log)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def reflector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reflector]:
    """One reflector process for the session, as a user would run it."""
    process, handle = start_reflector(tmp_path_factory.mktemp("reflector"), "--max-calls", "8")
    yield handle
    stop(process)


async def call(url: str, duration_s: float = 6.0, **options: Any) -> CallResult:
    """Hold one probe call over loopback."""
    options.setdefault("ice", LOOPBACK)
    return await run_call(CallOptions(url=url, duration_s=duration_s, **options))


async def applied(result: CallResult) -> dict[str, Any]:
    """Fetch what the reflector says it did to this call (its ground truth)."""
    assert result.target.session, "the probe did not record the WHIP resource"
    async with (
        aiohttp.ClientSession() as http,
        http.get(result.target.session, params={"packets": "1"}) as response,
    ):
        assert response.status == 200
        record: dict[str, Any] = await response.json()
        return record
