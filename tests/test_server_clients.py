"""Real OpenAI-protocol clients against ``pj serve``: LangChain's ``ChatOpenAI`` and LlamaIndex's
``OpenAILike`` (sync, async, streaming; tools and structured output through LangChain), each
answer equal to ``PersonaJudge.generate``'s with the same prompt, personas and seed; and the
same on SmolLM2 through the ``openai`` client, profile and all."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from langchain_openai import ChatOpenAI
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike
from pydantic import BaseModel, Field, SecretStr

from pj_core.engine import PersonaJudge
from pj_core.personas import PersonaProfile, resolve_personas
from pj_core.personas.store import ProfileStore
from pj_core.server import ServerConfig, create_app
from tests._bpe import save_tiny_bpe_model
from tests._server import serving
from tests._tiny import make_tiny_engine

MODEL = "tiny-chat"
PREFERENCES = ["be funny", "be brief"]
HELLO = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    return make_tiny_engine(MODEL)


@pytest.fixture(scope="module")
def base_url(engine: PersonaJudge, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    store = tmp_path_factory.mktemp("clients") / "profiles.db"
    with ProfileStore(store) as opened:
        opened.put(PersonaProfile(user_id="alice", preferences=["the cat", "the dog"]))
    config = ServerConfig(engine=engine, profile_store=store, preferences=PREFERENCES)
    with serving(create_app(config)) as url:
        yield f"{url}/v1"


def _chat_openai(**settings: Any) -> ChatOpenAI:
    """LangChain's ChatOpenAI (its constructor's typed signature does not list every field)."""
    return ChatOpenAI(api_key=SecretStr("unused"), max_retries=0, **settings)


def _expected(
    engine: PersonaJudge,
    seed: int,
    tokens: int,
    prefs: list[str] = PREFERENCES,
    temperature: float | None = None,
) -> str:
    personas = resolve_personas(prefs)
    return engine.generate(
        HELLO, personas, seed=seed, max_new_tokens=tokens, temperature=temperature
    ).text


def test_langchain_chat_openai(base_url: str, engine: PersonaJudge) -> None:
    llm = _chat_openai(base_url=base_url, model=MODEL, seed=0, max_tokens=8)
    expected = _expected(engine, 0, 8)
    message = llm.invoke("hello world")
    assert message.content == expected
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] >= 1
    assert "".join(str(c.content) for c in llm.stream("hello world")) == expected
    assert asyncio.run(llm.ainvoke("hello world")).content == expected
    assert [m.content for m in llm.batch(["hello world", "hello world"])] == [expected] * 2
    alice = llm.bind(user="alice")
    assert alice.invoke("hello world").content == _expected(engine, 0, 8, ["the cat", "the dog"])
    steered = _chat_openai(
        base_url=base_url,
        model=MODEL,
        seed=0,
        max_tokens=8,
        extra_body={"persona_judge": {"preferences": ["the cat", "the dog"]}},
    )
    assert steered.invoke("hello world").content == _expected(engine, 0, 8, ["the cat", "the dog"])


def test_llama_index_openai_like(base_url: str, engine: PersonaJudge) -> None:
    llm = OpenAILike(
        model=MODEL,
        api_base=base_url,
        api_key="unused",
        is_chat_model=True,
        context_window=64,
        max_tokens=8,
        temperature=1.0,
        max_retries=0,
        additional_kwargs={"seed": 2},
    )
    expected = _expected(engine, 2, 8, temperature=1.0)
    assert expected
    messages = [ChatMessage(role="user", content="hello world")]
    assert llm.chat(messages).message.content == expected
    assert llm.complete("hello world").text == expected
    assert "".join(r.delta or "" for r in llm.stream_chat(messages)) == expected

    async def both() -> tuple[str | None, str]:  # one event loop: the client keeps its pool
        chat = await llm.achat(messages)
        streamed = "".join([r.delta or "" async for r in await llm.astream_chat(messages)])
        return chat.message.content, streamed

    assert asyncio.run(both()) == (expected, expected)


# ----------------------------------------------------------------------------- tools, structure


class Pet(BaseModel):
    """A pet."""

    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=20)


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@pytest.fixture(scope="module")
def bpe_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    folder = save_tiny_bpe_model(tmp_path_factory.mktemp("bpe_clients"), seed=6)
    config = ServerConfig(
        model=folder,
        served_model_name="tiny-bpe",
        preferences=PREFERENCES,
        profile_store=tmp_path_factory.mktemp("s") / "p.db",
    )
    with serving(create_app(config)) as url:
        yield f"{url}/v1"


def test_langchain_tools_and_structured_output(bpe_url: str) -> None:
    llm = _chat_openai(base_url=bpe_url, model="tiny-bpe", seed=0, max_tokens=120)
    message = llm.bind_tools([add], tool_choice="required").invoke("hello")
    assert [c["name"] for c in message.tool_calls] == ["add"]
    args = message.tool_calls[0]["args"]
    assert sorted(args) == ["a", "b"] and all(type(v) is int for v in args.values())
    pet = llm.with_structured_output(Pet, method="json_schema").invoke("hello")
    assert isinstance(pet, Pet)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.mark.real_model
@pytest.mark.timeout(600)
def test_smollm2_through_the_server_is_the_engines_answer(tmp_path: Path) -> None:
    store = tmp_path / "profiles.db"
    with ProfileStore(store) as opened:
        profile = opened.put(PersonaProfile(user_id="alice", preferences=["humor", "concise"]))
    app = create_app(ServerConfig(profile_store=store))  # the built-in SmolLM2
    engine: PersonaJudge = app.state.engine
    conversation = [{"role": "user", "content": "Any ideas for a birthday party?"}]
    expected = engine.generate(conversation, resolve_personas(profile), seed=7, max_new_tokens=24)
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(
            model="smollm2-135m-instruct",
            user="alice",
            seed=7,
            max_tokens=24,
            messages=[{"role": "user", "content": "Any ideas for a birthday party?"}],
        )
        streamed = client.chat.completions.create(
            model="smollm2-135m-instruct",
            user="alice",
            seed=7,
            max_tokens=24,
            stream=True,
            stream_options={"include_usage": True},
            messages=[{"role": "user", "content": "Any ideas for a birthday party?"}],
        )
        chunks = list(streamed)
    assert answer.choices[0].message.content == expected.text
    assert answer.usage is not None
    assert answer.usage.completion_tokens == len(expected.token_ids)
    assert answer.usage.prompt_tokens == expected.prompt_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage is not None and chunks[-1].usage == answer.usage
