"""ChatPersonaJudge.bind_tools: LangChain tool calling on constrained decoding, on a tiny
model with a byte-level BPE tokenizer (one the grammar engine reads)."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from pj_core.calls import shared_engine
from pj_core.errors import InvalidToolError
from pj_integrations.langchain import ChatPersonaJudge, to_conversation
from tests._bpe import save_tiny_bpe_model


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Paint(BaseModel):
    """Paint the wall."""

    colour: str = Field(pattern="^(red|blue)$")


def multiply(x: int, y: int) -> int:
    """Multiply two integers."""
    return x * y


NAMES = {"add", "Paint", "multiply"}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_bpe_model(tmp_path_factory.mktemp("tiny_bpe_lc"), seed=6)


@pytest.fixture()
def llm(tiny_dir: str) -> ChatPersonaJudge:
    return ChatPersonaJudge(
        model=tiny_dir, preferences=["be funny", "be brief"], max_tokens=120, seed=0
    )


def _valid(call: Any) -> bool:
    args = call["args"]
    if call["name"] in ("add", "multiply"):
        return len(args) == 2 and all(isinstance(v, int) for v in args.values())
    return call["name"] == "Paint" and args.get("colour") in ("red", "blue")


def test_bound_tools_give_valid_calls_with_ids(llm: ChatPersonaJudge) -> None:
    bound = llm.bind_tools([add, Paint, multiply], tool_choice="any")
    for seed in range(3):
        message = bound.invoke("hello", seed=seed)
        assert isinstance(message, AIMessage) and message.content == ""
        assert len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call["name"] in NAMES and _valid(call), call
        assert call["id"] and call["id"].startswith("call_")
        assert message.response_metadata["finish_reason"] == "eos"


@pytest.mark.parametrize(
    "choice", ["multiply", {"type": "function", "function": {"name": "multiply"}}]
)
def test_a_named_tool_choice(llm: ChatPersonaJudge, choice: Any) -> None:
    message = llm.bind_tools([add, multiply], tool_choice=choice).invoke("hello")
    assert [c["name"] for c in message.tool_calls] == ["multiply"]


def test_streaming_gives_tool_call_chunks(llm: ChatPersonaJudge) -> None:
    bound = llm.bind_tools([add, Paint], tool_choice=True)
    full: AIMessageChunk | None = None
    for chunk in bound.stream("hello", seed=2):
        assert isinstance(chunk, AIMessageChunk)
        full = chunk if full is None else full + chunk
    assert full is not None and full.content == ""
    invoked = bound.invoke("hello", seed=2)
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [
        (c["name"], c["args"]) for c in invoked.tool_calls
    ]
    assert full.tool_call_chunks and full.tool_call_chunks[0]["id"]


def test_the_tool_message_round_trip(llm: ChatPersonaJudge) -> None:
    bound = llm.bind_tools([add], tool_choice="auto")
    first = llm.bind_tools([add], tool_choice="add").invoke("What is 2 + 3?")
    call = first.tool_calls[0]
    history: list[BaseMessage] = [
        HumanMessage("What is 2 + 3?"),
        first,
        ToolMessage(str(add.invoke(call["args"])), tool_call_id=call["id"], name="add"),
    ]
    turns = to_conversation(history)
    assert turns[1]["role"] == "assistant" and turns[1]["content"].startswith("<tool_call>")
    assert '"name": "add"' in turns[1]["content"]
    assert turns[2]["content"].startswith("Result of tool add:")
    # Anthropic-style content blocks of a call are not text: the call is in tool_calls.
    anthropic = AIMessage(
        content=[{"type": "tool_use", "id": call["id"], "name": "add", "input": call["args"]}],
        tool_calls=first.tool_calls,
    )
    assert to_conversation([HumanMessage("2 + 3?"), anthropic])[1] == turns[1]
    answer = bound.invoke(history)
    assert isinstance(answer, AIMessage)
    assert answer.tool_calls or isinstance(answer.content, str)


def test_bad_tools_and_choices_fail_at_bind_time(llm: ChatPersonaJudge) -> None:
    with pytest.raises(InvalidToolError, match="names no tool"):
        llm.bind_tools([add], tool_choice="subtract")
    with pytest.raises(InvalidToolError, match="two different tools are called 'add'"):
        llm.bind_tools([add, {"name": "add", "parameters": {"type": "object"}}])
    assert llm.bind_tools([add, add])  # the same tool twice is kept once
    with pytest.raises(InvalidToolError, match="not understood"):
        llm.bind_tools([add], tool_choice=3)


def test_a_budget_that_ends_inside_a_call_is_an_output_parsing_error(
    llm: ChatPersonaJudge,
) -> None:
    bound = llm.bind_tools([add], tool_choice="add")
    with pytest.raises(OutputParserException, match="inside a tool call"):
        bound.invoke("hello", max_tokens=4)
    with pytest.raises(OutputParserException):
        list(bound.stream("hello", max_tokens=4))


def test_batches_with_bound_tools_decode_together(
    llm: ChatPersonaJudge, tiny_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = shared_engine(tiny_dir).engine
    sizes: list[int] = []
    original = engine.generate_batch

    def spy(requests: Any, **kwargs: Any) -> Any:
        sizes.append(len(requests))
        return original(requests, **kwargs)

    monkeypatch.setattr(engine, "generate_batch", spy)
    bound = llm.bind_tools([add, Paint], tool_choice="required")
    messages = bound.batch(["hello", "why", "the cat"])
    assert sizes == [3]
    assert all(len(m.tool_calls) == 1 and _valid(m.tool_calls[0]) for m in messages)
