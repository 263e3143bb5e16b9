"""The web console in a real browser: Debian's Chromium, driven by Playwright, against `unsloth serve` (the API and
a real training worker on SQLite, the tiny model linked in as a base model).

The tests run in order on one page, as a user would: sign in (by keyboard), upload a file with bad lines and read
their numbers, create a job from the form (dry run first) and watch its loss chart fill in until it succeeds, open a
checkpoint in the playground and read a streamed answer, compare two checkpoints side by side, try a grader and browse
a reinforcement job's reward charts and rollouts, pause and resume a longer job, export a fine-tune and download it,
the other pages at laptop and phone widths (and one in dark mode), and make an API key on the Keys page, sign in with
it in a second browser context and revoke it. Every page is screenshotted into test-artifacts/console/ (printed). The
last test checks what the browser asked for: the console's own files and operations of the public /v1 API (as its
OpenAPI document lists them), each with the key as a Bearer token and never in a URL, and nothing refused by the
Content-Security-Policy.

Chromium comes from `apt-get install chromium` (Playwright cannot download its own here); without it these tests
are skipped.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Page, Request, expect, sync_playwright

from tests.e2e.commands import SERVE
from tests.e2e.conftest import (
    REPO,
    TINY,
    Stack,
    all_events,
    create_job,
    free_port,
    jsonl,
    link_tiny,
    service_env,
    upload_facts,
)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
SHOTS = REPO / "test-artifacts" / "console"

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's Chromium at /usr/bin/chromium "
                                                              "(apt-get install chromium)")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_base: Path) -> Iterator[Stack]:
    """`unsloth serve` (API + worker) on a fresh data dir with the tiny model as its default base model (so nothing
    is imported), metrics every step, the events stream polling every 0.1 s."""
    data_dir = tmp_path_factory.mktemp("console-data")
    link_tiny(data_dir, tiny_base)
    port = free_port()
    stack = Stack("console", service_env(data_dir, port, UNSLOTH_DEFAULT_MODEL=TINY), data_dir,
                  f"http://127.0.0.1:{port}", "", tmp_path_factory.mktemp("console-logs"))
    serve = stack.start("serve", SERVE)
    try:
        banner: str = stack.wait(lambda: serve.log.read_text() if "unsloth: ready:" in serve.log.read_text() else None,
                                 120, "unsloth serve to print its banner", interval=0.25)
        assert f"unsloth: console: {stack.base_url}/" in banner, banner
        stack.key = (data_dir / "api_key").read_text().strip()
        yield stack
    finally:
        serve.stop(timeout=60)


@dataclass
class Browser:
    page: Page
    base_url: str
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)  # method, url, headers
    problems: list[str] = field(default_factory=list)  # page errors, CSP refusals
    state: dict[str, Any] = field(default_factory=dict)  # what one test leaves for the next

    def shot(self, name: str) -> None:
        self.page.evaluate("window.scrollTo(0, 0)")  # the sticky header at the top of the full-page picture
        self.page.screenshot(path=SHOTS / f"{name}.png", full_page=True)

    def go(self, route: str) -> None:
        self.page.goto(f"{self.base_url}/#/{route}")


@pytest.fixture(scope="module")
def browser(server: Stack) -> Iterator[Browser]:
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    print(f"\nconsole screenshots: {SHOTS}")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = chromium.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
        context.set_default_timeout(30_000)
        page = context.new_page()
        b = Browser(page, server.base_url)

        def on_request(request: Request) -> None:
            b.requests.append((request.method, request.url, request.headers))

        page.on("request", on_request)
        page.on("pageerror", lambda e: b.problems.append(f"page error: {e}"))
        page.on("console", lambda m: b.problems.append(f"console: {m.text}")
                if m.type == "error" and "Failed to load resource" not in m.text else None)
        try:
            yield b
        finally:
            context.close()
            chromium.close()


def points(b: Browser, title: str) -> int:
    return int(b.page.locator(f'figure.chart[data-title="{title}"]').get_attribute("data-points") or 0)


def record_points(b: Browser, title: str) -> None:
    """Every value the chart's point count takes, in the page (window.pointLog), as the chart updates."""
    b.page.wait_for_selector(f'figure.chart[data-title="{title}"]')
    b.page.evaluate("""title => {
        const chart = document.querySelector(`figure.chart[data-title="${title}"]`);
        window.pointLog = [Number(chart.dataset.points)];
        new MutationObserver(() => window.pointLog.push(Number(chart.dataset.points)))
            .observe(chart, {attributes: true, attributeFilter: ["data-points"]});
    }""", title)


# ---- the tests, in order ----


def test_sign_in(browser: Browser, server: Stack) -> None:
    b, page = browser, browser.page
    response = page.goto(f"{b.base_url}/")
    assert response is not None and response.ok
    headers = response.headers
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert "'unsafe-inline'" not in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"
    expect(page.locator("#api-key")).to_be_focused()
    b.shot("01-sign-in")
    page.keyboard.type("sk-not-a-key")
    page.keyboard.press("Enter")
    expect(page.locator(".error")).to_contain_text("Incorrect API key provided.")  # the envelope's message
    b.shot("02-sign-in-refused")
    page.fill("#api-key", server.key)
    page.keyboard.press("Enter")
    expect(page.locator("h1")).to_have_text("Fine-tuning jobs")
    expect(page.locator(".state.empty")).to_have_text("No fine-tuning jobs yet.")
    assert page.evaluate("sessionStorage.getItem('unsloth.apiKey')") == server.key
    assert page.evaluate("localStorage.length") == 0 and server.key not in page.url
    b.shot("03-jobs-empty")


def test_upload_shows_bad_lines_with_their_numbers(browser: Browser) -> None:
    b, page = browser, browser.page
    b.go("new")
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    lines = [json.dumps(good), "{not json", json.dumps(good), json.dumps({"messages": [{"role": "user"}]}),
             json.dumps(good)]
    page.set_input_files("#upload", files=[{"name": "bad.jsonl", "mimeType": "application/jsonl",
                                            "buffer": ("\n".join(lines) + "\n").encode()}])
    page.click("#upload-button")
    report = page.locator('#upload-report [data-report="errors"]')
    expect(report).to_contain_text("2 invalid lines")
    assert report.locator("tr[data-line]").evaluate_all("rows => rows.map(r => r.dataset.line)") == ["2", "4"]
    b.shot("04-upload-bad-lines")


def sums(numbers: range) -> bytes:
    return jsonl([{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in numbers])


def test_create_a_job_and_watch_its_loss_chart_fill_in(browser: Browser, server: Stack) -> None:
    b, page = browser, browser.page
    page.set_input_files("#upload", files=[{"name": "sums-valid.jsonl", "mimeType": "application/jsonl",
                                            "buffer": sums(range(200, 204))}])
    page.click("#upload-button")
    expect(page.locator('#upload-report [data-report="ok"]')).to_contain_text("4 examples")
    validation = page.input_value("#training-file")
    page.set_input_files("#upload", files=[{"name": "sums.jsonl", "mimeType": "application/jsonl",
                                            "buffer": sums(range(120))}])
    page.click("#upload-button")
    expect(page.locator('#upload-report [data-report="ok"]')).to_contain_text("120 examples")
    expect(page.locator("#training-file")).not_to_have_value(validation)  # the new file, chosen
    page.select_option("#validation-file", validation)
    page.select_option("#model", TINY)
    for name, value in {"n_epochs": "1", "batch_size": "1", "learning_rate": "0.005", "lora_r": "4",
                        "n_checkpoints": "3", "max_seq_length": "128"}.items():
        page.fill(f"#hp-{name}", value)
    page.fill("#suffix", "console")
    page.fill("#seed", "7")  # the same weights every run: the playground tests read their answers
    page.click("#validate")
    expect(page.locator('#dry-run [data-valid="true"]')).to_be_visible()
    expect(page.locator('#dry-run [data-fact="Estimated steps"]')).to_have_text("120")
    expect(page.locator('[data-resolved="lora_alpha"]')).to_contain_text("→")  # auto, resolved
    b.shot("05-new-job-dry-run")

    page.click("#create")
    page.wait_for_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[1]
    b.state["job"] = job_id
    record_points(b, "Loss")
    expect(page.locator(".page-head .badge").first).to_have_text("succeeded", timeout=90_000)
    # 120 training losses and a validation loss at each evaluation, as the metrics events hold them
    evaluations = sum(1 for e in all_events(server.client(), job_id)
                      if e.type == "metrics" and "valid_loss" in (e.data or {}) and "checkpoint" not in e.data)
    assert evaluations >= 3
    total = b.state["loss_points"] = 120 + evaluations
    expect(page.locator('figure.chart[data-title="Loss"]')).to_have_attribute("data-points", str(total))
    seen = page.evaluate("window.pointLog")
    # The chart grew as the metrics events arrived, not in one go at the end.
    assert len({n for n in seen if 0 < n < total}) >= 3, seen
    assert seen == sorted(seen), seen
    assert points(b, "Learning rate") == 120 and points(b, "Throughput (tokens/s)") == 120
    expect(page.locator("ol.events li").first).to_contain_text("successfully completed")
    expect(page.locator("a[data-checkpoint]")).to_have_count(3)
    page.wait_for_timeout(300)  # the last chart frame
    b.shot("06-job-succeeded")


def test_open_a_checkpoint_in_the_playground(browser: Browser) -> None:
    b, page = browser, browser.page
    link = page.locator("a[data-checkpoint]").last  # the lowest step
    checkpoint = link.get_attribute("data-checkpoint")
    assert checkpoint and checkpoint.endswith(":ckpt-step-40"), checkpoint
    link.click()
    expect(page.locator("h1")).to_have_text("Playground")
    expect(page.locator("#model-a")).to_have_value(checkpoint)
    page.fill("#knob-temperature", "0")
    page.fill("#knob-max_tokens", "12")
    page.fill("#prompt", "What is 3 plus 3?")
    page.keyboard.press("Control+Enter")
    reply = page.locator("li.msg.assistant").first
    expect(reply).to_have_attribute("data-done", "true")
    assert int(reply.get_attribute("data-tokens") or 0) > 0
    assert int(reply.get_attribute("data-chunks") or 0) >= 2  # streamed, piece by piece
    assert not reply.locator(".error").count()
    b.shot("07-playground-checkpoint")


def test_compare_two_checkpoints_side_by_side(browser: Browser) -> None:
    b, page = browser, browser.page
    b.go(f"jobs/{b.state['job']}")
    boxes = page.locator('input[type="checkbox"][aria-label^="Select step"]')
    expect(boxes).to_have_count(3)
    boxes.nth(0).check()
    boxes.nth(2).check()
    side = page.locator("#compare-samples")  # the probe prompts' greedy answers, step 120 beside step 40
    expect(side.locator("thead th")).to_have_text(["Prompt", "Step 120", "Step 40"])
    expect(side.locator("tbody tr")).to_have_count(3)  # the first 3 validation prompts
    expect(side.locator("tbody tr").first).to_contain_text("What is 200 plus 200?")
    b.shot("08-checkpoint-samples")
    page.click("#compare-checkpoints")
    expect(page.locator("section.pane")).to_have_count(2)
    a, c = page.input_value("#model-a"), page.input_value("#model-b")
    assert a != c and {a[-13:], c[-13:]} == {"ckpt-step-120", ":ckpt-step-40"}, (a, c)
    page.fill("#knob-temperature", "0")
    page.fill("#knob-max_tokens", "12")
    page.fill("#prompt", "What is 7 plus 7?")
    page.click("#send")
    for pane in (0, 1):
        reply = page.locator(f'section.pane[data-pane="{pane}"] li.msg.assistant')
        expect(reply).to_have_attribute("data-done", "true")
        assert int(reply.get_attribute("data-tokens") or 0) > 0
    b.shot("08b-playground-compare")


STARTS_WITH_A = {"type": "string_check", "name": "starts_with_a", "input": "{{sample.output_text}}",
                 "reference": "{{item.opening}}", "operation": "like"}


def test_reinforcement_grader_charts_and_rollouts(browser: Browser, server: Stack) -> None:
    b, page = browser, browser.page
    b.go("new")
    page.select_option("#method", "reinforcement")
    expect(page.locator("#hp-num_generations")).to_be_visible()
    page.fill("#grader", json.dumps(STARTS_WITH_A, indent=2))
    page.fill("#grader-sample", "A cat sat on the mat.")
    page.fill("#grader-item", '{"opening": "A "}')
    page.click("#try-grader")
    expect(page.locator("#grader-result")).to_contain_text("reward 1")
    page.fill("#grader-sample", "The cat sat.")
    page.click("#try-grader")
    expect(page.locator("#grader-result")).to_contain_text("reward 0")
    b.shot("09-new-job-grader")

    client = server.client()
    rows = [{"messages": [{"role": "user", "content": f"Write one short sentence about {t}."}], "opening": "A "}
            for t in ("the sea", "a cat", "rain", "the moon", "a tree", "coffee", "a train", "winter")]
    file_id = client.files.create(file=("rl.jsonl", jsonl(rows)), purpose="fine-tune").id
    hp = {"n_epochs": 2, "batch_size": 2, "num_generations": 4, "max_completion_length": 6, "beta": 0.04,
          "learning_rate": 3e-4, "n_checkpoints": 2, "max_seq_length": 128, "eval_samples": 4}
    job = client.fine_tuning.jobs.create(model=TINY, training_file=file_id, validation_file=file_id, seed=3,
                                         method={"type": "reinforcement", "reinforcement": {  # type: ignore[typeddict-item]
                                             "grader": STARTS_WITH_A, "hyperparameters": hp}})
    b.go(f"jobs/{job.id}")
    expect(page.locator(".page-head .badge").first).to_have_text("succeeded", timeout=90_000)
    for title in ("Reward", "Reward per grader", "KL", "Completion length"):
        page.wait_for_function(f"() => Number(document.querySelector('figure.chart[data-title=\"{title}\"]')"
                               f".dataset.points) >= 8")
    steps = page.locator("#rollout-step option")
    expect(steps.first).to_have_text("step 8", timeout=10_000)
    expect(page.locator("article.rollout")).to_have_count(2)  # batch_size prompts a step
    expect(page.locator("article.rollout").first.locator("tbody tr")).to_have_count(4)  # num_generations each
    page.click('button[aria-label="Older step"]')
    expect(page.locator("#rollout-step")).to_have_value("7")
    expect(page.locator("article.rollout")).to_have_count(2)
    page.wait_for_timeout(300)
    b.shot("10-reinforcement-job")


def test_pause_and_resume(browser: Browser, server: Stack) -> None:
    b, page = browser, browser.page
    client = server.client()
    job_id = create_job(client, upload_facts(client, 3000), batch_size=1, n_checkpoints=2)  # long enough to pause
    b.go(f"jobs/{job_id}")
    expect(page.locator(".page-head .badge").first).to_have_text("running", timeout=60_000)
    page.wait_for_function("() => Number(document.querySelector('figure.chart[data-title=\"Loss\"]').dataset.points)"
                           " >= 5")
    page.click('button[data-action="pause"]')
    expect(page.locator(".page-head .badge").first).to_have_text("paused", timeout=60_000)
    expect(page.locator('button[data-action="resume"]')).to_be_enabled()
    paused_at = points(b, "Loss")
    b.shot("11-job-paused")
    page.click('button[data-action="resume"]')
    page.wait_for_function(f"() => Number(document.querySelector('figure.chart[data-title=\"Loss\"]').dataset.points)"
                           f" > {paused_at + 5}", timeout=60_000)
    expect(page.locator(".page-head .badge").first).to_have_text("running")
    expect(page.locator("ol.events")).to_contain_text("resumed")
    b.shot("12-job-resumed")
    page.click('button[data-action="cancel"]')
    expect(page.locator(".page-head .badge").first).to_have_text("cancelled", timeout=60_000)


def test_models_files_exports_and_keys(browser: Browser) -> None:
    b, page = browser, browser.page
    b.go("models")
    fine_tune = f"ft:{TINY}:console:{b.state['job']}"
    base = page.locator(f'li[data-model="{TINY}"]')
    expect(base.locator(f'li[data-model="{fine_tune}"]')).to_be_visible()  # lineage: the fine-tune under its base
    expect(base.locator(f'li[data-model="{fine_tune}:ckpt-step-40"]')).to_be_visible()
    b.shot("13-models")
    row = page.locator(f'li[data-model="{fine_tune}"] > .model-row')
    row.locator("select").first.select_option("peft")
    row.locator("button", has_text="Export").click()
    expect(page.locator(".form-status")).to_contain_text("queued")

    b.go("exports")
    expect(page.locator("td .badge")).to_have_text("succeeded", timeout=60_000)
    with page.expect_download() as download:
        page.locator("td button", has_text="Download").first.click()
    assert download.value.suggested_filename.endswith("-peft.tar")
    b.shot("14-exports")

    b.go("files")
    # the uploads, and the export's file
    for name in ("bad.jsonl", "sums.jsonl", "sums-valid.jsonl", "rl.jsonl", "facts.jsonl", "-peft.tar"):
        expect(page.locator("tbody tr", has_text=name)).to_have_count(1)
    page.locator("button.link", has_text="bad.jsonl").click()
    expect(page.locator('#file-detail tr[data-line="4"]')).to_be_visible()
    b.shot("15-files")

    b.go("jobs")
    expect(page.locator("tbody tr")).to_have_count(3)
    page.select_option("#filter-status", "cancelled")
    expect(page.locator("tbody tr")).to_have_count(1)
    page.select_option("#filter-status", "")
    b.shot("17-jobs")

    page.set_viewport_size({"width": 390, "height": 844})  # a phone
    for route, name in (("jobs", "18-phone-jobs"), (f"jobs/{b.state['job']}", "19-phone-job"),
                        ("playground", "20-phone-playground")):
        b.go(route)
        page.wait_for_load_state("networkidle") if route == "jobs" else page.wait_for_timeout(1500)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), route
        b.shot(name)
    page.set_viewport_size({"width": 1280, "height": 860})
    page.emulate_media(color_scheme="dark")
    b.go(f"jobs/{b.state['job']}")
    expect(page.locator('figure.chart[data-title="Loss"]')).to_have_attribute("data-points",
                                                                               str(b.state["loss_points"]))
    page.wait_for_timeout(300)
    b.shot("21-dark-job")
    page.emulate_media(color_scheme="light")


def test_keys_create_one_sign_in_with_it_and_revoke_it(browser: Browser) -> None:
    """The Keys page with the embedded admin key: create a key (its secret shown once, copied), sign in with it in
    another browser context (not an admin: the page says who manages keys), revoke it here (after a confirm), and
    the other context is signed out on its next request."""
    b, page = browser, browser.page
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=b.base_url)
    b.go("keys")
    signed_in = page.locator("tr[data-current]")
    expect(signed_in).to_have_count(1)
    expect(signed_in.locator("button", has_text="Revoke")).to_be_disabled()  # a key cannot revoke itself
    page.fill("#key-name", "console e2e")
    page.click("#key-create button[type=submit]")
    secret = page.locator("#new-key-value")
    expect(secret).to_have_text(re.compile(r"^sk-unsloth-\S{40,}$"))
    value = secret.inner_text()
    expect(page.locator("#new-key")).to_contain_text("it will not be shown again")
    page.locator("#new-key button", has_text="Copy").click()
    expect(page.locator("#new-key button", has_text="Copied")).to_be_visible()
    assert page.evaluate("navigator.clipboard.readText()") == value
    row = page.locator("tbody tr", has_text="console e2e")
    expect(row).to_contain_text(value[:17] + "...")
    expect(row).to_contain_text("never")  # not used yet
    assert value not in page.url and value not in page.evaluate("JSON.stringify(sessionStorage)")
    b.shot("16-keys")

    other = page.context.browser.new_context(viewport={"width": 1280, "height": 860})  # type: ignore[union-attr]
    try:
        them = other.new_page()
        them.on("pageerror", lambda e: b.problems.append(f"page error (second context): {e}"))
        them.goto(f"{b.base_url}/#/keys")
        them.fill("#api-key", value)
        them.keyboard.press("Enter")
        expect(them.locator("h1")).to_have_text("API keys")
        expect(them.locator("#keys-not-admin")).to_contain_text("API keys are managed by an admin.")
        expect(them.locator("#key-create")).to_have_count(0)
        them.screenshot(path=SHOTS / "16b-keys-not-admin.png", full_page=True)

        page.once("dialog", lambda d: d.dismiss())  # cancelled: nothing happens
        row.locator("button", has_text="Revoke").click()
        expect(row).to_have_count(1)
        page.reload()  # the secret is gone from the page, and the key shows its use
        expect(page.locator("#new-key")).to_have_count(0)
        expect(row.locator('td[data-label="Last used"]')).not_to_have_text("never")
        page.once("dialog", lambda d: d.accept())
        row.locator("button", has_text="Revoke").click()
        expect(page.locator(".form-status")).to_contain_text("Revoked console e2e")
        expect(row).to_have_count(0)

        them.goto(f"{b.base_url}/#/jobs")  # their next request: refused, so signed out
        expect(them.locator("#api-key")).to_be_visible()
        expect(them.locator(".error")).to_contain_text("Incorrect API key provided.")
        assert them.evaluate("sessionStorage.getItem('unsloth.apiKey')") is None
    finally:
        other.close()


def test_the_console_only_calls_the_public_api(browser: Browser, server: Stack) -> None:
    with urllib.request.urlopen(f"{server.base_url}/openapi.json", timeout=10) as r:
        spec = json.load(r)
    operations = [(method.upper(), re.compile("^" + re.sub(r"\{[^}]+\}", "[^/]+", path) + "$"))
                  for path, item in spec["paths"].items() if path.startswith("/v1/") for method in item]
    origin = urlsplit(server.base_url)
    assert browser.requests
    used = set()
    for method, url, headers in browser.requests:
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob"):
            continue
        assert (parts.scheme, parts.netloc) == (origin.scheme, origin.netloc), url  # nothing third-party
        assert server.key not in url
        if parts.path.startswith("/v1/"):
            assert any(m == method and p.match(parts.path) for m, p in operations), (method, parts.path)
            assert headers.get("authorization", "").startswith("Bearer "), (method, url)
            used.add(f"{method} {parts.path.split('/')[2]}")
        else:
            assert method == "GET" and (parts.path == "/" or parts.path.startswith("/console/")), (method, url)
    assert {"POST files", "POST fine_tuning", "GET fine_tuning", "GET models", "POST chat", "GET exports",
            "POST organization", "DELETE organization"} <= used
    assert not browser.problems, browser.problems

