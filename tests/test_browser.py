"""The playground in a real browser: Debian's headless Chromium driven by Playwright's sync API.

The server runs as ``python -m app`` in a subprocess (a user's server, not one in this test's
event loop: Playwright's sync API cannot run inside a trio loop, and the browser's connection must
be a real one that closes when a tab does). Nothing here downloads a browser: without
/usr/bin/chromium the tests skip, except in CI, where ``.ci/run`` installs it and they must run.
"""

from __future__ import annotations

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
    width = playground.value("document.documentElement.clientWidth")
    assert playground.value("document.documentElement.scrollWidth") <= width, "no sideways scrolling"
    for selector in ("#prompt", "#send", "#stop", "#new-chat", ".turn:last-of-type .reply"):
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
