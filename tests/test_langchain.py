"""ChatPersonaJudge (LangChain adapter) on tiny random models saved to disk: fast tests of the
adapter's mechanics (messages, metadata, streaming, async, per-call and per-user personas).

The standard LangChain suites on the real embedded model are in test_langchain_standard.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGenerationChunk
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import ConfigurableField, RunnableConfig

from pj_core.calls import is_loaded, shared_engine
from pj_core.errors import (
    InvalidGenerationConfigError,
    InvalidPersonaError,
    InvalidPromptError,
    ProfileNotFoundError,
    UnknownPreferenceError,
)
from pj_core.personas import GenerationDefaults, PersonaProfile, resolve_personas
from pj_core.personas.store import open_store
from pj_integrations.langchain import ChatPersonaJudge, to_conversation
from tests._tiny import make_tiny_model, make_tiny_tokenizer

# Words of the tiny vocabulary, so prompts tokenize to real ids rather than <unk>.
QUESTION = "hello why the cat"


def _save_tiny(folder: Path, seed: int) -> str:
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=seed)
    model.config.max_position_embeddings = 256
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny_lc"), seed=0)


@pytest.fixture(scope="module")
def other_tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _save_tiny(tmp_path_factory.mktemp("tiny_lc_other"), seed=1)


@pytest.fixture()
def llm(tiny_dir: str) -> ChatPersonaJudge:
    return ChatPersonaJudge(
        model=tiny_dir, preferences=["Be funny.", "Be brief."], max_tokens=12, seed=0
    )


@pytest.fixture()
def store() -> Iterator[Any]:
    with open_store(":memory:") as opened:
        opened.put(PersonaProfile(user_id="alice", preferences=["humor"]))
        opened.put(
            PersonaProfile(
                user_id="bob",
                preferences=["concise", "expert"],
                defaults=GenerationDefaults(max_new_tokens=3),
            )
        )
        yield opened


def _personas_of(spec: Any) -> list[str]:
    return [p.text for p in resolve_personas(spec)]


# ----------------------------------------------------------------------------- messages


def test_to_conversation_merges_systems_and_same_role_runs() -> None:
    turns = to_conversation(
        [
            SystemMessage("Be kind."),
            HumanMessage("Hi"),
            HumanMessage("there"),
            AIMessage("Hello"),
            SystemMessage("Use French."),
            HumanMessage("How?"),
        ]
    )
    assert turns == [
        {"role": "system", "content": "Be kind.\n\nUse French."},
        {"role": "user", "content": "Hi\n\nthere"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "How?"},
    ]


def test_to_conversation_tool_and_ai_last() -> None:
    turns = to_conversation(
        [HumanMessage("weather?"), ToolMessage("sunny", tool_call_id="c1", name="weather")]
    )
    assert turns == [{"role": "user", "content": "weather?\n\nResult of tool weather:\nsunny"}]
    assert to_conversation([HumanMessage("a"), AIMessage("b")])[-1] == {
        "role": "assistant",
        "content": "b",
    }


def test_to_conversation_rejects_images_and_missing_user() -> None:
    image = HumanMessage(
        content=[
            {"type": "text", "text": "what is this"},
            {"type": "image", "url": "https://example.com/x.png"},
        ]
    )
    with pytest.raises(InvalidPromptError, match="text only"):
        to_conversation([image])
    with pytest.raises(InvalidPromptError, match="no human"):
        to_conversation([SystemMessage("only system")])


# ----------------------------------------------------------------------------- construction


def test_construction_is_lazy_and_cheap(tmp_path: Path) -> None:
    spec = str(tmp_path / "never_loaded")  # not even a model: nothing may touch it
    models = [ChatPersonaJudge(model=spec, preferences="humor") for _ in range(10)]
    assert len(models) == 10
    assert not is_loaded(spec)
    assert "max_input_tokens" not in (models[0].profile or {})
    assert models[0].profile is not None and models[0].profile["tool_calling"] is True


def test_bad_settings_raise_typed_errors() -> None:
    with pytest.raises(InvalidGenerationConfigError, match="temperature"):
        ChatPersonaJudge(preferences="humor", temperature=-1)
    with pytest.raises(InvalidGenerationConfigError, match="top_p"):
        ChatPersonaJudge(preferences="humor", top_p=0.0)
    with pytest.raises(UnknownPreferenceError, match="concise"):
        ChatPersonaJudge(preferences=["consise", "humor"])
    with pytest.raises(InvalidPersonaError, match="only one"):
        ChatPersonaJudge(preferences="humor", profile_id="alice")
    with pytest.raises(InvalidGenerationConfigError, match="lookahead"):
        ChatPersonaJudge(preferences="humor", lookahead="four")


def test_no_personas_anywhere_is_a_clear_error(tiny_dir: str) -> None:
    with pytest.raises(InvalidPersonaError, match="no personas"):
        ChatPersonaJudge(model=tiny_dir).invoke(QUESTION)


def test_unknown_call_option_is_rejected(llm: ChatPersonaJudge) -> None:
    with pytest.raises(InvalidGenerationConfigError, match="temprature"):
        llm.invoke(QUESTION, temprature=0.1)


# ----------------------------------------------------------------------------- invoke / stream


def test_invoke_metadata_and_usage(llm: ChatPersonaJudge, tiny_dir: str) -> None:
    message = llm.invoke(QUESTION)
    assert isinstance(message, AIMessage)
    meta = message.response_metadata
    assert meta["model_name"] == tiny_dir
    assert meta["finish_reason"] in ("eos", "stop", "length")
    assert meta["personas"] == ["Be funny.", "Be brief."]
    assert meta["persona_source"] == "preferences"
    usage = message.usage_metadata
    assert usage is not None
    assert usage["output_tokens"] == meta["stats"]["tokens"] <= 12
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    # input tokens: the longest persona prompt, counted with the model's tokenizer
    assert usage["input_tokens"] > len(llm.get_token_ids(QUESTION))
    assert 0.0 <= meta["stats"]["acceptance_rate"] <= 1.0
    # the model is now loaded: the profile knows the context window
    assert llm.profile is not None and llm.profile["max_input_tokens"] == 256


def test_stream_matches_invoke_and_last_chunk_carries_stats(llm: ChatPersonaJudge) -> None:
    whole = llm.invoke(QUESTION, max_tokens=20)
    chunks = list(llm.stream(QUESTION, max_tokens=20))
    assert all(isinstance(c, AIMessageChunk) for c in chunks)
    assert "".join(str(c.content) for c in chunks) == whole.content
    last = chunks[-1]
    assert last.chunk_position == "last"
    assert last.usage_metadata == whole.usage_metadata
    assert last.response_metadata["stats"]["tokens"] == whole.response_metadata["stats"]["tokens"]
    assert all(c.usage_metadata is None for c in chunks[:-1])
    assert all(c.content for c in chunks[:-1])  # one chunk per emitted piece, no empty ones


def test_max_tokens_and_stop_are_honoured(llm: ChatPersonaJudge) -> None:
    short = llm.invoke(QUESTION, max_tokens=2, seed=3)
    assert short.usage_metadata is not None and short.usage_metadata["output_tokens"] <= 2
    text = llm.invoke(QUESTION, max_tokens=30, seed=5).content
    assert isinstance(text, str)
    words = text.split()
    if len(words) >= 2:  # stop at the second word: the answer keeps only what precedes it
        stopped = llm.invoke(QUESTION, max_tokens=30, seed=5, stop=[words[1]])
        assert words[1] not in str(stopped.content)
        assert stopped.response_metadata["finish_reason"] == "stop"


def test_same_seed_same_answer_and_ls_params(llm: ChatPersonaJudge, tiny_dir: str) -> None:
    assert llm.invoke(QUESTION).content == llm.invoke(QUESTION).content
    # temperature 0 is greedy: the seed no longer matters
    greedy = {llm.invoke(QUESTION, temperature=0, seed=s).content for s in (1, 2)}
    assert len(greedy) == 1
    params = llm._get_ls_params(stop=["x"])
    assert params["ls_model_name"] == tiny_dir and params["ls_max_tokens"] == 12
    assert params["ls_stop"] == ["x"] and params["ls_provider"] == "persona_judge"
    assert llm._get_ls_params(model="other")["ls_model_name"] == "other"


def test_model_override_per_call(tiny_dir: str, other_tiny_dir: str) -> None:
    llm = ChatPersonaJudge(
        model=tiny_dir, preferences="humor", max_tokens=12, allowed_models=[other_tiny_dir]
    )
    message = llm.invoke(QUESTION, model=other_tiny_dir)
    assert message.response_metadata["model_name"] == other_tiny_dir


# ----------------------------------------------------------------------------- personas per call


def test_per_call_preferences_bind_and_configurable_fields(llm: ChatPersonaJudge) -> None:
    direct = llm.invoke(QUESTION, preferences=["Be sad.", "Be loud."])
    assert direct.response_metadata["personas"] == ["Be sad.", "Be loud."]

    bound = llm.bind(preferences="humor")
    assert bound.invoke(QUESTION).response_metadata["personas"] == _personas_of("humor")

    configurable = llm.configurable_fields(
        preferences=ConfigurableField(id="preferences", name="Preferences")
    )
    out = configurable.invoke(QUESTION, config={"configurable": {"preferences": ["expert"]}})
    assert out.response_metadata["personas"] == _personas_of(["expert"])
    assert configurable.invoke(QUESTION).response_metadata["personas"] == [
        "Be funny.",
        "Be brief.",
    ]


def test_user_id_from_config_serves_two_users_concurrently(tiny_dir: str, store: Any) -> None:
    llm = ChatPersonaJudge(model=tiny_dir, profile_store=store, seed=0)
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | llm
    users: list[RunnableConfig] = [{"configurable": {"user_id": u}} for u in ("alice", "bob")]
    results = chain.batch([{"question": QUESTION}] * 2, config=users)
    alice, bob = results
    assert alice.response_metadata["persona_source"] == "profile:alice"
    assert alice.response_metadata["personas"] == _personas_of(store.get("alice"))
    assert bob.response_metadata["persona_source"] == "profile:bob"
    assert bob.response_metadata["personas"] == _personas_of(store.get("bob"))
    # bob's saved default (max_new_tokens=3) applies where the developer set nothing
    assert bob.usage_metadata is not None and bob.usage_metadata["output_tokens"] <= 3


async def test_user_id_reaches_async_and_v3_paths(tiny_dir: str, store: Any) -> None:
    llm = ChatPersonaJudge(model=tiny_dir, profile_store=store, seed=0, max_tokens=4)
    config: Any = {"configurable": {"user_id": "alice"}}
    expected = _personas_of(store.get("alice"))
    bob: Any = {"configurable": {"user_id": "bob"}}
    results = await llm.abatch([QUESTION, QUESTION], config=[config, bob])
    assert results[0].response_metadata["personas"] == expected
    assert results[1].response_metadata["personas"] == _personas_of(store.get("bob"))
    # no user id and no instance personas: the second call must fail loudly, not guess
    with pytest.raises(InvalidPersonaError):
        await llm.ainvoke(QUESTION)
    chunks = [c async for c in llm.astream(QUESTION, config=config)]
    assert chunks[-1].response_metadata["personas"] == expected
    stream = llm.stream_events(QUESTION, config=config, version="v3")
    list(stream)
    assert stream.output.response_metadata["personas"] == expected


def test_explicit_arguments_beat_config_and_instance_profile_defaults(
    tiny_dir: str, store: Any
) -> None:
    llm = ChatPersonaJudge(model=tiny_dir, profile_store=store, max_tokens=6, seed=0)
    config: Any = {"configurable": {"user_id": "bob"}}
    out = llm.invoke(QUESTION, config=config, preferences="humor")
    assert out.response_metadata["persona_source"] == "preferences"
    # the developer's explicit max_tokens=6 wins over bob's saved 3
    fixed = ChatPersonaJudge(
        model=tiny_dir, profile_id="bob", profile_store=store, seed=0, max_tokens=6, temperature=0
    )
    assert fixed.invoke(QUESTION).response_metadata["persona_source"] == "profile:bob"
    assert fixed._request([HumanMessage(QUESTION)], None, {}).generate_kwargs["max_new_tokens"] == 6
    with pytest.raises(ProfileNotFoundError):
        llm.invoke(QUESTION, config={"configurable": {"user_id": "carol"}})


# ----------------------------------------------------------------------------- async


async def test_ainvoke_leaves_the_event_loop_free(
    llm: ChatPersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The generation cannot finish until a coroutine has ticked: if ainvoke ran on the
    # event loop, the ticker could never run and the wait would time out.
    release = threading.Event()
    original = ChatPersonaJudge._generate_now

    def gated(self: ChatPersonaJudge, *args: Any) -> Any:
        assert release.wait(10), "the event loop was blocked during generation"
        return original(self, *args)

    monkeypatch.setattr(ChatPersonaJudge, "_generate_now", gated)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        for _ in range(3):
            await asyncio.sleep(0.005)
            ticks += 1
        release.set()

    message, _ = await asyncio.gather(llm.ainvoke(QUESTION), ticker())
    assert ticks == 3 and isinstance(message, AIMessage)


async def test_astream_leaves_the_event_loop_free_and_stops_early(
    llm: ChatPersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    original = ChatPersonaJudge._chunks

    def gated(self: ChatPersonaJudge, *args: Any) -> Any:
        assert release.wait(10), "the event loop was blocked during streaming"
        yield from original(self, *args)

    monkeypatch.setattr(ChatPersonaJudge, "_chunks", gated)

    async def ticker() -> None:
        await asyncio.sleep(0.01)
        release.set()

    async def consume() -> list[AIMessageChunk]:
        return [c async for c in llm.astream(QUESTION, max_tokens=20)]

    chunks, _ = await asyncio.gather(consume(), ticker())
    assert chunks[-1].chunk_position == "last"
    sync_text = "".join(str(c.content) for c in llm.stream(QUESTION, max_tokens=20))
    assert "".join(str(c.content) for c in chunks) == sync_text


async def test_leaving_astream_early_stops_the_worker(
    llm: ChatPersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A producer that never ends by itself: only the consumer leaving can stop it.
    closed = threading.Event()

    def endless(self: ChatPersonaJudge, *args: Any) -> Any:
        try:
            while True:
                yield ChatGenerationChunk(message=AIMessageChunk(content="tick "))
                time.sleep(0.005)
        finally:
            closed.set()

    monkeypatch.setattr(ChatPersonaJudge, "_chunks", endless)
    stream = llm.astream(QUESTION)
    received = 0
    async for _ in stream:
        received += 1
        if received == 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]  # what `async with aclosing(...)` does
    assert await asyncio.to_thread(closed.wait, 10), "the worker kept generating"
    for _ in range(100):
        if not any(t.name == "pj-astream" for t in threading.enumerate()):
            break
        await asyncio.sleep(0.01)
    assert not any(t.name == "pj-astream" for t in threading.enumerate())


async def test_async_errors_surface_as_typed_errors(llm: ChatPersonaJudge) -> None:
    with pytest.raises(InvalidGenerationConfigError, match="top_k"):
        await llm.ainvoke(QUESTION, top_k=-1)
    with pytest.raises(InvalidGenerationConfigError, match="top_k"):
        async for _ in llm.astream(QUESTION, top_k=-1):
            pass


def test_system_ai_and_tool_messages_reach_the_engine(llm: ChatPersonaJudge) -> None:
    ai_last = llm.invoke([SystemMessage("be brief"), HumanMessage("hello"), AIMessage("the cat")])
    tool_last = llm.invoke([HumanMessage("why"), ToolMessage("yes", tool_call_id="1", name="dog")])
    # a user system message is combined with the persona text, so the prompt grows
    plain = llm.invoke([HumanMessage("hello")]).usage_metadata
    with_system = llm.invoke([SystemMessage("be brief"), HumanMessage("hello")]).usage_metadata
    assert plain is not None and with_system is not None
    assert with_system["input_tokens"] > plain["input_tokens"]
    assert isinstance(ai_last.content, str) and isinstance(tool_last.content, str)


def test_instances_share_one_engine(tiny_dir: str) -> None:
    first = ChatPersonaJudge(model=tiny_dir, preferences="humor")
    second = ChatPersonaJudge(model=tiny_dir, preferences=["Be brief.", "Be kind."])
    question: list[BaseMessage] = [HumanMessage(QUESTION)]
    engine = first._request(question, None, {}).engine
    assert engine is second._request(question, None, {}).engine
    assert engine is shared_engine(tiny_dir).engine


def test_engine_options_and_tokenizer_pass_through(llm: ChatPersonaJudge, tiny_dir: str) -> None:
    lockstep = llm.invoke(QUESTION, strategy="lockstep", alternate=False, lookahead=2)
    assert lockstep.response_metadata["stats"]["strategy"] == "lockstep"
    # lockstep gives the same answer as speculative decoding for the same seed
    assert lockstep.content == llm.invoke(QUESTION, alternate=False, lookahead=2).content
    tokenizer = shared_engine(tiny_dir).loaded.tokenizer
    assert llm.get_token_ids("hello the cat") == tokenizer.encode(
        "hello the cat", add_special_tokens=False
    )
