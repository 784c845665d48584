"""The incident engine as stories: time passes, conditions come and go, people act."""

from __future__ import annotations

import pytest

from monitor import incidents
from monitor.incidents import (
    Escalation,
    Incident,
    InvalidTransition,
    Policy,
    Scope,
    ScopeKind,
    Severity,
    State,
    Tier,
)

MINUTE = 60.0
HOUR = 3600.0
SCOPE = Scope(ScopeKind.TARGET_REGION, target="https://sfu.example/whip", region="eu-west")
POLICY = Policy(
    escalation=Escalation(
        levels=(("pager-primary",), ("pager-secondary", "slack")), repeat_s=600, max_escalations=3
    ),
    notify={Severity.URGENT: ("pager-primary", "slack"), Severity.IMPORTANT: ("slack",)},
    reopen_window_s=30 * MINUTE,
)


def opened(severity: Severity = Severity.IMPORTANT, now: float = 0.0) -> Incident:
    change = incidents.open_incident(
        rule="call_failed",
        scope=SCOPE,
        title="calls fail",
        severity=severity,
        details={"value": 1},
        now=now,
        policy=POLICY,
        why="2 of 3 calls failed",
    )
    return change.incident


def kinds(change: incidents.Change | None) -> list[str]:
    return [] if change is None else [e.kind for e in change.events]


def test_an_incident_opens_with_deadlines_from_its_tier() -> None:
    change = incidents.open_incident(
        rule="call_failed",
        scope=SCOPE,
        title="calls fail",
        severity=Severity.URGENT,
        details={},
        now=1000.0,
        policy=POLICY,
        why="2 of 3 calls failed",
    )
    incident = change.incident
    assert incident.state is State.TRIGGERED
    assert incident.ack_due == 1000.0 + 15 * MINUTE
    assert incident.resolve_due == 1000.0 + 4 * HOUR
    assert [(e.kind, e.actor, e.text) for e in change.events] == [
        ("opened", "callmon", "2 of 3 calls failed")
    ]
    assert [(n.kind, n.channels) for n in change.notices] == [
        ("trigger", ("pager-primary", "slack"))
    ]
    assert incident.key == "call_failed|target_region:https://sfu.example/whip:eu-west:"


def test_a_worsening_condition_raises_severity_in_place_and_moves_deadlines() -> None:
    # opened as normal at t=0: ack due in 4 h, resolve in 72 h
    incident = incidents.open_incident(
        rule="rtt_high",
        scope=SCOPE,
        title="rtt",
        severity=Severity.NORMAL,
        details={},
        now=0.0,
        policy=POLICY,
        why="rtt over 400 ms",
    ).incident
    assert incident.ack_due == 4 * HOUR
    # at 10 minutes it is worse: important, deadlines counted from the original opening
    change = incidents.breach(
        incident,
        severity=Severity.IMPORTANT,
        details={"rtt": 1.2},
        now=10 * MINUTE,
        policy=POLICY,
        why="rtt over 1 s",
    )
    assert change is not None
    raised = change.incident
    assert raised.id == incident.id
    assert raised.key == incident.key
    assert raised.severity is Severity.IMPORTANT
    assert raised.ack_due == 1 * HOUR  # not 10 min + 1 h
    assert raised.resolve_due == 24 * HOUR
    assert kinds(change) == ["severity_raised"]
    assert change.events[0].data == {"from": "normal", "to": "important"}
    # a milder value later does not lower it
    same = incidents.breach(
        raised,
        severity=Severity.NORMAL,
        details={"rtt": 0.5},
        now=20 * MINUTE,
        policy=POLICY,
        why="rtt over 400 ms",
    )
    assert same is not None
    assert same.incident.severity is Severity.IMPORTANT
    assert kinds(same) == []
    assert same.incident.details == {"rtt": 0.5}


def test_acknowledgement_stops_the_ack_clock_once_and_for_all() -> None:
    incident = opened(Severity.IMPORTANT, now=0.0)
    change = incidents.acknowledge(
        incident, actor="alice", now=5 * MINUTE, policy=POLICY, note="looking"
    )
    acked = change.incident
    assert acked.state is State.ACKNOWLEDGED
    assert acked.acknowledged_at == 5 * MINUTE
    assert change.events[0].data == {"time_to_acknowledge_s": 300.0}
    assert (change.events[0].actor, change.events[0].text) == ("alice", "looking")
    # acknowledging again changes nothing
    again = incidents.acknowledge(acked, actor="bob", now=6 * MINUTE, policy=POLICY)
    assert again.incident == acked
    assert kinds(again) == []
    # no breach and no escalation after the ack deadline once acknowledged
    assert incidents.tick(acked, now=2 * HOUR, policy=POLICY) is None
    # but the resolve deadline still runs
    late = incidents.tick(acked, now=25 * HOUR, policy=POLICY)
    assert kinds(late) == ["resolve_breached"]


def test_a_missed_ack_deadline_breaches_and_walks_the_escalation_chain() -> None:
    incident = opened(Severity.URGENT, now=0.0)  # ack due at 15 min
    assert incidents.tick(incident, now=14 * MINUTE, policy=POLICY) is None
    assert incidents.next_deadline(incident) == 15 * MINUTE

    step1 = incidents.tick(incident, now=15 * MINUTE, policy=POLICY)
    assert kinds(step1) == ["ack_breached", "escalated"]
    assert step1 is not None
    assert step1.incident.ack_breached
    assert step1.incident.escalation_level == 1
    assert [(n.kind, n.channels) for n in step1.notices] == [
        ("breach", ("pager-primary", "slack")),
        ("escalate", ("pager-primary",)),
    ]
    assert step1.incident.next_escalation_at == 15 * MINUTE + 600

    assert incidents.tick(step1.incident, now=20 * MINUTE, policy=POLICY) is None
    step2 = incidents.tick(step1.incident, now=25 * MINUTE, policy=POLICY)
    assert step2 is not None
    assert kinds(step2) == ["escalated"]
    assert step2.notices[0].channels == ("pager-secondary", "slack")
    step3 = incidents.tick(step2.incident, now=35 * MINUTE, policy=POLICY)
    assert step3 is not None
    assert step3.incident.escalation_level == 3
    assert step3.notices[0].channels == ("pager-secondary", "slack")  # the last level repeats
    # the configured count is reached: no more escalations
    assert step3.incident.next_escalation_at is None
    assert incidents.tick(step3.incident, now=60 * MINUTE, policy=POLICY) is None
    # an acknowledgement after the breach keeps the breach on record
    acked = incidents.acknowledge(step3.incident, actor="bob", now=61 * MINUTE, policy=POLICY)
    assert acked.incident.ack_breached
    assert acked.events[0].data == {"time_to_acknowledge_s": 61 * MINUTE}


def test_resolution_and_reopening_within_the_window() -> None:
    incident = opened(Severity.IMPORTANT, now=0.0)
    acked = incidents.acknowledge(incident, actor="alice", now=60.0, policy=POLICY).incident
    resolved = incidents.recover(
        acked, now=10 * MINUTE, policy=POLICY, why="cleared: 2 healthy evaluations"
    ).incident
    assert resolved.state is State.RESOLVED
    with pytest.raises(InvalidTransition):
        incidents.resolve(resolved, actor="alice", now=11 * MINUTE, policy=POLICY, reason="x")
    with pytest.raises(InvalidTransition):
        incidents.acknowledge(resolved, actor="alice", now=11 * MINUTE, policy=POLICY)

    # back 20 minutes later: the same incident reopens, needing a fresh acknowledgement
    change = incidents.breach(
        resolved,
        severity=Severity.IMPORTANT,
        details={},
        now=30 * MINUTE,
        policy=POLICY,
        why="failing again",
    )
    assert change is not None
    reopened = change.incident
    assert kinds(change) == ["reopened"]
    assert reopened.state is State.TRIGGERED
    assert reopened.reopened == 1
    assert reopened.opened_at == 0.0
    assert reopened.reopened_at == 30 * MINUTE  # the acknowledgement clock restarts here
    assert reopened.ack_due == 30 * MINUTE + 1 * HOUR
    assert reopened.resolve_due == 24 * HOUR  # still from the original opening
    assert reopened.acknowledged_at == 60.0  # time to acknowledge stopped at the first ack

    # back after the window: no reopening, the caller opens a new incident
    resolved_again = incidents.recover(reopened, now=40 * MINUTE, policy=POLICY, why="ok").incident
    assert (
        incidents.breach(
            resolved_again,
            severity=Severity.IMPORTANT,
            details={},
            now=40 * MINUTE + 31 * MINUTE,
            policy=POLICY,
            why="x",
        )
        is None
    )


def test_operators_change_severity_and_comment_with_a_reason() -> None:
    incident = opened(Severity.NORMAL, now=0.0)
    change = incidents.set_severity(
        incident,
        severity=Severity.URGENT,
        actor="alice",
        now=2 * MINUTE,
        policy=POLICY,
        reason="customers call in",
    )
    assert change.incident.severity is Severity.URGENT
    assert change.incident.ack_due == 15 * MINUTE
    assert change.events[0].text == "customers call in"
    lowered = incidents.set_severity(
        change.incident,
        severity=Severity.IMPORTANT,
        actor="bob",
        now=3 * MINUTE,
        policy=POLICY,
        reason="one region only",
    )
    assert lowered.incident.ack_due == 1 * HOUR
    note = incidents.comment(lowered.incident, actor="bob", now=4 * MINUTE, text="ISP issue")
    assert note.incident == lowered.incident
    assert [(e.kind, e.actor, e.text) for e in note.events] == [("comment", "bob", "ISP issue")]
    with pytest.raises(InvalidTransition):
        incidents.comment(lowered.incident, actor="bob", now=5 * MINUTE, text="  ")


def test_custom_tiers_apply() -> None:
    policy = Policy(tiers={**POLICY.tiers, Severity.URGENT: Tier(ack_s=60, resolve_s=600)})
    incident = incidents.open_incident(
        rule="r",
        scope=SCOPE,
        title="t",
        severity=Severity.URGENT,
        details={},
        now=0.0,
        policy=policy,
        why="w",
    ).incident
    assert (incident.ack_due, incident.resolve_due) == (60, 600)
