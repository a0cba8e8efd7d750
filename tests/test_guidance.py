"""Persona strength (pj_core.decoding.guidance): guided rows follow the judge's guided distribution.

The strength γ turns each persona row's logits l into l + γ (l - l_neutral), with l_neutral
from the neutral row (the conversation with no persona text) at the same answer prefix. As for
the other transforms (test_logit_transforms.py), every 3-token answer of the tiny model with
top-k 2 can be enumerated: ``tests/_engine_reference.py`` computes the exact distribution of
the round process over the *guided* distributions, with the neutral logits from full forwards
of the neutral prompt (no cache), written here from the definition. The engine's empirical
distribution over ``SAMPLES`` seeded runs must lie within the 99.9th percentile of multinomial
TV at that size; each test checks its power (the unguided distribution lies more than 3
tolerances away).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import pytest
import torch

from pj_core.decoding.guidance import Strength
from pj_core.decoding.logits import Position
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError, InvalidPromptError
from pj_core.personas import resolve_personas
from pj_core.prompts import render_ids
from pj_core.settings import PAPER
from tests._engine_reference import (
    TOKENIZER,
    PrefixTransform,
    exact_sequence_distribution,
    total_variation,
    tv_tolerance,
)
from tests._tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOS = frozenset({1})
SETTINGS: dict[str, Any] = {"temperature": 1.0, "top_k": 2, "top_p": 1.0}
LENGTH = 3
LOOKAHEAD = 2
SAMPLES = 600
GAMMA = 1.5
CONVERSATION = "cat"
PERSONAS = ["yes yes yes", "no no no"]


@pytest.fixture(scope="module")
def pj() -> PersonaJudge:
    # EOS: <eos> only, as the exact distributions here assume.
    return PersonaJudge(
        make_tiny_model(len(TOKENIZER), seed=7),
        TOKENIZER,
        defaults=PAPER,
        eos_token_ids=sorted(EOS),
    )


@pytest.fixture(scope="module")
def prompts(pj: PersonaJudge) -> list[list[int]]:
    return [render_ids(pj.tokenizer, CONVERSATION, p.text) for p in resolve_personas(PERSONAS)]


@pytest.fixture(scope="module")
def neutral(pj: PersonaJudge) -> list[int]:
    return render_ids(pj.tokenizer, CONVERSATION, None)


def reference_strength(pj: PersonaJudge, neutral: list[int], gamma: float) -> PrefixTransform:
    """l + γ (l - l_neutral), l_neutral from a full forward of the neutral prompt + prefix."""

    def transform(logits: torch.Tensor, prefix: tuple[int, ...]) -> torch.Tensor:
        ids = torch.tensor([[*neutral, *prefix]])
        with torch.inference_mode():
            l_neutral = pj.model(input_ids=ids, use_cache=False).logits[0, -1].float()
        return logits + gamma * (logits - l_neutral)

    return transform


def _exact(
    pj: PersonaJudge, prompts: list[list[int]], transform: PrefixTransform | None
) -> dict[tuple[int, ...], float]:
    return exact_sequence_distribution(
        pj.model,
        prompts,
        lookahead=LOOKAHEAD,
        alternate=True,
        length=LENGTH,
        eos_ids=EOS,
        transform=transform,
        **SETTINGS,
    )


def _answers(pj: PersonaJudge, route: str, seeds: range, **settings: Any) -> list[list[int]]:
    """One answer per seed through ``route``: a strategy of ``generate``, or
    ``generate_batch`` (100 requests per batch)."""
    options: dict[str, Any] = {
        "lookahead": LOOKAHEAD,
        "max_new_tokens": LENGTH,
        **SETTINGS,
        "strength": GAMMA,
        **settings,
    }
    if route != "batch":
        return [
            pj.generate(CONVERSATION, PERSONAS, seed=s, strategy=route, **options).token_ids
            for s in seeds
        ]
    answers: list[list[int]] = []
    for start in range(seeds.start, seeds.stop, 100):
        requests = [
            {"conversation": CONVERSATION, "personas": PERSONAS, "seed": s, **options}
            for s in range(start, min(start + 100, seeds.stop))
        ]
        answers += [r.token_ids for r in pj.generate_batch(requests)]
    return answers


# ------------------------------------------------------------------------ the transform


def test_strength_moves_away_from_the_neutral_row() -> None:
    at = Position(0, "judge", 0, (), (), neutral=torch.tensor([0.0, 1.0, 2.0]))
    logits = torch.tensor([1.0, 1.0, float("-inf")])
    guided = Strength(2.0)(logits, at)
    assert guided.tolist() == [3.0, 1.0, float("-inf")]  # a masked token stays masked
    # γ = 0 is the paper exactly (and never 0 * inf = nan).
    assert torch.equal(Strength(0)(logits, at), logits)


@pytest.mark.parametrize("gamma", [-0.1, math.inf, math.nan, "1", True])
def test_strength_rejects_bad_values(pj: PersonaJudge, gamma: Any) -> None:
    with pytest.raises(InvalidGenerationConfigError, match="strength must be"):
        Strength(gamma)
    with pytest.raises(InvalidGenerationConfigError, match="strength must be"):
        pj.generate(CONVERSATION, PERSONAS, strength=gamma, max_new_tokens=2)


def test_strength_without_a_neutral_row_is_a_typed_error(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    # Strength added by hand: the call has no neutral row to guide against.
    with pytest.raises(InvalidGenerationConfigError, match="set strength on the call"):
        pj.generate(CONVERSATION, PERSONAS, logit_transforms=[lambda: Strength(1.0)])
    # From ids, strength needs the neutral prompt's ids.
    with pytest.raises(InvalidGenerationConfigError, match="neutral_prompt_ids"):
        pj.generate_from_ids(prompts, strength=1.0, max_new_tokens=2)
    with pytest.raises(InvalidPromptError, match="neutral_prompt_ids"):
        pj.generate_from_ids(prompts, strength=1.0, neutral_prompt_ids=[], max_new_tokens=2)


# ------------------------------------------------------------------------ exactness


@pytest.mark.slow
@pytest.mark.parametrize("route", ["speculative", "lockstep", "batch"])
def test_output_follows_the_judges_guided_distribution(
    pj: PersonaJudge, prompts: list[list[int]], neutral: list[int], route: str
) -> None:
    exact = _exact(pj, prompts, reference_strength(pj, neutral, GAMMA))
    tolerance = tv_tolerance(exact, SAMPLES)
    # Power: the unguided output would lie far outside the tolerance.
    assert total_variation(exact, _exact(pj, prompts, None)) > 3 * tolerance
    answers = [tuple(a) for a in _answers(pj, route, range(SAMPLES))]
    empirical = {answer: n / SAMPLES for answer, n in Counter(answers).items()}
    assert total_variation(empirical, exact) < tolerance


def test_strategies_emit_identical_guided_tokens(pj: PersonaJudge) -> None:
    """Longer answers, with rejections, bonuses and crops of the neutral cache: the
    speculative neutral row (stepped beside the draft) gives the lockstep tokens."""
    settings = {"max_new_tokens": 16, "lookahead": 3, "top_k": 0, "top_p": 0.95}
    speculative = _answers(pj, "speculative", range(40), **settings)
    lockstep = _answers(pj, "lockstep", range(40), **settings)
    assert speculative == lockstep
    unguided = _answers(pj, "lockstep", range(40), **{**settings, "strength": 0.0})
    assert sum(a != b for a, b in zip(lockstep, unguided, strict=True)) >= 20


def test_batch_steps_each_requests_neutral_row_with_its_persona_rows(pj: PersonaJudge) -> None:
    """Guided, unguided and differently guided requests in one batch: each gets the tokens of
    its own generate() call (the neutral row adds no forward: one per emitted token)."""
    settings: dict[str, Any] = {"max_new_tokens": 16, "lookahead": 3, "top_k": 0, "top_p": 0.95}
    requests = [
        {"conversation": CONVERSATION, "personas": PERSONAS, "seed": s, **settings}
        | ({"strength": [0.0, 1.5, 3.0][s % 3]} if s % 3 else {})
        | ({"neutral_system": "why the world"} if s % 4 == 3 else {})
        for s in range(24)
    ]
    batched = pj.generate_batch(requests)
    single = [pj.generate(**r, strategy="lockstep") for r in requests]
    differing = sum(a.token_ids != b.token_ids for a, b in zip(batched, single, strict=True))
    assert differing <= 1  # batched forwards may flip a rare token (see test_batch.py)
    longest = max(len(r.token_ids) for r in batched)
    assert all(r.stats.forward_passes <= longest + 1 for r in batched)
    assert len({tuple(r.token_ids) for r in batched}) > 12


def test_the_neutral_row_costs_no_extra_forward_but_at_a_bonus(pj: PersonaJudge) -> None:
    """A negligible strength keeps the plain tokens and rounds, so the forwards compare
    one to one: each draft step forwards the draft and neutral rows together, and only a
    bonus token needs one more (neutral) forward."""
    options: dict[str, Any] = {"max_new_tokens": 24, "lookahead": 3, "top_k": 0, "top_p": 1.0}
    for seed in range(6):
        plain = pj.generate(CONVERSATION, PERSONAS, seed=seed, **options)
        guided = pj.generate(CONVERSATION, PERSONAS, seed=seed, strength=1e-9, **options)
        assert guided.token_ids == plain.token_ids
        assert guided.stats.rounds == plain.stats.rounds
        assert guided.stats.forward_passes == plain.stats.forward_passes + guided.stats.bonus


def test_merged_rows_step_like_separate_caches(pj: PersonaJudge) -> None:
    """Two caches of different lengths, fed different numbers of tokens in one forward, give
    the logits and caches of separate single-row forwards."""
    from pj_core.backends.hf.kv import MergedRows, forward_logits, prefill_split

    prefixes = [[2, 5, 6, 7, 8, 9], [2, 10, 11]]
    feeds = [[[12], [13, 14]], [[15], [16]], [[17, 18, 19], [20]]]
    with torch.inference_mode():
        separate, _ = prefill_split(pj.model, prefixes)
        merged = MergedRows(pj.model, prefill_split(pj.model, prefixes)[0])
        for step in feeds:
            together = merged.feed(step)
            for row, tokens in enumerate(step):
                alone = forward_logits(pj.model, torch.tensor([tokens]), separate[row], keep=1)
                torch.testing.assert_close(together[row], alone[0, -1], atol=1e-5, rtol=1e-5)
        split = merged.split()
        for row in range(2):
            assert split[row].get_seq_length() == separate[row].get_seq_length()
            for mine, theirs in zip(split[row].layers, separate[row].layers, strict=True):
                for name in ("keys", "values"):
                    torch.testing.assert_close(
                        getattr(mine, name), getattr(theirs, name), atol=1e-5, rtol=1e-5
                    )
    assert merged.forward_passes == len(feeds)


def test_strength_zero_is_plain_persona_judge(pj: PersonaJudge) -> None:
    for strategy in ("speculative", "lockstep"):
        plain = [
            pj.generate(CONVERSATION, PERSONAS, seed=s, strategy=strategy, max_new_tokens=10)
            for s in range(5)
        ]
        zero = [
            pj.generate(
                CONVERSATION, PERSONAS, seed=s, strategy=strategy, max_new_tokens=10, strength=0
            )
            for s in range(5)
        ]
        assert [r.token_ids for r in plain] == [r.token_ids for r in zero]


def test_neutral_system_text_changes_the_neutral_row(
    pj: PersonaJudge, prompts: list[list[int]]
) -> None:
    assert pj.render_neutral_prompt(CONVERSATION) == render_ids(TOKENIZER, CONVERSATION, None)
    other = pj.render_neutral_prompt(CONVERSATION, "why the world")
    assert other == render_ids(TOKENIZER, CONVERSATION, "why the world")
    options: dict[str, Any] = {"max_new_tokens": 12, "strength": 2.0, "top_k": 0, "top_p": 1.0}
    default = [pj.generate(CONVERSATION, PERSONAS, seed=s, **options).token_ids for s in range(8)]
    custom = [
        pj.generate(CONVERSATION, PERSONAS, seed=s, neutral_system="why the world", **options)
        for s in range(8)
    ]
    assert default != [r.token_ids for r in custom]
    # From ids: the same call, given the rendered neutral prompt, emits the same tokens.
    from_ids = [
        pj.generate_from_ids(
            prompts,
            neutral_prompt_ids=pj.render_neutral_prompt(CONVERSATION),
            seed=s,
            **options,
        ).token_ids
        for s in range(8)
    ]
    assert from_ids == default


def test_one_token_prompts_guide_without_merging(pj: PersonaJudge) -> None:
    """Empty caches (one-token prompts) cannot be merged: the neutral row then runs its own
    forwards, with the same tokens as lockstep."""
    options: dict[str, Any] = {"max_new_tokens": 10, "lookahead": 2, "strength": 1.0}
    for seed in range(5):
        answers = [
            pj.generate_from_ids(
                [[5], [6]], neutral_prompt_ids=[7], seed=seed, strategy=strategy, **options
            ).token_ids
            for strategy in ("speculative", "lockstep")
        ]
        assert answers[0] == answers[1]
