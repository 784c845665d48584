// Times in the browser's local zone and callmon's SI-unit numbers in words people read.

export function parseTime(text) {
  if (text === null || text === undefined) return null;
  const ms = Date.parse(text);
  return Number.isFinite(ms) ? ms : null;
}

// A moment the API gives as RFC 3339 text or as Unix seconds, in ms (null if neither).
export function moment(value) {
  if (typeof value === "number") return Number.isFinite(value) ? value * 1000 : null;
  return parseTime(value);
}

const DATE_TIME = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const TIME = new Intl.DateTimeFormat(undefined, {
  hour: "2-digit",
  minute: "2-digit",
  second: "2-digit",
});
const HOUR_MINUTE = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });

export function localDateTime(ms) {
  return ms === null ? "" : DATE_TIME.format(ms);
}

export function localTime(ms) {
  return ms === null ? "" : TIME.format(ms);
}

export function hourMinute(ms) {
  return HOUR_MINUTE.format(ms);
}

const pad = (n) => String(n).padStart(2, "0");

// A countdown: "4:05", "1:02:03", "2d 03:04:05". Seconds are always shown so the timer
// visibly moves.
export function countdown(seconds) {
  const total = Math.max(0, Math.floor(seconds));
  const days = Math.floor(total / 86400);
  const hours = Math.floor((total % 86400) / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const secs = total % 60;
  if (days > 0) return `${days}d ${pad(hours)}:${pad(minutes)}:${pad(secs)}`;
  if (hours > 0) return `${hours}:${pad(minutes)}:${pad(secs)}`;
  return `${minutes}:${pad(secs)}`;
}

// A span of time in words, to the two largest units: "4 min 12 s", "2 d 3 h", "5 min".
const UNITS = [
  ["d", 86400],
  ["h", 3600],
  ["min", 60],
  ["s", 1],
];

export function duration(seconds) {
  let rest = Math.max(0, Math.round(seconds));
  const parts = [];
  for (const [name, size] of UNITS) {
    const count = Math.floor(rest / size);
    rest -= count * size;
    if (count > 0) parts.push(`${count} ${name}`);
    else if (parts.length > 0) break; // "2 h", not "2 h 0 min"
    if (parts.length === 2) break;
  }
  return parts.length ? parts.join(" ") : "0 s";
}

// "just now", "12 s ago", "5 min ago", "in 3 h 2 min".
export function relative(ms, now) {
  const seconds = (now - ms) / 1000;
  if (Math.abs(seconds) < 5) return "just now";
  return seconds > 0 ? `${duration(seconds)} ago` : `in ${duration(-seconds)}`;
}

// --- metrics --------------------------------------------------------------------------

const LABELS = {
  "audio.jitter_s": "Audio jitter",
  "video.jitter_s": "Video jitter",
  "audio.loss": "Audio loss",
  "video.loss": "Video loss",
  "audio.delay_s": "Audio delay",
  "video.delay_s": "Video delay",
  "audio.gaps": "Audio gaps",
  "audio.gap_s": "Audio gap time",
  "video.freezes": "Video freezes",
  "video.freeze_s": "Video freeze time",
  "video.fps": "Video frame rate",
  rtt_s: "Round-trip time",
  av_offset_s: "A/V offset",
  mos: "MOS",
  "phases.connect_s": "Connect time",
  status: "Call status",
};

export function metricLabel(name) {
  return LABELS[name] || name;
}

// What kind of number a metric is, from callmon's naming: seconds end in _s, fractions are
// loss or ratio, counts are plain.
export function metricKind(name) {
  if (name === "mos") return "mos";
  if (/(^|\.)(loss|freeze_ratio|rtcp_loss)$/.test(name) || name.startsWith("loss_")) return "ratio";
  if (/_s$/.test(name)) return "seconds";
  if (name === "video.fps") return "rate";
  return "count";
}

export function seconds(value) {
  const abs = Math.abs(value);
  if (abs === 0) return "0 ms";
  if (abs < 0.01) return `${(value * 1000).toFixed(1)} ms`;
  if (abs < 1) return `${Math.round(value * 1000)} ms`;
  return `${value.toFixed(2)} s`;
}

function percent(value) {
  const p = value * 100;
  return `${p === 0 ? "0" : p < 10 ? p.toFixed(1) : p.toFixed(0)} %`;
}

export function metricValue(name, value) {
  if (value === null || value === undefined) return "–";
  if (typeof value !== "number") return String(value);
  switch (metricKind(name)) {
    case "seconds":
      return seconds(value);
    case "ratio":
      return percent(value);
    case "mos":
      return value.toFixed(2);
    case "rate":
      return `${value.toFixed(1)} fps`;
    default:
      return Number.isInteger(value) ? String(value) : value.toFixed(2);
  }
}
