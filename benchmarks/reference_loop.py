"""The baseline with the authors' cost profile: Persona-judge without any KV cache.

The authors' released code keeps one copy of the weights per persona and recomputes the
whole context (prompt + everything generated so far) for every drafted token and for every
verification. This module reproduces that *cost profile* with our correct round logic (the
engine's own :mod:`pj_core.decoding.rounds` functions: alternating roles, residual ``max(0, p -
q)``), so for the same seed it emits the same tokens as the engine, up to floating-point rounding;
only the way the logits are computed differs. Like the authors' loop, it does not stop at EOS:
the benchmark wants a fixed number of tokens.

Two variants:

* ``full_logits=False`` (method ``reference``): each forward projects only the positions it
  samples from onto the vocabulary (``logits_to_keep``), as the engine does; the
  conservative baseline, not slower than it has to be.
* ``full_logits=True`` (method ``authors``): each forward computes the logits of every
  position, as the authors' ``model(prefix).logits`` calls do. Their code then also runs
  temperature/top-k/top-p over every position of the context in a Python loop each round;
  that is not reproduced here, so this variant is still faster than their code.

Example:
    >>> import copy, torch
    >>> from tests._tiny import make_tiny_model
    >>> model = make_tiny_model(vocab_size=22)
    >>> run = reference_generate([model, copy.deepcopy(model)], [[5, 6, 7], [8, 9]],
    ...                          lookahead=3, max_new_tokens=6, temperature=0.7, top_k=0,
    ...                          top_p=1.0, generator=torch.Generator().manual_seed(0))
    >>> len(run.token_ids), run.forward_passes > 6
    (6, True)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from pj_core.decoding.rounds import bonus_token, draw_round, judge_draft_token, round_roles
from pj_core.decoding.sampling import filtered_probs, sample_index


@dataclass(frozen=True)
class ReferenceRun:
    """What one reference generation produced and cost."""

    token_ids: list[int]
    forward_passes: int
    drafted: int
    accepted: int
    first_token_seconds: float


def _full_forward(
    model: PreTrainedModel, ids: list[int], keep: int, *, full_logits: bool
) -> torch.Tensor:
    """Recompute the whole context (no cache) and return the last ``keep`` logits rows.

    ``full_logits`` projects every position onto the vocabulary, as the authors' code does.
    """
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    if full_logits:
        output = model(input_ids=input_ids, use_cache=False)
    else:
        output = model(input_ids=input_ids, use_cache=False, logits_to_keep=keep)
    return output.logits[0, -keep:, :].float()


def reference_generate(
    models: Sequence[PreTrainedModel],
    prompts: Sequence[Sequence[int]],
    *,
    lookahead: int,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator,
    alternate: bool = True,
    full_logits: bool = False,
    on_token: Callable[[int], None] | None = None,
) -> ReferenceRun:
    """Generate ``max_new_tokens`` tokens with full recomputation, one model copy per persona.

    Args:
        models: one model per persona (the authors hold a copy of the weights per persona;
            pass genuinely separate copies to reproduce their memory profile).
        prompts: the rendered prompt ids of each persona.
        lookahead: λ, draft tokens per round.
        generator: consumed exactly like the engine consumes its own (one ``draw_round`` per
            round), so the same seed gives the same tokens.
        full_logits: compute the logits of every position in every forward (the authors'
            forward) instead of only those sampled from.
        on_token: called with each emitted token as soon as it is known.
    """
    if len(models) != len(prompts):
        raise ValueError(f"one model per persona: got {len(models)} models, {len(prompts)} prompts")
    started = time.perf_counter()
    first_token_seconds = 0.0
    generated: list[int] = []
    forward_passes = drafted_count = accepted_count = 0

    def probs(logits: torch.Tensor) -> torch.Tensor:
        return filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)

    def emit(token: int) -> None:
        nonlocal first_token_seconds
        if not generated:
            first_token_seconds = time.perf_counter() - started
        generated.append(token)
        if on_token is not None:
            on_token(token)

    round_index = 0
    with torch.inference_mode():
        while len(generated) < max_new_tokens:
            roles = round_roles(round_index, n_personas=len(prompts), alternate=alternate)
            draws = draw_round(generator, lookahead)
            draft_ids = list(prompts[roles.draft]) + generated
            drafted: list[int] = []
            q_rows: list[torch.Tensor] = []
            # Like the engine, never draft more than the budget has left.
            for position in range(min(lookahead, max_new_tokens - len(generated))):
                logits = _full_forward(
                    models[roles.draft], draft_ids + drafted, keep=1, full_logits=full_logits
                )[-1]
                forward_passes += 1
                q = probs(logits)
                drafted.append(sample_index(q, draws.draft[position]))
                q_rows.append(q)
            judge_ids = list(prompts[roles.judge]) + generated + drafted
            p_rows = probs(
                _full_forward(
                    models[roles.judge], judge_ids, keep=len(drafted) + 1, full_logits=full_logits
                )
            )
            forward_passes += 1
            for position, token in enumerate(drafted):
                emitted, outcome = judge_draft_token(
                    p_rows[position], q_rows[position], token, draws, position
                )
                drafted_count += 1
                accepted_count += outcome == "accepted"
                emit(emitted)
                if outcome == "resampled":
                    break
            else:
                if len(drafted) == lookahead and len(generated) < max_new_tokens:
                    emit(bonus_token(p_rows[lookahead], draws))
            round_index += 1
    return ReferenceRun(
        token_ids=generated[:max_new_tokens],
        forward_passes=forward_passes,
        drafted=drafted_count,
        accepted=accepted_count,
        first_token_seconds=first_token_seconds,
    )
