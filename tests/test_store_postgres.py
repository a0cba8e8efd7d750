"""The PostgreSQL profile store on a real server (tests/_postgres.py): what SQLite's tests
cannot show. The interface's own tests (CRUD, revisions, threads, imports) run on both
databases in tests/test_store.py."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pj_core.errors import ProfileNotFoundError, ProfileStoreError, ProfileStoreUnavailableError
from pj_core.personas import PersonaProfile
from pj_core.personas.store import (
    PostgresProfileStore,
    ProfileStore,
    load_profile,
    open_store,
    redacted,
    shared_store,
)
from pj_core.personas.store.postgres import LOCK_SPACE, SCHEMA_VERSION
from tests._postgres import PostgresServer
from tests.test_store import _count, _increment

psycopg = pytest.importorskip("psycopg", reason="pip install 'persona-judge[postgres]'")

PROCESSES = 2
THREADS = 4
INCREMENTS = 15


@pytest.fixture()
def store(postgres_url: str) -> Iterator[PostgresProfileStore]:
    opened = PostgresProfileStore(postgres_url)
    yield opened
    opened.close()


def test_processes_threads_and_a_forked_store_lose_no_update(
    store: PostgresProfileStore, postgres_url: str
) -> None:
    """Separate interpreters, threads in each, and children forked with the parent's open
    store (whose pooled connections they must not use) all increment one counter."""
    store.put(PersonaProfile(user_id="shared"))
    store.get("shared")  # the parent's pool now holds a live connection
    script = textwrap.dedent(
        f"""
        import threading
        from pj_core.personas.store import PostgresProfileStore
        store = PostgresProfileStore({postgres_url!r})
        def bump(p):
            return p.evolve(metadata={{"count": p.metadata.get("count", 0) + 1}})
        def work():
            for _ in range({INCREMENTS}):
                store.update("shared", bump)
        threads = [threading.Thread(target=work) for _ in range({THREADS})]
        [t.start() for t in threads]
        [t.join() for t in threads]
        """
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        for _ in range(PROCESSES)
    ]
    context = multiprocessing.get_context("fork")
    forked = [
        context.Process(target=_inherited_increments, args=(store, INCREMENTS)) for _ in range(2)
    ]
    for child in forked:
        child.start()
    for _ in range(INCREMENTS):
        store.update("shared", _increment)
    for child in forked:
        child.join(timeout=120)
        assert child.exitcode == 0
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr
    expected = PROCESSES * THREADS * INCREMENTS + 2 * INCREMENTS + INCREMENTS
    shared = store.get("shared")
    assert _count(shared) == expected
    assert shared.revision == expected + 1


def _inherited_increments(store: PostgresProfileStore, n: int) -> None:  # a forked child
    for _ in range(n):
        store.update("shared", _increment)


def test_a_writer_that_holds_the_lock_too_long_gives_a_typed_error(postgres_url: str) -> None:
    store = PostgresProfileStore(postgres_url, timeout=0.5)
    store.put(PersonaProfile(user_id="alice"))
    with psycopg.connect(postgres_url, autocommit=True) as other:
        other.execute("SELECT pg_advisory_lock(%s, hashtext('alice'))", (LOCK_SPACE,))
        started = time.monotonic()
        with pytest.raises(ProfileStoreError, match=r"stayed locked for 0\.5 s") as info:
            store.update("alice", _increment)
        assert not isinstance(info.value, ProfileStoreUnavailableError)
        assert time.monotonic() - started < 10
        store.put(PersonaProfile(user_id="bob"))  # another user's writes do not wait
        assert store.get("alice").revision == 1  # reads do not wait either
    assert store.update("alice", _increment).revision == 2  # the lock is free again
    store.close()


def test_the_pool_bounds_connections_and_a_busy_pool_is_a_typed_error(postgres_url: str) -> None:
    store = PostgresProfileStore(postgres_url, pool_size=1, max_overflow=0)
    store.put(PersonaProfile(user_id="shared"))
    seen: list[int] = []

    def work() -> None:
        for _ in range(10):
            store.update("shared", _increment)

    def watch() -> None:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            while any(thread.is_alive() for thread in threads):
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'persona-judge' AND datname = current_database()"
                ).fetchone()
                assert row is not None
                seen.append(int(row[0]))
                time.sleep(0.005)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    watch()
    for thread in threads:
        thread.join()
    assert _count(store.get("shared")) == 60
    assert seen and max(seen) <= 1
    store.close()

    # The same bound from the URL, as --store gives it to every process
    tight = PostgresProfileStore(f"{postgres_url}?pool_size=1&max_overflow=0", timeout=0.3)
    entered = threading.Event()
    release = threading.Event()

    def hold(profile: PersonaProfile) -> PersonaProfile:
        entered.set()
        release.wait(10)
        return profile

    holder = threading.Thread(target=lambda: tight.update("shared", hold))
    holder.start()
    assert entered.wait(10)
    with pytest.raises(ProfileStoreUnavailableError, match="every pooled connection"):
        tight.get("shared")
    release.set()
    holder.join()
    assert tight.get("shared").revision == 62
    tight.close()


@pytest.mark.parametrize(
    "query", ["pool_size=0", "max_overflow=-1", "pool_size=many", "pool_size=1&pool_size=2"]
)
def test_bad_pool_limits_in_the_url_are_typed_errors(postgres_url: str, query: str) -> None:
    with pytest.raises(ProfileStoreError, match="must be an integer"):
        PostgresProfileStore(f"{postgres_url}?{query}")


def test_schema_is_created_once_and_a_newer_schema_is_refused(postgres_url: str) -> None:
    stores: list[PostgresProfileStore] = []
    threads = [
        threading.Thread(target=lambda: stores.append(PostgresProfileStore(postgres_url)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(stores) == 4
    for opened in stores:
        opened.close()
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM pj_schema").fetchall() == [(SCHEMA_VERSION,)]
        conn.execute("UPDATE pj_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ProfileStoreError, match="newer than this persona-judge"):
        PostgresProfileStore(postgres_url)


def test_a_corrupt_row_is_reported_and_replaced(
    store: PostgresProfileStore, postgres_url: str
) -> None:
    store.put(PersonaProfile(user_id="alice"))
    store.put(PersonaProfile(user_id="bob"))
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("UPDATE pj_profiles SET data = '{\"user_id\": 7' WHERE user_id = 'bob'")
    assert [p.user_id for p in store.list()] == ["alice"]
    assert [user for user, _ in store.corrupt_rows()] == ["bob"]
    with pytest.raises(ProfileStoreError, match="corrupt"):
        store.get("bob")
    assert store.put(PersonaProfile(user_id="bob")).revision == 2
    assert store.corrupt_rows() == []


def test_urls_choose_the_store_and_an_unknown_scheme_is_a_typed_error(
    postgres_url: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(postgres_url) as opened:
        assert isinstance(opened, PostgresProfileStore)
        opened.put(PersonaProfile(user_id="carol", preferences=["humor"]))
    alias = postgres_url.replace("postgresql://", "postgres://")
    assert load_profile("carol", alias).preferences == ("humor",)
    assert shared_store(alias) is shared_store(alias)
    monkeypatch.setenv("PJ_PROFILE_STORE", postgres_url)
    assert load_profile("carol").preferences == ("humor",)
    monkeypatch.chdir(str(tmp_path))
    for url in ("mysql://db/profiles", "http://example.com/p.db", "file:///tmp/p.db"):
        with pytest.raises(ProfileStoreError, match="is not supported"):
            open_store(url)
    with pytest.raises(ProfileNotFoundError, match="no profile store"):
        load_profile("carol", "sqlite:///relative.db")  # a look-up creates no file
    with open_store("sqlite:///relative.db") as sqlite_store:
        assert isinstance(sqlite_store, ProfileStore)
        sqlite_store.put(PersonaProfile(user_id="carol"))
    assert load_profile("carol", "sqlite:///relative.db").user_id == "carol"
    import os

    assert sorted(os.listdir(str(tmp_path))) == ["relative.db"]  # no 'postgresql:' folder


def test_an_unreachable_server_is_a_typed_error_that_hides_the_password(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    nowhere = f"postgresql://pj:s3cret@127.0.0.1:{_closed_port()}/profiles"
    with pytest.raises(ProfileStoreUnavailableError, match="cannot reach") as info:
        PostgresProfileStore(nowhere, connect_timeout=2)
    assert "s3cret" not in str(info.value) and "pj:***@" in str(info.value)
    assert redacted(nowhere) == nowhere.replace("s3cret", "***")

    # A server that goes away and comes back: calls fail typed, then recover by themselves.
    store = PostgresProfileStore(postgres_url, connect_timeout=2)
    store.put(PersonaProfile(user_id="alice"))
    postgres_server.stop("fast")
    try:
        with pytest.raises(ProfileStoreUnavailableError):
            store.get("alice")
        with pytest.raises(ProfileStoreUnavailableError):
            store.update("alice", _increment)
    finally:
        postgres_server.start()
    assert store.update("alice", _increment).revision == 2
    store.close()


def _closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_the_scale_out_benchmark_measures_both_stores(postgres_url: str, tmp_path: Path) -> None:
    from benchmarks.scale_out import store_costs

    for target in (str(tmp_path / "p.db"), postgres_url):
        with open_store(target) as opened:
            costs = store_costs(opened, repeats=40, threads=4)  # it checks no update was lost
        assert costs["get_ms"] > 0 and costs["update_ms"] > 0
        assert costs["concurrent_updates_per_s"] > 0
