"""The generation defaults live in one place (pj_core.settings): every entry point that is
given no setting decodes with exactly those values, and every entry point accepts and rejects
the same values.

Each entry point runs for real on a tiny random model saved to disk; a spy on the engine's
event stream records the :class:`GenerationConfig` each call decodes with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pj_core import cli
from pj_core.decoding.generation_config import GenerationConfig
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError, PersonaJudgeError
from pj_core.eval.config import EvalConfig
from pj_core.personas import GenerationDefaults, PersonaProfile
from pj_core.results import StreamEvent
from pj_core.settings import DEFAULTS, EVAL_MAX_NEW_TOKENS, SETTING_NAMES, check_settings
from pj_integrations.langchain import ChatPersonaJudge
from pj_integrations.llama_index import PersonaJudgeLLM
from tests._tiny import make_tiny_model, make_tiny_tokenizer

PERSONAS = ["be funny", "be brief"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    folder: Path = tmp_path_factory.mktemp("tiny_settings")
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=0)
    model.config.max_position_embeddings = 512
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture()
def seen(monkeypatch: pytest.MonkeyPatch) -> list[GenerationConfig]:
    """Every GenerationConfig an engine decodes with during the test, in call order."""
    configs: list[GenerationConfig] = []
    original = PersonaJudge._events

    def spy(
        self: PersonaJudge, prompts: Any, names: Any, config: GenerationConfig, *rest: Any
    ) -> Iterator[StreamEvent]:
        configs.append(config)
        return original(self, prompts, names, config, *rest)

    monkeypatch.setattr(PersonaJudge, "_events", spy)
    return configs


def _settings_of(config: GenerationConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in SETTING_NAMES}


EXPECTED = dataclasses.asdict(DEFAULTS)


def test_generation_config_defaults_are_the_settings_defaults() -> None:
    assert _settings_of(GenerationConfig.create()) == EXPECTED
    # None means "the default" everywhere, never "off".
    nones: dict[str, Any] = {name: None for name in SETTING_NAMES}
    none_given = GenerationConfig.create(**nones)
    assert _settings_of(none_given) == EXPECTED


def test_engine_generate_stream_and_batch_resolve_the_same_defaults(
    tiny_dir: str, seen: list[GenerationConfig]
) -> None:
    engine = PersonaJudge.from_pretrained(tiny_dir)
    engine.generate("hello", PERSONAS, seed=0)
    list(engine.stream("hello", PERSONAS, seed=0))
    engine.generate_batch([{"conversation": "hello", "personas": PERSONAS, "seed": 0}])
    assert len(seen) == 3
    assert _settings_of(seen[0]) == EXPECTED
    assert _settings_of(seen[1]) == EXPECTED
    # A batch always decodes in lockstep (same tokens); every other setting is the default.
    assert _settings_of(seen[2]) == {**EXPECTED, "strategy": "lockstep"}


def test_cli_generate_resolves_the_same_defaults(
    tiny_dir: str, seen: list[GenerationConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "hello", "--model", tiny_dir, "--seed", "0"]
    assert cli.main([*argv, "--persona", PERSONAS[0], "--persona", PERSONAS[1]]) == 0
    assert [_settings_of(c) for c in seen] == [EXPECTED]


def test_cli_help_shows_the_settings_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for value in (
        DEFAULTS.lookahead,
        DEFAULTS.strategy,
        DEFAULTS.max_new_tokens,
        DEFAULTS.temperature,
        DEFAULTS.top_k,
        DEFAULTS.top_p,
        DEFAULTS.strength,
    ):
        assert f"({value})" in text, value


def test_adapters_resolve_the_same_defaults(tiny_dir: str, seen: list[GenerationConfig]) -> None:
    ChatPersonaJudge(model=tiny_dir, preferences=PERSONAS, seed=0).invoke("hello")
    PersonaJudgeLLM(model=tiny_dir, preferences=PERSONAS, seed=0).complete("hello")
    assert [_settings_of(c) for c in seen] == [EXPECTED, EXPECTED]


def test_adapters_leave_generation_fields_unset() -> None:
    """Adapter fields default to None and defer to pj_core.settings (as ChatOllama's do)."""
    lc = ChatPersonaJudge(preferences=PERSONAS)
    li = PersonaJudgeLLM(preferences=PERSONAS)
    for name in (
        "lookahead",
        "alternate",
        "strategy",
        "temperature",
        "top_k",
        "top_p",
        "strength",
        "neutral_system",
    ):
        assert getattr(lc, name) is None, name
        assert getattr(li, name) is None, name
    assert lc.max_tokens is None and li.max_tokens is None


def test_saved_profile_defaults_apply_where_the_caller_set_nothing(
    tiny_dir: str, seen: list[GenerationConfig]
) -> None:
    profile = PersonaProfile(
        user_id="u1",
        preferences=PERSONAS,
        defaults=GenerationDefaults(temperature=0.3, lookahead=2),
    )
    ChatPersonaJudge(model=tiny_dir, persona=profile, seed=0).invoke("hello")
    PersonaJudgeLLM(model=tiny_dir, persona=profile, seed=0).complete("hello")
    expected = {**EXPECTED, "temperature": 0.3, "lookahead": 2}
    assert [_settings_of(c) for c in seen] == [expected, expected]


def test_eval_defaults_are_the_settings_defaults_but_a_shorter_budget() -> None:
    config = EvalConfig()
    for name in ("lookahead", "strategy", "temperature", "top_k", "top_p"):
        assert getattr(config, name) == getattr(DEFAULTS, name), name
    assert config.max_new_tokens == EVAL_MAX_NEW_TOKENS < DEFAULTS.max_new_tokens


# Values at and around each range's edges: every entry point must agree on each of them.
CANDIDATES: list[tuple[str, Any]] = [
    ("lookahead", 0),
    ("lookahead", 1),
    ("lookahead", 64),
    ("lookahead", 65),
    ("max_new_tokens", 0),
    ("max_new_tokens", 1),
    ("temperature", -0.1),
    ("temperature", 0.0),
    ("temperature", 10.0),
    ("temperature", 25.0),
    ("temperature", float("inf")),
    ("temperature", float("nan")),
    ("top_k", -1),
    ("top_k", 0),
    ("top_p", 0.0),
    ("top_p", 0.5),
    ("top_p", 1.0),
    ("top_p", 1.01),
    ("strength", -0.5),
    ("strength", 0.0),
    ("strength", 3.0),
    ("strength", float("inf")),
    ("strength", float("nan")),
    ("decoder", "pool"),
    ("decoder", "persona-judge"),
    ("decoder", "mixture"),
]


def _accepted(build: Any) -> bool:
    try:
        build()
    except PersonaJudgeError as exc:
        assert isinstance(exc, InvalidGenerationConfigError), exc
        return False
    return True


@pytest.mark.parametrize(("name", "value"), CANDIDATES)
def test_every_entry_point_accepts_the_same_values(name: str, value: Any) -> None:
    engine_ok = _accepted(lambda: GenerationConfig.create(**{name: value}))
    assert _accepted(lambda: check_settings({name: value})) == engine_ok
    assert _accepted(lambda: GenerationDefaults(**{name: value})) == engine_ok
    profile_ok = _accepted(
        lambda: PersonaProfile(
            user_id="u",
            preferences=PERSONAS,
            defaults={name: value},  # type: ignore[arg-type]  # as loaded from JSON
        )
    )
    assert profile_ok == engine_ok


def test_strength_reaches_the_engine_from_every_entry_point(
    tiny_dir: str, seen: list[GenerationConfig], capsys: pytest.CaptureFixture[str]
) -> None:
    """The knob, set once per entry point: engine, batch, CLI, both adapters (field and per
    call, LangChain's run config too) and a saved profile default."""
    from langchain_core.runnables import ConfigurableField

    engine = PersonaJudge.from_pretrained(tiny_dir)
    engine.generate("hello", PERSONAS, seed=0, strength=1.0, max_new_tokens=3)
    engine.generate_batch([{"conversation": "hello", "personas": PERSONAS, "strength": 1.5}])
    argv = ["generate", "hello", "--model", tiny_dir, "--seed", "0", "--strength", "2"]
    assert cli.main([*argv, "--persona", PERSONAS[0], "--persona", PERSONAS[1]]) == 0
    chat = ChatPersonaJudge(model=tiny_dir, preferences=PERSONAS, seed=0, max_tokens=3)
    chat.model_copy(update={"strength": 2.5}).invoke("hello")
    chat.invoke("hello", strength=3.0)
    chat.configurable_fields(strength=ConfigurableField(id="strength")).invoke(
        "hello", config={"configurable": {"strength": 3.5}}
    )
    llm = PersonaJudgeLLM(model=tiny_dir, preferences=PERSONAS, seed=0, max_tokens=3)
    llm.model_copy(update={"strength": 4.0}).complete("hello")
    llm.complete("hello", strength=4.5)
    profile = PersonaProfile(
        user_id="u1", preferences=PERSONAS, defaults=GenerationDefaults(strength=5.0)
    )
    ChatPersonaJudge(model=tiny_dir, persona=profile, seed=0, max_tokens=3).invoke("hello")
    assert [c.strength for c in seen] == [1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0]
