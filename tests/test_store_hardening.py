"""The profile store and the model cache on damaged or unusual ground (issue 32): read-only
databases and folders, ``close()`` while other threads use the store, a read-only model cache,
a writer killed with SIGKILL again and again, and a property test that drives random and
hostile profiles, JSON documents and paths through every store operation."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pj_core.backends.hf import model_cache
from pj_core.errors import ModelLoadError, PersonaJudgeError, ProfileStoreError
from pj_core.personas import PersonaProfile
from pj_core.personas.store import ProfileStore, parse_export


@contextlib.contextmanager
def read_only(*paths: Path) -> Iterator[None]:
    """Make files or folders read-only for this process: ``chmod`` for a normal user; for
    root, whom permissions do not stop, the immutable attribute (``chattr +i``)."""
    if os.geteuid() != 0:
        modes = {path: path.stat().st_mode for path in paths}
        for path in paths:
            path.chmod(modes[path] & ~0o222)
        try:
            yield
        finally:
            for path, mode in modes.items():
                path.chmod(mode)
        return
    done: list[Path] = []
    try:
        for path in paths:
            try:
                subprocess.run(["chattr", "+i", str(path)], check=True, capture_output=True)
            except (OSError, subprocess.CalledProcessError):
                pytest.skip("cannot make a file read-only for root here (no chattr +i)")
            done.append(path)
        yield
    finally:
        for path in done:
            subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)


def _digest(folder: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.iterdir())
        if p.is_file()
    }


@pytest.fixture()
def filled(tmp_path: Path) -> Path:
    path = tmp_path / "store" / "profiles.db"
    with ProfileStore(path) as store:
        store.put(PersonaProfile(user_id="alice", preferences=["humor", "concise"]))
        store.put(PersonaProfile(user_id="bob", description="likes trains"))
    return path


# ----------------------------------------------------------------------------- item 2


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_read_only_database_can_be_read_and_refuses_writes(filled: Path, what: str) -> None:
    before = _digest(filled.parent)
    target = filled if what == "file" else filled.parent
    with read_only(target):
        store = ProfileStore(filled)
        assert store.read_only
        assert store.get("alice").preferences == ("humor", "concise")
        assert [p.user_id for p in store.list()] == ["alice", "bob"]
        assert store.list_ids() == ["alice", "bob"] and store.corrupt_rows() == []
        assert len(parse_export(store.export_json())) == 2
        writes = [
            lambda: store.put(PersonaProfile(user_id="carol")),
            lambda: store.update("alice", lambda p: p.evolve(description="x")),
            lambda: store.delete("bob"),
            lambda: store.put_many([PersonaProfile(user_id="dave")]),
            lambda: store.import_json(store.export_json(), on_conflict="replace"),
        ]
        for write in writes:
            with pytest.raises(ProfileStoreError, match="read-only"):
                write()
        store.close()
    assert _digest(filled.parent)["profiles.db"] == before["profiles.db"]  # nothing written
    writable = ProfileStore(filled)  # writable again: writes work
    assert not writable.read_only
    assert writable.put(PersonaProfile(user_id="carol")).revision == 1
    writable.close()


def test_a_read_only_store_of_another_schema_version_says_so(filled: Path) -> None:
    with sqlite3.connect(filled) as conn:
        conn.execute("PRAGMA user_version = 1")
    with read_only(filled), pytest.raises(ProfileStoreError, match=r"older.*write access"):
        ProfileStore(filled)


# ----------------------------------------------------------------------------- item 1


def test_a_new_store_in_a_read_only_folder_is_a_typed_error(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    with read_only(folder):
        with pytest.raises(ProfileStoreError, match="read-only"):
            ProfileStore(folder / "profiles.db")
        with pytest.raises(ProfileStoreError, match="cannot create the folder"):
            ProfileStore(folder / "sub" / "profiles.db")
    assert list(folder.iterdir()) == []


# ----------------------------------------------------------------------------- item 6


@pytest.mark.parametrize("where", ["file", "memory"])
def test_close_while_other_threads_use_the_store(tmp_path: Path, where: str) -> None:
    store = ProfileStore(tmp_path / "busy.db" if where == "file" else ":memory:")
    store.put(PersonaProfile(user_id="seed"))
    unexpected: list[BaseException] = []
    committed: dict[str, int] = {}
    lock = threading.Lock()
    start = threading.Barrier(5)

    def worker(index: int) -> None:
        start.wait()
        for round_ in range(10_000):
            user_id = f"user{index}"
            try:
                stored = store.put(PersonaProfile(user_id=user_id, metadata={"round": round_}))
                with lock:
                    committed[user_id] = stored.revision
                store.get(user_id)
                store.list_ids()
            except ProfileStoreError as exc:
                if "closed" not in str(exc):
                    unexpected.append(exc)
                return
            except BaseException as exc:  # a raw sqlite3 error is the bug
                unexpected.append(exc)
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    start.wait()
    time.sleep(0.3)
    store.close()
    for thread in threads:
        thread.join(timeout=60)
    assert unexpected == []
    assert all(not thread.is_alive() for thread in threads)
    with pytest.raises(ProfileStoreError, match="closed"):
        store.get("seed")
    if where == "file":
        with ProfileStore(tmp_path / "busy.db") as reopened:  # every committed write is there
            for user_id, revision in committed.items():
                assert reopened.get(user_id).revision >= revision


# ----------------------------------------------------------------------------- item 8


def test_a_read_only_model_cache_is_a_typed_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv(model_cache.CACHE_ENV_VAR, str(cache))

    def build(out: Path) -> None:  # never reached
        (out / "config.json").write_text("{}")

    chunk = tmp_path / "chunk"
    chunk.write_bytes(b"weights")
    with read_only(cache):
        with pytest.raises(ModelLoadError, match="PJ_CACHE_DIR"):
            model_cache.ensure_converted("e" * 64, build)
        with pytest.raises(ModelLoadError, match="PJ_CACHE_DIR"):
            model_cache.assemble_chunks(
                [chunk], hashlib.sha256(b"weights").hexdigest(), cache / "assembled" / "m.gguf"
            )
        assert len(model_cache.file_sha256(chunk)) == 64  # hashing still works, unmemoised
    assert list(cache.iterdir()) == []


# ----------------------------------------------------------------------------- kill -9


WRITER = textwrap.dedent(
    """
    import sys
    from pj_core.personas import PersonaProfile
    from pj_core.personas.store import ProfileStore

    store = ProfileStore(sys.argv[1])
    start = int(sys.argv[2])
    for n in range(start, start + 100_000):
        user = f"user{n % 7}"
        stored = store.put(PersonaProfile(user_id=user, metadata={"n": n}))
        print(user, n, stored.revision, flush=True)   # printed only once committed
    """
)


@pytest.mark.timeout(300)
def test_a_writer_killed_again_and_again_loses_no_committed_profile(tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    ProfileStore(path).close()
    last: dict[str, tuple[int, int]] = {}  # user -> (n, revision) of its last committed write
    start = 0
    for round_ in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdout is not None
        deadline = time.monotonic() + 60
        for lines, line in enumerate(child.stdout, start=1):
            user, n, revision = line.split()
            last[user] = (int(n), int(revision))
            start = int(n) + 1
            if lines >= 20 + 15 * round_ or time.monotonic() > deadline:
                break
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        # Lines written but not yet read by us were committed too: read them before judging.
        for line in child.stdout.read().splitlines():
            user, n, revision = line.split()
            last[user] = (int(n), int(revision))
            start = int(n) + 1
        with ProfileStore(path) as store:
            assert store.corrupt_rows() == []
            for user, (number, committed) in last.items():
                profile = store.get(user)
                # The killed write may have committed after its line went unprinted: it is
                # then newer, never older.
                assert profile.revision >= committed
                stored = profile.metadata["n"]
                assert isinstance(stored, int) and stored >= number and profile.user_id == user


# ----------------------------------------------------------------------------- properties

PROPERTY_SETTINGS = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

TEXT = st.one_of(
    st.text(max_size=20),
    st.sampled_from(["", " ", "\x00", "\ud800", "a" * 300, "../x", "alice", "bob", "humor"]),
)
JSONISH = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(min_value=10**30, max_value=10**40),
        st.floats(),
        TEXT,
    ),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=10,
)
PROFILE_DATA = st.one_of(
    st.fixed_dictionaries(
        {"user_id": st.sampled_from(["alice", "bob", "carol"])},
        optional={
            "preferences": st.lists(
                st.one_of(TEXT, st.sampled_from(["humor", "concise", "Be brief."])), max_size=3
            ),
            "description": st.none() | TEXT,
            "defaults": st.one_of(
                st.fixed_dictionaries(
                    {},
                    optional={
                        "temperature": JSONISH,
                        "max_new_tokens": JSONISH,
                        "lookahead": st.integers(-2, 70),
                    },
                ),
                JSONISH,
            ),
            "metadata": st.dictionaries(TEXT, JSONISH, max_size=3),
            "revision": JSONISH,
            "schema_version": st.sampled_from([1, 2, 3, "2"]),
        },
    ),
    st.dictionaries(TEXT, JSONISH, max_size=4),
)
DOCUMENT = st.one_of(
    st.builds(
        lambda profiles, version: json.dumps(
            {"format": "persona-judge-profiles", "schema_version": version, "profiles": profiles},
            allow_nan=True,
        ),
        st.lists(PROFILE_DATA, max_size=3),
        st.sampled_from([1, 2, "1"]),
    ),
    st.text(max_size=40),
    st.just('{"format": "persona-judge-profiles", "profiles": ' + "[" * 5000 + "]" * 5000 + "}"),
)


def _outcome(action: Any) -> Any:
    """The action's result, or its typed error; anything else fails the test."""
    try:
        return action()
    except PersonaJudgeError as exc:
        return exc


@PROPERTY_SETTINGS
@given(
    operations=st.lists(st.tuples(st.sampled_from("pudgli"), PROFILE_DATA, DOCUMENT), max_size=6)
)
def test_random_and_hostile_operations_give_results_or_typed_errors(
    operations: list[tuple[str, dict[str, Any], str]],
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="pj-prop-"))
    store = ProfileStore(folder / "p.db")
    model: dict[str, PersonaProfile] = {}  # what the store must hold
    try:
        for op, data, document in operations:
            user_id = data.get("user_id", "alice")
            user_id = user_id if isinstance(user_id, str) else "alice"
            if op == "p":
                made = _outcome(lambda: PersonaProfile.from_data(data))  # noqa: B023
                if isinstance(made, PersonaProfile):
                    stored = _outcome(lambda: store.put(made))  # noqa: B023
                    if isinstance(stored, PersonaProfile):
                        model[stored.user_id] = stored
            elif op == "u":
                updated = _outcome(
                    lambda: store.update(user_id, lambda p: p.evolve(description="changed"))  # noqa: B023
                )
                if isinstance(updated, PersonaProfile):
                    model[user_id] = updated
            elif op == "d":
                if not isinstance(_outcome(lambda: store.delete(user_id)), PersonaJudgeError):  # noqa: B023
                    model.pop(user_id, None)
            elif op == "g":
                got = _outcome(lambda: store.get(user_id))  # noqa: B023
                if user_id in model:
                    assert got == model[user_id]
                else:
                    assert isinstance(got, PersonaJudgeError)
            elif op == "l":
                assert {p.user_id: p for p in store.list()} == model
            else:
                written = _outcome(lambda: store.import_json(document, on_conflict="replace"))  # noqa: B023
                if isinstance(written, list):
                    for profile in parse_export(document):
                        model[profile.user_id] = store.get(profile.user_id)
            exported = _outcome(lambda: store.export_file(folder / "out.json"))
            assert exported == len(model)
            assert {p.user_id for p in parse_export((folder / "out.json").read_text())} == set(
                model
            )
        for profile in store.list():  # never a wrong-user row
            assert store.get(profile.user_id).user_id == profile.user_id
    finally:
        store.close()
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()


# Generated names stay inside the test's folder ("/" cannot start or separate them); the
# listed paths probe the root, a folder, an unreachable place, a huge name and a NUL.
PATHS = st.one_of(
    TEXT.map(lambda text: text.replace("/", "_").replace(".", "_") or "_"),
    st.sampled_from([".", "/", "/proc/x/y.db", "a" * 5000, "x/\x00/y", "sub/dir/p.db"]),
)


@PROPERTY_SETTINGS
@given(path=PATHS)
def test_random_store_paths_give_a_store_or_a_typed_error(path: str) -> None:
    folder = Path(tempfile.mkdtemp(prefix="pj-path-"))
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        opened = _outcome(lambda: ProfileStore(path))
        if isinstance(opened, ProfileStore):
            opened.put(PersonaProfile(user_id="alice"))
            assert opened.get("alice").user_id == "alice"
            opened.close()
    finally:
        os.chdir(cwd)
        for root, dirs, files in os.walk(folder, topdown=False):
            for name in files:
                os.unlink(os.path.join(root, name))
            for name in dirs:
                os.rmdir(os.path.join(root, name))
        folder.rmdir()


# ----------------------------------------------------------------------------- item 7


def _tiny_source(
    folder: Path, sha: str, builds: list[Path], hidden: int
) -> Any:  # a models._Source over a cache entry built from a tiny model
    import torch  # noqa: F401  (loaded by the model anyway)

    from pj_core.backends.hf import models
    from tests._tiny import make_tiny_model, make_tiny_tokenizer

    tokenizer = make_tiny_tokenizer()
    original = folder / "original"
    make_tiny_model(len(tokenizer), hidden=hidden).save_pretrained(original)
    tokenizer.save_pretrained(original)

    def build(out: Path) -> None:
        builds.append(out)
        for item in original.iterdir():
            (out / item.name).write_bytes(item.read_bytes())

    return models._Source(
        name="tiny-cached",
        key=f"test:{sha}",
        is_cache_entry=True,
        prepare=lambda: model_cache.ensure_converted(sha, build),
    )


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` at ``offset`` in place, then restore the size and mtime."""
    before = path.stat()
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size


def _unsampled_offset(size: int) -> int:
    """An offset that :func:`model_cache.sampled_digest` does not read."""
    span = size - model_cache.SAMPLE_HEAD - model_cache.SAMPLE_BLOCK
    start = model_cache.SAMPLE_HEAD + span * 10 // model_cache.SAMPLE_COUNT
    gap = model_cache.SAMPLE_HEAD + span * 11 // model_cache.SAMPLE_COUNT - start
    assert gap > model_cache.SAMPLE_BLOCK + 3 * 4096
    return start + model_cache.SAMPLE_BLOCK + 4096


def _answer(loaded: Any) -> str:
    from pj_core.engine import PersonaJudge

    engine = PersonaJudge(loaded.model, loaded.tokenizer, context_window=64)
    return engine.generate("hello", ["be funny", "be brief"], seed=0, max_new_tokens=6).text


def test_cached_weights_changed_in_place_never_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    from pj_core.backends.hf import models

    monkeypatch.setenv(model_cache.CACHE_ENV_VAR, str(tmp_path / "cache"))
    builds: list[Path] = []
    source = _tiny_source(tmp_path, "f" * 64, builds, hidden=512)

    def load() -> Any:
        return models._load_uncached(source, torch.device("cpu"), torch.float32, False, pack=False)

    first = load()
    expected = _answer(first)  # the intact entry passes its full check
    assert model_cache.pending(first.model) is None
    entry = model_cache.converted_dir("f" * 64)
    weights = entry / "model.safetensors"
    assert weights.stat().st_size > 8 * 1024 * 1024
    # 4 KiB changed where the sampled digest does not look, size and mtime restored: the
    # load passes the quick check, the background hash catches it before any answer.
    _overwrite(weights, _unsampled_offset(weights.stat().st_size), os.urandom(4096))
    assert model_cache.is_complete(entry)
    damaged = load()
    with pytest.raises(ModelLoadError, match="changed on disk"):
        _answer(damaged)
    with pytest.raises(ModelLoadError):  # and every later call
        _answer(damaged)
    assert not entry.exists() and len(builds) == 1  # removed; the next load rebuilds it
    rebuilt = load()
    assert len(builds) == 2 and _answer(rebuilt) == expected


def test_a_cached_header_rewritten_in_place_is_caught_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(model_cache.CACHE_ENV_VAR, str(tmp_path / "cache"))
    builds: list[Path] = []
    source = _tiny_source(tmp_path, "a" * 64, builds, hidden=32)
    entry = source.prepare()
    _overwrite(entry / "model.safetensors", 0, b"\0" * 4096)
    assert not model_cache.is_complete(entry)
    assert source.prepare() == entry and len(builds) == 2  # rebuilt


def test_a_gguf_rewritten_in_place_with_size_and_mtime_restored_is_hashed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(model_cache.CACHE_ENV_VAR, str(tmp_path / "cache"))
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + os.urandom(5 * 1024 * 1024))
    first = model_cache.file_sha256(gguf)
    assert model_cache.file_sha256(gguf) == first  # memoised
    _overwrite(gguf, 0, b"\0" * 4096)  # a wiped header
    assert model_cache.file_sha256(gguf) == hashlib.sha256(gguf.read_bytes()).hexdigest() != first
