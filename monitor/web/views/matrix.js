// Targets x regions: the latest numbers of each pair, coloured by the worst rule firing
// for it, grey when its last result is old.

import { api, serverNow } from "../api.js";
import { fill, h } from "../dom.js";
import { metricValue } from "../format.js";
import { ageElement } from "../timers.js";
import { SEVERITY_RANK, pageHeading } from "./common.js";

const STALE_S = 180;

// The most severe of the rules firing for a cell, null when none is.
function worst(firing) {
  let found = null;
  for (const f of firing) {
    if (found === null || SEVERITY_RANK[f.severity] < SEVERITY_RANK[found]) found = f.severity;
  }
  return found;
}

function offset(value) {
  if (value === null || value === undefined) return "–";
  return `${value > 0 ? "+" : ""}${metricValue("av_offset_s", value)}`;
}

function pair(audio, video, metric) {
  if (audio === null && video === null) return "–";
  return `${metricValue(metric, audio)} / ${metricValue(metric, video)}`;
}

function cellView(cell, fetchedAt) {
  const severity = worst(cell.firing || []);
  const age = cell.last_result_age_s;
  const stale = age === null || age > STALE_S;
  const level = stale ? "stale" : severity || "ok";
  const numbers = [
    ["Connect", metricValue("phases.connect_s", cell.connect_s)],
    ["Jitter a/v", pair(cell.jitter_audio_s, cell.jitter_video_s, "audio.jitter_s")],
    ["Loss a/v", pair(cell.loss_audio, cell.loss_video, "audio.loss")],
    ["RTT", metricValue("rtt_s", cell.rtt_s)],
    ["A/V offset", offset(cell.av_offset_s)],
    ["Frozen", metricValue("freeze_ratio", cell.freeze_ratio)],
    ["MOS", metricValue("mos", cell.mos)],
  ];
  const firingText = severity ? `${severity}: ${cell.firing.map((f) => f.rule).join(", ")}` : "";
  const status = stale
    ? "no recent result"
    : severity
      ? firingText
      : cell.success === 0
        ? "last call failed"
        : "healthy";
  return h(
    "td",
    {
      class: "cell",
      "data-target": cell.target,
      "data-region": cell.region,
      "data-level": level,
      "data-severity": severity || "",
    },
    h("div", { class: "cell-status" }, status),
    // grey wins the colour; the firing rules still say what was wrong when last heard of
    stale && severity ? h("div", { class: "small" }, firingText) : null,
    cell.success === 0 && (stale || severity)
      ? h("div", { class: "small" }, "last call failed")
      : null,
    h(
      "dl",
      { class: "nums" },
      numbers.map(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]),
    ),
    h(
      "div",
      { class: "cell-age small" },
      "last result ",
      age === null ? "never" : ageElement(fetchedAt - age * 1000),
    ),
  );
}

const LEGEND = [
  ["ok", "healthy"],
  ["normal", "normal rule firing"],
  ["important", "important rule firing"],
  ["urgent", "urgent rule firing"],
  ["stale", `no result for over ${STALE_S / 60} min`],
];

export async function show(ctx) {
  const grid = h("div", { class: "table-wrap" });
  const generated = h("p", { class: "muted small" });
  fill(
    ctx.main,
    h("div", { class: "page-head" }, pageHeading("Targets × regions")),
    h(
      "p",
      { class: "intro" },
      "The latest numbers each region's probes measured for each target. ",
      "Jitter and loss are audio / video.",
    ),
    h(
      "ul",
      { class: "legend matrix-legend", "aria-label": "Colours" },
      LEGEND.map(([level, words]) =>
        h(
          "li",
          {},
          h("span", { class: "swatch", "data-level": level, "aria-hidden": "true" }),
          words,
        ),
      ),
    ),
    generated,
    grid,
  );

  function table(answer, fetchedAt) {
    const cells = new Map(answer.cells.map((c) => [`${c.target}|${c.region}`, c]));
    const link = (key, value) =>
      h("a", { href: `#/incidents?${key}=${encodeURIComponent(value)}` }, value);
    const missing = () =>
      h("td", { class: "cell", "data-level": "none" }, h("span", { class: "muted" }, "not probed"));
    return h(
      "table",
      { class: "matrix" },
      h("caption", { class: "visually-hidden" }, "Targets (rows) by regions (columns)"),
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", { scope: "col" }, "Target"),
          answer.regions.map((region) => h("th", { scope: "col" }, link("region", region))),
        ),
      ),
      h(
        "tbody",
        {},
        answer.targets.map((target) =>
          h(
            "tr",
            {},
            h("th", { scope: "row", class: "wrap" }, link("target", target)),
            answer.regions.map((region) => {
              const cell = cells.get(`${target}|${region}`);
              return cell ? cellView(cell, fetchedAt) : missing();
            }),
          ),
        ),
      ),
    );
  }

  // Rebuilt only when something but the passing of time changed (ages tick on their own),
  // and the keyboard focus stays on the same link across a rebuild.
  let shownKey = null;
  document.title = "Targets × regions · callmon";
  async function refresh() {
    const answer = await api.get("/api/v1/matrix");
    const fetchedAt = serverNow();
    generated.textContent = `Updated ${new Date(fetchedAt).toLocaleTimeString()}.`;
    const key = JSON.stringify(
      answer.cells.map((c) => {
        const age = c.last_result_age_s;
        const last = age === null ? null : Math.round(fetchedAt / 1000 - age);
        return { ...c, last_result_age_s: last, stale: age === null || age > STALE_S };
      }),
    );
    if (key === shownKey) return;
    shownKey = key;
    const active = document.activeElement;
    const focused = grid.contains(active) ? active.getAttribute("href") : null;
    if (!answer.cells.length) {
      fill(grid, h("p", { class: "empty card" }, "No results yet: no probe has reported."));
    } else {
      fill(grid, table(answer, fetchedAt));
    }
    const again = focused && grid.querySelector(`a[href="${CSS.escape(focused)}"]`);
    if (again) again.focus();
  }

  await refresh();
  return { refresh };
}
