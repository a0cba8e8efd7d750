"""``pj eval``: arguments to settings, and the report of a finished run from one command."""

from __future__ import annotations

from pathlib import Path

import pytest

from pj_core.cli import build_parser, main
from pj_core.cli.eval import config_from_args
from pj_core.eval.runner import run_evaluation
from tests.test_eval_runner import FakeModels

ARGS = [
    "eval",
    "--limit",
    "2",
    "--dimensions",
    "humor,vivid",
    "--methods",
    "persona-judge",
    "--max-new-tokens",
    "8",
    "--bootstrap",
    "100",
    "--no-progress",
]


def test_arguments_become_the_settings() -> None:
    args = build_parser().parse_args([*ARGS, "--judges", "reward,embedding", "--seed", "3"])
    config = config_from_args(args)
    assert config.dimensions == ("humor", "vivid") and config.methods == ("persona-judge",)
    assert config.judges == ("reward", "embedding") and config.seed == 3
    assert config.max_new_tokens == 8 and config.limit == 2 and config.prompts == "sample"


def test_the_command_reports_a_finished_run_without_loading_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    config = config_from_args(build_parser().parse_args([*ARGS, "--out", str(out)]))
    run_evaluation(config, out / "results.jsonl", backends=FakeModels().backends(), progress=False)
    # Everything is in the results file, so the command only resumes (nothing left) and reports.
    assert main([*ARGS, "--out", str(out), "--chart", str(tmp_path / "c.png")]) == 0
    printed = capsys.readouterr().out
    assert "| humor | pairwise | 2 | 1.00 [1.00, 1.00] (2/0/0) |" in printed
    assert (out / "summary.json").exists() and (tmp_path / "c.png").stat().st_size > 5000


def test_other_settings_are_refused_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    config = config_from_args(build_parser().parse_args([*ARGS, "--out", str(out)]))
    run_evaluation(config, out / "results.jsonl", backends=FakeModels().backends(), progress=False)
    assert main([*ARGS, "--out", str(out), "--temperature", "1.0"]) == 1
    assert "temperature differ" in capsys.readouterr().err


def test_the_report_covers_only_the_prompts_asked_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    longer = [a if a != "2" else "3" for a in ARGS]  # --limit 3
    config = config_from_args(build_parser().parse_args([*longer, "--out", str(out)]))
    run_evaluation(config, out / "results.jsonl", backends=FakeModels().backends(), progress=False)
    assert main([*ARGS, "--out", str(out)]) == 0  # --limit 2 on a 3-prompt file
    assert "| humor | pairwise | 2 |" in capsys.readouterr().out
