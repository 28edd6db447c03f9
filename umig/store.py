"""The lineage store: metadata in SQL + content-addressed safetensors blobs.

Embedded (the default), a store is a directory::

    umig.db        SQLite: nodes, edges, versions, operations (schema-versioned)
    blobs/         content-addressed safetensors files (sha256)
    lock           advisory write lock shared by every umig process

Shared by a team, the metadata lives in a PostgreSQL database (``postgresql://...``) and the blobs in
S3 (``s3://bucket/prefix``) or a shared directory; the blob location is recorded in the database at
``init``, so the database URL alone opens the store (``umig.db`` holds what differs between servers).

A node version is a row pointing at blobs: ``body`` (every tensor but the head),
``head`` (the classifier's weight and bias), an optional sparse ``delta`` (what
an adapter or channel fine-tuning changed) and the model ``fim``. Versions share
every blob they do not change, so an FIUn update stores only a new head.

Write discipline: blobs are written (temp + fsync + rename) first, metadata is
committed after, in one transaction under the store lock. A failure anywhere
rolls the transaction back and removes the blobs it created.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from umig import db as D
from umig import graph as G
from umig.arch import build_model
from umig.blobs import BaseBlobStore, blobs_url, open_blobs
from umig.data import Data, DataRef, verify
from umig.delta import apply as apply_delta
from umig.errors import GraphError, NotFoundError, UmigError
from umig.fisher import FIM
from umig.forget import SampleSet

DB_NAME = "umig.db"
DEFAULT_STORE = ".umig"
FRAMEWORKS = ("fl", "ddp", "il", "tl", "other")
RELATIONS = ("aggregate", "sync", "finetune", "increment", "transfer", "copy")

# Ordered migrations: index i brings the schema from version i to i + 1.
MIGRATIONS: list[str] = [
    """
    CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE nodes(
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        arch TEXT NOT NULL,
        head TEXT NOT NULL,
        classes TEXT NOT NULL,
        input_shape TEXT,
        data_ref TEXT,
        data_fingerprint TEXT,
        data_size INTEGER NOT NULL DEFAULT 0,
        label_counts TEXT NOT NULL DEFAULT '{}',
        framework TEXT NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}',
        recipe TEXT,
        created REAL NOT NULL,
        version INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE edges(
        parent INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        child INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        relation TEXT NOT NULL,
        weight REAL,
        PRIMARY KEY(parent, child)
    );
    CREATE INDEX edges_child ON edges(child);
    CREATE TABLE versions(
        node INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        version INTEGER NOT NULL,
        body TEXT NOT NULL,
        head TEXT NOT NULL,
        delta TEXT,
        fim TEXT,
        operation TEXT,
        purged INTEGER NOT NULL DEFAULT 0,
        created REAL NOT NULL,
        PRIMARY KEY(node, version)
    );
    CREATE INDEX versions_operation ON versions(operation);
    CREATE TABLE operations(
        id TEXT PRIMARY KEY,
        created REAL NOT NULL,
        labels TEXT NOT NULL,
        method TEXT NOT NULL,
        params TEXT NOT NULL,
        plan TEXT NOT NULL,
        result TEXT NOT NULL,
        wall_s REAL NOT NULL,
        state TEXT NOT NULL,
        reverted REAL,
        purged REAL
    );
    CREATE TABLE operation_nodes(
        operation TEXT NOT NULL REFERENCES operations(id),
        node INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        version_before INTEGER NOT NULL,
        version_after INTEGER NOT NULL,
        metrics TEXT NOT NULL DEFAULT '{}',
        PRIMARY KEY(operation, node)
    );
    CREATE INDEX operation_nodes_node ON operation_nodes(node);
    CREATE TABLE operation_blobs(
        operation TEXT NOT NULL REFERENCES operations(id),
        digest TEXT NOT NULL,
        kind TEXT NOT NULL
    );
    CREATE INDEX operation_blobs_op ON operation_blobs(operation);
    """,
    # 2: what an operation forgot (umig.forget.ForgetSet.to_json: kinds, fingerprints, counts, digests).
    """
    ALTER TABLE operations ADD COLUMN forget TEXT;
    """,
    # 3: `umig verify`: the retrained reference of an operation's nodes (never a live version; purge
    # deletes it with the operation) and the latest verification verdict.
    """
    ALTER TABLE operations ADD COLUMN verification TEXT;
    CREATE TABLE operation_references(
        operation TEXT NOT NULL REFERENCES operations(id),
        node INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        method TEXT NOT NULL,
        body TEXT NOT NULL,
        head TEXT NOT NULL,
        delta TEXT,
        fim TEXT,
        seconds REAL NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY(operation, node)
    );
    """,
    # 4: the deletion request an operation answers (who asked, why, which ticket), and every export of
    # a node version out of the store: copies an auditor must account for. An export keeps the node's
    # name, not its id, so the record outlives `umig remove` (the file does too).
    """
    ALTER TABLE operations ADD COLUMN requester TEXT;
    ALTER TABLE operations ADD COLUMN reason TEXT;
    ALTER TABLE operations ADD COLUMN ticket TEXT;
    CREATE INDEX operations_ticket ON operations(ticket);
    CREATE TABLE exports(
        id INTEGER PRIMARY KEY,
        node TEXT NOT NULL,
        version INTEGER NOT NULL,
        path TEXT NOT NULL,
        created REAL NOT NULL
    );
    CREATE INDEX exports_node ON exports(node, version);
    """,
    # 5: lineage guard (issue 19). Every edge records the parent version the child was derived from
    # (NULL: recorded before umig knew). What a live operation forgot, in a form add-node can check
    # membership against: its labels (indexed), and per sample set the forgotten indices into the
    # dataset's whole source (a blob: which rows were deleted, never the rows), kept after a purge so
    # that the guard keeps working. Nodes recorded later from a superseded version (or on forgotten
    # data) and unlearned on the spot are "caught up": their update is attached to the operation.
    """
    ALTER TABLE edges ADD COLUMN parent_version INTEGER;
    CREATE TABLE operation_labels(
        operation TEXT NOT NULL REFERENCES operations(id),
        label INTEGER NOT NULL,
        PRIMARY KEY(operation, label)
    );
    CREATE INDEX operation_labels_label ON operation_labels(label);
    -- sqlite only: stores from before schema 5 (a PostgreSQL store never was one)
    INSERT OR IGNORE INTO operation_labels(operation, label)
        SELECT o.id, CAST(j.value AS INTEGER) FROM operations o, json_each(o.labels) j;
    CREATE TABLE operation_samples(
        operation TEXT NOT NULL REFERENCES operations(id),
        dataset TEXT NOT NULL,
        source TEXT NOT NULL,
        client TEXT,
        size INTEGER NOT NULL,
        count INTEGER NOT NULL,
        indices TEXT NOT NULL
    );
    CREATE INDEX operation_samples_dataset ON operation_samples(dataset);
    CREATE INDEX operation_samples_op ON operation_samples(operation);
    CREATE TABLE caught_up(
        operation TEXT NOT NULL REFERENCES operations(id),
        node INTEGER NOT NULL REFERENCES nodes(id) ON DELETE CASCADE,
        version_before INTEGER NOT NULL,
        version_after INTEGER NOT NULL,
        reason TEXT NOT NULL,
        metrics TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        PRIMARY KEY(operation, node)
    );
    CREATE INDEX caught_up_node ON caught_up(node);
    """,
    # 6: what a purge did (versions, blobs, and the model FIMs it cleaned or had to keep), for the report.
    """
    ALTER TABLE operations ADD COLUMN purge_summary TEXT;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class Version:
    """One version of a node: digests of the blobs that make it up."""

    node: str
    version: int
    body_blob: str  # every tensor but the head
    head_blob: str  # the classifier head's weight and bias
    delta_blob: str | None  # a sparse delta on body + head (adapters), see umig.delta
    fim_blob: str | None  # the model FIM
    operation: str | None
    purged: bool
    created: float

    def blobs(self) -> list[str]:
        return [d for d in (self.body_blob, self.head_blob, self.delta_blob, self.fim_blob) if d]


@dataclass(frozen=True)
class NodeSnapshot:
    """A node at its current version, as a worker needs it, without touching the database."""

    name: str
    version: int
    arch: dict
    head: str  # the head module's name
    classes: tuple[int, ...]
    body_blob: str
    head_blob: str
    delta_blob: str | None
    fim_blob: str | None
    data_ref: dict | None
    data_fingerprint: str | None
    data_size: int
    labels: frozenset[int]
    recipe: dict | None
    framework: str
    parents: tuple[tuple[str, str, float | None], ...]  # (name, relation, weight)

    def blobs(self) -> dict[str, str | None]:
        """The version's blob digests by part, the form workers rebuild weights from."""
        return {"body": self.body_blob, "head": self.head_blob, "delta": self.delta_blob}


_SNAPSHOT_FIELDS = tuple(f.name for f in fields(NodeSnapshot))


def _snapshot(*values: Any) -> NodeSnapshot:
    """``NodeSnapshot(*values)`` (every field, in order) without the frozen dataclass's ``__setattr__`` per
    field: the same object at half the cost, for the tens of thousands a large request reads."""
    snap = object.__new__(NodeSnapshot)
    if len(values) != len(_SNAPSHOT_FIELDS):
        raise TypeError(f"a NodeSnapshot has {len(_SNAPSHOT_FIELDS)} fields, got {len(values)} values")
    snap.__dict__.update(zip(_SNAPSHOT_FIELDS, values))
    return snap


@dataclass(frozen=True)
class NewVersion:
    """A version an operation adds to a node (blob digests already written)."""

    node: str
    role: str
    version_before: int
    body_blob: str
    head_blob: str
    delta_blob: str | None
    fim_blob: str | None
    metrics: Mapping[str, Any]


@dataclass(frozen=True)
class NodeInfo:
    """Everything the store knows about one node (its current version unless asked)."""

    name: str
    arch: dict
    head: str
    classes: tuple[int, ...]
    input_shape: tuple[int, ...] | None
    data_ref: dict | None
    data_fingerprint: str | None
    data_size: int
    label_counts: dict[int, int]
    framework: str
    meta: dict
    recipe: dict | None
    created: float
    version: int
    parents: tuple[tuple[str, str, float | None], ...] = ()
    children: tuple[str, ...] = ()
    # Parent -> the version of it this node was derived from (None: recorded before umig kept it).
    parent_versions: Mapping[str, int | None] = field(default_factory=dict)

    @property
    def labels(self) -> frozenset[int]:
        return frozenset(self.label_counts)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "arch": self.arch,
            "head": self.head,
            "classes": list(self.classes),
            "input_shape": list(self.input_shape) if self.input_shape else None,
            "data": self.data_ref,
            "data_fingerprint": self.data_fingerprint,
            "data_size": self.data_size,
            "label_counts": {str(k): v for k, v in sorted(self.label_counts.items())},
            "framework": self.framework,
            "meta": self.meta,
            "recipe": self.recipe,
            "created": self.created,
            "version": self.version,
            "parents": [{"name": p, "relation": r, "weight": w, "version": self.parent_versions.get(p)}
                        for p, r, w in self.parents],
            "children": list(self.children),
        }


REQUEST_FIELDS = ("requester", "reason", "ticket")


@dataclass(frozen=True)
class Request:
    """The deletion request an operation answers: who asked, why, and the ticket that tracks it.

    Every field is optional; values are stripped and an empty one counts as absent. ``requester``
    and ``ticket`` are one line each: they are identifiers that ``umig history`` filters on.
    """

    requester: str | None = None
    reason: str | None = None
    ticket: str | None = None

    def __post_init__(self) -> None:
        for key in REQUEST_FIELDS:
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise UmigError(f"request {key} must be text, got {type(value).__name__}")
            value = value.strip() if value else None
            if value and key != "reason" and ("\n" in value or "\r" in value):
                raise UmigError(f"request {key} must be one line, got {value!r}")
            object.__setattr__(self, key, value or None)

    @classmethod
    def of(cls, value: Request | Mapping[str, Any] | None) -> Request:
        """A request from a :class:`Request`, a mapping with the same keys, or ``None`` (no request)."""
        if value is None or isinstance(value, Request):
            return value or cls()
        if not isinstance(value, Mapping):
            raise UmigError(f"a request is a Request or a mapping of {', '.join(REQUEST_FIELDS)}, "
                            f"got {type(value).__name__}")
        unknown = sorted(set(value) - set(REQUEST_FIELDS))
        if unknown:
            raise UmigError(f"unknown request field(s) {', '.join(map(str, unknown))} "
                            f"(use {', '.join(REQUEST_FIELDS)})")
        return cls(**value)

    def __bool__(self) -> bool:
        return any(getattr(self, k) for k in REQUEST_FIELDS)

    def to_json(self) -> dict[str, str | None]:
        return {k: getattr(self, k) for k in REQUEST_FIELDS}


@dataclass(frozen=True)
class Export:
    """A node version written out of the store (``umig export``): a copy an audit must account for."""

    node: str
    version: int
    path: str  # absolute, as resolved when it was written
    created: float

    def to_json(self) -> dict[str, Any]:
        return {"node": self.node, "version": self.version, "path": self.path, "created": self.created}


@dataclass(frozen=True)
class OperationRef:
    """A live unlearning operation as the lineage guard names it (:mod:`umig.ingest`)."""

    id: str
    ticket: str | None
    created: float


@dataclass(frozen=True)
class SampleForget:
    """Samples a live operation forgot from one dataset: the indices into its whole source are the
    blob ``indices_blob`` (int64 tensor ``indices``; :meth:`SqlStore.forgotten_indices`)."""

    operation: OperationRef
    dataset: str  # fingerprint of the whole source (umig.forget.source_fingerprint)
    source: str  # the reference it was named by (for messages only)
    client: str | None  # the node whose own data it was, for a client forget set
    size: int  # items in the whole source
    count: int  # indices forgotten
    indices_blob: str


@dataclass
class _Txn:
    depth: int = 0
    created_blobs: list[str] = field(default_factory=list)
    released: set[str] = field(default_factory=set)  # blobs to delete once the transaction commits


class SqlStore:
    """The lineage store's metadata (SQLite or PostgreSQL) and blobs. Open with :meth:`init` or :meth:`open`.

    The only class that executes SQL: every query, and every row -> entity mapping, is here
    (``umig.db`` connects, and translates what differs between the two servers).
    Users open the facade ``umig.Store``, which adds ``add_node`` and ``unlearn``.
    """

    def __init__(self, db: D.Database, blobs: BaseBlobStore, root: Path | None) -> None:
        self.db = db
        self.blobs = blobs  # buffered: the blob writes of a transaction overlap their fsyncs
        # The store's directory (an embedded store), or None for a database server's.
        self.root = root
        self.url = str(root.resolve()) if root is not None else db.url  # the store's name in records
        self._txn = _Txn()
        self._locked = False
        self._fims: dict[str, FIM] = {}  # digest -> parsed model FIM, most recently used last
        # The config as read inside the current transaction (under the write lock no one else changes it;
        # _set_meta and the transaction's end drop it): a recorder reads the Fisher settings for every node.
        self._config: dict[str, str] | None = None
        self.lock_timeout = float(os.environ.get("UMIG_LOCK_TIMEOUT", "60"))
        # The version of each node this object last handed out (state_dict, load_model, export):
        # ``add_node`` takes a parent named without a version to be derived from it (see ``ingest``).
        self.loaded: dict[str, int] = {}

    # ------------------------------------------------------------------ opening
    @staticmethod
    def default_path() -> str:
        """``$UMIG_STORE`` (a directory or a ``postgresql://`` URL), else ``.umig``."""
        return os.environ.get("UMIG_STORE", DEFAULT_STORE)

    @classmethod
    def init(cls, location: str | Path | None = None, *, blobs: str | Path | None = None,
             exist_ok: bool = False) -> "SqlStore":
        """Create a store (or open it when ``exist_ok`` and it already is one).

        ``location`` is a directory (the embedded default) or a ``postgresql://`` URL (the database is
        created when the server allows). ``blobs`` is where blobs go: a directory (default: the store
        directory's ``blobs/``) or ``s3://bucket/prefix``; a PostgreSQL store needs one. The location
        is recorded in the store, so later opens need only ``location``.
        """
        location = location if location is not None else cls.default_path()
        if D.is_database_url(location):
            db = D.connect(location, create=True)
            root = None
        else:
            root = Path(location)
            if (root / DB_NAME).exists():
                if exist_ok:
                    return cls.open(root)
                raise UmigError(f"a umig store already exists at {root}")
            try:
                root.mkdir(parents=True, exist_ok=True)
                (root / "lock").touch()
            except OSError as e:
                raise UmigError(f"cannot create a umig store at {root}: {e.strerror or e}") from None
            db = D.connect(root)
        try:
            if db.has_table("meta"):
                if exist_ok:
                    return cls._open(db, root)
                raise UmigError(f"a umig store already exists at {db.url}")
            if blobs is None and root is None:
                raise UmigError(f"a store in {db.url} needs a blob location: pass --blobs s3://bucket/prefix "
                                "(or a directory every machine shares)")
            url = blobs_url(blobs if blobs is not None else root / "blobs")
            store = cls(db, open_blobs(url), root)
            store.blobs.ensure()  # a bucket that cannot be written fails here, before any row exists
            store._migrate(blobs=None if blobs is None else url)
            return store
        except BaseException:
            db.close()
            raise

    @classmethod
    def open(cls, location: str | Path | None = None) -> "SqlStore":
        """Open an existing store; migrates its schema when it is older than this umig."""
        location = location if location is not None else cls.default_path()
        if D.is_database_url(location):
            db = D.connect(location)
            if not db.has_table("meta"):
                db.close()
                raise NotFoundError(f"no umig store in {D.redact(str(location))} (run 'umig init --store URL "
                                    "--blobs URL' first)")
            return cls._open(db, None)
        root = Path(location)
        if not (root / DB_NAME).exists():
            raise NotFoundError(f"no umig store at {root} (run 'umig init' or pass --store)")
        return cls._open(D.connect(root), root)

    @classmethod
    def _open(cls, db: D.Database, root: Path | None) -> "SqlStore":
        try:
            row = db.execute("SELECT value FROM meta WHERE key='store.blobs'").fetchone() \
                if db.has_table("meta") else None
            if row is None and root is None:
                raise UmigError(f"{db.url} records no blob location; it was not created by 'umig init'")
            store = cls(db, open_blobs(row[0] if row else root / "blobs"), root)
            store._migrate()
            return store
        except BaseException:
            db.close()
            raise

    @property
    def local_dir(self) -> Path:
        """A directory on this machine for the store's local side files (index files of data subsets):
        the store directory, or for a server's store a cache directory of its own."""
        if self.root is not None:
            return self.root
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "umig"
        return cache / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def change_token(self) -> Any:
        """A value that changes whenever any process commits to this store (cheap: no query of the data)."""
        return self.db.change_token()

    def _schema_version(self) -> int:
        if not self.db.has_table("meta"):
            return 0
        v = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(v[0]) if v else 0

    def _migrate(self, *, blobs: str | None = None) -> None:
        current = self._schema_version()
        if current > SCHEMA_VERSION:
            raise UmigError(
                f"store schema version {current} is newer than this umig understands ({SCHEMA_VERSION}); upgrade umig"
            )
        if current == SCHEMA_VERSION:
            return
        with self.transaction():
            current = self._schema_version()  # another process may have migrated meanwhile
            for i in range(current, SCHEMA_VERSION):
                for stmt in _split_sql(MIGRATIONS[i]):
                    stmt = self.db.schema(stmt)
                    if stmt is not None:
                        self.db.execute(stmt)
                self._set_meta("schema_version", str(i + 1))
            if blobs is not None:
                self._set_meta("store.blobs", blobs)

    def _set_meta(self, key: str, value: str) -> None:
        self._config = None
        self.db.execute("INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                        (key, value))

    def close(self) -> None:
        self.blobs.close()
        self.db.close()

    def __enter__(self) -> "SqlStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------- lock and txn
    @contextmanager
    def lock(self) -> Iterator[None]:
        """The store's write lock (across processes and machines), waited for up to ``lock_timeout`` s."""
        if self._locked:
            yield
            return
        with self.db.write_lock(self.lock_timeout):
            self._locked = True
            try:
                yield
            finally:
                self._locked = False

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One atomic change: lock, begin, commit; on error roll back and drop new blobs.

        Re-entrant: nested calls join the outer transaction (``store.batch()``).
        """
        if self._txn.depth:
            self._txn.depth += 1
            try:
                yield
            finally:
                self._txn.depth -= 1
            return
        with self.lock():
            self._txn = _Txn(depth=1)
            self.db.begin()
            try:
                yield
                # Every deferred blob write durable before the metadata naming it commits.
                self._txn.created_blobs.extend(d for _, d in self.blobs.flush())
            except BaseException as e:
                self._txn.created_blobs.extend(d for _, d in self.blobs.flush(check=False))
                self._txn.created_blobs.extend(getattr(e, "created_blobs", None) or ())
                self.db.rollback()
                self._discard_unreferenced(self._txn.created_blobs)
                raise
            else:
                self.db.commit()
                # Only now: inside a store.batch() a remove/purge may still be rolled back.
                self._discard_unreferenced(self._txn.released)
            finally:
                self._txn = _Txn()
                self._fims.clear()
                self._config = None

    batch = transaction  # user-facing name: record many nodes in one transaction

    def put_tensors(self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Write a blob as part of the current transaction (removed again if it rolls back)."""
        if self._txn.depth:  # written on a thread; durable before the transaction commits
            return self.blobs.put_deferred(dict(tensors), metadata)
        digest, created = self.blobs.put_tensors(dict(tensors), metadata)
        self.adopt_blobs([digest] if created else [])
        return digest

    def adopt_blobs(self, digests: Iterable[str]) -> None:
        """Blobs written by workers for the current transaction: removed if it rolls back."""
        if self._txn.depth:
            self._txn.created_blobs.extend(digests)

    def _referenced(self) -> set[str]:
        refs: set[str] = set()
        for row in self.db.execute("SELECT body, head, delta, fim FROM versions WHERE purged=0"):
            refs.update(d for d in row if d)
        refs.update(r[0] for r in self.db.execute("SELECT digest FROM operation_blobs"))
        for row in self.db.execute("SELECT body, head, delta, fim FROM operation_references"):
            refs.update(d for d in row if d)
        refs.update(r[0] for r in self.db.execute("SELECT indices FROM operation_samples"))  # kept for good
        return refs

    def _discard_unreferenced(self, digests: Iterable[str]) -> None:
        digests = set(digests)
        if digests:
            self.blobs.delete(digests - self._referenced())

    # ------------------------------------------------------------------ nodes
    def _node_id(self, name: str) -> int:
        row = self.db.execute("SELECT id FROM nodes WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown node '{name}'")
        return int(row[0])

    def has_node(self, name: str) -> bool:
        return self.db.execute("SELECT 1 FROM nodes WHERE name=?", (name,)).fetchone() is not None

    def node(self, name: str) -> NodeInfo:
        """Metadata of one node, with its parents and children."""
        row = self.db.execute("SELECT * FROM nodes WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown node '{name}'")
        edges = self.db.execute(
            "SELECT n.name, e.relation, e.weight, e.parent_version FROM edges e JOIN nodes n ON n.id=e.parent "
            "WHERE e.child=? ORDER BY n.name",
            (row["id"],),
        ).fetchall()
        parents = tuple((r["name"], r["relation"], r["weight"]) for r in edges)
        children = tuple(
            r[0]
            for r in self.db.execute(
                "SELECT n.name FROM edges e JOIN nodes n ON n.id=e.child WHERE e.parent=? ORDER BY n.name",
                (row["id"],),
            )
        )
        return _node_from_row(row, parents, children, {r["name"]: r["parent_version"] for r in edges})

    def nodes(self) -> list[NodeInfo]:
        """Every node (without parent/child lists; use :meth:`graph` for structure)."""
        return [_node_from_row(r) for r in self.db.execute("SELECT * FROM nodes ORDER BY id")]

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM nodes").fetchone()[0])

    def graph(self) -> nx.DiGraph:
        """The UMIG as a ``networkx.DiGraph`` (a fresh copy; attributes per node and edge)."""
        names: dict[int, str] = {}
        # Each distinct classes/label-counts text parsed once (shared, read-only values).
        classes: dict[str, tuple[int, ...]] = {}
        labels: dict[str, tuple[frozenset[int], dict[int, int]]] = {}
        attrs: dict[str, dict[str, Any]] = {}
        for nid, name, cls, counts, framework, size, version, head in self.db.execute(
            "SELECT id, name, classes, label_counts, framework, data_size, version, head FROM nodes ORDER BY id"
        ):
            names[nid] = name
            if cls not in classes:
                classes[cls] = tuple(json.loads(cls))
            if counts not in labels:
                parsed = {int(k): int(v) for k, v in json.loads(counts).items()}
                labels[counts] = (frozenset(parsed), parsed)
            attrs[name] = {"classes": classes[cls], "labels": labels[counts][0], "label_counts": labels[counts][1],
                           "framework": framework, "data_size": size, "version": version, "head": head}
        # networkx's own dicts filled directly (node -> attributes; node -> {neighbour: edge data}, one data
        # dict shared by both directions, as add_edges_from leaves them): its per-edge checks cost a fifth
        # of planning 50,000 nodes.
        succ: dict[str, dict[str, dict]] = {n: {} for n in attrs}
        pred: dict[str, dict[str, dict]] = {n: {} for n in attrs}
        for p, c, rel, w in self.db.execute("SELECT parent, child, relation, weight FROM edges"):
            parent, child = names[p], names[c]
            succ[parent][child] = pred[child][parent] = {"relation": rel, "weight": w}
        g = nx.DiGraph()
        g._node.update(attrs)
        g._succ.update(succ)  # also g._adj: the same dict
        g._pred.update(pred)
        return g

    # --------------------------------------------------------------- versions
    def version(self, name: str, version: int | None = None) -> Version:
        # One round trip (aggregates read each parent's FIM while a recorder adds nodes).
        row = self.db.execute(
            "SELECT v.* FROM nodes n JOIN versions v ON v.node=n.id WHERE n.name=? AND v.version=COALESCE(?, n.version)",
            (name, version)).fetchone()
        if row is None:
            self._node_id(name)  # NotFoundError: unknown node
            raise NotFoundError(f"node '{name}' has no version {version}")
        return _version_from_row(name, row)

    def live_version(self, name: str) -> int:
        """The node's current (live) version number."""
        row = self.db.execute("SELECT version FROM nodes WHERE name=?", (name,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown node '{name}'")
        return int(row[0])

    def live_versions(self, names: Iterable[str]) -> dict[str, int]:
        """``{name: live version}`` for those of ``names`` that are nodes, in one query per 500 names."""
        out: dict[str, int] = {}
        for part, marks in _in_lists(list(dict.fromkeys(names))):
            out.update((r[0], int(r[1])) for r in self.db.execute(
                f"SELECT name, version FROM nodes WHERE name IN ({marks})", part))
        return out

    def versions(self, name: str) -> list[Version]:
        nid = self._node_id(name)
        return [
            _version_from_row(name, r)
            for r in self.db.execute("SELECT * FROM versions WHERE node=? ORDER BY version", (nid,))
        ]

    def state_dict(self, name: str, version: int | None = None) -> dict[str, torch.Tensor]:
        """The node's full weights at a version: body + head, with any sparse delta applied."""
        v = self.version(name, version)
        if v.purged:
            raise UmigError(f"version {v.version} of node '{name}' was purged")
        sd = load_state(self.blobs, {"body": v.body_blob, "head": v.head_blob, "delta": v.delta_blob}, owner=name)
        self.loaded[name] = v.version  # what a child recorded through this object was derived from
        return sd

    def load_model(self, name: str, version: int | None = None, *, device: str | torch.device = "cpu") -> nn.Module:
        """Build the node's architecture and load its weights (eval mode)."""
        return build_model(self.node(name).arch, self.state_dict(name, version)).to(device)

    def fim(self, name: str, version: int | None = None) -> FIM | None:
        """The node's model FIM or ``None`` when it has none (shared between calls: read-only)."""
        v = self.version(name, version)
        if not v.fim_blob:
            return None
        # Inside a transaction (a recorder's batch), an aggregate recorded after its clients (FedAvg, a
        # DDP sync) averages FIMs this transaction has just written or read: parsed once. Outside one,
        # every read verifies the blob again.
        fim = self._fims.get(v.fim_blob) if self._txn.depth else None
        if fim is None:
            tensors, meta = self.blobs.load_with_metadata(v.fim_blob, owner=name)
            fim = FIM.from_tensors(tensors, meta)
        self._remember_fim(v.fim_blob, fim)
        return fim

    def _remember_fim(self, digest: str, fim: FIM) -> None:
        if not self._txn.depth:
            return
        self._fims.pop(digest, None)
        self._fims[digest] = fim
        while len(self._fims) > 64:
            del self._fims[next(iter(self._fims))]

    def node_data(self, name: str) -> Data | None:
        """Resolve the node's own training data, checking its fingerprint (``None`` when data-less)."""
        info = self.node(name)
        if info.data_ref is None:
            return None
        return verify(DataRef.from_json(info.data_ref), info.data_fingerprint)

    def effective_data(self, name: str) -> Data | None:
        """The node's effective training data: its own and every ancestor's (each dataset once),
        restricted to its classes; what ``unlearn`` evaluates a node on ("train" columns)."""
        info = self.node(name)
        g = self.graph()
        own = {n: json.dumps(ref, sort_keys=True) for n, (ref, _) in self.data_refs().items()}
        holder = {k: n for n, k in reversed(list(own.items()))}
        ancestors = nx.ancestors(g, name) | {name}
        lineage = G.data_lineage(g.subgraph(ancestors), {n: k for n, k in own.items() if n in ancestors})[name]
        parts = [self.node_data(holder[k]) for k in lineage]
        if not parts:
            return None
        return (parts[0] if len(parts) == 1 else Data.concat(parts)).filter_labels(keep=info.classes)

    # ------------------------------------------------------------- add / edit
    def insert_node(
        self,
        name: str,
        *,
        arch: dict,
        head: str,
        classes: Sequence[int],
        input_shape: Sequence[int] | None,
        data_ref: dict | None,
        data_fingerprint: str | None,
        label_counts: Mapping[int, int],
        framework: str,
        meta: Mapping[str, Any],
        recipe: dict | None,
        parents: Sequence[tuple[str, float | None] | tuple[str, float | None, int | None]],
        relation: str,
        body: Mapping[str, torch.Tensor],
        head_tensors: Mapping[str, torch.Tensor],
        fim: FIM | None,
    ) -> NodeInfo:
        """Write a validated node (version 0): its blobs first, then its rows and edges in one transaction.

        ``parents`` are ``(name, weight)`` or ``(name, weight, version)``: the version of the parent the
        node was derived from (default: the parent's live version). ``umig.ingest.add_node`` validates
        and prepares every argument; call that instead.
        """
        parents = [(p, w, version[0] if version else None) for p, w, *version in parents]
        wanted = [name, *(p for p, _, _ in parents)]
        texts = {"arch": json.dumps(arch), "classes": json.dumps([int(c) for c in classes]),
                 "input_shape": json.dumps(list(input_shape)) if input_shape else None,
                 "data_ref": json.dumps(data_ref) if data_ref else None,
                 "label_counts": json.dumps({str(k): v for k, v in sorted(label_counts.items())}),
                 "meta": json.dumps(dict(meta or {}), default=str), "recipe": json.dumps(recipe) if recipe else None}
        # grouped: the node's blobs go to one writer together once its rows are written (umig.blobs._Buffering.grouped).
        with self.transaction(), self.blobs.grouped():
            # One query for the name check and every parent's id and live version (recorders add
            # thousands of nodes: each round trip counts against the training loop).
            known = {r[0]: (r[1], r[2]) for r in self.db.execute(
                f"SELECT name, id, version FROM nodes WHERE name IN ({','.join('?' * len(wanted))})", wanted)}
            if name in known:  # a concurrent writer may have won the race
                raise GraphError(f"node '{name}' already exists")
            for p, _, _ in parents:
                if p not in known:
                    raise NotFoundError(f"unknown node '{p}'")
            body_d = self.put_tensors(body, {"part": "body"})
            head_d = self.put_tensors(head_tensors, {"part": "head"})
            fim_d = self.put_tensors(fim.to_tensors(), fim.metadata()) if fim else None
            if fim_d is not None:  # the children's aggregate averages it; a FIM is read-only and its
                # tensors already the CPU float32 ones fim() would read back
                self._remember_fim(fim_d, fim if type(fim) is FIM else FIM.from_tensors(fim.to_tensors(), fim.metadata()))
            now = time.time()
            cur = self.db.execute(
                "INSERT INTO nodes(name, arch, head, classes, input_shape, data_ref, data_fingerprint, data_size, "
                "label_counts, framework, meta, recipe, created, version) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,0) "
                "RETURNING id",
                (name, texts["arch"], head, texts["classes"], texts["input_shape"], texts["data_ref"], data_fingerprint,
                 sum(label_counts.values()), texts["label_counts"], framework, texts["meta"], texts["recipe"], now),
            )
            nid = int(cur.fetchone()[0])
            versions = {p: v if v is not None else known[p][1] for p, _, v in parents}
            self.db.executemany(
                "INSERT INTO edges(parent, child, relation, weight, parent_version) VALUES(?,?,?,?,?)",
                [(known[p][0], nid, relation, w, versions[p]) for p, w, _ in parents])
            self.db.execute(
                "INSERT INTO versions(node, version, body, head, delta, fim, operation, created) "
                "VALUES(?,0,?,?,NULL,?,NULL,?)",
                (nid, body_d, head_d, fim_d, now),
            )
        # The node as node() would read it back, from what was just written (no round trip).
        row = {"name": name, "head": head, "data_fingerprint": data_fingerprint, "data_size": sum(label_counts.values()),
               "framework": framework, "created": now, "version": 0, **texts}
        return _node_from_row(row, sorted((p, relation, w) for p, w, _ in parents), (), versions)

    def fisher_settings(self) -> dict[str, Any]:
        """Store-wide Fisher settings used for model FIMs (kind, temperature)."""
        cfg = self.config()
        return {"kind": cfg.get("fisher.kind", "empirical"), "temperature": float(cfg.get("fisher.temperature", 1.0))}

    def config(self) -> dict[str, str]:
        """The store's settings (``umig config``), without their ``config.`` prefix."""
        if self._config is not None and self._txn.depth:
            return dict(self._config)
        cfg = {
            r[0][len("config.") :]: r[1]
            for r in self.db.execute("SELECT key, value FROM meta WHERE key LIKE 'config.%'")
        }
        if self._txn.depth:
            self._config = cfg
            return dict(cfg)
        return cfg

    def set_config(self, key: str, value: Any) -> None:
        with self.transaction():
            self._set_meta(f"config.{key}", str(value))

    def link(self, parent: str, child: str, *, relation: str = "finetune", weight: float | None = None) -> None:
        """Add an edge between existing nodes; refused when it would close a cycle. The edge records the
        parent's live version as the one the child derives from."""
        if relation not in RELATIONS:
            raise UmigError(f"unknown relation '{relation}' (choose from {', '.join(RELATIONS)})")
        with self.transaction():
            pid, cid = self._node_id(parent), self._node_id(child)
            if G.would_create_cycle(self.graph(), parent, child):
                raise GraphError(f"edge {parent} -> {child} would create a cycle")
            if self.db.execute("SELECT 1 FROM edges WHERE parent=? AND child=?", (pid, cid)).fetchone():
                raise GraphError(f"edge {parent} -> {child} already exists")
            self.db.execute(
                "INSERT INTO edges(parent, child, relation, weight, parent_version) VALUES(?,?,?,?,?)",
                (pid, cid, relation, weight, self.live_version(parent)))

    def remove(self, name: str, *, recursive: bool = False) -> list[str]:
        """Remove a node (and with ``recursive`` its descendants); returns the removed names."""
        with self.transaction():
            self._node_id(name)
            g = self.graph()
            victims = [name]
            if g.out_degree(name):
                if not recursive:
                    kids = sorted(g.successors(name))
                    raise GraphError(
                        f"node '{name}' has children ({', '.join(kids[:5])}{'...' if len(kids) > 5 else ''}); "
                        "use --recursive to remove them too"
                    )
                victims += sorted(nx.descendants(g, name))
            blobs: set[str] = set()
            for v in victims:
                nid = self._node_id(v)
                for row in self.db.execute("SELECT body, head, delta, fim FROM versions WHERE node=? UNION ALL "
                                           "SELECT body, head, delta, fim FROM operation_references WHERE node=?",
                                           (nid, nid)):
                    blobs.update(d for d in row if d)
                self.db.execute("DELETE FROM nodes WHERE id=?", (nid,))
            # Deleted after the commit (of the outermost transaction), unless still shared.
            self._txn.released.update(blobs)
            for v in victims:
                self.loaded.pop(v, None)
        return victims

    def export(self, name: str, path: str | Path, *, version: int | None = None) -> Path:
        """Write the node's full weights (adapters merged) as one safetensors file, and record the
        export (node, version, absolute destination, time) in the audit log (:meth:`exports`)."""
        v = self.version(name, version)  # one version number for the file, its metadata and the record
        sd = self.state_dict(name, v.version)
        info = self.node(name)
        path = Path(path)
        if path.is_dir():
            raise UmigError(f"cannot export to {path}: it is a directory (name a .safetensors file)")
        tmp = path.with_suffix(path.suffix + ".part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file(
                {k: t.contiguous() for k, t in sd.items()},
                str(tmp),
                metadata={
                    "umig.node": name,
                    "umig.version": str(v.version),
                    "umig.arch": json.dumps(info.arch),
                    "umig.classes": json.dumps(list(info.classes)),
                    "umig.head": info.head,
                },
            )
            # The file appears inside the transaction that records it: an export that fails leaves
            # neither a file nor a record, and no copy leaves the store unrecorded.
            with self.transaction():
                self.db.execute("INSERT INTO exports(node, version, path, created) VALUES(?,?,?,?)",
                                (name, v.version, str(path.resolve()), time.time()))
                os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UmigError(f"cannot write {path}: {e.strerror or e}") from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path

    def exports(self, *, node: str | None = None) -> list[Export]:
        """Recorded exports, oldest first; with ``node``, those of that node since it was added
        (an export under the same name before a ``remove`` was of another node)."""
        if node is None:
            rows = self.db.execute("SELECT * FROM exports ORDER BY created, id").fetchall()
        else:
            self._node_id(node)
            rows = self.db.execute(
                "SELECT e.* FROM exports e JOIN nodes n ON n.name=e.node WHERE e.node=? AND e.created>=n.created "
                "ORDER BY e.created, e.id", (node,)).fetchall()
        return [Export(node=r["node"], version=r["version"], path=r["path"], created=r["created"]) for r in rows]

    # ------------------------------------------------------------ operations
    def snapshots(self, names: Sequence[str]) -> dict[str, NodeSnapshot]:
        """Bulk-read current-version snapshots of nodes (one query per 500 names, not one per node)."""
        out: dict[str, NodeSnapshot] = {}
        names = list(dict.fromkeys(names))
        parents: dict[str, list[tuple[str, str, float | None]]] = {n: [] for n in names}
        # Thousands of nodes share a few distinct JSON texts (arch, classes, data refs): parse each
        # once; the parsed values are shared between the (frozen, read-only) snapshots.
        caches: dict[str, dict[str, Any]] = {"arch": {}, "classes": {}, "labels": {}, "json": {}}

        def load(kind: str, text: str | None) -> Any:
            if text is None:
                return None
            cache = caches[kind]
            v = cache.get(text)
            if v is None:
                v = json.loads(text)
                v = tuple(v) if kind == "classes" else frozenset(int(k) for k in v) if kind == "labels" else v
                cache[text] = v
            return v

        # Plain tuples (not rows by name), and NodeSnapshot's fields given in their declared order
        # (positional: a third of the cost of keywords on 50,000 nodes). For most of the store (a
        # request on a federation) every row in one query beats sending the names, 500 per query.
        everything = 2 * len(names) >= len(self)
        for part, marks in ([([], "")] if everything else _in_lists(names)):
            where = "" if everything else f" WHERE {{}}.name IN ({marks})"
            for child, parent, relation, weight in self.db.tuples(
                "SELECT c.name, p.name, e.relation, e.weight FROM edges e JOIN nodes c ON c.id=e.child "
                "JOIN nodes p ON p.id=e.parent" + where.format("c") + " ORDER BY p.name", part):
                if child in parents:
                    parents[child].append((parent, relation, weight))
            for (name, version, arch, head, classes, body, head_blob, delta, fim, data_ref, fingerprint, size,
                 counts, recipe, framework) in self.db.tuples(
                "SELECT n.name, n.version, n.arch, n.head, n.classes, v.body, v.head, v.delta, v.fim, n.data_ref, "
                "n.data_fingerprint, n.data_size, n.label_counts, n.recipe, n.framework FROM nodes n "
                # +n.id: nodes drive the join (each current version found by its key), not a scan of every
                # version ever recorded, which grows with each operation and revert.
                "JOIN versions v ON v.node=+n.id AND v.version=n.version" + where.format("n"), part):
                if name not in parents:
                    continue
                out[name] = _snapshot(  # name, version, arch, head, classes, body/head/delta/fim blobs,
                    name, version, load("arch", arch), head, load("classes", classes), body, head_blob, delta, fim,
                    load("json", data_ref), fingerprint, size, load("labels", counts), load("json", recipe),
                    framework, tuple(parents[name]),  # data_ref, fingerprint, size, labels, recipe, framework, parents
                )
        missing = [n for n in names if n not in out]
        if missing:
            raise NotFoundError(f"node(s) without a current version: {', '.join(missing[:5])}")
        return {n: out[n] for n in names}

    def data_nodes(self) -> list[str]:
        """The names of the nodes that have data of their own, as :meth:`data_refs` lists them (nothing parsed)."""
        return [r[0] for r in self.db.execute("SELECT name FROM nodes WHERE data_ref IS NOT NULL")]

    def data_refs(self) -> dict[str, tuple[dict, str | None]]:
        """Every node that has data of its own: name -> (data reference, fingerprint)."""
        return {
            r[0]: (json.loads(r[1]), r[2])
            for r in self.db.execute("SELECT name, data_ref, data_fingerprint FROM nodes WHERE data_ref IS NOT NULL")
        }

    def commit_operation(self, op_id: str, *, labels: Sequence[int], forget: Mapping[str, Any], method: str,
                         params: Mapping[str, Any],
                         plan: Mapping[str, Any], result: Mapping[str, Any], wall_s: float,
                         versions: Sequence[NewVersion], blobs: Sequence[tuple[str, str]],
                         request: Request | None = None, samples: Sequence[SampleSet] = ()) -> dict[str, int]:
        """Record an operation: its new versions become current, with its audit rows, in one transaction.

        ``blobs`` are ``(digest, kind)`` the operation keeps for its audit trail (e.g. unlearning FIMs);
        ``request`` is the deletion request it answers. ``samples`` are its forget set's sample sets:
        their indices are kept (one blob each, never deleted) so that ``add_node`` can refuse data that
        holds them. Returns node -> new version number.
        """
        request = request or Request()
        with self.transaction():
            kept = [(sset, self.put_tensors({"indices": torch.from_numpy(np.ascontiguousarray(sset.indices,
                                                                                                dtype=np.int64))},
                                            {"part": "forgotten-indices", "dataset": sset.dataset}))
                    for sset in samples]
            now = time.time()
            ids = dict(self.db.execute("SELECT name, id FROM nodes").fetchall())
            # Per node, one look-up of its highest version in the versions key (not a scan of all versions).
            latest = dict(self.db.execute(
                "SELECT n.id, (SELECT MAX(v.version) FROM versions v WHERE v.node=n.id) FROM nodes n").fetchall())
            after = {v.node: latest[ids[v.node]] + 1 for v in versions}
            self.db.execute(
                "INSERT INTO operations(id, created, labels, forget, method, params, plan, result, wall_s, state, "
                "requester, reason, ticket) VALUES(?,?,?,?,?,?,?,?,?, 'applied', ?,?,?)",
                (op_id, now, json.dumps(list(labels)), json.dumps(dict(forget)), method, json.dumps(dict(params), default=str),
                 json.dumps(plan), json.dumps(result), wall_s, request.requester, request.reason, request.ticket),
            )
            self.db.executemany(
                "INSERT INTO versions(node, version, body, head, delta, fim, operation, created) "
                "VALUES(?,?,?,?,?,?,?,?)",
                [(ids[v.node], after[v.node], v.body_blob, v.head_blob, v.delta_blob, v.fim_blob, op_id, now)
                 for v in versions])
            self.db.executemany("UPDATE nodes SET version=? WHERE id=?", [(after[v.node], ids[v.node]) for v in versions])
            self.db.executemany(
                "INSERT INTO operation_nodes(operation, node, role, version_before, version_after, metrics) "
                "VALUES(?,?,?,?,?,?)",
                [(op_id, ids[v.node], v.role, v.version_before, after[v.node], json.dumps(dict(v.metrics), default=float))
                 for v in versions])
            self.db.executemany("INSERT INTO operation_blobs(operation, digest, kind) VALUES(?,?,?)",
                                [(op_id, d, k) for d, k in blobs])
            self.db.executemany("INSERT INTO operation_labels(operation, label) VALUES(?,?) ON CONFLICT DO NOTHING",
                                [(op_id, int(x)) for x in labels])
            self.db.executemany(
                "INSERT INTO operation_samples(operation, dataset, source, client, size, count, indices) "
                "VALUES(?,?,?,?,?,?,?)",
                [(op_id, ss.dataset, ss.source, ss.client, int(ss.size), int(ss.indices.size), d) for ss, d in kept])
        return after

    def _operation(self, op_id: str) -> Any:
        row = self.db.execute("SELECT * FROM operations WHERE id=?", (op_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"unknown operation '{op_id}'")
        return row

    def _operation_nodes(self, op_id: str) -> list[Any]:
        return self.db.execute(
            "SELECT o.*, n.name, n.version AS current FROM operation_nodes o JOIN nodes n ON n.id=o.node "
            "WHERE o.operation=? ORDER BY n.id",
            (op_id,),
        ).fetchall()

    def _caught_up_rows(self, op_id: str) -> list[Any]:
        return self.db.execute(
            "SELECT c.*, n.name, n.version AS current FROM caught_up c JOIN nodes n ON n.id=c.node "
            "WHERE c.operation=? ORDER BY c.created, n.id",
            (op_id,),
        ).fetchall()

    def revert(self, op_id: str) -> list[str]:
        """Move every node of an operation back to the version it had before, bit for bit; nodes it
        caught up later go back to the version they had before that (as they were added)."""
        with self.transaction():
            op = self._operation(op_id)
            if op["state"] == "purged":
                raise UmigError(f"operation {op_id} was purged; its previous versions no longer exist")
            if op["state"] == "reverted":
                raise UmigError(f"operation {op_id} was already reverted")
            rows = self._operation_nodes(op_id) + self._caught_up_rows(op_id)
            moved = [r for r in rows if r["current"] != r["version_after"]]
            if moved:
                later = self.db.execute(
                    "SELECT operation FROM versions WHERE node=? AND version=?", (moved[0]["node"], moved[0]["current"])
                ).fetchone()
                raise UmigError(
                    f"node '{moved[0]['name']}' changed after operation {op_id}"
                    + (f" (by {later[0]}); revert that first" if later and later[0] else "")
                )
            self.db.executemany(
                "UPDATE nodes SET version=? WHERE id=?", [(r["version_before"], r["node"]) for r in rows]
            )
            self.db.execute("UPDATE operations SET state='reverted', reverted=? WHERE id=?", (time.time(), op_id))
        return [r["name"] for r in rows]

    def live_fims(self, op_id: str) -> list[tuple[str, int, str]]:
        """``(node, version, FIM digest)`` of every version an operation made, or that came after one on
        the same node, that is not purged and has a model FIM: the FIMs ``purge`` may replace."""
        # In node insertion order: a node's parents come before it.
        return [(name, int(version), fim) for name, version, fim in self.db.tuples(
            "SELECT n.name, v.version, v.fim FROM versions v JOIN nodes n ON n.id=v.node "
            "JOIN (SELECT node, version_after FROM operation_nodes WHERE operation=? "
            "UNION ALL SELECT node, version_after FROM caught_up WHERE operation=?) o "
            "ON o.node=v.node AND v.version>=o.version_after "
            "WHERE v.purged=0 AND v.fim IS NOT NULL ORDER BY n.id, v.version", (op_id, op_id))]

    def purge(self, op_id: str, *, fims: Mapping[str, str | None] | None = None, fims_kept: int = 0) -> dict[str, Any]:
        """Irreversibly delete what an operation superseded: the previous versions' weights and FIMs,
        and the operation's unlearning FIMs (they were computed from the forgotten data).

        ``fims`` maps a model FIM digest of :meth:`live_fims` to the digest (written already) that
        replaces it on those versions, or to None to drop it: FIMs without the forgotten data
        (``umig.unlearning.purge`` computes them, and counts in ``fims_kept`` those it could not clean).
        A replaced FIM's blob is deleted with the rest. What it did is kept with the operation."""
        with self.transaction():
            op = self._operation(op_id)
            if op["state"] == "purged":
                raise UmigError(f"operation {op_id} was already purged")
            if op["state"] == "reverted":
                raise UmigError(f"operation {op_id} was reverted; its superseded versions are current again")
            # Nodes caught up later: what they were added as was derived from (or trained on) what the
            # operation forgot, so it goes with the operation's superseded versions.
            rows = self._operation_nodes(op_id) + self._caught_up_rows(op_id)
            old = [(r["node"], r["version_before"]) for r in rows]
            candidates: set[str] = set()
            for nid, ver in old:
                row = self.db.execute(
                    "SELECT body, head, delta, fim FROM versions WHERE node=? AND version=?", (nid, ver)
                ).fetchone()
                candidates.update(d for d in row if d)
            op_blobs = {r[0] for r in self.db.execute("SELECT digest FROM operation_blobs WHERE operation=?", (op_id,))}
            for row in self.db.execute("SELECT body, head, delta, fim FROM operation_references WHERE operation=?",
                                       (op_id,)):
                op_blobs.update(d for d in row if d)  # its retrained reference goes with it
            self.db.executemany("UPDATE versions SET purged=1 WHERE node=? AND version=?", old)
            replaced = 0
            if fims:
                live = [(n, v, d) for n, v, d in self.live_fims(op_id) if d in fims]
                ids = {n: self._node_id(n) for n, _, _ in live}
                self.db.executemany("UPDATE versions SET fim=? WHERE node=? AND version=?",
                                    [(fims[d], ids[n], v) for n, v, d in live])
                candidates.update(d for _, _, d in live)
                replaced = len(live)
            self.db.execute("DELETE FROM operation_blobs WHERE operation=?", (op_id,))
            self.db.execute("DELETE FROM operation_references WHERE operation=?", (op_id,))
            doomed = (candidates | op_blobs) - self._referenced()
            freed = sum(self.blobs.size(d) for d in doomed if self.blobs.exists(d))
            summary = {"operation": op_id, "versions_purged": len(old), "fims_replaced": replaced,
                       "fims_kept": fims_kept, "blobs_deleted": len(doomed), "bytes_freed": freed}
            self.db.execute("UPDATE operations SET state='purged', purged=?, purge_summary=? WHERE id=?",
                            (time.time(), json.dumps(summary), op_id))
            # Deleted only after the commit: a crash in between leaves orphans for gc, never dangling rows.
            self._txn.released.update(doomed)
        return summary

    def history(self, *, node: str | None = None, ticket: str | None = None,
                requester: str | None = None) -> list[dict[str, Any]]:
        """The audit log: one entry per operation, newest last; only those that touched ``node``,
        answer ``ticket`` (exact) or came from ``requester`` (exact, case-insensitive), when given."""
        where: list[str] = []
        args: list[Any] = []
        if node is not None:
            where.append("o.id IN (SELECT operation FROM operation_nodes WHERE node=?)")
            args.append(self._node_id(node))
        if ticket is not None:
            where.append("o.ticket=?")
            args.append(ticket.strip())
        if requester is not None:
            where.append("LOWER(o.requester)=LOWER(?)")
            args.append(requester.strip())
        ops = self.db.execute(
            "SELECT o.* FROM operations o" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY o.created",
            args).fetchall()
        return [self._history_entry(op) for op in ops]

    def operation(self, op_id: str) -> dict[str, Any]:
        """One operation's audit entry (as in :meth:`history`)."""
        return self._history_entry(self._operation(op_id))

    def operation_blobs(self, op_id: str) -> list[tuple[str, str]]:
        """The blobs an operation keeps for its audit trail, ``(digest, kind)``; purge deletes them."""
        self._operation(op_id)
        return [(r[0], r[1]) for r in self.db.execute(
            "SELECT digest, kind FROM operation_blobs WHERE operation=? ORDER BY rowid", (op_id,))]

    def version_sources(self, name: str) -> dict[int, int]:
        """Each version an operation made of node ``name`` (or a catch-up attached to one) -> the
        version it was made from."""
        nid = self._node_id(name)
        return {r[0]: r[1] for r in self.db.execute(
            "SELECT version_after, version_before FROM operation_nodes WHERE node=? "
            "UNION ALL SELECT version_after, version_before FROM caught_up WHERE node=?", (nid, nid))}

    def _history_entry(self, op: Any) -> dict[str, Any]:
        plan = json.loads(op["plan"])
        rows = self._operation_nodes(op["id"])
        return {
            "operation": op["id"],
            "created": op["created"],
            "labels": json.loads(op["labels"]),
            "forget": json.loads(op["forget"]) if op["forget"] else {"kinds": ["labels"], "labels": json.loads(op["labels"]), "samples": []},
            "method": op["method"],
            "params": json.loads(op["params"]),
            "state": op["state"],
            "reverted": op["reverted"],
            "purged": op["purged"],
            "wall_s": op["wall_s"],
            "policy": plan.get("policy", "first"),
            "discovery": plan.get("discovery", []),
            "affected": plan.get("affected", []),
            "nodes": [
                {"name": r["name"], "role": r["role"], "version_before": r["version_before"],
                 "version_after": r["version_after"], **json.loads(r["metrics"])}
                for r in rows
            ],
            **json.loads(op["result"]),
            "verification": json.loads(op["verification"]) if op["verification"] else None,
            "purge": json.loads(op["purge_summary"]) if op["purge_summary"] else None,
            **_request_from_row(op).to_json(),
            "caught_up": [_caught_up_json(r) for r in self._caught_up_rows(op["id"])],
        }

    # ------------------------------------------------------- lineage guard
    def _operation_ref(self, op_id: str) -> OperationRef:
        op = self.db.execute("SELECT id, ticket, created FROM operations WHERE id=?", (op_id,)).fetchone()
        return OperationRef(id=op["id"], ticket=op["ticket"], created=op["created"])

    def superseded_by(self, name: str, version: int, *, current: int | None = None) -> list[OperationRef]:
        """The live operations that superseded ``version`` of node ``name``, oldest first: those that made
        the versions between it and the live one. Empty for the live version, and for a version that is
        no ancestor of it (one a since-reverted operation made holds nothing the live lineage forgot).
        Raises ``NotFoundError`` for a version the node never had. ``current``: the live version, when the
        caller has just read it under the same lock."""
        if current is None:
            current = self.live_version(name)
        if version == current:  # the common case (recorders, no @VERSION): nothing more to read
            return []
        self.version(name, version)
        made_from = self.version_sources(name)
        chain: list[int] = []
        v = current
        while v != version and v in made_from:
            chain.append(v)
            v = made_from[v]
        if v != version:
            return []
        nid = self._node_id(name)
        ops = []
        for after in reversed(chain):
            row = self.db.execute("SELECT operation FROM versions WHERE node=? AND version=?", (nid, after)).fetchone()
            if row is not None and row[0] and all(o.id != row[0] for o in ops):
                ops.append(self._operation_ref(row[0]))
        return sorted(ops, key=lambda o: o.created)

    def label_forgets(self, labels: Iterable[int]) -> list[tuple[OperationRef, int]]:
        """``(operation, label)`` for each of ``labels`` that a live (applied or purged, not reverted)
        operation forgot, oldest operation first."""
        out: list[tuple[OperationRef, int]] = []
        for part, marks in _in_lists(sorted({int(x) for x in labels})):
            out += [(OperationRef(id=r["id"], ticket=r["ticket"], created=r["created"]), int(r["label"]))
                    for r in self.db.execute(
                        f"SELECT o.id, o.ticket, o.created, l.label FROM operation_labels l "
                        f"JOIN operations o ON o.id=l.operation WHERE l.label IN ({marks}) "
                        f"AND o.state!='reverted'", part)]
        return sorted(out, key=lambda t: (t[0].created, t[0].id, t[1]))

    def sample_forgets(self, *, dataset: str | None = None, operation: str | None = None,
                       live: bool = True) -> list[SampleForget]:
        """Sample sets that operations forgot (live ones only, unless ``live=False``), oldest first; only
        those of ``dataset`` (a whole source's fingerprint) or of ``operation``, when given."""
        where, args = (["o.state!='reverted'"] if live else []), []
        if dataset is not None:
            where.append("s.dataset=?")
            args.append(dataset)
        if operation is not None:
            where.append("s.operation=?")
            args.append(operation)
        rows = self.db.execute(
            "SELECT s.*, o.ticket, o.created FROM operation_samples s JOIN operations o ON o.id=s.operation"
            + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY o.created, s.rowid", args)
        return [SampleForget(operation=OperationRef(id=r["operation"], ticket=r["ticket"], created=r["created"]),
                             dataset=r["dataset"], source=r["source"], client=r["client"], size=r["size"],
                             count=r["count"], indices_blob=r["indices"]) for r in rows]

    def forgotten_indices(self, forget: SampleForget) -> np.ndarray:
        """The sorted int64 indices (into the whole source) a :class:`SampleForget` names."""
        return self.blobs.load(forget.indices_blob, owner=f"operation {forget.operation.id}")["indices"].numpy()

    def flush_blobs(self) -> None:
        """Make the current transaction's deferred blob writes readable by other processes now (workers
        read blobs from disk); they stay the transaction's, removed if it rolls back."""
        if self._txn.depth:
            self._txn.created_blobs.extend(d for _, d in self.blobs.flush())

    def commit_catch_up(self, op_id: str, version: NewVersion, *, reason: str,
                        blobs: Sequence[tuple[str, str]] = ()) -> int:
        """Attach a catch-up to operation ``op_id``: ``version`` (blobs written) becomes the node's live
        version, made by that operation, and the operation lists the node as caught up. Reverting the
        operation moves the node back to ``version.version_before``; purging it purges that version.
        Against an operation purged already, that version is purged at once (with the method's audit
        blobs, which were computed from the forgotten data). Returns the new version number."""
        with self.transaction():
            op = self._operation(op_id)
            if op["state"] == "reverted":
                raise UmigError(f"operation {op_id} was reverted; nothing to catch up with")
            nid = self._node_id(version.node)
            after = int(self.db.execute("SELECT MAX(version) FROM versions WHERE node=?", (nid,)).fetchone()[0]) + 1
            now = time.time()
            self.db.execute(
                "INSERT INTO versions(node, version, body, head, delta, fim, operation, created) VALUES(?,?,?,?,?,?,?,?)",
                (nid, after, version.body_blob, version.head_blob, version.delta_blob, version.fim_blob, op_id, now))
            self.db.execute("UPDATE nodes SET version=? WHERE id=?", (after, nid))
            self.db.execute(
                "INSERT INTO caught_up(operation, node, version_before, version_after, reason, metrics, created) "
                "VALUES(?,?,?,?,?,?,?)",
                (op_id, nid, version.version_before, after, reason, json.dumps(dict(version.metrics), default=float),
                 now))
            if op["state"] == "purged":
                self.db.execute("UPDATE versions SET purged=1 WHERE node=? AND version=?", (nid, version.version_before))
                row = self.db.execute("SELECT body, head, delta, fim FROM versions WHERE node=? AND version=?",
                                      (nid, version.version_before)).fetchone()
                self._txn.released.update(d for d in (*row, *(d for d, _ in blobs)) if d)
            else:
                self.db.executemany("INSERT INTO operation_blobs(operation, digest, kind) VALUES(?,?,?)",
                                    [(op_id, d, k) for d, k in blobs])
        return after

    def caught_up(self, *, node: str | None = None) -> list[dict[str, Any]]:
        """Catch-ups, oldest first (of ``node`` when given): operation, node, versions, reason, time."""
        where, args = "", []
        if node is not None:
            where, args = " WHERE c.node=?", [self._node_id(node)]
        return [{"operation": r["operation"], **_caught_up_json(r)} for r in self.db.execute(
            "SELECT c.*, n.name FROM caught_up c JOIN nodes n ON n.id=c.node" + where + " ORDER BY c.created, c.rowid",
            args)]

    # ------------------------------------------------------- verification
    def commit_reference(self, op_id: str, method: str, parts: Mapping[str, Mapping[str, str | None]],
                         seconds: Mapping[str, float]) -> None:
        """Keep the reference models of an operation's nodes (``umig verify``): blob digests by part
        (``body``/``head``/``delta``/``fim``) per node, written already. They never become a version."""
        with self.transaction():
            self._operation(op_id)
            ids = dict(self.db.execute("SELECT name, id FROM nodes").fetchall())
            now = time.time()
            self.db.executemany(
                "INSERT INTO operation_references(operation, node, method, body, head, delta, fim, seconds, created) "
                "VALUES(?,?,?,?,?,?,?,?,?) ON CONFLICT(operation, node) DO UPDATE SET method=excluded.method, "
                "body=excluded.body, head=excluded.head, delta=excluded.delta, fim=excluded.fim, "
                "seconds=excluded.seconds, created=excluded.created",
                [(op_id, ids[n], method, p["body"], p["head"], p.get("delta"), p.get("fim"),
                  float(seconds.get(n, 0.0)), now) for n, p in parts.items()])

    def references(self, op_id: str) -> dict[str, dict[str, Any]]:
        """An operation's kept reference models: node -> ``{"method", "body", "head", "delta", "fim", "seconds"}``."""
        return {
            r["name"]: {"method": r["method"], "body": r["body"], "head": r["head"], "delta": r["delta"],
                        "fim": r["fim"], "seconds": r["seconds"]}
            for r in self.db.execute(
                "SELECT n.name, r.* FROM operation_references r JOIN nodes n ON n.id=r.node WHERE r.operation=? "
                "ORDER BY n.id", (op_id,))
        }

    def set_verification(self, op_id: str, verification: Mapping[str, Any]) -> None:
        """Store an operation's latest verification verdict (shown by :meth:`history`)."""
        with self.transaction():
            self._operation(op_id)
            self.db.execute("UPDATE operations SET verification=? WHERE id=?",
                            (json.dumps(dict(verification), default=float), op_id))

    def copy_to(self, dst: "SqlStore", *, progress: Any = None) -> dict[str, int]:
        """Copy this whole store into ``dst``, an empty store (another backend, say): every blob any row
        names, read and verified by digest, written to ``dst``'s blobs, then every row in one transaction
        of ``dst``. A failure leaves ``dst`` as empty as it was. ``progress(done, total)`` is called as
        blobs are copied. Returns counts of blobs, bytes and rows."""
        if len(dst) or dst.db.execute("SELECT COUNT(*) FROM operations").fetchone()[0]:
            raise UmigError(f"cannot copy into {dst.url}: it is not empty")
        with self.lock(), dst.transaction():
            digests = sorted(self._referenced())
            nbytes = 0
            for i, digest in enumerate(digests):
                data = self.blobs.read_bytes(digest)  # verified against its digest
                got, created = dst.blobs.put_bytes(data)
                if got != digest:
                    raise UmigError(f"blob {digest[:12]} read back as {got[:12]} while copying")
                if created:
                    dst.adopt_blobs([digest])
                nbytes += len(data)
                if progress is not None:
                    progress(i + 1, len(digests))
            rows = 0
            for table in _COPY_TABLES:
                cols = [c for c in self._columns(table) if c != "rowid"]
                # rowid: SQLite's implicit one, the PostgreSQL schema's explicit one; the insertion order
                # the store reads some tables in, kept by inserting in it.
                data_rows = self.db.tuples(f"SELECT {', '.join(cols)} FROM {table} ORDER BY rowid")
                if table == "meta":  # the destination keeps its own schema version and blob location
                    data_rows = [r for r in data_rows if r[0].startswith("config.")]
                    for key, value in data_rows:
                        dst._set_meta(key, value)
                else:
                    dst.db.executemany(f"INSERT INTO {table}({', '.join(cols)}) VALUES({', '.join('?' * len(cols))})",
                                       data_rows)
                rows += len(data_rows)
            dst.db.reset_sequences(_COPY_TABLES)
        return {"blobs": len(digests), "bytes": nbytes, "rows": rows}

    def copy_into(self, location: str | Path, *, blobs: str | Path | None = None,
                  progress: Any = None) -> dict[str, Any]:
        """:meth:`copy_to` a store created at ``location`` (or an empty one already there; ``blobs`` as for
        :meth:`init`). A new local directory is removed again when the copy fails, so a failure leaves
        the destination as it was. Returns :meth:`copy_to`'s counts and the destination's URLs."""
        fresh = None if D.is_database_url(location) or Path(location).exists() else Path(location)
        try:
            dst = type(self).init(location, blobs=blobs, exist_ok=True)
            try:
                out = self.copy_to(dst, progress=progress)
                return {"source": self.url, "destination": dst.url, "blobs_at": dst.blobs.url, **out}
            finally:
                dst.close()
        except BaseException:
            if fresh is not None:
                shutil.rmtree(fresh, ignore_errors=True)
            raise

    def _columns(self, table: str) -> list[str]:
        return [d[0] for d in self.db.execute(f"SELECT * FROM {table} LIMIT 0").description]

    def gc(self) -> int:
        """Delete blobs no version or operation refers to, and half-written temp files (left by killed
        runs); returns bytes freed. Writers hold the lock, so nothing in flight is touched."""
        with self.lock():
            freed = self.blobs.delete(self.blobs.all_digests() - self._referenced())
            return freed + self.blobs.remove_partial()


# ----------------------------------------------------------------- helpers
def load_state(blobs: BaseBlobStore, parts: Mapping[str, str | None], owner: str | None = None) -> dict[str, torch.Tensor]:
    """A version's full weights from its blob digests by part: body + head, with any sparse delta added."""
    sd = blobs.load(parts["body"], owner=owner)
    sd.update(blobs.load(parts["head"], owner=owner))
    if parts.get("delta"):
        apply_delta(sd, blobs.load(parts["delta"], owner=owner))
    return sd


def split_head(state: Mapping[str, torch.Tensor], head: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a state dict into (body, head) so versions can share the body and change only the head."""
    prefix = head + "."
    body = {k: v for k, v in state.items() if not k.startswith(prefix)}
    head_t = {k: v for k, v in state.items() if k.startswith(prefix)}
    return body, head_t


# Every table, parents before children (foreign keys), for ``copy_to``.
_COPY_TABLES = ("meta", "nodes", "edges", "versions", "operations", "operation_nodes", "operation_blobs",
                "operation_references", "operation_labels", "operation_samples", "caught_up", "exports")


_IN_MAX = 500  # values per IN (...) list: far below every backend's limit on bound parameters


def _in_lists(values: Sequence[Any]) -> Iterator[tuple[Sequence[Any], str]]:
    """``values`` in slices of at most ``_IN_MAX``, each with its ``?,?,...`` placeholders.

    >>> [(list(p), m) for p, m in _in_lists(range(3))]
    [([0, 1, 2], '?,?,?')]
    """
    for i in range(0, len(values), _IN_MAX):
        part = values[i : i + _IN_MAX]
        yield part, ",".join("?" * len(part))


def _split_sql(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _node_from_row(row: Any, parents=(), children=(), parent_versions=None) -> NodeInfo:
    return NodeInfo(
        name=row["name"],
        arch=json.loads(row["arch"]),
        head=row["head"],
        classes=tuple(json.loads(row["classes"])),
        input_shape=tuple(json.loads(row["input_shape"])) if row["input_shape"] else None,
        data_ref=json.loads(row["data_ref"]) if row["data_ref"] else None,
        data_fingerprint=row["data_fingerprint"],
        data_size=row["data_size"],
        label_counts={int(k): v for k, v in json.loads(row["label_counts"]).items()},
        framework=row["framework"],
        meta=json.loads(row["meta"]),
        recipe=json.loads(row["recipe"]) if row["recipe"] else None,
        created=row["created"],
        version=row["version"],
        parents=tuple(parents),
        children=tuple(children),
        parent_versions=dict(parent_versions or {}),
    )


def _caught_up_json(row: Any) -> dict[str, Any]:
    return {"name": row["name"], "version_before": row["version_before"], "version_after": row["version_after"],
            "reason": row["reason"], "created": row["created"], **json.loads(row["metrics"])}


def _request_from_row(row: Any) -> Request:
    return Request(requester=row["requester"], reason=row["reason"], ticket=row["ticket"])


def _version_from_row(name: str, row: Any) -> Version:
    return Version(
        node=name,
        version=row["version"],
        body_blob=row["body"],
        head_blob=row["head"],
        delta_blob=row["delta"],
        fim_blob=row["fim"],
        operation=row["operation"],
        purged=bool(row["purged"]),
        created=row["created"],
    )
