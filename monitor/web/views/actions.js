// The operator's actions on one incident: acknowledge, resolve (with a reason) and change
// severity (with a reason). Only offered when signed in; the monitor checks again anyway.

import { api } from "../api.js";
import { h } from "../dom.js";
import { SEVERITIES, refusal, signInLink } from "./common.js";

// A modal dialog with a form; the API's refusal is shown inside it, in the API's words.
function dialogForm({ id, title, fields, submitLabel, submit, done }) {
  const error = h("p", { class: "form-error", role: "alert", hidden: true });
  const button = h("button", { type: "submit", class: "button primary" }, submitLabel);
  const dialog = h("dialog", { id, "aria-labelledby": `${id}-title` });
  const form = h(
    "form",
    { class: "stack" },
    h("h2", { id: `${id}-title` }, title),
    fields,
    error,
    h(
      "div",
      { class: "actions-row" },
      button,
      h(
        "button",
        { type: "button", class: "button quiet", onclick: () => dialog.close() },
        "Cancel",
      ),
    ),
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    button.disabled = true;
    try {
      await submit();
    } catch (failure) {
      error.textContent = refusal(failure);
      error.hidden = false;
      return;
    } finally {
      button.disabled = false;
    }
    form.reset();
    dialog.close(); // before the refresh, which leaves a panel with an open dialog alone
    await done();
  });
  dialog.addEventListener("close", () => {
    error.hidden = true;
  });
  dialog.append(form);
  return dialog;
}

export function actionsPanel(ctx, incident, refresh) {
  if (!ctx.signedIn()) {
    return h(
      "p",
      { class: "read-only muted" },
      signInLink(),
      " to acknowledge, resolve or change the severity.",
    );
  }
  if (incident.state === "resolved") {
    return h("p", { class: "muted" }, "Resolved: nothing left to do. Comments stay open.");
  }
  const base = `/api/v1/incidents/${incident.id}`;
  const error = h("p", { class: "form-error", role: "alert", id: "action-error", hidden: true });

  const reason = h("textarea", { id: "resolve-reason", name: "reason", rows: 3, required: true });
  const resolveDialog = dialogForm({
    id: "resolve-dialog",
    title: "Resolve the incident",
    submitLabel: "Resolve",
    fields: [h("label", { for: "resolve-reason" }, "Why is it resolved?"), reason],
    submit: () => api.post(`${base}/resolve`, { reason: reason.value }),
    done: refresh,
  });

  const severity = h(
    "select",
    { id: "severity-value", name: "severity" },
    SEVERITIES.map((value) => h("option", { value, selected: value === incident.severity }, value)),
  );
  const why = h("textarea", { id: "severity-reason", name: "reason", rows: 3, required: true });
  const severityDialog = dialogForm({
    id: "severity-dialog",
    title: "Change the severity",
    submitLabel: "Change severity",
    fields: [
      h("label", { for: "severity-value" }, "New severity"),
      severity,
      h("p", { class: "muted small" }, "Deadlines move to the new tier, counted from the opening."),
      h("label", { for: "severity-reason" }, "Why?"),
      why,
    ],
    submit: async () => {
      if (severity.value === incident.severity) {
        throw new Error(`the severity is already ${incident.severity}: choose another`);
      }
      await api.post(`${base}/severity`, { severity: severity.value, reason: why.value });
    },
    done: refresh,
  });

  const acknowledge = h(
    "button",
    {
      type: "button",
      class: "button primary",
      id: "acknowledge",
      onclick: async (event) => {
        const button = event.currentTarget;
        error.hidden = true;
        button.disabled = true;
        try {
          await api.post(`${base}/acknowledge`, {});
          await refresh();
        } catch (failure) {
          error.textContent = refusal(failure);
          error.hidden = false;
          button.disabled = false;
        }
      },
    },
    "Acknowledge",
  );

  const opener = (label, dialog, id) =>
    h(
      "button",
      {
        type: "button",
        class: "button",
        id,
        "aria-haspopup": "dialog",
        onclick: () => {
          if (id === "change-severity") severity.value = incident.severity;
          dialog.showModal();
        },
      },
      label,
    );

  return h(
    "div",
    { class: "actions" },
    h(
      "div",
      { class: "actions-row" },
      incident.state === "triggered" ? acknowledge : null,
      opener("Resolve…", resolveDialog, "resolve"),
      opener("Change severity…", severityDialog, "change-severity"),
    ),
    error,
    resolveDialog,
    severityDialog,
  );
}
