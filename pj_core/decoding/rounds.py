"""The round structure shared by both strategies: roles, random draws, decisions, counters.

A round has a draft persona and a judge persona. With ``alternate=True`` round ``r`` has
draft ``r % k`` and judge ``(r + 1) % k`` (k personas take turns round-robin; for k = 2 the
two simply swap every round). With ``alternate=False`` (Persona-judge-Base) persona 0 always
drafts and persona 1 always judges, which is only defined for exactly two personas.

Each round consumes ``2 * lookahead + 1`` uniform numbers from the call's
``torch.Generator``, whatever happens in it: λ for drafting (inverse CDF), λ for the
acceptance tests and one for the residual or bonus token. This fixed layout is what makes the
speculative and lockstep strategies emit identical tokens for the same seed.

Example:
    >>> [round_roles(r, n_personas=3, alternate=True) for r in range(3)]
    [RoundRoles(draft=0, judge=1), RoundRoles(draft=1, judge=2), RoundRoles(draft=2, judge=0)]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pj_core.decoding.sampling import accepts, residual, sample_index
from pj_core.results import Outcome


@dataclass(frozen=True)
class RoundRoles:
    """Indices (into the persona list) of a round's draft and judge personas."""

    draft: int
    judge: int


def round_roles(round_index: int, *, n_personas: int, alternate: bool) -> RoundRoles:
    """The draft and judge personas of round ``round_index``.

    Example:
        >>> round_roles(1, n_personas=2, alternate=False)
        RoundRoles(draft=0, judge=1)
    """
    if not alternate:
        return RoundRoles(draft=0, judge=1)
    return RoundRoles(draft=round_index % n_personas, judge=(round_index + 1) % n_personas)


@dataclass(frozen=True)
class RoundDraws:
    """The uniform numbers of one round, drawn before anything else happens in it."""

    draft: tuple[float, ...]  # position i: inverse-CDF draw of the i-th draft token
    accept: tuple[float, ...]  # position i: the judge's acceptance test of that token
    final: float  # the residual token after a rejection, or the bonus token


def draw_round(generator: torch.Generator, lookahead: int) -> RoundDraws:
    """Draw one round's ``2 * lookahead + 1`` uniforms from ``generator`` (float64, CPU)."""
    values = torch.rand(2 * lookahead + 1, generator=generator, dtype=torch.float64).tolist()
    return RoundDraws(
        draft=tuple(values[:lookahead]),
        accept=tuple(values[lookahead : 2 * lookahead]),
        final=values[-1],
    )


def judge_draft_token(
    p: torch.Tensor, q: torch.Tensor, token: int, draws: RoundDraws, position: int
) -> tuple[int, Outcome]:
    """The judge's decision on the draft token at ``position``: keep it or replace it.

    Returns the emitted token and its outcome ("accepted" or "resampled").
    """
    if accepts(p, q, token, draws.accept[position]):
        return token, "accepted"
    return sample_index(residual(p, q), draws.final), "resampled"


def bonus_token(p: torch.Tensor, draws: RoundDraws) -> int:
    """The token drawn from the judge after the whole lookahead was accepted."""
    return sample_index(p, draws.final)


@dataclass(frozen=True)
class Emission:
    """One emitted token as a strategy reports it to the engine."""

    token_id: int
    round: int
    roles: RoundRoles
    outcome: Outcome


@dataclass
class Counters:
    """Mutable per-call counts a strategy updates while it runs (never shared across calls)."""

    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    resampled: int = 0
    bonus: int = 0
    forward_passes: int = 0
    prefill_seconds: float = 0.0

    def record(self, outcome: Outcome) -> None:
        """Count one emitted token's outcome."""
        if outcome == "accepted":
            self.drafted += 1
            self.accepted += 1
        elif outcome == "resampled":
            self.drafted += 1
            self.resampled += 1
        elif outcome == "bonus":
            self.bonus += 1
        # "pooled" (the pool decoder) drafts nothing: only the token count records it.
