"""Property-based tests (hypothesis, derandomized so every run draws the same cases): random
and hostile strings, token ids, seeds and settings through ``generate``, ``stream``,
``generate_batch``, ``generate_from_ids`` and the ``pj generate`` command give a result or a
``PersonaJudgeError`` (the command: exit 0, or one ``pj: error:`` line and a non-zero exit),
never another exception."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pj_core.engine import PersonaJudge
from pj_core.errors import PersonaJudgeError
from pj_core.results import GenerationResult
from tests._tiny import make_tiny_model, make_tiny_tokenizer

PROPERTY_SETTINGS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

HOSTILE = [
    "",
    " ",
    "\n",
    "<|im_start|>",
    "<|im_end|>user\nhi",
    "[CLS][SEP]",
    "\nUser: hi\nAssistant:",
    "hi \ud800",
    "\udcff",
    "\x00",
    "a" * 300,
]
TEXT = st.one_of(
    st.text(max_size=30),
    st.sampled_from(HOSTILE),
    st.lists(st.sampled_from(["hello", "world", "<|im_start|>", "\ud800", " "]), max_size=6).map(
        "".join
    ),
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-3, max_value=40),
    st.floats(),
    st.floats(min_value=-1, max_value=3),
    TEXT,
)
ANY = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
MESSAGE = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "system", "tool", "bot"]), "content": TEXT}
    ),
    st.fixed_dictionaries({"role": ANY, "content": ANY}),
    ANY,
)
CONVERSATION = st.one_of(TEXT, st.lists(MESSAGE, max_size=4), ANY)
PERSONAS = st.one_of(
    st.sampled_from(
        [["Be funny.", "Be brief."], ["humor", "concise"], "humor", ["Be kind.", "Be brief.", "x"]]
    ),
    st.lists(st.one_of(TEXT, st.sampled_from(["humor", "concise", "Be brief."])), max_size=4),
    ANY,
)


VALID_SETTINGS: dict[str, st.SearchStrategy[Any]] = {
    "lookahead": st.integers(min_value=1, max_value=6),
    "alternate": st.booleans(),
    "strategy": st.sampled_from(["speculative", "lockstep", "auto"]),
    "max_new_tokens": st.integers(min_value=1, max_value=6),
    "temperature": st.floats(min_value=0, max_value=2),
    "top_k": st.integers(min_value=0, max_value=30),
    "top_p": st.floats(min_value=0.05, max_value=1),
    "strength": st.floats(min_value=0, max_value=3),
    "neutral_system": st.none() | TEXT,
    "decoder": st.sampled_from(["persona-judge", "pool"]),
    "seed": st.integers(min_value=0, max_value=2**32 - 1),
    "stop": st.lists(TEXT, max_size=2),
}
VALID = st.fixed_dictionaries({}, optional=VALID_SETTINGS)
WILD = st.fixed_dictionaries(
    {},
    optional={
        **{name: ANY for name in VALID_SETTINGS},
        "tools": ANY,
        "tool_choice": ANY,
        "parallel_tool_calls": ANY,
        "response_format": ANY,
    },
)
TALK = st.one_of(TEXT, st.lists(MESSAGE, max_size=3))
GOOD_PERSONAS = st.sampled_from(
    [["Be funny.", "Be brief."], ["humor", "concise"], "humor", ["Be kind.", "Be brief.", "x"]]
)
# One hostile part at a time, so that most cases get past validation into decoding; then
# everything hostile at once.
CASES = st.one_of(
    st.tuples(TALK, GOOD_PERSONAS, VALID),
    st.tuples(st.just("hello"), PERSONAS, VALID),
    st.tuples(st.just("hello"), GOOD_PERSONAS, WILD),
    st.tuples(CONVERSATION, PERSONAS, WILD),
)
TOKEN_IDS = st.one_of(
    st.lists(
        st.one_of(st.lists(st.integers(min_value=-2, max_value=30), max_size=6), ANY), max_size=4
    ),
    ANY,
)


@pytest.fixture(scope="module")
def engine() -> PersonaJudge:
    tokenizer = make_tiny_tokenizer()
    return PersonaJudge(make_tiny_model(len(tokenizer)), tokenizer)


def _small(options: dict[str, Any]) -> dict[str, Any]:
    """A short answer unless the case sets its own budget (which validation then checks)."""
    return {"max_new_tokens": 3, **options}


@PROPERTY_SETTINGS
@given(case=CASES)
def test_generate_gives_a_result_or_a_typed_error(
    engine: PersonaJudge, case: tuple[Any, Any, dict[str, Any]]
) -> None:
    conversation, personas, options = case
    try:
        result = engine.generate(conversation, personas, **_small(options))
    except PersonaJudgeError:
        return
    assert isinstance(result, GenerationResult)


@PROPERTY_SETTINGS
@given(case=CASES)
def test_stream_gives_events_or_a_typed_error(
    engine: PersonaJudge, case: tuple[Any, Any, dict[str, Any]]
) -> None:
    conversation, personas, options = case
    try:
        events = list(engine.stream(conversation, personas, **_small(options)))
    except PersonaJudgeError:
        return
    assert events[-1].done and isinstance(events[-1].result, GenerationResult)


REQUEST = st.one_of(
    CASES.map(
        lambda case: {
            "conversation": case[0],
            "personas": case[1],
            **_small({k: v for k, v in case[2].items() if k not in ("tools", "tool_choice")}),
        }
    ),
    ANY,
)


@PROPERTY_SETTINGS
@given(requests=st.one_of(st.lists(REQUEST, max_size=3), ANY))
def test_generate_batch_gives_results_or_typed_errors(engine: PersonaJudge, requests: Any) -> None:
    try:
        slots = engine.generate_batch(requests, return_exceptions=True)
    except PersonaJudgeError:  # not a list of requests at all
        return
    assert all(isinstance(slot, GenerationResult | PersonaJudgeError) for slot in slots)
    try:
        results = engine.generate_batch(requests)
    except PersonaJudgeError:
        assert any(isinstance(slot, PersonaJudgeError) for slot in slots)
        return
    assert all(isinstance(result, GenerationResult) for result in results)


@PROPERTY_SETTINGS
@given(
    prompt_ids=TOKEN_IDS,
    options=st.one_of(
        VALID,
        WILD.map(lambda o: {k: v for k, v in o.items() if k not in ("tools", "tool_choice")}),
        st.dictionaries(st.sampled_from(["bogus", "seed", "top_k"]), ANY, max_size=2),
    ),
)
def test_generate_from_ids_gives_a_result_or_a_typed_error(
    engine: PersonaJudge, prompt_ids: Any, options: dict[str, Any]
) -> None:
    try:
        result = engine.generate_from_ids(prompt_ids, **_small(options))
    except PersonaJudgeError:
        return
    assert isinstance(result, GenerationResult)


ARG = st.one_of(TEXT, st.integers().map(str), st.floats().map(str))
OPTION = st.one_of(
    st.tuples(
        st.sampled_from(
            [
                "--persona",
                "--preference",
                "--seed",
                "--temperature",
                "--top-k",
                "--top-p",
                "--lookahead",
                "--max-new-tokens",
                "--strategy",
                "--strength",
                "--stop",
                "--regex",
                "--choice",
                "--profile",
                "--store",
            ]
        ),
        ARG,
    ),
    st.tuples(st.sampled_from(["--fixed-roles", "--explain"])),
)


@PROPERTY_SETTINGS
@given(prompt=ARG, options=st.lists(OPTION, max_size=5))
def test_the_generate_command_answers_or_says_one_line(
    engine: PersonaJudge,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path_factory: pytest.TempPathFactory,
    prompt: str,
    options: list[tuple[str, ...]],
) -> None:
    from pj_core import cli

    monkeypatch.setattr(PersonaJudge, "from_pretrained", lambda *a, **k: engine)
    monkeypatch.setenv("PJ_PROFILE_STORE", str(tmp_path_factory.mktemp("store") / "p.db"))
    personas = ["--persona", "Be funny.", "--persona", "Be brief."]
    argv = ["generate", prompt, *personas, "--max-new-tokens", "3"]
    argv += [part for option in options for part in option]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2)
        code = int(exit_.code or 0)
    err = capsys.readouterr().err
    if code != 0:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("pj: error: "), (argv, err)
