"""The deployment (docker-compose.yml, Dockerfile, deploy/) checked without a Docker engine.

Statically: every callmon command in the compose file goes through callmon's own CLI
parser; every mounted file exists and passes its own tool (promtool, amtool, callmon's
configuration loaders); the compose services, the Prometheus targets, the Alertmanager
receiver, the Grafana provisioning and the token files agree with one another; every
metric the alert rules and the dashboard name is one callmon exports.

As processes: the monitor, a real Prometheus and a real Alertmanager run on loopback from
configurations derived from the shipped ones (loopback addresses, short intervals, the
rules' `for:` shortened); failing call results make a shipped alert rule fire, and the
alert must open an incident in callmon through Alertmanager's webhook, then resolve it.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import ifaddr
import pytest
import yaml
from conftest import free_port, wait_http
from monitorkit import result

from callmon import cli
from callmon.callresult import Status
from monitor.config import MonitorConfig, load_config, token_digest
from monitor.metrics import Metrics
from probes.agent import AgentMetrics
from probes.agentconfig import AgentConfig, load_agent_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_YML = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS_YML = DEPLOY / "prometheus" / "alerts.yml"
ALERTS_TESTS = DEPLOY / "prometheus" / "alerts.test.yml"
ALERTMANAGER_YML = DEPLOY / "alertmanager" / "alertmanager.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
"Debian's name, then upstream's."
CONTAINER_INTERFACE = "eth0"
"The interface of a container's first network: what `--ice-host` names in the compose file."
SYNTHETIC_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}
"Series Prometheus makes itself."
SCRAPE_LABELS = {"job", "instance"}

T = TypeVar("T")


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


COMPOSE: dict[str, Any] = load_yaml(COMPOSE_FILE)
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
CALLMON_SERVICES = sorted(
    name
    for name, service in SERVICES.items()
    if "build" in service or str(service.get("image", "")).startswith("callmon")
)


# --- the compose file ---------------------------------------------------------------------


def service_of(role: str) -> tuple[str, dict[str, Any]]:
    """Return the one callmon service whose command runs `callmon <role>`."""
    found = [(n, SERVICES[n]) for n in CALLMON_SERVICES if SERVICES[n]["command"][0] == role]
    assert len(found) == 1, f"expected one `callmon {role}` service, found {found}"
    return found[0]


def agent_services() -> list[str]:
    return [n for n in CALLMON_SERVICES if SERVICES[n]["command"][0] == "agent"]


def host_path(service: str, container_path: str) -> Path:
    """Return the host file mounted at `container_path` in `service` (secret or bind mount)."""
    spec = SERVICES[service]
    for secret in spec.get("secrets", []):
        source = secret if isinstance(secret, str) else secret["source"]
        target = secret.get("target", source) if isinstance(secret, dict) else source
        target = target if target.startswith("/") else f"/run/secrets/{target}"
        if container_path == target:
            return ROOT / str(COMPOSE["secrets"][source]["file"])
    for source, target in bind_mounts(service):
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(target)
    raise AssertionError(f"{service}: nothing from the host is mounted at {container_path}")


def bind_mounts(service: str) -> list[tuple[Path, str]]:
    """Return the service's bind mounts as (host path, container path)."""
    out = []
    for volume in SERVICES[service].get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith((".", "/")):
            out.append(((ROOT / source).resolve(), target))
    return out


def named_volume_of(service: str, container_path: str) -> str | None:
    """Return the named volume that holds `container_path` in `service`, if any."""
    for volume in SERVICES[service].get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if not source.startswith((".", "/")) and Path(container_path).is_relative_to(target):
            return source
    return None


def hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


# --- the real CLI ----------------------------------------------------------------------------


class _Parsed(Exception):
    def __init__(self, namespace: Any) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def parse_callmon(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run `callmon.cli.main(argv)` up to its argument parsing; return the namespace.

    The parser is the one `main` builds, so a flag `callmon` does not know fails here as
    it would in the container (SystemExit 64).
    """
    real_parse_args = cli._Parser.parse_args

    def parse_then_stop(self: cli._Parser, *args: Any, **kwargs: Any) -> Any:
        raise _Parsed(real_parse_args(self, *args, **kwargs))

    with monkeypatch.context() as patch:
        patch.setattr(cli._Parser, "parse_args", parse_then_stop)
        try:
            cli.main(argv)
        except _Parsed as parsed:
            return parsed.namespace
    raise AssertionError(f"callmon {shlex.join(argv)} ran instead of being parsed")


@pytest.fixture
def container_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `eth0` exist, as it does in every container on the compose network."""
    real = ifaddr.get_adapters

    def get_adapters(include_unconfigured: bool = False) -> list[ifaddr.Adapter]:
        adapters = list(real(include_unconfigured))
        if all(a.name != CONTAINER_INTERFACE for a in adapters):
            ip = ifaddr.IP("172.18.0.2", 16, CONTAINER_INTERFACE)
            adapters.append(ifaddr.Adapter(CONTAINER_INTERFACE, CONTAINER_INTERFACE, [ip]))
        return adapters

    monkeypatch.setattr(ifaddr, "get_adapters", get_adapters)


# --- loading the shipped callmon configurations ------------------------------------------------


def monitor_config() -> MonitorConfig:
    name, service = service_of("monitor")
    config_path = service["command"][service["command"].index("--config") + 1]
    return load_config(host_path(name, config_path))


def agent_config(service: str, folder: Path) -> AgentConfig:
    """Load an agent's shipped YAML with its token files mapped to the host's files."""
    command = SERVICES[service]["command"]
    document = load_yaml(host_path(service, command[command.index("--config") + 1]))

    def remap(entry: dict[str, Any]) -> None:
        if "token_file" in entry:
            entry["token_file"] = str(host_path(service, entry["token_file"]))

    remap(document["monitor"])
    for target in document["targets"]:
        remap(target)
    path = folder / f"{service}.yaml"
    path.write_text(yaml.safe_dump(document))
    return load_agent_config(path)


def run_tool(*argv: str) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


# --- callmon's metrics and PromQL ---------------------------------------------------------------

_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
}


def exported_series() -> dict[str, frozenset[str]]:
    """Return every series name the monitor and the agents export, with its label names."""
    out: dict[str, frozenset[str]] = {}
    for registry in (Metrics().registry, AgentMetrics().registry):
        for family in registry.collect():
            for suffix in _SUFFIXES.get(family.type, ("",)):
                out[family.name + suffix] = frozenset()
        # label names: prometheus_client keeps them on the collectors it wraps (and on
        # labelled families a custom collector yields); read them to check selectors too
        for collector in list(registry._collector_to_names):
            for family in collector.collect():
                labels = getattr(collector, "_labelnames", None)
                labels = getattr(family, "_labelnames", None) or labels or ()
                for suffix in _SUFFIXES.get(family.type, ("",)):
                    extra = {"le"} if suffix == "_bucket" else set()
                    out[family.name + suffix] = frozenset(labels) | extra
    return out


_STRING = re.compile(r'"(?:\\.|[^"\\])*"' + r"|'(?:\\.|[^'\\])*'")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
_IDENT = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?")
_SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def series_in(expr: str) -> set[str]:
    """Return the series names a PromQL expression selects (functions and labels left out)."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\d+(?:\.\d+)?(?:e[+-]?\d+)?", " ", text)
    return {
        name
        for name, call in _IDENT.findall(text)
        if not call and name.lower() not in _KEYWORDS and not name.startswith("$")
    }


def matcher_labels(expr: str) -> list[tuple[str, str]]:
    """Return (series, label) for every label matcher in the expression's selectors."""
    text = _STRING.sub('""', expr)
    return [
        (name, label) for name, body in _SELECTOR.findall(text) for label in _MATCHER.findall(body)
    ]


def scrape_labels() -> set[str]:
    """Return the labels Prometheus adds to scraped series (job, instance, static labels)."""
    labels = set(SCRAPE_LABELS)
    for job in load_yaml(PROMETHEUS_YML)["scrape_configs"]:
        for static in job.get("static_configs", []):
            labels |= set(static.get("labels", {}))
    return labels


def check_expression(expr: str, where: str, known: dict[str, frozenset[str]]) -> set[str]:
    """Assert that an expression names only exported series and labels; return the series."""
    names = series_in(expr)
    assert names, f"{where}: no series found in {expr!r}"
    unknown = sorted(names - set(known) - SYNTHETIC_SERIES)
    assert not unknown, f"{where}: {unknown} are not exported by callmon ({expr!r})"
    added = scrape_labels()
    for name, label in matcher_labels(expr):
        if name in known:
            assert label in known[name] | added, f"{where}: {name} has no label {label!r}"
    return names


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in load_yaml(ALERTS_YML)["groups"] for rule in group["rules"]]


# --- static checks: compose and the CLI ------------------------------------------------------


@pytest.mark.parametrize("service", CALLMON_SERVICES)
def test_every_callmon_command_parses_with_the_real_cli(
    service: str, monkeypatch: pytest.MonkeyPatch, container_interfaces: None
) -> None:
    command = SERVICES[service]["command"]
    assert isinstance(command, list), f"{service}: give the command as a list (no shell)"
    args = parse_callmon([str(part) for part in command], monkeypatch)
    assert args.command in ("monitor", "agent", "reflector")
    if getattr(args, "config", None) is not None:
        assert host_path(service, str(args.config)).is_file()
    if args.command == "reflector":
        cli._ice_options(args)  # what the reflector validates before it listens
        assert args.ice_host == [CONTAINER_INTERFACE], "pin ICE to the compose network"
        assert args.listen[0] == "0.0.0.0", "the agents reach it from other containers"
        if args.token_file:
            assert host_path(service, args.token_file).read_text().strip()


def test_a_bad_flag_fails_the_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SystemExit) as exit_:
        parse_callmon(["monitor", "--config", "m.yaml", "--no-such-flag"], monkeypatch)
    assert exit_.value.code == cli.EX_USAGE


def test_every_mounted_host_file_exists() -> None:
    for name, service in SERVICES.items():
        for source, target in bind_mounts(name):
            assert source.exists(), f"{name}: {source} (mounted at {target}) is missing"
        for secret in service.get("secrets", []):
            secret_name = secret if isinstance(secret, str) else secret["source"]
            assert secret_name in COMPOSE["secrets"], f"{name}: undeclared secret {secret_name}"
    for name, secret in COMPOSE["secrets"].items():
        path = ROOT / secret["file"]
        assert path.is_file(), f"secret {name}: {path} is missing"
        assert path.read_text().strip(), f"secret {name}: {path} is empty"
    for name in CALLMON_SERVICES:
        assert (ROOT / SERVICES[name].get("build", ".") / "Dockerfile").is_file()


def test_every_service_has_a_healthcheck_and_publishes_on_loopback_only() -> None:
    for name, service in SERVICES.items():
        assert service.get("healthcheck", {}).get("test"), f"{name}: no healthcheck"
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} is published to all"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in SERVICES
            assert condition["condition"] == "service_healthy"


def test_state_lives_on_named_volumes() -> None:
    name, _ = service_of("monitor")
    database = str(monitor_config().database)
    assert named_volume_of(name, database) in COMPOSE["volumes"], "the database is lost"


# --- static checks: callmon's own configurations -------------------------------------------


def test_the_monitor_configuration_loads_and_knows_every_shipped_token() -> None:
    config = monitor_config()
    name, _ = service_of("monitor")
    assert config.host == "0.0.0.0", "Prometheus, Alertmanager and the agents reach it"
    probes = {p.token_sha256: p for p in config.probes}
    operators = {o.token_sha256: o for o in config.operators}
    tokens = DEPLOY / "callmon" / "tokens"
    for path in tokens.glob("*.token"):
        token = path.read_text().strip()
        assert "PLACEHOLDER" in token, f"{path} looks real: only placeholders are shipped"
        assert "\n" not in token
    shipped = {token_digest(p.read_text().strip()) for p in tokens.glob("*.token")}
    for digest in (*probes, *operators):
        assert digest in shipped, f"monitor.yaml has a digest of no token file in {tokens}"
    assert "callmon token" in (tokens / "README.md").read_text()
    # every port the others use is the monitor's
    for url in (alertmanager_webhook()["url"], *(agent_monitor_url(s) for s in agent_services())):
        parsed = urlparse(url)
        assert (parsed.hostname, parsed.port) == (name, config.port), url


def agent_monitor_url(service: str) -> str:
    command = SERVICES[service]["command"]
    document = load_yaml(host_path(service, command[command.index("--config") + 1]))
    url: str = document["monitor"]["url"]
    return url


@pytest.mark.parametrize("service", agent_services())
def test_every_agent_configuration_loads_and_matches_the_monitor(
    service: str, tmp_path: Path, container_interfaces: None
) -> None:
    config = agent_config(service, tmp_path)
    monitor = monitor_config()
    probes = {p.token_sha256: p for p in monitor.probes}
    identity = probes.get(token_digest(config.monitor_token))
    assert identity is not None, f"{service}: the monitor does not know this agent's token"
    assert identity.region == config.region, f"{service}: region differs from its token's"
    assert named_volume_of(service, str(config.spool)), f"{service}: the spool is not kept"
    assert config.listen is not None
    assert config.listen[0] == "0.0.0.0"
    assert f"{service}:{config.listen[1]}" in prometheus_targets("callmon-agent")
    reflector, reflector_spec = service_of("reflector")
    listen = hostport(reflector_spec["command"][reflector_spec["command"].index("--listen") + 1])
    command = [str(part) for part in reflector_spec["command"]]
    token_file = command[command.index("--token-file") + 1]
    reflector_token = host_path(reflector, token_file).read_text().strip()
    for target in config.targets:
        parsed = urlparse(target.url)
        assert (parsed.hostname, parsed.port) == (reflector, listen[1]), target.url
        assert target.ice.hosts == (CONTAINER_INTERFACE,), "pin ICE to the compose network"
        assert target.token == reflector_token, f"{service}: not the reflector's token"
        assert target.interval_s <= identity.interval_s, "the monitor would judge it silent"


# --- static checks: Prometheus, Alertmanager, Grafana ----------------------------------------


def prometheus_targets(job: str) -> list[str]:
    for entry in load_yaml(PROMETHEUS_YML)["scrape_configs"]:
        if entry["job_name"] == job:
            return [t for s in entry["static_configs"] for t in s["targets"]]
    raise AssertionError(f"prometheus.yml has no job {job}")


def alertmanager_webhook() -> dict[str, Any]:
    document = load_yaml(ALERTMANAGER_YML)
    receivers = {r["name"]: r for r in document["receivers"]}
    webhooks: list[dict[str, Any]] = receivers[document["route"]["receiver"]]["webhook_configs"]
    assert len(webhooks) == 1
    return webhooks[0]


def test_prometheus_configuration_passes_promtool() -> None:
    output = run_tool("promtool", "check", "config", str(PROMETHEUS_YML))
    assert "SUCCESS" in output
    output = run_tool("promtool", "check", "rules", str(ALERTS_YML))
    assert f"{len(alert_rules())} rules found" in output


def test_alert_rules_pass_their_promtool_unit_tests() -> None:
    """Fed series shaped like callmon's, the rules fire when they should, labelled and
    worded as they should (deploy/prometheus/alerts.test.yml)."""
    assert load_yaml(ALERTS_TESTS)["rule_files"] == [ALERTS_YML.name]
    assert "SUCCESS" in run_tool("promtool", "test", "rules", str(ALERTS_TESTS))


def test_prometheus_scrapes_the_monitor_and_every_agent_and_alerts_alertmanager() -> None:
    document = load_yaml(PROMETHEUS_YML)
    assert [Path(f).name for f in document["rule_files"]] == [ALERTS_YML.name]
    monitor, _ = service_of("monitor")
    assert prometheus_targets("callmon-monitor") == [f"{monitor}:{monitor_config().port}"]
    agents = {hostport(t)[0] for t in prometheus_targets("callmon-agent")}
    assert agents == set(agent_services())
    for entry in document["scrape_configs"]:
        for target in (t for s in entry["static_configs"] for t in s["targets"]):
            host = hostport(target)[0]
            assert host == "localhost" or host in SERVICES, f"{entry['job_name']}: {target}"
    managers = document["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert [hostport(t)[0] for t in managers] == ["alertmanager"]


def test_alert_rules_cover_callmon_metrics_with_severity_and_keep_target_and_region() -> None:
    known = exported_series()
    used: set[str] = set()
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names)), "alert names repeat"
    for rule in alert_rules():
        where = f"alert {rule['alert']}"
        assert rule["labels"]["severity"] in ("critical", "warning"), where
        assert rule["annotations"]["summary"], where
        series = check_expression(rule["expr"], where, known)
        used |= series
        if any({"target", "region"} <= known.get(s, frozenset()) for s in series):
            # aggregations must keep what callmon places the incident by
            for grouping in re.findall(r"\bby\s*\(([^)]*)\)", rule["expr"]):
                kept = {label.strip() for label in grouping.split(",")}
                assert {"target", "region"} <= kept, f"{where} drops target or region"
            assert not re.search(r"\bwithout\s*\(", rule["expr"]), where
    for wanted in (
        "callmon_call_success",
        "callmon_last_result_timestamp_seconds",
        "callmon_jitter_seconds",
        "callmon_loss_ratio",
        "callmon_rtt_seconds",
        "callmon_av_offset_seconds",
        "callmon_connect_phase_seconds_bucket",
        "callmon_sla_breaches_total",
        "callmon_notifications_total",
        "callmon_agent_spool_entries",
        "up",
    ):
        assert wanted in used, f"no alert rule watches {wanted}"


def test_alertmanager_configuration_passes_amtool_and_posts_to_callmon() -> None:
    run_tool("amtool", "check-config", str(ALERTMANAGER_YML))
    webhook = alertmanager_webhook()
    assert urlparse(webhook["url"]).path == "/api/v1/alertmanager"
    assert webhook.get("send_resolved", True), "resolved alerts must resolve incidents"
    authorization = webhook["http_config"]["authorization"]
    assert authorization.get("type", "Bearer") == "Bearer"
    assert "credentials" not in authorization, "the token belongs in a file"
    name, _ = service_for_image("alertmanager")
    token = host_path(name, authorization["credentials_file"]).read_text().strip()
    operators = {o.token_sha256 for o in monitor_config().operators}
    assert token_digest(token) in operators, "the monitor does not know Alertmanager's token"


def service_for_image(image: str) -> tuple[str, dict[str, Any]]:
    for name, service in SERVICES.items():
        if str(service.get("image", "")).split("/")[-1].split(":")[0] == image:
            return name, service
    raise AssertionError(f"no service runs {image}")


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard() -> None:
    name, _ = service_for_image("grafana")
    mounts = {source: target for source, target in bind_mounts(name)}
    provisioning = GRAFANA / "provisioning"
    assert mounts[provisioning.resolve()] == "/etc/grafana/provisioning"
    datasources = load_yaml(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert len(datasources) == 1
    assert datasources[0]["type"] == "prometheus"
    url = urlparse(datasources[0]["url"])
    prometheus, _ = service_for_image("prometheus")
    assert (url.hostname, url.port) == (prometheus, 9090)
    providers = load_yaml(provisioning / "dashboards" / "callmon.yml")["providers"]
    assert [p["options"]["path"] for p in providers] == [mounts[(GRAFANA / "dashboards")]]
    assert DASHBOARDS, "no dashboard shipped"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_the_dashboard_is_valid_json_over_callmon_metrics(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    known = exported_series()
    datasources = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    uid = datasources["datasources"][0]["uid"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"target", "region"} <= set(variables)
    for name in ("target", "region"):
        query = variables[name]["query"]
        query = query["query"] if isinstance(query, dict) else query
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", query)
        assert match, query
        assert match.group(2) == name, query
        check_expression(match.group(1), f"variable {name}", known)
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    used: set[str] = set()
    for panel in panels:
        where = f"panel {panel['title']!r}"
        assert panel["datasource"]["uid"] == uid, where
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, where
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
        assert panel["targets"], where
        for target in panel["targets"]:
            series = check_expression(target["expr"], where, known)
            used |= series
            if any({"target", "region"} <= known.get(s, frozenset()) for s in series):
                assert '"$target"' in target["expr"], f"{where}: no $target filter"
                assert '"$region"' in target["expr"], f"{where}: no $region filter"
    for wanted in (
        "callmon_connect_phase_seconds_bucket",
        "callmon_jitter_seconds",
        "callmon_loss_ratio",
        "callmon_av_offset_seconds",
        "callmon_video_freezes_total",
        "callmon_mos",
        "callmon_incidents_open",
        "callmon_sla_breaches_total",
    ):
        assert wanted in used, f"{path.name} shows no {wanted}"


# --- static checks: the image ---------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (keyword, arguments), continuations joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_the_dockerfile_installs_callmon_and_runs_it_unprivileged() -> None:
    instructions = dockerfile()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    entrypoints = [json.loads(a) for k, a in instructions if k == "ENTRYPOINT"]
    assert entrypoints == [["callmon"]]
    users = [a for k, a in instructions if k == "USER"]
    assert users, "the image must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    runs = " ".join(a for k, a in instructions if k == "RUN")
    assert re.search(r"\bpip install\s+(?:\S+\s+)*/src\b", runs), "the package is not installed"
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert "deploy" in ignored, "tokens would reach the image"
    assert ".git" in ignored, "history would reach the image"
    for keyword, args in instructions:
        if keyword == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (ROOT / source).exists(), f"COPY {source}: missing"
                assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


def test_the_image_gets_the_files_the_monitor_reads_at_run_time(tmp_path: Path) -> None:
    """What `pip install /src` puts in site-packages is setuptools' build_py of the sources:
    a file it leaves out must be copied in by the Dockerfile (and `callmon monitor` fails
    without the shipped rules)."""
    source = tmp_path / "src"
    source.mkdir()
    for keyword, args in dockerfile():
        if keyword == "COPY":
            for item in args.split()[:-1]:
                if (ROOT / item).is_dir():
                    ignore = shutil.ignore_patterns("__pycache__")
                    shutil.copytree(ROOT / item, source / item, ignore=ignore)
                else:
                    shutil.copy2(ROOT / item, source / item)
    build = subprocess.run(
        [
            *(sys.executable, "-c", "import setuptools; setuptools.setup()"),
            *("-q", "build_py", "--build-lib", str(tmp_path / "lib")),
        ],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr
    runs = " ".join(a for k, a in dockerfile() if k == "RUN")
    # (a file the monitor reads, what of the sources brings it)
    for needed, source_path in (
        ("monitor/rules.yaml", "monitor/rules.yaml"),
        ("monitor/web/index.html", "monitor/web"),
    ):
        if not (tmp_path / "lib" / needed).is_file():
            copied = re.search(rf"\bcp (?:-\w+ )*/src/{re.escape(source_path)}\s", runs)
            assert copied, f"a pip install leaves out {needed} and the Dockerfile adds none"
    assert "parse_config({})" in runs, "the build should prove the shipped rules load"


# --- as processes: monitor -> Prometheus -> Alertmanager -> monitor -------------------------------


@dataclass
class Processes:
    """Child processes of one test, each logging to its own file, stopped together."""

    folder: Path
    children: list[tuple[str, subprocess.Popen[bytes], Path]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], ready: str, timeout: float = 30) -> None:
        log = self.folder / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=self.folder)
        self.children.append((name, process, log))
        if not wait_http(ready, process, timeout):
            raise AssertionError(f"{name} did not come up:\n{self.logs()}")

    def stop(self) -> None:
        for _, process, _ in reversed(self.children):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for _, process, _ in reversed(self.children):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def logs(self, tail: int = 30) -> str:
        return "\n".join(
            f"--- {name} (exit {process.poll()}):\n"
            + "\n".join(log.read_text(errors="replace").splitlines()[-tail:])
            for name, process, log in self.children
        )


@pytest.fixture
def processes() -> Iterator[Processes]:
    """A temporary folder and the processes started in it; both gone after the test."""
    with tempfile.TemporaryDirectory(prefix="callmon-deploy-") as folder:
        children = Processes(Path(folder))
        try:
            yield children
        finally:
            children.stop()


def alertmanager_binary() -> str:
    for name in ALERTMANAGER_BINARIES:
        if shutil.which(name):
            return name
    raise AssertionError(
        f"none of {ALERTMANAGER_BINARIES} is installed (scripts/setup installs it)"
    )


def http_json(url: str, token: str | None = None, body: Any = None) -> Any:
    request = urllib.request.Request(
        url,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"}
        | ({"Authorization": f"Bearer {token}"} if token else {}),
        method="GET" if body is None else "POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


def wait_for(
    fetch: Callable[[], T], done: Callable[[T], bool], within_s: float, explain: Callable[[], str]
) -> T:
    """Poll `fetch` until `done` holds; fail with `explain()` when it did not in time."""
    deadline = time.monotonic() + within_s
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within_s} s; last: {value}\n{explain()}")
        time.sleep(0.25)


def test_a_shipped_alert_opens_and_resolves_an_incident_through_alertmanager(
    processes: Processes, container_interfaces: None
) -> None:
    folder = processes.folder
    ports: dict[str, int] = {}
    while len(set(ports.values())) < 3:
        ports = {name: free_port() for name in ("monitor", "prometheus", "alertmanager")}
    monitor_url = f"http://127.0.0.1:{ports['monitor']}"
    prometheus_url = f"http://127.0.0.1:{ports['prometheus']}"
    alertmanager_url = f"http://127.0.0.1:{ports['alertmanager']}"

    # the monitor: the compose command and the shipped configuration, its database in tmp
    monitor_service, spec = service_of("monitor")
    command = [str(part) for part in spec["command"]]
    at = command.index("--config") + 1
    document = load_yaml(host_path(monitor_service, command[at]))
    document["database"] = str(folder / "monitor.sqlite3")
    command[at] = str(folder / "monitor.yaml")
    Path(command[at]).write_text(yaml.safe_dump(document))
    processes.start(
        "monitor",
        [
            sys.executable,
            "-m",
            "callmon.cli",
            *command,
            "--listen",
            f"127.0.0.1:{ports['monitor']}",
        ],
        f"{monitor_url}/healthz",
    )

    # Alertmanager: the shipped route and receiver, pointed at this monitor, no waiting
    manager = load_yaml(ALERTMANAGER_YML)
    for route in (manager["route"], *manager["route"].get("routes", [])):
        route.update(group_wait="1s", group_interval="1s")
    webhook = manager["receivers"][0]["webhook_configs"][0]
    webhook["url"] = monitor_url + urlparse(webhook["url"]).path
    authorization = webhook["http_config"]["authorization"]
    manager_service, _ = service_for_image("alertmanager")
    authorization["credentials_file"] = str(
        host_path(manager_service, authorization["credentials_file"])
    )
    (folder / "alertmanager.yml").write_text(yaml.safe_dump(manager))
    processes.start(
        "alertmanager",
        [
            alertmanager_binary(),
            f"--config.file={folder / 'alertmanager.yml'}",
            f"--storage.path={folder / 'alertmanager'}",
            f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
            "--cluster.listen-address=",
        ],
        f"{alertmanager_url}/-/ready",
    )

    # Prometheus: the shipped rules with `for:` cut to 2 s, scraping this monitor every second
    rules = load_yaml(ALERTS_YML)
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
            rule.pop("keep_firing_for", None)
    (folder / ALERTS_YML.name).write_text(yaml.safe_dump(rules))
    config = load_yaml(PROMETHEUS_YML)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["alerting"]["alertmanagers"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{ports['alertmanager']}"]}
    ]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "callmon-monitor"]
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{ports['monitor']}"]}]
    config["scrape_configs"] = jobs
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    processes.start(
        "prometheus",
        [
            "prometheus",
            f"--config.file={folder / 'prometheus.yml'}",
            f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
        ],
        f"{prometheus_url}/-/ready",
    )

    def explain() -> str:
        states = []
        for name, url in (
            ("prometheus alerts", f"{prometheus_url}/api/v1/alerts"),
            ("alertmanager alerts", f"{alertmanager_url}/api/v2/alerts"),
        ):
            try:
                states.append(f"{name}: {http_json(url)}")
            except OSError as exc:
                states.append(f"{name}: {exc}")
        return "\n".join([*states, processes.logs()])

    # an agent of the compose file reports failing calls to its target, with its token
    agent_cfg = agent_config(agent_services()[0], folder)
    target = agent_cfg.targets[0].url
    admin = (DEPLOY / "callmon" / "tokens" / "admin.token").read_text().strip()

    def report(status: Status) -> None:
        body = result(target, status=status)
        answer = http_json(f"{monitor_url}/api/v1/results", agent_cfg.monitor_token, body)
        assert answer["region"] == agent_cfg.region

    report(Status.FAILED)
    rule = "alertmanager:CallmonTargetFailing"
    opened = wait_for(
        lambda: http_json(f"{monitor_url}/api/v1/incidents?rule={rule}", admin)["incidents"],
        lambda found: bool(found),
        60,
        explain,
    )
    assert len(opened) == 1, opened
    incident = opened[0]
    assert incident["state"] == "triggered"
    assert incident["severity"] == "urgent"  # critical
    assert (incident["scope"]["target"], incident["scope"]["region"]) == (target, agent_cfg.region)
    assert incident["title"] == f"Calls to {target} from {agent_cfg.region} are failing"
    assert incident["details"]["labels"]["severity"] == "critical"

    # no shipped rule fails to evaluate
    groups = http_json(f"{prometheus_url}/api/v1/rules")["data"]["groups"]
    evaluated = [r for g in groups for r in g["rules"]]
    assert len(evaluated) == len(alert_rules())
    assert [r["name"] for r in evaluated if r["health"] == "err"] == []

    # the next call works: the alert resolves, and so does the incident
    report(Status.OK)
    wait_for(
        lambda: http_json(f"{monitor_url}/api/v1/incidents/{incident['id']}", admin),
        lambda ticket: ticket["incident"]["state"] == "resolved",
        60,
        explain,
    )
