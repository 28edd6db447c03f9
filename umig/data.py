"""Data references: parse, resolve, fingerprint, subset, label filter, batching.

A model node never stores its training data, only a *reference* to it (a short
string plus an optional index file and label filter) and a fingerprint of what
the reference resolved to when it was recorded.  Reference grammar::

    PATH.safetensors                         tensors ``x`` (float) and ``y`` (int labels)
    sklearn:digits[?split=train|test]        scikit-learn's bundled digits, 75/25 stratified split
    torchvision:NAME:ROOT[:train|test]       NAME in CIFAR10, CIFAR100, MNIST, FashionMNIST; never downloads
    imagefolder:DIR                          torchvision ImageFolder; labels = class_to_idx

Compute code consumes a :class:`Data` through :meth:`Data.batches` (or the
module-level :func:`batches`), an iterator of ``(x, y)`` tensors, so it never
needs to know where the data came from.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset, TensorDataset

from umig.errors import DataError

__all__ = [
    "DataRef",
    "Data",
    "parse_ref",
    "parse_labels",
    "format_labels",
    "resolve",
    "fingerprint",
    "verify",
    "from_tensors",
    "from_dataset",
    "batches",
    "save_subset",
    "digits_client_split",
]

SCHEMES = ("sklearn", "torchvision", "imagefolder")
SKLEARN_DATASETS = ("digits",)
TORCHVISION_DATASETS = ("CIFAR10", "CIFAR100", "MNIST", "FashionMNIST")
SPLITS = ("train", "test")
_SUBSET_SUFFIXES = (".npy", ".safetensors")
# Bumped whenever what goes into a fingerprint changes, so old and new never collide silently.
_FINGERPRINT_VERSION = b"umig-data-fingerprint-v1"
_DIGITS_TEST_FRACTION = 0.25
_DIGITS_SPLIT_SEED = 0
_SUFFIX_RE = re.compile(r"\[(subset|labels)=([^\]]*)\]$")


# --------------------------------------------------------------------------- references


def parse_labels(text: str) -> tuple[int, ...]:
    """Parse ``"0-4,7"`` into ``(0, 1, 2, 3, 4, 7)`` (ranges inclusive, result sorted and unique)."""
    if not isinstance(text, str):
        raise DataError(f"label list must be text like '0-4,7', got {text!r}")
    items = [part.strip() for part in text.split(",")]
    if not text.strip() or any(not part for part in items):
        raise DataError(f"bad label list {text!r}: expected comma-separated ids or ranges like '0-4,7'")
    labels: set[int] = set()
    for part in items:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if m is None:
            raise DataError(f"bad label list {text!r}: {part!r} is not a label id or range like '0-4'")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise DataError(f"bad label list {text!r}: range {part!r} runs backwards")
        labels.update(range(lo, hi + 1))
    return tuple(sorted(labels))


def format_labels(labels: Iterable[int]) -> str:
    """Inverse of :func:`parse_labels`: ``(0, 1, 2, 3, 4, 7)`` -> ``"0-4,7"``."""
    values = sorted(set(int(v) for v in labels))
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[j] + 1:
            j += 1
        if j - i >= 2:
            parts.append(f"{values[i]}-{values[j]}")
        else:
            parts.extend(str(v) for v in values[i : j + 1])
        i = j + 1
    return ",".join(parts)


def _normalise_labels(only_labels: str | Sequence[int] | None) -> tuple[int, ...] | None:
    if only_labels is None:
        return None
    if isinstance(only_labels, str):
        return parse_labels(only_labels)
    try:
        values = sorted(set(int(v) for v in only_labels))
    except (TypeError, ValueError):
        raise DataError(f"bad label list {only_labels!r}: expected integer label ids") from None
    if not values:
        raise DataError("empty label list: give at least one label id")
    if values[0] < 0:
        raise DataError(f"bad label list {only_labels!r}: label ids cannot be negative")
    return tuple(values)


def _abspath(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _canonical_source(ref: str) -> str:
    """Canonical form of the source part of a reference; raises DataError for anything unparseable."""
    text = ref.strip()
    if not text:
        raise DataError("empty data reference")
    scheme, sep, rest = text.partition(":")
    if sep and scheme.lower() in SCHEMES:
        scheme = scheme.lower()
        if scheme == "sklearn":
            return _canonical_sklearn(text, rest)
        if scheme == "torchvision":
            return _canonical_torchvision(text, rest)
        if not rest:
            raise DataError(f"data reference {text!r}: imagefolder needs a directory, e.g. imagefolder:/data/imgs")
        return f"imagefolder:{_abspath(rest)}"
    if text.lower().endswith(".safetensors"):
        return _abspath(text)
    if sep and re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme) and len(scheme) > 1:
        raise DataError(
            f"data reference {text!r}: unknown scheme {scheme!r} (expected one of {', '.join(SCHEMES)} "
            "or a PATH.safetensors file)"
        )
    raise DataError(
        f"data reference {text!r} is not recognised: expected PATH.safetensors, sklearn:digits[?split=train|test], "
        "torchvision:NAME:ROOT[:train|test] or imagefolder:DIR"
    )


def _canonical_sklearn(text: str, rest: str) -> str:
    name, _, query = rest.partition("?")
    name = name.strip().lower()
    if name not in SKLEARN_DATASETS:
        raise DataError(
            f"data reference {text!r}: unknown sklearn dataset {name!r} (known: {', '.join(SKLEARN_DATASETS)})"
        )
    if not query:
        return f"sklearn:{name}"
    params: dict[str, str] = {}
    for item in query.split("&"):
        key, eq, value = item.partition("=")
        if not eq or key.strip().lower() != "split":
            raise DataError(f"data reference {text!r}: unknown option {item!r} (only ?split=train|test)")
        params["split"] = value.strip().lower()
    split = params["split"]
    if split not in SPLITS:
        raise DataError(f"data reference {text!r}: split must be train or test, got {split!r}")
    return f"sklearn:{name}?split={split}"


def _canonical_torchvision(text: str, rest: str) -> str:
    name, sep, root_part = rest.partition(":")
    known = {n.lower(): n for n in TORCHVISION_DATASETS}
    canonical_name = known.get(name.strip().lower())
    if canonical_name is None:
        raise DataError(
            f"data reference {text!r}: unknown torchvision dataset {name!r} "
            f"(known: {', '.join(TORCHVISION_DATASETS)})"
        )
    split = "train"
    root = root_part
    head, colon, tail = root_part.rpartition(":")
    # The root itself may contain ':'; only a trailing ':train'/':test' is a split.
    if colon and tail.strip().lower() in SPLITS:
        root, split = head, tail.strip().lower()
    if not sep or not root.strip():
        raise DataError(f"data reference {text!r}: expected torchvision:{canonical_name}:ROOT[:train|test]")
    return f"torchvision:{canonical_name}:{_abspath(root.strip())}:{split}"


def _canonical_subset(subset: str) -> str:
    path = _abspath(subset)
    if not path.lower().endswith(_SUBSET_SUFFIXES):
        raise DataError(f"subset file {subset!r} must be a .npy or .safetensors file of int64 indices")
    return path


@dataclass(frozen=True)
class DataRef:
    """A canonical data reference: a source, an optional index file, and an optional label filter.

    ``resolve`` applies ``subset`` first, then keeps only items whose label is in ``only_labels``.
    """

    source: str
    subset: str | None = None
    only_labels: tuple[int, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """A JSON-serialisable dict; :meth:`from_json` restores an equal DataRef."""
        return {
            "source": self.source,
            "subset": self.subset,
            "only_labels": list(self.only_labels) if self.only_labels is not None else None,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DataRef:
        """Rebuild (and re-validate) a DataRef written by :meth:`to_json`."""
        if not isinstance(d, dict) or not isinstance(d.get("source"), str):
            raise DataError(f"bad stored data reference {d!r}: expected a dict with a 'source' string")
        unknown = set(d) - {"source", "subset", "only_labels"}
        if unknown:
            raise DataError(f"bad stored data reference {d!r}: unknown field(s) {', '.join(sorted(unknown))}")
        return parse_ref(d["source"], subset=d.get("subset"), only_labels=d.get("only_labels"))

    def __str__(self) -> str:
        text = self.source
        if self.subset is not None:
            text += f"[subset={self.subset}]"
        if self.only_labels is not None:
            text += f"[labels={format_labels(self.only_labels)}]"
        return text


def parse_ref(
    ref: str,
    *,
    subset: str | None = None,
    only_labels: str | Sequence[int] | None = None,
) -> DataRef:
    """Parse and canonicalise a reference string (paths become absolute).

    Also accepts the ``[subset=...][labels=...]`` suffixes that ``str(DataRef)`` writes, so
    ``parse_ref(str(r)) == r``.
    """
    if not isinstance(ref, str):
        raise DataError(f"data reference must be a string, got {type(ref).__name__}")
    text = ref.strip()
    while True:
        m = _SUFFIX_RE.search(text)
        if m is None:
            break
        key, value = m.group(1), m.group(2)
        if key == "subset":
            if subset is not None:
                raise DataError(f"data reference {ref!r}: subset given twice")
            subset = value
        else:
            if only_labels is not None:
                raise DataError(f"data reference {ref!r}: labels given twice")
            only_labels = value
        text = text[: m.start()].rstrip()
    return DataRef(
        source=_canonical_source(text),
        subset=_canonical_subset(subset) if subset is not None else None,
        only_labels=_normalise_labels(only_labels),
    )


# --------------------------------------------------------------------------- Data


def _as_index_tensor(indices: Any, n: int, what: str) -> Tensor:
    """Long tensor of positions in ``range(n)``; bool masks become their true positions."""
    if isinstance(indices, Tensor):
        idx = indices.detach().cpu()
    else:
        arr = np.asarray(indices)
        if arr.dtype == object:
            raise DataError(f"{what}: indices must be integers")
        idx = torch.as_tensor(arr if arr.size else arr.astype(np.int64))
    if idx.dtype == torch.bool:
        if idx.shape != (n,):
            raise DataError(f"{what}: boolean mask has shape {tuple(idx.shape)}, expected ({n},)")
        return idx.nonzero().flatten()
    if idx.is_floating_point() or idx.is_complex():
        raise DataError(f"{what}: indices must be integers, got {idx.dtype}")
    idx = idx.reshape(-1).long()
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            raise DataError(f"{what}: index {bad} out of range for {n} items")
    return idx


def _tensor_pair(dataset: Dataset) -> tuple[Tensor, Tensor] | None:
    """``(x, y)`` if ``dataset`` is a plain two-tensor TensorDataset (the fast path)."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        return dataset.tensors[0], dataset.tensors[1]
    return None


@dataclass(repr=False)
class Data:
    """A dataset plus the label of every item (known without loading inputs) and where it came from.

    ``ref`` is None when the data can no longer be described by a reference (e.g. after an
    arbitrary :meth:`select`); label filters keep it up to date.
    """

    dataset: Dataset
    targets: Tensor
    ref: DataRef | None = field(default=None)

    def __post_init__(self) -> None:
        self.targets = torch.as_tensor(self.targets).detach().cpu().reshape(-1).long()
        n = len(self.dataset)  # type: ignore[arg-type]
        if self.targets.numel() != n:
            raise DataError(f"data has {n} items but {self.targets.numel()} labels")

    def __len__(self) -> int:
        return int(self.targets.numel())

    def __repr__(self) -> str:
        return f"Data(n={len(self)}, labels={format_labels(self.labels()) or '-'}, ref={self.ref})"

    def label_counts(self) -> dict[int, int]:
        """Items per label, ordered by label id."""
        values, counts = torch.unique(self.targets, return_counts=True)
        return {int(v): int(c) for v, c in zip(values.tolist(), counts.tolist())}

    def labels(self) -> set[int]:
        """Label ids that occur at least once."""
        return set(torch.unique(self.targets).tolist())

    def select(self, indices: Sequence[int] | np.ndarray | Tensor) -> Data:
        """The items at ``indices`` (ints or a boolean mask), in that order; ``ref`` becomes None."""
        idx = _as_index_tensor(indices, len(self), "select")
        return Data(_index_dataset(self.dataset, idx), self.targets[idx], None)

    def filter_labels(self, keep: Iterable[int] | None = None, drop: Iterable[int] | None = None) -> Data:
        """Items whose label is in ``keep`` (all when None) and not in ``drop``; order preserved."""
        if keep is None and drop is None:
            return self
        mask = torch.ones(len(self), dtype=torch.bool)
        keep_set = set(int(v) for v in keep) if keep is not None else None
        drop_set = set(int(v) for v in drop) if drop is not None else set()
        if keep_set is not None:
            mask &= torch.isin(self.targets, torch.tensor(sorted(keep_set), dtype=torch.long))
        if drop_set:
            mask &= ~torch.isin(self.targets, torch.tensor(sorted(drop_set), dtype=torch.long))
        out = self.select(mask)
        out.ref = self._filtered_ref(keep_set, drop_set)
        return out

    def _filtered_ref(self, keep: set[int] | None, drop: set[int]) -> DataRef | None:
        # Label filters commute, so the result is still expressible as this ref plus a label list.
        if self.ref is None:
            return None
        allowed = set(self.ref.only_labels) if self.ref.only_labels is not None else self.labels()
        if keep is not None:
            allowed &= keep
        allowed -= drop
        if not allowed:
            return None
        return replace(self.ref, only_labels=tuple(sorted(allowed)))

    def split_by_labels(self, forget: Iterable[int]) -> tuple[Data, Data]:
        """``(forget part, retain part)``: items whose label is / is not in ``forget``."""
        forget_set = set(int(v) for v in forget)
        return self.filter_labels(keep=forget_set), self.filter_labels(drop=forget_set)

    @staticmethod
    def concat(datas: Sequence[Data]) -> Data:
        """All items of ``datas`` in order (a node's effective data: its own plus its ancestors')."""
        datas = list(datas)
        if not datas:
            raise DataError("no data to concatenate")
        if len(datas) == 1:
            return datas[0]
        targets = torch.cat([d.targets for d in datas])
        pairs = [_tensor_pair(d.dataset) for d in datas]
        if all(p is not None for p in pairs):
            xs = [p[0] for p in pairs]  # type: ignore[index]
            if all(x.dtype == xs[0].dtype and x.shape[1:] == xs[0].shape[1:] for x in xs):
                # Stay on the tensor fast path instead of wrapping in ConcatDataset.
                return Data(TensorDataset(torch.cat(xs), targets), targets, None)
        return Data(ConcatDataset([d.dataset for d in datas]), targets, None)

    def batches(
        self,
        batch_size: int = 256,
        *,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str | None = None,
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate ``(x, y)`` batches; tensor-backed data is sliced directly (no DataLoader)."""
        return batches(self, batch_size, shuffle=shuffle, seed=seed, device=device)


def _index_dataset(dataset: Dataset, idx: Tensor) -> Dataset:
    pair = _tensor_pair(dataset)
    if pair is not None:
        return TensorDataset(pair[0][idx], pair[1][idx])
    if isinstance(dataset, Subset):
        # Collapse nested subsets so repeated filtering does not stack index lookups.
        parent = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return Subset(dataset.dataset, parent[idx].tolist())
    return Subset(dataset, idx.tolist())


def batches(
    data: Data | Dataset,
    batch_size: int = 256,
    *,
    shuffle: bool = False,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate ``(x, y)`` batches (``y`` int64) of a :class:`Data` or a plain Dataset.

    Shuffling is reproducible: the same ``seed`` gives the same order.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch size must be a positive integer, got {batch_size!r}")
    dataset = data.dataset if isinstance(data, Data) else data
    pair = _tensor_pair(dataset)
    if pair is not None:
        return _tensor_batches(pair[0], pair[1], batch_size, shuffle, seed, device)
    return _loader_batches(dataset, batch_size, shuffle, seed, device)


def _tensor_batches(
    x: Tensor, y: Tensor, batch_size: int, shuffle: bool, seed: int, device: torch.device | str | None
) -> Iterator[tuple[Tensor, Tensor]]:
    n = x.shape[0]
    y = y.long()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
        else:
            sel = order[start : start + batch_size]
            xb, yb = x[sel], y[sel]
        if device is not None:
            xb, yb = xb.to(device), yb.to(device)
        yield xb, yb


def _loader_batches(
    dataset: Dataset, batch_size: int, shuffle: bool, seed: int, device: torch.device | str | None
) -> Iterator[tuple[Tensor, Tensor]]:
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        num_workers=0,
    )
    for batch in loader:
        xb, yb = batch[0], torch.as_tensor(batch[1]).long()
        if device is not None:
            xb, yb = xb.to(device), yb.to(device)
        yield xb, yb


def from_tensors(x: Tensor | np.ndarray, y: Tensor | np.ndarray, ref: DataRef | None = None) -> Data:
    """Wrap in-memory tensors (``x`` float, ``y`` integer labels, same first dimension)."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    if not x.is_floating_point():
        raise DataError(f"inputs x must be a floating point tensor, got {x.dtype}")
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise DataError(f"labels y must be an integer tensor, got {y.dtype}")
    if x.ndim < 1 or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataError(
            f"x and y must hold the same number of items (x {tuple(x.shape)}, y {tuple(y.shape)}; y must be 1-D)"
        )
    y = y.long()
    if y.numel() and int(y.min()) < 0:
        raise DataError("labels y cannot be negative")
    return Data(TensorDataset(x, y), y, ref)


def from_dataset(dataset: Dataset, ref: DataRef | None = None) -> Data:
    """Wrap any map-style Dataset; labels come from ``.targets`` (or subsets of it), else one pass over items."""
    pair = _tensor_pair(dataset)
    if pair is not None:
        return from_tensors(pair[0], pair[1], ref)
    return Data(dataset, _targets_of(dataset), ref)


def _targets_of(dataset: Dataset) -> Tensor:
    if isinstance(dataset, Subset):
        return _targets_of(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    if isinstance(dataset, ConcatDataset):
        return torch.cat([_targets_of(d) for d in dataset.datasets])
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) >= 2:
        return dataset.tensors[1].reshape(-1).long()
    targets = getattr(dataset, "targets", None)
    n = len(dataset)  # type: ignore[arg-type]
    if targets is not None:
        t = torch.as_tensor(np.asarray(targets) if not isinstance(targets, Tensor) else targets)
        if t.numel() == n:
            return t.reshape(-1).long()
    # No label array to read: this loads every item once.
    return torch.tensor([int(dataset[i][1]) for i in range(n)], dtype=torch.long)


# --------------------------------------------------------------------------- resolving


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    # Cached arrays are shared by every caller; make accidental in-place edits fail loudly.
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


@functools.lru_cache(maxsize=None)
def _digits_split(split: str | None) -> np.ndarray:
    """Sorted positions in the full digits set for ``split`` (None: all).

    Uses numpy's legacy RandomState, whose stream numpy keeps stable across releases, so the
    split (and hence recorded fingerprints) does not drift with library upgrades.
    """
    _, y = _digits_arrays()
    if split is None:
        return np.arange(len(y), dtype=np.int64)
    rs = np.random.RandomState(_DIGITS_SPLIT_SEED)
    test: list[np.ndarray] = []
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        n_test = int(round(len(members) * _DIGITS_TEST_FRACTION))
        test.append(rs.permutation(members)[:n_test])
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    if split == "test":
        return test_idx
    return np.setdiff1d(np.arange(len(y), dtype=np.int64), test_idx)


def _load_digits(split: str | None, ref: DataRef) -> Data:
    x, y = _digits_arrays()
    idx = _digits_split(split)
    # Fancy indexing copies, so callers get writable tensors independent of the cache.
    return Data(TensorDataset(torch.from_numpy(x[idx]), torch.from_numpy(y[idx])), torch.from_numpy(y[idx]), ref)


def _load_safetensors(path: str, ref: DataRef) -> Data:
    if not os.path.isfile(path):
        raise DataError(f"data reference {ref.source}: file not found")
    try:
        tensors = load_file(path)
    except Exception as e:  # safetensors raises several types for corrupt headers/truncation
        raise DataError(f"data reference {ref.source}: not a readable safetensors file ({_first_line(e)})") from None
    missing = [k for k in ("x", "y") if k not in tensors]
    if missing:
        raise DataError(
            f"data reference {ref.source}: missing tensor(s) {', '.join(missing)} "
            f"(found {', '.join(sorted(tensors)) or 'none'})"
        )
    try:
        return from_tensors(tensors["x"], tensors["y"], ref)
    except DataError as e:
        raise DataError(f"data reference {ref.source}: {e}") from None


def _load_torchvision(source: str, ref: DataRef) -> Data:
    _, name, rest = source.split(":", 2)
    root, _, split = rest.rpartition(":")
    if not os.path.isdir(root):
        raise DataError(f"data reference {source}: root directory {root} not found")
    import torchvision.datasets as tvd
    from torchvision.transforms import ToTensor

    cls = getattr(tvd, name)
    try:
        dataset = cls(root=root, train=(split == "train"), download=False, transform=ToTensor())
    except Exception as e:  # missing/corrupt files surface as RuntimeError, AssertionError, ValueError...
        raise DataError(f"data reference {source}: cannot load {name} from {root} ({_first_line(e)})") from None
    return Data(dataset, _targets_of(dataset), ref)


def _load_imagefolder(directory: str, ref: DataRef) -> Data:
    if not os.path.isdir(directory):
        raise DataError(f"data reference {ref.source}: directory not found")
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import ToTensor

    try:
        dataset = ImageFolder(directory, transform=ToTensor())
    except Exception as e:  # no class folders / no images raise FileNotFoundError
        raise DataError(f"data reference {ref.source}: not a usable image folder ({_first_line(e)})") from None
    return Data(dataset, _targets_of(dataset), ref)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _load_source(ref: DataRef) -> Data:
    source = ref.source
    base = DataRef(source)
    if source.startswith("sklearn:"):
        _, _, query = source.partition("?split=")
        return _load_digits(query or None, base)
    if source.startswith("torchvision:"):
        return _load_torchvision(source, base)
    if source.startswith("imagefolder:"):
        return _load_imagefolder(source[len("imagefolder:") :], base)
    return _load_safetensors(source, base)


def _load_indices(ref: DataRef) -> np.ndarray:
    path = ref.subset
    assert path is not None
    if not os.path.isfile(path):
        raise DataError(f"data reference {ref}: subset file {path} not found")
    try:
        if path.lower().endswith(".npy"):
            arr = np.load(path, allow_pickle=False)
        else:
            from safetensors.numpy import load_file

            tensors = load_file(path)
            if "indices" not in tensors:
                raise DataError(
                    f"data reference {ref}: subset file {path} has no tensor 'indices' "
                    f"(found {', '.join(sorted(tensors)) or 'none'})"
                )
            arr = tensors["indices"]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"data reference {ref}: cannot read subset file {path} ({_first_line(e)})") from None
    if not isinstance(arr, np.ndarray) or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        shape = getattr(arr, "shape", "?")
        dtype = getattr(arr, "dtype", type(arr).__name__)
        raise DataError(
            f"data reference {ref}: subset file {path} must hold a 1-D integer index array (got {dtype} {shape})"
        )
    return arr.astype(np.int64, copy=False)


def read_indices(path: str | os.PathLike[str]) -> np.ndarray:
    """An int64 index file (``.npy``, or a safetensors tensor ``indices``), as written by :func:`save_subset`."""
    text = _canonical_subset(os.fspath(path))
    return _load_indices(DataRef(f"indices:{text}", subset=text))


def source_positions(ref: DataRef | str) -> tuple[Data, np.ndarray]:
    """The whole source a reference narrows, and for each item of ``resolve(ref)`` (in order)
    its index in that source: ``subset`` indices, then the ``only_labels`` filter.

    Two nodes trained on parts of one dataset are compared through these indices.
    """
    ref = parse_ref(ref) if isinstance(ref, str) else ref
    base = _load_source(ref)
    if ref.subset is not None:
        idx = _as_index_tensor(_load_indices(ref), len(base), f"data reference {ref}: subset file {ref.subset}")
    else:
        idx = torch.arange(len(base))
    if ref.only_labels is not None:
        idx = idx[torch.isin(base.targets[idx], torch.tensor(ref.only_labels, dtype=torch.long))]
    return base, idx.numpy().astype(np.int64, copy=False)


def resolve(ref: DataRef | str) -> Data:
    """Load the data a reference names: the source, then ``subset`` indices, then ``only_labels``."""
    if isinstance(ref, str):
        ref = parse_ref(ref)
    else:
        # Re-validate hand-built DataRefs so a bad source never falls through to the file loader.
        ref = parse_ref(ref.source, subset=ref.subset, only_labels=ref.only_labels)
    data = _load_source(ref)
    if ref.subset is not None:
        indices = _load_indices(ref)
        try:
            idx = _as_index_tensor(indices, len(data), f"data reference {ref}: subset file {ref.subset}")
        except DataError as e:
            raise DataError(str(e)) from None
        data = data.select(idx)
    if ref.only_labels is not None:
        data = data.filter_labels(keep=ref.only_labels)
        if len(data) == 0:
            raise DataError(f"data reference {ref}: no items have label(s) {format_labels(ref.only_labels)}")
    data.ref = ref
    return data


def save_subset(path: str | os.PathLike[str], indices: Sequence[int] | np.ndarray | Tensor) -> str:
    """Write an int64 index file usable as ``subset=`` (``.npy``, or ``.safetensors`` tensor ``indices``).

    Returns the absolute path.
    """
    out = _canonical_subset(os.fspath(path))
    arr = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"subset indices for {out} must be a 1-D integer array (got {arr.dtype} {arr.shape})")
    arr = np.ascontiguousarray(arr.astype(np.int64))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    if out.lower().endswith(".npy"):
        np.save(out, arr, allow_pickle=False)
    else:
        from safetensors.numpy import save_file

        save_file({"indices": arr}, out)
    return out


# --------------------------------------------------------------------------- fingerprints


def _hash_tensor(h: Any, t: Tensor) -> None:
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        # A uint8 view covers every dtype (incl. bfloat16, which numpy lacks) without a copy.
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))


def _hash_structure(h: Any, dataset: Dataset) -> None:
    if isinstance(dataset, TensorDataset):
        h.update(b"tensors")
        for t in dataset.tensors:
            _hash_tensor(h, t)
    elif isinstance(dataset, Subset):
        h.update(b"subset")
        _hash_tensor(h, torch.as_tensor(list(dataset.indices), dtype=torch.long))
        _hash_structure(h, dataset.dataset)
    elif isinstance(dataset, ConcatDataset):
        h.update(f"concat{len(dataset.datasets)}".encode())
        for d in dataset.datasets:
            _hash_structure(h, d)
    else:
        h.update(type(dataset).__name__.encode())
        classes = getattr(dataset, "classes", None)
        if classes is not None:
            h.update(repr(list(classes)).encode())


def _source_dir(ref: DataRef, data: Data) -> str | None:
    """The directory whose files back a torchvision/imagefolder reference."""
    if ref.source.startswith("imagefolder:"):
        return ref.source[len("imagefolder:") :]
    if ref.source.startswith("torchvision:"):
        base = data.dataset
        while isinstance(base, Subset):
            base = base.dataset
        raw = getattr(base, "raw_folder", None)  # MNIST family
        if raw is not None:
            return os.fspath(raw)
        folder = getattr(base, "base_folder", None)  # CIFAR family
        root = getattr(base, "root", None)
        if folder is not None and root is not None:
            return os.path.join(os.fspath(root), folder)
    return None


def _hash_listing(h: Any, directory: str) -> None:
    entries: list[tuple[str, int]] = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        for name in filenames:
            full = os.path.join(dirpath, name)
            try:
                size = os.path.getsize(full)
            except OSError:
                continue
            entries.append((os.path.relpath(full, directory).replace(os.sep, "/"), size))
    entries.sort()
    h.update(f"listing{len(entries)}".encode())
    for rel, size in entries:
        h.update(f"{rel}\0{size}\n".encode())


def fingerprint(data: Data) -> str:
    """sha256 hex of what the data is: tensor bytes for tensor-backed data; otherwise the item
    count, labels, subset indices and (for file-backed references) a listing of file paths and sizes.

    Stable across processes for the same resolved reference; cheap enough to run at every use.
    """
    h = hashlib.sha256(_FINGERPRINT_VERSION)
    h.update(f"n{len(data)}".encode())
    _hash_tensor(h, data.targets)
    _hash_structure(h, data.dataset)
    if data.ref is not None and _tensor_pair(data.dataset) is None:
        directory = _source_dir(data.ref, data)
        if directory is not None and os.path.isdir(directory):
            _hash_listing(h, directory)
    return h.hexdigest()


def verify(ref: DataRef | str, expected_fingerprint: str) -> Data:
    """Resolve ``ref`` and check it still matches the fingerprint recorded with it."""
    data = resolve(ref)
    actual = fingerprint(data)
    if actual != expected_fingerprint:
        raise DataError(
            f"data reference {data.ref} changed since it was recorded "
            f"(fingerprint {expected_fingerprint[:12]}, now {actual[:12]})"
        )
    return data


# --------------------------------------------------------------------------- FL helper


def digits_client_split(
    n_clients: int,
    *,
    split: str | None = "train",
    seed: int = 0,
    alpha: float | None = None,
) -> list[np.ndarray]:
    """Partition ``sklearn:digits?split=SPLIT`` (whole set when None) among ``n_clients``.

    Returns sorted int64 positions into that resolved data (usable as subset files). IID when
    ``alpha`` is None; otherwise per-label Dirichlet(alpha) shares, so small alpha gives strong
    label skew. Every client gets at least one item.
    """
    if split is not None and split not in SPLITS:
        raise DataError(f"split must be train, test or None, got {split!r}")
    y = _digits_arrays()[1][_digits_split(split)]
    n = len(y)
    if isinstance(n_clients, bool) or not isinstance(n_clients, int) or not 1 <= n_clients <= n:
        raise DataError(f"number of clients must be between 1 and {n}, got {n_clients!r}")
    rs = np.random.RandomState(seed)
    if alpha is None:
        return [np.sort(part).astype(np.int64) for part in np.array_split(rs.permutation(n), n_clients)]
    if not alpha > 0:
        raise DataError(f"Dirichlet alpha must be positive, got {alpha!r}")
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for label in np.unique(y):
            members = rs.permutation(np.flatnonzero(y == label))
            shares = rs.dirichlet(np.full(n_clients, float(alpha)))
            if not np.all(np.isfinite(shares)):
                # Tiny alpha can underflow every gamma draw; the limit is one client taking all.
                shares = np.eye(n_clients)[rs.randint(n_clients)]
            cuts = (np.cumsum(shares)[:-1] * len(members)).astype(int)
            for k, chunk in enumerate(np.split(members, cuts)):
                parts[k].append(chunk)
        out = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if all(len(p) for p in out):
            return out
    raise DataError(
        f"could not give each of {n_clients} clients at least one item with alpha={alpha}; "
        "use fewer clients or a larger alpha"
    )
