"""Profiles in PostgreSQL: one store that many processes and machines write at once.

:class:`PostgresProfileStore` is the same store as the SQLite one (the profile logic is
:class:`~pj_core.personas.store.base.SqlProfileStore`) on a PostgreSQL database, reached
through SQLAlchemy Core with psycopg 3 and a connection pool:

- **Where.** A URL, ``postgresql://user:password@host:5432/database`` (``postgres://`` and
  ``postgresql+psycopg://`` too). The table is ``pj_profiles``, beside ``pj_schema``.
- **Concurrency.** Each write transaction takes a transaction-scoped advisory lock per user
  id it writes (in sorted order, so two writers never deadlock), then reads and writes. Two
  writers of one user queue; writers of different users do not wait for each other. A writer
  that waits longer than ``timeout`` gets :class:`~pj_core.errors.ProfileStoreError`.
- **Connections.** At most ``pool_size + max_overflow`` per store (and per process; set them
  as arguments or in the URL, ``...?pool_size=2&max_overflow=0``, which every replica and
  CLI process given the URL then keeps to); a caller
  that finds every one busy for ``timeout`` seconds gets
  :class:`~pj_core.errors.ProfileStoreUnavailableError`, as does every call while the server
  cannot be reached. Pooled connections are checked before use, so the store recovers by
  itself when the server comes back. A forked child opens connections of its own.
- **Schema.** ``pj_schema`` records the layout; :data:`MIGRATIONS` upgrade it in one
  transaction under an advisory lock, so replicas starting together migrate once.

Install: ``pip install 'persona-judge[postgres]'`` (SQLAlchemy and psycopg).

Example (needs a running server)::

    from pj_core.personas import PersonaProfile
    from pj_core.personas.store import open_store

    with open_store("postgresql://pj@db.internal/profiles") as store:
        store.update("alice", lambda p: p.evolve(preferences=["concise"]),
                     default=PersonaProfile(user_id="alice"))
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from pj_core.errors import ProfileStoreError, ProfileStoreUnavailableError
from pj_core.personas.store.base import (
    BUSY_TIMEOUT_S,
    Cursor,
    SqlProfileStore,
    Transaction,
    upgrade,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

INSTALL_COMMAND = "pip install 'persona-judge[postgres]'"
SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
"""URL schemes this store opens."""

LOCK_SPACE = 0x706A  # the first key of every advisory lock this store takes ("pj")
SCHEMA_LOCK = 0  # the second key of the lock migrations hold
_UNAVAILABLE_SQLSTATES = ("08", "57P")  # connection exceptions; admin shutdown, cannot connect


def _create_v1(conn: Connection) -> None:
    from sqlalchemy import text

    conn.execute(
        text(
            "CREATE TABLE IF NOT EXISTS pj_profiles (user_id TEXT PRIMARY KEY, "
            "data TEXT NOT NULL, revision INTEGER NOT NULL DEFAULT 1, "
            "updated_at TEXT NOT NULL DEFAULT '')"
        )
    )


MIGRATIONS: tuple[Callable[[Connection], None], ...] = (_create_v1,)
"""``MIGRATIONS[i]`` upgrades a database from ``pj_schema`` version i to i + 1."""

SCHEMA_VERSION = len(MIGRATIONS)
"""The layout this code writes (``pj_schema.version``)."""


class _Statements:
    """:class:`~pj_core.personas.store.base.Transaction` on a SQLAlchemy connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: dict[str, Any], /) -> Cursor:
        from sqlalchemy import text

        return self._conn.execute(text(sql), parameters)


def _engine_url(url: str) -> Any:
    """``url`` parsed, with psycopg 3 as its driver; :class:`ProfileStoreError` if it is not
    a PostgreSQL URL."""
    try:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError
    except ImportError:
        raise ProfileStoreError(
            f"a PostgreSQL profile store needs SQLAlchemy and psycopg: {INSTALL_COMMAND}"
        ) from None
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ProfileStoreError(
            f"profile store URL is not a valid database URL ({exc}); write it as "
            "postgresql://user:password@host:5432/database"
        ) from None
    if parsed.drivername not in SCHEMES:
        raise ProfileStoreError(
            f"profile store URL scheme {parsed.drivername!r} is not PostgreSQL; use "
            "postgresql://user:password@host:5432/database"
        )
    return parsed.set(drivername="postgresql+psycopg")


def _pool_limits(
    engine_url: Any, pool_size: int | None, max_overflow: int | None
) -> tuple[Any, tuple[int, int]]:
    """``engine_url`` without its pool settings, and ``(pool_size, max_overflow)``: the
    arguments if given, else the URL's query, else 5 and 10."""
    query = dict(engine_url.query)
    chosen: list[int] = []
    for name, given, default, least in (
        ("pool_size", pool_size, 5, 1),
        ("max_overflow", max_overflow, 10, 0),
    ):
        raw = query.pop(name, None)
        value: object = given if given is not None else (default if raw is None else raw)
        try:
            number = int(value) if isinstance(value, (int, str)) else -1
        except ValueError:
            number = -1
        if isinstance(value, bool) or number < least:
            raise ProfileStoreError(
                f"{name} must be an integer >= {least}, got {value!r} (in the store URL or "
                "as an argument)"
            )
        chosen.append(number)
    return engine_url.set(query=query), (chosen[0], chosen[1])


class PostgresProfileStore(SqlProfileStore):
    """Profiles in a PostgreSQL database, shared by every process that opens the same URL.

    Args:
        url: ``postgresql://user:password@host:port/database``.
        timeout: seconds a writer waits for another writer of the same user, and a caller
            for a free pooled connection, before a typed error.
        pool_size: connections kept open (default: the URL's ``pool_size``, else 5).
        max_overflow: connections opened beyond ``pool_size`` under load, closed when idle
            (default: the URL's ``max_overflow``, else 10).
        connect_timeout: seconds to wait for the server when connecting.

    Raises:
        ProfileStoreError: a malformed URL, a newer schema, missing packages.
        ProfileStoreUnavailableError: the server cannot be reached.
    """

    table = "pj_profiles"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = BUSY_TIMEOUT_S,
        pool_size: int | None = None,
        max_overflow: int | None = None,
        connect_timeout: float = 10.0,
    ) -> None:
        engine_url, limits = _pool_limits(_engine_url(url), pool_size, max_overflow)
        from sqlalchemy import create_engine

        self.url = url
        self.timeout = timeout
        self._where = engine_url.set(drivername="postgresql").render_as_string(hide_password=True)
        self._engine: Engine = create_engine(
            engine_url,
            pool_size=limits[0],
            max_overflow=limits[1],
            pool_timeout=timeout,
            pool_pre_ping=True,  # a connection that died with a server restart is replaced
            connect_args={
                "connect_timeout": max(1, round(connect_timeout)),
                "application_name": "persona-judge",
                # A server that stops answering (a host gone, a partition) is noticed in about
                # 25 s instead of the system's TCP timeout, so no call hangs for minutes.
                "keepalives": 1,
                "keepalives_idle": 10,
                "keepalives_interval": 5,
                "keepalives_count": 3,
            },
        )
        self._closed = False
        self._pid = os.getpid()
        self._fork_lock = threading.Lock()
        self._migrate()

    @property
    def where(self) -> str:
        """The URL without its password, for messages."""
        return self._where

    # ----- connections and transactions

    def _engine_for_this_process(self) -> Engine:
        """The engine, after dropping (without closing) the pooled connections that a forked
        child inherited from its parent: they belong to the parent's sessions."""
        if self._pid != os.getpid():
            with self._fork_lock:
                if self._pid != os.getpid():
                    self._engine.dispose(close=False)
                    self._pid = os.getpid()
        return self._engine

    @contextmanager
    def _connection(self) -> Iterator[Connection]:
        """One pooled connection inside one transaction, with errors made typed."""
        from sqlalchemy.exc import DBAPIError
        from sqlalchemy.exc import TimeoutError as PoolTimeoutError

        if self._closed:
            raise ProfileStoreError(f"profile store {self.where} is closed; open a new one")
        engine = self._engine_for_this_process()
        try:
            with engine.connect() as conn, conn.begin():
                yield conn
        except PoolTimeoutError:
            raise ProfileStoreUnavailableError(
                f"profile store {self.where}: every pooled connection stayed busy for "
                f"{self.timeout:g} s; retry, or raise pool_size / max_overflow"
            ) from None
        except DBAPIError as exc:
            raise self._wrap(exc) from None

    @contextmanager
    def _transaction(self, *, write: bool, user_ids: Sequence[str] = ()) -> Iterator[Transaction]:
        """One transaction. A write one waits (up to ``timeout``) for the advisory lock of each
        user id it writes, in sorted order."""
        from sqlalchemy import text

        with self._connection() as conn:
            if write:
                conn.execute(text(f"SET LOCAL lock_timeout = {max(1, round(self.timeout * 1000))}"))
                for user_id in sorted(set(user_ids)):
                    conn.execute(
                        text("SELECT pg_advisory_xact_lock(:space, hashtext(:user_id))"),
                        {"space": LOCK_SPACE, "user_id": user_id},
                    )
            yield _Statements(conn)

    def _wrap(self, exc: Exception) -> ProfileStoreError:
        original = getattr(exc, "orig", None) or exc
        sqlstate = str(getattr(original, "sqlstate", "") or "")
        detail = str(original).strip().splitlines()[0] if str(original).strip() else repr(original)
        if sqlstate == "55P03":  # lock_not_available: lock_timeout ran out
            return ProfileStoreError(
                f"profile store {self.where} stayed locked for {self.timeout:g} s by another "
                "writer of the same user; retry, or raise timeout="
            )
        if not sqlstate or sqlstate.startswith(_UNAVAILABLE_SQLSTATES):
            return ProfileStoreUnavailableError(
                f"cannot reach the PostgreSQL profile store {self.where} ({detail}); check that "
                "the server is running and the URL is right, then retry"
            )
        return ProfileStoreError(f"profile store {self.where} failed: {detail}")

    def _migrate(self) -> None:
        """Bring the database to :data:`SCHEMA_VERSION` in one transaction, under an advisory
        lock: stores opening a new database together migrate it once."""
        from sqlalchemy import text

        with self._connection() as conn:
            conn.execute(
                text("SELECT pg_advisory_xact_lock(:space, :key)"),
                {"space": LOCK_SPACE, "key": SCHEMA_LOCK},
            )
            conn.execute(text("CREATE TABLE IF NOT EXISTS pj_schema (version INTEGER NOT NULL)"))
            row = conn.execute(text("SELECT max(version) FROM pj_schema")).fetchone()
            version = int(row[0]) if row is not None and row[0] is not None else 0
            if upgrade(conn, version, MIGRATIONS, self.where):
                conn.execute(text("DELETE FROM pj_schema"))
                conn.execute(
                    text("INSERT INTO pj_schema (version) VALUES (:version)"),
                    {"version": SCHEMA_VERSION},
                )

    def close(self) -> None:
        """Close the pooled connections; later operations raise :class:`ProfileStoreError`.
        Operations under way finish on the connection they hold."""
        self._closed = True
        self._engine.dispose()
