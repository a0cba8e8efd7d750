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

from collections.abc import Sequence
from dataclasses import dataclass, fields

from pj_core.errors import InvalidGenerationConfigError
from pj_core.settings import DEFAULTS, DecoderName, Settings, StrategyChoice, check_settings

SEED_LIMIT = 2**32
"""Seeds are ``0 <= seed < SEED_LIMIT``: torch's CPU generator keeps 32 bits of a seed, so
seeds equal modulo 2**32 would sample alike."""


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
    strength: float
    decoder: DecoderName
    seed: int | None
    stop: tuple[str, ...]

    @classmethod
    def create(
        cls,
        *,
        lookahead: int | None = None,
        alternate: bool | None = None,
        strategy: str | None = None,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        strength: float | None = None,
        decoder: str | None = None,
        seed: int | None = None,
        stop: Sequence[str] | None = None,
        defaults: Settings = DEFAULTS,
    ) -> GenerationConfig:
        """Check every argument and build the config; ``None`` takes the value from
        ``defaults`` (:data:`pj_core.settings.DEFAULTS` unless the engine has its own).

        Raises:
            InvalidGenerationConfigError: an argument is out of range or of the wrong type.
        """
        values = defaults.merged(
            lookahead=lookahead,
            alternate=alternate,
            strategy=strategy,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            strength=strength,
            decoder=decoder,
        )
        check_settings(values)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidGenerationConfigError(f"seed must be an int or None, got {seed!r}")
        if seed is not None and not 0 <= seed < SEED_LIMIT:
            raise InvalidGenerationConfigError(
                f"seed must be in 0..{SEED_LIMIT - 1}, got {seed}: torch's generator keeps 32 "
                "bits of a seed, so larger seeds would repeat smaller ones' samples"
            )
        return cls(
            lookahead=values["lookahead"],
            alternate=values["alternate"],
            strategy=values["strategy"],
            max_new_tokens=values["max_new_tokens"],
            temperature=float(values["temperature"]),
            top_k=values["top_k"],
            top_p=float(values["top_p"]),
            strength=float(values["strength"]),
            decoder=values["decoder"],
            seed=seed,
            stop=_check_stop(stop),
        )


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


SETTING_NAMES: frozenset[str] = frozenset(f.name for f in fields(GenerationConfig))
"""The keyword arguments of :meth:`GenerationConfig.create` besides ``defaults``: what
``generate_from_ids(**settings)`` accepts."""
