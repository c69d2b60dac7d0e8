// tsedge chat page: streams replies from /v1/chat/completions (server-sent events) and shows the
// model's policy and each reply's speed. The whole conversation is sent each turn; the server
// reuses the KV cache of the previous turn, so only the new message is prefilled.
"use strict";

const log = document.getElementById("log");
const input = document.getElementById("input");
const send = document.getElementById("send");
let model = null;
let messages = [];
let running = null; // AbortController of the reply being streamed

function bubble(kind, text) {
  const node = document.createElement("div");
  node.className = kind === "stats" ? "stats" : `msg ${kind}`;
  node.textContent = text;
  log.appendChild(node);
  log.scrollTop = log.scrollHeight;
  return node;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models");
    const card = (await response.json()).data[0];
    model = card.id;
    document.getElementById("model").textContent =
      `${card.id} · policy ${card.policy} · ${card.target} ${card.dtype} · context ${card.max_context} tokens`;
  } catch (err) {
    document.getElementById("model").textContent = `server unreachable (${err.message}); is tsedge serve running?`;
  }
}

// Yields each parsed `data:` event of a server-sent-events response body.
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end).trim();
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      if (line === "data: [DONE]") return;
      yield JSON.parse(line.slice(6));
    }
  }
}

function speed(t, usage, finish) {
  const cut = finish === "length" ? " · cut at the length limit" : "";
  return `${usage.completion_tokens} tokens · TTFT ${t.ttft_ms.toFixed(0)} ms · ` +
    `prefill ${t.prefill_tok_per_s.toFixed(1)} tok/s · decode ${t.decode_tok_per_s.toFixed(1)} tok/s · ` +
    `${usage.prompt_tokens_details.cached_tokens} of ${usage.prompt_tokens} prompt tokens cached${cut}`;
}

async function ask(text) {
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.dataset.state = "streaming";
  running = new AbortController();
  send.textContent = "Stop";
  let final = null;
  let usage = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ model, messages, stream: true, stream_options: { include_usage: true } }),
      signal: running.signal,
    });
    if (!response.ok) throw new Error((await response.json()).error.message);
    for await (const event of events(response.body)) {
      if (event.error) throw new Error(event.error.message);
      if (event.usage) usage = event.usage;
      const choice = event.choices[0];
      if (!choice) continue;
      reply.textContent += choice.delta.content || "";
      log.scrollTop = log.scrollHeight;
      if (choice.finish_reason) final = event;
    }
    messages.push({ role: "assistant", content: reply.textContent });
    if (final && usage) bubble("stats", speed(final.timings, usage, final.choices[0].finish_reason));
    reply.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") { // keep what was streamed, as tsedge chat does on Ctrl-C
      messages.push({ role: "assistant", content: reply.textContent });
      bubble("stats", "stopped");
      reply.dataset.state = "stopped";
    } else {
      messages.pop();
      reply.className = "msg error";
      reply.textContent = err.message;
      reply.dataset.state = "failed";
    }
  } finally {
    running = null;
    send.textContent = "Send";
  }
}

document.getElementById("form").addEventListener("submit", (event) => {
  event.preventDefault();
  if (running) {
    running.abort();
    return;
  }
  const text = input.value.trim();
  if (!text || !model) return;
  input.value = "";
  ask(text);
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    document.getElementById("form").requestSubmit();
  }
});

document.getElementById("reset").addEventListener("click", () => {
  if (running) running.abort();
  messages = [];
  log.replaceChildren();
});

loadModel();
