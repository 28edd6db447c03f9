"""A store a team shares: metadata on a real PostgreSQL server, blobs on an S3 server (moto), both
started by the tests (tests/postgres.py, tests/servers.py). The acceptance of issue 15."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import torch
from safetensors.torch import save_file

from conftest import FAST_RECIPE, REPO, cli_ok, cli_run, umig_cli
from umig.api import Store
from umig.demo import build_fl_digits
from umig.errors import NotFoundError, UmigError
from umig.models import digits_cnn

AFFECTED = ["fl/r1/c0", "fl/r1/c1", "fl/r1/c2", "fl/r1/global", "fl/r2/c0", "fl/r2/c1", "fl/r2/c2",
            "fl/r2/global"]


@pytest.fixture
def server_store(fl_template, pg_url, s3_url) -> str:
    """The session's FL lineage copied into PostgreSQL + S3 (``umig store copy``'s code path); its URL."""
    with Store.open(fl_template) as src, Store.init(pg_url, blobs=s3_url) as dst:
        src.copy_to(dst)
    return pg_url


def versions(url: str) -> dict[str, int]:
    with Store.open(url) as s:
        return {n.name: n.version for n in s.nodes()}


# ------------------------------------------------------------------ opening
def test_init_needs_blobs_and_open_needs_a_store(pg_url, tmp_path):
    with pytest.raises(UmigError, match="needs a blob location"):
        Store.init(pg_url)
    with pytest.raises(NotFoundError, match="no umig store"):
        Store.open(pg_url)
    s = Store.init(pg_url, blobs=tmp_path / "blobs")
    assert s.root is None and s.url == pg_url and s.blobs.url == str((tmp_path / "blobs").resolve())
    s.close()
    with pytest.raises(UmigError, match="already exists"):
        Store.init(pg_url, blobs=tmp_path / "blobs")
    with Store.open(pg_url) as s2:  # the blob location comes from the database
        assert s2.blobs.url == str((tmp_path / "blobs").resolve())


def test_init_creates_the_database_and_unreachable_servers_are_one_line(postgres_server, s3_url, tmp_path):
    url = postgres_server.url(f"fresh_{uuid.uuid4().hex[:8]}")
    out = json.loads(cli_ok("init", "--blobs", s3_url, "--json", store=url))
    assert out == {"store": url, "blobs": s3_url}
    assert json.loads(cli_ok("graph", "show", "--json", store=url))["nodes"] == []
    postgres_server.drop_database(url)
    res = cli_run("graph", "show", store="postgresql://nobody:secret@127.0.0.1:1/umig")
    # One line naming the server, without the password.
    err = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(err) == 1 and "127.0.0.1:1" in err[0] and "secret" not in err[0], res.stderr


# --------------------------------------------------------------- acceptance
def test_cli_unlearn_revert_purge_gc_on_postgres_and_s3(pg_url, s3_url, fl_template):
    with Store.init(pg_url, blobs=s3_url) as s:  # the demo lineage, recorded through the Python API
        token = s.change_token()
        build_fl_digits(s, clients=3, rounds=2, recipe=FAST_RECIPE)
        assert s.change_token() != token  # what the browser view polls to see a commit
    url = pg_url
    with Store.open(url) as s, Store.open(fl_template) as local:  # the same training as the local store
        for n in AFFECTED:
            a, b = s.state_dict(n), local.state_dict(n)
            assert all(torch.equal(a[k], b[k]) for k in a)
    res = json.loads(cli_ok("unlearn", "--labels", "1,2", "--json", store=url))
    assert {n["name"] for n in res["nodes"]} == set(AFFECTED)
    assert all(versions(url)[n] == 1 for n in AFFECTED)
    op = res["operation"]
    cli_ok("revert", op, store=url)
    assert set(versions(url).values()) == {0}
    res2 = json.loads(cli_ok("unlearn", "--labels", "3", "--json", store=url))
    purged = json.loads(cli_ok("purge", res2["operation"], "--yes", "--json", store=url))
    assert purged["versions_purged"] == len(AFFECTED) and purged["blobs_deleted"] > 0
    with Store.open(url) as s:
        orphan, _ = s.blobs.put_bytes(b"not referenced by any row")
        assert s.blobs.exists(orphan)
    cli_ok("gc", store=url)
    with Store.open(url) as s:
        assert not s.blobs.exists(orphan)
        assert s.blobs.all_digests() == s._referenced()  # every referenced blob kept, nothing else
        for n in AFFECTED:
            s.state_dict(n)  # the live versions load, hash-verified, from S3


def test_store_copy_both_ways_gives_the_same_graph(fl_template, pg_url, s3_url, tmp_path):
    out = json.loads(cli_ok("store", "copy", str(fl_template), pg_url, "--blobs", s3_url, "--json"))
    assert out["rows"] > 0 and out["blobs"] > 0
    local = cli_ok("graph", "show", "--format", "json", store=str(fl_template))
    assert cli_ok("graph", "show", "--format", "json", store=pg_url) == local
    back = tmp_path / "back"
    cli_ok("store", "copy", pg_url, str(back))
    assert cli_ok("graph", "show", "--format", "json", store=str(back)) == local
    with Store.open(fl_template) as a, Store.open(back) as b:
        for n in AFFECTED:
            sa, sb = a.state_dict(n), b.state_dict(n)
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    res = cli_run("store", "copy", str(fl_template), pg_url)  # not into a store that has nodes
    assert res.exit_code == 1 and "not empty" in res.stderr


def test_two_add_node_processes_both_land(pg_url, s3_url, tmp_path):
    Store.init(pg_url, blobs=s3_url).close()
    w = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in digits_cnn().state_dict().items()}, str(w))
    env = {**os.environ, "PYTHONPATH": str(REPO), "UMIG_STORE": pg_url}
    procs = [subprocess.Popen([sys.executable, "-m", "umig.cli.main", "add-node", f"n{i}", "--weights", str(w),
                               "--arch", "umig.models:digits_cnn", "--data", "sklearn:digits?split=train"],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    with Store.open(pg_url) as s:
        assert sorted(n.name for n in s.nodes()) == ["n0", "n1"]
        for n in ("n0", "n1"):
            s.state_dict(n)
            assert s.fim(n) is not None


def test_kill_9_during_unlearn_leaves_every_node_at_its_previous_version(server_store, tmp_path):
    url = server_store
    before = versions(url)
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    with open(tmp_path / "err.txt", "w") as err:
        # Evaluation on held-out digits runs before the commit and keeps the request busy for seconds.
        proc = subprocess.Popen([sys.executable, "-m", "umig.cli.main", "unlearn", "--labels", "1,2", "--store", url,
                                 "--eval-data", "sklearn:digits?split=test", "--workers", "1"],
                                env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 240
        with Store.open(url) as s:  # wait until it holds the store's write lock: mid-request
            while proc.poll() is None and time.monotonic() < deadline:
                if s.db.execute("SELECT COUNT(*) FROM pg_locks WHERE locktype='advisory'").fetchone()[0]:
                    break
                time.sleep(0.02)
        assert proc.poll() is None, (tmp_path / "err.txt").read_text()
        time.sleep(0.5)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert versions(url) == before
    with Store.open(url) as s:
        assert s.history() == []
        s.lock_timeout = 10  # the lock went with the killed process's connection
        res = s.unlearn([3], evaluate=False)
        assert {r.name for r in res.nodes} == set(AFFECTED)


def test_umig_store_env_var_names_a_server_store(server_store):
    proc = umig_cli("graph", "show", "--json", env={"UMIG_STORE": server_store}, check=True)
    assert len(json.loads(proc.stdout)["nodes"]) == 9


def test_s3_blob_corruption_is_detected_on_read(server_store):
    import boto3

    with Store.open(server_store) as s:
        digest = s.version(AFFECTED[-1]).head_blob
        bucket, _, prefix = s.blobs.url.removeprefix("s3://").partition("/")
        client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
                if digest in o["Key"]]
        assert len(keys) == 1
        body = bytearray(client.get_object(Bucket=bucket, Key=keys[0])["Body"].read())
        body[-3] ^= 0xFF
        client.put_object(Bucket=bucket, Key=keys[0], Body=bytes(body))
        with pytest.raises(UmigError, match=digest[:12]):
            s.state_dict(AFFECTED[-1])


def test_browser_view_api_serves_a_server_store_and_sees_other_writers(server_store):
    pytest.importorskip("starlette", reason="umig ui needs the 'ui' extra: pip install 'umig[ui]'")
    from starlette.testclient import TestClient

    from umig.ui.server import create_app

    with Store.open(server_store) as s, TestClient(create_app(s), base_url="http://127.0.0.1") as c:
        info = c.get("/api/info").json()
        assert info["store"] == server_store and info["nodes"] == 9
        assert len(c.get("/api/graph").json()["nodes"]) == 9
        with Store.open(server_store) as other:  # another process's commit: the cached graph is rebuilt
            other.remove("fl/r2/global")
        assert len(c.get("/api/graph").json()["nodes"]) == 8
