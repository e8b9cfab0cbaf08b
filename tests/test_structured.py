"""Structured output and tool calls through `lmlab serve`: answers held to JSON schemas, regular
expressions and tool signatures (llguidance), even from a randomly initialised model."""

from __future__ import annotations

import json
import random
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from conftest import random_decoder  # noqa: E402
from test_serve import Server, _post  # noqa: E402

import lmlab  # noqa: E402
from lmlab.chat import render  # noqa: E402
from lmlab.generation.structured import Constraint, token_table  # noqa: E402
from lmlab.generation.tools import read_calls  # noqa: E402
from lmlab.tokenizer import load_tokenizer  # noqa: E402

# a tools-aware template in the Hermes style: tools listed up front, calls and results as tagged turns
TOOLS_TEMPLATE = (
    "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}tool: {{ m['content'] }}\n"
    "{% elif m.get('tool_calls') %}assistant: {% for c in m['tool_calls'] %}<tool_call>"
    "{{ {'name': c['function']['name'], 'arguments': c['function']['arguments']} | tojson }}</tool_call>"
    "{% endfor %}\n"
    "{% else %}{{ m['role'] }}: {{ m['content'] }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Jerusalem", "Babylon", "Nineveh"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {  # no arguments (closed, as OpenAI's strict mode has it: an open object lets a random model go on)
    "type": "function",
    "function": {"name": "clock", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}


@pytest.fixture(scope="module")
def random_gpt(tiny_pretrained, tmp_path_factory):
    """A random decoder with room for long answers (context 1024) and the tools-aware chat template."""
    folder = tmp_path_factory.mktemp("structured") / "gpt"
    tok = load_tokenizer(tiny_pretrained["gpt"])
    tok.chat_template = TOOLS_TEMPLATE
    random_decoder(tok, folder, 1024, seed=1)
    server = Server(folder, max_batch=8)
    yield server, lmlab.load(folder).eval(), load_tokenizer(folder)
    server.close()


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A JSON schema whose every instance is short: bounded strings, integers, arrays; closed objects."""
    kinds = ["integer", "boolean", "enum", "string", "null", "const"] + (
        ["object", "array", "anyOf"] if depth < 2 else []
    )
    kind = rng.choice(kinds)
    if kind == "integer":
        lo = rng.randint(-50, 50)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 500)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(["alpha", "beta", "gamma", 3, None, True, "δέλτα"], rng.randint(1, 4))}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(0, 8)}
    if kind == "null":
        return {"type": "null"}
    if kind == "const":
        return {"const": rng.choice(["x", 7, False, "in the beginning"])}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "maxItems": rng.randint(0, 3)}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    names = rng.sample(["name", "age", "tribe", "verse", "ok", "list", "x_1"], rng.randint(1, 4))
    props = {n: random_schema(rng, depth + 1) for n in names}
    required = [n for n in names if rng.random() < 0.7]
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def test_json_schema_answers_validate_for_20_random_schemas(random_gpt):
    server, _, _ = random_gpt
    rng = random.Random(0)
    schemas = [random_schema(rng) for _ in range(20)]

    def ask(i):
        return server.client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": f"answer {i} in JSON"}],
            response_format={"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schemas[i]}},
            max_tokens=400,
            temperature=1.0,
            seed=i,
        )

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(ask, range(20)))
    kinds = set()
    for schema, r in zip(schemas, answers):
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (schema, choice)
        value = json.loads(choice.message.content)
        jsonschema.validate(value, schema)
        kinds.add(type(value).__name__)
    assert len(kinds) >= 3, kinds  # the schemas (and so the answers) are of several kinds


def test_greedy_structured_answer_is_the_masked_argmax_of_the_model(random_gpt):
    """The server's greedy answer is what a plain loop gives: the model's logits, the grammar's mask, argmax."""
    server, model, tok = random_gpt
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999}, "s": {"type": "string", "maxLength": 5}},
        "required": ["n", "s"],
        "additionalProperties": False,
    }
    r = server.client.completions.create(
        model="tiny",
        prompt="the lord said",
        max_tokens=60,
        temperature=0,
        extra_body={"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}},
    )
    stop_ids = [tok.eos_id]
    c = Constraint.for_json_schema(tok, model.config.vocab_size, stop_ids, schema)
    ids, out = tok.encode("the lord said", add_special_tokens=False), []
    with torch.no_grad():
        for _ in range(60):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            t = int(c.mask_(logits).argmax())
            c.accept(t)
            if t in stop_ids:
                break
            out.append(t)
            if c.finished:
                break
    assert r.choices[0].text == tok.decode(out)
    assert len(out) > 8 and r.choices[0].finish_reason == "stop"


def test_regex_and_json_object_formats(random_gpt):
    server, _, _ = random_gpt
    pattern = r"(yes|no), [0-9]{1,3} (lambs|goats)\."
    for seed in range(3):
        r = _post(
            server,
            "/v1/chat/completions",
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "how many?"}],
                "response_format": {"type": "regex", "regex": pattern},
                "max_tokens": 60,
                "seed": seed,
            },
        ).json()
        assert re.fullmatch(pattern, r["choices"][0]["message"]["content"]), r
        assert r["choices"][0]["finish_reason"] == "stop"
    r = server.client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_object"},
        max_tokens=400,
        temperature=0,
    )
    text = r.choices[0].message.content
    assert text.startswith("{"), text
    if r.choices[0].finish_reason == "stop":  # cut by max_tokens, it is a prefix of an object
        assert isinstance(json.loads(text), dict)


def test_a_tool_call_round_trip_with_the_openai_client(random_gpt):
    server, _, tok = random_gpt
    messages = [{"role": "user", "content": "What is the weather in Babylon this week?"}]
    r = server.client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER, CLOCK], tool_choice="required", max_tokens=200, seed=3
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    calls = choice.message.tool_calls
    assert calls and choice.message.content is None
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        tool = {"get_weather": WEATHER, "clock": CLOCK}[call.function.name]
        jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    # the template saw the tools: the prompt is the template's rendering with them
    rendered = render(TOOLS_TEMPLATE, messages, add_generation_prompt=True, tools=[WEATHER, CLOCK])
    assert r.usage.prompt_tokens == len(tok.encode(rendered, add_special_tokens=False))
    # the client sends the call back with its result; the model answers in text
    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
        *({"role": "tool", "tool_call_id": c.id, "content": '{"sky": "clear"}'} for c in calls),
    ]
    r2 = server.client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER], max_tokens=5)
    assert r2.choices[0].finish_reason in ("stop", "length") and r2.choices[0].message.tool_calls is None
    turns = [
        {
            "role": "assistant",
            "tool_calls": [
                {**c.model_dump(), "function": {"name": c.function.name, "arguments": json.loads(c.function.arguments)}}
                for c in calls
            ],
        }
    ]
    rendered2 = render(TOOLS_TEMPLATE, messages + turns + follow[2:], add_generation_prompt=True, tools=[WEATHER])
    assert r2.usage.prompt_tokens == len(tok.encode(rendered2, add_special_tokens=False))


def test_a_named_tool_and_a_streamed_call(random_gpt):
    server, _, _ = random_gpt
    ask = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "weather?"}],
        "tools": [WEATHER, CLOCK],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 100,
    }
    r = server.client.chat.completions.create(**ask)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    chunks = list(server.client.chat.completions.create(**ask, stream=True))
    streamed = [tc for ch in chunks for c in ch.choices for tc in (c.delta.tool_calls or [])]
    assert [tc.function.name for tc in streamed] == ["get_weather"]
    assert json.loads(streamed[0].function.arguments) == json.loads(call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tagged_calls_in_free_text_are_read_back():
    tools = [WEATHER, CLOCK]
    text = (
        'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Babylon", "days": 2}}\n</tool_call>'
    )
    content, calls = read_calls(text, tools, "auto")
    assert content == "Let me look." and [c.name for c in calls] == ["get_weather"]
    assert json.loads(calls[0].arguments) == {"city": "Babylon", "days": 2}
    # unknown names and broken JSON stay text
    for bad in ('<tool_call>{"name": "fly", "arguments": {}}</tool_call>', "<tool_call>{nope</tool_call>"):
        assert read_calls(bad, tools, "auto") == (bad, [])
    assert read_calls(text, tools, "none") == (text, [])


def test_bad_schemas_grammars_and_tool_choices_are_400s(random_gpt):
    server, _, _ = random_gpt
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    for extra, param, words in (
        ({"response_format": {"type": "regex", "regex": "(unclosed"}}, "response_format", "regex"),
        ({"response_format": {"type": "grammar", "grammar": "start: nothing_defined"}}, "response_format", ""),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "fly"}}},
            "tool_choice",
            "not among",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "response_format",
            "tool call",
        ),
    ):
        r = _post(server, "/v1/chat/completions", {**chat, **extra})
        assert r.status_code == 400, (extra, r.text)
        err = r.json()["error"]
        assert err["param"] == param and words in err["message"], err


def test_a_tokenizer_llguidance_cannot_read_is_a_clear_error(tiny_pretrained):
    tok = load_tokenizer(tiny_pretrained["bert"])  # WordPiece: words joined with spaces, not bytes
    with pytest.raises(lmlab.errors.ConfigError, match="wordpiece"):
        token_table(tok, tok.vocab_size, [0])
