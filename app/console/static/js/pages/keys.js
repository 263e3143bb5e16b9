import { h, replace } from "../dom.js";

// The API has no key endpoints (keys are made and revoked on the server), so this page says how; it shows nothing a
// key could not already see.
export function render(view) {
  replace(view,
    h("h1", {}, "API keys"),
    h("section", { class: "card" },
      h("p", {}, "Keys are managed on the server, with the ", h("code", {}, "unsloth"), " command (they are stored "
        + "hashed; a new key is shown once):"),
      h("pre", {}, "unsloth keys create --name alice       # prints a new key, once\nunsloth keys create --admin            # a key that sees every key's objects\nunsloth keys list\nunsloth keys revoke <key_... or prefix>"),
      h("p", {}, "Every object (files, jobs, models, exports) belongs to the key that made it and is invisible to "
        + "other keys. The console signs in with one key at a time and keeps it in this browser tab only.")));
}
