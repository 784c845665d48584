// What happened to an incident and who was told: the timeline, the comments (and the
// form to add one) and each notification's delivery state.

import { api } from "../api.js";
import { h } from "../dom.js";
import { duration, localDateTime, parseTime } from "../format.js";
import { ageElement } from "../timers.js";
import { refusal } from "./common.js";

const KIND_WORDS = {
  opened: "opened",
  reopened: "reopened",
  severity_raised: "severity raised",
  severity_changed: "severity changed",
  acknowledged: "acknowledged",
  resolved: "resolved",
  comment: "comment",
  ack_breached: "ack deadline missed",
  resolve_breached: "resolve deadline missed",
  escalated: "escalated",
};

function eventExtra(data) {
  const bits = [];
  if (data.from && data.to) bits.push(`${data.from} → ${data.to}`);
  else if (data.severity) bits.push(data.severity);
  if (typeof data.time_to_acknowledge_s === "number") {
    bits.push(`after ${duration(data.time_to_acknowledge_s)}`);
  }
  if (typeof data.time_to_resolve_s === "number") {
    bits.push(`after ${duration(data.time_to_resolve_s)}`);
  }
  return bits.length ? h("span", { class: "muted small" }, ` (${bits.join(", ")})`) : null;
}

export function timeline(events) {
  return h(
    "ol",
    { class: "timeline", id: "timeline" },
    events.map((e) => {
      const at = parseTime(e.at);
      return h(
        "li",
        { "data-kind": e.kind },
        h(
          "div",
          { class: "event-head" },
          h(
            "span",
            { class: `kind kind-${e.kind}` },
            KIND_WORDS[e.kind] || e.kind.replaceAll("_", " "),
          ),
          " by ",
          h("strong", { class: "actor" }, e.actor),
          eventExtra(e.data || {}),
        ),
        // an acknowledgement without a note says "acknowledged": no need to say it twice
        e.text && e.text !== e.kind
          ? h("p", { class: `event-text ${e.kind === "comment" ? "comment-text" : ""}` }, e.text)
          : null,
        h("div", { class: "muted small" }, localDateTime(at), " · ", ageElement(at)),
      );
    }),
  );
}

export function comments(list) {
  if (!list.length) return h("p", { class: "muted", id: "comments" }, "No comments yet.");
  return h(
    "ul",
    { class: "comments", id: "comments" },
    list.map((c) =>
      h(
        "li",
        {},
        h(
          "div",
          { class: "event-head" },
          h("strong", {}, c.author),
          " ",
          h("span", { class: "muted small" }, ageElement(parseTime(c.at))),
        ),
        h("p", { class: "comment-text" }, c.text),
      ),
    ),
  );
}

// A list rather than a table: it lives in the narrow side column.
export function notifications(rows) {
  if (!rows.length) {
    return h("p", { class: "muted" }, "None: no channel is told of this incident's changes.");
  }
  return h(
    "ul",
    { class: "notifications" },
    rows.map((n) => {
      const at = parseTime(n.sent_at) ?? parseTime(n.next_attempt_at) ?? parseTime(n.created_at);
      const word = n.sent_at ? "sent" : n.next_attempt_at ? "next try" : "queued";
      return h(
        "li",
        { "data-channel": n.channel, "data-state": n.state },
        h(
          "div",
          { class: "event-head" },
          h("strong", { class: "channel" }, n.channel),
          " ",
          h("span", { class: "event" }, n.event),
          " ",
          h("span", { class: `badge delivery delivery-${n.state}` }, n.state),
        ),
        h(
          "div",
          { class: "muted small" },
          `${n.attempts} attempt${n.attempts === 1 ? "" : "s"} · ${word} `,
          ageElement(at),
        ),
        n.last_error ? h("div", { class: "last-error small" }, n.last_error) : null,
      );
    }),
  );
}

export function commentForm(incidentId, refresh) {
  const error = h("p", { class: "form-error", role: "alert", hidden: true });
  const text = h("textarea", { id: "comment-text", name: "text", rows: 3, required: true });
  const button = h("button", { type: "submit", class: "button" }, "Add comment");
  return h(
    "form",
    {
      class: "stack comment-form",
      onsubmit: async (event) => {
        event.preventDefault();
        error.hidden = true;
        button.disabled = true;
        try {
          await api.post(`/api/v1/incidents/${incidentId}/comments`, { text: text.value });
          text.value = "";
          await refresh();
        } catch (failure) {
          error.textContent = refusal(failure);
          error.hidden = false;
        } finally {
          button.disabled = false;
        }
      },
    },
    h("label", { for: "comment-text" }, "Add a comment"),
    text,
    error,
    h("div", { class: "actions-row" }, button),
  );
}
