// The TypeScript client generated from protos/ alone (clients/ts, `make clients`: protoc-gen-es messages and
// service descriptors), spoken over gRPC by @connectrpc/connect-node, against a live server whose address is in
// TOKENWIRE_TARGET (tests/test_ts_client.py starts it and runs `node --test`).
import assert from "node:assert/strict";
import { test } from "node:test";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { ErrorCode, FinishReason, GenerationService, Role, StreamStatus } from "@tokenwire/client";
import { ErrorInfoSchema, RetryInfoSchema } from "@tokenwire/client/rpc";

const target = process.env.TOKENWIRE_TARGET;
assert.ok(target, "TOKENWIRE_TARGET is not set");
const client = createClient(GenerationService, createGrpcTransport({ baseUrl: `http://${target}` }));

const request = (model, durable = false) => ({
  model,
  messages: [{ role: Role.USER, text: "Tell me about streaming." }],
  seed: 0n,
  ...(durable ? { resumeWindow: { seconds: 60n } } : {}),
});

// Reads a stream to its end: its messages and the ConnectError it ended with (undefined after OK),
// checking the contract's sequence (exactly 1 more per message, from the cursor).
async function readAll(stream, after = 0n, messages = []) {
  try {
    for await (const m of stream) {
      assert.equal(m.sequence, after + BigInt(messages.length) + 1n);
      messages.push(m);
    }
    return { messages, error: undefined };
  } catch (err) {
    return { messages, error: ConnectError.from(err) };
  }
}

const text = (messages) =>
  messages.map((m) => (m.event.case === "textDelta" ? m.event.value.text : "")).join("");

test("a stream reads to its Finish", async () => {
  const { messages, error } = await readAll(client.generate({ ...request("sim"), maxOutputTokens: 5 }));
  assert.equal(error, undefined);
  assert.equal(messages[0].event.case, "start");
  assert.equal(messages[0].event.value.provider, "simulated");
  assert.ok(messages.slice(1, -1).every((m) => m.event.case === "textDelta"));
  const finish = messages.at(-1).event;
  assert.equal(finish.case, "finish");
  assert.equal(finish.value.reason, FinishReason.LENGTH);
  assert.equal(finish.value.usage.outputTokens, 5n);
});

test("a rejected start is a status with rich details", async () => {
  const { messages, error } = await readAll(client.generate(request("rate-limited")));
  assert.equal(messages.length, 0);
  assert.equal(error.code, Code.ResourceExhausted);
  assert.equal(error.findDetails(ErrorInfoSchema)[0].reason, "PROVIDER_RATE_LIMITED");
  assert.equal(error.findDetails(RetryInfoSchema)[0].retryDelay.seconds, 1n);
});

test("a failure after Start is an Error event, then the status", async () => {
  const { messages, error } = await readAll(client.generate(request("error-after-3")));
  const last = messages.at(-1).event;
  assert.equal(last.case, "error");
  assert.equal(last.value.code, ErrorCode.PROVIDER_UNAVAILABLE);
  assert.equal(last.value.retryable, true);
  assert.equal(last.value.lastSequence, BigInt(messages.length - 1));
  assert.equal(error.code, Code.Unavailable);
  assert.equal(error.findDetails(ErrorInfoSchema)[0].reason, "PROVIDER_UNAVAILABLE");
});

test("a broken durable stream resumes from its last sequence", async () => {
  const unbroken = await readAll(client.generate(request("paced")));
  assert.equal(unbroken.error, undefined);

  // A durable stream whose call breaks after a few messages: its generation goes on.
  const broken = new AbortController();
  const first = [];
  let error;
  try {
    for await (const m of client.generate(request("paced", true), { signal: broken.signal })) {
      first.push(m);
      if (first.length === 6) broken.abort();
    }
  } catch (err) {
    error = ConnectError.from(err);
  }
  assert.equal(error?.code, Code.Canceled);
  const start = first[0].event.value;
  const last = first.at(-1).sequence;

  const rest = await readAll(
    client.resume({ streamId: start.streamId, resumeToken: start.resumeToken, afterSequence: last }),
    last,
  );
  assert.equal(rest.error, undefined);
  assert.equal(rest.messages.at(-1).event.case, "finish");
  assert.ok(text(unbroken.messages).length > 0);
  assert.equal(text([...first, ...rest.messages]), text(unbroken.messages));
});

test("Cancel stops a durable stream", async () => {
  const stream = client.generate(request("paced", true))[Symbol.asyncIterator]();
  const start = (await stream.next()).value.event.value;
  const ids = { streamId: start.streamId, resumeToken: start.resumeToken };
  const cancelled = await client.cancel(ids);
  assert.equal(cancelled.state.status, StreamStatus.CANCELLED);
  // Every reader sees the stream end: this call too, with the one terminal Error and its status.
  const rest = await readAll({ [Symbol.asyncIterator]: () => stream }, 1n);
  assert.equal(rest.messages.at(-1).event.value.code, ErrorCode.STREAM_CANCELLED);
  assert.equal(rest.error.code, Code.Canceled);
  // Idempotent: a second Cancel changes nothing.
  const again = await client.cancel(ids);
  assert.equal(again.state.lastSequence, rest.messages.at(-1).sequence);
});
