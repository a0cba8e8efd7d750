"""``tools``, ``tool_choice`` and ``response_format`` over ``pj serve``: OpenAI's shapes mapped
onto the engine's constrained decoding, on a tiny model with a byte-level BPE tokenizer (one
the grammar engine reads), through httpx and the ``openai`` client."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionFunctionToolParam
from pydantic import BaseModel, Field

from pj_core.calls import shared_engine
from pj_core.personas import resolve_personas
from pj_core.server import ServerConfig, create_app
from tests._bpe import save_tiny_bpe_model
from tests._server import serving

MODEL = "tiny-bpe"
PREFERENCES = ["be funny", "be brief"]
HELLO = [{"role": "user", "content": "hello"}]
ADD: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
            "required": ["a", "b"],
        },
        "strict": True,
    },
}
PAINT: ChatCompletionFunctionToolParam = {
    "type": "function",
    "function": {
        "name": "paint",
        "description": "Paint the wall.",
        "parameters": {
            "type": "object",
            "properties": {"colour": {"type": "string", "enum": ["red", "blue"]}},
            "required": ["colour"],
        },
    },
}


class Pet(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=20)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_bpe_model(tmp_path_factory.mktemp("tiny_bpe_server"), seed=6)


@pytest.fixture(scope="module")
def base_url(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("store") / "profiles.db"
    config = ServerConfig(model=tiny_dir, served_model_name=MODEL, profile_store=store)
    with serving(create_app(config)) as url:
        yield url


def _post(base_url: str, **fields: Any) -> httpx.Response:
    body = {
        "model": MODEL,
        "messages": HELLO,
        "seed": 0,
        "max_tokens": 120,
        "persona_judge": {"preferences": PREFERENCES},
        **fields,
    }
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=120)


def _args_valid(name: str, arguments: dict[str, Any]) -> bool:
    if name == "add":
        return sorted(arguments) == ["a", "b"] and all(type(v) is int for v in arguments.values())
    return (
        name == "paint"
        and arguments == {"colour": arguments.get("colour")}
        and arguments["colour"] in ("red", "blue")
    )


def test_required_tool_calls_are_the_engines_calls(base_url: str, tiny_dir: str) -> None:
    response = _post(base_url, tools=[ADD, PAINT], tool_choice="required")
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and message["role"] == "assistant"
    calls = message["tool_calls"]
    assert len(calls) == 1
    call = calls[0]
    assert call["type"] == "function" and call["id"].startswith("call_")
    arguments = json.loads(call["function"]["arguments"])
    assert _args_valid(call["function"]["name"], arguments)
    expected = shared_engine(tiny_dir).engine.generate(
        HELLO,
        resolve_personas(PREFERENCES),
        seed=0,
        max_new_tokens=120,
        tools=[ADD, PAINT],
        tool_choice="required",
    )
    assert [(c.name, c.arguments) for c in expected.tool_calls] == [
        (call["function"]["name"], arguments)
    ]


def test_a_named_tool_is_called(base_url: str) -> None:
    for choice in ({"type": "function", "function": {"name": "paint"}}, "paint"):
        response = _post(base_url, tools=[ADD, PAINT], tool_choice=choice)
        calls = response.json()["choices"][0]["message"]["tool_calls"]
        assert [c["function"]["name"] for c in calls] == ["paint"]
        assert _args_valid("paint", json.loads(calls[0]["function"]["arguments"]))


def test_tool_choice_none_answers_in_text(base_url: str) -> None:
    body = _post(base_url, tools=[ADD], tool_choice="none", max_tokens=12).json()
    message = body["choices"][0]["message"]
    assert "tool_calls" not in message and isinstance(message["content"], str)
    assert body["choices"][0]["finish_reason"] in ("stop", "length")


def test_a_streamed_tool_call_comes_whole_in_the_last_chunk(base_url: str) -> None:
    whole = _post(base_url, tools=[ADD, PAINT], tool_choice="required").json()
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        seed=0,
        max_tokens=120,
        tools=[ADD, PAINT],
        tool_choice="required",
        stream=True,
        extra_body={"persona_judge": {"preferences": PREFERENCES}},
    )
    chunks = list(stream)
    assert all(not (c.choices and c.choices[0].delta.content) for c in chunks)  # no markup
    last = chunks[-1].choices[0]
    assert last.finish_reason == "tool_calls" and last.delta.tool_calls is not None
    streamed = [
        (t.function.name, t.function.arguments) for t in last.delta.tool_calls if t.function
    ]
    expected = whole["choices"][0]["message"]["tool_calls"]
    assert streamed == [(c["function"]["name"], c["function"]["arguments"]) for c in expected]


def test_a_tool_result_turn_is_read(base_url: str) -> None:
    first = _post(base_url, tools=[ADD], tool_choice="required").json()
    call = first["choices"][0]["message"]["tool_calls"][0]
    messages = [
        *HELLO,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "42"},
    ]
    response = _post(base_url, messages=messages, tools=[ADD], tool_choice="none", max_tokens=8)
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["choices"][0]["message"]["content"], str)


def test_response_formats(base_url: str) -> None:
    schema = {
        "type": "json_schema",
        "json_schema": {"name": "pet", "schema": Pet.model_json_schema()},
    }
    body = _post(base_url, response_format=schema).json()
    Pet.model_validate_json(body["choices"][0]["message"]["content"])
    assert body["choices"][0]["finish_reason"] == "stop"
    anything = _post(base_url, response_format={"type": "json_object"}).json()
    assert isinstance(json.loads(anything["choices"][0]["message"]["content"]), dict)
    text = _post(base_url, response_format={"type": "text"}, max_tokens=6)
    assert text.status_code == 200


def test_the_openai_clients_parse_helper(base_url: str) -> None:
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.parse(
        model=MODEL,
        messages=[{"role": "user", "content": "hello"}],
        response_format=Pet,
        seed=1,
        max_tokens=120,
        extra_body={"persona_judge": {"preferences": PREFERENCES}},
    )
    assert isinstance(completion.choices[0].message.parsed, Pet)


@pytest.mark.parametrize(
    ("fields", "status", "says"),
    [
        ({"response_format": {"type": "xml"}}, 400, "xml"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400, "schema"),
        ({"tools": [ADD], "tool_choice": "multiply"}, 400, "multiply"),
        ({"tools": [ADD], "tool_choice": {"type": "custom"}}, 400, "tool_choice"),
        ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, 400, "name"),
        ({"tools": []}, 400, "empty"),
        ({"tools": "add"}, 422, "tools"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"schema": {"type": "object", "not": {}}},
                }
            },
            400,
            "not",
        ),
    ],
)
def test_bad_tools_and_formats_are_a_400(
    base_url: str, fields: dict[str, Any], status: int, says: str
) -> None:
    response = _post(base_url, **fields)
    assert response.status_code == status, response.text
    assert says in response.json()["error"]["message"]
    assert httpx.get(f"{base_url}/health").status_code == 200


def test_a_budget_that_ends_inside_a_call_is_length(base_url: str) -> None:
    body = _post(base_url, tools=[ADD], tool_choice="required", max_tokens=3).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert "tool_calls" not in choice["message"]


def test_model_dir_is_not_leaked_in_the_model_name(base_url: str, tiny_dir: str) -> None:
    models = httpx.get(f"{base_url}/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL]
    assert str(Path(tiny_dir)) not in json.dumps(models)
