// The public /v1 API, as the SDK calls it: `Authorization: Bearer <key>`, JSON bodies, the error envelope's message.
// The key lives in sessionStorage (this tab, until it closes): never in a URL, never logged, never sent elsewhere.

const KEY = "unsloth.apiKey";

export const session = {
  key: () => sessionStorage.getItem(KEY),
  signIn: (key) => sessionStorage.setItem(KEY, key),
  signOut: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, error) {
    super(error?.message || `The server answered ${status}.`);
    this.name = "ApiError";
    this.status = status;
    this.code = error?.code ?? null;
    this.param = error?.param ?? null;
    this.type = error?.type ?? null;
  }
}

// Called with the error when the server refuses the key (401): the app signs out and shows the sign-in page.
let unauthorized = () => {};
export const onUnauthorized = (fn) => { unauthorized = fn; };

export async function api(path, { method = "GET", body, form, signal, raw = false, key = session.key() } = {}) {
  const headers = { Authorization: `Bearer ${key}` };
  let payload;
  if (form) payload = form;
  else if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    payload = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(`/v1${path}`, {
      method, headers, body: payload, signal, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer",
    });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, { message: `The server could not be reached (${e.message}).`, code: "network_error" });
  }
  if (!response.ok) {
    let envelope = null;
    try { envelope = await response.json(); } catch { /* not JSON: a proxy's page */ }
    const error = new ApiError(response.status, envelope?.error);
    if (response.status === 401 && key === session.key()) unauthorized(error);
    throw error;
  }
  if (raw) return response;
  return response.status === 204 ? null : response.json();
}

export const post = (path, body, opts = {}) => api(path, { ...opts, method: "POST", body });

// Server-sent events over fetch (EventSource cannot send the Authorization header): yields each event's parsed
// `data`, ends at `data: [DONE]` or when the server closes the stream. An `{"error": ...}` event is thrown.
export async function* events(path, opts = {}) {
  const response = await api(path, { ...opts, raw: true });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value.replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;  // a comment (keep-alive)
        if (data === "[DONE]") return;
        const parsed = JSON.parse(data);
        if (parsed?.error) throw new ApiError(response.status, parsed.error);
        yield parsed;
      }
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

// Every page of a list (`has_more` + `?after=<last id>`), up to `max` items.
export async function listAll(path, { max = 1000, limit = 100, signal } = {}) {
  const items = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`,
      { signal });
    items.push(...page.data);
    if (!page.has_more || !page.data.length || items.length >= max) return items;
    after = page.data[page.data.length - 1].id;
  }
}

export const enc = encodeURIComponent;
