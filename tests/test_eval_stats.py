"""Win-rate and bootstrap arithmetic, checked on hand-computed examples."""

from __future__ import annotations

import numpy as np
import pytest

from pj_core.errors import EvaluationError
from pj_core.eval.stats import outcome_from_scores, win_rate_ci


def test_all_wins_is_one_with_a_degenerate_interval() -> None:
    rate = win_rate_ci([1.0] * 10)
    assert rate.as_tuple() == (1.0, 1.0, 1.0)
    assert (rate.wins, rate.ties, rate.losses, rate.n) == (10, 0, 0, 10)


def test_all_losses_and_all_ties() -> None:
    assert win_rate_ci([0.0] * 5).as_tuple() == (0.0, 0.0, 0.0)
    assert win_rate_ci([0.5] * 5).as_tuple() == (0.5, 0.5, 0.5)


def test_ties_count_half() -> None:
    # 2 wins, 1 tie, 1 loss: (1 + 1 + 0.5 + 0) / 4 = 0.625
    rate = win_rate_ci([1.0, 1.0, 0.5, 0.0])
    assert rate.rate == pytest.approx(0.625)
    assert (rate.wins, rate.ties, rate.losses) == (2, 1, 1)


def test_two_outcomes_interval_spans_the_resample_range() -> None:
    # Resamples of [1, 0] have means 0, 0.5 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5th and 97.5th percentiles of 1000 resamples are 0 and 1.
    rate = win_rate_ci([1.0, 0.0], n_resamples=1000, seed=0)
    assert rate.as_tuple() == (0.5, 0.0, 1.0)


def test_interval_matches_the_normal_approximation_for_a_known_mix() -> None:
    # 30 wins and 10 losses: rate 0.75, bootstrap sd ~ sqrt(0.75 * 0.25 / 40) = 0.0685, so the
    # 95% interval is about 0.75 -/+ 0.134 (percentiles move in steps of 1/40 = 0.025).
    rate = win_rate_ci([1.0] * 30 + [0.0] * 10, n_resamples=2000, seed=1)
    assert rate.rate == 0.75
    assert rate.low == pytest.approx(0.75 - 0.134, abs=0.03)
    assert rate.high == pytest.approx(0.75 + 0.134, abs=0.03)
    assert rate.low < rate.rate < rate.high


def test_bootstrap_is_reproducible_and_seed_dependent() -> None:
    outcomes = list(np.random.default_rng(5).choice([0.0, 0.5, 1.0], size=25))
    assert win_rate_ci(outcomes, seed=3) == win_rate_ci(outcomes, seed=3)
    intervals = {win_rate_ci(outcomes, n_resamples=200, seed=s).as_tuple() for s in range(5)}
    assert len(intervals) > 1


def test_wider_confidence_gives_a_wider_interval() -> None:
    outcomes = [1.0] * 12 + [0.5] * 5 + [0.0] * 8
    narrow = win_rate_ci(outcomes, confidence=0.5)
    wide = win_rate_ci(outcomes, confidence=0.99)
    assert wide.low <= narrow.low and narrow.high <= wide.high
    assert wide.high - wide.low > narrow.high - narrow.low


def test_outcome_from_scores() -> None:
    assert outcome_from_scores(2.0, 1.0) == 1.0
    assert outcome_from_scores(-3.0, 1.0) == 0.0
    assert outcome_from_scores(1.0, 1.0 + 1e-9) == 0.5
    assert outcome_from_scores(1.0, 1.1, eps=0.2) == 0.5


@pytest.mark.parametrize(
    ("outcomes", "kwargs"),
    [
        ([], {}),
        ([1.5], {}),
        ([-0.1], {}),
        ([1.0], {"n_resamples": 0}),
        ([1.0], {"confidence": 1.0}),
    ],
)
def test_bad_input_raises_a_typed_error(outcomes: list[float], kwargs: dict[str, float]) -> None:
    with pytest.raises(EvaluationError):
        win_rate_ci(outcomes, **kwargs)  # type: ignore[arg-type]
