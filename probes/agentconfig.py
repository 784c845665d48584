"""An agent's configuration: its monitor, its region, and the targets it probes.

Validated at load with errors naming the key, so a misconfigured agent stops at once
with a clear message instead of failing calls later.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml

from callmon.callresult import Signaling, Thresholds
from probes.ice import IceOptions, IceServer


class AgentConfigError(ValueError):
    """The agent's configuration is wrong; the message names the key."""


@dataclass(frozen=True)
class TargetConfig:
    name: str
    "A label for logs and the agent's metrics."
    url: str
    kind: Signaling = Signaling.WHIP
    token: str | None = None
    "Bearer token for the target, if it wants one."
    mode: str = "scheduled"
    "scheduled: a call every interval; continuous: one long-held call, seconds streamed."
    interval_s: float = 60.0
    splay_s: float = 10.0
    "Each scheduled call starts up to this much later, at random, so agents spread out."
    duration_s: float = 10.0
    "Scheduled: media held per call. Continuous: length of each call before a fresh one."
    ice: IceOptions = field(default_factory=IceOptions)
    thresholds: Thresholds = field(default_factory=Thresholds)


@dataclass(frozen=True)
class AgentConfig:
    monitor_url: str
    "Base URL of the monitor (the agent posts to /api/v1/results)."
    monitor_token: str
    region: str
    "The region this agent runs in (the monitor trusts the token's region)."
    spool: Path
    "SQLite file that holds results until the monitor has them."
    targets: tuple[TargetConfig, ...]
    listen: tuple[str, int] | None = ("127.0.0.1", 9101)
    "Where /metrics and /healthz are served; None for nowhere."
    concurrency: int = 4
    "Scheduled calls at once (continuous calls do not count)."
    batch_s: float = 1.0
    "How often a continuous call's seconds are shipped."
    overload_lag_s: float = 0.025


_TOP = {
    "monitor",
    "region",
    "spool",
    "listen",
    "concurrency",
    "batch_s",
    "overload_lag_s",
    "ice",
    "targets",
}
_TARGET = {
    "name",
    "url",
    "kind",
    "token",
    "token_file",
    "mode",
    "interval_s",
    "splay_s",
    "duration_s",
    "ice",
    "thresholds",
}


def load_agent_config(path: Path) -> AgentConfig:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise AgentConfigError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AgentConfigError(f"{path} is not YAML: {exc}") from None
    return parse_agent_config(document, base=path.parent)


def parse_agent_config(document: Any, base: Path = Path()) -> AgentConfig:
    if not isinstance(document, Mapping):
        raise AgentConfigError("the configuration must be a mapping")
    _unknown(document, _TOP, "")
    monitor = document.get("monitor")
    if not isinstance(monitor, Mapping):
        raise AgentConfigError("monitor: required, with url and token (or token_file)")
    _unknown(monitor, {"url", "token", "token_file"}, "monitor.")
    monitor_url = _url(monitor.get("url"), "monitor.url")
    token = _secret(monitor, base, "monitor.")
    if token is None:
        raise AgentConfigError("monitor.token: required (or monitor.token_file)")
    region = document.get("region")
    if not isinstance(region, str) or not region:
        raise AgentConfigError("region: required")
    ice = _ice(document.get("ice", {}), "ice", IceOptions())
    targets = document.get("targets")
    if not isinstance(targets, list) or not targets:
        raise AgentConfigError("targets: a non-empty list is required")
    parsed = tuple(_target(t, f"targets[{i}]", ice, base) for i, t in enumerate(targets))
    names = [t.name for t in parsed]
    if len(set(names)) != len(names):
        raise AgentConfigError("targets: names must be unique")
    listen_text = document.get("listen", "127.0.0.1:9101")
    return AgentConfig(
        monitor_url=monitor_url.rstrip("/"),
        monitor_token=token,
        region=region,
        spool=base / str(document.get("spool", f"callmon-agent-{region}.spool")),
        targets=parsed,
        listen=None if listen_text in (None, "none") else _listen(listen_text),
        concurrency=_int(document, "concurrency", 4, ""),
        batch_s=_number(document, "batch_s", 1.0, "", low=0.1),
        overload_lag_s=_number(document, "overload_lag_s", 0.025, "", low=0.001),
    )


def _unknown(entry: Mapping[str, Any], known: set[str], where: str) -> None:
    extra = sorted(set(entry) - known)
    if extra:
        raise AgentConfigError(
            f"{where}{extra[0]}: unknown key (known: {', '.join(sorted(known))})"
        )


def _url(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise AgentConfigError(f"{where}: required")
    parsed = urlparse(value)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise AgentConfigError(f"{where}: {value!r} is not an http(s) URL")
    try:
        parsed.port  # noqa: B018  # raises on a bad port
    except ValueError:
        raise AgentConfigError(f"{where}: {value!r} has a bad port") from None
    return value


def _secret(entry: Mapping[str, Any], base: Path, where: str) -> str | None:
    if "token_file" in entry:
        path = base / str(entry["token_file"])
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise AgentConfigError(
                f"{where}token_file: cannot read {path}: {exc.strerror}"
            ) from None
    token = entry.get("token")
    if token is not None and (not isinstance(token, str) or not token):
        raise AgentConfigError(f"{where}token: expected text")
    return token


def _listen(text: Any) -> tuple[str, int]:
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit():
        raise AgentConfigError(f"listen: expected HOST:PORT, got {text!r}")
    return host, int(port)


def _number(
    entry: Mapping[str, Any], key: str, default: float, where: str, low: float = 0.0
) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
        raise AgentConfigError(f"{where}{key}: expected a number >= {low:g}")
    return float(value)


def _int(entry: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise AgentConfigError(f"{where}{key}: expected a positive integer")
    return value


def _ice(entry: Any, where: str, defaults: IceOptions) -> IceOptions:
    if not isinstance(entry, Mapping):
        raise AgentConfigError(f"{where}: expected a mapping")
    _unknown(entry, {"hosts", "servers", "relay_only"}, f"{where}.")
    servers = defaults.servers
    if "servers" in entry:
        raw = entry["servers"]
        if not isinstance(raw, list):
            raise AgentConfigError(f"{where}.servers: expected a list")
        try:
            servers = tuple(
                IceServer(url=s["url"], username=s.get("username"), credential=s.get("credential"))
                for s in raw
            )
        except (TypeError, KeyError, ValueError) as exc:
            raise AgentConfigError(f"{where}.servers: {exc}") from None
    hosts = entry.get("hosts", list(defaults.hosts))
    if not isinstance(hosts, list) or not all(isinstance(h, str) for h in hosts):
        raise AgentConfigError(f"{where}.hosts: expected a list of addresses or interfaces")
    options = IceOptions(
        servers=servers,
        relay_only=bool(entry.get("relay_only", defaults.relay_only)),
        hosts=tuple(hosts),
    )
    try:
        options.configuration()
        options.host_addresses()
    except ValueError as exc:
        raise AgentConfigError(f"{where}: {exc}") from None
    return options


def _target(entry: Any, where: str, ice: IceOptions, base: Path) -> TargetConfig:
    if not isinstance(entry, Mapping):
        raise AgentConfigError(f"{where}: expected a mapping")
    _unknown(entry, _TARGET, f"{where}.")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise AgentConfigError(f"{where}.name: required")
    try:
        kind = Signaling(entry.get("kind", "whip"))
    except ValueError:
        raise AgentConfigError(f"{where}.kind: whip or janus") from None
    mode = entry.get("mode", "scheduled")
    if mode not in ("scheduled", "continuous"):
        raise AgentConfigError(f"{where}.mode: scheduled or continuous")
    thresholds = entry.get("thresholds", {})
    known = {f.name for f in dataclasses.fields(Thresholds)}
    if not isinstance(thresholds, Mapping) or not set(thresholds) <= known:
        raise AgentConfigError(f"{where}.thresholds: keys among {', '.join(sorted(known))}")
    try:
        limits = Thresholds(**thresholds)
    except TypeError as exc:
        raise AgentConfigError(f"{where}.thresholds: {exc}") from None
    interval = _number(entry, "interval_s", 60.0, f"{where}.", low=1.0)
    duration = _number(
        entry, "duration_s", 10.0 if mode == "scheduled" else 3600.0, f"{where}.", low=1.0
    )
    if mode == "scheduled" and duration >= interval:
        raise AgentConfigError(f"{where}.duration_s: must be shorter than interval_s")
    return TargetConfig(
        name=name,
        url=_url(entry.get("url"), f"{where}.url"),
        kind=kind,
        token=_secret(entry, base, f"{where}."),
        mode=mode,
        interval_s=interval,
        splay_s=_number(entry, "splay_s", 10.0, f"{where}."),
        duration_s=duration,
        ice=_ice(entry.get("ice", {}), f"{where}.ice", ice),
        thresholds=limits,
    )
