"""A real PostgreSQL server for the tests: Debian's ``postgresql`` package, a throw-away cluster.

:class:`PostgresServer` runs ``initdb`` into a temporary folder and starts ``postgres`` on
loopback (``127.0.0.1``, a free port, trust authentication for the local test role), as the
``postgres`` user when the tests run as root (PostgreSQL refuses to run as root). Each test
gets a database of its own (:meth:`PostgresServer.create_database`).

Where the package is missing, :func:`postgres_binaries` returns None and the fixtures skip
with the command that installs it, unless ``PJ_REQUIRE_POSTGRES=1`` (``make test``), which
turns the skip into a failure.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

INSTALL_HINT = "apt-get install -y postgresql (Debian's package; run as root)"
ROLE = "pj"


def postgres_binaries() -> Path | None:
    """The folder of ``initdb``/``pg_ctl``/``postgres``, newest version first; None if absent."""
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").exists() and (Path(folder) / "pg_ctl").exists():
            return Path(folder)
    found = shutil.which("pg_ctl")
    if found and (Path(found).resolve().parent / "initdb").exists():
        return Path(found).resolve().parent
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, started on a free loopback port."""

    def __init__(self, binaries: Path, *, durable: bool = False) -> None:
        self.binaries = binaries
        self.durable = durable  # fsync on (benchmarks); off for tests, which need speed
        self.folder = Path(tempfile.mkdtemp(prefix="pj-postgres-"))
        self.data = self.folder / "data"
        self.sockets = self.folder / "sockets"
        self.log = self.folder / "server.log"
        self.port = _free_port()
        self.as_root = os.geteuid() == 0
        self.running = False

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        command = [str(self.binaries / args[0]), *args[1:]]
        if self.as_root:  # PostgreSQL will not run as root: hand the cluster to postgres
            command = ["runuser", "-u", "postgres", "--", *command]
        return subprocess.run(
            command, check=True, capture_output=True, text=True, timeout=timeout, cwd=self.folder
        )

    def start(self) -> None:
        """``initdb`` (first time only) and start the server; returns once it accepts."""
        if not self.data.exists():
            self.sockets.mkdir(parents=True, exist_ok=True)
            if self.as_root:
                shutil.chown(self.folder, "postgres", "postgres")
                shutil.chown(self.sockets, "postgres", "postgres")
            self._run(
                "initdb", "-D", str(self.data), "-U", ROLE, "-A", "trust", "-E", "UTF8",
                "--no-sync", "--locale=C",
            )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
            f"-c fsync={'on' if self.durable else 'off'} -c max_connections=200"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-o", options, "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode`` as ``pg_ctl stop -m``: smart, fast or immediate)."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop")
            self.running = False

    def url(self, database: str = "postgres") -> str:
        """The ``postgresql://`` URL of ``database`` on this server."""
        return f"postgresql://{ROLE}@127.0.0.1:{self.port}/{database}"

    def _psql(self, sql: str) -> None:
        self._run(
            "psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", ROLE, "-d", "postgres",
            "-v", "ON_ERROR_STOP=1", "-q", "-c", sql,
        )  # fmt: skip

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        name = f"pj_{uuid.uuid4().hex[:12]}"
        self._psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url`` (closing its connections)."""
        name = url.rsplit("/", 1)[1]
        with contextlib.suppress(subprocess.CalledProcessError):
            self._psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def close(self) -> None:
        """Stop the server and delete its folder."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)
