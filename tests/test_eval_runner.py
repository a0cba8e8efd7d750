"""The runner: records, resume after an interruption, both orders asked, the report."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from pj_core.errors import EvaluationError
from pj_core.eval.config import EvalConfig
from pj_core.eval.judges import CONTENT_FREE_ANSWER, PairwiseJudge, ScoreItem
from pj_core.eval.methods import Method
from pj_core.eval.records import ResultsLog
from pj_core.eval.report import build_summary, markdown_table, write_report
from pj_core.eval.runner import Backends, GeneratedAnswer, run_evaluation

CONFIG = EvalConfig(limit=3, dimensions=("humor", "vivid"), max_new_tokens=8, bootstrap=200)


class Interrupt(Exception):
    pass


class FakeModels:
    """Deterministic stand-ins for the models that count their calls.

    Persona-judge answers are long, the others short; the judge and both scorers prefer the
    longer answer, so the expected outcomes are known in advance.
    """

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.asked: list[str] = []

    def generate(self, prompt: str, method: Method, seed: int) -> GeneratedAnswer:
        self.calls["generate"] += 1
        words = 6 if method.name == "persona-judge" else 2
        # One letter per method, so only persona-judge's length differs from direct's.
        label = {"direct": "d", "persona-judge": "p", "persona-judge-base": "b"}.get(
            method.name, method.name[-1]
        )
        text = " ".join([label] * words) + f" {seed % 97}"
        return GeneratedAnswer(text, "length", {"tokens": words, "acceptance_rate": 0.5})

    def letters(self, system: str, user: str) -> tuple[float, float]:
        if f"[Question]\n{CONTENT_FREE_ANSWER}\n" in user:  # the judge's calibration pair
            self.calls["calibration"] += 1
            return 0.5, 0.5
        self.calls["pairwise"] += 1
        self.asked.append(user)
        a = user.split("[Answer A]\n")[1].split("\n\n")[0]
        b = user.split("[Answer B]\n")[1].split("\n\n")[0]
        if len(a) == len(b):
            return 0.5, 0.5
        return (0.8, 0.2) if len(a) > len(b) else (0.2, 0.8)

    def score(self, items: Any) -> list[float]:
        self.calls["score"] += len(items)
        return [float(len(item.response)) for item in items]

    def backends(self) -> Backends:
        fake = self

        class Scorer:
            name = "reward"

            def score(self, items: Sequence[ScoreItem]) -> list[float]:
                return fake.score(items)

        return Backends(
            generate=self.generate,
            pairwise=lambda: PairwiseJudge(self.letters),
            pointwise={"reward": Scorer, "embedding": Scorer},
        )


def _content(path: Path) -> dict[str, Any]:
    """The records' meaning, without timings or file order."""
    out = {}
    for record in ResultsLog(path).records.values():
        out[record["key"]] = {k: v for k, v in record.items() if k != "stats"}
    return out


def test_full_run_asks_both_orders_and_gets_the_expected_outcomes(tmp_path: Path) -> None:
    fake = FakeModels()
    log = run_evaluation(CONFIG, tmp_path / "r.jsonl", backends=fake.backends(), progress=False)
    # 3 prompts x (direct, pj, pj-base, single:humor, single:vivid).
    assert fake.calls["generate"] == 15
    pairwise = list(log.of_kind("pairwise"))
    # 2 dimensions x 3 prompts x 3 compared methods x 2 orders.
    assert len(pairwise) == 36 and fake.calls["pairwise"] == 36
    orders = Counter((r["dimension"], r["prompt_id"], r["method_a"]) for r in pairwise)
    assert set(orders.values()) == {2}
    for r in pairwise:
        if r["method_a"] == "persona-judge":
            # The persona-judge answer is in slot A for "ab" and in slot B for "ba".
            slot_a = r["order"] == "ab"
            assert r["verdict"] == ("A" if slot_a else "B")
    # Swapped order really swaps the texts the judge reads.
    ab = [u for u in fake.asked if u.split("[Answer A]\n")[1].startswith("p p ")]
    ba = [u for u in fake.asked if u.split("[Answer B]\n")[1].startswith("p p ")]
    assert len(ab) == len(ba) == 6

    summary = build_summary(log, n_resamples=200)
    rates = {(r["judge"], r["dimension"], r["method"]): r for r in summary["win_rates"]}
    for judge in ("pairwise", "reward", "embedding"):
        assert rates[(judge, "humor", "persona-judge")]["rate"] == 1.0
        assert rates[(judge, "humor", "persona-judge")]["low"] == 1.0
        # Same length as direct: ties everywhere.
        assert rates[(judge, "vivid", "persona-judge-base")]["rate"] == 0.5
        assert rates[(judge, "vivid", "persona-judge-base")]["ties"] == 3
    assert ("pairwise", "humor", "single:vivid") not in rates  # judged on its own dimension only
    # Soft reading: P(A) = 0.8 with persona-judge in slot A, 0.2 with it in slot B.
    assert rates[("pairwise-soft", "humor", "persona-judge")]["rate"] == pytest.approx(0.8)
    assert rates[("pairwise-soft", "vivid", "persona-judge-base")]["rate"] == pytest.approx(0.5)
    assert rates[("reward", "humor", "single:humor")]["rate"] == 0.5


def test_interrupted_run_resumes_with_only_the_remainder(tmp_path: Path) -> None:
    reference = tmp_path / "reference.jsonl"
    run_evaluation(CONFIG, reference, backends=FakeModels().backends(), progress=False)

    path = tmp_path / "resumed.jsonl"
    written: list[str] = []

    def stop_after_20(record: dict[str, Any]) -> None:
        written.append(record["key"])
        if len(written) == 20:
            raise Interrupt

    first = FakeModels()
    with pytest.raises(Interrupt):
        run_evaluation(
            CONFIG, path, backends=first.backends(), on_record=stop_after_20, progress=False
        )
    # Prompt by prompt: the first prompt's 5 answers, the pairwise judge's content-free
    # calibration of both dimensions, its 12 pairwise judgments and 1 of its 8 reward scores
    # (scored in one call) made it to disk, after the config record.
    assert dict(first.calls) == {"generate": 5, "calibration": 2, "pairwise": 12, "score": 8}
    assert len(ResultsLog(path).records) == 21

    second = FakeModels()
    run_evaluation(CONFIG, path, backends=second.backends(), progress=False)
    # Only the remainder: the other two prompts, and the 7 missing scores of the first.
    assert second.calls["generate"] == 10
    assert second.calls["pairwise"] == 24 and second.calls["calibration"] == 0
    assert second.calls["score"] == 7 + 8 + 2 * 16
    assert _content(path) == _content(reference)

    third = FakeModels()
    run_evaluation(CONFIG, path, backends=third.backends(), progress=False)
    assert sum(third.calls.values()) == 0  # nothing left to do: no model is even asked


def test_a_cut_off_last_line_is_repaired_and_redone(tmp_path: Path) -> None:
    reference = tmp_path / "reference.jsonl"
    run_evaluation(CONFIG, reference, backends=FakeModels().backends(), progress=False)
    lines = reference.read_text().splitlines(keepends=True)
    path = tmp_path / "cut.jsonl"
    # Ten whole records, then half of the eleventh (an interrupted write).
    path.write_text("".join(lines[:10]) + lines[10][: len(lines[10]) // 2])
    fake = FakeModels()
    run_evaluation(CONFIG, path, backends=fake.backends(), progress=False)
    # The config line, prompt 1's 5 answers, both calibrations and 2 judgments survived; the
    # cut line (the 3rd judgment) is redone.
    assert fake.calls["generate"] == 10 and fake.calls["pairwise"] == 3 * 12 - 2
    assert _content(path) == _content(reference)
    for line in path.read_text().splitlines():
        json.loads(line)  # every line is whole again


def test_a_damaged_line_in_the_middle_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_text('{"kind": "config", "key": "config"}\n{broken\n{"kind": "x", "key": "y"}\n')
    with pytest.raises(EvaluationError, match="line 2"):
        ResultsLog(path)


def test_resuming_with_other_settings_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    run_evaluation(
        EvalConfig(limit=1, dimensions=("humor",), judges=("reward",)),
        path,
        backends=FakeModels().backends(),
        progress=False,
    )
    with pytest.raises(EvaluationError, match="max_new_tokens"):
        run_evaluation(
            EvalConfig(limit=1, dimensions=("humor",), judges=("reward",), max_new_tokens=99),
            path,
            backends=FakeModels().backends(),
            progress=False,
        )
    # More prompts and another judge are fine: only the new work is done.
    fake = FakeModels()
    run_evaluation(
        EvalConfig(limit=2, dimensions=("humor",), judges=("reward", "pairwise")),
        path,
        backends=fake.backends(),
        progress=False,
    )
    assert fake.calls["generate"] == 4 and fake.calls["pairwise"] == 2 * 3 * 2


def test_report_files_and_table(tmp_path: Path) -> None:
    log = run_evaluation(
        CONFIG, tmp_path / "r.jsonl", backends=FakeModels().backends(), progress=False
    )
    summary = write_report(log, tmp_path, n_resamples=200)
    assert (tmp_path / "chart.png").stat().st_size > 5000
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert stored["records"] == {"generation": 15, "pairwise": 36, "score": 48}
    assert stored["generation"]["persona-judge"]["mean_tokens"] == 6
    table = markdown_table(summary)
    assert "| humor | pairwise | 3 | 1.00 [1.00, 1.00] (3/0/0) |" in table
    assert table == (tmp_path / "table.md").read_text()


def test_soft_pairwise_reading_cancels_a_position_bias() -> None:
    from pj_core.eval.report import outcomes_pairwise

    def record(order: str, prob_first: float, verdict: str) -> dict[str, Any]:
        return {
            "judge": "pairwise",
            "dimension": "humor",
            "prompt_id": "p",
            "order": order,
            "method_a": "persona-judge",
            "prob_first": prob_first,
            "verdict": verdict,
        }

    # The judge prefers slot A both times (bias), a little more when the method is in it.
    out = outcomes_pairwise([record("ab", 0.7, "A"), record("ba", 0.6, "A")])
    assert out[("pairwise", "humor", "persona-judge")] == {"p": 0.5}
    assert out[("pairwise-soft", "humor", "persona-judge")]["p"] == pytest.approx(0.55)
