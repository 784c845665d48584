// Operator sign-in: the token is sent once and the monitor answers with a session cookie
// (HttpOnly: this page never sees or keeps the token or the session).

import { api } from "../api.js";
import { fill, h } from "../dom.js";

export async function show(ctx) {
  const error = h("p", { class: "form-error", role: "alert", id: "signin-error", hidden: true });
  const input = h("input", {
    id: "token",
    name: "token",
    type: "password",
    autocomplete: "current-password",
    spellcheck: "false",
    required: true,
    "aria-describedby": "token-help",
  });
  const button = h("button", { type: "submit", class: "button primary" }, "Sign in");

  async function submit(event) {
    event.preventDefault();
    error.hidden = true;
    button.disabled = true;
    try {
      const answer = await api.post("/api/v1/session", { token: input.value });
      input.value = "";
      ctx.onSignedIn(answer.operator);
    } catch (failure) {
      error.textContent = `Sign-in failed: ${failure.message}`;
      error.hidden = false;
      input.focus();
      input.select();
    } finally {
      button.disabled = false;
    }
  }

  document.title = "Sign in · callmon";
  fill(
    ctx.main,
    h(
      "section",
      { class: "signin card", "aria-labelledby": "signin-title" },
      h("h1", { id: "signin-title", tabindex: "-1" }, "Operator sign-in"),
      ctx.message ? h("p", { class: "notice", id: "signin-reason" }, ctx.message) : null,
      h(
        "form",
        { onsubmit: submit, class: "stack" },
        h("label", { for: "token" }, "Operator token"),
        input,
        h(
          "p",
          { id: "token-help", class: "muted small" },
          "The token from `callmon token --operator NAME`. It is exchanged for a session " +
            "cookie and not stored by this page.",
        ),
        error,
        h("div", { class: "actions-row" }, button),
      ),
    ),
  );
  input.focus();
  return {};
}
