"""Bad input to the ``pj`` command: one line ``pj: error: ...`` on stderr and a non-zero
exit, never a traceback; and no command starts hours of work or writes files unasked."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pj_core import cli

BIG_SEED = str(2**64)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pj: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(autouse=True)
def in_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PJ_PROFILE_STORE", str(tmp_path / "default.db"))
    return tmp_path


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--seed", BIG_SEED], "seed must be in 0..4294967295"),
        (["--seed", "-1"], "seed must be in 0..4294967295"),
        (["--persona", "Be \udcff funny."], "lone surrogate"),
    ],
)
def test_generate_fails_fast_before_loading_the_model(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    argv: list[str],
    fragment: str,
) -> None:
    from pj_core.engine import PersonaJudge

    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded for a command that was bound to fail")

    monkeypatch.setattr(PersonaJudge, "from_pretrained", no_model)
    personas = [] if "--persona" in argv else ["--persona", "Be funny.", "--persona", "Be brief."]
    code, _, err = run(capsys, "generate", "Hi", *personas, "--persona", "Be kind.", *argv)
    assert_one_line_error(code, err, fragment)
    code, _, err = run(capsys, "generate", "hi \udcff", *personas, "--persona", "Be kind.")
    assert_one_line_error(code, err, "the prompt holds a lone surrogate")


@pytest.mark.parametrize(
    "command", [["list"], ["add", "alice", "-p", "humor"], ["export", "x.json"]]
)
def test_a_folder_as_the_store_is_one_line(
    capsys: pytest.CaptureFixture[str], in_tmp: Path, command: list[str]
) -> None:
    (in_tmp / "folder").mkdir()
    code, _, err = run(capsys, "profiles", command[0], *command[1:], "--store", "folder")
    assert_one_line_error(code, err, "is not a file path", "folder/profiles.db")


def test_export_to_a_missing_folder_or_onto_a_folder_is_one_line(
    capsys: pytest.CaptureFixture[str], in_tmp: Path
) -> None:
    assert run(capsys, "profiles", "add", "alice", "-p", "humor")[0] == 0
    missing = in_tmp / "missing" / "x.json"
    code, _, err = run(capsys, "profiles", "export", str(missing))
    assert_one_line_error(code, err, f"cannot export to {missing}", "must exist")
    (in_tmp / "out").mkdir()
    code, _, err = run(capsys, "profiles", "export", str(in_tmp / "out"))
    assert_one_line_error(code, err, "it is a folder", "profiles.json")
    assert not [p.name for p in in_tmp.rglob("*") if p.name.endswith(".tmp")]  # none left


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[" * 100_000 + "]" * 100_000, "nests its JSON too deeply"),
        (
            '{"format": "persona-judge-profiles", "schema_version": 1, "profiles": '
            '[{"user_id": "a", "metadata": {"n": ' + "9" * 5000 + "}}]}",
            "out of range",
        ),
        (
            '{"format": "persona-judge-profiles", "schema_version": 1, "profiles": '
            '[{"user_id": "a", "metadata": {"k": "x \\ud800"}}]}',
            "lone surrogate",
        ),
        (
            '{"format": "persona-judge-profiles", "schema_version": 1, "profiles": '
            '[{"user_id": "a", "description": "x \\udfff"}]}',
            "lone surrogate",
        ),
    ],
)
def test_hostile_import_files_are_one_line_and_import_nothing(
    capsys: pytest.CaptureFixture[str], in_tmp: Path, content: str, fragment: str
) -> None:
    path = in_tmp / "import.json"
    path.write_text(content, encoding="utf-8")
    code, _, err = run(capsys, "profiles", "import", str(path))
    assert_one_line_error(code, err, fragment, "nothing was imported")
    code, out, _ = run(capsys, "profiles", "list", "--json")
    assert code == 0 and json.loads(out or "[]") == []


def test_a_closed_pipe_ends_quietly(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pj personas list | head -1``: the reader went away; exit 0, no traceback."""

    class ClosedPipe:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(sys, "stdout", ClosedPipe())
    assert cli.main(["personas", "list"]) == 0


def test_eval_needs_an_explicit_size_and_writes_nothing_without_it(
    capsys: pytest.CaptureFixture[str], in_tmp: Path
) -> None:
    code, _, err = run(capsys, "eval")
    assert_one_line_error(code, err, "--limit N")
    assert not (in_tmp / "eval-runs").exists()
    with pytest.raises(SystemExit):
        cli.main(["eval", "--help"])
    out = capsys.readouterr().out
    assert "95% bootstrap" in " ".join(out.split()) and "%%" not in out


def test_a_corrupt_row_does_not_block_the_others(
    capsys: pytest.CaptureFixture[str], in_tmp: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One unreadable row (bad JSON) and one that names another user: the rest are listed
    and exported, the bad ones reported; put replaces a corrupt row, delete removes it, and
    get never hands one user another user's profile."""
    import sqlite3

    from pj_core.personas import PersonaProfile
    from pj_core.personas.store import ProfileStore, ProfileStoreError

    path = in_tmp / "p.db"
    store = ProfileStore(path)
    for user in ("alice", "bob", "carol"):
        store.put(PersonaProfile(user_id=user, preferences=["humor"]))
    store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE profiles SET data = '{not json' WHERE user_id = 'bob'")
        data = conn.execute("SELECT data FROM profiles WHERE user_id = 'alice'").fetchone()[0]
        conn.execute("UPDATE profiles SET data = ? WHERE user_id = 'carol'", (data,))
    store = ProfileStore(path)
    assert [p.user_id for p in store.list()] == ["alice"]
    assert "corrupt profile 'bob'" in caplog.text
    assert [user for user, _ in store.corrupt_rows()] == ["bob", "carol"]
    with pytest.raises(ProfileStoreError, match="names user 'alice'"):
        store.get("carol")
    replaced = store.put(PersonaProfile(user_id="bob", preferences=["concise"]))
    assert replaced.revision == 2 and store.get("bob").preferences == ("concise",)
    store.close()

    code, out, err = run(capsys, "profiles", "list", "--store", str(path))
    assert code == 0 and "alice" in out and "bob" in out and "carol" not in out
    assert "profile 'carol'" in err and "pj profiles delete carol" in err
    code, _, err = run(capsys, "profiles", "export", str(in_tmp / "x.json"), "--store", str(path))
    exported = json.loads((in_tmp / "x.json").read_text())["profiles"]
    assert code == 0 and [p["user_id"] for p in exported] == ["alice", "bob"]
    assert "profile 'carol'" in err
    code, _, _ = run(capsys, "profiles", "delete", "carol", "--store", str(path))
    assert code == 0 and ProfileStore(path).corrupt_rows() == []
