"""The monitor's HTTP API as an OpenAPI 3.1 document (served at /api/v1/openapi.json).

The probe contract (`callmon.call/v1`, `callmon.samples/v1`) is not written out here: its
schemas are generated from the dataclasses of `callmon/callresult.py`, field by field, with
the documentation strings `field_docs()` reads, so the document cannot drift from what
ingest accepts. The per-second fields of `GET /api/v1/samples` are generated the same way
from `monitor.api.SAMPLE_FIELDS`, and every enumeration (severities, states, scope kinds)
comes from its enum. The rest (the operator API's shapes) is written with small helpers
below; `tests/test_openapi.py` checks both directions against the real routes and
validates real responses against it.

Roles: routes say who may call them in `security` (OpenAPI 3.1 lets a requirement list
role names) and in `x-callmon-role`: `probe`, `operator`, `reader` (an operator, or anyone
when the configuration sets `anonymous_read`), `probe or operator`, or `anyone`.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import inspect
import json
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any

from callmon import __version__ as CALLMON_VERSION
from callmon.callresult import SAMPLES_SCHEMA, SCHEMA, CallResult, Sample, SampleBatch, field_docs
from monitor.api import SAMPLE_FIELDS
from monitor.auth import CSRF_HEADER, SESSION_COOKIE, SESSION_S
from monitor.incidents import ScopeKind, Severity, State
from monitor.ingest import MAX_ID, MAX_ITEMS

Schema = dict[str, Any]

OPERATOR_BODY_BYTES = 64 * 1024
"Body limit of the operator actions and silences (`monitor/api.py`)."
SESSION_BODY_BYTES = 4096
"Body limit of the sign-in (`monitor/api.py`)."


def document() -> dict[str, Any]:
    """Return the OpenAPI document (a test keeps it in step with the routes).

    Built once; each call returns a fresh copy, so a caller may change what it gets.
    """
    return typing.cast(dict[str, Any], json.loads(_document_json()))


def document_text() -> str:
    """Return the document as JSON text (built once)."""
    return _document_json()


@functools.cache
def _document_json() -> str:
    return json.dumps(_build(), separators=(",", ":"))


# --- schema helpers -------------------------------------------------------------------------


def ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def nullable(schema: Schema) -> Schema:
    """Allow null besides `schema` (a type list where it can be one, else anyOf)."""
    kind = schema.get("type")
    if isinstance(kind, str):
        kind = [kind]
    if not isinstance(kind, list) or "$ref" in schema:
        return {"anyOf": [schema, {"type": "null"}]}
    if "null" in kind:
        return schema
    out = {**schema, "type": [*kind, "null"]}
    if "enum" in out:
        out["enum"] = [*out["enum"], None]
    return out


def obj(
    description: str,
    properties: dict[str, Schema],
    *,
    required: Iterable[str] | None = None,
    closed: bool = False,
) -> Schema:
    """An object; every property is required unless `required` says otherwise.

    The monitor always sends every key of its answers (null when there is no value).
    `closed` refuses unknown keys, as ingest does; elsewhere new keys may come.
    """
    schema: Schema = {"type": "object", "description": description, "properties": properties}
    names = list(properties) if required is None else list(required)
    if names:
        schema["required"] = names
    if closed:
        schema["additionalProperties"] = False
    return schema


def described(schema: Schema, description: str) -> Schema:
    return {**schema, "description": description}


def string(description: str, **extra: Any) -> Schema:
    return {"type": "string", "description": description, **extra}


def number(description: str, **extra: Any) -> Schema:
    return {"type": "number", "description": description, **extra}


def integer(description: str, **extra: Any) -> Schema:
    return {"type": "integer", "description": description, **extra}


def boolean(description: str) -> Schema:
    return {"type": "boolean", "description": description}


def timestamp(description: str) -> Schema:
    return {"type": "string", "format": "date-time", "description": description}


def array(items: Schema, description: str, **extra: Any) -> Schema:
    return {"type": "array", "items": items, "description": description, **extra}


def one_of(enum_type: type[enum.Enum], description: str) -> Schema:
    return {"type": "string", "enum": [m.value for m in enum_type], "description": description}


def strings(description: str) -> Schema:
    return {
        "type": "object",
        "additionalProperties": {"type": "string"},
        "description": description,
    }


# --- the probe contract, from callmon/callresult.py ---------------------------------------------

_SCALARS: dict[object, Schema] = {
    bool: {"type": "boolean"},
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
}


def _hint_schema(hint: object, visit: Callable[[type[Any]], str]) -> Schema:
    """The JSON Schema of a field type, as `callresult._converter` checks it."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        (inner,) = [a for a in args if a is not type(None)]
        return nullable(_hint_schema(inner, visit))
    if origin is list:
        return {"type": "array", "items": _hint_schema(args[0], visit)}
    if inspect.isclass(hint) and dataclasses.is_dataclass(hint):
        return ref(visit(hint))
    if inspect.isclass(hint) and issubclass(hint, enum.Enum):
        return {"type": "string", "enum": [m.value for m in hint]}
    if hint in _SCALARS:
        return dict(_SCALARS[hint])
    raise TypeError(f"no JSON Schema for {hint!r}: teach monitor/openapi.py this type")


def _own_doc(cls: type[Any]) -> str | None:
    """A class's own docstring (not the signature dataclasses make up in its absence)."""
    doc = cls.__dict__.get("__doc__")
    if not doc or doc.startswith(f"{cls.__name__}("):
        return None
    return inspect.cleandoc(doc)


def contract_schemas() -> dict[str, Schema]:
    """Return the schemas of `callmon.call/v1` and `callmon.samples/v1`, with every class
    they reach, generated from the dataclasses."""
    docs = {name: {f: d for f, _, d in rows} for name, rows in field_docs().items()}
    out: dict[str, Schema] = {}

    def visit(cls: type[Any]) -> str:
        name = cls.__name__
        if name in out:
            return name
        out[name] = {}  # taken: a class that refers back to itself is not walked twice
        hints = typing.get_type_hints(cls)
        properties: dict[str, Schema] = {}
        required: list[str] = []
        for f in dataclasses.fields(cls):
            schema = _hint_schema(hints[f.name], visit)
            if f.name == "schema" and isinstance(f.default, str):
                # ingest tells the two documents apart by it: required, and one value
                schema = {"const": f.default}
                required.append(f.name)
            elif f.default is not dataclasses.MISSING:
                value = f.default
                schema["default"] = value.value if isinstance(value, enum.Enum) else value
            elif f.default_factory is dataclasses.MISSING:
                required.append(f.name)
            properties[f.name] = described(schema, docs[name][f.name])
        schema = obj(
            _own_doc(cls) or f"`{name}` (callmon/callresult.py).",
            properties,
            required=required,
            closed=True,
        )
        out[name] = schema
        return name

    for root in (CallResult, SampleBatch):
        visit(root)
        # ingest's own check on top of the contract (monitor/ingest.py)
        out[root.__name__]["properties"]["id"].update(minLength=1, maxLength=MAX_ID)
    out[CallResult.__name__]["description"] += f" The `{SCHEMA}` document."
    out[SampleBatch.__name__]["description"] += f" The `{SAMPLES_SCHEMA}` document."
    return out


def sample_field(path: str) -> Schema:
    """The schema of one dotted field of a `Sample` (`video.freezes`), with its doc."""
    cls: type[Any] = Sample
    *parents, name = path.split(".")
    for part in parents:
        cls = typing.get_type_hints(cls)[part]
    schema = _hint_schema(typing.get_type_hints(cls)[name], lambda c: c.__name__)
    doc = {f: d for f, _, d in field_docs()[cls.__name__]}[name]
    return described(schema, doc)


# --- the monitor's own shapes -------------------------------------------------------------------

ERROR = obj(
    "What was wrong; for bad input, which field (a dotted path into the body, or the name "
    "of a query or path parameter).",
    {
        "error": string("What was wrong, in words."),
        "field": string("The field at fault, e.g. `[3].samples[0].audio.loss` or `limit`."),
    },
    required=["error"],
    closed=True,
)

SCOPE = obj(
    "What an incident is about: one target from one region, a whole target, a whole region, "
    "one probe, or one Alertmanager alert.",
    {
        "kind": one_of(ScopeKind, "Kind of scope."),
        "target": string("Target URL, or `*`."),
        "region": string("Region, or `*`."),
        "name": string("Probe name or alert fingerprint; empty for other kinds."),
        "description": string("The scope in words (target-wide: likely the service)."),
    },
)

DETAILS = {
    "type": "object",
    "additionalProperties": True,
    "description": "What breached. For rule incidents: the rule, its condition, threshold and "
    "window, and per member its latest value, severity and the id of the failing result "
    "(`evidence`); for Alertmanager incidents: the alert's labels, annotations and times.",
    "properties": {
        "rule": string("Rule name."),
        "description": string("What the rule watches."),
        "condition": string("The rule's condition in words."),
        "metric": string("The rule's metric: a dotted path into a result or a sample."),
        "op": string("The rule's comparison."),
        "raise_at": {"type": "array", "description": "Further thresholds that raise the severity."},
        "threshold": {"description": "The rule's threshold (a pair for `outside`)."},
        "window": {"type": "object", "description": "k of n evaluations."},
        "scope": string("The scope in words."),
        "conditions": array(
            {
                "type": "object",
                "properties": {
                    "target": string("Target URL (`probe:NAME` for a probe)."),
                    "region": string("Region."),
                    "value": {"description": "Latest value."},
                    "severity": one_of(Severity, "Severity of this member."),
                    "since": nullable(timestamp("Firing since.")),
                    "breaches": integer("Breaching evaluations in the window."),
                    "evaluations": integer("Evaluations in the window."),
                    "evidence": nullable(string("Id of the result that breached last.")),
                },
            },
            "One row per member (target and region) of the incident.",
        ),
        "source": string("`alertmanager` for incidents from Alertmanager."),
        "labels": strings("The alert's labels."),
        "annotations": strings("The alert's annotations."),
    },
}

INCIDENT = obj(
    "An incident as the API and the notifications show it.",
    {
        "id": integer("Incident id.", minimum=1),
        "key": string("Dedup key: rule and scope (severity is not part of it)."),
        "rule": string("Rule name (`alertmanager:NAME` for Alertmanager alerts)."),
        "scope": ref("Scope"),
        "title": string("Title."),
        "severity": one_of(Severity, "Severity tier."),
        "state": one_of(State, "State."),
        "opened_at": timestamp("When it first opened (timers count from here)."),
        "acknowledged_at": nullable(timestamp("First acknowledgement.")),
        "resolved_at": nullable(timestamp("Resolution (null while open).")),
        "ack_due": timestamp("Acknowledgement deadline."),
        "resolve_due": timestamp("Resolution deadline."),
        "ack_breached": boolean("The acknowledgement deadline was missed."),
        "resolve_breached": boolean("The resolution deadline was missed."),
        "escalation_level": integer("Escalation levels walked so far.", minimum=0),
        "reopened": integer("Times it reopened.", minimum=0),
        "reopened_at": nullable(
            timestamp("The latest reopening (the acknowledgement clock restarts there).")
        ),
        "details": ref("IncidentDetails"),
    },
)

TIMELINE_EVENT = obj(
    "One line of the append-only timeline: who, when, what, why.",
    {
        "id": integer("Event id.", minimum=1),
        "at": timestamp("When."),
        "actor": string("Operator name, or `callmon` for automatic transitions."),
        "kind": string(
            "What: opened, reopened, severity_raised, severity_changed, acknowledged, "
            "resolved, comment, ack_breached, resolve_breached, escalated (more may come)."
        ),
        "text": string("Why, or the comment."),
        "data": {"type": "object", "description": "Facts of the event (e.g. from/to severity)."},
    },
)

COMMENT = obj(
    "An operator's comment (also on the timeline).",
    {"at": timestamp("When."), "author": string("Operator."), "text": string("Text.")},
)

NOTIFICATION = obj(
    "One notification of an incident's transition to one channel, and its delivery state.",
    {
        "id": integer("Notification id.", minimum=1),
        "channel": string("Channel name from the configuration."),
        "event": string(
            "Transition: trigger, acknowledge, resolve, escalate, breach, severity, reopen."
        ),
        "state": {
            "type": "string",
            "enum": ["pending", "sending", "sent", "failed"],
            "description": "Delivery state.",
        },
        "attempts": integer("Delivery attempts so far.", minimum=0),
        "created_at": timestamp("When it was queued."),
        "next_attempt_at": nullable(timestamp("Next attempt, while pending.")),
        "sent_at": nullable(timestamp("When it was delivered.")),
        "last_error": nullable(string("Why the last attempt failed.")),
    },
)

EVIDENCE = obj(
    "A stored probe document an incident cites, as the probe sent it.",
    {
        "probe": string("Probe that sent it (from its token)."),
        "region": string("The probe's region (from its token)."),
        "received_at": timestamp("When the monitor stored it."),
        "body": ref("ProbeDocument"),
    },
)

TICKET = obj(
    "One incident with everything about it.",
    {
        "incident": ref("Incident"),
        "timeline": array(ref("TimelineEvent"), "Every event, oldest first."),
        "comments": array(ref("Comment"), "The comments, oldest first."),
        "notifications": array(ref("Notification"), "Every notification, oldest first."),
        "evidence": {
            "type": "object",
            "additionalProperties": ref("Evidence"),
            "description": "The results the incident's conditions cite, by result id.",
        },
    },
)

SILENCE = obj(
    "A maintenance window: no incident opens for its target and/or region while it lasts.",
    {
        "id": integer("Silence id.", minimum=1),
        "target": nullable(string("Target URL (null: every target).")),
        "region": nullable(string("Region (null: every region).")),
        "starts_at": timestamp("Start."),
        "ends_at": timestamp("End (moved to now when ended early)."),
        "created_by": string("Operator who set it."),
        "reason": string("Why."),
        "created_at": timestamp("When it was set."),
    },
)

_MATRIX_NUMBERS = {
    "connect_s": "Connect time of the latest call.",
    "jitter_audio_s": "Audio jitter of the latest reliable second.",
    "jitter_video_s": "Video jitter of the latest reliable second.",
    "loss_audio": "Audio loss of the latest reliable second, 0..1.",
    "loss_video": "Video loss of the latest reliable second, 0..1.",
    "rtt_s": "RTT of the latest reliable second.",
    "av_offset_s": "A/V offset of the latest reliable second (positive: audio ahead).",
    "mos": "Estimated MOS of the latest reliable second.",
    "freeze_ratio": "Share of recent seconds frozen, 0..1.",
    "last_result_age_s": "Seconds since the latest result or batch.",
    "success": "Latest call: 1 ok or degraded, 0 failed.",
}

MATRIX_CELL = obj(
    "The latest numbers of one target seen from one region, and the rules firing for it.",
    {
        "target": string("Target URL."),
        "region": string("Region."),
        **{name: nullable(number(text)) for name, text in _MATRIX_NUMBERS.items()},
        "last_result_at": nullable(timestamp("When the latest result or batch arrived.")),
        "firing": array(
            obj(
                "A rule firing now.",
                {"rule": string("Rule name."), "severity": one_of(Severity, "Its severity.")},
            ),
            "Rules whose condition holds now for this pair.",
        ),
    },
)

MATRIX = obj(
    "Targets x regions.",
    {
        "generated_at": timestamp("The monitor's clock."),
        "targets": array(string("Target URL."), "Every target seen, sorted."),
        "regions": array(string("Region."), "Every region seen, sorted."),
        "cells": array(ref("MatrixCell"), "One per (target, region) pair seen."),
    },
)


def sample_row() -> Schema:
    fields = {path: nullable(sample_field(path)) for path in SAMPLE_FIELDS}
    return obj(
        "One second of one probe's call; the dotted keys are the `Sample` fields of that "
        "name (null when the second did not carry them).",
        {
            "at": timestamp(
                "When the second ended, by the monitor's clock: a document's last second "
                "at its receipt, earlier ones counted back by `t_s`."
            ),
            "region": string("Region of the probe."),
            "probe": string("Probe name."),
            "call_id": string("Id of the call (the result id, or a batch's `call_id`)."),
            "t_s": sample_field("t_s"),
            "reliable": sample_field("reliable"),
            **fields,
        },
    )


SAMPLES = obj(
    "Per-second samples of a target over a time window, oldest first.",
    {
        "target": string("Target URL."),
        "since": timestamp("Window start."),
        "until": timestamp("Window end."),
        "samples": array(ref("SampleRow"), "The seconds, oldest first."),
    },
)

RECEIPT = obj(
    "What was stored: a 200 means on disk; a resend gets the same answer.",
    {
        "probe": string("Probe name, from its token."),
        "region": string("Probe region, from its token."),
        "results": array(
            obj(
                "One stored document.",
                {
                    "id": string("Result or batch id."),
                    "received_at": timestamp("When it was first stored (the same on a resend)."),
                },
            ),
            "One per document sent, in order.",
        ),
    },
)

WHOAMI = {
    "description": "Who the caller's credentials say it is.",
    "oneOf": [
        obj(
            "A probe.",
            {
                "role": {"const": "probe"},
                "name": string("Probe name."),
                "region": string("Region."),
                "interval_s": number("How often it is expected to report.", exclusiveMinimum=0),
            },
        ),
        obj("An operator.", {"role": {"const": "operator"}, "name": string("Operator name.")}),
    ],
}

HEALTH = obj(
    "The monitor is up.",
    {
        "status": {"const": "ok"},
        "open_incidents": integer("Incidents not resolved.", minimum=0),
        "started_at": timestamp("When the monitor started."),
    },
)

ALERT = {
    "type": "object",
    "description": "One alert of an Alertmanager group.",
    "required": ["status", "labels", "fingerprint"],
    "properties": {
        "status": {"type": "string", "enum": ["firing", "resolved"]},
        "labels": {
            **strings(
                "`alertname` names it; `target` (or `instance`) and `region` place it; "
                "`severity`: critical or page -> urgent, error or warning -> important, "
                "else normal."
            ),
            "required": ["alertname"],
            "properties": {"alertname": {"type": "string", "minLength": 1}},
        },
        "annotations": strings("`summary` becomes the incident's title."),
        "fingerprint": string("Alertmanager's id of the alert: the incident key.", minLength=1),
        "startsAt": string("When it started firing."),
        "endsAt": string("When it ended."),
        "generatorURL": string("Where it came from."),
    },
}

ALERTMANAGER_WEBHOOK = {
    "type": "object",
    "description": "Alertmanager's webhook payload, version 4 (other keys are ignored).",
    "required": ["version", "alerts"],
    "properties": {
        "version": {"const": "4"},
        "alerts": array(ref("Alert"), "The group's alerts."),
        "receiver": string("Receiver name."),
        "groupKey": string("Group key."),
        "externalURL": string("Alertmanager's URL."),
    },
}

_TIME = {
    "oneOf": [
        {"type": "string", "format": "date-time", "description": "RFC 3339 with a time zone."},
        {"type": "number", "exclusiveMinimum": 0, "description": "Unix seconds."},
    ]
}
_WHY = {"type": "string", "pattern": r"\S", "description": "Why (not blank)."}

REQUEST_BODIES: dict[str, Schema] = {
    "Acknowledge": obj(
        "Acknowledge; the body may be left out.",
        {"note": string("Note for the timeline.")},
        required=[],
    ),
    "Resolve": obj("Resolve.", {"reason": _WHY}),
    "NewComment": obj("A comment.", {"text": described(_WHY, "The comment (not blank).")}),
    "SeverityChange": obj(
        "Change the severity; the deadlines move, still counted from the opening.",
        {"severity": one_of(Severity, "New severity."), "reason": _WHY},
    ),
    "NewSilence": {
        **obj(
            "A maintenance window for a target, a region or both.",
            {
                "target": nullable(string("Target URL.", minLength=1)),
                "region": nullable(string("Region.", minLength=1)),
                "starts_at": described(_TIME, "Start (default: now)."),
                "ends_at": described(_TIME, "End; or give `duration_s`."),
                "duration_s": number("Length from `starts_at`.", exclusiveMinimum=0),
                "reason": _WHY,
            },
            required=["reason"],
        ),
        "allOf": [
            {"anyOf": [{"required": ["target"]}, {"required": ["region"]}]},
            {"anyOf": [{"required": ["ends_at"]}, {"required": ["duration_s"]}]},
        ],
    },
    "SignIn": obj(
        "Sign in with an operator token.",
        {"token": string("The operator's bearer token.", minLength=1)},
    ),
}


def schemas() -> dict[str, Schema]:
    """Every component schema: the contract's, generated, then the monitor's own."""
    documents = [ref(CallResult.__name__), ref(SampleBatch.__name__)]
    return {
        **contract_schemas(),
        "ProbeDocument": {
            "description": f"A `{SCHEMA}` result or a `{SAMPLES_SCHEMA}` batch.",
            "oneOf": documents,
            "discriminator": {
                "propertyName": "schema",
                "mapping": {
                    SCHEMA: documents[0]["$ref"],
                    SAMPLES_SCHEMA: documents[1]["$ref"],
                },
            },
        },
        "Ingest": {
            "description": f"One document, or a list of 1 to {MAX_ITEMS}: all are stored, or "
            "none (a bad item is a 400 naming its field).",
            "oneOf": [
                ref("ProbeDocument"),
                array(ref("ProbeDocument"), "Documents.", minItems=1, maxItems=MAX_ITEMS),
            ],
        },
        "Receipt": RECEIPT,
        "Whoami": WHOAMI,
        "Error": ERROR,
        "Scope": SCOPE,
        "IncidentDetails": DETAILS,
        "Incident": INCIDENT,
        "TimelineEvent": TIMELINE_EVENT,
        "Comment": COMMENT,
        "Notification": NOTIFICATION,
        "Evidence": EVIDENCE,
        "Ticket": TICKET,
        "Silence": SILENCE,
        "MatrixCell": MATRIX_CELL,
        "Matrix": MATRIX,
        "SampleRow": sample_row(),
        "Samples": SAMPLES,
        "Health": HEALTH,
        "Alert": ALERT,
        "AlertmanagerWebhook": ALERTMANAGER_WEBHOOK,
        **REQUEST_BODIES,
    }


# --- operations ---------------------------------------------------------------------------------

ERRORS = {
    400: ("BadRequest", "Bad input: the body or a parameter; `field` names it."),
    401: ("Unauthorized", "No credentials, or unknown ones."),
    403: (
        "Forbidden",
        f"The credentials' role may not use this route, or a cookie write lacks the "
        f"`{CSRF_HEADER}` header.",
    ),
    404: ("NotFound", "No such object."),
    409: ("Conflict", "The action does not apply in the incident's state."),
    413: ("PayloadTooLarge", "The body exceeds the route's limit."),
    415: ("UnsupportedMediaType", "The body is not `application/json`."),
}

ROLES = {
    "probe": "a probe token",
    "operator": "an operator (token or web session)",
    "reader": "an operator; anyone when the configuration sets `anonymous_read`",
    "probe or operator": "a probe or an operator",
    "anyone": "no credentials",
}


def security(role: str, write: bool) -> list[dict[str, list[str]]]:
    """Who may call: bearer tokens by role; the UI's session cookie (writes: with the
    CSRF header too) for operator routes."""
    session = {"session": ["operator"], **({"csrf": []} if write else {})}
    return {
        "probe": [{"bearer": ["probe"]}],
        "operator": [{"bearer": ["operator"]}, session],
        "reader": [{"bearer": ["operator"]}, session],
        "probe or operator": [{"bearer": ["probe"]}, {"bearer": ["operator"]}, session],
        "anyone": [],
    }[role]


def json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def operation(
    operation_id: str,
    summary: str,
    *,
    tag: str,
    role: str,
    ok: Schema | None,
    method: str = "get",
    status: int = 200,
    description: str = "",
    body: Schema | None = None,
    body_bytes: str | None = None,
    body_required: bool = True,
    parameters: Iterable[Schema] = (),
    errors: Iterable[int] = (),
    headers: dict[str, Any] | None = None,
    special: dict[int, Schema] | None = None,
) -> tuple[str, Schema]:
    """One operation; the error responses that follow from its role and body are added."""
    codes = set(errors)
    if role != "anyone":
        codes |= {401, 403}
    if role == "probe or operator":
        codes.discard(403)
    text = [description] if description else []
    text.append(f"Who: {ROLES[role]}.")
    out: Schema = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "x-callmon-role": role,
        "security": security(role, write=method != "get"),
    }
    if parameters:
        out["parameters"] = list(parameters)
    if body is not None:
        codes |= {400, 413, 415}
        out["requestBody"] = {"required": body_required, "content": json_content(body)}
        if body_bytes:
            text.append(f"Body limit: {body_bytes}.")
    out["description"] = " ".join(text)
    answer: Schema = {"description": summary}
    if ok is not None:
        answer["content"] = json_content(ok)
    if headers:
        answer["headers"] = headers
    responses: dict[str, Any] = {str(status): answer}
    for code in sorted(codes | set(special or {})):
        responses[str(code)] = (special or {}).get(code) or ref(ERRORS[code][0], "responses")
    out["responses"] = responses
    return method, out


def query(name: str, schema: Schema, description: str, required: bool = False) -> Schema:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": schema,
    }


def paths() -> dict[str, dict[str, Schema]]:
    incident_id = ref("IncidentId", "parameters")
    incident = {"incident": ref("Incident")}
    operator_body = f"{OPERATOR_BODY_BYTES} bytes"

    def act(name: str, summary: str, body: str, required: bool = True) -> tuple[str, Schema]:
        return operation(
            name,
            summary,
            tag="incidents",
            role="operator",
            method="post",
            ok=obj("The incident after the action.", incident),
            body=ref(body),
            body_bytes=operator_body,
            body_required=required,
            parameters=[incident_id],
            errors=[404, 409],
        )

    table: list[tuple[str, tuple[str, Schema]]] = [
        (
            "/api/v1/results",
            operation(
                "postResults",
                "Ingest call results and sample batches",
                tag="ingest",
                role="probe",
                method="post",
                description="The probe's name and region come from its token, never the body.",
                body=ref("Ingest"),
                body_bytes="the configuration's `max_body_bytes`",
                ok=ref("Receipt"),
            ),
        ),
        (
            "/api/v1/whoami",
            operation(
                "whoami",
                "Who the credentials say the caller is",
                tag="session",
                role="probe or operator",
                ok=ref("Whoami"),
            ),
        ),
        (
            "/api/v1/alertmanager",
            operation(
                "postAlertmanager",
                "Alertmanager webhook: alerts open, update or resolve incidents",
                tag="ingest",
                role="operator",
                method="post",
                description="Each alert is keyed by its fingerprint, so a resend updates.",
                body=ref("AlertmanagerWebhook"),
                body_bytes="the configuration's `max_body_bytes`",
                ok=obj(
                    "The incident of each alert, in order.",
                    {
                        "incidents": array(
                            nullable(integer("Incident id.")),
                            "Incident id per alert; null for a resolved alert with no incident.",
                        )
                    },
                ),
            ),
        ),
        (
            "/api/v1/incidents",
            operation(
                "listIncidents",
                "List incidents, newest first",
                tag="incidents",
                role="reader",
                parameters=[
                    query(
                        "state",
                        {"type": "string", "enum": ["open", *[s.value for s in State]]},
                        "`open`: not resolved.",
                    ),
                    query("severity", one_of(Severity, "Severity."), "Only this severity."),
                    query("target", {"type": "string"}, "Only this target (scope target)."),
                    query("region", {"type": "string"}, "Only this region (scope region)."),
                    query("rule", {"type": "string"}, "Only this rule."),
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                        "At most this many.",
                    ),
                ],
                errors=[400],
                ok=obj("Incidents.", {"incidents": array(ref("Incident"), "Newest first.")}),
            ),
        ),
        (
            "/api/v1/incidents/{id}",
            operation(
                "getIncident",
                "One ticket: incident, timeline, comments, notifications, evidence",
                tag="incidents",
                role="reader",
                parameters=[incident_id],
                errors=[400, 404],
                ok=ref("Ticket"),
            ),
        ),
        (
            "/api/v1/incidents/{id}/acknowledge",
            act("acknowledge", "Acknowledge", "Acknowledge", required=False),
        ),
        ("/api/v1/incidents/{id}/resolve", act("resolve", "Resolve", "Resolve")),
        ("/api/v1/incidents/{id}/comments", act("addComment", "Comment", "NewComment")),
        (
            "/api/v1/incidents/{id}/severity",
            act("changeSeverity", "Change the severity", "SeverityChange"),
        ),
        (
            "/api/v1/silences",
            operation(
                "listSilences",
                "List maintenance windows",
                tag="silences",
                role="reader",
                parameters=[
                    query(
                        "active",
                        {"type": "string", "enum": ["1", "true"]},
                        "Only windows in force now (any other value lists all).",
                    )
                ],
                ok=obj("Silences.", {"silences": array(ref("Silence"), "Windows.")}),
            ),
        ),
        (
            "/api/v1/silences",
            operation(
                "addSilence",
                "Set a maintenance window",
                tag="silences",
                role="operator",
                method="post",
                status=201,
                body=ref("NewSilence"),
                body_bytes=operator_body,
                ok=obj("The new window.", {"silence": ref("Silence")}),
            ),
        ),
        (
            "/api/v1/silences/{id}",
            operation(
                "endSilence",
                "End a maintenance window now",
                tag="silences",
                role="operator",
                method="delete",
                parameters=[ref("SilenceId", "parameters")],
                errors=[400, 404],
                ok=obj("The window, ended.", {"silence": ref("Silence")}),
            ),
        ),
        (
            "/api/v1/session",
            operation(
                "signIn",
                "Sign the web UI in: an operator token for a session cookie",
                tag="session",
                role="anyone",
                method="post",
                body=ref("SignIn"),
                body_bytes=f"{SESSION_BODY_BYTES} bytes",
                ok=obj("Signed in.", {"operator": string("Operator name.")}),
                special={
                    401: {
                        "description": "Not an operator token (no `WWW-Authenticate` here).",
                        "content": json_content(ref("Error")),
                    }
                },
                headers={
                    "Set-Cookie": {
                        "required": True,
                        "description": f"`{SESSION_COOKIE}`: HttpOnly, SameSite=Strict, "
                        f"for {int(SESSION_S)} s.",
                        "schema": {"type": "string"},
                    }
                },
            ),
        ),
        (
            "/api/v1/session",
            operation(
                "currentSession",
                "Who is signed in",
                tag="session",
                role="operator",
                ok=obj(
                    "The operator.",
                    {
                        "operator": string("Operator name."),
                        "anonymous_read": boolean("Anyone may read (configuration)."),
                    },
                ),
            ),
        ),
        (
            "/api/v1/session",
            operation(
                "signOut",
                "Sign out: end the session and drop the cookie",
                tag="session",
                role="anyone",
                method="delete",
                description="Needs the X-Callmon-Request header, so no other site can sign "
                "a browser out.",
                parameters=[
                    {
                        "name": "X-Callmon-Request",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                errors=[403],
                ok=obj("Signed out.", {"operator": {"type": "null"}}),
            ),
        ),
        (
            "/api/v1/matrix",
            operation(
                "matrix",
                "Targets x regions: latest numbers and firing rules",
                tag="views",
                role="reader",
                ok=ref("Matrix"),
            ),
        ),
        (
            "/api/v1/samples",
            operation(
                "samples",
                "Per-second samples of a target over a time window",
                tag="views",
                role="reader",
                parameters=[
                    query("target", {"type": "string", "minLength": 1}, "Target URL.", True),
                    query("region", {"type": "string"}, "Only this region."),
                    query(
                        "since",
                        {"type": "string", "format": "date-time"},
                        "Window start, RFC 3339 (default: 15 minutes before `until`).",
                    ),
                    query(
                        "until",
                        {"type": "string", "format": "date-time"},
                        "Window end, RFC 3339 (default: now).",
                    ),
                    query(
                        "limit",
                        {"type": "integer", "minimum": 1, "maximum": 50_000, "default": 5000},
                        "At most this many seconds.",
                    ),
                ],
                errors=[400],
                ok=ref("Samples"),
            ),
        ),
        (
            "/api/v1/openapi.json",
            operation(
                "openapi",
                "This document",
                tag="health",
                role="anyone",
                ok={"type": "object", "description": "OpenAPI 3.1."},
            ),
        ),
        (
            "/healthz",
            operation("healthz", "Liveness", tag="health", role="anyone", ok=ref("Health")),
        ),
        ("/metrics", metrics_operation()),
    ]
    out: dict[str, dict[str, Schema]] = {}
    for path, (method, op) in table:
        out.setdefault(path, {})[method] = op
    return out


def metrics_operation() -> tuple[str, Schema]:
    method, op = operation(
        "metrics",
        "Prometheus metrics",
        tag="health",
        role="anyone",
        ok=None,
        description="The text format; OpenMetrics when the `Accept` header asks for it.",
    )
    op["responses"]["200"]["content"] = {
        "text/plain": {"schema": {"type": "string"}},
        "application/openmetrics-text": {"schema": {"type": "string"}},
    }
    return method, op


def _id_parameter(what: str) -> Schema:
    return {
        "name": "id",
        "in": "path",
        "required": True,
        "description": f"{what} id.",
        "schema": {"type": "integer", "minimum": 1, "maximum": 2**62},
    }


def _build() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "info": {
            "title": "callmon monitor",
            "version": CALLMON_VERSION,
            "description": "Probe ingest, incidents, silences and the web UI's views. "
            'Every error body is `{"error": ..., "field": ...}`. Timestamps are RFC 3339 '
            "UTC; numbers are in seconds, bits per second and fractions 0..1.",
        },
        "tags": [
            {"name": name, "description": text}
            for name, text in (
                ("ingest", "Probe results and Alertmanager alerts in."),
                ("incidents", "Tickets and what operators do with them."),
                ("silences", "Maintenance windows."),
                ("session", "Who is calling; the web UI's sign-in."),
                ("views", "What the web UI shows."),
                ("health", "Liveness, metrics, this document."),
            )
        ],
        "paths": paths(),
        "components": {
            "schemas": schemas(),
            "responses": {
                name: {
                    "description": text,
                    "content": json_content(ref("Error")),
                    **(
                        {
                            "headers": {
                                "WWW-Authenticate": {
                                    "description": 'Bearer realm="callmon"',
                                    "required": True,
                                    "schema": {"type": "string"},
                                }
                            }
                        }
                        if code == 401
                        else {}
                    ),
                }
                for code, (name, text) in ERRORS.items()
            },
            "parameters": {
                "IncidentId": _id_parameter("Incident"),
                "SilenceId": _id_parameter("Silence"),
            },
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A probe's or an operator's token (`callmon token`). "
                    "Requirements name the role: `probe` or `operator`.",
                },
                "session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": SESSION_COOKIE,
                    "description": "The web UI's operator session from `POST /api/v1/session`.",
                },
                "csrf": {
                    "type": "apiKey",
                    "in": "header",
                    "name": CSRF_HEADER,
                    "description": "Required (any value) with the session cookie on every "
                    "write: a page of another site cannot add it.",
                },
            },
        },
    }
