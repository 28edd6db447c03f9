"""Content-addressed safetensors blobs.

A blob is a safetensors file named by the sha256 of its bytes. Writes go to a
temporary file that is fsynced and then renamed into place, so a reader never
sees a half-written blob; reads verify the hash, so corruption on disk is a
clear error instead of silently wrong weights.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import struct
import sys
import threading
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
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
        # Plain strings on the hot path (pathlib costs more than the read of a small head).
        self._root_s = os.fspath(self.root)
        self._tmp_s = os.fspath(self.tmp)

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(exist_ok=True)

    def path(self, digest: str) -> Path:
        return Path(self._file(digest))

    def _file(self, digest: str) -> str:
        return f"{self._root_s}/{digest[:2]}/{digest}.safetensors"

    def exists(self, digest: str) -> bool:
        return os.path.exists(self._file(digest))

    @staticmethod
    def _makedirs(path: str) -> None:
        try:
            os.mkdir(path)  # one system call when it exists (os.makedirs costs several)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(path, exist_ok=True)

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store ``data``; return ``(digest, created)`` (``created`` is False when it was already there)."""
        digest = hashlib.sha256(data).hexdigest()
        created = self._write(digest, data)
        if created:
            _fsync_dir(os.path.dirname(self._file(digest)))
        return digest, created

    def _write(self, digest: str, data: bytes) -> bool:
        """Temp file, write, fsync, rename into place; the caller fsyncs the directory. False if present."""
        final = self._file(digest)
        if os.path.exists(final):
            return False
        self._makedirs(os.path.dirname(final))
        self._makedirs(self._tmp_s)
        tmp = f"{self._tmp_s}/{digest}.{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())  # the content is durable before the blob gets its name
            # os.replace is atomic; two workers writing the same content race harmlessly.
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return True

    def put_tensors(
        self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> tuple[str, bool]:
        """Serialise tensors as safetensors and store them."""
        return self.put_bytes(serialise(tensors, metadata))

    def read_bytes(self, digest: str, *, owner: str | None = None) -> bytes:
        """Read a blob and verify its hash. ``owner`` names the node in error messages."""
        path = self._file(digest)
        who = f" of node '{owner}'" if owner else ""
        try:
            with open(path, "rb") as fh:
                data = fh.read()
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

    def load_parts(self, digest: str, keys: Iterable[str], *, owner: str | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """Only the tensors named ``keys`` (those the blob has) and the metadata. The whole blob is still
        read and hash-verified; the others are not turned into tensors (an FIM's per-label statistics
        are ten times its size and an update that does not use them should not pay for them)."""
        keys = tuple(keys)
        data = self.read_bytes(digest, owner=owner)
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            spec = header.get(key)
            if spec is None:
                continue
            dtype = _NUMPY.get(spec["dtype"])
            if dtype is None:  # a dtype numpy lacks (bfloat16...): safetensors reads it
                return {k: v for k, v in st_load(data).items() if k in keys}, dict(
                    header.get("__metadata__") or {})
            start, end = spec["data_offsets"]
            arr = np.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=8 + n + start)
            out[key] = torch.from_numpy(arr.copy()).reshape(spec["shape"])
        return out, dict(header.get("__metadata__") or {})

    def metadata(self, digest: str) -> dict[str, str]:
        with safe_open(self._file(digest), framework="pt") as fh:
            return dict(fh.metadata() or {})

    def size(self, digest: str) -> int:
        return os.stat(self._file(digest)).st_size

    def delete(self, digests: Iterable[str]) -> int:
        """Remove blobs (used by purge, gc and failed-operation cleanup); returns bytes freed."""
        freed = 0
        for digest in digests:
            path = self._file(digest)
            try:
                freed += os.stat(path).st_size
                os.unlink(path)
            except FileNotFoundError:
                continue
        return freed

    def all_digests(self) -> set[str]:
        if not self.root.exists():
            return set()
        return {p.stem for p in self.root.glob("??/*.safetensors")}


# safetensors' data order: dtype (its enum, highest first), then name. The direct writer below covers
# the dtypes numpy holds; tests/test_blobs.py checks it byte for byte against safetensors.
_DTYPES: dict[torch.dtype, tuple[int, str]] = {
    torch.int64: (0, "I64"), torch.float64: (1, "F64"), torch.float32: (2, "F32"), torch.int32: (3, "I32"),
    torch.float16: (4, "F16"), torch.int16: (5, "I16"), torch.int8: (6, "I8"), torch.uint8: (7, "U8"),
    torch.bool: (8, "BOOL"),
}


_NUMPY = {code: np.dtype(torch.empty(0, dtype=dt).numpy().dtype).newbyteorder("<") for dt, (_, code) in _DTYPES.items()}


def serialise(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes with a canonical header, so equal content always gets the same digest.

    safetensors writes its JSON header from a hash map (key order varies between calls); the
    header is rewritten with sorted keys, padded with spaces to 8 bytes as the format allows.
    CPU tensors of the common dtypes (every head and FIM) are written directly, without
    safetensors' per-call checks: the same bytes at a fraction of the cost.
    """
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    fast = _serialise_direct(cpu, metadata)
    if fast is not None:
        return fast
    return _serialise_safetensors(cpu, metadata)


def _serialise_direct(cpu: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes | None:
    """The canonical bytes, written here; None when safetensors itself must judge the input (another
    dtype, a sparse tensor, tensors sharing memory, metadata that is not str -> str)."""
    if sys.byteorder != "little":
        return None
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        return None
    ptrs = set()
    items = []
    for name, t in cpu.items():
        spec = _DTYPES.get(t.dtype)
        if spec is None or t.layout != torch.strided or not isinstance(name, str):
            return None
        if t.numel():
            ptr = t.untyped_storage().data_ptr()
            if ptr in ptrs:
                return None  # safetensors refuses shared memory: let it say so
            ptrs.add(ptr)
        items.append((spec[0], name, spec[1], t))
    items.sort(key=lambda it: (it[0], it[1]))
    chunks = [t.numpy().tobytes() if t.numel() else b"" for _, _, _, t in items]
    # The header depends only on names, dtypes, shapes and metadata: thousands of heads share one.
    key = (tuple((name, code, tuple(t.shape)) for _, name, code, t in items),
           None if metadata is None else tuple(sorted(metadata.items())))
    prefix = _HEADERS.get(key)
    if prefix is None:
        header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
        offset = 0
        for (_, name, code, t), raw in zip(items, chunks):
            header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
            offset += len(raw)
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        prefix = struct.pack("<Q", len(text)) + text
        if len(_HEADERS) >= 4096:
            _HEADERS.clear()
        _HEADERS[key] = prefix
    return b"".join([prefix, *chunks])


_HEADERS: dict[tuple, bytes] = {}  # (tensor names/dtypes/shapes, metadata) -> length + header bytes


def _serialise_safetensors(cpu: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The reference path: safetensors' own writer, header rewritten canonically."""
    data = st_save(cpu, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def _metadata_of(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    return dict(header.get("__metadata__", {}) or {})


_WRITERS: dict[int, tuple[int, ThreadPoolExecutor]] = {}  # threads -> (pid, pool): one per process
_WRITERS_LOCK = threading.Lock()


def _writer_pool(threads: int) -> ThreadPoolExecutor:
    """The process's blob-writer threads: started once, shared by every store and request (starting
    threads on each request cost more than writing a small request's heads). A forked child starts its own."""
    pid = os.getpid()
    with _WRITERS_LOCK:
        entry = _WRITERS.get(threads)
        if entry is None or entry[0] != pid:
            entry = (pid, ThreadPoolExecutor(threads, thread_name_prefix="umig-blob"))
            _WRITERS[threads] = entry
        return entry[1]


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
        # Whether it is on disk already is checked by the writer thread (the write is then skipped).
        if self._pool is None:
            self._pool = _writer_pool(self.threads)
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
                self._dirty_dirs.add(os.path.dirname(self._file(digest)))
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
        self._pool = None  # the writer threads are the process's (shared); nothing of ours is pending
