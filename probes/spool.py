"""Nothing an agent measured is lost: a durable spool, and a courier that empties it.

Every result and sample batch is written to a local SQLite file (synchronous=FULL)
before anything is sent. The courier sends the oldest entries in batches to the monitor
and deletes them only once the monitor answered 200 (its "on disk"). While the monitor
is unreachable entries wait, and they replay in order, with their ids, when it returns,
also after an agent restart; the monitor stores an id once, so a resend doubles nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

log = logging.getLogger("callmon.agent")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    body TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS dead (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    error TEXT NOT NULL
);
"""


class Spool:
    """Documents waiting for the monitor, oldest first, on disk."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="spool")
        self._db: sqlite3.Connection | None = None
        self.added = asyncio.Event()
        "Set when something was put; the courier clears it."

    async def open(self) -> Spool:
        def open_db() -> None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.executescript(SCHEMA)
            self._db = db

        await self._run(open_db)
        return self

    async def close(self) -> None:
        def close_db() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None

        await self._run(close_db)
        self._executor.shutdown(wait=True)

    async def _run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def _conn(self) -> sqlite3.Connection:
        assert self._db is not None, "spool not open"
        return self._db

    async def put(self, document: Mapping[str, Any]) -> None:
        """Keep a document until the monitor has it (on disk when this returns)."""
        body = json.dumps(document, separators=(",", ":"))

        def insert() -> None:
            self._conn().execute(
                "INSERT INTO spool (id, body) VALUES (?, ?)", (str(document["id"]), body)
            )

        await self._run(insert)
        self.added.set()

    async def oldest(self, limit: int) -> list[tuple[int, str]]:
        """Return (seq, JSON body) of the oldest entries."""

        def select() -> list[tuple[int, str]]:
            rows = self._conn().execute(
                "SELECT seq, body FROM spool ORDER BY seq LIMIT ?", (limit,)
            )
            return [(seq, body) for seq, body in rows]

        return await self._run(select)

    async def remove(self, seqs: list[int]) -> None:
        def delete() -> None:
            self._conn().executemany("DELETE FROM spool WHERE seq = ?", [(s,) for s in seqs])

        await self._run(delete)

    async def bury(self, seq: int, error: str) -> None:
        """Move an entry the monitor refuses for good aside, with why (never silently)."""

        def move() -> None:
            db = self._conn()
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT INTO dead (seq, id, body, error) SELECT seq, id, body, ? FROM spool "
                "WHERE seq = ?",
                (error, seq),
            )
            db.execute("DELETE FROM spool WHERE seq = ?", (seq,))
            db.execute("COMMIT")

        await self._run(move)

    async def depth(self) -> tuple[int, int]:
        """Return (entries waiting, entries refused for good)."""

        def count() -> tuple[int, int]:
            db = self._conn()
            (waiting,) = db.execute("SELECT COUNT(*) FROM spool").fetchone()
            (dead,) = db.execute("SELECT COUNT(*) FROM dead").fetchone()
            return int(waiting), int(dead)

        return await self._run(count)


@dataclass
class CourierStats:
    delivered: int = 0
    failures: int = 0
    refused: int = 0
    last_delivery: float | None = None
    last_error: str | None = None


_ITEM = re.compile(r"^\[(\d+)\]")


class Courier:
    """Sends the spool to the monitor in order, in batches, with backoff."""

    def __init__(
        self,
        spool: Spool,
        http: aiohttp.ClientSession,
        url: str,
        token: str,
        *,
        batch: int = 100,
        backoff_initial_s: float = 0.5,
        backoff_max_s: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.http = http
        self.url = url.rstrip("/") + "/api/v1/results"
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self.batch = batch
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.stats = CourierStats()
        self._backoff = 0.0

    async def run(self) -> None:
        while True:
            sent = await self.send_once()
            if sent:
                continue
            if self._backoff:
                await asyncio.sleep(self._backoff)
                continue
            self.spool.added.clear()
            if not (await self.spool.oldest(1)):
                await self.spool.added.wait()

    async def send_once(self) -> int:
        """Send the oldest batch; return how many entries left the spool."""
        entries = await self.spool.oldest(self.batch)
        if not entries:
            return 0
        body = "[" + ",".join(text for _, text in entries) + "]"
        try:
            async with self.http.post(self.url, data=body, headers=self.headers) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._failed(f"monitor unreachable: {exc.__class__.__name__}: {exc}")
            return 0
        if status == 200:
            await self.spool.remove([seq for seq, _ in entries])
            self.stats.delivered += len(entries)
            self.stats.last_delivery = self.clock()
            self._backoff = 0.0
            return len(entries)
        if status == 413 and len(entries) > 1:
            self.batch = max(1, len(entries) // 2)  # the monitor's limit: smaller batches
            return 0
        if status == 400:
            return await self._refused(entries, text)
        # 401/403: a token problem an operator must fix; 5xx: the monitor's trouble.
        # Either way the entries wait, with backoff, and health says why.
        self._failed(f"monitor answered {status}: {text.strip()[:200]}")
        return 0

    async def _refused(self, entries: list[tuple[int, str]], text: str) -> int:
        """Set aside the one entry the monitor says is malformed; keep the rest."""
        try:
            field = str(json.loads(text).get("field", ""))
        except (ValueError, AttributeError):
            field = ""
        match = _ITEM.match(field)
        index = int(match.group(1)) if match else 0
        seq = entries[min(index, len(entries) - 1)][0]
        error = f"refused by the monitor: {text.strip()[:300]}"
        log.error("spool entry %d %s", seq, error)
        await self.spool.bury(seq, error)
        self.stats.refused += 1
        return 1

    def _failed(self, error: str) -> None:
        self.stats.failures += 1
        self.stats.last_error = error
        self._backoff = min(self.backoff_max_s, max(self.backoff_initial_s, self._backoff * 2))
        log.warning("%s; retrying in %.1f s", error, self._backoff)
