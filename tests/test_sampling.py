"""The sampling arithmetic of Algorithm 1, checked exactly."""

from __future__ import annotations

import pytest
import torch

from pj_core.decoding.sampling import accepts, filtered_probs, residual, sample_index

# Midpoints of a fine grid of u in [0, 1): integrating a function of u over them is exact up
# to one grid cell (1 / GRID) per threshold.
GRID = 20_000
U_GRID = [(i + 0.5) / GRID for i in range(GRID)]


def _random_distribution(generator: torch.Generator, vocab: int, zeros: int) -> torch.Tensor:
    """A random distribution over ``vocab`` tokens with ``zeros`` of them impossible."""
    weights = torch.rand(vocab, generator=generator, dtype=torch.float64) ** 3
    weights[torch.randperm(vocab, generator=generator)[:zeros]] = 0.0
    return (weights / weights.sum()).float()


def _draft_then_judge_outcomes(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Probability of each emitted token of one draft-then-accept-or-resample step, by
    enumeration of every draft token d (probability q(d)), its acceptance probability (the
    fraction of u in [0, 1) that ``accepts`` passes, integrated on the grid) and, on
    rejection, the residual distribution as ``residual`` returns it."""
    out = torch.zeros_like(p, dtype=torch.float64)
    for draft_token in range(p.shape[0]):
        if q[draft_token] == 0:
            continue
        coarse = U_GRID[::20]
        accept_probability = sum(accepts(p, q, draft_token, u) for u in coarse) / len(coarse)
        out[draft_token] += float(q[draft_token]) * accept_probability
        out += float(q[draft_token]) * (1 - accept_probability) * residual(p, q).double()
    return out


def test_filtered_probs_applies_temperature_top_k_and_top_p_in_float32() -> None:
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0], dtype=torch.float16)
    plain = filtered_probs(logits, temperature=1.0, top_k=0, top_p=1.0)
    assert plain.dtype == torch.float32
    assert torch.allclose(plain, torch.softmax(logits.float(), dim=-1))
    hot = filtered_probs(logits, temperature=2.0, top_k=0, top_p=1.0)
    assert torch.allclose(hot, torch.softmax(logits.float() / 2.0, dim=-1))
    top2 = filtered_probs(logits, temperature=1.0, top_k=2, top_p=1.0)
    assert (top2 > 0).tolist() == [False, True, True, False, False]
    assert torch.allclose(top2[1:3], torch.softmax(torch.tensor([3.0, 2.0]), dim=-1))
    # Softmax of [1,3,2,0,-1] is about [0.09, 0.64, 0.23, 0.03, 0.01]: top-p 0.7 needs the
    # two most likely tokens (0.64 alone does not reach 0.7; with 0.23 it does).
    nucleus = filtered_probs(logits, temperature=1.0, top_k=0, top_p=0.7)
    assert (nucleus > 0).tolist() == [False, True, True, False, False]
    assert abs(float(nucleus.sum()) - 1.0) < 1e-6
    tiny_nucleus = filtered_probs(logits, temperature=1.0, top_k=0, top_p=1e-6)
    assert tiny_nucleus.tolist() == [0.0, 1.0, 0.0, 0.0, 0.0]


def test_filtered_probs_works_on_batches_like_rows() -> None:
    logits = torch.randn(3, 11, generator=torch.Generator().manual_seed(0))
    batch = filtered_probs(logits, temperature=0.7, top_k=5, top_p=0.8)
    for row in range(3):
        single = filtered_probs(logits[row], temperature=0.7, top_k=5, top_p=0.8)
        assert torch.allclose(batch[row], single)


def test_greedy_limit_is_one_hot_without_division_by_zero() -> None:
    logits = torch.tensor([0.5, 4.0, 4.0, -2.0])
    probs = filtered_probs(logits, temperature=0.0, top_k=3, top_p=0.5)
    assert probs.tolist() == [0.0, 1.0, 0.0, 0.0]  # ties resolve to the lowest index
    assert torch.isfinite(probs).all()


def test_sample_index_is_inverse_cdf_and_never_picks_impossible_tokens() -> None:
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3, 0.0])
    counts = torch.zeros(5)
    for u in U_GRID:
        counts[sample_index(probs, u)] += 1
    assert torch.allclose(counts / GRID, probs, atol=2 / GRID)
    assert sample_index(probs, 0.0) == 0
    assert sample_index(probs, 1.0 - 1e-12) == 3  # top of the CDF: last supported token


def test_accepts_passes_with_probability_min_one_p_over_q() -> None:
    p = torch.tensor([0.1, 0.6, 0.3])
    q = torch.tensor([0.4, 0.2, 0.4])
    for token in range(3):
        rate = sum(accepts(p, q, token, u) for u in U_GRID) / GRID
        assert rate == pytest.approx(min(1.0, float(p[token] / q[token])), abs=2 / GRID)


def test_residual_is_normalised_positive_part_with_fallback_to_p() -> None:
    p = torch.tensor([0.5, 0.3, 0.2, 0.0])
    q = torch.tensor([0.2, 0.4, 0.2, 0.2])
    assert torch.allclose(residual(p, q), torch.tensor([1.0, 0.0, 0.0, 0.0]))
    same = residual(p, p.clone())
    assert same is p or torch.equal(same, p)
    # p == q up to float rounding: the residual mass is ~1e-9 (below the floor) -> p
    nudged = p + torch.tensor([1e-13, -1e-13, 0.0, 0.0])
    assert torch.isfinite(residual(p, nudged)).all()


@pytest.mark.parametrize("case", range(12))
def test_draft_then_accept_or_resample_emits_exactly_p(case: int) -> None:
    """Enumeration over every draft token: P(emitted = t) == p(t) for random p, q."""
    generator = torch.Generator().manual_seed(case)
    vocab = 4 + case % 5
    p = _random_distribution(generator, vocab, zeros=case % 3)
    q = _random_distribution(generator, vocab, zeros=(case + 1) % 3)
    emitted = _draft_then_judge_outcomes(p, q)
    # Tolerance: the acceptance integral is exact to one coarse grid cell (20 / GRID) per token.
    assert torch.allclose(emitted, p.double(), atol=vocab * 20 / GRID)
    assert float(emitted.sum()) == pytest.approx(1.0, abs=1e-6)


def test_exactness_of_the_residual_step_in_closed_form() -> None:
    """Without any grid: sum_d q(d) min(1, p/q) [d = t] + (1 - sum min(p, q)) residual(t) = p(t)."""
    generator = torch.Generator().manual_seed(123)
    for _ in range(50):
        vocab = int(torch.randint(2, 12, (1,), generator=generator))
        p = _random_distribution(generator, vocab, zeros=int(torch.randint(0, vocab - 1, (1,))))
        q = _random_distribution(generator, vocab, zeros=int(torch.randint(0, vocab - 1, (1,))))
        overlap = torch.minimum(p, q)
        emitted = overlap + (1 - overlap.sum()) * residual(p, q)
        assert torch.allclose(emitted, p, atol=1e-6)


def test_greedy_round_emits_the_judges_argmax_for_every_u() -> None:
    p = filtered_probs(torch.tensor([0.0, 2.0, 1.0]), temperature=0.0, top_k=0, top_p=1.0)
    q = filtered_probs(torch.tensor([3.0, 2.0, 1.0]), temperature=0.0, top_k=0, top_p=1.0)
    for u_draft, u_accept, u_final in [(0.0, 0.0, 0.0), (0.3, 0.99, 0.5), (0.999, 0.5, 0.999)]:
        draft_token = sample_index(q, u_draft)
        assert draft_token == 0
        assert not accepts(p, q, draft_token, u_accept)
        assert sample_index(residual(p, q), u_final) == 1
    assert accepts(p, p, 1, 0.999999)


def _nucleus_by_full_sort(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Top-k then top-p as the definition reads: rank EVERY token (probability, then index)."""
    scaled = logits.float()
    if 0 < top_k < scaled.shape[-1]:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    ranked, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    drop_ranked = torch.cumsum(ranked, dim=-1) - ranked >= top_p
    drop = torch.zeros_like(drop_ranked).scatter(-1, order, drop_ranked)
    probs = probs.masked_fill(drop, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def test_top_p_ranks_only_the_top_k_candidates_with_the_same_result() -> None:
    # filtered_probs ranks only the top-k candidates for top-p (a few dozen tokens instead of
    # the vocabulary); it must give exactly what ranking every token gives, ties included
    # (coarse logits make many ties, also at the k-th place and at the top-p boundary).
    generator = torch.Generator().manual_seed(7)
    for trial in range(300):
        vocab = int(torch.randint(2, 60, (1,), generator=generator))
        shape = (vocab,) if trial % 2 else (3, vocab)
        logits = torch.randn(shape, generator=generator) * 3
        if trial % 3 == 0:
            logits = logits.round()  # ties
        top_k = int(torch.randint(0, vocab + 2, (1,), generator=generator))
        top_p = [0.05, 0.3, 0.5, 0.8, 0.95, 0.999][trial % 6]
        fast = filtered_probs(logits, temperature=1.0, top_k=top_k, top_p=top_p)
        reference = _nucleus_by_full_sort(logits, top_k, top_p)
        assert torch.equal(fast, reference), (trial, logits, top_k, top_p)
