"""Judges: both orders asked, verdict arithmetic, batched log-probs, the embedding judge."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pj_core.errors import EvaluationError
from pj_core.eval.aspects import aspect_for
from pj_core.eval.embedding import EmbeddingJudge
from pj_core.eval.judges import HUMOUR, PairwiseJudge, ScoreItem, combine_orders, judge_prompt
from pj_core.eval.reward import ImplicitRewardJudge, response_logprobs
from pj_core.personas import get_preference
from tests._tiny import make_tiny_model, make_tiny_tokenizer


def test_combine_orders_needs_both_orders_to_agree() -> None:
    # (x, y) then (y, x): x wins only when it is preferred in both slots.
    assert combine_orders("A", "B") == 1.0
    assert combine_orders("B", "A") == 0.0
    for first, swapped in [("A", "A"), ("B", "B"), ("tie", "B"), ("A", "tie"), ("tie", "tie")]:
        assert combine_orders(first, swapped) == 0.5  # type: ignore[arg-type]


def test_verdict_reads_the_letter_probabilities_with_a_tie_band() -> None:
    seen: list[tuple[str, str]] = []

    def scorer(system: str, user: str) -> tuple[float, float]:
        seen.append((system, user))
        return {"x": (0.30, 0.10), "y": (0.10, 0.30), "z": (0.21, 0.19)}[
            user.split("[Answer A]\n")[1][0]
        ]

    judge = PairwiseJudge(scorer, tie_margin=0.1)
    assert judge.verdict("Q?", HUMOUR, "x", "y").verdict == "A"  # P(A) = 0.75
    assert judge.verdict("Q?", HUMOUR, "y", "x").verdict == "B"  # P(A) = 0.25
    tied = judge.verdict("Q?", HUMOUR, "z", "y")
    assert tied.verdict == "tie" and tied.prob_first == pytest.approx(0.525)
    # The aspect and both answers reach the judge, in the slots asked for.
    assert "humour" in seen[0][1] and "[Answer A]\nx" in seen[0][1]
    assert "[Answer B]\ny" in seen[0][1]


def test_no_letter_mass_is_a_tie_not_a_division_by_zero() -> None:
    judge = PairwiseJudge(lambda s, u: (0.0, 0.0))
    assert judge.verdict("Q", HUMOUR, "a", "b").verdict == "tie"


def test_bad_tie_margin_is_refused() -> None:
    with pytest.raises(EvaluationError):
        PairwiseJudge(lambda s, u: (0.5, 0.5), tie_margin=0.5)


def test_judge_prompt_is_our_text_with_the_aspect() -> None:
    aspect = aspect_for(get_preference("vivid"))
    text = judge_prompt("Describe rain.", aspect, "It rains.", "Silver threads drum the roof.")
    assert text.startswith("Which answer shows more vividness?")
    assert text.endswith("Reply with one letter, A or B.")
    assert aspect.description in text


def test_letter_scorer_on_a_tiny_model_returns_probabilities() -> None:
    tokenizer = make_tiny_tokenizer()
    tokenizer.add_tokens(["A", "B"])
    model = make_tiny_model(len(tokenizer))
    pytest.importorskip("pj_core.prompts")
    judge = PairwiseJudge.from_model(model, tokenizer)
    out = judge.verdict("hello", HUMOUR, "the cat", "the dog")
    assert 0.0 < out.p_a < 1.0 and 0.0 < out.p_b < 1.0 and out.p_a + out.p_b <= 1.0


def test_batched_log_probs_equal_one_at_a_time() -> None:
    model = make_tiny_model(40, seed=3)
    pairs = [
        ([2, 5, 6], [7, 8, 9, 10]),
        ([3], [11]),
        ([2, 4, 6, 8, 10, 12], [13, 14]),
        ([5, 5], []),
    ]
    batched = response_logprobs(model, pairs, batch_size=4)
    single = [response_logprobs(model, [pair], batch_size=1)[0] for pair in pairs]
    assert batched == pytest.approx(single, abs=1e-4)
    assert batched[3] == 0.0
    # Hand check of one pair: the sum of log-softmax at the predicting positions.
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[3, 11]])).logits[0]
    expected = float(torch.log_softmax(logits[0], dim=-1)[11])
    assert batched[1] == pytest.approx(expected, abs=1e-5)


def test_implicit_reward_is_the_difference_of_the_two_conditions() -> None:
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(len(tokenizer), seed=4)
    judge = ImplicitRewardJudge(model, tokenizer, batch_size=2)
    items = [
        ScoreItem("hello", "the cat", HUMOUR),
        ScoreItem("hello", "no", HUMOUR),
        ScoreItem("hello", "the cat", aspect_for(get_preference("vivid"))),
    ]
    rewards = judge.score(items)
    # Recompute the first from its definition, one sequence at a time.
    response = tokenizer.encode("the cat", add_special_tokens=False)
    from pj_core.eval.reward import NEUTRAL_INSTRUCTION, aspect_instruction, plain_context

    asked = tokenizer.encode(plain_context(aspect_instruction(HUMOUR), "hello"))
    neutral = tokenizer.encode(plain_context(NEUTRAL_INSTRUCTION, "hello"))
    expected = (
        response_logprobs(model, [(asked, response)])[0]
        - response_logprobs(model, [(neutral, response)])[0]
    )
    assert rewards[0] == pytest.approx(expected, abs=1e-4)
    assert len(rewards) == 3 and rewards[0] != rewards[2]
    # Cached neutral terms give the same answer on a second call.
    assert judge.score(items) == pytest.approx(rewards, abs=1e-5)


def test_embedding_judge_scores_cosine_with_the_description() -> None:
    def encoder(texts: list[str]) -> np.ndarray:
        table = {"joke": [3.0, 0.0], "fact": [0.0, 2.0], "mixed": [1.0, 1.0]}
        return np.array([table.get(t, [1.0, 0.0]) for t in texts])

    judge = EmbeddingJudge(encoder)
    scores = judge.score([ScoreItem("Q", r, HUMOUR) for r in ("joke", "fact", "mixed")])
    assert scores == pytest.approx([1.0, 0.0, 2**-0.5])
    assert judge.score([]) == []
