"""The settings of one generation, validated up front with errors that say what to fix.

Example:
    >>> config = GenerationConfig.create(lookahead=4, temperature=0.7, stop=["\\n\\n"])
    >>> config.lookahead, config.stop
    (4, ('\\n\\n',))
    >>> GenerationConfig.create(top_p=0.0)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pj_core.errors.InvalidGenerationConfigError: top_p must be in (0, 1], got 0.0; ...
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from pj_core.errors import InvalidGenerationConfigError
from pj_core.sampling import filtered_probs

StrategyChoice = Literal["speculative", "lockstep", "auto"]
STRATEGIES: tuple[str, ...] = ("speculative", "lockstep", "auto")
# Past a few dozen tokens almost every round ends at a rejection long before the lookahead
# is used up, so a larger λ only wastes draft forwards; 64 is a generous sanity bound.
MAX_LOOKAHEAD = 64


@dataclass(frozen=True)
class GenerationConfig:
    """Validated generation settings (see :meth:`PersonaJudge.generate` for their meaning)."""

    lookahead: int
    alternate: bool
    strategy: StrategyChoice
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int | None
    stop: tuple[str, ...]

    @classmethod
    def create(
        cls,
        *,
        lookahead: int = 4,
        alternate: bool = True,
        strategy: str = "speculative",
        max_new_tokens: int = 128,
        temperature: float = 0.7,
        top_k: int = 20,
        top_p: float = 0.9,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
    ) -> GenerationConfig:
        """Check every argument and build the config.

        Raises:
            InvalidGenerationConfigError: an argument is out of range or of the wrong type.
        """
        _check_int("lookahead", lookahead, low=1, high=MAX_LOOKAHEAD, hint="4 is a good default")
        if not isinstance(alternate, bool):
            raise InvalidGenerationConfigError(
                f"alternate must be True or False, got {alternate!r}"
            )
        if strategy not in STRATEGIES:
            raise InvalidGenerationConfigError(
                f"strategy must be one of {', '.join(STRATEGIES)}; got {strategy!r}"
            )
        _check_int("max_new_tokens", max_new_tokens, low=1, high=None, hint="e.g. 128")
        if not _is_real(temperature) or not math.isfinite(temperature) or temperature < 0:
            raise InvalidGenerationConfigError(
                f"temperature must be a finite number >= 0, got {temperature!r}; "
                "0 means greedy, 0.7 is a good default"
            )
        _check_int("top_k", top_k, low=0, high=None, hint="0 switches top-k off")
        if not _is_real(top_p) or not 0.0 < top_p <= 1.0:
            raise InvalidGenerationConfigError(
                f"top_p must be in (0, 1], got {top_p!r}; use 1.0 to switch nucleus filtering off"
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidGenerationConfigError(f"seed must be an int or None, got {seed!r}")
        stops = _check_stop(stop)
        return cls(
            lookahead=lookahead,
            alternate=alternate,
            strategy=strategy,  # type: ignore[arg-type]  # checked against STRATEGIES above
            max_new_tokens=max_new_tokens,
            temperature=float(temperature),
            top_k=top_k,
            top_p=float(top_p),
            seed=seed,
            stop=stops,
        )

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The filtered distribution(s) for these settings (identical for draft and judge)."""
        return filtered_probs(
            logits, temperature=self.temperature, top_k=self.top_k, top_p=self.top_p
        )


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value: object, *, low: int, high: int | None, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidGenerationConfigError(f"{name} must be an integer, got {value!r} ({hint})")
    if value < low or (high is not None and value > high):
        allowed = f">= {low}" if high is None else f"between {low} and {high}"
        raise InvalidGenerationConfigError(f"{name} must be {allowed}, got {value} ({hint})")


def _check_stop(stop: Sequence[str] | None) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        raise InvalidGenerationConfigError(
            f"stop must be a list of strings, e.g. stop=[{stop!r}], not a bare string"
        )
    items = tuple(stop)
    for item in items:
        if not isinstance(item, str) or not item:
            raise InvalidGenerationConfigError(
                f"every stop string must be a non-empty str, got {item!r}"
            )
    return items
