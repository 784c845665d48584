"""The monitor's pipeline, readable in one screen: evaluate -> decide -> store -> reply.

Everything that changes state (an ingest, an operator's action, the clock) is a job on
one queue. A single writer takes the jobs waiting, applies each to the in-memory state
(rule windows, incidents), and writes all of their effects in one transaction: group
commit. Only then are the callers answered, so a 2xx always means "on disk". If the
commit fails, the in-memory state is reloaded from the store and every caller in the
batch gets the error: nothing half-applied survives.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from callmon.times import iso_or_none as iso
from monitor import correlation, incidents
from monitor.config import MonitorConfig, ProbeIdentity
from monitor.correlation import Firing
from monitor.incidents import Change, Incident, Scope, ScopeKind, Severity, dedup_key
from monitor.metrics import Metrics
from monitor.rules import Condition, Rule, Source, has_media, value_at
from monitor.store import ResultRow, SampleRow, Silence, Store, Unit

log = logging.getLogger("callmon.monitor")

T = TypeVar("T")
Clock = Callable[[], float]

BATCH = 256
"Jobs taken into one transaction, at most."
PRUNE_EVERY_S = 3600.0
CALLS_REMEMBERED = 10_000
"Calls whose last judged second is remembered."
IDS_REMEMBERED = 100_000
"Stored ids kept in memory to answer resends without a read (oldest forgotten first)."
PROBE_TARGET = "probe:"
"Conditions of probe rules name the probe where others name the target."


@dataclass(frozen=True)
class Receipt:
    id: str
    received_at: float
    "When the item was first committed; the same on every resend."


@dataclass(frozen=True)
class Item:
    """One validated thing to ingest: a call result or a batch of samples."""

    id: str
    kind: str
    "result or samples"
    target: str
    body: Mapping[str, Any]


@dataclass
class _Job(Generic[T]):
    apply: Callable[[Unit, float], T]
    future: asyncio.Future[T]
    ids: tuple[str, ...] = ()
    "Item ids the job needs to know are stored or not (looked up once per batch)."


@dataclass
class _State:
    conditions: dict[str, Condition] = field(default_factory=dict)
    "By `rule|target|region`."
    incidents: dict[str, Incident] = field(default_factory=dict)
    "By dedup key: the open incident, or the latest resolved one."
    probes_seen: dict[str, tuple[str, float]] = field(default_factory=dict)
    silences: list[Silence] = field(default_factory=list)
    known: dict[str, float] = field(default_factory=dict)
    "Ids already stored, with when (a cache in front of the store)."
    seconds: dict[str, float] = field(default_factory=dict)
    "Per call id, the last second judged (insertion order = least recently used first)."


class Pipeline:
    def __init__(
        self,
        config: MonitorConfig,
        store: Store,
        metrics: Metrics,
        clock: Clock = time.time,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self._on_commit = on_commit
        self.store = store
        self.metrics = metrics
        self.clock = clock
        self.rules = {rule.name: rule for rule in config.rules}
        self._state = _State()
        self._queue: asyncio.Queue[_Job[Any]] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        self._pruned_at = float("-inf")
        self.started_at = clock()

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        await self._reload()
        self.started_at = self.clock()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def stop(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def _reload(self) -> None:
        loaded = await self.store.load()
        state = _State(
            conditions={k: Condition.from_json(v) for k, v in loaded.conditions.items()},
            incidents={i.key: i for i in sorted(loaded.incidents, key=lambda i: i.id or 0)},
            probes_seen=dict(loaded.probes_seen),
            silences=await self.store.silences(active_at=None),
        )
        self._state = state
        self.metrics.restore(loaded.latest_results, state.incidents.values())

    # --- the writer -----------------------------------------------------------------

    async def _submit(
        self,
        apply: Callable[[Unit, float], T],
        ids: tuple[str, ...] = (),
    ) -> T:
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Job(apply, future, ids))
        return await future

    async def _write_loop(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            while not self._queue.empty() and len(jobs) < BATCH:
                jobs.append(self._queue.get_nowait())
            await self._run_batch(jobs)

    async def _run_batch(self, jobs: list[_Job[Any]]) -> None:
        unit = Unit(at=self.clock())
        outcomes: list[tuple[_Job[Any], Any, Exception | None]] = []
        try:
            known = self._state.known
            missing = [i for job in jobs for i in job.ids if i not in known]
            if missing:
                known.update(await self.store.known(missing))
            now = unit.at = self.clock()
            for job in jobs:
                try:
                    outcomes.append((job, job.apply(unit, now), None))
                except (LookupError, incidents.InvalidTransition) as exc:  # the job's own fault
                    outcomes.append((job, None, exc))
            written = await self.store.commit(unit)
        except Exception as exc:
            log.exception("commit failed; reloading state from the store")
            await self._reload()
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        for incident in written:
            self._state.incidents[incident.key] = incident
        known = self._state.known
        while len(known) > IDS_REMEMBERED:  # older ids are looked up in the store again
            known.pop(next(iter(known)))
        self.metrics.committed(unit, self._state.incidents.values())
        if self._on_commit is not None and any(c.notices for c in unit.changes):
            self._on_commit()
        for job, outcome, error in outcomes:
            if job.future.done():  # the caller went away
                continue
            if error is not None:
                job.future.set_exception(error)
            elif isinstance(outcome, Incident) and outcome.id is None:
                job.future.set_result(self._state.incidents[outcome.key])
            else:
                job.future.set_result(outcome)

    # --- ingest ------------------------------------------------------------------------

    async def ingest(self, probe: ProbeIdentity, items: list[Item]) -> list[Receipt]:
        """Store and evaluate items from one probe; return one receipt per item."""
        known = self._state.known

        def apply(unit: Unit, now: float) -> list[Receipt]:
            receipts = []
            for item in items:
                if item.id not in known:
                    known[item.id] = now
                    self._ingest_item(unit, probe, item, now)
                receipts.append(Receipt(item.id, known[item.id]))
            self._state.probes_seen[probe.name] = (probe.region, now)
            unit.probes_seen[probe.name] = (probe.region, now)
            return receipts

        try:
            return await self._submit(apply, tuple(item.id for item in items))
        except Exception:
            for item in items:  # not committed: a resend must be taken as new
                known.pop(item.id, None)
            raise

    def _ingest_item(self, unit: Unit, probe: ProbeIdentity, item: Item, now: float) -> None:
        body = item.body
        status = body.get("status") if item.kind == "result" else None
        unit.results.append(
            ResultRow(item.id, item.kind, probe.name, probe.region, item.target, now, status, body)
        )
        call_id = str(body.get("call_id", item.id))
        # A long-held call sends its seconds in batches and may repeat them in its final
        # result: each (call, second) is judged once.
        seen = self._state.seconds.pop(call_id, -1.0)
        samples = [s for s in body.get("samples", []) if float(s["t_s"]) > seen]
        if samples:
            seen = max(seen, *(float(s["t_s"]) for s in samples))
        self._state.seconds[call_id] = seen
        while len(self._state.seconds) > CALLS_REMEMBERED:
            self._state.seconds.pop(next(iter(self._state.seconds)))
        # a second's wall time: the last one arrived now, the others before it
        last = max((float(s["t_s"]) for s in samples), default=0.0)
        unit.samples.extend(
            SampleRow(
                call_id,
                probe.name,
                probe.region,
                item.target,
                now - (last - float(s["t_s"])),
                float(s["t_s"]),
                bool(s.get("reliable", True)),
                s,
            )
            for s in samples
        )
        self.metrics.ingested(item, probe.region, samples)
        touched: set[str] = set()
        for rule in self.rules.values():
            values: list[Any] = []
            if rule.source is Source.RESULT and item.kind == "result":
                values = [value_at(body, rule.metric)]
            elif rule.source is Source.RESULT and rule.samples_value and has_media(samples):
                # a long-held call reports its status only when it ends; seconds with
                # media in the meantime say it works now
                values = [rule.samples_value]
            elif rule.source is Source.SAMPLE:
                # samples the probe marked unreliable (its own overload) never count
                values = [value_at(s, rule.metric) for s in samples if s.get("reliable", True)]
            key = f"{rule.name}|{item.target}|{probe.region}"
            for value in values:
                if self._observe(unit, rule, key, value, now, item.id):
                    touched.add(rule.name)
        for name in sorted(touched):
            self._reconcile(unit, self.rules[name], now)

    def _observe(
        self, unit: Unit, rule: Rule, key: str, value: Any, now: float, evidence: str | None
    ) -> bool:
        """Feed one evaluation; return whether the rule's incidents need a look."""
        condition = self._state.conditions.get(key)
        if condition is None:
            condition = self._state.conditions[key] = Condition()
        was_firing, was_trivial = condition.firing, condition.trivial
        if was_trivial:
            # the common case, a healthy second of a healthy target: checked before the
            # full evaluation, as it comes once per rule for every second of every call
            verdict = rule.breached(value)
            if not verdict:
                if verdict is False:
                    condition.push(False, rule.n)
                return False
        if condition.observe(rule, value, now, evidence) is None and not condition.recent:
            return False
        # A window of healthy evaluations is as good as none: it is not written, and one
        # that becomes healthy again is deleted. In steady state nothing is written at all.
        if not (condition.trivial and was_trivial):
            unit.conditions[key] = None if condition.trivial else condition.to_json()
        return condition.firing or was_firing

    # --- incidents from conditions --------------------------------------------------------

    def _reconcile(self, unit: Unit, rule: Rule, now: float) -> None:
        """Bring the rule's incidents in line with the conditions firing now."""
        policy = self.config.policy
        firing: dict[tuple[str, str], Condition] = {}
        for key, condition in self._state.conditions.items():
            name, target, region = key.split("|", 2)
            if name == rule.name and condition.firing and condition.severity is not None:
                firing[(target, region)] = condition
        open_incidents = {
            i.scope: i for i in self._state.incidents.values() if i.rule == rule.name and i.open
        }
        if rule.source is Source.PROBE:
            groups = {
                Scope(ScopeKind.PROBE, region=region, name=target.removeprefix(PROBE_TARGET)): [
                    Firing(target, region, c.severity or rule.severity)
                ]
                for (target, region), c in firing.items()
            }
        else:
            groups = correlation.group(
                [Firing(t, r, c.severity or rule.severity) for (t, r), c in firing.items()],
                open_incidents,
            )
        for scope, members in groups.items():
            details = _details(rule, scope, members, firing)
            why = f"{rule.describe()}: {scope.describe()}"
            change = self._breach(
                rule.name,
                scope,
                correlation.severity_of(scope, members),
                details,
                now,
                why,
                title=f"{rule.name}: {scope.describe()}",
            )
            if change is not None:
                self._apply(unit, change)
        for scope, incident in open_incidents.items():
            if scope in groups:
                continue
            wider = next(
                (
                    s
                    for s in groups
                    if s.kind in (ScopeKind.TARGET, ScopeKind.REGION)
                    and scope.kind is ScopeKind.TARGET_REGION
                    and (s.target == scope.target or s.region == scope.region)
                ),
                None,
            )
            why = (
                f"merged into the incident for {wider.describe()}"
                if wider is not None
                else f"cleared: {rule.close_after} healthy evaluations in a row"
            )
            self._apply(unit, incidents.recover(incident, now=now, policy=policy, why=why))

    def _breach(
        self,
        rule: str,
        scope: Scope,
        severity: Severity,
        details: Mapping[str, Any],
        now: float,
        why: str,
        *,
        title: str,
    ) -> Change | None:
        """Open, update, raise or reopen the incident of (rule, scope); None if silenced."""
        policy = self.config.policy
        existing = self._state.incidents.get(dedup_key(rule, scope))
        if existing is not None:
            change = incidents.breach(
                existing, severity=severity, details=details, now=now, policy=policy, why=why
            )
            if change is not None:
                return change
        if any(s.covers(scope, now) for s in self._state.silences):
            return None
        return incidents.open_incident(
            rule=rule,
            scope=scope,
            title=title,
            severity=severity,
            details=details,
            now=now,
            policy=policy,
            why=why,
        )

    def _apply(self, unit: Unit, change: Change) -> None:
        unit.changes.append(change)
        self._state.incidents[change.incident.key] = change.incident

    # --- the clock ---------------------------------------------------------------------

    async def tick(self) -> None:
        """Judge silent probes and apply deadlines; called about once a second."""

        def apply(unit: Unit, now: float) -> None:
            for rule in self.rules.values():
                if rule.source is Source.PROBE:
                    self._judge_probes(unit, rule, now)
            for incident in list(self._state.incidents.values()):
                change = incidents.tick(incident, now=now, policy=self.config.policy)
                if change is not None:
                    self._apply(unit, change)

        await self._submit(apply)
        await self._prune()

    async def _prune(self) -> None:
        """Apply the retention period, at most once an hour."""
        days = self.config.retention_days
        now = self.clock()
        if days <= 0 or now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        removed = await self.store.prune(now - days * 86_400)
        if removed:
            log.info("retention: removed %d results and samples older than %g days", removed, days)

    def _judge_probes(self, unit: Unit, rule: Rule, now: float) -> None:
        touched = False
        for probe in self.config.probes:
            _, last = self._state.probes_seen.get(probe.name, (probe.region, self.started_at))
            # silence is counted from the later of its last report and this monitor's start:
            # a monitor that was down itself must not blame the probes for it
            silent = (now - max(last, self.started_at)) / probe.interval_s
            key = f"{rule.name}|{PROBE_TARGET}{probe.name}|{probe.region}"
            touched |= self._observe(unit, rule, key, silent, now, None)
        if touched:
            self._reconcile(unit, rule, now)

    # --- operators and external alerts ---------------------------------------------------

    async def operate(self, incident_id: int, act: Callable[[Incident, float], Change]) -> Incident:
        """Apply an operator's action (raises InvalidTransition, or LookupError if unknown)."""
        stored = await self.store.incident(incident_id)
        if stored is None:
            raise LookupError(incident_id)

        def apply(unit: Unit, now: float) -> Incident:
            current = self._state.incidents.get(stored.key)
            # an older incident of the same key is not kept in memory: act on the stored one
            incident = current if current is not None and current.id == incident_id else stored
            change = act(incident, now)
            unit.changes.append(change)
            if current is incident:
                self._state.incidents[incident.key] = change.incident
            return change.incident

        return await self._submit(apply)

    async def alert(
        self,
        *,
        rule: str,
        scope: Scope,
        firing: bool,
        severity: Severity,
        title: str,
        details: Mapping[str, Any],
    ) -> Incident | None:
        """Open, update or resolve the incident of an external alert (Alertmanager)."""

        def apply(unit: Unit, now: float) -> Incident | None:
            existing = self._state.incidents.get(dedup_key(rule, scope))
            if not firing:
                if existing is None or not existing.open:
                    return existing
                change: Change | None = incidents.recover(
                    existing,
                    now=now,
                    policy=self.config.policy,
                    why="Alertmanager reports the alert resolved",
                )
            else:
                change = self._breach(
                    rule,
                    scope,
                    severity,
                    details,
                    now,
                    f"Alertmanager alert {title} is firing",
                    title=title,
                )
            if change is None:
                return None
            self._apply(unit, change)
            return change.incident

        return await self._submit(apply)

    def silences_changed(self, silences: list[Silence]) -> None:
        self._state.silences = silences

    def alive(self, probe: ProbeIdentity) -> None:
        """Note a sign of life that is not a result (an agent starting up)."""
        seen = self._state.probes_seen.get(probe.name)
        now = self.clock()
        if seen is None or seen[1] < now:
            self._state.probes_seen[probe.name] = (probe.region, now)

    def firing(self) -> dict[tuple[str, str], list[dict[str, str]]]:
        """Return, per (target, region), the rules firing now with their severity."""
        out: dict[tuple[str, str], list[dict[str, str]]] = {}
        for key, condition in self._state.conditions.items():
            if condition.firing and condition.severity is not None:
                rule, target, region = key.split("|", 2)
                out.setdefault((target, region), []).append(
                    {"rule": rule, "severity": condition.severity.value}
                )
        return out

    def open_incidents(self) -> list[Incident]:
        return [i for i in self._state.incidents.values() if i.open]

    def next_deadline(self) -> float | None:
        return min(
            (d for i in self._state.incidents.values() if (d := incidents.next_deadline(i))),
            default=None,
        )


def _details(
    rule: Rule, scope: Scope, members: list[Firing], firing: Mapping[tuple[str, str], Condition]
) -> dict[str, Any]:
    """Describe what breached: each member's latest value against the threshold."""
    rows = []
    for f in members:
        c = firing[(f.target, f.region)]
        rows.append(
            {
                "target": f.target,
                "region": f.region,
                "value": c.last_value,
                "severity": f.severity.value,
                "since": iso(c.since),
                "breaches": c.breaches,
                "evaluations": len(c.recent),
                "evidence": c.evidence,
            }
        )
    threshold = rule.threshold
    return {
        "rule": rule.name,
        "description": rule.description,
        "metric": rule.metric,
        "op": rule.op,
        "raise_at": [
            {
                "threshold": list(t.threshold) if isinstance(t.threshold, tuple) else t.threshold,
                "severity": t.severity.value,
            }
            for t in rule.raise_at
        ],
        "condition": rule.describe(),
        "threshold": list(threshold) if isinstance(threshold, tuple) else threshold,
        "window": {"k": rule.k, "n": rule.n},
        "scope": scope.describe(),
        "conditions": rows,
    }
