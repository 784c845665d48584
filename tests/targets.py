"""Start real third-party WebRTC peers (Janus, coturn) for callmon's probe tests.

Each helper is an async context manager that starts the real binary from the Debian
package, waits until it answers, yields where to reach it and tears everything down on
exit, also when the test fails half-way. Traffic stays on loopback or inside a network
namespace created here, never on the machine's outward interfaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import re
import secrets
import shutil
import signal
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
from aioice import stun

# Every namespace and interface created here starts with this, so crashed runs can be
# found and cleaned up by name.
NAMESPACE_PREFIX = "cmj"

# Each Janus namespace gets 10.213.<n>.0/30; <n> is claimed with a lock file so that
# parallel test runs (pytest-xdist, two CI jobs on one host) never share a subnet.
_SUBNET_FORMAT = "10.213.{index}.{host}"
_SUBNET_INDICES = range(256)
_LOCK_DIR = Path(tempfile.gettempdir()) / "callmon-targets"

_JANUS_CONFIG_DIR = Path("/etc/janus")
_JANUS_HTTP_PORT = 8088
_JANUS_BASE_PATH = "/janus"
_JANUS_KEPT_PLUGIN = "libjanus_echotest.so"
_JANUS_KEPT_TRANSPORT = "libjanus_http.so"

_STARTUP_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.05
_STUN_REPLY_TIMEOUT = 0.2

_TURN_USERNAME = "test"
_TURN_PASSWORD = "test"
_TURN_REALM = "callmon"
# Relay ports come from below Linux's ephemeral range (32768-60999) so ordinary
# outgoing sockets of other processes don't take them while coturn runs.
_TURN_RELAY_PORT_BASES = range(20000, 32000, 32)
_TURN_RELAY_PORT_COUNT = 32


@dataclass(frozen=True)
class JanusTarget:
    """Where a Janus gateway started by `janus_in_namespace` can be reached."""

    url: str
    "Base URL of the Janus HTTP API, e.g. http://10.213.7.2:8088/janus."
    host_address: str
    "Host-side veth address: the probe's only usable ICE host candidate."
    namespace: str
    "Name of the network namespace Janus runs in."
    log_path: Path
    "Janus's own log file."


@dataclass(frozen=True)
class TurnTarget:
    """Where a coturn server started by `coturn` can be reached."""

    url: str
    "TURN URI for RTCIceServer.urls, e.g. turn:127.0.0.1:3478."
    username: str
    "Long-term credential user name."
    password: str
    "Long-term credential password."
    log_path: Path
    "coturn's log file."


def log_tail(path: Path, lines: int = 60) -> str:
    """Return the last `lines` lines of a log file, or a note that it is missing."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"<{path} does not exist>"
    return "\n".join(text.splitlines()[-lines:])


async def run_command(*args: str) -> str:
    """Run a short command to completion and return its stdout; raise on failure."""
    process = await asyncio.create_subprocess_exec(
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed with exit code {process.returncode}: "
            f"{stderr.decode(errors='replace').strip()}"
        )
    return stdout.decode()


async def list_namespaces() -> list[str]:
    """Return the names of all named network namespaces (`ip netns list`)."""
    output = await run_command("ip", "netns", "list")
    # Lines look like "cmj07ab12 (id: 3)" once a namespace has an id.
    return [line.split()[0] for line in output.splitlines() if line.strip()]


def _require(*, root: bool, binaries: tuple[str, ...]) -> None:
    """Raise RuntimeError naming whatever this harness needs but the machine lacks."""
    missing = [f"the `{name}` binary" for name in binaries if shutil.which(name) is None]
    if root and os.geteuid() != 0:
        missing.append("root privileges (network namespaces need CAP_NET_ADMIN)")
    if missing:
        raise RuntimeError("cannot start the test target, missing: " + ", ".join(missing))


# ---------------------------------------------------------------------------
# Subnet claims
# ---------------------------------------------------------------------------


def _try_lock_subnet(index: int) -> IO[bytes] | None:
    """Take the lock for subnet `index` without waiting; return its file or None."""
    _LOCK_DIR.mkdir(parents=True, exist_ok=True)
    lock_file = (_LOCK_DIR / f"subnet-{index}.lock").open("ab")
    try:
        # flock is released by the kernel when the holder dies, so a crashed run never
        # leaves a subnet claimed.
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock_file.close()
        return None
    return lock_file


def _subnet_index(name: str) -> int | None:
    """Return the subnet index encoded in one of our names, or None if not ours."""
    match = re.fullmatch(NAMESPACE_PREFIX + r"([0-9a-f]{2})[0-9a-f]{4}[hn]?", name)
    return int(match.group(1), 16) if match else None


async def _host_links() -> list[str]:
    """Return the names of the interfaces in the host namespace."""
    output = await run_command("ip", "-o", "link", "show")
    # Lines look like "12: cmj07ab12h@if11: <BROADCAST,...> ..."
    return [line.split(":")[1].strip().split("@")[0] for line in output.splitlines()]


async def _delete_link_if_present(name: str) -> None:
    """Delete network interface `name` unless it is already gone."""
    if name in await _host_links():
        await run_command("ip", "link", "delete", name)


async def _namespace_pids(namespace: str) -> list[str]:
    """Return the ids of the processes running inside `namespace`."""
    return (await run_command("ip", "netns", "pids", namespace)).split()


async def remove_stale_namespaces() -> None:
    """Delete namespaces and veths left by crashed runs whose Janus is gone.

    A leftover is stale when nobody holds its subnet lock (the owning test process is
    dead) and no process runs inside its namespace any more.
    """
    namespaces = set(await list_namespaces())
    links = await _host_links()
    candidates = {name for name in namespaces if _subnet_index(name) is not None}
    # A crash between `ip link add` and `ip link set netns` leaves both veth ends here.
    candidates |= {name[:-1] for name in links if _subnet_index(name) is not None}
    for namespace in sorted(candidates):
        index = _subnet_index(namespace)
        assert index is not None
        lock = _try_lock_subnet(index)
        if lock is None:
            continue
        try:
            if namespace in namespaces:
                if await _namespace_pids(namespace):
                    continue
                await run_command("ip", "netns", "delete", namespace)
            for link in links:
                if link in (namespace + "h", namespace + "n"):
                    with contextlib.suppress(RuntimeError):
                        # Already gone if the namespace deletion took the pair with it.
                        await run_command("ip", "link", "delete", link)
        finally:
            lock.close()


async def _claim_subnet() -> tuple[int, IO[bytes]]:
    """Pick a 10.213.<n>.0/30 that no live run uses and lock it; return n and the lock."""
    in_use = await run_command("ip", "-4", "-o", "addr", "show")
    indices = list(_SUBNET_INDICES)
    random.shuffle(indices)
    for index in indices:
        # An address still configured means a leftover we must not disturb (for example
        # a namespace whose Janus survived its test process).
        # Lines read "... inet 10.213.7.1/30 ...".
        if f" {_SUBNET_FORMAT.format(index=index, host=1)}/" in in_use:
            continue
        lock = _try_lock_subnet(index)
        if lock is not None:
            return index, lock
    raise RuntimeError("no free 10.213.<n>.0/30 subnet for a Janus namespace")


# ---------------------------------------------------------------------------
# Janus configuration
# ---------------------------------------------------------------------------


def _section_body(text: str, section: str) -> tuple[int, int] | None:
    """Return the start and end offsets of the body of top-level `section: { ... }`."""
    header = re.search(rf"^{re.escape(section)}\s*:\s*\{{", text, re.MULTILINE)
    if header is None:
        return None
    depth = 1
    position = header.end()
    while position < len(text):
        char = text[position]
        if char == "#" or text.startswith("//", position):
            # Comments may contain braces; skip to the end of the line.
            newline = text.find("\n", position)
            position = len(text) if newline < 0 else newline
            continue
        if char == '"':
            position = text.index('"', position + 1)
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return header.end(), position
        position += 1
    raise ValueError(f"unbalanced braces in section {section!r}")


def _format_value(value: str | bool | int) -> str:
    """Render a Python value as a libconfig (jcfg) scalar."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(value)


def set_jcfg_options(
    text: str, section: str, options: Mapping[str, str | bool | int | None]
) -> str:
    """Return `text` with `options` set in `section`; a None value removes the option.

    Existing settings of those keys are deleted (commented-out examples are left
    alone) and the new ones are written at the top of the section, which is created if
    the file lacks it.
    """
    span = _section_body(text, section)
    if span is None:
        text = f"{text.rstrip()}\n\n{section}: {{\n}}\n"
        span = _section_body(text, section)
        assert span is not None
    start, end = span
    body = text[start:end]
    for key in options:
        body = re.sub(rf"^[ \t]*{re.escape(key)}[ \t]*=.*\n?", "", body, flags=re.MULTILINE)
    added = "".join(
        f"\t{key} = {_format_value(value)}\n" for key, value in options.items() if value is not None
    )
    return text[:start] + "\n" + added + body.lstrip("\n") + text[end:]


def _jcfg_string(text: str, section: str, key: str, default: str) -> str:
    """Return a string option of a jcfg section, or `default` if it is not set."""
    span = _section_body(text, section)
    if span is None:
        return default
    match = re.search(
        rf'^[ \t]*{re.escape(key)}[ \t]*=[ \t]*"([^"]*)"', text[span[0] : span[1]], re.M
    )
    return match.group(1) if match else default


def _libraries_except(folder: Path, kept: str | None) -> str:
    """Return a jcfg `disable` list naming every Janus module in `folder` but `kept`."""
    # Janus loads every "*.so" in the folder (not the versioned "*.so.1" links).
    names = sorted(path.name for path in folder.glob("*.so") if path.name != kept)
    return ",".join(names)


def write_janus_config(config_dir: Path, *, interface: str, address: str) -> None:
    """Copy /etc/janus into `config_dir` and edit it for an isolated EchoTest Janus.

    Janus gathers ICE candidates only on `interface`, serves the plain HTTP API on
    `address`:8088 and loads nothing but the EchoTest plugin and the HTTP transport.
    """
    shutil.copytree(_JANUS_CONFIG_DIR, config_dir)
    main_path = config_dir / "janus.jcfg"
    main = main_path.read_text()
    main = set_jcfg_options(
        main,
        "general",
        {
            "configs_folder": str(config_dir),
            # Without it Janus guesses its SDP address by routing towards a public IP,
            # which fails in the route-less namespace and falls back to 127.0.0.1.
            "interface": address,
        },
    )
    main = set_jcfg_options(
        main,
        "nat",
        {
            # mDNS lookups of .local candidates would leave the namespace and stall.
            "ignore_mdns": True,
            # libnice never offers 127.0.0.1, so the veth is the only usable interface.
            "ice_enforce_list": interface,
            "stun_server": None,
            "stun_port": None,
            "turn_server": None,
            "nat_1_1_mapping": None,
            # Full ICE so Janus runs its own connectivity checks, as in production.
            "ice_lite": False,
            "ice_tcp": False,
            # Half-trickle: the answer carries all of Janus's candidates, which aiortc
            # needs since it does not trickle.
            "full_trickle": False,
        },
    )
    plugins_folder = Path(
        _jcfg_string(main, "general", "plugins_folder", "/usr/lib/x86_64-linux-gnu/janus/plugins")
    )
    transports_folder = Path(
        _jcfg_string(
            main, "general", "transports_folder", "/usr/lib/x86_64-linux-gnu/janus/transports"
        )
    )
    events_folder = Path(
        _jcfg_string(main, "general", "events_folder", "/usr/lib/x86_64-linux-gnu/janus/events")
    )
    loggers_folder = Path(
        _jcfg_string(main, "general", "loggers_folder", "/usr/lib/x86_64-linux-gnu/janus/loggers")
    )
    main = set_jcfg_options(
        main, "plugins", {"disable": _libraries_except(plugins_folder, _JANUS_KEPT_PLUGIN)}
    )
    main = set_jcfg_options(
        main,
        "transports",
        {"disable": _libraries_except(transports_folder, _JANUS_KEPT_TRANSPORT)},
    )
    main = set_jcfg_options(
        main,
        "events",
        {"broadcast": False, "disable": _libraries_except(events_folder, None)},
    )
    main = set_jcfg_options(main, "loggers", {"disable": _libraries_except(loggers_folder, None)})
    main_path.write_text(main)

    http_path = config_dir / "janus.transport.http.jcfg"
    http = http_path.read_text()
    http = set_jcfg_options(
        http,
        "general",
        {
            "http": True,
            "ip": address,
            "interface": None,
            "port": _JANUS_HTTP_PORT,
            "base_path": _JANUS_BASE_PATH,
            "https": False,
        },
    )
    http = set_jcfg_options(http, "admin", {"admin_http": False, "admin_https": False})
    http_path.write_text(http)


# ---------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------


async def _stop_process(process: asyncio.subprocess.Process) -> None:
    """Terminate `process` gracefully, killing it if it outlives the stop deadline."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


@contextlib.contextmanager
def _workdir(workdir: Path | None, prefix: str) -> Iterator[Path]:
    """Yield `workdir` (kept afterwards) or a temporary directory removed on exit."""
    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        yield workdir
        return
    with tempfile.TemporaryDirectory(prefix=prefix) as temporary:
        yield Path(temporary)


async def _wait_for_janus(
    process: asyncio.subprocess.Process, url: str, logs: tuple[Path, ...]
) -> None:
    """Poll `url`/info until Janus answers JSON; raise with its log tail otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _STARTUP_TIMEOUT
    last_error = "no attempt made"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as http:
        while loop.time() < deadline:
            if process.returncode is not None:
                last_error = f"janus exited with code {process.returncode}"
                break
            try:
                async with http.get(f"{url}/info") as response:
                    info = await response.json(content_type=None)
                if isinstance(info, dict) and info.get("janus") == "server_info":
                    return
                last_error = f"unexpected answer {info!r}"
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                last_error = repr(error)
            await asyncio.sleep(_POLL_INTERVAL)
    tails = "\n".join(f"--- {path} ---\n{log_tail(path)}" for path in logs)
    raise RuntimeError(f"Janus at {url} did not answer /info: {last_error}\n{tails}")


@contextlib.asynccontextmanager
async def janus_in_namespace(workdir: Path | None = None) -> AsyncIterator[JanusTarget]:
    """Run the real Janus (EchoTest over HTTP) in a fresh network namespace.

    The namespace is joined to the host by a veth pair on a private /30: the host end
    gets .1 (`JanusTarget.host_address`, the address the probe must use as its only ICE
    candidate), Janus's end .2. Configuration and logs live in `workdir` when given (so
    pytest's tmp_path keeps them for a failing test) and in a temporary directory
    removed on exit otherwise.
    """
    _require(root=True, binaries=("ip", "janus"))
    async with contextlib.AsyncExitStack() as stack:
        await remove_stale_namespaces()
        index, lock = await _claim_subnet()
        stack.callback(lock.close)

        namespace = f"{NAMESPACE_PREFIX}{index:02x}{secrets.token_hex(2)}"
        host_if, namespace_if = namespace + "h", namespace + "n"
        host_address = _SUBNET_FORMAT.format(index=index, host=1)
        namespace_address = _SUBNET_FORMAT.format(index=index, host=2)

        # build the namespace; each undo step is registered as soon as its resource exists
        await run_command("ip", "netns", "add", namespace)
        stack.push_async_callback(run_command, "ip", "netns", "delete", namespace)
        await run_command(
            "ip", "link", "add", host_if, "type", "veth", "peer", "name", namespace_if
        )
        # Deleting one end removes the pair synchronously, unlike the namespace's
        # deferred cleanup, so the next run never sees a lingering interface.
        stack.push_async_callback(_delete_link_if_present, host_if)
        await run_command("ip", "link", "set", namespace_if, "netns", namespace)
        await run_command("ip", "addr", "add", f"{host_address}/30", "dev", host_if)
        await run_command("ip", "link", "set", host_if, "up")
        in_namespace = ("ip", "netns", "exec", namespace)
        await run_command(*in_namespace, "ip", "link", "set", "lo", "up")
        await run_command(
            *in_namespace, "ip", "addr", "add", f"{namespace_address}/30", "dev", namespace_if
        )
        await run_command(*in_namespace, "ip", "link", "set", namespace_if, "up")

        # configure Janus
        directory = stack.enter_context(_workdir(workdir, prefix="callmon-janus-"))
        config_dir = directory / "janus-config"
        write_janus_config(config_dir, interface=namespace_if, address=namespace_address)
        log_path = directory / "janus.log"
        output_path = directory / "janus.out"

        # start Janus in the foreground (-b would daemonize it out of our reach)
        output = stack.enter_context(output_path.open("wb"))
        process = await asyncio.create_subprocess_exec(
            *in_namespace,
            "janus",
            f"--configs-folder={config_dir}",
            f"--config={config_dir / 'janus.jcfg'}",
            f"--log-file={log_path}",
            "--disable-stdout",
            "--disable-colors",
            "--debug-timestamps",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
        stack.push_async_callback(_stop_process, process)

        url = f"http://{namespace_address}:{_JANUS_HTTP_PORT}{_JANUS_BASE_PATH}"
        await _wait_for_janus(process, url, (log_path, output_path))
        yield JanusTarget(
            url=url, host_address=host_address, namespace=namespace, log_path=log_path
        )


# ---------------------------------------------------------------------------
# coturn
# ---------------------------------------------------------------------------


def _udp_port_free(port: int) -> bool:
    """Tell whether a UDP socket can bind 127.0.0.1:`port` right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_udp_port() -> int:
    """Return a UDP port on 127.0.0.1 that the kernel just handed out as free."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _free_relay_range() -> tuple[int, int]:
    """Return (min, max) of a block of UDP ports that are all free right now."""
    bases = list(_TURN_RELAY_PORT_BASES)
    random.shuffle(bases)
    for base in bases:
        ports = range(base, base + _TURN_RELAY_PORT_COUNT)
        if all(_udp_port_free(port) for port in ports):
            return ports[0], ports[-1]
    raise RuntimeError("no free block of UDP ports for coturn relays")


async def _stun_binding(port: int) -> bool:
    """Send one STUN Binding request to 127.0.0.1:`port`; tell whether it was answered."""
    loop = asyncio.get_running_loop()
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(("127.0.0.1", port))
        try:
            await loop.sock_sendall(sock, bytes(request))
            data = await asyncio.wait_for(loop.sock_recv(sock, 2048), _STUN_REPLY_TIMEOUT)
        except (TimeoutError, ConnectionRefusedError):
            # Refused: the ICMP port-unreachable of a server that is not listening yet.
            return False
    try:
        response = stun.parse_message(data)
    except ValueError:
        return False
    return (
        response.transaction_id == request.transaction_id
        and response.message_class == stun.Class.RESPONSE
        and "XOR-MAPPED-ADDRESS" in response.attributes
    )


@contextlib.asynccontextmanager
async def coturn(workdir: Path | None = None) -> AsyncIterator[TurnTarget]:
    """Run the real coturn on 127.0.0.1 with long-term credentials test:test.

    Loopback peers are allowed, so two aiortc peers in one process can relay to each
    other through it. Logs live in `workdir` when given, otherwise in a temporary
    directory removed on exit.
    """
    _require(root=False, binaries=("turnserver",))
    async with contextlib.AsyncExitStack() as stack:
        directory = stack.enter_context(_workdir(workdir, prefix="callmon-coturn-"))
        log_path = directory / "turnserver.log"
        output_path = directory / "turnserver.out"
        port = _free_udp_port()
        min_port, max_port = _free_relay_range()

        output = stack.enter_context(output_path.open("wb"))
        process = await asyncio.create_subprocess_exec(
            "turnserver",
            # -n: ignore /etc/turnserver.conf, whose syslog setting would hide the log
            "-n",
            "--listening-ip=127.0.0.1",
            "--relay-ip=127.0.0.1",
            f"--listening-port={port}",
            f"--min-port={min_port}",
            f"--max-port={max_port}",
            "--lt-cred-mech",
            "--user",
            f"{_TURN_USERNAME}:{_TURN_PASSWORD}",
            "--realm",
            _TURN_REALM,
            "--fingerprint",
            "--no-tls",
            "--no-dtls",
            "--no-cli",
            # coturn refuses loopback peers by default, and both test peers are local.
            "--allow-loopback-peers",
            "--log-file",
            str(log_path),
            "--simple-log",
            "--pidfile",
            str(directory / "turnserver.pid"),
            # A private user database, so parallel runs don't share /var/lib/turn/turndb.
            f"--userdb={directory / 'turndb'}",
            # Moderate verbosity logs each session and allocation, which is what a
            # failing relay test needs to show.
            "--verbose",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=output,
            stderr=asyncio.subprocess.STDOUT,
        )
        stack.push_async_callback(_stop_process, process)

        # wait until coturn answers STUN on its listening port
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _STARTUP_TIMEOUT
        while not await _stun_binding(port):
            if process.returncode is not None or loop.time() > deadline:
                tails = "\n".join(
                    f"--- {path} ---\n{log_tail(path)}" for path in (log_path, output_path)
                )
                raise RuntimeError(
                    f"coturn on 127.0.0.1:{port} did not answer STUN "
                    f"(exit code {process.returncode})\n{tails}"
                )
            await asyncio.sleep(_POLL_INTERVAL)

        yield TurnTarget(
            url=f"turn:127.0.0.1:{port}",
            username=_TURN_USERNAME,
            password=_TURN_PASSWORD,
            log_path=log_path,
        )
