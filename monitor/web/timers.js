// Response timers: a pure function of an incident and "now", and one ticker that rewrites
// every timer and relative age on the page each second.

import { serverNow } from "./api.js";
import { countdown, parseTime, relative } from "./format.js";
import { h } from "./dom.js";

// Which clocks run: the acknowledgement clock while triggered, the resolution clock until
// resolved. Each counts from the original opening, except that a reopening restarts the
// acknowledgement clock (README: response timers).
export function runningTimers(incident) {
  const opened = parseTime(incident.opened_at);
  const timers = [];
  if (incident.state === "triggered") {
    timers.push({
      kind: "ack",
      opened: incident.reopened_at ? parseTime(incident.reopened_at) : opened,
      due: parseTime(incident.ack_due),
      breached: incident.ack_breached,
    });
  }
  if (incident.state !== "resolved") {
    timers.push({
      kind: "resolve",
      opened,
      due: parseTime(incident.resolve_due),
      breached: incident.resolve_breached,
    });
  }
  return timers;
}

// Closeness to breach, from the share of the tier left: ok over half, warn under half,
// danger under a tenth, breached once due (or once the monitor says so).
export function timerLevel(fractionLeft, breached) {
  if (breached || fractionLeft <= 0) return "breached";
  if (fractionLeft < 0.1) return "danger";
  if (fractionLeft < 0.5) return "warn";
  return "ok";
}

export function timerState(timer, now) {
  const left = (timer.due - now) / 1000;
  const span = Math.max(1, (timer.due - timer.opened) / 1000);
  const level = timerLevel(left / span, timer.breached);
  const text =
    left > 0 ? `${timer.kind} in ${countdown(left)}` : `${timer.kind} ${countdown(-left)} overdue`;
  return { text, level, fraction: left / span };
}

const LEVEL_WORDS = {
  ok: "on time",
  warn: "less than half the time left",
  danger: "less than a tenth of the time left",
  breached: "deadline missed",
};

function paint(element, now) {
  const timer = {
    kind: element.dataset.kind,
    opened: Number(element.dataset.opened),
    due: Number(element.dataset.due),
    breached: element.dataset.breached === "1",
  };
  const state = timerState(timer, now);
  if (element.textContent !== state.text) element.textContent = state.text;
  if (element.dataset.level !== state.level) {
    element.dataset.level = state.level;
    // colour is not the only signal: the level is in words for tooltips and screen readers
    element.title = `${LEVEL_WORDS[state.level]} (due ${new Date(timer.due).toLocaleString()})`;
  }
}

// "Now" for display, on whole seconds of the monitor's clock. The ticker fires just after
// each such second; reading the time rounded makes every tick move a countdown by exactly
// one second, however late the browser runs the tick.
function displayNow() {
  return Math.round(serverNow() / 1000) * 1000;
}

// <span role="timer"> that the ticker keeps current.
export function timerElement(timer, extraClass = "") {
  const element = h("span", {
    class: ["timer", extraClass],
    role: "timer",
    "data-kind": timer.kind,
    "data-opened": timer.opened,
    "data-due": timer.due,
    "data-breached": timer.breached ? "1" : "0",
  });
  paint(element, displayNow());
  return element;
}

// <time> showing "5 min ago", kept current by the ticker; the local time is its tooltip.
export function ageElement(ms, extraClass = "") {
  if (ms === null) return h("span", { class: "muted" }, "–");
  const element = h(
    "time",
    {
      class: ["age", extraClass],
      datetime: new Date(ms).toISOString(),
      title: new Date(ms).toLocaleString(),
      "data-at": ms,
    },
    relative(ms, displayNow()),
  );
  return element;
}

function tick() {
  const now = displayNow();
  for (const element of document.querySelectorAll(".timer[data-due]")) paint(element, now);
  for (const element of document.querySelectorAll("time[data-at]")) {
    const text = relative(Number(element.dataset.at), now);
    if (element.textContent !== text) element.textContent = text;
  }
}

// One ticker for the whole page, on the second so every timer turns together.
export function startTicker() {
  const schedule = () => {
    setTimeout(
      () => {
        tick();
        schedule();
      },
      1000 - (serverNow() % 1000) + 20,
    );
  };
  schedule();
}
