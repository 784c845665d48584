"""The OpenAPI document against the real monitor.

Both directions between the document's operations and the app's routes; the document is
valid OpenAPI 3.1 (openapi-spec-validator) whose schemas are valid JSON Schema 2020-12 and
whose references all resolve; the generated contract schemas accept and refuse what
ingest does; the served document is `document()`; and a real monitor on a real socket
answers every documented operation with a status the document lists and a body its
schema accepts (with unknown keys refused: a new field must be documented). Request
bodies that the monitor takes must fit the documented schema, and ones it refuses for a
body field must not.
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema  # type: ignore[import-untyped]
import pytest
from aiohttp import web
from monitorkit import (
    OPERATOR_TOKEN,
    PROBES,
    TARGET_A,
    Clock,
    Monitor,
    batch,
    make_config,
    monitor,
    receiver,
    result,
    sample,
)
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from callmon.callresult import ContractError, Degradation, Failure, Phase, Route, Status
from monitor.app import create_app
from monitor.ingest import MAX_ITEMS, parse_items
from monitor.openapi import document

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
BASE = "urn:callmon:openapi"
PROBE_TOKEN = PROBES["probe-eu"][1]


def operations(doc: Mapping[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if method in METHODS:
                yield method.upper(), path, op


def app_routes(tmp_path: Path) -> set[tuple[str, str]]:
    """(method, path) of every route the real app serves, but HEAD, `/` and static files."""
    app = create_app(make_config(tmp_path))
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None
        and route.method != "HEAD"
        and not isinstance(route.resource, web.StaticResource)
        and route.resource.canonical != "/"
    }


def test_every_route_is_documented_and_every_operation_is_a_route(tmp_path: Path) -> None:
    served = app_routes(tmp_path)
    documented = {(method, path) for method, path, _ in operations(document())}
    assert served - documented == set(), "routes the document lacks"
    assert documented - served == set(), "documented operations no route serves"
    assert ("GET", "/metrics") in documented
    assert ("GET", "/healthz") in documented


# --- the document itself --------------------------------------------------------------------------


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from refs(value)


def pointer(doc: Mapping[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), ref
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def test_the_document_is_valid_openapi_3_1() -> None:
    doc = document()
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)
    for name, schema in doc["components"]["schemas"].items():
        try:
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            pytest.fail(f"components/schemas/{name}: {exc.message}")
    for ref in set(refs(doc)):
        pointer(doc, ref)  # raises if it does not resolve
    ids = [op["operationId"] for _, _, op in operations(doc)]
    assert len(ids) == len(set(ids)), "operation ids are unique"
    schemes = doc["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert (schemes["session"]["in"], schemes["session"]["name"]) == ("cookie", "callmon_session")
    assert (schemes["csrf"]["in"], schemes["csrf"]["name"]) == ("header", "X-Callmon-Request")
    for method, path, op in operations(doc):
        where = f"{method} {path}"
        role = op["x-callmon-role"]
        security = op["security"]
        assert all(set(requirement) <= set(schemes) for requirement in security), where
        if role == "anyone":
            assert security == [], where
        else:
            assert "401" in op["responses"], where
        if role == "probe":
            assert security == [{"bearer": ["probe"]}], where
        if role in ("operator", "reader"):
            assert {"bearer": ["operator"]} in security, where
            cookie = [r for r in security if "session" in r]
            assert cookie == [
                {"session": ["operator"], **({} if method == "GET" else {"csrf": []})}
            ]
        for name in re.findall(r"{(\w+)}", path):
            declared = [
                pointer(doc, p["$ref"]) if "$ref" in p else p for p in op.get("parameters", [])
            ]
            assert any(p["in"] == "path" and p["name"] == name for p in declared), where
        if "requestBody" in op:
            assert {"400", "413", "415"} <= set(op["responses"]), where


def test_the_contract_schemas_are_generated_from_callresult() -> None:
    schemas = document()["components"]["schemas"]
    call = schemas["CallResult"]
    assert call["properties"]["schema"] == {
        "const": "callmon.call/v1",
        "description": "Always `callmon.call/v1`.",
    }
    assert call["properties"]["status"]["enum"] == ["ok", "degraded", "failed"]
    assert set(call["required"]) == {
        "schema",
        "id",
        "started_at",
        "target",
        "probe",
        "duration_s",
        "status",
    }
    assert call["properties"]["failure"]["anyOf"] == [
        {"$ref": "#/components/schemas/Failure"},
        {"type": "null"},
    ]
    video = schemas["VideoSample"]["properties"]
    assert video["jitter_s"]["type"] == ["number", "null"]
    assert video["freezes"] == {
        "type": "integer",
        "default": 0,
        "description": "Freezes (W3C rule over frames the network delivered complete) "
        "that ended in this second.",
    }
    assert schemas["Thresholds"]["properties"]["mos"]["default"] == 3.5
    row = schemas["SampleRow"]["properties"]
    assert row["video.freezes"]["type"] == ["integer", "null"]
    assert row["audio.loss"]["description"] == "Lost on first transmission / expected, 0..1."


def full_result() -> dict[str, Any]:
    body = result(status=Status.DEGRADED, samples=[sample(1.0), sample(2.0, av=None)])
    body["route"] = Route(
        local_candidate="host", remote_candidate="host", remote_address="127.0.0.1:5000"
    ).__dict__
    body["degradations"] = [
        Degradation(metric="video.freezes", value=1, threshold=0, comparison=">").__dict__
    ]
    return body


def mutated(path: str, value: Any, delete: bool = False) -> Any:
    body = full_result()
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node: Any = body
    for part in parents:
        node = node[part]
    if delete:
        del node[last]
    else:
        node[last] = value
    return body


FAILED = result(status=Status.FAILED, samples=[])
FAILED["failure"] = {"phase": Phase.ICE.value, "reason": "no pair"}

CONTRACT_CASES: list[tuple[str, Any]] = [
    ("a full result", full_result()),
    ("a failed result", FAILED),
    ("a sample batch", batch("call-1", [sample(1.0)])),
    ("a list", [full_result(), batch("call-1", [sample(1.0)])]),
    ("an empty list", []),
    ("a list too long", [full_result()] * (MAX_ITEMS + 1)),
    ("an unknown field", mutated("colour", "red")),
    ("an unknown nested field", mutated("samples.0.audio.colour", "red")),
    ("no id", mutated("id", None, delete=True)),
    ("an empty id", mutated("id", "")),
    ("an id too long", mutated("id", "x" * 129)),
    ("no schema", mutated("schema", None, delete=True)),
    ("another schema", mutated("schema", "callmon.call/v2")),
    ("no target url", mutated("target.url", None, delete=True)),
    ("a bad status", mutated("status", "great")),
    ("a bad failure phase", mutated("failure", {"phase": "lunch", "reason": "x"})),
    ("a failure", mutated("failure", Failure(phase=Phase.DTLS, reason="x").__dict__)),
    ("a text number", mutated("duration_s", "5")),
    ("a boolean number", mutated("duration_s", True)),
    ("an integer number", mutated("duration_s", 5)),
    ("a fractional integer", mutated("summary.unreliable_s", 1.5)),
    ("a null sample time", mutated("samples.0.t_s", None)),
    ("a null measurement", mutated("samples.0.rtt_s", None)),
    ("a null route", mutated("route", None)),
    ("a null list", mutated("samples", None)),
    ("a sample that is not an object", mutated("samples.0", 3)),
    ("a bad signaling", mutated("target.signaling", "sip")),
    ("janus", mutated("target.signaling", "janus")),
]


@dataclass
class Validators:
    """Schemas of one document, references resolved; `strict` refuses undocumented keys."""

    doc: dict[str, Any]
    strict: bool = False
    _registry: Registry[Any] = field(init=False)

    def __post_init__(self) -> None:
        contents = close_objects(copy.deepcopy(self.doc)) if self.strict else self.doc
        self._registry = Registry().with_resource(BASE, DRAFT202012.create_resource(contents))

    def errors(self, location: str, instance: Any) -> list[str]:
        """Validate against the schema at a JSON pointer (`#/components/schemas/Ingest`)."""
        validator = jsonschema.Draft202012Validator(
            {"$ref": BASE + location},
            registry=self._registry,
            format_checker=jsonschema.FormatChecker(),
        )
        found = validator.iter_errors(instance)
        return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in found]


def at(*parts: str) -> str:
    """A JSON pointer into the document."""
    return "#/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def close_objects(node: Any) -> Any:
    """Refuse keys a schema does not name, unless it says more may come."""
    if isinstance(node, dict):
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for value in node.values():
            close_objects(value)
    elif isinstance(node, list):
        for value in node:
            close_objects(value)
    return node


@pytest.mark.parametrize(("case", "body"), CONTRACT_CASES, ids=[c for c, _ in CONTRACT_CASES])
def test_the_ingest_schema_accepts_what_ingest_accepts(case: str, body: Any) -> None:
    try:
        parse_items(body)
        accepted = True
    except ContractError:
        accepted = False
    errors = Validators(document()).errors(at("components", "schemas", "Ingest"), body)
    assert (errors == []) == accepted, (case, accepted, errors[:3])


# --- a real monitor ------------------------------------------------------------------------------


async def test_the_served_document_is_document(tmp_path: Path) -> None:
    async with (
        monitor(make_config(tmp_path), Clock()) as m,
        m.http.get(m.url + "/api/v1/openapi.json") as response,
    ):
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.json() == document()


@dataclass
class Checked:
    """Calls a real monitor and checks each answer against the document."""

    m: Monitor
    doc: dict[str, Any] = field(default_factory=document)
    seen: set[tuple[str, str, str]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.responses = Validators(self.doc, strict=True)
        self.requests = Validators(self.doc)

    async def __call__(
        self,
        method: str,
        template: str,
        *,
        expect: int,
        body: Any = None,
        token: str | None = OPERATOR_TOKEN,
        params: Mapping[str, str] | None = None,
        raw: bytes | None = None,
        content_type: str = "application/json",
        headers: Mapping[str, str] | None = None,
        **path: Any,
    ) -> Any:
        op = self.doc["paths"][template][method.lower()]
        url = self.m.url + template.format(**path)
        sent = {"Authorization": f"Bearer {token}"} if token else {}
        sent.update(headers or {})
        if body is not None:
            raw = json.dumps(body).encode()
        if raw is not None:
            sent["Content-Type"] = content_type
        async with self.m.http.request(
            method, url, data=raw, params=params, headers=sent
        ) as response:
            text = await response.text()
            status = response.status
            answer_type = response.content_type
            answer_headers = response.headers
        where = f"{method} {template} -> {status}"
        assert status == expect, (where, text)
        documented = op["responses"].get(str(status))
        assert documented is not None, f"{where}: status not documented"
        location = at("paths", template, method.lower(), "responses", str(status))
        if "$ref" in documented:
            location = documented["$ref"]
            documented = pointer(self.doc, location)
        for header, about in documented.get("headers", {}).items():
            if about.get("required"):
                assert header in answer_headers, f"{where}: no {header} header"
        self.seen.add((method, template, str(status)))
        if answer_type != "application/json":
            assert answer_type in documented["content"], where
            return text
        data = json.loads(text)
        errors = self.responses.errors(f"{location}/content/application~1json/schema", data)
        assert errors == [], (where, errors, data)
        if body is not None:
            self.check_request(op, template, method, status, body, data)
        return data

    def check_request(
        self, op: Mapping[str, Any], template: str, method: str, status: int, body: Any, answer: Any
    ) -> None:
        """The documented request schema agrees with the monitor about the body."""
        where = f"{method} {template} -> {status}"
        assert "requestBody" in op, f"{where}: takes no documented body"
        location = at("paths", template, method.lower(), "requestBody", "content")
        errors = self.requests.errors(f"{location}/application~1json/schema", body)
        if status < 300:
            assert errors == [], (where, "an accepted body the document refuses", errors)
        elif status == 400 and answer.get("field") not in (None, "id"):
            assert errors != [], (where, "a refused body the document accepts", answer)


def alert(status: str) -> dict[str, Any]:
    return {
        "version": "4",
        "status": status,
        "receiver": "callmon",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
        "externalURL": "http://alertmanager:9093",
        "alerts": [
            {
                "status": status,
                "labels": {"alertname": "Hot", "severity": "warning", "target": TARGET_A},
                "annotations": {"summary": "hot"},
                "startsAt": "2027-01-15T08:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": "f00d",
            }
        ],
    }


async def test_real_answers_fit_the_documented_schemas(tmp_path: Path) -> None:
    clock = Clock()
    async with receiver() as hook:
        config = make_config(
            tmp_path,
            channels=[{"name": "hook", "type": "webhook", "url": hook.url}],
            notify={"important": ["hook"], "urgent": ["hook"], "normal": ["hook"]},
        )
        async with monitor(config, clock) as m:
            call = Checked(m)
            await exercise(call, m, clock)
    documented = {(method, path) for method, path, _ in operations(call.doc)}
    answered = {(method, path) for method, path, status in call.seen if int(status) < 300}
    assert documented - answered == set(), "operations never answered with success here"


async def exercise(call: Checked, m: Monitor, clock: Clock) -> None:
    results = "/api/v1/results"
    # who is calling
    assert (await call("GET", "/api/v1/whoami", expect=200, token=PROBE_TOKEN))["role"] == "probe"
    assert (await call("GET", "/api/v1/whoami", expect=200))["role"] == "operator"
    await call("GET", "/api/v1/whoami", expect=401, token=None)

    # ingest: one result, a list, a batch; then what is refused
    receipt = await call("POST", results, expect=200, token=PROBE_TOKEN, body=full_result())
    assert receipt["region"] == "eu-west"
    await call(
        "POST",
        results,
        expect=200,
        token=PROBE_TOKEN,
        body=[result(samples=[sample(1.0, freezes=1)]), batch("call-1", [sample(2.0)])],
    )
    bad = full_result()
    bad["samples"][0]["audio"]["loss"] = "lots"
    error = await call("POST", results, expect=400, token=PROBE_TOKEN, body=bad)
    assert error == {"error": "expected a number", "field": "samples[0].audio.loss"}
    error = await call("POST", results, expect=400, token=PROBE_TOKEN, raw=b"{nope")
    assert "field" not in error
    await call("POST", results, expect=401, token="nobody", body=full_result())
    await call("POST", results, expect=403, body=full_result())
    await call("POST", results, expect=415, token=PROBE_TOKEN, raw=b"{}", content_type="text/plain")
    await call(
        "POST",
        results,
        expect=413,
        token=PROBE_TOKEN,
        body={"schema": "callmon.call/v1", "pad": "x" * 2_000_000},
    )
    failing = [result(status=Status.FAILED, samples=[]) for _ in range(2)]
    for body in failing:
        clock.advance(60)
        await call("POST", results, expect=200, token=PROBES["probe-us"][1], body=body)

    # incidents: list, filter, one ticket
    listing = await call("GET", "/api/v1/incidents", expect=200, params={"state": "open"})
    (incident,) = [i for i in listing["incidents"] if i["rule"] == "call_failed"]
    iid = incident["id"]
    for key, value in (("state", "closed"), ("severity", "huge"), ("limit", "0")):
        error = await call("GET", "/api/v1/incidents", expect=400, params={key: value})
        assert error["field"] == key
    await call("GET", "/api/v1/incidents", expect=403, token=PROBE_TOKEN)
    await m.deliver()
    ticket = await call("GET", "/api/v1/incidents/{id}", expect=200, id=iid)
    assert ticket["evidence"], "the failing call is on the ticket"
    assert ticket["notifications"][0]["state"] == "sent"
    await call("GET", "/api/v1/incidents/{id}", expect=404, id=99_999)
    assert (await call("GET", "/api/v1/incidents/{id}", expect=400, id="x"))["field"] == "id"

    # what operators do
    act = "/api/v1/incidents/{id}/"
    await call("POST", act + "comments", expect=200, id=iid, body={"text": "looking"})
    await call("POST", act + "comments", expect=400, id=iid, body={"text": "  "})
    await call("POST", act + "comments", expect=404, id=99_999, body={"text": "x"})
    await call(
        "POST", act + "severity", expect=200, id=iid, body={"severity": "urgent", "reason": "r"}
    )
    error = await call("POST", act + "severity", expect=400, id=iid, body={"severity": "urgent"})
    assert error["field"] == "reason"
    await call("POST", act + "severity", expect=400, id=iid, body={"severity": "x", "reason": "r"})
    await call("POST", act + "acknowledge", expect=200, id=iid)
    await call("POST", act + "acknowledge", expect=200, id=iid, body={"note": "mine"})
    await call("POST", act + "resolve", expect=400, id=iid, body={})
    resolved = await call("POST", act + "resolve", expect=200, id=iid, body={"reason": "fixed"})
    assert resolved["incident"]["state"] == "resolved"
    await call("POST", act + "resolve", expect=409, id=iid, body={"reason": "again"})
    await call("POST", act + "acknowledge", expect=409, id=iid)
    await call(
        "POST", act + "resolve", expect=415, id=iid, raw=b"reason", content_type="text/plain"
    )
    await call("POST", act + "resolve", expect=403, id=iid, token=PROBE_TOKEN, body={})

    # Alertmanager
    fired = await call("POST", "/api/v1/alertmanager", expect=200, body=alert("firing"))
    (alert_id,) = fired["incidents"]
    assert isinstance(alert_id, int)
    ticket = await call("GET", "/api/v1/incidents/{id}", expect=200, id=alert_id)
    assert ticket["incident"]["details"]["source"] == "alertmanager"
    wrong = alert("firing")
    del wrong["alerts"][0]["fingerprint"]
    error = await call("POST", "/api/v1/alertmanager", expect=400, body=wrong)
    assert error["field"] == "alerts[0].fingerprint"
    await call("POST", "/api/v1/alertmanager", expect=400, body={**alert("firing"), "version": 3})
    await call("POST", "/api/v1/alertmanager", expect=403, token=PROBE_TOKEN, body=alert("x"))

    # silences
    silences = "/api/v1/silences"
    created = await call(
        "POST", silences, expect=201, body={"target": TARGET_A, "duration_s": 60, "reason": "r"}
    )
    sid = created["silence"]["id"]
    await call(
        "POST",
        silences,
        expect=201,
        body={
            "region": "eu-west",
            "starts_at": "2027-02-01T00:00:00Z",
            "ends_at": 1_900_000_000,
            "reason": "window",
        },
    )
    for wrong_silence in (
        {"duration_s": 60, "reason": "r"},
        {"target": TARGET_A, "reason": "r"},
        {"target": TARGET_A, "duration_s": -1, "reason": "r"},
        {"target": TARGET_A, "ends_at": "tomorrow", "reason": "r"},
        {"target": TARGET_A, "duration_s": 60},
        {"target": "", "duration_s": 60, "reason": "r"},
    ):
        await call("POST", silences, expect=400, body=wrong_silence)
    active = await call("GET", silences, expect=200, params={"active": "1"})
    assert [s["id"] for s in active["silences"]] == [sid]
    await call("GET", silences, expect=200)
    await call("DELETE", silences + "/{id}", expect=200, id=sid)
    await call("DELETE", silences + "/{id}", expect=404, id=99_999)
    await call("DELETE", silences + "/{id}", expect=400, id="x")

    # what the web UI shows
    grid = await call("GET", "/api/v1/matrix", expect=200)
    assert {c["region"] for c in grid["cells"]} == {"eu-west", "us-east"}
    await call("GET", "/api/v1/matrix", expect=401, token=None)
    series = await call(
        "GET", "/api/v1/samples", expect=200, params={"target": TARGET_A, "region": "eu-west"}
    )
    assert series["samples"], "the seconds sent above"
    await call(
        "GET",
        "/api/v1/samples",
        expect=200,
        params={"target": TARGET_A, "since": "2027-01-15T08:00:00Z", "limit": "10"},
    )
    assert (await call("GET", "/api/v1/samples", expect=400))["field"] == "target"
    for key, value in (("since", "yesterday"), ("limit", "0")):
        error = await call(
            "GET", "/api/v1/samples", expect=400, params={"target": TARGET_A, key: value}
        )
        assert error["field"] == key

    # sessions: the cookie, and the header writes with it need
    await call("POST", "/api/v1/session", expect=401, token=None, body={"token": "nope"})
    await call("POST", "/api/v1/session", expect=400, token=None, body={})
    signed = await call(
        "POST", "/api/v1/session", expect=200, token=None, body={"token": OPERATOR_TOKEN}
    )
    assert signed == {"operator": "alice"}
    await call("GET", "/api/v1/session", expect=200)
    await call("GET", "/api/v1/session", expect=403, token=PROBE_TOKEN)
    await call("DELETE", "/api/v1/session", expect=403, token=None)
    await call(
        "DELETE", "/api/v1/session", expect=200, token=None, headers={"X-Callmon-Request": "1"}
    )

    # health, metrics, this document
    assert (await call("GET", "/healthz", expect=200, token=None))["status"] == "ok"
    text = await call("GET", "/metrics", expect=200, token=None)
    assert "callmon_calls_total" in text
    await call("GET", "/api/v1/openapi.json", expect=200, token=None)


async def test_cookie_writes_need_the_csrf_header_as_documented(tmp_path: Path) -> None:
    doc = document()
    csrf = doc["components"]["securitySchemes"]["csrf"]["name"]
    cookie = doc["components"]["securitySchemes"]["session"]["name"]
    async with (
        monitor(make_config(tmp_path), Clock()) as m,
        aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser,
    ):
        async with browser.post(m.url + "/api/v1/session", json={"token": OPERATOR_TOKEN}) as r:
            assert r.status == 200
            assert cookie in r.cookies
        body = {"region": "x", "duration_s": 5, "reason": str(uuid.uuid4())}
        async with browser.post(m.url + "/api/v1/silences", json=body) as r:
            assert r.status == 403
        async with browser.post(m.url + "/api/v1/silences", json=body, headers={csrf: "1"}) as r:
            assert r.status == 201
        async with browser.get(m.url + "/api/v1/silences") as r:
            assert r.status == 200, "a read needs no header"
