"""Independent references for the engine tests: a no-cache loop and exact distributions.

Both are written from the method's description, with full forwards over the whole sequence
(no KV cache) and only the sampling functions of ``pj_core.decoding.sampling``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from pj_core.decoding.sampling import accepts, filtered_probs, residual, sample_index
from tests._tiny import make_tiny_tokenizer

# A logit transform as the references apply it: (raw logits [vocab], answer prefix) -> logits.
PrefixTransform = Callable[[torch.Tensor, tuple[int, ...]], torch.Tensor]

TOKENIZER = make_tiny_tokenizer()
# Two (three) persona prompts in the tiny ChatML-like format that differ in their system text.
PERSONA_TEXTS = ("be funny a cat", "be brief no dog", "why the world yes")


def tiny_prompt(system: str, user: str = "hello world") -> list[int]:
    text = (
        f"<|im_start|> system {system} <|im_end|> <|im_start|> user {user} <|im_end|> "
        "<|im_start|> assistant"
    )
    return list(TOKENIZER(text)["input_ids"])


def next_token_probs(
    model: PreTrainedModel,
    ids: Sequence[int],
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    transform: PrefixTransform | None = None,
    prefix: tuple[int, ...] = (),
) -> torch.Tensor:
    """The filtered next-token distribution after ``ids`` from one full forward (no cache);
    ``transform`` (given the answer ``prefix``) changes the logits before the filters."""
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([list(ids)]), use_cache=False).logits[0, -1]
    if transform is not None:
        logits = transform(logits.float(), prefix)
    return filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)


def reference_generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    lookahead: int,
    alternate: bool,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    eos_ids: frozenset[int],
) -> list[int]:
    """Persona-judge rounds without any cache, drawing 2λ+1 uniforms per round:
    λ for the draft's inverse-CDF draws, λ for the acceptance tests, 1 for residual/bonus."""
    generator = torch.Generator().manual_seed(seed)
    out: list[int] = []
    settings: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p}

    def dist(persona: int, extra: list[int]) -> torch.Tensor:
        return next_token_probs(model, list(prompts[persona]) + out + extra, **settings)

    round_index = 0
    while len(out) < max_new_tokens:
        k = len(prompts)
        draft, judge = (round_index % k, (round_index + 1) % k) if alternate else (0, 1)
        u = torch.rand(2 * lookahead + 1, generator=generator, dtype=torch.float64).tolist()
        drafted: list[int] = []
        draft_dists: list[torch.Tensor] = []
        for i in range(min(lookahead, max_new_tokens - len(out))):
            q = dist(draft, drafted)
            drafted.append(sample_index(q, u[i]))
            draft_dists.append(q)
            if drafted[-1] in eos_ids:
                break
        emitted: list[int] = []
        rejected = False
        for i, token in enumerate(drafted):
            p = dist(judge, drafted[:i])
            if accepts(p, draft_dists[i], token, u[lookahead + i]):
                emitted.append(token)
                if token in eos_ids:
                    break
            else:
                emitted.append(sample_index(residual(p, draft_dists[i]), u[2 * lookahead]))
                rejected = True
                break
        all_passed = not rejected and len(emitted) == lookahead
        if all_passed and emitted[-1] not in eos_ids and len(out) + lookahead < max_new_tokens:
            emitted.append(sample_index(dist(judge, drafted), u[2 * lookahead]))
        out += emitted
        if out[-1] in eos_ids:
            break
        round_index += 1
    return out


def exact_sequence_distribution(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    *,
    lookahead: int,
    alternate: bool,
    length: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: frozenset[int],
    transform: PrefixTransform | None = None,
) -> dict[tuple[int, ...], float]:
    """P(output sequence) of Persona-judge with ``max_new_tokens=length``, by enumerating the
    round process: at position i < draft length of a round, token t is emitted and *accepted*
    with probability min(p, q)(t) (the round goes on) or emitted by *resampling* with
    probability (p - min(p, q))(t) (the round ends); after a full lookahead a bonus ~ p."""
    settings: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    cache: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def dist(persona: int, prefix: tuple[int, ...]) -> torch.Tensor:
        key = (persona, prefix)
        if key not in cache:
            ids = list(prompts[persona]) + list(prefix)
            probs = next_token_probs(model, ids, **settings, transform=transform, prefix=prefix)
            cache[key] = probs.double()
        return cache[key]

    result: dict[tuple[int, ...], float] = {}

    def walk(
        prefix: tuple[int, ...], mass: float, round_index: int, position: int, draft_len: int
    ) -> None:
        if mass == 0.0:
            return
        if len(prefix) == length or (prefix and prefix[-1] in eos_ids):
            result[prefix] = result.get(prefix, 0.0) + mass
            return
        k = len(prompts)
        draft, judge = (round_index % k, (round_index + 1) % k) if alternate else (0, 1)
        if position == 0:
            draft_len = min(lookahead, length - len(prefix))
        p = dist(judge, prefix)
        if position < draft_len:
            overlap = torch.minimum(p, dist(draft, prefix))
            for token in torch.nonzero(p).flatten().tolist():
                walk(
                    (*prefix, token),
                    mass * float(overlap[token]),
                    round_index,
                    position + 1,
                    draft_len,
                )
                walk(
                    (*prefix, token), mass * float(p[token] - overlap[token]), round_index + 1, 0, 0
                )
        else:
            for token in torch.nonzero(p).flatten().tolist():
                walk((*prefix, token), mass * float(p[token]), round_index + 1, 0, 0)

    walk((), 1.0, 0, 0, 0)
    return result


def autoregressive_distribution(
    model: PreTrainedModel,
    prompt: Sequence[int],
    *,
    length: int,
    temperature: float,
    top_k: int,
    top_p: float,
    eos_ids: frozenset[int],
    transform: PrefixTransform | None = None,
) -> dict[tuple[int, ...], float]:
    """P(output sequence) of plain sampling from one persona (its own distribution)."""
    settings: dict[str, Any] = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    result: dict[tuple[int, ...], float] = {}

    def walk(prefix: tuple[int, ...], mass: float) -> None:
        if len(prefix) == length or (prefix and prefix[-1] in eos_ids):
            result[prefix] = result.get(prefix, 0.0) + mass
            return
        ids = list(prompt) + list(prefix)
        p = next_token_probs(model, ids, **settings, transform=transform, prefix=prefix).double()
        for token in torch.nonzero(p).flatten().tolist():
            walk((*prefix, token), mass * float(p[token]))

    walk((), 1.0)
    return result


def total_variation(a: dict[tuple[int, ...], float], b: dict[tuple[int, ...], float]) -> float:
    keys = set(a) | set(b)
    return 0.5 * sum(abs(a.get(key, 0.0) - b.get(key, 0.0)) for key in keys)


def tv_tolerance(exact: dict[tuple[int, ...], float], samples: int) -> float:
    """99.9th percentile of TV(exact, empirical distribution of ``samples`` multinomial draws
    from it), simulated 4000 times with a fixed seed: the tolerance of the exactness tests (a
    correct sampler exceeds it with probability about 1e-3)."""
    keys = list(exact)
    probs = torch.tensor([exact[k] for k in keys], dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    draws = torch.multinomial(
        probs.expand(4000, -1), samples, replacement=True, generator=generator
    )
    counts = torch.zeros(4000, len(keys), dtype=torch.float64).scatter_add_(
        1, draws, torch.ones_like(draws, dtype=torch.float64)
    )
    tv = 0.5 * (counts / samples - probs).abs().sum(dim=1)
    return float(torch.quantile(tv, 0.999))
