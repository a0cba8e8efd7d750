"""Adapter batch paths on tiny random models: LangChain ``ChatPersonaJudge.batch`` / ``abatch``
and LlamaIndex ``PersonaJudgeLLM.complete_batch`` / ``chat_batch``.

What is checked: every input is answered as its own single call would answer it (same text,
token count, personas and metadata for the same seed; the tiny model is float32, where
batched and single forwards agree token for token, see tests/test_batch.py), all inputs go
through ONE ``PersonaJudge.generate_batch``, per-user personas stay apart, a bad input gets
its typed error without costing the others their answers, and callbacks see one run per input.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from langchain_core.caches import InMemoryCache
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import LLMResult
from langchain_core.rate_limiters import InMemoryRateLimiter
from langchain_core.runnables import RunnableConfig
from llama_index.core.base.llms.types import ChatMessage, MessageRole

from pj_core.batch import BatchRequest
from pj_core.calls import shared_engine
from pj_core.engine import PersonaJudge
from pj_core.errors import ContextOverflowError, InvalidPromptError, PersonaJudgeError
from pj_core.personas import GenerationDefaults, PersonaProfile, resolve_personas
from pj_core.personas.store import open_store
from pj_core.results import GenerationResult
from pj_integrations.langchain import ChatPersonaJudge
from pj_integrations.llama_index import PersonaJudgeLLM
from tests._tiny import make_tiny_model, make_tiny_tokenizer

# Words of the tiny vocabulary, so prompts tokenize to real ids rather than <unk>.
INPUTS: list[Any] = [
    "hello why the cat",
    "the dog be funny",
    [("system", "be brief"), ("human", "hello world"), ("ai", "yes"), ("human", "why")],
]
USERS = ("alice", "bob", "carol")
TOO_LONG = "hello " * 300  # more tokens than the tiny model's context window of 256


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tiny_lc_batch")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=0)
    model.config.max_position_embeddings = 256
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(Path(folder))


@pytest.fixture()
def store() -> Iterator[Any]:
    with open_store(":memory:") as opened:
        opened.put(
            PersonaProfile(
                user_id="alice",
                preferences=["humor"],
                defaults=GenerationDefaults(max_new_tokens=8),
            )
        )
        opened.put(
            PersonaProfile(
                user_id="bob",
                preferences=["concise", "expert"],
                defaults=GenerationDefaults(max_new_tokens=3),
            )
        )
        opened.put(
            PersonaProfile(
                user_id="carol",
                preferences=["be funny", "the cat"],
                defaults=GenerationDefaults(temperature=1.0, lookahead=2, max_new_tokens=10),
            )
        )
        yield opened


class BatchSpy:
    """Counts the engine's generate_batch calls (and their sizes); single calls fail loudly."""

    def __init__(self, engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        original = engine.generate_batch

        def spy(requests: Any, **kwargs: Any) -> list[GenerationResult]:
            self.sizes.append(len(requests))
            return original(requests, **kwargs)

        def no_single_call(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a batch must not fall back to one generate() per input")

        monkeypatch.setattr(engine, "generate_batch", spy)
        monkeypatch.setattr(engine, "generate", no_single_call)


def _configs(users: tuple[str, ...] = USERS) -> list[RunnableConfig]:
    return [{"configurable": {"user_id": user}} for user in users]


def _same_answer(batched: AIMessage, single: AIMessage) -> None:
    assert batched.content == single.content
    assert batched.usage_metadata == single.usage_metadata
    meta, expected = batched.response_metadata, single.response_metadata
    assert set(meta) == set(expected)
    for key in ("model_name", "finish_reason", "personas", "persona_source"):
        assert meta[key] == expected[key], key
    for key in ("tokens", "rounds", "drafted", "accepted", "resampled", "bonus"):
        assert meta["stats"][key] == expected["stats"][key], key
    assert meta["stats"]["strategy"] == "lockstep"


# ----------------------------------------------------------------------------- LangChain


@pytest.mark.parametrize("seed", [0, 7])
def test_batch_equals_invoke_for_each_user(tiny_dir: str, store: Any, seed: int) -> None:
    # no max_tokens on the model: each user's saved budget applies
    llm = ChatPersonaJudge(model=tiny_dir, profile_store=store, seed=seed)
    batched = llm.batch(INPUTS, config=_configs())
    assert len(batched) == len(INPUTS)
    for message, input_, config in zip(batched, INPUTS, _configs(), strict=True):
        assert isinstance(message, AIMessage)
        _same_answer(message, llm.invoke(input_, config=config))
    # each user got their own personas and saved defaults
    for message, user in zip(batched, USERS, strict=True):
        assert message.response_metadata["persona_source"] == f"profile:{user}"
        expected = [p.text for p in resolve_personas(store.get(user))]
        assert message.response_metadata["personas"] == expected
    assert len({tuple(m.response_metadata["personas"]) for m in batched}) == 3
    assert batched[1].usage_metadata is not None
    assert batched[1].usage_metadata["output_tokens"] <= 3  # bob's saved max_new_tokens
    # message ids as invoke gives them: one run each
    ids = [m.id for m in batched]
    assert all(i is not None and i.startswith("lc_run-") and i.endswith("-0") for i in ids)
    assert len(set(ids)) == 3


def test_batch_runs_one_generate_batch_for_all_inputs(
    tiny_dir: str, store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = ChatPersonaJudge(model=tiny_dir, profile_store=store, seed=1, max_tokens=6)
    llm.load()
    spy = BatchSpy(shared_engine(tiny_dir).engine, monkeypatch)
    out = llm.batch([*INPUTS, "why"], config=[*_configs(), {}], preferences=["be funny", "the cat"])
    assert spy.sizes == [4]
    assert all(m.response_metadata["personas"] == ["be funny", "the cat"] for m in out)


def test_bound_stop_and_options_behave_as_in_invoke(tiny_dir: str) -> None:
    llm = ChatPersonaJudge(model=tiny_dir, preferences=["be funny", "be brief"], seed=2)
    free = llm.invoke(INPUTS[0], max_tokens=20)
    words = str(free.content).split()
    assert len(words) >= 2, "the tiny model should say at least two words in 20 tokens"
    # The same settings as the free answer, so its second word comes again and stops it.
    bound = llm.bind(max_tokens=20, stop=[words[1]])
    batched = bound.batch(INPUTS)
    for message, input_ in zip(batched, INPUTS, strict=True):
        _same_answer(message, bound.invoke(input_))
    assert batched[0].response_metadata["finish_reason"] == "stop"
    assert words[1] not in str(batched[0].content)


def test_return_exceptions_keeps_the_other_answers(
    tiny_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = ChatPersonaJudge(
        model=tiny_dir, preferences=["be funny", "be brief"], seed=4, max_tokens=8
    )
    inputs: list[Any] = [INPUTS[0], [], INPUTS[1], TOO_LONG]
    singles = [llm.invoke(inputs[0]), llm.invoke(inputs[2])]
    with pytest.raises(ContextOverflowError) as single_error:
        llm.invoke(TOO_LONG)
    spy = BatchSpy(shared_engine(tiny_dir).engine, monkeypatch)
    out: list[Any] = llm.batch(inputs, return_exceptions=True)
    assert isinstance(out[1], InvalidPromptError)  # an empty message list: caught by the adapter
    assert isinstance(out[3], ContextOverflowError)  # caught by generate_batch's validation
    assert str(out[3]) == str(single_error.value)  # the message a single call gives
    _same_answer(out[0], singles[0])
    _same_answer(out[2], singles[1])
    # ONE generate_batch: the long prompt's error came back in its slot, nothing resubmitted
    assert spy.sizes == [3]


def test_without_return_exceptions_a_bad_input_raises_a_typed_error(
    tiny_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = ChatPersonaJudge(model=tiny_dir, preferences=["be funny", "be brief"], max_tokens=4)
    llm.load()
    spy = BatchSpy(shared_engine(tiny_dir).engine, monkeypatch)
    with pytest.raises(InvalidPromptError, match="no human"):
        llm.batch([INPUTS[0], []])
    assert spy.sizes == []  # raised before anything was decoded
    with pytest.raises(ContextOverflowError) as error:
        llm.batch([INPUTS[0], TOO_LONG])
    assert isinstance(error.value, PersonaJudgeError)
    assert not str(error.value).startswith("request")


class RunRecorder(BaseCallbackHandler):
    """Records the chat-model runs a handler sees."""

    def __init__(self) -> None:
        self.starts: dict[UUID, dict[str, Any]] = {}
        self.ends: dict[UUID, LLMResult] = {}
        self.errors: dict[UUID, BaseException] = {}

    def on_chat_model_start(
        self,
        serialized: dict[str, Any],
        messages: list[list[BaseMessage]],
        *,
        run_id: UUID,
        **kwargs: Any,
    ) -> None:
        self.starts[run_id] = {"messages": messages, **kwargs}

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self.ends[run_id] = response

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self.errors[run_id] = error


def test_callbacks_see_one_run_per_input(tiny_dir: str, store: Any) -> None:
    llm = ChatPersonaJudge(model=tiny_dir, profile_store=store, seed=0, max_tokens=5)
    handler = RunRecorder()
    configs: list[RunnableConfig] = [
        {"callbacks": [handler], "configurable": {"user_id": user}, "metadata": {"user": user}}
        for user in ("alice", "bob", "carol")
    ]
    out: list[Any] = llm.batch([INPUTS[0], [], INPUTS[2]], config=configs, return_exceptions=True)
    assert len(handler.starts) == 3
    assert set(handler.ends) | set(handler.errors) == set(handler.starts)
    assert len(handler.ends) == 2 and len(handler.errors) == 1
    assert [type(e) for e in handler.errors.values()] == [InvalidPromptError]
    assert out[1] is next(iter(handler.errors.values()))
    for message in (out[0], out[2]):
        run_id = UUID(message.id.removeprefix("lc_run-").removesuffix("-0"))
        (generation,) = handler.ends[run_id].generations[0]
        assert generation.text == message.content
        start = handler.starts[run_id]
        assert start["metadata"]["user"] == message.response_metadata["persona_source"][8:]
        assert start["invocation_params"]["user_id"] == start["metadata"]["user"]
        assert start["metadata"]["ls_provider"] == "persona_judge"
    # the same handler on invoke: exactly one run, started and ended
    single = RunRecorder()
    llm.invoke(INPUTS[0], config={"callbacks": [single], "configurable": {"user_id": "alice"}})
    assert (len(single.starts), len(single.ends), len(single.errors)) == (1, 1, 0)


async def test_abatch_equals_batch(
    tiny_dir: str, store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = ChatPersonaJudge(model=tiny_dir, profile_store=store, seed=3, max_tokens=8)
    batched = llm.batch(INPUTS, config=_configs())
    spy = BatchSpy(shared_engine(tiny_dir).engine, monkeypatch)
    async_batched = await llm.abatch(INPUTS, config=_configs())
    assert spy.sizes == [3]
    for a, b in zip(async_batched, batched, strict=True):
        _same_answer(a, b)
    out: list[Any] = await llm.abatch([INPUTS[0], []], return_exceptions=True, preferences="humor")
    assert isinstance(out[0], AIMessage) and isinstance(out[1], InvalidPromptError)


def test_streaming_models_keep_langchains_per_call_batch(
    tiny_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """streaming=True promises callbacks every token; only single calls can keep that."""
    llm = ChatPersonaJudge(
        model=tiny_dir, preferences=["be funny", "be brief"], seed=0, max_tokens=6, streaming=True
    )
    expected = [llm.invoke(x) for x in INPUTS[:2]]
    engine = shared_engine(tiny_dir).engine
    calls: list[int] = []
    original = engine.generate_batch

    def spy(requests: Sequence[BatchRequest | Mapping[str, Any]]) -> list[GenerationResult]:
        calls.append(len(requests))
        return original(requests)

    monkeypatch.setattr(engine, "generate_batch", spy)
    out = llm.batch(INPUTS[:2])
    assert calls == []
    assert [m.content for m in out] == [m.content for m in expected]


def test_max_concurrency_decodes_that_many_inputs_at_a_time(
    tiny_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = ChatPersonaJudge(
        model=tiny_dir, preferences=["be funny", "be brief"], seed=5, max_tokens=5
    )
    inputs = [*INPUTS, "why"]
    singles = [llm.invoke(x) for x in inputs]
    spy = BatchSpy(shared_engine(tiny_dir).engine, monkeypatch)
    out = llm.batch(inputs, config={"max_concurrency": 2})
    assert spy.sizes == [2, 2]
    for message, single in zip(out, singles, strict=True):
        _same_answer(message, single)


def test_cache_hits_and_rate_limits_keep_the_batch_together(
    tiny_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input answered from LangChain's cache never reaches the decode: the others must
    not wait for it. A rate limiter delays inputs: they still meet in one decode."""
    limiter = InMemoryRateLimiter(requests_per_second=100, check_every_n_seconds=0.01)
    llm = ChatPersonaJudge(
        model=tiny_dir,
        preferences=["be funny", "be brief"],
        seed=6,
        max_tokens=5,
        cache=InMemoryCache(),
        rate_limiter=limiter,
    )
    spy = BatchSpy(shared_engine(tiny_dir).engine, monkeypatch)
    first = llm.batch(INPUTS[:2])
    assert spy.sizes == [2]
    again = llm.batch([INPUTS[0], INPUTS[2], INPUTS[1]])  # two cached, one new
    assert spy.sizes == [2, 1]
    assert again[0].content == first[0].content and again[2].content == first[1].content
    llm.batch(INPUTS[:2])  # all cached: nothing decoded, nothing waits
    assert spy.sizes == [2, 1]


# ----------------------------------------------------------------------------- LlamaIndex


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    tokenizer = make_tiny_tokenizer(extra_words=8)
    model = make_tiny_model(len(tokenizer), seed=1)
    return PersonaJudge(model, tokenizer, name="tiny-llama", context_window=256, eos_token_ids=[1])


def _llama(engine: PersonaJudge, **fields: Any) -> PersonaJudgeLLM:
    settings: dict[str, Any] = {
        "preferences": ["be funny", "be brief"],
        "max_tokens": 8,
        "seed": 3,
        "temperature": 1.0,
        "top_k": 0,
    }
    return PersonaJudgeLLM(engine=engine, **{**settings, **fields})


def user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


PROMPTS = ["hello world", "why the cat", "w1 w2 be funny", "the dog"]


def _same_response(batched: Any, single: Any) -> None:
    assert batched.raw["result"].token_ids == single.raw["result"].token_ids
    assert batched.raw["result"].text == single.raw["result"].text
    info, expected = batched.additional_kwargs, single.additional_kwargs
    assert set(info) == set(expected)
    for key in ("finish_reason", "prompt_tokens", "completion_tokens", "personas"):
        assert info[key] == expected[key], key
    assert info["stats"]["strategy"] == "lockstep"


@pytest.mark.parametrize("seed", [3, 11])
def test_complete_batch_equals_complete(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    llm = _llama(engine, seed=seed, system_prompt="be brief")
    singles = [llm.complete(p, lookahead=2) for p in PROMPTS]
    spy = BatchSpy(engine, monkeypatch)
    batched = llm.complete_batch(PROMPTS, lookahead=2)
    assert spy.sizes == [len(PROMPTS)]
    for b, s in zip(batched, singles, strict=True):
        assert b.text == s.text
        _same_response(b, s)
    assert llm.complete_batch([]) == []


def test_chat_batch_equals_chat_and_keeps_each_users_personas(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = _llama(engine)
    talks = [
        [user("hello")],
        [
            ChatMessage(role=MessageRole.SYSTEM, content="be brief"),
            user("why the cat"),
            ChatMessage(role=MessageRole.ASSISTANT, content="yes"),
            user("no"),
        ],
        [user("the dog")],
    ]
    singles = [llm.chat(t, preferences=["the cat", "a dog"]) for t in talks]
    spy = BatchSpy(engine, monkeypatch)
    batched = llm.chat_batch(talks, preferences=["the cat", "a dog"])
    assert spy.sizes == [3]
    for b, s in zip(batched, singles, strict=True):
        assert b.message.content == s.message.content
        assert b.message.role == MessageRole.ASSISTANT
        _same_response(b, s)
        assert [p["text"] for p in b.additional_kwargs["personas"]] == ["the cat", "a dog"]


def test_llama_batches_reject_bad_input_with_typed_errors(
    engine: PersonaJudge, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm = _llama(engine)
    spy = BatchSpy(engine, monkeypatch)
    with pytest.raises(InvalidPromptError, match="list of prompts"):
        llm.complete_batch("hello")  # a str is a Sequence[str] to mypy: only the runtime check
    with pytest.raises(InvalidPromptError, match="list of conversations"):
        llm.chat_batch([user("hello")])  # type: ignore[list-item]
    with pytest.raises(InvalidPromptError, match=r"^request 1: .*str"):
        llm.complete_batch(["hello", 3])  # type: ignore[list-item]
    assert spy.sizes == []  # nothing decoded
    with pytest.raises(ContextOverflowError, match=r"^request 1: "):
        llm.complete_batch(["hello", TOO_LONG])
