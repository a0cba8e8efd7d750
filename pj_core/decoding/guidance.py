"""Persona strength: guidance of each persona row against a neutral row.

Terms:
    l: a persona row's raw next-token logits (``[vocab]``) at some answer prefix.
    l_neutral: the *neutral row*'s logits at the same answer prefix: the same conversation
        rendered with no persona text (or with the call's ``neutral_system`` text).
    γ (``strength``): how far the row moves away from the neutral row, >= 0.

The guided logits are

    l_γ = l + γ (l - l_neutral)

(classifier-free guidance with scale 1 + γ). γ = 0 is Persona-judge exactly; γ > 0 amplifies
what each persona prefix changes about the next token, i.e. its preferences. :class:`Strength`
is a :class:`pj_core.decoding.logits.LogitTransform`: the engine puts it first in the call's logit
pipeline, so it acts on raw logits, before any other transform and before temperature, top-k
and top-p, and it guides q and p alike. Speculative sampling stays exact for any q, so each
round still follows the judge's *guided* distribution exactly; guiding q too keeps the draft
close to the judge (a higher acceptance rate).

Example:
    >>> import torch
    >>> from pj_core.decoding.logits import Position
    >>> at = Position(0, "judge", 0, (), (), neutral=torch.tensor([1.0, 1.0, 0.0]))
    >>> Strength(2.0)(torch.tensor([2.0, 1.0, 0.0]), at)
    tensor([4., 1., 0.])
"""

from __future__ import annotations

import torch

from pj_core.decoding.logits import LogitTransform, Position
from pj_core.errors import InvalidGenerationConfigError
from pj_core.settings import check_settings


class Strength(LogitTransform):
    """``l + γ (l - l_neutral)`` at every position (see the module docstring).

    Args:
        gamma: γ, finite and >= 0.

    Raises:
        InvalidGenerationConfigError: γ is negative or not finite; or, when applied, the
            position carries no neutral logits (the call was decoded without a neutral row).
    """

    def __init__(self, gamma: float) -> None:
        check_settings({"strength": gamma})  # the engine's own range, one check for both
        self.gamma = float(gamma)

    def __call__(self, logits: torch.Tensor, position: Position) -> torch.Tensor:
        neutral = position.neutral
        if self.gamma == 0.0:
            return logits  # the paper exactly (and no 0 * inf where a mask left -inf)
        if neutral is None:
            raise InvalidGenerationConfigError(
                "the strength transform needs the neutral row's logits, and this call has no "
                "neutral row; set strength on the call (generate(..., strength=1.0)) instead of "
                "adding Strength to logit_transforms"
            )
        # l, l_neutral: [vocab]; -inf in l (a mask) stays -inf, since (1 + γ)(-inf) - γ l_n.
        return logits + self.gamma * (logits - neutral.to(logits.dtype))
