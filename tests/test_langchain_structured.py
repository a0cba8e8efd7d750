"""ChatPersonaJudge.with_structured_output on constrained decoding, on a tiny model with a
byte-level BPE tokenizer: every returned object is valid, every method, batch included."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import AIMessage

from pj_core.errors import InvalidConstraintError
from pj_integrations.langchain import ChatPersonaJudge
from tests._bpe import Flag, save_tiny_bpe_model

FLAG_SCHEMA: dict[str, Any] = {
    "title": "flag",
    "description": "A flag and a digit.",
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_bpe_model(tmp_path_factory.mktemp("tiny_bpe_structured"), seed=7)


@pytest.fixture()
def llm(tiny_dir: str) -> ChatPersonaJudge:
    return ChatPersonaJudge(
        model=tiny_dir, preferences=["be funny", "be brief"], max_tokens=120, seed=0
    )


def _flag_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and set(value) == {"ok", "n"}
        and isinstance(value["ok"], bool)
        and value["n"] in (1, 2, 3)
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_pydantic_and_dict_schemas_give_valid_objects(llm: ChatPersonaJudge, method: str) -> None:
    for seed in range(3):
        flag = llm.with_structured_output(Flag, method=method).invoke("hello", seed=seed)
        assert isinstance(flag, Flag)
        data = llm.with_structured_output(FLAG_SCHEMA, method=method).invoke("hello", seed=seed)
        assert _flag_dict(data), data


def test_json_mode_gives_a_json_object(llm: ChatPersonaJudge) -> None:
    data = llm.with_structured_output(None, method="json_mode").invoke("hello", max_tokens=200)
    assert isinstance(data, dict)
    # Given a schema, json_mode constrains to it too: no field left out.
    assert isinstance(llm.with_structured_output(Flag, method="json_mode").invoke("hi"), Flag)


def test_include_raw(llm: ChatPersonaJudge) -> None:
    out = llm.with_structured_output(Flag, include_raw=True).invoke("hello")
    assert set(out) == {"raw", "parsed", "parsing_error"}
    assert isinstance(out["raw"], AIMessage) and isinstance(out["parsed"], Flag)
    assert out["parsing_error"] is None


def test_an_answer_cut_short_never_parses(tiny_dir: str) -> None:
    short = ChatPersonaJudge(model=tiny_dir, preferences=["be funny", "be brief"], max_tokens=2)
    with pytest.raises(OutputParserException):
        short.with_structured_output(Flag).invoke("hello")
    with pytest.raises(OutputParserException):
        short.with_structured_output(Flag, method="function_calling").invoke("hello")
    out = short.with_structured_output(Flag, include_raw=True).invoke("hello")
    assert out["parsed"] is None and isinstance(out["parsing_error"], OutputParserException)
    assert out["raw"].response_metadata["finish_reason"] == "length"


def test_batches_and_streams_of_objects(llm: ChatPersonaJudge) -> None:
    structured = llm.with_structured_output(Flag)
    flags = structured.batch(["hello", "why", "the cat"])
    assert all(isinstance(f, Flag) for f in flags)
    streamed = list(llm.with_structured_output(FLAG_SCHEMA).stream("hello"))
    assert streamed and _flag_dict(streamed[-1])


def test_bad_methods_and_missing_schemas(llm: ChatPersonaJudge) -> None:
    with pytest.raises(InvalidConstraintError, match="method must be one of"):
        llm.with_structured_output(Flag, method="xml")
    with pytest.raises(InvalidConstraintError, match="needs a schema"):
        llm.with_structured_output(None)
