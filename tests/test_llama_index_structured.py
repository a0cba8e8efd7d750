"""PersonaJudgeLLM's structured output (structured_predict and its async and streaming forms,
as_structured_llm) on constrained decoding, on a tiny model with a byte-level BPE tokenizer:
every returned object is valid; an answer cut short raises LlamaIndex's parsing error."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage
from llama_index.core.output_parsers.base import OutputParserException
from llama_index.core.program.utils import FlexibleModel
from llama_index.core.prompts import PromptTemplate
from llama_index.core.types import PydanticProgramMode

from pj_core.calls import shared_engine
from pj_integrations.llama_index import PersonaJudgeLLM
from tests._bpe import Flag, save_tiny_bpe_model
from tests.test_llama_index import record_engine_calls

PROMPT = PromptTemplate("Is the {thing} ready?")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_bpe_model(tmp_path_factory.mktemp("tiny_bpe_li_structured"), seed=7)


@pytest.fixture()
def llm(tiny_dir: str) -> PersonaJudgeLLM:
    return PersonaJudgeLLM(
        model=tiny_dir, preferences=["be funny", "be brief"], max_tokens=120, seed=0
    )


@pytest.fixture()
def calls(tiny_dir: str, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The conversation and options of each engine call."""
    return record_engine_calls(shared_engine(tiny_dir).engine, monkeypatch)


def test_structured_predict_is_constrained_to_the_class(
    llm: PersonaJudgeLLM, calls: list[dict[str, Any]]
) -> None:
    for seed in range(3):
        flag = llm.structured_predict(Flag, PROMPT, llm_kwargs={"seed": seed}, thing="cake")
        assert isinstance(flag, Flag)
        assert calls[-1]["response_format"] is Flag and calls[-1]["seed"] == seed
        assert calls[-1]["conversation"][-1] == {"role": "user", "content": "Is the cake ready?"}
        assert calls[-1].get("tools") is None  # one constrained answer, no tool catalogue


async def test_async_structured_predict_gives_the_same_object(llm: PersonaJudgeLLM) -> None:
    flag = await llm.astructured_predict(Flag, PROMPT, thing="cake")
    assert flag == llm.structured_predict(Flag, PROMPT, thing="cake")


def test_streaming_gives_partial_objects_then_the_object(llm: PersonaJudgeLLM) -> None:
    outputs = list(llm.stream_structured_predict(Flag, PROMPT, thing="cake"))
    *partials, last = outputs
    assert isinstance(last, Flag) and last == llm.structured_predict(Flag, PROMPT, thing="cake")
    assert all(isinstance(p, FlexibleModel) for p in partials)


async def test_async_streaming(llm: PersonaJudgeLLM) -> None:
    stream = await llm.astream_structured_predict(Flag, PROMPT, thing="cake")
    outputs = [output async for output in stream]
    assert outputs[-1] == llm.structured_predict(Flag, PROMPT, thing="cake")


def test_as_structured_llm(llm: PersonaJudgeLLM) -> None:
    structured = llm.as_structured_llm(Flag)
    response = structured.chat([ChatMessage(role="user", content="Is the cake ready?")])
    assert isinstance(response.raw, Flag)
    assert Flag.model_validate_json(response.message.content or "") == response.raw


def test_a_budget_that_ends_early_is_a_parsing_error(llm: PersonaJudgeLLM) -> None:
    short = {"max_tokens": 3}
    with pytest.raises(OutputParserException, match=r"ended \(length\) after 3 tokens"):
        llm.structured_predict(Flag, PROMPT, llm_kwargs=short, thing="cake")
    with pytest.raises(OutputParserException, match="before its Flag object was complete"):
        list(llm.stream_structured_predict(Flag, PROMPT, llm_kwargs=short, thing="cake"))
    with pytest.raises(OutputParserException):
        llm.as_structured_llm(Flag).chat([ChatMessage(content="hi")], max_tokens=3)


def test_function_mode_uses_the_constrained_tool_call(
    llm: PersonaJudgeLLM, calls: list[dict[str, Any]]
) -> None:
    function_mode = llm.model_copy(update={"pydantic_program_mode": PydanticProgramMode.FUNCTION})
    flag = function_mode.structured_predict(Flag, PROMPT, thing="cake")
    assert isinstance(flag, Flag)
    assert calls[-1]["tool_choice"] == "required"
    assert [t["function"]["name"] for t in calls[-1]["tools"]] == ["Flag"]
