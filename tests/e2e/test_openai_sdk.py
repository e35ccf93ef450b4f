"""End-to-end tests: the official `openai` Python SDK and a real Prometheus against a running
`internvl serve`.

Run by scripts/e2e.sh, which starts the server (with an API key) and Prometheus and passes
them in through the environment:

- E2E_BASE_URL        e.g. http://127.0.0.1:PORT/v1 (required; without it every test skips)
- E2E_API_KEY         the key the server was started with
- E2E_MODEL           the served model name (default demo-internvl)
- E2E_PROMETHEUS_URL  e.g. http://127.0.0.1:PORT (the Prometheus tests skip without it)

The demo checkpoint has random weights: the tests check the protocol and the engine's
guarantees (greedy determinism, seeded sampling, stop strings, usage accounting), never
what the text says.

Every client uses `_strict_response_validation=True`, so a response that does not match the
SDK's pydantic types fails the test instead of being accepted leniently.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import os
import struct
import time
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import openai
import pytest
from openai.types import Model
from openai.types.chat import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionTokenLogprob,
)
from openai.types.chat.chat_completion_token_logprob import TopLogprob

BASE_URL = os.environ.get("E2E_BASE_URL")
API_KEY = os.environ.get("E2E_API_KEY", "unused")
MODEL = os.environ.get("E2E_MODEL", "demo-internvl")
PROMETHEUS_URL = os.environ.get("E2E_PROMETHEUS_URL")
REPO = Path(__file__).resolve().parents[2]
IMAGES = REPO / "tests" / "fixtures" / "images"

if not BASE_URL:
    pytest.skip("E2E_BASE_URL is not set: run scripts/e2e.sh", allow_module_level=True)

# Bounded: every HTTP call of the SDK times out, and nothing is retried (a retry would hide a
# 429/5xx and slow a failing run down).
TIMEOUT_S = 60.0


def make_client(api_key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=BASE_URL,
        api_key=api_key,
        max_retries=0,
        timeout=TIMEOUT_S,
        _strict_response_validation=True,
    )


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    return make_client()


def data_url(name: str) -> str:
    raw = (IMAGES / name).read_bytes()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii")


def unique_png_data_url(size: int = 32) -> str:
    """A PNG of one random colour, so no earlier request can have cached it."""
    rgb = os.urandom(3)
    rows = b"".join(b"\x00" + rgb * size for _ in range(size))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_messages(name: str = "model-a.png", text: str = "描述这张图片") -> list:
    return [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": text},
                {"type": "image_url", "image_url": {"url": data_url(name)}},
            ],
        }
    ]


TEXT_MESSAGES = [{"role": "user", "content": "Write a short poem about the sea."}]
# `ignore_eos` (a vLLM extension the server implements) keeps random weights from ending an
# answer early, so lengths are exact.
IGNORE_EOS = {"ignore_eos": True}


def greedy(client: openai.OpenAI, messages: list, max_tokens: int, **kw) -> ChatCompletion:
    return client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0,
        extra_body=IGNORE_EOS,
        **kw,
    )


# ---------------------------------------------------------------------------------------------
# Chat completions
# ---------------------------------------------------------------------------------------------


def test_chat_with_data_url_image(client: openai.OpenAI) -> None:
    text_only = greedy(client, [{"role": "user", "content": "描述这张图片"}], 4)
    resp = greedy(client, image_messages("model-b.png"), 12)
    assert isinstance(resp, ChatCompletion)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason == "length"
    usage = resp.usage
    assert usage is not None
    assert usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The image adds its 256 visual tokens (plus its delimiters) to the prompt.
    assert usage.prompt_tokens >= text_only.usage.prompt_tokens + 256
    assert usage.prompt_tokens_details is not None
    assert isinstance(usage.prompt_tokens_details.cached_tokens, int)
    assert 0 <= usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens
    assert usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == 0


def test_prefix_cache_reports_cached_tokens(client: openai.OpenAI) -> None:
    """An image this server has never seen is not cached; the same request again is."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What colour is this?"},
                {"type": "image_url", "image_url": {"url": unique_png_data_url()}},
            ],
        }
    ]
    first = greedy(client, messages, 6)
    cached_first = first.usage.prompt_tokens_details.cached_tokens
    assert cached_first < 256, "a new image must not hit the cache of another image"
    again = greedy(client, messages, 6)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage.prompt_tokens == first.usage.prompt_tokens
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert cached >= 256 and cached > cached_first, "the image's blocks come from the cache"
    assert cached < again.usage.prompt_tokens  # the last prompt token is always computed


def test_streaming_with_include_usage(client: openai.OpenAI) -> None:
    messages = image_messages("model-a.png", "What is in the picture?")
    reference = greedy(client, messages, 10)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=IGNORE_EOS,
    )
    chunks = list(stream)
    assert len(chunks) >= 3
    for chunk in chunks:
        assert isinstance(chunk, ChatCompletionChunk)
        assert chunk.object == "chat.completion.chunk"
        assert chunk.model == MODEL
    assert len({c.id for c in chunks}) == 1, "every chunk of one answer carries the same id"

    first = chunks[0]
    assert first.choices and first.choices[0].delta.role == "assistant"

    *body, last = chunks
    # The usage chunk: last, no choices, the totals.
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == reference.usage.prompt_tokens
    assert last.usage.total_tokens == last.usage.prompt_tokens + 10
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens >= 256  # after `reference`
    for chunk in body:
        assert chunk.usage is None, "only the last chunk carries usage"
        assert len(chunk.choices) == 1
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert body[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].delta.role in (None, "assistant") for c in body)
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert text == reference.choices[0].message.content


def test_streaming_without_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=TEXT_MESSAGES, max_tokens=5, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks and all(c.usage is None for c in chunks)
    assert all(len(c.choices) == 1 for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_logprobs_and_top_logprobs(client: openai.OpenAI) -> None:
    resp = greedy(client, image_messages(), 8, logprobs=True, top_logprobs=5)
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == resp.usage.completion_tokens == 8
    for entry in entries:
        assert isinstance(entry, ChatCompletionTokenLogprob)
        assert isinstance(entry.token, str)
        assert entry.logprob <= 0.0 and math.isfinite(entry.logprob)
        assert isinstance(entry.bytes, list) and all(0 <= b < 256 for b in entry.bytes)
        assert len(entry.top_logprobs) == 5
        for top in entry.top_logprobs:
            assert isinstance(top, TopLogprob)
            assert top.logprob <= 0.0
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.top_logprobs[0].token == entry.token
        assert math.isclose(entry.top_logprobs[0].logprob, entry.logprob, abs_tol=1e-4)
    # The tokens' bytes spell the answer.
    spelled = bytes(b for e in entries for b in e.bytes).decode("utf-8", errors="replace")
    assert spelled.strip() == choice.message.content.strip()


def test_streaming_logprobs(client: openai.OpenAI) -> None:
    reference = greedy(client, TEXT_MESSAGES, 6, logprobs=True, top_logprobs=2)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=TEXT_MESSAGES,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body=IGNORE_EOS,
    )
    streamed = [
        entry
        for chunk in stream
        for choice in chunk.choices
        if choice.logprobs and choice.logprobs.content
        for entry in choice.logprobs.content
    ]
    expected = reference.choices[0].logprobs.content
    assert [e.token for e in streamed] == [e.token for e in expected]
    for got, want in zip(streamed, expected):
        assert math.isclose(got.logprob, want.logprob, abs_tol=1e-4)
        assert len(got.top_logprobs) == 2


def first_token(client: openai.OpenAI, messages: list, bias: dict, top: int = 0):
    """The greedy first token under `bias`, with its `top` alternatives (post-bias logprobs)."""
    probe = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=1,
        temperature=0,
        logit_bias=bias,
        logprobs=True,
        top_logprobs=top,
        extra_body=IGNORE_EOS,
    )
    return probe.choices[0].logprobs.content[0]


def flat_bias(client: openai.OpenAI, messages: list, k: int = 8) -> dict:
    """A logit_bias under which the first token is one of k tokens, each equally likely.

    The demo's random weights are very peaked (the top token has probability ~1), so seeded
    sampling would look reproducible even if the seed were ignored. The SDK's logprobs carry
    no token ids, so: bias one candidate id at a time to learn its text, bias them all to
    learn their (post-bias) logprobs, and offset each by its gap.
    """
    pieces = {}
    for token_id in range(300, 400):
        piece = first_token(client, messages, {str(token_id): 100}).token
        if piece.strip() and piece not in pieces.values():
            pieces[token_id] = piece
        if len(pieces) == k:
            break
    assert len(pieces) == k, f"fewer than {k} usable tokens: {pieces}"
    everything = {str(i): 100 for i in pieces}
    tops = first_token(client, messages, everything, top=k).top_logprobs
    logprob = {t.token: t.logprob for t in tops}
    assert set(logprob) == set(pieces.values()), (logprob, pieces)
    low = min(logprob.values())
    bias = {str(i): 100 - (logprob[p] - low) for i, p in pieces.items()}
    flat = first_token(client, messages, bias, top=k).top_logprobs
    for t in flat:
        assert math.isclose(t.logprob, -math.log(k), abs_tol=0.05), flat
    return bias


def test_n_two(client: openai.OpenAI) -> None:
    resp = client.chat.completions.create(
        model=MODEL, messages=TEXT_MESSAGES, max_tokens=6, n=2, temperature=1, seed=11,
        extra_body=IGNORE_EOS,
    )
    assert [c.index for c in resp.choices] == [0, 1]
    for c in resp.choices:
        assert c.finish_reason == "length"
        assert c.message.role == "assistant" and c.message.content
    # The prompt is counted once; the completions add up.
    single = greedy(client, TEXT_MESSAGES, 1)
    assert resp.usage.prompt_tokens == single.usage.prompt_tokens
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_n_two_streamed(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=TEXT_MESSAGES, max_tokens=4, n=2, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=IGNORE_EOS,
    )
    texts = {0: "", 1: ""}
    roles = {}
    finishes = {}
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role:
                roles.setdefault(c.index, c.delta.role)
            texts[c.index] += c.delta.content or ""
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert roles == {0: "assistant", 1: "assistant"}
    assert finishes == {0: "length", 1: "length"}
    assert usage is not None and usage.completion_tokens == 8
    # Greedy: both choices are the greedy answer.
    reference = greedy(client, TEXT_MESSAGES, 4).choices[0].message.content
    assert texts == {0: reference, 1: reference}


def test_seed_reproducible_at_temperature_1(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Pick a word."}]
    bias = flat_bias(client, messages)

    def sample(seed: int) -> str:
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=1, seed=seed,
            logit_bias=bias, extra_body=IGNORE_EOS,
        )
        return r.choices[0].message.content

    a, b = sample(1234), sample(1234)
    assert a == b, "the same seed must give the same text"
    others = {sample(s) for s in (1, 2, 3, 4, 5, 6)}
    assert len(others | {a}) > 1, "different seeds never changed the text: is the seed used?"

    # Seeded n=2 is reproducible too.
    def pair(seed: int) -> list:
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, temperature=1, seed=seed, n=2,
            logit_bias=bias, extra_body=IGNORE_EOS,
        )
        return [c.message.content for c in r.choices]

    assert pair(99) == pair(99)
    # The n samples are independent draws, not one draw copied (first token: 1 in 8 alike).
    assert any(len(set(pair(s))) == 2 for s in (21, 22, 23, 24))


def test_stop_string(client: openai.OpenAI) -> None:
    full = greedy(client, TEXT_MESSAGES, 24).choices[0].message.content
    # A stop string that first occurs a few characters in.
    stop = None
    for k in range(2, len(full) - 1):
        candidate = full[k : k + 2]
        if candidate.strip() == candidate and full.find(candidate) == k:
            stop = candidate
            break
    assert stop is not None, f"no usable stop string in {full!r}"
    resp = greedy(client, TEXT_MESSAGES, 24, stop=[stop, "never-generated-stop"])
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.content == full[: full.find(stop)]
    assert stop not in choice.message.content
    assert resp.usage.completion_tokens < 24

    # Streamed, the stop string is held back and never sent.
    stream = client.chat.completions.create(
        model=MODEL, messages=TEXT_MESSAGES, max_tokens=24, temperature=0, stop=stop,
        stream=True, extra_body=IGNORE_EOS,
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_concurrent_async_streams() -> None:
    """Several streamed requests at once (continuous batching), through AsyncOpenAI."""

    async def run() -> list:
        async with openai.AsyncOpenAI(
            base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=TIMEOUT_S,
            _strict_response_validation=True,
        ) as aclient:

            async def one() -> str:
                stream = await aclient.chat.completions.create(
                    model=MODEL, messages=TEXT_MESSAGES, max_tokens=8, temperature=0,
                    stream=True, extra_body=IGNORE_EOS,
                )
                parts = []
                async for chunk in stream:
                    for c in chunk.choices:
                        parts.append(c.delta.content or "")
                return "".join(parts)

            return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(4))), 120)

    texts = asyncio.run(run())
    reference = greedy(make_client(), TEXT_MESSAGES, 8).choices[0].message.content
    assert texts == [reference] * 4, "batched greedy answers must equal the unbatched one"


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


def test_models_list(client: openai.OpenAI) -> None:
    models = list(client.models.list())
    assert [m.id for m in models] == [MODEL]
    model = models[0]
    assert isinstance(model, Model)
    assert model.object == "model"
    assert isinstance(model.created, int) and model.created > 0
    assert model.owned_by


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve(MODEL)
    assert isinstance(model, Model) and model.id == MODEL
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.status_code == 404
    assert "no-such-model" in info.value.message


def test_null_stream_is_a_plain_completion(client: openai.OpenAI) -> None:
    # The SDK leaves unset options out; raw clients and some wrappers send them as null.
    reply = client.post(
        "/chat/completions",
        body={"model": MODEL, "messages": TEXT_MESSAGES, "max_tokens": 4, "stream": None},
        cast_to=ChatCompletion,
    )
    assert reply.object == "chat.completion" and reply.usage.completion_tokens >= 1


# ---------------------------------------------------------------------------------------------
# Errors: each status maps to the SDK's exception type, with OpenAI's error body
# ---------------------------------------------------------------------------------------------


def test_bad_request_temperature(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=TEXT_MESSAGES, max_tokens=4, temperature=5
        )
    err = info.value
    assert err.status_code == 400
    assert err.type == "invalid_request_error"
    assert err.param == "temperature"
    assert "temperature" in err.message


def test_bad_request_streamed(client: openai.OpenAI) -> None:
    """A streamed request that is invalid fails before any event, as a normal error."""
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=TEXT_MESSAGES, max_tokens=4, top_logprobs=3, stream=True
        )
    assert info.value.param == "top_logprobs"


def test_not_found_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="no-such-model", messages=TEXT_MESSAGES, max_tokens=4
        )
    assert info.value.status_code == 404
    assert info.value.code == "model_not_found"
    assert "no-such-model" in info.value.message


@pytest.mark.parametrize("call", ["chat", "models"])
def test_wrong_api_key(call: str) -> None:
    bad = make_client("wrong-key")
    with pytest.raises(openai.AuthenticationError) as info:
        if call == "chat":
            bad.chat.completions.create(model=MODEL, messages=TEXT_MESSAGES, max_tokens=4)
        else:
            bad.models.list()
    assert info.value.status_code == 401
    assert info.value.type == "authentication_error"
    assert info.value.code == "invalid_api_key"


def test_wrong_api_key_streamed() -> None:
    bad = make_client("wrong-key")
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(
            model=MODEL, messages=TEXT_MESSAGES, max_tokens=4, stream=True
        )


# ---------------------------------------------------------------------------------------------
# Prometheus: a real Prometheus scrapes /metrics and answers queries over it
# ---------------------------------------------------------------------------------------------


def prom_query(expr: str) -> list:
    url = PROMETHEUS_URL + "/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.load(r)
    assert body["status"] == "success", body
    return body["data"]["result"]


def server_metric(name: str) -> float:
    """A sample's value straight from the server's /metrics (summed over label sets)."""
    root = BASE_URL.rsplit("/v1", 1)[0]
    with urllib.request.urlopen(root + "/metrics", timeout=10) as r:
        text = r.read().decode()
    total = None
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total = (total or 0.0) + float(line.rsplit(" ", 1)[1])
    assert total is not None, f"{name} not in /metrics"
    return total


def wait_for(what: str, fn, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


needs_prometheus = pytest.mark.skipif(
    not PROMETHEUS_URL, reason="E2E_PROMETHEUS_URL is not set"
)


@needs_prometheus
def test_prometheus_scrapes_target() -> None:
    def healthy():
        url = PROMETHEUS_URL + "/api/v1/targets?state=active"
        with urllib.request.urlopen(url, timeout=10) as r:
            targets = json.load(r)["data"]["activeTargets"]
        ours = [t for t in targets if t["labels"].get("job") == "internvl"]
        return ours if ours and ours[0]["health"] == "up" and not ours[0]["lastError"] else None

    ours = wait_for("the internvl target to be up", healthy)
    assert len(ours) == 1


@needs_prometheus
def test_prometheus_ingests_ttft_histogram(client: openai.OpenAI) -> None:
    # A few requests, streamed (the time to first token is what a streaming client sees).
    for i in range(3):
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i + 3}."}],
            max_tokens=4, temperature=0, stream=True, extra_body=IGNORE_EOS,
        )
        assert sum(1 for _ in stream) > 0
    expected = server_metric("internvl:time_to_first_token_seconds_count")
    assert expected >= 3

    # Prometheus catches up with the server's own count, within a few scrape intervals.
    def caught_up():
        result = prom_query(f'internvl:time_to_first_token_seconds_count{{model_name="{MODEL}"}}')
        return result if result and float(result[0]["value"][1]) >= expected else None

    result = wait_for("Prometheus to ingest the TTFT count", caught_up)
    assert len(result) == 1
    sample = result[0]
    assert sample["metric"]["__name__"] == "internvl:time_to_first_token_seconds_count"
    assert sample["metric"]["job"] == "internvl"
    assert float(sample["value"][1]) > 0

    # The buckets parse as a histogram: a quantile over them is a positive, finite number.
    def quantile():
        expr = (
            "histogram_quantile(0.9, sum by (le) "
            "(rate(internvl:time_to_first_token_seconds_bucket[1m])))"
        )
        result = prom_query(expr)
        if not result:
            return None
        value = float(result[0]["value"][1])
        return value if math.isfinite(value) and value > 0 else None

    assert wait_for("a positive TTFT quantile", quantile) > 0

    # And Prometheus read the TYPE line: it knows the metric as a histogram.
    url = PROMETHEUS_URL + "/api/v1/metadata?" + urllib.parse.urlencode(
        {"metric": "internvl:time_to_first_token_seconds"}
    )
    def metadata():
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)["data"].get("internvl:time_to_first_token_seconds")

    meta = wait_for("the TTFT metadata", metadata)
    assert meta[0]["type"] == "histogram"


@needs_prometheus
def test_prometheus_ingests_counters(client: openai.OpenAI) -> None:
    greedy(client, TEXT_MESSAGES, 3)
    expected = server_metric("internvl:request_success_total")
    assert expected > 0

    def caught_up():
        result = prom_query("sum(internvl:request_success_total)")
        return result if result and float(result[0]["value"][1]) >= expected else None

    wait_for("Prometheus to ingest request_success_total", caught_up)
    # Every server metric family made it in (names with ':' included).
    names = prom_query('count by (__name__) ({__name__=~"internvl:.+"})')
    assert len(names) >= 10
    assert any(r["metric"]["__name__"] == "internvl:http_requests_total" for r in names)
