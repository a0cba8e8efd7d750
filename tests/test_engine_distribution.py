"""Statistical test: sequences sampled by the engine follow the exactly computed distribution.

On a tiny model with top-k 2, every 3-token answer can be enumerated. The exact distribution
of Persona-judge's output is computed from the model's next-token distributions by walking
the round process (``tests/_engine_reference.py``); with fixed roles it must also equal the
judge's own autoregressive distribution. The engine's empirical distribution over N seeded
runs is compared to it by total variation (TV).

Tolerance: the 99.9th percentile of the TV between the exact distribution and N multinomial
samples drawn from it (simulated below with a fixed seed): a correct engine fails with
probability about 1e-3, and each test also checks that the *wrong* candidate (the draft's
own distribution, or the other role schedule) lies well outside that tolerance, so the test
can tell them apart.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from pj_core.engine import PersonaJudge
from pj_core.settings import PAPER
from tests._engine_reference import (
    TOKENIZER,
    autoregressive_distribution,
    exact_sequence_distribution,
    tiny_prompt,
    total_variation,
    tv_tolerance,
)
from tests._tiny import make_tiny_model
from tests._toy_backend import ToyBackend, ToyLM

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

TOY_SEED = 0
SETTINGS: dict[str, Any] = {"temperature": 1.0, "top_k": 2, "top_p": 1.0}
LENGTH = 3
LOOKAHEAD = 2
SAMPLES = 600


@pytest.fixture(scope="module", params=["transformers", "toy"])
def case(request: pytest.FixtureRequest) -> tuple[PersonaJudge, Any]:
    """The engine on each backend, and the model the exact distributions are computed on.

    Model seed 3 (and toy seed 0) with these prompts: two personas that disagree strongly,
    so the role schedule visibly shapes the output (each test checks that it does)."""
    if request.param == "transformers":
        model = make_tiny_model(len(TOKENIZER), seed=3)
        # EOS: <eos> only, as these distributions were chosen with (not the template's
        # <|im_end|>, which the engine would add by default).
        return PersonaJudge(model, TOKENIZER, eos_token_ids=[1], defaults=PAPER), model
    lm = ToyLM(len(TOKENIZER), seed=TOY_SEED)
    return PersonaJudge.from_backend(ToyBackend(lm), TOKENIZER, defaults=PAPER), lm


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return [tiny_prompt("yes yes yes", "cat"), tiny_prompt("no no no", "dog")]


def _empirical(
    pj: PersonaJudge, prompts: list[list[int]], **settings: Any
) -> dict[tuple[int, ...], float]:
    counts: Counter[tuple[int, ...]] = Counter()
    for seed in range(SAMPLES):
        out = pj.generate_from_ids(
            prompts,
            lookahead=LOOKAHEAD,
            max_new_tokens=LENGTH,
            seed=seed,
            **SETTINGS,
            **settings,
        )
        counts[tuple(out.token_ids)] += 1
    return {sequence: n / SAMPLES for sequence, n in counts.items()}


def _tolerance(exact: dict[tuple[int, ...], float]) -> float:
    """99.9th percentile of TV(exact, empirical of SAMPLES multinomial draws)."""
    return tv_tolerance(exact, SAMPLES)


def _exact(
    case: tuple[PersonaJudge, Any], prompts: list[list[int]], alternate: bool
) -> dict[tuple[int, ...], float]:
    pj, model = case
    return exact_sequence_distribution(
        model,
        prompts,
        lookahead=LOOKAHEAD,
        alternate=alternate,
        length=LENGTH,
        eos_ids=pj.eos_token_ids,
        **SETTINGS,
    )


def test_fixed_roles_follow_the_judges_own_distribution(
    case: tuple[PersonaJudge, Any], prompts: list[list[int]]
) -> None:
    pj, model = case
    exact = _exact(case, prompts, alternate=False)
    judge_alone = autoregressive_distribution(
        model,
        prompts[1],
        length=LENGTH,
        eos_ids=pj.eos_token_ids,
        **SETTINGS,
    )
    draft_alone = autoregressive_distribution(
        model,
        prompts[0],
        length=LENGTH,
        eos_ids=pj.eos_token_ids,
        **SETTINGS,
    )
    # The round-process enumeration agrees with the theorem: the judge's distribution.
    assert total_variation(exact, judge_alone) < 1e-6
    tolerance = _tolerance(exact)
    assert total_variation(draft_alone, exact) > 3 * tolerance  # the test has power
    empirical = _empirical(pj, prompts, alternate=False)
    assert total_variation(empirical, exact) < tolerance


@pytest.mark.parametrize("strategy", ["speculative", "lockstep"])
def test_alternating_roles_follow_the_round_wise_composition(
    case: tuple[PersonaJudge, Any], prompts: list[list[int]], strategy: str
) -> None:
    pj, _ = case
    exact = _exact(case, prompts, alternate=True)
    tolerance = _tolerance(exact)
    assert total_variation(exact, _exact(case, prompts, alternate=False)) > 2 * tolerance
    empirical = _empirical(pj, prompts, alternate=True, strategy=strategy)
    assert total_variation(empirical, exact) < tolerance
