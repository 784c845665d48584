// The metrics around an incident, from the per-second samples the monitor stored: from ten
// minutes before the opening to the resolution (or now).

import { api, serverNow, withQuery } from "../api.js";
import { lineChart } from "../chart.js";
import { h } from "../dom.js";
import { localDateTime, parseTime } from "../format.js";
import { ruleMetric } from "./common.js";

const BEFORE_MS = 10 * 60_000;
const LIMIT = 20_000;
const CHARTED = [
  "audio.jitter_s",
  "video.jitter_s",
  "audio.loss",
  "video.loss",
  "rtt_s",
  "av_offset_s",
  "mos",
  "video.freeze_s",
];
// What GET /api/v1/samples returns per second (monitor/api.py SAMPLE_FIELDS).
const SAMPLE_FIELDS = new Set([
  ...CHARTED,
  "audio.delay_s",
  "video.delay_s",
  "video.fps",
  "video.freezes",
  "audio.gaps",
  "audio.gap_s",
]);

// Where the samples are: the incident's own target (every region when it is target-wide),
// else each member's target and region (a region-wide incident).
function sources(incident) {
  if (incident.scope.target) {
    return [{ target: incident.scope.target, region: incident.scope.region || null }];
  }
  const found = new Map();
  for (const member of (incident.details && incident.details.conditions) || []) {
    if (member.target) {
      found.set(`${member.target}|${member.region}`, {
        target: member.target,
        region: member.region || null,
      });
    }
  }
  return [...found.values()];
}

// One line per target, region and probe: two probes in one region would zig-zag as one.
function groupSeries(answers) {
  const groups = new Map();
  const targets = new Set(answers.map((a) => a.target));
  const regions = new Set(answers.flatMap((a) => a.samples.map((row) => row.region)));
  for (const answer of answers) {
    for (const row of answer.samples) {
      // the probe marked this second unreliable (its own overload): rules ignore it too
      if (!row.reliable) continue;
      const key = `${answer.target}|${row.region}|${row.probe}`;
      if (!groups.has(key)) {
        const name = [
          targets.size > 1 ? answer.target : null,
          regions.size > 1 || targets.size === 1 ? row.region : null,
          row.probe,
        ]
          .filter(Boolean)
          .join(" · ");
        groups.set(key, { name, rows: [] });
      }
      groups.get(key).rows.push({ ...row, atMs: parseTime(row.at) });
    }
  }
  return [...groups.values()];
}

export async function chartsFor(incident) {
  const places = sources(incident);
  if (!places.length) return h("p", { class: "muted" }, "This incident has no target to chart.");
  const opened = parseTime(incident.opened_at);
  const resolved = parseTime(incident.resolved_at);
  const from = opened - BEFORE_MS;
  const answers = await Promise.all(
    places.map((place) =>
      api.get(
        withQuery("/api/v1/samples", {
          target: place.target,
          region: place.region,
          since: new Date(from).toISOString(),
          // while open, the monitor's own "now" ends the window: its clock, not ours
          until: incident.resolved_at || "",
          limit: LIMIT,
        }),
      ),
    ),
  );
  const groups = groupSeries(answers);
  const lastAt = Math.max(0, ...groups.flatMap((g) => g.rows.map((row) => row.atMs)));
  const until = resolved ?? Math.max(serverNow(), lastAt);
  const truncated = answers.some((a) => a.samples.length >= LIMIT);

  const metric = ruleMetric(incident);
  const fields = SAMPLE_FIELDS.has(metric)
    ? [metric, ...CHARTED.filter((f) => f !== metric)]
    : CHARTED;
  const threshold = incident.details ? incident.details.threshold : null;
  const ruleThresholds = Array.isArray(threshold)
    ? threshold
    : typeof threshold === "number"
      ? [threshold]
      : [];
  const markers = [{ at: opened, label: "opened", kind: "opened" }];
  if (resolved !== null) markers.push({ at: resolved, label: "resolved", kind: "resolved" });

  const figures = fields.map((field) => {
    const figure = lineChart({
      metric: field,
      series: groups.map((g) => ({
        name: g.name,
        points: g.rows.map((row) => [row.atMs, row[field]]),
      })),
      from,
      until,
      thresholds: field === metric ? ruleThresholds : [],
      markers,
    });
    if (field === metric) figure.classList.add("rule-metric");
    return figure;
  });
  const count = answers.reduce((n, a) => n + a.samples.length, 0);
  if (!count) {
    const where = places.map((p) => `${p.target}${p.region ? ` from ${p.region}` : ""}`);
    return h(
      "p",
      { class: "muted", id: "no-samples" },
      `No per-second samples of ${where.join(", ")} from ${localDateTime(from)} on: `,
      "failed calls carry none.",
    );
  }
  return [
    h(
      "p",
      { class: "muted small" },
      `${count} samples from ${localDateTime(from)} (10 min before the opening) to `,
      resolved !== null ? `the resolution at ${localDateTime(resolved)}` : "now",
      ". Dashed red: the rule's threshold.",
    ),
    truncated ? h("p", { class: "notice" }, `Only the first ${LIMIT} samples are drawn.`) : null,
    h("div", { class: "charts" }, figures),
  ];
}
