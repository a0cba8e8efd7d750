"""The request builder both adapters share (pj_core.calls.build_call).

The policy of a call (options, personas, settings precedence, engine, stop strings) is
decided once, in pj_core; these tests pin it directly and check that both adapters hand
the engine exactly what the builder says for the same settings and options.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import BaseMessage, HumanMessage

from pj_core.calls import (
    CALL_OPTIONS,
    AdapterSettings,
    CallRequest,
    PersonaSources,
    build_call,
    call_user_id,
)
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError, InvalidPersonaError
from pj_core.personas import GenerationDefaults, PersonaProfile, resolve_personas
from pj_core.personas.store import ProfileStore, load_profile, open_store
from pj_core.settings import PAPER
from pj_integrations.langchain import ChatPersonaJudge
from pj_integrations.llama_index import PersonaJudgeLLM
from tests._tiny import make_tiny_model, make_tiny_tokenizer

CONVERSATION = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    tokenizer = make_tiny_tokenizer()
    return PersonaJudge(make_tiny_model(len(tokenizer)), tokenizer, defaults=PAPER)


@pytest.fixture(params=["sqlite-object", "postgresql-url"])
def store(request: pytest.FixtureRequest) -> ProfileStore | str:
    """Bob's profile in a SQLite store object, or in PostgreSQL named by its URL (as a user
    writes ``profile_store="postgresql://..."``)."""
    target = ":memory:"
    if request.param == "postgresql-url":
        target = request.getfixturevalue("postgres_url")
    opened = open_store(target)
    opened.put(
        PersonaProfile(
            user_id="bob",
            preferences=["be funny", "be brief"],
            defaults=GenerationDefaults(max_new_tokens=3, temperature=0.5),
        )
    )
    if isinstance(target, str) and target != ":memory:":
        opened.close()
        return target
    assert isinstance(opened, ProfileStore)
    return opened


def _settings(
    engine: PersonaJudge, store: ProfileStore | str, **generation: Any
) -> AdapterSettings:
    return AdapterSettings(
        model="tiny",
        generation=generation,
        personas=PersonaSources(preferences=["the cat", "the dog"]),
        profile_store=store,
        engine=engine,
    )


def test_precedence_fields_profile_explicit_call(
    engine: PersonaJudge, store: ProfileStore | str
) -> None:
    settings = _settings(engine, store, temperature=0.9, seed=4)
    # the instance's preferences, its explicit settings
    plain = build_call(settings, CONVERSATION, {})
    assert plain.persona_source == "preferences"
    assert plain.generate_kwargs == {"temperature": 0.9, "seed": 4}
    # a run-config user: bob's profile fills what the instance left unset (max_new_tokens),
    # never what it set deliberately (temperature)
    bob = build_call(settings, CONVERSATION, {}, config_user_id="bob")
    assert bob.persona_source == "profile:bob"
    assert bob.generate_kwargs == {"temperature": 0.9, "max_new_tokens": 3, "seed": 4}
    assert [p.text for p in bob.personas] == [
        p.text for p in resolve_personas(load_profile("bob", store))
    ]
    # the call's own options win over everything, and its personas over the config's user
    call = build_call(
        settings,
        CONVERSATION,
        {"max_tokens": 5, "temperature": 0.1, "preferences": ["be brief", "be funny"]},
        config_user_id="bob",
    )
    assert call.persona_source == "preferences"
    assert call.generate_kwargs == {"temperature": 0.1, "max_new_tokens": 5, "seed": 4}


def test_bad_options_raise_typed_errors(engine: PersonaJudge, store: ProfileStore | str) -> None:
    settings = _settings(engine, store)
    with pytest.raises(InvalidGenerationConfigError, match=r"unknown option.*top_kk"):
        build_call(settings, CONVERSATION, {"top_kk": 3})
    with pytest.raises(InvalidPersonaError, match="disagree"):
        build_call(settings, CONVERSATION, {"profile_id": "bob", "user_id": "alice"})
    with pytest.raises(InvalidGenerationConfigError, match="model alias or path"):
        build_call(settings, CONVERSATION, {"model": 3})
    with pytest.raises(InvalidGenerationConfigError, match="ready engine"):
        build_call(settings, CONVERSATION, {"model": "another-model"})
    assert build_call(settings, CONVERSATION, {"model": "tiny"}).engine is engine
    assert call_user_id({"profile_id": "bob", "user_id": "bob"}) == "bob"
    assert "model" in CALL_OPTIONS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder = tmp_path_factory.mktemp("tiny_calls")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer))
    model.config.max_position_embeddings = 256
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


FIELDS: dict[str, Any] = {"temperature": 0.9, "seed": 4, "max_tokens": 6}
OPTIONS: dict[str, Any] = {"user_id": "bob", "top_k": 3, "stop": ["cat"]}


def _assert_same_request(request: CallRequest, expected: CallRequest) -> None:
    assert request.engine is expected.engine
    assert request.persona_source == expected.persona_source == "profile:bob"
    assert [p.text for p in request.personas] == [p.text for p in expected.personas]
    assert request.conversation == expected.conversation
    assert request.generate_kwargs == expected.generate_kwargs


def test_llama_index_hands_the_engine_what_the_builder_says(
    engine: PersonaJudge, store: ProfileStore | str
) -> None:
    settings = AdapterSettings(
        model="tiny",
        generation=FIELDS,
        personas=PersonaSources(preferences=["the cat", "the dog"]),
        profile_store=store,
        engine=engine,
    )
    expected = build_call(settings, CONVERSATION, OPTIONS)
    llm = PersonaJudgeLLM(
        engine=engine, preferences=["the cat", "the dog"], profile_store=store, **FIELDS
    )
    _assert_same_request(llm._plan(CONVERSATION, OPTIONS), expected)


def test_langchain_hands_the_engine_what_the_builder_says(
    tiny_dir: str, store: ProfileStore | str
) -> None:
    settings = AdapterSettings(
        model=tiny_dir,
        generation=FIELDS,
        personas=PersonaSources(preferences=["the cat", "the dog"]),
        profile_store=store,
    )
    expected = build_call(settings, CONVERSATION, OPTIONS)
    chat = ChatPersonaJudge(
        model=tiny_dir, preferences=["the cat", "the dog"], profile_store=store, **FIELDS
    )
    messages: list[BaseMessage] = [HumanMessage("hello")]
    options = {k: v for k, v in OPTIONS.items() if k != "stop"}
    _assert_same_request(chat._request(messages, OPTIONS["stop"], options), expected)
