import { api, session } from "../api.js";
import { errorBox, h, replace } from "../dom.js";

export function render(view, { next }) {
  const key = h("input", {
    id: "api-key", type: "password", name: "api-key", autocomplete: "off", spellcheck: false, required: true,
    placeholder: "sk-…",
  });
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  const remembered = sessionStorage.getItem("unsloth.signInMessage");
  sessionStorage.removeItem("unsloth.signInMessage");
  if (remembered) replace(status, errorBox({ message: `Signed out: ${remembered}` }));
  const submit = h("button", { type: "submit", class: "primary" }, "Sign in");
  const form = h("form", {
    class: "card signin",
    onsubmit: async (e) => {
      e.preventDefault();
      submit.disabled = true;
      replace(status, h("p", { class: "state loading" }, "Checking the key…"));
      try {
        await api("/models", { key: key.value.trim() });  // any key-gated read: the key works, or the API says why
        session.signIn(key.value.trim());
        if (location.hash === next) window.dispatchEvent(new HashChangeEvent("hashchange"));
        else location.hash = next;
      } catch (err) {
        replace(status, errorBox(err));
        submit.disabled = false;
        key.select();
      }
    },
  },
  h("h1", {}, "Sign in"),
  h("p", {}, "Use an API key of this server (", h("code", {}, "unsloth serve"), " prints one; ",
    h("code", {}, "unsloth keys create"), " makes more). It is kept in this tab only, until you close it."),
  h("div", { class: "field" }, h("label", { for: "api-key" }, "API key"), key),
  submit, status);
  replace(view, form);
  key.focus();
}
