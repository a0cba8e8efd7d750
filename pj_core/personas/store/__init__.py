"""Per-user profile storage: one interface, on SQLite (one machine) or PostgreSQL (many).

A RAG chatbot serves many users from several threads, processes or machines; each user's
:class:`~pj_core.personas.PersonaProfile` must survive restarts, concurrent writes and crashes.

- :class:`AbstractProfileStore` is the interface (get, put, update, delete, list, put_many,
  plus JSON export/import written once on top of them).
- :class:`~pj_core.personas.store.base.SqlProfileStore` implements it on a SQL table: rows,
  optimistic revisions (``put(..., expected_revision=n)``), the atomic read-modify-write of
  ``update``, corrupt rows, all-or-nothing imports.
- :class:`ProfileStore` is SQLite (a file or ``":memory:"``; :mod:`.sqlite`),
  :class:`PostgresProfileStore` PostgreSQL (a ``postgresql://`` URL; :mod:`.postgres`).
- :func:`open_store` opens either from what a user writes: a path or a URL.

Example:
    >>> from pj_core.personas import PersonaProfile
    >>> with open_store(":memory:") as store:
    ...     _ = store.put(PersonaProfile(user_id="alice", preferences=["humor"]))
    ...     _ = store.update("alice", lambda p: p.evolve(preferences=[*p.preferences, "concise"]))
    ...     store.get("alice").preferences, store.get("alice").revision
    (('humor', 'concise'), 2)
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path

from pj_core.errors import ProfileNotFoundError, ProfileStoreError
from pj_core.personas.model import check_user_id
from pj_core.personas.profile import PersonaProfile
from pj_core.personas.store.base import (
    BUSY_TIMEOUT_S,
    EXPORT_FORMAT,
    EXPORT_SCHEMA_VERSION,
    STORE_ENV_VAR,
    AbstractProfileStore,
    OnConflict,
    ProfileConflictError,
    SqlProfileStore,
    default_store_path,
    parse_export,
)
from pj_core.personas.store.postgres import SCHEMES as POSTGRES_SCHEMES
from pj_core.personas.store.postgres import PostgresProfileStore
from pj_core.personas.store.sqlite import MIGRATIONS, SCHEMA_VERSION, ProfileStore

__all__ = [
    "BUSY_TIMEOUT_S",
    "EXPORT_FORMAT",
    "EXPORT_SCHEMA_VERSION",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "STORE_ENV_VAR",
    "AbstractProfileStore",
    "OnConflict",
    "PostgresProfileStore",
    "ProfileConflictError",
    "ProfileStore",
    "SqlProfileStore",
    "default_store",
    "default_store_path",
    "is_url",
    "load_profile",
    "open_store",
    "parse_export",
    "redacted",
    "shared_store",
]

_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*)://")
_SQLITE_URL = "sqlite:///"
_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://[^:/@]*:)[^@/]*@")


def is_url(target: str | os.PathLike[str]) -> bool:
    """Whether ``target`` is a URL (``scheme://...``) rather than a file path.

    Example:
        >>> is_url("postgresql://pj@db/profiles"), is_url("profiles.db")
        (True, False)
    """
    return isinstance(target, str) and _URL.match(target) is not None


def redacted(target: str | os.PathLike[str]) -> str:
    """``target`` for messages: a URL's password replaced by ``***``.

    Example:
        >>> redacted("postgresql://pj:secret@db:5432/profiles")
        'postgresql://pj:***@db:5432/profiles'
    """
    text = str(target)
    return _PASSWORD.sub(r"\1***@", text) if is_url(text) else text


def default_store() -> str | Path:
    """The store used when none is given: ``$PJ_PROFILE_STORE`` (a path or a URL) if set,
    else ``~/.local/share/persona-judge/profiles.db``.

    Example:
        >>> str(default_store()).endswith("profiles.db") or is_url(str(default_store()))
        True
    """
    configured = os.environ.get(STORE_ENV_VAR, "")
    return configured if is_url(configured) else default_store_path()


def _sqlite_target(url: str) -> str:
    """The file (or ``":memory:"``) of a ``sqlite:///`` URL, as SQLAlchemy writes them:
    ``sqlite:///relative.db``, ``sqlite:////absolute.db``, ``sqlite:///:memory:``."""
    target = url[len(_SQLITE_URL) :]
    if not target:
        raise ProfileStoreError(
            f"profile store URL {url!r} names no file; write sqlite:///profiles.db"
        )
    return target


def open_store(
    target: str | os.PathLike[str] | None = None, *, must_exist: bool = False
) -> SqlProfileStore:
    """Open the store ``target`` names (default: ``$PJ_PROFILE_STORE``, else
    :func:`default_store_path`).

    ``target`` is a SQLite file path or ``":memory:"``, a ``sqlite:///path`` URL, or a
    ``postgresql://user:password@host:port/database`` URL. Any other ``scheme://`` is a
    :class:`ProfileStoreError`, never a file of that name. ``must_exist=True`` refuses to
    create a new SQLite file (for look-ups), raising :class:`ProfileStoreError`.

    Example:
        >>> with open_store(":memory:") as store:
        ...     store.list_ids()
        []
        >>> open_store("mysql://db/profiles")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        pj_core.errors.ProfileStoreError: profile store URL scheme 'mysql' is not supported ...
    """
    if target is None:
        target = default_store()
    if isinstance(target, str) and (match := _URL.match(target)):
        scheme = match.group(1).lower()
        if scheme in POSTGRES_SCHEMES:
            return PostgresProfileStore(target)
        if target.startswith(_SQLITE_URL):
            target = _sqlite_target(target)
        else:
            raise ProfileStoreError(
                f"profile store URL scheme {scheme!r} is not supported; give a SQLite file "
                "path (or sqlite:///path) or a postgresql://user:password@host:port/database "
                "URL"
            )
    if must_exist and str(target) != ":memory:" and not Path(target).expanduser().exists():
        raise ProfileStoreError(
            f"there is no profile store at {target}; create profiles with `pj profiles add`, "
            f"or point --store / {STORE_ENV_VAR} at the right file"
        )
    return ProfileStore(target)


def load_profile(
    user_id: str, store: AbstractProfileStore | str | os.PathLike[str] | None = None
) -> PersonaProfile:
    """The saved profile of ``user_id`` in ``store``: a store object, a database path or URL
    (as :func:`open_store` takes), or ``None`` for the default store. A SQLite file that does
    not exist is not created.

    Raises:
        InvalidPersonaError: an invalid user id.
        ProfileNotFoundError: no such profile, or no store file at all.
        ProfileStoreError: the store cannot be opened (an unknown URL scheme, a database
            that cannot be reached, ...).

    Example:
        >>> load_profile("nobody", ":memory:")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        pj_core.errors.ProfileNotFoundError: no profile for user id 'nobody' in :memory: ...
    """
    check_user_id(user_id)
    if isinstance(store, AbstractProfileStore):
        return store.get(user_id)
    if store is None:
        store = default_store()
    if is_url(store):
        if not str(store).startswith(_SQLITE_URL):
            return shared_store(str(store)).get(user_id)
        store = _sqlite_target(str(store))
    if str(store) != ":memory:" and not Path(store).expanduser().exists():
        raise ProfileNotFoundError(
            f"no profile for user id {user_id!r}: there is no profile store at {store}; create "
            f"it with `pj profiles add {user_id} --preference NAME`, or pass store= / --store "
            f"or set {STORE_ENV_VAR} to the right file"
        )
    with open_store(store, must_exist=True) as opened:
        return opened.get(user_id)


_SHARED: dict[str, SqlProfileStore] = {}
_SHARED_LOCK = threading.Lock()


def shared_store(url: str) -> SqlProfileStore:
    """One open store per database URL in this process, for look-ups by URL (an adapter's
    ``profile_store="postgresql://..."``, ``load_profile(user, url)``): its connection pool
    is reused by every call instead of connecting anew. Never closed by its users.

    Raises:
        ProfileStoreError: as :func:`open_store`.
    """
    with _SHARED_LOCK:
        store = _SHARED.get(url)
    if store is not None:
        return store
    opened = open_store(url)  # outside the lock: an unreachable server stalls no other URL
    with _SHARED_LOCK:
        store = _SHARED.setdefault(url, opened)
    if store is not opened:
        opened.close()
    return store
