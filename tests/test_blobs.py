"""umig.blobs: the direct safetensors writer gives safetensors' own bytes; every store operation against a
local directory and an S3 bucket (a moto server); partial loads; shared writers."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load as st_load

from umig.blobs import (
    BlobStore,
    BufferedBlobStore,
    _serialise_direct,
    _serialise_safetensors,
    blobs_url,
    open_blobs,
    serialise,
    serialise_arrays,
)
from umig.errors import IntegrityError, NotFoundError

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


# ------------------------------------------------ every test below: local and S3
@pytest.fixture(params=["local", "s3"])
def blob_store(request, tmp_path):
    """A blob store opened from its location, as workers open it: a directory, or a bucket of the test
    S3 server (skipped without moto/s3fs)."""
    where = tmp_path / "blobs" if request.param == "local" else request.getfixturevalue("s3_url")
    store = open_blobs(where)
    store.ensure()
    yield store
    store.close()


def overwrite(store, digest: str, data: bytes) -> None:
    """Replace a stored blob's bytes behind the store's back (disk corruption, a bad upload)."""
    if isinstance(store, BlobStore):
        store.path(digest).write_bytes(data)
    else:
        import boto3

        boto3.client("s3").put_object(Bucket=store.bucket, Key=store._key(digest), Body=data)


def leave_partial(store) -> int:
    """What an interrupted write leaves behind; returns its bytes."""
    if isinstance(store, BlobStore):
        (store.tmp / "0123.abcd.part").write_bytes(b"x" * 100)
        return 100
    import boto3

    s3 = boto3.client("s3")
    key = store._key("ab" * 32)
    up = s3.create_multipart_upload(Bucket=store.bucket, Key=key)
    s3.upload_part(Bucket=store.bucket, Key=key, UploadId=up["UploadId"], PartNumber=1, Body=b"y" * 300)
    return 300


def test_blobs_round_trip_dedup_and_reopen_from_the_url(blob_store):
    tensors = {"w": torch.randn(3, 4), "b": torch.arange(3)}
    digest, created = blob_store.put_tensors(tensors, {"node": "a"})
    assert created and blob_store.exists(digest)
    assert blob_store.put_tensors(tensors, {"node": "a"}) == (digest, False)  # same bytes, same blob
    assert blob_store.put_bytes(serialise(tensors, {"node": "a"})) == (digest, False)
    loaded, meta = blob_store.load_with_metadata(digest)
    assert meta == {"node": "a"} and all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert blob_store.metadata(digest) == {"node": "a"}
    assert blob_store.size(digest) == len(serialise(tensors, {"node": "a"}))
    assert blob_store.url == blobs_url(blob_store.url)  # canonical: absolute directory or s3://bucket/prefix
    again = open_blobs(blob_store.url)  # what a worker does, from the URL alone
    assert torch.equal(again.load(digest)["w"], tensors["w"]) and again.all_digests() == {digest}


def test_blobs_corruption_and_missing_blobs_are_clear_errors(blob_store):
    digest, _ = blob_store.put_tensors({"x": torch.ones(5)})
    other = serialise({"x": torch.zeros(5)})
    overwrite(blob_store, digest, other)
    with pytest.raises(IntegrityError, match=f"blob {digest[:12]} of node 'n1' is corrupted"):
        blob_store.load(digest, owner="n1")
    with pytest.raises(IntegrityError, match=digest[:12]):
        blob_store.load_parts(digest, ("x",))
    absent = hashlib.sha256(b"never written").hexdigest()
    assert not blob_store.exists(absent)
    with pytest.raises(NotFoundError, match=f"blob {absent[:12]} of node 'n2' is missing"):
        blob_store.read_bytes(absent, owner="n2")


def test_blobs_delete_and_list(blob_store):
    digests = [blob_store.put_tensors({"i": torch.tensor([i])})[0] for i in range(3)]
    sizes = [blob_store.size(d) for d in digests]
    assert blob_store.all_digests() == set(digests)
    absent = hashlib.sha256(b"absent").hexdigest()
    assert blob_store.delete([digests[0], digests[1], absent]) == sizes[0] + sizes[1]
    assert blob_store.all_digests() == {digests[2]} and not blob_store.exists(digests[0])
    assert blob_store.delete([]) == 0
    many = [blob_store.put_deferred({"j": torch.tensor([j])}) for j in range(70)]  # S3: one listing, not 70 HEADs
    blob_store.flush()
    assert blob_store.delete(many) > 0 and blob_store.all_digests() == {digests[2]}


def test_blobs_deferred_writes_are_readable_at_once_and_stored_by_flush(blob_store):
    digests = [blob_store.put_deferred({"x": torch.arange(i + 1.0)}, {"i": str(i)}, tag=i) for i in range(20)]
    assert all(blob_store.exists(d) for d in digests)
    assert torch.equal(blob_store.load(digests[5])["x"], torch.arange(6.0))  # served while its write may be pending
    assert sorted(blob_store.flush()) == sorted(enumerate(digests))
    other = open_blobs(blob_store.url)
    assert other.all_digests() == set(digests) and other.load_with_metadata(digests[7])[1] == {"i": "7"}
    assert blob_store.flush() == []
    assert blob_store.put_deferred({"x": torch.arange(1.0)}, {"i": "0"}) == digests[0] and blob_store.flush() == []


def test_blobs_grouped_writes_wait_for_the_block_then_go_as_one_task(blob_store):
    with blob_store.grouped():
        digests = [blob_store.put_deferred({"x": torch.arange(i + 1.0)}, tag=i) for i in range(3)]
        with blob_store.grouped():  # nested: joins the outer group
            digests.append(blob_store.put_deferred({"x": torch.arange(9.0)}, tag=3))
        assert not blob_store._queue  # nothing handed to a writer yet...
        assert torch.equal(blob_store.load(digests[1])["x"], torch.arange(2.0))  # ...but readable
    assert len({id(fut) for fut, *_ in blob_store._queue}) == 1 and len(blob_store._queue) == 4
    blob_store._queue[0][0].result()
    assert not blob_store._unsynced  # the group synced its directories itself, before the flush
    assert sorted(blob_store.flush()) == sorted(enumerate(digests))
    assert open_blobs(blob_store.url).all_digests() >= set(digests)


def test_blobs_grouped_write_error_surfaces_at_flush_with_the_others_written(tmp_path):
    b = BufferedBlobStore(tmp_path / "blobs")
    b.ensure()
    real = b._write

    def failing(digest, data):
        if data == bad:
            raise OSError("disk full")
        return real(digest, data)

    bad = serialise({"x": torch.ones(2)})
    b._write = failing  # type: ignore[method-assign]
    with pytest.raises(RuntimeError), b.grouped():  # an error inside the block still hands its writes over
        good = [b.put_deferred({"x": torch.zeros(2)}), b.put_deferred({"x": torch.ones(2)}),
                b.put_deferred({"x": torch.full((2,), 2.0)})]
        raise RuntimeError("insert failed")
    with pytest.raises(OSError, match="disk full") as err:
        b.flush()
    assert sorted(err.value.created_blobs) == sorted([good[0], good[2]])
    assert BlobStore(tmp_path / "blobs").all_digests() == {good[0], good[2]}
    b.close()


def test_blobs_group_leaves_a_directory_written_again_meanwhile_to_the_flush(tmp_path):
    b = BufferedBlobStore(tmp_path / "blobs")
    b.ensure()
    synced, real_sync = [], b._sync

    def sync(key):  # another writer renames a blob into the same directory while the group syncs it
        with b._lock:
            b._tick += 1
            b._unsynced[key] = b._tick
        synced.append(key)
        real_sync(key)

    b._sync = sync  # type: ignore[method-assign]
    with b.grouped():
        d = b.put_deferred({"x": torch.ones(3)})
    b._queue[0][0].result()
    key = b._sync_key(d)
    assert synced == [key] and key in b._unsynced  # not counted as synced: the flush syncs it
    b._sync = real_sync  # type: ignore[method-assign]
    assert [x for _, x in b.flush()] == [d] and not b._unsynced
    b.close()


def test_blobs_remove_what_interrupted_writes_left(blob_store):
    blob_store.put_tensors({"kept": torch.ones(2)})
    left = leave_partial(blob_store)
    assert blob_store.remove_partial() == left
    assert blob_store.remove_partial() == 0 and len(blob_store.all_digests()) == 1


def test_load_parts_reads_only_the_named_tensors_and_checks_the_hash(blob_store):
    blobs = blob_store
    tensors = {"weight": torch.randn(3, 4), "bias": torch.randn(3), "classes": torch.arange(3),
               "label_weight": torch.randn(3, 3, 4), "half": torch.ones(2, dtype=torch.bfloat16)}
    digest, _ = blobs.put_tensors(tensors, {"kind": "empirical"})
    got, meta = blobs.load_parts(digest, ("weight", "bias", "classes", "missing"))
    assert set(got) == {"weight", "bias", "classes"} and meta == {"kind": "empirical"}
    assert all(torch.equal(got[k], tensors[k]) and got[k].dtype == tensors[k].dtype for k in got)
    got["weight"][0, 0] = 1e6  # a copy: writable, and the blob is unchanged
    half, _ = blobs.load_parts(digest, ("half",))
    assert torch.equal(half["half"], tensors["half"])
    raw = bytearray(blobs.read_bytes(digest))
    raw[-1] ^= 0xFF
    overwrite(blobs, digest, bytes(raw))
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


def test_array_writer_matches_the_tensor_writer():
    rng = random.Random(1)
    numeric = [d for d in DTYPES if d != torch.bool] + [torch.bool]
    for _ in range(500):
        tensors = {}
        for _ in range(rng.randint(1, 5)):
            shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
            tensors[rng.choice(["a", "fc.weight", "fc.bias", "é", "_"]) + str(rng.randint(0, 3))] = (
                torch.rand(shape) * 10).to(rng.choice(numeric))
        meta = rng.choice([None, {}, {"part": "head"}])
        assert serialise_arrays({k: v.numpy() for k, v in tensors.items()}, meta) == serialise(tensors, meta)
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4).numpy()
    assert serialise_arrays({"t": a.T}) == serialise({"t": torch.from_numpy(a.T.copy())})  # not contiguous
    assert serialise_arrays({"c": np.zeros(2, dtype=np.complex64)}) is None  # serialise judges the rest
    assert serialise_arrays({"a": a}, {"k": 1}) is None  # type: ignore[dict-item]


def test_load_arrays_reads_views_over_checked_bytes(blob_store):
    blobs = blob_store
    tensors = {"weight": torch.randn(3, 4), "bias": torch.randn(3), "classes": torch.arange(3),
               "half": torch.ones(2, dtype=torch.bfloat16)}
    digest, _ = blobs.put_tensors(tensors, {"kind": "empirical"})
    got, meta = blobs.load_arrays(digest, ("weight", "bias", "classes", "missing"))
    assert set(got) == {"weight", "bias", "classes"} and meta == {"kind": "empirical"}
    assert all(np.array_equal(got[k], tensors[k].numpy()) and got[k].dtype == tensors[k].numpy().dtype for k in got)
    assert not got["weight"].flags.writeable  # views over the blob's bytes
    assert blobs.load_arrays(digest) is None  # a bfloat16 tensor: numpy has no such dtype
    raw = bytearray(blobs.read_bytes(digest))
    raw[-1] ^= 0xFF
    overwrite(blobs, digest, bytes(raw))
    with pytest.raises(IntegrityError, match="corrupted"):
        blobs.load_arrays(digest, ("weight",))
