// The failing call kept on the ticket: its connect phases against the connect target, and
// the phase that failed with the probe's reason.

import { h } from "../dom.js";
import { metricValue, parseTime, seconds } from "../format.js";
import { ageElement } from "../timers.js";

// Milestones in call order, each with the failure phase that stops before it.
const MILESTONES = [
  ["offer_s", "Offer ready", "offer"],
  ["answer_s", "Answer received", "signaling"],
  ["ice_s", "ICE connected", "ice"],
  ["dtls_s", "DTLS connected", "dtls"],
  ["first_rtp_audio_s", "First audio packet", "media"],
  ["first_rtp_video_s", "First video packet", "media"],
  ["first_frame_audio_s", "First audio frame", "media"],
  ["first_frame_video_s", "First video frame", "media"],
  ["connect_s", "Connected (both media)", "media"],
];

function phaseTable(body) {
  const phases = body.phases || {};
  const failure = body.failure;
  const target = body.thresholds && body.thresholds.connect_s;
  const reached = MILESTONES.map(([key]) => phases[key]).filter((v) => typeof v === "number");
  const scale = Math.max(target || 0, ...reached, 0.001);
  let failedShown = false;
  const rows = MILESTONES.map(([key, label, phase]) => {
    const value = phases[key];
    const failedHere = failure && !failedShown && value === null && failure.phase === phase;
    if (failedHere) failedShown = true;
    const bar = h("div", { class: "phase-track" });
    if (typeof value === "number") {
      const fill = h("div", { class: "phase-bar" });
      fill.style.width = `${Math.max(0.5, (value / scale) * 100)}%`;
      bar.append(fill);
    }
    if (target) {
      const line = h("div", { class: "phase-target", title: `connect target ${seconds(target)}` });
      line.style.left = `${(target / scale) * 100}%`;
      bar.append(line);
    }
    return h(
      "tr",
      { "data-phase": key, class: failedHere ? "failed" : value === null ? "not-reached" : "" },
      h("th", { scope: "row" }, label),
      h("td", { class: "phase-cell" }, bar),
      h(
        "td",
        { class: "value" },
        typeof value === "number" ? seconds(value) : failedHere ? "failed here" : "not reached",
      ),
    );
  });
  if (failure && !failedShown) {
    // failed after connecting (phase "call") or past every milestone
    rows.push(
      h(
        "tr",
        { "data-phase": failure.phase, class: "failed" },
        h("th", { scope: "row" }, `${failure.phase} phase`),
        h("td", { class: "phase-cell" }, h("div", { class: "phase-track" })),
        h("td", { class: "value" }, "failed here"),
      ),
    );
  }
  return h(
    "table",
    { class: "phases" },
    h("caption", { class: "visually-hidden" }, "Connect phases, seconds from the call's start"),
    h("tbody", {}, rows),
  );
}

function callCard(id, entry) {
  const body = entry.body;
  const received = parseTime(entry.received_at);
  return h(
    "article",
    { class: "evidence", "data-result-id": id },
    h(
      "p",
      { class: "evidence-head" },
      h("span", { class: `badge result result-${body.status}` }, body.status),
      ` call by ${entry.probe} from ${entry.region}, received `,
      ageElement(received),
      h("span", { class: "muted small mono" }, ` ${id}`),
    ),
    body.failure
      ? h(
          "p",
          { class: "failure", id: "failure" },
          h("strong", {}, `Failed in the ${body.failure.phase} phase: `),
          body.failure.reason,
        )
      : null,
    (body.degradations || []).length
      ? h(
          "ul",
          { class: "degradations" },
          body.degradations.map((d) =>
            h(
              "li",
              {},
              h("code", {}, d.metric),
              ` ${metricValue(d.metric, d.value)} ${d.comparison} ` +
                metricValue(d.metric, d.threshold),
            ),
          ),
        )
      : null,
    phaseTable(body),
  );
}

function batchNote(id, entry) {
  const body = entry.body;
  const count = (body.samples || []).length;
  return h(
    "p",
    { class: "evidence small muted", "data-result-id": id },
    `The latest breach came in a batch of ${count} second${count === 1 ? "" : "s"} of call `,
    h("code", {}, body.call_id || id),
    ` from ${entry.probe} (${entry.region}), received `,
    ageElement(parseTime(entry.received_at)),
    ": the charts below show its numbers.",
  );
}

const isCall = ([, entry]) => entry.body && entry.body.phases;

// Calls kept as evidence, with their phases: a card of their own.
export function callEvidence(evidence) {
  const calls = Object.entries(evidence || {}).filter(isCall);
  if (!calls.length) return [];
  const failed = calls.some(([, entry]) => entry.body.status === "failed");
  return h(
    "section",
    { class: "card", id: "evidence", "aria-labelledby": "evidence-title" },
    h("h2", { id: "evidence-title" }, failed ? "Failing call" : "Evidence"),
    calls.map(([id, entry]) => callCard(id, entry)),
    h("p", { class: "muted small" }, "Seconds from the call's start; dashed: the connect target."),
  );
}

// Batches of seconds kept as evidence: a line each, under what breached.
export function batchNotes(evidence) {
  return Object.entries(evidence || {})
    .filter((item) => !isCall(item))
    .map(([id, entry]) => batchNote(id, entry));
}
