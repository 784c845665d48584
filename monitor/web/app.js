// callmon's on-call UI: one page, hash routes, plain modules.
//
//   #/incidents?state=&severity=&target=&region=&rule=   open incidents (the default)
//   #/incidents/<id>                                     one ticket
//   #/matrix                                             targets x regions
//   #/signin                                             operator sign-in
//
// The app owns the session, the routing and the refresh loop; each view renders into
// <main> and returns {refresh, dispose}.

import { api } from "./api.js";
import { fill, h } from "./dom.js";
import { localTime } from "./format.js";
import { startTicker } from "./timers.js";
import * as incidentView from "./views/incident.js";
import * as incidentsView from "./views/incidents.js";
import * as matrixView from "./views/matrix.js";
import { signInLink } from "./views/common.js";
import * as signinView from "./views/signin.js";

const REFRESH_MS = 5000;

const main = document.getElementById("main");
const sessionBox = document.getElementById("session");
const statusBox = document.getElementById("status");

const session = { operator: null };
let current = null; // {view, route, loadedAt}
let generation = 0; // bumps on every navigation: a slow load of a left page is dropped
let refreshTimer = null;
let lastListHash = "#/incidents";

function parseRoute() {
  const hash = location.hash.startsWith("#/") ? location.hash.slice(1) : "/incidents";
  const cut = hash.indexOf("?");
  const path = cut < 0 ? hash : hash.slice(0, cut);
  const query = new URLSearchParams(cut < 0 ? "" : hash.slice(cut + 1));
  const parts = path.split("/").filter(Boolean);
  if (parts[0] === "incidents" && parts[1]) return { name: "incident", id: parts[1], query };
  if (parts[0] === "matrix") return { name: "matrix", query };
  if (parts[0] === "signin") return { name: "signin", query };
  return { name: "incidents", query };
}

const VIEWS = {
  incidents: incidentsView,
  incident: incidentView,
  matrix: matrixView,
  signin: signinView,
};

// --- the header: navigation and who is signed in ----------------------------------------

function renderHeader(route, { signingIn = route && route.name === "signin" } = {}) {
  for (const link of document.querySelectorAll("nav.main-nav a")) {
    const section = route && (route.name === "incident" ? "incidents" : route.name);
    if (link.dataset.route === section) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  if (session.operator) {
    fill(
      sessionBox,
      h(
        "span",
        { class: "who" },
        "Signed in as ",
        h("strong", { id: "operator" }, session.operator),
      ),
      h("button", { type: "button", class: "button quiet", onclick: signOut }, "Sign out"),
    );
  } else {
    fill(
      sessionBox,
      h("span", { class: "who muted" }, "Read-only"),
      signingIn ? null : signInLink("Sign in", { class: "button" }),
    );
  }
}

async function signOut() {
  try {
    await api.delete("/api/v1/session");
  } catch (error) {
    showStatus(`Could not sign out: ${error.message}`, "error");
    return;
  }
  session.operator = null;
  showStatus("Signed out.");
  render({ keepFocus: true });
}

function showStatus(text, kind = "info") {
  statusBox.className = `status ${kind}`;
  statusBox.textContent = text;
  statusBox.hidden = !text;
}

// --- rendering a route ---------------------------------------------------------------------

function context(route, extra = {}) {
  return {
    main,
    route,
    signedIn: () => session.operator !== null,
    lastListHash: () => lastListHash,
    // Filters change the hash without a new history entry and without a re-render: the
    // list refreshes itself and keeps what the operator is typing.
    replaceHash(hash) {
      history.replaceState(null, "", hash);
      if (hash.startsWith("#/incidents") && !/^#\/incidents\/\d/.test(hash)) lastListHash = hash;
    },
    onSignedIn(operator) {
      session.operator = operator;
      showStatus("");
      if (route.name !== "signin") {
        render({ keepFocus: false });
        return;
      }
      // back where the operator came from; only a route of this page, never elsewhere
      const next = route.query.get("next") || "";
      location.hash = next.startsWith("#/") && !next.startsWith("#/signin") ? next : lastListHash;
    },
    ...extra,
  };
}

async function render({ keepFocus = false } = {}) {
  const mine = ++generation;
  clearTimeout(refreshTimer);
  if (current && current.view.dispose) current.view.dispose();
  current = null;
  const route = parseRoute();
  document.title = "callmon";
  if (route.name === "incidents") lastListHash = location.hash || "#/incidents";
  renderHeader(route);
  const module = VIEWS[route.name];
  try {
    const view = await module.show(context(route));
    if (mine !== generation) {
      if (view && view.dispose) view.dispose();
      return;
    }
    current = { view: view || {}, route, loadedAt: Date.now() };
  } catch (error) {
    if (mine !== generation) return;
    if (!handleUnauthorized(error)) {
      console.error(error); // the page shows the message; the console keeps the stack
      fill(
        main,
        h("h1", { tabindex: "-1" }, "Something went wrong"),
        h("p", { class: "form-error", role: "alert" }, error.message),
        h("p", {}, h("a", { href: "#/incidents" }, "Back to the incidents")),
      );
    }
    return;
  }
  if (!keepFocus) {
    const heading = main.querySelector("h1");
    if (heading) heading.focus({ preventScroll: true });
  }
  scheduleRefresh();
}

// A read refused with 401: either this monitor does not let anonymous users read, or the
// session ended (expired, or the monitor restarted). Either way only sign-in can help.
function handleUnauthorized(error) {
  if (error.status !== 401) return false;
  const ended = session.operator !== null;
  session.operator = null;
  const route = parseRoute();
  renderHeader(route, { signingIn: true });
  const message = ended
    ? "Your session has ended. Sign in again to continue."
    : "This monitor does not allow anonymous reading. " +
      "Sign in with an operator token to see incidents.";
  signinView.show(context({ ...route, name: "signin-required" }, { message }));
  return true;
}

function scheduleRefresh() {
  clearTimeout(refreshTimer);
  if (!current || !current.view.refresh) return;
  refreshTimer = setTimeout(refresh, REFRESH_MS);
}

async function refresh() {
  clearTimeout(refreshTimer);
  const mine = generation;
  const view = current && current.view;
  if (!view || !view.refresh) return;
  if (document.visibilityState === "hidden") {
    scheduleRefresh(); // no need to poll for nobody; catch up when visible again
    return;
  }
  try {
    await view.refresh();
    if (mine !== generation) return;
    current.loadedAt = Date.now();
    if (statusBox.classList.contains("stale")) showStatus("");
  } catch (error) {
    if (mine !== generation) return;
    if (handleUnauthorized(error)) {
      current = null;
      return;
    }
    showStatus(
      `Could not refresh (${error.message}); ` +
        `showing what was loaded at ${localTime(current.loadedAt)}.`,
      "error stale",
    );
  }
  scheduleRefresh();
}

// --- start ---------------------------------------------------------------------------------

async function boot() {
  startTicker();
  document.getElementById("skip").addEventListener("click", (event) => {
    event.preventDefault(); // a "#main" hash would read as a route
    main.focus();
  });
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") refresh();
  });
  try {
    session.operator = (await api.get("/api/v1/session")).operator;
  } catch (error) {
    if (error.status === 401) {
      // Not signed in. A cookie left from before a monitor restart would still be sent,
      // and the monitor takes any cookie as credentials: anonymous reads would fail.
      await api.delete("/api/v1/session").catch(() => {});
    } else {
      showStatus(`The monitor did not answer: ${error.message}`, "error");
    }
  }
  window.addEventListener("hashchange", () => {
    showStatus("");
    render();
  });
  await render({ keepFocus: true });
}

boot();
