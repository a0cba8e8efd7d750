"""The real models behind an evaluation: the generator engine and the judges.

Each is created on first use, so resuming a finished run loads nothing, and a run that only
lacks judgments never loads the generator. Models come from
:func:`pj_core.backends.hf.models.load_model`
(packaged weights, no hub); the same spec shares one copy of the weights in a process, so a
SmolLM2 generator and a SmolLM2 pairwise judge cost one model.

Example (needs the packaged models):
    >>> from pj_core.eval.config import EvalConfig
    >>> backends = default_backends(EvalConfig())  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import asdict
from functools import cache
from typing import TYPE_CHECKING, Any

from pj_core.eval.config import EvalConfig
from pj_core.eval.embedding import EmbeddingJudge
from pj_core.eval.judges import PairwiseJudge, PointwiseJudge
from pj_core.eval.methods import Method
from pj_core.eval.objective import FluencyScorer, ObjectiveJudge
from pj_core.eval.reward import ImplicitRewardJudge
from pj_core.eval.runner import Backends, GeneratedAnswer, GenerateFn

if TYPE_CHECKING:
    from pj_core.engine import PersonaJudge
    from pj_core.results import GenerationResult


def result_stats(result: GenerationResult) -> dict[str, Any]:
    """The engine's statistics of one answer, JSON-ready, with the acceptance rate."""
    stats = asdict(result.stats)
    stats["acceptance_rate"] = result.stats.acceptance_rate
    stats["prompt_tokens"] = result.prompt_tokens
    return stats


def engine_generate_fn(engine: PersonaJudge, config: EvalConfig) -> GenerateFn:
    """Answer with ``engine`` and the run's shared sampling settings. Every method of
    ``pj eval`` is the paper's (Persona-judge rounds, strength 0, whatever the engine's
    defaults), so its results keep their meaning when the shipped defaults change."""

    def generate(prompt: str, method: Method, seed: int) -> GeneratedAnswer:
        result = engine.generate(
            prompt,
            list(method.personas),
            decoder="persona-judge",
            strength=0.0,
            lookahead=config.lookahead,
            alternate=method.alternate,
            strategy=config.strategy,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            seed=seed,
        )
        return GeneratedAnswer(result.text, result.finish_reason, result_stats(result))

    return generate


def default_backends(config: EvalConfig) -> Backends:
    """Backends that load the configured models on first use."""

    @cache
    def engine() -> PersonaJudge:
        from pj_core.engine import PersonaJudge

        return PersonaJudge.from_pretrained(config.generator)

    def generate(prompt: str, method: Method, seed: int) -> GeneratedAnswer:
        return engine_generate_fn(engine(), config)(prompt, method, seed)

    def pairwise() -> PairwiseJudge:
        from pj_core.backends.hf.models import load_model

        loaded = load_model(config.judge_model)
        return PairwiseJudge.from_model(
            loaded.model, loaded.tokenizer, tie_margin=config.tie_margin
        )

    def reward() -> PointwiseJudge:
        from pj_core.backends.hf.models import load_model

        loaded = load_model(config.reward_model)
        return ImplicitRewardJudge(
            loaded.model, loaded.tokenizer, batch_size=config.reward_batch_size
        )

    def embedding() -> PointwiseJudge:
        return EmbeddingJudge.from_minilm()

    def fluency() -> FluencyScorer:
        # The generator's own model, with no persona: shares the engine's weights.
        return FluencyScorer(engine().model, engine().tokenizer)

    return Backends(
        generate=generate,
        pairwise=pairwise,
        pointwise={"reward": reward, "embedding": embedding, "objective": ObjectiveJudge},
        fluency=fluency,
    )
