"""A throwaway PostgreSQL server for tests: initdb in a temporary folder, reached on a unix socket there.

``mantle_assets_tests/conftest.py`` imports the fixtures, so that the session has one server.
Where no PostgreSQL binaries are found the tests are skipped, except with ``MANTLE_REQUIRE_POSTGRES=1``
(set by ``.ci/run``, which installs them), where that is a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SUPERUSER = "mantle"
# PostgreSQL refuses to run as root; CI runs as root.
UNPRIVILEGED_USER = "nobody"


@dataclass(frozen=True)
class PostgresServer:
    """A running server: its socket folder and its superuser, who connects without a password."""

    socket_folder: Path

    def dsn(self, database: str) -> str:
        """libpq's key=value string, as DuckDB's ``postgres:`` attach and psycopg2 take it."""
        return f"dbname={database} host={self.socket_folder} user={SUPERUSER}"

    def create_database(self) -> str:
        """A new empty database's name."""
        import psycopg2

        name = f"test_{uuid.uuid4().hex[:12]}"
        connection = psycopg2.connect(self.dsn("postgres"))
        try:
            connection.autocommit = True  # CREATE DATABASE refuses to run in a transaction
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
        finally:
            connection.close()
        return name


def postgres_binaries() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl``: on PATH, else Debian's versioned folder."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(debian[-1]).parent if debian else None


def missing_postgres(reason: str):
    """Skip for lack of PostgreSQL, except where CI provides it (MANTLE_REQUIRE_POSTGRES=1): then fail."""
    if os.environ.get("MANTLE_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"{reason} (MANTLE_REQUIRE_POSTGRES=1)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the session, stopped and deleted after it."""
    binaries = postgres_binaries()
    if binaries is None:
        missing_postgres("no PostgreSQL server binaries (initdb, pg_ctl; Debian package postgresql)")
    # Not pytest's tmp_path: that folder is private to the user running pytest. Short, for the socket's path.
    folder = Path(tempfile.mkdtemp(prefix="mantle-pg-"))
    user = UNPRIVILEGED_USER if os.geteuid() == 0 else None
    if user is not None:
        os.chown(folder, pwd.getpwnam(user).pw_uid, -1)
    data = folder / "data"

    def run(*command: str) -> None:
        completed = subprocess.run(command, user=user, capture_output=True, text=True, timeout=120)
        if completed.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{completed.stdout}{completed.stderr}")

    try:
        run(str(binaries / "initdb"), "-D", str(data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-sync")
        # No TCP port (nothing to collide with), fsync off: the data is thrown away.
        run(str(binaries / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"), "-w",
            "-o", f"-k {folder} -c listen_addresses='' -F", "start")
        try:
            yield PostgresServer(folder)
        finally:
            run(str(binaries / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_database(postgres_server) -> str:
    """A fresh database on the session's server: its name."""
    return postgres_server.create_database()
