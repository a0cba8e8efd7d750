"""PersonaJudgeLLM as a FunctionCallingLLM: LlamaIndex tool calling on constrained decoding,
on a tiny model with a byte-level BPE tokenizer (one the grammar engine reads)."""

from __future__ import annotations

from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, ToolCallBlock
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.output_parsers.base import OutputParserException
from llama_index.core.tools import FunctionTool
from pydantic import BaseModel, Field

from pj_core.calls import shared_engine
from pj_core.errors import InvalidToolError
from pj_integrations.llama_index import PersonaJudgeLLM
from tests._bpe import save_tiny_bpe_model
from tests.test_llama_index import record_engine_calls


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def multiply(x: int, y: int) -> int:
    """Multiply two integers."""
    return x * y


class Paint(BaseModel):
    """Paint the wall."""

    colour: str = Field(pattern="^(red|blue)$")


def paint(colour: str) -> str:
    """Paint the wall red or blue."""
    return f"painted {colour}"


ADD = FunctionTool.from_defaults(add)
MULTIPLY = FunctionTool.from_defaults(multiply)
PAINT = FunctionTool.from_defaults(paint, fn_schema=Paint)
TOOLS = [ADD, MULTIPLY, PAINT]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_bpe_model(tmp_path_factory.mktemp("tiny_bpe_li"), seed=6)


@pytest.fixture()
def llm(tiny_dir: str) -> PersonaJudgeLLM:
    return PersonaJudgeLLM(
        model=tiny_dir, preferences=["be funny", "be brief"], max_tokens=120, seed=0
    )


@pytest.fixture()
def calls(tiny_dir: str, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The conversation and options of each engine call."""
    return record_engine_calls(shared_engine(tiny_dir).engine, monkeypatch)


def _valid(name: str, args: dict[str, Any]) -> bool:
    if name in ("add", "multiply"):
        return len(args) == 2 and all(isinstance(v, int) for v in args.values())
    return name == "paint" and args.get("colour") in ("red", "blue")


def test_it_is_a_function_calling_llm(llm: PersonaJudgeLLM) -> None:
    assert isinstance(llm, FunctionCallingLLM)
    assert llm.metadata.is_function_calling_model


def test_required_tool_calls_are_valid_tool_selections(llm: PersonaJudgeLLM) -> None:
    for seed in range(3):
        response = llm.chat_with_tools(TOOLS, "hello", tool_required=True, seed=seed)
        blocks = [b for b in response.message.blocks if isinstance(b, ToolCallBlock)]
        assert len(blocks) == 1 and not response.message.content
        selections = llm.get_tool_calls_from_response(response)
        assert len(selections) == 1
        selection = selections[0]
        assert _valid(selection.tool_name, selection.tool_kwargs), selection
        assert selection.tool_id == blocks[0].tool_call_id and selection.tool_id.startswith("call_")
        assert response.additional_kwargs["finish_reason"] == "eos"


@pytest.mark.parametrize(
    "choice", ["multiply", {"type": "function", "function": {"name": "multiply"}}]
)
def test_a_named_tool_choice(llm: PersonaJudgeLLM, choice: Any) -> None:
    response = llm.chat_with_tools([ADD, MULTIPLY], "hello", tool_choice=choice)
    assert [s.tool_name for s in llm.get_tool_calls_from_response(response)] == ["multiply"]


def test_tool_choice_none_answers_in_text(llm: PersonaJudgeLLM) -> None:
    response = llm.chat_with_tools([ADD], "hello", tool_choice="none", max_tokens=8)
    assert response.message.content and not response.message.content.startswith("<")
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ValueError, match="expected at least one tool call"):
        llm.get_tool_calls_from_response(response)


def test_one_call_per_answer_unless_the_field_allows_several(
    llm: PersonaJudgeLLM, calls: list[dict[str, Any]]
) -> None:
    llm.chat_with_tools([ADD], "hello", tool_required=True, allow_parallel_tool_calls=True)
    assert "parallel_tool_calls" not in calls[-1]
    several = llm.model_copy(update={"parallel_tool_calls": True})
    response = several.chat_with_tools(
        [ADD], "hello", tool_required=True, allow_parallel_tool_calls=True
    )
    assert calls[-1]["parallel_tool_calls"] is True
    assert all(
        _valid(s.tool_name, s.tool_kwargs) for s in several.get_tool_calls_from_response(response)
    )
    several.chat_with_tools([ADD], "hello", tool_required=True)  # the caller did not allow them
    assert "parallel_tool_calls" not in calls[-1]


def test_streaming_sends_the_calls_whole_in_the_last_chunk(llm: PersonaJudgeLLM) -> None:
    chunks = list(llm.stream_chat_with_tools(TOOLS, "hello", tool_required=True, seed=2))
    assert chunks and all(not c.message.content for c in chunks)
    last = chunks[-1]
    streamed = [(s.tool_name, s.tool_kwargs) for s in llm.get_tool_calls_from_response(last)]
    whole = llm.chat_with_tools(TOOLS, "hello", tool_required=True, seed=2)
    assert streamed == [
        (s.tool_name, s.tool_kwargs) for s in llm.get_tool_calls_from_response(whole)
    ]
    assert last.additional_kwargs["finish_reason"] == "eos"


async def test_async_tool_calls(llm: PersonaJudgeLLM) -> None:
    response = await llm.achat_with_tools(TOOLS, "hello", tool_required=True, seed=1)
    sync = llm.chat_with_tools(TOOLS, "hello", tool_required=True, seed=1)
    got = [(s.tool_name, s.tool_kwargs) for s in llm.get_tool_calls_from_response(response)]
    assert got == [(s.tool_name, s.tool_kwargs) for s in llm.get_tool_calls_from_response(sync)]
    chunks = [c async for c in await llm.astream_chat_with_tools(TOOLS, "hi", tool_required=True)]
    assert llm.get_tool_calls_from_response(chunks[-1])


def test_the_tool_result_round_trip(llm: PersonaJudgeLLM, calls: list[dict[str, Any]]) -> None:
    first = llm.chat_with_tools([ADD], "What is 2 + 3?", tool_choice="add")
    selection = llm.get_tool_calls_from_response(first)[0]
    history = [
        ChatMessage(role="user", content="What is 2 + 3?"),
        first.message,  # as FunctionAgent keeps it, then the result it gets back:
        ChatMessage(
            role="tool",
            content=str(ADD(**selection.tool_kwargs).content),
            additional_kwargs={"tool_call_id": selection.tool_id},
        ),
    ]
    answer = llm.chat_with_tools([ADD], chat_history=history, max_tokens=16)
    conversation = calls[-1]["conversation"]
    assert conversation[1]["role"] == "assistant"
    assert conversation[1]["tool_calls"] == [{"name": "add", "arguments": selection.tool_kwargs}]
    assert conversation[2] == {
        "role": "tool",
        "content": str(add(**selection.tool_kwargs)),
        "name": "add",  # found from the call it answers
    }
    assert answer.message.content or llm.get_tool_calls_from_response(answer)


def test_predict_and_call_runs_the_chosen_tool(llm: PersonaJudgeLLM) -> None:
    output = llm.predict_and_call([ADD], "What is 2 + 3?", tool_required=True)
    assert len(output.sources) == 1 and not output.sources[0].is_error
    kwargs = output.sources[0].raw_input["kwargs"]
    assert output.response == str(add(**kwargs))


def test_bad_tools_and_choices_are_typed_errors(llm: PersonaJudgeLLM) -> None:
    with pytest.raises(InvalidToolError, match="names no tool"):
        llm.chat_with_tools([ADD], "hello", tool_choice="subtract")
    with pytest.raises(InvalidToolError, match="not understood"):
        llm.chat_with_tools([ADD], "hello", tool_choice=3)
    with pytest.raises(InvalidToolError, match="not a LlamaIndex tool"):
        llm.chat_with_tools([add], "hello")  # type: ignore[list-item]  # wrap it in FunctionTool
    with pytest.raises(InvalidToolError, match="two different tools"):
        llm.chat_with_tools([ADD, FunctionTool.from_defaults(multiply, name="add")], "hello")


def test_no_tools_is_a_plain_chat(llm: PersonaJudgeLLM, calls: list[dict[str, Any]]) -> None:
    response = llm.chat_with_tools([], "hello", max_tokens=4)
    assert "tools" not in calls[-1]
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []


def test_a_budget_that_ends_inside_a_call_is_a_parsing_error(llm: PersonaJudgeLLM) -> None:
    with pytest.raises(OutputParserException, match="inside a tool call"):
        llm.chat_with_tools([ADD], "hello", tool_choice="add", max_tokens=4)
    with pytest.raises(OutputParserException, match="inside a tool call"):
        list(llm.stream_chat_with_tools([ADD], "hello", tool_choice="add", max_tokens=4))


def test_tool_choice_after_a_tool_result(llm: PersonaJudgeLLM, calls: list[dict[str, Any]]) -> None:
    first = llm.chat_with_tools([ADD], "What is 2 + 3?", tool_choice="add")
    selection = llm.get_tool_calls_from_response(first)[0]
    result = ChatMessage(
        role="tool", content="5", additional_kwargs={"tool_call_id": selection.tool_id}
    )
    history = [ChatMessage(role="user", content="What is 2 + 3?"), first.message, result]
    texts = llm.model_copy(update={"tool_choice_after_tool": "none"})
    answer = texts.chat_with_tools([ADD], chat_history=history, max_tokens=8)
    assert calls[-1]["tool_choice"] == "none" and answer.message.content
    assert texts.get_tool_calls_from_response(answer, error_on_no_tool_call=False) == []
    # What the caller asks for wins; so does a required call; before a result, it is unused.
    texts.chat_with_tools([ADD], chat_history=history, tool_choice="add")
    assert calls[-1]["tool_choice"] == "add"
    texts.chat_with_tools([ADD], chat_history=history, tool_required=True)
    assert calls[-1]["tool_choice"] == "required"
    texts.chat_with_tools([ADD], "What is 2 + 3?", max_tokens=8)
    assert "tool_choice" not in calls[-1]
    llm.chat_with_tools([ADD], chat_history=history, max_tokens=8)  # unset: auto
    assert "tool_choice" not in calls[-1]
