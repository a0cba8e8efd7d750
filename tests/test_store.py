"""ProfileStore: CRUD, revisions, concurrency (threads and processes), crashes, migrations,
JSON export/import."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from pj_core.errors import (
    InvalidPersonaError,
    ProfileImportError,
    ProfileNotFoundError,
    ProfileStoreError,
    UnknownPreferenceError,
)
from pj_core.personas import GenerationDefaults, PersonaProfile
from pj_core.personas.store import (
    SCHEMA_VERSION,
    AbstractProfileStore,
    PostgresProfileStore,
    ProfileConflictError,
    ProfileStore,
    SqlProfileStore,
    default_store_path,
    load_profile,
    open_store,
    parse_export,
)

THREADS = 8
INCREMENTS = 20  # per thread / per process


def _count(profile: PersonaProfile) -> int:
    value = profile.metadata.get("count", 0)
    assert isinstance(value, int)
    return value


def _increment(profile: PersonaProfile) -> PersonaProfile:
    return profile.evolve(metadata={**profile.metadata, "count": _count(profile) + 1})


@pytest.fixture(params=["file", "memory", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SqlProfileStore:
    """The interface's tests run on SQLite (a file, memory) and on a real PostgreSQL server."""
    opened: SqlProfileStore
    if request.param == "postgres":
        opened = PostgresProfileStore(request.getfixturevalue("postgres_url"))
    else:
        opened = ProfileStore(tmp_path / "profiles.db" if request.param == "file" else ":memory:")
    request.addfinalizer(opened.close)
    return opened


# ----------------------------------------------------------------------------- basics


def test_put_get_list_delete(store: SqlProfileStore) -> None:
    alice = store.put(PersonaProfile(user_id="alice", preferences=["humor", "concise"]))
    assert alice.revision == 1
    store.put(PersonaProfile(user_id="bob", description="Likes trains."))
    assert store.get("alice").preferences == ("humor", "concise")
    assert store.list_ids() == ["alice", "bob"]
    assert [p.user_id for p in store.list()] == ["alice", "bob"]
    assert "alice" in store and "carol" not in store
    store.delete("alice")
    assert store.list_ids() == ["bob"]
    with pytest.raises(ProfileNotFoundError, match="pj profiles add alice"):
        store.get("alice")
    with pytest.raises(ProfileNotFoundError):
        store.delete("alice")
    store.delete("alice", missing_ok=True)


def test_put_is_an_upsert_that_counts_revisions_and_keeps_created_at(
    store: SqlProfileStore,
) -> None:
    first = store.put(PersonaProfile(user_id="alice", preferences=["humor"]))
    second = store.put(PersonaProfile(user_id="alice", preferences=["vivid"]))
    assert second.revision == 2 and second.preferences == ("vivid",)
    assert second.created_at == first.created_at
    assert second.updated_at >= first.updated_at
    assert store.get("alice") == second


def test_expected_revision_detects_a_concurrent_write(store: SqlProfileStore) -> None:
    read = store.put(PersonaProfile(user_id="alice"))
    store.put(read.evolve(description="written by someone else"))
    with pytest.raises(ProfileConflictError) as info:
        store.put(read.evolve(description="stale"), expected_revision=read.revision)
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert store.get("alice").description == "written by someone else"
    with pytest.raises(ProfileConflictError):
        store.put(PersonaProfile(user_id="alice"), expected_revision=0)  # 0 = must be new
    assert store.put(PersonaProfile(user_id="new"), expected_revision=0).revision == 1


def test_update_is_read_modify_write_with_default(store: SqlProfileStore) -> None:
    with pytest.raises(ProfileNotFoundError):
        store.update("alice", _increment)
    created = store.update("alice", _increment, default=PersonaProfile(user_id="alice"))
    assert _count(created) == 1 and created.revision == 1
    assert _count(store.update("alice", _increment)) == 2
    with pytest.raises(InvalidPersonaError, match="must not change the user id"):
        store.update("alice", lambda p: p.evolve(user_id="mallory"))
    with pytest.raises(UnknownPreferenceError):
        store.update("alice", lambda p: p.model_copy(update={"preferences": ("humr",)}))
    assert store.get("alice").revision == 2


def test_invalid_user_ids_and_closed_store(store: SqlProfileStore) -> None:
    with pytest.raises(InvalidPersonaError, match="user id"):
        store.get("no spaces please")
    with pytest.raises(InvalidPersonaError, match="PersonaProfile"):
        store.put({"user_id": "alice"})  # type: ignore[arg-type]
    store.close()
    with pytest.raises(ProfileStoreError, match="closed"):
        store.get("alice")


def test_default_path_and_load_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PJ_PROFILE_STORE", raising=False)
    assert default_store_path() == Path.home() / ".local/share/persona-judge/profiles.db"
    monkeypatch.setenv("PJ_PROFILE_STORE", str(tmp_path / "env.db"))
    assert default_store_path() == tmp_path / "env.db"
    with pytest.raises(ProfileNotFoundError, match="no profile store"):
        load_profile("alice")
    with pytest.raises(ProfileStoreError, match="no profile store"):
        open_store(must_exist=True)
    with open_store() as opened:
        opened.put(PersonaProfile(user_id="alice", preferences=["humor"]))
    assert load_profile("alice").preferences == ("humor",)


def test_the_interface_is_small_enough_for_another_backend() -> None:
    abstract = AbstractProfileStore.__abstractmethods__
    assert abstract == {"get", "put", "update", "delete", "list", "put_many"}


# ----------------------------------------------------------------------------- concurrency


def test_threads_lose_no_update_and_never_read_a_partial_profile(store: SqlProfileStore) -> None:
    store.put(PersonaProfile(user_id="shared", preferences=["humor"]))
    errors: list[BaseException] = []
    stop_reading = threading.Event()

    def writer(index: int) -> None:
        try:
            own = f"user{index}"
            for step in range(INCREMENTS):
                store.update("shared", _increment)
                # Different profiles: plain puts, half of them optimistic.
                profile = PersonaProfile(user_id=own, metadata={"step": step})
                store.put(profile, expected_revision=step if index % 2 else None)
        except BaseException as exc:  # reported below; a thread cannot fail the test itself
            errors.append(exc)

    def reader() -> None:
        last = 0
        try:
            while not stop_reading.is_set():
                current = _count(store.get("shared"))  # get() validates the whole JSON
                assert current >= last, "a reader saw the counter go back"
                last = current
                store.list()
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=reader) for _ in range(2)]
    writers = [threading.Thread(target=writer, args=(i,)) for i in range(THREADS)]
    for thread in readers + writers:
        thread.start()
    for thread in writers:
        thread.join()
    stop_reading.set()
    for thread in readers:
        thread.join()
    assert errors == []
    shared = store.get("shared")
    assert _count(shared) == THREADS * INCREMENTS
    assert shared.revision == THREADS * INCREMENTS + 1
    for index in range(THREADS):
        own = store.get(f"user{index}")
        assert own.metadata == {"step": INCREMENTS - 1} and own.revision == INCREMENTS


def test_optimistic_retries_from_threads_lose_no_update(tmp_path: Path) -> None:
    store = ProfileStore(tmp_path / "p.db")
    store.put(PersonaProfile(user_id="shared"))
    conflicts = []

    def writer() -> None:
        for _ in range(10):
            while True:
                read = store.get("shared")
                try:
                    store.put(_increment(read), expected_revision=read.revision)
                    break
                except ProfileConflictError:
                    conflicts.append(1)

    threads = [threading.Thread(target=writer) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _count(store.get("shared")) == THREADS * 10
    store.close()


PROCESS_WRITER = textwrap.dedent(
    """
    import sys
    from pj_core.personas import GenerationDefaults, PersonaProfile
    from pj_core.personas.store import ProfileStore

    path, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    store = ProfileStore(path)
    def inc(p):
        return p.evolve(metadata={**p.metadata, "count": p.metadata.get("count", 0) + 1})
    for _ in range(n):
        store.update("shared", inc)
        store.update(name, inc, default=PersonaProfile(user_id=name))
        store.get("shared")
    store.close()
    """
)


def test_two_processes_and_threads_share_one_file_without_lost_updates(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    store = ProfileStore(path)
    store.put(PersonaProfile(user_id="shared"))
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS_WRITER, str(path), f"proc{i}", str(INCREMENTS)],
            stderr=subprocess.PIPE,
        )
        for i in range(2)
    ]
    errors: list[BaseException] = []

    def in_process_writer() -> None:
        try:
            for _ in range(INCREMENTS):
                store.update("shared", _increment)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=in_process_writer) for _ in range(2)]
    for thread in threads:
        thread.start()
    last = 0
    while any(p.poll() is None for p in processes):
        current = _count(store.get("shared"))
        assert current >= last
        last = current
    for thread in threads:
        thread.join()
    for process in processes:
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr.decode()
    assert errors == []
    assert _count(store.get("shared")) == 4 * INCREMENTS
    assert _count(store.get("proc0")) == _count(store.get("proc1")) == INCREMENTS
    store.close()


# ----------------------------------------------------------------------------- crashes


CRASH_MID_WRITE = textwrap.dedent(
    """
    import os, sys
    from pj_core.personas import GenerationDefaults, PersonaProfile
    from pj_core.personas.store import ProfileStore

    original = ProfileStore._write
    def write_then_die(self, conn, profile, current):
        original(self, conn, profile, current)   # the row is written, COMMIT not yet run
        os._exit(3)
    ProfileStore._write = write_then_die
    ProfileStore(sys.argv[1]).put(PersonaProfile(user_id="alice", description="half written"))
    """
)


def test_a_process_killed_mid_write_leaves_the_previous_profile(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    with ProfileStore(path) as store:
        before = store.put(PersonaProfile(user_id="alice", description="intact"))
    done = subprocess.run([sys.executable, "-c", CRASH_MID_WRITE, str(path)], check=False)
    assert done.returncode == 3
    with ProfileStore(path) as store:
        assert store.get("alice") == before
        assert store.put(before.evolve(description="next")).revision == 2  # lock released


def test_an_exception_mid_write_rolls_back(
    store: SqlProfileStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = store.put(PersonaProfile(user_id="alice", description="intact"))
    original = SqlProfileStore._write

    def write_then_fail(self, conn, profile, current):  # type: ignore[no-untyped-def]
        original(self, conn, profile, current)
        raise OSError("disk unplugged")

    monkeypatch.setattr(type(store), "_write", write_then_fail)
    with pytest.raises(OSError, match="unplugged"):
        store.put(before.evolve(description="lost"))
    with pytest.raises(OSError):
        store.put_many([PersonaProfile(user_id="bob"), PersonaProfile(user_id="carol")])
    monkeypatch.undo()
    assert store.get("alice") == before
    assert store.list_ids() == ["alice"]

    def failing_change(profile: PersonaProfile) -> PersonaProfile:
        raise RuntimeError("app bug")

    with pytest.raises(RuntimeError):
        store.update("alice", failing_change)
    assert store.get("alice") == before


def test_a_writer_that_holds_the_lock_too_long_gives_a_typed_error(tmp_path: Path) -> None:
    path = tmp_path / "locked.db"
    store = ProfileStore(path, timeout=0.2)
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(ProfileStoreError, match="locked"):
            store.put(PersonaProfile(user_id="alice"))
        assert store.list_ids() == []  # WAL: readers still read
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert store.put(PersonaProfile(user_id="alice")).revision == 1
    store.close()


# ----------------------------------------------------------------------------- schema


def test_a_v0_database_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "v0.db"
    sqlite3.connect(path).close()  # an empty file: version 0, no tables
    with ProfileStore(path) as store:
        store.put(PersonaProfile(user_id="alice"))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_v1_database_is_migrated_keeping_its_profiles(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    old = PersonaProfile(user_id="alice", preferences=["humor"]).model_dump_json()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE profiles (user_id TEXT PRIMARY KEY, data TEXT NOT NULL)")
        conn.execute("INSERT INTO profiles VALUES ('alice', ?)", (old,))
        conn.execute("PRAGMA user_version = 1")
    conn.close()
    with ProfileStore(path) as store:
        alice = store.get("alice")
        assert alice.preferences == ("humor",) and alice.revision == 1
        assert store.update("alice", _increment).revision == 2


def test_profiles_written_by_an_older_version_are_read_and_imported(
    store: SqlProfileStore, tmp_path: Path
) -> None:
    """Profile layout 1 (before defaults.strength) in a stored row and in an import file."""
    v1 = {"schema_version": 1, "user_id": "dave", "defaults": {"top_k": 5}}
    path = tmp_path / "old-rows.db"
    with ProfileStore(path) as fresh:
        fresh.put(PersonaProfile(user_id="dave"))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE profiles SET data = ? WHERE user_id = 'dave'", (json.dumps(v1),))
    conn.close()
    with ProfileStore(path) as reopened:
        dave = reopened.get("dave")
        assert dave.schema_version == 2 and dave.generation_kwargs() == {"top_k": 5}
        saved = reopened.update("dave", lambda p: p.evolve(defaults={"top_k": 5, "strength": 1.0}))
        assert reopened.get("dave").generation_kwargs() == {"top_k": 5, "strength": 1.0}
        assert saved.schema_version == 2
    assert store.import_json(_export_with([{**v1, "user_id": "erin"}])) == ["erin"]
    assert store.get("erin").schema_version == 2


def test_a_newer_or_foreign_database_is_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(ProfileStoreError, match="upgrade persona-judge"):
        ProfileStore(newer)
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ProfileStoreError, match="not a valid SQLite database"):
        ProfileStore(garbage)


def test_a_corrupt_stored_row_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "rows.db"
    with ProfileStore(path) as store:
        store.put(PersonaProfile(user_id="alice"))
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE profiles SET data = '{\"user_id\": 5' WHERE user_id = 'alice'")
    conn.close()
    with ProfileStore(path) as store, pytest.raises(ProfileStoreError, match="corrupt"):
        store.get("alice")


# ----------------------------------------------------------------------------- export/import


def test_export_import_round_trip(store: SqlProfileStore, tmp_path: Path) -> None:
    store.put(
        PersonaProfile(
            user_id="alice",
            preferences=["humor", "Use metric units."],
            defaults=GenerationDefaults(lookahead=6),
            metadata={"locale": "fr"},
        )
    )
    store.put(PersonaProfile(user_id="bob", description="Likes trains."))
    exported = tmp_path / "export.json"
    assert store.export_file(exported) == 2
    document = json.loads(exported.read_text())
    assert document["format"] == "persona-judge-profiles" and document["schema_version"] == 1
    with ProfileStore(":memory:") as other:
        assert other.import_file(exported) == ["alice", "bob"]
        alice = other.get("alice")
        assert alice.preferences == ("humor", "Use metric units.")
        assert alice.generation_kwargs() == {"lookahead": 6}
        assert alice.metadata == {"locale": "fr"}


def _export_with(profiles: list[object]) -> str:
    return json.dumps(
        {"format": "persona-judge-profiles", "schema_version": 1, "profiles": profiles}
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("{not json", "not valid JSON"),
        (b"\xff\xfe\x00garbage", "not valid JSON"),
        ("[]", "not a persona-judge profile export"),
        (json.dumps({"format": "other", "profiles": []}), "not a persona-judge"),
        (
            json.dumps({"format": "persona-judge-profiles", "schema_version": 7, "profiles": []}),
            "schema_version 7",
        ),
        (json.dumps({"format": "persona-judge-profiles", "schema_version": 1}), '"profiles"'),
        (_export_with([{"user_id": "carol"}, {"user_id": "bad id"}]), "profile #1 ('bad id')"),
        (
            _export_with([{"user_id": "carol"}, {"user_id": "dan", "preferences": ["humr"]}]),
            "did you mean 'humor'",
        ),
        (_export_with([{"user_id": "carol"}, "text"]), "profile #1 is not a JSON object"),
        (_export_with([{"user_id": "carol"}, {"user_id": "carol"}]), "appears twice"),
        (_export_with([{"user_id": "carol"}, {"user_id": "alice"}]), "already exist: alice"),
    ],
)
def test_a_corrupt_import_raises_and_changes_nothing(
    store: SqlProfileStore, tmp_path: Path, content: str | bytes, fragment: str
) -> None:
    store.put(PersonaProfile(user_id="alice", preferences=["humor"]))
    before = store.list()
    path = tmp_path / "import.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ProfileImportError) as info:
        store.import_file(path)
    assert fragment in str(info.value)
    assert "nothing was imported" in str(info.value)
    assert store.list() == before


def test_import_conflict_modes(store: SqlProfileStore) -> None:
    store.put(PersonaProfile(user_id="alice", preferences=["humor"]))
    document = _export_with([{"user_id": "alice", "preferences": ["vivid"]}, {"user_id": "bob"}])
    assert store.import_json(document, on_conflict="skip") == ["bob"]
    assert store.get("alice").preferences == ("humor",)
    assert store.import_json(document, on_conflict="replace") == ["alice", "bob"]
    assert store.get("alice").preferences == ("vivid",)
    assert store.get("alice").revision == 2
    with pytest.raises(ProfileImportError, match="cannot read"):
        store.import_file("/nonexistent/file.json")
    assert [p.user_id for p in parse_export(_export_with([]))] == []


def test_connections_of_finished_threads_are_released(tmp_path: Path) -> None:
    import gc

    store = ProfileStore(tmp_path / "p.db")  # the opening thread holds one connection
    store.put(PersonaProfile(user_id="alice"))
    threads = [threading.Thread(target=store.get, args=("alice",)) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    del threads
    gc.collect()
    assert len(store._held) == 1
    store.close()
    with pytest.raises(ProfileStoreError, match="closed"):
        store.list()
