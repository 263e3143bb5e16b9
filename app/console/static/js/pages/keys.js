// API keys, through /v1/organization/admin_api_keys: an admin key lists, creates and revokes them; the API answers
// any other key 403, and the page then says who manages keys. A new key's secret is shown once, in this page only:
// never stored (not in sessionStorage, not in the URL), gone when the user clicks Done or leaves the page.

import { api, enc, listAll, post, session } from "../api.js";
import { empty, errorBox, field, fill, h, replace, table, time } from "../dom.js";

const PATH = "/organization/admin_api_keys";

// Whether `key` (the one this tab is signed in with) is the listed key: its redacted value is its first characters.
const isSignedInKey = (key) => session.key()?.startsWith(key.redacted_value.replace(/\.\.\.$/, "")) ?? false;

export function render(view, _params, signal) {
  const created = h("div", { id: "key-created" });
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  const body = h("div", {});
  replace(view, h("div", { class: "page-head" }, h("h1", {}, "API keys")), created, status, body);

  const revoke = async (key) => {
    if (!confirm(`Revoke ${key.name} (${key.redacted_value})? Requests with it are refused from now on.`)) return;
    try {
      await api(`${PATH}/${enc(key.id)}`, { method: "DELETE", signal });
      replace(status, h("p", { class: "report ok" }, h("strong", {}, "Revoked"), ` ${key.name} (${key.redacted_value}).`));
      load();
    } catch (e) {
      if (e.name !== "AbortError") replace(status, errorBox(e));
    }
  };

  const form = createForm(signal, status, (key) => {
    replace(created, secretCard(key, () => replace(created)));
    replace(status);
    load();
  });
  // The form only for an admin key: a 403 to the list means this key is not one, and the page says who is.
  const load = () => fill(body, async () => {
    try {
      const keys = await listAll(PATH, { signal });
      if (!form.isConnected) created.before(form);
      return keys.length ? keyTable(keys, revoke) : empty("No keys.");
    } catch (e) {
      if (e.status !== 403) throw e;
      form.remove();
      return notAdmin();
    }
  }, (content) => content);
  load();
}

function keyTable(keys, revoke) {
  return table([
    { label: "Name", cell: (k) => [k.name, isSignedInKey(k) ? h("small", {}, " (signed in)") : null] },
    { label: "Key", cell: (k) => h("code", {}, k.redacted_value) },
    { label: "Admin", cell: (k) => (k.admin ? h("span", { class: "badge s-succeeded" }, "admin") : "—") },
    { label: "Created", cell: (k) => time(k.created_at) },
    { label: "Last used", cell: (k) => (k.last_used_at ? time(k.last_used_at) : "never") },
    {
      label: "", cell: (k) => h("button", {
        type: "button", class: "small danger", disabled: isSignedInKey(k), onclick: () => revoke(k),
        title: isSignedInKey(k) ? "A key cannot revoke itself: sign in with another admin key to revoke it" : null,
      }, "Revoke"),
    },
  ], keys, { rowProps: (k) => ({ "data-key": k.id, "data-current": isSignedInKey(k) }) });
}

function createForm(signal, status, onCreated) {
  const name = h("input", { id: "key-name", name: "name", required: true, maxLength: 128, autocomplete: "off",
    placeholder: "e.g. ci-runner" });
  const admin = h("input", { id: "key-admin", type: "checkbox", name: "admin" });
  const submit = h("button", { type: "submit", class: "primary" }, "Create key");
  return h("form", {
    id: "key-create", class: "card upload",
    onsubmit: async (e) => {
      e.preventDefault();
      submit.disabled = true;
      try {
        onCreated(await post(PATH, { name: name.value.trim(), admin: admin.checked }, { signal }));
        name.value = "";
        admin.checked = false;
      } catch (err) {
        if (err.name !== "AbortError") replace(status, errorBox(err));
      } finally {
        submit.disabled = false;
      }
    },
  },
  field("New key's name", name),
  h("div", { class: "field" }, h("label", { for: "key-admin" }, admin, " Admin"),
    h("small", {}, "sees every key's objects and manages keys")),
  submit);
}

// The new key, once: its secret with a copy button and the warning; Done drops it from the page.
function secretCard(key, done) {
  const value = h("code", { id: "new-key-value" }, key.value);
  const copy = h("button", {
    type: "button", class: "small",
    onclick: async () => {
      try {
        await navigator.clipboard.writeText(key.value);
        copy.textContent = "Copied";
      } catch {
        getSelection().selectAllChildren(value);  // no clipboard access: selected, for Ctrl+C
        copy.textContent = "Selected: press Ctrl+C";
      }
    },
  }, "Copy");
  return h("section", { id: "new-key", class: "card", "aria-label": "New key" },
    h("h2", {}, `Key created: ${key.name}${key.admin ? " (admin)" : ""}`),
    h("p", {}, h("strong", { class: "err" }, "Copy this key now: it will not be shown again."),
      " The server keeps only its hash; a lost key is revoked and replaced, not recovered."),
    h("p", {}, value, " ", copy),
    h("button", { type: "button", onclick: done }, "Done"));
}

function notAdmin() {
  return h("section", { class: "card", id: "keys-not-admin" },
    h("p", {}, h("strong", {}, "API keys are managed by an admin."), " Ask one for a new key, or to revoke one; "
      + "an admin key manages them on this page (or on the server, with ", h("code", {}, "unsloth keys"), ")."),
    h("p", {}, "Every object (files, jobs, models, exports) belongs to the key that made it and is invisible to "
      + "other keys. The console signs in with one key at a time and keeps it in this browser tab only."));
}
