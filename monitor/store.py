"""Where the monitor keeps what it was told and what it decided.

`Store` is the one interface the rest of the monitor uses; `SqliteStore` implements it
over an embedded SQLite file (WAL, synchronous=FULL: a commit is on disk when it returns).
A PostgreSQL store can implement the same protocol without touching the engine.

Writes arrive as `Unit`s, each applied in one transaction: results and their samples,
rule-window state, incident changes with their timeline events, and the notifications
those changes cause (the outbox). So a crash leaves either all of a change or none of it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import secrets
import sqlite3
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import orjson

from callmon.times import iso_or_none as iso
from monitor.incidents import (
    Change,
    Event,
    Incident,
    Scope,
    ScopeKind,
    Severity,
    State,
)

T = TypeVar("T")

SCHEMA_VERSION = 2
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # from version 1: the latest reopening, where the acknowledgement clock restarts
    1: ("ALTER TABLE incidents ADD COLUMN reopened_at REAL",),
}
"Statements that take a database from a version to the next, run in one transaction."
"Bumped with every change to the tables below; a database of another version is refused."

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,              -- 'result' or 'samples'
    probe TEXT NOT NULL,
    region TEXT NOT NULL,
    target TEXT NOT NULL,
    received_at REAL NOT NULL,
    status TEXT,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_by_target ON results (target, region, received_at);
CREATE TABLE IF NOT EXISTS samples (
    call_id TEXT NOT NULL,
    probe TEXT NOT NULL,
    region TEXT NOT NULL,
    target TEXT NOT NULL,
    at REAL NOT NULL,
    t_s REAL NOT NULL,
    reliable INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (call_id, t_s)
);
CREATE INDEX IF NOT EXISTS samples_by_target ON samples (target, region, at);
CREATE TABLE IF NOT EXISTS conditions (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS probes_seen (
    probe TEXT PRIMARY KEY,
    region TEXT NOT NULL,
    at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS incidents (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL,
    rule TEXT NOT NULL,
    scope_kind TEXT NOT NULL,
    target TEXT NOT NULL,
    region TEXT NOT NULL,
    scope_name TEXT NOT NULL,
    title TEXT NOT NULL,
    severity TEXT NOT NULL,
    state TEXT NOT NULL,
    opened_at REAL NOT NULL,
    ack_due REAL NOT NULL,
    resolve_due REAL NOT NULL,
    acknowledged_at REAL,
    resolved_at REAL,
    ack_breached INTEGER NOT NULL,
    resolve_breached INTEGER NOT NULL,
    escalation_level INTEGER NOT NULL,
    next_escalation_at REAL,
    reopened INTEGER NOT NULL,
    details TEXT NOT NULL,
    reopened_at REAL                 -- since schema 2
);
CREATE INDEX IF NOT EXISTS incidents_by_key ON incidents (key, id);
CREATE INDEX IF NOT EXISTS incidents_by_state ON incidents (state, id);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id INTEGER NOT NULL REFERENCES incidents (id),
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    kind TEXT NOT NULL,
    text TEXT NOT NULL,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_incident ON events (incident_id, id);
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    incident_id INTEGER NOT NULL REFERENCES incidents (id),
    incident_key TEXT NOT NULL,      -- rows of one key on one channel go out in order
    channel TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL,              -- what a breach or escalation was about
    created_at REAL NOT NULL,
    snapshot TEXT NOT NULL,          -- the incident as it was when the change happened
    state TEXT NOT NULL,             -- pending, sending, sent, failed
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    lease_until REAL,
    sent_at REAL,
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_at);
CREATE INDEX IF NOT EXISTS outbox_order ON outbox (channel, incident_key, id);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS silences (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target TEXT,
    region TEXT,
    starts_at REAL NOT NULL,
    ends_at REAL NOT NULL,
    created_by TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


@dataclass(frozen=True)
class ResultRow:
    id: str
    kind: str
    probe: str
    region: str
    target: str
    received_at: float
    status: str | None
    body: Mapping[str, Any]


@dataclass(frozen=True)
class SampleRow:
    call_id: str
    probe: str
    region: str
    target: str
    at: float
    t_s: float
    reliable: bool
    body: Mapping[str, Any]


@dataclass
class Unit:
    """Everything one transaction writes."""

    at: float = 0.0
    "When the changes happened: notifications are due from then."
    results: list[ResultRow] = field(default_factory=list)
    samples: list[SampleRow] = field(default_factory=list)
    conditions: dict[str, Mapping[str, Any] | None] = field(default_factory=dict)
    "Rule windows by key; None deletes one (a healthy window is the same as none)."
    probes_seen: dict[str, tuple[str, float]] = field(default_factory=dict)
    changes: list[Change] = field(default_factory=list)


@dataclass(frozen=True)
class OutboxRow:
    id: int
    incident_id: int
    incident_key: str
    channel: str
    kind: str
    data: Mapping[str, Any]
    created_at: float
    snapshot: Mapping[str, Any]
    state: str
    attempts: int
    "Delivery attempts so far, this claim included."
    next_at: float
    lease_until: float | None
    "While claimed: when the claim lapses; also the token that fences its updates."
    sent_at: float | None
    last_error: str | None


@dataclass(frozen=True)
class Silence:
    id: int
    target: str | None
    region: str | None
    starts_at: float
    ends_at: float
    created_by: str
    reason: str
    created_at: float

    def covers(self, scope: Scope, now: float) -> bool:
        if not self.starts_at <= now < self.ends_at:
            return False
        target_ok = self.target is None or self.target == scope.target
        region_ok = self.region is None or self.region == scope.region
        return target_ok and region_ok


@dataclass(frozen=True)
class StoredEvent:
    id: int
    incident_id: int
    event: Event


@dataclass(frozen=True)
class Loaded:
    """What the monitor needs in memory after a start."""

    conditions: dict[str, Mapping[str, Any]]
    incidents: list[Incident]
    "Open incidents, and each key's latest resolved one (for reopening)."
    probes_seen: dict[str, tuple[str, float]]
    latest_results: list[ResultRow]
    "The newest result per target and region."


class Store(Protocol):
    async def load(self) -> Loaded: ...
    async def known(self, ids: Sequence[str]) -> dict[str, float]:
        """Return received_at for the ids already stored."""
        ...

    async def commit(self, unit: Unit) -> list[Incident]:
        """Write the unit in one transaction; return its incidents with their ids."""
        ...

    async def incidents(
        self,
        *,
        state: str | None,
        severity: str | None,
        target: str | None,
        region: str | None,
        rule: str | None,
        limit: int,
    ) -> list[Incident]: ...
    async def incident(self, incident_id: int) -> Incident | None: ...
    async def result(self, result_id: str) -> ResultRow | None: ...
    async def events(self, incident_id: int) -> list[StoredEvent]: ...
    async def outbox_for(self, incident_id: int) -> list[OutboxRow]: ...
    async def claim_outbox(self, now: float, lease_s: float, limit: int) -> list[OutboxRow]:
        """Claim due rows that are first in line for their channel and incident key."""
        ...

    async def outbox_sent(self, row: OutboxRow, now: float) -> bool:
        """Record a delivery; False if the claim had lapsed and another took the row."""
        ...

    async def outbox_retry(self, row: OutboxRow, next_at: float, error: str) -> bool: ...
    async def outbox_failed(self, row: OutboxRow, error: str) -> bool: ...
    async def next_outbox_due(self) -> float | None:
        """Return when a row next becomes claimable, if any."""
        ...

    async def prune(self, before: float) -> int:
        """Delete results and samples received before `before`; return how many."""
        ...

    async def instance_id(self) -> str:
        """Return this database's random id (it makes idempotency keys unique)."""
        ...

    async def add_silence(
        self,
        *,
        target: str | None,
        region: str | None,
        starts_at: float,
        ends_at: float,
        created_by: str,
        reason: str,
        now: float,
    ) -> Silence: ...
    async def end_silence(self, silence_id: int, now: float) -> Silence | None: ...
    async def silences(self, *, active_at: float | None) -> list[Silence]: ...
    async def samples(
        self, *, target: str, region: str | None, since: float, until: float, limit: int
    ) -> list[SampleRow]: ...
    async def close(self) -> None: ...


class SqliteStore:
    """The embedded store: one SQLite file, used from one worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite")
        self._db: sqlite3.Connection | None = None

    async def open(self) -> SqliteStore:
        try:
            await self._run(self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise
        return self

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # FULL: a transaction is on disk (WAL fsynced) when COMMIT returns, so a 2xx
        # given after it survives a power cut, not only a process crash.
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA busy_timeout=5000")
        try:
            self._upgrade(db)
        except BaseException:
            db.close()
            raise
        self._db = db

    def _upgrade(self, db: sqlite3.Connection) -> None:
        """Create the schema, or bring an older one forward; refuse a newer one."""
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(
                "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            found = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = SCHEMA_VERSION if found is None else int(found[0])
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.path} has schema version {version}, newer than this callmon's "
                    f"{SCHEMA_VERSION}: upgrade callmon, or restore a backup made before"
                )
            while version < SCHEMA_VERSION:
                for statement in MIGRATIONS[version]:
                    db.execute(statement)
                version += 1
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(
                "INSERT INTO meta (key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (str(SCHEMA_VERSION),),
            )
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('instance_id', ?)",
                (secrets.token_hex(8),),
            )
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def _transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        assert db is not None, "store not open"
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close)
        self._executor.shutdown(wait=True)

    # --- reads ------------------------------------------------------------------------

    async def load(self) -> Loaded:
        def load() -> Loaded:
            db = self._db
            assert db is not None
            conditions = {
                key: orjson.loads(state)
                for key, state in db.execute("SELECT key, state FROM conditions")
            }
            incidents = [
                _incident(row)
                for row in db.execute(
                    "SELECT * FROM incidents WHERE state != 'resolved' OR id IN "
                    "(SELECT MAX(id) FROM incidents GROUP BY key)"
                )
            ]
            seen = {
                p: (r, at) for p, r, at in db.execute("SELECT probe, region, at FROM probes_seen")
            }
            latest = [
                _result(row)
                for row in db.execute(
                    "SELECT * FROM results WHERE kind = 'result' AND rowid IN "
                    "(SELECT MAX(rowid) FROM results WHERE kind = 'result' GROUP BY target, region)"
                )
            ]
            return Loaded(conditions, incidents, seen, latest)

        return await self._run(load)

    async def known(self, ids: Sequence[str]) -> dict[str, float]:
        def known() -> dict[str, float]:
            db = self._db
            assert db is not None
            out: dict[str, float] = {}
            for chunk in _chunks(list(ids), 500):
                marks = ",".join("?" * len(chunk))
                rows = db.execute(
                    f"SELECT id, received_at FROM results WHERE id IN ({marks})", chunk
                )
                out.update({i: at for i, at in rows})
            return out

        return await self._run(known)

    async def incidents(
        self,
        *,
        state: str | None = None,
        severity: str | None = None,
        target: str | None = None,
        region: str | None = None,
        rule: str | None = None,
        limit: int = 100,
    ) -> list[Incident]:
        clauses: list[str] = []
        values: list[Any] = []
        for column, value in (
            ("state", state),
            ("severity", severity),
            ("target", target),
            ("region", region),
            ("rule", rule),
        ):
            if value is not None:
                if column == "state" and value == "open":
                    clauses.append("state != 'resolved'")
                elif column in ("target", "region"):
                    # a wide incident matches through its members (details.conditions)
                    clauses.append(
                        f"({column} = ? OR EXISTS (SELECT 1 FROM json_each(details, "
                        f"'$.conditions') WHERE json_extract(value, '$.{column}') = ?))"
                    )
                    values.extend([value, value])
                else:
                    clauses.append(f"{column} = ?")
                    values.append(value)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""

        def query() -> list[Incident]:
            db = self._db
            assert db is not None
            sql = f"SELECT * FROM incidents {where} ORDER BY id DESC LIMIT ?"
            return [_incident(row) for row in db.execute(sql, [*values, limit])]

        return await self._run(query)

    async def result(self, result_id: str) -> ResultRow | None:
        def query() -> ResultRow | None:
            db = self._db
            assert db is not None
            row = db.execute("SELECT * FROM results WHERE id = ?", (result_id,)).fetchone()
            return None if row is None else _result(row)

        return await self._run(query)

    async def incident(self, incident_id: int) -> Incident | None:
        def query() -> Incident | None:
            db = self._db
            assert db is not None
            row = db.execute("SELECT * FROM incidents WHERE id = ?", (incident_id,)).fetchone()
            return None if row is None else _incident(row)

        return await self._run(query)

    async def events(self, incident_id: int) -> list[StoredEvent]:
        def query() -> list[StoredEvent]:
            db = self._db
            assert db is not None
            rows = db.execute(
                "SELECT id, incident_id, at, actor, kind, text, data FROM events "
                "WHERE incident_id = ? ORDER BY id",
                (incident_id,),
            )
            return [
                StoredEvent(i, inc, Event(at, actor, kind, text, orjson.loads(data)))
                for i, inc, at, actor, kind, text, data in rows
            ]

        return await self._run(query)

    async def outbox_for(self, incident_id: int) -> list[OutboxRow]:
        def query() -> list[OutboxRow]:
            db = self._db
            assert db is not None
            rows = db.execute(
                f"SELECT {_OUTBOX} FROM outbox WHERE incident_id = ? ORDER BY id", (incident_id,)
            )
            return [_outbox(row) for row in rows]

        return await self._run(query)

    async def samples(
        self, *, target: str, region: str | None, since: float, until: float, limit: int = 10_000
    ) -> list[SampleRow]:
        def query() -> list[SampleRow]:
            db = self._db
            assert db is not None
            sql = (
                "SELECT call_id, probe, region, target, at, t_s, reliable, body FROM samples "
                "WHERE target = ? AND at >= ? AND at <= ?"
            )
            values: list[Any] = [target, since, until]
            if region is not None:
                sql += " AND region = ?"
                values.append(region)
            # the newest `limit` seconds of the window, oldest first: when a window holds
            # more than asked, what is cut is its old end
            sql += " ORDER BY at DESC LIMIT ?"
            values.append(limit)
            rows = [
                SampleRow(c, p, r, t, at, t_s, bool(rel), orjson.loads(body))
                for c, p, r, t, at, t_s, rel, body in db.execute(sql, values)
            ]
            rows.reverse()
            return rows

        return await self._run(query)

    # --- writes ------------------------------------------------------------------------

    async def commit(self, unit: Unit) -> list[Incident]:
        return await self._run(lambda: self._transaction(lambda db: _write(db, unit)))

    async def claim_outbox(self, now: float, lease_s: float, limit: int = 50) -> list[OutboxRow]:
        def claim(db: sqlite3.Connection) -> list[OutboxRow]:
            # a row waits while an earlier row of its incident key on its channel is not
            # finished: a resolve never overtakes its trigger, even across retries
            ids = [
                row_id
                for (row_id,) in db.execute(
                    "SELECT o.id FROM outbox o WHERE ((o.state = 'pending' AND o.next_at <= ?) "
                    "OR (o.state = 'sending' AND o.lease_until <= ?)) AND NOT EXISTS ("
                    "SELECT 1 FROM outbox e WHERE e.channel = o.channel "
                    "AND e.incident_key = o.incident_key AND e.id < o.id "
                    "AND e.state IN ('pending', 'sending')) ORDER BY o.id LIMIT ?",
                    (now, now, limit),
                )
            ]
            db.executemany(
                "UPDATE outbox SET state = 'sending', lease_until = ?, attempts = attempts + 1 "
                "WHERE id = ?",
                [(now + lease_s, row_id) for row_id in ids],
            )
            marks = ",".join("?" * len(ids))
            rows = db.execute(
                f"SELECT {_OUTBOX} FROM outbox WHERE id IN ({marks}) ORDER BY id", ids
            )
            return [_outbox(row) for row in rows]

        return await self._run(lambda: self._transaction(claim))

    async def outbox_sent(self, row: OutboxRow, now: float) -> bool:
        return await self._fenced(
            row, "state = 'sent', sent_at = ?, lease_until = NULL, last_error = NULL", (now,)
        )

    async def outbox_retry(self, row: OutboxRow, next_at: float, error: str) -> bool:
        return await self._fenced(
            row,
            "state = 'pending', next_at = ?, lease_until = NULL, last_error = ?",
            (next_at, error),
        )

    async def outbox_failed(self, row: OutboxRow, error: str) -> bool:
        return await self._fenced(
            row, "state = 'failed', lease_until = NULL, last_error = ?", (error,)
        )

    async def _fenced(self, row: OutboxRow, assignments: str, values: tuple[Any, ...]) -> bool:
        """Update a claimed row only if the claim still holds (its lease is the token)."""
        sql = (
            f"UPDATE outbox SET {assignments} WHERE id = ? AND state = 'sending' "
            "AND lease_until = ?"
        )

        def update(db: sqlite3.Connection) -> bool:
            return db.execute(sql, (*values, row.id, row.lease_until)).rowcount == 1

        return await self._run(lambda: self._transaction(update))

    async def next_outbox_due(self) -> float | None:
        def query() -> float | None:
            db = self._db
            assert db is not None
            # only rows first in line can be claimed; one waiting behind another is not due
            (due,) = db.execute(
                "SELECT MIN(CASE o.state WHEN 'pending' THEN o.next_at ELSE o.lease_until END) "
                "FROM outbox o WHERE o.state IN ('pending', 'sending') AND NOT EXISTS ("
                "SELECT 1 FROM outbox e WHERE e.channel = o.channel "
                "AND e.incident_key = o.incident_key AND e.id < o.id "
                "AND e.state IN ('pending', 'sending'))"
            ).fetchone()
            return None if due is None else float(due)

        return await self._run(query)

    async def prune(self, before: float) -> int:
        def prune(db: sqlite3.Connection) -> int:
            results = db.execute("DELETE FROM results WHERE received_at < ?", (before,)).rowcount
            samples = db.execute("DELETE FROM samples WHERE at < ?", (before,)).rowcount
            return int(results + samples)

        return await self._run(lambda: self._transaction(prune))

    async def instance_id(self) -> str:
        def query() -> str:
            db = self._db
            assert db is not None
            (value,) = db.execute("SELECT value FROM meta WHERE key = 'instance_id'").fetchone()
            return str(value)

        return await self._run(query)

    async def _update(self, sql: str, values: Iterable[Any]) -> None:
        await self._run(lambda: self._transaction(lambda db: db.execute(sql, tuple(values))))

    async def add_silence(
        self,
        *,
        target: str | None,
        region: str | None,
        starts_at: float,
        ends_at: float,
        created_by: str,
        reason: str,
        now: float,
    ) -> Silence:
        def add(db: sqlite3.Connection) -> Silence:
            cursor = db.execute(
                "INSERT INTO silences (target, region, starts_at, ends_at, created_by, reason, "
                "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (target, region, starts_at, ends_at, created_by, reason, now),
            )
            assert cursor.lastrowid is not None
            return Silence(
                cursor.lastrowid, target, region, starts_at, ends_at, created_by, reason, now
            )

        return await self._run(lambda: self._transaction(add))

    async def end_silence(self, silence_id: int, now: float) -> Silence | None:
        def end(db: sqlite3.Connection) -> Silence | None:
            # a window that has not begun ends empty, never before it starts
            db.execute(
                "UPDATE silences SET starts_at = MIN(starts_at, ?), ends_at = MIN(ends_at, ?) "
                "WHERE id = ?",
                (now, now, silence_id),
            )
            row = db.execute(
                f"SELECT {_SILENCE} FROM silences WHERE id = ?", (silence_id,)
            ).fetchone()
            return None if row is None else Silence(*row)

        return await self._run(lambda: self._transaction(end))

    async def silences(self, *, active_at: float | None = None) -> list[Silence]:
        def query() -> list[Silence]:
            db = self._db
            assert db is not None
            if active_at is None:
                rows = db.execute(f"SELECT {_SILENCE} FROM silences ORDER BY id DESC LIMIT 500")
            else:
                sql = f"SELECT {_SILENCE} FROM silences WHERE starts_at <= ? AND ends_at > ?"
                rows = db.execute(sql + " ORDER BY id", (active_at, active_at))
            return [Silence(*row) for row in rows]

        return await self._run(query)


_OUTBOX = (
    "id, incident_id, incident_key, channel, kind, data, created_at, snapshot, state, attempts, "
    "next_at, lease_until, sent_at, last_error"
)
_SILENCE = "id, target, region, starts_at, ends_at, created_by, reason, created_at"


def _chunks(items: list[T], size: int) -> Iterable[list[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _write(db: sqlite3.Connection, unit: Unit) -> list[Incident]:
    db.executemany(
        "INSERT INTO results (id, kind, probe, region, target, received_at, status, body) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (r.id, r.kind, r.probe, r.region, r.target, r.received_at, r.status, _dumps(r.body))
            for r in unit.results
        ],
    )
    db.executemany(
        "INSERT OR IGNORE INTO samples (call_id, probe, region, target, at, t_s, reliable, body) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (
                s.call_id,
                s.probe,
                s.region,
                s.target,
                s.at,
                s.t_s,
                int(s.reliable),
                _dumps(s.body),
            )
            for s in unit.samples
        ],
    )
    db.executemany(
        "INSERT INTO conditions (key, state) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET state = excluded.state",
        [(key, _dumps(state)) for key, state in unit.conditions.items() if state is not None],
    )
    db.executemany(
        "DELETE FROM conditions WHERE key = ?",
        [(key,) for key, state in unit.conditions.items() if state is None],
    )
    db.executemany(
        "INSERT INTO probes_seen (probe, region, at) VALUES (?, ?, ?) "
        "ON CONFLICT (probe) DO UPDATE SET region = excluded.region, at = excluded.at",
        [(probe, region, at) for probe, (region, at) in unit.probes_seen.items()],
    )
    written: list[Incident] = []
    inserted: dict[str, int] = {}
    for change in unit.changes:
        incident = change.incident
        if incident.id is None and incident.key in inserted:
            # opened earlier in this same transaction: later changes update that row
            incident = _replace_id(incident, inserted[incident.key])
        incident = _save_incident(db, incident)
        if change.incident.id is None:
            assert incident.id is not None
            inserted[incident.key] = incident.id
        written.append(incident)
        assert incident.id is not None
        db.executemany(
            "INSERT INTO events (incident_id, at, actor, kind, text, data) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [
                (incident.id, e.at, e.actor, e.kind, e.text, _dumps(dict(e.data)))
                for e in change.events
            ],
        )
        snapshot = _dumps(incident_json(incident))
        at = change.events[-1].at if change.events else unit.at
        db.executemany(
            "INSERT INTO outbox (incident_id, incident_key, channel, kind, data, created_at, "
            "snapshot, state, next_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
            [
                (
                    incident.id,
                    incident.key,
                    channel,
                    notice.kind,
                    _dumps(dict(notice.data)),
                    at,
                    snapshot,
                    at,
                )
                for notice in change.notices
                for channel in notice.channels
            ],
        )
    return written


def _dumps(document: Any) -> str:
    """Encode compact JSON text (stored as TEXT, so the CLI `sqlite3` shows it)."""
    return orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS).decode()


def _save_incident(db: sqlite3.Connection, incident: Incident) -> Incident:
    values = (
        incident.key,
        incident.rule,
        incident.scope.kind.value,
        incident.scope.target,
        incident.scope.region,
        incident.scope.name,
        incident.title,
        incident.severity.value,
        incident.state.value,
        incident.opened_at,
        incident.ack_due,
        incident.resolve_due,
        incident.acknowledged_at,
        incident.resolved_at,
        int(incident.ack_breached),
        int(incident.resolve_breached),
        incident.escalation_level,
        incident.next_escalation_at,
        incident.reopened,
        _dumps(dict(incident.details)),
        incident.reopened_at,
    )
    columns = (
        "key, rule, scope_kind, target, region, scope_name, title, severity, state, opened_at, "
        "ack_due, resolve_due, acknowledged_at, resolved_at, ack_breached, resolve_breached, "
        "escalation_level, next_escalation_at, reopened, details, reopened_at"
    )
    if incident.id is None:
        cursor = db.execute(
            f"INSERT INTO incidents ({columns}) VALUES ({', '.join('?' * len(values))})", values
        )
        assert cursor.lastrowid is not None
        return _replace_id(incident, cursor.lastrowid)
    assignments = ", ".join(f"{c.strip()} = ?" for c in columns.split(","))
    db.execute(f"UPDATE incidents SET {assignments} WHERE id = ?", (*values, incident.id))
    return incident


def _replace_id(incident: Incident, incident_id: int) -> Incident:
    return dataclasses.replace(incident, id=incident_id)


def _incident(row: Sequence[Any]) -> Incident:
    (
        incident_id,
        _key,
        rule,
        scope_kind,
        target,
        region,
        scope_name,
        title,
        severity,
        state,
        opened_at,
        ack_due,
        resolve_due,
        acknowledged_at,
        resolved_at,
        ack_breached,
        resolve_breached,
        escalation_level,
        next_escalation_at,
        reopened,
        details,
        reopened_at,
    ) = row
    return Incident(
        id=incident_id,
        rule=rule,
        scope=Scope(ScopeKind(scope_kind), target, region, scope_name),
        title=title,
        severity=Severity(severity),
        state=State(state),
        opened_at=opened_at,
        ack_due=ack_due,
        resolve_due=resolve_due,
        acknowledged_at=acknowledged_at,
        resolved_at=resolved_at,
        ack_breached=bool(ack_breached),
        resolve_breached=bool(resolve_breached),
        escalation_level=escalation_level,
        next_escalation_at=next_escalation_at,
        reopened=reopened,
        details=orjson.loads(details),
        reopened_at=reopened_at,
    )


def _result(row: Sequence[Any]) -> ResultRow:
    i, kind, probe, region, target, received_at, status, body = row
    return ResultRow(i, kind, probe, region, target, received_at, status, orjson.loads(body))


def _outbox(row: Sequence[Any]) -> OutboxRow:
    (
        i,
        incident_id,
        incident_key,
        channel,
        kind,
        data,
        created_at,
        snapshot,
        state,
        attempts,
        next_at,
        lease_until,
        sent_at,
        error,
    ) = row
    return OutboxRow(
        i,
        incident_id,
        incident_key,
        channel,
        kind,
        orjson.loads(data),
        created_at,
        orjson.loads(snapshot),
        state,
        attempts,
        next_at,
        lease_until,
        sent_at,
        error,
    )


def incident_json(incident: Incident) -> dict[str, Any]:
    """Return an incident as the API and the notifications show it."""
    return {
        "id": incident.id,
        "key": incident.key,
        "rule": incident.rule,
        "scope": {
            "kind": incident.scope.kind.value,
            "target": incident.scope.target,
            "region": incident.scope.region,
            "name": incident.scope.name,
            "description": incident.scope.describe(),
        },
        "title": incident.title,
        "severity": incident.severity.value,
        "state": incident.state.value,
        "opened_at": iso(incident.opened_at),
        "acknowledged_at": iso(incident.acknowledged_at),
        "resolved_at": iso(incident.resolved_at),
        "ack_due": iso(incident.ack_due),
        "resolve_due": iso(incident.resolve_due),
        "ack_breached": incident.ack_breached,
        "resolve_breached": incident.resolve_breached,
        "escalation_level": incident.escalation_level,
        "reopened": incident.reopened,
        "reopened_at": iso(incident.reopened_at),
        "details": dict(incident.details),
    }
