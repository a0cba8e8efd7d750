"""Per-user profile storage: a small abstract interface and its SQLite implementation.

A RAG chatbot serves many users from several threads or processes; each user's
:class:`~pj_core.personas.PersonaProfile` must survive restarts, concurrent writes and crashes.

:class:`AbstractProfileStore` is the interface (get, put, update, delete, list, put_many, plus
JSON export/import written once on top of them), so another database can be added by
implementing six methods. :class:`ProfileStore` implements it on SQLite (standard library):

- **Where.** A file path, or ``":memory:"``. :func:`default_store_path` is
  ``$PJ_PROFILE_STORE`` if set, else ``~/.local/share/persona-judge/profiles.db``.
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
import contextlib
import json
import logging
import os
import sqlite3
import tempfile
import threading
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pj_core.errors import (
    InvalidPersonaError,
    PersonaJudgeError,
    ProfileImportError,
    ProfileNotFoundError,
    ProfileStoreError,
)
from pj_core.personas.model import check_user_id
from pj_core.personas.profile import PersonaProfile

STORE_ENV_VAR = "PJ_PROFILE_STORE"
_log = logging.getLogger(__name__)

EXPORT_FORMAT = "persona-judge-profiles"
EXPORT_SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0

OnConflict = Literal["error", "replace", "skip"]


class ProfileConflictError(ProfileStoreError):
    """``put(..., expected_revision=n)`` found another revision: someone wrote in between.

    Re-read the profile, re-apply the change and put again, or use :meth:`ProfileStore.update`.

    Attributes:
        user_id: the profile's user id.
        expected: the revision the caller read.
        actual: the revision in the store (0 = absent).
    """

    def __init__(self, message: str, *, user_id: str, expected: int, actual: int) -> None:
        super().__init__(message)
        self.user_id = user_id
        self.expected = expected
        self.actual = actual


def default_store_path() -> Path:
    """``$PJ_PROFILE_STORE`` if set, else ``~/.local/share/persona-judge/profiles.db``.

    Example:
        >>> default_store_path().name
        'profiles.db'
    """
    configured = os.environ.get(STORE_ENV_VAR)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".local" / "share" / "persona-judge" / "profiles.db"


def _now() -> datetime:
    return datetime.now(timezone.utc)


# --------------------------------------------------------------------------- interface


class AbstractProfileStore(ABC):
    """What every profile store offers; export and import are built on the abstract methods.

    Implementations must make each method atomic: a reader sees a whole profile or none,
    and :meth:`put_many` writes all profiles or none.

    A store is a handle on shared data, like a connection pool: copying an object that holds
    one (``copy.deepcopy``, pydantic's ``model_copy(deep=True)``) shares the store.
    """

    def __copy__(self) -> AbstractProfileStore:
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> AbstractProfileStore:
        return self

    @abstractmethod
    def get(self, user_id: str) -> PersonaProfile:
        """The profile of ``user_id``; :class:`ProfileNotFoundError` if there is none."""

    @abstractmethod
    def put(
        self, profile: PersonaProfile, *, expected_revision: int | None = None
    ) -> PersonaProfile:
        """Insert or replace a profile; returns it as stored (new ``revision``, ``updated_at``).

        ``expected_revision`` (0 = "must not exist yet") raises :class:`ProfileConflictError`
        if the stored revision differs, so a stale read cannot overwrite a newer write.
        ``created_at`` keeps the time the user id was first stored.
        """

    @abstractmethod
    def update(
        self,
        user_id: str,
        change: Callable[[PersonaProfile], PersonaProfile],
        *,
        default: PersonaProfile | None = None,
    ) -> PersonaProfile:
        """Atomically read, ``change`` and write one profile; returns the stored result.

        ``default`` is used when the user id is absent (else :class:`ProfileNotFoundError`).
        If ``change`` raises, nothing is written.
        """

    @abstractmethod
    def delete(self, user_id: str, *, missing_ok: bool = False) -> None:
        """Remove a profile; :class:`ProfileNotFoundError` if absent unless ``missing_ok``."""

    @abstractmethod
    def list(self) -> builtins.list[PersonaProfile]:
        """Every profile, ordered by user id."""

    @abstractmethod
    def put_many(
        self, profiles: Sequence[PersonaProfile], *, on_conflict: OnConflict = "replace"
    ) -> builtins.list[str]:
        """Write several profiles in one transaction (all or nothing); returns ids written.

        ``on_conflict`` decides what happens to ids already stored: ``"replace"`` them,
        ``"skip"`` them, or ``"error"`` (raise :class:`ProfileImportError`, write nothing).
        """

    def close(self) -> None:  # noqa: B027 - stores without resources need not override it
        """Release connections; the store is unusable afterwards."""

    def list_ids(self) -> builtins.list[str]:
        """Every user id, sorted."""
        return [profile.user_id for profile in self.list()]

    def corrupt_rows(self) -> builtins.list[tuple[str, str]]:
        """``(user id, reason)`` of each stored profile that cannot be read (and that
        :meth:`list` leaves out). A store whose rows are always readable has none."""
        return []

    def __contains__(self, user_id: object) -> bool:
        if not isinstance(user_id, str):
            return False
        try:
            self.get(user_id)
        except ProfileNotFoundError:
            return False
        return True

    def __enter__(self) -> AbstractProfileStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # JSON export / import, shared by every implementation.

    def export_json(self, *, indent: int | None = 2) -> str:
        """All profiles as a versioned JSON document that :meth:`import_json` reads back.

        Example:
            >>> json.loads(ProfileStore(":memory:").export_json())["format"]
            'persona-judge-profiles'
        """
        document = {
            "format": EXPORT_FORMAT,
            "schema_version": EXPORT_SCHEMA_VERSION,
            "exported_at": _now().isoformat(),
            "profiles": [profile.model_dump(mode="json") for profile in self.list()],
        }
        return json.dumps(document, indent=indent, ensure_ascii=False)

    def import_json(
        self, text: str | bytes, *, on_conflict: OnConflict = "error"
    ) -> builtins.list[str]:
        """Validate a whole export document, then write every profile in one transaction.

        A corrupt document (bad JSON, wrong format or schema version, an invalid profile,
        a repeated user id) raises :class:`ProfileImportError` and leaves the store unchanged.
        Returns the user ids written.
        """
        profiles = parse_export(text)
        return self.put_many(profiles, on_conflict=on_conflict)

    def export_file(self, path: str | os.PathLike[str]) -> int:
        """Write :meth:`export_json` to ``path`` atomically; returns the number of profiles."""
        text = self.export_json()
        target = Path(path)
        if target.is_dir():
            raise ProfileStoreError(
                f"cannot export to {target}: it is a folder; give a file path such as "
                f"{target / 'profiles.json'}"
            )
        # Write aside (a name of its own per call, so threads and processes do not collide)
        # and rename, so a crash never leaves a half-written export behind.
        try:
            handle, temporary = tempfile.mkstemp(
                prefix=f".{target.name}.", suffix=".tmp", dir=target.parent
            )
        except OSError as exc:
            raise ProfileStoreError(
                f"cannot export to {target}: {exc.strerror} (its folder {target.parent} must "
                "exist and be writable)"
            ) from None
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text)
            os.replace(temporary, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise ProfileStoreError(f"cannot export to {target}: {exc.strerror}") from None
        return len(json.loads(text)["profiles"])

    def import_file(
        self, path: str | os.PathLike[str], *, on_conflict: OnConflict = "error"
    ) -> builtins.list[str]:
        """:meth:`import_json` on a file's content."""
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise ProfileImportError(f"cannot read import file {path}: {exc.strerror}") from None
        return self.import_json(raw, on_conflict=on_conflict)


def parse_export(text: str | bytes) -> list[PersonaProfile]:
    """Validate an export document and return its profiles, or raise :class:`ProfileImportError`.

    Example:
        >>> parse_export('{"format": "persona-judge-profiles", "schema_version": 1, '
        ...              '"profiles": [{"user_id": "bob"}]}')[0].user_id
        'bob'
    """
    nothing = "nothing was imported"
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ProfileImportError(f"the import file is not valid JSON ({exc}); {nothing}") from None
    except RecursionError:
        raise ProfileImportError(
            f"the import file nests its JSON too deeply to be a profile export; {nothing}"
        ) from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise ProfileImportError(
            f"the import file holds a value out of range ({exc}); {nothing}"
        ) from None
    if not isinstance(document, dict) or document.get("format") != EXPORT_FORMAT:
        raise ProfileImportError(
            f"the import file is not a persona-judge profile export (expected a JSON object "
            f'with "format": "{EXPORT_FORMAT}", as `pj profiles export` writes); {nothing}'
        )
    version = document.get("schema_version")
    if version != EXPORT_SCHEMA_VERSION:
        raise ProfileImportError(
            f"the import file has schema_version {version!r}; this persona-judge reads "
            f"version {EXPORT_SCHEMA_VERSION}: export it again with a matching version; {nothing}"
        )
    items = document.get("profiles")
    if not isinstance(items, list):
        raise ProfileImportError(f'the import file has no "profiles" list; {nothing}')
    profiles: list[PersonaProfile] = []
    seen: set[str] = set()
    for index, item in enumerate(items):
        label = item.get("user_id") if isinstance(item, dict) else None
        if not isinstance(item, dict):
            raise ProfileImportError(f"profile #{index} is not a JSON object; {nothing}")
        try:
            profile = PersonaProfile.from_data(item)
        except PersonaJudgeError as exc:
            raise ProfileImportError(
                f"profile #{index} ({label!r}) is invalid: {exc}; fix it, then import again; "
                f"{nothing}"
            ) from None
        if profile.user_id in seen:
            raise ProfileImportError(
                f"user id {profile.user_id!r} appears twice in the import file; {nothing}"
            )
        seen.add(profile.user_id)
        profiles.append(profile)
    return profiles


# --------------------------------------------------------------------------- SQLite


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


class ProfileStore(AbstractProfileStore):
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
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction; IMMEDIATE takes the write lock up front, so read-modify-write
        cannot interleave with another writer."""
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
                if version > SCHEMA_VERSION:
                    raise ProfileStoreError(
                        f"profile store {self.where} has schema version {version}, newer than "
                        f"this persona-judge understands ({SCHEMA_VERSION}); upgrade persona-judge"
                    )
                for step in MIGRATIONS[version:]:
                    step(conn)
                if version != SCHEMA_VERSION:
                    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise self._wrap(exc) from None

    # ----- rows

    def _read(self, conn: sqlite3.Connection, user_id: str) -> PersonaProfile | None:
        row = conn.execute(
            "SELECT revision, data FROM profiles WHERE user_id = ?", (user_id,)
        ).fetchone()
        return None if row is None else self._decode(user_id, row[0], row[1])

    def _decode(self, user_id: str, revision: int, data: str) -> PersonaProfile:
        try:
            fields = json.loads(data)
            fields["revision"] = revision  # the column is the source of truth
            profile = PersonaProfile.from_data(fields)
        except (json.JSONDecodeError, TypeError, InvalidPersonaError) as exc:
            raise ProfileStoreError(
                f"the stored profile {user_id!r} in {self.where} is corrupt ({exc}); delete it "
                "or restore it from an export"
            ) from None
        if profile.user_id != user_id:  # never hand one user another user's profile
            raise ProfileStoreError(
                f"the stored profile {user_id!r} in {self.where} is corrupt (its data names "
                f"user {profile.user_id!r}); delete it or restore it from an export"
            )
        return profile

    def _current(self, conn: sqlite3.Connection, user_id: str) -> tuple[PersonaProfile | None, int]:
        """The stored profile (None if absent or corrupt) and its revision (0 if absent): a
        corrupt row is replaced by a put, never a reason to refuse one."""
        try:
            current = self._read(conn, user_id)
        except ProfileStoreError:
            _log.warning("replacing the corrupt profile %r of %s", user_id, self.where)
            return None, self._stored_revision(conn, user_id)
        return current, current.revision if current else 0

    @staticmethod
    def _stored_revision(conn: sqlite3.Connection, user_id: str) -> int:
        """The revision column of ``user_id``'s row (readable or not), 0 without a row."""
        row = conn.execute("SELECT revision FROM profiles WHERE user_id = ?", (user_id,)).fetchone()
        return int(row[0]) if row else 0

    def _write(
        self, conn: sqlite3.Connection, profile: PersonaProfile, current: PersonaProfile | None
    ) -> PersonaProfile:
        # No current profile: a new one, or one replacing a corrupt row (its revision counts).
        previous = current.revision if current else self._stored_revision(conn, profile.user_id)
        stored = profile.evolve(
            revision=previous + 1,
            created_at=current.created_at if current else profile.created_at,
            updated_at=_now(),
        )
        data = stored.model_dump_json(exclude={"revision"})
        conn.execute(
            "INSERT INTO profiles (user_id, data, revision, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(user_id) DO UPDATE SET data = excluded.data, "
            "revision = excluded.revision, updated_at = excluded.updated_at",
            (stored.user_id, data, stored.revision, stored.updated_at.isoformat()),
        )
        return stored

    @staticmethod
    def _checked(profile: object) -> PersonaProfile:
        if not isinstance(profile, PersonaProfile):
            raise InvalidPersonaError(f"expected a PersonaProfile, got {type(profile).__name__}")
        # Re-validate: model_copy(update=...) could have produced an invalid profile.
        return PersonaProfile.from_data(profile.model_dump())

    @staticmethod
    def _not_found(user_id: str, where: str) -> ProfileNotFoundError:
        return ProfileNotFoundError(
            f"no profile for user id {user_id!r} in {where}; create it with "
            f"`pj profiles add {user_id} --preference NAME` or ProfileStore.put(...)"
        )

    # ----- the interface

    def get(self, user_id: str) -> PersonaProfile:
        check_user_id(user_id)
        with self._transaction(write=False) as conn:
            profile = self._read(conn, user_id)
        if profile is None:
            raise self._not_found(user_id, self.where)
        return profile

    def put(
        self, profile: PersonaProfile, *, expected_revision: int | None = None
    ) -> PersonaProfile:
        profile = self._checked(profile)
        with self._transaction(write=True) as conn:
            current, actual = self._current(conn, profile.user_id)
            if expected_revision is not None and expected_revision != actual:
                raise ProfileConflictError(
                    f"profile {profile.user_id!r} is at revision {actual}, not "
                    f"{expected_revision}: someone else wrote it; re-read it and apply your "
                    "change again (or use update())",
                    user_id=profile.user_id,
                    expected=expected_revision,
                    actual=actual,
                )
            return self._write(conn, profile, current)

    def update(
        self,
        user_id: str,
        change: Callable[[PersonaProfile], PersonaProfile],
        *,
        default: PersonaProfile | None = None,
    ) -> PersonaProfile:
        check_user_id(user_id)
        with self._transaction(write=True) as conn:
            current = self._read(conn, user_id)
            base = current if current is not None else default
            if base is None:
                raise self._not_found(user_id, self.where)
            changed = self._checked(change(base))
            if changed.user_id != user_id:
                raise InvalidPersonaError(
                    f"update() must not change the user id ({user_id!r} -> "
                    f"{changed.user_id!r}); put a new profile and delete the old one instead"
                )
            return self._write(conn, changed, current)

    def delete(self, user_id: str, *, missing_ok: bool = False) -> None:
        check_user_id(user_id)
        with self._transaction(write=True) as conn:
            deleted = conn.execute("DELETE FROM profiles WHERE user_id = ?", (user_id,)).rowcount
        if not deleted and not missing_ok:
            raise self._not_found(user_id, self.where)

    def list(self) -> builtins.list[PersonaProfile]:
        """Every readable profile, ordered by user id. A corrupt row does not hide the
        others: it is left out, logged as a warning, and named by :meth:`corrupt_rows`."""
        profiles, corrupt = self._scan()
        for user_id, reason in corrupt:
            _log.warning("left out the corrupt profile %r of %s: %s", user_id, self.where, reason)
        return profiles

    def corrupt_rows(self) -> builtins.list[tuple[str, str]]:
        """The ``(user id, reason)`` of each stored profile that cannot be read; delete it
        (``delete`` works on it) or restore it from an export.

        Example:
            >>> ProfileStore(":memory:").corrupt_rows()
            []
        """
        return self._scan()[1]

    def _scan(self) -> tuple[builtins.list[PersonaProfile], builtins.list[tuple[str, str]]]:
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                "SELECT user_id, revision, data FROM profiles ORDER BY user_id"
            ).fetchall()
        profiles: builtins.list[PersonaProfile] = []
        corrupt: builtins.list[tuple[str, str]] = []
        for user_id, revision, data in rows:
            try:
                profiles.append(self._decode(user_id, revision, data))
            except ProfileStoreError as exc:
                corrupt.append((user_id, str(exc)))
        return profiles, corrupt

    def list_ids(self) -> builtins.list[str]:
        with self._transaction(write=False) as conn:
            rows = conn.execute("SELECT user_id FROM profiles ORDER BY user_id").fetchall()
        return [row[0] for row in rows]

    def put_many(
        self, profiles: Sequence[PersonaProfile], *, on_conflict: OnConflict = "replace"
    ) -> builtins.list[str]:
        if on_conflict not in ("error", "replace", "skip"):
            raise InvalidPersonaError(
                f"on_conflict must be 'error', 'replace' or 'skip', got {on_conflict!r}"
            )
        checked = [self._checked(profile) for profile in profiles]
        written: builtins.list[str] = []
        with self._transaction(write=True) as conn:
            existing = {p.user_id: self._read(conn, p.user_id) for p in checked}
            clashes = sorted(uid for uid, found in existing.items() if found is not None)
            if clashes and on_conflict == "error":
                raise ProfileImportError(
                    f"these user ids already exist: {', '.join(clashes)}; import with "
                    "on_conflict='replace' (CLI --replace) or 'skip' (--skip-existing); "
                    "nothing was imported"
                )
            for profile in checked:
                current = existing[profile.user_id]
                if current is not None and on_conflict == "skip":
                    continue
                self._write(conn, profile, current)
                written.append(profile.user_id)
        return written

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


def open_store(
    path: str | os.PathLike[str] | None = None, *, must_exist: bool = False
) -> ProfileStore:
    """Open the store at ``path`` (default :func:`default_store_path`).

    ``must_exist=True`` refuses to create a new file (for look-ups), raising
    :class:`ProfileStoreError`.

    Example:
        >>> with open_store(":memory:") as store:
        ...     store.list_ids()
        []
    """
    target = default_store_path() if path is None else path
    if must_exist and str(target) != ":memory:" and not Path(target).expanduser().exists():
        raise ProfileStoreError(
            f"there is no profile store at {target}; create profiles with `pj profiles add`, "
            f"or point --store / {STORE_ENV_VAR} at the right file"
        )
    return ProfileStore(target)


def load_profile(
    user_id: str, store: AbstractProfileStore | str | os.PathLike[str] | None = None
) -> PersonaProfile:
    """The saved profile of ``user_id`` in ``store``: a store object, a database path, or
    ``None`` for :func:`default_store_path`. A path that does not exist is not created.

    Raises:
        InvalidPersonaError: an invalid user id.
        ProfileNotFoundError: no such profile, or no store file at all.

    Example:
        >>> load_profile("nobody", ":memory:")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        pj_core.errors.ProfileNotFoundError: no profile for user id 'nobody' in :memory: ...
    """
    check_user_id(user_id)
    if isinstance(store, AbstractProfileStore):
        return store.get(user_id)
    path = default_store_path() if store is None else store
    if str(path) != ":memory:" and not Path(path).expanduser().exists():
        raise ProfileNotFoundError(
            f"no profile for user id {user_id!r}: there is no profile store at {path}; create "
            f"it with `pj profiles add {user_id} --preference NAME`, or pass store= / --store "
            f"or set {STORE_ENV_VAR} to the right file"
        )
    with ProfileStore(path) as opened:
        return opened.get(user_id)
