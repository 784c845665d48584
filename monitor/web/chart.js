// Line charts in plain SVG: time across, one metric up, the rule's threshold dashed and
// the incident's opening (and resolution) marked. No library: a few dozen lines suffice.

import { h, s } from "./dom.js";
import { hourMinute, metricKind, metricLabel, metricValue } from "./format.js";

// The drawing's own units, near the size it shows at in a two-column grid at 1280 px, so
// its 11-unit labels read as 11 px.
const WIDTH = 420;
const HEIGHT = 170;
const MARGIN = { left: 54, right: 10, top: 18, bottom: 24 };
// Samples come once a second; a longer silence is a gap in the data, not a straight line.
const GAP_MS = 15_000;

function niceStep(span, count) {
  const raw = span / count;
  const magnitude = 10 ** Math.floor(Math.log10(raw));
  const norm = raw / magnitude;
  return (norm <= 1 ? 1 : norm <= 2 ? 2 : norm <= 5 ? 5 : 10) * magnitude;
}

function valueDomain(metric, values, thresholds) {
  if (metricKind(metric) === "mos") return { low: 1, high: 4.5, step: 0.5 };
  const all = [...values, ...thresholds];
  let low = Math.min(0, ...all);
  let high = Math.max(0, ...all);
  if (high - low < 1e-9) high = low + (metricKind(metric) === "count" ? 1 : 0.01);
  const step = niceStep((high - low) * 1.1, 4);
  low = Math.floor(low / step) * step;
  high = Math.ceil((high * 1.05) / step) * step;
  return { low, high, step };
}

const TIME_STEPS = [1, 2, 5, 10, 15, 30, 60, 120, 180, 360, 720, 1440].map((m) => m * 60_000);

function timeTicks(t0, t1) {
  const step = TIME_STEPS.find((candidate) => (t1 - t0) / candidate <= 6) || 86_400_000;
  const ticks = [];
  for (let t = Math.ceil(t0 / step) * step; t <= t1; t += step) ticks.push(t);
  return ticks;
}

// "M x y L x y ..." per run of consecutive points; a lone point has no line to draw.
function runs(points) {
  const out = [];
  let current = [];
  let last = null;
  for (const [t, v] of points) {
    if (v === null || v === undefined || (last !== null && t - last > GAP_MS)) {
      if (current.length) out.push(current);
      current = [];
    }
    if (v !== null && v !== undefined) current.push([t, v]);
    last = t;
  }
  if (current.length) out.push(current);
  return out;
}

function extremeText(metric, values) {
  return metricKind(metric) === "mos"
    ? `lowest ${metricValue(metric, Math.min(...values))}`
    : `highest ${metricValue(metric, Math.max(...values))}`;
}

function thresholdText(metric, thresholds) {
  return thresholds.map((t) => metricValue(metric, t)).join(" / ");
}

function caption(metric, values, thresholds) {
  return h(
    "figcaption",
    {},
    h("span", { class: "chart-title" }, metricLabel(metric)),
    values.length ? h("span", { class: "muted" }, ` ${extremeText(metric, values)}`) : null,
    thresholds.length
      ? h("span", { class: "threshold-note" }, ` threshold ${thresholdText(metric, thresholds)}`)
      : null,
  );
}

// Scales from data to drawing units, and the y-axis ticks.
function scales(metric, values, thresholds, from, until) {
  const { low, high, step } = valueDomain(metric, values, thresholds);
  const plotW = WIDTH - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const ticks = [];
  for (let i = 0; low + i * step <= high + step / 2; i += 1) ticks.push(low + i * step);
  return {
    low,
    high,
    ticks,
    x: (t) => (MARGIN.left + ((t - from) / Math.max(1, until - from)) * plotW).toFixed(1),
    y: (v) => (MARGIN.top + (1 - (v - low) / (high - low)) * plotH).toFixed(1),
  };
}

function grid(metric, scale, from, until) {
  const group = s("g", { class: "grid", "aria-hidden": "true" });
  const left = MARGIN.left;
  const right = WIDTH - MARGIN.right;
  for (const value of scale.ticks) {
    const y = scale.y(value);
    // a tick computed as 1e-17 is zero, and should read so
    const shown = Math.abs(value) < 1e-12 ? 0 : value;
    group.append(
      s("line", { x1: left, x2: right, y1: y, y2: y }),
      s(
        "text",
        { x: left - 6, y, "dominant-baseline": "middle", "text-anchor": "end" },
        metricValue(metric, shown),
      ),
    );
  }
  for (const t of timeTicks(from, until)) {
    const x = scale.x(t);
    group.append(
      s("line", { x1: x, x2: x, y1: MARGIN.top, y2: HEIGHT - MARGIN.bottom }),
      s("text", { x, y: HEIGHT - 8, "text-anchor": "middle" }, hourMinute(t)),
    );
  }
  return group;
}

function overlays(scale, thresholds, markers, from, until) {
  const out = [];
  for (const value of thresholds) {
    if (value < scale.low || value > scale.high) continue;
    const y = scale.y(value);
    out.push(
      s("line", { class: "threshold", x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y, y2: y }),
    );
  }
  for (const marker of markers) {
    if (marker.at < from || marker.at > until) continue;
    const x = scale.x(marker.at);
    out.push(
      s("line", {
        class: `marker marker-${marker.kind}`,
        x1: x,
        x2: x,
        y1: MARGIN.top - 4,
        y2: HEIGHT - MARGIN.bottom,
      }),
      s(
        "text",
        { class: "marker-label", x, y: MARGIN.top - 8, "text-anchor": "middle" },
        marker.label,
      ),
    );
  }
  return out;
}

function lines(series, scale) {
  return series.map((one, index) => {
    const group = s("g", { class: `series series-${index % 6}`, "data-series": one.name });
    for (const run of runs(one.points)) {
      if (run.length === 1) {
        const [t, v] = run[0];
        group.append(s("circle", { cx: scale.x(t), cy: scale.y(v), r: 2.2 }));
      } else {
        const d = run.map(([t, v], i) => `${i ? "L" : "M"}${scale.x(t)} ${scale.y(v)}`).join(" ");
        group.append(s("path", { d, class: "line" }));
      }
    }
    return group;
  });
}

function legend(series) {
  return h(
    "ul",
    { class: "legend" },
    series.map((one, index) =>
      h(
        "li",
        { class: `series-${index % 6}` },
        h("span", { class: "swatch", "aria-hidden": "true" }),
        one.name,
      ),
    ),
  );
}

/**
 * Draw one metric over a time window, as a <figure> holding an SVG.
 * series: [{name, points: [[ms, value|null], ...]}] in time order
 * thresholds: values drawn dashed; markers: [{at: ms, label, kind}] drawn upright
 */
export function lineChart({ metric, series, from, until, thresholds = [], markers = [] }) {
  const values = series.flatMap((one) => one.points.map(([, v]) => v)).filter((v) => v !== null);
  const figure = h("figure", { class: "chart", "data-metric": metric });
  figure.append(caption(metric, values, thresholds));
  if (!values.length) {
    figure.append(h("p", { class: "chart-empty muted" }, "No samples in this window."));
    return figure;
  }
  const scale = scales(metric, values, thresholds, from, until);
  const summary =
    `${metricLabel(metric)} from ${hourMinute(from)} to ${hourMinute(until)}: ` +
    `${values.length} samples, ${extremeText(metric, values)}` +
    (thresholds.length ? `, threshold ${thresholdText(metric, thresholds)}` : "");
  figure.append(
    s(
      "svg",
      { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": summary, class: "chart-svg" },
      grid(metric, scale, from, until),
      overlays(scale, thresholds, markers, from, until),
      lines(series, scale),
    ),
  );
  if (series.length > 1) figure.append(legend(series));
  return figure;
}
