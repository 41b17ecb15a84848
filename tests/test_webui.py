"""The chat page `herd serve` answers at `/` (herd/serve/webui.py, herd/serve/static), in a real browser: Playwright
driving Debian's Chromium (`apt-get install -y chromium`; Playwright's own browser download is never used) against
live `herd serve` processes, the default model where answers matter and tiny random models for the API-key and image
flows. Where the page must show text that no model here would write (HTML and script in an answer, a 429, a guard's
content_filter, long lines on a phone), Playwright's page.route answers /v1/chat/completions with a made-up event
stream in the server's shape: what is under test is how the page treats what the server streams.

Skipped, with the reason, where playwright or chromium is missing; .ci/run installs both."""
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

from test_server import KEY, LiveServer            # noqa: E402  (after the skips: it starts nothing)
from tiny_chat import write_tiny_chat_model, write_tiny_vision_model   # noqa: E402

import herd                                          # noqa: E402
from herd.serve import webui                        # noqa: E402

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ANSWER_S = 180           # the default model on a shared 2-core machine
FRANCE = "What is the capital of France? Answer in one short sentence."
ITALY = "What is the capital of Italy? Answer in one short sentence."
SQUARE = "Write a Python function that returns the square of a number."
STATS = re.compile(r"^TTFT \d+\.\d\d s · \d+\.\d tokens/s · \d+ prompt \+ \d+ completion tokens$")


@pytest.fixture(scope="module")
def browser():
    # Playwright's launch gives every browser a fresh, temporary user-data dir
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    s = LiveServer(["--max-batch", "4", "--max-seq-len", "1024"], tmp_path_factory.mktemp("logs") / "webui.log")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def key_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("webui_models")
    tiny, vision = write_tiny_chat_model(root / "tiny"), write_tiny_vision_model(root / "tiny_vision")
    s = LiveServer([f"tiny={tiny}", f"tiny-vision={vision}", "--api-key", KEY, "--max-seq-len", "512"],
                   root / "key.log")
    yield s
    s.stop()


class Page:
    """A page in a fresh browser context (its own localStorage), with the page's uncaught errors collected."""

    def __init__(self, browser, url, **context_kw):
        self.context = browser.new_context(**context_kw)
        self.page = self.context.new_page()
        self.errors = []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.goto(url + "/")

    def __enter__(self):
        return self.page

    def __exit__(self, *exc):
        self.context.close()
        if exc[0] is None:
            assert self.errors == [], f"the page threw: {self.errors}"


def settings(page, **values):
    if page.is_hidden("#settings"):
        page.click("#toggle-settings")
    for name, value in values.items():
        page.fill(f"#{name}", str(value))


def ask(page, text):
    page.fill("#input", text)
    page.press("#input", "Enter")


def wait_answered(page, timeout_s=ANSWER_S):
    """Waits until no answer streams (Send is back), then returns the last answer's text and its notes."""
    page.wait_for_selector("#stop", state="hidden", timeout=timeout_s * 1000)
    last = page.locator(".msg.assistant").last
    return last.locator(".msg-body").inner_text(), [n.inner_text() for n in last.locator(".stats, .msg-note").all()]


def sse(*pieces: str, finish_reason: str = "stop", error: str | None = None) -> str:
    """A made-up /v1/chat/completions event stream in the server's shape: the role, content deltas, then a finish
    reason and the usage, or an error event (the server's way of ending a stream early), then [DONE]."""
    head = {"id": "chatcmpl-test", "object": "chat.completion.chunk", "created": 0, "model": "test"}
    choice = lambda delta, reason=None: {**head, "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]}
    events = [choice({"role": "assistant", "content": ""})] + [choice({"content": p}) for p in pieces]
    if error is None:
        events += [choice({}, finish_reason), {**head, "choices": [], "usage": {
            "prompt_tokens": 5, "completion_tokens": len(pieces), "total_tokens": 5 + len(pieces)}}]
    else:
        events.append({"error": {"message": error, "type": "server_error", "param": None, "code": None}})
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def route_answers(page, answers: list):
    """Answers each chat request with the next made-up reply: (status, body) or an SSE string."""
    def handle(route):
        reply = answers.pop(0)
        if isinstance(reply, tuple):
            route.fulfill(status=reply[0], content_type="application/json", body=json.dumps(reply[1]))
        else:
            route.fulfill(status=200, content_type="text/event-stream", body=reply)
    page.route("**/v1/chat/completions", handle)


def png_bytes() -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 40, 40)).save(buf, format="PNG")
    return buf.getvalue()


# ---- the page itself, without a browser ------------------------------------------------------------------------------
def test_page_files_are_small_self_contained_and_never_parse_html():
    files = {n: (webui.STATIC / n).read_text() for n in ("index.html", "app.js", "style.css")}
    total = sum(len(t.encode()) for t in files.values())
    print(f"\nchat page: {total} bytes ({', '.join(f'{n} {len(t.encode())}' for n, t in files.items())})")
    assert total < 64 * 1024
    for name, text in files.items():
        assert not re.search(r"(https?:)?//[\w.-]+\.\w+/", text.replace("//www.w3.org", "")), f"{name} links out"
    # the page never turns text into HTML: no parser entry point appears in its script
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "DOMParser"):
        assert sink not in files["app.js"], sink


def test_routes_headers_and_the_vision_field(tmp_path):
    from fastapi.testclient import TestClient
    from herd.serve.app import create_app
    from herd.serve.worker import ServedModel
    from herd.tokenizer import load_tokenizer

    folder = write_tiny_chat_model(tmp_path / "tiny")
    sm = ServedModel("tiny", herd.load(folder), load_tokenizer(folder), max_batch=1, max_seq_len=64)
    with TestClient(create_app([sm])) as c:
        r = c.get("/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in r.headers["content-security-policy"] and 'src="webui/app.js"' in r.text
        assert c.get("/webui/app.js").headers["content-type"].startswith("text/javascript")
        assert c.get("/webui/style.css").headers["content-type"].startswith("text/css")
        r = c.get("/webui/webui.py")                     # only the page's own files, by name
        assert r.status_code == 404 and "app.js, style.css" in r.json()["error"]["message"]
        assert c.get("/webui/..%2Fwebui.py").status_code == 404
        assert c.get("/v1/models").json()["data"][0]["vision"] is False
        assert "/webui" not in json.dumps(c.get("/openapi.json").json()["paths"])
    with TestClient(create_app([sm], webui=False)) as c:
        assert c.get("/").status_code == 404 and c.get("/webui/app.js").status_code == 404
    from herd.cli import build_parser
    assert build_parser().parse_args(["serve", "--no-webui"]).no_webui is True


# ---- in the browser, against the default model ------------------------------------------------------------------------
def test_page_loads_in_under_a_second(default_server, browser):
    with Page(browser, default_server.url) as page:
        page.wait_for_selector("#model option", state="attached")
        nav = page.evaluate("performance.getEntriesByType('navigation')[0].toJSON()")
        load_ms = nav["loadEventEnd"] - nav["startTime"]
        sizes = page.evaluate("performance.getEntriesByType('resource').map(r => [r.name, r.transferSize])")
        print(f"\nchat page load event after {load_ms:.0f} ms (DOMContentLoaded {nav['domContentLoadedEventEnd']:.0f} "
              f"ms); resources: {sizes}")
        assert load_ms < 1000
        models = default_server.client(api_key="unused").models.list().data
        assert page.locator("#model option").all_inner_texts() == [m.id for m in models]
        assert page.inner_text("#model-kind") == "text only"


def test_streamed_answer_regenerate_edit_and_conversations(default_server, browser, tmp_path):
    with Page(browser, default_server.url, viewport={"width": 1100, "height": 720}, accept_downloads=True) as page:
        settings(page, temperature=0, max_tokens=40)
        page.click("#toggle-settings")
        # every text the answer shows while it streams
        page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
            const b = document.querySelector('.msg.assistant .msg-body');
            if (b && b.textContent !== window.seen[window.seen.length - 1]) window.seen.push(b.textContent);
          }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true}); }""")
        ask(page, FRANCE)
        text, notes = wait_answered(page)
        seen = [s for s in page.evaluate("window.seen") if s]
        assert "Paris" in text and seen[-1] == text
        # it grew in place: at least one partial answer shown before the whole (a fast machine streams this short
        # answer in as few as two renders: 'The capital of France is', then the rest)
        assert len(seen) >= 2 and all(text.startswith(s) for s in seen), seen
        assert any(STATS.match(n) for n in notes), notes
        page.click("text=Regenerate")
        text, _ = wait_answered(page)
        assert "Paris" in text and page.locator(".msg").count() == 2

        page.click(".msg.user >> text=Edit")
        page.fill(".editor textarea", ITALY)
        page.click("text=Save & send")
        text, _ = wait_answered(page)
        assert "Rome" in text and page.locator(".msg").count() == 2
        assert page.inner_text(".msg.user .msg-body") == ITALY

        # Markdown from the model: a fenced code block with its copy button, inline code
        page.click("#new-chat")
        settings(page, max_tokens=120)
        page.click("#toggle-settings")
        ask(page, SQUARE)
        text, _ = wait_answered(page)
        code = page.locator(".msg.assistant .code pre").inner_text()
        assert "def " in code and "return" in code and page.locator(".msg.assistant .code .copy").count() == 1
        shot = tmp_path / "webui.png"
        page.screenshot(path=str(shot))
        if os.environ.get("HERD_WEBUI_SCREENSHOT"):       # how docs/webui.png was made (committed once)
            shutil.copy(shot, os.environ["HERD_WEBUI_SCREENSHOT"])
        page.click("#conversations li:nth-child(2) .title")
        assert "Rome" in page.inner_text(".msg.assistant .msg-body")

        # kept in localStorage: listed, renamed, still there after a reload, exported, deleted
        assert page.locator("#conversations li.current .title").inner_text().startswith(FRANCE[:40])
        page.click("#conversations li.current >> text=Rename")
        page.fill("#conversations input", "Capitals")
        page.press("#conversations input", "Enter")
        page.reload()                                        # the last one opened comes back
        assert page.locator("#conversations .title").all_inner_texts()[1] == "Capitals"
        page.click("#conversations >> text=Capitals")
        assert "Rome" in page.inner_text(".msg.assistant .msg-body")
        with page.expect_download() as download:
            page.click("#export")
        exported = json.loads(Path(download.value.path()).read_text())
        assert len(exported["conversations"]) == 2
        (conv,) = [c for c in exported["conversations"] if c["title"] == "Capitals"]
        assert conv["title"] == "Capitals" and [m["role"] for m in conv["messages"]] == ["user", "assistant"]
        assert "Rome" in conv["messages"][1]["content"] and conv["messages"][1]["stats"]["completion"] > 0
        page.click("#conversations li.current >> text=Delete")
        page.click("#conversations li.current >> text=Really delete?")
        page.reload()
        assert page.locator("#conversations .title").all_inner_texts() == [SQUARE[:48].strip()]


def test_stop_cancels_the_request_on_the_server(default_server, browser):
    s = default_server
    cancelled = s.metric("herd_finished_requests_total", reason="cancelled")
    with Page(browser, s.url) as page:
        settings(page, temperature=0, max_tokens=900)
        ask(page, "Count from 1 to 1000, one number per line.")
        page.wait_for_function("() => (document.querySelector('.msg.assistant .msg-body') || {}).textContent?.length > 8",
                               timeout=ANSWER_S * 1000)
        page.click("#stop")
        _, notes = wait_answered(page, 10)
        assert any(n.startswith("Stopped") for n in notes), notes
        assert s.wait_metric("herd_finished_requests_total", cancelled + 1, reason="cancelled") == cancelled + 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and s.metric("herd_running_requests") > 0:
            time.sleep(0.2)
        assert s.metric("herd_running_requests") == 0          # the slot is free again


def test_model_text_is_never_html(default_server, browser):
    with Page(browser, default_server.url) as page:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"])
        route_answers(page, [sse("Look: <img src=x onerr", "or=\"window.pwned='img'\"> and ",
                                 "<script>window.pwned='script'</script> then ",
                                 "[click](javascript:window.pwned='link') **bold** `<i>code</i>`\n\n",
                                 "```html\n<b onclick=\"window.pwned='b'\">not bold</b>\n```\n")])
        ask(page, "anything")
        text, _ = wait_answered(page)
        body = page.locator(".msg.assistant .msg-body")
        assert "<img src=x onerror=\"window.pwned='img'\">" in text and "<script>window.pwned='script'</script>" in text
        assert "click (javascript:window.pwned='link')" in text
        for tag in ("img", "script", "a", "b", "i"):
            assert body.locator(tag).count() == 0, tag
        assert body.locator("strong").inner_text() == "bold" and body.locator("p code").inner_text() == "<i>code</i>"
        assert page.evaluate("window.pwned") is None
        code = "<b onclick=\"window.pwned='b'\">not bold</b>"
        assert body.locator(".code pre").inner_text() == code
        body.locator(".code .copy").click()
        assert page.evaluate("navigator.clipboard.readText()") == code


def test_errors_are_shown_in_words(default_server, browser):
    with Page(browser, default_server.url) as page:
        settings(page, max_tokens=5000)                      # the server's context is 1024: a real 400
        ask(page, "hello")
        _, notes = wait_answered(page)
        assert "Too long for the model's context (HTTP 400)" in notes[-1], notes
        assert "maximum context length is 1024" in notes[-1]
        route_answers(page, [
            (429, {"error": {"message": "model 'x' is at capacity (1 running, 1 waiting); retry later",
                             "type": "rate_limit_error", "param": None, "code": "rate_limit_exceeded"}}),
            sse("I cannot help", " with that.", finish_reason="content_filter"),
            sse("half an ans", error="engine failure: boom"),
        ])
        ask(page, "again")
        _, notes = wait_answered(page)
        assert "busy" in notes[-1] and "HTTP 429" in notes[-1] and "at capacity" in notes[-1], notes
        page.click("text=Regenerate")
        _, notes = wait_answered(page)
        assert any("guard" in n and "content_filter" in n for n in notes), notes
        page.click("text=Regenerate")
        _, notes = wait_answered(page)
        assert "engine failure: boom" in notes[-1], notes


def test_image_attach_is_refused_on_the_text_only_model(default_server, browser):
    with Page(browser, default_server.url) as page:
        page.wait_for_selector("#model option", state="attached")
        page.set_input_files("#file", files=[{"name": "red.png", "mimeType": "image/png", "buffer": png_bytes()}])
        assert "reads text only, so images cannot be sent to it" in page.inner_text("#notice")
        page.click("#notice >> text=Dismiss")
        # pasted and dropped images too
        for event in ("paste", "drop"):
            page.evaluate("""([event, bytes]) => {
                const data = new DataTransfer();
                data.items.add(new File([new Uint8Array(bytes)], 'red.png', {type: 'image/png'}));
                const target = event === 'paste' ? document.getElementById('input') : document.querySelector('main');
                target.dispatchEvent(event === 'paste'
                  ? new ClipboardEvent('paste', {clipboardData: data, bubbles: true, cancelable: true})
                  : new DragEvent('drop', {dataTransfer: data, bubbles: true, cancelable: true}));
              }""", [event, list(png_bytes())])
            assert "reads text only" in page.inner_text("#notice"), event
            page.click("#notice >> text=Dismiss")
        assert page.locator("#attachments img").count() == 0
        # the keyboard: Shift+Enter is a new line, not a send
        page.click("#input")
        page.keyboard.type("a")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("b")
        assert page.input_value("#input") == "a\nb" and page.locator(".msg").count() == 0


def test_phone_width_has_no_horizontal_scroll(default_server, browser, tmp_path):
    with Page(browser, default_server.url, viewport={"width": 390, "height": 844}) as page:
        route_answers(page, [sse("A long word: " + "x" * 300 + "\n\n",
                                 "```python\nprint('" + "y" * 300 + "')\n```\n",
                                 "see https://example.com/" + "z" * 200)])
        ask(page, "w" * 300)
        wait_answered(page)
        overflow = "[document.documentElement.scrollWidth - document.documentElement.clientWidth, " \
                   "document.body.scrollWidth - document.body.clientWidth]"
        assert page.evaluate(overflow) == [0, 0]
        # the long code line scrolls inside its block
        assert page.evaluate("(p => p.scrollWidth > p.clientWidth)(document.querySelector('.code pre'))")
        page.click("#toggle-settings")
        assert page.evaluate(overflow) == [0, 0]
        page.screenshot(path=str(tmp_path / "webui_390px.png"))
        page.click("#toggle-sidebar")                        # the conversations drawer
        assert page.is_visible("#conversations li")
        assert page.evaluate(overflow) == [0, 0]
        page.click("#close-sidebar")
        assert page.is_hidden("#sidebar")


# ---- the API key, and an image for a vision model ---------------------------------------------------------------------
def test_api_key_flow_and_an_image_for_a_vision_model(key_server, browser):
    with Page(browser, key_server.url) as page:
        page.wait_for_selector("#key-dialog[open]")
        page.fill("#key-input", "wrong-key")
        page.press("#key-input", "Enter")
        page.wait_for_selector("#key-error:not([hidden])")
        assert "Incorrect API key" in page.inner_text("#key-error") and page.is_visible("#key-dialog")
        page.fill("#key-input", KEY)
        page.press("#key-input", "Enter")
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#model option").all_inner_texts() == ["tiny", "tiny-vision (vision)"]
        assert page.evaluate("sessionStorage.getItem('herd.apiKey')") == KEY
        page.reload()                                        # asked once: the tab keeps the key
        page.wait_for_selector("#model option", state="attached")
        assert not page.is_visible("#key-dialog")

        page.select_option("#model", "tiny-vision")
        assert page.inner_text("#model-kind") == "reads images"
        page.set_input_files("#file", files=[{"name": "red.png", "mimeType": "image/png", "buffer": png_bytes()}])
        page.wait_for_selector("#attachments img")
        settings(page, temperature=0, max_tokens=3)
        with page.expect_request("**/v1/chat/completions") as request:
            ask(page, "What is in the picture?")
        sent = json.loads(request.value.post_data)
        assert request.value.headers["authorization"] == f"Bearer {KEY}" and sent["model"] == "tiny-vision"
        (text_part, image_part) = sent["messages"][-1]["content"]
        assert text_part == {"type": "text", "text": "What is in the picture?"}
        assert image_part["image_url"]["url"].startswith("data:image/png;base64,")
        _, notes = wait_answered(page, 60)
        assert any(n.endswith("completion tokens") for n in notes), notes
        assert page.locator(".msg.user img").count() == 1 and page.locator("#attachments img").count() == 0
