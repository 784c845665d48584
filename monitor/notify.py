"""Deliver queued notifications: the outbox rows that incident changes leave in the store.

The store writes one outbox row per (notice, channel) in the same transaction as the
change, so nothing is lost. A `Deliverer` claims due rows (a lease, so a crash before
sending hands them to the next pass once it expires), renders each for its provider,
posts it through the one HTTP wrapper, and marks it sent, due again later (exponential
backoff, or the receiver's Retry-After) or failed (a permanent error, or too many
attempts). The marks are fenced: a deliverer whose lease lapsed records nothing.

The store hands out only the first unfinished row of each incident key on each channel,
so notices of one incident (and of one condition's successive incidents) arrive in order.

Every request carries `Idempotency-Key: callmon-<database id>-<row id>`: a row is sent at
least once, and a receiver that keeps the key can drop the rare duplicate (a crash, or a
lapsed lease, between the answer and marking the row sent).

Providers: `webhook` (callmon's own JSON document), `slack` (incoming webhook) and
`pagerduty` (Events API v2). One `Transport` per provider; the renderers are pure
functions of an outbox row.
"""

from __future__ import annotations

import abc
import asyncio
import datetime
import hashlib
import json
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import aiohttp
from yarl import URL

from callmon.times import iso
from monitor.config import Channel, Delivery
from monitor.metrics import Metrics
from monitor.store import OutboxRow, Store

log = logging.getLogger(__name__)

WEBHOOK_VERSION = "callmon.notification/v1"
IDEMPOTENCY_HEADER = "Idempotency-Key"
USER_AGENT = "callmon-notify/1"

LEASE_MARGIN_S = 5.0
"""A claim's lease beyond the request timeout: the claim's own latency, recording the
answer, and aiohttp rounding timeouts over 5 s up to a whole second."""
MAX_SLEEP_S = 1.0
"The longest `run` waits between passes (rows queued by another process wake nobody)."
RETRY_AFTER_MAX_S = 3600.0
"A receiver asking for a longer pause gets this one: a row must not be parked forever."
EXCERPT_CHARS = 200
"How much of an error answer's body goes into the stored error."

PD_DEDUP_KEY_MAX = 255
PD_SUMMARY_MAX = 1024
PD_DETAILS_MAX_BYTES = 400_000
"PagerDuty refuses events over 512 KB; details beyond this are replaced by a note."

PD_ACTIONS: Mapping[str, str] = {
    "trigger": "trigger",
    "reopen": "trigger",
    "escalate": "trigger",
    "breach": "trigger",
    "severity": "trigger",
    "acknowledge": "acknowledge",
    "resolve": "resolve",
}
"Callmon notice kind -> Events API action; PagerDuty dedups re-triggers on dedup_key."
PD_SEVERITIES: Mapping[str, str] = {
    "urgent": "critical",
    "important": "error",
    "normal": "warning",
}

HEADLINES: Mapping[str, str] = {
    "trigger": "Incident opened",
    "reopen": "Incident reopened",
    "acknowledge": "Acknowledged",
    "resolve": "Resolved",
    "escalate": "Escalated",
    "breach": "Response deadline missed",
    "severity": "Severity changed",
}
DEADLINES_MISSED: Mapping[str, str] = {
    "ack": "Acknowledgement deadline missed",
    "resolve": "Resolution deadline missed",
}
"A breach notice's data.kind -> its headline."


class DeliveryError(Exception):
    """A notification was not delivered; `permanent` says whether trying again can help."""

    def __init__(self, message: str, *, permanent: bool, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.retry_after_s = retry_after_s
        "The earliest next attempt the receiver asked for (Retry-After), in seconds."


# --- the one way out -----------------------------------------------------------------------


class Http:
    """Post JSON through one client session and classify the answer.

    2xx is success. 429, 5xx (and 408), timeouts and connection failures are transient;
    any other answer is permanent. Errors name the host, never the full URL: Slack and
    webhook URLs carry their secret in the path, and errors are stored and shown by the API.
    """

    def __init__(self, session: aiohttp.ClientSession, *, timeout_s: float) -> None:
        self.session = session
        self.timeout_s = timeout_s

    async def post_json(
        self,
        url: str,
        document: Mapping[str, Any],
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> int:
        """Post `document`; return the 2xx status or raise DeliveryError."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            data = json.dumps(_finite(document), ensure_ascii=False, allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise DeliveryError(f"cannot encode the request: {exc}", permanent=True) from exc
        host = _host(url)
        try:
            async with self.session.post(
                url,
                data=data,
                headers={
                    "Content-Type": "application/json",
                    "User-Agent": USER_AGENT,
                    **(headers or {}),
                },
                timeout=aiohttp.ClientTimeout(total=timeout),
                # a redirect would turn the POST into a GET on most servers: the
                # configured URL is wrong, and a person has to fix it
                allow_redirects=False,
            ) as response:
                status = response.status
                if 200 <= status < 300:
                    return status
                excerpt = await _excerpt(response)
                retry_after = _retry_after(response) if status in (429, 503) else None
                location = response.headers.get("Location", "")
        except TimeoutError as exc:
            raise DeliveryError(
                f"no answer from {host} within {timeout:.3g} s", permanent=False
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise DeliveryError(f"invalid URL for {host}", permanent=True) from exc
        except aiohttp.ClientError as exc:
            raise DeliveryError(_describe(exc, url, host), permanent=False) from exc
        message = f"HTTP {status} from {host}"
        if 300 <= status < 400:
            redirect = f" to {_host(location)}" if location else ""
            message += f": redirected{redirect}; configure the final URL"
        elif excerpt:
            message += f": {excerpt}"
        transient = status in (408, 429) or status >= 500
        raise DeliveryError(message, permanent=not transient, retry_after_s=retry_after)


def _host(url: str) -> str:
    try:
        parsed = URL(url)
    except ValueError:
        return "?"
    port = parsed.explicit_port
    return f"{parsed.host}:{port}" if port else str(parsed.host)


async def _excerpt(response: aiohttp.ClientResponse) -> str:
    try:
        raw = await response.content.read(4 * EXCERPT_CHARS)
    except (aiohttp.ClientError, TimeoutError):
        return ""
    text = " ".join(raw.decode("utf-8", errors="replace").split())
    return text if len(text) <= EXCERPT_CHARS else text[: EXCERPT_CHARS - 1] + "…"


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    # only the delay-seconds form: an HTTP date would be compared with a clock that
    # tests freeze, and providers that rate-limit webhooks send seconds
    value = response.headers.get("Retry-After", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, RETRY_AFTER_MAX_S)


def _describe(exc: aiohttp.ClientError, url: str, host: str) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        reason = exc.os_error.strerror or str(exc.os_error) or type(exc.os_error).__name__
        return f"cannot connect to {host}: {reason}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return f"{host} closed the connection without an answer"
    text = str(exc).replace(url, host) or type(exc).__name__
    return f"request to {host} failed: {text}"


def _finite(value: Any) -> Any:
    """Return `value` with NaN and infinities as null: strict JSON parsers refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# --- renderers (pure) ----------------------------------------------------------------------


def incident_url(public_url: str, incident_id: Any) -> str | None:
    """Return the incident's page under `public_url`, None when there is no public URL."""
    if not public_url or incident_id is None:
        return None
    return f"{public_url.rstrip('/')}/incidents/{incident_id}"


def idempotency_key(instance_id: str, row_id: int) -> str:
    """Return a row's key: unique across databases, the same for every attempt."""
    return f"callmon-{instance_id}-{row_id}"


def webhook_body(row: OutboxRow, *, key: str, public_url: str = "") -> dict[str, Any]:
    """Render callmon's own webhook document: stable, versioned, the whole incident."""
    snapshot = row.snapshot
    body: dict[str, Any] = {
        "version": WEBHOOK_VERSION,
        "delivery_id": row.id,
        "delivery_key": key,
        "event": row.kind,
        "data": dict(row.data),
        "at": iso(row.created_at),
        "incident": dict(snapshot),
    }
    url = incident_url(public_url, snapshot.get("id"))
    if url is not None:
        body["url"] = url
    return body


def slack_body(row: OutboxRow, *, public_url: str = "") -> dict[str, Any]:
    """Render a Slack incoming-webhook message: text fallback and blocks."""
    snapshot = row.snapshot
    scope = snapshot.get("scope") or {}
    details = snapshot.get("details") or {}
    title = str(snapshot.get("title", ""))
    severity = str(snapshot.get("severity", ""))
    state = str(snapshot.get("state", ""))
    headline = headline_of(row)
    text = f"{headline}: {title} [{severity}, {state}]"
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": _cut(f"{headline}: {title}", 150)},
        },
        {
            "type": "section",
            "fields": [
                _mrkdwn(f"*Severity*\n{_escape(severity)}"),
                _mrkdwn(f"*State*\n{_escape(state)}"),
                _mrkdwn(f"*Scope*\n{_escape(str(scope.get('description', '')))}"),
                _mrkdwn(f"*Rule*\n{_escape(str(snapshot.get('rule', '')))}"),
            ],
        },
    ]
    condition = _condition_text(details)
    if condition:
        blocks.append({"type": "section", "text": _mrkdwn(_cut(condition, 3000))})
    blocks.append({"type": "context", "elements": [_mrkdwn(t) for t in _deadlines(snapshot)]})
    url = incident_url(public_url, snapshot.get("id"))
    if url is not None:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open incident"},
                        "url": url,
                    }
                ],
            }
        )
    return {"text": _escape(text), "blocks": blocks}


def pagerduty_body(row: OutboxRow, *, routing_key: str, public_url: str = "") -> dict[str, Any]:
    """Render a PagerDuty Events API v2 event; the incident key is the dedup_key."""
    snapshot = row.snapshot
    action = pagerduty_action(row.kind, snapshot)
    body: dict[str, Any] = {
        "routing_key": routing_key,
        "event_action": action,
        "dedup_key": pagerduty_dedup_key(str(snapshot["key"])),
    }
    if action != "trigger":
        # acknowledge and resolve carry only the key: PagerDuty ignores anything else
        return body
    scope = snapshot.get("scope") or {}
    title = str(snapshot.get("title") or snapshot["key"])
    # a trigger's summary names the alert; later triggers say what happened to it
    summary = title if row.kind == "trigger" else f"{headline_of(row)}: {title}"
    details = dict(snapshot.get("details") or {})
    if len(json.dumps(_finite(details), ensure_ascii=False)) > PD_DETAILS_MAX_BYTES:
        details = {
            "truncated": "details too large for PagerDuty; see the incident in callmon",
            "condition": details.get("condition"),
        }
    payload: dict[str, Any] = {
        "summary": _cut(summary, PD_SUMMARY_MAX),
        "source": _source(scope),
        # a page that arrives with a guessed severity beats one refused for a new tier
        "severity": PD_SEVERITIES.get(str(snapshot.get("severity")), "error"),
        "timestamp": iso(row.created_at),
        "class": str(snapshot.get("rule", "")),
        "custom_details": details,
    }
    for field_name, value in (("component", scope.get("target")), ("group", scope.get("region"))):
        # "*" is callmon's wildcard (every target, every region), not a name to group by
        if value and value != "*":
            payload[field_name] = str(value)
    body["payload"] = payload
    body["client"] = "callmon"
    url = incident_url(public_url, snapshot.get("id"))
    if url is not None:
        body["client_url"] = url
        body["links"] = [{"href": url, "text": f"callmon incident #{snapshot.get('id')}"}]
    else:
        body["links"] = []
    return body


def pagerduty_action(kind: str, snapshot: Mapping[str, Any]) -> str:
    """Return the Events API action for a notice kind.

    A kind this module does not know yet follows the incident's state, so a new kind of
    notice can never re-open an alert that callmon has resolved.
    """
    action = PD_ACTIONS.get(kind)
    if action is not None:
        return action
    state = snapshot.get("state")
    return {"resolved": "resolve", "acknowledged": "acknowledge"}.get(str(state), "trigger")


def pagerduty_dedup_key(key: str) -> str:
    """Return `key` if PagerDuty accepts its length, else a prefix and a digest of it."""
    if len(key) <= PD_DEDUP_KEY_MAX:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()
    return f"{key[: PD_DEDUP_KEY_MAX - len(digest) - 1]}#{digest}"


def headline_of(row: OutboxRow) -> str:
    """Return a short human line for a notice, using its data where it says more."""
    if row.kind == "escalate":
        return f"Escalated to level {row.data.get('level', '?')}"
    if row.kind == "breach":
        return DEADLINES_MISSED.get(str(row.data.get("kind")), HEADLINES["breach"])
    if row.kind == "severity":
        return f"Severity now {row.snapshot.get('severity', '?')}"
    return HEADLINES.get(row.kind, row.kind.capitalize())


def _source(scope: Mapping[str, Any]) -> str:
    target, region, name = scope.get("target"), scope.get("region"), scope.get("name")
    if target and target != "*":
        return str(target)
    if scope.get("kind") == "probe" and name:
        return f"probe {name}"
    if region and region != "*":
        return str(region)
    return str(name or "callmon")


def _mrkdwn(text: str) -> dict[str, Any]:
    return {"type": "mrkdwn", "text": text}


def _escape(text: str) -> str:
    # Slack reads <...> as links and mentions (<!channel>): values from probes and
    # Alertmanager must not be able to page a whole channel
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "..".join(_value(v) for v in value)
    return str(value)


MAX_CONDITION_ROWS = 8


def _condition_text(details: Mapping[str, Any]) -> str:
    """Return the condition and its latest values as Slack mrkdwn ('' if nothing to say)."""
    lines: list[str] = []
    if details.get("condition"):
        lines.append(f"*Condition:* `{_escape(str(details['condition']))}`")
    if details.get("description"):
        lines.append(_escape(str(details["description"])))
    rows = details.get("conditions")
    if isinstance(rows, list) and rows:
        for entry in rows[:MAX_CONDITION_ROWS]:
            if not isinstance(entry, Mapping):
                continue
            where = f"{entry.get('target', '?')} from {entry.get('region', '?')}"
            line = f"• {_escape(where)}: *{_escape(_value(entry.get('value')))}*"
            if entry.get("evaluations"):
                line += f" ({entry.get('breaches', '?')} of {entry['evaluations']} evaluations)"
            lines.append(line)
        if len(rows) > MAX_CONDITION_ROWS:
            lines.append(f"… and {len(rows) - MAX_CONDITION_ROWS} more")
    elif not lines:
        # details of another shape (an Alertmanager alert): show its plain values
        plain = [(k, v) for k, v in details.items() if isinstance(v, str | int | float)]
        lines.extend(
            f"• {_escape(str(k))}: {_escape(_value(v))}" for k, v in plain[:MAX_CONDITION_ROWS]
        )
    return "\n".join(lines)


def _epoch(value: Any) -> float | None:
    """Return a snapshot time as Unix seconds; snapshots hold RFC 3339 (or, older, seconds)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=datetime.UTC)
        return moment.timestamp()
    return None


def _slack_date(value: Any) -> str:
    t = _epoch(value)
    if t is None:
        return "?"
    # Slack shows the reader's own time zone; the fallback is for clients that cannot
    return f"<!date^{int(t)}^{{date_short_pretty}} {{time}}|{iso(t)}>"


def _deadlines(snapshot: Mapping[str, Any]) -> list[str]:
    lines = [f"Opened {_slack_date(snapshot.get('opened_at'))}"]
    if snapshot.get("acknowledged_at"):
        lines.append(f"Acknowledged {_slack_date(snapshot['acknowledged_at'])}")
    else:
        missed = " *(missed)*" if snapshot.get("ack_breached") else ""
        lines.append(f"Acknowledge by {_slack_date(snapshot.get('ack_due'))}{missed}")
    if snapshot.get("resolved_at"):
        lines.append(f"Resolved {_slack_date(snapshot['resolved_at'])}")
    else:
        missed = " *(missed)*" if snapshot.get("resolve_breached") else ""
        lines.append(f"Resolve by {_slack_date(snapshot.get('resolve_due'))}{missed}")
    return lines


# --- transports ----------------------------------------------------------------------------


class Transport(abc.ABC):
    """Render an outbox row for one provider and post it; raise DeliveryError on failure."""

    type: ClassVar[str] = ""

    def __init__(self, channel: Channel, http: Http, public_url: str = "") -> None:
        self.channel = channel
        self.http = http
        self.public_url = public_url

    @abc.abstractmethod
    def render(self, row: OutboxRow, key: str) -> dict[str, Any]:
        """Return the request body for `row`, sent with idempotency key `key`."""

    async def send(self, row: OutboxRow, *, key: str, timeout_s: float | None = None) -> None:
        """Deliver `row` or raise DeliveryError."""
        try:
            document = self.render(row, key)
        except DeliveryError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # a snapshot this code cannot read will not become readable by waiting
            raise DeliveryError(
                f"cannot render {row.kind} for {self.type}: {exc!r}", permanent=True
            ) from exc
        await self.http.post_json(
            self.channel.url,
            document,
            headers={IDEMPOTENCY_HEADER: key},
            timeout_s=timeout_s,
        )


class WebhookTransport(Transport):
    type = "webhook"

    def render(self, row: OutboxRow, key: str) -> dict[str, Any]:
        return webhook_body(row, key=key, public_url=self.public_url)


class SlackTransport(Transport):
    type = "slack"

    def render(self, row: OutboxRow, key: str) -> dict[str, Any]:
        return slack_body(row, public_url=self.public_url)


class PagerDutyTransport(Transport):
    type = "pagerduty"

    def render(self, row: OutboxRow, key: str) -> dict[str, Any]:
        if not self.channel.routing_key:
            raise DeliveryError(
                f"channel {self.channel.name!r} has no PagerDuty routing_key", permanent=True
            )
        return pagerduty_body(row, routing_key=self.channel.routing_key, public_url=self.public_url)


TRANSPORTS: Mapping[str, type[Transport]] = {
    t.type: t for t in (WebhookTransport, SlackTransport, PagerDutyTransport)
}


# --- the deliverer -------------------------------------------------------------------------

SENT, RETRY, FAILED = "sent", "retry", "failed"
Clock = Callable[[], float]


class Deliverer:
    """Claim due outbox rows, send them, and record each outcome in the store.

    The store claims only rows first in line for their channel and incident key, so the
    rows of one pass are independent and go out concurrently; a row's successor becomes
    claimable once it is sent, so a pass that sent something is followed by another.
    """

    def __init__(
        self,
        store: Store,
        channels: Mapping[str, Channel],
        delivery: Delivery,
        metrics: Metrics,
        http: aiohttp.ClientSession,
        clock: Clock,
        public_url: str = "",
        *,
        batch: int = 20,
    ) -> None:
        self.store = store
        self.channels = dict(channels)
        self.delivery = delivery
        self.metrics = metrics
        self.clock = clock
        self.batch = batch
        "Rows claimed per pass."
        # a send ends inside its claim's lease, so a live deliverer's rows are not taken over
        self.lease_s = delivery.timeout_s + LEASE_MARGIN_S
        self.http = Http(http, timeout_s=delivery.timeout_s)
        self._transports: dict[str, Transport] = {
            name: TRANSPORTS[channel.type](channel, self.http, public_url)
            for name, channel in self.channels.items()
            if channel.type in TRANSPORTS
        }
        self._instance_id: str | None = None
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    def wake(self) -> None:
        """Start the next pass now: a commit has queued rows."""
        self._wake.set()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Deliver until `stop` is set (or the task is cancelled)."""
        while stop is None or not stop.is_set():
            # cleared before the pass: a wake() during it means another pass right away
            self._wake.clear()
            started = self.clock()
            try:
                outcomes = await self._deliver(started)
                due = await self.store.next_outbox_due()
            except Exception:
                log.exception("notification delivery pass failed")
                outcomes, due = [], None
            if len(outcomes) >= self.batch or SENT in outcomes:
                await asyncio.sleep(0)  # more rows may be claimable already
                continue
            # a row due before this pass that it did not send (its claim came back too late
            # to send in its lease) is claimable again only when that lease ends
            wait = MAX_SLEEP_S if due is None or due <= started else due - self.clock()
            await self._idle(min(MAX_SLEEP_S, max(0.0, wait)), stop)

    async def _idle(self, delay: float, stop: asyncio.Event | None) -> None:
        waits = [asyncio.ensure_future(self._wake.wait())]
        if stop is not None:
            waits.append(asyncio.ensure_future(stop.wait()))
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    async def deliver_due(self, now: float | None = None) -> int:
        """Run one pass over the rows claimable at `now`; return how many it claimed."""
        return len(await self._deliver(now))

    async def _deliver(self, now: float | None) -> list[str | None]:
        """Run one pass; return each claimed row's outcome (None: not recorded)."""
        async with self._lock:
            if self._instance_id is None:
                self._instance_id = await self.store.instance_id()
            started = self.clock()
            base = started if now is None else now

            def at() -> float:
                return base + max(0.0, self.clock() - started)

            rows = await self.store.claim_outbox(base, self.lease_s, self.batch)
            settled = await asyncio.gather(
                *(self._send(row, at) for row in rows), return_exceptions=True
            )
        # every row has settled before a store error is raised
        outcomes: list[str | None] = []
        for outcome in settled:
            if isinstance(outcome, BaseException):
                raise outcome
            outcomes.append(outcome)
        return outcomes

    async def _send(self, row: OutboxRow, at: Clock) -> str | None:
        """Send one claimed row and record its outcome; None if nothing was recorded."""
        assert row.lease_until is not None
        assert self._instance_id is not None
        left = row.lease_until - LEASE_MARGIN_S - at()
        if left <= 0:
            # the claim came back too late for an answer inside the lease: the row is
            # claimable again when the lease ends
            log.warning("notification %d (%s, %s): claimed too late to send", *_name(row))
            return None
        try:
            transport = self._transports.get(row.channel)
            if transport is None:
                raise DeliveryError(self._unroutable(row.channel), permanent=True)
            key = idempotency_key(self._instance_id, row.id)
            await transport.send(row, key=key, timeout_s=min(self.delivery.timeout_s, left))
        except DeliveryError as exc:
            outcome = await self._failed(row, exc, at())
        else:
            outcome = SENT if await self.store.outbox_sent(row, at()) else None
        if outcome is None:
            log.warning(
                "notification %d (%s, %s): the claim lapsed; another deliverer has the row",
                *_name(row),
            )
        else:
            self.metrics.notifications.labels(row.channel, outcome).inc()
        return outcome

    def _unroutable(self, name: str) -> str:
        channel = self.channels.get(name)
        if channel is None:
            return f"channel {name!r} is no longer configured"
        return f"channel {name!r} has unsupported type {channel.type!r}"

    async def _failed(self, row: OutboxRow, exc: DeliveryError, now: float) -> str | None:
        """Record a failed attempt: failed for good, or due again later."""
        attempts = row.attempts
        limit = self.delivery.max_attempts
        if exc.permanent or attempts >= limit:
            error = exc.message if exc.permanent else f"gave up after {attempts} attempts: {exc}"
            if not await self.store.outbox_failed(row, error):
                return None
            log.warning("notification %d (%s, %s) failed: %s", *_name(row), error)
            return FAILED
        backoff = min(
            self.delivery.backoff_initial_s * 2.0 ** max(0, attempts - 1),
            self.delivery.backoff_max_s,
        )
        next_at = now + max(backoff, exc.retry_after_s or 0.0)
        if not await self.store.outbox_retry(row, next_at, exc.message):
            return None
        log.info(
            "notification %d (%s, %s) attempt %d/%d: %s; next at %s",
            *_name(row),
            attempts,
            limit,
            exc,
            iso(next_at),
        )
        return RETRY


def _name(row: OutboxRow) -> tuple[int, str, str]:
    return row.id, row.channel, row.kind
