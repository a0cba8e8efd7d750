"""Objective judges and the fluency guard (pj_core.eval.objective) on hand-written texts whose
ordering on each axis is known, and their place in a ``pj eval`` run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pytest

from pj_core.backends.hf.models import LoadedModel
from pj_core.errors import EvaluationError
from pj_core.eval.aspects import aspect_for
from pj_core.eval.config import EvalConfig
from pj_core.eval.judges import ScoreItem
from pj_core.eval.methods import Method
from pj_core.eval.objective import (
    FluencyScorer,
    ObjectiveJudge,
    readability_grade,
    repeated_trigram_share,
    sentence_count,
    sentiment,
    word_count,
)
from pj_core.eval.report import build_summary, markdown_table
from pj_core.eval.runner import Backends, GeneratedAnswer, run_evaluation
from pj_core.personas import get_preference
from tests._tiny import make_tiny_model, make_tiny_tokenizer

CONCISE = "Use a hash map."
INFORMATIVE = (
    "A hash map stores each key in a bucket chosen by its hash, so a lookup costs about one "
    "step on average. Choose a good hash, keep the load factor below three quarters, and "
    "resize when it grows, because long chains make every lookup slower."
)
ELEMENTARY = "The sun is hot. Plants like the sun. They use it to grow. Then we eat them."
EXPERT = (
    "Photosynthetic eukaryotes sequester atmospheric carbon through ribulose bisphosphate "
    "carboxylation, subsequently regenerating the acceptor molecule via the Calvin cycle's "
    "reductive phosphorylation intermediates."
)
FRIENDLY = "Great question! I'm so happy to help, and you're doing wonderfully. Enjoy!"
NEUTRAL = "The train leaves at nine and arrives at eleven."
UNFRIENDLY = "That is a stupid question. Figure it out yourself, I hate wasting time on this."


def test_length_orders_concise_below_informative() -> None:
    assert word_count(CONCISE) == 4
    assert word_count(CONCISE) < word_count(INFORMATIVE)
    assert word_count("") == 0 and word_count("don't stop") == 2


def test_readability_orders_elementary_below_expert() -> None:
    assert readability_grade(ELEMENTARY) < 3.0 < 12.0 < readability_grade(EXPERT)
    assert readability_grade("") == 0.0


def test_readability_survives_unpunctuated_text() -> None:
    """A model that never writes a full stop must not read as a 120-word sentence."""
    run_on = " ".join(ELEMENTARY.replace(".", "").split() * 8)
    assert sentence_count(run_on) == math.ceil(word_count(run_on) / 40)
    assert readability_grade(run_on) < readability_grade(EXPERT)
    assert readability_grade(run_on) < 20.0
    # Line breaks end sentences too (lists, short lines).
    assert sentence_count("first item\nsecond item\n\nthird item") == 3


def test_sentiment_orders_friendly_above_unfriendly() -> None:
    assert sentiment(FRIENDLY) > sentiment(NEUTRAL) > sentiment(UNFRIENDLY)
    assert -1.0 <= sentiment(UNFRIENDLY) < 0.0 < sentiment(FRIENDLY) <= 1.0
    assert sentiment("   ") == 0.0


def test_repeated_trigram_share_flags_degenerate_text() -> None:
    assert repeated_trigram_share(INFORMATIVE) == 0.0
    assert repeated_trigram_share(" ".join(["IPAMP"] * 30)) > 0.9
    assert repeated_trigram_share("too short") == 0.0


def test_objective_judge_scores_more_of_each_dimension_higher() -> None:
    judge = ObjectiveJudge()

    def scores(dimension: str, texts: Sequence[str]) -> list[float]:
        aspect = aspect_for(get_preference(dimension))
        return judge.score([ScoreItem("Q?", text, aspect) for text in texts])

    low, high = scores("concise", [INFORMATIVE, CONCISE])
    assert low < high
    low, high = scores("informative", [CONCISE, INFORMATIVE])
    assert low < high
    low, high = scores("elementary", [EXPERT, ELEMENTARY])
    assert low < high
    low, high = scores("expert", [ELEMENTARY, EXPERT])
    assert low < high
    low, high = scores("friendly", [UNFRIENDLY, FRIENDLY])
    assert low < high
    low, high = scores("unfriendly", [FRIENDLY, UNFRIENDLY])
    assert low < high
    with pytest.raises(EvaluationError, match="no proxy for 'humor'"):
        scores("humor", [CONCISE])


def test_fluency_scorer_on_a_tiny_model() -> None:
    tokenizer = make_tiny_tokenizer()
    scorer = FluencyScorer(make_tiny_model(len(tokenizer)), tokenizer)
    guard = scorer.score("hello", "why the cat why the cat")
    assert guard.tokens == 6
    assert guard.perplexity is not None and 1.0 < guard.perplexity < len(tokenizer) * 10
    assert guard.repeated_trigrams == pytest.approx(1 / 4)  # 4 trigrams, the last repeats
    empty = scorer.score("hello", "")
    assert empty.perplexity is None and empty.tokens == 0


@pytest.mark.real_model
def test_fluency_perplexity_separates_fluent_from_broken_text(smollm2: LoadedModel) -> None:
    scorer = FluencyScorer(smollm2.model, smollm2.tokenizer)
    fluent = scorer.score("How do I store key-value pairs?", INFORMATIVE)
    shuffled = " ".join(sorted(INFORMATIVE.split()))
    broken = scorer.score("How do I store key-value pairs?", shuffled)
    assert fluent.perplexity is not None and broken.perplexity is not None
    assert fluent.perplexity * 3 < broken.perplexity


def test_objective_and_fluency_in_a_run(tmp_path: Path) -> None:
    def generate(prompt: str, method: Method, seed: int) -> GeneratedAnswer:
        # The concise persona's own answer is short and friendly; direct is long and blunt.
        text = FRIENDLY if method.name == "single:concise" else INFORMATIVE + " " + UNFRIENDLY
        return GeneratedAnswer(text)

    class Fluent:
        def score(self, prompt: str, answer: str) -> object:
            from pj_core.eval.objective import Fluency

            return Fluency(repeated_trigram_share(answer), 10.0, word_count(answer))

    config = EvalConfig(
        limit=2,
        dimensions=("concise", "friendly", "humor"),
        methods=("single",),
        judges=("objective", "fluency"),
        bootstrap=50,
    )
    backends = Backends(
        generate=generate,
        pointwise={"objective": ObjectiveJudge},
        fluency=Fluent,  # type: ignore[arg-type]  # FluencyScorer's score, no model
    )
    log = run_evaluation(config, tmp_path / "r.jsonl", backends=backends, progress=False)
    scored = {(r["dimension"], r["method"]) for r in log.of_kind("score")}
    assert ("concise", "single:concise") in scored and ("concise", "direct") in scored
    assert not any(dimension == "humor" for dimension, _ in scored)  # no proxy: not scored
    fluency = list(log.of_kind("fluency"))
    assert len(fluency) == 2 * 4  # 2 prompts x (direct + 3 single-persona methods)
    summary = build_summary(log, n_resamples=50)
    rates = {(r["dimension"], r["method"]): r["rate"] for r in summary["win_rates"]}
    assert rates[("concise", "single:concise")] == 1.0  # shorter than direct on both prompts
    assert summary["fluency"]["direct"]["mean_perplexity"] == 10.0
    assert "Fluency guard" in markdown_table(summary)
