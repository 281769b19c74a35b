// The page's client: a durable native stream read with fetch, resumed after a drop.
// No build step and no library. Every event is an SSE event whose id is the contract's sequence,
// so after a dropped connection the page asks for what follows the last id it showed (the
// Last-Event-ID header), and nothing is lost or shown twice.
"use strict";

const $ = (id) => document.getElementById(id);
// How long the server keeps the stream for a reader to come back (seconds).
const RESUME_WINDOW = "60s";
const MAX_RECONNECTS = 20;

let current = null; // {id, token, last, controller, stopped}

function setStatus(text, state) {
  $("status").textContent = text;
  $("status").dataset.state = state || "";
}

async function loadModels() {
  const answer = await fetch("/v1/models");
  const { data } = await answer.json();
  for (const model of data) {
    const option = document.createElement("option");
    option.value = option.textContent = model.id;
    $("model").append(option);
  }
}

// Parses an SSE body as it arrives; calls onEvent({id, event, data}) per complete event.
async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = { id: null, event: "message", data: "" };
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue; // a comment: a heartbeat
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "id") event.id = text;
        else if (field === "event") event.event = text;
        else if (field === "data") event.data += text;
      }
      if (event.data) onEvent(event);
    }
  }
}

function show(stream, event) {
  const sequence = Number(event.id);
  // A resumed stream starts after the cursor; anything at or before it was shown already.
  if (sequence <= stream.last) return false;
  stream.last = sequence;
  $("last").textContent = String(sequence);
  const message = JSON.parse(event.data);
  const now = performance.now();
  if (event.event === "start") {
    stream.id = message.start.streamId;
    stream.token = message.start.resumeToken;
    $("stop").disabled = false;
  } else if (event.event === "text_delta") {
    if (stream.firstAt === null) {
      stream.firstAt = now;
      $("ttft").textContent = `${Math.round(now - stream.sentAt)} ms`;
    }
    stream.chunks += 1;
    $("answer").textContent += message.textDelta.text;
    const seconds = (now - stream.firstAt) / 1000;
    if (seconds > 0.2) $("tps").textContent = (stream.chunks / seconds).toFixed(1);
  } else if (event.event === "finish") {
    const timing = message.finish.timing || {};
    if (timing.outputTokensPerSecond) $("tps").textContent = timing.outputTokensPerSecond.toFixed(1);
    stream.ended = true;
    setStatus(`finished (${(message.finish.reason || "").replace("FINISH_REASON_", "").toLowerCase()})`, "done");
  } else if (event.event === "error") {
    stream.ended = true;
    setStatus(`error: ${message.error.message}`, "error");
  }
  return true;
}

async function run(stream) {
  let attempt = 0;
  while (!stream.ended && !stream.stopped) {
    stream.controller = new AbortController();
    let response;
    try {
      if (stream.id === null) {
        response = await fetch("/v1/streams", {
          method: "POST",
          headers: { "Content-Type": "application/json" },
          body: JSON.stringify({
            model: $("model").value,
            messages: [{ role: "ROLE_USER", text: $("prompt").value }],
            resumeWindow: RESUME_WINDOW,
          }),
          signal: stream.controller.signal,
        });
      } else {
        const query = new URLSearchParams({ token: stream.token });
        response = await fetch(`/v1/streams/${encodeURIComponent(stream.id)}?${query}`, {
          headers: { "Last-Event-ID": String(stream.last) },
          signal: stream.controller.signal,
        });
      }
      if (response.status === 204) return; // nothing after the cursor: the stream had ended
      if (!response.ok) {
        const body = await response.json().catch(() => ({}));
        setStatus(`error ${response.status}: ${(body.error && body.error.message) || response.statusText}`, "error");
        return;
      }
      setStatus(attempt ? "streaming (resumed)" : "streaming", "streaming");
      await readEvents(response, (event) => {
        if (show(stream, event)) attempt = 0;
      });
    } catch (err) {
      if (stream.stopped) return;
    }
    if (stream.ended || stream.stopped) return;
    // The connection broke before the terminal event: resume after the last event shown.
    if (stream.id === null || ++attempt > MAX_RECONNECTS) {
      setStatus("connection lost", "error");
      return;
    }
    stream.reconnects += 1;
    $("reconnects").textContent = String(stream.reconnects);
    setStatus(`reconnecting (${attempt})`, "reconnecting");
    await new Promise((resolve) => setTimeout(resolve, Math.min(2000, 100 * 2 ** attempt)));
  }
}

async function send(event) {
  event.preventDefault();
  if (current && !current.ended) return;
  $("answer").textContent = "";
  $("ttft").textContent = $("tps").textContent = "–";
  $("last").textContent = $("reconnects").textContent = "0";
  const stream = (current = {
    id: null, token: null, last: 0, controller: null, stopped: false, ended: false,
    sentAt: performance.now(), firstAt: null, chunks: 0, reconnects: 0,
  });
  $("send").disabled = true;
  try {
    await run(stream);
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

async function stop() {
  const stream = current;
  if (!stream || stream.ended || stream.id === null) return;
  stream.stopped = true;
  $("stop").disabled = true;
  // Cancel ends the generation at the server (the provider's meter stops), then the read.
  const query = new URLSearchParams({ token: stream.token });
  await fetch(`/v1/streams/${encodeURIComponent(stream.id)}/cancel?${query}`, { method: "POST" });
  stream.controller.abort();
  setStatus("stopped", "done");
}

$("ask").addEventListener("submit", send);
$("stop").addEventListener("click", stop);
loadModels().catch(() => setStatus("cannot list the routes", "error"));
