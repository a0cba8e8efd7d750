"""``pj generate`` with --json-schema / --regex / --grammar / --choice, on a tiny model with a
byte-level BPE tokenizer (one the grammar engine can read)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from pj_core.cli import main
from pj_core.engine import PersonaJudge
from tests._bpe import make_bpe_tokenizer
from tests._tiny import make_tiny_model

ARGS = ["generate", "hello", "--persona", "be funny", "--persona", "be brief", "--seed", "2"]
ARGS += ["--max-new-tokens", "40"]
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "enum": [1, 2, 3]}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(autouse=True)
def _tiny_bpe_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    tokenizer = make_bpe_tokenizer()
    engine = PersonaJudge(
        make_tiny_model(len(tokenizer), seed=3), tokenizer, eos_token_ids=[tokenizer.eos_token_id]
    )

    def from_pretrained(cls: type[PersonaJudge], spec: Any = None, **kwargs: Any) -> PersonaJudge:
        return engine

    monkeypatch.setattr(PersonaJudge, "from_pretrained", classmethod(from_pretrained))


def _answer(capsys: pytest.CaptureFixture[str], *extra: str) -> str:
    assert main([*ARGS, *extra]) == 0
    return capsys.readouterr().out.rstrip("\n")


def test_json_schema_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA), encoding="utf-8")
    data = json.loads(_answer(capsys, "--json-schema", str(path)))
    assert set(data) == {"ok", "n"} and data["n"] in {1, 2, 3}


def test_regex_grammar_and_choice(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert re.fullmatch("[0-9]{3}-[0-9]{4}", _answer(capsys, "--regex", "[0-9]{3}-[0-9]{4}"))
    grammar = tmp_path / "yes_no.lark"
    grammar.write_text('start: ("yes" | "no") "!"', encoding="utf-8")
    assert _answer(capsys, "--grammar", str(grammar)) in {"yes!", "no!"}
    assert _answer(capsys, "--choice", "red", "--choice", "green") in {"red", "green"}


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "holds a list"),
        ('{"type": "string", "format": "nope"}', "cannot be compiled"),
    ],
)
def test_bad_schema_files_are_typed_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, fragment: str
) -> None:
    path = tmp_path / "schema.json"
    path.write_text(content, encoding="utf-8")
    assert main([*ARGS, "--json-schema", str(path)]) != 0
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err


def test_missing_file_and_two_constraints_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*ARGS, "--grammar", "/no/such/file.lark"]) != 0
    assert "No such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*ARGS, "--regex", "a", "--choice", "a"])
    assert "not allowed with" in capsys.readouterr().err
