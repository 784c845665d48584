"""The monitor's configuration: one YAML file, validated at load with errors naming the key.

Tokens are never stored in the clear: the file holds SHA-256 digests (`callmon token`
prints a new token and the line to paste). A probe's name and region come from its token
entry, never from what it sends.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monitor.incidents import DEFAULT_TIERS, Escalation, Policy, Severity, Tier
from monitor.rules import DEFAULT_RULES, Rule, RuleError, load_rules

CHANNEL_TYPES = ("webhook", "slack", "pagerduty")


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key."""


def token_digest(token: str) -> str:
    """Return the SHA-256 hex digest a configuration stores for a token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class ProbeIdentity:
    name: str
    region: str
    token_sha256: str
    interval_s: float = 60.0
    "How often the probe is expected to report; silence is judged in these intervals."


@dataclass(frozen=True)
class OperatorIdentity:
    name: str
    token_sha256: str


@dataclass(frozen=True)
class Channel:
    name: str
    type: str
    "webhook, slack or pagerduty."
    url: str
    routing_key: str | None = None
    "PagerDuty integration key."


@dataclass(frozen=True)
class Delivery:
    max_attempts: int = 8
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 300.0
    timeout_s: float = 10.0


@dataclass(frozen=True)
class MonitorConfig:
    database: Path = Path("callmon-data/monitor.sqlite3")
    host: str = "127.0.0.1"
    port: int = 8090
    max_body_bytes: int = 1024 * 1024
    rules: tuple[Rule, ...] = ()
    probes: tuple[ProbeIdentity, ...] = ()
    operators: tuple[OperatorIdentity, ...] = ()
    policy: Policy = field(default_factory=Policy)
    channels: tuple[Channel, ...] = ()
    delivery: Delivery = field(default_factory=Delivery)
    public_url: str = ""
    "Where operators reach the monitor; links in notifications point there."
    retention_days: float = 30.0
    "Results and samples older than this are deleted (incidents are kept); 0 keeps all."
    anonymous_read: bool = False
    "Anyone may read incidents, the matrix and samples (the UI read-only); writes need sign-in."


def load_config(path: Path) -> MonitorConfig:
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    return parse_config(document, base=path.parent)


_KEYS = {
    "database",
    "listen",
    "max_body_bytes",
    "rules",
    "probes",
    "operators",
    "tiers",
    "reopen_window_s",
    "escalation",
    "channels",
    "notify",
    "delivery",
    "public_url",
    "retention_days",
    "anonymous_read",
}


def parse_config(document: Any, base: Path = Path()) -> MonitorConfig:
    if not isinstance(document, Mapping):
        raise ConfigError("the configuration must be a mapping")
    unknown = sorted(set(document) - _KEYS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown key (known: {', '.join(sorted(_KEYS))})")
    host, port = _listen(document.get("listen", "127.0.0.1:8090"))
    rules_path = document.get("rules")
    try:
        rules = load_rules(base / rules_path if rules_path else DEFAULT_RULES)
    except RuleError as exc:
        raise ConfigError(f"rules: {exc}") from None
    channels = tuple(
        _channel(c, f"channels[{i}]") for i, c in enumerate(_list(document, "channels"))
    )
    names = {c.name for c in channels}
    escalation = _escalation(document.get("escalation", {}), names)
    notify = _notify(document.get("notify", {}), names)
    return MonitorConfig(
        database=base / str(document.get("database", "callmon-data/monitor.sqlite3")),
        host=host,
        port=port,
        max_body_bytes=_positive_int(document, "max_body_bytes", 1024 * 1024),
        rules=rules,
        probes=tuple(_probe(p, f"probes[{i}]") for i, p in enumerate(_list(document, "probes"))),
        operators=tuple(
            _operator(o, f"operators[{i}]") for i, o in enumerate(_list(document, "operators"))
        ),
        policy=Policy(
            tiers=_tiers(document.get("tiers", {})),
            escalation=escalation,
            notify=notify,
            reopen_window_s=_number(document, "reopen_window_s", 1800.0),
        ),
        channels=channels,
        delivery=_delivery(document.get("delivery", {})),
        public_url=str(document.get("public_url", "")),
        retention_days=_number(document, "retention_days", 30.0),
        anonymous_read=_boolean(document, "anonymous_read", False),
    )


def _boolean(document: Mapping[str, Any], key: str, default: bool) -> bool:
    value = document.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false")
    return value


def _list(document: Mapping[str, Any], key: str) -> list[Any]:
    value = document.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list")
    return value


def _listen(text: Any) -> tuple[str, int]:
    host, _, port = str(text).rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"listen: expected HOST:PORT, got {text!r}")
    return host, int(port)


def _number(document: Mapping[str, Any], key: str, default: float, where: str = "") -> float:
    value = document.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ConfigError(f"{where}{key}: expected a non-negative number")
    return float(value)


def _positive_int(document: Mapping[str, Any], key: str, default: int, where: str = "") -> int:
    value = document.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where}{key}: expected a positive integer")
    return value


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}.{key}: required")
    return value


_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def _digest(entry: Mapping[str, Any], where: str) -> str:
    value = _text(entry, "token_sha256", where)
    if not _DIGEST.match(value):
        raise ConfigError(f"{where}.token_sha256: expected 64 hex digits (see `callmon token`)")
    return value


def _probe(entry: Any, where: str) -> ProbeIdentity:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    return ProbeIdentity(
        name=_text(entry, "name", where),
        region=_text(entry, "region", where),
        token_sha256=_digest(entry, where),
        interval_s=_number(entry, "interval_s", 60.0, f"{where}."),
    )


def _operator(entry: Any, where: str) -> OperatorIdentity:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    return OperatorIdentity(name=_text(entry, "name", where), token_sha256=_digest(entry, where))


def _channel(entry: Any, where: str) -> Channel:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected a mapping")
    kind = _text(entry, "type", where)
    if kind not in CHANNEL_TYPES:
        raise ConfigError(f"{where}.type: one of {', '.join(CHANNEL_TYPES)}")
    url = _text(entry, "url", where)
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: expected an http(s) URL")
    routing_key = entry.get("routing_key")
    if kind == "pagerduty" and not routing_key:
        raise ConfigError(f"{where}.routing_key: PagerDuty needs an integration key")
    return Channel(_text(entry, "name", where), kind, url, routing_key)


def _channel_names(value: Any, known: set[str], where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: expected a list of channel names")
    for name in value:
        if name not in known:
            raise ConfigError(f"{where}: no channel named {name!r}")
    return tuple(value)


def _tiers(document: Any) -> dict[Severity, Tier]:
    if not isinstance(document, Mapping):
        raise ConfigError("tiers: expected a mapping by severity")
    tiers = dict(DEFAULT_TIERS)
    for name, entry in document.items():
        try:
            severity = Severity(name)
        except ValueError:
            raise ConfigError(f"tiers.{name}: not a severity (urgent, important, normal)") from None
        if not isinstance(entry, Mapping):
            raise ConfigError(f"tiers.{name}: expected {{ack_s: .., resolve_s: ..}}")
        default = DEFAULT_TIERS[severity]
        tiers[severity] = Tier(
            _number(entry, "ack_s", default.ack_s, f"tiers.{name}."),
            _number(entry, "resolve_s", default.resolve_s, f"tiers.{name}."),
        )
    return tiers


def _escalation(document: Any, known: set[str]) -> Escalation:
    if not isinstance(document, Mapping):
        raise ConfigError("escalation: expected a mapping")
    levels = document.get("levels", [])
    if not isinstance(levels, list):
        raise ConfigError("escalation.levels: expected a list of channel lists")
    return Escalation(
        levels=tuple(
            _channel_names(level, known, f"escalation.levels[{i}]")
            for i, level in enumerate(levels)
        ),
        repeat_s=_number(document, "repeat_s", 900.0, "escalation."),
        max_escalations=_positive_int(document, "max_escalations", 3, "escalation."),
    )


def _notify(document: Any, known: set[str]) -> dict[Severity, tuple[str, ...]]:
    if not isinstance(document, Mapping):
        raise ConfigError("notify: expected a mapping by severity")
    out: dict[Severity, tuple[str, ...]] = {}
    for name, channels in document.items():
        try:
            severity = Severity(name)
        except ValueError:
            raise ConfigError(f"notify.{name}: not a severity") from None
        out[severity] = _channel_names(channels, known, f"notify.{name}")
    return out


def _delivery(document: Any) -> Delivery:
    if not isinstance(document, Mapping):
        raise ConfigError("delivery: expected a mapping")
    return Delivery(
        max_attempts=_positive_int(document, "max_attempts", 8, "delivery."),
        backoff_initial_s=_number(document, "backoff_initial_s", 1.0, "delivery."),
        backoff_max_s=_number(document, "backoff_max_s", 300.0, "delivery."),
        timeout_s=_number(document, "timeout_s", 10.0, "delivery."),
    )
