// The incident list: filters kept in the URL hash, counts per severity, live timers.

import { api, withQuery } from "../api.js";
import { fill, h } from "../dom.js";
import { metricValue, parseTime } from "../format.js";
import { ageElement, runningTimers, timerElement } from "../timers.js";
import {
  SEVERITIES,
  SEVERITY_RANK,
  pageHeading,
  ruleMetric,
  scopeHint,
  severityBadge,
  shortTitle,
  stateBadge,
} from "./common.js";

const STATES = [
  ["open", "Open (not resolved)"],
  ["triggered", "Triggered"],
  ["acknowledged", "Acknowledged"],
  ["resolved", "Resolved"],
  ["any", "Any state"],
];
const TEXT_FILTERS = ["target", "region", "rule"];

function filtersFrom(query) {
  return {
    // a hand-edited hash falls back to the defaults rather than to an API error
    state: STATES.some(([value]) => value === query.get("state")) ? query.get("state") : "open",
    severity: SEVERITIES.includes(query.get("severity")) ? query.get("severity") : "",
    target: query.get("target") || "",
    region: query.get("region") || "",
    rule: query.get("rule") || "",
  };
}

function hashFor(filters) {
  const query = new URLSearchParams();
  if (filters.state !== "open") query.set("state", filters.state);
  for (const key of ["severity", ...TEXT_FILTERS]) if (filters[key]) query.set(key, filters[key]);
  const text = query.toString();
  return text ? `#/incidents?${text}` : "#/incidents";
}

// Most pressing first: severity, then the nearest deadline, then the newest.
function byUrgency(a, b) {
  const rank = SEVERITY_RANK[a.severity] - SEVERITY_RANK[b.severity];
  if (rank) return rank;
  const due = (i) => Math.min(...runningTimers(i).map((t) => t.due), Infinity);
  return due(a) - due(b) || b.id - a.id;
}

function conditionLine(incident) {
  const metric = ruleMetric(incident);
  const members = (incident.details && incident.details.conditions) || [];
  const parts = [];
  if (incident.details && incident.details.condition) parts.push(incident.details.condition);
  if (members.length === 1) parts.push(`latest ${metricValue(metric || "", members[0].value)}`);
  else if (members.length > 1) parts.push(`${members.length} members`);
  return parts.length ? h("div", { class: "muted small condition" }, parts.join(" · ")) : null;
}

function timersCell(incident) {
  if (incident.state === "resolved") {
    const resolved = parseTime(incident.resolved_at);
    return h("span", { class: "muted" }, "resolved ", ageElement(resolved));
  }
  return runningTimers(incident).map((timer, index) =>
    h("div", {}, timerElement(timer, index === 0 ? "primary" : "secondary")),
  );
}

function row(incident) {
  return h(
    "tr",
    {
      "data-incident-id": incident.id,
      "data-severity": incident.severity,
      "data-state": incident.state,
    },
    h("td", {}, severityBadge(incident.severity)),
    h(
      "td",
      { class: "incident-cell" },
      h("a", { href: `#/incidents/${incident.id}`, class: "incident-link" }, shortTitle(incident)),
      conditionLine(incident),
    ),
    h("td", { class: "scope-cell" }, incident.scope.description, " ", scopeHint(incident.scope)),
    h("td", {}, stateBadge(incident.state)),
    h("td", { class: "timers-cell" }, timersCell(incident)),
    h("td", { class: "age-cell" }, ageElement(parseTime(incident.opened_at))),
  );
}

export async function show(ctx) {
  let filters = filtersFrom(ctx.route.query);
  const known = { target: new Set(), region: new Set(), rule: new Set() };

  // --- filter form (built once: refreshes never touch what the operator is typing) ----
  const stateSelect = h(
    "select",
    { id: "filter-state", name: "state" },
    STATES.map(([value, label]) =>
      h("option", { value, selected: value === filters.state }, label),
    ),
  );
  const severitySelect = h(
    "select",
    { id: "filter-severity", name: "severity" },
    h("option", { value: "" }, "Any severity"),
    SEVERITIES.map((value) => h("option", { value, selected: value === filters.severity }, value)),
  );
  const lists = {};
  const inputs = {};
  for (const key of TEXT_FILTERS) {
    lists[key] = h("datalist", { id: `known-${key}` });
    inputs[key] = h("input", {
      id: `filter-${key}`,
      name: key,
      type: "search",
      list: `known-${key}`,
      value: filters[key],
      placeholder: "any",
      autocomplete: "off",
    });
  }
  const field = (label, control) =>
    h("div", { class: "field" }, h("label", { for: control.id }, label), control);
  const form = h(
    "form",
    { class: "filters", role: "search", "aria-label": "Filter incidents" },
    field("State", stateSelect),
    field("Severity", severitySelect),
    field("Target", inputs.target),
    field("Region", inputs.region),
    field("Rule", inputs.rule),
    h("button", { type: "button", class: "button quiet", onclick: clear }, "Clear filters"),
    Object.values(lists),
  );
  const counts = h("div", {
    class: "counts",
    role: "group",
    "aria-label": "Incidents by severity",
  });
  const summary = h("p", { class: "muted small", id: "list-summary", "aria-live": "polite" });
  const table = h("div", { class: "table-wrap" });

  const head = h("div", { class: "page-head" }, pageHeading("Incidents"), counts);
  fill(ctx.main, head, form, summary, table);

  function apply(next) {
    filters = { ...filters, ...next };
    ctx.replaceHash(hashFor(filters));
    return refresh();
  }

  function clear() {
    stateSelect.value = "open";
    severitySelect.value = "";
    for (const key of TEXT_FILTERS) inputs[key].value = "";
    apply({ state: "open", severity: "", target: "", region: "", rule: "" });
  }

  form.addEventListener("submit", (event) => event.preventDefault());
  stateSelect.addEventListener("change", () => apply({ state: stateSelect.value }));
  severitySelect.addEventListener("change", () => apply({ severity: severitySelect.value }));
  let typing = null;
  for (const key of TEXT_FILTERS) {
    const input = inputs[key];
    // the API matches exactly: wait for a pause in typing rather than query every letter
    input.addEventListener("input", () => {
      clearTimeout(typing);
      typing = setTimeout(() => apply({ [key]: input.value.trim() }), 400);
    });
    input.addEventListener("change", () => {
      clearTimeout(typing);
      if (filters[key] !== input.value.trim()) apply({ [key]: input.value.trim() });
    });
  }

  // The count buttons are made once and only relabelled: a refresh keeps their focus.
  const countButtons = SEVERITIES.map((severity) =>
    h(
      "button",
      {
        type: "button",
        class: `count sev-${severity}`,
        "data-severity": severity,
        title: `Show only ${severity} incidents`,
        onclick: () => {
          const next = filters.severity === severity ? "" : severity;
          severitySelect.value = next;
          apply({ severity: next });
        },
      },
      h("span", { class: "count-n" }, "0"),
      ` ${severity}`,
    ),
  );
  fill(counts, countButtons);

  function renderCounts(all) {
    for (const button of countButtons) {
      const severity = button.dataset.severity;
      const n = String(all.filter((i) => i.severity === severity).length);
      const label = button.querySelector(".count-n");
      if (label.textContent !== n) label.textContent = n;
      button.setAttribute("aria-pressed", String(filters.severity === severity));
    }
  }

  function remember(all) {
    for (const incident of all) {
      if (incident.scope.target) known.target.add(incident.scope.target);
      if (incident.scope.region) known.region.add(incident.scope.region);
      known.rule.add(incident.rule);
    }
    for (const key of TEXT_FILTERS) {
      if (lists[key].options.length === known[key].size) continue; // nothing new
      fill(lists[key], [...known[key]].sort().map((value) => h("option", { value })));
    }
  }

  function summaryWords(shown, all) {
    const stateWord = filters.state === "any" ? "" : filters.state;
    const noun = `${stateWord} incident${all.length === 1 ? "" : "s"}`.trim();
    const count =
      shown.length === all.length
        ? `${all.length} ${noun}`
        : `${shown.length} of ${all.length} ${noun} (${filters.severity} only)`;
    return `${count}${all.length === 1000 ? ", the newest 1000" : ""}, most pressing first.`;
  }

  function listContent(shown, all) {
    if (!shown.length) {
      const calm = filters.state === "open" && !all.length;
      return h(
        "p",
        { class: "empty card" },
        calm ? "No open incidents: every call looks healthy." : "No incidents match these filters.",
      );
    }
    const titles = ["Severity", "Incident", "Scope", "State", "Response timer", "Opened"];
    return h(
      "table",
      { class: "incidents" },
      h("caption", { class: "visually-hidden" }, "Incidents, most pressing first"),
      h("thead", {}, h("tr", {}, titles.map((title) => h("th", { scope: "col" }, title)))),
      h("tbody", {}, shown.map(row)),
    );
  }

  // The table is rebuilt only when what it shows changed (the timers and ages tick on
  // their own), and keyboard focus stays on the same incident across a rebuild.
  let shownKey = null;
  function renderList(shown, all) {
    const key = JSON.stringify(shown);
    if (key === shownKey) return;
    shownKey = key;
    const active = document.activeElement;
    const focused = table.contains(active) ? active.getAttribute("href") : null;
    fill(table, listContent(shown, all));
    if (focused) {
      const again = table.querySelector(`a[href="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
  }

  async function refresh() {
    const asked = { ...filters };
    // Severity is filtered here rather than by the API so that the counts per severity
    // stay visible while one severity is shown.
    const answer = await api.get(
      withQuery("/api/v1/incidents", {
        state: asked.state === "any" ? "" : asked.state,
        target: asked.target,
        region: asked.region,
        rule: asked.rule,
        limit: 1000,
      }),
    );
    if (JSON.stringify(asked) !== JSON.stringify(filters)) return; // a newer query is on its way
    const all = answer.incidents;
    const shown = all.filter((i) => !filters.severity || i.severity === filters.severity);
    shown.sort(byUrgency);
    remember(all);
    renderCounts(all);
    // a tab in the background still tells how many incidents wait for an acknowledgement
    const waiting = all.filter((i) => i.state === "triggered").length;
    document.title = `${waiting ? `(${waiting}) ` : ""}Incidents · callmon`;
    // the summary is a live region: only a change is news worth announcing
    const words = summaryWords(shown, all);
    if (summary.textContent !== words) summary.textContent = words;
    renderList(shown, all);
  }

  await refresh();
  // known targets and regions for the filter suggestions; the list works without them
  api.get("/api/v1/matrix").then(
    (grid) => {
      for (const target of grid.targets) known.target.add(target);
      for (const region of grid.regions) known.region.add(region);
      remember([]);
    },
    () => {},
  );
  return { refresh };
}
