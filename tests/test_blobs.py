"""umig.blobs: the direct safetensors writer gives safetensors' own bytes; partial loads; shared writers."""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load as st_load

from umig.blobs import BlobStore, BufferedBlobStore, _serialise_direct, _serialise_safetensors, serialise

DTYPES = [torch.int64, torch.float64, torch.float32, torch.int32, torch.float16, torch.int16, torch.int8,
          torch.uint8, torch.bool]


def test_direct_writer_matches_safetensors_byte_for_byte():
    rng = random.Random(0)
    names = ["a", "b", "fc.weight", "fc.bias", "z", "x.y", "classes", "weight", "é", "A", "_"]
    compared = 0
    for _ in range(1500):
        tensors = {}
        for _ in range(rng.randint(1, 6)):
            shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
            tensors[rng.choice(names) + str(rng.randint(0, 3))] = (torch.rand(shape) * 10).to(rng.choice(DTYPES))
        meta = rng.choice([None, {}, {"part": "head"}, {"node": "fl/r1/c0", "é": "ü"}])
        direct = _serialise_direct(tensors, meta)
        assert direct == _serialise_safetensors(tensors, meta)
        back = st_load(direct)
        assert all(torch.equal(back[k], v) for k, v in tensors.items())
        compared += 1
    assert compared == 1500


def test_direct_writer_leaves_other_inputs_to_safetensors():
    assert _serialise_direct({"w": torch.zeros(2, dtype=torch.bfloat16)}, None) is None
    base = torch.zeros(4)
    assert _serialise_direct({"a": base, "b": base}, None) is None  # shared memory: safetensors refuses it
    with pytest.raises(RuntimeError, match="share memory"):
        serialise({"a": base, "b": base})
    assert _serialise_direct({"a": torch.zeros(1)}, {"k": 1}) is None  # type: ignore[dict-item]
    bf = serialise({"w": torch.ones(3, dtype=torch.bfloat16)}, {"part": "head"})
    assert torch.equal(st_load(bf)["w"], torch.ones(3, dtype=torch.bfloat16))


def test_load_parts_reads_only_the_named_tensors_and_checks_the_hash(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    blobs.ensure()
    tensors = {"weight": torch.randn(3, 4), "bias": torch.randn(3), "classes": torch.arange(3),
               "label_weight": torch.randn(3, 3, 4), "half": torch.ones(2, dtype=torch.bfloat16)}
    digest, _ = blobs.put_tensors(tensors, {"kind": "empirical"})
    got, meta = blobs.load_parts(digest, ("weight", "bias", "classes", "missing"))
    assert set(got) == {"weight", "bias", "classes"} and meta == {"kind": "empirical"}
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in got)
    got["weight"][0, 0] = 1e6  # a copy: writable, and the blob is unchanged
    half, _ = blobs.load_parts(digest, ("half",))
    assert torch.equal(half["half"], tensors["half"])
    path = blobs.path(digest)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception, match="corrupted"):
        blobs.load_parts(digest, ("weight",))


def test_buffered_stores_share_one_writer_pool(tmp_path):
    a, b = BufferedBlobStore(tmp_path / "a"), BufferedBlobStore(tmp_path / "b")
    a.ensure()
    b.ensure()
    da = a.put_deferred({"x": torch.ones(2)})
    db = b.put_deferred({"x": torch.zeros(2)})
    assert a._pool is b._pool and a._pool is not None
    assert [d for _, d in a.flush()] == [da] and [d for _, d in b.flush()] == [db]
    a.close()
    # Closing one store leaves the process's writers to the others.
    dc = b.put_deferred({"x": torch.full((2,), 3.0)})
    assert [d for _, d in b.flush()] == [dc] and BlobStore(tmp_path / "b").exists(dc)
    b.close()
