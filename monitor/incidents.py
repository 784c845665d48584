"""The incident engine: a pure state machine, the clock passed in.

An incident is a ticket: it opens when a rule's condition holds, raises its severity in
place when things get worse, resolves (by an operator, or by callmon once the condition
has cleared), and reopens if the condition comes back within the reopen window. Two
response timers run from the original opening, with deadlines set by the severity tier:
time to acknowledge (stops at the first acknowledgement) and time to resolve. A missed
acknowledgement deadline marks the incident breached and walks the escalation chain.

Every function takes an incident (or none) and `now`, and returns a `Change`: the new
incident, the timeline events to append and the notices to send. Nothing here does I/O;
the store writes a Change in one transaction, notices included (see monitor.notify).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from callmon.times import iso

CALLMON = "callmon"
"The actor of every automatic transition."


class Severity(enum.StrEnum):
    URGENT = "urgent"
    "Large-scale outage: many users, or a whole target."
    IMPORTANT = "important"
    "Some users or one feature."
    NORMAL = "normal"
    "A single user or a question."

    @property
    def rank(self) -> int:
        """Return 0 for the most severe."""
        return list(Severity).index(self)

    def raised(self) -> Severity:
        """Return the next tier up (urgent stays urgent)."""
        return list(Severity)[max(0, self.rank - 1)]


class State(enum.StrEnum):
    TRIGGERED = "triggered"
    ACKNOWLEDGED = "acknowledged"
    RESOLVED = "resolved"


@dataclass(frozen=True)
class Tier:
    ack_s: float
    "Time to acknowledge."
    resolve_s: float
    "Time to resolve."


DEFAULT_TIERS: Mapping[Severity, Tier] = {
    Severity.URGENT: Tier(15 * 60, 4 * 3600),
    Severity.IMPORTANT: Tier(3600, 24 * 3600),
    Severity.NORMAL: Tier(4 * 3600, 72 * 3600),
}


@dataclass(frozen=True)
class Escalation:
    levels: tuple[tuple[str, ...], ...] = ()
    "Channels to notify at each level; the last level repeats."
    repeat_s: float = 15 * 60
    "Time between escalations once the acknowledgement deadline has passed."
    max_escalations: int = 3


@dataclass(frozen=True)
class Policy:
    tiers: Mapping[Severity, Tier] = field(default_factory=lambda: dict(DEFAULT_TIERS))
    escalation: Escalation = field(default_factory=Escalation)
    notify: Mapping[Severity, tuple[str, ...]] = field(default_factory=dict)
    "Channels told of every transition, per severity."
    reopen_window_s: float = 30 * 60
    "A condition back within this long after resolution reopens the same incident."


class ScopeKind(enum.StrEnum):
    TARGET_REGION = "target_region"
    "One target seen from one region."
    TARGET = "target"
    "One target from several regions: likely the service itself."
    REGION = "region"
    "Several targets from one region: likely the network or the probe's side."
    PROBE = "probe"
    "One probe (for example one that went silent)."
    ALERT = "alert"
    "An alert from Alertmanager."


@dataclass(frozen=True, order=True)
class Scope:
    kind: ScopeKind
    target: str = "*"
    region: str = "*"
    name: str = ""
    "Extra identity for probe and alert scopes (probe name, alert fingerprint)."

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.target}:{self.region}:{self.name}"

    def describe(self) -> str:
        if self.kind is ScopeKind.TARGET:
            return f"{self.target} from every region (likely the service)"
        if self.kind is ScopeKind.REGION:
            return f"every target from {self.region} (likely network or probe side)"
        if self.kind is ScopeKind.PROBE:
            return f"probe {self.name} in {self.region}"
        if self.kind is ScopeKind.ALERT:
            return f"alert {self.name}"
        return f"{self.target} from {self.region}"


def dedup_key(rule: str, scope: Scope) -> str:
    """Return the key that makes one incident of a condition: severity is not part of it."""
    return f"{rule}|{scope.key}"


@dataclass(frozen=True)
class Incident:
    id: int | None
    rule: str
    scope: Scope
    title: str
    severity: Severity
    state: State
    opened_at: float
    ack_due: float
    resolve_due: float
    acknowledged_at: float | None = None
    resolved_at: float | None = None
    ack_breached: bool = False
    resolve_breached: bool = False
    escalation_level: int = 0
    next_escalation_at: float | None = None
    reopened: int = 0
    details: Mapping[str, Any] = field(default_factory=dict)
    "What breached: values against thresholds, the failing call, the phase breakdown."
    reopened_at: float | None = None
    "The latest reopening: the acknowledgement clock runs from it."

    @property
    def key(self) -> str:
        return dedup_key(self.rule, self.scope)

    @property
    def open(self) -> bool:
        return self.state is not State.RESOLVED


@dataclass(frozen=True)
class Event:
    """One line of the append-only timeline: who, when, what, why."""

    at: float
    actor: str
    kind: str
    text: str
    data: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Notice:
    """A notification to queue: what happened, to whom."""

    kind: str
    "trigger, acknowledge, resolve, escalate, breach, severity or reopen."
    channels: tuple[str, ...]
    data: Mapping[str, Any] = field(default_factory=dict)
    "What a breach or an escalation was about (deadline kind, level)."


@dataclass(frozen=True)
class Change:
    incident: Incident
    events: tuple[Event, ...] = ()
    notices: tuple[Notice, ...] = ()


class InvalidTransition(Exception):
    """The operation does not apply to the incident in its current state."""


def _notice(kind: str, severity: Severity, policy: Policy) -> tuple[Notice, ...]:
    channels = policy.notify.get(severity, ())
    return (Notice(kind, channels),) if channels else ()


def open_incident(
    *,
    rule: str,
    scope: Scope,
    title: str,
    severity: Severity,
    details: Mapping[str, Any],
    now: float,
    policy: Policy,
    why: str,
) -> Change:
    """Open a new incident, its deadlines counted from now."""
    tier = policy.tiers[severity]
    incident = Incident(
        id=None,
        rule=rule,
        scope=scope,
        title=title,
        severity=severity,
        state=State.TRIGGERED,
        opened_at=now,
        ack_due=now + tier.ack_s,
        resolve_due=now + tier.resolve_s,
        details=details,
    )
    event = Event(now, CALLMON, "opened", why, {"severity": severity.value})
    return Change(incident, (event,), _notice("trigger", severity, policy))


def breach(
    incident: Incident,
    *,
    severity: Severity,
    details: Mapping[str, Any],
    now: float,
    policy: Policy,
    why: str,
) -> Change | None:
    """Apply a condition that holds to an existing incident of the same key.

    Returns None when the incident is resolved and past its reopen window: the caller then
    opens a new one.
    """
    if incident.state is State.RESOLVED:
        assert incident.resolved_at is not None
        if now - incident.resolved_at > policy.reopen_window_s:
            return None
        tier = policy.tiers[severity]
        reopened = dataclasses.replace(
            incident,
            state=State.TRIGGERED,
            severity=severity,
            resolved_at=None,
            # the team must look again: a fresh acknowledgement is due from now, while
            # time to resolve keeps counting from the original opening
            ack_due=now + tier.ack_s,
            resolve_due=incident.opened_at + tier.resolve_s,
            ack_breached=False,
            escalation_level=0,
            next_escalation_at=None,
            reopened=incident.reopened + 1,
            reopened_at=now,
            details=details,
        )
        event = Event(now, CALLMON, "reopened", why, {"severity": severity.value})
        return Change(reopened, (event,), _notice("reopen", severity, policy))
    if severity.rank < incident.severity.rank:
        raised = _with_severity(incident, severity, policy)
        raised = dataclasses.replace(raised, details=details)
        event = Event(
            now,
            CALLMON,
            "severity_raised",
            why,
            {"from": incident.severity.value, "to": severity.value},
        )
        return Change(raised, (event,), _notice("severity", severity, policy))
    return Change(dataclasses.replace(incident, details=details))


def _with_severity(incident: Incident, severity: Severity, policy: Policy) -> Incident:
    """Move the deadlines to the new tier, measured from the original opening."""
    tier = policy.tiers[severity]
    ack_due = incident.ack_due
    if incident.acknowledged_at is None and incident.reopened == 0:
        ack_due = incident.opened_at + tier.ack_s
    return dataclasses.replace(
        incident,
        severity=severity,
        ack_due=ack_due,
        resolve_due=incident.opened_at + tier.resolve_s,
    )


def recover(incident: Incident, *, now: float, policy: Policy, why: str) -> Change:
    """Resolve automatically: the condition has cleared for the close threshold."""
    return resolve(incident, actor=CALLMON, now=now, policy=policy, reason=why)


def acknowledge(
    incident: Incident, *, actor: str, now: float, policy: Policy, note: str = ""
) -> Change:
    if incident.state is State.RESOLVED:
        raise InvalidTransition("a resolved incident cannot be acknowledged")
    if incident.state is State.ACKNOWLEDGED:
        return Change(incident)
    first = incident.acknowledged_at is None
    acked = dataclasses.replace(
        incident,
        state=State.ACKNOWLEDGED,
        acknowledged_at=incident.acknowledged_at if not first else now,
        next_escalation_at=None,
    )
    data = {"time_to_acknowledge_s": now - incident.opened_at} if first else {}
    event = Event(now, actor, "acknowledged", note or "acknowledged", data)
    return Change(acked, (event,), _notice("acknowledge", incident.severity, policy))


def resolve(incident: Incident, *, actor: str, now: float, policy: Policy, reason: str) -> Change:
    if incident.state is State.RESOLVED:
        raise InvalidTransition("the incident is already resolved")
    resolved = dataclasses.replace(
        incident, state=State.RESOLVED, resolved_at=now, next_escalation_at=None
    )
    event = Event(now, actor, "resolved", reason, {"time_to_resolve_s": now - incident.opened_at})
    return Change(resolved, (event,), _notice("resolve", incident.severity, policy))


def set_severity(
    incident: Incident,
    *,
    severity: Severity,
    actor: str,
    now: float,
    policy: Policy,
    reason: str,
) -> Change:
    if incident.state is State.RESOLVED:
        raise InvalidTransition("a resolved incident keeps its severity")
    if severity is incident.severity:
        return Change(incident)
    changed = _with_severity(incident, severity, policy)
    event = Event(
        now,
        actor,
        "severity_changed",
        reason,
        {"from": incident.severity.value, "to": severity.value},
    )
    return Change(changed, (event,), _notice("severity", severity, policy))


def comment(incident: Incident, *, actor: str, now: float, text: str) -> Change:
    if not text.strip():
        raise InvalidTransition("a comment needs text")
    return Change(incident, (Event(now, actor, "comment", text),))


def tick(incident: Incident, *, now: float, policy: Policy) -> Change | None:
    """Apply the passing of time: breached deadlines and escalations. None if nothing."""
    if incident.state is State.RESOLVED:
        return None
    updated = incident
    events: list[Event] = []
    notices: list[Notice] = []
    chain = policy.escalation
    if updated.state is State.TRIGGERED:
        if not updated.ack_breached and now >= updated.ack_due:
            updated = dataclasses.replace(updated, ack_breached=True)
            events.append(
                Event(
                    now,
                    CALLMON,
                    "ack_breached",
                    "not acknowledged in time",
                    {"due": iso(updated.ack_due), "kind": "ack"},
                )
            )
            notices.append(
                Notice("breach", policy.notify.get(updated.severity, ()), {"kind": "ack"})
            )
            if chain.levels:
                updated = dataclasses.replace(updated, next_escalation_at=now)
        due = updated.next_escalation_at
        if (
            due is not None
            and now >= due
            and chain.levels
            and updated.escalation_level < chain.max_escalations
        ):
            level = updated.escalation_level + 1
            channels = chain.levels[min(level, len(chain.levels)) - 1]
            updated = dataclasses.replace(
                updated,
                escalation_level=level,
                next_escalation_at=(now + chain.repeat_s)
                if level < chain.max_escalations
                else None,
            )
            events.append(
                Event(
                    now,
                    CALLMON,
                    "escalated",
                    f"escalated to level {level}: {', '.join(channels)}",
                    {"level": level, "channels": list(channels)},
                )
            )
            notices.append(Notice("escalate", channels, {"level": level}))
    if not updated.resolve_breached and now >= updated.resolve_due:
        updated = dataclasses.replace(updated, resolve_breached=True)
        events.append(
            Event(
                now,
                CALLMON,
                "resolve_breached",
                "not resolved in time",
                {"due": iso(updated.resolve_due), "kind": "resolve"},
            )
        )
        notices.append(
            Notice("breach", policy.notify.get(updated.severity, ()), {"kind": "resolve"})
        )
    if updated == incident:
        return None
    return Change(updated, tuple(events), tuple(n for n in notices if n.channels))


def next_deadline(incident: Incident) -> float | None:
    """Return when `tick` next has something to do for this incident, if ever."""
    if incident.state is State.RESOLVED:
        return None
    candidates = []
    if not incident.resolve_breached:
        candidates.append(incident.resolve_due)
    if incident.state is State.TRIGGERED:
        if not incident.ack_breached:
            candidates.append(incident.ack_due)
        elif incident.next_escalation_at is not None:
            candidates.append(incident.next_escalation_at)
    return min(candidates, default=None)
