"""Constraints and matchers (pj_core.decoding.constraints), on a tiny byte-level BPE
tokenizer (and SmolLM2's, in the real-model test)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from pydantic import BaseModel

from pj_core.backends.hf.models import LoadedModel
from pj_core.decoding.constraints import (
    Choice,
    CompiledConstraint,
    ConstraintViolation,
    Grammar,
    JsonSchema,
    Regex,
    as_constraint,
    compile_constraint,
    tokenizer_bridge,
)
from pj_core.errors import InvalidConstraintError, InvalidGenerationConfigError
from tests._bpe import make_bpe_tokenizer
from tests._tiny import make_tiny_tokenizer

TOKENIZER = make_bpe_tokenizer()
EOS = TOKENIZER.eos_token_id
VOCAB = len(TOKENIZER)


class Fruit(BaseModel):
    name: str
    count: int


def compiled(response_format: Any) -> CompiledConstraint:
    return compile_constraint(response_format, TOKENIZER, vocab_size=VOCAB, eos_token_ids=[EOS])


def allowed_ids(matcher: Any) -> set[int]:
    return set(matcher.allowed().nonzero().flatten().tolist())


def test_response_formats_become_constraints() -> None:
    assert as_constraint({"type": "integer"}) == JsonSchema({"type": "integer"})
    from_model = as_constraint(Fruit)
    assert isinstance(from_model, JsonSchema) and from_model.model is Fruit
    assert from_model.schema["required"] == ["name", "count"]
    assert as_constraint(Regex("a+")) == Regex("a+")
    assert as_constraint(Choice(iter(["x", "y"]))).options == ("x", "y")  # type: ignore[union-attr]
    assert as_constraint(Grammar('start: "a"')).kind == "grammar"


@pytest.mark.parametrize(
    ("response_format", "fragment"),
    [
        (Choice([]), "at least one option"),
        (Choice(["yes", ""]), "option 1"),
        (Choice(["yes", 3]), "option 1"),  # type: ignore[list-item]
        (Regex("   "), "non-empty"),
        (Grammar(""), "non-empty"),
        ("a string", "response_format must be"),
        ([{"type": "integer"}], "response_format must be"),
        (JsonSchema({"type": object}), "not JSON data"),
    ],
)
def test_bad_response_formats_raise_typed_errors(response_format: Any, fragment: str) -> None:
    with pytest.raises(InvalidConstraintError, match=re.escape(fragment)) as info:
        compiled(response_format)
    assert isinstance(info.value, InvalidGenerationConfigError)  # callers may catch either


@pytest.mark.parametrize(
    ("response_format", "fragment"),
    [
        (Regex("[a-"), "unclosed character class"),
        (Grammar("start: missing_rule"), "missing_rule"),
        ({"type": "string", "format": "no-such-format"}, "no-such-format"),
        ({"type": "object", "properties": {"a": {"$ref": "#/defs/none"}}}, "defs"),
        ({"type": "array", "uniqueItems": True}, "Unimplemented keys"),  # unsupported feature
        ({"not": {"type": "string"}}, "Unimplemented keys"),
    ],
)
def test_what_the_engine_cannot_compile_fails_before_decoding(
    response_format: Any, fragment: str
) -> None:
    with pytest.raises(InvalidConstraintError, match="cannot be compiled") as info:
        compiled(response_format)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_a_tokenizer_the_engine_cannot_read_is_a_typed_error() -> None:
    wordpiece = make_tiny_tokenizer()
    with pytest.raises(InvalidConstraintError, match="cannot read this tokenizer"):
        compile_constraint(Choice(["a"]), wordpiece, vocab_size=len(wordpiece), eos_token_ids=[1])


def test_the_tokenizer_bridge_is_built_once() -> None:
    first = tokenizer_bridge(TOKENIZER, VOCAB, [EOS])
    assert tokenizer_bridge(TOKENIZER, VOCAB, [EOS]) is first
    assert tokenizer_bridge(TOKENIZER, VOCAB + 8, [EOS]) is not first


def test_a_json_matcher_walks_a_valid_answer_to_its_end() -> None:
    matcher = compiled(Fruit).matcher()
    text = json.dumps({"name": "Bo", "count": 3})
    ids = TOKENIZER.encode(text)
    masks = []
    for token in ids:
        mask = matcher.allowed()
        assert mask.shape == (VOCAB,) and bool(mask[token]), (token, TOKENIZER.decode([token]))
        assert not bool(mask[EOS]), "EOS before the object is complete"
        masks.append(mask)
        matcher.consume(token)
    assert matcher.is_finished()
    assert allowed_ids(matcher) == {EOS}
    assert compiled(Fruit).parse(text) == Fruit(name="Bo", count=3)
    # rollback restores the earlier states exactly
    matcher.rollback(3)
    assert not matcher.is_finished()
    assert bool((matcher.allowed() == masks[-3]).all())
    copy = matcher.copy()
    copy.consume(ids[-3])
    assert bool((matcher.allowed() == masks[-3]).all()), "the copy shares no state"


def test_a_forbidden_token_and_a_long_rollback_raise() -> None:
    matcher = compiled(Choice(["yes", "no"])).matcher()
    forbidden = TOKENIZER.encode("{")[0]
    assert forbidden not in allowed_ids(matcher)
    with pytest.raises(ConstraintViolation, match="not allowed"):
        matcher.consume(forbidden)
    fresh = compiled(Choice(["yes", "no"])).matcher()
    with pytest.raises(ConstraintViolation, match="cannot roll back 1 tokens of 0"):
        fresh.rollback(1)


@pytest.mark.parametrize(
    ("response_format", "good", "bad"),
    [
        (Regex(r"\d{3}-\d{4}"), "123-4567", "12-34567"),
        (Choice(["red", "green", 'say "hi"']), 'say "hi"', "blue"),
        (Grammar('start: "yes" | "no" | "maybe"'), "maybe", "may"),
    ],
)
def test_each_kind_accepts_its_texts_only(response_format: Any, good: str, bad: str) -> None:
    def walk(text: str) -> bool:
        matcher = compiled(response_format).matcher()
        for token in TOKENIZER.encode(text):
            if not bool(matcher.allowed()[token]):
                return False
            matcher.consume(token)
        return matcher.is_finished()

    assert walk(good)
    assert not walk(bad)


@pytest.mark.real_model
def test_smollm2_tokenizer_matcher(smollm2: LoadedModel) -> None:
    """The matcher on a real 49k vocabulary: a valid answer walks to the end, EOS only then."""
    vocab = int(smollm2.model.config.vocab_size)
    eos = sorted(smollm2.eos_token_ids)
    schema = compile_constraint(Fruit, smollm2.tokenizer, vocab_size=vocab, eos_token_ids=eos)
    matcher = schema.matcher()
    assert matcher.vocab_size == vocab
    for token in smollm2.tokenizer.encode('{"name": "fig", "count": 12}', add_special_tokens=False):
        assert bool(matcher.allowed()[token])
        assert not any(bool(matcher.allowed()[e]) for e in eos)
        matcher.consume(token)
    assert matcher.is_finished() and allowed_ids(matcher) == set(eos)
    choice = compile_constraint(
        Choice(["positive", "negative"]), smollm2.tokenizer, vocab_size=vocab, eos_token_ids=eos
    ).matcher()
    first = {str(smollm2.tokenizer.decode([t])) for t in allowed_ids(choice)}
    assert first and all("positive".startswith(p) or "negative".startswith(p) for p in first)
