import { api, enc } from "../api.js";
import { bytes, download, empty, errorBox, fill, h, number, replace, select, statusBadge, table, time } from "../dom.js";

// A file's validation report (the engine's, as the API returns it): counts, then every bad line with its number.
export function reportView(report, { status } = {}) {
  if (!report) return empty("No validation report for this file.");
  const counts = [
    report.format && `format ${report.format}`,
    `${number(report.n_lines)} lines`, `${number(report.n_examples)} examples`,
    report.n_tokens != null && `${number(report.n_tokens)} tokens`,
    report.n_truncated ? `${number(report.n_truncated)} truncated at ${number(report.max_seq_length)}` : null,
  ].filter(Boolean).join(" · ");
  const ok = report.ok ?? report.n_errors === 0;
  const errors = report.errors ?? [];
  return h("div", { class: `report ${ok ? "ok" : "bad"}`, "data-report": ok ? "ok" : "errors" },
    h("p", {}, h("strong", {}, ok ? "Valid" : `${number(report.n_errors)} invalid line${report.n_errors === 1 ? "" : "s"}`),
      status ? [" · ", statusBadge(status)] : null, " · ", counts),
    errors.length ? table([
      { label: "Line", cell: (e) => (e.line == null ? "file" : String(e.line)) },
      { label: "Code", cell: (e) => h("code", {}, e.code) },
      { label: "Message", cell: (e) => e.message },
    ], errors, { caption: report.errors_truncated ? `The first ${errors.length} of ${number(report.n_errors)}` : null,
      rowProps: (e) => ({ "data-line": e.line ?? "file" }) }) : null,
    !ok && !errors.length && report.error_counts
      ? h("p", {}, Object.entries(report.error_counts).map(([code, n]) => `${code}: ${n}`).join(", ")) : null);
}

export function render(view, _params, signal) {
  const purpose = select([["", "any purpose"], "fine-tune", "export", "fine-tune-results", "evals"], "",
    { id: "files-purpose", "aria-label": "Purpose" });
  const body = h("div", {});
  const detail = h("div", { id: "file-detail" });
  replace(view, h("div", { class: "page-head" }, h("h1", {}, "Files"), purpose), body, detail);

  const open = (file) => fill(detail, () => api(`/files/${enc(file.id)}`, { signal }), (f) => h("section", { class: "card" },
    h("h2", {}, f.filename), h("p", {}, h("code", {}, f.id), ` · ${f.purpose} · ${bytes(f.bytes)}`),
    f.status_details ? h("p", {}, f.status_details) : null,
    reportView(f.validation, { status: f.status })));

  const remove = async (file) => {
    if (!confirm(`Delete ${file.filename} (${file.id})?`)) return;
    try {
      await api(`/files/${enc(file.id)}`, { method: "DELETE", signal });
      load();
    } catch (e) { replace(detail, errorBox(e)); }
  };

  const load = () => fill(body, () => api(`/files${purpose.value ? `?purpose=${enc(purpose.value)}` : ""}`, { signal }),
    ({ data }) => (data.length ? table([
      { label: "File", cell: (f) => h("button", { type: "button", class: "link", onclick: () => open(f) }, f.filename) },
      { label: "Id", cell: (f) => h("code", {}, f.id) },
      { label: "Purpose", cell: (f) => f.purpose },
      { label: "Size", cell: (f) => bytes(f.bytes) },
      { label: "Status", cell: (f) => statusBadge(f.status) },
      { label: "Examples", cell: (f) => number(f.validation?.n_examples) },
      { label: "Errors", cell: (f) => number(f.validation?.n_errors) },
      { label: "Created", cell: (f) => time(f.created_at) },
      {
        label: "", cell: (f) => h("span", { class: "actions" },
          h("button", { type: "button", class: "small", onclick: () => downloadFile(f, detail, signal) }, "Download"),
          h("button", { type: "button", class: "small danger", onclick: () => remove(f) }, "Delete")),
      },
    ], data) : empty("No files.")));
  purpose.addEventListener("change", load);
  load();
}

export async function downloadFile(file, errorPlace, signal) {
  try {
    await download(await api(`/files/${enc(file.id)}/content`, { raw: true, signal }), file.filename);
  } catch (e) {
    if (e.name !== "AbortError") replace(errorPlace, errorBox(e));
  }
}
