"""A real PostgreSQL server for the tests, started by the tests themselves (no docker).

The server binaries come from the system (Debian's ``postgresql`` package, which ``make test``
installs when missing) and from the ``pgserver`` package (PostgreSQL 16, in the ``dev`` extra): the
server tests run once against each major version found. ``$UMIG_TEST_PG_BIN`` names one instead.
PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` user and its
commands run through ``runuser``. One cluster per version serves the whole session (fsync off: no
test here needs durability against power loss); every test gets a database of its own.
"""

from __future__ import annotations

import glob
import importlib.util
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


def _major(bindir: Path) -> int | None:
    """The server's major version (``postgres --version``), or None where it does not run."""
    try:
        out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True, text=True, timeout=30)
        return int(out.stdout.split()[-1].split(".")[0])
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


def _bindirs() -> list[tuple[int, Path]]:
    """(major version, bin directory) of each server the tests run against, newest first: ``$UMIG_TEST_PG_BIN``
    alone when set; else the system's newest (Debian's ``/usr/lib/postgresql/N/bin``, or ``pg_ctl`` on PATH)
    and the one the ``pgserver`` package bundles (in the ``dev`` extra), one per major version."""
    explicit = os.environ.get("UMIG_TEST_PG_BIN")
    if explicit:
        candidates = [explicit]
    else:
        system = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
        on_path = shutil.which("pg_ctl")
        if on_path:
            system.append(str(Path(on_path).resolve().parent))
        candidates = system[:1]
        bundled = importlib.util.find_spec("pgserver")  # located, not imported
        if bundled is not None and bundled.submodule_search_locations:
            candidates.append(str(Path(bundled.submodule_search_locations[0]) / "pginstall" / "bin"))
    found: dict[int, Path] = {}
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            major = _major(Path(c))
            if major is not None:
                found.setdefault(major, Path(c))
    return sorted(found.items(), reverse=True)


# Found at collection: every server test runs once per version, with these ids (pg16, pg15, ...).
SERVERS = {f"pg{major}": bindir for major, bindir in _bindirs()}
VERSIONS = list(SERVERS) or ["pg"]  # "pg": none found; its tests are skipped with the reason


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


class Servers:
    """The session's clusters, one per version, each started when a test first needs it."""

    def __init__(self) -> None:
        self._up: dict[str, PostgresServer] = {}

    def get(self, version: str) -> PostgresServer:
        """The running server of ``version`` (an id of :data:`VERSIONS`); skips the test where none can run."""
        if version not in self._up:
            bindir = SERVERS.get(version)
            if bindir is None:
                pytest.skip(f"no PostgreSQL server binaries found: {HINT}")
            try:
                self._up[version] = PostgresServer(bindir)
            except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
                pytest.skip(f"cannot start a PostgreSQL {version} server here: {e}")
        return self._up[version]

    def stop(self) -> None:
        for server in self._up.values():
            server.stop()


@pytest.fixture(scope="session")
def postgres_servers() -> Iterator[Servers]:
    """Every PostgreSQL version's server, started on first use and stopped at the end of the session."""
    pytest.importorskip("psycopg", reason=f"psycopg is not installed: {HINT}")
    servers = Servers()
    yield servers
    servers.stop()


@pytest.fixture(scope="session", params=VERSIONS)
def postgres_server(request: pytest.FixtureRequest, postgres_servers: Servers) -> PostgresServer:
    """A server of each PostgreSQL version found: a test that uses it runs once per version."""
    return postgres_servers.get(request.param)


def database(request: pytest.FixtureRequest, version: str) -> str:
    """A fresh database on ``version``'s server, dropped after the test: for fixtures that choose the
    version themselves (a parametrised fixture cannot be requested by name at run time)."""
    server = request.getfixturevalue("postgres_servers").get(version)
    url = server.new_database()
    request.addfinalizer(lambda: server.drop_database(url))
    return url


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database on the session's server: ``postgresql://umig@127.0.0.1:PORT/t_...``."""
    url = postgres_server.new_database()
    yield url
    postgres_server.drop_database(url)
