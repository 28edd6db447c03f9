"""Kill-safety and the store lock: a killed or failed request never leaves a half-applied operation."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from conftest import REPO, store_state, umig_cli
from umig.errors import IntegrityError, LockTimeout
from umig.models import digits_cnn
from umig.api import Store

AFFECTED = ["fl/r1/c0", "fl/r1/c1", "fl/r1/c2", "fl/r1/global", "fl/r2/c0", "fl/r2/c1", "fl/r2/c2",
            "fl/r2/global"]
ALL = ["fl/init", *AFFECTED]


# ------------------------------------------------------------------ helpers
def _proc_text(pid: str, what: str) -> str:
    with open(f"/proc/{pid}/{what}", "rb") as fh:
        return fh.read().replace(b"\0", b" ").decode(errors="replace")


def marked(token: str, *, worker: bool = False) -> list[int]:
    """Live processes started by this test (they inherit ``UMIG_TEST_MARK``), workers only if asked.

    Found through their environment rather than their parent, so workers orphaned by a killed
    coordinator are found too.
    """
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == os.getpid():
            continue
        try:
            if f"UMIG_TEST_MARK={token} " not in _proc_text(d, "environ") + " ":
                continue
            state = _proc_text(d, "stat").rsplit(")", 1)[1].split()[0]
            cmd = _proc_text(d, "cmdline")
        except (OSError, IndexError):
            continue
        if state != "Z" and (not worker or "spawn_main" in cmd):
            out.append(int(d))
    return out


def busy_worker(token: str) -> int | None:
    """A pool worker that is running tasks: it has loaded scikit-learn to read a node's digits data.

    (A worker killed while still in its start-up initializer can wedge its sibling; see the report.)
    """
    for pid in marked(token, worker=True):
        try:
            if "sklearn" in _proc_text(str(pid), "maps"):
                return pid
        except OSError:
            continue
    return None


def kill_all(pids) -> None:
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def unlearn_process(root: Path, tmp_path: Path, *extra: str):
    """``umig unlearn --workers 2`` in the background; output goes to files (an orphaned worker
    holding a pipe could never block the test). Everything it started is killed afterwards.
    ``UMIG_POOL_START=always``: both workers start at once, as this small request would not start them."""
    token = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "umig.cli.main", "unlearn", "--labels", "1,2", "--workers", "2", "--device", "cpu",
           "--store", str(root), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200", "UMIG_TEST_MARK": token,
           "UMIG_POOL_START": "always"}
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
    proc.token = token
    proc.stderr_text = lambda: (tmp_path / "err.txt").read_text()
    try:
        yield proc
    finally:
        kill_all(marked(token))
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)


def wait_for(proc: subprocess.Popen, find, timeout: float = 240):
    """Poll ``find()`` until it returns a pid (None when the coordinator exited first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = find()
        if pid is not None:
            return pid
        if proc.poll() is not None:
            return None
        time.sleep(0.02)
    raise AssertionError(f"nothing to kill after {timeout} s:\n{proc.stderr_text()}")


def snapshot(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    with Store.open(root) as s:
        return {n: s.state_dict(n) for n in ALL}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def assert_consistent(root: Path, before: dict) -> str:
    """Every node at a committed, loadable version; all-before or one fully applied operation."""
    db = sqlite3.connect(root / "umig.db")
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        dangling = db.execute(
            "SELECT n.name FROM nodes n LEFT JOIN versions v ON v.node=n.id AND v.version=n.version "
            "WHERE v.node IS NULL").fetchall()
        assert dangling == []
    finally:
        db.close()
    with Store.open(root) as s:
        now = {n: s.state_dict(n) for n in ALL}  # every current blob present and hash-verified
        versions = {n: s.node(n).version for n in ALL}
        ops = s.history()
    assert same(now["fl/init"], before["fl/init"])
    if not ops:
        assert set(versions.values()) == {0}
        assert all(same(now[n], before[n]) for n in ALL)
        return "before"
    assert len(ops) == 1 and ops[0]["state"] == "applied"
    assert {n["name"] for n in ops[0]["nodes"]} == set(AFFECTED)
    assert all(versions[n] == 1 for n in AFFECTED)
    assert not any(same(now[n], before[n]) for n in AFFECTED)  # every head was rewritten
    return "applied"


# ---------------------------------------------------------------- kill tests
def test_sigkill_coordinator_leaves_store_consistent(fl_store, tmp_path):
    root = fl_store.root
    fl_store.close()
    before = snapshot(root)
    rows_before = store_state(root)["rows"]
    with unlearn_process(root, tmp_path, "--eval-data", "sklearn:digits?split=test", "--json") as proc:
        wait_for(proc, lambda: busy_worker(proc.token))  # mid-run: a worker is computing
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kill_all(marked(proc.token))  # orphaned workers must not write blobs while we look
    outcome = assert_consistent(root, before)
    if outcome == "before":
        assert store_state(root)["rows"] == rows_before
    # Blobs a killed run wrote are orphans: gc removes them and the store stays whole.
    with Store.open(root) as s:
        s.gc()
        assert {p.stem for p in (root / "blobs").glob("??/*.safetensors")} <= s._referenced()
    assert_consistent(root, before)
    # The lock died with the coordinator: the next request runs.
    with Store.open(root) as s:
        s.lock_timeout = 5
        res = s.unlearn([3], evaluate=False)
        assert len(res.nodes) == len(AFFECTED)
    fl_store.db = sqlite3.connect(":memory:")  # the fixture closes it again


def test_sigkill_worker_fails_cleanly_and_changes_nothing(fl_store, tmp_path):
    root = fl_store.root
    fl_store.close()
    before = store_state(root)
    # Evaluation keeps the workers busy for seconds after phase 1 starts: the kill lands mid-run.
    with unlearn_process(root, tmp_path, "--eval-data", "sklearn:digits?split=test") as proc:
        victim = wait_for(proc, lambda: busy_worker(proc.token))
        assert victim is not None, f"coordinator exited before its workers ran:\n{proc.stderr_text()}"
        os.kill(victim, signal.SIGKILL)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            raise AssertionError("the coordinator hangs after a worker was killed") from None
        err = proc.stderr_text()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert proc.returncode == 1, (proc.returncode, err)
    assert len(lines) == 1 and lines[0].startswith("error: ") and "worker" in lines[0], err
    after = store_state(root)
    assert after["rows"] == before["rows"]  # every node version, no operation row
    # Blobs a surviving worker wrote for the failed run are removed (or left for gc, never referenced).
    with Store.open(root) as s:
        s.gc()
    assert store_state(root) == before
    fl_store.db = sqlite3.connect(":memory:")


@pytest.mark.parametrize("mode", ["erase", "rows"])
def test_failed_request_rolls_back_rows_and_blobs(fl_store, mode):
    # An inherited node's head is corrupted: some heads are written (and with rows, first the unlearning
    # FIMs), then the request fails; nothing of it may remain.
    head = fl_store.blobs.path(fl_store.version("fl/r2/c1").head_blob)
    data = bytearray(head.read_bytes())
    data[-2] ^= 0x10
    head.write_bytes(bytes(data))
    before = store_state(fl_store.root)
    with pytest.raises(IntegrityError, match="node 'fl/r2/c1'"):
        fl_store.unlearn([1, 2], evaluate=False, params={"mode": mode})
    assert store_state(fl_store.root) == before
    assert fl_store.history() == []


# --------------------------------------------------------------------- lock
def test_locked_store_refuses_writer_after_timeout(fl_store, tmp_path):
    weights = fl_store.export("fl/r2/global", tmp_path / "g.safetensors")
    root = fl_store.root
    before = store_state(root)
    with fl_store.lock():
        t0 = time.monotonic()
        proc = umig_cli("add-node", "late", "--weights", str(weights), "--arch", "umig.models:digits_cnn",
                        "--parent", "fl/r2/global", "--framework", "fl", store=root,
                        env={"UMIG_LOCK_TIMEOUT": "1"})
        waited = time.monotonic() - t0
        # In-process too: a second Store on the same directory waits, then gives up.
        other = Store.open(root)
        other.lock_timeout = 0.2
        with pytest.raises(LockTimeout, match="locked by another umig process"):
            other.add_node("late", digits_cnn(), "umig.models:digits_cnn", parents=["fl/r2/global"])
        other.close()
        with fl_store.lock():  # re-entrant for its holder
            pass
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and "locked" in lines[0] and "UMIG_LOCK_TIMEOUT" in lines[0], proc.stderr
    assert waited >= 1
    assert store_state(root) == before
    # Released: the same write now goes through.
    fl_store.add_node("late", digits_cnn(), "umig.models:digits_cnn", parents=["fl/r2/global"], framework="fl")
    assert fl_store.node("late").parents == (("fl/r2/global", "finetune", None),)
