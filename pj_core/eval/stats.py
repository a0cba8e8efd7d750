"""Win rates with ties and their bootstrap confidence intervals.

An *outcome* is the result of one comparison from the first method's point of view:
win = 1, tie = 0.5, loss = 0. The win rate is the mean outcome over prompts, so 0.5 means
"no better and no worse than the baseline".

The 95% interval is a percentile bootstrap over prompts: resample prompt ids with
replacement ``n_resamples`` times (fixed seed), take the win rate of each resample, and report
the 2.5th and 97.5th percentiles. Resampling prompts (not single judgments) keeps the
prompt-to-prompt variation, which is what a user's own prompts would show.

Example:
    >>> win_rate_ci([1.0, 1.0, 1.0]).as_tuple()
    (1.0, 1.0, 1.0)
    >>> round(win_rate_ci([1.0, 0.0, 0.5, 0.5]).rate, 3)
    0.5
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pj_core.errors import EvaluationError

WIN, TIE, LOSS = 1.0, 0.5, 0.0
DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class WinRate:
    """A win rate with its bootstrap confidence interval and outcome counts.

    Example:
        >>> WinRate(rate=0.75, low=0.5, high=1.0, n=2, wins=1, ties=1, losses=0).as_tuple()
        (0.75, 0.5, 1.0)
    """

    rate: float
    low: float
    high: float
    n: int
    wins: int
    ties: int
    losses: int

    def as_tuple(self) -> tuple[float, float, float]:
        """``(rate, low, high)``."""
        return (self.rate, self.low, self.high)


def outcome_from_scores(score_a: float, score_b: float, *, eps: float = 1e-6) -> float:
    """Outcome of A against B from two scores where higher is better; within ``eps`` is a tie.

    Example:
        >>> [outcome_from_scores(a, b) for a, b in ((2.0, 1.0), (1.0, 2.0), (1.0, 1.0))]
        [1.0, 0.0, 0.5]
    """
    if abs(score_a - score_b) <= eps:
        return TIE
    return WIN if score_a > score_b else LOSS


def win_rate_ci(
    outcomes: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> WinRate:
    """Mean outcome and its percentile-bootstrap interval over prompts.

    Args:
        outcomes: one outcome per prompt, each 1 (win), 0.5 (tie) or 0 (loss); a value in
            between (the mean of several judgments of one prompt) is allowed.
        n_resamples: bootstrap resamples B.
        confidence: the interval's coverage, e.g. 0.95.
        seed: seed of the resampling, so reports are reproducible.

    Raises:
        EvaluationError: no outcomes, an outcome outside [0, 1], or a bad
            ``n_resamples`` / ``confidence``.

    Example:
        >>> r = win_rate_ci([1.0, 0.0], n_resamples=1000, seed=0)
        >>> r.rate, r.low, r.high
        (0.5, 0.0, 1.0)
    """
    values = np.asarray(outcomes, dtype=np.float64)
    if values.size == 0:
        raise EvaluationError(
            "no outcomes to compute a win rate from: run the evaluation on at least one prompt"
        )
    if np.any((values < 0.0) | (values > 1.0)):
        raise EvaluationError("outcomes must lie in [0, 1] (win 1, tie 0.5, loss 0)")
    low, high = _bootstrap_interval(values, n_resamples, confidence, seed)
    return WinRate(
        rate=float(values.mean()),
        # Clip rounding noise so an all-win column prints exactly [1, 1].
        low=float(np.clip(low, 0.0, 1.0)),
        high=float(np.clip(high, 0.0, 1.0)),
        n=int(values.size),
        wins=int(np.sum(values == WIN)),
        ties=int(np.sum(values == TIE)),
        losses=int(np.sum(values == LOSS)),
    )


@dataclass(frozen=True)
class MeanCI:
    """A mean over prompts with its percentile-bootstrap confidence interval.

    Example:
        >>> MeanCI(mean=2.0, low=1.0, high=3.0, n=4).as_tuple()
        (2.0, 1.0, 3.0)
    """

    mean: float
    low: float
    high: float
    n: int

    def as_tuple(self) -> tuple[float, float, float]:
        """``(mean, low, high)``."""
        return (self.mean, self.low, self.high)


def mean_ci(
    values: Sequence[float],
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = DEFAULT_CONFIDENCE,
    seed: int = 0,
) -> MeanCI:
    """Mean of per-prompt values and its percentile-bootstrap interval over prompts (the
    resampling of :func:`win_rate_ci`, for any real values).

    Raises:
        EvaluationError: no values, a non-finite value, or a bad ``n_resamples`` /
            ``confidence``.

    Example:
        >>> mean_ci([1.0, 1.0]).as_tuple()
        (1.0, 1.0, 1.0)
        >>> r = mean_ci([0.0, 10.0], n_resamples=1000, seed=0)
        >>> r.mean, r.low, r.high
        (5.0, 0.0, 10.0)
    """
    data = np.asarray(values, dtype=np.float64)
    if data.size == 0:
        raise EvaluationError("no values to average: run on at least one prompt")
    if not np.all(np.isfinite(data)):
        raise EvaluationError("every value must be a finite number")
    low, high = _bootstrap_interval(data, n_resamples, confidence, seed)
    return MeanCI(mean=float(data.mean()), low=float(low), high=float(high), n=int(data.size))


def _bootstrap_interval(
    values: np.ndarray, n_resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    if n_resamples < 1:
        raise EvaluationError(f"n_resamples must be at least 1, got {n_resamples}")
    if not 0.0 < confidence < 1.0:
        raise EvaluationError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, values.size, size=(n_resamples, values.size))
    resampled = values[picks].mean(axis=1)
    tail = (1.0 - confidence) / 2.0 * 100.0
    low, high = np.percentile(resampled, [tail, 100.0 - tail])
    return float(low), float(high)
