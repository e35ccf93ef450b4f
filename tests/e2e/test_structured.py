"""End-to-end tests of structured outputs and tool calls through the official `openai` Python
SDK against a running `internvl serve` (started by scripts/e2e.sh; the environment is the one
test_openai_sdk.py describes: E2E_BASE_URL, E2E_API_KEY, E2E_MODEL).

The demo checkpoint has random weights: free text is gibberish and an unbounded string may
never end. So every schema here bounds its output (enums, integers with a minimum and a maximum,
strings with a small maxLength, arrays with maxItems, closed objects with every key required),
and every answer must then finish with "stop" (or "tool_calls") well within max_tokens. What an
answer says is checked independently of the server: json.loads and the fields checked by hand,
re.fullmatch for a regex, membership for a choice.
"""

from __future__ import annotations

import json
import os
import re
from typing import Literal

import openai
import pydantic
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

BASE_URL = os.environ.get("E2E_BASE_URL")
API_KEY = os.environ.get("E2E_API_KEY", "unused")
MODEL = os.environ.get("E2E_MODEL", "demo-internvl")

if not BASE_URL:
    pytest.skip("E2E_BASE_URL is not set: run scripts/e2e.sh", allow_module_level=True)

TIMEOUT_S = 60.0
MAX_TOKENS = 200


@pytest.fixture(scope="module")
def client() -> openai.OpenAI:
    # As in test_openai_sdk.py: bounded, never retried, strict response validation.
    return openai.OpenAI(
        base_url=BASE_URL,
        api_key=API_KEY,
        max_retries=0,
        timeout=TIMEOUT_S,
        _strict_response_validation=True,
    )


MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]

# Only bounded fields: the demo's random weights finish it within the budget.
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 6},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "unit", "days", "sunny"],
    "additionalProperties": False,
}

# No free strings at all: the compact text can be rebuilt exactly from the parsed value.
FORECAST_SCHEMA = {
    "type": "object",
    "properties": {
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "sunny": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["wind", "rain", "snow"]}, "maxItems": 3},
    },
    "required": ["unit", "days", "sunny", "tags"],
    "additionalProperties": False,
}

TIME_SCHEMA = {
    "type": "object",
    "properties": {"zone": {"enum": ["utc", "cet"]}},
    "required": ["zone"],
    "additionalProperties": False,
}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": WEATHER_SCHEMA,
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "The time in a time zone",
            "parameters": TIME_SCHEMA,
        },
    },
]
NAMED_WEATHER = {"type": "function", "function": {"name": "get_weather"}}
CALL_ID = re.compile(r"call_[0-9a-f]{24}")


def json_schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def ask(client: openai.OpenAI, **kw) -> ChatCompletion:
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("max_tokens", MAX_TOKENS)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model=MODEL, **kw)


def only_choice(resp: ChatCompletion, finish: str = "stop"):
    assert isinstance(resp, ChatCompletion)
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.finish_reason == finish, (choice.finish_reason, choice.message)
    assert resp.usage is not None and resp.usage.completion_tokens < MAX_TOKENS
    return choice


def compact(value) -> str:
    """JSON as the server writes it: `, ` and `: ` separators, no other whitespace."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def check_weather(value) -> None:
    assert isinstance(value, dict), value
    assert set(value) == {"city", "unit", "days", "sunny"}, value
    assert isinstance(value["city"], str) and len(value["city"]) <= 6, value
    assert value["unit"] in ("celsius", "fahrenheit"), value
    assert type(value["days"]) is int and 1 <= value["days"] <= 7, value
    assert type(value["sunny"]) is bool, value


def check_forecast(value) -> None:
    assert isinstance(value, dict), value
    assert set(value) == {"unit", "days", "sunny", "tags"}, value
    assert value["unit"] in ("celsius", "fahrenheit"), value
    assert type(value["days"]) is int and 1 <= value["days"] <= 7, value
    assert type(value["sunny"]) is bool, value
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3, value
    assert all(t in ("wind", "rain", "snow") for t in value["tags"]), value


def check_time(value) -> None:
    assert value == {"zone": "utc"} or value == {"zone": "cet"}, value


# ---------------------------------------------------------------------------------------------
# response_format
# ---------------------------------------------------------------------------------------------


def test_json_schema_strict(client: openai.OpenAI) -> None:
    choice = only_choice(ask(client, response_format=json_schema_format(WEATHER_SCHEMA)))
    assert choice.message.role == "assistant"
    assert choice.message.tool_calls is None
    check_weather(json.loads(choice.message.content))


def test_json_schema_output_is_compact(client: openai.OpenAI) -> None:
    content = only_choice(ask(client, response_format=json_schema_format(FORECAST_SCHEMA))).message.content
    value = json.loads(content)
    check_forecast(value)
    # Key order is the schema's here only by chance of the weights; json.loads keeps the
    # written order, so re-encoding compactly must give back the exact text.
    assert content == compact(value), content


def test_json_object(client: openai.OpenAI) -> None:
    choice = only_choice(ask(client, response_format={"type": "json_object"}))
    value = json.loads(choice.message.content)
    assert isinstance(value, dict), choice.message.content


def test_json_schema_streamed_equals_whole(client: openai.OpenAI) -> None:
    fmt = json_schema_format(WEATHER_SCHEMA)
    whole = only_choice(ask(client, response_format=fmt)).message.content
    stream = ask(client, response_format=fmt, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    *body, last = chunks
    assert last.choices == [] and last.usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in body)
    finishes = [c.choices[0].finish_reason for c in body if c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert text == whole
    check_weather(json.loads(text))


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=6)
    unit: Literal["celsius", "fahrenheit"]
    days: int = pydantic.Field(ge=1, le=7)
    sunny: bool


def test_sdk_parse_with_pydantic_model(client: openai.OpenAI) -> None:
    """The SDK's strict path: it turns the model into a strict json_schema and parses back."""
    resp = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Weather, max_tokens=MAX_TOKENS,
        temperature=0,
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    parsed = choice.message.parsed
    assert isinstance(parsed, Weather)
    assert choice.message.refusal is None
    # Checked again by hand, from the raw text, not trusting the SDK's validation alone.
    raw = json.loads(choice.message.content)
    check_weather(raw)
    assert parsed.model_dump() == raw


def test_sdk_stream_helper_with_pydantic_model(client: openai.OpenAI) -> None:
    reference = client.chat.completions.parse(
        model=MODEL, messages=MESSAGES, response_format=Weather, max_tokens=MAX_TOKENS,
        temperature=0,
    )
    with client.chat.completions.stream(
        model=MODEL, messages=MESSAGES, response_format=Weather, max_tokens=MAX_TOKENS,
        temperature=0,
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Weather)
    assert choice.message.content == reference.choices[0].message.content
    assert choice.message.parsed == reference.choices[0].message.parsed


# ---------------------------------------------------------------------------------------------
# vLLM's fields, through extra_body
# ---------------------------------------------------------------------------------------------

CHOICES = ["alpha", "beta", "gamma"]
REGEX = r"[a-z]{1,5}-\d{2}"


def test_guided_choice(client: openai.OpenAI) -> None:
    choice = only_choice(ask(client, extra_body={"guided_choice": CHOICES}))
    assert choice.message.content in CHOICES


def test_guided_choice_logprobs_are_constrained(client: openai.OpenAI) -> None:
    """Every alternative the logprobs report continues the text towards one of the choices."""
    choice = only_choice(
        ask(client, logprobs=True, top_logprobs=5, extra_body={"guided_choice": CHOICES})
    )
    assert choice.message.content in CHOICES
    so_far = ""
    entries = choice.logprobs.content
    assert entries and "".join(e.token for e in entries) == choice.message.content
    for entry in entries:
        assert 1 <= len(entry.top_logprobs) <= 5
        for top in entry.top_logprobs:
            assert any(c.startswith(so_far + top.token) for c in CHOICES), (so_far, top)
        so_far += entry.token


def test_guided_choice_sampled_n(client: openai.OpenAI) -> None:
    resp = ask(client, n=3, temperature=1, seed=7, extra_body={"guided_choice": CHOICES})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    for c in resp.choices:
        assert c.finish_reason == "stop"
        assert c.message.content in CHOICES


def test_guided_regex(client: openai.OpenAI) -> None:
    choice = only_choice(ask(client, extra_body={"guided_regex": REGEX}))
    assert re.fullmatch(REGEX, choice.message.content), choice.message.content


def test_guided_json(client: openai.OpenAI) -> None:
    choice = only_choice(ask(client, extra_body={"guided_json": FORECAST_SCHEMA}))
    check_forecast(json.loads(choice.message.content))


@pytest.mark.parametrize(
    "field",
    [
        pytest.param({"choice": CHOICES}, id="choice"),
        pytest.param({"regex": REGEX}, id="regex"),
        pytest.param({"json": WEATHER_SCHEMA}, id="json"),
        pytest.param({"json_object": True}, id="json_object"),
    ],
)
def test_structured_outputs(client: openai.OpenAI, field: dict) -> None:
    content = only_choice(ask(client, extra_body={"structured_outputs": field})).message.content
    kind, spec = next(iter(field.items()))
    if kind == "choice":
        assert content in spec
    elif kind == "regex":
        assert re.fullmatch(spec, content), content
    elif kind == "json":
        check_weather(json.loads(content))
    else:
        assert isinstance(json.loads(content), dict), content


def test_same_constraint_same_answer_through_every_field(client: openai.OpenAI) -> None:
    """Greedy: response_format, guided_json and structured_outputs.json are one constraint."""
    answers = {
        ask(client, response_format=json_schema_format(FORECAST_SCHEMA)).choices[0].message.content,
        ask(client, extra_body={"guided_json": FORECAST_SCHEMA}).choices[0].message.content,
        ask(client, extra_body={"structured_outputs": {"json": FORECAST_SCHEMA}})
        .choices[0]
        .message.content,
    }
    assert len(answers) == 1, answers
    check_forecast(json.loads(answers.pop()))


# ---------------------------------------------------------------------------------------------
# Refused: each a 400 that names the field
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, param",
    [
        pytest.param({"extra_body": {"guided_regex": "(unclosed"}}, "guided_regex", id="regex"),
        pytest.param(
            {"extra_body": {"structured_outputs": {"regex": "(unclosed"}}},
            "structured_outputs",
            id="structured_outputs-regex",
        ),
        pytest.param(
            {"extra_body": {"guided_json": {"type": "no-such-type"}}}, "guided_json", id="json"
        ),
        pytest.param(
            {
                "response_format": json_schema_format(
                    {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}},
                     "required": ["a"]}
                )
            },
            "response_format",
            id="response_format-ref",
        ),
        pytest.param(
            {"response_format": json_schema_format(
                {"type": "integer", "minimum": 5, "maximum": 2})},
            "response_format",
            id="response_format-unsatisfiable",
        ),
        pytest.param({"extra_body": {"guided_choice": []}}, "guided_choice", id="empty-choice"),
    ],
)
def test_malformed_constraint_is_bad_request(client: openai.OpenAI, kw: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, **kw)
    err = info.value
    assert err.status_code == 400
    assert err.type == "invalid_request_error"
    assert err.param == param
    assert param in err.message


def test_two_constraints_are_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, extra_body={"guided_choice": CHOICES, "guided_regex": REGEX})
    assert info.value.param in ("guided_choice", "guided_regex")
    assert "guided_choice" in info.value.message and "guided_regex" in info.value.message


def test_malformed_constraint_streamed_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, stream=True, extra_body={"guided_regex": "(unclosed"})
    assert info.value.param == "guided_regex"


# ---------------------------------------------------------------------------------------------
# Tool calls
# ---------------------------------------------------------------------------------------------


def check_call(call, name: str | None = None) -> None:
    assert CALL_ID.fullmatch(call.id), call.id
    assert call.type == "function"
    if name is not None:
        assert call.function.name == name
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        check_weather(args)
    elif call.function.name == "get_time":
        check_time(args)
    else:
        pytest.fail(f"a call of {call.function.name!r}, not one of the tools")
    assert call.function.arguments == compact(args)


def test_named_tool_choice(client: openai.OpenAI) -> None:
    choice = only_choice(ask(client, tools=TOOLS, tool_choice=NAMED_WEATHER), "tool_calls")
    message = choice.message
    assert message.role == "assistant"
    assert message.content is None
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    check_call(message.tool_calls[0], "get_weather")


def test_named_tool_choice_streamed_equals_whole(client: openai.OpenAI) -> None:
    whole = only_choice(ask(client, tools=TOOLS, tool_choice=NAMED_WEATHER), "tool_calls")
    expected = whole.message.tool_calls[0].function.arguments
    stream = ask(client, tools=TOOLS, tool_choice=NAMED_WEATHER, stream=True)
    chunks = list(stream)
    assert chunks and all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = []
    finishes = []
    for chunk in chunks:
        assert len(chunk.choices) == 1
        c = chunk.choices[0]
        assert c.delta.content is None, c.delta
        deltas.extend(c.delta.tool_calls or [])
        if c.finish_reason:
            finishes.append(c.finish_reason)
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert deltas, "no tool_calls deltas"
    assert all(d.index == 0 for d in deltas)
    first, *rest = deltas
    assert CALL_ID.fullmatch(first.id or ""), first
    assert first.type == "function"
    assert first.function.name == "get_weather"
    assert all(d.id is None for d in rest), "the id comes once"
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == expected
    check_weather(json.loads(arguments))


def test_tool_calls_through_sdk_stream_helper(client: openai.OpenAI) -> None:
    reference = ask(client, tools=TOOLS, tool_choice="required").choices[0].message.tool_calls
    with client.chat.completions.stream(
        model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice="required",
        max_tokens=MAX_TOKENS, temperature=0,
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in calls] == [
        (c.function.name, c.function.arguments) for c in reference
    ]
    for call in calls:
        check_call(call)


def test_required_tool_choice(client: openai.OpenAI) -> None:
    choice = only_choice(ask(client, tools=TOOLS, tool_choice="required"), "tool_calls")
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls, "required: at least one call"
    for call in calls:
        check_call(call)
    assert len({c.id for c in calls}) == len(calls), "ids are unique"


def test_required_without_parallel_calls_makes_one(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        choice = only_choice(
            ask(client, tools=TOOLS, tool_choice="required", parallel_tool_calls=False,
                temperature=1, seed=seed),
            "tool_calls",
        )
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0])


def test_tool_results_round_trip(client: openai.OpenAI) -> None:
    """A call, its result sent back as a tool message, then a second named call."""
    first = only_choice(ask(client, tools=TOOLS, tool_choice=NAMED_WEATHER), "tool_calls")
    call = first.message.tool_calls[0]
    messages = MESSAGES + [
        first.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 degrees"},
        {"role": "user", "content": "And what time is it there?"},
    ]
    second = only_choice(
        ask(client, messages=messages, tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "get_time"}}),
        "tool_calls",
    )
    check_call(second.message.tool_calls[0], "get_time")
    assert second.message.tool_calls[0].id != call.id


def test_tool_choice_none_answers_text(client: openai.OpenAI) -> None:
    resp = ask(client, tools=TOOLS, tool_choice="none", max_tokens=8)
    message = resp.choices[0].message
    assert isinstance(message.content, str) and message.content
    assert message.tool_calls is None


@pytest.mark.parametrize("tool_choice", ["auto", None], ids=["auto", "absent"])
def test_auto_tool_choice_is_bad_request(client: openai.OpenAI, tool_choice) -> None:
    kw = {"tools": TOOLS}
    if tool_choice is not None:
        kw["tool_choice"] = tool_choice
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, **kw)
    err = info.value
    assert err.status_code == 400
    assert err.param == "tool_choice"
    assert "required" in err.message


def test_unknown_named_tool_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
    assert info.value.param == "tool_choice.function.name"
    assert "nope" in info.value.message


def test_tools_with_response_format_is_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        ask(client, tools=TOOLS, tool_choice="required",
            response_format=json_schema_format(WEATHER_SCHEMA))
    assert info.value.status_code == 400
    assert info.value.param == "response_format"
    assert "tools" in info.value.message
