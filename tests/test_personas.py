"""Personas, preferences, the catalog, profiles, composition and resolve_personas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from pj_core.errors import (
    InvalidGenerationConfigError,
    InvalidPersonaError,
    ProfileNotFoundError,
    UnknownPreferenceError,
)
from pj_core.personas import (
    CATALOG,
    MAX_DESCRIPTION_CHARS,
    MAX_PERSONA_CHARS,
    MAX_PREFERENCES,
    PROFILE_SCHEMA_VERSION,
    GenerationDefaults,
    Persona,
    PersonaProfile,
    Preference,
    check_text,
    classify,
    compose,
    get_preference,
    resolve_personas,
)
from pj_core.personas.catalog import CATALOG_ENTRIES
from pj_core.personas.store import ProfileStore

PAPER_NINE = (
    "helpful",
    "harmless",
    "humor",
    "correct",
    "informative",
    "professional",
    "creative",
    "touching",
    "vivid",
)
PSOUPS_AXES = {
    "expertise": {"elementary", "expert"},
    "length": {"concise", "informative"},
    "tone": {"friendly", "unfriendly"},
}


# ----------------------------------------------------------------------------- catalog


def test_catalog_has_the_papers_nine_and_every_psoups_pole() -> None:
    for name in PAPER_NINE:
        assert name in CATALOG
    for axis, poles in PSOUPS_AXES.items():
        members = {p.name for p in CATALOG.values() if p.axis == axis}
        assert members == poles, axis


def test_catalog_poles_point_at_each_other() -> None:
    for pref in CATALOG.values():
        if pref.opposite is None:
            assert pref.axis is None
            continue
        other = CATALOG[pref.opposite]
        assert other.opposite == pref.name and other.axis == pref.axis


def test_catalog_entries_have_two_distinct_phrasings_and_unique_names() -> None:
    seen: set[str] = set()
    for pref in CATALOG.values():
        assert pref.phrasings[0] != pref.phrasings[1]
        assert all(10 < len(text) < 200 for text in pref.phrasings)
        assert pref.description
        for alias in (pref.name, *pref.aliases):
            assert alias not in seen, f"{alias} names two entries"
            seen.add(alias)
    assert len(CATALOG) == len(CATALOG_ENTRIES) >= 14


def test_informative_serves_the_paper_and_psoups_with_alias_detailed() -> None:
    assert get_preference("detailed") is CATALOG["informative"]
    assert CATALOG["informative"].opposite == "concise"


def test_lookup_is_case_insensitive_and_knows_aliases() -> None:
    assert get_preference("  HUMOUR ").name == "humor"
    assert get_preference("funny").name == "humor"


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UnknownPreferenceError) as info:
        get_preference("humr")
    assert info.value.suggestion == "humor" and info.value.name == "humr"
    assert "did you mean 'humor'" in str(info.value)
    with pytest.raises(UnknownPreferenceError) as info:
        classify("dinosaurs")
    assert info.value.suggestion is None
    assert "write a sentence" in str(info.value)


# ----------------------------------------------------------------------------- bad text


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "empty"),
        ("  \n\t ", "empty"),
        ("x" * (MAX_PERSONA_CHARS + 1), f"limit is {MAX_PERSONA_CHARS}"),
        ("Be funny.\x07", "U+0007"),
        ("Be\x00 funny.", "U+0000"),
        ("Be\x1b[31m funny.", "U+001B"),
        ("Be funny.\x7f!", "U+007F"),
        ("Be\rfunny.", "U+000D"),
    ],
)
def test_bad_persona_text_is_a_typed_error_saying_what_to_fix(text: str, fragment: str) -> None:
    with pytest.raises(InvalidPersonaError) as info:
        Persona(text=text)
    assert fragment in str(info.value)
    assert not isinstance(info.value, ValidationError)


def test_text_limits_newline_tab_and_crlf_are_allowed() -> None:
    assert Persona(text="x" * MAX_PERSONA_CHARS).text == "x" * MAX_PERSONA_CHARS
    assert check_text("Line one.\r\n\tLine two.") == "Line one.\n\tLine two."
    assert Persona(text="  padded  ").text == "padded"


def test_wrong_types_do_not_leak_pydantic_errors() -> None:
    with pytest.raises(InvalidPersonaError) as info:
        Persona(text=5)  # type: ignore[arg-type]
    assert "text" in str(info.value)
    with pytest.raises(InvalidPersonaError):
        PersonaProfile(user_id="alice", preferences="humor", nonsense=1)  # type: ignore[call-arg]


def test_preference_needs_two_distinct_phrasings() -> None:
    with pytest.raises(InvalidPersonaError, match="two distinct phrasings"):
        Preference(name="pirate", description="Talks like a pirate.", phrasings=("Arr.", "Arr."))
    custom = Preference(
        name="pirate",
        description="Talks like a pirate.",
        phrasings=("Talk like a pirate.", "Answer as an old sea captain would."),
    )
    assert [p.text for p in compose(custom)] == list(custom.phrasings)


# ----------------------------------------------------------------------------- profiles


def test_version_1_profiles_are_upgraded_when_read() -> None:
    """Version 2 added defaults.strength: a version 1 profile (from an older store or export
    file) reads as version 2 with no strength, and keeps everything else."""
    old = {
        "schema_version": 1,
        "user_id": "carol",
        "preferences": ["concise"],
        "defaults": {"temperature": 0.3},
    }
    profile = PersonaProfile.from_data(json.dumps(old))
    assert profile.schema_version == 2 and profile.defaults.strength is None
    assert profile.preferences == ("concise",) and profile.defaults.temperature == 0.3
    stamps = {"created_at", "updated_at"}
    assert PersonaProfile.from_data(old).model_dump(exclude=stamps) == profile.model_dump(
        exclude=stamps
    )
    saved = profile.evolve(defaults={"temperature": 0.3, "strength": 1.5})
    assert PersonaProfile.from_data(saved.model_dump_json()).generation_kwargs() == {
        "temperature": 0.3,
        "strength": 1.5,
    }


def test_profile_canonicalises_names_keeps_free_text_and_dedupes() -> None:
    profile = PersonaProfile(
        user_id="alice",
        preferences=["Humour", "funny", "Explain like I'm ten.", "concise"],
        description="I love dinosaurs.",
    )
    assert profile.preferences == ("humor", "Explain like I'm ten.", "concise")
    assert profile.schema_version == PROFILE_SCHEMA_VERSION == 2 and profile.revision == 0


@pytest.mark.parametrize(
    ("fields", "error", "fragment"),
    [
        ({"user_id": ""}, InvalidPersonaError, "user id"),
        ({"user_id": "al ice"}, InvalidPersonaError, "user id"),
        ({"user_id": "../etc"}, InvalidPersonaError, "user id"),
        ({"user_id": "a" * 129}, InvalidPersonaError, "user id"),
        ({"user_id": "a", "preferences": ["humr"]}, UnknownPreferenceError, "'humor'"),
        ({"user_id": "a", "preferences": [""]}, InvalidPersonaError, "empty"),
        (
            {"user_id": "a", "preferences": [f"p {i}." for i in range(17)]},
            InvalidPersonaError,
            f"at most {MAX_PREFERENCES}",
        ),
        (
            {"user_id": "a", "description": "d" * (MAX_DESCRIPTION_CHARS + 1)},
            InvalidPersonaError,
            "limit",
        ),
        ({"user_id": "a", "schema_version": 9}, InvalidPersonaError, "schema_version 9"),
        (
            {"user_id": "a", "defaults": {"lookahead": 0}},
            InvalidGenerationConfigError,
            "lookahead must be at least 1",
        ),
        ({"user_id": "a", "defaults": {"top_p": 1.5}}, InvalidGenerationConfigError, "top_p"),
        ({"user_id": "a", "defaults": {"temperature": -1}}, InvalidGenerationConfigError, "tempe"),
        ({"user_id": "a", "defaults": {"strength": -1}}, InvalidGenerationConfigError, "strength"),
        ({"user_id": "a", "schema_version": 3}, InvalidPersonaError, "schema_version 3"),
    ],
)
def test_bad_profiles_raise_typed_errors(
    fields: dict[str, object], error: type[Exception], fragment: str
) -> None:
    with pytest.raises(error) as info:
        PersonaProfile(**fields)  # type: ignore[arg-type]
    assert fragment in str(info.value)
    with pytest.raises(error):
        PersonaProfile.from_data(fields)


def test_evolve_validates_but_model_copy_would_not() -> None:
    profile = PersonaProfile(user_id="bob")
    with pytest.raises(UnknownPreferenceError):
        profile.evolve(preferences=["humr"])


def test_generation_defaults_become_engine_kwargs() -> None:
    profile = PersonaProfile(
        user_id="bob", defaults=GenerationDefaults(lookahead=6, temperature=0.0, alternate=False)
    )
    assert profile.generation_kwargs() == {"lookahead": 6, "temperature": 0.0, "alternate": False}
    round_trip = PersonaProfile.from_data(profile.model_dump_json())
    assert round_trip == profile


# ----------------------------------------------------------------------------- compose


def test_one_preference_gives_its_two_phrasings() -> None:
    draft, judge = compose(["humor"])
    assert (draft.text, judge.text) == CATALOG["humor"].phrasings
    assert draft.name == judge.name == "humor"


def test_two_preferences_go_one_per_prefix() -> None:
    personas = compose(["humor", "concise"])
    assert [p.text for p in personas] == [
        CATALOG["humor"].phrasings[0],
        CATALOG["concise"].phrasings[0],
    ]


def test_several_preferences_are_spread_so_each_prefix_has_a_different_subset() -> None:
    names = ["humor", "concise", "helpful", "vivid", "correct"]
    personas = compose(names, k=2)
    assert [p.name for p in personas] == ["humor+helpful+correct", "concise+vivid"]
    texts = " ".join(p.text for p in personas)
    for name in names:  # every preference reaches some prefix
        assert CATALOG[name].phrasings[0] in texts
    three = compose(names, k=3)
    assert [p.name for p in three] == ["humor+vivid", "concise+correct", "helpful"]


def test_more_prefixes_than_preferences_cycle_phrasings() -> None:
    personas = compose(["humor", "concise"], k=4)
    assert [p.text for p in personas] == [
        CATALOG["humor"].phrasings[0],
        CATALOG["concise"].phrasings[0],
        CATALOG["humor"].phrasings[1],
        CATALOG["concise"].phrasings[1],
    ]


def test_one_per_preference_gives_each_its_own_prefix() -> None:
    personas = compose(["humor", "concise", "helpful"], one_per_preference=True)
    assert [p.name for p in personas] == ["humor", "concise", "helpful"]
    assert len(compose(["humor"], one_per_preference=True)) == 2


def test_full_mode_puts_every_preference_in_every_prefix() -> None:
    names = ["concise", "elementary", "friendly"]
    personas = compose(names, mode="full")
    assert len(personas) == 2
    for index, persona in enumerate(personas):
        # Prefix i: every preference, its i-th phrasing, starting from the i-th preference.
        order = names[index:] + names[:index]
        assert persona.text == " ".join(CATALOG[n].phrasings[index] for n in order)
        assert persona.name == "+".join(order)
    assert personas[0].text != personas[1].text
    three = compose(names, k=3, mode="full")
    assert three[2].text.startswith(CATALOG["friendly"].phrasings[0])  # phrasings cycle
    # One preference: its two phrasings, as in the other modes.
    assert [p.text for p in compose("humor", mode="full")] == list(CATALOG["humor"].phrasings)
    # Selectable by name through resolve_personas.
    assert resolve_personas(names, mode="full") == personas
    assert resolve_personas(names, mode="round-robin") == compose(names)
    assert resolve_personas(names, mode="one-per-preference") == resolve_personas(names)


def test_composition_mode_errors() -> None:
    with pytest.raises(InvalidPersonaError, match="unknown composition mode 'mixed'"):
        compose(["humor", "concise"], mode="mixed")
    with pytest.raises(InvalidPersonaError, match="contradicts"):
        compose(["humor", "concise"], mode="full", one_per_preference=True)
    with pytest.raises(InvalidPersonaError, match="opposite poles"):
        compose(["concise", "informative"], mode="full")


def test_profile_description_goes_first_in_every_prefix() -> None:
    profile = PersonaProfile(
        user_id="kid", preferences=["elementary", "humor"], description="I love dinosaurs."
    )
    personas = compose(profile)
    assert all(p.text.startswith("I love dinosaurs.\n") for p in personas)
    assert CATALOG["elementary"].phrasings[0] in personas[0].text
    only_description = compose(PersonaProfile(user_id="kid", description="I love dinosaurs."))
    assert [p.text for p in only_description] == ["I love dinosaurs."] * 2


def test_free_text_alone_gives_identical_prefixes() -> None:
    personas = compose("Explain like I'm ten, I love dinosaurs.")
    assert personas[0] == personas[1]
    assert personas[0].name is None


def test_opposite_poles_are_rejected_unless_allowed() -> None:
    with pytest.raises(InvalidPersonaError, match="opposite poles of the 'length' axis"):
        compose(["concise", "detailed"])
    with pytest.raises(InvalidPersonaError, match="'tone'"):
        resolve_personas(["friendly", "unfriendly"])
    contrasted = compose(["concise", "informative"], allow_opposites=True)
    assert [p.name for p in contrasted] == ["concise", "informative"]


@pytest.mark.parametrize("k", [1, 0, 9, 2.0, True])
def test_bad_k_is_rejected(k: object) -> None:
    with pytest.raises(InvalidPersonaError, match="k "):
        compose(["humor"], k=k)  # type: ignore[arg-type]


def test_compose_rejects_empty_and_wrong_types_and_overlong_prefixes() -> None:
    with pytest.raises(InvalidPersonaError, match="no preferences"):
        compose([])
    with pytest.raises(InvalidPersonaError, match="got int"):
        compose([3])  # type: ignore[list-item]
    long_text = "Be kind. " + "x" * 1500
    with pytest.raises(InvalidPersonaError, match="composed persona"):
        compose(PersonaProfile(user_id="a", preferences=[long_text], description="d" * 900))


# ----------------------------------------------------------------------------- resolve


def test_resolve_keeps_the_engines_list_behaviour() -> None:
    personas = resolve_personas(["Answer with humour.", Persona(text="Be brief.", name="b")])
    assert personas == [Persona(text="Answer with humour."), Persona(text="Be brief.", name="b")]
    three = resolve_personas(["A one.", "B two.", "C three."])
    assert [p.text for p in three] == ["A one.", "B two.", "C three."]


def test_resolve_accepts_every_input_form() -> None:
    by_name = resolve_personas("humor")
    assert [p.text for p in by_name] == list(CATALOG["humor"].phrasings)
    assert resolve_personas(CATALOG["humor"]) == by_name
    assert resolve_personas(["humor", "concise"]) == compose(["humor", "concise"])
    profile = PersonaProfile(user_id="alice", preferences=["humor", "concise"])
    assert resolve_personas(profile) == compose(profile)
    assert len(resolve_personas(["humor", "concise", "vivid"], k=2)) == 2
    with ProfileStore(":memory:") as store:
        store.put(profile)
        assert resolve_personas("user:alice", store=store) == compose(profile)


def test_resolve_user_id_from_a_store_path(tmp_path: Path) -> None:
    path = f"{tmp_path}/profiles.db"
    with ProfileStore(path) as store:
        store.put(PersonaProfile(user_id="alice", preferences=["vivid"]))
    assert [p.name for p in resolve_personas("user:alice", store=path)] == ["vivid", "vivid"]
    with pytest.raises(ProfileNotFoundError, match="'bob'"):
        resolve_personas("user:bob", store=path)


def test_resolve_missing_store_file_is_profile_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = f"{tmp_path}/none.db"
    monkeypatch.setenv("PJ_PROFILE_STORE", missing)
    with pytest.raises(ProfileNotFoundError, match="no profile store"):
        resolve_personas("user:alice")
    with pytest.raises(InvalidPersonaError, match="user id"):
        resolve_personas("user:")
    assert not os.path.exists(missing)  # a look-up never creates a store


def test_the_engine_accepts_profiles_user_ids_and_names(tmp_path: Path) -> None:
    from pj_core.engine import PersonaJudge
    from tests._tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    engine = PersonaJudge(make_tiny_model(len(tokenizer), seed=1), tokenizer)
    profile = PersonaProfile(user_id="alice", preferences=["humor", "concise"])
    path = tmp_path / "profiles.db"
    with ProfileStore(path) as store:
        store.put(profile)

    def run(personas: object) -> list[int]:
        out = engine.generate("hello world", personas, max_new_tokens=6, seed=5)  # type: ignore[arg-type]
        return list(out.token_ids)

    expected = run(compose(profile))
    assert run(["Be brief.", "the cat the dog"]) != expected  # the prefixes do matter
    assert run(profile) == expected
    assert run(["humor", "concise"]) == expected
    assert run(resolve_personas("user:alice", store=path)) == expected
    with pytest.raises(ProfileNotFoundError):
        run(resolve_personas("user:bob", store=path))
    with pytest.raises(UnknownPreferenceError):
        run(["humr", "concise"])


def test_user_ids_resolve_from_a_postgresql_url(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``store=`` and ``$PJ_PROFILE_STORE`` may name a PostgreSQL database (a real server)."""
    from pj_core.engine import PersonaJudge
    from pj_core.personas.store import open_store
    from tests._tiny import make_tiny_model, make_tiny_tokenizer

    profile = PersonaProfile(user_id="alice", preferences=["humor", "concise"])
    with open_store(postgres_url) as store:
        store.put(profile)
    assert resolve_personas("user:alice", store=postgres_url) == compose(profile)
    with pytest.raises(ProfileNotFoundError, match="'bob'"):
        resolve_personas("user:bob", store=postgres_url)
    monkeypatch.setenv("PJ_PROFILE_STORE", postgres_url)
    assert resolve_personas("user:alice") == compose(profile)
    tokenizer = make_tiny_tokenizer()
    engine = PersonaJudge(make_tiny_model(len(tokenizer), seed=1), tokenizer)
    from_url = engine.generate("hello world", "user:alice", max_new_tokens=6, seed=5)
    direct = engine.generate("hello world", compose(profile), max_new_tokens=6, seed=5)
    assert from_url.token_ids == direct.token_ids
