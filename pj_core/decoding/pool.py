"""The ``pool`` decoder: every persona acts on every token (not Persona-judge).

Persona-judge lets one persona judge each round, so a preference carried by one prefix only
acts on the rounds that prefix judges. The pool decoder instead samples each token from the
*log-linear pool* of all persona rows:

    log p_pool(t) = Σ_i w_i log p_i(t) - log Z,   Σ_i w_i = 1, w_i > 0 (uniform by default)

where p_i is persona i's distribution after the call's logit transforms (the persona
strength among them, :mod:`pj_core.decoding.guidance`), and temperature, top-k and top-p then filter
p_pool like any distribution. All rows (and the neutral row, if the call is guided) advance in
one batched forward per token, as in the lockstep strategy, so every step has every row's
logits and the output follows p_pool exactly. One uniform per token comes from the call's
generator; every token is traced with the outcome ``"pooled"``.

Example:
    >>> import torch
    >>> from pj_core.decoding.generation_config import GenerationConfig
    >>> from pj_core.decoding.rounds import Counters
    >>> from pj_core.backends.hf.backend import HFBackend
    >>> from tests._tiny import make_tiny_model
    >>> config = GenerationConfig.create(decoder="pool", max_new_tokens=3)
    >>> emissions = pool_emissions(
    ...     HFBackend(make_tiny_model(vocab_size=22)), [[2, 5, 6], [2, 7]], config,
    ...     eos_ids=frozenset(), generator=torch.Generator().manual_seed(0), counters=Counters())
    >>> [e.outcome for e in emissions]
    ['pooled', 'pooled', 'pooled']
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence

import torch

from pj_core.backends.protocol import Backend
from pj_core.decoding.generation_config import GenerationConfig
from pj_core.decoding.lockstep import StepContexts
from pj_core.decoding.logits import LogitPipeline, Position
from pj_core.decoding.rounds import Counters, Emission, RoundRoles
from pj_core.decoding.sampling import sample_index


def pooled_logits(guided: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_i w_i log_softmax(guided_i): the pool's unnormalised log-probabilities.

    Args:
        guided: ``[personas, vocab]`` transformed logits, one row per persona.
        weights: ``[personas]``, positive, summing to 1.

    Returns:
        ``[vocab]``; -inf where any persona gives a token no probability.

    Example:
        >>> rows = torch.log(torch.tensor([[0.5, 0.5, 0.0], [0.9, 0.1, 0.0]]))
        >>> torch.softmax(pooled_logits(rows, torch.tensor([0.5, 0.5])), -1)
        tensor([0.7500, 0.2500, 0.0000])
    """
    log_probs = torch.log_softmax(guided.float(), dim=-1)  # [personas, vocab]
    # w_i * -inf stays -inf for w_i > 0; never multiply an -inf by 0 (nan).
    return (log_probs * weights.unsqueeze(-1).to(log_probs.dtype)).sum(dim=0)


def pool_emissions(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    eos_ids: frozenset[int],
    generator: torch.Generator,
    counters: Counters,
    contexts: StepContexts | None = None,
    pipeline: LogitPipeline | None = None,
    neutral: Sequence[int] | None = None,
) -> Generator[Emission, None, None]:
    """Yield tokens sampled from the pool of every persona, until EOS or the budget.

    Same signature as :func:`pj_core.decoding.lockstep.lockstep_emissions` (``contexts`` holds the
    persona rows and then the neutral row, prefilled with every prompt but its last token).
    """
    pipeline = pipeline or LogitPipeline(config)
    k = len(prompts)  # persona rows 0..k-1; the neutral row, if any, is row k
    rows = [*prompts, neutral] if neutral is not None else list(prompts)
    weights = torch.full((k,), 1.0 / k)  # [personas], uniform
    started = time.perf_counter()
    if contexts is None:
        contexts = backend.rows([row[:-1] for row in rows], layout="batched")
    counters.prefill_seconds += time.perf_counter() - started
    next_inputs = [row[-1] for row in rows]
    answer: list[int] = []
    roles = RoundRoles(draft=0, judge=0)  # no roles: every persona acts on every token
    try:
        while len(answer) < config.max_new_tokens:
            step = len(answer)
            logits = contexts.step(next_inputs)  # [rows, vocab]
            neutral_logits = logits[k] if neutral is not None else None  # [vocab]
            at = [Position(i, "judge", step, tuple(answer), (), neutral_logits) for i in range(k)]
            guided = pipeline.transformed(logits[:k], at)  # [personas, vocab]
            probs = pipeline.filtered(pooled_logits(guided, weights))  # [vocab]
            u = float(torch.rand(1, generator=generator, dtype=torch.float64))
            token = sample_index(probs, u)
            counters.rounds += 1
            counters.record("pooled")
            answer.append(token)
            yield Emission(token, step, roles, "pooled")
            if token in eos_ids:
                return
            next_inputs = [token] * len(rows)
    finally:
        counters.forward_passes += contexts.forward_passes
