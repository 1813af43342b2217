"""The playground in a real browser: Debian's headless Chromium driven by Playwright's sync API.

The server runs as ``python -m app`` in a subprocess (a user's server, not one in this test's
event loop: Playwright's sync API cannot run inside a trio loop, and the browser's connection must
be a real one that closes when a tab does). Nothing here downloads a browser: without
/usr/bin/chromium the tests skip, except in CI, where ``.ci/run`` installs it and they must run.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, Request, Route, sync_playwright

from app.http.sse import sse_comment, sse_event
from tools.server_process import ROOT, ServedApp, app_on_port_zero

CHROMIUM = Path("/usr/bin/chromium")
# Root in a container: no sandbox; and nothing that talks to Google's services in the background.
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
RESULTS = ROOT / "results" / "browser"
HTTP_TIMEOUT = 300.0
LONG_ANSWER = 2000  # tiny-gpt-oss never stops by itself: time enough to press Stop or close the tab

pytestmark = pytest.mark.slow


# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} is missing: `make browser-deps` installs Debian's chromium"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextmanager
def served(model: str) -> Iterator[ServedApp]:
    with app_on_port_zero("--model", model) as app:
        # A fresh process's first generation pays one-off costs; the page's figures should not.
        server_json(app.url, "/generate", {"prompt": "Hi", "max_tokens": 2, "stream": False})
        yield app


@pytest.fixture(scope="module")
def tiny_app() -> Iterator[ServedApp]:
    with served("tiny-gpt-oss") as app:
        yield app


@pytest.fixture(scope="module")
def smollm2_app() -> Iterator[ServedApp]:
    with served("smollm2-135m") as app:
        yield app


@dataclass
class Playground:
    """One tab on the playground, with what it asked for and what went wrong in it."""

    page: Page
    requests: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def ask(self, question: str, *, max_tokens: int, temperature: float | None = None) -> None:
        self.page.fill("#max-tokens", str(max_tokens))
        if temperature is not None:
            self.page.fill("#temperature", str(temperature))
        self.page.fill("#prompt", question)
        self.page.press("#prompt", "Enter")

    def give_tools(self, tools: str, choice: str | None = None) -> None:
        """Fill the Tools field (in its fold, opened first) and pick a tool_choice."""
        if not self.value("document.querySelector('#tools-panel').open"):
            self.page.click("#tools-panel summary")
        self.page.fill("#tools", tools)
        if choice is not None:
            self.page.select_option("#tool-choice", choice)

    def value(self, expression: str) -> Any:
        return self.page.evaluate(expression)

    def wait_until(self, expression: str, timeout: float = 30.0) -> None:
        """Poll from here: the page's Content-Security-Policy rightly forbids the string ``eval``
        that Playwright's own wait_for_function needs."""
        deadline = time.monotonic() + timeout
        while not self.value(expression):
            if time.monotonic() > deadline:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.01)

    def tokens_shown(self) -> int:
        return int(self.value("Number(document.querySelector('.turn:last-of-type')?.dataset.tokens ?? 0)"))

    def last_turn(self, part: str) -> str:
        return self.page.text_content(f".turn:last-of-type {part}") or ""

    def only_this_server(self, url: str) -> None:
        """The page fetched nothing from anywhere but the server (no CDN, no fonts, no analytics)."""
        server = urlsplit(url).netloc
        others = [u for u in self.requests if urlsplit(u).netloc != server and not u.startswith("data:")]
        assert others == []
        assert self.page_errors == []


def open_playground(browser: Browser, url: str, **context: Any) -> Playground:
    page = browser.new_context(**context).new_page()
    page.set_default_timeout(HTTP_TIMEOUT * 1000)
    playground = Playground(page)
    page.on("request", lambda request: playground.requests.append(request.url))
    page.on("pageerror", lambda error: playground.page_errors.append(str(error)))
    page.on("console", lambda message: _console(playground, message))
    page.goto(url)
    page.wait_for_selector("#model-status[data-status=ok]")
    return playground


def _console(playground: Playground, message: ConsoleMessage) -> None:
    if message.type == "error":
        playground.console_errors.append(message.text)


OpenTab = Callable[..., Playground]


@pytest.fixture
def open_tab(browser: Browser) -> Iterator[OpenTab]:
    """``open_tab(url, **context)``: the playground in a fresh browser context (its own profile),
    closed when the test ends."""
    opened: list[Playground] = []

    def open_one(url: str, **context: Any) -> Playground:
        opened.append(open_playground(browser, url, **context))
        return opened[-1]

    yield open_one
    for playground in opened:
        playground.page.context.close()


# -- the server's view -------------------------------------------------------------------------


@dataclass(frozen=True)
class Counts:
    cancelled: int
    active_sequences: int
    active_streams: int


def server_json(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """GET, or POST ``body``; the timeout allows for a CPU that other work keeps busy."""
    if body is None:
        return httpx.get(f"{url}{path}", timeout=HTTP_TIMEOUT).json()
    return httpx.post(f"{url}{path}", json=body, timeout=HTTP_TIMEOUT).json()


def counts(url: str) -> Counts:
    stats = server_json(url, "/stats")
    (figures,) = stats["model_metrics"].values()
    return Counts(stats["cancelled_requests"], stats["active_sequences"], figures["active_streams"])


@dataclass(frozen=True)
class CancelTimes:
    moved_s: float  # until the server's cancelled count went up
    settled_s: float  # until its active sequences and streams were back to the idle figures too


def wait_for_cancel(url: str, idle: Counts, since: float, timeout: float = 5.0) -> CancelTimes:
    moved: float | None = None
    while time.monotonic() - since < timeout:
        now = counts(url)
        if moved is None and now.cancelled > idle.cancelled:
            moved = time.monotonic() - since
        if moved is not None and now == Counts(idle.cancelled + 1, idle.active_sequences, idle.active_streams):
            return CancelTimes(moved, time.monotonic() - since)
        time.sleep(0.005)
    raise AssertionError(f"after {timeout} s the server shows {counts(url)}, from idle {idle}")


def cancel_mid_answer(
    playground: Playground, url: str, cancel: Callable[[], object], what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ask for a long answer, wait until the page shows tokens and the server is busy with it,
    ``cancel``, and measure until the server has counted the cancel and is idle again."""
    idle = counts(url)
    playground.ask("Tell me everything you know.", max_tokens=LONG_ANSWER)
    playground.wait_until("Number(document.querySelector('.turn:last-of-type')?.dataset.tokens ?? 0) >= 10")
    busy = counts(url)
    assert (busy.active_sequences, busy.active_streams) == (idle.active_sequences + 1, idle.active_streams + 1)
    assert busy.cancelled == idle.cancelled
    started = time.monotonic()
    cancel()
    times = wait_for_cancel(url, idle, started)
    with capsys.disabled():
        print(
            f"\n{what} -> cancelled: the server's cancelled count moved after {times.moved_s * 1000:.0f} ms, "
            f"active sequences and streams were back after {times.settled_s * 1000:.0f} ms"
        )
    assert times.settled_s < 1.0


# Records the answer's length at each change while it streams (an observer, not polling from
# here: polling would take CPU from the server on a small machine).
RECORD_PARTIAL_ANSWERS = """
window.partialAnswerLengths = [];
new MutationObserver(() => {
  const turn = document.querySelector(".turn:last-of-type");
  if (turn?.dataset.status === "streaming") {
    window.partialAnswerLengths.push(turn.querySelector(".answer").textContent.length);
  }
}).observe(document.querySelector("#conversation"), { childList: true, subtree: true, characterData: true });
"""

# Records each tool call block's arguments text at every change while the answer streams.
RECORD_CALL_ARGUMENTS = """
window.callArguments = [];
new MutationObserver(() => {
  const turn = document.querySelector(".turn:last-of-type");
  if (turn?.dataset.status === "streaming") {
    window.callArguments.push([...turn.querySelectorAll(".tool-call-arguments")].map((block) => block.textContent));
  }
}).observe(document.querySelector("#conversation"), { childList: true, subtree: true, characterData: true });
"""

WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city now.",
            "parameters": {
                "type": "object",
                "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["unit"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a time zone.",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}},
        },
    },
]


def chat_chunk(delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> bytes:
    """One /v1/chat/completions streaming chunk, as the server frames it."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny-gpt-oss"}
    return sse_event(None, chunk | {"choices": choices} | extra)


def call_opening(index: int, call_id: str, name: str) -> bytes:
    opening = {"index": index, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
    return chat_chunk({"tool_calls": [opening]})


def call_fragment(index: int, text: str) -> bytes:
    return chat_chunk({"tool_calls": [{"index": index, "function": {"arguments": text}}]})


CHAT_OPENING = chat_chunk({"role": "assistant", "content": ""}, cached=False)
CHAT_DONE = sse_event(None, "[DONE]")


def chat_end(finish_reason: str, completion_tokens: int) -> bytes:
    timings = {"queue_ms": 0.1, "prefill_ms": 10.0, "ttft_ms": 20.0, "e2e_ms": 1000.0}
    usage = {"prompt_tokens": 9, "completion_tokens": completion_tokens, "total_tokens": 9 + completion_tokens}
    return chat_chunk({}, finish_reason, timings=timings) + chat_chunk(None, usage=usage) + CHAT_DONE


@dataclass
class CannedServer:
    """Answers the page's /generate and /v1/chat/completions with canned SSE bodies, in order,
    and keeps what each request asked for (its path and JSON body)."""

    answers: list[bytes]
    asked: list[tuple[str, Any]] = field(default_factory=list)

    def __call__(self, route: Route, request: Request) -> None:
        self.asked.append((urlsplit(request.url).path, request.post_data_json))
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=self.answers.pop(0))

    def serve(self, playground: Playground) -> CannedServer:
        playground.page.route("**/generate", self)
        playground.page.route("**/v1/chat/completions", self)
        return self


def distinct(states: list[str]) -> list[str]:
    """The states in order, each once, leaving out the empty one."""
    out: list[str] = []
    for state in states:
        if state and (not out or out[-1] != state):
            out.append(state)
    return out


# -- the tests ---------------------------------------------------------------------------------


def test_the_page_streams_an_answer_with_its_figures(
    open_tab: OpenTab, smollm2_app: ServedApp, capsys: pytest.CaptureFixture[str]
) -> None:
    url = smollm2_app.url
    playground = open_tab(url, viewport={"width": 900, "height": 620})
    health = server_json(url, "/health")
    for selector, key in {"#model-id": "model_id", "#model-size": "model_size", "#model-dtype": "dtype"}.items():
        assert playground.page.text_content(selector) == health[key]
    assert playground.page.text_content("#model-profile") == health["profile"]

    question = "Why is the sky blue? Answer in three sentences."
    playground.value(RECORD_PARTIAL_ANSWERS)
    playground.ask(question, max_tokens=120, temperature=0)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=done]")
    partial_lengths = set(playground.value("window.partialAnswerLengths")) - {0}
    assert len(partial_lengths) >= 3, "the answer appears token by token, not all at once"

    answer = playground.last_turn(".answer")
    messages = [{"role": "user", "content": question}]
    same = server_json(url, "/generate", {"messages": messages, "max_tokens": 120, "temperature": 0, "stream": False})
    assert answer == same["text"], "the page's SSE reading joins the tokens to exactly the server's text"
    figures = playground.last_turn(".stats")
    completion = same["usage"]["completion_tokens"]
    assert re.fullmatch(rf"TTFT [\d.]+ m?s · {completion} tokens · [\d.]+ tokens/s · .+", figures), figures
    assert playground.page.is_hidden(".turn:last-of-type .reasoning")  # SmolLM2 does not reason
    assert playground.page.is_enabled("#send") and playground.page.is_disabled("#stop")
    assert not figures.endswith("from the cache")
    playground.only_this_server(url)
    assert playground.console_errors == []

    RESULTS.mkdir(parents=True, exist_ok=True)
    shot = RESULTS / "playground-answer.png"
    playground.page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    with capsys.disabled():
        print(f"\nscreenshot of the answer: {shot}")

    # The same greedy question in a new chat: the server replays its finished answer, and says so.
    playground.page.click("#new-chat")
    assert playground.page.locator(".turn").count() == 0
    playground.ask(question, max_tokens=120, temperature=0)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=done]")
    assert playground.last_turn(".answer") == answer
    assert playground.last_turn(".stats").endswith(" · from the cache")


def test_stop_cancels_the_generation_on_the_server(
    open_tab: OpenTab, tiny_app: ServedApp, capsys: pytest.CaptureFixture[str]
) -> None:
    playground = open_tab(tiny_app.url)
    cancel_mid_answer(playground, tiny_app.url, lambda: playground.page.click("#stop"), "Stop", capsys)

    playground.page.wait_for_selector(".turn:last-of-type[data-status=stopped]")
    shown = playground.tokens_shown()
    assert shown < LONG_ANSWER
    assert re.fullmatch(rf"Stopped after {shown} tokens and [\d.]+ s\.", playground.last_turn(".stats"))
    assert playground.page.is_enabled("#send") and playground.page.is_disabled("#stop")
    time.sleep(0.2)
    assert playground.tokens_shown() == shown, "nothing more arrives once stopped"
    playground.only_this_server(tiny_app.url)


def test_closing_the_tab_cancels_the_generation_on_the_server(
    open_tab: OpenTab, tiny_app: ServedApp, capsys: pytest.CaptureFixture[str]
) -> None:
    playground = open_tab(tiny_app.url)
    cancel_mid_answer(playground, tiny_app.url, playground.page.close, "tab close", capsys)
    figures = server_json(tiny_app.url, "/stats")["model_metrics"]["tiny-gpt-oss"]
    time.sleep(0.2)
    after = server_json(tiny_app.url, "/stats")["model_metrics"]["tiny-gpt-oss"]
    assert after["tokens"]["completion"] == figures["tokens"]["completion"], "nothing generates for a closed tab"


def test_the_page_fits_a_phone(open_tab: OpenTab, tiny_app: ServedApp) -> None:
    phone = {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2, "is_mobile": True, "has_touch": True}
    playground = open_tab(tiny_app.url, **phone)
    playground.ask("A long answer with long words, please.", max_tokens=80)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=done]")
    playground.give_tools(json.dumps(WEATHER_TOOLS[:1]), "required")  # the open Tools fold, and a call
    playground.ask("The weather?", max_tokens=60)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=done] .tool-call")
    width = playground.value("document.documentElement.clientWidth")
    assert playground.value("document.documentElement.scrollWidth") <= width, "no sideways scrolling"
    for selector in ("#prompt", "#send", "#stop", "#new-chat", ".turn:last-of-type .reply", "#tools", ".tool-call"):
        box = playground.page.locator(selector).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width, selector
    RESULTS.mkdir(parents=True, exist_ok=True)
    playground.page.screenshot(path=str(RESULTS / "playground-phone.png"))


def test_a_refused_request_is_shown_in_words(open_tab: OpenTab, tiny_app: ServedApp) -> None:
    playground = open_tab(tiny_app.url)
    playground.ask("hello", max_tokens=10**8)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=error]")
    notice = playground.last_turn(".notice")
    assert notice.startswith("The server refused the request (HTTP 400): This model's maximum context length is")
    assert "in the completion" in notice
    assert playground.page.is_visible(".turn:last-of-type .notice")
    assert playground.page.is_enabled("#send")
    playground.only_this_server(tiny_app.url)


def test_with_an_api_key_the_page_asks_for_it_once_and_keeps_it_for_the_tab(open_tab: OpenTab) -> None:
    """The server refuses /generate without its key (401); the page asks once, keeps the key for
    the tab (sessionStorage, not localStorage), and every later request carries it."""
    key = "tab-only-key-123"
    with app_on_port_zero("--model", "tiny-gpt-oss", "--api-key", key) as app:
        assert httpx.post(f"{app.url}/generate", json={"prompt": "x", "max_tokens": 1}).status_code == 401
        playground = open_tab(app.url)  # /health is open: the page loads and shows the model
        asked: list[str] = []

        def answer(dialog: Any) -> None:
            asked.append(dialog.message)
            dialog.accept(key)

        playground.page.on("dialog", answer)
        playground.ask("hello", max_tokens=3)
        playground.page.wait_for_selector(".turn:last-of-type[data-status=done]")
        playground.ask("again", max_tokens=3)
        playground.page.wait_for_selector(".turn:nth-of-type(2)[data-status=done]")
        stored = playground.value("[sessionStorage.getItem('gptoss-api-key'), localStorage.length]")
    assert len(asked) == 1 and "API key" in asked[0], asked
    assert stored == [key, 0]
    playground.only_this_server(app.url)


def test_reasoning_is_shown_apart_and_stream_errors_in_words(open_tab: OpenTab, tiny_app: ServedApp) -> None:
    """Random weights never open a Harmony channel, so the page reads canned streams here, framed
    by the server's own SSE functions."""
    start = sse_event("start", {"request_id": "req-1", "model": "tiny-gpt-oss", "created": 0, "prompt_tokens": 3})
    streams = [
        start
        + sse_event("token", {"text": "The user wants", "token_id": 1, "index": 0, "channel": "analysis"})
        + sse_comment("keep-alive")
        + sse_event("token", {"text": " a greeting.", "token_id": 2, "index": 1, "channel": "analysis"})
        + sse_event("token", {"text": "Hello", "token_id": 3, "index": 2, "channel": "final"})
        + sse_event("token", {"text": " there!", "token_id": 4, "index": 3})
        + sse_event(
            "done",
            {
                "request_id": "req-1",
                "finish_reason": "stop",
                "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                "timings": {"queue_ms": 0.1, "prefill_ms": 10.0, "ttft_ms": 12.5, "e2e_ms": 500.0},
            },
        ),
        start
        + sse_event("token", {"text": "Half", "token_id": 5, "index": 0})
        + sse_event("error", {"message": "the model runner failed: out of memory", "type": "runner_error"}),
        start + sse_event("token", {"text": "Cut", "token_id": 6, "index": 0}),
    ]

    def canned(route: Route, request: Request) -> None:
        route.fulfill(status=200, headers={"Content-Type": "text/event-stream"}, body=streams.pop(0))

    playground = open_tab(tiny_app.url)
    playground.page.route("**/generate", canned)

    playground.ask("Say hello", max_tokens=10)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=done]")
    assert playground.page.is_visible(".turn:last-of-type .reasoning")
    assert playground.last_turn(".reasoning-text") == "The user wants a greeting."
    assert playground.last_turn(".answer") == "Hello there!"
    assert playground.last_turn(".stats") == "TTFT 13 ms · 4 tokens · 8.0 tokens/s · complete"

    playground.ask("Again", max_tokens=10)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=error]")
    assert playground.last_turn(".answer") == "Half"
    assert playground.last_turn(".notice") == (
        "The server stopped this answer: the model runner failed: out of memory (runner_error)."
    )

    playground.ask("Once more", max_tokens=10)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=error]")
    assert playground.last_turn(".notice") == "The connection closed before the answer finished."
    assert playground.page.locator(".turn").count() == 3


def test_tool_calls_stream_into_blocks_of_their_own(open_tab: OpenTab, tiny_app: ServedApp) -> None:
    """Each call is a block with its name and id; its arguments grow fragment by fragment and are
    pretty-printed once whole; the reasoning and the answer stay apart; no tool is run."""
    first = ['{"unit"', ': "cel', 'sius"}']
    second = ['{"zone":', ' "Europe/Paris"}']
    streams = [
        CHAT_OPENING
        + chat_chunk({"reasoning": "Weather and time.", "reasoning_content": "Weather and time."})
        + chat_chunk({"content": "Let me look."})
        + call_opening(0, "call_w1", "get_weather")
        + b"".join(call_fragment(0, text) for text in first)
        + sse_comment("keep-alive")
        + call_opening(1, "call_t1", "get_time")
        + b"".join(call_fragment(1, text) for text in second)
        + chat_end("tool_calls", 12),
        # The next answers: a call max_tokens cuts off, then one the connection cuts off.
        CHAT_OPENING + call_opening(0, "call_w2", "get_weather") + call_fragment(0, '{"un') + chat_end("length", 5),
        CHAT_OPENING + call_opening(0, "call_w3", "get_weather") + call_fragment(0, '{"unit": "fahr'),
    ]
    playground = open_tab(tiny_app.url, viewport={"width": 900, "height": 1300})  # tall: all in one shot
    server = CannedServer(streams).serve(playground)
    playground.give_tools(json.dumps(WEATHER_TOOLS))
    playground.value(RECORD_CALL_ARGUMENTS)

    playground.ask("Weather and time in Paris?", max_tokens=50)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=done]")
    states = playground.value("window.callArguments")
    first_whole, second_whole = "".join(first), "".join(second)
    pretty = [json.dumps(json.loads(first_whole), indent=2), json.dumps(json.loads(second_whole), indent=2)]
    assert distinct([state[0] for state in states if state]) == [
        first[0],
        first[0] + first[1],
        first_whole,
        pretty[0],  # whole once the next call opens
    ], "the first call's arguments grow fragment by fragment, then show as pretty JSON"
    assert distinct([state[1] for state in states if len(state) > 1]) == [second[0], second_whole]

    blocks = playground.page.locator(".turn:last-of-type .tool-call")
    assert blocks.count() == 2
    for i, (name, call_id) in enumerate([("get_weather", "call_w1"), ("get_time", "call_t1")]):
        block = blocks.nth(i)
        assert block.locator(".tool-call-name").text_content() == name
        assert block.locator(".tool-call-id-value").text_content() == call_id
        assert block.locator(".tool-call-state").text_content() == "complete"
        assert block.locator(".tool-call-arguments").text_content() == pretty[i]
        assert block.get_attribute("aria-label") == f"Tool call {name}"
    assert playground.last_turn(".reasoning-text") == "Weather and time."
    assert playground.last_turn(".answer") == "Let me look."
    assert playground.page.is_visible(".turn:last-of-type .tool-note")
    assert playground.last_turn(".stats") == (
        "TTFT 20 ms · 12 tokens · 12.0 tokens/s · ended for tool calls (finish_reason tool_calls)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    playground.page.screenshot(path=str(RESULTS / "playground-tool-calls.png"))

    playground.ask("And tomorrow?", max_tokens=5)
    playground.page.wait_for_selector(".turn:nth-of-type(2)[data-status=done]")
    assert playground.last_turn(".tool-call-state") == "cut off before it ended"
    assert playground.last_turn(".tool-call-arguments") == '{"un'
    assert playground.last_turn(".stats").endswith(" · max tokens reached")

    playground.ask("And the day after?", max_tokens=50)
    playground.page.wait_for_selector(".turn:nth-of-type(3)[data-status=error]")
    assert playground.last_turn(".tool-call-state") == "cut off before it ended"
    assert playground.last_turn(".tool-call-arguments") == '{"unit": "fahr'
    assert playground.last_turn(".notice") == "The connection closed before the answer finished."
    # The whole calls went back as the assistant's message of the first answer (the page ran none,
    # so no tool message answers them); a cut-off call is no call.
    _, body = server.asked[2]
    assert body["messages"][3] == {"role": "assistant", "content": ""}
    assert body["messages"][1] == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {"id": "call_w1", "type": "function", "function": {"name": "get_weather", "arguments": first_whole}},
            {"id": "call_t1", "type": "function", "function": {"name": "get_time", "arguments": second_whole}},
        ],
    }
    playground.only_this_server(tiny_app.url)


def test_the_request_carries_the_tools_only_when_given(open_tab: OpenTab, tiny_app: ServedApp) -> None:
    generate_answer = (
        sse_event("start", {"request_id": "req-2", "model": "tiny-gpt-oss", "created": 0, "prompt_tokens": 3})
        + sse_event("token", {"text": "Hi", "token_id": 1, "index": 0})
        + sse_event("done", {"request_id": "req-2", "finish_reason": "stop", "usage": {"completion_tokens": 1}})
    )
    chat_answer = CHAT_OPENING + chat_chunk({"content": "Hi"}) + chat_end("stop", 1)
    playground = open_tab(tiny_app.url)
    server = CannedServer([chat_answer, chat_answer, generate_answer]).serve(playground)

    playground.give_tools(json.dumps(WEATHER_TOOLS), "required")
    playground.ask("Weather?", max_tokens=20)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=done]")
    playground.give_tools(json.dumps(WEATHER_TOOLS[:1]), "none")
    playground.ask("Again?", max_tokens=20)
    playground.page.wait_for_selector(".turn:nth-of-type(2)[data-status=done]")
    playground.give_tools("  \n", "required")  # blank: no tools, and so no tool_choice
    playground.ask("Plainly?", max_tokens=20)
    playground.page.wait_for_selector(".turn:nth-of-type(3)[data-status=done]")

    paths = [path for path, _ in server.asked]
    assert paths == ["/v1/chat/completions", "/v1/chat/completions", "/generate"]
    (_, forced), (_, none), (_, plain) = server.asked
    assert forced["tools"] == WEATHER_TOOLS and forced["tool_choice"] == "required"
    assert forced["stream"] is True and forced["stream_options"] == {"include_usage": True}
    assert forced["max_tokens"] == 20 and forced["messages"] == [{"role": "user", "content": "Weather?"}]
    assert none["tools"] == WEATHER_TOOLS[:1] and none["tool_choice"] == "none"
    assert "tools" not in plain and "tool_choice" not in plain and "stream_options" not in plain
    assert playground.last_turn(".answer") == "Hi"
    assert playground.page.locator(".tool-call").count() == 0
    assert playground.last_turn(".stats").endswith("complete")


@pytest.mark.parametrize(
    ("tools", "said"),
    [
        ('[{"type": "function"', "Tools is not valid JSON: "),
        ('{"type": "function", "function": {"name": "f"}}', "Tools must be a JSON array of tools"),
        ("[]", "Tools is an empty array"),
        ('[{"name": "f"}]', "Tool 1 is not a function tool"),
    ],
)
def test_tools_that_are_not_a_json_array_are_refused_before_sending(
    open_tab: OpenTab, tiny_app: ServedApp, tools: str, said: str
) -> None:
    playground = open_tab(tiny_app.url)
    server = CannedServer([CHAT_OPENING + chat_chunk({"content": "Hi"}) + chat_end("stop", 1)]).serve(playground)
    playground.give_tools(tools)
    playground.ask("Weather?", max_tokens=20)
    playground.page.wait_for_selector("#tools-error:not([hidden])")
    error = playground.page.text_content("#tools-error") or ""
    assert error.startswith(said) and error.endswith("Nothing was sent."), error
    assert playground.page.get_attribute("#tools", "aria-invalid") == "true"
    assert playground.value("document.activeElement.id") == "tools"
    assert server.asked == [] and playground.page.locator(".turn").count() == 0
    assert playground.page.input_value("#prompt") == "Weather?", "the prompt waits for the tools to be mended"

    playground.give_tools(json.dumps(WEATHER_TOOLS))
    playground.page.click("#send")
    playground.page.wait_for_selector(".turn:last-of-type[data-status=done]")
    assert playground.page.is_hidden("#tools-error")
    assert playground.page.get_attribute("#tools", "aria-invalid") is None
    assert [path for path, _ in server.asked] == ["/v1/chat/completions"]
    playground.only_this_server(tiny_app.url)


def test_a_forced_call_from_the_model_shows_in_the_page(open_tab: OpenTab, tiny_app: ServedApp) -> None:
    """tool_choice required: the server's grammar makes even random weights call a tool."""
    playground = open_tab(tiny_app.url)
    playground.give_tools(json.dumps(WEATHER_TOOLS[:1]), "required")
    playground.ask("What is the weather?", max_tokens=100)
    playground.page.wait_for_selector(".turn:last-of-type[data-status=done]")
    block = playground.page.locator(".turn:last-of-type .tool-call")
    assert block.count() == 1
    assert block.locator(".tool-call-name").text_content() == "get_weather"
    assert (block.locator(".tool-call-id-value").text_content() or "").startswith("call_")
    assert block.locator(".tool-call-state").text_content() == "complete"
    shown = block.locator(".tool-call-arguments").text_content() or ""
    arguments = json.loads(shown)
    assert arguments["unit"] in ("celsius", "fahrenheit")
    assert shown == json.dumps(arguments, indent=2)
    assert playground.last_turn(".stats").endswith(" · ended for tool calls (finish_reason tool_calls)")

    # The call goes back as context; a plain question after it (no tools) is answered.
    playground.give_tools("")
    playground.ask("Thanks.", max_tokens=3)
    playground.page.wait_for_selector(".turn:nth-of-type(2)[data-status=done]")
    assert playground.page.locator(".turn:nth-of-type(2) .tool-call").count() == 0
    playground.only_this_server(tiny_app.url)
    assert playground.console_errors == []
