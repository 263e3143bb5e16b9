// Models with their lineage (base → fine-tune → checkpoints, from `parent` and `root`), each openable in the
// playground or exportable.

import { api, enc, post } from "../api.js";
import { empty, errorBox, fill, h, replace, select, time } from "../dom.js";
import { playgroundLink } from "./job.js";

const KIND_LABELS = { base: "Base models", fine_tune: "Fine-tunes", checkpoint: "Checkpoints" };

// <option>s for a model picker, grouped by kind.
export function modelOptions(models, selected) {
  return Object.entries(KIND_LABELS).map(([kind, label]) => {
    const of = models.filter((m) => m.kind === kind);
    return of.length ? h("optgroup", { label }, of.map((m) => h("option", { value: m.id, selected: m.id === selected },
      m.id))) : null;
  });
}

export function render(view, _params, signal) {
  const body = h("div", {});
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  replace(view, h("div", { class: "page-head" }, h("h1", {}, "Models")), status, body);

  const exportForm = (model) => {
    const format = select(["gguf", "merged", "peft"], "gguf", { "aria-label": `Export format for ${model.id}` });
    const quantization = select([["", "default"], "f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0"], "",
      { "aria-label": "Quantization" });
    return h("form", {
      class: "inline-form",
      onsubmit: async (e) => {
        e.preventDefault();
        try {
          const body = { model: model.id, format: format.value };
          if (quantization.value) body.quantization = quantization.value;
          const created = await post("/exports", body, { signal });
          replace(status, h("p", { class: "report ok" }, `Export ${created.id} queued. `,
            h("a", { href: "#/exports" }, "See exports")));
        } catch (err) {
          if (err.name !== "AbortError") replace(status, errorBox(err));
        }
      },
    }, format, quantization, h("button", { type: "submit", class: "small" }, "Export"));
  };

  const node = (model, children) => h("li", { "data-model": model.id },
    h("div", { class: "model-row" },
      h("span", { class: `badge k-${model.kind}` }, model.kind.replace("_", "-")),
      h("code", {}, model.id),
      model.fine_tuning_job_id ? h("a", { href: `#/jobs/${enc(model.fine_tuning_job_id)}` }, model.fine_tuning_job_id) : null,
      h("small", {}, time(model.created)),
      model.max_model_len ? h("small", {}, `context ${model.max_model_len}`) : null,
      h("span", { class: "actions" }, h("a", { class: "button small", href: playgroundLink(model.id) }, "Playground"),
        exportForm(model))),
    children.length ? h("ul", { class: "tree" }, children) : null);

  fill(body, () => api("/models", { signal }), ({ data }) => {
    if (!data.length) return empty("No models.");
    // Under its parent; under its base when the parent is not listed (a cancelled job's checkpoint has no
    // fine-tune); at the top when neither is (a base model, or one this key cannot see).
    const ids = new Set(data.map((m) => m.id));
    const parentOf = (m) => (m.kind === "base" ? null : [m.parent, m.root].find((p) => p && ids.has(p)) ?? null);
    const byParent = new Map();
    for (const m of data) {
      const parent = parentOf(m);
      if (!byParent.has(parent)) byParent.set(parent, []);
      byParent.get(parent).push(m);
    }
    const grow = (model) => node(model, (byParent.get(model.id) ?? []).map(grow));
    return h("ul", { class: "tree lineage", "aria-label": "Models by lineage" }, (byParent.get(null) ?? []).map(grow));
  });
}
