"""The profile store's interface, and the profile logic every SQL database shares.

:class:`AbstractProfileStore` is what a store offers (get, put, update, delete, list,
put_many, plus JSON export/import written once on top of them). :class:`SqlProfileStore`
implements it for SQL databases: how a profile is a row (``user_id``, the profile as JSON,
``revision``, ``updated_at``), optimistic revisions, the atomic read-modify-write of
:meth:`~SqlProfileStore.update`, corrupt rows, all-or-nothing imports. A database adds only
its connections and transactions (:meth:`SqlProfileStore._transaction`): SQLite in
:mod:`pj_core.personas.store.sqlite`, PostgreSQL in :mod:`pj_core.personas.store.postgres`.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import logging
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal, Protocol, TypeVar

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
C = TypeVar("C")


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
            >>> from pj_core.personas.store import ProfileStore
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


# --------------------------------------------------------------------------- SQL


def upgrade(conn: C, version: int, migrations: Sequence[Callable[[C], None]], where: str) -> bool:
    """Run ``migrations[version:]`` on ``conn`` (``migrations[i]`` upgrades layout i to
    i + 1) inside the caller's transaction; returns whether any ran.

    Raises:
        ProfileStoreError: ``version`` is newer than this code's layout.
    """
    if version > len(migrations):
        raise ProfileStoreError(
            f"profile store {where} has schema version {version}, newer than this "
            f"persona-judge understands ({len(migrations)}); upgrade persona-judge"
        )
    for step in migrations[version:]:
        step(conn)
    return version != len(migrations)


class Cursor(Protocol):
    """What a statement returns (a DB-API cursor, or a SQLAlchemy result)."""

    @property
    def rowcount(self) -> int: ...

    def fetchall(self) -> Sequence[Any]: ...

    def fetchone(self) -> Any: ...


class Transaction(Protocol):
    """One open transaction: ``execute`` runs one statement with ``:name`` parameters."""

    def execute(self, sql: str, parameters: dict[str, Any], /) -> Cursor: ...


class SqlProfileStore(AbstractProfileStore):
    """:class:`AbstractProfileStore` on a SQL table, for any database that gives transactions.

    One row per user id: ``user_id`` (primary key), ``data`` (the profile as JSON, without its
    revision), ``revision`` (the source of truth for optimistic locking) and ``updated_at``.
    The statements are plain SQL that SQLite and PostgreSQL both run (``INSERT ... ON
    CONFLICT ... DO UPDATE``). A subclass provides :attr:`where` and :meth:`_transaction`.
    """

    table: ClassVar[str] = "profiles"
    """The table of profiles."""

    @property
    @abstractmethod
    def where(self) -> str:
        """Where the profiles are, for messages (a path, or a URL without its password)."""

    @abstractmethod
    def _transaction(
        self, *, write: bool, user_ids: Sequence[str] = ()
    ) -> AbstractContextManager[Transaction]:
        """One transaction, committed when the block ends and rolled back if it raises.

        With ``write=True`` no other writer may change the rows of ``user_ids`` (or the whole
        table) until it ends, so a read-modify-write inside it loses no update. Database
        errors come out as :class:`ProfileStoreError`.
        """

    # ----- rows

    def _read(self, conn: Transaction, user_id: str) -> PersonaProfile | None:
        row = conn.execute(
            f"SELECT revision, data FROM {self.table} WHERE user_id = :user_id",
            {"user_id": user_id},
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

    def _current(self, conn: Transaction, user_id: str) -> tuple[PersonaProfile | None, int]:
        """The stored profile (None if absent or corrupt) and its revision (0 if absent): a
        corrupt row is replaced by a put, never a reason to refuse one."""
        try:
            current = self._read(conn, user_id)
        except ProfileStoreError:
            _log.warning("replacing the corrupt profile %r of %s", user_id, self.where)
            return None, self._stored_revision(conn, user_id)
        return current, current.revision if current else 0

    def _stored_revision(self, conn: Transaction, user_id: str) -> int:
        """The revision column of ``user_id``'s row (readable or not), 0 without a row."""
        row = conn.execute(
            f"SELECT revision FROM {self.table} WHERE user_id = :user_id", {"user_id": user_id}
        ).fetchone()
        return int(row[0]) if row else 0

    def _write(
        self, conn: Transaction, profile: PersonaProfile, current: PersonaProfile | None
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
            f"INSERT INTO {self.table} (user_id, data, revision, updated_at) "
            "VALUES (:user_id, :data, :revision, :updated_at) "
            "ON CONFLICT (user_id) DO UPDATE SET data = excluded.data, "
            "revision = excluded.revision, updated_at = excluded.updated_at",
            {
                "user_id": stored.user_id,
                "data": data,
                "revision": stored.revision,
                "updated_at": stored.updated_at.isoformat(),
            },
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
        with self._transaction(write=True, user_ids=[profile.user_id]) as conn:
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
        with self._transaction(write=True, user_ids=[user_id]) as conn:
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
        with self._transaction(write=True, user_ids=[user_id]) as conn:
            deleted = conn.execute(
                f"DELETE FROM {self.table} WHERE user_id = :user_id", {"user_id": user_id}
            ).rowcount
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
            >>> from pj_core.personas.store import ProfileStore
            >>> ProfileStore(":memory:").corrupt_rows()
            []
        """
        return self._scan()[1]

    def _scan(self) -> tuple[builtins.list[PersonaProfile], builtins.list[tuple[str, str]]]:
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                f"SELECT user_id, revision, data FROM {self.table} ORDER BY user_id", {}
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
            rows = conn.execute(f"SELECT user_id FROM {self.table} ORDER BY user_id", {}).fetchall()
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
        user_ids = [profile.user_id for profile in checked]
        with self._transaction(write=True, user_ids=user_ids) as conn:
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
