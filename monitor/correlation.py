"""Which incident a firing condition belongs to.

One rule firing for one target from one region is a target_region incident. The same rule
firing for a target from two or more regions is one target-wide incident: the service is
the likely cause, and it is raised one severity tier (a large-scale outage). Several
targets failing the same rule from one region is one region-wide incident: the network
or the probe's side is the likely cause. An open wide incident keeps the conditions it
covers until they all clear, so a flapping region does not split it back apart.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from monitor.incidents import Scope, ScopeKind, Severity

MIN_REGIONS = 2
MIN_TARGETS = 2


@dataclass(frozen=True)
class Firing:
    """A condition that holds: one rule, one target, one region."""

    target: str
    region: str
    severity: Severity


def covers(scope: Scope, firing: Firing) -> bool:
    if scope.kind is ScopeKind.TARGET:
        return scope.target == firing.target
    if scope.kind is ScopeKind.REGION:
        return scope.region == firing.region
    return scope.target == firing.target and scope.region == firing.region


def group(firing: Iterable[Firing], open_scopes: Iterable[Scope]) -> dict[Scope, list[Firing]]:
    """Assign firing conditions to incident scopes."""
    left = sorted(set(firing), key=lambda f: (f.target, f.region))
    groups: dict[Scope, list[Firing]] = {}

    # wide incidents already open keep what they cover
    for scope in sorted(s for s in open_scopes if s.kind in (ScopeKind.TARGET, ScopeKind.REGION)):
        members = [f for f in left if covers(scope, f)]
        if members:
            groups[scope] = members
            left = [f for f in left if f not in members]

    by_target: Mapping[str, list[Firing]] = _by(left, lambda f: f.target)
    for target, members in by_target.items():
        if len({f.region for f in members}) >= MIN_REGIONS:
            groups[Scope(ScopeKind.TARGET, target=target)] = members
            left = [f for f in left if f not in members]

    by_region: Mapping[str, list[Firing]] = _by(left, lambda f: f.region)
    for region, members in by_region.items():
        if len({f.target for f in members}) >= MIN_TARGETS:
            groups[Scope(ScopeKind.REGION, region=region)] = members
            left = [f for f in left if f not in members]

    for f in left:
        groups[Scope(ScopeKind.TARGET_REGION, target=f.target, region=f.region)] = [f]
    return groups


def severity_of(scope: Scope, members: Iterable[Firing]) -> Severity:
    """Return the worst member's severity, one tier up for a target-wide incident."""
    worst = min((f.severity for f in members), key=lambda s: s.rank)
    return worst.raised() if scope.kind is ScopeKind.TARGET else worst


def _by(items: list[Firing], key: object) -> Mapping[str, list[Firing]]:
    out: dict[str, list[Firing]] = defaultdict(list)
    for item in items:
        out[key(item)].append(item)  # type: ignore[operator]
    return out
