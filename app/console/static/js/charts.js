// Live metric charts (uPlot): one chart per panel, x = training step, one line per metric. Points arrive one event at
// a time; a step logged again (a job resumed from an earlier checkpoint) replaces the earlier value.

import uPlot from "../vendor/uplot/uPlot.esm.js";
import { h, number, replace } from "./dom.js";

const PALETTE = ["#e5692e", "#2f7fd8", "#3aa657", "#a35bd6", "#d6455d", "#1aa0a0", "#b7892a", "#6b7a8f"];
const HEIGHT = 220;

export class MetricChart {
  // `keys`: the metric names to draw, in order; or `match(name)` to take any name it accepts (per-grader rewards).
  // `labels`: the legend's name for a metric (an object, or a function of the name). An `optional` chart stays
  // hidden until its first value arrives (metrics only some jobs log).
  constructor({ title, keys = [], match = null, labels = {}, optional = false }) {
    this.order = keys;  // the series' order; one is drawn once its first value arrives
    this.keys = [];
    this.match = match ?? ((name) => keys.includes(name));
    this.label = typeof labels === "function" ? labels : (k) => labels[k] ?? k;
    this.steps = new Map();  // step -> {name: value}
    this.plot = null;
    this.canvas = h("div", { class: "chart-canvas", role: "img" });
    this.placeholder = h("p", { class: "state empty" }, "Waiting for metrics…");
    this.el = h("figure", { class: "chart", dataset: { points: "0", title }, hidden: optional },
      h("figcaption", {}, title), this.placeholder, this.canvas);
    this.pending = false;
  }

  // Takes what it draws from one metrics event; returns whether anything was new.
  add(step, data) {
    let taken = false;
    for (const [name, value] of Object.entries(data)) {
      if (typeof value !== "number" || !Number.isFinite(value) || !this.match(name)) continue;
      if (!this.keys.includes(name)) {
        this.keys.push(name);
        const rank = (k) => (this.order.includes(k) ? this.order.indexOf(k) : this.order.length);
        this.keys.sort((a, b) => rank(a) - rank(b));
      }
      const row = this.steps.get(step) ?? {};
      row[name] = value;
      this.steps.set(step, row);
      taken = true;
    }
    if (taken) this.schedule();
    return taken;
  }

  get points() {
    let n = 0;
    for (const row of this.steps.values()) n += Object.keys(row).length;
    return n;
  }

  schedule() {
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => { this.pending = false; this.draw(); });
  }

  draw() {
    this.el.dataset.points = String(this.points);
    if (!this.steps.size) return;
    this.placeholder.hidden = true;
    this.el.hidden = false;
    const xs = [...this.steps.keys()].sort((a, b) => a - b);
    // For screen readers: the latest value of each line.
    const latest = this.keys.map((k) => {
      const step = xs.findLast((x) => this.steps.get(x)[k] !== undefined);
      return `${this.label(k)} ${number(this.steps.get(step)[k])} at step ${step}`;
    });
    this.canvas.setAttribute("aria-label", `${this.el.dataset.title}: ${latest.join(", ")}`);
    const data = [xs, ...this.keys.map((k) => xs.map((x) => this.steps.get(x)[k] ?? null))];
    if (this.plot && this.plot.series.length - 1 === this.keys.length) {
      this.plot.setData(data);
      return;
    }
    this.plot?.destroy();
    const width = Math.max(this.canvas.clientWidth || this.el.clientWidth, 240);
    this.plot = new uPlot({
      width, height: HEIGHT,
      // A flat line (a reward of 0 every step) gets a small range around it, not uPlot's 0 to 100.
      scales: { x: { time: false }, y: { range: yRange } },
      axes: [
        { label: "step", stroke: "currentColor", grid: { stroke: "rgba(128,128,128,.2)" } },
        { stroke: "currentColor", grid: { stroke: "rgba(128,128,128,.2)" }, size: 64,
          values: (_, ticks) => ticks.map(tick) },
      ],
      series: [
        { label: "step" },
        ...this.keys.map((k, i) => ({
          label: this.label(k), stroke: PALETTE[i % PALETTE.length], width: 2, spanGaps: true,
          points: { size: 5 }, value: (_, v) => number(v),
        })),
      ],
      legend: { live: true },
    }, data, this.canvas);
    if (!this.observer) {
      this.observer = new ResizeObserver(() => {
        const w = this.canvas.clientWidth;
        if (this.plot && w > 0 && Math.abs(w - this.plot.width) > 2) this.plot.setSize({ width: w, height: HEIGHT });
      });
      this.observer.observe(this.canvas);
    }
  }

  destroy() {
    this.observer?.disconnect();
    this.plot?.destroy();
  }
}

function yRange(_, min, max) {
  if (min === null || max === null) return [0, 1];
  if (min === max) return [min - (Math.abs(min) || 1) * 0.1, max + (Math.abs(max) || 1) * 0.1];
  return uPlot.rangeNum(min, max, 0.1, true);
}

// Axis ticks: short, and readable for a learning rate (5e-4, not 0.0005000).
function tick(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a < 1e-2 || a >= 1e5 ? v.toExponential(1).replace(".0e", "e") : number(v);
}

// The charts a job shows, by method; optional ones appear when their metrics do (a DPO job's rewards, graders run
// at a supervised job's evaluations).
export function chartsFor(method) {
  const loss = new MetricChart({
    title: "Loss", keys: ["train_loss", "valid_loss"], labels: { train_loss: "train", valid_loss: "validation" },
  });
  const lr = new MetricChart({ title: "Learning rate", keys: ["learning_rate"], labels: { learning_rate: "lr" } });
  const speed = new MetricChart({
    title: "Throughput (tokens/s)", keys: ["tokens_per_second"], labels: { tokens_per_second: "tokens/s" },
  });
  if (method === "reinforcement") {
    return [
      new MetricChart({
        title: "Reward", keys: ["train_reward_mean", "valid_reward_mean"],
        labels: { train_reward_mean: "train", valid_reward_mean: "validation" },
      }),
      new MetricChart({
        title: "Reward per grader", match: (k) => /^rewards\/.+\/mean$/.test(k),
        labels: (k) => k.slice("rewards/".length, -"/mean".length),
      }),
      new MetricChart({ title: "KL", keys: ["kl"] }),
      new MetricChart({
        title: "Completion length", keys: ["completions/mean_length"], labels: { "completions/mean_length": "mean" },
      }),
      loss, lr, speed,
    ];
  }
  const charts = [loss, lr, speed, new MetricChart({
    title: "Validation reward (eval graders)", optional: true,
    match: (k) => k === "valid_reward_mean" || /^eval_rewards\/.+\/mean$/.test(k),
    labels: (k) => (k === "valid_reward_mean" ? "mean" : k.slice("eval_rewards/".length, -"/mean".length)),
  })];
  if (method === "dpo") {
    charts.push(new MetricChart({
      title: "Preference rewards", keys: ["rewards/chosen", "rewards/rejected", "rewards/margin"], optional: true,
      labels: { "rewards/chosen": "chosen", "rewards/rejected": "rejected", "rewards/margin": "margin" },
    }));
  }
  return charts;
}

export function chartGrid(charts) {
  return replace(h("div", { class: "charts" }), charts.map((c) => c.el));
}
