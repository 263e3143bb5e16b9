// A job: its state and actions, live charts and the events log (both fed by the events stream), its checkpoints,
// and for a reinforcement job the rollouts it sampled, step by step.

import { api, enc, events, listAll, post } from "../api.js";
import { chartGrid, chartsFor } from "../charts.js";
import {
  copyButton, empty, errorBox, fill, h, loading, number, relative, replace, statusBadge, table, time,
} from "../dom.js";
import { methodOf, progressBar } from "./jobs.js";

const TERMINAL = ["succeeded", "failed", "cancelled"];
const MAX_LOG = 500;

export function render(view, { args: [jobId] }, signal) {
  const path = `/fine_tuning/jobs/${enc(jobId)}`;
  replace(view, loading("Loading the job"));
  api(path, { signal }).then((job) => page(view, job, path, signal)).catch((e) => {
    if (e.name !== "AbortError") replace(view, h("h1", {}, jobId), errorBox(e), h("a", { href: "#/jobs" }, "All jobs"));
  });
}

function page(view, first, path, signal) {
  let job = first;
  const method = methodOf(job);
  const head = h("div", { class: "page-head" });
  const actionStatus = h("div", { class: "form-status", "aria-live": "polite" });
  const summary = h("section", { class: "card", "aria-label": "Summary" });
  const charts = chartsFor(method);
  const log = h("ol", { class: "events", reversed: true });
  const logState = h("p", { class: "state", role: "status" }, "Connecting to the events stream…");
  const checkpoints = h("div", {}, loading("Loading checkpoints"));
  const rollouts = method === "reinforcement" ? rolloutBrowser(path, signal) : null;

  replace(view, head, actionStatus, summary,
    h("section", { "aria-labelledby": "h-charts" }, h("h2", { id: "h-charts" }, "Metrics"), chartGrid(charts)),
    h("section", { "aria-labelledby": "h-ckpt" }, h("h2", { id: "h-ckpt" }, "Checkpoints"), checkpoints),
    rollouts?.el,
    h("section", { "aria-labelledby": "h-events" }, h("h2", { id: "h-events" }, "Events"), logState,
      h("div", { class: "events-wrap" }, log)));
  signal.addEventListener("abort", () => charts.forEach((c) => c.destroy()));

  const act = (name) => async () => {
    replace(actionStatus);
    try {
      job = await post(`${path}/${name}`, undefined, { signal });
      drawJob();
    } catch (e) {
      if (e.name !== "AbortError") replace(actionStatus, errorBox(e));
    }
  };

  function drawJob() {
    const ended = TERMINAL.includes(job.status);
    const stop = job.stop_requested;
    const button = (label, name, enabled, cls = "") => h("button", {
      type: "button", class: cls, disabled: !enabled, onclick: act(name), "data-action": name,
    }, label);
    replace(head,
      h("div", {}, h("h1", {}, job.suffix ? `${job.id} (${job.suffix})` : job.id), statusBadge(job.status),
        stop ? h("span", { class: "badge" }, `${stop} requested`) : null),
      h("div", { class: "actions" },
        button("Pause", "pause", ["queued", "running"].includes(job.status) && !stop),
        button("Resume", "resume", job.status === "paused" || (job.status === "running" && stop === "pause")),
        button("Cancel", "cancel", !ended && stop !== "cancel", "danger"),
        job.fine_tuned_model ? h("a", { class: "button primary", href: playgroundLink(job.fine_tuned_model) },
          "Open in playground") : null));
    const hp = job.method?.[method]?.hyperparameters ?? job.hyperparameters ?? {};
    const grader = job.method?.reinforcement?.grader;
    replace(summary,
      job.error ? errorBox({ message: job.error.message, code: job.error.code, param: job.error.param }) : null,
      h("dl", { class: "facts" },
        fact("Model", job.model), fact("Method", method),
        fact("Fine-tuned model", job.fine_tuned_model ?? "—"),
        fact("Progress", progressBar(job)),
        fact("Estimated finish", job.estimated_finish ? `${relative(job.estimated_finish)} (${time(job.estimated_finish)})` : "—"),
        fact("Created", time(job.created_at)), fact("Finished", time(job.finished_at)),
        fact("Trained tokens", number(job.trained_tokens)),
        fact("Training file", job.training_file), fact("Validation file", job.validation_file ?? "—"),
        fact("Seed", job.seed)),
      h("details", {}, h("summary", {}, "Hyperparameters (resolved)"),
        h("dl", { class: "facts small" }, Object.entries(hp).map(([k, v]) => fact(k, JSON.stringify(v))))),
      grader ? h("details", {}, h("summary", {}, "Grader"), h("pre", {}, JSON.stringify(grader, null, 2))) : null);
  }
  drawJob();

  // ---- refreshes, debounced: events come in bursts ----
  const later = (fn, ms) => {
    let t = null;
    signal.addEventListener("abort", () => clearTimeout(t));
    return () => { if (!t) t = setTimeout(() => { t = null; fn(); }, ms); };
  };
  const refreshJob = later(async () => {
    try { job = await api(path, { signal }); drawJob(); } catch { /* the next event tries again */ }
  }, 300);
  const refreshCheckpoints = later(() => fill(checkpoints, () => listAll(`${path}/checkpoints`, { signal }),
    checkpointTable), 300);
  refreshCheckpoints();

  // ---- the events stream: history first (oldest first), then live until the job ends ----
  let lastId = null;
  let count = 0;
  const onEvent = (event) => {
    lastId = event.id;
    count++;
    const data = event.data ?? {};
    if (event.type === "metrics" && typeof data.step === "number" && !data.checkpoint) {
      for (const chart of charts) chart.add(data.step, data);
      refreshJob();  // progress and the finish estimate
      rollouts?.stepsChanged();
    }
    if (data.status || event.type === "message") refreshJob();
    if (data.checkpoint) refreshCheckpoints();
    log.prepend(h("li", { class: `level-${event.level}` }, h("time", { title: time(event.created_at) },
      new Date(event.created_at * 1000).toLocaleTimeString()), " ",
      h("span", {}, event.message)));
    while (log.childElementCount > MAX_LOG) log.lastElementChild.remove();
    logState.textContent = `${count} event${count === 1 ? "" : "s"}${TERMINAL.includes(job.status) ? "" : " · live"}`;
  };

  (async () => {
    for (let attempt = 0; !signal.aborted; attempt++) {
      try {
        const after = lastId ? `&after=${enc(lastId)}` : "";
        for await (const event of events(`${path}/events?stream=true${after}`, { signal })) onEvent(event);
        break;  // [DONE]: the job ended
      } catch (e) {
        if (e.name === "AbortError") return;
        replace(logState, errorBox({ message: `The events stream broke (${e.message}); reconnecting…` }));
        await new Promise((r) => setTimeout(r, Math.min(1000 * 2 ** attempt, 15000)));
      }
    }
    if (signal.aborted) return;
    logState.textContent = `${count} event${count === 1 ? "" : "s"} · the job has ended`;
    if (!count) log.replaceWith(empty("No events."));
    refreshJob();
    refreshCheckpoints();
    rollouts?.stepsChanged();
  })();
}

const fact = (label, value) => [h("dt", {}, label), h("dd", {}, value)];

export const playgroundLink = (...models) => `#/playground?${models.map((m, i) => `${i ? "model2" : "model"}=${enc(m)}`)
  .join("&")}`;

function checkpointTable(items) {
  if (!items.length) return empty("No checkpoints yet.");
  items.sort((a, b) => b.step_number - a.step_number);
  const keys = [...new Set(items.flatMap((c) => Object.keys(c.metrics ?? {})))].filter((k) => k !== "step");
  const withSamples = items.some((c) => c.samples?.length);
  const chosen = [];  // the selected checkpoints, at most two
  const compare = h("a", { class: "button", "aria-disabled": "true", href: "#/playground", id: "compare-checkpoints" },
    "Compare the two selected in the playground");
  const side = h("div", { id: "compare-samples" });
  const update = () => {
    const ready = chosen.length === 2;
    compare.setAttribute("aria-disabled", String(!ready));
    compare.href = ready ? playgroundLink(...chosen.map((c) => c.fine_tuned_model_checkpoint)) : "#/playground";
    replace(side, ready && withSamples ? sampleComparison(chosen) : null);
  };
  compare.addEventListener("click", (e) => { if (chosen.length !== 2) e.preventDefault(); });
  return h("div", {},
    table([
      {
        label: "Compare", cell: (c) => h("input", {
          type: "checkbox", "aria-label": `Select step ${c.step_number} to compare`,
          onchange: (e) => {
            const at = chosen.indexOf(c);
            if (!e.target.checked) chosen.splice(at, 1);
            else if (chosen.length < 2) chosen.push(c);
            else e.target.checked = false;
            update();
          },
        }),
      },
      { label: "Step", cell: (c) => c.step_number },
      {
        label: "Model id", cell: (c) => h("span", { class: "actions" },
          h("code", { title: c.fine_tuned_model_checkpoint }, `…:${c.fine_tuned_model_checkpoint.split(":").pop()}`),
          copyButton(c.fine_tuned_model_checkpoint)),
      },
      ...keys.map((k) => ({ label: k, cell: (c) => number(c.metrics?.[k]) })),
      ...(withSamples ? [{ label: "Samples", cell: samplesCell }] : []),
      { label: "Created", cell: (c) => time(c.created_at) },
      {
        label: "", cell: (c) => h("a", { class: "button small", href: playgroundLink(c.fine_tuned_model_checkpoint),
          "data-checkpoint": c.fine_tuned_model_checkpoint }, "Open in playground"),
      },
    ], items),
    h("p", { class: "actions" }, compare, withSamples ? h("small", {}, "Select two to see their samples side by side.") : null),
    side);
}

// A checkpoint's probe prompts with its greedy answers (the checkpoint's `samples`).
function samplesCell(c) {
  if (!c.samples?.length) return "—";
  return h("details", {}, h("summary", {}, `${c.samples.length} sample${c.samples.length === 1 ? "" : "s"}`),
    c.samples.map((s) => h("div", { class: "sample" }, h("pre", { class: "prompt" }, promptText(s.prompt)),
      h("pre", { class: "completion" }, s.output ?? ""))));
}

function sampleComparison([a, b]) {
  const n = Math.max(a.samples?.length ?? 0, b.samples?.length ?? 0);
  const rows = Array.from({ length: n }, (_, i) => ({ i, prompt: (a.samples?.[i] ?? b.samples?.[i])?.prompt }));
  const answer = (c, i) => h("pre", { class: "completion" }, c.samples?.[i]?.output ?? "—");
  return h("section", { class: "card", "aria-label": "Samples side by side" },
    h("h3", {}, `Samples: step ${a.step_number} and step ${b.step_number}`),
    table([
      { label: "Prompt", cell: (r) => h("pre", { class: "prompt" }, promptText(r.prompt)) },
      { label: `Step ${a.step_number}`, cell: (r) => answer(a, r.i) },
      { label: `Step ${b.step_number}`, cell: (r) => answer(b, r.i) },
    ], rows));
}

// ---- rollouts (reinforcement) ----

function rolloutBrowser(path, signal) {
  const stepSelect = h("select", { id: "rollout-step", "aria-label": "Step" });
  const prev = h("button", { type: "button", "aria-label": "Older step" }, "←");
  const next = h("button", { type: "button", "aria-label": "Newer step" }, "→");
  const body = h("div", {}, loading("Loading rollouts"));
  const el = h("section", { "aria-labelledby": "h-rollouts" }, h("h2", { id: "h-rollouts" }, "Rollouts"),
    h("div", { class: "toolbar" }, prev, h("label", { for: "rollout-step" }, "Step"), stepSelect, next), body);
  let steps = [];

  const show = (step) => {
    if (step === undefined) { replace(body, empty("No rollouts recorded yet.")); return; }
    stepSelect.value = String(step);
    const i = steps.indexOf(step);
    prev.disabled = i >= steps.length - 1;
    next.disabled = i <= 0;
    fill(body, () => listAll(`${path}/rollouts?step=${step}`, { signal, max: 64 }), (items) => h("div", {},
      items.map((r, n) => rolloutCard(r, n))));
  };
  stepSelect.addEventListener("change", () => show(Number(stepSelect.value)));
  prev.addEventListener("click", () => show(steps[steps.indexOf(Number(stepSelect.value)) + 1]));
  next.addEventListener("click", () => show(steps[steps.indexOf(Number(stepSelect.value)) - 1]));

  const loadSteps = async () => {
    try {
      // Newest first; the steps seen among the newest rows (a job keeps its newest 2,000).
      const rows = await listAll(`${path}/rollouts`, { signal, max: 200 });
      const fresh = [...new Set(rows.map((r) => r.step))].sort((a, b) => b - a);
      const current = stepSelect.value === "" ? undefined : Number(stepSelect.value);
      const wasNewest = current === undefined || current === steps[0];
      steps = fresh;
      replace(stepSelect, steps.map((s) => h("option", { value: s }, `step ${s}`)));
      show(wasNewest ? steps[0] : current);
    } catch (e) {
      if (e.name !== "AbortError") replace(body, errorBox(e));
    }
  };
  let timer = null;
  signal.addEventListener("abort", () => clearTimeout(timer));
  loadSteps();
  return {
    el,
    stepsChanged: () => { if (!timer) timer = setTimeout(() => { timer = null; loadSteps(); }, 3000); },
  };
}

function promptText(prompt) {
  if (typeof prompt === "string") return prompt;
  if (Array.isArray(prompt)) return prompt.map((m) => `${m.role}: ${typeof m.content === "string" ? m.content : JSON.stringify(m.content)}`).join("\n");
  return JSON.stringify(prompt, null, 2);
}

function rolloutCard(rollout, n) {
  const completions = rollout.completions ?? [];
  const graders = [...new Set(completions.flatMap((c) => Object.keys(c.rewards ?? {})))];
  return h("article", { class: "card rollout" },
    h("h3", {}, `Prompt ${n + 1}`), h("pre", { class: "prompt" }, promptText(rollout.prompt)),
    table([
      { label: "#", cell: (c) => c.n + 1 },
      { label: "Completion", cell: (c) => h("pre", { class: "completion" }, c.text ?? "") },
      { label: "Reward", cell: (c) => number(c.reward) },
      ...graders.map((g) => ({ label: g, cell: (c) => number(c.rewards?.[g]) })),
      { label: "Advantage", cell: (c) => number(c.advantage) },
      { label: "Details", cell: (c) => (c.details ? h("code", {}, JSON.stringify(c.details)) : "") },
    ], completions.map((c, n) => ({ ...c, n }))));
}
