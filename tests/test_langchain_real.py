"""ChatPersonaJudge on the real embedded SmolLM2: one chain, two users, concurrently."""

from __future__ import annotations

from pathlib import Path

import pytest
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnableConfig

from pj_core.backends.hf.models import LoadedModel
from pj_core.personas import PersonaProfile, resolve_personas
from pj_core.personas.store import open_store
from pj_integrations.langchain import ChatPersonaJudge


@pytest.mark.real_model
def test_one_chain_serves_two_users_concurrently(smollm2: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "profiles.db"
    with open_store(path) as store:
        store.put(PersonaProfile(user_id="alice", preferences=["humor", "friendly"]))
        store.put(PersonaProfile(user_id="bob", preferences=["expert", "concise"]))
        profiles = {user: store.get(user) for user in ("alice", "bob")}

    # The store is given by path, as a web app would configure it.
    llm = ChatPersonaJudge(model=smollm2.name, profile_store=str(path), max_tokens=24, seed=0)
    chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | llm
    question = {"question": "What is a good name for a pet goldfish?"}
    configs: list[RunnableConfig] = [{"configurable": {"user_id": user}} for user in profiles]

    alice, bob = chain.batch([question, question], config=configs)

    for user, answer in zip(profiles, (alice, bob), strict=True):
        assert answer.response_metadata["persona_source"] == f"profile:{user}"
        expected = [p.text for p in resolve_personas(profiles[user])]
        assert answer.response_metadata["personas"] == expected
        assert answer.content
    assert alice.content != bob.content
    # Running concurrently changes nothing: alice alone, same seed, gets the same answer.
    alone = chain.invoke(question, config=configs[0])
    assert alone.content == alice.content
