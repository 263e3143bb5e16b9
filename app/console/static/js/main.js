// The shell: hash routes (`#/jobs/<id>`; nothing secret goes in them), the sign-in gate and the navigation. Each page
// module exports `render(view, params, signal)`; `signal` aborts when the user leaves the page (streams, timers).

import { onUnauthorized, session } from "./api.js";
import { h, replace } from "./dom.js";
import * as exportsPage from "./pages/exports.js";
import * as files from "./pages/files.js";
import * as job from "./pages/job.js";
import * as jobs from "./pages/jobs.js";
import * as keys from "./pages/keys.js";
import * as models from "./pages/models.js";
import * as newJob from "./pages/new-job.js";
import * as playground from "./pages/playground.js";
import * as signIn from "./pages/sign-in.js";

const ROUTES = [
  [/^\/jobs$/, jobs, "Jobs"],
  [/^\/jobs\/([^/]+)$/, job, "Job"],
  [/^\/new$/, newJob, "New job"],
  [/^\/playground$/, playground, "Playground"],
  [/^\/models$/, models, "Models"],
  [/^\/files$/, files, "Files"],
  [/^\/exports$/, exportsPage, "Exports"],
  [/^\/keys$/, keys, "Keys"],
];

const view = document.getElementById("view");
const nav = document.getElementById("nav");
const signOutButton = document.getElementById("signout");
let current = null;  // the page's AbortController

function parse(hash) {
  const [path, query = ""] = hash.replace(/^#/, "").split("?");
  return { path: path || "/jobs", query: new URLSearchParams(query) };
}

function route() {
  current?.abort();
  current = new AbortController();
  const { path, query } = parse(location.hash);
  const signedIn = Boolean(session.key());
  nav.hidden = signOutButton.hidden = !signedIn;
  if (!signedIn) {
    document.title = "Sign in · Unsloth console";
    signIn.render(view, { next: location.hash || "#/jobs" }, current.signal);
    return;
  }
  for (const a of nav.querySelectorAll("a")) {
    const here = path === a.hash.slice(1) || (a.hash === "#/jobs" && path.startsWith("/jobs/"));
    if (here) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const match = ROUTES.find(([re]) => re.test(path));
  if (!match) {
    replace(view, h("h1", {}, "Not found"), h("p", {}, "No page here. ", h("a", { href: "#/jobs" }, "Jobs")));
    return;
  }
  const [re, page, title] = match;
  const params = { args: path.match(re).slice(1).map(decodeURIComponent), query };
  document.title = `${title} · Unsloth console`;
  view.replaceChildren();
  page.render(view, params, current.signal);
  if (document.activeElement === document.body || !view.contains(document.activeElement)) view.focus();
}

onUnauthorized((error) => {
  session.signOut();
  sessionStorage.setItem("unsloth.signInMessage", error.message);
  route();
});

signOutButton.addEventListener("click", () => {
  session.signOut();
  location.hash = "#/jobs";
  route();
});

window.addEventListener("hashchange", route);
route();
