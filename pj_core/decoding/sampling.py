"""The sampling arithmetic of Persona-judge (Algorithm 1), as pure functions.

Names follow the paper: the *draft* persona proposes a token from its distribution ``q``, the
*judge* persona's distribution is ``p``; the draft token ``t`` is accepted when
``u < p(t) / q(t)``; at the first rejection a token is drawn from the *residual*
``norm(max(0, p - q))``; if all λ (lookahead) tokens pass, a *bonus* token is drawn from ``p``.

Temperature, top-k and top-p are applied identically to both personas *before* the test, so
``p`` and ``q`` here are always the filtered distributions; the output of a round then follows
the judge's filtered distribution exactly (``tests/test_sampling.py`` proves it by enumeration).

Every draw takes its uniform number ``u`` as an argument instead of calling a random number
generator: the engine draws the numbers of one round from a per-call ``torch.Generator`` in a
fixed layout, which makes runs reproducible and lets the speculative and lockstep strategies
emit identical tokens for the same seed.

Example:
    >>> import torch
    >>> q = filtered_probs(torch.tensor([2.0, 1.0, 0.0]), temperature=1.0, top_k=0, top_p=1.0)
    >>> p = filtered_probs(torch.tensor([0.0, 1.0, 2.0]), temperature=1.0, top_k=0, top_p=1.0)
    >>> t = sample_index(q, u=0.1)          # the draft proposes token 0
    >>> accepts(p, q, t, u=0.5)             # 0.5 * q(0) = 0.33 > p(0) = 0.09: rejected
    False
    >>> sample_index(residual(p, q), u=0.5) # the replacement comes from max(0, p - q)
    2
"""

from __future__ import annotations

import torch

# Below this mass, max(0, p - q) is numerically empty (p and q agree up to rounding); a
# rejection can then only be a rounding artefact, and p itself is the exact fallback.
RESIDUAL_MASS_FLOOR = 1e-12


def filtered_probs(
    logits: torch.Tensor, *, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Turn logits into the filtered next-token distribution, in float32.

    Works on the last dimension of a tensor of any shape. ``temperature == 0`` is the greedy
    limit: a one-hot distribution on the argmax (no division by zero). ``top_k == 0`` and
    ``top_p == 1.0`` switch those filters off. Top-p keeps the smallest set of most likely
    tokens whose mass reaches ``top_p`` (the most likely token is always kept).

    Example:
        >>> import torch
        >>> filtered_probs(torch.tensor([1.0, 3.0, 2.0]), temperature=0.0, top_k=0, top_p=1.0)
        tensor([0., 1., 0.])
        >>> filtered_probs(torch.tensor([0.0, 0.0, 5.0]), temperature=1.0, top_k=1, top_p=1.0)
        tensor([0., 0., 1.])
    """
    logits = logits.float()
    if temperature == 0.0:
        # Ties resolve to the lowest index, as torch.argmax does, for every caller alike.
        winner = logits.argmax(dim=-1, keepdim=True)
        return torch.zeros_like(logits).scatter_(-1, winner, 1.0)
    scaled = logits / temperature
    chosen: torch.Tensor | None = None  # top-k's tokens in index order, when it is on
    if 0 < top_k < scaled.shape[-1]:
        top = torch.topk(scaled, top_k, dim=-1)
        kept = scaled >= top.values[..., -1:]  # ties with the k-th token are kept too
        scaled = scaled.masked_fill(~kept, float("-inf"))
        if bool((kept.sum(dim=-1) == top_k).all()):  # no tie at the k-th place
            chosen = top.indices.sort(dim=-1).values  # [..., top_k]
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        probs = _nucleus(probs, top_p, chosen)
    return probs


def _nucleus(probs: torch.Tensor, top_p: float, chosen: torch.Tensor | None) -> torch.Tensor:
    """Top-p on the last dimension: drop every token whose higher-ranked tokens already hold
    ``top_p`` of the mass, then renormalise. Tokens rank by probability, ties by index (a
    stable sort), so the result never depends on how a sort orders ties.

    ``chosen`` (in ascending index order) are the only tokens that can hold mass when top-k
    is on: only they are ranked (a few dozen tokens instead of the whole vocabulary), with the
    same ranking, running sums and result as ranking every token.
    """
    if chosen is None:
        ranked, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    else:
        ranked, by_prob = torch.sort(probs.gather(-1, chosen), dim=-1, descending=True, stable=True)
        order = chosen.gather(-1, by_prob)
    mass_before = torch.cumsum(ranked, dim=-1) - ranked
    # A token survives when the tokens ranked above it have not reached top_p yet.
    drop_ranked = mass_before >= top_p
    drop = torch.zeros(probs.shape, dtype=torch.bool, device=probs.device)
    drop = drop.scatter(-1, order, drop_ranked)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def sample_index(probs: torch.Tensor, u: float) -> int:
    """Draw from a 1-D distribution by inverse CDF with the uniform number ``u`` in [0, 1).

    Tokens of probability zero are never returned, even when ``u`` meets a rounding gap at
    the top of the cumulative sum.

    Example:
        >>> import torch
        >>> sample_index(torch.tensor([0.25, 0.0, 0.75]), u=0.3)
        2
    """
    cdf = torch.cumsum(probs, dim=-1)
    target = torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype, device=cdf.device)
    index = int(torch.searchsorted(cdf, target, right=True)[0])
    index = min(index, probs.shape[-1] - 1)
    if probs[index] <= 0.0:
        # Only reachable by rounding at the very top of the CDF: take the last supported token.
        index = int(torch.nonzero(probs > 0.0)[-1])
    return index


def accepts(p: torch.Tensor, q: torch.Tensor, token: int, u: float) -> bool:
    """The judge's test of a draft token: accept when ``u < p(t) / q(t)``.

    Written as ``u * q(t) < p(t)`` so that nothing is divided (in the greedy limit ``q`` is
    one-hot). ``token`` was drawn from ``q``, so ``q(t) > 0``.

    Example:
        >>> import torch
        >>> accepts(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1]), token=0, u=0.5)
        True
        >>> accepts(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1]), token=0, u=0.6)
        False
    """
    return bool(u * float(q[token]) < float(p[token]))


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The distribution a rejected draft token is replaced from: ``norm(max(0, p - q))``.

    Falls back to ``p`` when the residual has no mass (``p == q`` up to rounding), which keeps
    the output distribution exact and never divides by zero.

    Example:
        >>> import torch
        >>> residual(torch.tensor([0.5, 0.5]), torch.tensor([0.9, 0.1]))
        tensor([0., 1.])
        >>> residual(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.5]))
        tensor([0.5000, 0.5000])
    """
    excess = torch.clamp(p - q, min=0.0)
    mass = float(excess.sum())
    if mass < RESIDUAL_MASS_FLOOR:
        return p
    return excess / mass
