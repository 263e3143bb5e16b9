import { api, enc, listAll } from "../api.js";
import { empty, errorBox, h, loading, replace, statusBadge, table, time } from "../dom.js";
import { downloadFile } from "./files.js";

const ACTIVE = ["queued", "running"];

export function render(view, _params, signal) {
  const body = h("div", {}, loading("Loading exports"));
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  replace(view, h("div", { class: "page-head" }, h("h1", {}, "Exports"),
    h("p", { class: "hint" }, "New exports start from a model's row on the ", h("a", { href: "#/models" }, "Models"),
      " page.")), status, body);

  const action = (path, method) => async () => {
    try {
      await api(path, { method, signal });
      load();
    } catch (e) { if (e.name !== "AbortError") replace(status, errorBox(e)); }
  };

  const resultFiles = (x) => (x.result_files.length ? h("span", { class: "actions" }, x.result_files.map((id) =>
    h("button", {
      type: "button", class: "small",
      onclick: async () => {
        try {
          const file = await api(`/files/${enc(id)}`, { signal });
          await downloadFile(file, status, signal);
        } catch (e) { if (e.name !== "AbortError") replace(status, errorBox(e)); }
      },
    }, `Download ${id}`))) : "—");

  let timer = null;
  signal.addEventListener("abort", () => clearTimeout(timer));
  const load = async () => {
    clearTimeout(timer);
    try {
      const items = await listAll("/exports", { signal, max: 200 });
      replace(body, items.length ? table([
        { label: "Export", cell: (x) => h("code", {}, x.id) },
        { label: "Model", cell: (x) => x.model },
        { label: "Format", cell: (x) => [x.format, x.quantization, x.ollama ? "+ Modelfile" : null].filter(Boolean).join(" ") },
        { label: "Status", cell: (x) => [statusBadge(x.status), x.error ? h("small", { class: "err" }, ` ${x.error.message}`) : null] },
        { label: "Created", cell: (x) => time(x.created_at) },
        { label: "Files", cell: resultFiles },
        {
          label: "", cell: (x) => h("span", { class: "actions" },
            ACTIVE.includes(x.status) ? h("button", { type: "button", class: "small", onclick: action(`/exports/${enc(x.id)}/cancel`, "POST") }, "Cancel") : null,
            !ACTIVE.includes(x.status) ? h("button", { type: "button", class: "small danger", onclick: action(`/exports/${enc(x.id)}`, "DELETE") }, "Delete") : null),
        },
      ], items) : empty("No exports yet."));
      if (items.some((x) => ACTIVE.includes(x.status))) timer = setTimeout(load, 3000);
    } catch (e) {
      if (e.name !== "AbortError") replace(body, errorBox(e));
    }
  };
  load();
}
