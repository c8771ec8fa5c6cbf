"""The playground page in a real browser: headless Chromium (Debian's package) driven by Playwright,
against the real service under uvicorn. Screenshots go to pytest's temporary directory, or to
the directory named by CHARGEN_TEST_SCREENSHOTS (never into the working tree by default)."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, expect, sync_playwright

from tests.service_support import ServerThread, metric, wait_until

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS: list[Path] = []  # the screenshot directory, chosen by the `browser` fixture
# what a sandbox-less CI container needs, and nothing that would reach the network
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="no Chromium at /usr/bin/chromium (apt-get install chromium) to drive the playground page",
)


@pytest.fixture(scope="module")
def server(tiny_artifact: Path) -> Iterator[ServerThread]:
    # max_new_chars high so a stream can be stopped long before it would end
    with ServerThread(model=str(tiny_artifact), state_url="memory://", max_new_chars=100_000) as running:
        yield running


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    chosen = os.environ.get("CHARGEN_TEST_SCREENSHOTS")
    shots = Path(chosen) if chosen else tmp_path_factory.mktemp("screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    SHOTS[:] = [shots]
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def page(browser: Browser, server: ServerThread) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    # offline: anything not from the service itself is a bug in the page
    outside: list[str] = []
    page.on("request", lambda req: None if req.url.startswith(server.url) else outside.append(req.url))
    page.goto(server.url + "/")
    expect(page.locator("#model-info")).to_contain_text("2 layers \u00d7 32 units")
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
    assert not outside, f"the page asked for something outside the service: {outside}"


def shot(page: Page, name: str) -> None:
    page.screenshot(path=str(SHOTS[0] / f"{name}.png"), full_page=True)


def record_output_lengths(page: Page) -> None:
    """Log the output's length at every DOM change: each streamed piece is one change."""
    page.evaluate(
        """() => {
            window.lengths = [];
            const out = document.getElementById('output-text');
            new MutationObserver(() => window.lengths.push(out.textContent.length))
                .observe(out, {childList: true, subtree: true, characterData: true});
        }"""
    )


def streamed_so_far(page: Page) -> int:
    """Characters of the running request, from the status line "generating… N characters"."""
    found = re.search(r"generating… (\d+) characters", page.locator("#status").inner_text())
    return int(found.group(1)) if found else 0


def generated_text(page: Page) -> str:
    return "".join(page.locator("#output-text .generated").all_text_contents())


@contextlib.contextmanager
def hold_session(server: ServerThread, session_id: str) -> Iterator[None]:
    """Another client streaming from the session, reading slowly (a client that stops reading
    altogether is dropped by the server, which would free the session)."""
    streaming = threading.Event()
    done = threading.Event()

    def read() -> None:
        body = {"session_id": session_id, "max_new_chars": 100_000, "stream": True}
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", server.url + "/v1/generate", json=body) as response,
        ):
            assert response.status_code == 200, response.read()
            for _ in response.iter_lines():
                streaming.set()
                if done.wait(0.02):
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert streaming.wait(10), "the other client's stream did not start"
    try:
        yield
    finally:
        done.set()
        reader.join(10)


def wait_idle(page: Page) -> None:
    expect(page.locator("body")).to_have_attribute("data-generating", "false", timeout=30_000)


def set_sampling(page: Page, *, temperature: str, max_chars: str, seed: str = "") -> None:
    page.fill("#temperature", temperature)
    page.fill("#max-chars", max_chars)
    page.fill("#seed", seed)


def test_text_streams_in_increments_and_stop_ends_generation_on_the_server(page: Page, server: ServerThread) -> None:
    # the API key field: kept in sessionStorage and sent as a bearer token
    page.fill("#api-key", "sk-test-123")
    assert page.evaluate("sessionStorage.getItem('chargen.apiKey')") == "sk-test-123"
    sent_auth: list[str | None] = []
    page.on(
        "request",
        lambda req: sent_auth.append(req.headers.get("authorization")) if req.url.endswith("/v1/generate") else None,
    )

    page.fill("#prompt", "ROMEO:\n")
    set_sampling(page, temperature="0.8", max_chars="1500", seed="7")
    record_output_lengths(page)
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("done: 1500 characters (length)", timeout=30_000)
    wait_idle(page)
    lengths = page.evaluate("window.lengths")
    final = len("ROMEO:\n") + 1500
    partial = sorted({n for n in lengths if 0 < n < final})
    assert len(partial) >= 3, f"text did not arrive in increments: {lengths[:20]}"
    assert len(generated_text(page)) == 1500
    assert sent_auth and all(a == "Bearer sk-test-123" for a in sent_auth)
    # the same request and seed give the same text (what the API promises)
    with httpx.Client(timeout=30) as client:
        body = {"prompt": "ROMEO:\n", "max_new_chars": 1500, "temperature": 0.8, "seed": 7}
        assert client.post(server.url + "/v1/generate", json=body).json()["text"] == generated_text(page)
    shot(page, "01-generated")

    # Stop: a generation that would run for 100k characters, stopped after a few hundred
    with httpx.Client(timeout=10) as client:
        before = metric(client, server.url, "chargen_chars_generated_total")
        page.fill("#max-chars", "100000")
        page.click("#generate")
        # the page's own count of this request's characters (the previous text stays on the page
        # until the new response arrives, so its length says nothing yet)
        wait_until(lambda: streamed_so_far(page) > 300, timeout=30, what="streamed text")
        expect(page.locator("#stop")).to_be_enabled()
        page.click("#stop")
        expect(page.locator("#status")).to_contain_text("stopped after", timeout=10_000)
        wait_idle(page)
        shown = len(generated_text(page))
        assert 300 < shown < 100_000
        # the server stopped too: no stream is left, and no character is generated any more
        wait_until(
            lambda: metric(client, server.url, "chargen_engine_streams_running") == 0,
            timeout=10,
            what="the engine to drop the row",
        )
        settled = metric(client, server.url, "chargen_chars_generated_total")
        time.sleep(0.5)
        assert metric(client, server.url, "chargen_chars_generated_total") == settled
        # at most a stream window (64) plus what was in flight beyond what the page showed
        assert settled - before < shown + 1000
    expect(page.locator("#generate")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()
    shot(page, "02-stopped")


def test_sessions_continue_fork_delete_and_errors_are_shown(page: Page, server: ServerThread) -> None:
    page.click("#session-new")
    session_id = page.locator("#session-id")
    expect(session_id).to_have_text(re.compile(r"^[A-Za-z0-9_-]{32}$"), timeout=10_000)
    first_id = session_id.text_content()
    expect(page.locator("#use-session")).to_be_checked()
    expect(page.locator("#session-ttl")).to_have_text(re.compile(r"^(59|60):\d\d$"), timeout=10_000)  # 1 h TTL

    page.fill("#prompt", "JULIET:\n")
    set_sampling(page, temperature="0", max_chars="40")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("done: 40 characters", timeout=30_000)
    expect(page.locator("#session-chars")).to_have_text("48", timeout=10_000)
    first = generated_text(page)

    # continue: no prompt, the session carries the text on; the page appends to it
    page.fill("#prompt", "")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("done: 40 characters", timeout=30_000)
    expect(page.locator("#session-chars")).to_have_text("88", timeout=10_000)
    both = generated_text(page)
    assert both.startswith(first) and len(both) == 80
    # greedy: 40 then 40 in a session equals 80 in one request
    with httpx.Client(timeout=30) as client:
        body = {"prompt": "JULIET:\n", "max_new_chars": 80, "temperature": 0}
        assert client.post(server.url + "/v1/generate", json=body).json()["text"] == both
    shot(page, "03-session-continued")

    # 409: the session is busy with another client's stream; the page says so plainly
    with hold_session(server, first_id):
        page.click("#generate")
        error = page.locator("#error")
        expect(error).to_be_visible(timeout=10_000)
        expect(error).to_contain_text("HTTP 409")
        expect(error).to_contain_text("in use by another request")
        shot(page, "04-error-409")
    wait_idle(page)

    # fork: a new id with the same text so far; delete: back to no session
    wait_until(
        lambda: httpx.post(f"{server.url}/v1/sessions/{first_id}/fork", timeout=5).status_code == 201,
        timeout=10,
        what="the held session to be released",
    )
    page.click("#session-fork")
    wait_until(
        lambda: (session_id.text_content() or "") not in ("", first_id),
        timeout=10,
        what="the forked session id",
    )
    forked_id = session_id.text_content()
    info = httpx.get(f"{server.url}/v1/sessions/{forked_id}", timeout=5).json()
    assert info["chars_consumed"] >= 88
    page.click("#session-delete")
    expect(session_id).to_have_text("none")
    assert httpx.get(f"{server.url}/v1/sessions/{forked_id}", timeout=5).status_code == 404

    # 400: characters the model does not know
    page.fill("#prompt", "ROMEO: café")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("HTTP 400")
    expect(page.locator("#error")).to_contain_text("prompt: characters the model does not know: 'é'")
    shot(page, "05-error-400")


def test_continuing_a_session_sends_only_what_was_typed_since(page: Page, server: ServerThread) -> None:
    sent: list[dict[str, object]] = []
    page.on("request", lambda req: sent.append(req.post_data_json) if req.url.endswith("/v1/generate") else None)
    page.click("#session-new")
    expect(page.locator("#session-id")).to_have_text(re.compile(r"^[A-Za-z0-9_-]{32}$"), timeout=10_000)
    page.fill("#prompt", "JULIET:\n")
    set_sampling(page, temperature="0", max_chars="30")

    # a user presses Generate twice, touching nothing in between: the prompt is read once
    for consumed in ("38", "68"):
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("done: 30 characters", timeout=30_000)
        expect(page.locator("#session-chars")).to_have_text(consumed, timeout=10_000)
    assert [body["prompt"] for body in sent] == ["JULIET:\n", ""]
    expect(page.locator("#prompt")).to_have_value("")
    expect(page.locator("#prompt")).to_have_attribute("placeholder", re.compile("added to the session"))
    # the transcript is the prompt once, then only generated text: what one request makes greedily
    with httpx.Client(timeout=30) as client:
        body = {"prompt": "JULIET:\n", "max_new_chars": 60, "temperature": 0}
        greedy = client.post(server.url + "/v1/generate", json=body).json()["text"]
    assert page.locator("#output-text .prompt").all_text_contents() == ["JULIET:\n"]
    assert page.locator("#output-text").text_content() == "JULIET:\n" + greedy

    # text typed since is sent once, shown once, and continues the same text
    page.fill("#prompt", "ROMEO:")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("done: 30 characters", timeout=30_000)
    expect(page.locator("#session-chars")).to_have_text("104", timeout=10_000)
    assert [body["prompt"] for body in sent] == ["JULIET:\n", "", "ROMEO:"]
    assert page.locator("#output-text .prompt").all_text_contents() == ["JULIET:\n", "ROMEO:"]
    with httpx.Client(timeout=30) as client:
        body = {"prompt": "JULIET:\n" + greedy + "ROMEO:", "max_new_chars": 30, "temperature": 0}
        last = client.post(server.url + "/v1/generate", json=body).json()["text"]
    assert page.locator("#output-text").text_content() == "JULIET:\n" + greedy + "ROMEO:" + last
    shot(page, "03b-session-continued-twice")

    # without a session, Generate keeps the prompt for another try
    page.uncheck("#use-session")
    page.fill("#prompt", "KING:")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("done: 30 characters", timeout=30_000)
    expect(page.locator("#prompt")).to_have_value("KING:")


def span_colours(page: Page, selector: str) -> list[str]:
    return page.eval_on_selector_all(selector, "spans => spans.map(s => getComputedStyle(s).backgroundColor)")


def test_inspector_colours_text_by_surprisal_unit_and_pattern(page: Page, server: ServerThread) -> None:
    text = "ROMEO:\nthe night is fair, my lord,\n\nJULIET:\nsweet love, speak,\n"
    page.click("#inspector-toggle")
    expect(page.locator("#inspector-body")).to_be_visible()
    page.fill("#inspect-text", text)
    page.click("#inspect")
    chars = page.locator("#surprisal-view .ch")
    expect(chars).to_have_count(len(text), timeout=10_000)
    colours = span_colours(page, "#surprisal-view .ch")
    assert len(set(colours)) > 5, "surprisal colours do not vary"
    assert page.locator("#surprisal-view .ch").first.get_attribute("title").startswith("'R': ")
    expect(page.locator("#mean-surprisal")).to_contain_text("bits/char")

    # a chosen unit's cell values: another unit, other colours
    expect(page.locator("#unit-view .ch")).to_have_count(len(text))
    first_unit = span_colours(page, "#unit-view .ch")
    page.select_option("#unit-layer", "1")
    page.fill("#unit-index", "5")
    expect(page.locator("#unit-view")).to_have_attribute("data-unit", "5", timeout=10_000)
    expect(page.locator("#unit-view")).to_have_attribute("data-layer", "1")
    assert span_colours(page, "#unit-view .ch") != first_unit
    page.locator("#surprisal-view .ch").nth(8).hover()
    expect(page.locator("#char-details")).to_contain_text("the model expected")
    shot(page, "06-inspector")

    # the pattern finder: units ranked by correlation with speaker names, shown as coloured text
    page.fill("#pattern", "^[A-Z]+:")
    page.fill("#pattern-top", "4")
    page.click("#find-units")
    results = page.locator("#unit-results li")
    expect(results).to_have_count(4, timeout=10_000)
    expect(results.first).to_contain_text("r = ")
    expect(results.first.locator(".ch")).to_have_count(len(text))
    expect(results.first.locator(".ch.match")).to_have_count(len("ROMEO:") + len("JULIET:"))
    # the page shows what the API ranked
    with httpx.Client(timeout=30) as client:
        body = {"text": text, "pattern": "^[A-Z]+:", "top": 4}
        ranked = client.post(server.url + "/v1/inspect/units", json=body).json()["units"]
    first = ranked[0]
    expect(results.first).to_contain_text(f"layer {first['layer']}, unit {first['unit']}")
    results.first.get_by_role("button", name="Show in the cell view").click()
    expect(page.locator("#unit-view")).to_have_attribute("data-unit", str(first["unit"]), timeout=10_000)
    page.locator("#unit-results").scroll_into_view_if_needed()
    shot(page, "07-pattern-units")

    # a bad pattern is shown plainly
    page.fill("#pattern", "(")
    page.click("#find-units")
    expect(page.locator("#error")).to_contain_text("pattern: not a valid regular expression")


@pytest.fixture(scope="module")
def keyed_server(tiny_artifact: Path) -> Iterator[ServerThread]:
    with ServerThread(model=str(tiny_artifact), state_url="memory://", api_keys="sk-play-1") as running:
        yield running


def test_with_api_keys_on_the_page_sends_the_key_kept_in_session_storage(
    browser: Browser, keyed_server: ServerThread
) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(keyed_server.url + "/")  # the page itself needs no key; the API does
    expect(page.locator("#error")).to_contain_text("HTTP 401")
    expect(page.locator("#error")).to_contain_text("no API key")
    shot(page, "08-api-key-missing")

    page.fill("#api-key", "sk-play-1")
    page.locator("#api-key").press("Tab")  # change: the model info is fetched again, with the key
    expect(page.locator("#model-info")).to_contain_text("2 layers")
    expect(page.locator("#error")).to_be_hidden()
    page.click("#session-new")
    session_id = page.locator("#session-id")
    expect(session_id).to_have_text(re.compile(r"^[A-Za-z0-9_-]{32}$"), timeout=10_000)
    created = session_id.text_content()
    page.fill("#prompt", "KING:\n")
    set_sampling(page, temperature="0", max_chars="20")
    page.click("#generate")
    expect(page.locator("#status")).to_contain_text("done: 20 characters", timeout=30_000)
    expect(page.locator("#session-chars")).to_have_text("26", timeout=10_000)

    # a reload keeps the key and the session (both in this tab's sessionStorage)
    page.reload()
    expect(page.locator("#api-key")).to_have_value("sk-play-1")
    expect(session_id).to_have_text(created or "")
    expect(page.locator("#session-chars")).to_have_text("26", timeout=10_000)
    # the session belongs to the key: without it, the API answers as if it did not exist
    assert httpx.get(f"{keyed_server.url}/v1/sessions/{created}", timeout=5).status_code == 401

    page.fill("#api-key", "sk-wrong")
    page.click("#generate")
    expect(page.locator("#error")).to_contain_text("HTTP 401")
    expect(page.locator("#error")).to_contain_text("invalid API key")
    shot(page, "09-api-key-wrong")
    context.close()


def test_the_model_picker_runs_generations_sessions_and_inspections_on_the_picked_model(
    browser: Browser, tiny_artifact: Path, tmp_path: Path
) -> None:
    from service.artifact import load_model
    from tests.service_support import export_random_model, with_meta

    directory = tmp_path / "models"
    directory.mkdir()
    with_meta(tiny_artifact, directory / "tiny.pt", name="tiny")
    wide = export_random_model(tmp_path / "wide.pt", load_model(tiny_artifact).vocab, seed=2, layers=1, hidden=48)
    with_meta(wide, directory / "wide.pt", name="wide")
    with ServerThread(models_dir=directory, default_model="tiny") as srv, httpx.Client(timeout=30) as client:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(srv.url + "/")
        picker = page.locator("#model-picker")
        expect(page.locator("#model-info")).to_contain_text("2 layers \u00d7 32 units")
        expect(picker).to_have_value("tiny")
        assert picker.locator("option").all_inner_texts() == ["tiny", "wide"]
        picker.select_option("wide")
        expect(page.locator("#model-info")).to_contain_text("1 layers \u00d7 48 units")
        expect(page.locator("#unit-layer option")).to_have_count(1)  # the inspector follows the model

        page.fill("#max-chars", "25")
        page.click("#generate")
        expect(page.locator("#status")).to_contain_text("done", timeout=30_000)
        count = 'chargen_chars_generated_total{model="wide"}'
        assert metric(client, srv.url, count) == 25
        assert metric(client, srv.url, 'chargen_chars_generated_total{model="tiny"}') == 0

        page.click("#session-new")
        expect(page.locator("#session-id")).not_to_have_text("none")
        session = page.locator("#session-id").inner_text()
        assert client.get(f"{srv.url}/v1/sessions/{session}").json()["model"] == "wide"
        page.screenshot(path=str(SHOTS[0] / "model-picker.png"))
        context.close()
        assert not errors, f"JavaScript errors on the page: {errors}"
