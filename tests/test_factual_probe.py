"""The factual probe's scoring (benchmarks/factual_probe.py)."""

from __future__ import annotations

import pytest

from benchmarks.factual_probe import QUESTIONS, correct


@pytest.mark.parametrize(
    ("answer", "accepted", "expected"),
    [
        ("The capital of France is Paris.", "paris", True),
        ("La femme au pays de France", "paris", False),
        ("A spider has 8 legs.", "eight|8", True),
        ("Spiders have eight legs!", "eight|8", True),
        ("It has 18 legs.", "eight|8", False),
        ("Water freezes at 0 °C.", "zero|0", True),
        ("Water freezes at 100 degrees.", "zero|0", False),
        ("Plants breathe in CO2.", "carbon dioxide|co2", True),
    ],
)
def test_correct_matches_whole_accepted_words(answer: str, accepted: str, expected: bool) -> None:
    assert correct(answer, accepted) is expected


def test_every_question_has_an_accepted_answer() -> None:
    assert len(QUESTIONS) >= 8
    assert all(q.endswith(("?", ".")) and a for q, a in QUESTIONS)
