"""Connections to the metadata database: SQLite (embedded, the default) or PostgreSQL (a team's server).

``umig.store`` writes every query once, in SQLite's dialect with ``?`` placeholders and portable
upserts (``INSERT ... ON CONFLICT``); this module is what differs between the two servers and nothing
else: connecting, placeholders, the schema's column types, the write lock, and a cheap token that
changes with every commit. Together with ``umig.store`` it is the only code that speaks SQL.

The write lock serialises writers the way each server allows: an advisory ``flock`` on a lock file
beside a SQLite database (plus ``BEGIN IMMEDIATE``), a session-level advisory lock in PostgreSQL, so
that two writers on different machines queue on the server, and a writer that dies (``kill -9``)
releases it with its connection.
"""

from __future__ import annotations

import fcntl
import os
import re
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from umig.errors import LockTimeout, UmigError

POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
# One umig store per PostgreSQL database: one advisory lock key (any constant; "umig" in ASCII).
_PG_LOCK_KEY = 0x756D6967
SQLITE_ONLY = "-- sqlite only"  # a migration statement that converts data PostgreSQL stores never had


def is_database_url(location: str | os.PathLike[str]) -> bool:
    """Whether ``location`` names a database server (``postgresql://...``) rather than a directory.

    >>> is_database_url("postgresql://u@db:5432/umig"), is_database_url(".umig")
    (True, False)
    """
    return urlsplit(str(location)).scheme in POSTGRES_SCHEMES


def redact(url: str) -> str:
    """``url`` without its password, for messages and audit records.

    >>> redact("postgresql://ann:secret@db/umig")
    'postgresql://ann:***@db/umig'
    """
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


class Row(tuple):
    """A result row readable by position and by column name (as ``sqlite3.Row``)."""

    def __new__(cls, values: Iterable[Any], names: dict[str, int]) -> "Row":
        row = super().__new__(cls, values)
        row._names = names
        return row

    def __getitem__(self, key: Any) -> Any:
        return tuple.__getitem__(self, self._names[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self._names)


class Database(ABC):
    """One connection to the metadata database, in autocommit mode: transactions are explicit."""

    dialect: str
    url: str  # where it is, for messages (never a password)

    @abstractmethod
    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run one statement (``?`` placeholders); returns a cursor whose rows read as :class:`Row`."""

    @abstractmethod
    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """Run one statement once per row of parameters."""

    @abstractmethod
    def tuples(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        """Rows as plain tuples: the bulk reads of 50,000 nodes skip the name lookup."""

    @abstractmethod
    def begin(self) -> None:
        """Start a write transaction (the caller holds :meth:`write_lock`)."""

    def commit(self) -> None:
        self.execute("COMMIT")

    def rollback(self) -> None:
        self.execute("ROLLBACK")

    @abstractmethod
    def has_table(self, name: str) -> bool:
        """Whether the database has table ``name`` (an empty database is a store not yet created)."""

    def schema(self, statement: str) -> str | None:
        """A migration statement in this dialect (``None``: not for this server)."""
        return statement

    @abstractmethod
    def write_lock(self, timeout: float) -> Any:
        """A context manager: the store's write lock, waited for up to ``timeout`` seconds."""

    @abstractmethod
    def change_token(self) -> Any:
        """A value that changes whenever anyone commits (the browser view rebuilds on a change)."""

    def reset_sequences(self, tables: Iterable[str]) -> None:
        """After rows were inserted with explicit ids (``umig store copy``): the next id follows them."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection (a held write lock goes with it)."""


# ------------------------------------------------------------------ SQLite
class SQLiteDatabase(Database):
    """``<store>/umig.db`` (WAL, synchronous=FULL), with ``<store>/lock`` as the writers' lock."""

    dialect = "sqlite"

    def __init__(self, path: Path, lock_path: Path) -> None:
        self.path = path
        self.lock_path = lock_path
        self.url = str(path)
        self.conn = sqlite3.connect(path, isolation_level=None, timeout=60, check_same_thread=False)
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute("PRAGMA foreign_keys=ON")
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=FULL")
        except sqlite3.DatabaseError as e:  # e.g. "file is not a database"
            self.conn.close()
            raise UmigError(f"{path} is not a readable umig database ({e})") from None
        self.execute = self.conn.execute  # type: ignore[method-assign]  # the hot path: no wrapper call
        self.executemany = self.conn.executemany  # type: ignore[method-assign]

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:  # replaced per instance (above)
        return self.conn.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.conn.executemany(sql, rows)

    def tuples(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        cur = self.conn.cursor()
        cur.row_factory = None
        return cur.execute(sql, params).fetchall()

    def begin(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def has_table(self, name: str) -> bool:
        return self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)).fetchone() is not None

    @contextmanager
    def write_lock(self, timeout: float) -> Iterator[None]:
        fh = open(self.lock_path, "a+")
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    fh.close()
                    raise LockTimeout(
                        f"store {self.path.parent} is locked by another umig process; gave up after "
                        f"{timeout:g} s (set UMIG_LOCK_TIMEOUT to wait longer)") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            fh.close()

    def change_token(self) -> Any:
        out = []
        for path in (self.path, self.path.with_name(self.path.name + "-wal")):
            try:
                st = os.stat(path)
                out.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                out.append(None)
        return tuple(out)

    def close(self) -> None:
        self.conn.close()


# -------------------------------------------------------------- PostgreSQL
def _pg_sql(sql: str) -> str:
    """``?`` placeholders -> ``%s`` (and a literal ``%`` doubled). No query of the store has a ``?``
    inside a string literal."""
    return sql.replace("%", "%%").replace("?", "%s")


def _pg_schema(statement: str) -> str | None:
    """SQLite column types -> PostgreSQL's: 64-bit integers and floats (REAL is 32-bit there), identity
    ids, and a ``rowid`` on every table, which the store orders insertion-ordered rows by."""
    if statement.lstrip().startswith(SQLITE_ONLY):
        return None
    s = re.sub(r"\bINTEGER PRIMARY KEY\b", "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", statement)
    s = re.sub(r"\bINTEGER\b", "BIGINT", s)
    s = re.sub(r"\bREAL\b", "DOUBLE PRECISION", s)
    return re.sub(r"^(\s*CREATE TABLE \w+\()", r"\1rowid BIGSERIAL, ", s)


class PostgresDatabase(Database):
    """A PostgreSQL database through psycopg 3 (``pip install 'umig[server]'``)."""

    dialect = "postgresql"

    def __init__(self, url: str, *, create: bool = False) -> None:
        try:
            import psycopg  # deferred: only PostgreSQL stores need it
        except ImportError:
            raise UmigError("postgresql:// stores need psycopg: pip install 'umig[server]'") from None
        self._psycopg = psycopg
        self.url = redact(url)
        dsn = url.replace("postgresql+psycopg://", "postgresql://", 1)

        def connect() -> Any:
            return psycopg.connect(dsn, autocommit=True, row_factory=_pg_row_factory, connect_timeout=10)

        try:
            try:
                self.conn = connect()
            except psycopg.OperationalError as e:
                if not (create and "does not exist" in str(e)):
                    raise
                _create_database(psycopg, dsn, self.url)
                self.conn = connect()
        except psycopg.OperationalError as e:
            raise UmigError(f"cannot connect to {self.url}: {_first_line(e)}") from None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        try:
            return self.conn.execute(_pg_sql(sql), tuple(params) or None)
        except self._psycopg.OperationalError as e:
            raise UmigError(f"database {self.url}: {_first_line(e)}") from None

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = [tuple(r) for r in rows]
        if rows:
            with self.conn.cursor() as cur:
                cur.executemany(_pg_sql(sql), rows)

    def tuples(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        with self.conn.cursor(row_factory=self._psycopg.rows.tuple_row) as cur:
            return cur.execute(_pg_sql(sql), tuple(params) or None).fetchall()

    def begin(self) -> None:
        self.conn.execute("BEGIN")

    def has_table(self, name: str) -> bool:
        return self.conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]

    def schema(self, statement: str) -> str | None:
        return _pg_schema(statement)

    @contextmanager
    def write_lock(self, timeout: float) -> Iterator[None]:
        # Session-level (not transaction-level): the store holds it across a whole unlearning request,
        # and the server drops it with the connection of a writer that died.
        deadline = time.monotonic() + timeout
        while not self.conn.execute("SELECT pg_try_advisory_lock(%s)", (_PG_LOCK_KEY,)).fetchone()[0]:
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    f"store {self.url} is locked by another umig process; gave up after {timeout:g} s "
                    "(set UMIG_LOCK_TIMEOUT to wait longer)")
            time.sleep(0.05)
        try:
            yield
        finally:
            if not self.conn.closed:
                self.conn.execute("SELECT pg_advisory_unlock(%s)", (_PG_LOCK_KEY,))

    def change_token(self) -> Any:
        # The server's write-ahead position: any commit moves it (so may other databases' commits,
        # which only costs a rebuild).
        return self.conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()[0]

    def reset_sequences(self, tables: Iterable[str]) -> None:
        for table in tables:
            cols = self.conn.execute("SELECT column_name FROM information_schema.columns WHERE table_schema="
                                     "current_schema() AND table_name=%s AND column_name IN ('id', 'rowid')",
                                     (table,)).fetchall()
            for (col,) in cols:
                seq = self.conn.execute("SELECT pg_get_serial_sequence(%s, %s)", (table, col)).fetchone()[0]
                if seq:
                    self.conn.execute(
                        f"SELECT setval(%s, COALESCE((SELECT MAX({col}) FROM {table}), 0) + 1, false)", (seq,))

    def close(self) -> None:
        self.conn.close()


def _pg_row_factory(cursor: Any) -> Any:
    desc = cursor.description
    if desc is None:
        return tuple
    names = {c.name: i for i, c in enumerate(desc)}
    return lambda values: Row(values, names)


def _create_database(psycopg: Any, dsn: str, shown: str) -> None:
    """``CREATE DATABASE`` for ``umig init`` on a server where the database does not exist yet."""
    parts = urlsplit(dsn)
    name = parts.path.lstrip("/")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", name or ""):
        raise UmigError(f"cannot create database {name!r} at {shown}: name it with letters, digits, _ or -")
    admin = urlunsplit(parts._replace(path="/postgres"))
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as e:
        raise UmigError(f"database {name!r} does not exist at {shown} and cannot be created: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def connect(location: str | os.PathLike[str], *, create: bool = False) -> Database:
    """The metadata database of a store: a PostgreSQL URL, or a store directory's ``umig.db``."""
    if is_database_url(location):
        return PostgresDatabase(str(location), create=create)
    root = Path(location)
    return SQLiteDatabase(root / "umig.db", root / "lock")
