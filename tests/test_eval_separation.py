"""The separation report (pj_core.eval.separation, ``pj eval separation``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pj_core import cli
from pj_core.backends.hf.models import LoadedModel
from pj_core.errors import EvaluationError
from pj_core.eval.methods import direct_prompt, resolve_dimensions
from pj_core.eval.objective import Fluency, readability_grade, sentiment, word_count
from pj_core.eval.separation import (
    SEPARATION_METHODS,
    Generated,
    MethodSpec,
    SeparationConfig,
    axes_for,
    cost_table,
    engine_generate_fn,
    markdown_table,
    method_personas,
    parse_method,
    run_separation,
    write_report,
)
from pj_core.personas import compose

# Hand-written answers per set: B's are longer, harder and ruder.
ANSWER_A = "Sure! Plants use sun to make food. It is fun."
ANSWER_B = (
    "Obviously, photosynthetic organisms convert electromagnetic radiation into chemical "
    "energy through chlorophyll-mediated carboxylation; this is stupid to ask and I hate it."
)


def fake_generate(prompt: str, method: str, personas: Any, seed: int) -> str:
    """B's answer when the personas carry set B's preferences, else A's; direct is neutral."""
    if method == "direct":
        return "A plain answer."
    return ANSWER_B if "informative" in str(personas) else ANSWER_A


def test_axes_pair_opposite_poles_with_a_proxy() -> None:
    axes = axes_for(["concise", "elementary", "friendly"], ["informative", "expert", "unfriendly"])
    assert [(a.name, a.pole_a, a.pole_b) for a in axes] == [
        ("words", "concise", "informative"),
        ("grade", "elementary", "expert"),
        ("sentiment", "friendly", "unfriendly"),
    ]
    # B's pole "unfriendly" is *less* sentiment: the axis reads A - B.
    assert axes[2].label.startswith("sentiment A - B")
    with pytest.raises(EvaluationError, match="share no axis"):
        axes_for(["humor"], ["vivid"])


def test_every_composition_mode_is_a_method() -> None:
    assert SEPARATION_METHODS == (
        "direct",
        "pj:round-robin",
        "pj:one-per-preference",
        "pj:full",
        "default",
    )
    assert SeparationConfig().methods == SEPARATION_METHODS


def test_methods_hand_the_engine_what_they_say() -> None:
    preferences = ["concise", "elementary", "friendly"]
    direct, _ = method_personas("direct", preferences)
    assert direct[0].text == direct[1].text  # one system prompt: ordinary sampling
    assert direct[0].text == direct_prompt(resolve_dimensions(preferences))
    assert len(method_personas("pj:round-robin", preferences)[0]) == 2
    assert len(method_personas("pj:one-per-preference", preferences)[0]) == 3
    full, _ = method_personas("pj:full", preferences)
    assert full == compose(preferences, mode="full") and len(full) == 2
    assert method_personas("default", preferences)[0] == preferences
    with pytest.raises(EvaluationError, match="unknown method"):
        method_personas("nope", preferences)
    with pytest.raises(EvaluationError, match="unknown method 'nope'"):
        SeparationConfig(methods=("direct", "nope"))
    with pytest.raises(EvaluationError, match="methods must be"):
        SeparationConfig(methods=())


@pytest.mark.parametrize("bad", ["default@", "default@-1", "default@x", "default@inf", "x@1"])
def test_method_strengths_parse_or_fail_clearly(bad: str) -> None:
    assert parse_method("direct@1") == MethodSpec("direct", 1.0)
    assert parse_method("default") == MethodSpec("default", None)
    assert (
        method_personas("pj:full@2", ["concise"])[0] == method_personas("pj:full", ["concise"])[0]
    )
    with pytest.raises(EvaluationError, match=r"strength after '@'|unknown method"):
        SeparationConfig(methods=(bad,))


def test_the_engine_generator_decodes_with_the_methods_strength() -> None:
    calls: list[tuple[float | None, str | None]] = []

    class Engine:
        def generate(self, prompt: str, personas: Any, **settings: Any) -> Any:
            calls.append((settings.get("strength"), settings.get("decoder")))
            return type("Result", (), {"text": "ok", "token_ids": [1, 2]})()

    generate = engine_generate_fn(Engine(), SeparationConfig())
    assert generate("q", "default@1.5", ["concise"], 0) == Generated("ok", 2)
    generate("q", "direct", ["concise"], 0)
    generate("q", "pool:full@2", ["concise"], 0)
    generate("q", "default", ["concise"], 0)
    # default is what a user gets (the engine's decoder and strength unless @ sets one);
    # every other method pins its decoder and strength.
    assert calls == [
        (1.5, None),
        (0.0, "persona-judge"),
        (2.0, "pool"),
        (None, None),
    ]
    # The pool methods decode the personas of their Persona-judge counterparts.
    sets = ["concise", "expert", "friendly"]
    assert method_personas("pool:full", sets) == method_personas("pj:full", sets)
    assert method_personas("pool@1", sets) == method_personas("default", sets)


def test_separation_values_are_the_proxies_differences() -> None:
    config = SeparationConfig(limit=3, bootstrap=100)
    summary = run_separation(config, generate=fake_generate, progress=False)
    assert summary["prompts"] == 3
    assert len(summary["answers"]) == 3 * len(SEPARATION_METHODS) * 2
    moved = summary["separation"]["default"]
    assert moved["words"]["mean"] == pytest.approx(word_count(ANSWER_B) - word_count(ANSWER_A))
    assert moved["grade"]["mean"] == pytest.approx(
        readability_grade(ANSWER_B) - readability_grade(ANSWER_A)
    )
    assert moved["sentiment"]["mean"] == pytest.approx(sentiment(ANSWER_A) - sentiment(ANSWER_B))
    assert all(moved[axis]["mean"] > 0 for axis in ("words", "grade", "sentiment"))
    # Identical answers for both sets: no separation, and a zero-width interval.
    still = summary["separation"]["direct"]
    assert all(still[a]["mean"] == still[a]["low"] == still[a]["high"] == 0.0 for a in still)
    assert summary["fluency"]["default"]["mean_perplexity"] is None  # no scorer given


def test_cost_per_method_counts_tokens_and_compares_with_direct(tmp_path: Path) -> None:
    """A clock the generator advances: 2 s per token for direct, 6 s for default, 8 tokens."""
    now = [0.0]

    def slow_generate(prompt: str, method: str, personas: Any, seed: int) -> Generated:
        now[0] += 8 * (2.0 if method == "direct" else 6.0)
        return Generated(fake_generate(prompt, method, personas, seed), 8)

    config = SeparationConfig(limit=2, methods=("direct", "default"), bootstrap=50)
    summary = run_separation(config, generate=slow_generate, progress=False, clock=lambda: now[0])
    cost = summary["cost"]
    assert cost["direct"]["mean_tokens"] == cost["default"]["mean_tokens"] == 8.0
    assert cost["direct"]["mean_seconds"] == 16.0 and cost["default"]["mean_seconds"] == 48.0
    assert cost["direct"]["tokens_per_second"] == 0.5
    assert cost["direct"]["time_per_token_vs_direct"] == 1.0
    assert cost["default"]["time_per_token_vs_direct"] == pytest.approx(3.0)
    assert all(a["cost"]["tokens"] == 8 for a in summary["answers"])
    write_report(summary, tmp_path)
    table = (tmp_path / "cost.md").read_text()
    assert table == cost_table(summary) and "| default | 48.00 | 8.0 | 0.2 | 3.00x |" in table
    # Plain-text generators give no token counts: the cost table says so instead of guessing.
    plain = run_separation(config, generate=fake_generate, progress=False)["cost"]["default"]
    assert plain["mean_tokens"] is None and plain["tokens_per_second"] is None
    assert plain["mean_seconds"] is not None


def test_report_files_and_fluency_guard(tmp_path: Path) -> None:
    def fluency(prompt: str, answer: str) -> Fluency:
        return Fluency(0.0, float(len(answer)), len(answer))

    config = SeparationConfig(limit=2, methods=("direct", "default"), bootstrap=50)
    summary = run_separation(config, generate=fake_generate, fluency=fluency, progress=False)
    write_report(summary, tmp_path)
    table = (tmp_path / "separation.md").read_text()
    assert table == markdown_table(summary)
    assert "| default | +" in table and "words B - A (concise vs informative)" in table
    assert (tmp_path / "separation.png").stat().st_size > 5000
    answers = json.loads((tmp_path / "answers.json").read_text())
    assert {a["set"] for a in answers} == {"A", "B"} and len(answers) == 2 * 2 * 2
    stored = json.loads((tmp_path / "summary.json").read_text())
    assert "answers" not in stored and stored["settings"]["set_a"] == list(config.set_a)
    expected = (2 * len(ANSWER_A) + 2 * len(ANSWER_B)) / 4
    assert stored["fluency"]["default"]["mean_perplexity"] == pytest.approx(expected)


@pytest.mark.real_model
def test_cli_end_to_end_reproduces(
    smollm2: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The documented command on 2 prompts and 32 tokens; rerun, it gives the same table."""
    argv = [
        "eval",
        "separation",
        "--limit",
        "2",
        "--max-new-tokens",
        "32",
        "--methods",
        "direct,pj:round-robin,default",
        "--bootstrap",
        "200",
        "--no-progress",
    ]
    assert cli.main([*argv, "--out", str(tmp_path / "one")]) == 0
    printed = capsys.readouterr().out
    assert "| pj:round-robin |" in printed and "sentiment A - B" in printed
    assert cli.main([*argv, "--out", str(tmp_path / "two")]) == 0
    one = (tmp_path / "one" / "separation.md").read_text()
    assert one == (tmp_path / "two" / "separation.md").read_text()
    answers = json.loads((tmp_path / "one" / "answers.json").read_text())
    assert len(answers) == 2 * 3 * 2 and all(a["text"].strip() for a in answers)
    assert all(a["fluency"]["perplexity"] is not None for a in answers)
