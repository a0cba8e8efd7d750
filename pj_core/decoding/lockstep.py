"""The lockstep strategy: every persona context in one batch, one forward per emitted token.

Each step appends the last emitted token to every row and gives every persona's next-token
distribution at once. The rounds of the speculative strategy are *simulated* token by token:
at position i of a round the draft's token is drawn from its row (q) with the round's i-th
draft uniform and tested against the judge's row (p) with the i-th acceptance uniform; a
rejection draws from the residual, a fully accepted lookahead draws a bonus from p. Because a
speculative draft only ever builds on accepted tokens (which lockstep has emitted too), and the
round's uniforms are drawn in the same layout, both strategies emit the same tokens for the
same seed, up to floating-point differences between batched and single-row forwards.

Lockstep wins when a batch-of-k step costs about as much as a single-row step (GPUs), or when
the personas disagree so often that speculative drafts are mostly thrown away.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from typing import Protocol

import torch

from pj_core.backends.protocol import Backend
from pj_core.decoding.generation_config import GenerationConfig
from pj_core.decoding.logits import LogitPipeline, Position
from pj_core.decoding.rounds import (
    Counters,
    Emission,
    bonus_token,
    draw_round,
    judge_draft_token,
    round_roles,
)
from pj_core.decoding.sampling import sample_index


class StepContexts(Protocol):
    """What the lockstep loop needs of its persona rows: the stepping part of
    :class:`pj_core.backends.protocol.Rows` (a batch's per-request view has only this)."""

    @property
    def forward_passes(self) -> int:
        """Forwards run for these rows so far."""
        ...

    def step(self, tokens: Sequence[int]) -> torch.Tensor:
        """Append one token to every row; return each row's next-token logits."""
        ...


def lockstep_emissions(
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
    """Yield the emitted tokens one by one until EOS or ``config.max_new_tokens``.

    Same contract and same output as
    :func:`pj_core.decoding.speculative.speculative_emissions`.

    ``contexts`` holds the persona rows (and the neutral row last, if any), already prefilled
    with every prompt but its last token; by default ``backend`` makes rows of this call alone
    (``layout="batched"``). :mod:`pj_core.batch` passes rows of one batch shared by many
    requests instead.
    ``pipeline`` turns logits into p and q (default: ``config``'s filters, no transforms).
    ``neutral`` is the neutral row's prompt (the conversation with no persona text), when the
    call guides its personas (``config.strength > 0``): it becomes one more row of the batch,
    stepped with the persona rows, and every position carries its logits
    (:attr:`pj_core.decoding.logits.Position.neutral`).
    """
    pipeline = pipeline or LogitPipeline(config)
    rows = [*prompts, neutral] if neutral is not None else list(prompts)
    k = len(prompts)  # persona rows 0..k-1; the neutral row, if any, is row k
    started = time.perf_counter()
    if contexts is None:
        contexts = backend.rows([row[:-1] for row in rows], layout="batched")
    counters.prefill_seconds += time.perf_counter() - started
    next_inputs = [row[-1] for row in rows]
    answer: list[int] = []  # the tokens emitted so far
    round_index = 0
    lookahead = config.lookahead
    try:
        while len(answer) < config.max_new_tokens:
            roles = round_roles(round_index, n_personas=len(prompts), alternate=config.alternate)
            draws = draw_round(generator, lookahead)
            counters.rounds += 1
            # The speculative draft drafts at most what the budget has left.
            draft_length = min(lookahead, config.max_new_tokens - len(answer))
            before = tuple(answer)
            round_tokens: tuple[int, ...] = ()  # the round's tokens so far (accepted drafts)
            position = 0
            while True:
                logits = contexts.step(next_inputs)  # [rows, vocab]
                neutral_logits = logits[k] if neutral is not None else None  # [vocab]
                q = pipeline.probs(
                    logits[roles.draft],
                    [
                        Position(
                            roles.draft, "draft", round_index, before, round_tokens, neutral_logits
                        )
                    ],
                )
                p = pipeline.probs(
                    logits[roles.judge],
                    [
                        Position(
                            roles.judge, "judge", round_index, before, round_tokens, neutral_logits
                        )
                    ],
                )
                if position < draft_length:
                    drafted = sample_index(q, draws.draft[position])
                    token, outcome = judge_draft_token(p, q, drafted, draws, position)
                else:  # the whole lookahead passed
                    token, outcome = bonus_token(p, draws), "bonus"
                counters.record(outcome)
                answer.append(token)
                round_tokens += (token,)
                yield Emission(token, round_index, roles, outcome)
                if token in eos_ids or len(answer) >= config.max_new_tokens:
                    return
                next_inputs = [token] * len(rows)
                if outcome != "accepted":
                    break
                position += 1
            round_index += 1
    finally:
        counters.forward_passes += contexts.forward_passes
