"""The SQLite file across versions: an older one is brought forward, a newer one refused."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from monitor import incidents
from monitor.incidents import Change, Policy, Scope, ScopeKind, Severity
from monitor.store import SCHEMA, SCHEMA_VERSION, SqliteStore, Unit

POLICY = Policy()
SCOPE = Scope(ScopeKind.TARGET_REGION, target="https://sfu.example/whip", region="eu-west")
# Schema 1 is today's schema without what schema 2 added: the incident's reopening time.
SCHEMA_1 = SCHEMA.replace(",\n    reopened_at REAL                 -- since schema 2", "")


def opened(now: float) -> Change:
    return incidents.open_incident(
        rule="video_jitter_high",
        scope=SCOPE,
        title="video_jitter_high: https://sfu.example/whip from eu-west",
        severity=Severity.IMPORTANT,
        details={"condition": "video.jitter_s > 0.03"},
        now=now,
        policy=POLICY,
        why="3 of the last 5",
    )


def version_of(path: Path) -> int:
    with sqlite3.connect(path) as db:
        (value,) = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return int(value)


def test_schema_1_is_what_the_fixture_says() -> None:
    assert SCHEMA_1 != SCHEMA, "the schema 2 column is no longer where this test expects it"
    assert SCHEMA_VERSION == 2


async def test_a_schema_1_database_is_brought_forward_and_keeps_its_incidents(
    tmp_path: Path,
) -> None:
    path = tmp_path / "monitor.sqlite3"
    # a database as callmon with schema 1 left it, holding one incident
    store = await SqliteStore(path).open()
    change = opened(now=100.0)
    (incident,) = await store.commit(Unit(at=100.0, changes=[change]))
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("ALTER TABLE incidents DROP COLUMN reopened_at")
        db.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    with sqlite3.connect(path) as db:
        columns = [row[1] for row in db.execute("PRAGMA table_info(incidents)")]
    assert "reopened_at" not in columns
    assert version_of(path) == 1

    store = await SqliteStore(path).open()
    try:
        assert incident.id is not None
        kept = await store.incident(incident.id)
        assert kept == incident
        assert kept.reopened_at is None
        # the new column is written and read back: a reopening restarts the ack clock
        recovered = incidents.recover(kept, now=200.0, policy=POLICY, why="cleared")
        (resolved,) = await store.commit(Unit(at=200.0, changes=[recovered]))
        again = incidents.breach(
            resolved,
            severity=Severity.IMPORTANT,
            details={},
            now=300.0,
            policy=POLICY,
            why="failing again",
        )
        assert again is not None
        await store.commit(Unit(at=300.0, changes=[again]))
        reopened = await store.incident(incident.id)
        assert reopened is not None
        assert (reopened.reopened, reopened.reopened_at) == (1, 300.0)
        assert reopened.ack_due == 300.0 + POLICY.tiers[Severity.IMPORTANT].ack_s
    finally:
        await store.close()
    assert version_of(path) == SCHEMA_VERSION


async def test_a_newer_database_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "monitor.sqlite3"
    store = await SqliteStore(path).open()
    await store.close()
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    with pytest.raises(RuntimeError, match=r"schema version 3, newer than this callmon's 2"):
        await SqliteStore(path).open()
    assert version_of(path) == SCHEMA_VERSION + 1


async def test_a_failed_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "monitor.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_1)
        db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
        # a column of that name already there: the migration's ALTER TABLE fails
        db.execute("ALTER TABLE incidents ADD COLUMN reopened_at TEXT")
    with pytest.raises(sqlite3.OperationalError, match="duplicate column"):
        await SqliteStore(path).open()
    assert version_of(path) == 1
