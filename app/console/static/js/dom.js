// DOM helpers. Everything the API returns (file names, model output, messages) becomes text nodes, never HTML.

export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(props ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2).toLowerCase(), value);
    else if (name === "class") el.className = value;
    else if (name === "text") el.textContent = value;
    else if (name === "dataset") Object.assign(el.dataset, value);
    else if (name in el && typeof value !== "string") el[name] = value;  // value, checked, disabled, ...
    else el.setAttribute(name, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replace(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

// ---- states ----

export const loading = (what = "Loading") => h("p", { class: "state loading", role: "status" }, `${what}…`);
export const empty = (text) => h("p", { class: "state empty" }, text);

export function errorBox(error) {
  const message = error?.message || String(error);
  const extra = [error?.code, error?.param && `param: ${error.param}`].filter(Boolean).join(" · ");
  return h("div", { class: "error", role: "alert" }, h("strong", {}, message), extra ? h("small", {}, extra) : null);
}

// A section's body that shows loading, then the content or the API's message.
export async function fill(el, load, render) {
  replace(el, loading());
  try {
    replace(el, render(await load()));
  } catch (e) {
    if (e.name === "AbortError") return;
    replace(el, errorBox(e));
  }
}

// ---- formats ----

export function time(unix) {
  if (!unix) return "—";
  return new Date(unix * 1000).toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" });
}

export function relative(unix) {
  if (!unix) return "—";
  const s = Math.round(unix - Date.now() / 1000);
  const abs = Math.abs(s);
  const [n, unit] = abs < 60 ? [s, "second"] : abs < 3600 ? [s / 60, "minute"] : abs < 86400 ? [s / 3600, "hour"]
    : [s / 86400, "day"];
  return new Intl.RelativeTimeFormat(undefined, { numeric: "auto" }).format(Math.round(n), unit);
}

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i && n < 10 ? 1 : 0)} ${units[i]}`;
}

export function number(v) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v)) return v.toLocaleString();
  const a = Math.abs(v);
  return a !== 0 && (a < 1e-3 || a >= 1e6) ? v.toExponential(3) : v.toPrecision(4).replace(/\.?0+$/, "");
}

export const statusBadge = (status) => h("span", { class: `badge s-${status}` }, status.replace("_", " "));

export function table(columns, rows, { caption, rowProps } = {}) {
  return h("div", { class: "table-wrap" }, h("table", {},
    caption ? h("caption", {}, caption) : null,
    h("thead", {}, h("tr", {}, columns.map((c) => h("th", { scope: "col" }, c.label)))),
    h("tbody", {}, rows.map((row) => h("tr", rowProps?.(row) ?? {},
      columns.map((c) => h("td", { "data-label": c.label }, c.cell(row))))))));
}

export function field(label, control, hint) {
  const id = control.id || (control.id = `f-${Math.random().toString(36).slice(2, 9)}`);
  return h("div", { class: "field" }, h("label", { for: id }, label), control, hint ? h("small", {}, hint) : null);
}

export function select(options, value, props = {}) {
  return h("select", props, options.map((o) => {
    const [v, label] = Array.isArray(o) ? o : [o, o];
    return h("option", { value: v, selected: v === value }, label);
  }));
}

export function copyButton(text, label = "Copy") {
  return h("button", {
    type: "button", class: "quiet small", title: `Copy ${text}`,
    onclick: async (e) => {
      await navigator.clipboard?.writeText(text).catch(() => {});
      e.target.textContent = "Copied";
      setTimeout(() => { e.target.textContent = label; }, 1200);
    },
  }, label);
}

// Save a Response's body as a download (the API needs the key in a header, so no plain link can fetch it).
export async function download(response, filename) {
  const url = URL.createObjectURL(await response.blob());
  const a = h("a", { href: url, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
