"""Content-addressed safetensors blobs.

A blob is a safetensors file named by the sha256 of its bytes. Writes go to a
temporary file that is fsynced and then renamed into place, so a reader never
sees a half-written blob; reads verify the hash, so corruption on disk is a
clear error instead of silently wrong weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from umig.errors import IntegrityError, NotFoundError

_CHUNK = 1 << 20


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BlobStore:
    """A directory of immutable safetensors blobs keyed by sha256."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.safetensors"

    def exists(self, digest: str) -> bool:
        return self.path(digest).exists()

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store ``data``; return ``(digest, created)`` (``created`` is False when it was already there)."""
        digest = hashlib.sha256(data).hexdigest()
        created = self._write(digest, data)
        if created:
            _fsync_dir(self.path(digest).parent)
        return digest, created

    def _write(self, digest: str, data: bytes) -> bool:
        """Temp file, write, fsync, rename into place; the caller fsyncs the directory. False if present."""
        final = self.path(digest)
        if final.exists():
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{digest}.{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())  # the content is durable before the blob gets its name
            # os.replace is atomic; two workers writing the same content race harmlessly.
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def put_tensors(
        self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> tuple[str, bool]:
        """Serialise tensors as safetensors and store them."""
        return self.put_bytes(serialise(tensors, metadata))

    def read_bytes(self, digest: str, *, owner: str | None = None) -> bytes:
        """Read a blob and verify its hash. ``owner`` names the node in error messages."""
        path = self.path(digest)
        who = f" of node '{owner}'" if owner else ""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest[:12]}{who} is missing from the store ({path})") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise IntegrityError(
                f"blob {digest[:12]}{who} is corrupted: its content hash is {actual[:12]} ({path})"
            )
        return data

    def load(self, digest: str, *, owner: str | None = None) -> dict[str, torch.Tensor]:
        """Load every tensor of a blob (hash-verified)."""
        return st_load(self.read_bytes(digest, owner=owner))

    def load_with_metadata(
        self, digest: str, *, owner: str | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        data = self.read_bytes(digest, owner=owner)
        return st_load(data), _metadata_of(data)

    def metadata(self, digest: str) -> dict[str, str]:
        with safe_open(str(self.path(digest)), framework="pt") as fh:
            return dict(fh.metadata() or {})

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def delete(self, digests: Iterable[str]) -> int:
        """Remove blobs (used by purge, gc and failed-operation cleanup); returns bytes freed."""
        freed = 0
        for digest in digests:
            path = self.path(digest)
            try:
                freed += path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
        return freed

    def all_digests(self) -> set[str]:
        if not self.root.exists():
            return set()
        return {p.stem for p in self.root.glob("??/*.safetensors")}


def serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes with a canonical header, so equal content always gets the same digest.

    safetensors writes its JSON header from a hash map (key order varies between calls); the
    header is rewritten with sorted keys, padded with spaces to 8 bytes as the format allows.
    """
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    data = st_save(cpu, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def _metadata_of(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__", {}) or {})


class BufferedBlobStore(BlobStore):
    """A :class:`BlobStore` that can write blobs on a few threads, so their fsyncs overlap.

    :meth:`put_deferred` serialises and hashes the tensors at once and returns the digest;
    the write itself (temp file, write, fsync, rename into place) runs on a thread.
    :meth:`flush` waits until every pending write is done, fsyncs each directory that got new
    blobs once (instead of once per blob), and returns the blobs that were created. Reads see
    pending blobs. Whoever commits metadata naming a deferred blob must :meth:`flush` first:
    that keeps "metadata only after durable blobs" true while thousands of tiny head blobs
    share each journal commit.
    """

    def __init__(self, root: str | Path, *, threads: int = 4, max_pending_bytes: int = 256 << 20,
                 max_pending: int = 1024) -> None:
        super().__init__(root)
        self.threads = threads
        self._dirty_dirs: set[str] = set()  # directories whose new entries still need an fsync
        self.max_pending_bytes = max_pending_bytes
        self.max_pending = max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._queue: deque[tuple[Future, str, Any, int]] = deque()
        self._data: dict[str, bytes] = {}  # digest -> bytes while its write is pending
        self._pending_bytes = 0
        self._created: list[tuple[Any, str]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def put_deferred(self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     tag: Any = None) -> str:
        """Queue a blob write; return its digest now. ``tag`` comes back with it from :meth:`flush`."""
        data = serialise(dict(tensors), metadata)
        if self.threads < 1:
            digest, created = self.put_bytes(data)
            if created:
                self._created.append((tag, digest))
            return digest
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if digest in self._data:
                return digest
        if super().exists(digest):
            return digest
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="umig-blob")
        with self._lock:
            self._data[digest] = data
        fut = self._pool.submit(self._write_deferred, digest, data)
        self._queue.append((fut, digest, tag, len(data)))
        self._pending_bytes += len(data)
        while self._queue and (len(self._queue) > self.max_pending or self._pending_bytes > self.max_pending_bytes):
            self._settle_one()
        return digest

    def _write_deferred(self, digest: str, data: bytes) -> tuple[str, bool]:
        """The shared write without its per-blob directory fsync (done once per directory by :meth:`flush`)."""
        created = self._write(digest, data)
        if created:
            with self._lock:
                self._dirty_dirs.add(str(self.path(digest).parent))
        return digest, created

    def _sync_dirs(self) -> None:
        with self._lock:
            dirs, self._dirty_dirs = sorted(self._dirty_dirs), set()
        if not dirs:
            return

        def sync(path: str) -> None:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        if self._pool is None or len(dirs) == 1:
            for d in dirs:
                sync(d)
        else:
            list(self._pool.map(sync, dirs))

    def _settle_one(self) -> None:
        fut, digest, tag, size = self._queue.popleft()
        try:
            _, created = fut.result()
            if created:
                self._created.append((tag, digest))
        except BaseException as e:  # noqa: BLE001 - reported by flush, after every write has finished
            if self._error is None:
                self._error = e
        finally:
            self._pending_bytes -= size
            with self._lock:
                self._data.pop(digest, None)

    def flush(self, *, check: bool = True) -> list[tuple[Any, str]]:
        """Wait for every pending write; return ``(tag, digest)`` of the blobs created since the last flush.

        With ``check`` the first write error is raised (after all writes have finished; the
        blobs created meanwhile are on the exception as ``created_blobs``).
        """
        while self._queue:
            self._settle_one()
        try:
            self._sync_dirs()  # the new names are durable too: one fsync per directory, not per blob
        except OSError as e:
            if self._error is None:
                self._error = e
        created, self._created = self._created, []
        error, self._error = self._error, None
        if error is not None and check:
            error.created_blobs = [d for _, d in created]  # type: ignore[attr-defined]
            raise error
        return created

    def read_bytes(self, digest: str, *, owner: str | None = None) -> bytes:
        with self._lock:
            data = self._data.get(digest)
        return data if data is not None else super().read_bytes(digest, owner=owner)

    def exists(self, digest: str) -> bool:
        with self._lock:
            if digest in self._data:
                return True
        return super().exists(digest)

    def close(self) -> None:
        self.flush(check=False)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
