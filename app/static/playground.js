// The playground: one conversation with the server's model over POST /generate (named SSE events),
// or over POST /v1/chat/completions (OpenAI's chunks) when the person gives tools: their calls are
// shown as they stream, and never run. No framework and no build step; URLs are relative so the
// page also works behind a path prefix.

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
  toolsPanel: $("#tools-panel"),
  tools: $("#tools"),
  toolChoice: $("#tool-choice"),
  toolsError: $("#tools-error"),
  callTemplate: $("#tool-call-template"),
};

// Finished exchanges, sent back as context with the next prompt.
let history = [];
let current = null; // {controller} while an answer streams

// An error whose message is already worded for the person reading the page.
class ShownError extends Error {}

// The data of OpenAI's last event, `data: [DONE]`, which is not JSON.
const DONE = Symbol("[DONE]");

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
  if (data.join("\n") === "[DONE]") return { name, data: DONE };
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
    toolCalls: $(".tool-calls", turn),
    notice: $(".notice", turn),
    stats: $(".stats", turn),
  };
}

// -- tools -----------------------------------------------------------------------------------

// The Tools field: null when empty, else the array it holds. Throws a ShownError that says what
// is wrong when it is not a JSON array of function tools (the server checks the rest).
function readTools() {
  const text = ui.tools.value.trim();
  if (!text) return null;
  let tools;
  try {
    tools = JSON.parse(text);
  } catch (error) {
    throw new ShownError(`Tools is not valid JSON: ${error.message}. Nothing was sent.`);
  }
  if (!Array.isArray(tools)) {
    const kind = tools === null ? "null" : typeof tools;
    const shape = '[{"type": "function", "function": {"name": …}}]';
    const not = kind === "object" ? "an object" : kind;
    throw new ShownError(`Tools must be a JSON array of tools, ${shape}, not ${not}. Nothing was sent.`);
  }
  if (tools.length === 0) {
    const why = "Tools is an empty array: give at least one tool, or leave the field empty.";
    throw new ShownError(`${why} Nothing was sent.`);
  }
  tools.forEach((tool, i) => {
    if (tool?.type !== "function" || typeof tool.function?.name !== "string") {
      const needs = 'each needs "type": "function" and a "function" with a "name"';
      throw new ShownError(`Tool ${i + 1} is not a function tool: ${needs}. Nothing was sent.`);
    }
  });
  return tools;
}

function showToolsError(text) {
  ui.toolsError.hidden = !text;
  ui.toolsError.textContent = text ?? "";
  if (text) {
    ui.tools.setAttribute("aria-invalid", "true");
    ui.toolsPanel.open = true;
    ui.tools.focus();
  } else {
    ui.tools.removeAttribute("aria-invalid");
  }
}

// One streamed tool call: its block, and the arguments text so far.
function addCall(turn, index) {
  const element = ui.callTemplate.content.firstElementChild.cloneNode(true);
  element.dataset.index = String(index);
  const follow = nearEnd();
  turn.toolCalls.hidden = false;
  turn.toolCalls.append(element);
  scrollToEnd(follow);
  return {
    element,
    name: $(".tool-call-name", element),
    id: $(".tool-call-id-value", element),
    state: $(".tool-call-state", element),
    arguments: $(".tool-call-arguments", element),
    text: "",
    record: { id: "", type: "function", function: { name: "", arguments: "" } },
    settled: false,
  };
}

// A `delta.tool_calls` entry: the first of a call has its index, id, type and name; the later ones
// add `function.arguments` fragments.
function streamCall(turn, reply, delta) {
  const index = delta.index ?? 0;
  let call = reply.calls.get(index);
  if (!call) {
    // A call opens once the one before it has ended: those are whole.
    for (const earlier of reply.calls.values()) settleCall(earlier, true);
    call = addCall(turn, index);
    reply.calls.set(index, call);
  }
  if (delta.id) {
    call.record.id = delta.id;
    call.id.textContent = delta.id;
  }
  const name = delta.function?.name;
  if (name) {
    call.record.function.name = name;
    call.name.textContent = name;
    call.element.setAttribute("aria-label", `Tool call ${name}`);
  }
  const fragment = delta.function?.arguments;
  if (fragment) {
    call.text += fragment;
    append(call.arguments, fragment);
  }
}

// A call is over: whole (pretty-printed when its arguments are JSON) or cut off.
function settleCall(call, whole) {
  if (call.settled) return;
  call.settled = true;
  call.record.function.arguments = call.text;
  if (!whole) {
    call.element.dataset.status = "cut";
    call.state.textContent = "cut off before it ended";
    return;
  }
  const follow = nearEnd(); // pretty JSON takes more lines: keep following the end
  try {
    call.arguments.textContent = JSON.stringify(JSON.parse(call.text), null, 2);
    call.element.dataset.status = "complete";
    call.state.textContent = "complete";
  } catch {
    call.element.dataset.status = "invalid";
    call.state.textContent = "complete, but its arguments are not valid JSON";
  }
  scrollToEnd(follow);
}

// -- one answer ------------------------------------------------------------------------------

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

async function post(path, body, signal) {
  const send = () =>
    fetch(path, {
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

// What one answer has shown so far.
function newReply() {
  return { tokens: 0, answer: "", done: null, cached: false, calls: new Map() };
}

function countToken(turn, reply) {
  reply.tokens += 1;
  turn.element.dataset.tokens = String(reply.tokens);
}

// POST /generate's named events: start, token, done, error.
async function readGenerate(response, turn, reply) {
  for await (const event of sseEvents(response.body)) {
    if (event.name === "start") {
      turn.element.dataset.requestId = event.data.request_id ?? "";
      reply.cached = event.data.cached === true;
    } else if (event.name === "token") {
      if (event.data.channel === "analysis") {
        appendReasoning(turn, event.data.text);
      } else {
        reply.answer += event.data.text;
        append(turn.answer, event.data.text);
      }
      countToken(turn, reply);
    } else if (event.name === "done") {
      reply.done = event.data;
    } else if (event.name === "error") {
      throw stoppedBy(event.data);
    }
  }
}

// POST /v1/chat/completions' chunks: deltas of reasoning, content and tool calls; the finish
// chunk with its timings; the usage chunk; then `data: [DONE]`.
async function readChat(response, turn, reply) {
  let finishReason = null;
  let timings = null;
  let usage = null;
  for await (const { data: chunk } of sseEvents(response.body)) {
    if (chunk === DONE) break;
    if (chunk.error) throw stoppedBy(chunk.error);
    if (!turn.element.dataset.requestId) turn.element.dataset.requestId = chunk.id ?? "";
    if (chunk.cached === true) reply.cached = true;
    if (chunk.timings) timings = chunk.timings;
    if (chunk.usage) usage = chunk.usage;
    for (const choice of chunk.choices ?? []) {
      const delta = choice.delta ?? {};
      const reasoning = delta.reasoning ?? delta.reasoning_content;
      if (reasoning) appendReasoning(turn, reasoning);
      if (delta.content) {
        reply.answer += delta.content;
        append(turn.answer, delta.content);
      }
      for (const call of delta.tool_calls ?? []) streamCall(turn, reply, call);
      if (reasoning || delta.content || delta.tool_calls?.length) countToken(turn, reply);
      if (choice.finish_reason) finishReason = choice.finish_reason;
    }
  }
  if (finishReason) {
    reply.done = { finish_reason: finishReason, usage: usage ?? { completion_tokens: reply.tokens }, timings };
  }
}

function stoppedBy(error) {
  const kind = error.type ? ` (${error.type})` : "";
  const message = String(error.message ?? "no reason given").replace(/\.$/, "");
  return new ShownError(`The server stopped this answer: ${message}${kind}.`);
}

// The assistant's message for the history: its text, and the whole calls it asked for (one cut
// off, or without JSON arguments or an id, is not a call the server would take back).
function assistantMessage(reply, withCalls) {
  const whole = [...reply.calls.values()].filter((call) => call.element.dataset.status === "complete");
  const calls = withCalls ? whole.filter((call) => call.record.id).map((call) => call.record) : [];
  if (calls.length === 0) return { role: "assistant", content: reply.answer };
  return { role: "assistant", content: reply.answer || null, tool_calls: calls };
}

async function ask(question, tools) {
  const turn = addTurn(question);
  const messages = [...history, { role: "user", content: question }];
  const controller = new AbortController();
  current = { controller };
  setBusy(true);
  const startedAt = performance.now();
  const reply = newReply();
  try {
    const body = requestBody(messages);
    let path = "generate";
    let read = readGenerate;
    if (tools) {
      Object.assign(body, { tools, tool_choice: ui.toolChoice.value, stream_options: { include_usage: true } });
      path = "v1/chat/completions";
      read = readChat;
    }
    const response = await post(path, JSON.stringify(body), controller.signal);
    if (!response.ok) throw new ShownError(await refusal(response));
    await read(response, turn, reply);
    const done = reply.done;
    if (!done) throw new ShownError("The connection closed before the answer finished.");
    // At max tokens the last call may be cut off; else the model ended it.
    for (const call of reply.calls.values()) settleCall(call, done.finish_reason !== "length");
    finish(turn, "done", doneStats(done, reply.cached));
    const ending = ENDINGS[done.finish_reason];
    if (ending) showNotice(turn, ending);
    history = [...messages, assistantMessage(reply, true)];
  } catch (error) {
    for (const call of reply.calls.values()) settleCall(call, false);
    const tokens = reply.tokens;
    if (controller.signal.aborted) {
      const seconds = ((performance.now() - startedAt) / 1000).toFixed(1);
      finish(turn, "stopped", `Stopped after ${tokens} ${plural(tokens, "token")} and ${seconds} s.`);
      // A call cut off is no call: only the text goes back as context.
      if (reply.answer) history = [...messages, assistantMessage(reply, false)];
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

const FINISH_WORDS = {
  stop: "complete",
  length: "max tokens reached",
  tool_calls: "ended for tool calls (finish_reason tool_calls)",
};

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
  let tools;
  try {
    tools = readTools();
  } catch (error) {
    showToolsError(describe(error));
    return; // the prompt stays in its field, to send once the tools are mended
  }
  showToolsError(null);
  ui.prompt.value = "";
  ask(question, tools);
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
