"""Rules, windows and correlation, told step by step with the counters checked each time."""

from __future__ import annotations

import pytest

from monitor.correlation import Firing, group, severity_of
from monitor.incidents import Scope, ScopeKind, Severity
from monitor.rules import (
    DEFAULT_RULES,
    Condition,
    Rule,
    RuleError,
    Source,
    load_rules,
    parse_rules,
    value_at,
)

JITTER = Rule(
    name="audio_jitter_high",
    metric="audio.jitter_s",
    op=">",
    threshold=0.030,
    severity=Severity.NORMAL,
    k=3,
    n=5,
    close_after=3,
    raise_at=(),
)


def test_k_of_n_opens_only_on_the_kth_bad_sample_in_the_window() -> None:
    c = Condition()
    story = [
        # (value, what observe returns, firing after, breaches in window)
        (0.050, None, False, 1),
        (0.010, None, False, 1),
        (0.040, None, False, 2),
        (0.012, None, False, 2),
        (0.011, None, False, 2),  # the window is now [bad, good, bad, good, good]
        (0.012, None, False, 1),  # the first bad one left the window
        (0.060, None, False, 2),
        (0.070, None, False, 2),  # the bad one at step 2 just left
        (0.080, True, True, 3),  # third bad one within the last five: fires
    ]
    for step, (value, returned, firing, breaches) in enumerate(story):
        assert c.observe(JITTER, value, now=float(step), evidence=f"r{step}") == returned, step
        assert c.firing is firing, step
        assert sum(c.recent) == breaches, step
    assert c.since == 8.0
    assert c.last_value == 0.080
    assert c.evidence == "r8"


def test_hysteresis_closes_only_after_the_close_threshold_of_healthy_samples() -> None:
    c = Condition()
    for value in (0.05, 0.05, 0.05):
        c.observe(JITTER, value, now=0.0)
    assert c.firing
    assert c.observe(JITTER, 0.01, now=1.0) is None  # one good sample: still firing
    assert c.observe(JITTER, 0.01, now=2.0) is None
    assert c.observe(JITTER, 0.05, now=3.0) is None  # a bad one resets the healthy run
    assert c.healthy_run == 0
    assert c.observe(JITTER, 0.01, now=4.0) is None
    assert c.observe(JITTER, 0.01, now=5.0) is None
    assert c.observe(JITTER, 0.01, now=6.0) is False  # three in a row: clears
    assert not c.firing
    assert list(c.recent) == []


def test_missing_values_are_not_evaluated() -> None:
    c = Condition()
    assert c.observe(JITTER, None, now=0.0) is None
    assert list(c.recent) == []


def test_severity_rises_with_further_tiers() -> None:
    rule = load_rules(DEFAULT_RULES)
    av = next(r for r in rule if r.name == "av_out_of_sync")
    c = Condition()
    for value in (-0.150, -0.140, -0.130):  # detectable, still acceptable
        c.observe(av, value, now=0.0)
    assert c.firing
    first = c.severity
    c.observe(av, -0.200, now=1.0)  # beyond acceptability
    assert (first, c.severity) == (Severity.NORMAL, Severity.IMPORTANT)
    assert av.breached(0.050) is True
    assert av.breached(0.040) is False


def test_condition_state_survives_a_round_trip() -> None:
    c = Condition()
    for value in (0.05, 0.05, 0.05):
        c.observe(JITTER, value, now=5.0, evidence="r1")
    restored = Condition.from_json(c.to_json())
    assert restored == c


def test_value_at_reads_dotted_paths() -> None:
    doc = {"summary": {"video": {"freezes": 2}}, "status": "failed"}
    assert value_at(doc, "summary.video.freezes") == 2
    assert value_at(doc, "status") == "failed"
    assert value_at(doc, "summary.audio.gaps") is None


def test_shipped_rules_cover_the_defaults() -> None:
    names = {r.name: r for r in load_rules(DEFAULT_RULES)}
    assert {
        "call_failed",
        "connect_slow",
        "audio_jitter_high",
        "video_jitter_high",
        "audio_loss_high",
        "video_loss_high",
        "rtt_high",
        "av_out_of_sync",
        "video_freezes",
        "mos_low",
        "probe_silent",
    } <= set(names)
    assert names["call_failed"].source is Source.RESULT
    assert names["call_failed"].breached("failed") is True
    assert names["call_failed"].breached("degraded") is False
    assert names["connect_slow"].threshold == 0.6
    assert names["probe_silent"].source is Source.PROBE


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"rules": [{"name": "x", "metric": "a", "op": "~", "threshold": 1}]}, "x).op"),
        ({"rules": [{"name": "x", "metric": "a", "op": ">", "threshold": "high"}]}, "threshold"),
        (
            {
                "rules": [
                    {
                        "name": "x",
                        "metric": "a",
                        "op": ">",
                        "threshold": 1,
                        "window": {"k": 6, "n": 5},
                    }
                ]
            },
            "window",
        ),
        (
            {"rules": [{"name": "x", "metric": "a", "op": ">", "threshold": 1, "sevrity": "x"}]},
            "unknown field 'sevrity'",
        ),
        (
            {"rules": [{"name": "x", "metric": "a", "op": "outside", "threshold": [1]}]},
            "[low, high]",
        ),
        (
            {
                "rules": [
                    {"name": "x", "metric": "a", "op": ">", "threshold": 1},
                    {"name": "x", "metric": "b", "op": ">", "threshold": 1},
                ]
            },
            "duplicate",
        ),
        ({"rules": "no"}, "'rules' list"),
    ],
)
def test_bad_rule_files_are_refused_naming_the_field(rules: object, message: str) -> None:
    with pytest.raises(
        RuleError,
        match=message.replace("(", r"\(")
        .replace(")", r"\)")
        .replace("[", r"\[")
        .replace("]", r"\]"),
    ):
        parse_rules(rules)


# --- correlation ----------------------------------------------------------------------------


def test_one_target_from_one_region_is_its_own_incident() -> None:
    groups = group([Firing("a", "eu", Severity.NORMAL)], [])
    assert list(groups) == [Scope(ScopeKind.TARGET_REGION, target="a", region="eu")]


def test_one_target_from_two_regions_is_one_target_wide_incident_raised_a_tier() -> None:
    firing = [
        Firing("a", "eu", Severity.NORMAL),
        Firing("a", "us", Severity.IMPORTANT),
        Firing("b", "us", Severity.NORMAL),
    ]
    groups = group(firing, [])
    wide = Scope(ScopeKind.TARGET, target="a")
    assert groups[wide] == firing[:2]
    assert groups[Scope(ScopeKind.TARGET_REGION, target="b", region="us")] == [firing[2]]
    assert severity_of(wide, groups[wide]) is Severity.URGENT  # important, raised


def test_several_targets_from_one_region_is_one_region_wide_incident() -> None:
    firing = [Firing("a", "eu", Severity.NORMAL), Firing("b", "eu", Severity.NORMAL)]
    groups = group(firing, [])
    region = Scope(ScopeKind.REGION, region="eu")
    assert list(groups) == [region]
    assert severity_of(region, groups[region]) is Severity.NORMAL


def test_an_open_wide_incident_keeps_its_members_while_they_fire() -> None:
    wide = Scope(ScopeKind.TARGET, target="a")
    # one region cleared; the other still fires: stays with the open target-wide incident
    groups = group([Firing("a", "us", Severity.NORMAL)], [wide])
    assert list(groups) == [wide]
