// One incident: the ticket, what breached, the failing call, charts, the timeline,
// comments, notifications and (signed in) the operator's actions.

import { api } from "../api.js";
import { fill, h } from "../dom.js";
import { duration, localDateTime, metricValue, moment, parseTime } from "../format.js";
import { ageElement, runningTimers, timerElement } from "../timers.js";
import { actionsPanel } from "./actions.js";
import { commentForm, comments, notifications, timeline } from "./activity.js";
import { chartsFor } from "./charts.js";
import {
  pageHeading,
  ruleMetric,
  scopeHint,
  severityBadge,
  shortTitle,
  signInLink,
  stateBadge,
} from "./common.js";
import { batchNotes, callEvidence } from "./evidence.js";

// Charts change slowly next to the ticket: fetch samples every third refresh.
const CHART_EVERY = 3;

function card(id, title, ...children) {
  return h(
    "section",
    { class: "card", id, "aria-labelledby": `${id}-title` },
    h("h2", { id: `${id}-title` }, title),
    ...children,
  );
}

function when(iso) {
  const ms = parseTime(iso);
  if (ms === null) return h("span", { class: "muted" }, "–");
  return h(
    "span",
    {},
    localDateTime(ms),
    h("span", { class: "muted small block" }, ageElement(ms)),
  );
}

function thresholdText(metric, threshold) {
  if (Array.isArray(threshold)) {
    return `outside ${metricValue(metric, threshold[0])} … ${metricValue(metric, threshold[1])}`;
  }
  return metricValue(metric, threshold);
}

// --- sections -------------------------------------------------------------------------------

function header(incident) {
  return [
    pageHeading(shortTitle(incident), { id: "incident-title" }),
    h(
      "div",
      { class: "badges" },
      severityBadge(incident.severity),
      stateBadge(incident.state),
      scopeHint(incident.scope),
      incident.reopened ? h("span", { class: "badge" }, `reopened ×${incident.reopened}`) : null,
      incident.escalation_level
        ? h("span", { class: "badge escalated" }, `escalation level ${incident.escalation_level}`)
        : null,
      h("span", { class: "muted small" }, `#${incident.id}`),
    ),
    h("p", { class: "scope-line", id: "incident-scope" }, incident.scope.description),
  ];
}

function summary(incident) {
  const details = incident.details || {};
  const window = details.window ? `${details.window.k} of the last ${details.window.n}` : "–";
  const facts = (rows) =>
    h(
      "dl",
      { class: "facts" },
      rows.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]),
    );
  return [
    details.description ? h("p", { class: "rule-description" }, details.description) : null,
    h(
      "div",
      { class: "facts-columns" },
      facts([
        ["Rule", h("code", {}, incident.rule)],
        [
          "Condition",
          details.condition ? h("code", { id: "condition" }, details.condition) : "–",
        ],
        ["Window", window],
      ]),
      facts([
        ["Opened", when(incident.opened_at)],
        ...(incident.reopened_at ? [["Reopened", when(incident.reopened_at)]] : []),
        ["Acknowledged", when(incident.acknowledged_at)],
        ["Resolved", when(incident.resolved_at)],
      ]),
    ),
  ];
}

function timers(incident) {
  const running = runningTimers(incident);
  const stopped = [];
  const opened = parseTime(incident.opened_at);
  if (incident.state !== "triggered" && incident.acknowledged_at) {
    const after = (parseTime(incident.acknowledged_at) - opened) / 1000;
    stopped.push(h("p", { class: "stopped" }, `Acknowledged after ${duration(after)}`));
  }
  if (incident.resolved_at) {
    const after = (parseTime(incident.resolved_at) - opened) / 1000;
    stopped.push(h("p", { class: "stopped" }, `Resolved after ${duration(after)}`));
  }
  return h(
    "div",
    { class: "timers-big" },
    running.map((timer) =>
      h(
        "p",
        {},
        timerElement(timer, "big"),
        h("span", { class: "due muted small" }, `due ${localDateTime(timer.due)}`),
      ),
    ),
    stopped,
  );
}

function members(incident) {
  const details = incident.details || {};
  const conditions = details.conditions || [];
  if (!conditions.length) return h("p", { class: "muted" }, "No member conditions recorded.");
  const metric = ruleMetric(incident) || "";
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "members" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          ["Target", "Region", "Value", "Threshold", "Severity", "Breaches", "Since"].map((t) =>
            h("th", { scope: "col" }, t),
          ),
        ),
      ),
      h(
        "tbody",
        {},
        conditions.map((c) =>
          h(
            "tr",
            { "data-target": c.target, "data-region": c.region },
            h("td", { class: "wrap" }, c.target),
            h("td", {}, c.region),
            h("td", { class: "value breach" }, metricValue(metric, c.value)),
            h("td", { class: "value" }, thresholdText(metric, details.threshold)),
            h("td", {}, c.severity ? severityBadge(c.severity) : "–"),
            h("td", {}, `${c.breaches} of ${c.evaluations}`),
            h("td", {}, ageElement(moment(c.since))),
          ),
        ),
      ),
    ),
  );
}

// --- the page --------------------------------------------------------------------------------

export async function show(ctx) {
  const id = Number(ctx.route.id);
  const path = `/api/v1/incidents/${id}`;
  let ticket = await api.get(path);

  const headEl = h("header", { class: "ticket-head" });
  const summaryEl = h("div");
  const timersEl = h("div", { id: "timers" });
  const actionsEl = h("div", { id: "actions" });
  const membersEl = h("div");
  const batchesEl = h("div");
  const evidenceEl = h("div");
  const chartsEl = h("div", { id: "charts" });
  const timelineEl = h("div");
  const commentsEl = h("div");
  const notificationsEl = h("div", { id: "notifications" });
  const commentBox = h("div");

  fill(
    ctx.main,
    h("p", { class: "back" }, h("a", { href: ctx.lastListHash() }, "← All incidents")),
    headEl,
    h(
      "div",
      { class: "ticket" },
      h(
        "div",
        { class: "ticket-main" },
        card("summary", "Summary", summaryEl),
        card("members", "What breached", membersEl, batchesEl),
        evidenceEl,
        card("metrics", "Metrics around the incident", chartsEl),
      ),
      h(
        "aside",
        { class: "ticket-side", "aria-label": "Response" },
        card("response", "Response", timersEl, actionsEl),
        card("timeline-card", "Timeline", timelineEl),
        card("comments-card", "Comments", commentsEl, commentBox),
        card("notifications-card", "Notifications", notificationsEl),
      ),
    ),
  );

  // Sections are rebuilt only when their data changed, so a refresh neither flickers nor
  // takes away a selection; forms are never rebuilt while the operator uses them.
  const shown = new Map();
  function update(element, data, build) {
    const key = JSON.stringify(data);
    if (shown.get(element) === key) return;
    shown.set(element, key);
    fill(element, build());
  }

  let cycle = 0;
  let chartedResolved = null;
  async function refresh() {
    ticket = await api.get(path);
    render();
    cycle += 1;
    const resolved = ticket.incident.state === "resolved";
    // a resolution fixes the window's end: draw once more then, and no more after it
    if (resolved !== chartedResolved || (!resolved && cycle % CHART_EVERY === 0)) {
      await drawCharts();
    }
  }

  function render() {
    const incident = ticket.incident;
    const signedIn = ctx.signedIn();
    document.title = `${shortTitle(incident)} · callmon`;
    update(headEl, incident, () => header(incident));
    update(summaryEl, incident, () => summary(incident));
    update(timersEl, incident, () => timers(incident));
    // an open dialog stays put: the operator is typing a reason in it
    if (!actionsEl.querySelector("dialog[open]")) {
      update(actionsEl, [incident.state, incident.severity, signedIn], () =>
        actionsPanel(ctx, incident, refresh),
      );
    }
    update(membersEl, incident.details, () => members(incident));
    update(evidenceEl, Object.keys(ticket.evidence), () => callEvidence(ticket.evidence));
    update(batchesEl, Object.keys(ticket.evidence), () => batchNotes(ticket.evidence));
    update(timelineEl, ticket.timeline, () => timeline(ticket.timeline));
    update(commentsEl, ticket.comments, () => comments(ticket.comments));
    update(notificationsEl, ticket.notifications, () => notifications(ticket.notifications));
    update(commentBox, signedIn, () =>
      signedIn
        ? commentForm(incident.id, refresh)
        : h("p", { class: "muted small" }, signInLink(), " to comment."),
    );
  }

  async function drawCharts() {
    const incident = ticket.incident;
    try {
      fill(chartsEl, await chartsFor(incident));
      chartedResolved = incident.state === "resolved";
    } catch (failure) {
      fill(chartsEl, h("p", { class: "form-error" }, `No charts: ${failure.message}`));
    }
  }

  render();
  await drawCharts();
  return {
    refresh,
    dispose: () => {
      // a dialog belongs to this incident: it must not outlive the page
      for (const dialog of ctx.main.querySelectorAll("dialog[open]")) dialog.close();
    },
  };
}
