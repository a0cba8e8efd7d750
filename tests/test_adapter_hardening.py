"""Issue 34, hardening the adapters: each test here failed before its fix (the finding's number
is in the test's name), on the tiny model through both adapters."""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import os
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages
from llama_index.core.base.llms.types import ChatMessage

from pj_core import calls
from pj_core.backends.hf import models
from pj_core.backends.hf.models import (
    MAX_LOADED_MODELS_ENV_VAR,
    load_model,
    max_loaded_models,
)
from pj_core.calls import is_loaded, shared_engine
from pj_core.engine import PersonaJudge
from pj_core.errors import (
    ContextOverflowError,
    InvalidGenerationConfigError,
    InvalidModelOptionError,
    InvalidPromptError,
    UnknownPreferenceError,
)
from pj_core.personas import PersonaProfile
from pj_core.personas.store import open_store
from pj_integrations.langchain import ChatPersonaJudge
from pj_integrations.llama_index import PersonaJudgeLLM
from tests._tiny import long_seed, make_tiny_model, make_tiny_tokenizer

REPO = Path(__file__).resolve().parent.parent

WINDOW = 256  # the tiny model's context window (max_position_embeddings)
PREFERENCES = ["be funny", "be brief"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tiny_hardening")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=0)
    model.config.max_position_embeddings = WINDOW
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    tokenizer = make_tiny_tokenizer()
    return PersonaJudge(
        make_tiny_model(len(tokenizer), seed=0), tokenizer, name="tiny", context_window=WINDOW
    )


def _lc(tiny_dir: str, **fields: Any) -> ChatPersonaJudge:
    return ChatPersonaJudge(**{"model": tiny_dir, "preferences": PREFERENCES, "seed": 0, **fields})


def _li(engine: PersonaJudge, **fields: Any) -> PersonaJudgeLLM:
    return PersonaJudgeLLM(**{"engine": engine, "preferences": PREFERENCES, "seed": 0, **fields})


# ----------------------------------------------------------------------------- 3: overflow hints


def test_3_an_overflow_hint_names_the_adapters_max_tokens(
    tiny_dir: str, engine: PersonaJudge
) -> None:
    lc, li = _lc(tiny_dir, max_tokens=WINDOW), _li(engine, max_tokens=WINDOW)
    attempts = {
        "langchain invoke": lambda: lc.invoke("hello"),
        "langchain stream": lambda: list(lc.stream("hello")),
        "langchain batch": lambda: lc.batch(["hello", "why the cat"]),
        "llama_index complete": lambda: li.complete("hello"),
        "llama_index stream_chat": lambda: list(li.stream_chat([ChatMessage(content="hello")])),
        "llama_index complete_batch": lambda: li.complete_batch(["hello", "why"]),
    }
    for where, attempt in attempts.items():
        with pytest.raises(ContextOverflowError) as info:
            attempt()
        message = str(info.value)
        room = WINDOW - info.value.prompt_tokens
        assert f"lower max_tokens to at most {room}" in message, (where, message)
        assert "max_new_tokens" not in message, where


@pytest.mark.parametrize("words", [WINDOW - 4, 2 * WINDOW])
def test_3_a_prompt_that_alone_fills_the_window_asks_for_a_shorter_prompt(
    tiny_dir: str, engine: PersonaJudge, words: int
) -> None:
    # WINDOW - 4 words fit alone but not with the chat template and a persona (the hint used
    # to say "lower max_new_tokens to at most 0"); 2 * WINDOW do not fit at all.
    long_text = " ".join(["cat"] * words)
    for attempt in (
        lambda: engine.generate(long_text, PREFERENCES, max_new_tokens=1),
        lambda: _lc(tiny_dir, max_tokens=1).invoke([HumanMessage(long_text)]),
        lambda: _li(engine, max_tokens=1).complete(long_text),
    ):
        with pytest.raises(ContextOverflowError) as info:
            attempt()
        message = str(info.value)
        assert "shorten" in message and "max_tokens" not in message, message
        assert "at most 0" not in message and "at most -" not in message, message
        assert info.value.prompt_tokens >= WINDOW - 4


def test_3_the_engine_keeps_its_own_parameter_name(engine: PersonaJudge) -> None:
    with pytest.raises(ContextOverflowError, match=r"lower max_new_tokens to at most \d+$"):
        engine.generate("hello", PREFERENCES, max_new_tokens=WINDOW)


def test_3_the_errors_keep_their_numbers(tmp_path: Path, engine: PersonaJudge) -> None:
    error = ContextOverflowError.over_budget(200, 100, WINDOW).naming_budget("max_tokens")
    assert (error.prompt_tokens, error.max_new_tokens, error.context_window) == (200, 100, 256)
    assert str(error).endswith("lower max_tokens to at most 56")


# ----------------------------------------------------------------------------- 2: LlamaIndex window


def test_2_tree_summarize_over_many_nodes_fits_the_window(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    # LlamaIndex packs retrieved text up to metadata.context_window; the engine then adds the
    # chat template and the persona texts, which used to overflow mid-query.
    from llama_index.core import Document, Settings, VectorStoreIndex
    from llama_index.core.embeddings import MockEmbedding

    monkeypatch.setattr(Settings, "tokenizer", engine.tokenizer.encode)  # as the docs say
    long_personas = [" ".join(["be funny"] * 12), " ".join(["be brief"] * 12)]
    llm = _li(engine, max_tokens=16, preferences=long_personas)
    window = llm.metadata.context_window
    overhead = WINDOW - window
    assert overhead >= 24  # the template's markers and the longest persona text
    words = ["the", "cat", "dog", "why", "hello", "world", "yes", "no"]
    documents = [
        Document(text=" ".join(words[(i + j) % len(words)] for j in range(60))) for i in range(24)
    ]
    index = VectorStoreIndex.from_documents(documents, embed_model=MockEmbedding(embed_dim=8))
    seen: list[int] = []  # the prompt tokens of each call the query engine makes
    generate = engine.generate

    def checked_generate(conversation: Any, personas: Any, **kwargs: Any) -> Any:
        seen.append(engine.count_prompt_tokens(conversation, personas, strength=0))
        return generate(conversation, personas, **kwargs)

    monkeypatch.setattr(engine, "generate", checked_generate)
    query = index.as_query_engine(llm=llm, response_mode="tree_summarize", similarity_top_k=24)
    response = query.query("why the cat")
    assert str(response).strip()
    assert len(seen) > 2  # several summaries, then the summary of the summaries
    assert max(seen) + 16 <= WINDOW
    # Packed close to the room left (LlamaIndex keeps a few tokens spare): a real test.
    assert max(seen) >= WINDOW - 16 - 20


# ----------------------------------------------------------------------------- 4, 5: cancellation


def _counted_slow_forwards(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch, seconds: float
) -> list[float]:
    """Make each forward of ``engine``'s model take ``seconds`` longer; returns the list of
    their start times (one per forward), to see when decoding stopped."""
    started: list[float] = []
    forward = engine.model.forward

    @functools.wraps(forward)  # the engine reads the forward's signature
    def slow_forward(*args: Any, **kwargs: Any) -> Any:
        started.append(time.monotonic())
        time.sleep(seconds)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", slow_forward)
    return started


@pytest.mark.parametrize("adapter", ["langchain", "llama_index"])
async def test_4_a_cancelled_async_call_stops_decoding_within_one_round(
    adapter: str, tiny_dir: str, engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    # asyncio.wait_for(llm.ainvoke(...), timeout) timed out, but the worker thread decoded
    # to the end of the budget.
    target = shared_engine(tiny_dir).engine if adapter == "langchain" else engine
    seed = long_seed(target, 40)  # an answer that runs its whole budget of 40 tokens
    settings = {"seed": seed, "max_tokens": 40, "temperature": 1.0}
    forwards = _counted_slow_forwards(target, monkeypatch, 0.05)  # 40 tokens: over 2 s
    if adapter == "langchain":
        call: Any = _lc(tiny_dir, **settings).ainvoke("hello world")
    else:
        call = _li(engine, **settings).achat([ChatMessage(role="user", content="hello world")])
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(call, 0.5)
    cancelled = time.monotonic()
    assert len(forwards) >= 3  # it was decoding
    await asyncio.sleep(1.0)  # 20 more forwards, had it gone on
    # The pool decoder runs one forward per token (a round): the forward under way when the
    # call was cancelled may finish, then the worker stops.
    assert sum(start > cancelled for start in forwards) <= 1, len(forwards)


SCRIPT = """
import asyncio
from llama_index.core.base.llms.types import ChatMessage
from pj_core.personas import PersonaProfile
from pj_core.personas.store import open_store
from pj_integrations.langchain import ChatPersonaJudge
from pj_integrations.llama_index import PersonaJudgeLLM

PROMPT = "Tell me a long story about a cat and a dog."
lc = ChatPersonaJudge(preferences=["humor", "concise"], max_tokens=200, seed=0)
li = PersonaJudgeLLM(preferences=["humor", "concise"], max_tokens=200, seed=0)

async def first_lc():
    async for chunk in lc.astream(PROMPT):
        if chunk.content:
            return

async def first_li():
    async for chunk in await li.astream_chat([ChatMessage(role="user", content=PROMPT)]):
        if chunk.delta:
            return

async def main():
    await asyncio.gather(first_lc(), first_li(), first_lc(), first_li())

asyncio.run(main())
print("left early")
"""


@pytest.mark.real_model
def test_5_leaving_streams_early_and_ending_the_script_exits_cleanly(tmp_path: Path) -> None:
    # Four streams left after their first piece, then the script ends while their workers
    # are inside a forward: the process aborted ("terminate called without an active
    # exception", exit 134) in 3 of 3 runs before the workers were stopped and joined at exit.
    script = tmp_path / "leave_early.py"
    script.write_text(SCRIPT, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "TQDM_DISABLE": "1"}
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert "left early" in done.stdout and "terminate called" not in done.stderr


# ----------------------------------------------------------------------------- 6, 10: settings


@pytest.mark.parametrize("adapter", ["langchain", "llama_index"])
def test_6_unknown_constructor_arguments_are_refused_with_the_setting_meant(
    adapter: str, tiny_dir: str, engine: PersonaJudge
) -> None:
    # They were dropped without a word: ChatPersonaJudge(max_new_tokens=5) answered with the
    # default budget, and a typo'd temperature left the default temperature.
    make = (
        (lambda **kw: _lc(tiny_dir, **kw))
        if adapter == "langchain"
        else (lambda **kw: _li(engine, **kw))
    )
    cases = {
        "max_new_tokens": "did you mean 'max_tokens'",
        "temprature": "did you mean 'temperature'",
        "user_id": "did you mean 'profile_id'",
        "zzz_nothing_like_it": "has no setting 'zzz_nothing_like_it'",
    }
    for name, hint in cases.items():
        with pytest.raises(InvalidGenerationConfigError, match=hint):
            make(**{name: 5})
    assert make(max_tokens=5, temperature=0.3).max_tokens == 5  # real settings still work


def test_10_llama_index_settings_are_checked_at_construction(engine: PersonaJudge) -> None:
    # PersonaJudgeLLM(max_tokens=-5) and preferences=["humr"] were accepted until the first
    # call; ChatPersonaJudge already refused them at construction.
    with pytest.raises(InvalidGenerationConfigError, match=r"max_tokens|max_new_tokens"):
        _li(engine, max_tokens=-5)
    with pytest.raises(UnknownPreferenceError, match="humr"):
        _li(engine, preferences=["humr", "concise"])
    with pytest.raises(InvalidGenerationConfigError, match="temperature"):
        _li(engine, temperature="hot")


def test_10_llama_index_refuses_a_messages_to_prompt_it_would_ignore(
    engine: PersonaJudge,
) -> None:
    with pytest.raises(InvalidGenerationConfigError, match="messages_to_prompt"):
        _li(engine, messages_to_prompt=lambda messages: "x")
    # completion_to_prompt is honoured by complete()
    llm = _li(engine, completion_to_prompt=lambda text: f"{text} why", max_tokens=2)
    assert llm.complete("hello").raw["result"].prompt_tokens == engine.count_prompt_tokens(
        [{"role": "user", "content": "hello why"}], PREFERENCES
    )


# ----------------------------------------------------------------------------- 7: deep copies


def test_7_deep_copies_share_the_store_and_the_engine(tiny_dir: str, engine: PersonaJudge) -> None:
    # copy.deepcopy / model_copy(deep=True) raised "cannot pickle '_thread.lock'" for an
    # instance holding a ProfileStore object (LangChain deep-copies models in some helpers).
    with open_store(":memory:") as store:
        store.put(PersonaProfile(user_id="alice", preferences=["humor", "concise"]))
        lc = ChatPersonaJudge(model=tiny_dir, profile_id="alice", profile_store=store, seed=0)
        li = PersonaJudgeLLM(engine=engine, profile_id="alice", profile_store=store, seed=0)
        for original in (lc, li):
            for copied in (copy.deepcopy(original), original.model_copy(deep=True)):
                assert copied is not original
                assert copied.profile_store is store  # a handle on shared data: shared
                assert copied.profile_id == "alice"
        assert copy.deepcopy(li).engine is engine  # the loaded model is never copied
        reply = copy.deepcopy(lc).invoke("hello", max_tokens=2)
        assert reply.response_metadata["persona_source"] == "profile:alice"


# ----------------------------------------------------------------------------- 9: token counts


def test_9_counted_tokens_are_the_tokens_a_call_uses(tiny_dir: str) -> None:
    # get_num_tokens_from_messages counted the text alone (9 where the call used 35: no chat
    # template, no persona), so trim_messages kept too much.
    llm = _lc(tiny_dir, max_tokens=2)

    def used(messages: list[Any]) -> int:
        usage = llm.invoke(messages).usage_metadata
        assert usage is not None
        return int(usage["input_tokens"])

    talk = [SystemMessage("the dog"), HumanMessage("hello why the cat")]
    assert llm.get_num_tokens_from_messages(talk) == used(talk)
    longer = [*talk, AIMessage("yes no"), HumanMessage("why the dog")]
    assert llm.get_num_tokens_from_messages(longer) == used(longer)
    # Parts of a conversation, in any order (trim_messages counts reversed lists): never
    # fewer tokens than the call uses, so what trim_messages keeps fits.
    budget = used(talk)
    history = [HumanMessage("hello"), AIMessage("yes"), HumanMessage("hello why the cat")]
    kept = trim_messages(history, max_tokens=budget, token_counter=llm, strategy="last")
    assert kept and used(kept) <= budget
    assert llm.get_num_tokens_from_messages(history[::-1]) >= used(history)


def test_10_complete_batch_takes_one_user_per_prompt(engine: PersonaJudge) -> None:
    # complete_batch took one user for all prompts; a per-user batch needed one call per user.
    with open_store(":memory:") as store:
        store.put(PersonaProfile(user_id="alice", preferences=["humor", "concise"]))
        store.put(PersonaProfile(user_id="bob", preferences=["be brief", "the cat"]))
        llm = _li(engine, profile_store=store, max_tokens=4)
        users = ["alice", None, "bob"]
        replies = llm.complete_batch(["hello", "why", "the dog"], profile_ids=users)
        sources = [r.additional_kwargs["persona_source"] for r in replies]
        assert sources == ["profile:alice", "preferences", "profile:bob"]
        for reply, prompt, user in zip(replies, ["hello", "why", "the dog"], users, strict=True):
            alone = llm.complete(prompt, **({} if user is None else {"profile_id": user}))
            assert (reply.raw or {})["result"].token_ids == (alone.raw or {})["result"].token_ids
        talks = [[ChatMessage(role="user", content="hello")]] * 2
        chats = llm.chat_batch(talks, profile_ids=["bob", "alice"])
        assert [c.additional_kwargs["persona_source"] for c in chats] == [
            "profile:bob",
            "profile:alice",
        ]
        with pytest.raises(InvalidPromptError, match="one user id"):
            llm.complete_batch(["hello", "why"], profile_ids=["alice"])


# ----------------------------------------------------------------------------- 8: LLM cache


def test_8_an_edited_profile_is_a_new_llm_cache_key(tiny_dir: str) -> None:
    # With an LLM cache, an edited profile kept returning the cached answers of its old
    # personas: the cache key had no profile revision.
    from langchain_core.caches import InMemoryCache

    with open_store(":memory:") as store:
        store.put(PersonaProfile(user_id="alice", preferences=["be funny", "be brief"]))
        cache = InMemoryCache()
        instance_user = ChatPersonaJudge(
            model=tiny_dir, profile_id="alice", profile_store=store, seed=0, cache=cache
        )
        config_user = ChatPersonaJudge(
            model=tiny_dir, preferences=PREFERENCES, profile_store=store, seed=0, cache=cache
        )
        alice: Any = {"configurable": {"user_id": "alice"}}
        calls: list[Any] = [
            lambda: instance_user.invoke("hello", max_tokens=3),
            lambda: config_user.invoke("hello", config=alice, max_tokens=3),
            lambda: config_user.invoke("hello", user_id="alice", max_tokens=3),
        ]
        for call in calls:
            first = call()
            assert call().response_metadata["personas"] == first.response_metadata["personas"]
        cached = len(cache._cache)  # the cache's entries
        store.put(PersonaProfile(user_id="alice", preferences=["the cat", "the dog"]))
        for call in calls:
            reply = call()
            assert reply.response_metadata["personas"] == ["the cat", "the dog"]
        assert len(cache._cache) == 2 * cached  # new keys; the old ones untouched


# ----------------------------------------------------------------------------- 11: per-call models


def _save_tiny(folder: Path, seed: int) -> str:
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=seed)
    model.config.max_position_embeddings = WINDOW
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_11_a_call_cannot_load_a_path_the_adapter_does_not_allow(
    tiny_dir: str, tmp_path: Path
) -> None:
    other = _save_tiny(tmp_path / "other", seed=3)
    missing = str(tmp_path / "no_such_model")
    li = PersonaJudgeLLM(model=tiny_dir, preferences=PREFERENCES, seed=0, max_tokens=4)
    attempts = {
        "langchain invoke": lambda spec: _lc(tiny_dir, max_tokens=4).invoke("hello", model=spec),
        "langchain stream": lambda spec: list(_lc(tiny_dir, max_tokens=4).stream("hi", model=spec)),
        "llama_index complete": lambda spec: li.complete("hello", model=spec),
    }
    for where, attempt in attempts.items():
        messages = []
        for spec in (other, missing):
            with pytest.raises(InvalidGenerationConfigError, match="allowed_models") as caught:
                attempt(spec)
            messages.append(str(caught.value).replace(spec, "<spec>"))
        # The same answer whether the path holds a model or nothing: a caller learns nothing.
        assert messages[0] == messages[1], where
        assert not is_loaded(other), where


def test_11_allowed_models_and_other_spellings_decode(
    tiny_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = _save_tiny(tmp_path / "other", seed=4)
    lc = _lc(tiny_dir, max_tokens=4, allowed_models=[other])
    assert lc.invoke("hello", model=other).response_metadata["model_name"] == other
    li = PersonaJudgeLLM(model=tiny_dir, preferences=PREFERENCES, allowed_models=[other])
    assert li.complete("hello", model=other, max_tokens=4).text is not None
    # Another spelling of an allowed model (relative, with a trailing separator) is that model.
    monkeypatch.chdir(tmp_path)
    relative = os.path.join(".", "other", "")
    reply = lc.invoke("hello", model=relative)
    assert reply.response_metadata["model_name"] == relative
    # The built-in aliases are always allowed, in any case; a near miss is not.
    settings = calls.AdapterSettings(model=tiny_dir, generation={})
    assert calls.call_model(settings, " Gemma3-270M") == " Gemma3-270M"
    with pytest.raises(InvalidGenerationConfigError, match="allowed_models"):
        lc.invoke("hello", model="gemma3-270m-nope")


def test_11_every_spelling_of_a_spec_shares_one_cached_engine(
    tiny_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(tiny_dir)
    monkeypatch.chdir(folder.parent)
    spellings: list[str | os.PathLike[str]] = [
        tiny_dir,
        tiny_dir + os.sep,
        os.path.join(tiny_dir, "."),
        os.path.join(".", folder.name),
        os.path.join("..", folder.parent.name, folder.name),
        folder,
    ]
    before = set(calls._SHARED)
    engines = {id(shared_engine(spec).engine) for spec in spellings}
    assert len(engines) == 1
    assert len(set(calls._SHARED) - before) <= 1
    assert all(is_loaded(spec) for spec in spellings)


def test_11_at_most_max_loaded_models_stay_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(MAX_LOADED_MODELS_ENV_VAR, "1")
    first, second = (_save_tiny(tmp_path / f"m{i}", seed=10 + i) for i in range(2))
    weights = weakref.ref(shared_engine(first).engine.model)
    assert is_loaded(first)
    shared_engine(second)
    assert is_loaded(second) and not is_loaded(first)
    assert len(calls._SHARED) == 1 and len(models._loaded) == 1
    gc.collect()
    assert weights() is None  # released: nothing held the first model any more
    # A model still in use when it leaves the cache is not loaded a second time.
    held = load_model(second)
    load_model(first)
    assert load_model(second) is held


def test_11_a_bad_max_loaded_models_is_a_typed_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for value in ("0", "-2", "three"):
        monkeypatch.setenv(MAX_LOADED_MODELS_ENV_VAR, value)
        with pytest.raises(InvalidModelOptionError, match=MAX_LOADED_MODELS_ENV_VAR):
            max_loaded_models()
