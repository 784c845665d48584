"""The `callmon` command: one subcommand per role.

Subcommands import their role's modules only when run, so `callmon monitor` on a central
host never loads aiortc or PyAV.

Exit codes of `callmon probe`: 0 ok, 1 degraded, 2 failed; 64 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from callmon import __version__

EX_USAGE = 64


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors exit 64, leaving 2 to mean "call failed"."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


def _add_ice_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ICE (no server is contacted unless given here)")
    group.add_argument(
        "--ice-server",
        action="append",
        default=[],
        metavar="URL",
        help="STUN or TURN server, e.g. stun:10.0.0.1:3478 or turn:10.0.0.1:3478 (repeatable)",
    )
    group.add_argument("--ice-username", help="username for the TURN servers")
    group.add_argument("--ice-credential", help="credential for the TURN servers")
    group.add_argument("--relay-only", action="store_true", help="use relayed candidates only")
    group.add_argument(
        "--ice-host",
        action="append",
        default=[],
        metavar="ADDR|IFACE",
        help="offer host candidates on this address or interface only (repeatable; "
        "127.0.0.1 allowed). Default: every address but loopback",
    )


def _ice_options(args: argparse.Namespace) -> object:
    from probes.ice import IceOptions, IceServer

    servers = tuple(
        IceServer(
            url=url,
            username=args.ice_username if not url.startswith("stun") else None,
            credential=args.ice_credential if not url.startswith("stun") else None,
        )
        for url in args.ice_server
    )
    options = IceOptions(servers=servers, relay_only=args.relay_only, hosts=tuple(args.ice_host))
    options.configuration()  # validate now: a bad flag is a usage error, not a failed call
    options.host_addresses()
    return options


def _token(args: argparse.Namespace) -> str | None:
    if getattr(args, "token_file", None):
        return str(Path(args.token_file).read_text().strip())
    token: str | None = args.token
    return token


def _thresholds(pairs: Sequence[str]) -> object:
    import dataclasses

    from callmon.callresult import Thresholds

    fields = {f.name: f for f in dataclasses.fields(Thresholds)}
    values: dict[str, float | int] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"--threshold {pair!r}: expected KEY=VALUE, KEY one of {', '.join(fields)}"
            )
        try:
            values[key] = int(text) if fields[key].type in (int, "int") else float(text)
        except ValueError:
            raise ValueError(f"--threshold {pair!r}: {text!r} is not a number") from None
    return Thresholds(**values)  # type: ignore[arg-type]


# --- probe --------------------------------------------------------------------------------


def _probe_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("probe", help="hold one measured test call against a target")
    p.add_argument("url", help="WHIP endpoint, or Janus HTTP API root with --signaling janus")
    p.add_argument("--signaling", choices=["whip", "janus"], default="whip")
    p.add_argument("--duration", type=float, default=10.0, metavar="S", help="media to hold")
    p.add_argument("--json", action="store_true", help="print the callmon.call/v1 result")
    p.add_argument("--token", help="bearer token for the target")
    p.add_argument("--token-file", help="read the bearer token from this file")
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="connect deadline")
    p.add_argument(
        "--media-timeout", type=float, default=5.0, metavar="S", help="first-media deadline"
    )
    p.add_argument("--region", help="region label to put in the result")
    p.add_argument(
        "--threshold",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a degradation threshold (e.g. jitter_s=0.05)",
    )
    _add_ice_arguments(p)
    p.set_defaults(run=_run_probe)


def _run_probe(args: argparse.Namespace) -> int:
    from callmon.callresult import Signaling, Status
    from probes.call import CallOptions, run_call
    from probes.ice import IceOptions
    from probes.report import LiveLine, render

    if args.duration <= 0 or args.timeout <= 0:
        raise ValueError("--duration and --timeout must be positive")
    ice = _ice_options(args)
    assert isinstance(ice, IceOptions)
    options = CallOptions(
        url=args.url,
        signaling=Signaling(args.signaling),
        duration_s=args.duration,
        connect_timeout_s=args.timeout,
        media_timeout_s=args.media_timeout,
        token=_token(args),
        ice=ice,
        thresholds=_thresholds(args.threshold),  # type: ignore[arg-type]
        region=args.region,
    )
    live = None if args.json else LiveLine()
    try:
        result = asyncio.run(run_call(options, live))
    finally:
        if live is not None:
            live.close()
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(render(result))
    return list(Status).index(result.status)


# --- reflector ------------------------------------------------------------------------------


def _listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        return host or "127.0.0.1", int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}") from None


def _reflector_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("reflector", help="serve callmon's WHIP echo target")
    p.add_argument("--listen", type=_listen, default=("127.0.0.1", 8089), metavar="HOST:PORT")
    p.add_argument("--path", default="/whip", help="WHIP endpoint path")
    p.add_argument("--max-calls", type=int, default=20)
    p.add_argument("--max-sdp-bytes", type=int, default=64 * 1024)
    p.add_argument("--max-duration", type=float, default=3600.0, metavar="S")
    p.add_argument("--token", help="require this bearer token")
    p.add_argument("--token-file", help="read the required bearer token from this file")
    p.add_argument(
        "--cors-origin",
        default="*",
        help="origin browsers may call from (CORS); 'none' to send no CORS headers",
    )
    _add_ice_arguments(p)
    p.set_defaults(run=_run_reflector)


def _run_reflector(args: argparse.Namespace) -> int:
    from aiohttp import web

    from probes.ice import IceOptions
    from reflector.app import ReflectorConfig, create_app

    ice = _ice_options(args)
    assert isinstance(ice, IceOptions)
    host, port = args.listen
    config = ReflectorConfig(
        host=host,
        port=port,
        path=args.path,
        max_calls=args.max_calls,
        max_sdp_bytes=args.max_sdp_bytes,
        max_duration_s=args.max_duration,
        token=_token(args),
        cors_origin=None if args.cors_origin == "none" else args.cors_origin,
        ice=ice,
    )
    print(f"callmon reflector {__version__}: WHIP at http://{host}:{port}{config.path}", flush=True)
    web.run_app(create_app(config), host=host, port=port, print=None)
    return 0


# --- agent ---------------------------------------------------------------------------------------


def _agent_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("agent", help="probe a region's targets on a schedule or continuously")
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="agent.yaml")
    p.set_defaults(run=_run_agent)


def _run_agent(args: argparse.Namespace) -> int:
    import logging
    import signal

    from probes.agent import AgentError, run_agent
    from probes.agentconfig import load_agent_config

    config = load_agent_config(args.config)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await run_agent(config, stop)

    try:
        asyncio.run(main())
    except AgentError as exc:
        raise ValueError(str(exc)) from None
    return 0


# --- impair -------------------------------------------------------------------------------------


def _impair_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("impair", help="impair a running reflector's calls live (or show, or clear)")
    p.add_argument("reflector", help="the reflector's base URL, e.g. http://127.0.0.1:8089")
    p.add_argument(
        "params",
        nargs="*",
        metavar="NAME=VALUE",
        help="loss=0.1, jitter_ms=50, audio_delay_ms=250, video_delay_ms=..., seed=..., "
        "video_blackout=START:DURATION[:EVERY], audio_blackout=..., down=1",
    )
    p.add_argument("--clear", action="store_true", help="remove the live impairment")
    p.add_argument("--token", help="the reflector's bearer token")
    p.add_argument("--token-file", help="read the reflector's bearer token from this file")
    p.set_defaults(run=_run_impair)


def _run_impair(args: argparse.Namespace) -> int:
    import urllib.error
    import urllib.parse
    import urllib.request

    params = []
    for pair in args.params:
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"{pair!r}: expected NAME=VALUE")
        params.append((name, value))
    url = args.reflector.rstrip("/") + "/admin/impairment"
    method = "DELETE" if args.clear else "PUT" if params else "GET"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    request = urllib.request.Request(url, method=method)
    token = _token(args)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
    except urllib.error.HTTPError as exc:
        raise ValueError(
            f"the reflector answered {exc.code}: {exc.read().decode().strip()}"
        ) from None
    return 0


# --- monitor ----------------------------------------------------------------------------------


def _monitor_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("monitor", help="run the monitor: ingest, metrics, rules, incidents")
    p.add_argument("--config", required=True, type=Path, metavar="FILE", help="monitor.yaml")
    p.add_argument("--listen", type=_listen, metavar="HOST:PORT", help="override `listen`")
    p.set_defaults(run=_run_monitor)


def _run_monitor(args: argparse.Namespace) -> int:
    import dataclasses

    from aiohttp import web

    from monitor.app import create_app
    from monitor.config import load_config

    config = load_config(args.config)
    if args.listen:
        config = dataclasses.replace(config, host=args.listen[0], port=args.listen[1])
    # A scrape builds its text in a worker thread holding the GIL for hundreds of ms with
    # many series; the event loop gets the GIL back only at the switch interval, paying
    # it at every step of every request. 0.5 ms instead of 5 keeps ingest flowing.
    sys.setswitchinterval(0.0005)
    print(
        f"callmon monitor {__version__}: http://{config.host}:{config.port} "
        f"(database {config.database})",
        flush=True,
    )
    web.run_app(create_app(config), host=config.host, port=config.port, print=None)
    return 0


def _token_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("token", help="mint a token and print the configuration line for it")
    p.add_argument("--probe", metavar="NAME", help="a probe's token (with --region)")
    p.add_argument("--region", help="the probe's region")
    p.add_argument("--operator", metavar="NAME", help="an operator's token")
    p.set_defaults(run=_run_token)


def _run_token(args: argparse.Namespace) -> int:
    import secrets

    from monitor.config import token_digest

    if bool(args.probe) == bool(args.operator):
        raise ValueError("give --probe NAME --region REGION, or --operator NAME")
    if args.probe and not args.region:
        raise ValueError("a probe needs --region")
    token = "cm_" + secrets.token_urlsafe(32)
    print(f"token (give it to the {'probe' if args.probe else 'operator'}; shown once):")
    print(f"  {token}")
    print("configuration entry:")
    if args.probe:
        print(f"  probes:\n    - name: {args.probe}\n      region: {args.region}")
    else:
        print(f"  operators:\n    - name: {args.operator}")
    print(f"      token_sha256: {token_digest(token)}")
    return 0


# --- demo ------------------------------------------------------------------------------------


def _demo_parser(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "demo",
        help="run a monitor, a reflector and two agents on loopback, with a webhook sink",
    )
    p.add_argument("--dir", type=Path, default=Path("callmon-demo"), help="data and logs")
    p.add_argument(
        "--base-port",
        type=int,
        default=8090,
        help="monitor on it, reflector +1, webhook sink +2, agents +3 and +4",
    )
    p.add_argument(
        "--tour",
        action="store_true",
        help="degrade the reflector by itself: an incident opens, notifies and resolves",
    )
    p.add_argument(
        "--duration", type=float, metavar="S", help="stop after this long (default: Ctrl-C)"
    )
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from callmon.demo import run_demo

    folder = args.dir.resolve()  # the children run inside it
    return asyncio.run(run_demo(folder, args.base_port, tour=args.tour, duration_s=args.duration))


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="callmon", description="Real-time call quality monitor.")
    parser.add_argument("--version", action="version", version=f"callmon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _probe_parser(sub)
    _reflector_parser(sub)
    _agent_parser(sub)
    _impair_parser(sub)
    _monitor_parser(sub)
    _token_parser(sub)
    _demo_parser(sub)
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
    except (ValueError, OSError) as exc:
        parser.exit(EX_USAGE, f"callmon {args.command}: {exc}\n")
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
