// A new job: the training data (upload with its validation report, or a file already uploaded), the model, the
// method (a reinforcement job's grader edited as JSON and tried on a sample), hyperparameters, the dry-run, create.

import { api, enc, post } from "../api.js";
import { empty, errorBox, field, h, loading, number, replace, select, table } from "../dom.js";
import { reportView } from "./files.js";
import { modelOptions } from "./models.js";

const AUTO = [["", "auto"]];
const BOOL = [...AUTO, "true", "false"];
const COMMON = [
  ["n_epochs", "int"], ["batch_size", "int"], ["learning_rate", "float"], ["learning_rate_multiplier", "float"],
  ["lora_r", "int"], ["lora_alpha", "float"], ["lora_dropout", "float"], ["lora_target_modules", "list"],
  ["lr_scheduler", [...AUTO, "linear", "cosine", "constant"]], ["warmup_ratio", "float"],
  ["max_seq_length", "int"], ["n_checkpoints", "int"], ["load_in_4bit", BOOL],
  ["probe_prompts", "json", 'auto: the first 3 validation prompts; or ["a prompt", ...]'],
];
// Graders scoring a supervised or DPO job's answers to validation prompts at each checkpoint.
const EVAL = [["eval_graders", "json", "a JSON list of graders"], ["eval_samples", "int"]];
const HYPERPARAMETERS = {
  supervised: [...COMMON, ["packing", BOOL], ...EVAL],
  dpo: [...COMMON, ["packing", BOOL], ["beta", "float"], ...EVAL],
  reinforcement: [...COMMON, ["num_generations", "int"], ["max_completion_length", "int"], ["beta", "float"],
    ["loss_type", [...AUTO, "grpo", "dr_grpo", "dapo", "bnpo"]], ["temperature", "float"], ["top_p", "float"],
    ["eval_interval", "int"], ["eval_samples", "int"], ["compute_multiplier", "float"],
    ["reasoning_effort", [["", "default"], "low", "medium", "high"]]],
};
const EXAMPLE_GRADER = {
  type: "string_check", name: "starts_with_a", input: "{{sample.output_text}}", reference: "{{item.opening}}",
  operation: "like",
};

export function render(view, _params, signal) {
  const state = { files: [], models: [] };
  const status = h("div", { class: "form-status", "aria-live": "polite" });

  // ---- data ----
  const training = h("select", { id: "training-file", required: true });
  const validation = h("select", { id: "validation-file" });
  const upload = h("input", { id: "upload", type: "file", accept: ".jsonl,.json,application/jsonl,text/plain" });
  const uploadReport = h("div", { id: "upload-report", "aria-live": "polite" });
  const uploadButton = h("button", { type: "button", id: "upload-button" }, "Upload and validate");
  const drawFiles = (selected) => {
    const usable = state.files.filter((f) => f.status === "processed");
    const options = usable.map((f) => [f.id, `${f.filename} (${f.id}, ${number(f.validation?.n_examples)} examples)`]);
    replace(training, h("option", { value: "" }, usable.length ? "Choose a file" : "No valid file yet: upload one"),
      options.map(([v, l]) => h("option", { value: v, selected: v === selected }, l)));
    replace(validation, h("option", { value: "" }, "None"), options.map(([v, l]) => h("option", { value: v }, l)));
  };
  uploadButton.addEventListener("click", async () => {
    const file = upload.files[0];
    if (!file) { replace(uploadReport, errorBox({ message: "Choose a file to upload first." })); return; }
    uploadButton.disabled = true;
    replace(uploadReport, loading(`Uploading ${file.name}`));
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file, file.name);
    try {
      const created = await api("/files", { method: "POST", form, signal });
      state.files.unshift(created);
      drawFiles(created.status === "processed" ? created.id : training.value);
      replace(uploadReport, h("p", {}, h("code", {}, created.id), ` ${created.filename}`),
        reportView(created.validation, { status: created.status }));
    } catch (e) {
      if (e.name !== "AbortError") replace(uploadReport, errorBox(e));
    } finally {
      uploadButton.disabled = false;
    }
  });

  // ---- model and method ----
  const model = h("select", { id: "model", required: true });
  const method = select(["supervised", "dpo", "reinforcement"], "supervised", { id: "method" });
  const suffix = h("input", { id: "suffix", pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,63}", placeholder: "my-run" });
  const seed = h("input", { id: "seed", type: "number", min: 0, inputmode: "numeric", placeholder: "random" });

  const grader = h("textarea", { id: "grader", rows: 8, spellcheck: false }, JSON.stringify(EXAMPLE_GRADER, null, 2));
  const sample = h("textarea", { id: "grader-sample", rows: 2 }, "A cat sat on the mat.");
  const item = h("textarea", { id: "grader-item", rows: 3, spellcheck: false }, '{"opening": "A "}');
  const graderResult = h("div", { id: "grader-result", "aria-live": "polite" });
  const tryGrader = h("button", { type: "button", id: "try-grader" }, "Try grader");
  tryGrader.addEventListener("click", async () => {
    replace(graderResult, loading("Running the grader"));
    try {
      const body = { grader: parseJson(grader, "grader"), model_sample: sample.value, item: parseJson(item, "item") };
      const run = await post("/fine_tuning/alpha/graders/run", body, { signal });
      const errors = Object.entries(run.metadata?.errors ?? {}).filter(([, v]) => v);
      replace(graderResult, h("p", { class: "report" }, h("strong", {}, `reward ${number(run.reward)}`),
        Object.keys(run.sub_rewards ?? {}).length
          ? ` · ${Object.entries(run.sub_rewards).map(([k, v]) => `${k} ${number(v)}`).join(", ")}` : "",
        ` · ${number((run.metadata?.execution_time ?? 0) * 1000)} ms`),
      errors.length ? errorBox({ message: errors.map(([k, v]) => (v === true ? k : `${k}: ${v}`)).join("; ") }) : null);
    } catch (e) {
      if (e.name !== "AbortError") replace(graderResult, errorBox(e));
    }
  });
  const graderBox = h("fieldset", { class: "card", hidden: true },
    h("legend", {}, "Grader"),
    field("Grader (OpenAI's grader JSON)", grader, "string_check, text_similarity, score_model, label_model, python, multi"),
    h("div", { class: "grid2" }, field("Sample answer", sample), field("Item (a training row, JSON)", item)),
    tryGrader, graderResult);

  // ---- hyperparameters ----
  const hpBox = h("div", { class: "hp-grid" });
  let hpInputs = {};
  const drawHyperparameters = () => {
    const old = Object.fromEntries(Object.entries(hpInputs).map(([k, c]) => [k, c.control.value]));
    hpInputs = {};
    replace(hpBox, HYPERPARAMETERS[method.value].map(([name, kind, hint]) => {
      const control = Array.isArray(kind)
        ? select(kind, old[name] ?? "", { id: `hp-${name}` })
        : h("input", {
          id: `hp-${name}`, value: old[name] ?? "", placeholder: name === "eval_graders" ? "none" : "auto",
          autocomplete: "off", spellcheck: false,
          inputmode: kind === "int" ? "numeric" : kind === "float" ? "decimal" : "text",
        });
      const resolved = h("small", { class: "resolved", "data-resolved": name });
      hpInputs[name] = { control, kind, resolved };
      return h("div", { class: `field${kind === "json" ? " wide" : ""}` }, h("label", { for: control.id }, name),
        control, hint ? h("small", {}, hint) : null, resolved);
    }));
    graderBox.hidden = method.value !== "reinforcement";
  };
  method.addEventListener("change", drawHyperparameters);
  drawHyperparameters();

  const body = () => {
    const hp = {};
    for (const [name, { control, kind }] of Object.entries(hpInputs)) {
      const raw = control.value.trim();
      if (!raw) continue;
      if (kind === "int" || kind === "float") {
        const n = Number(raw);
        if (!Number.isFinite(n)) throw new Error(`${name}: "${raw}" is not a number.`);
        hp[name] = n;
      } else if (kind === "list") hp[name] = raw === "all-linear" ? raw : raw.split(/[\s,]+/).filter(Boolean);
      else if (kind === "json" && /^[[{]/.test(raw)) hp[name] = parseJson(control, name);
      else if (raw === "true" || raw === "false") hp[name] = raw === "true";
      else hp[name] = raw;
    }
    const type = method.value;
    const spec = { hyperparameters: hp };
    if (type === "reinforcement") spec.grader = parseJson(grader, "grader");
    const job = { model: model.value, training_file: training.value, method: { type, [type]: spec } };
    if (validation.value) job.validation_file = validation.value;
    if (suffix.value.trim()) job.suffix = suffix.value.trim();
    if (seed.value !== "") job.seed = Number(seed.value);
    return job;
  };

  // ---- dry run and create ----
  const dryRun = h("div", { id: "dry-run", "aria-live": "polite" });
  const validateButton = h("button", { type: "button", id: "validate" }, "Dry run");
  const createButton = h("button", { type: "submit", class: "primary", id: "create" }, "Create job");
  validateButton.addEventListener("click", async () => {
    replace(status);
    replace(dryRun, loading("Checking the job (files re-read with the model's tokenizer)"));
    for (const { resolved } of Object.values(hpInputs)) resolved.textContent = "";
    try {
      const result = await post("/fine_tuning/jobs/validate", body(), { signal });
      const resolvedHp = result.method?.[method.value]?.hyperparameters ?? result.hyperparameters ?? {};
      for (const [name, value] of Object.entries(resolvedHp)) {
        const input = hpInputs[name];
        if (input) input.resolved.textContent = `→ ${JSON.stringify(value)}`;
      }
      replace(dryRun, dryRunView(result));
      dryRun.scrollIntoView({ block: "nearest" });
    } catch (e) {
      if (e.name !== "AbortError") replace(dryRun, errorBox(e));
    }
  });

  const form = h("form", {
    class: "new-job",
    onsubmit: async (e) => {
      e.preventDefault();
      createButton.disabled = true;
      replace(status, loading("Creating the job"));
      try {
        const job = await post("/fine_tuning/jobs", body(), { signal });
        location.hash = `#/jobs/${enc(job.id)}`;
      } catch (err) {
        if (err.name !== "AbortError") replace(status, errorBox(err));
      } finally {
        createButton.disabled = false;
      }
    },
  },
  h("h1", {}, "New fine-tuning job"),
  h("fieldset", { class: "card" }, h("legend", {}, "Training data"),
    h("div", { class: "upload" }, field("Upload a JSONL file", upload), uploadButton), uploadReport,
    h("div", { class: "grid2" }, field("Training file", training), field("Validation file (optional)", validation))),
  h("fieldset", { class: "card" }, h("legend", {}, "Model and method"),
    h("div", { class: "grid2" }, field("Base or fine-tuned model", model), field("Method", method),
      field("Suffix (optional)", suffix), field("Seed (optional)", seed))),
  graderBox,
  h("fieldset", { class: "card" }, h("legend", {}, "Hyperparameters"),
    h("p", { class: "hint" }, "Leave a field empty for auto; the dry run shows what auto resolves to."), hpBox),
  h("div", { class: "actions" }, validateButton, createButton), status, dryRun);
  replace(view, form);

  (async () => {
    try {
      const [files, models] = await Promise.all([
        api("/files?purpose=fine-tune", { signal }), api("/models", { signal })]);
      state.files = files.data;
      drawFiles("");
      replace(model, modelOptions(models.data));
    } catch (e) {
      if (e.name !== "AbortError") replace(status, errorBox(e));
    }
  })();
}

function parseJson(control, what) {
  try {
    return JSON.parse(control.value);
  } catch (e) {
    control.focus();
    throw new Error(`The ${what} is not valid JSON: ${e.message}`);
  }
}

function dryRunView(result) {
  const facts = [
    ["Examples", number(result.n_examples)], ["Tokens", number(result.n_tokens)],
    ["Truncated", number(result.n_truncated)], ["Estimated steps", number(result.estimated_steps)],
    ["Estimated trained tokens", number(result.estimated_trained_tokens)],
  ];
  return h("section", { class: `card ${result.valid ? "" : "invalid"}`, "data-valid": String(result.valid) },
    h("h2", {}, result.valid ? "Ready to create" : "This job would be refused"),
    h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", { "data-fact": k }, v)])),
    result.errors.length ? table([
      { label: "Field", cell: (e) => h("code", {}, e.param ?? "") },
      { label: "Line", cell: (e) => (e.line == null ? "" : String(e.line)) },
      { label: "Code", cell: (e) => h("code", {}, e.code) },
      { label: "Message", cell: (e) => e.message },
    ], result.errors) : empty("No problems found."),
    result.training_file ? h("details", {}, h("summary", {}, "Training file, re-read with the model's tokenizer"),
      reportView(result.training_file)) : null,
    result.validation_file ? h("details", {}, h("summary", {}, "Validation file"),
      reportView(result.validation_file)) : null);
}
