"""`POST /api/v1/alertmanager`: Prometheus alerts open and resolve callmon incidents.

Alertmanager's webhook (payload version 4) sends groups of alerts, firing or resolved,
and resends until it gets a 2xx. Each alert becomes an incident keyed by its fingerprint,
so resends update it instead of opening new ones. Labels `target` (or `instance`) and
`region` place it; `severity` maps to callmon's tiers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from callmon.callresult import ContractError
from monitor.incidents import Scope, ScopeKind, Severity

SEVERITIES = {
    "critical": Severity.URGENT,
    "page": Severity.URGENT,
    "urgent": Severity.URGENT,
    "error": Severity.IMPORTANT,
    "warning": Severity.IMPORTANT,
    "important": Severity.IMPORTANT,
}


@dataclass(frozen=True)
class Alert:
    rule: str
    scope: Scope
    firing: bool
    severity: Severity
    title: str
    details: Mapping[str, Any]


def parse_webhook(document: Any) -> list[Alert]:
    """Validate an Alertmanager webhook payload; raise ContractError naming the field."""
    if not isinstance(document, dict):
        raise ContractError("", "expected an object")
    if document.get("version") != "4":
        raise ContractError("version", "expected '4' (Alertmanager webhook payload version)")
    alerts = document.get("alerts")
    if not isinstance(alerts, list):
        raise ContractError("alerts", "expected a list")
    common = {
        "receiver": document.get("receiver"),
        "group_key": document.get("groupKey"),
        "external_url": document.get("externalURL"),
    }
    return [_alert(alert, f"alerts[{i}]", common) for i, alert in enumerate(alerts)]


def _alert(alert: Any, path: str, common: Mapping[str, Any]) -> Alert:
    if not isinstance(alert, dict):
        raise ContractError(path, "expected an object")
    status = alert.get("status")
    if status not in ("firing", "resolved"):
        raise ContractError(f"{path}.status", "expected 'firing' or 'resolved'")
    labels = _strings(alert.get("labels"), f"{path}.labels")
    annotations = _strings(alert.get("annotations", {}), f"{path}.annotations")
    name = labels.get("alertname")
    if not name:
        raise ContractError(f"{path}.labels.alertname", "required")
    fingerprint = alert.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise ContractError(f"{path}.fingerprint", "required")
    target = labels.get("target") or labels.get("instance") or "*"
    return Alert(
        rule=f"alertmanager:{name}",
        scope=Scope(
            ScopeKind.ALERT, target=target, region=labels.get("region", "*"), name=fingerprint
        ),
        firing=status == "firing",
        severity=SEVERITIES.get(labels.get("severity", "").lower(), Severity.NORMAL),
        title=annotations.get("summary") or f"{name} on {target}",
        details={
            "source": "alertmanager",
            "labels": labels,
            "annotations": annotations,
            "starts_at": alert.get("startsAt"),
            "ends_at": alert.get("endsAt"),
            "generator_url": alert.get("generatorURL"),
            **common,
        },
    )


def _strings(value: Any, path: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ContractError(path, "expected an object of strings")
    return dict(value)
