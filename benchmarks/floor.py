"""The floor of an FIUn head update: the least an operation on these nodes can cost.

A deliberately independent, minimal implementation of one FIUn (default ``erase``) operation
on a given set of nodes, on the same store (same SQLite file, same blob directory) with the
same durability as umig:

1. one query for the nodes' current head and model-FIM digests;
2. per node: read its head blob and its model-FIM blob (whole files, no hash check), parse them;
3. one element-wise pass on numpy views of the blobs: ``umig.unlearners.fiun._erase_in_place``, the
   arithmetic FIUn's ``erase`` runs (its tensor path ``erase_rows`` too), so the floor's new heads are bit
   for bit FIUn's (``Floor.run`` returns their digests to compare) at the least cost umig has found
   for that pass (no tensors made per node);
4. write each new head as a content-addressed safetensors blob: temp file, write, fsync,
   rename, then one fsync per blob directory (the fsyncs overlap on a few threads, as umig's);
5. one metadata commit (``BEGIN IMMEDIATE`` ... ``COMMIT``, WAL, ``synchronous=FULL``) of a row
   per node into a scratch table of the same database.

What it leaves out is what umig adds around the update: the lock, planning (the nodes are
given), snapshots of ancestors, task objects, hash checks on read, audit rows, and start-up. Its blobs are removed again by :meth:`Floor.undo`
(untimed) so that the next FIUn run writes its own.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from safetensors.numpy import load as np_load

from umig.blobs import serialise_arrays
from umig.unlearners.fiun import _erase_in_place


class Floor:
    """The floor of an FIUn ``erase`` update of ``nodes`` in the store at ``root``."""

    def __init__(self, root: str | Path, threads: int = 4) -> None:
        self.root = Path(root)
        self.blob_root = self.root / "blobs"
        self.db = sqlite3.connect(self.root / "umig.db", isolation_level=None, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS bench_floor(run TEXT, node TEXT, head TEXT, created REAL)")
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.created: list[str] = []
        self.node_seconds: dict[str, float] = {}  # the last run's own work per node (the rest is shared)
        self._lock = threading.Lock()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.db.close()

    def _path(self, digest: str) -> str:
        return f"{self.blob_root}/{digest[:2]}/{digest}.safetensors"

    def _write(self, digest: str, data: bytes) -> str:
        final = self._path(digest)
        folder = os.path.dirname(final)
        try:
            os.mkdir(folder)
        except FileExistsError:
            pass
        tmp = f"{self.blob_root}/tmp/{digest}.{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        with self._lock:
            self.created.append(final)
        return folder

    @staticmethod
    def _read(path: str) -> bytes:
        with open(path, "rb") as fh:
            return fh.read()

    def run(self, nodes: Sequence[str], labels: Sequence[int]) -> dict[str, str]:
        """One operation; returns node -> new head digest."""
        marks = ",".join("?" * len(nodes))
        rows = self.db.execute(
            f"SELECT n.name, n.head, v.head, v.fim FROM nodes n JOIN versions v ON v.node=n.id AND v.version=n.version "
            f"WHERE n.name IN ({marks})", list(nodes)).fetchall()
        out: dict[str, str] = {}
        dirs: set[str] = set()
        pending = []
        self.node_seconds = {}
        for name, head, head_blob, fim_blob in rows:
            t0 = time.perf_counter()
            arrays = np_load(self._read(self._path(head_blob)))
            fim = np_load(self._read(self._path(fim_blob)))
            wkey, bkey = f"{head}.weight", f"{head}.bias"
            w, b = arrays[wkey].copy(), (arrays[bkey].copy() if bkey in arrays else None)
            rows = np.isin(fim["classes"].reshape(-1), np.asarray(labels, dtype=np.int64))
            if rows.any():
                _erase_in_place(w, b, rows, fim["weight"], fim.get("bias"))
            data = serialise_arrays({wkey: w} if b is None else {wkey: w, bkey: b}, {"part": "head"})
            digest = hashlib.sha256(data).hexdigest()
            out[name] = digest
            if self.pool is None:
                dirs.add(self._write(digest, data))
            else:  # written while the next head is computed, as umig does
                pending.append(self.pool.submit(self._write, digest, data))
            self.node_seconds[name] = time.perf_counter() - t0
        dirs.update(f.result() for f in pending)
        for d in sorted(dirs):
            fd = os.open(d, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        run, now = uuid.uuid4().hex[:10], time.time()
        self.db.execute("BEGIN IMMEDIATE")
        self.db.executemany("INSERT INTO bench_floor VALUES(?,?,?,?)", [(run, n, d, now) for n, d in out.items()])
        self.db.execute("COMMIT")
        return out

    def undo(self) -> None:
        """Remove the blobs the last runs wrote (untimed), so FIUn writes its own heads again."""
        for p in self.created:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        self.created = []


def timed(floor: Floor, nodes: Sequence[str], labels: Sequence[int]) -> tuple[float, dict[str, str]]:
    t0 = time.perf_counter()
    out = floor.run(nodes, labels)
    dt = time.perf_counter() - t0
    floor.undo()
    return dt, out
