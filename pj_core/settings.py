"""The generation defaults and their valid ranges, defined once.

Every entry point (``PersonaJudge.generate``/``stream``/``generate_batch``, ``BatchRequest``,
the ``pj`` CLI, saved profile defaults, the LangChain and LlamaIndex adapters) leaves a setting
it was not given at ``None`` and reads the value from :data:`DEFAULTS`; every one of them
checks values with :func:`check_settings`. So a default or a range cannot drift apart between
them. This module imports nothing heavy (no torch), so profiles and the CLI can use it freely.

The evaluation harness keeps one deliberate difference, :data:`EVAL_MAX_NEW_TOKENS`: shorter
answers make a 40-prompt run affordable on a CPU, and the value is part of a results file's
resume fingerprint.

Example:
    >>> DEFAULTS.lookahead, DEFAULTS.temperature, DEFAULTS.max_new_tokens
    (4, 0.7, 128)
    >>> DEFAULTS.merged(temperature=0.0, top_k=None)["temperature"], DEFAULTS.top_k
    (0.0, 20)
    >>> check_settings({"top_p": 0.0})  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pj_core.errors.InvalidGenerationConfigError: top_p must be in (0, 1], got 0.0; ...
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeGuard

from pj_core.errors import InvalidGenerationConfigError

StrategyChoice = Literal["speculative", "lockstep", "auto"]
"""A decoding strategy as callers name it ("auto" resolves to one of the other two)."""

STRATEGIES: tuple[str, ...] = ("speculative", "lockstep", "auto")

DecoderName = Literal["persona-judge", "pool"]
"""How tokens are chosen: Persona-judge rounds, or the pool of every persona
(:mod:`pj_core.decoding.pool`)."""

DECODERS: tuple[str, ...] = ("persona-judge", "pool")

# Past a few dozen tokens almost every round ends at a rejection long before the lookahead
# is used up, so a larger λ only wastes draft forwards; 64 is a generous sanity bound.
MAX_LOOKAHEAD = 64

EVAL_MAX_NEW_TOKENS = 64
"""The evaluation harness's answer budget (``pj eval``), shorter than :data:`DEFAULTS`'."""


@dataclass(frozen=True)
class Settings:
    """Default values of the generation settings (see ``PersonaJudge.generate``).

    Attributes:
        lookahead: λ, tokens the draft persona proposes per round (1 to :data:`MAX_LOOKAHEAD`).
        alternate: swap draft and judge every round (False: Persona-judge-Base).
        strategy: how rounds run: "speculative", "lockstep" or "auto".
        max_new_tokens: the most tokens one answer may have (>= 1).
        temperature: sampling temperature (finite, >= 0; 0 is greedy).
        top_k: keep the k most likely tokens (>= 0; 0 switches it off).
        top_p: nucleus filtering mass in (0, 1] (1.0 switches it off).
        strength: γ, how strongly the personas' preferences act (finite, >= 0; 0 is the paper
            exactly): each persona row's logits l become l + γ (l - l_neutral), where
            l_neutral comes from the same conversation with no persona text
            (:mod:`pj_core.decoding.guidance`).
        decoder: "persona-judge" (rounds of draft and judge, the paper) or "pool" (every
            token from the log-linear pool of all personas, :mod:`pj_core.decoding.pool`).
    """

    lookahead: int = 4
    alternate: bool = True
    strategy: StrategyChoice = "speculative"
    max_new_tokens: int = 128
    temperature: float = 0.7
    top_k: int = 20
    top_p: float = 0.9
    # Chosen by the separation sweep and the factual probe (docs/evaluation.md,
    # benchmarks/separation_runs.sh, benchmarks/factual_probe.py) on SmolLM2: the pool at
    # strength 0.5 moved two opposite users' answers apart on length five times as far as one
    # system prompt, with its fluency, and kept simple facts as often (0.75 vs 0.77). Higher
    # strengths separated more but lost facts (0.56 at 1.5). The paper's decoding is
    # decoder="persona-judge", strength=0 (PAPER below).
    strength: float = 0.5
    decoder: DecoderName = "pool"

    def merged(self, **given: Any) -> dict[str, Any]:
        """These defaults with every ``given`` value that is not ``None`` laid over them.

        Keys that are not settings (``seed``, ``stop``, ...) pass through, ``None`` or not.
        """
        values: dict[str, Any] = dataclasses.asdict(self)
        for name, value in given.items():
            if value is not None or name not in values:
                values[name] = value
        return values


DEFAULTS = Settings()
"""The defaults every entry point falls back to."""

PAPER = dataclasses.replace(DEFAULTS, strength=0.0, decoder="persona-judge")
"""The paper's decoding exactly (Persona-judge rounds, no strength), for an engine that should
default to it: ``PersonaJudge(model, tokenizer, defaults=PAPER)``."""

SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))


def check_settings(values: Mapping[str, Any]) -> None:
    """Check every setting in ``values`` that is not ``None``; other keys are ignored.

    Raises:
        InvalidGenerationConfigError: a value is out of range or of the wrong type; the
            message says what is allowed.
    """
    for name, value in values.items():
        if value is None or name not in _CHECKS:
            continue
        _CHECKS[name](value)


def _check_lookahead(value: object) -> None:
    _check_int("lookahead", value, low=1, high=MAX_LOOKAHEAD, hint="4 is a good default")


def _check_alternate(value: object) -> None:
    if not isinstance(value, bool):
        raise InvalidGenerationConfigError(f"alternate must be True or False, got {value!r}")


def _check_strategy(value: object) -> None:
    if value not in STRATEGIES:
        raise InvalidGenerationConfigError(
            f"strategy must be one of {', '.join(STRATEGIES)}; got {value!r}"
        )


def _check_max_new_tokens(value: object) -> None:
    _check_int("max_new_tokens", value, low=1, high=None, hint="e.g. 128")


def _check_temperature(value: object) -> None:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise InvalidGenerationConfigError(
            f"temperature must be a finite number >= 0, got {value!r}; "
            "0 means greedy, 0.7 is a good default"
        )


def _check_top_k(value: object) -> None:
    _check_int("top_k", value, low=0, high=None, hint="0 switches top-k off")


def _check_top_p(value: object) -> None:
    if not _is_real(value) or not 0.0 < value <= 1.0:
        raise InvalidGenerationConfigError(
            f"top_p must be in (0, 1], got {value!r}; use 1.0 to switch nucleus filtering off"
        )


def _check_strength(value: object) -> None:
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise InvalidGenerationConfigError(
            f"strength must be a finite number >= 0, got {value!r}; 0 is plain Persona-judge, "
            "1 to 2 follows the preferences more strongly (higher values can break the text)"
        )


def _check_decoder(value: object) -> None:
    if value not in DECODERS:
        raise InvalidGenerationConfigError(
            f"decoder must be one of {', '.join(DECODERS)}; got {value!r}"
        )


_CHECKS = {
    "lookahead": _check_lookahead,
    "alternate": _check_alternate,
    "strategy": _check_strategy,
    "max_new_tokens": _check_max_new_tokens,
    "temperature": _check_temperature,
    "top_k": _check_top_k,
    "top_p": _check_top_p,
    "strength": _check_strength,
    "decoder": _check_decoder,
}


def _is_real(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_int(name: str, value: object, *, low: int, high: int | None, hint: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidGenerationConfigError(f"{name} must be an integer, got {value!r} ({hint})")
    if value < low:
        upper = "" if high is None else f" (and at most {high})"
        raise InvalidGenerationConfigError(
            f"{name} must be at least {low}{upper}, got {value} ({hint})"
        )
    if high is not None and value > high:
        raise InvalidGenerationConfigError(f"{name} must be at most {high}, got {value} ({hint})")
