"""A real PostgreSQL for tests: Debian's server binaries (`apt-get install -y postgresql`), a cluster in a
temporary directory on a free loopback port, with a password (scram-sha-256, as production), stopped
and deleted after. PostgreSQL refuses to run as root: under root the cluster belongs to the `postgres`
user (or `nobody`) and its commands run through `runuser`; any other user runs them as itself.

Hand-written rather than pytest-postgresql: that plugin runs pg_ctl as the calling user, which fails
under root (CI here runs as root)."""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import pytest

from tests.servers import free_port

USER = "lmforge"  # the cluster's superuser; servers connect as it


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str

    def url(self, database: str, driver: str = "postgresql") -> str:
        """A SQLAlchemy URL: `postgresql` (psycopg2, MLflow) or `postgresql+asyncpg` (Prefect)."""
        return f"{driver}://{USER}:{self.password}@127.0.0.1:{self.port}/{database}"


def postgres_bin() -> Path | None:
    """The newest installed PostgreSQL's bin directory (Debian puts it outside PATH), or None."""
    found = sorted(glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("pg_ctl")
    return Path(on_path).parent if on_path else None


def skip_reason() -> str | None:
    """Why no PostgreSQL can be started here, or None when one can."""
    if postgres_bin() is None or not (postgres_bin() / "initdb").exists():
        return "no PostgreSQL server binaries: `apt-get install -y postgresql` (Debian) enables these tests"
    if os.geteuid() == 0 and not shutil.which("runuser"):
        return "running as root without `runuser` to start PostgreSQL as another user"
    return None


def _owner() -> str | None:
    """The user the cluster runs as: None (this one) unless this is root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise RuntimeError("running as root and neither a `postgres` nor a `nobody` user exists to run PostgreSQL")


def _run(owner: str | None, command: list[str], timeout: float = 120) -> None:
    full = ["runuser", "-u", owner, "--", *command] if owner else command
    done = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")


@contextlib.contextmanager
def running_postgres(databases: tuple[str, ...] = ()) -> Iterator[Postgres]:
    """A fresh cluster with `databases` created; stopped (fast mode) and deleted when the `with` ends."""
    bin_dir, owner = postgres_bin(), _owner()
    # Not pytest's tmp_path: its parents are private to root, and the cluster's user must reach the directory.
    root = Path(tempfile.mkdtemp(prefix="lmforge-pg-"))
    data, password_file = root / "data", root / "password"
    password = secrets.token_hex(16)
    password_file.write_text(password)
    if owner:
        account = pwd.getpwnam(owner)
        for path in (root, password_file):
            os.chown(path, account.pw_uid, account.pw_gid)
    port = free_port()
    started = False
    try:
        _run(owner, [str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--pwfile", str(password_file),
                     "-A", "scram-sha-256", "-E", "UTF8", "--no-sync"])
        # Loopback only, its socket in its own directory (not /var/run/postgresql), no fsync: a test database.
        options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        _run(owner, [str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "server.log"),
                     "-w", "-t", "120", "start"], timeout=150)
        started = True
        server = Postgres(port, password)
        create_databases(server, databases)
        yield server
    finally:
        if started:
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _run(owner, [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], timeout=90)
        shutil.rmtree(root, ignore_errors=True)


def create_databases(server: Postgres, names: tuple[str, ...]) -> None:
    """Empty databases `names` on `server` (the servers create their tables on first start)."""
    import psycopg2

    connection = psycopg2.connect(host="127.0.0.1", port=server.port, user=USER, password=server.password,
                                  dbname="postgres")
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with connection.cursor() as cursor:
            for name in names:
                cursor.execute(f'CREATE DATABASE "{name}"')
    finally:
        connection.close()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session; each user creates its own databases (`create_databases`).
    Skips, saying why, where the server binaries are missing."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    with running_postgres() as server:
        yield server
