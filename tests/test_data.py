"""Tests for umig.data: references, resolving, subsets, label filters, fingerprints, batching."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.numpy import save_file as save_np
from safetensors.torch import save_file as save_torch
from torch.utils.data import ConcatDataset, Dataset, Subset, TensorDataset

import umig.data as D
from umig.data import Data, DataRef, parse_labels, parse_ref, resolve
from umig.errors import DataError, UmigError

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def tensor_file(tmp_path: Path) -> Path:
    """20 items, labels 0..4 four times each; x[i] is filled with i so items are identifiable."""
    x = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    y = torch.arange(20, dtype=torch.int64) % 5
    path = tmp_path / "toy.safetensors"
    save_torch({"x": x, "y": y}, str(path))
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    """A tiny ImageFolder: 3 classes with 2, 3 and 1 PNGs of 4x4 pixels."""
    root = tmp_path / "imgs"
    rng = np.random.RandomState(0)
    for cls, count in (("cat", 2), ("dog", 3), ("emu", 1)):
        (root / cls).mkdir(parents=True)
        for i in range(count):
            pixels = rng.randint(0, 256, size=(4, 4, 3), dtype=np.uint8)
            Image.fromarray(pixels, mode="RGB").save(root / cls / f"{i}.png")
    return root


def _write_idx(path: Path, arr: np.ndarray) -> None:
    """Write an MNIST-format (big-endian idx) ubyte file."""
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(header + arr.astype(np.uint8).tobytes())


@pytest.fixture
def mnist_root(tmp_path: Path) -> Path:
    """A synthetic MNIST root in torchvision's on-disk layout (6 train, 4 test images)."""
    root = tmp_path / "tv"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.RandomState(1)
    for prefix, n in (("train", 6), ("t10k", 4)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.randint(0, 256, size=(n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 3)
    return root


# --------------------------------------------------------------------------- parsing


def test_parse_labels_ranges_sorted_unique() -> None:
    assert parse_labels("0-4,7") == (0, 1, 2, 3, 4, 7)
    assert parse_labels(" 7, 3,3 ,2 - 3") == (2, 3, 7)
    assert parse_labels("5") == (5,)
    assert D.format_labels((0, 1, 2, 3, 4, 7)) == "0-4,7"
    assert D.format_labels([9, 1, 0]) == "0,1,9"


@pytest.mark.parametrize("text", ["", "a", "1,,2", "4-2", "-1", "1-", "1.5", "0-4;7"])
def test_parse_labels_bad_text(text: str) -> None:
    with pytest.raises(DataError) as exc:
        parse_labels(text)
    assert repr(text) in str(exc.value)


def test_parse_ref_canonicalises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_ref("data/a.safetensors").source == str(tmp_path / "data" / "a.safetensors")
    assert parse_ref("sklearn:digits").source == "sklearn:digits"
    assert parse_ref("SKLEARN:Digits?split=TEST").source == "sklearn:digits?split=test"
    assert parse_ref("torchvision:mnist:tv").source == f"torchvision:MNIST:{tmp_path / 'tv'}:train"
    assert parse_ref("torchvision:FashionMNIST:tv:test").source == f"torchvision:FashionMNIST:{tmp_path / 'tv'}:test"
    assert parse_ref("imagefolder:imgs").source == f"imagefolder:{tmp_path / 'imgs'}"
    r = parse_ref("sklearn:digits", subset="idx.npy", only_labels=[7, 0, 1, 2, 3, 4, 4])
    assert r.subset == str(tmp_path / "idx.npy")
    assert r.only_labels == (0, 1, 2, 3, 4, 7)


def test_ref_json_and_str_round_trip(tmp_path: Path) -> None:
    r = parse_ref("sklearn:digits?split=train", subset=str(tmp_path / "idx.npy"), only_labels="0-4,7")
    assert str(r) == f"sklearn:digits?split=train[subset={tmp_path / 'idx.npy'}][labels=0-4,7]"
    assert parse_ref(str(r)) == r
    assert DataRef.from_json(r.to_json()) == r
    plain = parse_ref("sklearn:digits")
    assert str(plain) == "sklearn:digits"
    assert plain.to_json() == {"source": "sklearn:digits", "subset": None, "only_labels": None}
    assert DataRef.from_json(plain.to_json()) == plain


@pytest.mark.parametrize(
    "ref, needle",
    [
        ("foo:bar", "unknown scheme 'foo'"),
        ("sklearn:iris", "unknown sklearn dataset 'iris'"),
        ("sklearn:digits?split=val", "split must be train or test"),
        ("sklearn:digits?shuffle=1", "unknown option"),
        ("torchvision:SVHN:/data", "unknown torchvision dataset"),
        ("torchvision:MNIST", "expected torchvision:MNIST:ROOT"),
        ("imagefolder:", "needs a directory"),
        ("data.npz", "not recognised"),
        ("", "empty data reference"),
    ],
)
def test_parse_ref_bad_input(ref: str, needle: str) -> None:
    with pytest.raises(DataError) as exc:
        parse_ref(ref)
    assert needle in str(exc.value)
    assert "\n" not in str(exc.value)


def test_bad_subset_suffix_and_labels_rejected() -> None:
    with pytest.raises(DataError, match="must be a .npy or .safetensors"):
        parse_ref("sklearn:digits", subset="idx.txt")
    with pytest.raises(DataError, match="empty label list"):
        parse_ref("sklearn:digits", only_labels=[])
    with pytest.raises(DataError, match="bad label list"):
        parse_ref("sklearn:digits", only_labels="zero")
    with pytest.raises(DataError, match="given twice"):
        parse_ref("sklearn:digits[labels=1]", only_labels="2")
    with pytest.raises(DataError, match="bad stored data reference"):
        DataRef.from_json({"source": "sklearn:digits", "extra": 1})
    assert issubclass(DataError, UmigError)


# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_disjoint_stratified() -> None:
    full = resolve("sklearn:digits")
    train = resolve("sklearn:digits?split=train")
    test = resolve("sklearn:digits?split=test")
    assert len(full) == 1797
    assert len(train) + len(test) == len(full)
    assert abs(len(test) - 0.25 * len(full)) <= 10

    train_idx, test_idx = D._digits_split("train"), D._digits_split("test")
    assert np.intersect1d(train_idx, test_idx).size == 0
    assert np.array_equal(np.union1d(train_idx, test_idx), np.arange(1797))
    # Stratified: every class has (rounded) a quarter of its items in test.
    full_counts, test_counts = full.label_counts(), test.label_counts()
    for label, n in full_counts.items():
        assert abs(test_counts[label] - 0.25 * n) <= 1, label

    x, y = train.dataset.tensors
    assert x.shape == (len(train), 1, 8, 8) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.max()) == 1.0
    # Items really are the full set's items at those positions.
    assert torch.equal(x, full.dataset.tensors[0][torch.from_numpy(train_idx)])


def test_digits_cache_does_not_leak_mutations() -> None:
    a = resolve("sklearn:digits?split=test")
    before = D.fingerprint(a)
    a.dataset.tensors[0].mul_(0)
    assert D.fingerprint(resolve("sklearn:digits?split=test")) == before


def test_fingerprint_stable_across_processes() -> None:
    here = D.fingerprint(resolve("sklearn:digits?split=train[labels=0-4]"))
    code = "import umig.data as D; print(D.fingerprint(D.resolve('sklearn:digits?split=train[labels=0-4]')))"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True, timeout=300
    ).stdout.strip()
    assert out == here
    assert len(here) == 64


def test_digits_client_split_iid_and_dirichlet() -> None:
    n = len(resolve("sklearn:digits?split=train"))
    iid = D.digits_client_split(4, seed=3)
    assert len(iid) == 4
    assert sorted(len(p) for p in iid) in ([n // 4] * 4, sorted([n // 4] * (4 - n % 4) + [n // 4 + 1] * (n % 4)))
    assert np.array_equal(np.sort(np.concatenate(iid)), np.arange(n))
    assert all(p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in iid)

    skew = D.digits_client_split(5, alpha=0.1, seed=1)
    assert np.array_equal(np.sort(np.concatenate(skew)), np.arange(n))
    assert all(len(p) > 0 for p in skew)
    again = D.digits_client_split(5, alpha=0.1, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(skew, again))
    train = resolve("sklearn:digits?split=train")
    # With alpha=0.1 at least one client is dominated by few labels (IID would give ~10% each).
    top_share = max(max(train.select(p).label_counts().values()) / len(p) for p in skew)
    assert top_share > 0.3
    with pytest.raises(DataError):
        D.digits_client_split(0)
    with pytest.raises(DataError):
        D.digits_client_split(2, alpha=0.0)


# --------------------------------------------------------------------------- safetensors, subset, labels


def test_safetensors_resolve(tensor_file: Path) -> None:
    data = resolve(str(tensor_file))
    assert len(data) == 20
    assert data.ref == parse_ref(str(tensor_file))
    assert data.label_counts() == {k: 4 for k in range(5)}
    assert data.labels() == set(range(5))


def test_subset_npy_and_safetensors(tensor_file: Path, tmp_path: Path) -> None:
    idx = np.array([3, 1, 17, 1], dtype=np.int64)
    np.save(tmp_path / "idx.npy", idx)
    save_np({"indices": idx}, str(tmp_path / "idx.safetensors"))
    for name in ("idx.npy", "idx.safetensors"):
        data = resolve(parse_ref(str(tensor_file), subset=str(tmp_path / name)))
        x, _ = data.dataset.tensors
        assert x[:, 0, 0, 0].tolist() == [3.0, 1.0, 17.0, 1.0]
        assert data.targets.tolist() == [3, 1, 2, 1]
        assert data.ref.subset == str(tmp_path / name)
    assert D.save_subset(tmp_path / "w.npy", [0, 2]) == str(tmp_path / "w.npy")
    assert np.load(tmp_path / "w.npy").tolist() == [0, 2]
    D.save_subset(tmp_path / "w.safetensors", torch.tensor([5]))
    assert resolve(parse_ref(str(tensor_file), subset=str(tmp_path / "w.safetensors"))).targets.tolist() == [0]


def test_only_labels_after_subset(tensor_file: Path, tmp_path: Path) -> None:
    data = resolve(parse_ref(str(tensor_file), only_labels="1,3"))
    assert data.label_counts() == {1: 4, 3: 4}
    # Order of the source is preserved.
    assert data.dataset.tensors[0][:, 0, 0, 0].tolist() == [1, 3, 6, 8, 11, 13, 16, 18]
    np.save(tmp_path / "first10.npy", np.arange(10))
    both = resolve(parse_ref(str(tensor_file), subset=str(tmp_path / "first10.npy"), only_labels=[1, 3]))
    assert both.dataset.tensors[0][:, 0, 0, 0].tolist() == [1, 3, 6, 8]
    with pytest.raises(DataError, match="no items have label"):
        resolve(parse_ref(str(tensor_file), only_labels="9"))


def test_fingerprint_stable_and_detects_change(tensor_file: Path) -> None:
    ref = parse_ref(str(tensor_file))
    fp = D.fingerprint(resolve(ref))
    assert fp == D.fingerprint(resolve(str(tensor_file)))
    assert D.verify(ref, fp).ref == ref
    assert D.fingerprint(resolve(parse_ref(str(tensor_file), only_labels="0"))) != fp

    x = torch.arange(20, dtype=torch.float32).reshape(20, 1, 1, 1).expand(20, 1, 2, 2).contiguous()
    x[7, 0, 1, 1] = -1.0
    save_torch({"x": x, "y": torch.arange(20) % 5}, str(tensor_file))
    assert D.fingerprint(resolve(ref)) != fp
    with pytest.raises(DataError, match="changed since it was recorded"):
        D.verify(ref, fp)


def test_bad_inputs_raise_data_error(tensor_file: Path, tmp_path: Path) -> None:
    def fails(ref: DataRef | str, needle: str) -> None:
        with pytest.raises(DataError) as exc:
            resolve(ref)
        assert needle in str(exc.value)
        assert "\n" not in str(exc.value)

    fails(str(tmp_path / "missing.safetensors"), "file not found")
    fails("nope:thing", "unknown scheme")
    fails(DataRef("sklearn:iris"), "unknown sklearn dataset")
    fails(f"imagefolder:{tmp_path / 'no_dir'}", "directory not found")
    fails(f"torchvision:CIFAR10:{tmp_path / 'no_root'}", "root directory")
    (tmp_path / "empty_root").mkdir()
    fails(f"torchvision:MNIST:{tmp_path / 'empty_root'}", "cannot load MNIST")

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    fails(str(tmp_path / "junk.safetensors"), "not a readable safetensors file")
    save_torch({"x": torch.zeros(2, 3)}, str(tmp_path / "nolabels.safetensors"))
    fails(str(tmp_path / "nolabels.safetensors"), "missing tensor(s) y")
    u8 = {"x": torch.zeros(2, 3, dtype=torch.uint8), "y": torch.zeros(2, dtype=torch.long)}
    save_torch(u8, str(tmp_path / "u8.safetensors"))
    fails(str(tmp_path / "u8.safetensors"), "floating point")
    save_torch({"x": torch.zeros(3, 2), "y": torch.zeros(2, dtype=torch.long)}, str(tmp_path / "len.safetensors"))
    fails(str(tmp_path / "len.safetensors"), "same number of items")

    src = str(tensor_file)
    np.save(tmp_path / "big.npy", np.array([0, 20]))
    fails(parse_ref(src, subset=str(tmp_path / "big.npy")), "index 20 out of range for 20 items")
    np.save(tmp_path / "neg.npy", np.array([-1]))
    fails(parse_ref(src, subset=str(tmp_path / "neg.npy")), "index -1 out of range")
    np.save(tmp_path / "float.npy", np.array([0.0, 1.0]))
    fails(parse_ref(src, subset=str(tmp_path / "float.npy")), "1-D integer index array")
    np.save(tmp_path / "2d.npy", np.zeros((2, 2), dtype=np.int64))
    fails(parse_ref(src, subset=str(tmp_path / "2d.npy")), "1-D integer index array")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    fails(parse_ref(src, subset=str(tmp_path / "obj.npy")), "cannot read subset file")
    fails(parse_ref(src, subset=str(tmp_path / "absent.npy")), "not found")
    save_np({"idx": np.arange(3)}, str(tmp_path / "wrongkey.safetensors"))
    fails(parse_ref(src, subset=str(tmp_path / "wrongkey.safetensors")), "no tensor 'indices'")


# --------------------------------------------------------------------------- Data operations


def test_fast_path_batches_in_order_without_dataloader(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.randn(23, 3)
    y = torch.arange(23) % 4
    data = D.from_tensors(x, y)

    def no_loader(*args: object, **kwargs: object) -> None:
        raise AssertionError("fast path must not build a DataLoader")

    monkeypatch.setattr(D, "DataLoader", no_loader)
    got = list(data.batches(batch_size=5))
    assert [len(b[1]) for b in got] == [5, 5, 5, 5, 3]
    assert torch.equal(torch.cat([b[0] for b in got]), x)
    assert torch.equal(torch.cat([b[1] for b in got]), y)
    assert all(b[1].dtype == torch.int64 for b in got)

    shuffled = list(data.batches(batch_size=5, shuffle=True, seed=7))
    xs = torch.cat([b[0] for b in shuffled])
    assert not torch.equal(xs, x)
    assert torch.equal(torch.sort(xs[:, 0]).values, torch.sort(x[:, 0]).values)
    again = torch.cat([b[0] for b in data.batches(batch_size=5, shuffle=True, seed=7)])
    assert torch.equal(xs, again)
    other = torch.cat([b[0] for b in data.batches(batch_size=5, shuffle=True, seed=8)])
    assert not torch.equal(xs, other)
    # The module-level function (the contract's entry point) takes a Data or a bare Dataset.
    assert len(list(D.batches(data.dataset, 10))) == 3
    with pytest.raises(DataError, match="batch size"):
        data.batches(batch_size=0)


def test_select_filter_and_split_by_labels(tensor_file: Path) -> None:
    data = resolve(str(tensor_file))
    picked = data.select([4, 0])
    assert picked.targets.tolist() == [4, 0] and picked.ref is None
    assert data.select(data.targets == 2).targets.tolist() == [2, 2, 2, 2]
    with pytest.raises(DataError, match="out of range"):
        data.select([20])

    forget, retain = data.split_by_labels([1, 4])
    assert forget.labels() == {1, 4} and len(forget) == 8
    assert retain.labels() == {0, 2, 3} and len(retain) == 12
    assert forget.ref.only_labels == (1, 4) and retain.ref.only_labels == (0, 2, 3)
    # The updated refs resolve to exactly the same data.
    assert D.fingerprint(resolve(forget.ref)) == D.fingerprint(forget)
    assert D.fingerprint(resolve(retain.ref)) == D.fingerprint(retain)

    both = data.filter_labels(keep=[0, 1, 2], drop=[1])
    assert both.labels() == {0, 2} and both.ref.only_labels == (0, 2)
    assert data.filter_labels() is data


def test_imagefolder(image_dir: Path) -> None:
    data = resolve(f"imagefolder:{image_dir}")
    assert data.dataset.class_to_idx == {"cat": 0, "dog": 1, "emu": 2}
    assert data.label_counts() == {0: 2, 1: 3, 2: 1}
    got = list(data.batches(batch_size=4))
    assert [b[0].shape for b in got] == [(4, 3, 4, 4), (2, 3, 4, 4)]
    assert torch.equal(torch.cat([b[1] for b in got]), data.targets)
    x0 = got[0][0][0]
    assert x0.dtype == torch.float32 and 0.0 <= float(x0.min()) and float(x0.max()) <= 1.0

    fp = D.fingerprint(data)
    assert fp == D.fingerprint(resolve(f"imagefolder:{image_dir}"))
    only_dog = resolve(parse_ref(f"imagefolder:{image_dir}", only_labels=[1]))
    assert isinstance(only_dog.dataset, Subset) and only_dog.targets.tolist() == [1, 1, 1]
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(image_dir / "emu" / "new.png")
    with pytest.raises(DataError, match="changed since it was recorded"):
        D.verify(f"imagefolder:{image_dir}", fp)


def test_imagefolder_without_images(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match="not a usable image folder"):
        resolve(f"imagefolder:{tmp_path / 'empty'}")


def test_torchvision_mnist_local(mnist_root: Path) -> None:
    train = resolve(f"torchvision:MNIST:{mnist_root}")
    test = resolve(f"torchvision:mnist:{mnist_root}:test")
    assert len(train) == 6 and len(test) == 4
    assert train.targets.tolist() == [0, 1, 2, 0, 1, 2]
    xb, yb = next(iter(test.batches(batch_size=10)))
    assert xb.shape == (4, 1, 28, 28) and xb.dtype == torch.float32
    assert yb.tolist() == [0, 1, 2, 0]
    fp = D.fingerprint(test)
    assert fp == D.fingerprint(resolve(f"torchvision:MNIST:{mnist_root}:test"))
    # Extra files in the dataset folder count as a change.
    (mnist_root / "MNIST" / "raw" / "extra.bin").write_bytes(b"x")
    assert D.fingerprint(resolve(f"torchvision:MNIST:{mnist_root}:test")) != fp


def test_concat(tensor_file: Path, image_dir: Path) -> None:
    a = resolve(parse_ref(str(tensor_file), only_labels="0"))
    b = resolve(parse_ref(str(tensor_file), only_labels="4"))
    both = Data.concat([a, b])
    assert isinstance(both.dataset, TensorDataset)  # stays on the fast path
    assert len(both) == 8 and both.label_counts() == {0: 4, 4: 4}
    assert torch.equal(torch.cat([y for _, y in both.batches(3)]), torch.cat([a.targets, b.targets]))
    assert both.ref is None
    assert Data.concat([a]) is a

    imgs = resolve(f"imagefolder:{image_dir}")
    tensors = D.from_tensors(torch.rand(2, 3, 4, 4), torch.tensor([5, 6]))
    mixed = Data.concat([imgs, tensors])
    assert isinstance(mixed.dataset, ConcatDataset)
    ys = torch.cat([y for _, y in mixed.batches(3)])
    assert ys.tolist() == imgs.targets.tolist() + [5, 6]
    with pytest.raises(DataError):
        Data.concat([])


class _NoTargets(Dataset):
    def __init__(self) -> None:
        self.reads = 0

    def __len__(self) -> int:
        return 5

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        self.reads += 1
        return torch.full((2,), float(i)), i % 2


def test_from_dataset_and_from_tensors() -> None:
    ds = _NoTargets()
    data = D.from_dataset(ds)
    assert data.targets.tolist() == [0, 1, 0, 1, 0] and ds.reads == 5

    base = TensorDataset(torch.rand(6, 2), torch.tensor([3, 1, 4, 1, 5, 9]))
    sub = D.from_dataset(Subset(base, [5, 0]))
    assert sub.targets.tolist() == [9, 3]
    assert isinstance(D.from_dataset(base).dataset, TensorDataset)

    with pytest.raises(DataError, match="same number of items"):
        D.from_tensors(torch.rand(3, 2), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="floating point"):
        D.from_tensors(torch.zeros(2, 2, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(DataError, match="integer"):
        D.from_tensors(torch.rand(2, 2), torch.tensor([0.0, 1.0]))
    assert "n=6" in repr(D.from_dataset(base))
