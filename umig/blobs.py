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
import uuid
from collections.abc import Iterable
from pathlib import Path

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
        final = self.path(digest)
        if final.exists():
            return digest, False
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp / f"{digest}.{uuid.uuid4().hex}.part"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        # os.replace is atomic; two workers writing the same content race harmlessly.
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        return digest, True

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
