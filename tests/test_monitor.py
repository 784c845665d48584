"""The monitor over a real socket and a real SQLite file, with the clock in the test's hands.

Each story ingests what probes would send, turns the clock, and checks the incidents, their
timelines, the notifications that left and the metrics, step by step.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
from monitorkit import (
    OPERATOR_TOKEN,
    PROBES,
    TARGET_A,
    TARGET_B,
    Clock,
    Monitor,
    batch,
    make_config,
    monitor,
    receiver,
    result,
    sample,
)

from callmon.callresult import Status


async def incidents(m: Monitor, **query: str) -> list[dict[str, Any]]:
    path = "/api/v1/incidents" + (
        "?" + "&".join(f"{k}={v}" for k, v in query.items()) if query else ""
    )
    status, body = await m.api("GET", path)
    assert status == 200, body
    found: list[dict[str, Any]] = body["incidents"]
    return found


async def ticket(m: Monitor, incident_id: int) -> dict[str, Any]:
    status, body = await m.api("GET", f"/api/v1/incidents/{incident_id}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def jittery(t0: int, values: list[float]) -> list[Any]:
    return [sample(float(t0 + i), jitter=v) for i, v in enumerate(values)]


# --- ingest ---------------------------------------------------------------------------------------


async def test_ingest_is_durable_idempotent_and_refuses_bad_input(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        body = result()
        first = await m.send("probe-eu", body)
        assert first.status == 200
        answer = await first.json()
        assert answer["probe"] == "probe-eu"
        assert answer["region"] == "eu-west"
        clock.advance(5)
        again = await m.send("probe-eu", body)
        assert again.status == 200
        assert await again.json() == answer  # the same answer, stored once
        assert (await m.store.known([body["id"]])) == {body["id"]: clock.now - 5}

        bad = [result(), result(), result()]
        bad[1]["samples"][0]["audio"]["loss"] = "lots"
        refused = await m.send("probe-eu", bad)
        assert refused.status == 400
        assert await refused.json() == {
            "error": "expected a number",
            "field": "[1].samples[0].audio.loss",
        }
        assert await m.store.known([r["id"] for r in bad]) == {}, "nothing of a bad batch is kept"

        cases = [
            (await m.send("nobody", result()), 401),
            (await m.send(OPERATOR_TOKEN, result()), 403),
            (await m.send("probe-eu", {"schema": "x"}), 400),
            (await m.send("probe-eu", []), 400),
        ]
        for response, expected in cases:
            assert response.status == expected, await response.text()
        raw = await m.http.post(
            m.url + "/api/v1/results",
            data="{not json",
            headers={
                "Authorization": f"Bearer {PROBES['probe-eu'][1]}",
                "Content-Type": "application/json",
            },
        )
        assert raw.status == 400
        assert "not JSON" in (await raw.json())["error"]
        text = await m.http.post(
            m.url + "/api/v1/results",
            data="{}",
            headers={"Authorization": f"Bearer {PROBES['probe-eu'][1]}"},
        )
        assert text.status == 415
        huge = await m.send("probe-eu", {"schema": "callmon.call/v1", "pad": "x" * 2_000_000})
        assert huge.status == 413
        status, _ = await m.api("GET", "/api/v1/incidents", token=PROBES["probe-eu"][1])
        assert status == 403


# --- k-of-n, raise in place, hysteresis -----------------------------------------------------------


async def test_jitter_story_k_of_n_raise_hysteresis(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        # two bad seconds of five: nothing yet
        await m.send("probe-eu", batch("call-1", jittery(1, [0.05, 0.01, 0.06, 0.01, 0.01])))
        assert await incidents(m) == []
        # unreliable seconds never count, however bad
        unreliable = [sample(float(t), jitter=0.5, reliable=False) for t in range(6, 10)]
        await m.send("probe-eu", batch("call-1", unreliable))
        assert await incidents(m) == []
        # the third bad second within five: a normal incident for A from eu-west
        clock.advance(10)
        await m.send("probe-eu", batch("call-1", jittery(10, [0.04, 0.045])))
        (opened,) = await incidents(m, state="open")
        assert opened["rule"] == "audio_jitter_high"
        assert opened["severity"] == "normal"
        assert opened["scope"]["kind"] == "target_region"
        assert opened["details"]["conditions"][0]["value"] == 0.045
        # worse: over 100 ms raises it in place
        clock.advance(10)
        await m.send("probe-eu", batch("call-1", jittery(12, [0.15])))
        (raised,) = await incidents(m, rule="audio_jitter_high")
        assert raised["id"] == opened["id"]
        assert raised["severity"] == "important"
        # four healthy seconds are not enough to close (close_after: 5), the fifth is
        await m.send("probe-eu", batch("call-1", jittery(13, [0.01] * 4)))
        assert (await incidents(m, rule="audio_jitter_high"))[0]["state"] == "triggered"
        clock.advance(10)
        await m.send("probe-eu", batch("call-1", jittery(17, [0.01])))
        (closed,) = await incidents(m, rule="audio_jitter_high")
        assert closed["state"] == "resolved"
        timeline = (await ticket(m, opened["id"]))["timeline"]
        assert [(e["kind"], e["actor"]) for e in timeline] == [
            ("opened", "callmon"),
            ("severity_raised", "callmon"),
            ("resolved", "callmon"),
        ]
        # back within the reopen window: the same ticket reopens
        clock.advance(60)
        await m.send("probe-eu", batch("call-2", jittery(1, [0.05, 0.05, 0.05])))
        (back,) = await incidents(m, rule="audio_jitter_high")
        assert back["id"] == opened["id"]
        assert back["state"] == "triggered"
        assert back["reopened"] == 1


# --- correlation ----------------------------------------------------------------------------------


def failed(target: str) -> dict[str, Any]:
    return result(target, status=Status.FAILED, samples=[])


async def test_correlation_story_region_then_target_wide(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        # eu-west fails target A twice: one incident for A from eu-west
        for _ in range(2):
            clock.advance(60)
            await m.send("probe-eu", failed(TARGET_A))
        (regional,) = await incidents(m, rule="call_failed")
        assert regional["scope"]["kind"] == "target_region"
        assert regional["severity"] == "important"
        # us-east fails A too: one target-wide incident, raised to urgent, the regional merged
        for _ in range(2):
            clock.advance(60)
            await m.send("probe-us", failed(TARGET_A))
        found = await incidents(m, rule="call_failed")
        wide = next(i for i in found if i["scope"]["kind"] == "target")
        assert wide["severity"] == "urgent"
        assert "likely the service" in wide["scope"]["description"]
        assert {c["region"] for c in wide["details"]["conditions"]} == {"eu-west", "us-east"}
        # filtering by region finds the target-wide incident through its members
        by_region = await incidents(m, rule="call_failed", region="us-east")
        assert [i["id"] for i in by_region] == [wide["id"]]
        assert wide["details"]["metric"] == "status"
        merged = next(i for i in found if i["id"] == regional["id"])
        assert merged["state"] == "resolved"
        last = (await ticket(m, regional["id"]))["timeline"][-1]
        assert "merged into the incident for" in last["text"]
        # the failing call itself is on the ticket
        evidence = (await ticket(m, wide["id"]))["evidence"]
        assert evidence
        assert all(e["body"]["status"] == "failed" for e in evidence.values())

        # eu-west now fails target B as well: that is a second target from eu-west, but A's
        # eu-west condition already belongs to the open target-wide incident; B from eu-west
        # alone is a regional incident
        for _ in range(2):
            clock.advance(60)
            await m.send("probe-eu", failed(TARGET_B))
        kinds = sorted(
            i["scope"]["kind"] for i in await incidents(m, rule="call_failed", state="open")
        )
        assert kinds == ["target", "target_region"]


async def test_several_targets_failing_from_one_region_is_one_incident(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        for target in (TARGET_A, TARGET_B):
            for _ in range(2):
                clock.advance(30)
                await m.send("probe-eu", result(target, status=Status.FAILED, samples=[]))
        (only,) = await incidents(m, rule="call_failed", state="open")
        assert only["scope"]["kind"] == "region"
        assert only["scope"]["region"] == "eu-west"
        assert "network or probe side" in only["scope"]["description"]


# --- people and timers ----------------------------------------------------------------------------


async def test_operator_story_with_timers_escalation_and_notifications(tmp_path: Path) -> None:
    clock = Clock()
    async with receiver() as hook, receiver() as pager:
        config = make_config(
            tmp_path,
            channels=[
                {"name": "hook", "type": "webhook", "url": hook.url},
                {"name": "pager", "type": "webhook", "url": pager.url},
            ],
            notify={"important": ["hook"], "urgent": ["hook"]},
            escalation={"levels": [["pager"]], "repeat_s": 600, "max_escalations": 2},
        )
        async with monitor(config, clock) as m:
            for _ in range(2):
                clock.advance(60)
                await m.send("probe-eu", result(status=Status.FAILED, samples=[]))
            (incident,) = await incidents(m, state="open")
            opened_at = clock.now
            assert incident["severity"] == "important"
            await m.deliver()
            assert [b["event"] for b in hook.received] == ["trigger"]

            # nobody acknowledges within the hour: breached, escalated to the pager
            clock.advance(3600)
            await m.pipeline.tick()
            await m.deliver()
            assert [b["event"] for b in pager.received] == ["escalate"]
            timeline = (await ticket(m, incident["id"]))["timeline"]
            assert [e["kind"] for e in timeline][-2:] == ["ack_breached", "escalated"]
            clock.advance(600)
            await m.pipeline.tick()
            await m.deliver()
            assert [b["event"] for b in pager.received] == ["escalate", "escalate"]
            clock.advance(600)
            await m.pipeline.tick()  # max_escalations reached
            await m.deliver()
            assert len(pager.received) == 2

            # the operator acts: comment, raise, acknowledge, resolve
            iid = incident["id"]
            assert (
                await m.api(
                    "POST", f"/api/v1/incidents/{iid}/comments", {"text": "ISP maintenance?"}
                )
            )[0] == 200
            status, body = await m.api(
                "POST",
                f"/api/v1/incidents/{iid}/severity",
                {"severity": "urgent", "reason": "customers complain"},
            )
            assert status == 200
            assert body["incident"]["severity"] == "urgent"
            status, body = await m.api(
                "POST", f"/api/v1/incidents/{iid}/severity", {"severity": "urgent"}
            )
            assert status == 400
            assert body["field"] == "reason"
            status, _ = await m.api("POST", f"/api/v1/incidents/{iid}/acknowledge", {})
            assert status == 200
            status, body = await m.api(
                "POST", f"/api/v1/incidents/{iid}/resolve", {"reason": "carrier fixed the route"}
            )
            assert status == 200
            assert body["incident"]["state"] == "resolved"
            status, body = await m.api(
                "POST", f"/api/v1/incidents/{iid}/resolve", {"reason": "again"}
            )
            assert status == 409
            status, _ = await m.api("POST", "/api/v1/incidents/9999/acknowledge", {})
            assert status == 404

            full = await ticket(m, iid)
            assert [(e["kind"], e["actor"]) for e in full["timeline"]] == [
                ("opened", "callmon"),
                ("ack_breached", "callmon"),
                ("escalated", "callmon"),
                ("escalated", "callmon"),
                ("comment", "alice"),
                ("severity_changed", "alice"),
                ("acknowledged", "alice"),
                ("resolved", "alice"),
            ]
            assert full["comments"] == [
                {"at": full["comments"][0]["at"], "author": "alice", "text": "ISP maintenance?"}
            ]
            await m.deliver()
            assert all(n["state"] == "sent" for n in full["notifications"][:3])

            # SLA metrics by severity and kind
            metrics = await (await m.http.get(m.url + "/metrics")).text()
            assert 'callmon_sla_breaches_total{kind="ack",severity="important"} 1.0' in metrics
            tta = clock.now - opened_at
            assert (
                'callmon_incident_time_to_resolve_seconds_count{severity="urgent"} 1.0' in metrics
            )
            assert tta > 3600


# --- silences and silent probes -------------------------------------------------------------------


async def test_a_silenced_target_opens_nothing_and_who_and_why_are_kept(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        status, body = await m.api(
            "POST",
            "/api/v1/silences",
            {"target": TARGET_A, "duration_s": 3600, "reason": "SFU upgrade"},
        )
        assert status == 201, body
        silence = body["silence"]
        assert (silence["created_by"], silence["reason"]) == ("alice", "SFU upgrade")
        for _ in range(3):
            clock.advance(60)
            await m.send("probe-eu", result(status=Status.FAILED, samples=[]))
        assert await incidents(m) == []
        # the window ends; the condition still holds: the next evaluation opens it
        status, _ = await m.api("DELETE", f"/api/v1/silences/{silence['id']}")
        assert status == 200
        clock.advance(60)
        await m.send("probe-eu", result(status=Status.FAILED, samples=[]))
        assert len(await incidents(m, state="open")) == 1
        status, body = await m.api("POST", "/api/v1/silences", {"reason": "x", "duration_s": 5})
        assert status == 400
        assert body["field"] == "target"


async def test_a_probe_that_goes_silent_is_an_incident(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        await m.send("probe-eu", result())
        await m.send("probe-us", result())
        clock.advance(150)  # 2.5 intervals of 60 s
        await m.pipeline.tick()
        assert await incidents(m) == []
        await m.send("probe-us", result())  # us keeps reporting
        clock.advance(40)
        await m.pipeline.tick()
        (silent,) = await incidents(m, state="open")
        assert silent["rule"] == "probe_silent"
        assert silent["scope"] == {
            "kind": "probe",
            "target": "*",
            "region": "eu-west",
            "name": "probe-eu",
            "description": "probe probe-eu in eu-west",
        }
        await m.send("probe-eu", result())
        clock.advance(1)
        await m.pipeline.tick()
        assert (await incidents(m))[0]["state"] == "resolved"


# --- Alertmanager ---------------------------------------------------------------------------------


def alertmanager(status: str) -> dict[str, Any]:
    return {
        "version": "4",
        "groupKey": '{}:{alertname="CallmonHighJitter"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "callmon",
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": [
            {
                "status": status,
                "labels": {
                    "alertname": "CallmonHighJitter",
                    "severity": "critical",
                    "target": TARGET_A,
                    "region": "eu-west",
                },
                "annotations": {"summary": "jitter over 30 ms for 5 minutes"},
                "startsAt": "2027-01-15T08:00:00Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": "http://prometheus:9090/graph",
                "fingerprint": "c0ffee",
            }
        ],
    }


async def test_alertmanager_alerts_open_and_resolve_incidents(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        status, body = await m.api("POST", "/api/v1/alertmanager", alertmanager("firing"))
        assert status == 200, body
        status, again = await m.api("POST", "/api/v1/alertmanager", alertmanager("firing"))
        assert again == body, "a resend updates the same incident"
        (incident,) = await incidents(m)
        assert incident["severity"] == "urgent"
        assert incident["title"] == "jitter over 30 ms for 5 minutes"
        assert incident["details"]["labels"]["alertname"] == "CallmonHighJitter"
        clock.advance(300)
        await m.api("POST", "/api/v1/alertmanager", alertmanager("resolved"))
        assert (await incidents(m))[0]["state"] == "resolved"
        bad = alertmanager("firing")
        del bad["alerts"][0]["fingerprint"]
        status, body = await m.api("POST", "/api/v1/alertmanager", bad)
        assert status == 400
        assert body["field"] == "alerts[0].fingerprint"


# --- restart --------------------------------------------------------------------------------------


async def test_a_restart_keeps_incidents_windows_and_timers(tmp_path: Path) -> None:
    clock = Clock()
    config = make_config(tmp_path)
    async with monitor(config, clock) as m:
        await m.send("probe-eu", batch("c", jittery(1, [0.05, 0.05])))
        await m.send("probe-eu", result(status=Status.FAILED, samples=[]))
        await m.send("probe-eu", result(status=Status.FAILED, samples=[]))
        (before,) = await incidents(m, state="open")
    clock.advance(600)
    async with monitor(config, clock) as m:
        (after,) = await incidents(m, state="open")
        assert after == before, "deadlines are persisted, not restarted"
        # the jitter window remembered its two bad seconds: one more opens it
        await m.send("probe-eu", batch("c", jittery(3, [0.05])))
        assert {i["rule"] for i in await incidents(m, state="open")} == {
            "call_failed",
            "audio_jitter_high",
        }
        clock.advance(3600)
        await m.pipeline.tick()
        timeline = (await ticket(m, before["id"]))["timeline"]
        assert timeline[-1]["kind"] == "ack_breached"


async def test_metrics_are_exported_per_target_and_region(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        await m.send("probe-eu", result(connect_s=0.25, samples=[sample(1.0, jitter=0.012)]))
        text = await (await m.http.get(m.url + "/metrics")).text()
    labels = f'region="eu-west",target="{TARGET_A}"'
    assert f'callmon_connect_phase_seconds_bucket{{le="0.3",phase="connect",{labels}}} 1.0' in text
    assert f'callmon_jitter_seconds{{media="audio",{labels}}} 0.012' in text
    assert f"callmon_call_success{{{labels}}} 1.0" in text
    assert 'callmon_incidents_open{severity="urgent"} 0.0' in text
    assert json.dumps("x")


async def test_a_second_repeated_in_a_final_result_is_judged_once(tmp_path: Path) -> None:
    """A continuous call's seconds arrive in batches, then again in its final result."""
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        seconds = [sample(1.0, freezes=1), sample(2.0)]
        await m.send("probe-eu", batch("call-9", seconds))
        final = result(samples=[*seconds, sample(3.0)], result_id="call-9")
        await m.send("probe-eu", final)
        text = await (await m.http.get(m.url + "/metrics")).text()
        labels = f'region="eu-west",target="{TARGET_A}"'
        assert f"callmon_video_freezes_total{{{labels}}} 1.0" in text
        assert "callmon_ingest_samples_total 3.0" in text
        # judged twice, the one freeze would be 2 of 10 seconds and open an incident
        assert await incidents(m) == []


async def test_results_older_than_the_retention_period_are_removed(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path, retention_days=1), clock) as m:
        old = result()
        await m.send("probe-eu", old)
        clock.advance(86_400 + 1)
        fresh = result()
        await m.send("probe-eu", fresh)
        await m.pipeline.tick()
        assert await m.store.result(old["id"]) is None
        assert await m.store.result(fresh["id"]) is not None


async def test_a_continuous_call_that_works_again_clears_call_failed(tmp_path: Path) -> None:
    """A long-held call reports its status when it ends; its seconds say it works now."""
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        for _ in range(2):  # the call broke, and the first reconnect failed too
            clock.advance(1)
            await m.send("probe-eu", failed(TARGET_A))
        (down,) = await incidents(m, state="open")
        assert down["rule"] == "call_failed"
        clock.advance(1)
        await m.send("probe-eu", batch("call-2", [sample(1.0)]))
        assert (await incidents(m, state="open")) != [], "one working batch is not enough"
        clock.advance(1)
        await m.send("probe-eu", batch("call-2", [sample(2.0)]))
        assert await incidents(m, state="open") == []


async def test_the_ui_apis_sessions_matrix_and_samples(tmp_path: Path) -> None:
    clock = Clock()
    async with monitor(make_config(tmp_path), clock) as m:
        await m.send(
            "probe-eu",
            result(connect_s=0.3, samples=[sample(1.0, jitter=0.02), sample(2.0, freezes=1)]),
        )
        clock.advance(1)
        await m.send("probe-us", result(status=Status.FAILED, samples=[]))
        # reading needs an operator: no anonymous reading by default
        async with m.http.get(m.url + "/api/v1/matrix") as response:
            assert response.status == 401
        # a session: the cookie signs the browser in, and writes need the extra header
        # unsafe: the cookie jar must accept cookies from an IP address, as browsers do
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser:
            async with browser.post(m.url + "/api/v1/session", json={"token": "nope"}) as r:
                assert r.status == 401
            async with browser.post(m.url + "/api/v1/session", json={"token": OPERATOR_TOKEN}) as r:
                assert r.status == 200
                assert "HttpOnly" in r.headers["Set-Cookie"]
                assert "SameSite=Strict" in r.headers["Set-Cookie"]
            async with browser.get(m.url + "/api/v1/session") as r:
                assert (await r.json())["operator"] == "alice"
            async with browser.get(m.url + "/api/v1/matrix") as r:
                grid = await r.json()
            async with browser.post(
                m.url + "/api/v1/silences", json={"region": "x", "duration_s": 5, "reason": "r"}
            ) as r:
                assert r.status == 403, "a cookie write without the header is refused"
            async with browser.post(
                m.url + "/api/v1/silences",
                json={"region": "x", "duration_s": 5, "reason": "r"},
                headers={"X-Callmon-Request": "1"},
            ) as r:
                assert r.status == 201
            async with browser.get(
                m.url + "/api/v1/samples", params={"target": TARGET_A, "region": "eu-west"}
            ) as r:
                series = await r.json()
            async with browser.delete(
                m.url + "/api/v1/session", headers={"X-Callmon-Request": "1"}
            ) as r:
                assert r.status == 200
            async with browser.get(m.url + "/api/v1/matrix") as r:
                assert r.status == 401
    assert grid["targets"] == [TARGET_A]
    assert grid["regions"] == ["eu-west", "us-east"]
    eu = next(c for c in grid["cells"] if c["region"] == "eu-west")
    assert eu["connect_s"] == 0.3
    assert eu["jitter_audio_s"] == 0.005  # the latest reliable second
    assert eu["freeze_ratio"] == 0.15  # 0.3 s frozen over 2 s
    assert eu["success"] == 1.0
    us = next(c for c in grid["cells"] if c["region"] == "us-east")
    assert us["success"] == 0.0
    assert us["last_result_age_s"] == 0.0
    assert [s["t_s"] for s in series["samples"]] == [1.0, 2.0]
    assert series["samples"][0]["audio.jitter_s"] == 0.02
    assert series["samples"][1]["at"] > series["samples"][0]["at"]


async def test_anonymous_reading_when_configured(tmp_path: Path) -> None:
    async with monitor(make_config(tmp_path, anonymous_read=True), Clock()) as m:
        async with m.http.get(m.url + "/api/v1/incidents") as response:
            assert response.status == 200
        # a cookie of a session that no longer exists (a restart) still reads anonymously
        async with m.http.get(
            m.url + "/api/v1/incidents", headers={"Cookie": "callmon_session=gone"}
        ) as response:
            assert response.status == 200
        async with m.http.post(m.url + "/api/v1/silences", json={}) as response:
            assert response.status == 401, "writes still need an operator"
