"""The pool decoder (pj_core.decoding.pool): every token follows the log-linear pool of all
personas.

As for Persona-judge's exactness tests, every 3-token answer of the tiny model with top-k 2 can
be enumerated; here the exact distribution is the autoregressive one of the pool,

    p_pool(t | prefix) ∝ exp(Σ_i w_i log p_i(t | prefix)),  w_i = 1/k,

with p_i from full forwards (no cache) of persona i's prompt + prefix, optionally guided against
the neutral prompt, then filtered (top-k, top-p, temperature). The engine's empirical
distribution over ``SAMPLES`` seeded runs must lie within the 99.9th percentile of multinomial
TV at that size (``tests/_engine_reference.tv_tolerance``), and each case checks its power:
Persona-judge's own distribution lies more than 3 tolerances away.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
import torch

from pj_core.decoding.logits import LogitTransform, Position
from pj_core.decoding.pool import pooled_logits
from pj_core.decoding.sampling import filtered_probs
from pj_core.engine import PersonaJudge
from pj_core.errors import InvalidGenerationConfigError
from pj_core.personas import resolve_personas
from pj_core.prompts import render_ids
from tests._engine_reference import TOKENIZER, total_variation, tv_tolerance
from tests._tiny import make_tiny_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EOS = frozenset({1})
SETTINGS: dict[str, Any] = {"temperature": 1.0, "top_k": 2, "top_p": 1.0}
LENGTH = 3
SAMPLES = 600
CONVERSATION = "cat"
PERSONAS = ["yes yes yes", "no no no", "why the world"]


# A strong bias per persona row: the rows disagree a lot, so the log-linear pool is far from
# a plain mixture of the rows (the tests check that power too).
PERSONA_BIAS = 3.0 * torch.randn(
    len(PERSONAS), len(TOKENIZER), generator=torch.Generator().manual_seed(5)
)


class PersonaBias(LogitTransform):
    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        return logits + PERSONA_BIAS[position.persona]


@pytest.fixture(scope="module")
def pj() -> PersonaJudge:
    # EOS: <eos> only, as the exact distributions here assume.
    return PersonaJudge(
        make_tiny_model(len(TOKENIZER), seed=7), TOKENIZER, eos_token_ids=sorted(EOS)
    )


def _prompts(pj: PersonaJudge, personas: list[str]) -> list[list[int]]:
    return [render_ids(pj.tokenizer, CONVERSATION, p.text) for p in resolve_personas(personas)]


def _last_logits(pj: PersonaJudge, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return pj.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].float()


def exact_pool_distribution(
    pj: PersonaJudge,
    prompts: list[list[int]],
    neutral: list[int] | None,
    strength: float,
    *,
    mixture: bool = False,
) -> dict[tuple[int, ...], float]:
    """P(answer) of sampling each token from the filtered pool, by enumeration (``mixture``:
    the arithmetic mean of the rows' distributions instead, to measure the tests' power)."""
    result: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], mass: float) -> None:
        if len(prefix) == LENGTH or (prefix and prefix[-1] in EOS):
            result[prefix] = result.get(prefix, 0.0) + mass
            return
        rows = torch.stack([_last_logits(pj, [*p, *prefix]) for p in prompts])
        if neutral is not None:
            l_neutral = _last_logits(pj, [*neutral, *prefix])
            rows = rows + strength * (rows - l_neutral)
        rows = rows + PERSONA_BIAS
        log_rows = torch.log_softmax(rows, dim=-1)
        log_pool = log_rows.exp().mean(dim=0).log() if mixture else log_rows.mean(dim=0)
        p = filtered_probs(log_pool, **SETTINGS).double()
        for token in torch.nonzero(p).flatten().tolist():
            walk((*prefix, token), mass * float(p[token]))

    walk((), 1.0)
    return result


def _answers(pj: PersonaJudge, personas: list[str], route: str, **options: Any) -> list[tuple]:
    settings = {
        "max_new_tokens": LENGTH,
        "decoder": "pool",
        "logit_transforms": [PersonaBias],
        **SETTINGS,
        **options,
    }
    if route == "batch":
        requests = [
            {"conversation": CONVERSATION, "personas": personas, "seed": s, **settings}
            for s in range(SAMPLES)
        ]
        return [tuple(r.token_ids) for r in pj.generate_batch(requests)]
    return [
        tuple(pj.generate(CONVERSATION, personas, seed=s, **settings).token_ids)
        for s in range(SAMPLES)
    ]


def test_pooled_logits_is_the_weighted_log_linear_pool() -> None:
    rows = torch.log(torch.tensor([[0.2, 0.8, 0.0], [0.8, 0.2, 0.0]]))
    pooled = torch.softmax(pooled_logits(rows, torch.tensor([0.5, 0.5])), dim=-1)
    # Geometric mean sqrt(0.2 * 0.8) for both tokens: equal; a token one persona forbids
    # stays forbidden.
    torch.testing.assert_close(pooled, torch.tensor([0.5, 0.5, 0.0]))
    # Weights 3/4, 1/4: the odds of token 0 are (0.2/0.8)^(3/4) (0.8/0.2)^(1/4) = 1/2.
    skewed = torch.softmax(pooled_logits(rows, torch.tensor([0.75, 0.25])), dim=-1)
    torch.testing.assert_close(skewed, torch.tensor([1 / 3, 2 / 3, 0.0]))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("route", "strength"), [("generate", 0.0), ("generate", 1.5), ("batch", 1.5)]
)
def test_output_follows_the_pool_exactly(pj: PersonaJudge, route: str, strength: float) -> None:
    prompts = _prompts(pj, PERSONAS)
    neutral = render_ids(pj.tokenizer, CONVERSATION, None) if strength else None
    exact = exact_pool_distribution(pj, prompts, neutral, strength)
    tolerance = tv_tolerance(exact, SAMPLES)
    # Power: a mixture of the rows would lie far outside the tolerance.
    mixture = exact_pool_distribution(pj, prompts, neutral, strength, mixture=True)
    assert total_variation(exact, mixture) > 3 * tolerance
    answers = _answers(pj, PERSONAS, route, strength=strength)
    empirical = {a: n / SAMPLES for a, n in Counter(answers).items()}
    assert total_variation(empirical, exact) < tolerance


def test_pool_trace_stats_and_batch(pj: PersonaJudge) -> None:
    options: dict[str, Any] = {"max_new_tokens": 12, "decoder": "pool", "top_k": 0}
    out = pj.generate(CONVERSATION, PERSONAS, seed=4, **options)
    assert {t.outcome for t in out.trace} == {"pooled"}
    assert out.stats.drafted == out.stats.bonus == 0 and out.stats.tokens == len(out.token_ids)
    assert out.stats.strategy == "lockstep"
    assert out.stats.forward_passes == len(out.token_ids) + 1  # prefill + one step per token
    # The strategy setting does not change a pooled answer; a batch gives the same tokens.
    spec = pj.generate(CONVERSATION, PERSONAS, seed=4, strategy="speculative", **options)
    assert spec.token_ids == out.token_ids
    requests = [
        {"conversation": CONVERSATION, "personas": PERSONAS, "seed": s, **options}
        | ({"strength": 1.0} if s % 2 else {})
        for s in range(10)
    ]
    single = [pj.generate(**r).token_ids for r in requests]
    assert (
        sum(r.token_ids != s for r, s in zip(pj.generate_batch(requests), single, strict=True)) <= 1
    )


def test_pool_differs_from_persona_judge_and_rejects_bad_decoders(pj: PersonaJudge) -> None:
    options: dict[str, Any] = {"max_new_tokens": 12, "top_k": 0}
    pooled = [
        pj.generate(CONVERSATION, PERSONAS, seed=s, decoder="pool", **options).token_ids
        for s in range(10)
    ]
    judged = [
        pj.generate(CONVERSATION, PERSONAS, seed=s, decoder="persona-judge", **options).token_ids
        for s in range(10)
    ]
    assert pooled != judged
    with pytest.raises(InvalidGenerationConfigError, match="decoder must be one of"):
        pj.generate(CONVERSATION, PERSONAS, decoder="mixture")
    # Fixed roles are a Persona-judge notion: the pool does not need exactly two personas.
    pj.generate(CONVERSATION, PERSONAS, decoder="pool", alternate=False, max_new_tokens=2)
