"""Content-addressed safetensors blobs, in a local directory or in S3.

A blob is a safetensors file named by the sha256 of its bytes. Locally, writes go to a
temporary file that is fsynced and then renamed into place, so a reader never sees a
half-written blob; in S3 a PUT is atomic, and the object is checked (HEAD) before the blob
counts as written. Reads verify the hash, so corruption is a clear error instead of silently
wrong weights.

:func:`open_blobs` opens a store from where its blobs are: a directory (or ``file://`` URL)
or ``s3://bucket/prefix``; every store names that place as ``.url``, which is all a worker
needs to open the same store. Where bytes live (:class:`BlobStore`, :class:`S3BlobStore`) is
kept apart from deferred writing (:class:`_Buffering`, one implementation for both:
:class:`BufferedBlobStore`, :class:`BufferedS3BlobStore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import json
import os
import re
import struct
import sys
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from umig.errors import IntegrityError, NotFoundError, UmigError

_CHUNK = 1 << 20


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_READ = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)


def _read_all(fd: int) -> bytes:
    """The whole file: its size, then one read (a file object's read() makes twice the system calls)."""
    size = os.fstat(fd).st_size
    data = os.read(fd, size) if size else b""
    if len(data) < size:  # a short read (a huge file, a signal): read on until the end
        chunks = [data]
        while chunk := os.read(fd, max(size - sum(map(len, chunks)), 1 << 20)):
            chunks.append(chunk)
        data = b"".join(chunks)
    return data


def _where(owner: str | None) -> str:
    return f" of node '{owner}'" if owner else ""


def _corrupted(digest: str, actual: str, owner: str | None, location: str) -> IntegrityError:
    return IntegrityError(f"blob {digest[:12]}{_where(owner)} is corrupted: its content hash is {actual[:12]} "
                          f"({location})")


def _missing(digest: str, owner: str | None, location: str) -> NotFoundError:
    return NotFoundError(f"blob {digest[:12]}{_where(owner)} is missing from the store ({location})")


class BaseBlobStore(ABC):
    """What every blob store offers, wherever its bytes live; subclasses say where.

    ``url`` names the place (an absolute directory or ``s3://bucket/prefix``): :func:`open_blobs`
    opens the same store from it in another process or on another machine.
    """

    url: str

    @abstractmethod
    def ensure(self) -> None:
        """Make the place ready for writes (or fail with one clear error when it cannot be)."""

    @abstractmethod
    def exists(self, digest: str) -> bool: ...

    @abstractmethod
    def _write(self, digest: str, data: bytes) -> bool:
        """Store ``data`` under ``digest`` atomically; False when it was there already. Once this returns,
        the bytes are durable except for :meth:`_sync` of :meth:`_sync_key` (done once per key by a flush)."""

    def _sync_key(self, digest: str) -> str | None:
        """What still needs syncing once ``digest`` was written (a directory), or None."""
        return None

    def _sync(self, key: str) -> None:
        """Make the names written under ``key`` durable."""

    @contextlib.contextmanager
    def grouped(self) -> Iterator[None]:
        """Deferred writes made inside go to the writers together at the end (:class:`_Buffering`); a
        store without deferred writes has nothing to group."""
        yield

    @abstractmethod
    def read_bytes(self, digest: str, *, owner: str | None = None) -> bytes:
        """Read a blob and verify its hash. ``owner`` names the node in error messages."""

    @abstractmethod
    def metadata(self, digest: str) -> dict[str, str]:
        """A blob's safetensors metadata (from its header; not hash-verified)."""

    @abstractmethod
    def size(self, digest: str) -> int: ...

    @abstractmethod
    def delete(self, digests: Iterable[str]) -> int:
        """Remove blobs (used by purge, gc and failed-operation cleanup); returns bytes freed."""

    @abstractmethod
    def all_digests(self) -> set[str]: ...

    @abstractmethod
    def remove_partial(self) -> int:
        """Remove what interrupted writes left behind (for gc); returns bytes freed."""

    def put_bytes(self, data: bytes) -> tuple[str, bool]:
        """Store ``data``; return ``(digest, created)`` (``created`` is False when it was already there)."""
        digest = hashlib.sha256(data).hexdigest()
        created = self._write(digest, data)
        if created:
            key = self._sync_key(digest)
            if key is not None:
                self._sync(key)
        return digest, created

    def put_tensors(
        self, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
    ) -> tuple[str, bool]:
        """Serialise tensors as safetensors and store them."""
        return self.put_bytes(serialise(tensors, metadata))

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
        got = _arrays_of(data, keys)
        if got is None:  # a dtype numpy lacks (bfloat16...): safetensors reads it
            return {k: v for k, v in st_load(data).items() if k in keys}, _metadata_of(data)
        arrays, meta = got
        return {k: torch.from_numpy(a.copy()) for k, a in arrays.items()}, meta

    def load_arrays(self, digest: str, keys: Iterable[str] | None = None, *, owner: str | None = None
                    ) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
        """The tensors named ``keys`` (default all; those the blob has) as read-only numpy arrays over the
        hash-verified bytes, and the metadata: no tensor is made (on a 10x64 head, making and freeing them
        costs more than the update). None when one of them has a dtype numpy lacks (load it as tensors)."""
        return _arrays_of(self.read_bytes(digest, owner=owner), keys)


class BlobStore(BaseBlobStore):
    """A directory of immutable safetensors blobs keyed by sha256."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        # Plain strings on the hot path (pathlib costs more than the read of a small head).
        self._root_s = os.fspath(self.root)
        self._tmp_s = os.fspath(self.tmp)
        self._url: str | None = None
        self._dirs: set[str] = set()  # blob directories (and tmp) known to exist: no mkdir per write
        # Temp names unique without a random draw per write: this store's random prefix, the process, a counter.
        self._tmp_names = (f"{uuid.uuid4().hex[:12]}-%d-%d", itertools.count())

    @property
    def url(self) -> str:  # type: ignore[override]
        """The absolute directory: a worker on this machine (or one that mounts it there) opens it from this."""
        if not self.root.is_absolute():  # follows the working directory, as the store's own paths do
            return str(self.root.resolve())
        if self._url is None:  # a system call per path component: once per store, not once per request
            self._url = str(self.root.resolve())
        return self._url

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

    def _write(self, digest: str, data: bytes) -> bool:
        """Temp file, write, fsync, rename into place; the directory's fsync is :meth:`_sync`'s. False if present."""
        final = self._file(digest)
        if os.path.exists(final):
            return False
        folder = final[: final.rindex("/")]
        if folder not in self._dirs:
            self._makedirs(folder)
            self._makedirs(self._tmp_s)
            self._dirs.add(folder)
        name, count = self._tmp_names
        tmp = f"{self._tmp_s}/{digest}.{name % (os.getpid(), next(count))}.part"
        try:
            try:
                fd = os.open(tmp, _CREATE, 0o666)
            except FileNotFoundError:  # the tmp directory went away since this store made it
                self._dirs.clear()
                self._makedirs(self._tmp_s)
                self._makedirs(folder)
                fd = os.open(tmp, _CREATE, 0o666)
            # Plain system calls: each one lets another thread take the interpreter, and a file object
            # makes twice as many as the write needs.
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)  # the content is durable before the blob gets its name
            finally:
                os.close(fd)
            # os.replace is atomic; two workers writing the same content race harmlessly.
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return True

    def _sync_key(self, digest: str) -> str | None:
        return os.path.dirname(self._file(digest))  # the new name is durable once its directory is fsynced

    def _sync(self, key: str) -> None:
        _fsync_dir(key)

    def read_bytes(self, digest: str, *, owner: str | None = None) -> bytes:
        path = self._file(digest)
        try:
            fd = os.open(path, _READ)
        except FileNotFoundError:
            raise _missing(digest, owner, path) from None
        try:
            data = _read_all(fd)
        finally:
            os.close(fd)
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise _corrupted(digest, actual, owner, path)
        return data

    def metadata(self, digest: str) -> dict[str, str]:
        with safe_open(self._file(digest), framework="pt") as fh:
            return dict(fh.metadata() or {})

    def size(self, digest: str) -> int:
        try:
            return os.stat(self._file(digest)).st_size
        except FileNotFoundError:
            raise NotFoundError(f"blob {digest[:12]} is missing from the store ({self._file(digest)})") from None

    def delete(self, digests: Iterable[str]) -> int:
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

    def remove_partial(self) -> int:
        """Delete the temp files of interrupted writes (``tmp/*.part``); returns their bytes. Run it only
        while no write is in flight (gc holds the store's lock)."""
        freed = 0
        for part in self.tmp.glob("*.part"):
            with contextlib.suppress(FileNotFoundError):
                freed += part.stat().st_size
                part.unlink()
        return freed


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
    return _canonical([(name, code, tuple(t.shape), t.numpy().tobytes() if t.numel() else b"")
                       for _, name, code, t in items], metadata)


def _canonical(items: list[tuple[str, str, tuple[int, ...], bytes]], metadata: dict[str, str] | None) -> bytes:
    """Length, header and data of ``(name, dtype code, shape, raw bytes)`` items already in safetensors' order."""
    # The header depends only on names, dtypes, shapes and metadata: thousands of heads share one.
    key = (tuple((name, code, shape) for name, code, shape, _ in items),
           None if metadata is None else tuple(sorted(metadata.items())))
    prefix = _HEADERS.get(key)
    if prefix is None:
        header: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
        offset = 0
        for name, code, shape, raw in items:
            header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
            offset += len(raw)
        text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        prefix = struct.pack("<Q", len(text)) + text
        if len(_HEADERS) >= 4096:
            _HEADERS.clear()
        _HEADERS[key] = prefix
    return b"".join([prefix, *(raw for *_, raw in items)])


_HEADERS: dict[tuple, bytes] = {}  # (tensor names/dtypes/shapes, metadata) -> length + header bytes
# numpy dtype -> (safetensors' order, code) for the arrays serialise_arrays writes directly.
_ARRAY_DTYPES = {_NUMPY[code]: (order, code) for order, code in _DTYPES.values()}


def serialise_arrays(arrays: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes | None:
    """:func:`serialise` of numpy arrays (the same bytes as of the tensors they would become), without
    making tensors of them; None for what :func:`serialise` must judge (another dtype, metadata that is
    not str -> str, a big-endian machine), to be passed to it as tensors instead.

    >>> a = np.arange(6, dtype=np.float32).reshape(2, 3)
    >>> serialise_arrays({"w": a, "b": a[0]}, {"part": "head"}) == serialise({"w": torch.from_numpy(a),
    ...     "b": torch.from_numpy(a[0].copy())}, {"part": "head"})
    True
    """
    if sys.byteorder != "little":
        return None
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        return None
    items = []
    for name, a in arrays.items():
        spec = _ARRAY_DTYPES.get(a.dtype)
        if spec is None or not isinstance(name, str):
            return None
        items.append((spec[0], name, spec[1], a))
    items.sort(key=lambda it: (it[0], it[1]))
    return _canonical([(name, code, a.shape, a.tobytes()) for _, name, code, a in items], metadata)


def _arrays_of(data: bytes, keys: Iterable[str] | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, str]] | None:
    """The tensors named ``keys`` (default all; those present) of safetensors bytes as read-only numpy views,
    and the metadata; None when one of them has a dtype numpy lacks."""
    start, header, meta = _parse_header(data)
    out: dict[str, np.ndarray] = {}
    for key in (header if keys is None else keys):
        spec = header.get(key)
        if spec is None:
            continue
        dtype = _NUMPY.get(spec["dtype"])
        if dtype is None:
            return None
        begin, end = spec["data_offsets"]
        out[key] = np.frombuffer(data, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                 offset=start + begin).reshape(spec["shape"])
    return out, dict(meta)


_PARSED: dict[bytes, tuple[dict[str, Any], dict[str, str]]] = {}  # header bytes -> (tensor specs, metadata)


def _parse_header(data: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Where the data starts, the tensor specs and the metadata of safetensors bytes; a lineage's heads
    share one header, parsed once."""
    (n,) = struct.unpack_from("<Q", data)
    text = data[8 : 8 + n]
    parsed = _PARSED.get(text)
    if parsed is None:
        header = json.loads(text)
        meta = dict(header.pop("__metadata__", None) or {})
        parsed = (header, meta)
        if len(_PARSED) >= 4096:
            _PARSED.clear()
        _PARSED[text] = parsed
    return 8 + n, parsed[0], parsed[1]


def _serialise_safetensors(cpu: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """The reference path: safetensors' own writer, header rewritten canonically."""
    data = st_save(cpu, metadata=metadata)
    (n,) = struct.unpack("<Q", data[:8])
    header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + data[8 + n :]


def _metadata_of(data: bytes) -> dict[str, str]:
    return dict(_parse_header(data)[2])


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



# ------------------------------------------------------------------------- S3
_BLOB_NAME = re.compile(r"([0-9a-f]{2})/([0-9a-f]{64})\.safetensors")
_S3_EXTRA = "pip install 'umig[server]'"
S3_WRITE_THREADS = 16  # a write to S3 waits on round trips, not on a disk: more of them overlap


def _parse_s3(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise UmigError(f"blob location {url!r} names no bucket (expected s3://bucket/prefix)")
    return bucket, prefix.strip("/")


def _s3_filesystem() -> Any:
    """An s3fs file system configured from the standard AWS variables.

    botocore reads the credentials (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_PROFILE``), the region (``AWS_DEFAULT_REGION``) and retries (``AWS_MAX_ATTEMPTS``,
    ``AWS_RETRY_MODE``) itself; the endpoint (``AWS_ENDPOINT_URL_S3``, else ``AWS_ENDPOINT_URL``: MinIO,
    a test server) is passed explicitly, so it works whatever botocore version s3fs brings.
    """
    try:
        import s3fs
    except ImportError:
        raise UmigError(f"s3:// blobs need s3fs: {_S3_EXTRA}") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    extra: dict[str, Any] = {"client_kwargs": {"endpoint_url": endpoint}} if endpoint else {}
    # No listing cache (other machines add and delete blobs) and no shared instance (one cached by
    # fsspec would keep the credentials of whoever opened it first).
    return s3fs.S3FileSystem(use_listings_cache=False, skip_instance_cache=True, **extra)


def _s3_errors() -> tuple[type[BaseException], ...]:
    """What talking to S3 raises: s3fs turns service errors into OSError, botocore raises its own."""
    from botocore.exceptions import BotoCoreError, ClientError

    return (OSError, BotoCoreError, ClientError, asyncio.TimeoutError)


def _s3_cause(e: BaseException, bucket: str) -> str:
    """One line saying why a call to S3 failed."""
    text = " ".join(str(e).split()) or type(e).__name__
    name = type(e).__name__
    if name == "NoCredentialsError":
        return "no AWS credentials found (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)"
    if isinstance(e, FileNotFoundError) and "bucket" in text.lower():
        return f"bucket '{bucket}' does not exist"
    if isinstance(e, PermissionError):
        return f"access denied ({text}): check the AWS credentials and the bucket's policy"
    return text


class S3BlobStore(BaseBlobStore):
    """Blobs as objects ``<prefix>/<digest[:2]>/<digest>.safetensors`` in an S3 bucket (the local layout).

    A PUT is atomic (a reader gets the whole object or a 404) and botocore checksums the upload; a
    write counts as done only once a HEAD shows the object at its full size. Reads verify the sha256.
    Any failure to talk to S3 (credentials, endpoint, bucket) is one :class:`UmigError` naming the
    URL and the cause. Needs s3fs (``pip install 'umig[server]'``); nothing is sent before first use.
    """

    def __init__(self, url: str) -> None:
        self.bucket, self.prefix = _parse_s3(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self._key_root = f"{self.prefix}/" if self.prefix else ""
        self.fs = _s3_filesystem()
        self._errors = _s3_errors()
        self._bucket_ok = False  # a 404 means "no such blob" only once the bucket is known to exist

    # -------------------------------------------------------------- plumbing
    def _key(self, digest: str) -> str:
        """The object key within the bucket."""
        return f"{self._key_root}{digest[:2]}/{digest}.safetensors"

    def _location(self, digest: str) -> str:
        return f"s3://{self.bucket}/{self._key(digest)}"

    @contextlib.contextmanager
    def _talk(self, doing: str) -> Iterator[None]:
        """Turn whatever S3, botocore or s3fs raise into one line naming the store and the cause."""
        try:
            yield
        except UmigError:
            raise
        except self._errors as e:
            raise UmigError(f"S3 blob store {self.url}: cannot {doing}: {_s3_cause(e, self.bucket)}") from None

    def _check_bucket(self) -> None:
        """Fail with one clear line unless the bucket exists and this prefix can be listed."""
        with self._talk("list the bucket"):
            self.fs.call_s3("list_objects_v2", Bucket=self.bucket, Prefix=self._key_root, MaxKeys=1)
        self._bucket_ok = True

    def _head(self, digest: str) -> dict[str, Any] | None:
        """The object's HEAD response, or None when there is no such blob (call inside :meth:`_talk`)."""
        try:
            return self.fs.call_s3("head_object", Bucket=self.bucket, Key=self._key(digest))
        except FileNotFoundError:
            # S3 answers a HEAD in a missing bucket with the same bare 404 as for a missing key.
            if not self._bucket_ok:
                self._check_bucket()
            return None

    # ------------------------------------------------------------ the store
    def ensure(self) -> None:
        """Check that the bucket exists and takes writes (a probe object, deleted again)."""
        self._check_bucket()
        probe = f"{self._key_root}.umig-probe-{uuid.uuid4().hex}"  # outside ??/: never taken for a blob
        with self._talk("write to the bucket"):
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=probe, Body=b"")
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=probe)

    def exists(self, digest: str) -> bool:
        with self._talk(f"look up blob {digest[:12]}"):
            return self._head(digest) is not None

    def _write(self, digest: str, data: bytes) -> bool:
        """PUT the object unless it is there; True only once a HEAD shows all of it stored."""
        with self._talk(f"write blob {digest[:12]}"):
            if self._head(digest) is not None:
                return False
            # Same-content writers race harmlessly: a PUT replaces the object whole, with the same bytes.
            self.fs.pipe_file(f"{self.bucket}/{self._key(digest)}", data)
            stored = self._head(digest)
        got = None if stored is None else stored.get("ContentLength")
        if got != len(data):
            raise IntegrityError(f"blob {digest[:12]} was not stored intact at {self._location(digest)} "
                                 f"({'nothing' if got is None else f'{got} bytes'} of {len(data)} bytes)")
        return True

    def _get(self, digest: str, start: int | None = None, end: int | None = None) -> bytes | None:
        """The object's bytes (a range of them), or None when there is no such blob (call inside :meth:`_talk`)."""
        try:
            return self.fs.cat_file(f"{self.bucket}/{self._key(digest)}", start=start, end=end)
        except FileNotFoundError:
            if not self._bucket_ok:
                self._check_bucket()
            return None

    def read_bytes(self, digest: str, *, owner: str | None = None) -> bytes:
        with self._talk(f"read blob {digest[:12]}"):
            data = self._get(digest)
        if data is None:
            raise _missing(digest, owner, self._location(digest))
        actual = hashlib.sha256(data).hexdigest()
        if actual != digest:
            raise _corrupted(digest, actual, owner, self._location(digest))
        return data

    def metadata(self, digest: str) -> dict[str, str]:
        """From the header alone (two ranged reads), not the whole blob."""
        with self._talk(f"read blob {digest[:12]}"):
            head = self._get(digest, 0, 8)
            if head is None:
                raise _missing(digest, None, self._location(digest))
            try:
                (n,) = struct.unpack("<Q", head)
                header = json.loads(self._get(digest, 8, 8 + n) or b"")
            except (struct.error, ValueError):
                raise IntegrityError(f"blob {digest[:12]} has no readable safetensors header "
                                     f"({self._location(digest)})") from None
        return dict(header.get("__metadata__") or {})

    def size(self, digest: str) -> int:
        with self._talk(f"look up blob {digest[:12]}"):
            head = self._head(digest)
        if head is None:
            raise _missing(digest, None, self._location(digest))
        return int(head["ContentLength"])

    def _listing(self) -> dict[str, int]:
        """Every blob under the prefix -> its size (one paginated listing)."""
        out: dict[str, int] = {}
        with self._talk("list blobs"):
            found = self.fs.find(f"{self.bucket}/{self.prefix}" if self.prefix else self.bucket, detail=True)
        skip = len(self.bucket) + 1 + len(self._key_root)
        for path, info in found.items():
            m = _BLOB_NAME.fullmatch(path[skip:])
            if m and m.group(2).startswith(m.group(1)):
                out[m.group(2)] = int(info.get("size") or 0)
        return out

    def all_digests(self) -> set[str]:
        return set(self._listing())

    def delete(self, digests: Iterable[str]) -> int:
        wanted = list(dict.fromkeys(digests))
        if not wanted:
            return 0
        if len(wanted) > 64:  # one listing beats a HEAD per blob
            listed = self._listing()
            present = {d: listed[d] for d in wanted if d in listed}
        else:
            present = {}
            with self._talk("look up blobs to delete"):
                for d in wanted:
                    head = self._head(d)
                    if head is not None:
                        present[d] = int(head["ContentLength"])
        names = list(present)
        for i in range(0, len(names), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self._key(d)} for d in names[i : i + 1000]]
            with self._talk("delete blobs"):
                out = self.fs.call_s3("delete_objects", Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            errors = out.get("Errors") or []
            if errors:
                first = errors[0]
                raise UmigError(f"S3 blob store {self.url}: cannot delete {len(errors)} blob(s), e.g. "
                                f"s3://{self.bucket}/{first.get('Key')}: {first.get('Message') or first.get('Code')}")
        return sum(present.values())

    def remove_partial(self, *, min_age_s: float = 3600.0) -> int:
        """Abort multipart uploads under the prefix started over ``min_age_s`` ago (a killed writer's; S3
        keeps and bills their parts); returns the bytes their parts held. A younger upload may be a live
        writer's (S3 has no store lock to wait for), so it is left alone."""
        freed = 0
        now = time.time()
        query: dict[str, Any] = {"Bucket": self.bucket, **({"Prefix": self._key_root} if self._key_root else {})}
        with self._talk("clean up unfinished uploads"):
            while True:
                page = self.fs.call_s3("list_multipart_uploads", **query)
                for upload in page.get("Uploads") or []:
                    if now - upload["Initiated"].timestamp() < min_age_s:
                        continue
                    ident = {"Bucket": self.bucket, "Key": upload["Key"], "UploadId": upload["UploadId"]}
                    parts = self.fs.call_s3("list_parts", **ident)
                    freed += sum(int(p.get("Size") or 0) for p in parts.get("Parts") or [])
                    with contextlib.suppress(FileNotFoundError):  # finished or aborted meanwhile
                        self.fs.call_s3("abort_multipart_upload", **ident)
                if not page.get("IsTruncated"):
                    return freed
                query.update(KeyMarker=page.get("NextKeyMarker"), UploadIdMarker=page.get("NextUploadIdMarker"))




class _Buffering(BaseBlobStore):
    """Deferred writes over any blob store's ``_write``, on a few threads, so that fsyncs (or S3 round
    trips) overlap. Mixed in before the store that says where bytes live.

    :meth:`put_deferred` serialises and hashes the tensors at once and returns the digest;
    the write itself runs on a thread. :meth:`flush` waits until every pending write is done,
    syncs what the writes left to sync once (a local directory: one fsync per directory, not
    per blob), and returns the blobs that were created. Reads see pending blobs. Whoever
    commits metadata naming a deferred blob must :meth:`flush` first: that keeps "metadata
    only after durable blobs" true while thousands of tiny head blobs share each journal commit.
    Inside :meth:`grouped`, the blobs put are handed to one writer as one task when the block ends, which
    also syncs their directories.
    """

    def __init__(self, *args: Any, threads: int = 4, max_pending_bytes: int = 256 << 20,
                 max_pending: int = 1024, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.threads = threads
        # Sync keys (directories) whose new entries still need a sync -> the tick of the latest such entry.
        self._unsynced: dict[str, int] = {}
        self._tick = 0
        self.max_pending_bytes = max_pending_bytes
        self.max_pending = max_pending
        self._pool: ThreadPoolExecutor | None = None
        self._queue: deque[tuple[Future, str, Any, int]] = deque()
        self._data: dict[str, bytes] = {}  # digest -> bytes while its write is pending
        self._pending_bytes = 0
        self._created: list[tuple[Any, str]] = []
        self._error: BaseException | None = None
        self._lock = threading.Lock()
        self._groups = threading.local()  # per thread: grouped() depth and the writes it holds

    def put_deferred(self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None,
                     tag: Any = None) -> str:
        """Queue a blob write; return its digest now. ``tag`` comes back with it from :meth:`flush`."""
        return self.put_serialised(serialise(dict(tensors), metadata), tag)

    def put_serialised(self, data: bytes, tag: Any = None) -> str:
        """:meth:`put_deferred` of bytes :func:`serialise` (or :func:`serialise_arrays`) made."""
        if self.threads < 1:
            digest, created = self.put_bytes(data)
            if created:
                self._created.append((tag, digest))
            return digest
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            if digest in self._data:
                return digest
        # Whether it is stored already is checked by the writer thread (the write is then skipped).
        with self._lock:
            self._data[digest] = data
        held = getattr(self._groups, "items", None)
        if held is not None:
            held.append((digest, data, tag))
        else:
            self._submit([(digest, data, tag)])
        return digest

    @contextlib.contextmanager
    def grouped(self) -> Iterator[None]:
        """Hold this thread's deferred writes until the block ends, then hand them to one writer as one
        task (also when the block raises: a flush then reports them for clean-up). A recorded node's body,
        head and FIM blobs wake one writer once, after the node's rows are written, instead of three writers
        that take turns with the recording thread for the interpreter mid-record. Nested blocks join the outer."""
        if getattr(self._groups, "items", None) is not None or self.threads < 1:
            yield
            return
        self._groups.items = []
        try:
            yield
        finally:
            items, self._groups.items = self._groups.items, None
            if items:
                self._submit(items)

    def _submit(self, items: list[tuple[str, bytes, Any]]) -> None:
        """Queue one writer task for ``items`` (digest, bytes, tag); settle the oldest while over the limits."""
        if self._pool is None:
            self._pool = _writer_pool(self.threads)
        fut = self._pool.submit(self._write_group, [(d, data) for d, data, _ in items])
        for digest, data, tag in items:
            self._queue.append((fut, digest, tag, len(data)))
            self._pending_bytes += len(data)
        while self._queue and (len(self._queue) > self.max_pending or self._pending_bytes > self.max_pending_bytes):
            self._settle_one()

    def _write_group(self, items: list[tuple[str, bytes]]) -> dict[str, bool | BaseException]:
        """:meth:`_write_deferred` for each item, then the sync of what they left to sync; a failed write is
        returned as its exception (the others are still written, so that a flush can report every blob
        created). The group's syncs run here, on the writer, while the caller goes on (a recorder: training
        the next model), so the flush that ends the transaction has only the last group's and the
        ungrouped writes' left to do; a key written again since is left to the flush."""
        out: dict[str, bool | BaseException] = {}
        keys = []
        for digest, data in items:
            try:
                out[digest] = created = self._write_deferred(digest, data)
            except Exception as e:  # noqa: BLE001 - raised for its digest by _settle_one
                out[digest] = e
                continue
            key = self._sync_key(digest) if created else None
            if key is not None and key not in keys:
                keys.append(key)
        for key in keys:
            with self._lock:
                tick = self._unsynced.get(key)
            if tick is None:  # a flush took it
                continue
            try:
                self._sync(key)
            except OSError:  # the flush syncs it again and reports the error
                continue
            with self._lock:
                if self._unsynced.get(key) == tick:
                    del self._unsynced[key]
        return out

    def _write_deferred(self, digest: str, data: bytes) -> bool:
        """The store's write without its per-blob sync (done once per key by :meth:`flush`)."""
        created = self._write(digest, data)
        if created:
            key = self._sync_key(digest)
            if key is not None:
                with self._lock:
                    self._tick += 1
                    self._unsynced[key] = self._tick
        return created

    def _sync_written(self) -> None:
        with self._lock:
            keys, self._unsynced = sorted(self._unsynced), {}
        if not keys:
            return
        if self._pool is None or len(keys) == 1:
            for k in keys:
                self._sync(k)
        else:
            list(self._pool.map(self._sync, keys))

    def _settle_one(self) -> None:
        fut, digest, tag, size = self._queue.popleft()
        try:
            created = fut.result()[digest]
            if isinstance(created, BaseException):
                raise created
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
            self._sync_written()  # the new names are durable too: one sync per directory, not per blob
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


class BufferedBlobStore(_Buffering, BlobStore):
    """A local :class:`BlobStore` with deferred writes (:class:`_Buffering`): their fsyncs overlap, and a
    flush fsyncs each directory that got new blobs once instead of once per blob."""


class BufferedS3BlobStore(_Buffering, S3BlobStore):
    """An :class:`S3BlobStore` with deferred writes (:class:`_Buffering`): their round trips overlap."""


def blobs_url(location: str | Path) -> str:
    """The canonical name of a blob location: ``s3://bucket/prefix``, or an absolute directory
    (``file://`` stripped). Two spellings of one place give the same string."""
    text = os.fspath(location)
    if text.startswith("s3://"):
        bucket, prefix = _parse_s3(text)
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    if text.startswith("file://"):
        text = text[len("file://"):]
        if not text.startswith("/"):
            raise UmigError(f"blob location {os.fspath(location)!r}: a file:// URL needs an absolute path "
                            "(file:///path)")
    elif "://" in text:
        raise UmigError(f"blob location {text!r} is not supported: a directory, file:///path or "
                        "s3://bucket/prefix")
    return str(Path(text).resolve())


def open_blobs(location: str | Path, *, threads: int | None = None, max_pending_bytes: int = 256 << 20,
               max_pending: int = 1024) -> BaseBlobStore:
    """The blob store at ``location`` (a directory, ``file:///path`` or ``s3://bucket/prefix``), with
    deferred writes on ``threads`` threads (default: 4 locally, :data:`S3_WRITE_THREADS` for S3).

    Opening contacts nothing: an S3 store reports a missing bucket, bad credentials or an
    unreachable endpoint on first use (:meth:`~BaseBlobStore.ensure` checks at once).
    """
    url = blobs_url(location)
    if url.startswith("s3://"):
        return BufferedS3BlobStore(url, threads=S3_WRITE_THREADS if threads is None else threads,
                                   max_pending_bytes=max_pending_bytes, max_pending=max_pending)
    return BufferedBlobStore(url, threads=4 if threads is None else threads,
                             max_pending_bytes=max_pending_bytes, max_pending=max_pending)
