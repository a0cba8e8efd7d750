"""``response_format``: constrained answers through the engine's API, on a tiny model with a
byte-level BPE tokenizer (the real-model checks are in test_constrained_real.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from pj_core.batch import BatchRequest
from pj_core.decoding.constraints import Choice, Grammar, JsonSchema, Regex
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidConstraintError
from tests._bpe import make_bpe_tokenizer
from tests._tiny import make_tiny_model

PERSONAS = ["be funny", "be brief"]


class Flag(BaseModel):
    # Bounded and closed, so a random tiny model finishes it well within its budget.
    model_config = ConfigDict(extra="forbid")

    ok: bool
    n: int = Field(ge=0, le=9)


FLAG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "n": {"type": "integer", "minimum": 0, "maximum": 9},
    },
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def pj() -> PersonaJudge:
    tokenizer = make_bpe_tokenizer()
    return PersonaJudge(
        make_tiny_model(len(tokenizer), seed=3), tokenizer, eos_token_ids=[tokenizer.eos_token_id]
    )


@pytest.mark.parametrize(
    ("response_format", "check"),
    [
        (Choice(["yes", "no", "maybe"]), lambda r: r.parsed == r.text in {"yes", "no", "maybe"}),
        (Regex("[0-9]{3}-[0-9]{4}"), lambda r: re.fullmatch("[0-9]{3}-[0-9]{4}", r.parsed)),
        (Grammar('start: "a" "b"* "c"'), lambda r: re.fullmatch("ab*c", r.parsed)),
        (FLAG_SCHEMA, lambda r: r.parsed == json.loads(r.text) and set(r.parsed) == {"ok", "n"}),
        (
            Flag,
            lambda r: isinstance(r.parsed, Flag) and r.parsed == Flag.model_validate_json(r.text),
        ),
    ],
)
@pytest.mark.parametrize("decoder", ["pool", "persona-judge"])
def test_answers_follow_the_response_format(
    pj: PersonaJudge, response_format: Any, check: Any, decoder: str
) -> None:
    for seed in range(4):
        result = pj.generate(
            "hello",
            PERSONAS,
            seed=seed,
            max_new_tokens=40,
            decoder=decoder,
            response_format=response_format,
        )
        assert result.finish_reason == "eos", result.text
        assert check(result), (result.text, result.parsed)


def test_json_answers_are_laid_out_on_one_line(pj: PersonaJudge) -> None:
    result = pj.generate("hello", PERSONAS, seed=1, max_new_tokens=40, response_format=Flag)
    assert result.text == json.dumps(json.loads(result.text))  # ", " and ": ", no padding


def test_streaming_and_generate_agree_and_the_final_event_carries_parsed(
    pj: PersonaJudge,
) -> None:
    options: dict[str, Any] = {"seed": 5, "max_new_tokens": 40, "response_format": Flag}
    events = list(pj.stream("hello", PERSONAS, **options))
    final = events[-1].result
    assert final is not None and isinstance(final.parsed, Flag)
    assert "".join(e.text for e in events) == final.text
    assert final.token_ids == pj.generate("hello", PERSONAS, **options).token_ids


def test_a_budget_that_ends_first_gives_length_and_nothing_parsed(pj: PersonaJudge) -> None:
    result = pj.generate("hello", PERSONAS, seed=0, max_new_tokens=3, response_format=Flag)
    assert result.finish_reason == "length"
    assert result.parsed is None
    with pytest.raises(ValueError):
        json.loads(result.text)


def test_without_a_response_format_nothing_changes(pj: PersonaJudge) -> None:
    plain = pj.generate("hello", PERSONAS, seed=2, max_new_tokens=12)
    assert plain.parsed is None


def test_batches_give_each_request_its_own_constraint(pj: PersonaJudge) -> None:
    formats: list[Any] = [Choice(["yes", "no"]), Flag, None, Regex("[a-c]{2}")]
    requests = [
        BatchRequest("hello", PERSONAS, seed=s, max_new_tokens=40, response_format=f)
        for s, f in enumerate(formats)
    ]
    results = pj.generate_batch(requests)
    for request, result in zip(requests, results, strict=True):
        single = pj.generate(
            "hello",
            PERSONAS,
            seed=request.seed,
            max_new_tokens=40,
            response_format=request.response_format,
        )
        assert result.token_ids == single.token_ids
        assert result.parsed == single.parsed
    assert results[0].parsed in {"yes", "no"}
    assert isinstance(results[1].parsed, Flag)
    assert results[2].parsed is None
    assert re.fullmatch("[a-c]{2}", results[3].parsed)


def test_bad_response_formats_fail_before_decoding(pj: PersonaJudge) -> None:
    with pytest.raises(InvalidConstraintError, match="at least one option"):
        pj.generate("hello", PERSONAS, response_format=Choice([]))
    with pytest.raises(InvalidConstraintError, match="cannot be compiled"):
        pj.stream("hello", PERSONAS, response_format=Regex("(unclosed"))
    with pytest.raises(InvalidConstraintError, match="response_format must be"):
        pj.generate("hello", PERSONAS, response_format="JSON please")  # type: ignore[arg-type]
    with pytest.raises(InvalidConstraintError, match=r"^request 1: .*cannot be compiled"):
        pj.generate_batch(
            [
                {"conversation": "hello", "personas": PERSONAS},
                {"conversation": "hello", "personas": PERSONAS, "response_format": Regex("[")},
            ]
        )
    not_a_schema: Any = JsonSchema([])  # type: ignore[arg-type]
    requests: list[dict[str, Any]] = [
        {"conversation": "hello", "personas": PERSONAS, "max_new_tokens": 4},
        {"conversation": "hello", "personas": PERSONAS, "response_format": not_a_schema},
    ]
    outcomes = pj.generate_batch(requests, return_exceptions=True)
    assert isinstance(outcomes[1], InvalidConstraintError)
    assert not isinstance(outcomes[0], Exception)
