"""A real PostgreSQL server for the tests, started by the tests themselves (no docker).

The server binaries come from the system (Debian's ``postgresql`` package, which ``make test``
installs when missing) or from ``$UMIG_TEST_PG_BIN``. PostgreSQL refuses to run as root, so as root
the cluster belongs to the ``postgres`` user and its commands run through ``runuser``. One cluster
serves the whole session (fsync off: no test here needs durability against power loss); every test
gets a database of its own.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

HINT = "install PostgreSQL's server (apt-get install postgresql; make test does) and pip install 'umig[server]'"


def _bindir() -> Path | None:
    explicit = os.environ.get("UMIG_TEST_PG_BIN")
    candidates = [explicit] if explicit else sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                                                    key=lambda p: int(Path(p).parent.name), reverse=True)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway cluster on a free loopback port; :meth:`new_database` gives each test its own."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.dir = Path(tempfile.mkdtemp(prefix="umig-pg-"))
        self.port = _free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            import pwd  # POSIX only, as is running postgres as another user

            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and there is no 'postgres' user to run the server") from None
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        os.chmod(self.dir, 0o755)
        data = self.dir / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "umig", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(data), "-l", str(self.dir / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off "
                  "-c max_connections=60", "start")
        self.data = data

    def _run(self, tool: str, *args: str) -> None:
        res = subprocess.run([*self.as_user, str(self.bindir / tool), *args], capture_output=True, text=True,
                             timeout=120, cwd=self.dir)
        if res.returncode:
            log = self.dir / "log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({res.returncode}): {res.stderr.strip() or res.stdout.strip()}\n{tail}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://umig@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server (skipped, with the reason, where none can run)."""
    pytest.importorskip("psycopg", reason=f"psycopg is not installed: {HINT}")
    bindir = _bindir()
    if bindir is None:
        pytest.skip(f"no PostgreSQL server binaries found: {HINT}")
    try:
        server = PostgresServer(bindir)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot start a PostgreSQL server here: {e}")
    yield server
    server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server: ``postgresql://umig@127.0.0.1:PORT/t_...``."""
    url = postgres_server.new_database()
    yield url
    postgres_server.drop_database(url)
