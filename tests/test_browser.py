"""The chat page (static/) in a real browser: Debian's chromium driven by Playwright.

A live serve.py runs in a subprocess with a tiny random-weights checkpoint, so the page talks to
the real HTTP API (streaming, stop, health, params). Two tests replace the server's answer with
page.route to feed the page hostile or failing responses; the page's rendering and error handling
are what they test.

Needs `apt-get install chromium` and `pip install playwright` (never `playwright install`).

Screenshots: set GPT2I_SCREENSHOT_DIR=docs to (re)write docs/screenshot-desktop.png and
docs/screenshot-phone.png; otherwise they go to the test's tmp dir only.
"""

import json
import lzma
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch
from playwright.sync_api import sync_playwright

from checkpoint import save_checkpoint
from conftest import ROOT, tiny_config
from model import GPT
from tokenizer import encode

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
XSS = "<img src=x onerror=alert(1)>"
SERVER_START_S = 90
UI_TIMEOUT_MS = 20_000


PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 800}


# ---------------------------------------------------------------- server


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url, timeout=5):
    """(status, body text) of a GET; (None, reason) when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as res:
            return res.status, res.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except OSError as e:
        return None, str(e)


def _metric(base, name):
    """A counter's value from /metrics (0 when absent)."""
    status, text = _get(f"{base}/metrics")
    assert status == 200, text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """serve.py on a free port with a tiny random GPT (long context, so a reply can run long enough to stop)."""
    tmp = tmp_path_factory.mktemp("server")
    torch.manual_seed(0)
    cfg = tiny_config(block_size=1024, n_layer=4, n_embd=128, n_head=4)
    ckpt = save_checkpoint(tmp / "ckpt.pt", kind="sft", model_state=GPT(cfg).state_dict(),
                           config=cfg.to_dict(), step=0)
    port = _free_port()
    log = open(tmp / "server.log", "w+")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in list(env):
        if key.startswith("GPT2I_"):
            del env[key]  # the test's flags alone configure the server
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", str(ckpt), "--port", str(port),
         "--device", "cpu", "--rate-limit", "none", "--model-name", "tiny-test"],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            status, _ = _get(f"{base}/health", timeout=2)
            if status == 200:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"serve.py did not become ready (exit {proc.poll()}):\n{log.read()[-4000:]}")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ---------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def playwright_driver():
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} is missing: sudo apt-get install chromium"
    with sync_playwright() as p:
        yield p


def _launch(playwright_driver, user_dir, **options):
    options.setdefault("viewport", DESKTOP)
    return playwright_driver.chromium.launch_persistent_context(
        str(user_dir), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS, **options)


class Page:
    """A page plus what it reported: uncaught errors, dialogs, and the generation requests it sent."""

    def __init__(self, context, base):
        self.context, self.base = context, base
        self.page = context.pages[0] if context.pages else context.new_page()
        self.page.set_default_timeout(UI_TIMEOUT_MS)
        self.errors, self.dialogs, self.requests, self.urls = [], [], [], []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", self._on_dialog)
        self.page.on("request", self._on_request)
        self.failed_gets = []  # page assets or polls that did not load
        self.page.on("response", lambda r: r.request.method == "GET" and r.status >= 400
                     and self.failed_gets.append(f"{r.status} {r.url}"))

    def _on_dialog(self, dialog):
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _on_request(self, request):
        self.urls.append(request.url)
        if request.method == "POST":
            self.requests.append((request.url, request.post_data_json, request.headers))

    def open(self):
        self.page.goto(self.base + "/")
        self.wait_ready()
        return self.page

    def wait_ready(self):
        self.page.wait_for_selector('#health[data-state="ready"]', state="attached")

    def send(self, text):
        self.page.fill("#prompt", text)
        self.page.press("#prompt", "Enter")

    def wait_idle(self):
        self.page.wait_for_selector("#stop", state="hidden")
        self.page.wait_for_selector("#send", state="visible")

    def answers(self):
        return self.page.locator(".msg.assistant .content").all_text_contents()


@pytest.fixture
def browser(playwright_driver, server, tmp_path):
    context = _launch(playwright_driver, tmp_path / "profile")
    page = Page(context, server)
    yield page
    context.close()
    assert not page.errors, f"uncaught errors in the page: {page.errors}"


def _sse(events):
    return "".join(f"data: {json.dumps(e) if not isinstance(e, str) else e}\n\n" for e in events)


def _chat_chunks(text, pieces=6):
    """An OpenAI chat stream carrying `text`, cut into a few pieces, with its true token count."""
    step = max(1, len(text) // pieces)
    chunks = [{"choices": [{"index": 0, "delta": {"content": text[i:i + step]}, "finish_reason": None}]}
              for i in range(0, len(text), step)]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    chunks.append({"choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": len(encode(text))}})
    return _sse(chunks + ["[DONE]"])


def _fulfil_sse(body):
    def handler(route):
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=body)
    return handler


# ---------------------------------------------------------------- tests


def test_page_loads_with_labelled_controls_and_server_ranges(browser, server):
    page = browser.open()
    assert page.title().startswith("gpt2-instruct")
    assert "tiny-test" in page.text_content("#health")  # the server's --model-name, from /v1/models
    # Every control has a label, and the sliders carry the server's ranges from /params.
    for label in ("Temperature", "Top-k", "Top-p", "Repetition penalty", "Max new tokens", "Raw completion",
                  "JSON output", "Message"):
        assert page.get_by_label(label, exact=True).count() == 1, label
    status, text = _get(f"{server}/params")
    assert status == 200, text
    params = json.loads(text)["params"]
    for name in ("temperature", "top_p", "repetition_penalty", "max_new_tokens"):
        slider = page.locator(f"#{name}")
        assert float(slider.get_attribute("min")) >= params[name]["min"]
        assert float(slider.get_attribute("max")) == params[name]["max"], name
    # Max new tokens reaches the server's max (the context - 1), not its default.
    assert int(page.get_attribute("#max_new_tokens", "max")) == params["max_new_tokens"]["max"] == 1023
    assert int(page.input_value("#max_new_tokens")) == params["max_new_tokens"]["default"]
    # The page's own default keeps small models out of loops.
    assert 1.1 <= float(page.input_value("#repetition_penalty")) <= 1.2
    # Keyboard: Tab walks the controls, and whatever has focus shows a visible ring.
    page.locator("body").click(position={"x": 640, "y": 300})
    seen = set()
    for _ in range(12):
        page.keyboard.press("Tab")
        focused = page.evaluate("""() => {
            const el = document.activeElement;
            // The message box rings its whole container; the raw switch rings its drawn track.
            if (el.id === 'prompt') {
                const ring = getComputedStyle(el.closest('.composer-box')).boxShadow.includes('0px 0px 0px 3px');
                return [el.id, ring ? 'ring' : 'none'];
            }
            if (el.id === 'raw') return [el.id, getComputedStyle(el.nextElementSibling).outlineStyle];
            return [el.id || el.className, getComputedStyle(el).outlineStyle];
        }""")
        seen.add(focused[0])
        assert focused[1] and focused[1] != "none", focused
    assert {"prompt", "temperature", "top_k"} <= seen, seen
    assert not browser.failed_gets, browser.failed_gets  # index, app.js, style.css, favicon, /health, /params
    assert {"/app.js", "/style.css", "/favicon.svg", "/health", "/params", "/v1/models"} <= {u[len(server):] for u in browser.urls}
    # No request left the page's own origin (no CDN, works offline).
    assert browser.urls and all(url.startswith(server + "/") for url in browser.urls), browser.urls
    # At 1280x800 the whole Settings panel fits: nothing, the API key field included, is cut off.
    fits = page.evaluate("""() => { const s = document.querySelector('.settings');
        return [s.scrollHeight, s.clientHeight, document.querySelector('#api_key').getBoundingClientRect().bottom]; }""")
    assert fits[0] <= fits[1] and fits[2] <= DESKTOP["height"], fits


def test_send_streams_tokens_and_enter_shift_enter(browser, server):
    page = browser.open()
    page.fill("#prompt", "first line")
    page.press("#prompt", "Shift+Enter")
    page.keyboard.type("second line")
    assert page.input_value("#prompt") == "first line\nsecond line"  # Shift+Enter: a newline, not a send
    assert not browser.requests
    # Record every length the answer takes while it streams.
    page.evaluate("""() => {
        window.__lengths = [];
        new MutationObserver(() => {
            const c = document.querySelector('.msg.assistant:last-child .content');
            if (c && document.querySelector('.msg.assistant:last-child .bubble.streaming')) window.__lengths.push(c.textContent.length);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    page.press("#prompt", "Enter")
    browser.wait_idle()
    lengths = [n for n in page.evaluate("window.__lengths") if n > 0]
    assert len(set(lengths)) >= 3, f"the answer did not arrive in pieces: {lengths}"
    assert lengths == sorted(lengths)
    answer = browser.answers()[-1]
    assert answer and len(answer) >= lengths[-1]
    url, body, _ = browser.requests[-1]
    assert url.endswith("/v1/chat/completions") and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "first line\nsecond line"}]
    assert 1.1 <= body["repetition_penalty"] <= 1.2
    assert page.locator(".msg.user .content").text_content() == "first line\nsecond line"
    assert page.locator(".msg.assistant .action-copy").count() == 1
    assert page.locator(".msg.assistant .action-regenerate").count() == 1


def test_stop_ends_generation_and_server_cancels(browser, server):
    page = browser.open()
    cancelled_before = _metric(server, "gpt2i_cancelled_total")
    page.focus("#max_new_tokens")
    page.keyboard.press("End")  # the context - 1: more than fits after any prompt
    assert page.input_value("#max_new_tokens") == page.get_attribute("#max_new_tokens", "max")
    browser.send("Tell me a very long story.")
    page.wait_for_function(
        "() => (document.querySelector('.msg.assistant .content')?.textContent.length ?? 0) > 0")
    # The server's 400 said how much room the prompt leaves; the page asked again for exactly that.
    (_, first, _), (_, second, _) = browser.requests
    assert first["max_tokens"] == 1023 and 900 < second["max_tokens"] < 1023, (first["max_tokens"], second["max_tokens"])
    page.click("#stop")
    browser.wait_idle()
    assert "stopped" in page.text_content(".msg.assistant .msg-meta")
    stopped_text = browser.answers()[-1]
    assert stopped_text
    page.wait_for_timeout(500)
    assert browser.answers()[-1] == stopped_text  # nothing more arrives after Stop
    # The server noticed the closed connection, dropped the job, and is healthy.
    deadline = time.monotonic() + 10
    while _metric(server, "gpt2i_cancelled_total") <= cancelled_before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(server, "gpt2i_cancelled_total") > cancelled_before
    assert _get(f"{server}/health")[0] == 200
    # The page is usable again: regenerate sends the same question.
    page.click(".msg.assistant .action-regenerate")
    page.wait_for_selector("#stop", state="visible")
    page.click("#stop")
    browser.wait_idle()
    assert page.locator(".msg.user").count() == 1


def test_temperature_goes_into_the_request_and_settings_persist(browser, server):
    page = browser.open()
    page.focus("#temperature")
    page.keyboard.press("Home")  # 0: greedy
    for _ in range(3):
        page.keyboard.press("ArrowRight")
    expected = round(3 * float(page.get_attribute("#temperature", "step")), 6)
    assert float(page.input_value("#temperature")) == pytest.approx(expected)
    assert page.text_content("#temperature-value") == f"{expected:.2f}"
    page.focus("#top_k")
    page.keyboard.press("Home")
    assert page.text_content("#top_k-value") == "off"
    browser.send("Hello")
    browser.wait_idle()
    url, body, _ = browser.requests[-1]
    assert url.endswith("/v1/chat/completions")
    assert body["temperature"] == pytest.approx(expected)
    assert body["top_k"] == 0
    # Raw completion goes to /generate with raw: true and only the text.
    page.click("label[for=raw]")
    browser.send("Once upon a time")
    browser.wait_idle()
    url, body, _ = browser.requests[-1]
    assert url.endswith("/generate") and body["raw"] is True and body["prompt"] == "Once upon a time"
    assert body["temperature"] == pytest.approx(expected)
    page.reload()
    browser.wait_ready()
    assert float(page.input_value("#temperature")) == pytest.approx(expected)
    assert page.is_checked("#raw")


def test_json_output_sends_the_schema_and_bad_json_is_shown_not_sent(browser, server):
    page = browser.open()
    assert page.is_hidden("#json_schema")
    page.click("label[for=json]")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # one short answer: {"ok": true} or {"ok": false}
    page.fill("#json_schema", '{"type": "object",')  # not JSON: shown under the box, and nothing is sent
    assert "not valid JSON" in page.text_content("#json_schema-error")
    assert page.get_attribute("#json_schema", "aria-invalid") == "true"
    browser.send("A number?")
    assert "nothing was sent" in page.text_content("#banner-text") and not browser.requests
    assert page.input_value("#prompt") == "A number?"  # the message stays in the box
    page.fill("#json_schema", json.dumps(schema))
    assert page.is_hidden("#json_schema-error")
    page.press("#prompt", "Enter")
    browser.wait_idle()
    url, body, _ = browser.requests[-1]
    assert url.endswith("/v1/chat/completions")
    assert body["response_format"] == {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    assert json.loads(browser.answers()[-1]) in ({"ok": True}, {"ok": False})  # decoded under the schema
    page.fill("#json_schema", "")  # empty: any JSON object
    browser.send("Again?")
    browser.wait_idle()
    assert browser.requests[-1][1]["response_format"] == {"type": "json_object"}
    assert browser.answers()[-1].startswith("{")
    page.reload()
    browser.wait_ready()
    assert page.is_checked("#json") and page.input_value("#json_schema") == ""


def test_conversations_survive_reload_and_can_be_deleted(browser, server):
    page = browser.open()
    browser.send("What is the capital of France?")
    browser.wait_idle()
    browser.send("And of Italy?")
    browser.wait_idle()
    answers = browser.answers()
    assert len(answers) == 2 and all(answers)
    # The second request carried the whole conversation.
    _, body, _ = browser.requests[-1]
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == answers[0]
    page.click("#new-chat")
    assert page.locator(".msg").count() == 0
    browser.send("Second chat")
    browser.wait_idle()
    page.reload()
    browser.wait_ready()
    assert page.locator(".chat-item").count() == 2
    assert page.locator(".msg.user .content").all_text_contents() == ["Second chat"]
    page.click(".chat-open:has-text('What is the capital of France?')")
    assert page.locator(".msg.user .content").all_text_contents() == ["What is the capital of France?", "And of Italy?"]
    assert browser.answers() == answers
    # Delete asks once more (a second click) and then removes the chat.
    item = page.locator(".chat-item", has_text="What is the capital of France?")
    item.locator(".chat-delete").click()
    item.locator(".chat-delete").click()
    assert page.locator(".chat-item").count() == 1
    page.reload()
    browser.wait_ready()
    assert page.locator(".chat-item").count() == 1


def test_model_output_is_shown_as_text_never_html(browser, server):
    page = browser.page
    hostile = f"Sure! {XSS} and <script>alert(2)</script> <b>bold?</b>"
    page.route("**/v1/chat/completions", _fulfil_sse(_chat_chunks(hostile)))
    browser.open()
    browser.send("Say something")
    browser.wait_idle()
    assert browser.answers() == [hostile]
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    # The same after a reload, when the answer comes back from localStorage.
    page.reload()
    browser.wait_ready()
    assert browser.answers() == [hostile]
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    # Raw completion's native events (/generate) are rendered the same way.
    page.route("**/generate", _fulfil_sse(_sse([{"token": "Once " + XSS[:9]}, {"token": XSS[9:]},
                                                {"done": True, "finish_reason": "eos", "usage": {}}])))
    page.click("label[for=raw]")
    browser.send("Continue")
    browser.wait_idle()
    assert browser.answers()[-1] == "Once " + XSS
    assert page.locator("#messages img, #messages script, #messages b").count() == 0
    page.wait_for_timeout(300)
    assert browser.dialogs == []
    page.evaluate("() => alert('probe')")  # the listener does see dialogs: the silence above means something
    assert browser.dialogs == ["probe"]


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["desktop", "phone"])
def test_failed_send_says_what_to_do_and_retries_in_place(playwright_driver, server, tmp_path, viewport):
    context = _launch(playwright_driver, tmp_path / "profile", viewport=viewport)
    browser = Page(context, server)
    page = browser.page
    replies = iter([
        (503, {"Retry-After": "2"}, {"error": {"type": "model_loading", "message": "the model is loading", "param": None}}),
        (503, {}, {"error": {"type": "overloaded", "message": "too many requests queued", "param": None}}),
        (400, {}, {"error": {"type": "invalid_request_error", "message": "top_p must be in (0, 1], got 5",
                             "param": "top_p"}}),
        (401, {}, {"error": {"type": "authentication_error", "message": "missing API key", "param": None}}),
        (429, {"Retry-After": "5"}, {"error": {"type": "rate_limit_exceeded", "message": "30 per 1 minute", "param": None}}),
    ])

    def handler(route):
        status, headers, body = next(replies)
        route.fulfill(status=status, headers={"Content-Type": "application/json", **headers}, body=json.dumps(body))

    page.route("**/v1/chat/completions", handler)
    browser.open()
    expected = ["model is still loading", "busy", "top_p must be in (0, 1], got 5", "API key", "try again in"]
    for i, words in enumerate(expected):
        if i == 0:
            browser.send("Hi")
        else:
            page.click(".msg.user .action-retry")  # waits until it is enabled (after Retry-After)
        browser.wait_idle()
        # The note sits under the question, with Retry beside it: no empty answer, no second question.
        note = page.locator(".msg.user .msg-error")
        assert note.is_visible() and words.lower() in note.text_content().lower(), note.text_content()
        assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 0
        assert page.locator(".msg.user .action-retry").count() == 1
        assert not page.is_visible("#banner")  # nothing drawn over the conversation
    # Rate limited: Retry waits for Retry-After, counting down, then works in place.
    assert page.locator(".msg.user .action-retry").is_disabled()
    page.wait_for_selector(".msg.user .action-retry:enabled")
    assert "try again now" in page.text_content(".msg.user .msg-error").lower()
    # With an API key set, the page sends it as a Bearer token (this server has none and ignores it).
    page.unroute("**/v1/chat/completions")
    if viewport is PHONE:
        page.click("#open-settings")
    page.fill("#api_key", "s3cret")
    if viewport is PHONE:
        page.keyboard.press("Escape")
    page.click(".msg.user .action-retry")
    browser.wait_idle()
    url, _, headers = browser.requests[-1]
    assert url.endswith("/v1/chat/completions") and headers.get("authorization") == "Bearer s3cret"
    assert page.locator(".msg.user").count() == 1 and page.locator(".msg.assistant").count() == 1
    assert page.locator(".msg-error:visible").count() == 0
    # A regenerate that fails gives the previous answer back, with the note on it.
    answer = browser.answers()
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "5", "Content-Type": "application/json"},
        body=json.dumps({"error": {"type": "rate_limit_exceeded", "message": "2 per 1 minute", "param": None}})))
    page.click(".msg.assistant .action-regenerate")
    browser.wait_idle()
    assert browser.answers() == answer
    assert "try again in" in page.text_content(".msg.assistant .msg-error").lower()
    assert page.evaluate("document.scrollingElement.scrollWidth") <= viewport["width"]
    context.close()
    assert not browser.errors, browser.errors


def test_answers_show_without_leading_whitespace(browser, server):
    page = browser.page
    page.route("**/v1/chat/completions", _fulfil_sse(_chat_chunks("\n  Paris is the capital of France.")))
    browser.open()
    browser.send("What is the capital of France?")
    browser.wait_idle()
    assert browser.answers() == ["Paris is the capital of France."]
    browser.send("And of Italy?")
    browser.wait_idle()
    _, body, _ = browser.requests[-1]
    assert body["messages"][1] == {"role": "assistant", "content": "Paris is the capital of France."}


def test_a_one_token_answer_shows_its_rate(browser, server):
    browser.page.route("**/v1/chat/completions", _fulfil_sse(_chat_chunks("Yes", pieces=1)))
    browser.open()
    browser.send("Is water wet?")
    browser.wait_idle()
    meta = browser.page.text_content(".msg.assistant .msg-meta")
    assert meta.startswith("1 token · ") and meta.endswith(" tok/s"), meta


def test_sse_parser_survives_any_chunk_boundary(browser, server):
    page = browser.open()
    stream = ('data: {"token": "h\\u00e9llo"}\r\n\r\n: keep-alive\n\ndata: {"token": " w\\u00f6rld \\ud83d\\ude00"}\n\n'
              'data: {"done": true, "finish_reason": "length", "usage": {"completion_tokens": 2}}\n\n')
    result = page.evaluate("""(stream) => {
        const out = [];
        const bytes = new TextEncoder().encode(stream);
        for (let cut = 0; cut <= bytes.length; cut++) {
            for (const size of [1, 3, 7]) {
                const events = [];
                const parser = window.gpt2i.createSSEParser((d) => events.push(window.gpt2i.normalizeEvent(d)));
                const dec = new TextDecoder();
                const pieces = [bytes.slice(0, cut)];
                for (let i = cut; i < bytes.length; i += size) pieces.push(bytes.slice(i, i + size));
                for (const p of pieces) parser.push(dec.decode(p, {stream: true}));
                parser.push(dec.decode()); parser.end();
                out.push(JSON.stringify(events));
            }
        }
        return [...new Set(out)];
    }""", stream)
    assert len(result) == 1, result[:3]
    events = json.loads(result[0])
    assert events == [{"token": "héllo"}, {"token": " wörld 😀"},
                      {"done": True, "finish_reason": "length", "usage": {"completion_tokens": 2}}]


def _demo_rows(*instructions):
    """Real instruction/response rows from the bundled demo data (Dolly's schema), in the order asked."""
    rows = {}
    with lzma.open(os.path.join(ROOT, "demo_data", "instructions.jsonl.xz"), "rt", encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            if row["instruction"] in instructions:
                rows[row["instruction"]] = row["response"]
    assert set(rows) == set(instructions), f"demo data lacks {set(instructions) - set(rows)}"
    return [(q, rows[q]) for q in instructions]


CPU_DECODE_TOKENS_S = 38.1  # README "Benchmarks": decoding on 2 CPU cores, batch 1, fp32


def _replay(text, route):
    """Answer with `text` after the time the CPU decoder would take, so the page shows a real rate."""
    time.sleep(len(encode(text)) / CPU_DECODE_TOKENS_S)
    _fulfil_sse(_chat_chunks(text, pieces=12))(route)


def test_screenshots_desktop_and_phone(playwright_driver, server, tmp_path):
    """A conversation at 1280x800 and 390x844; the phone layout must not scroll sideways.

    The answers are scripted (page.route) with responses from the bundled instruction data, since
    a tiny random model writes noise; the page, the server's health and params are live.
    """
    rows = _demo_rows("Tell me about Absolute zero.", "Give me a short overview of Acid rain.")
    out_dir = os.environ.get("GPT2I_SCREENSHOT_DIR")
    out_dir = os.path.join(ROOT, out_dir) if out_dir and not os.path.isabs(out_dir) else out_dir
    shots = {}
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        context = _launch(playwright_driver, tmp_path / name, viewport=viewport,
                          device_scale_factor=1 if name == "desktop" else 2, color_scheme="light")
        page = Page(context, server)
        answers = iter(rows)
        page.page.route("**/v1/chat/completions", lambda route: _replay(next(answers)[1], route))
        page.open()
        for question, _ in rows:
            page.send(question)
            page.wait_idle()
        p = page.page
        assert p.evaluate("document.scrollingElement.scrollWidth") <= viewport["width"]
        if name == "phone":  # the drawers are closed and out of the tab order
            assert not p.is_visible("#temperature") and not p.is_visible("#new-chat")
            p.click("#open-settings")
            p.wait_for_selector("#temperature", state="visible")
            p.keyboard.press("Escape")
            p.wait_for_selector("#temperature", state="hidden")
        p.evaluate("document.activeElement && document.activeElement.blur()")
        p.mouse.move(0, viewport["height"] - 1)
        shots[name] = tmp_path / f"screenshot-{name}.png"
        p.screenshot(path=str(shots[name]))
        context.close()
        assert not page.errors, page.errors
    if out_dir:
        for name, path in shots.items():
            shutil.copyfile(path, os.path.join(out_dir, f"screenshot-{name}.png"))
