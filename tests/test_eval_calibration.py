"""The pairwise judge's content-free calibration and the report's decisiveness statement."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pj_core.eval.config import EvalConfig
from pj_core.eval.judges import CONTENT_FREE_ANSWER, PairwiseJudge, band, calibrated_prob_first
from pj_core.eval.methods import Method
from pj_core.eval.report import build_summary, markdown_table
from pj_core.eval.runner import Backends, GeneratedAnswer, run_evaluation

CONFIG = EvalConfig(
    limit=4, dimensions=("humor",), methods=("persona-judge",), judges=("pairwise",), bootstrap=50
)


def test_calibration_divides_out_a_constant_letter_bias() -> None:
    # A judge that triples slot A's odds: on a content-free pair it says 0.75 / 0.25.
    assert calibrated_prob_first(0.75, 0.25, 0.75, 0.25) == pytest.approx(0.5)
    assert calibrated_prob_first(0.9, 0.1, 0.75, 0.25) == pytest.approx(0.75)
    assert calibrated_prob_first(0.5, 0.5, 0.75, 0.25) == pytest.approx(0.25)
    assert calibrated_prob_first(0.0, 0.0, 0.5, 0.5) == 0.5  # no letter at all: no preference
    assert [band(p, 0.05) for p in (0.56, 0.55, 0.45, 0.44)] == ["A", "tie", "tie", "B"]


def _generate(prompt: str, method: Method, seed: int) -> GeneratedAnswer:
    return GeneratedAnswer("long answer " * 5 if method.name == "persona-judge" else "short")


def _run(tmp_path: Path, slot_a_odds: float, prefers_longer: bool) -> dict[str, Any]:
    def letters(system: str, user: str) -> tuple[float, float]:
        a = user.split("[Answer A]\n")[1].split("\n\n")[0]
        b = user.split("[Answer B]\n")[1].split("\n\n")[0]
        quality_a = quality_b = 1.0
        if prefers_longer and a != b:
            quality_a, quality_b = (2.0, 1.0) if len(a) > len(b) else (1.0, 2.0)
        odds_a = slot_a_odds * quality_a
        return odds_a / (odds_a + quality_b), quality_b / (odds_a + quality_b)

    backends = Backends(generate=_generate, pairwise=lambda: PairwiseJudge(letters))
    log = run_evaluation(CONFIG, tmp_path / "r.jsonl", backends=backends, progress=False)
    calibration = list(log.of_kind("calibration"))
    assert len(calibration) == 1 and CONTENT_FREE_ANSWER == "N/A"
    assert calibration[0]["prob_first"] == pytest.approx(slot_a_odds / (slot_a_odds + 1.0))
    return build_summary(log, n_resamples=50)


def test_a_biased_judge_with_a_real_preference_is_read_after_calibration(tmp_path: Path) -> None:
    summary = _run(tmp_path, slot_a_odds=3.0, prefers_longer=True)
    rates = {r["judge"]: r["rate"] for r in summary["win_rates"]}
    # Strict: with persona-judge in slot B the bias still says A (0.6 vs 0.4): all ties.
    assert rates["pairwise"] == 0.5
    # Calibrated: 2:1 for the longer answer in both orders: every pair a win.
    assert rates["pairwise-calibrated"] == 1.0
    decisive = summary["pairwise_decisiveness"]
    assert decisive["pairwise"]["informative"] is False
    assert decisive["pairwise-calibrated"]["decisive_share"] == 1.0
    table = markdown_table(summary)
    assert "pairwise: decisive on only 0% of 4 pairs: this judge is uninformative" in table
    assert "pairwise-calibrated: decisive (both orders agree) on 100% of pairs." in table


def test_a_judge_that_sees_nothing_is_called_uninformative(tmp_path: Path) -> None:
    summary = _run(tmp_path, slot_a_odds=99.0, prefers_longer=False)
    table = markdown_table(summary)
    assert "pairwise: decisive on only 0%" in table
    assert "pairwise-calibrated: decisive on only 0%" in table
    assert summary["pairwise_content_free_prob_a"] == pytest.approx(0.99)
