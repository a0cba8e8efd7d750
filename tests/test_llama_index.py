"""PersonaJudgeLLM (LlamaIndex adapter) on a tiny random model: fast mechanics tests.

What is checked: the adapter hands the engine the conversation LlamaIndex gave it (chat
template roles, system prompt, personas), returns exactly what the engine produced for the
same settings and seed, streams cumulative text with deltas, honours per-call and per-user
settings, and its async methods leave the event loop free while decoding.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from typing import Any, cast

import pytest
from llama_index.core.base.llms.types import (
    ChatMessage,
    CompletionResponse,
    ImageBlock,
    MessageRole,
    TextBlock,
)
from llama_index.core.prompts import PromptTemplate

from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError, InvalidPersonaError, InvalidPromptError
from pj_core.personas import GenerationDefaults, PersonaProfile, resolve_personas
from pj_core.personas.store import ProfileStore
from pj_core.results import GenerationResult, StreamEvent
from pj_integrations.llama_index import PersonaJudgeLLM, iterate_in_thread
from tests._tiny import make_tiny_model, make_tiny_tokenizer

# Words the tiny tokenizer knows, so rendered prompts have no <unk> and stay distinct.
FUNNY, BRIEF = "be funny", "be brief"
SETTINGS: dict[str, Any] = {"max_tokens": 6, "seed": 3, "temperature": 1.0, "top_k": 0}


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    tokenizer = make_tiny_tokenizer(extra_words=8)
    model = make_tiny_model(len(tokenizer), seed=1)
    return PersonaJudge(model, tokenizer, name="tiny-llama", context_window=256, eos_token_ids=[1])


def record_engine_calls(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> list[dict[str, Any]]:
    """Record each request made to ``engine`` (conversation, personas, settings), once.

    ``generate`` may itself call ``stream``; a thread-local flag keeps that inner call from
    being recorded a second time.
    """
    calls: list[dict[str, Any]] = []
    inside = threading.local()
    generate, stream = engine.generate, engine.stream

    def recorded_generate(conversation: Any, personas: Any, **kw: Any) -> GenerationResult:
        calls.append({"conversation": conversation, "personas": personas, **kw})
        inside.active = True
        try:
            return generate(conversation, personas, **kw)
        finally:
            inside.active = False

    def recorded_stream(conversation: Any, personas: Any, **kw: Any) -> Iterator[StreamEvent]:
        if not getattr(inside, "active", False):
            calls.append({"conversation": conversation, "personas": personas, **kw})
        return stream(conversation, personas, **kw)

    monkeypatch.setattr(engine, "generate", recorded_generate)
    monkeypatch.setattr(engine, "stream", recorded_stream)
    return calls


class Recorder:
    """The requests the adapter made to the engine during one test."""

    def __init__(self, engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = record_engine_calls(engine, monkeypatch)


@pytest.fixture
def recorder(engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch) -> Recorder:
    return Recorder(engine, monkeypatch)


def make_llm(engine: PersonaJudge, **fields: Any) -> PersonaJudgeLLM:
    fields.setdefault("preferences", [FUNNY, BRIEF])
    return PersonaJudgeLLM(engine=engine, **{**SETTINGS, **fields})


def direct(engine: PersonaJudge, conversation: Any, personas: list[str]) -> GenerationResult:
    """What the engine gives without the adapter, with the adapter's test settings."""
    return engine.generate(
        conversation, personas, max_new_tokens=6, seed=3, temperature=1.0, top_k=0
    )


def user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


# ----------------------------------------------------------------------------- metadata


def test_metadata_comes_from_the_engine_and_settings(engine: PersonaJudge) -> None:
    llm = make_llm(engine, max_tokens=17)
    meta = llm.metadata
    assert (meta.num_output, meta.model_name) == (17, "tiny-llama")
    # The window less what the engine adds to a system and a user message: the chat template
    # and the longest persona text (issue 34, item 2).
    talk = [{"role": "system", "content": "hello"}, {"role": "user", "content": "hello"}]
    added = engine.count_prompt_tokens(talk, [FUNNY, BRIEF]) - 2
    assert meta.context_window == 256 - added
    assert meta.is_chat_model is True


# ----------------------------------------------------------------------------- sync calls


def test_complete_returns_the_engines_answer_with_stats(
    engine: PersonaJudge, recorder: Recorder
) -> None:
    response = make_llm(engine).complete("hello world")
    expected = direct(engine, [{"role": "user", "content": "hello world"}], [FUNNY, BRIEF])
    assert response.text == expected.text
    # raw is a dict (LlamaIndex's callbacks do dict(raw)) with the usage and the result
    assert isinstance(response.raw, dict) and isinstance(response.raw["result"], GenerationResult)
    assert response.raw["result"].token_ids == expected.token_ids
    assert response.raw["usage"] == {
        "prompt_tokens": expected.prompt_tokens,
        "completion_tokens": len(expected.token_ids),
        "total_tokens": expected.prompt_tokens + len(expected.token_ids),
    }
    info = response.additional_kwargs
    assert info["completion_tokens"] == len(expected.token_ids)
    assert info["stats"]["tokens"] == expected.stats.tokens
    assert 0.0 <= info["stats"]["acceptance_rate"] <= 1.0
    assert info["finish_reason"] == expected.finish_reason
    assert [p["text"] for p in info["personas"]] == ["be funny", "be brief"]
    assert info["persona_source"] == "preferences"
    # The engine got the adapter's settings under its own names.
    call = recorder.calls[0]
    assert (call["max_new_tokens"], call["seed"], call["temperature"]) == (6, 3, 1.0)


def test_chat_passes_roles_through_for_the_chat_template(
    engine: PersonaJudge, recorder: Recorder
) -> None:
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="be brief"),
        user("hello"),
        ChatMessage(role=MessageRole.ASSISTANT, content="yes"),
        ChatMessage(role=MessageRole.TOOL, content="the cat"),
        user("why"),
    ]
    response = make_llm(engine).chat(messages)
    conversation = recorder.calls[0]["conversation"]
    assert conversation == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "yes"},
        {"role": "tool", "content": "the cat"},  # the engine shows it as a user turn
        {"role": "user", "content": "why"},
    ]
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content == direct(engine, conversation, [FUNNY, BRIEF]).text
    assert response.additional_kwargs["stats"]["tokens"] == len(response.raw["result"].token_ids)


def test_chat_prompt_uses_the_models_chat_template(engine: PersonaJudge) -> None:
    """The prompt is the tokenizer's template with the persona in the system turn, not the
    generic "user: ..." text LlamaIndex's CustomLLM would build."""
    from pj_core.prompts import render_ids, render_text

    response = make_llm(engine, system_prompt="the dog").chat([user("hello")])
    conversation = [{"role": "system", "content": "the dog"}, {"role": "user", "content": "hello"}]
    rendered = render_text(engine.tokenizer, conversation, FUNNY)
    assert rendered.startswith("<|im_start|>system") and "user: hello" not in rendered
    assert "the dog" in rendered and FUNNY in rendered
    # The engine decoded from exactly these prompts (the longest one's length is reported).
    lengths = [len(render_ids(engine.tokenizer, conversation, p)) for p in (FUNNY, BRIEF)]
    assert response.raw["result"].prompt_tokens == max(lengths)


def test_system_prompt_reaches_chat_and_complete_once(
    engine: PersonaJudge, recorder: Recorder
) -> None:
    llm = make_llm(engine, system_prompt="the dog")
    llm.chat([user("hello")])
    llm.complete("hello")
    llm.complete("hello", formatted=True)  # LlamaIndex already applied the system prompt
    # predict() prepends system_prompt itself; the adapter must not add it a second time.
    llm.predict(PromptTemplate("hello {x}"), x="world")
    system = {"role": "system", "content": "the dog"}
    conversations = [call["conversation"] for call in recorder.calls]
    assert conversations[0] == [system, {"role": "user", "content": "hello"}]
    assert conversations[1] == [system, {"role": "user", "content": "hello"}]
    assert conversations[2] == [{"role": "user", "content": "hello"}]
    assert conversations[3] == [system, {"role": "user", "content": "hello world"}]


def test_stream_complete_is_cumulative_and_ends_with_stats(engine: PersonaJudge) -> None:
    llm = make_llm(engine, max_tokens=12)
    chunks = list(llm.stream_complete("hello world"))
    expected = llm.complete("hello world")
    assert chunks and all(isinstance(c, CompletionResponse) for c in chunks)
    assert "".join(c.delta or "" for c in chunks) == expected.text
    running = ""
    for chunk in chunks:
        running += chunk.delta or ""
        assert chunk.text == running
    assert chunks[-1].additional_kwargs["stats"] == {
        **expected.additional_kwargs["stats"],
        "prefill_seconds": chunks[-1].additional_kwargs["stats"]["prefill_seconds"],
        "decode_seconds": chunks[-1].additional_kwargs["stats"]["decode_seconds"],
        "tokens_per_second": chunks[-1].additional_kwargs["stats"]["tokens_per_second"],
    }
    assert isinstance(chunks[-1].raw["result"], GenerationResult)
    assert chunks[-1].raw["usage"] == expected.raw["usage"]
    assert all(isinstance(c.raw["event"], StreamEvent) for c in chunks[:-1])


def test_stream_chat_is_cumulative(engine: PersonaJudge) -> None:
    llm = make_llm(engine, max_tokens=12)
    chunks = list(llm.stream_chat([user("hello")]))
    expected = llm.chat([user("hello")])
    assert chunks[-1].message.content == expected.message.content
    assert "".join(c.delta or "" for c in chunks) == expected.message.content
    assert all(c.message.role == MessageRole.ASSISTANT for c in chunks)
    assert chunks[-1].additional_kwargs["completion_tokens"] == len(
        expected.raw["result"].token_ids
    )
    assert chunks[-1].raw["usage"] == expected.raw["usage"]


# ----------------------------------------------------------------------------- settings


def test_per_call_options_override_the_objects(engine: PersonaJudge, recorder: Recorder) -> None:
    llm = make_llm(engine)
    response = llm.complete("hello", preferences=["the cat", "the dog"], max_tokens=2, seed=9)
    call = recorder.calls[0]
    assert [p.text for p in call["personas"]] == ["the cat", "the dog"]
    assert (call["max_new_tokens"], call["seed"]) == (2, 9)
    assert len(response.raw["result"].token_ids) <= 2
    # The object itself is unchanged.
    assert llm.preferences == [FUNNY, BRIEF] and llm.max_tokens == 6


def test_unknown_call_option_is_a_typed_error(engine: PersonaJudge) -> None:
    with pytest.raises(InvalidGenerationConfigError, match="temprature"):
        make_llm(engine).complete("hello", temprature=0.1)


def test_bad_settings_are_typed_errors(engine: PersonaJudge) -> None:
    with pytest.raises(InvalidPersonaError, match="only one"):
        make_llm(engine, profile_id="alice").complete("hello")
    with pytest.raises(InvalidGenerationConfigError, match="top_p"):
        make_llm(engine, top_p=0.0).complete("hello")
    image = ChatMessage(
        role=MessageRole.USER, blocks=[TextBlock(text="hi"), ImageBlock(image=b"\x89PNG")]
    )
    with pytest.raises(InvalidPromptError, match="text only"):
        make_llm(engine).chat([image])


def test_user_copies_share_the_engine_and_use_their_profiles(
    engine: PersonaJudge, recorder: Recorder
) -> None:
    store = ProfileStore(":memory:")
    store.put(
        PersonaProfile(
            user_id="alice",
            preferences=["be funny", "be brief"],
            defaults=GenerationDefaults(max_new_tokens=3, temperature=0.5),
        )
    )
    store.put(PersonaProfile(user_id="bob", preferences=["the cat", "the dog"]))
    base = PersonaJudgeLLM(engine=engine, profile_store=store, seed=1)
    alice = base.model_copy(update={"profile_id": "alice"})
    bob = base.model_copy(update={"profile_id": "bob", "max_tokens": 4})
    assert alice.get_engine() is bob.get_engine() is engine
    a, b = alice.complete("hello"), bob.complete("hello")
    alice_call, bob_call = recorder.calls
    assert [p.text for p in alice_call["personas"]] == [
        p.text for p in resolve_personas(store.get("alice"))
    ]
    assert [p.text for p in bob_call["personas"]] == ["the cat", "the dog"]
    # Alice's saved defaults apply where the developer left the default...
    assert (alice_call["max_new_tokens"], alice_call["temperature"]) == (3, 0.5)
    # ...but never over a setting chosen explicitly (seed on base, max_tokens on bob's copy).
    assert alice_call["seed"] == 1 and bob_call["max_new_tokens"] == 4
    assert a.additional_kwargs["persona_source"] == "profile:alice"
    assert b.additional_kwargs["persona_source"] == "profile:bob"


# ----------------------------------------------------------------------------- async


async def test_async_methods_match_the_sync_ones(engine: PersonaJudge) -> None:
    llm = make_llm(engine, max_tokens=10)
    sync_text = llm.complete("hello").text
    sync_chat = llm.chat([user("hello")]).message.content
    assert (await llm.acomplete("hello")).text == sync_text
    assert (await llm.achat([user("hello")])).message.content == sync_chat
    chunks = [c async for c in await llm.astream_complete("hello")]
    assert chunks[-1].text == sync_text == "".join(c.delta or "" for c in chunks)
    assert "stats" in chunks[-1].additional_kwargs
    chat_chunks = [c async for c in await llm.astream_chat([user("hello")])]
    assert chat_chunks[-1].message.content == sync_chat
    assert "stats" in chat_chunks[-1].additional_kwargs


async def test_async_errors_reach_the_caller(engine: PersonaJudge) -> None:
    llm = make_llm(engine)
    with pytest.raises(InvalidGenerationConfigError):
        await llm.acomplete("hello", lookahead=0)
    with pytest.raises(InvalidGenerationConfigError):
        [c async for c in await llm.astream_chat([user("hello")], lookahead=0)]


def block_until_ticked(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch, ticked: threading.Event
) -> list[bool]:
    """Make each generation wait, mid-flight, until another coroutine has ticked.

    If an async method ran the engine on the event loop's thread, the ticker could never
    run, the wait would time out, and the recorded flag would be False.
    """
    seen: list[bool] = []
    stream = engine.stream

    def waiting_stream(*args: Any, **kw: Any) -> Iterator[StreamEvent]:
        events = stream(*args, **kw)
        first = next(events)
        seen.append(ticked.wait(timeout=10))
        yield first
        yield from events

    monkeypatch.setattr(engine, "stream", waiting_stream)
    monkeypatch.setattr(
        engine, "generate", lambda *a, **kw: list(waiting_stream(*a, **kw))[-1].result
    )
    return seen


@pytest.mark.parametrize("method", ["acomplete", "achat", "astream_complete", "astream_chat"])
async def test_async_methods_leave_the_event_loop_free(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    ticked = threading.Event()
    seen = block_until_ticked(engine, monkeypatch, ticked)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1
            if ticks == 3:
                ticked.set()

    ticking = asyncio.create_task(ticker())
    llm = make_llm(engine)
    try:
        if method == "acomplete":
            text = (await llm.acomplete("hello")).text
        elif method == "achat":
            text = (await llm.achat([user("hello")])).message.content or ""
        elif method == "astream_complete":
            text = [c async for c in await llm.astream_complete("hello")][-1].text
        else:
            chunks = [c async for c in await llm.astream_chat([user("hello")])]
            text = chunks[-1].message.content or ""
    finally:
        ticking.cancel()
    assert seen == [True], "the ticker could not run while the generation was in progress"
    assert text == direct(engine, [{"role": "user", "content": "hello"}], [FUNNY, BRIEF]).text


async def test_abandoned_async_stream_stops_the_worker() -> None:
    produced: list[int] = []
    finished = threading.Event()

    def numbers() -> Iterator[int]:
        try:
            for i in range(1000):
                produced.append(i)
                time.sleep(0.002)  # a slow producer, as decoding is
                yield i
        finally:
            finished.set()

    # An async generator function, annotated as returning AsyncIterator: aclose() is there.
    stream = cast(AsyncGenerator[int, None], iterate_in_thread(numbers))
    async for item in stream:
        if item == 2:
            break
    await stream.aclose()
    assert await asyncio.to_thread(finished.wait, 5)
    assert len(produced) < 1000


def test_settings_round_trip_through_llama_index_json() -> None:
    profile = PersonaProfile(user_id="carol", preferences=["humor"], description="A chef.")
    llm = PersonaJudgeLLM(persona=profile, max_tokens=5, seed=2, stop=["\n\n"])
    back = PersonaJudgeLLM.from_json(llm.to_json())
    assert back.persona == profile
    assert (back.max_tokens, back.seed, back.stop) == (5, 2, ["\n\n"])
    listed = PersonaJudgeLLM(preferences=["humor", "Answer like a pirate."])
    assert PersonaJudgeLLM.from_json(listed.to_json()).preferences == listed.preferences


def test_base_model_without_chat_template_stops_at_the_next_user_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokenizer = make_tiny_tokenizer(extra_words=8, chat_template=False)
    base = PersonaJudge(make_tiny_model(len(tokenizer), seed=2), tokenizer, name="tiny-base")
    calls = record_engine_calls(base, monkeypatch)
    response = make_llm(base, stop=["the dog"]).chat([user("hello")])
    assert calls[0]["stop"] == ["the dog", "\nUser:"]
    assert response.raw["result"].text == response.message.content


def test_token_counting_handler_reads_the_engines_usage(engine: PersonaJudge) -> None:
    # LlamaIndex's TokenCountingHandler does dict(response.raw) and reads its "usage"; a raw
    # that is no dict made every call raise (and "Empty Response" inside query engines).
    from llama_index.core.callbacks import CallbackManager, TokenCountingHandler

    counter = TokenCountingHandler(tokenizer=lambda text: text.split())
    llm = make_llm(engine, max_tokens=8, callback_manager=CallbackManager([counter]))
    replies = [
        llm.chat([user("hello")]),
        llm.complete("why the cat"),
        list(llm.stream_chat([user("the dog")]))[-1],
        list(llm.stream_complete("hello world"))[-1],
    ]
    assert len(counter.llm_token_counts) == len(replies)
    for event, reply in zip(counter.llm_token_counts, replies, strict=True):
        result = reply.raw["result"]
        assert event.prompt_token_count == result.prompt_tokens  # the engine's, not a guess
        assert event.completion_token_count == len(result.token_ids)
