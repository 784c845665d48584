// Pieces the views share: badges, how an incident names its rule and scope.

import { h } from "../dom.js";

export const SEVERITIES = ["urgent", "important", "normal"];
export const SEVERITY_RANK = { urgent: 0, important: 1, normal: 2 };

export function severityBadge(severity) {
  return h("span", { class: `badge sev sev-${severity}`, "data-severity": severity }, severity);
}

export function stateBadge(state) {
  return h("span", { class: `badge state state-${state}`, "data-state": state }, state);
}

const SCOPE_HINTS = {
  target: "target-wide",
  region: "region-wide",
  probe: "probe",
  alert: "alert",
};

export function scopeHint(scope) {
  const hint = SCOPE_HINTS[scope.kind];
  return hint ? h("span", { class: `badge scope scope-${scope.kind}` }, hint) : null;
}

// The metric a rule watches: the first word of its condition ("audio.jitter_s > 0.03").
export function ruleMetric(incident) {
  const condition = (incident.details && incident.details.condition) || "";
  return condition.split(" ")[0] || null;
}

// The title without the scope, which the page shows on its own: "call_failed".
export function shortTitle(incident) {
  const suffix = `: ${incident.scope.description}`;
  return incident.title.endsWith(suffix) ? incident.title.slice(0, -suffix.length) : incident.title;
}

// A link to the sign-in page that comes back here afterwards (the hash of the moment of
// the click: list filters change it without a re-render).
export function signInLink(text = "Sign in", extra = {}) {
  const here = () => `#/signin?next=${encodeURIComponent(location.hash || "#/incidents")}`;
  const follow = (event) => {
    event.currentTarget.href = here();
  };
  return h("a", { href: here(), onclick: follow, ...extra }, text);
}

// What to tell the operator when an action is refused: the API's own words, except for a
// 401, whose words ("a bearer token is required") mean "your session ended" here.
export function refusal(failure) {
  if (failure.status === 401) return "Your session has ended: sign in again, then retry.";
  return failure.message;
}

export function pageHeading(text, extra = {}) {
  return h("h1", { tabindex: "-1", ...extra }, text);
}
