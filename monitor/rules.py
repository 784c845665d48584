"""Threshold rules and the k-of-n windows that keep one bad sample from paging anyone.

A rule names a metric (a dotted path into a `callmon.call/v1` result or one of its
per-second samples), a comparison and a threshold, a k-of-n window, a close threshold
(healthy evaluations in a row before the condition clears), and a severity, optionally
raised when the value crosses further tiers. Each (rule, target, region) has its own
`Condition`; unreliable samples are never evaluated.

Rules load from YAML; `monitor/rules.yaml` holds the shipped defaults.
"""

from __future__ import annotations

import enum
import functools
import math
import operator
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from monitor.incidents import Severity

DEFAULT_RULES = Path(__file__).with_name("rules.yaml")


class Source(enum.StrEnum):
    RESULT = "result"
    "Evaluated once per call result."
    SAMPLE = "sample"
    "Evaluated once per reliable per-second sample (scheduled and continuous calls)."
    PROBE = "probe"
    "Evaluated on the clock, per probe: `silent_intervals` is the only metric."


OPS = (">", ">=", "<", "<=", "==", "!=", "outside")


class RuleError(ValueError):
    """A rule file is wrong; the message names the rule and the field."""


@dataclass(frozen=True)
class Tiered:
    threshold: float | tuple[float, float]
    severity: Severity


@dataclass(frozen=True)
class Rule:
    name: str
    metric: str
    op: str
    threshold: float | str | tuple[float, float]
    severity: Severity
    source: Source = Source.SAMPLE
    k: int = 3
    n: int = 5
    close_after: int = 5
    description: str = ""
    raise_at: tuple[Tiered, ...] = ()
    "Further thresholds that raise the severity, most severe last."
    samples_value: str | None = None
    "For result rules: what a batch of seconds with media counts as (a call working now)."

    def breached(self, value: Any) -> bool | None:
        """Tell whether `value` breaches; None when there is no value to judge."""
        if value is None:
            return None
        if self.op == "outside":
            assert isinstance(self.threshold, tuple)
            low, high = self.threshold
            return bool(value < low or value > high)
        if self.op in ("==", "!="):
            equal = value == self.threshold
            return equal if self.op == "==" else not equal
        if not isinstance(value, int | float) or isinstance(value, bool):
            return None
        threshold = self.threshold
        assert isinstance(threshold, float)
        return _COMPARE[self.op](value, threshold)

    def severity_for(self, value: Any) -> Severity:
        severity = self.severity
        for tier in self.raise_at:
            if isinstance(value, int | float) and _beyond(self.op, value, tier.threshold):
                severity = tier.severity
        return severity

    def describe(self) -> str:
        if isinstance(self.threshold, tuple):
            low, high = self.threshold
            return f"{self.metric} outside {low:g}..{high:g}"
        return f"{self.metric} {self.op} {self.threshold}"


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


def _beyond(op: str, value: float, threshold: float | tuple[float, float]) -> bool:
    if isinstance(threshold, tuple):
        return value < threshold[0] or value > threshold[1]
    if op in (">", ">="):
        return value >= threshold
    if op in ("<", "<="):
        return value <= threshold
    return False


@functools.lru_cache(maxsize=512)
def _parts(path: str) -> tuple[str, ...]:
    # rules look up the same few paths in every sample: split each once
    return tuple(path.split("."))


def value_at(document: Mapping[str, Any], path: str) -> Any:
    """Return the value at a dotted path of a JSON document, None if absent."""
    node: Any = document
    for part in _parts(path):
        # every sample of every request passes here: dict first, as the abstract Mapping
        # check alone costs several times more
        if not isinstance(node, dict | Mapping) or part not in node:
            return None
        node = node[part]
    return node


def has_media(samples: Sequence[Mapping[str, Any]]) -> bool:
    """Tell whether any reliable second of a call carried audio or video packets."""
    return any(
        (value_at(s, "audio.packets") or 0) + (value_at(s, "video.packets") or 0) > 0
        for s in samples
        if s.get("reliable", True)
    )


@dataclass
class Condition:
    """One rule's state for one target seen from one region (or one probe)."""

    recent: deque[bool] = field(default_factory=deque)
    firing: bool = False
    healthy_run: int = 0
    last_value: Any = None
    severity: Severity | None = None
    since: float | None = None
    "When it started firing."
    evidence: str | None = None
    "Id of the latest result that breached."
    breaches: int = field(init=False, default=0)
    "How many of `recent` are breaches: kept in step, as every second of every call asks."

    def __post_init__(self) -> None:
        self.breaches = sum(self.recent)

    def push(self, verdict: bool, n: int) -> None:
        """Add a verdict to the window of the last `n`."""
        self.recent.append(verdict)
        self.breaches += verdict
        while len(self.recent) > n:
            self.breaches -= self.recent.popleft()

    def observe(
        self, rule: Rule, value: Any, now: float, evidence: str | None = None
    ) -> bool | None:
        """Feed one evaluation; return True when it starts firing, False when it clears."""
        verdict = rule.breached(value)
        if verdict is None:
            return None
        self.push(verdict, rule.n)
        if verdict:
            self.last_value = value
            self.evidence = evidence or self.evidence
            self.healthy_run = 0
            if self.firing:
                self.severity = _max(self.severity, rule.severity_for(value))
        else:
            self.healthy_run += 1
        if not self.firing and self.breaches >= rule.k:
            self.firing = True
            self.since = now
            self.severity = rule.severity_for(value)
            return True
        if self.firing and self.healthy_run >= rule.close_after:
            self.firing = False
            self.since = None
            self.severity = None
            self.recent.clear()
            self.breaches = 0
            return False
        return None

    @property
    def trivial(self) -> bool:
        """Tell whether the state is the same as a fresh condition's for all that follows."""
        return not self.firing and not self.breaches

    def to_json(self) -> dict[str, Any]:
        return {
            "recent": list(self.recent),
            "firing": self.firing,
            "healthy_run": self.healthy_run,
            "last_value": self.last_value,
            "severity": self.severity.value if self.severity else None,
            "since": self.since,
            "evidence": self.evidence,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Condition:
        severity = data.get("severity")
        return cls(
            recent=deque(bool(v) for v in data.get("recent", [])),
            firing=bool(data.get("firing")),
            healthy_run=int(data.get("healthy_run", 0)),
            last_value=data.get("last_value"),
            severity=Severity(severity) if severity else None,
            since=data.get("since"),
            evidence=data.get("evidence"),
        )


def _max(a: Severity | None, b: Severity) -> Severity:
    return b if a is None or b.rank < a.rank else a


# --- loading ------------------------------------------------------------------------------


def load_rules(path: Path) -> tuple[Rule, ...]:
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RuleError(f"{path}: {exc}") from exc
    return parse_rules(document, str(path))


def parse_rules(document: Any, origin: str = "rules") -> tuple[Rule, ...]:
    if not isinstance(document, Mapping) or not isinstance(document.get("rules"), list):
        raise RuleError(f"{origin}: expected a mapping with a 'rules' list")
    rules = tuple(
        _rule(entry, f"{origin}: rules[{i}]") for i, entry in enumerate(document["rules"])
    )
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise RuleError(f"{origin}: duplicate rule names: {', '.join(duplicates)}")
    return rules


_KNOWN = {
    "name",
    "description",
    "source",
    "metric",
    "op",
    "threshold",
    "window",
    "close_after",
    "severity",
    "raise_at",
    "samples_value",
}


def _rule(entry: Any, where: str) -> Rule:
    if not isinstance(entry, Mapping):
        raise RuleError(f"{where}: expected a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise RuleError(f"{where}.name: required")
    where = f"{where} ({name})"
    unknown = sorted(set(entry) - _KNOWN)
    if unknown:
        raise RuleError(f"{where}: unknown field {unknown[0]!r}")
    try:
        source = Source(entry.get("source", "sample"))
        severity = Severity(entry.get("severity", "normal"))
    except ValueError as exc:
        raise RuleError(f"{where}: {exc}") from None
    metric = entry.get("metric")
    if not isinstance(metric, str) or not metric:
        raise RuleError(f"{where}.metric: required")
    op = entry.get("op")
    if op not in OPS:
        raise RuleError(f"{where}.op: must be one of {', '.join(OPS)}")
    threshold = _threshold(entry.get("threshold"), op, f"{where}.threshold")
    window = entry.get("window", {"k": 3, "n": 5})
    if not isinstance(window, Mapping):
        raise RuleError(f"{where}.window: expected {{k: .., n: ..}}")
    k, n = window.get("k"), window.get("n")
    if not (isinstance(k, int) and isinstance(n, int) and 1 <= k <= n <= 1000):
        raise RuleError(f"{where}.window: need integers 1 <= k <= n <= 1000")
    close_after = entry.get("close_after", 5)
    if not isinstance(close_after, int) or close_after < 1:
        raise RuleError(f"{where}.close_after: a positive integer")
    raise_at = tuple(
        _tiered(t, op, f"{where}.raise_at[{i}]") for i, t in enumerate(entry.get("raise_at", []))
    )
    return Rule(
        name=name,
        metric=metric,
        op=op,
        threshold=threshold,
        severity=severity,
        source=source,
        k=k,
        n=n,
        close_after=close_after,
        description=str(entry.get("description", "")),
        raise_at=raise_at,
        samples_value=_optional_text(entry, "samples_value", where),
    )


def _optional_text(entry: Mapping[str, Any], key: str, where: str) -> str | None:
    value = entry.get(key)
    if value is not None and not isinstance(value, str):
        raise RuleError(f"{where}.{key}: expected text")
    return value


def _threshold(value: Any, op: str, where: str) -> float | str | tuple[float, float]:
    if op == "outside":
        if (
            isinstance(value, Sequence)
            and not isinstance(value, str)
            and len(value) == 2
            and all(isinstance(v, int | float) for v in value)
            and value[0] < value[1]
        ):
            return (float(value[0]), float(value[1]))
        raise RuleError(f"{where}: 'outside' needs [low, high]")
    if op in ("==", "!=") and isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    raise RuleError(f"{where}: expected a number")


def _tiered(entry: Any, op: str, where: str) -> Tiered:
    if not isinstance(entry, Mapping):
        raise RuleError(f"{where}: expected {{threshold: .., severity: ..}}")
    threshold = _threshold(entry.get("threshold"), op, f"{where}.threshold")
    if isinstance(threshold, str):
        raise RuleError(f"{where}.threshold: expected a number")
    try:
        return Tiered(threshold, Severity(str(entry.get("severity"))))
    except ValueError as exc:
        raise RuleError(f"{where}.severity: {exc}") from None
