"""The on-call web UI in a real Chromium against a real monitor (real socket, real SQLite).

Incidents are made the way probes make them, by ingesting failing results and bad seconds.
The monitor's clock is set near real time and only moved forward: the page's timers tick
on the browser's clock. Screenshots of the list, an incident and the matrix are kept in
tests/ui_artifacts/.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from monitorkit import (
    OPERATOR_TOKEN,
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
from playwright.async_api import Page, Request, async_playwright, expect

from callmon.callresult import Status
from monitor.api import TOKENS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).with_name("ui_artifacts")
MATRIX_TITLE = "Targets \N{MULTIPLICATION SIGN} regions"
HOUR = 3600.0
# One tier for every severity, so the seeded incidents' ages decide their timer colours.
TIERS = {s: {"ack_s": HOUR, "resolve_s": 4 * HOUR} for s in ("urgent", "important", "normal")}

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium")
# the list refreshes every 5 s: waiting for a refresh needs more than Playwright's default
expect.set_options(timeout=12_000)


@dataclass
class UI:
    m: Monitor
    clock: Clock
    page: Page

    async def open(self, route: str = "") -> None:
        await self.page.goto(f"{self.m.url}/{route}")

    async def sign_in(self) -> None:
        await self.open("#/signin")
        await self.page.get_by_label("Operator token").fill(OPERATOR_TOKEN)
        await self.page.get_by_role("button", name="Sign in", exact=True).click()
        await expect(self.page.locator("#operator")).to_have_text("alice")

    async def ticket(self, incident_id: int) -> dict[str, Any]:
        status, body = await self.m.api("GET", f"/api/v1/incidents/{incident_id}")
        assert status == 200, body
        return body  # type: ignore[no-any-return]

    async def screenshot(self, name: str, *, full_page: bool = False) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / ".gitignore").write_text("# written by tests/test_ui.py: artifacts only\n*\n")
        path = ARTIFACTS / name
        await self.page.screenshot(path=str(path), full_page=full_page)
        return path


@contextlib.asynccontextmanager
async def ui(tmp_path: Path, **config: Any) -> AsyncIterator[UI]:
    """A monitor, and a fresh Chromium with one 1280x800 page; no uncaught page errors.

    The monitor's clock starts two hours back: tests move it forward to open incidents of
    given ages (`at_age`), ending near real time.
    """
    clock = Clock(time.time() - 2 * HOUR)
    config.setdefault("tiers", TIERS)
    async with (
        async_playwright() as playwright,
        monitor(make_config(tmp_path, **config), clock) as m,
    ):
        browser = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            context = await browser.new_context(viewport={"width": 1280, "height": 800})
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            writes: list[Request] = []
            page.on("request", lambda r: writes.append(r) if r.method != "GET" else None)
            yield UI(m, clock, page)
            assert errors == [], "the page threw"
            # every write says it is one of ours (the cookie alone is refused) and is JSON
            for write in writes:
                headers = write.headers
                assert headers.get("x-callmon-request") == "1", (write.method, write.url)
                assert headers.get("content-type") == "application/json", (write.method, write.url)
        finally:
            await browser.close()


# --- what probes send ------------------------------------------------------------------------


def at_age(clock: Clock, age_s: float) -> None:
    """Move the monitor's clock (forward only) to `age_s` seconds before real now."""
    target = time.time() - age_s
    assert target >= clock.now, "the seeding must go forward in time"
    clock.now = target


async def seed(m: Monitor, clock: Clock) -> dict[str, int]:
    """Open four incidents whose acknowledgement timers are overdue, red, amber and green.

    Returns incident ids by rule. Every incident has its own rule, so none is correlated
    with another.
    """
    # opened 1 h 1 min 40 s ago: the hour to acknowledge is over
    at_age(clock, HOUR + 100)
    await m.send("probe-eu", batch("call-a", [sample(float(t), jitter=0.05) for t in range(3)]))
    # opened 55 min ago: 5 of 60 minutes left (under a tenth); the failing call kept
    at_age(clock, HOUR - 300)
    for _ in range(2):
        failed = result(TARGET_B, status=Status.FAILED, samples=[])
        failed["phases"]["answer_s"] = 0.084
        failed["failure"]["reason"] = "ICE did not connect within 5 s: no candidate pair worked"
        await m.send("probe-us", failed)
    # opened 40 min ago: a third of the hour left
    at_age(clock, 2400)
    await m.send("probe-us", batch("call-m", [sample(float(t), mos=3.2) for t in range(3)]))
    # ten minutes of seconds of B from eu-west: video jitter calm, then climbing over 30 ms
    at_age(clock, 600)
    for start in range(0, 600, 30):
        seconds = []
        for t in range(start, start + 30):
            calm = 0.009 + 0.004 * math.sin(t / 9)
            jitter = calm if t < 470 else 0.034 + 0.03 * (t - 470) / 130 + 0.004 * math.sin(t)
            seconds.append(sample(float(t), video_jitter=round(jitter, 4)))
        await m.send("probe-eu", batch("call-b", seconds, target=TARGET_B))
        clock.advance(30)
    status, body = await m.api("GET", "/api/v1/incidents?state=open")
    assert status == 200, body
    ids = {i["rule"]: i["id"] for i in body["incidents"]}
    assert set(ids) == {"audio_jitter_high", "call_failed", "mos_low", "video_jitter_high"}
    return ids


def timer_seconds(text: str) -> int:
    """Read "ack in 4:05", "ack 1:02:03 overdue" as signed seconds left."""
    found = re.fullmatch(r"(?:ack|resolve) (?:in )?(?:(\d+):)?(\d+):(\d\d)( overdue)?", text)
    assert found, text
    hours, minutes, seconds, overdue = found.groups()
    left = int(hours or 0) * 3600 + int(minutes) * 60 + int(seconds)
    return -left if overdue else left


# --- sign-in ---------------------------------------------------------------------------------


async def test_sign_in_refuses_a_wrong_token_and_shows_the_operator(tmp_path: Path) -> None:
    async with ui(tmp_path) as u:
        page = u.page
        await u.open()
        # anonymous reading is off: only the sign-in form, and why
        await expect(page.get_by_role("heading", name="Operator sign-in")).to_be_visible()
        await expect(page.locator("#signin-reason")).to_contain_text("anonymous reading")
        await expect(page.locator("table.incidents")).to_have_count(0)

        await page.get_by_label("Operator token").fill("not-a-token")
        await page.get_by_role("button", name="Sign in", exact=True).click()
        await expect(page.get_by_role("alert")).to_have_text(
            "Sign-in failed: not an operator token"
        )
        await expect(page.locator("#operator")).to_have_count(0)

        await page.get_by_label("Operator token").fill(OPERATOR_TOKEN)
        await page.get_by_role("button", name="Sign in", exact=True).click()
        await expect(page.locator("#operator")).to_have_text("alice")
        await expect(page.get_by_role("heading", name="Incidents")).to_be_visible()
        cookies = await page.context.cookies()
        assert [(c["name"], c["httpOnly"]) for c in cookies] == [("callmon_session", True)]

        # a reload keeps the session; signing out ends it and reading stops
        await page.reload()
        await expect(page.locator("#operator")).to_have_text("alice")
        await page.get_by_role("button", name="Sign out").click()
        await expect(page.get_by_role("heading", name="Operator sign-in")).to_be_visible()
        await expect(page.locator("#operator")).to_have_count(0)
        assert await page.context.cookies() == []


# --- the list --------------------------------------------------------------------------------


async def test_list_timers_tick_and_colour_by_closeness_to_breach(tmp_path: Path) -> None:
    async with ui(tmp_path) as u:
        ids = await seed(u.m, u.clock)
        await u.sign_in()
        page = u.page
        await u.open("#/incidents")

        def timer(rule: str) -> Any:
            return page.locator(f'tr[data-incident-id="{ids[rule]}"] .timer.primary')

        await expect(timer("audio_jitter_high")).to_have_attribute("data-level", "breached")
        await expect(timer("audio_jitter_high")).to_have_text(re.compile(r"ack 1:[4-5]\d overdue"))
        await expect(timer("call_failed")).to_have_attribute("data-level", "danger")
        await expect(timer("mos_low")).to_have_attribute("data-level", "warn")
        await expect(timer("video_jitter_high")).to_have_attribute("data-level", "ok")
        # the resolution clock runs too, under the acknowledgement clock
        resolve = page.locator(f'tr[data-incident-id="{ids["mos_low"]}"] .timer.secondary')
        await expect(resolve).to_have_text(re.compile(r"resolve in 3:1\d:\d\d"))

        # the timers visibly tick: one counts down, the overdue one counts up
        before = [await timer(r).inner_text() for r in ("call_failed", "audio_jitter_high")]
        await page.wait_for_timeout(1500)  # the one fixed wait: watching a clock move
        after = [await timer(r).inner_text() for r in ("call_failed", "audio_jitter_high")]
        changes = [timer_seconds(b) - timer_seconds(a) for b, a in zip(before, after, strict=True)]
        assert all(1 <= change <= 2 for change in changes), (before, after)

        # most pressing first; counts per severity
        rows = page.locator("table.incidents tbody tr")
        await expect(rows).to_have_count(4)
        assert await rows.first.get_attribute("data-incident-id") == str(ids["call_failed"])
        await expect(page.locator('.count[data-severity="normal"] .count-n')).to_have_text("3")
        await expect(page.locator('.count[data-severity="important"] .count-n')).to_have_text("1")
        await expect(page.locator('.count[data-severity="urgent"] .count-n')).to_have_text("0")
        print("screenshot:", await u.screenshot("incidents.png"))


async def test_list_filters_live_in_the_hash_and_survive_refreshes(tmp_path: Path) -> None:
    async with ui(tmp_path) as u:
        ids = await seed(u.m, u.clock)
        await u.sign_in()
        page = u.page
        rows = page.locator("table.incidents tbody tr")
        await expect(rows).to_have_count(4)

        await page.get_by_label("Severity", exact=True).select_option("important")
        await expect(rows).to_have_count(1)
        await expect(rows.first).to_have_attribute("data-incident-id", str(ids["call_failed"]))
        assert "severity=important" in page.url
        # the severity counts stay, the pressed one says so
        await expect(page.locator('.count[data-severity="important"]')).to_have_attribute(
            "aria-pressed", "true"
        )
        await page.get_by_role("button", name="Clear filters").click()
        await expect(rows).to_have_count(4)
        assert "severity" not in page.url

        # a target, typed: the API matches it exactly
        await page.get_by_label("Target", exact=True).fill(TARGET_B)
        await expect(rows).to_have_count(2)
        assert "target=https%3A%2F%2Fb.example%2Fwhip" in page.url
        # the hash is the state: a reload shows the same list
        await page.reload()
        await expect(page.get_by_label("Target", exact=True)).to_have_value(TARGET_B)
        await expect(rows).to_have_count(2)
        await page.get_by_label("Target", exact=True).focus()
        # a new incident for B shows up on the next refresh, filters and focus untouched
        for _ in range(3):
            u.clock.advance(20)
            await u.m.send("probe-eu", result(TARGET_B, connect_s=0.9, samples=[]))
        await expect(rows).to_have_count(3)
        await expect(page.locator("a.incident-link", has_text="connect_slow")).to_be_visible()
        await expect(page.get_by_label("Target", exact=True)).to_have_value(TARGET_B)
        await expect(page.get_by_label("Target", exact=True)).to_be_focused()
        # a rule and a state
        await page.get_by_label("Rule", exact=True).fill("call_failed")
        await expect(rows).to_have_count(1)
        await page.get_by_label("State", exact=True).select_option("resolved")
        await expect(page.locator("p.empty")).to_have_text("No incidents match these filters.")
        assert "state=resolved" in page.url
        assert "rule=call_failed" in page.url


# --- one incident ----------------------------------------------------------------------------


async def test_incident_page_shows_members_timeline_evidence_and_charts(tmp_path: Path) -> None:
    async with (
        receiver() as oncall,
        receiver() as pager,
        ui(
            tmp_path,
            channels=[
                {"name": "oncall", "type": "webhook", "url": oncall.url},
                {"name": "pager", "type": "webhook", "url": pager.url},
            ],
            notify={"normal": ["oncall", "pager"], "important": ["oncall"]},
            # claims outlive the seeding's 30 s steps of the clock: one attempt is one try
            delivery={"timeout_s": 120},
        ) as u,
    ):
        pager.fail_with = [503] * 100  # the pager is down: its notifications wait to retry
        ids = await seed(u.m, u.clock)
        await u.sign_in()
        page = u.page
        await page.locator("a.incident-link", has_text="video_jitter_high").click()
        await expect(page.locator("#incident-title")).to_have_text("video_jitter_high")
        assert page.url.endswith(f"#/incidents/{ids['video_jitter_high']}")
        await expect(page.locator("#incident-scope")).to_have_text(f"{TARGET_B} from eu-west")
        await expect(page.locator("#condition")).to_have_text("video.jitter_s > 0.03")
        member = page.locator("table.members tbody tr")
        await expect(member).to_have_count(1)
        await expect(member.locator("td").nth(1)).to_have_text("eu-west")
        await expect(member.locator("td").nth(2)).to_have_text(re.compile(r"^\d+ ms$"))
        await expect(member.locator("td").nth(3)).to_have_text("30 ms")
        await expect(page.locator("#timeline li")).to_have_count(1)
        await expect(page.locator('#timeline li[data-kind="opened"]')).to_contain_text("callmon")
        # each channel's delivery state
        sent = page.locator('#notifications li[data-channel="oncall"]')
        await expect(sent).to_have_attribute("data-state", "sent")
        await expect(sent.locator(".event")).to_have_text("trigger")
        waiting = page.locator('#notifications li[data-channel="pager"]')
        await expect(waiting).to_have_attribute("data-state", re.compile("pending|failed"))
        await expect(waiting.locator(".last-error")).to_contain_text("503")

        # the rule's chart first, drawn from the stored seconds, its threshold and the opening
        chart = page.locator("figure.chart").first
        await expect(chart).to_have_attribute("data-metric", "video.jitter_s")
        await expect(chart).to_have_class(re.compile("rule-metric"))
        line = chart.locator("path.line")
        await expect(line).to_have_count(1)
        drawn = await line.get_attribute("d")
        assert drawn is not None
        assert drawn.count("L") >= 500, "one point per stored second"
        await expect(chart.locator("line.threshold")).to_have_count(1)
        await expect(chart.locator("line.marker-opened")).to_have_count(1)
        await expect(chart.locator("svg")).to_have_attribute(
            "aria-label", re.compile(r"600 samples.*threshold 30 ms")
        )
        await expect(page.locator("figure.chart")).to_have_count(8)
        await expect(page.locator('figure[data-metric="mos"] path.line')).to_have_count(1)
        await expect(
            page.locator('figure[data-metric="audio.jitter_s"] line.threshold')
        ).to_have_count(0)
        print("screenshot:", await u.screenshot("incident.png", full_page=True))

        # the failed call's phases: reached milestones timed, ICE failed with the reason
        await u.open(f"#/incidents/{ids['call_failed']}")
        await expect(page.locator("#evidence-title")).to_have_text("Failing call")
        await expect(page.locator("#failure")).to_have_text(
            "Failed in the ice phase: ICE did not connect within 5 s: no candidate pair worked"
        )
        phases = page.locator("table.phases")
        await expect(phases.locator('tr[data-phase="offer_s"] td.value')).to_have_text("10 ms")
        await expect(phases.locator('tr[data-phase="answer_s"] td.value')).to_have_text("84 ms")
        failed_row = phases.locator('tr[data-phase="ice_s"]')
        await expect(failed_row).to_have_class("failed")
        await expect(failed_row.locator("td.value")).to_have_text("failed here")
        await expect(phases.locator('tr[data-phase="dtls_s"] td.value')).to_have_text("not reached")
        # a failed call has no seconds to chart, and the page says so once
        await expect(page.locator("#no-samples")).to_contain_text("No per-second samples")
        await expect(page.locator("figure.chart")).to_have_count(0)


async def test_acknowledge_stops_the_ack_timer_and_lands_on_the_timeline(tmp_path: Path) -> None:
    async with ui(tmp_path) as u:
        ids = await seed(u.m, u.clock)
        incident_id = ids["video_jitter_high"]
        await u.sign_in()
        page = u.page
        await u.open(f"#/incidents/{incident_id}")
        await expect(page.locator("#timers .timer")).to_have_count(2)

        await page.get_by_role("button", name="Acknowledge").click()
        await expect(page.locator(".ticket-head .badge.state")).to_have_text("acknowledged")
        acked = page.locator('#timeline li[data-kind="acknowledged"]')
        await expect(acked).to_contain_text("by alice")
        await expect(page.locator("#timers .timer")).to_have_count(1)
        await expect(page.locator("#timers .timer")).to_have_text(re.compile(r"^resolve in "))
        await expect(page.locator("#timers")).to_contain_text("Acknowledged after")
        await expect(page.get_by_role("button", name="Acknowledge")).to_have_count(0)

        ticket = await u.ticket(incident_id)
        assert ticket["incident"]["state"] == "acknowledged"
        assert [(e["kind"], e["actor"]) for e in ticket["timeline"]] == [
            ("opened", "callmon"),
            ("acknowledged", "alice"),
        ]
        # the list agrees
        await page.get_by_role("link", name="← All incidents").click()
        row = page.locator(f'tr[data-incident-id="{incident_id}"]')
        await expect(row.locator(".badge.state")).to_have_text("acknowledged")
        await expect(row.locator(".timer.primary")).to_have_text(re.compile(r"^resolve in "))


async def test_a_reopened_incident_times_its_fresh_acknowledgement(tmp_path: Path) -> None:
    async with ui(tmp_path) as u:

        def seconds(first: int, last: int, jitter: float) -> dict[str, Any]:
            return batch("call-r", [sample(float(t), jitter=jitter) for t in range(first, last)])

        # opened 100 min ago, cleared 20 min ago, back 2 min ago: within the reopen window
        at_age(u.clock, 100 * 60)
        await u.m.send("probe-eu", seconds(0, 3, 0.05))
        at_age(u.clock, 20 * 60)
        await u.m.send("probe-eu", seconds(3, 11, 0.005))
        at_age(u.clock, 2 * 60)
        await u.m.send("probe-eu", seconds(11, 14, 0.05))
        status, body = await u.m.api("GET", "/api/v1/incidents?state=open")
        assert status == 200, body
        (incident,) = body["incidents"]
        assert incident["reopened"] == 1

        await u.sign_in()
        page = u.page
        await u.open("#/incidents")
        timer = page.locator(f'tr[data-incident-id="{incident["id"]}"] .timer.primary')
        # 58 of the hour to acknowledge are left, counted from the reopening: green. Against
        # the 158 minutes since the first opening it would show amber.
        await expect(timer).to_have_text(re.compile(r"ack in 5[78]:\d\d"))
        await expect(timer).to_have_attribute("data-level", "ok")

        await u.open(f"#/incidents/{incident['id']}")
        await expect(page.get_by_text("Reopened", exact=True)).to_be_visible()
        await expect(page.locator("#timers .timer").first).to_have_attribute("data-level", "ok")
        await expect(page.locator('#timeline li[data-kind="reopened"]')).to_have_count(1)


async def test_severity_comment_and_resolve_with_reasons(tmp_path: Path) -> None:
    async with ui(tmp_path) as u:
        ids = await seed(u.m, u.clock)
        incident_id = ids["mos_low"]
        await u.sign_in()
        page = u.page
        await u.open(f"#/incidents/{incident_id}")
        await expect(page.locator(".ticket-head .badge.sev")).to_have_text("normal")

        # severity: a blank reason is the API's to refuse, in its own words
        await page.get_by_role("button", name="Change severity…").click()
        dialog = page.locator("#severity-dialog")
        await expect(dialog).to_be_visible()
        await dialog.get_by_label("New severity").select_option("important")
        await dialog.get_by_label("Why?").fill("   ")
        await dialog.get_by_role("button", name="Change severity").click()
        await expect(dialog.get_by_role("alert")).to_have_text("reason is required: say why")
        await dialog.get_by_label("Why?").fill("every US customer hears robots")
        await dialog.get_by_role("button", name="Change severity").click()
        await expect(dialog).to_be_hidden()
        await expect(page.locator(".ticket-head .badge.sev")).to_have_text("important")
        changed = page.locator('#timeline li[data-kind="severity_changed"]')
        await expect(changed).to_contain_text("normal → important")
        await expect(changed).to_contain_text("every US customer hears robots")

        # a comment
        await page.get_by_label("Add a comment").fill("   ")
        await page.get_by_role("button", name="Add comment").click()
        await expect(page.locator(".comment-form [role=alert]")).to_have_text(
            "text is required: say why"
        )
        await page.get_by_label("Add a comment").fill("TURN relay in us-east restarted at 10:02")
        await page.get_by_role("button", name="Add comment").click()
        await expect(page.locator("#comments li")).to_have_count(1)
        await expect(page.locator("#comments")).to_contain_text("TURN relay in us-east restarted")
        await expect(page.locator('#timeline li[data-kind="comment"]')).to_contain_text("alice")

        # resolve, with a reason
        await page.get_by_role("button", name="Resolve…").click()
        resolve = page.locator("#resolve-dialog")
        await resolve.get_by_label("Why is it resolved?").fill("relay fixed; calls connect again")
        await resolve.get_by_role("button", name="Resolve").click()
        await expect(page.locator(".ticket-head .badge.state")).to_have_text("resolved")
        resolved = page.locator('#timeline li[data-kind="resolved"]')
        await expect(resolved).to_contain_text("relay fixed; calls connect again")
        await expect(resolved).to_contain_text("by alice")
        await expect(page.locator("#actions")).to_contain_text("nothing left to do")
        await expect(page.locator("#timers .timer")).to_have_count(0)
        # the charts end at the resolution now, and mark it
        await expect(page.locator("#charts")).to_contain_text("to the resolution at")
        await expect(page.locator("figure.chart line.marker-resolved")).to_have_count(8)

        ticket = await u.ticket(incident_id)
        assert ticket["incident"]["state"] == "resolved"
        assert ticket["incident"]["severity"] == "important"
        assert [(e["kind"], e["actor"], e["text"]) for e in ticket["timeline"][1:]] == [
            ("severity_changed", "alice", "every US customer hears robots"),
            ("comment", "alice", "TURN relay in us-east restarted at 10:02"),
            ("resolved", "alice", "relay fixed; calls connect again"),
        ]


async def test_an_ended_session_asks_for_sign_in_again(tmp_path: Path) -> None:
    async with ui(tmp_path) as u:
        ids = await seed(u.m, u.clock)
        await u.sign_in()
        page = u.page
        await u.open(f"#/incidents/{ids['mos_low']}")
        await expect(page.get_by_role("button", name="Acknowledge")).to_be_visible()
        # right after a refresh of the ticket, so that the next one (5 s on) comes after the click
        ticket_path = f"/api/v1/incidents/{ids['mos_low']}"
        async with page.expect_response(lambda response: response.url.endswith(ticket_path)):
            pass
        u.m.app[TOKENS].sessions.clear()  # as a restart of the monitor does

        await page.get_by_role("button", name="Acknowledge").click()
        await expect(page.locator("#action-error")).to_have_text(
            "Your session has ended: sign in again, then retry."
        )
        # the next refresh finds reading refused too: only signing in helps
        await expect(page.locator("#signin-reason")).to_have_text(
            "Your session has ended. Sign in again to continue."
        )
        await expect(page.locator("#session")).to_have_text("Read-only")
        await page.get_by_label("Operator token").fill(OPERATOR_TOKEN)
        await page.get_by_role("button", name="Sign in", exact=True).click()
        await expect(page.locator("#incident-title")).to_have_text("mos_low")
        await page.get_by_role("button", name="Acknowledge").click()
        await expect(page.locator(".ticket-head .badge.state")).to_have_text("acknowledged")


# --- the matrix ------------------------------------------------------------------------------


async def test_matrix_colours_cells_by_worst_firing_rule_and_greys_old_ones(
    tmp_path: Path,
) -> None:
    async with ui(tmp_path) as u:
        m, clock = u.m, u.clock
        at_age(clock, 300)  # A from us-east: last heard of five minutes ago
        await m.send("probe-us", result(TARGET_A, connect_s=0.25))
        at_age(clock, 0)
        await m.send("probe-eu", result(TARGET_A, connect_s=0.31))
        await m.send(
            "probe-eu", batch("call-b", [sample(float(t), jitter=0.05) for t in range(5)], TARGET_B)
        )
        for _ in range(2):
            clock.advance(1)
            await m.send("probe-us", result(TARGET_B, status=Status.FAILED, samples=[]))
        await u.sign_in()
        page = u.page
        await page.get_by_role("link", name=MATRIX_TITLE).click()
        await expect(page.get_by_role("heading", name=MATRIX_TITLE)).to_be_visible()

        def cell(target: str, region: str) -> Any:
            return page.locator(f'td.cell[data-target="{target}"][data-region="{region}"]')

        await expect(cell(TARGET_A, "eu-west")).to_have_attribute("data-level", "ok")
        await expect(cell(TARGET_A, "eu-west")).to_contain_text("310 ms")
        await expect(cell(TARGET_A, "us-east")).to_have_attribute("data-level", "stale")
        await expect(cell(TARGET_A, "us-east")).to_contain_text(
            re.compile(r"last result 5 min( \d+ s)? ago")
        )
        await expect(cell(TARGET_B, "eu-west")).to_have_attribute("data-level", "normal")
        await expect(cell(TARGET_B, "eu-west")).to_contain_text("audio_jitter_high")
        await expect(cell(TARGET_B, "eu-west")).to_contain_text("50 ms / 5.0 ms")
        await expect(cell(TARGET_B, "us-east")).to_have_attribute("data-level", "important")
        await expect(cell(TARGET_B, "us-east")).to_contain_text("call_failed")
        await expect(page.locator("table.matrix thead th")).to_have_text(
            ["Target", "eu-west", "us-east"]
        )
        print("screenshot:", await u.screenshot("matrix.png"))


# --- reading without signing in --------------------------------------------------------------


async def test_anonymous_reading_is_read_only(tmp_path: Path) -> None:
    async with ui(tmp_path, anonymous_read=True) as u:
        ids = await seed(u.m, u.clock)
        page = u.page
        # a session cookie from before a monitor restart: the monitor would refuse reads
        # made with it, so the page drops it
        await page.context.add_cookies(
            [{"name": "callmon_session", "value": "from-before-a-restart", "url": u.m.url}]
        )
        await u.open()
        await expect(page.locator("table.incidents tbody tr")).to_have_count(4)
        await expect(page.get_by_role("link", name="Sign in")).to_be_visible()
        await expect(page.locator("#operator")).to_have_count(0)

        await u.open(f"#/incidents/{ids['mos_low']}")
        await expect(page.locator("#incident-title")).to_have_text("mos_low")
        await expect(page.locator("#timeline li")).to_have_count(1)
        await expect(page.locator("#actions .read-only")).to_contain_text("Sign in")
        for name in ("Acknowledge", "Resolve…", "Change severity…", "Add comment"):
            await expect(page.get_by_role("button", name=name)).to_have_count(0)
        await expect(page.locator("#comment-text")).to_have_count(0)
        # the charts read anonymously too
        await expect(page.locator('figure[data-metric="mos"] line.threshold')).to_have_count(1)

        # signing in from here comes back to this incident, with the actions
        await page.locator("#actions").get_by_role("link", name="Sign in").click()
        await page.get_by_label("Operator token").fill(OPERATOR_TOKEN)
        await page.get_by_role("button", name="Sign in", exact=True).click()
        await expect(page.locator("#operator")).to_have_text("alice")
        await expect(page.locator("#incident-title")).to_have_text("mos_low")
        await expect(page.get_by_role("button", name="Acknowledge")).to_be_visible()
