"""Settings of one evaluation run.

Example:
    >>> config = EvalConfig(limit=2, max_new_tokens=16)
    >>> config.dimensions
    ('humor', 'harmless', 'vivid')
    >>> "limit" in config.fingerprint()   # more prompts may be added to a run later
    False
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any

from pj_core.errors import EvaluationError
from pj_core.settings import DEFAULTS, EVAL_MAX_NEW_TOKENS

JUDGE_NAMES: tuple[str, ...] = ("pairwise", "reward", "embedding", "objective", "fluency")
"""Every judge ``pj eval`` knows (see :mod:`pj_core.eval.objective` for the last two)."""
DEFAULT_JUDGES: tuple[str, ...] = ("pairwise", "reward", "embedding")
"""The judges of a run that names none: the model judges of the default dimensions (humour,
harmlessness, vividness have no objective proxy). Add ``objective,fluency`` for the concise,
elementary, expert, friendly, ... axes."""

# Settings that do not change what any record means: a rerun may change them freely (more
# prompts, other judges or methods added, another number of bootstrap resamples).
_NOT_FINGERPRINTED = frozenset({"limit", "methods", "judges", "bootstrap", "reward_batch_size"})


@dataclass(frozen=True)
class EvalConfig:
    """Everything that decides an evaluation's records.

    Attributes:
        prompts: ``"sample"`` (the shipped Koala sample) or a .jsonl/.json prompt file.
        limit: evaluate the first ``limit`` prompts (``None``: all).
        max_prompt_chars: skip longer prompts.
        dimensions: catalog preferences that form the user's preference set; each is also a
            judged dimension.
        methods: methods to run (see :func:`pj_core.eval.methods.plan_methods`); ``None``: all.
        generator: model spec of the generator.
        k, one_per_preference: how the Persona-judge prefixes are composed.
        lookahead, strategy, max_new_tokens, temperature, top_k, top_p: generation settings,
            the same for every method.
        seed: base seed; each prompt's seed derives from it and the prompt id, and every
            method uses that prompt's seed.
        judges: which judges run, from :data:`JUDGE_NAMES` (default :data:`DEFAULT_JUDGES`).
        judge_model: model spec of the pairwise judge.
        reward_model: model spec of the implicit-reward scorer.
        tie_margin: the pairwise judge's tie band (see :mod:`pj_core.eval.judges`).
        bootstrap: bootstrap resamples for the confidence intervals.
        reward_batch_size: sequences per forward of the reward scorer.
    """

    prompts: str = "sample"
    limit: int | None = 40
    max_prompt_chars: int | None = None
    dimensions: tuple[str, ...] = ("humor", "harmless", "vivid")
    methods: tuple[str, ...] | None = None
    generator: str = "smollm2-135m-instruct"
    k: int = 2
    one_per_preference: bool = False
    lookahead: int = DEFAULTS.lookahead
    strategy: str = DEFAULTS.strategy
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS
    temperature: float = DEFAULTS.temperature
    top_k: int = DEFAULTS.top_k
    top_p: float = DEFAULTS.top_p
    seed: int = 0
    judges: tuple[str, ...] = DEFAULT_JUDGES
    judge_model: str = "smollm2-135m-instruct"
    reward_model: str = "gemma3-270m"
    tie_margin: float = 0.05
    bootstrap: int = 2000
    reward_batch_size: int = 4

    def __post_init__(self) -> None:
        unknown = [j for j in self.judges if j not in JUDGE_NAMES]
        if unknown:
            raise EvaluationError(
                f"unknown judge(s) {unknown}: choose from {', '.join(JUDGE_NAMES)}"
            )
        if self.max_new_tokens < 1:
            raise EvaluationError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.bootstrap < 1:
            raise EvaluationError(f"bootstrap must be at least 1, got {self.bootstrap}")

    def fingerprint(self) -> dict[str, Any]:
        """The settings a results file must share with this run to be resumed by it."""
        return {
            f.name: _jsonable(getattr(self, f.name))
            for f in fields(self)
            if f.name not in _NOT_FINGERPRINTED
        }

    def as_dict(self) -> dict[str, Any]:
        """All settings, JSON-ready."""
        return {name: _jsonable(value) for name, value in asdict(self).items()}

    def prompt_seed(self, prompt_id: str) -> int:
        """The seed of every method's answer to one prompt (stable across runs and limits).

        Example:
            >>> config = EvalConfig(seed=0)
            >>> config.prompt_seed("koala_0") == config.prompt_seed("koala_0")
            True
        """
        return prompt_seed(self.seed, prompt_id)


def prompt_seed(base_seed: int, prompt_id: str) -> int:
    """The seed of every answer to one prompt, from a run's base seed and the prompt id:
    stable across runs and prompt limits, shared by ``pj eval`` and ``pj eval separation``.

    Example:
        >>> prompt_seed(0, "koala_0") == prompt_seed(0, "koala_0") != prompt_seed(1, "koala_0")
        True
    """
    return (base_seed * 1_000_003 + zlib.crc32(prompt_id.encode("utf-8"))) % (2**31)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
