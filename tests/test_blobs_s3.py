"""S3 blob stores against a real S3 protocol server (moto, in this process): the object layout, the
endpoint variables, and failures to talk to S3 as one clear line. Every store operation also runs
against S3 in tests/test_blobs.py."""

from __future__ import annotations

import hashlib
import os
import socket
import sys

import pytest
import torch
from servers import aws_test_env, need_s3

from umig.blobs import S3BlobStore, blobs_url, open_blobs
from umig.errors import IntegrityError, NotFoundError, UmigError


def _one_line(err: pytest.ExceptionInfo, *needles: str) -> str:
    """The error is a UmigError of one line, naming every needle, with no botocore exception chained."""
    text = str(err.value)
    assert isinstance(err.value, UmigError) and "\n" not in text, text
    assert err.value.__cause__ is None and err.value.__suppress_context__, "a botocore traceback would show"
    for n in needles:
        assert n in text, (n, text)
    return text


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_blob_locations_are_canonical(tmp_path):
    assert blobs_url("s3://bucket/a/b/") == "s3://bucket/a/b" and blobs_url("s3://bucket") == "s3://bucket"
    assert blobs_url(f"file://{tmp_path}/x") == blobs_url(tmp_path / "x") == str((tmp_path / "x").resolve())
    with pytest.raises(UmigError, match="not supported"):
        blobs_url("gs://bucket/p")
    with pytest.raises(UmigError, match="names no bucket"):
        blobs_url("s3:///p")
    with pytest.raises(UmigError, match="absolute path"):
        blobs_url("file://relative/p")


def test_s3_blobs_are_objects_under_the_prefix_in_the_local_layout(s3_url):
    import boto3

    store = open_blobs(s3_url + "/")
    assert isinstance(store, S3BlobStore) and store.url == s3_url
    store.ensure()  # the bucket takes writes; its probe object is gone again
    digest, created = store.put_tensors({"w": torch.ones(3)})
    assert created
    s3 = boto3.client("s3")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=store.bucket).get("Contents", [])]
    assert keys == [f"umig/{digest[:2]}/{digest}.safetensors"]
    # A neighbouring prefix that starts alike is another store.
    s3.put_object(Bucket=store.bucket, Key=f"umig2/{digest[:2]}/{'0' * 64}.safetensors", Body=b"x")
    s3.put_object(Bucket=store.bucket, Key="umig/notes.txt", Body=b"not a blob")
    assert store.all_digests() == {digest}


def test_s3_endpoint_comes_from_AWS_ENDPOINT_URL_S3_before_AWS_ENDPOINT_URL(s3_url, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", os.environ["AWS_ENDPOINT_URL"])  # the test server
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")  # would fail if used
    store = open_blobs(s3_url)
    digest, _ = store.put_tensors({"x": torch.zeros(1)})
    assert store.exists(digest)


def test_s3_write_is_checked_before_it_counts(s3_url, monkeypatch):
    store = open_blobs(s3_url, threads=0)
    real = store.fs.pipe_file
    monkeypatch.setattr(store.fs, "pipe_file", lambda path, data: real(path, data[:10]))  # a short upload
    with pytest.raises(IntegrityError, match="was not stored intact.*10 bytes of"):
        store.put_tensors({"x": torch.ones(4)})
    with pytest.raises(IntegrityError, match="was not stored intact"):
        store.put_deferred({"y": torch.ones(4)})  # without writer threads a deferred write fails at once


def test_s3_missing_bucket_is_one_line_not_a_missing_blob(s3_url):
    bucket = "umig-no-such-bucket"
    store = open_blobs(f"s3://{bucket}/umig")
    digest = hashlib.sha256(b"x").hexdigest()
    with pytest.raises(UmigError) as err:
        store.read_bytes(digest)
    assert not isinstance(err.value, NotFoundError)
    _one_line(err, f"s3://{bucket}/umig", f"bucket '{bucket}' does not exist")
    with pytest.raises(UmigError) as err:
        store.ensure()
    _one_line(err, f"bucket '{bucket}' does not exist")
    store.put_deferred({"x": torch.ones(1)})
    with pytest.raises(UmigError) as err:
        store.flush()  # a deferred write's failure is raised by flush, as locally
    _one_line(err, f"bucket '{bucket}' does not exist")


def test_s3_unreachable_endpoint_is_one_line(monkeypatch):
    need_s3()
    aws_test_env(monkeypatch, f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's own variable: no retries with backoff
    store = open_blobs("s3://bucket/umig")  # opening contacts nothing
    with pytest.raises(UmigError) as err:
        store.exists(hashlib.sha256(b"x").hexdigest())
    _one_line(err, "S3 blob store s3://bucket/umig: cannot look up blob", "Could not connect to the endpoint URL")
    with pytest.raises(UmigError) as err:
        store.all_digests()
    _one_line(err, "cannot list blobs")


def test_s3_without_credentials_is_one_line(s3_server, monkeypatch):
    aws_test_env(monkeypatch, s3_server)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UmigError) as err:
        open_blobs("s3://bucket/umig").ensure()
    _one_line(err, "s3://bucket/umig", "no AWS credentials found")


def test_s3_without_s3fs_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # an import of s3fs now fails
    with pytest.raises(UmigError, match=r"s3:// blobs need s3fs: pip install 'umig\[server\]'"):
        open_blobs("s3://bucket/umig")
