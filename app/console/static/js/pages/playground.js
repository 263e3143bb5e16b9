// Chat with any model (base, fine-tune, checkpoint), streamed; with a second model, the same conversation goes to both
// side by side: the user's turns are shared, each model answers from its own earlier answers.

import { api, events } from "../api.js";
import { errorBox, field, h, number, replace } from "../dom.js";
import { modelOptions } from "./models.js";

const KNOBS = [
  ["temperature", "0.7", "0 to 2"], ["top_p", "1", "0 to 1"], ["max_tokens", "128", "per answer"],
  ["seed", "", "empty: random"], ["top_k", "", "vLLM's, empty: off"], ["min_p", "", "empty: off"],
  ["repetition_penalty", "", "empty: off"],
];

export function render(view, { query }, signal) {
  const modelA = h("select", { id: "model-a", "aria-label": "Model" });
  const modelB = h("select", { id: "model-b", "aria-label": "Second model" });
  const knobs = Object.fromEntries(KNOBS.map(([name, value]) => [name, h("input", {
    id: `knob-${name}`, value, inputmode: "decimal", placeholder: value || "off", autocomplete: "off",
  })]));
  const system = h("textarea", { id: "system", rows: 2, placeholder: "Optional system message" });
  const input = h("textarea", { id: "prompt", rows: 3, placeholder: "Say something (Ctrl+Enter sends)", required: true });
  const send = h("button", { type: "submit", class: "primary", id: "send" }, "Send");
  const stop = h("button", { type: "button", id: "stop", disabled: true }, "Stop");
  const clear = h("button", { type: "button", class: "quiet", id: "clear" }, "New conversation");
  const status = h("div", { class: "form-status", "aria-live": "polite" });
  const panesEl = h("div", { class: "panes" });

  const turns = [];  // {user, replies: [text per pane]}
  let panes = [];
  let running = null;

  const paneModels = () => [modelA.value, modelB.value].filter(Boolean);
  const drawPanes = () => {
    panes = paneModels().map((model, i) => {
      const log = h("ol", { class: "chat", "aria-live": "polite" });
      for (const turn of turns) {
        log.append(message("user", turn.user));
        if (turn.replies[i] !== undefined) log.append(message("assistant", turn.replies[i]));
      }
      return { model, log, el: h("section", { class: "pane card", "data-pane": i }, h("h2", {}, model), log) };
    });
    replace(panesEl, panes.map((p) => p.el));
    panesEl.classList.toggle("two", panes.length === 2);
  };
  for (const s of [modelA, modelB]) s.addEventListener("change", drawPanes);

  const sampling = () => {
    const out = {};
    for (const [name, el] of Object.entries(knobs)) {
      const raw = el.value.trim();
      if (!raw) continue;
      const n = Number(raw);
      if (!Number.isFinite(n)) throw new Error(`${name}: "${raw}" is not a number.`);
      out[name] = n;
    }
    return out;
  };

  const ask = async (pane, i, turn, params, abort) => {
    const messages = [];
    if (system.value.trim()) messages.push({ role: "system", content: system.value.trim() });
    for (const t of turns) {
      messages.push({ role: "user", content: t.user });
      if (t === turn) break;
      if (t.replies[i]) messages.push({ role: "assistant", content: t.replies[i] });
    }
    const text = h("div", { class: "text" });
    const meta = h("small", { class: "meta" });
    const reply = h("li", { class: "msg assistant streaming", dataset: { chunks: "0" } },
      h("span", { class: "role" }, "assistant"), text, meta);
    pane.log.append(reply);
    turn.replies[i] = "";
    const started = performance.now();
    let chunks = 0;
    try {
      const body = { model: pane.model, messages, stream: true, stream_options: { include_usage: true }, ...params };
      for await (const chunk of events("/chat/completions", { method: "POST", body, signal: abort })) {
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          turn.replies[i] += delta;
          text.textContent = turn.replies[i];
          reply.dataset.chunks = String(++chunks);
          reply.scrollIntoView({ block: "nearest" });
        }
        const finish = chunk.choices?.[0]?.finish_reason;
        if (finish) reply.dataset.finish = finish;
        if (chunk.usage) {
          const seconds = (performance.now() - started) / 1000;
          meta.textContent = `${chunk.usage.completion_tokens} tokens · ${number(chunk.usage.completion_tokens / seconds)} tokens/s`
            + (reply.dataset.finish ? ` · ${reply.dataset.finish}` : "");
          reply.dataset.tokens = String(chunk.usage.completion_tokens);
        }
      }
    } catch (e) {
      reply.append(e.name === "AbortError" ? h("small", { class: "meta" }, "stopped") : errorBox(e));
    } finally {
      reply.classList.remove("streaming");
      reply.dataset.done = "true";
    }
  };

  const form = h("form", {
    class: "composer",
    onsubmit: async (e) => {
      e.preventDefault();
      if (running || !input.value.trim() || !panes.length) return;
      let params;
      try { params = sampling(); } catch (err) { replace(status, errorBox(err)); return; }
      replace(status);
      const turn = { user: input.value.trim(), replies: [] };
      turns.push(turn);
      input.value = "";
      for (const pane of panes) pane.log.append(message("user", turn.user));
      running = new AbortController();
      const stopAll = () => running?.abort();
      signal.addEventListener("abort", stopAll);
      send.disabled = true;
      stop.disabled = false;
      await Promise.all(panes.map((pane, i) => ask(pane, i, turn, params, running.signal)));
      signal.removeEventListener("abort", stopAll);
      running = null;
      send.disabled = false;
      stop.disabled = true;
      input.focus();
    },
  }, field("Message", input), h("div", { class: "actions" }, send, stop, clear));
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); form.requestSubmit(); }
  });
  stop.addEventListener("click", () => running?.abort());
  clear.addEventListener("click", () => { running?.abort(); turns.length = 0; drawPanes(); input.focus(); });

  replace(view,
    h("h1", {}, "Playground"),
    h("div", { class: "card playground-setup" },
      h("div", { class: "grid2" }, field("Model", modelA), field("Compare with", modelB, "same conversation, side by side")),
      h("details", { open: window.innerWidth > 700 }, h("summary", {}, "Sampling"),
        h("div", { class: "hp-grid" }, KNOBS.map(([name, , hint]) => field(name, knobs[name], hint)))),
      field("System", system)),
    status, panesEl, form);

  api("/models", { signal }).then(({ data }) => {
    const first = query.get("model") ?? data.find((m) => m.kind === "fine_tune")?.id ?? data[0]?.id;
    replace(modelA, modelOptions(data, first));
    replace(modelB, h("option", { value: "" }, "No second model"), modelOptions(data, query.get("model2") ?? ""));
    for (const [select, wanted] of [[modelA, query.get("model")], [modelB, query.get("model2")]]) {
      if (wanted && select.value !== wanted) {  // not in the list (deleted, or not this key's): say so
        replace(status, errorBox({ message: `Model ${wanted} is not available to this key.`, code: "model_not_found" }));
      }
    }
    drawPanes();
    input.focus();
  }).catch((e) => { if (e.name !== "AbortError") replace(status, errorBox(e)); });
}

const message = (role, text) => h("li", { class: `msg ${role}` }, h("span", { class: "role" }, role),
  h("div", { class: "text" }, text));
