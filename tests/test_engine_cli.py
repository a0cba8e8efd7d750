"""``pj generate`` through the command-line dispatcher, on the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from pj_core.cli import main
from pj_core.engine import PersonaJudge
from pj_core.settings import PAPER


@pytest.fixture(autouse=True)
def _tiny_engine(
    monkeypatch: pytest.MonkeyPatch,
    tiny_model: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> Iterator[list[Any]]:
    loads: list[Any] = []

    def from_pretrained(cls: type[PersonaJudge], spec: Any = None, **kwargs: Any) -> PersonaJudge:
        loads.append((spec, kwargs))
        return PersonaJudge(tiny_model, tiny_tokenizer)

    monkeypatch.setattr(PersonaJudge, "from_pretrained", classmethod(from_pretrained))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield loads
    torch.set_num_threads(before)


ARGS = ["generate", "hello", "--persona", "be funny", "--persona", "be brief", "--seed", "3"]


def test_generate_prints_the_engines_answer(
    capsys: pytest.CaptureFixture[str],
    tiny_model: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    assert main([*ARGS, "--max-new-tokens", "8", "--lookahead", "2"]) == 0
    printed = capsys.readouterr()
    expected = PersonaJudge(tiny_model, tiny_tokenizer).generate(
        "hello", ["be funny", "be brief"], seed=3, max_new_tokens=8, lookahead=2
    )
    assert printed.out == expected.text + "\n"
    assert "stats:" not in printed.err


def test_explain_shows_rounds_roles_outcomes_and_stats(
    capsys: pytest.CaptureFixture[str],
    tiny_model: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    engine = PersonaJudge(tiny_model, tiny_tokenizer, defaults=PAPER)
    seed = next(  # a seed whose answer lasts at least two rounds
        s
        for s in range(50)
        if engine.generate(
            "hello", ["be funny", "be brief"], seed=s, max_new_tokens=10
        ).stats.rounds
        >= 2
    )
    args = ["generate", "hello", "--persona", "be funny", "--persona", "be brief"]
    args += ["--seed", str(seed), "--max-new-tokens", "10", "--explain", "--strategy", "lockstep"]
    args += ["--decoder", "persona-judge", "--strength", "0"]  # the rounds are Persona-judge's
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "P1: be funny" in err and "P2: be brief" in err
    assert "round 0: P1 drafts, P2 judges:" in err
    assert "round 1: P2 drafts, P1 judges:" in err
    assert "acceptance rate" in err and "strategy lockstep" in err
    assert "\033[" not in err  # not a terminal: no colour codes


def test_fixed_roles_and_settings_reach_the_engine(capsys: pytest.CaptureFixture[str]) -> None:
    args = [*ARGS, "--fixed-roles", "--temperature", "0", "--max-new-tokens", "6", "--explain"]
    assert main([*args, "--decoder", "persona-judge"]) == 0
    err = capsys.readouterr().err
    assert "P1 drafts" in err and "P2 drafts" not in err  # persona 1 always drafts


def test_bad_input_gives_a_clear_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hello", "--persona", " ", "--persona", "be brief"]) == 1
    assert "empty" in capsys.readouterr().err
    assert main([*ARGS, "--top-p", "0"]) == 1
    assert "top_p" in capsys.readouterr().err
    assert main(["generate", "hello"]) == 1
    assert "give two or more personas" in capsys.readouterr().err


def test_pool_decoder_and_strength_from_the_command_line(
    capsys: pytest.CaptureFixture[str],
    tiny_model: LlamaForCausalLM,
    tiny_tokenizer: PreTrainedTokenizerFast,
) -> None:
    args = [*ARGS, "--decoder", "pool", "--strength", "1.5", "--max-new-tokens", "8"]
    assert main([*args, "--explain"]) == 0
    printed = capsys.readouterr()
    expected = PersonaJudge(tiny_model, tiny_tokenizer).generate(
        "hello", ["be funny", "be brief"], seed=3, max_new_tokens=8, decoder="pool", strength=1.5
    )
    assert printed.out == expected.text + "\n"
    assert "every token (pooled) from the pool of all personas: (" in printed.err
    assert "drafts" not in printed.err
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        main([*ARGS, "--decoder", "mixture"])
    assert "invalid choice: 'mixture'" in capsys.readouterr().err
    assert main([*ARGS, "--strength", "-1"]) == 1
    assert "strength must be" in capsys.readouterr().err
