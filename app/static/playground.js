// The playground: one conversation with the server's model over POST /generate (named SSE events).
// No framework and no build step; URLs are relative so the page also works behind a path prefix.

const $ = (selector, root = document) => root.querySelector(selector);

const ui = {
  conversation: $("#conversation"),
  empty: $("#empty"),
  form: $("#composer"),
  prompt: $("#prompt"),
  maxTokens: $("#max-tokens"),
  temperature: $("#temperature"),
  effort: $("#effort"),
  effortLabel: $("#effort-label"),
  send: $("#send"),
  stop: $("#stop"),
  newChat: $("#new-chat"),
  healthError: $("#health-error"),
  template: $("#turn-template"),
};

// Finished exchanges, sent back as context with the next prompt.
let history = [];
let current = null; // {controller} while an answer streams

// An error whose message is already worded for the person reading the page.
class ShownError extends Error {}

// -- /health ---------------------------------------------------------------------------------

async function showHealth() {
  let response;
  let body;
  try {
    response = await fetch("health", { cache: "no-store" });
  } catch (error) {
    setStatus("unreachable", "unreachable");
    showHealthError(`Could not reach the server (${error.message}). Is it running?`);
    setTimeout(showHealth, 3000);
    return;
  }
  try {
    body = await response.json();
  } catch {
    setStatus("unknown", `HTTP ${response.status}`);
    showHealthError(`The server's /health answered HTTP ${response.status}, not with its JSON.`);
    return;
  }
  $("#model-id").textContent = body.model_id ?? "—";
  $("#model-size").textContent = body.model_size ?? "—";
  $("#model-dtype").textContent = body.dtype ?? "—";
  $("#model-profile").textContent = body.profile ?? "—";
  // Reasoning effort means something to gpt-oss (Harmony) only.
  ui.effortLabel.hidden = !/gpt-oss/i.test(body.model_id ?? "");
  setStatus(body.status, body.status === "ok" ? `ready on ${body.device}` : body.status);
  if (response.ok) {
    showHealthError(null);
  } else {
    const why = body.error ? `: ${body.error}` : "";
    showHealthError(`The server is not ready (${body.status}${why}).`);
    if (body.status === "loading") setTimeout(showHealth, 2000);
  }
}

function setStatus(key, text) {
  const element = $("#model-status");
  element.dataset.status = key;
  element.textContent = text;
}

function showHealthError(text) {
  ui.healthError.hidden = !text;
  ui.healthError.textContent = text ?? "";
}

// -- server-sent events ----------------------------------------------------------------------

// Yields {name, data} for each event of an SSE body; comments (heartbeats) are skipped.
async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      // A "\r" at the end of one chunk meets its "\n" in the next: normalise the joined buffer.
      buffer = (buffer + value).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) !== -1) {
        const event = parseEvent(buffer.slice(0, end));
        buffer = buffer.slice(end + 2);
        if (event) yield event;
      }
    }
  } finally {
    // Leaving early (an error event, a bad line): close the body, so the connection closes and
    // the server stops the generation. After the end, or an abort, this does nothing.
    reader.cancel().catch(() => {});
  }
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    const value = colon === -1 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  if (data.length === 0) return null;
  try {
    return { name, data: JSON.parse(data.join("\n")) };
  } catch {
    throw new ShownError(`The server sent a "${name}" event that is not JSON: ${data.join(" ").slice(0, 200)}`);
  }
}

// The words for a refused request: the server's own message when it sent one.
async function refusal(response) {
  const text = await response.text();
  let message = text.trim().slice(0, 500) || response.statusText;
  try {
    message = String(JSON.parse(text).error.message ?? message);
  } catch {
    // not the server's JSON error shape (a proxy's page, say): show the text as it came
  }
  const retry = response.headers.get("Retry-After");
  const later = retry ? ` Try again in ${retry} s.` : "";
  return `The server refused the request (HTTP ${response.status}): ${message.replace(/\.$/, "")}.${later}`;
}

// -- one answer ------------------------------------------------------------------------------

function addTurn(question) {
  const turn = ui.template.content.firstElementChild.cloneNode(true);
  $(".question", turn).textContent = question;
  ui.empty.hidden = true;
  ui.conversation.append(turn);
  scrollToEnd(true);
  return {
    element: turn,
    reasoning: $(".reasoning", turn),
    reasoningText: $(".reasoning-text", turn),
    answer: $(".answer", turn),
    notice: $(".notice", turn),
    stats: $(".stats", turn),
  };
}

function requestBody(messages) {
  const body = { messages, stream: true };
  if (!ui.effortLabel.hidden) body.reasoning_effort = ui.effort.value;
  const maxTokens = Number.parseInt(ui.maxTokens.value, 10);
  const temperature = Number.parseFloat(ui.temperature.value);
  // Empty or unreadable fields are left out: the server's defaults apply.
  if (Number.isFinite(maxTokens)) body.max_tokens = maxTokens;
  if (Number.isFinite(temperature)) body.temperature = temperature;
  return body;
}

// With --api-key the server answers 401 without one: ask for it once, keep it for this tab only
// (sessionStorage: gone when the tab closes, never sent to another origin).
const KEY_ITEM = "gptoss-api-key";

function authorization() {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function postGenerate(body, signal) {
  const send = () =>
    fetch("generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream", ...authorization() },
      body,
      signal,
      cache: "no-store",
    });
  let response = await send();
  if (response.status === 401) {
    const key = window.prompt("This server needs an API key (kept for this tab only):");
    if (key && key.trim()) {
      sessionStorage.setItem(KEY_ITEM, key.trim());
      response = await send();
    }
  }
  return response;
}

async function ask(question) {
  const turn = addTurn(question);
  const messages = [...history, { role: "user", content: question }];
  const controller = new AbortController();
  current = { controller };
  setBusy(true);
  const startedAt = performance.now();
  let tokens = 0;
  let answer = "";
  let done = null;
  let cached = false;
  try {
    const response = await postGenerate(JSON.stringify(requestBody(messages)), controller.signal);
    if (!response.ok) throw new ShownError(await refusal(response));
    for await (const event of sseEvents(response.body)) {
      if (event.name === "start") {
        turn.element.dataset.requestId = event.data.request_id ?? "";
        cached = event.data.cached === true;
      } else if (event.name === "token") {
        tokens += 1;
        if (event.data.channel === "analysis") {
          appendReasoning(turn, event.data.text);
        } else {
          answer += event.data.text;
          append(turn.answer, event.data.text);
        }
        turn.element.dataset.tokens = String(tokens);
      } else if (event.name === "done") {
        done = event.data;
      } else if (event.name === "error") {
        const kind = event.data.type ? ` (${event.data.type})` : "";
        const message = String(event.data.message ?? "no reason given").replace(/\.$/, "");
        throw new ShownError(`The server stopped this answer: ${message}${kind}.`);
      }
    }
    if (!done) throw new ShownError("The connection closed before the answer finished.");
    finish(turn, "done", doneStats(done, cached));
    const ending = ENDINGS[done.finish_reason];
    if (ending) showNotice(turn, ending);
    history = [...messages, { role: "assistant", content: answer }];
  } catch (error) {
    if (controller.signal.aborted) {
      const seconds = ((performance.now() - startedAt) / 1000).toFixed(1);
      finish(turn, "stopped", `Stopped after ${tokens} ${plural(tokens, "token")} and ${seconds} s.`);
      if (answer) history = [...messages, { role: "assistant", content: answer }];
    } else {
      finish(turn, "error", tokens ? `${tokens} ${plural(tokens, "token")} before the error.` : "");
      showNotice(turn, describe(error));
    }
  } finally {
    current = null;
    setBusy(false);
  }
}

// How the server ended an answer, in words, when it is not the usual end.
const ENDINGS = {
  cancelled: "The server cancelled this answer.",
  timeout: "The server ended this answer: its time limit passed.",
  shutdown: "The server is shutting down and ended this answer.",
  error: "The server ended this answer with an error.",
};

const FINISH_WORDS = { stop: "complete", length: "max tokens reached" };

function describe(error) {
  if (error instanceof ShownError) return error.message;
  if (error instanceof TypeError) return `Could not reach the server (${error.message}). Is it still running?`;
  return `Something went wrong while reading the answer: ${error.message ?? error}`;
}

function doneStats(done, cached) {
  const completion = done.usage?.completion_tokens ?? 0;
  const ttft = done.timings?.ttft_ms;
  const e2e = done.timings?.e2e_ms;
  const parts = [];
  if (ttft != null) parts.push(`TTFT ${formatMs(ttft)}`);
  parts.push(`${completion} ${plural(completion, "token")}`);
  if (e2e) parts.push(`${(completion / (e2e / 1000)).toFixed(1)} tokens/s`);
  parts.push(FINISH_WORDS[done.finish_reason] ?? done.finish_reason);
  // A deterministic answer the server had finished before: replayed without the model.
  if (cached) parts.push("from the cache");
  return parts.join(" · ");
}

function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

function plural(count, word) {
  return count === 1 ? word : `${word}s`;
}

function appendReasoning(turn, text) {
  if (turn.reasoning.hidden) {
    turn.reasoning.hidden = false;
    turn.reasoning.open = true;
  }
  append(turn.reasoningText, text);
}

function append(element, text) {
  if (!text) return;
  const follow = nearEnd();
  element.append(text); // a text node: the model's output is never parsed as HTML
  scrollToEnd(follow);
}

function finish(turn, status, stats) {
  const follow = nearEnd();
  turn.element.dataset.status = status;
  turn.stats.textContent = stats;
  scrollToEnd(follow);
}

function showNotice(turn, text) {
  turn.notice.hidden = false;
  turn.notice.textContent = text;
  scrollToEnd(true);
}

// -- the page --------------------------------------------------------------------------------

function nearEnd() {
  const page = document.scrollingElement;
  return page.scrollHeight - page.scrollTop - page.clientHeight < 80;
}

function scrollToEnd(follow) {
  if (follow) window.scrollTo({ top: document.scrollingElement.scrollHeight });
}

function setBusy(busy) {
  document.body.dataset.busy = String(busy);
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.newChat.disabled = busy;
}

ui.form.addEventListener("submit", (event) => {
  event.preventDefault();
  const question = ui.prompt.value.trim();
  if (!question || current) return;
  ui.prompt.value = "";
  ask(question);
});

ui.prompt.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    ui.form.requestSubmit();
  }
});

// Aborting the fetch closes the connection; the server cancels the generation when it sees that.
ui.stop.addEventListener("click", () => current?.controller.abort());

ui.newChat.addEventListener("click", () => {
  history = [];
  for (const turn of ui.conversation.querySelectorAll(".turn")) turn.remove();
  ui.empty.hidden = false;
  ui.prompt.focus();
});

showHealth();
ui.prompt.focus();
