// The one place that talks to the monitor's HTTP API: every write carries the headers the
// session cookie needs, and every refusal reaches the user as the API worded it.

export class ApiError extends Error {
  constructor(status, message, field = null) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.field = field;
  }
}

// How far the monitor's clock is ahead of this browser's, in ms. Timers count down to
// deadlines the monitor set, so a laptop whose clock is off would show wrong times left.
// The HTTP Date header has a one-second resolution: smaller offsets are left alone.
let skewMs = 0;

export function serverNow() {
  return Date.now() + skewMs;
}

function learnSkew(response) {
  const date = Date.parse(response.headers.get("Date") || "");
  if (!Number.isFinite(date)) return;
  const skew = date - Date.now();
  skewMs = Math.abs(skew) > 5000 ? skew : 0;
}

async function request(method, path, body) {
  const headers = { Accept: "application/json" };
  const init = { method, headers, credentials: "same-origin", cache: "no-store" };
  if (method !== "GET") {
    // The monitor refuses a write made with the session cookie unless this header is
    // there: a page of another site cannot add it, so it cannot act for the operator.
    headers["X-Callmon-Request"] = "1";
    headers["Content-Type"] = "application/json";
    if (body !== undefined) init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch {
    throw new ApiError(0, "the monitor cannot be reached");
  }
  learnSkew(response);
  const text = await response.text();
  let data = null;
  if (text) {
    try {
      data = JSON.parse(text);
    } catch {
      data = null;
    }
  }
  if (!response.ok) {
    const message =
      data && typeof data.error === "string" ? data.error : `HTTP ${response.status}`;
    throw new ApiError(response.status, message, data && data.field);
  }
  return data;
}

export const api = {
  get: (path) => request("GET", path),
  post: (path, body) => request("POST", path, body ?? {}),
  delete: (path) => request("DELETE", path),
};

// Build "path?k=v&..." leaving out empty values: the API reads `target=` as "the target
// named nothing", not as "any target".
export function withQuery(path, params) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
  }
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}
