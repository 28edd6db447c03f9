"""What a request asks to forget: labels, samples of a dataset, or a client's data, combined.

A :class:`ForgetSet` is a value: labels, plus sample sets, each naming a dataset by the
fingerprint of its whole source (so two references to the same content match) and the
sorted, unique indices into it. A client is the sample set of that client node's own data.
The audit record (:meth:`ForgetSet.to_json`) keeps kinds, fingerprints, counts and a
digest of the indices, never the data.

>>> fs = ForgetSet(labels=(2, 1))
>>> fs.labels, fs.kinds
((1, 2), ('labels',))
>>> fs.mask(np.array([0, 1, 2]), None, None).tolist()
[False, True, True]
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from umig import data as D
from umig.errors import UnlearningError


@dataclass(frozen=True, eq=False)
class SampleSet:
    """Indices into one dataset's whole source, identified by the source's fingerprint."""

    dataset: str  # fingerprint of the whole source (see umig.data.fingerprint)
    source: str  # the reference it was named by (for messages only)
    indices: np.ndarray  # sorted, unique int64
    size: int  # items in the whole source
    client: str | None = None  # the node whose own data this is, for --client

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.indices.tobytes()).hexdigest()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dataset": self.dataset, "count": int(self.indices.size), "digest": self.digest}
        if self.client is not None:
            out["client"] = self.client
        return out


@dataclass(frozen=True)
class ForgetSet:
    """Labels and sample sets to forget together; see the module docstring."""

    labels: tuple[int, ...] = ()
    samples: tuple[SampleSet, ...] = field(default=())

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(sorted({int(x) for x in self.labels})))
        object.__setattr__(self, "samples", tuple(self.samples))

    @property
    def kinds(self) -> tuple[str, ...]:
        """``labels``, ``samples`` and/or ``client``: what a method must support to serve it."""
        out = ["labels"] if self.labels else []
        if any(s.client is None for s in self.samples):
            out.append("samples")
        if any(s.client is not None for s in self.samples):
            out.append("client")
        return tuple(out)

    @property
    def clients(self) -> tuple[str, ...]:
        return tuple(s.client for s in self.samples if s.client is not None)

    def __bool__(self) -> bool:
        return bool(self.labels) or any(s.indices.size for s in self.samples)

    def mask(self, labels: np.ndarray, dataset: str | None, positions: np.ndarray | None) -> np.ndarray:
        """Which items of one node's data to forget: their labels, and (when that data comes from
        ``dataset``) their ``positions`` in its whole source."""
        out = np.isin(labels, np.asarray(self.labels, dtype=np.int64)) if self.labels else np.zeros(len(labels), bool)
        if positions is not None:
            for s in self.samples:
                if s.dataset == dataset:
                    out |= np.isin(positions, s.indices, assume_unique=False)
        return out

    def to_json(self) -> dict[str, Any]:
        """The audit record: never the data, only what identifies it."""
        return {"kinds": list(self.kinds), "labels": list(self.labels), "samples": [s.to_json() for s in self.samples]}

    def describe(self) -> str:
        parts = []
        if self.labels:
            parts.append("label(s) " + ",".join(map(str, self.labels)))
        for s in self.samples:
            parts.append(f"client {s.client}" if s.client else f"{s.indices.size} sample(s) of {s.source}")
        return "; ".join(parts) or "nothing"


def samples(indices: np.ndarray | Iterable[int], data_ref: str, *, client: str | None = None) -> SampleSet:
    """A sample set: ``indices`` into the whole dataset that ``data_ref`` names (any data reference).

    Checks the indices against the dataset's size; the dataset is identified by its fingerprint.
    """
    ref = D.parse_ref(data_ref)
    base, _ = D.source_positions(D.DataRef(ref.source))
    idx = np.unique(np.asarray(list(indices) if not isinstance(indices, np.ndarray) else indices))
    if idx.size == 0:
        raise UnlearningError("the forget set is empty (no sample indices were given)")
    if not np.issubdtype(idx.dtype, np.integer):
        raise UnlearningError(f"sample indices must be integers, got {idx.dtype}")
    if idx[0] < 0 or idx[-1] >= len(base):
        bad = int(idx[0] if idx[0] < 0 else idx[-1])
        raise UnlearningError(f"sample index {bad} is out of range for {ref.source} ({len(base)} items)")
    return SampleSet(dataset=source_fingerprint(ref.source), source=ref.source, indices=idx.astype(np.int64),
                     size=len(base), client=client)


_SOURCE_FP: dict[str, str] = {}


def source_fingerprint(source: str) -> str:
    """Fingerprint of a whole source (cached per process: sources are immutable by contract)."""
    fp = _SOURCE_FP.get(source)
    if fp is None:
        base, _ = D.source_positions(D.DataRef(source))
        fp = _SOURCE_FP[source] = D.fingerprint(base)
    return fp
