"""The speculative strategy: rounds of draft (λ single-token forwards) and judge (one forward).

Each persona has its own row (a KV cache) over the one model. A persona's row may lag behind the
emitted text: the tokens it has not forwarded yet are its *pending* tokens, fed at the start
of its next forward. Keeping at least one token pending at all times means every forward
starts by feeding something, whose last logits are the next-token distribution we need, so no
logits have to be kept between rounds. Concretely, after prefill (prompt minus its last token)
the last prompt token is pending; after a round the judge lags by the residual/bonus token,
the draft by one or two tokens, and personas outside the round (k > 2) by the whole round.

Round with draft D and judge J, lookahead λ, drafted tokens d_0..d_{n-1} (n <= λ; fewer when
the budget is nearly spent or the draft proposes EOS):

Every q and p comes from the call's :class:`pj_core.decoding.logits.LogitPipeline` (transforms, then
temperature, top-k, top-p), identical for both roles.

* D forwards pending_D, samples d_0 from q_0; forwards d_0, samples d_1 from q_1; ... (n forwards).
* J forwards pending_J + d_0..d_{n-1} in one pass: p_0..p_{n-1} for the drafted positions and
  p_n, the bonus distribution.
* d_i is accepted while u_i * q_i(d_i) < p_i(d_i); the first rejected one is replaced by a draw
  from norm(max(0, p_i - q_i)) and the round ends; if all λ pass, a bonus token comes from p_λ.
* Both caches are cropped back to the tokens that are still valid (the accepted prefix).

With a neutral row (``strength > 0``, :mod:`pj_core.decoding.guidance`) the neutral prompt gets a
row of its own, prefilled with the personas', and it walks beside the draft: each draft step
is ONE forward of both rows (:meth:`pj_core.backends.protocol.Rows.extend_together`; the neutral
row is fed its pending tokens, then d_0, d_1, ...), giving q's row and the neutral logits at
d_i's position. The judge's positions 0..n-1 are the same prefixes, so they reuse those neutral
logits. Only the bonus position (after d_{n-1}) needs one more neutral forward, of d_{n-1}, and
only when a bonus is drawn. The neutral row is cropped like the draft's (plus d_{n-1} when it
was fed for the bonus).

The model is reached only through the backend protocol (:mod:`pj_core.backends.protocol`): the
rows are prefilled with ``layout="separate"``, drafts and judge passes are
:meth:`~pj_core.backends.protocol.Rows.extend`, crops are
:meth:`~pj_core.backends.protocol.Rows.truncate`.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence

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


def speculative_emissions(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig,
    *,
    eos_ids: frozenset[int],
    generator: torch.Generator,
    counters: Counters,
    pipeline: LogitPipeline | None = None,
    neutral: Sequence[int] | None = None,
) -> Generator[Emission, None, None]:
    """Yield the emitted tokens one by one until EOS or ``config.max_new_tokens``.

    ``prompts`` holds one token-id list per persona (each at least one token long). The caller
    may stop iterating at any time (a stop string); nothing is left to clean up. ``pipeline``
    turns logits into p and q (default: ``config``'s filters and no transforms). ``neutral``
    is the neutral row's prompt when the call guides its personas (``config.strength > 0``):
    every position then carries the neutral logits
    (:attr:`pj_core.decoding.logits.Position.neutral`).
    """
    pipeline = pipeline or LogitPipeline(config)
    # Rows: the personas 0..k-1, then the neutral row (index k) if there is one.
    k = len(prompts)
    prompts = [*prompts, neutral] if neutral is not None else list(prompts)
    started = time.perf_counter()
    rows = backend.rows([prompt[:-1] for prompt in prompts], layout="separate")
    counters.prefill_seconds += time.perf_counter() - started
    emitted: list[int] = []

    def pending(persona: int) -> list[int]:
        return (list(prompts[persona]) + emitted)[rows.length(persona) :]

    def crop(persona: int, valid: int) -> None:
        # Keep the valid tokens but always leave at least the last emitted token pending.
        keep = min(valid, len(prompts[persona]) + len(emitted) - 1)
        if keep < rows.length(persona):
            rows.truncate(persona, keep)

    try:
        round_index = 0
        lookahead = config.lookahead
        while len(emitted) < config.max_new_tokens:
            roles = round_roles(round_index, n_personas=k, alternate=config.alternate)
            draws = draw_round(generator, lookahead)
            counters.rounds += 1
            before_round = len(emitted)
            draft, judge = roles.draft, roles.judge
            emitted_before = tuple(emitted)

            # Draft: never more tokens than the budget has left; stop at a drafted EOS.
            drafted: list[int] = []
            draft_probs: list[torch.Tensor] = []
            # neutral_logits[i]: [vocab], the neutral row after d_0..d_{i-1} (with a neutral row)
            neutral_logits: list[torch.Tensor | None] = []
            feed = pending(draft)
            for position in range(min(lookahead, config.max_new_tokens - len(emitted))):
                # The neutral row's new tokens: its pending ones first, then each drafted token.
                neutral_feed = (
                    (pending(k) if position == 0 else feed) if neutral is not None else []
                )
                neutral_logits_i: torch.Tensor | None = None  # [vocab]
                if neutral is not None:
                    both = rows.extend_together([draft, k], [feed, neutral_feed])  # [2, vocab]
                    draft_row, neutral_logits_i = both[0], both[1]
                else:
                    draft_row = rows.extend(draft, feed, keep=1)[-1]  # [vocab]
                neutral_logits.append(neutral_logits_i)
                # q_i: [vocab], the draft's distribution after d_0..d_{i-1}
                at = Position(
                    draft, "draft", round_index, emitted_before, tuple(drafted), neutral_logits_i
                )
                q = pipeline.probs(draft_row, [at])
                token = sample_index(q, draws.draft[position])
                drafted.append(token)
                draft_probs.append(q)
                if token in eos_ids:
                    break
                feed = [token]

            # The neutral cache holds d_0..d_{n-2} of this round (like the draft's).
            neutral_round_tokens = len(drafted) - 1

            # Judge: the pending tokens and the whole draft in one forward.
            judge_logits = rows.extend(judge, pending(judge) + drafted, keep=len(drafted) + 1)
            # p_0..p_{n-1}: [n, vocab]; row i after d_0..d_{i-1}. The bonus distribution p_n (from
            # judge_logits[n]) is only computed when a bonus is drawn.
            verified = [
                Position(
                    judge,
                    "judge",
                    round_index,
                    emitted_before,
                    tuple(drafted[:i]),
                    neutral_logits[i],
                )
                for i in range(len(drafted))
            ]
            judge_probs = pipeline.probs(judge_logits[: len(drafted)], verified)

            accepted = 0
            for position, token in enumerate(drafted):
                chosen, outcome = judge_draft_token(
                    judge_probs[position], draft_probs[position], token, draws, position
                )
                emitted.append(chosen)
                counters.record(outcome)
                yield Emission(chosen, round_index, roles, outcome)
                if outcome == "resampled":
                    break
                accepted += 1
                if chosen in eos_ids:
                    break
            else:
                if len(drafted) == lookahead and len(emitted) < config.max_new_tokens:
                    # The neutral row has seen d_0..d_{n-2}: feed it d_{n-1} for the bonus position.
                    bonus_neutral = None
                    if neutral is not None:
                        bonus_neutral = rows.extend(k, [drafted[-1]], keep=1)[-1]
                        neutral_round_tokens += 1
                    at = Position(
                        judge, "judge", round_index, emitted_before, tuple(drafted), bonus_neutral
                    )
                    chosen = bonus_token(pipeline.probs(judge_logits[len(drafted)], [at]), draws)
                    emitted.append(chosen)
                    counters.record("bonus")
                    yield Emission(chosen, round_index, roles, "bonus")
            if emitted[-1] in eos_ids:
                return

            # The draft cached the prefix + d_0..d_{n-2}, the judge the prefix + d_0..d_{n-1};
            # only the accepted d_0..d_{accepted-1} are still part of the text.
            crop(draft, before_round + len(prompts[draft]) + min(len(drafted) - 1, accepted))
            crop(judge, before_round + len(prompts[judge]) + min(len(drafted), accepted))
            if neutral is not None:
                crop(k, before_round + len(prompts[k]) + min(neutral_round_tokens, accepted))
            round_index += 1
    finally:
        counters.forward_passes += rows.forward_passes
