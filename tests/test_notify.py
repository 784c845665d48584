"""Notification delivery, told as stories against a real store file and real receivers.

Incidents come from the real engine and are committed through the real SQLite store; the
receivers are aiohttp servers on 127.0.0.1 that answer from a script (500, 429, a hang...).
Time is a fake clock passed to the deliverer, so backoffs are crossed without sleeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from monitor import incidents
from monitor.config import Channel, Delivery
from monitor.incidents import Escalation, Incident, Policy, Scope, ScopeKind, Severity, State
from monitor.metrics import Metrics
from monitor.notify import (
    PD_SUMMARY_MAX,
    Deliverer,
    pagerduty_body,
    pagerduty_dedup_key,
    slack_body,
    webhook_body,
)
from monitor.store import OutboxRow, SqliteStore, Unit, incident_json

T0 = 1000.0
RULE = "video_jitter_high"
TARGET = "sfu.example.net"
REGION = "eu-west"
TITLE = f"{RULE}: {TARGET} from {REGION}"
KEY = f"{RULE}|target_region:{TARGET}:{REGION}:"
PUBLIC_URL = "https://callmon.example/"
ROUTING_KEY = "R0UTINGKEY0123456789abcdef012345"
DETAILS: dict[str, Any] = {
    "rule": RULE,
    "description": "Video jitter above what conferencing tolerates",
    "condition": "video.jitter_s > 0.03",
    "threshold": 0.03,
    "window": {"k": 3, "n": 5},
    "scope": f"{TARGET} from {REGION}",
    "conditions": [
        {
            "target": TARGET,
            "region": REGION,
            "value": 0.052,
            "severity": "urgent",
            "since": 940.0,
            "breaches": 4,
            "evaluations": 5,
            "evidence": "result-41",
        }
    ],
}
DELIVERY = Delivery(max_attempts=5, backoff_initial_s=1.0, backoff_max_s=60.0, timeout_s=2.0)


# --- receivers -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    status: int = 200
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str = ""
    hang: bool = False
    "Never answer (until the receiver closes): the sender must time out."
    then: Callable[[], Awaitable[None]] | None = None
    "Run before answering: what happens while the request is in flight."


@dataclass(frozen=True)
class Received:
    headers: Mapping[str, str]
    body: Any
    status: int
    "What the receiver answered."


class Receiver:
    """A local HTTP endpoint that answers from a script, then with its default answer."""

    def __init__(self, answers: Sequence[Answer], default: Answer, closing: asyncio.Event):
        self.answers = list(answers)
        self.default = default
        self.closing = closing
        self.received: list[Received] = []
        self.url = ""
        self.host = ""
        "host:port, as errors name it."

    async def handle(self, request: web.Request) -> web.Response:
        answer = self.answers.pop(0) if self.answers else self.default
        self.received.append(Received(dict(request.headers), await request.json(), answer.status))
        if answer.hang:
            await self.closing.wait()
        if answer.then is not None:
            await answer.then()
        return web.Response(status=answer.status, headers=answer.headers, text=answer.body)

    @property
    def bodies(self) -> list[Any]:
        return [r.body for r in self.received]

    @property
    def delivered(self) -> list[Any]:
        """Return the bodies the receiver accepted (answered 2xx)."""
        return [r.body for r in self.received if 200 <= r.status < 300]

    @property
    def keys(self) -> list[str]:
        return [r.headers["Idempotency-Key"] for r in self.received]


class Receivers:
    def __init__(self) -> None:
        self._runners: list[web.AppRunner] = []
        self._closing = asyncio.Event()

    async def start(self, *answers: Answer, ok: int = 200, ok_body: str = "ok") -> Receiver:
        receiver = Receiver(answers, Answer(ok, body=ok_body), self._closing)
        app = web.Application()
        app.router.add_post("/hook/{secret}", receiver.handle)
        runner = web.AppRunner(app)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        receiver.host = f"127.0.0.1:{runner.addresses[0][1]}"
        receiver.url = f"http://{receiver.host}/hook/s3cr3t"
        return receiver

    async def close(self) -> None:
        self._closing.set()
        for runner in self._runners:
            await runner.cleanup()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SlowClaims(SqliteStore):
    """A store whose claims come back late (a busy database), and that counts them."""

    def __init__(self, path: Path, clock: Clock, *delays: float) -> None:
        super().__init__(path)
        self.clock = clock
        self.delays = list(delays)
        self.claims = 0

    async def claim_outbox(self, now: float, lease_s: float, limit: int = 50) -> list[OutboxRow]:
        rows = await super().claim_outbox(now, lease_s, limit)
        self.claims += 1
        self.clock.advance(self.delays.pop(0) if self.delays else 0.0)
        return rows


# --- fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
async def receivers() -> AsyncIterator[Receivers]:
    pool = Receivers()
    yield pool
    await pool.close()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore(tmp_path / "m.sqlite3").open()
    yield opened
    await opened.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(CollectorRegistry())


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


def policy(*channels: str, escalation: Escalation | None = None) -> Policy:
    return Policy(notify=dict.fromkeys(Severity, channels), escalation=escalation or Escalation())


async def commit(store: SqliteStore, change: incidents.Change, now: float) -> Incident:
    [incident] = await store.commit(Unit(at=now, changes=[change]))
    return incident


async def open_incident(
    store: SqliteStore, *channels: str, now: float = T0, target: str = TARGET
) -> Incident:
    change = incidents.open_incident(
        rule=RULE,
        scope=Scope(ScopeKind.TARGET_REGION, target=target, region=REGION),
        title=f"{RULE}: {target} from {REGION}",
        severity=Severity.URGENT,
        details=DETAILS,
        now=now,
        policy=policy(*channels),
        why="video.jitter_s > 0.03 in 4 of the last 5 calls",
    )
    return await commit(store, change, now)


async def acknowledge(
    store: SqliteStore, incident: Incident, *channels: str, now: float
) -> Incident:
    change = incidents.acknowledge(incident, actor="alice", now=now, policy=policy(*channels))
    return await commit(store, change, now)


async def resolve(store: SqliteStore, incident: Incident, *channels: str, now: float) -> Incident:
    change = incidents.resolve(
        incident, actor="alice", now=now, policy=policy(*channels), reason="SFU restarted"
    )
    return await commit(store, change, now)


def make_deliverer(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Callable[[], float],
    *channels: Channel,
    delivery: Delivery = DELIVERY,
    public_url: str = "",
) -> Deliverer:
    return Deliverer(
        store, {c.name: c for c in channels}, delivery, metrics, session, clock, public_url
    )


async def outbox(store: SqliteStore, incident: Incident) -> list[OutboxRow]:
    assert incident.id is not None
    return await store.outbox_for(incident.id)


async def key_of(store: SqliteStore, row: OutboxRow) -> str:
    return f"callmon-{await store.instance_id()}-{row.id}"


def count(metrics: Metrics, channel: str, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "callmon_notifications_total", {"channel": channel, "outcome": outcome}
    )
    return value or 0.0


def block_text(message: Mapping[str, Any]) -> str:
    """Return every text a Slack message shows, blocks included, as one string."""
    return json.dumps(message, ensure_ascii=False)


def mrkdwn_texts(node: Any) -> list[str]:
    """Return the texts of every mrkdwn element under `node`."""
    if isinstance(node, list):
        return [t for item in node for t in mrkdwn_texts(item)]
    if not isinstance(node, dict):
        return []
    own = [node["text"]] if node.get("type") == "mrkdwn" else []
    return own + [t for value in node.values() for t in mrkdwn_texts(value)]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# --- 1. every channel gets its own document ------------------------------------------------


async def test_it_sends_each_channel_its_document_through_an_incidents_life(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start()
    slack = await receivers.start()
    pd = await receivers.start(ok=202, ok_body='{"status":"success"}')
    deliverer = make_deliverer(
        store,
        metrics,
        session,
        clock,
        Channel("hook", "webhook", hook.url),
        Channel("slack", "slack", slack.url),
        Channel("pd", "pagerduty", pd.url, ROUTING_KEY),
        public_url=PUBLIC_URL,
    )
    incident = await open_incident(store, "hook", "slack", "pd")
    url = f"https://callmon.example/incidents/{incident.id}"

    # opened: one pass sends the three rows
    assert await deliverer.deliver_due(T0) == 3
    rows = {r.channel: r for r in await outbox(store, incident)}
    assert [(r.state, r.attempts, r.sent_at, r.last_error) for r in rows.values()] == [
        ("sent", 1, T0, None)
    ] * 3
    for receiver, channel in ((hook, "hook"), (slack, "slack"), (pd, "pd")):
        assert receiver.keys == [await key_of(store, rows[channel])]
    assert hook.received[0].headers["Content-Type"] == "application/json"

    assert hook.bodies == [
        {
            "version": "callmon.notification/v1",
            "delivery_id": rows["hook"].id,
            "delivery_key": await key_of(store, rows["hook"]),
            "event": "trigger",
            "data": {},
            "at": "1970-01-01T00:16:40.000Z",
            "incident": rows["hook"].snapshot,
            "url": url,
        }
    ]
    snapshot = hook.bodies[0]["incident"]
    assert (snapshot["key"], snapshot["severity"], snapshot["state"]) == (
        incident.key,
        "urgent",
        "triggered",
    )

    [message] = slack.bodies
    assert message["text"] == f"Incident opened: {TITLE} [urgent, triggered]"
    shown = block_text(message)
    for fragment in (
        "*Severity*\\nurgent",
        "*State*\\ntriggered",
        f"*Scope*\\n{TARGET} from {REGION}",
        "`video.jitter_s &gt; 0.03`",  # Slack shows &gt; as >
        f"{TARGET} from {REGION}: *0.052* (4 of 5 evaluations)",
        "Acknowledge by <!date^1900^",  # urgent: 15 min to acknowledge
        "Resolve by <!date^15400^",  # and 4 h to resolve
        url,
    ):
        assert fragment in shown, fragment

    assert pd.bodies == [
        {
            "routing_key": ROUTING_KEY,
            "event_action": "trigger",
            "dedup_key": incident.key,
            "payload": {
                "summary": TITLE,
                "source": TARGET,
                "severity": "critical",
                "timestamp": "1970-01-01T00:16:40.000Z",
                "component": TARGET,
                "group": REGION,
                "class": RULE,
                "custom_details": DETAILS,
            },
            "client": "callmon",
            "client_url": url,
            "links": [{"href": url, "text": f"callmon incident #{incident.id}"}],
        }
    ]
    assert [count(metrics, c, "sent") for c in ("hook", "slack", "pd")] == [1, 1, 1]

    # nothing is due any more: a second pass sends nothing
    assert await deliverer.deliver_due(T0 + 5) == 0
    assert [len(r.received) for r in (hook, slack, pd)] == [1, 1, 1]

    # acknowledged, then resolved: PagerDuty follows the same alert by its dedup_key
    incident = await acknowledge(store, incident, "hook", "slack", "pd", now=T0 + 100)
    assert await deliverer.deliver_due(T0 + 100) == 3
    incident = await resolve(store, incident, "hook", "slack", "pd", now=T0 + 200)
    assert await deliverer.deliver_due(T0 + 200) == 3

    assert [b["event"] for b in hook.bodies] == ["trigger", "acknowledge", "resolve"]
    assert hook.bodies[2]["incident"]["state"] == "resolved"
    assert [b["text"].split(":")[0] for b in slack.bodies] == [
        "Incident opened",
        "Acknowledged",
        "Resolved",
    ]
    assert "Acknowledged <!date^1100^" in block_text(slack.bodies[1])
    assert pd.bodies[1:] == [
        {"routing_key": ROUTING_KEY, "event_action": action, "dedup_key": incident.key}
        for action in ("acknowledge", "resolve")
    ]
    assert {r.state for r in await outbox(store, incident)} == {"sent"}
    assert [count(metrics, c, "sent") for c in ("hook", "slack", "pd")] == [3, 3, 3]
    assert count(metrics, "hook", "retry") == count(metrics, "hook", "failed") == 0


async def test_breaches_and_escalations_say_which_deadline_and_which_level(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook, slack, pd, oncall = [await receivers.start(ok=202) for _ in range(4)]
    deliverer = make_deliverer(
        store,
        metrics,
        session,
        clock,
        Channel("hook", "webhook", hook.url),
        Channel("slack", "slack", slack.url),
        Channel("pd", "pagerduty", pd.url, ROUTING_KEY),
        Channel("oncall", "slack", oncall.url),
    )
    chain = policy(
        "hook", "slack", "pd", escalation=Escalation(levels=(("oncall",),), max_escalations=1)
    )
    incident = await open_incident(store, "hook", "slack", "pd")
    # nobody acknowledges in 15 min, nobody resolves in 4 h
    for now in (T0 + 900, T0 + 4 * 3600):
        change = incidents.tick(incident, now=now, policy=chain)
        assert change is not None
        incident = await commit(store, change, now)
    while await deliverer.deliver_due(T0 + 4 * 3600):
        pass

    assert [(b["event"], b["data"]) for b in hook.bodies] == [
        ("trigger", {}),
        ("breach", {"kind": "ack"}),
        ("breach", {"kind": "resolve"}),
    ]
    headlines = [
        "Acknowledgement deadline missed",
        "Resolution deadline missed",
    ]
    assert [b["text"] for b in slack.bodies[1:]] == [
        f"{headline}: {TITLE} [urgent, triggered]" for headline in headlines
    ]
    assert [b["payload"]["summary"] for b in pd.bodies] == [
        TITLE,
        *(f"{headline}: {TITLE}" for headline in headlines),
    ]
    assert [b["text"] for b in oncall.bodies] == [
        f"Escalated to level 1: {TITLE} [urgent, triggered]"
    ]


# --- 2. transient errors back off exponentially --------------------------------------------


async def test_it_retries_a_failing_receiver_with_exponential_backoff(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start(Answer(500, body="upstream down"), Answer(500))
    deliverer = make_deliverer(store, metrics, session, clock, Channel("hook", "webhook", hook.url))
    incident = await open_incident(store, "hook")

    # attempt 1 fails: the next one is due 1 s later
    assert await deliverer.deliver_due(T0) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.attempts, row.next_at) == ("pending", 1, T0 + 1)
    assert row.last_error is not None
    assert row.last_error == f"HTTP 500 from {hook.host}: upstream down"
    assert "s3cr3t" not in row.last_error  # the URL's secret path stays out of errors
    assert count(metrics, "hook", "retry") == 1

    # before that, a pass has nothing to send
    assert await deliverer.deliver_due(T0 + 0.5) == 0
    assert len(hook.received) == 1

    # attempt 2 fails: the wait doubles
    assert await deliverer.deliver_due(T0 + 1) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.attempts, row.next_at) == ("pending", 2, T0 + 3)
    assert await deliverer.deliver_due(T0 + 2.9) == 0

    # attempt 3 succeeds
    assert await deliverer.deliver_due(T0 + 3) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.attempts, row.sent_at, row.last_error) == ("sent", 3, T0 + 3, None)
    assert [r.status for r in hook.received] == [500, 500, 200]
    assert len(hook.delivered) == 1
    # every attempt carries the row's one key
    assert set(hook.keys) == {await key_of(store, row)}
    assert (count(metrics, "hook", "retry"), count(metrics, "hook", "sent")) == (2, 1)

    assert await deliverer.deliver_due(T0 + 1000) == 0
    assert len(hook.received) == 3


async def test_it_caps_the_backoff(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start(ok=502)
    delivery = Delivery(max_attempts=10, backoff_initial_s=1.0, backoff_max_s=5.0, timeout_s=2.0)
    deliverer = make_deliverer(
        store, metrics, session, clock, Channel("hook", "webhook", hook.url), delivery=delivery
    )
    incident = await open_incident(store, "hook")

    waits = []
    now = T0
    for _ in range(5):
        assert await deliverer.deliver_due(now) == 1
        [row] = await outbox(store, incident)
        waits.append(row.next_at - now)
        now = row.next_at
    assert waits == [1, 2, 4, 5, 5]


# --- 3. permanent errors and Retry-After ---------------------------------------------------


async def test_it_fails_a_rejected_notification_at_once(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    slack = await receivers.start(Answer(400, body="invalid_payload"))
    deliverer = make_deliverer(store, metrics, session, clock, Channel("slack", "slack", slack.url))
    incident = await open_incident(store, "slack")

    assert await deliverer.deliver_due(T0) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.attempts, row.sent_at) == ("failed", 1, None)
    assert row.last_error == f"HTTP 400 from {slack.host}: invalid_payload"
    assert (count(metrics, "slack", "failed"), count(metrics, "slack", "retry")) == (1, 0)

    # never tried again
    assert await deliverer.deliver_due(T0 + 3600) == 0
    assert len(slack.received) == 1


@pytest.mark.parametrize("status", [429, 503])
async def test_it_waits_as_long_as_retry_after_asks(
    status: int,
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    slack = await receivers.start(
        Answer(status, headers={"Retry-After": "30"}, body="rate_limited")
    )
    deliverer = make_deliverer(store, metrics, session, clock, Channel("slack", "slack", slack.url))
    incident = await open_incident(store, "slack")

    assert await deliverer.deliver_due(T0) == 1
    [row] = await outbox(store, incident)
    # the receiver's 30 s, not the 1 s backoff
    assert (row.state, row.attempts, row.next_at) == ("pending", 1, T0 + 30)
    assert await deliverer.deliver_due(T0 + 29.9) == 0
    assert len(slack.received) == 1

    assert await deliverer.deliver_due(T0 + 30) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.attempts) == ("sent", 2)
    assert len(slack.delivered) == 1


async def test_it_keeps_the_backoff_when_retry_after_is_shorter(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start(Answer(500), Answer(429, headers={"Retry-After": "0"}))
    deliverer = make_deliverer(store, metrics, session, clock, Channel("hook", "webhook", hook.url))
    incident = await open_incident(store, "hook")

    await deliverer.deliver_due(T0)
    await deliverer.deliver_due(T0 + 1)
    [row] = await outbox(store, incident)
    assert (row.attempts, row.next_at) == (2, T0 + 1 + 2)


# --- 4. giving up -------------------------------------------------------------------------


async def test_it_gives_up_after_max_attempts_and_keeps_the_last_error(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start(Answer(503, body="starting"), Answer(500), ok=500, ok_body="boom")
    delivery = Delivery(max_attempts=3, backoff_initial_s=1.0, backoff_max_s=60.0, timeout_s=2.0)
    deliverer = make_deliverer(
        store, metrics, session, clock, Channel("hook", "webhook", hook.url), delivery=delivery
    )
    incident = await open_incident(store, "hook")

    for now, attempts in ((T0, 1), (T0 + 1, 2)):
        assert await deliverer.deliver_due(now) == 1
        [row] = await outbox(store, incident)
        assert (row.state, row.attempts) == ("pending", attempts)

    assert await deliverer.deliver_due(T0 + 3) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.attempts) == ("failed", 3)
    assert row.last_error == f"gave up after 3 attempts: HTTP 500 from {hook.host}: boom"
    assert (count(metrics, "hook", "retry"), count(metrics, "hook", "failed")) == (2, 1)

    assert await deliverer.deliver_due(T0 + 3600) == 0
    assert len(hook.received) == 3


async def test_it_fails_a_row_whose_channel_is_gone(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start()
    deliverer = make_deliverer(store, metrics, session, clock, Channel("hook", "webhook", hook.url))
    # queued while "old-pager" was configured; the configuration no longer has it
    incident = await open_incident(store, "hook", "old-pager")

    assert await deliverer.deliver_due(T0) == 2
    rows = {r.channel: r for r in await outbox(store, incident)}
    assert (rows["hook"].state, rows["old-pager"].state) == ("sent", "failed")
    assert rows["old-pager"].last_error == "channel 'old-pager' is no longer configured"
    assert count(metrics, "old-pager", "failed") == 1


async def test_it_fails_a_pagerduty_channel_without_routing_key(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    pd = await receivers.start(ok=202)
    deliverer = make_deliverer(store, metrics, session, clock, Channel("pd", "pagerduty", pd.url))
    incident = await open_incident(store, "pd")

    await deliverer.deliver_due(T0)
    [row] = await outbox(store, incident)
    assert (row.state, row.last_error) == ("failed", "channel 'pd' has no PagerDuty routing_key")
    assert pd.received == []


# --- 5. crashes and lapsed claims ---------------------------------------------------------


async def test_a_crashed_senders_rows_are_taken_over_once_after_the_lease(
    tmp_path: Path,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start()
    slack = await receivers.start()
    channels = (Channel("hook", "webhook", hook.url), Channel("slack", "slack", slack.url))
    path = tmp_path / "m.sqlite3"

    # a first process queues the rows, claims them, and dies before sending
    first = await SqliteStore(path).open()
    incident = await open_incident(first, "hook", "slack")
    lease_s = make_deliverer(first, metrics, session, clock, *channels).lease_s
    assert len(await first.claim_outbox(T0, lease_s, 20)) == 2
    await first.close()

    # two processes start: the rows are held until the dead one's lease ends, then each
    # row goes to exactly one of them
    stores = [await SqliteStore(path).open() for _ in range(2)]
    try:
        deliverers = [make_deliverer(s, metrics, session, clock, *channels) for s in stores]
        assert await deliverers[0].deliver_due(T0 + lease_s - 0.1) == 0
        assert hook.received == slack.received == []

        claimed = await asyncio.gather(*(d.deliver_due(T0 + lease_s) for d in deliverers))
        assert sum(claimed) == 2
        assert (len(hook.received), len(slack.received)) == (1, 1)
        rows = await outbox(stores[0], incident)
        # the claim that died counts as an attempt
        assert [(r.state, r.attempts) for r in rows] == [("sent", 2)] * 2
        for deliverer in deliverers:
            assert await deliverer.deliver_due(T0 + 10 * lease_s) == 0
    finally:
        for opened in stores:
            await opened.close()
    assert (len(hook.received), len(slack.received)) == (1, 1)
    assert count(metrics, "hook", "sent") == count(metrics, "slack", "sent") == 1


@pytest.mark.parametrize(("status", "outcome"), [(200, "sent"), (500, "retry"), (400, "failed")])
async def test_a_deliverer_whose_claim_lapsed_records_nothing(
    status: int,
    outcome: str,
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    async def take_over() -> None:
        # the first request is so slow that its claim lapses and another deliverer
        # (another process) takes the row over and delivers it
        assert await other.deliver_due(T0 + slow.lease_s) == 1

    hook = await receivers.start(Answer(status, then=take_over))
    channel = Channel("hook", "webhook", hook.url)
    slow = make_deliverer(store, metrics, session, clock, channel)
    other_metrics = Metrics(CollectorRegistry())
    other = make_deliverer(store, other_metrics, session, clock, channel)
    incident = await open_incident(store, "hook")

    # the slow deliverer's late answer changes nothing: the row stays as the other left it
    assert await slow.deliver_due(T0) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.attempts, row.sent_at, row.last_error) == (
        "sent",
        2,
        T0 + slow.lease_s,
        None,
    )
    assert count(metrics, "hook", outcome) == 0
    assert count(other_metrics, "hook", "sent") == 1
    # one duplicate, which the receiver can drop by its key; and nothing sent again
    assert [r.status for r in hook.received] == [status, 200]
    assert hook.keys == [await key_of(store, row)] * 2
    assert await slow.deliver_due(T0 + 100) == await other.deliver_due(T0 + 100) == 0
    assert len(hook.received) == 2


async def test_it_sends_nothing_it_could_not_finish_inside_its_lease(
    tmp_path: Path,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start(Answer(hang=True))
    # the first claim comes back a whole timeout late, the third 1.8 s late
    store = await SlowClaims(tmp_path / "m.sqlite3", clock, DELIVERY.timeout_s, 0, 1.8).open()
    try:
        deliverer = make_deliverer(
            store, metrics, session, clock, Channel("hook", "webhook", hook.url)
        )
        incident = await open_incident(store, "hook")

        # an answer could come after the lease ends: the row is left to lapse
        assert await asyncio.wait_for(deliverer.deliver_due(T0), 5) == 1
        [row] = await outbox(store, incident)
        assert (row.state, row.attempts) == ("sending", 1)
        assert hook.received == []
        assert await deliverer.deliver_due(T0 + deliverer.lease_s - 0.1) == 0

        # taken again; what is left of the lease bounds the wait for an answer
        assert await deliverer.deliver_due(T0 + deliverer.lease_s) == 1
        [row] = await outbox(store, incident)
        assert (row.state, row.attempts) == ("pending", 2)
        assert row.last_error == f"no answer from {hook.host} within 0.2 s"
        assert len(hook.received) == 1
        assert count(metrics, "hook", "retry") == 1
    finally:
        await store.close()


# --- 6. order -----------------------------------------------------------------------------


async def test_it_keeps_each_incidents_notices_in_order_on_a_channel(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    pd = await receivers.start(ok=202)
    deliverer = make_deliverer(
        store, metrics, session, clock, Channel("pd", "pagerduty", pd.url, ROUTING_KEY)
    )

    # two incidents, each opened and resolved before the pass: the triggers go side by
    # side, and each resolve becomes claimable once its trigger is sent
    for target in ("a", "b"):
        incident = await open_incident(store, "pd", target=target)
        await resolve(store, incident, "pd", now=T0)
    assert await deliverer.deliver_due(T0) == 2
    assert [b["event_action"] for b in pd.bodies] == ["trigger", "trigger"]
    assert await deliverer.deliver_due(T0) == 2
    assert await deliverer.deliver_due(T0) == 0

    for target in ("a", "b"):
        key = f"{RULE}|target_region:{target}:{REGION}:"
        actions = [b["event_action"] for b in pd.delivered if b["dedup_key"] == key]
        assert actions == ["trigger", "resolve"], target


async def test_it_holds_a_resolve_while_its_trigger_waits_for_a_retry(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    pd = await receivers.start(Answer(500), Answer(500), ok=202)
    deliverer = make_deliverer(
        store, metrics, session, clock, Channel("pd", "pagerduty", pd.url, ROUTING_KEY)
    )

    # both queued before the pass: the trigger fails, so the resolve must not go
    incident = await open_incident(store, "pd")
    await resolve(store, incident, "pd", now=T0)
    assert await deliverer.deliver_due(T0) == 1
    assert await deliverer.deliver_due(T0 + 0.5) == 0
    trigger, resolved = await outbox(store, incident)
    assert (trigger.state, trigger.next_at) == ("pending", T0 + 1)
    assert (resolved.state, resolved.attempts) == ("pending", 0)

    # the trigger fails again: the resolve stays behind it
    assert await deliverer.deliver_due(T0 + 1) == 1
    assert await deliverer.deliver_due(T0 + 2) == 0
    assert [b["event_action"] for b in pd.bodies] == ["trigger", "trigger"]

    assert await deliverer.deliver_due(T0 + 3) == 1
    assert await deliverer.deliver_due(T0 + 3) == 1
    assert [b["event_action"] for b in pd.delivered] == ["trigger", "resolve"]
    trigger, resolved = await outbox(store, incident)
    assert [(r.state, r.attempts) for r in (trigger, resolved)] == [("sent", 3), ("sent", 1)]
    assert (count(metrics, "pd", "retry"), count(metrics, "pd", "sent")) == (2, 2)


async def test_it_holds_a_later_notice_queued_while_an_earlier_one_backs_off(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start(Answer(500))
    other = await receivers.start()
    deliverer = make_deliverer(
        store,
        metrics,
        session,
        clock,
        Channel("hook", "webhook", hook.url),
        Channel("other", "webhook", other.url),
    )
    incident = await open_incident(store, "hook")
    await deliverer.deliver_due(T0)  # the trigger fails once: due again at T0 + 1

    # the resolve is queued (due at once) while the trigger waits; other channels are free
    await resolve(store, incident, "hook", "other", now=T0 + 0.5)
    assert await deliverer.deliver_due(T0 + 0.5) == 1
    assert [b["event"] for b in other.delivered] == ["resolve"]
    assert len(hook.received) == 1

    assert await deliverer.deliver_due(T0 + 1) == 1
    assert await deliverer.deliver_due(T0 + 1) == 1
    assert [b["event"] for b in hook.delivered] == ["trigger", "resolve"]


async def test_a_new_incident_of_a_condition_never_overtakes_the_last_ones_resolve(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    # PagerDuty dedups on the incident key, which both incidents share: a late resolve of
    # the first one would close the second one's alert
    pd = await receivers.start(Answer(202), Answer(500), ok=202)
    deliverer = make_deliverer(
        store, metrics, session, clock, Channel("pd", "pagerduty", pd.url, ROUTING_KEY)
    )
    first = await open_incident(store, "pd")
    first = await resolve(store, first, "pd", now=T0 + 60)
    # past the reopen window: a new incident, same key
    second = await open_incident(store, "pd", now=T0 + 7200)
    assert second.id != first.id
    assert second.key == first.key

    # the first resolve fails: the second trigger waits behind it
    now = T0 + 7200
    assert [await deliverer.deliver_due(now) for _ in range(3)] == [1, 1, 0]
    assert [b["event_action"] for b in pd.bodies] == ["trigger", "resolve"]
    [trigger] = await outbox(store, second)
    assert (trigger.state, trigger.attempts) == ("pending", 0)

    assert [await deliverer.deliver_due(now + 1) for _ in range(3)] == [1, 1, 0]
    assert [b["event_action"] for b in pd.delivered] == ["trigger", "resolve", "trigger"]
    assert [b["dedup_key"] for b in pd.delivered] == [KEY] * 3


# --- 7. transport failures ----------------------------------------------------------------


async def test_it_retries_when_the_receiver_is_unreachable(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
) -> None:
    port = closed_port()
    url = f"http://127.0.0.1:{port}/hook/s3cr3t"
    deliverer = make_deliverer(store, metrics, session, clock, Channel("hook", "webhook", url))
    incident = await open_incident(store, "hook")

    assert await deliverer.deliver_due(T0) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.attempts, row.next_at) == ("pending", 1, T0 + 1)
    assert row.last_error is not None
    assert row.last_error.startswith(f"cannot connect to 127.0.0.1:{port}")
    assert count(metrics, "hook", "retry") == 1


async def test_it_retries_when_the_receiver_does_not_answer_in_time(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start(Answer(hang=True))
    delivery = Delivery(max_attempts=5, backoff_initial_s=1.0, backoff_max_s=60.0, timeout_s=0.2)
    deliverer = make_deliverer(
        store, metrics, session, clock, Channel("hook", "webhook", hook.url), delivery=delivery
    )
    incident = await open_incident(store, "hook")

    assert await deliverer.deliver_due(T0) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.last_error) == ("pending", f"no answer from {hook.host} within 0.2 s")

    assert await deliverer.deliver_due(T0 + 1) == 1
    [row] = await outbox(store, incident)
    assert (row.state, row.attempts) == ("sent", 2)


async def test_it_refuses_a_redirect(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    hook = await receivers.start(Answer(301, headers={"Location": "https://elsewhere.example/x"}))
    deliverer = make_deliverer(store, metrics, session, clock, Channel("hook", "webhook", hook.url))
    incident = await open_incident(store, "hook")

    await deliverer.deliver_due(T0)
    [row] = await outbox(store, incident)
    assert row.state == "failed"
    assert row.last_error is not None
    assert row.last_error.endswith("redirected to elsewhere.example; configure the final URL")


async def test_idempotency_keys_differ_between_databases(
    tmp_path: Path,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    clock: Clock,
    receivers: Receivers,
) -> None:
    # two monitors (or one whose database was recreated) number their rows alike: a
    # receiver that keeps keys must not drop the second one's notifications
    hook = await receivers.start()
    rows = []
    for name in ("a", "b"):
        store = await SqliteStore(tmp_path / f"{name}.sqlite3").open()
        try:
            incident = await open_incident(store, "hook")
            deliverer = make_deliverer(
                store, metrics, session, clock, Channel("hook", "webhook", hook.url)
            )
            assert await deliverer.deliver_due(T0) == 1
            [row] = await outbox(store, incident)
            rows.append((row.id, await key_of(store, row)))
        finally:
            await store.close()

    (id_a, key_a), (id_b, key_b) = rows
    assert id_a == id_b
    assert key_a != key_b
    assert hook.keys == [key_a, key_b]
    assert [(b["delivery_id"], b["delivery_key"]) for b in hook.bodies] == rows


# --- the loop -----------------------------------------------------------------------------


async def test_run_delivers_when_woken_and_retries_on_its_own(
    store: SqliteStore,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    receivers: Receivers,
) -> None:
    hook = await receivers.start(Answer(500))
    delivery = Delivery(max_attempts=5, backoff_initial_s=0.05, backoff_max_s=1.0, timeout_s=2.0)
    deliverer = make_deliverer(
        store, metrics, session, time.time, Channel("hook", "webhook", hook.url), delivery=delivery
    )
    stop = asyncio.Event()
    task = asyncio.create_task(deliverer.run(stop))
    try:
        incident = await open_incident(store, "hook", now=time.time())
        deliverer.wake()
        await eventually(lambda: len(hook.delivered) == 1, timeout_s=0.9)
        assert [r.status for r in hook.received] == [500, 200]
        [row] = await outbox(store, incident)
        assert (row.state, row.attempts) == ("sent", 2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)


async def test_run_sends_a_successor_at_once_and_idles_behind_a_backoff(
    tmp_path: Path,
    metrics: Metrics,
    session: aiohttp.ClientSession,
    receivers: Receivers,
) -> None:
    hook = await receivers.start()
    pager = await receivers.start(Answer(500))
    delivery = Delivery(max_attempts=5, backoff_initial_s=60.0, backoff_max_s=60.0, timeout_s=2.0)
    store = SlowClaims(tmp_path / "m.sqlite3", Clock(0.0))
    await store.open()
    deliverer = make_deliverer(
        store,
        metrics,
        session,
        time.time,
        Channel("hook", "webhook", hook.url),
        Channel("pager", "webhook", pager.url),
        delivery=delivery,
    )
    # a trigger and its resolve: the resolve goes as soon as the trigger is sent, long
    # before the loop's idle wait would end
    incident = await open_incident(store, "hook", now=time.time())
    await resolve(store, incident, "hook", now=time.time())
    stop = asyncio.Event()
    task = asyncio.create_task(deliverer.run(stop))
    try:
        await eventually(lambda: len(hook.delivered) == 2, timeout_s=0.5)
        assert [b["event"] for b in hook.delivered] == ["trigger", "resolve"]

        # a resolve behind a trigger that waits a minute: the loop idles, it does not spin
        incident = await open_incident(store, "pager", target="b", now=time.time())
        await resolve(store, incident, "pager", now=time.time())
        deliverer.wake()
        await eventually(lambda: len(pager.received) == 1)
        claims = store.claims
        await asyncio.sleep(0.3)
        assert store.claims - claims <= 1
        assert len(pager.received) == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 5)
        await store.close()


# --- renderers ----------------------------------------------------------------------------


def row_of(kind: str, incident: Incident | None = None) -> OutboxRow:
    incident = incident or Incident(
        id=7,
        rule=RULE,
        scope=Scope(ScopeKind.TARGET_REGION, TARGET, REGION),
        title=TITLE,
        severity=Severity.URGENT,
        state=State.TRIGGERED,
        opened_at=T0,
        ack_due=T0 + 900,
        resolve_due=T0 + 4 * 3600,
        details=DETAILS,
    )
    return OutboxRow(
        id=42,
        incident_id=incident.id or 0,
        incident_key=incident.key,
        channel="x",
        kind=kind,
        data={},
        created_at=T0,
        snapshot=incident_json(incident),
        state="sending",
        attempts=1,
        next_at=T0,
        lease_until=T0 + 7,
        sent_at=None,
        last_error=None,
    )


@pytest.mark.parametrize(
    ("kind", "action"),
    [
        ("trigger", "trigger"),
        ("reopen", "trigger"),
        ("escalate", "trigger"),
        ("breach", "trigger"),
        ("severity", "trigger"),
        ("acknowledge", "acknowledge"),
        ("resolve", "resolve"),
    ],
)
def test_pagerduty_maps_each_notice_kind_to_an_action(kind: str, action: str) -> None:
    body = pagerduty_body(row_of(kind), routing_key=ROUTING_KEY)
    assert (body["event_action"], body["dedup_key"]) == (action, KEY)
    assert ("payload" in body) == (action == "trigger")


@pytest.mark.parametrize(
    ("severity", "expected"),
    [(Severity.URGENT, "critical"), (Severity.IMPORTANT, "error"), (Severity.NORMAL, "warning")],
)
def test_pagerduty_maps_severities(severity: Severity, expected: str) -> None:
    incident = Incident(
        id=7,
        rule=RULE,
        scope=Scope(ScopeKind.TARGET, TARGET),
        title=TITLE,
        severity=severity,
        state=State.TRIGGERED,
        opened_at=T0,
        ack_due=T0,
        resolve_due=T0,
    )
    payload = pagerduty_body(row_of("trigger", incident), routing_key="k")["payload"]
    assert payload["severity"] == expected
    # a scope of every region has no group to report
    assert "group" not in payload


def test_pagerduty_keeps_keys_and_summaries_within_limits() -> None:
    long_target = "t" * 400
    incident = Incident(
        id=7,
        rule=RULE,
        scope=Scope(ScopeKind.TARGET_REGION, long_target, REGION),
        title="x" * 2000,
        severity=Severity.URGENT,
        state=State.TRIGGERED,
        opened_at=T0,
        ack_due=T0,
        resolve_due=T0,
    )
    body = pagerduty_body(row_of("trigger", incident), routing_key="k")
    assert len(body["dedup_key"]) == 255
    assert len(body["payload"]["summary"]) == PD_SUMMARY_MAX
    # distinct long keys stay distinct
    assert pagerduty_dedup_key("a" * 300) != pagerduty_dedup_key("a" * 299 + "b")
    assert pagerduty_dedup_key("short") == "short"


def test_slack_escapes_values_so_they_cannot_mention_everyone() -> None:
    incident = Incident(
        id=7,
        rule=RULE,
        scope=Scope(ScopeKind.ALERT, name="<!channel> & co"),
        title="<!here> disk full",
        severity=Severity.IMPORTANT,
        state=State.TRIGGERED,
        opened_at=T0,
        ack_due=T0 + 3600,
        resolve_due=T0 + 86400,
        details={"summary": "<!everyone> look", "value": 3},
    )
    message = slack_body(row_of("trigger", incident))
    shown = block_text(message)
    # mrkdwn is where Slack reads mentions; plain_text (the header) shows them as typed
    mrkdwn = "\n".join([message["text"], *mrkdwn_texts(message["blocks"])])
    for mention in ("<!channel>", "<!here>", "<!everyone>"):
        assert mention not in mrkdwn
    assert "&lt;!here&gt; disk full" in message["text"]
    assert "*Scope*\nalert &lt;!channel&gt; &amp; co" in mrkdwn
    assert "• summary: &lt;!everyone&gt; look" in shown
    assert "• value: 3" in shown


def test_a_breach_without_data_still_says_a_deadline_was_missed() -> None:
    assert slack_body(row_of("breach"))["text"].startswith("Response deadline missed:")


def test_webhook_has_no_url_without_a_public_url_and_reads_older_snapshots() -> None:
    row = row_of("trigger")
    assert "url" not in webhook_body(row, key="k")
    assert (
        webhook_body(row, key="k", public_url="https://m.example")["url"]
        == "https://m.example/incidents/7"
    )
    # rows queued before snapshots carried RFC 3339 times hold Unix seconds
    older = dataclasses.replace(row, snapshot={**row.snapshot, "ack_due": T0 + 900})
    assert "Acknowledge by <!date^1900^" in block_text(slack_body(older))
