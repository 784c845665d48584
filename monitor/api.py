"""The monitor's HTTP routes: probe ingest, the operator API, Alertmanager intake.

Operators (operator tokens) list and filter incidents, read one ticket with its timeline,
notifications and evidence, acknowledge, resolve, comment, change severity, and silence
a target or a region for a maintenance window. Probes may only ingest (403 elsewhere).
"""

from __future__ import annotations

import datetime
import math
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from callmon.callresult import ContractError
from callmon.times import iso_or_none as iso
from monitor import incidents
from monitor.alertmanager import parse_webhook
from monitor.auth import CSRF_HEADER, SESSION_COOKIE, SESSION_S, Tokens, unauthorized
from monitor.config import MonitorConfig, ProbeIdentity
from monitor.errors import bad_request, error
from monitor.incidents import Change, Incident, Severity
from monitor.ingest import parse_items, read_json
from monitor.metrics import Metrics
from monitor.pipeline import Pipeline
from monitor.rules import value_at
from monitor.store import Silence, Store, incident_json

CONFIG = web.AppKey("config", MonitorConfig)
TOKENS = web.AppKey("tokens", Tokens)
METRICS = web.AppKey("metrics", Metrics)
STORE = web.AppKey("store", Store)
PIPELINE = web.AppKey("pipeline", Pipeline)

routes = web.RouteTableDef()


def _json(data: Any, status: int = 200) -> web.Response:
    body = orjson.dumps(data, option=orjson.OPT_NON_STR_KEYS)
    return web.Response(body=body, status=status, content_type="application/json")


# --- ingest -------------------------------------------------------------------------------


@routes.post("/api/v1/results")
async def post_results(request: web.Request) -> web.Response:
    app = request.app
    probe = app[TOKENS].probe(request)
    document = await read_json(request, app[CONFIG].max_body_bytes)
    try:
        items = parse_items(document)
    except ContractError as exc:
        raise bad_request(exc.message, exc.field or None) from None
    receipts = await app[PIPELINE].ingest(probe, items)
    return _json(
        {
            "probe": probe.name,
            "region": probe.region,
            "results": [{"id": r.id, "received_at": iso(r.received_at)} for r in receipts],
        }
    )


@routes.get("/api/v1/whoami")
async def whoami(request: web.Request) -> web.Response:
    """Tell a caller who its token says it is (agents check their token at start)."""
    identity = request.app[TOKENS].who(request)
    if isinstance(identity, ProbeIdentity):
        # an agent asks at start: alive, even before its first result arrives
        request.app[PIPELINE].alive(identity)
        return _json(
            {
                "role": "probe",
                "name": identity.name,
                "region": identity.region,
                "interval_s": identity.interval_s,
            }
        )
    return _json({"role": "operator", "name": identity.name})


# --- Alertmanager ---------------------------------------------------------------------------


@routes.post("/api/v1/alertmanager")
async def post_alertmanager(request: web.Request) -> web.Response:
    app = request.app
    app[TOKENS].operator(request)
    document = await read_json(request, app[CONFIG].max_body_bytes)
    try:
        alerts = parse_webhook(document)
    except ContractError as exc:
        raise bad_request(exc.message, exc.field or None) from None
    out = []
    for alert in alerts:
        incident = await app[PIPELINE].alert(
            rule=alert.rule,
            scope=alert.scope,
            firing=alert.firing,
            severity=alert.severity,
            title=alert.title,
            details=alert.details,
        )
        out.append(None if incident is None else incident.id)
    return _json({"incidents": out})


# --- incidents -------------------------------------------------------------------------------


@routes.get("/api/v1/incidents")
async def list_incidents(request: web.Request) -> web.Response:
    app = request.app
    _reader(request)
    query = request.query
    state = query.get("state")
    if state not in (None, "open", *[s.value for s in incidents.State]):
        raise bad_request("state must be open, triggered, acknowledged or resolved", "state")
    severity = query.get("severity")
    if severity is not None and severity not in [s.value for s in Severity]:
        raise bad_request("severity must be urgent, important or normal", "severity")
    limit = _int(query.get("limit", "100"), "limit", 1, 1000)
    found = await app[STORE].incidents(
        state=state,
        severity=severity,
        target=query.get("target"),
        region=query.get("region"),
        rule=query.get("rule"),
        limit=limit,
    )
    return _json({"incidents": [incident_json(i) for i in found]})


@routes.get("/api/v1/incidents/{id}")
async def get_incident(request: web.Request) -> web.Response:
    app = request.app
    _reader(request)
    store = app[STORE]
    incident = await store.incident(_incident_id(request))
    if incident is None:
        raise error(web.HTTPNotFound, "no such incident")
    assert incident.id is not None
    events = await store.events(incident.id)
    outbox = await store.outbox_for(incident.id)
    evidence: dict[str, Any] = {}
    for row in incident.details.get("conditions", []):
        result_id = row.get("evidence")
        if result_id and result_id not in evidence:
            stored = await store.result(result_id)
            if stored is not None:
                evidence[result_id] = {
                    "probe": stored.probe,
                    "region": stored.region,
                    "received_at": iso(stored.received_at),
                    "body": stored.body,
                }
    return _json(
        {
            "incident": incident_json(incident),
            "timeline": [
                {
                    "id": e.id,
                    "at": iso(e.event.at),
                    "actor": e.event.actor,
                    "kind": e.event.kind,
                    "text": e.event.text,
                    "data": dict(e.event.data),
                }
                for e in events
            ],
            "comments": [
                {"at": iso(e.event.at), "author": e.event.actor, "text": e.event.text}
                for e in events
                if e.event.kind == "comment"
            ],
            "notifications": [
                {
                    "id": row.id,
                    "channel": row.channel,
                    "event": row.kind,
                    "state": row.state,
                    "attempts": row.attempts,
                    "created_at": iso(row.created_at),
                    "next_attempt_at": iso(row.next_at) if row.state == "pending" else None,
                    "sent_at": iso(row.sent_at),
                    "last_error": row.last_error,
                }
                for row in outbox
            ],
            "evidence": evidence,
        }
    )


Act = Callable[[Incident, float, str], Change]
"An operator's action, validated: (incident, now, actor) -> change."


async def _operate(request: web.Request, build: Callable[[dict[str, Any]], Act]) -> web.Response:
    """Validate the body into an action (400 here), then apply it through the pipeline."""
    app = request.app
    operator = app[TOKENS].operator(request)
    incident_id = _incident_id(request)
    body = await read_json(request, 64 * 1024) if request.can_read_body else {}
    if not isinstance(body, dict):
        raise bad_request("expected a JSON object")
    act = build(body)
    try:
        updated = await app[PIPELINE].operate(
            incident_id, lambda incident, now: act(incident, now, operator.name)
        )
    except LookupError:
        raise error(web.HTTPNotFound, "no such incident") from None
    except incidents.InvalidTransition as exc:
        raise error(web.HTTPConflict, str(exc)) from None
    return _json({"incident": incident_json(updated)})


def _text(body: dict[str, Any], key: str, *, required: bool) -> str:
    value = body.get(key, "")
    if not isinstance(value, str) or (required and not value.strip()):
        raise bad_request(f"{key} is required: say why" if required else f"{key} must be text", key)
    return value.strip()


@routes.post("/api/v1/incidents/{id}/acknowledge")
async def acknowledge(request: web.Request) -> web.Response:
    policy = request.app[CONFIG].policy

    def build(body: dict[str, Any]) -> Act:
        note = _text(body, "note", required=False)
        return lambda incident, now, actor: incidents.acknowledge(
            incident, actor=actor, now=now, policy=policy, note=note
        )

    return await _operate(request, build)


@routes.post("/api/v1/incidents/{id}/resolve")
async def resolve(request: web.Request) -> web.Response:
    policy = request.app[CONFIG].policy

    def build(body: dict[str, Any]) -> Act:
        reason = _text(body, "reason", required=True)
        return lambda incident, now, actor: incidents.resolve(
            incident, actor=actor, now=now, policy=policy, reason=reason
        )

    return await _operate(request, build)


@routes.post("/api/v1/incidents/{id}/comments")
async def add_comment(request: web.Request) -> web.Response:
    def build(body: dict[str, Any]) -> Act:
        text = _text(body, "text", required=True)
        return lambda incident, now, actor: incidents.comment(
            incident, actor=actor, now=now, text=text
        )

    return await _operate(request, build)


@routes.post("/api/v1/incidents/{id}/severity")
async def change_severity(request: web.Request) -> web.Response:
    policy = request.app[CONFIG].policy

    def build(body: dict[str, Any]) -> Act:
        value = body.get("severity")
        if value not in [s.value for s in Severity]:
            raise bad_request("severity must be urgent, important or normal", "severity")
        severity = Severity(value)
        reason = _text(body, "reason", required=True)
        return lambda incident, now, actor: incidents.set_severity(
            incident, severity=severity, actor=actor, now=now, policy=policy, reason=reason
        )

    return await _operate(request, build)


# --- silences ---------------------------------------------------------------------------------


def _silence_json(silence: Silence) -> dict[str, Any]:
    return {
        "id": silence.id,
        "target": silence.target,
        "region": silence.region,
        "starts_at": iso(silence.starts_at),
        "ends_at": iso(silence.ends_at),
        "created_by": silence.created_by,
        "reason": silence.reason,
        "created_at": iso(silence.created_at),
    }


@routes.get("/api/v1/silences")
async def list_silences(request: web.Request) -> web.Response:
    app = request.app
    _reader(request)
    active_text = request.query.get("active", "0")
    if active_text not in ("0", "1", "true", "false"):
        raise bad_request("active must be 1 or 0", "active")
    active = active_text in ("1", "true")
    now = app[PIPELINE].clock()
    found = await app[STORE].silences(active_at=now if active else None)
    return _json({"silences": [_silence_json(s) for s in found]})


@routes.post("/api/v1/silences")
async def add_silence(request: web.Request) -> web.Response:
    app = request.app
    operator = app[TOKENS].operator(request)
    body = await read_json(request, 64 * 1024)
    if not isinstance(body, dict):
        raise bad_request("expected a JSON object")
    target, region = body.get("target"), body.get("region")
    for key, value in (("target", target), ("region", region)):
        if value is not None and (not isinstance(value, str) or not value):
            raise bad_request(f"{key} must be a non-empty string", key)
    if target is None and region is None:
        raise bad_request("name a target, a region or both", "target")
    now = app[PIPELINE].clock()
    starts_at = _time(body.get("starts_at"), "starts_at") if "starts_at" in body else now
    if "ends_at" in body:
        ends_at = _time(body["ends_at"], "ends_at")
    elif "duration_s" in body:
        ends_at = starts_at + _number(body["duration_s"], "duration_s")
    else:
        raise bad_request("give ends_at or duration_s", "ends_at")
    if ends_at <= starts_at:
        raise bad_request("the window ends before it starts", "ends_at")
    reason = _text(body, "reason", required=True)
    store = app[STORE]
    silence = await store.add_silence(
        target=target,
        region=region,
        starts_at=starts_at,
        ends_at=ends_at,
        created_by=operator.name,
        reason=reason,
        now=now,
    )
    app[PIPELINE].silences_changed(await store.silences(active_at=None))
    return _json({"silence": _silence_json(silence)}, status=201)


@routes.delete("/api/v1/silences/{id}")
async def end_silence(request: web.Request) -> web.Response:
    app = request.app
    app[TOKENS].operator(request)
    silence_id = _int(request.match_info["id"], "id", 1, 2**62)
    store = app[STORE]
    silence = await store.end_silence(silence_id, app[PIPELINE].clock())
    if silence is None:
        raise error(web.HTTPNotFound, "no such silence")
    app[PIPELINE].silences_changed(await store.silences(active_at=None))
    return _json({"silence": _silence_json(silence)})


# --- health --------------------------------------------------------------------------------


@routes.get("/healthz")
async def healthz(request: web.Request) -> web.Response:
    pipeline = request.app[PIPELINE]
    return _json(
        {
            "status": "ok",
            "open_incidents": len(pipeline.open_incidents()),
            "started_at": iso(pipeline.started_at),
        }
    )


def _reader(request: web.Request) -> None:
    """Let an operator read, or anyone when the configuration allows anonymous reading."""
    request.app[TOKENS].reader(request, request.app[CONFIG].anonymous_read)


# --- sessions (the web UI) --------------------------------------------------------------------


@routes.post("/api/v1/session")
async def sign_in(request: web.Request) -> web.Response:
    body = await read_json(request, 4096)
    token = body.get("token") if isinstance(body, dict) else None
    if not isinstance(token, str) or not token:
        raise bad_request("token is required", "token")
    signed = request.app[TOKENS].sign_in(token)
    if signed is None:
        raise unauthorized("not an operator token")
    operator, session = signed
    response = _json({"operator": operator.name})
    response.set_cookie(
        SESSION_COOKIE,
        session,
        httponly=True,
        samesite="Strict",
        path="/",
        max_age=int(SESSION_S),
        secure=request.secure,
    )
    return response


@routes.get("/api/v1/session")
async def current_session(request: web.Request) -> web.Response:
    operator = request.app[TOKENS].operator(request)
    return _json({"operator": operator.name, "anonymous_read": request.app[CONFIG].anonymous_read})


@routes.delete("/api/v1/session")
async def sign_out(request: web.Request) -> web.Response:
    if CSRF_HEADER not in request.headers:
        raise error(web.HTTPForbidden, f"signing out needs the {CSRF_HEADER} header")
    request.app[TOKENS].sign_out(request)
    response = _json({"operator": None})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


# --- what the probes see ------------------------------------------------------------------------


@routes.get("/api/v1/matrix")
async def matrix(request: web.Request) -> web.Response:
    """Targets x regions: the latest numbers of each pair and the rules firing for it."""
    _reader(request)
    app = request.app
    now = app[PIPELINE].clock()
    firing = app[PIPELINE].firing()
    cells = app[METRICS].matrix(now)
    for cell in cells:
        cell["firing"] = firing.get((cell["target"], cell["region"]), [])
    return _json(
        {
            "generated_at": iso(now),
            "targets": sorted({c["target"] for c in cells}),
            "regions": sorted({c["region"] for c in cells}),
            "cells": cells,
        }
    )


SAMPLE_FIELDS = (
    "rtt_s",
    "av_offset_s",
    "mos",
    "audio.jitter_s",
    "video.jitter_s",
    "audio.loss",
    "video.loss",
    "audio.delay_s",
    "video.delay_s",
    "video.fps",
    "video.freezes",
    "video.freeze_s",
    "audio.gaps",
    "audio.gap_s",
)


@routes.get("/api/v1/samples")
async def samples(request: web.Request) -> web.Response:
    """Per-second samples of a target (and region) over a time window, for charts."""
    _reader(request)
    app = request.app
    query = request.query
    target = query.get("target")
    if not target:
        raise bad_request("target is required", "target")
    now = app[PIPELINE].clock()
    until = _time(query["until"], "until") if "until" in query else now
    since = _time(query["since"], "since") if "since" in query else until - 900
    if since >= until:
        raise bad_request("since must be before until", "since")
    limit = _int(query.get("limit", "5000"), "limit", 1, 50_000)
    rows = await app[STORE].samples(
        target=target, region=query.get("region"), since=since, until=until, limit=limit
    )
    return _json(
        {
            "target": target,
            "since": iso(since),
            "until": iso(until),
            "samples": [
                {
                    "at": iso(row.at),
                    "region": row.region,
                    "probe": row.probe,
                    "call_id": row.call_id,
                    "t_s": row.t_s,
                    "reliable": row.reliable,
                    **{name: value_at(row.body, name) for name in SAMPLE_FIELDS},
                }
                for row in rows
            ],
        }
    )


# --- helpers ---------------------------------------------------------------------------------


def _incident_id(request: web.Request) -> int:
    return _int(request.match_info["id"], "id", 1, 2**62)


def _int(text: str, field: str, low: int, high: int) -> int:
    if not text.isdigit():  # int() would also take "1_0" or " 7"
        raise bad_request(f"{field} must be an integer", field)
    value = int(text)
    if not low <= value <= high:
        raise bad_request(f"{field} must be between {low} and {high}", field)
    return value


def _number(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise bad_request(f"{field} must be a number", field)
    if value <= 0:
        raise bad_request(f"{field} must be positive", field)
    return float(value)


def _time(value: Any, field: str) -> float:
    """Accept RFC 3339 text or Unix seconds (as a number, or as text in a query)."""
    if isinstance(value, str):
        try:
            return _number(float(value), field)
        except ValueError:
            pass
        try:
            moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise bad_request(f"{field} must be RFC 3339 or Unix seconds", field) from None
        if moment.tzinfo is None:
            raise bad_request(f"{field} needs a time zone (e.g. Z)", field)
        return moment.timestamp()
    return _number(value, field)
