"""Profiles in SQLite (standard library): a file shared by threads and processes, or memory.

- **Where.** A file path, or ``":memory:"``. :func:`~pj_core.personas.store.default_store_path`
  is ``$PJ_PROFILE_STORE`` if set, else ``~/.local/share/persona-judge/profiles.db``.
- **Concurrency.** WAL journal (readers never block the writer), ``busy_timeout`` so
  writers queue instead of failing, every write in a ``BEGIN IMMEDIATE`` transaction. Each
  thread uses its own connection (and a forked child opens fresh ones); the in-memory store
  is one connection behind a lock. :meth:`ProfileStore.update` is an atomic
  read-modify-write, and ``put(..., expected_revision=n)`` is optimistic locking: either
  way no update is lost.
- **Crashes.** A write is one transaction: a process killed or an exception raised before
  ``COMMIT`` leaves the previous version intact. ``synchronous=FULL`` makes commits durable.
- **Schema.** ``PRAGMA user_version`` records the layout; :data:`MIGRATIONS` upgrades older
  files in one transaction when a store opens them.

The profile logic (rows, revisions, imports) is
:class:`~pj_core.personas.store.base.SqlProfileStore`, shared with PostgreSQL; this module is
SQLite's connections and transactions.

Example:
    >>> from pj_core.personas import PersonaProfile
    >>> with ProfileStore(":memory:") as store:
    ...     _ = store.put(PersonaProfile(user_id="alice", preferences=["humor"]))
    ...     _ = store.update("alice", lambda p: p.evolve(preferences=[*p.preferences, "concise"]))
    ...     store.get("alice").preferences, store.get("alice").revision
    (('humor', 'concise'), 2)
"""

from __future__ import annotations

import builtins
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from pj_core.errors import ProfileStoreError
from pj_core.personas.store.base import BUSY_TIMEOUT_S, SqlProfileStore, Transaction, upgrade


def _v0_to_v1(conn: sqlite3.Connection) -> None:
    # The first layout: one JSON document per user id.
    conn.execute(
        "CREATE TABLE IF NOT EXISTS profiles (user_id TEXT PRIMARY KEY, data TEXT NOT NULL)"
    )


def _v1_to_v2(conn: sqlite3.Connection) -> None:
    # Revisions for optimistic locking and lost-update tests; updated_at for listings.
    conn.execute("ALTER TABLE profiles ADD COLUMN revision INTEGER NOT NULL DEFAULT 1")
    conn.execute("ALTER TABLE profiles ADD COLUMN updated_at TEXT NOT NULL DEFAULT ''")
    conn.execute(
        "UPDATE profiles SET updated_at = coalesce(json_extract(data, '$.updated_at'), '')"
    )


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (_v0_to_v1, _v1_to_v2)
"""``MIGRATIONS[i]`` upgrades a database from ``user_version`` i to i + 1."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The database layout this code writes (``PRAGMA user_version``)."""


class _HeldConnection:
    """One thread's connection. The thread's ``threading.local`` holds the only strong
    reference, so when the thread ends the connection is closed: short-lived threads do not
    leak connections. The store keeps weak references to close the rest in ``close()``."""

    __slots__ = ("__weakref__", "busy", "conn", "pid")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.busy = False  # inside a session: close() leaves it to its thread

    def __del__(self) -> None:
        if self.pid == os.getpid():
            self.conn.close()


# Connections a forked child inherited: kept alive and untouched, never closed in the child.
_INHERITED: builtins.list[_HeldConnection] = []


def _short(text: str, limit: int = 80) -> str:
    """``text`` cut to ``limit`` characters for a message."""
    return text if len(text) <= limit else text[:limit] + "..."


def _encodable(text: str) -> bool:
    """Whether SQLite can take ``text`` as a file name (it encodes names as UTF-8)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ProfileStore(SqlProfileStore):
    """Profiles in a SQLite database: a file shared by threads and processes, or in memory.

    A database this process cannot write (a read-only file or folder, an immutable file)
    opens read-only: ``read_only`` says why, reads and exports work, and every write raises
    :class:`ProfileStoreError`. ``close()`` lets operations under way in other threads finish;
    later ones raise :class:`ProfileStoreError`.

    Args:
        path: the database file (created, with its folder, if absent) or ``":memory:"``.
        timeout: seconds a writer waits for another writer before
            :class:`ProfileStoreError`.

    Example:
        >>> from pj_core.personas import PersonaProfile
        >>> store = ProfileStore(":memory:")
        >>> store.put(PersonaProfile(user_id="bob", preferences=["vivid"])).revision
        1
        >>> store.list_ids()
        ['bob']
        >>> store.close()
    """

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = BUSY_TIMEOUT_S) -> None:
        self.in_memory = str(path) == ":memory:"
        self.path: Path | None = None if self.in_memory else Path(path).expanduser()
        self.timeout = timeout
        self._closed = False
        self._registry_lock = threading.Lock()
        self._held: weakref.WeakSet[_HeldConnection] = weakref.WeakSet()
        self._local = threading.local()
        # One connection behind a lock in memory (a second connection would see another
        # database); in a file, one connection per thread and SQLite does the locking.
        self._memory_lock = threading.RLock()
        self._memory_conn: sqlite3.Connection | None = None
        if self.path is not None:
            if not _encodable(str(path)):
                raise ProfileStoreError(
                    f"profile store path {str(path)!r} holds characters that are not valid "
                    "Unicode (a lone surrogate, e.g. from undecodable bytes); give a path in "
                    "valid text"
                )
            try:
                is_folder = "\0" not in str(path) and self.path.is_dir()
            except OSError as exc:  # e.g. a name longer than the file system allows
                raise ProfileStoreError(
                    f"profile store path {_short(str(path))!r} cannot be used: {exc.strerror}; "
                    "give a shorter path to a database file"
                ) from None
            if "\0" in str(path) or not str(path).strip() or is_folder:
                raise ProfileStoreError(
                    f"profile store path {str(path)!r} is not a file path (empty, a folder, or "
                    "holding a NUL character); give a database file such as "
                    f"{str(Path(str(path).replace(chr(0), '') or '.') / 'profiles.db')!r}"
                )
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ProfileStoreError(
                    f"cannot create the folder of profile store {self.path}: {exc.strerror}"
                ) from None
        self.read_only = self._read_only_reason()
        with self._session() as conn:
            if self.read_only:
                self._check_version(conn)
            else:
                self._migrate(conn)

    @property
    def where(self) -> str:
        """The database path, or ``":memory:"``, for messages."""
        return ":memory:" if self.path is None else str(self.path)

    # ----- connections and transactions

    def _read_only_reason(self) -> str | None:
        """Why this process may only read the database file, or None: the file or its folder
        cannot be written (permissions, a read-only mount, an immutable file)."""
        if self.path is None or not self.path.exists():
            return None  # a new file: creating it says whether the folder is writable
        if not os.access(self.path, os.W_OK):
            return "the file is read-only"
        if not os.access(self.path.parent, os.W_OK):
            return "its folder is read-only"
        return None

    def _connect(self) -> sqlite3.Connection:
        target = ":memory:" if self.path is None else str(self.path)
        uri = False
        if self.path is not None and self.read_only:
            # Read-only: no WAL switch, no journal. In a read-only folder SQLite cannot create
            # the WAL index beside the file, so the file is opened as immutable (nobody can
            # write it there in WAL mode either).
            target = self.path.resolve().as_uri() + "?mode=ro"
            if not os.access(self.path.parent, os.W_OK):
                target += "&immutable=1"
            uri = True
        # isolation_level=None: we issue BEGIN/COMMIT ourselves. check_same_thread=False only so
        # close() may close every thread's connection; each is still used by one thread.
        try:
            conn = sqlite3.connect(
                target,
                timeout=self.timeout,
                isolation_level=None,
                check_same_thread=False,
                uri=uri,
            )
        except sqlite3.Error as exc:  # e.g. a new file in a folder without write permission
            why = ""
            path = self.path
            if path is not None and not path.exists() and not os.access(path.parent, os.W_OK):
                why = f"; its folder {path.parent} is read-only, so it cannot be created"
            raise ProfileStoreError(f"cannot open profile store {self.where}: {exc}{why}") from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            if uri:
                return conn
            if self.path is not None:
                mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
                if str(mode).lower() != "wal":
                    raise ProfileStoreError(
                        f"profile store {self.where} could not switch to WAL mode (got {mode}); "
                        "put it on a local file system"
                    )
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._wrap(exc) from None
        return conn

    def _closed_error(self) -> ProfileStoreError:
        return ProfileStoreError(f"profile store {self.where} is closed; open a new one")

    @contextmanager
    def _session(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection for one operation. ``close()`` from another thread never
        pulls it away mid-operation: an operation under way finishes, later ones raise
        :class:`ProfileStoreError`."""
        if self._closed:
            raise self._closed_error()
        if self.path is None:
            with self._memory_lock:
                if self._closed:
                    raise self._closed_error()
                if self._memory_conn is None:
                    self._memory_conn = self._connect()
                yield self._memory_conn
            return
        held: _HeldConnection | None = getattr(self._local, "held", None)
        if held is None or held.pid != os.getpid():
            if held is not None:
                # A forked child must neither use nor close its parent's connection.
                _INHERITED.append(held)
            held = _HeldConnection(self._connect())
            self._local.held = held
            with self._registry_lock:
                self._held.add(held)
        with self._registry_lock:
            if self._closed:
                raise self._closed_error()
            held.busy = True
        try:
            yield held.conn
        finally:
            with self._registry_lock:
                held.busy = False
                if self._closed:  # close() came while this operation ran: finish its job
                    held.conn.close()

    @contextmanager
    def _transaction(self, *, write: bool, user_ids: Sequence[str] = ()) -> Iterator[Transaction]:
        """One transaction; IMMEDIATE takes the write lock (of the whole file) up front, so
        read-modify-write cannot interleave with another writer."""
        if write and self.read_only:
            raise ProfileStoreError(
                f"profile store {self.where} is read-only ({self.read_only}): profiles can be "
                "read but not written; make it writable, or export it and import the file into "
                "a store you can write"
            )
        with self._session() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise self._wrap(exc) from None
            try:
                yield conn
                conn.execute("COMMIT")
            except BaseException as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise self._wrap(exc) from None
                raise

    def _wrap(self, exc: sqlite3.Error) -> ProfileStoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return ProfileStoreError(
                f"profile store {self.where} stayed locked for {self.timeout:g} s by another "
                "writer; retry, or raise timeout="
            )
        if "not a database" in text or "malformed" in text:
            return ProfileStoreError(
                f"profile store {self.where} is not a valid SQLite database ({text}); restore it "
                "from an export or point --store / PJ_PROFILE_STORE at another file"
            )
        return ProfileStoreError(f"profile store {self.where} failed: {text}")

    def _check_version(self, conn: sqlite3.Connection) -> None:
        """A read-only store must already have this code's layout (it cannot be migrated)."""
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None
        if version != SCHEMA_VERSION:
            newer = version > SCHEMA_VERSION
            raise ProfileStoreError(
                f"profile store {self.where} is read-only ({self.read_only}) and has schema "
                f"version {version}, {'newer' if newer else 'older'} than this persona-judge's "
                f"({SCHEMA_VERSION}); "
                + (
                    "upgrade persona-judge"
                    if newer
                    else "open it once with write access to upgrade it"
                )
            )

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # Inside one IMMEDIATE transaction: two processes opening a new file migrate once.
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                version = int(conn.execute("PRAGMA user_version").fetchone()[0])
                if upgrade(conn, version, MIGRATIONS, self.where):
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None

    def close(self) -> None:
        """Close every connection. Operations under way in other threads finish first (each
        closes its own connection when it ends); later operations raise
        :class:`ProfileStoreError`."""
        with self._registry_lock:
            self._closed = True
            idle = [item for item in self._held if not item.busy and item.pid == os.getpid()]
            for item in idle:
                item.conn.close()
        with self._memory_lock:
            if self._memory_conn is not None:
                self._memory_conn.close()
