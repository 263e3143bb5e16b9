import { api } from "../api.js";
import { empty, errorBox, field, h, loading, relative, replace, select, statusBadge, table, time } from "../dom.js";

const ACTIVE = ["validating_files", "queued", "running"];
const STATUSES = ["", "validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];
const REFRESH_MS = 4000;

export const methodOf = (job) => job.method?.type ?? "supervised";

export function progressBar(job) {
  const p = job.progress;
  if (!p?.total_steps) return "—";
  const done = job.status === "succeeded" ? p.total_steps : Math.min(p.step ?? 0, p.total_steps);
  const bar = h("progress", { max: p.total_steps, value: done, "aria-label": `step ${done} of ${p.total_steps}` });
  return h("span", { class: "progress" }, bar, ` ${done}/${p.total_steps}`);
}

export function render(view, _params, signal) {
  const status = select(STATUSES.map((s) => [s, s ? s.replace("_", " ") : "any"]), "", { id: "filter-status" });
  const method = select([["", "any"], "supervised", "dpo", "reinforcement"], "", { id: "filter-method" });
  const text = h("input", { id: "filter-text", type: "search", placeholder: "id, model, suffix" });
  const meta = h("input", { id: "filter-meta", type: "search", placeholder: "key=value" });
  const body = h("div", {}, loading("Loading jobs"));
  const more = h("button", { type: "button", class: "quiet", hidden: true }, "Load more");
  let jobs = [];
  let hasMore = false;

  replace(view,
    h("div", { class: "page-head" }, h("h1", {}, "Fine-tuning jobs"), h("a", { class: "button primary", href: "#/new" },
      "New job")),
    h("form", { class: "filters", role: "search", onsubmit: (e) => e.preventDefault() },
      field("Status", status), field("Method", method), field("Search", text),
      field("Metadata", meta, "server-side filter")),
    body, more);

  const shown = () => {
    const q = text.value.trim().toLowerCase();
    return jobs.filter((j) => (!status.value || j.status === status.value)
      && (!method.value || methodOf(j) === method.value)
      && (!q || [j.id, j.model, j.suffix, j.fine_tuned_model].some((v) => v?.toLowerCase().includes(q))));
  };

  const draw = () => {
    const rows = shown();
    if (!jobs.length) {
      replace(body, empty("No fine-tuning jobs yet."), h("p", {}, h("a", { href: "#/new" }, "Create one")));
      return;
    }
    if (!rows.length) {
      replace(body, empty("No job matches these filters."));
      return;
    }
    replace(body, table([
      { label: "Job", cell: (j) => h("a", { href: `#/jobs/${encodeURIComponent(j.id)}` }, j.suffix ? `${j.id} (${j.suffix})` : j.id) },
      { label: "Status", cell: (j) => statusBadge(j.status) },
      { label: "Model", cell: (j) => j.model },
      { label: "Method", cell: methodOf },
      { label: "Created", cell: (j) => time(j.created_at) },
      { label: "Progress", cell: progressBar },
      { label: "Estimated finish", cell: (j) => (j.estimated_finish ? relative(j.estimated_finish) : "—") },
    ], rows, { rowProps: (j) => ({ "data-job": j.id }) }));
  };

  const metaQuery = () => {
    const [k, ...v] = meta.value.split("=");
    return k.trim() && v.length ? `&metadata[${encodeURIComponent(k.trim())}]=${encodeURIComponent(v.join("=").trim())}` : "";
  };

  let timer = null;
  const load = async (append = false) => {
    clearTimeout(timer);
    try {
      const after = append && jobs.length ? `&after=${encodeURIComponent(jobs[jobs.length - 1].id)}` : "";
      // A refresh asks for as many as are shown (up to a page of 100), so "Load more" is not undone by it.
      const limit = append ? 50 : Math.min(100, Math.max(50, jobs.length));
      const page = await api(`/fine_tuning/jobs?limit=${limit}${after}${metaQuery()}`, { signal });
      jobs = append ? [...jobs, ...page.data] : page.data;
      hasMore = page.has_more;
      more.hidden = !hasMore;
      draw();
    } catch (e) {
      if (e.name === "AbortError") return;
      replace(body, errorBox(e));
    }
    // While a job is moving, keep the list fresh (only the first page: older jobs have settled).
    if (!append && !signal.aborted && jobs.some((j) => ACTIVE.includes(j.status) || j.stop_requested)) {
      timer = setTimeout(() => { if (!document.hidden) load(); else timer = setTimeout(load, REFRESH_MS); }, REFRESH_MS);
    }
  };
  signal.addEventListener("abort", () => clearTimeout(timer));

  for (const control of [status, method]) control.addEventListener("change", draw);
  text.addEventListener("input", draw);
  meta.addEventListener("change", () => load());
  more.addEventListener("click", () => load(true));
  load();
}
