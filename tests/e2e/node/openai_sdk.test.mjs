// End-to-end tests: the official OpenAI Node SDK (`openai`, pinned in package.json) against a
// running `internvl serve`. Run by scripts/e2e.sh with Node's built-in runner (`node --test`),
// which starts the server and passes it in through the environment:
//
//   E2E_BASE_URL  e.g. http://127.0.0.1:PORT/v1 (required: without it every test fails)
//   E2E_API_KEY   the key the server was started with
//   E2E_MODEL     the served model name (default demo-internvl)
//
// The demo checkpoint has random weights, so the tests check the protocol and the engine's
// guarantees (greedy determinism, usage accounting, a schema followed), never what the text
// says. Every request is bounded: the SDK's own timeout, no retries, and a per-test timeout.

import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import OpenAI from "openai";

const BASE_URL = process.env.E2E_BASE_URL;
const API_KEY = process.env.E2E_API_KEY ?? "unused";
const MODEL = process.env.E2E_MODEL ?? "demo-internvl";
const REQUEST_TIMEOUT_MS = 60_000;
const TEST = { timeout: 180_000 };

// A missing server address is a failure, never a silent skip.
test("E2E_BASE_URL is set", () => {
  assert.ok(BASE_URL, "E2E_BASE_URL is not set: run scripts/e2e.sh");
});

function makeClient(apiKey = API_KEY) {
  return new OpenAI({
    baseURL: BASE_URL ?? "http://127.0.0.1:9/v1",
    apiKey,
    maxRetries: 0,
    timeout: REQUEST_TIMEOUT_MS,
  });
}
const client = makeClient();

const IMAGE = new URL("../../fixtures/images/model-a.png", import.meta.url);
const imageUrl = "data:image/png;base64," + readFileSync(IMAGE).toString("base64");
const TEXT_MESSAGES = [{ role: "user", content: "Write a short poem about the sea." }];
const IMAGE_MESSAGES = [
  {
    role: "user",
    content: [
      { type: "text", text: "What is in the picture?" },
      { type: "image_url", image_url: { url: imageUrl } },
    ],
  },
];

// Greedy, and `ignore_eos` (a vLLM extension the server implements) keeps the random weights
// from ending early, so lengths are exact. The SDK sends unknown body fields as they are.
function greedy(messages, maxTokens, extra = {}) {
  return client.chat.completions.create({
    model: MODEL,
    messages,
    max_tokens: maxTokens,
    temperature: 0,
    ignore_eos: true,
    ...extra,
  });
}

function checkUsage(usage, completionTokens) {
  assert.ok(usage, "usage is present");
  assert.equal(usage.completion_tokens, completionTokens);
  assert.ok(Number.isInteger(usage.prompt_tokens) && usage.prompt_tokens > 0, `${usage.prompt_tokens}`);
  assert.equal(usage.total_tokens, usage.prompt_tokens + usage.completion_tokens);
}

test("models list names the served model", TEST, async () => {
  const ids = [];
  for await (const model of client.models.list()) ids.push(model.id);
  assert.deepEqual(ids, [MODEL]);
});

test("chat with a data: URL PNG image", TEST, async () => {
  const textOnly = await greedy([{ role: "user", content: "What is in the picture?" }], 4);
  const resp = await greedy(IMAGE_MESSAGES, 12);
  assert.equal(resp.object, "chat.completion");
  assert.match(resp.id, /^chatcmpl-/);
  assert.equal(resp.model, MODEL);
  assert.equal(resp.choices.length, 1);
  const [choice] = resp.choices;
  assert.equal(choice.index, 0);
  assert.equal(choice.message.role, "assistant");
  assert.equal(typeof choice.message.content, "string");
  assert.ok(choice.message.content.length > 0);
  assert.equal(choice.finish_reason, "length");
  checkUsage(resp.usage, 12);
  // The image adds its 256 visual tokens (plus delimiters) to the prompt.
  assert.ok(
    resp.usage.prompt_tokens >= textOnly.usage.prompt_tokens + 256,
    `${resp.usage.prompt_tokens} vs text only ${textOnly.usage.prompt_tokens}`,
  );
  // Greedy: the same request again gives the same answer.
  const again = await greedy(IMAGE_MESSAGES, 12);
  assert.equal(again.choices[0].message.content, choice.message.content);
});

test("streaming with include_usage", TEST, async () => {
  const reference = await greedy(IMAGE_MESSAGES, 10);
  const stream = await greedy(IMAGE_MESSAGES, 10, {
    stream: true,
    stream_options: { include_usage: true },
  });
  const chunks = [];
  for await (const chunk of stream) chunks.push(chunk);
  assert.ok(chunks.length >= 3, `${chunks.length} chunks`);
  for (const chunk of chunks) {
    assert.equal(chunk.object, "chat.completion.chunk");
    assert.equal(chunk.model, MODEL);
  }
  assert.equal(new Set(chunks.map((c) => c.id)).size, 1, "one id for every chunk");
  assert.equal(chunks[0].choices[0].delta.role, "assistant");

  const body = chunks.slice(0, -1);
  const last = chunks.at(-1);
  // The usage chunk: last, no choices, the totals.
  assert.deepEqual(last.choices, []);
  checkUsage(last.usage, 10);
  assert.equal(last.usage.prompt_tokens, reference.usage.prompt_tokens);
  for (const chunk of body) {
    assert.ok(chunk.usage == null, "only the last chunk carries usage");
    assert.equal(chunk.choices.length, 1);
  }
  const finishes = body.map((c) => c.choices[0].finish_reason).filter(Boolean);
  assert.deepEqual(finishes, ["length"]);
  assert.equal(body.at(-1).choices[0].finish_reason, "length");
  const text = body.map((c) => c.choices[0].delta.content ?? "").join("");
  assert.equal(text, reference.choices[0].message.content);
});

// Bounded fields only, so the random weights finish the JSON well within max_tokens.
const WEATHER_SCHEMA = {
  type: "object",
  properties: {
    city: { type: "string", maxLength: 6 },
    unit: { enum: ["celsius", "fahrenheit"] },
    days: { type: "integer", minimum: 1, maximum: 7 },
    sunny: { type: "boolean" },
  },
  required: ["city", "unit", "days", "sunny"],
  additionalProperties: false,
};

function checkWeather(value, text) {
  assert.equal(typeof value, "object", text);
  assert.ok(value !== null && !Array.isArray(value), text);
  assert.deepEqual(Object.keys(value).sort(), ["city", "days", "sunny", "unit"], text);
  assert.equal(typeof value.city, "string", text);
  assert.ok([...value.city].length <= 6, text);
  assert.ok(["celsius", "fahrenheit"].includes(value.unit), text);
  assert.ok(Number.isInteger(value.days) && value.days >= 1 && value.days <= 7, text);
  assert.equal(typeof value.sunny, "boolean", text);
}

test("response_format json_schema", TEST, async () => {
  const resp = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: "What is the weather in Paris?" }],
    max_tokens: 200,
    temperature: 0,
    response_format: {
      type: "json_schema",
      json_schema: { name: "weather", schema: WEATHER_SCHEMA, strict: true },
    },
  });
  const [choice] = resp.choices;
  assert.equal(choice.finish_reason, "stop");
  assert.ok(resp.usage.completion_tokens < 200);
  const text = choice.message.content;
  const value = JSON.parse(text);
  checkWeather(value, text);
  // Written compactly: `, ` and `: ` separators and no other whitespace outside strings.
  const outside = text.replace(/"(?:[^"\\]|\\.)*"/g, '""');
  assert.ok(!/[,:](?! )/.test(outside), `a separator without its space: ${text}`);
  assert.ok(!/\s/.test(outside.replaceAll(", ", ",").replaceAll(": ", ":")), `other whitespace: ${text}`);
});

test("named tool_choice returns a tool call", TEST, async () => {
  const resp = await client.chat.completions.create({
    model: MODEL,
    messages: [{ role: "user", content: "What is the weather in Paris?" }],
    max_tokens: 200,
    temperature: 0,
    tools: [
      {
        type: "function",
        function: { name: "get_weather", description: "The weather in a city", parameters: WEATHER_SCHEMA },
      },
    ],
    tool_choice: { type: "function", function: { name: "get_weather" } },
  });
  const [choice] = resp.choices;
  assert.equal(choice.finish_reason, "tool_calls");
  assert.equal(choice.message.content, null);
  assert.equal(choice.message.tool_calls.length, 1);
  const [call] = choice.message.tool_calls;
  assert.match(call.id, /^call_[0-9a-f]{24}$/);
  assert.equal(call.type, "function");
  assert.equal(call.function.name, "get_weather");
  checkWeather(JSON.parse(call.function.arguments), call.function.arguments);
});

test("a bad request is a BadRequestError naming the param", TEST, async () => {
  await assert.rejects(
    client.chat.completions.create({ model: MODEL, messages: TEXT_MESSAGES, max_tokens: 4, temperature: 5 }),
    (err) => {
      assert.ok(err instanceof OpenAI.BadRequestError, `${err}`);
      assert.equal(err.status, 400);
      assert.equal(err.param, "temperature");
      assert.equal(err.type, "invalid_request_error");
      return true;
    },
  );
});

test("a wrong API key is an AuthenticationError", TEST, async () => {
  await assert.rejects(
    makeClient("wrong-key").chat.completions.create({ model: MODEL, messages: TEXT_MESSAGES, max_tokens: 4 }),
    (err) => {
      assert.ok(err instanceof OpenAI.AuthenticationError, `${err}`);
      assert.equal(err.status, 401);
      assert.equal(err.code, "invalid_api_key");
      return true;
    },
  );
});
