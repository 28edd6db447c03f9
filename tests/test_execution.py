"""Execution backends: device parsing and pinning, chunk scheduling, the worker pool, durable blob writes.

GPU scheduling runs on CPU here: the device count is mocked and workers are "pinned" by a
fake pin function, so the same code paths run as on a multi-GPU machine, minus CUDA itself.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from umig.blobs import BlobStore, BufferedBlobStore, open_blobs
from umig import execution as E
from umig.errors import UmigError, UnlearningError
from umig.api import Store
from umig.unlearners.base import Task

FOUR_GPUS = lambda: 4  # noqa: E731 - a mocked device count


# ------------------------------------------------------------ task helpers
# Module-level, so spawned workers can import them as ``test_execution:...``.
def fake_pin(slot: str) -> str:
    """Stands in for ``pin_device`` on a machine without GPUs: remember the slot, compute on CPU."""
    os.environ["UMIG_TEST_PINNED_SLOT"] = slot
    os.environ["UMIG_TEST_PINNED_PID"] = str(os.getpid())
    return "cpu"


def whoami_task(payload: dict, env: E.WorkerEnv) -> dict:
    time.sleep(payload.get("sleep", 0.0))
    return {"i": payload["i"], "pid": os.getpid(), "slot": env.slot, "device": str(env.device),
            "pinned_slot": os.environ.get("UMIG_TEST_PINNED_SLOT"),
            "pinned_pid": os.environ.get("UMIG_TEST_PINNED_PID"),
            "cuda_initialized": torch.cuda.is_initialized()}


def write_task(payload: dict, env: E.WorkerEnv) -> str:
    return env.put({"t": torch.full((4,), float(payload["i"]))}, {"i": str(payload["i"])})


def write_then_fail_task(payload: dict, env: E.WorkerEnv) -> None:
    env.put({"t": torch.full((4,), 1234.5)})
    raise UnlearningError("boom")


def _tasks(fn: str, n: int, **extra) -> list[Task]:
    return [Task(fn=f"test_execution:{fn}", node=f"n{i}", cost=1.0, payload={"i": i, **extra}) for i in range(n)]


# ------------------------------------------------------------------ devices
def test_parse_devices_with_a_mocked_gpu_count():
    assert E.parse_devices("cuda", count=FOUR_GPUS) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert E.parse_devices("auto", count=FOUR_GPUS) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert E.parse_devices("cuda:1,3", count=FOUR_GPUS) == ["cuda:1", "cuda:3"]
    assert E.parse_devices("cpu", count=FOUR_GPUS) == ["cpu"]
    assert E.parse_devices("auto", count=lambda: 0) == ["cpu"]
    with pytest.raises(UmigError, match="no CUDA device"):
        E.parse_devices("cuda", count=lambda: 0)
    with pytest.raises(UmigError, match="not visible"):
        E.parse_devices("cuda:4", count=FOUR_GPUS)
    with pytest.raises(UmigError, match="twice"):
        E.parse_devices("cuda:1,1", count=FOUR_GPUS)
    with pytest.raises(UmigError, match="unknown device"):
        E.parse_devices("tpu", count=FOUR_GPUS)


def test_worker_devices_one_per_gpu_or_several_per_gpu():
    gpus = E.parse_devices("cuda", count=FOUR_GPUS)
    assert E.worker_devices(gpus, None) == gpus  # default: one worker pinned to each device
    slots = E.worker_devices(gpus, None, workers_per_device=2)
    assert Counter(slots) == {d: 2 for d in gpus}
    assert set(slots[:4]) == set(gpus)  # the first workers to start already cover every device
    assert E.worker_devices(gpus, 6) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3", "cuda:0", "cuda:1"]
    assert E.worker_devices(["cpu"], None) == ["cpu"]
    assert E.worker_devices(["cpu"], 3) == ["cpu"] * 3
    with pytest.raises(UmigError):
        E.worker_devices(gpus, 0)
    with pytest.raises(UmigError):
        E.worker_devices(gpus, None, workers_per_device=0)


def test_threads_per_worker_never_oversubscribes():
    assert E.threads_per_worker(2, cores=2) == 1
    assert E.threads_per_worker(4, cores=16) == 4
    assert E.threads_per_worker(8, cores=2) == 1


# --------------------------------------------------------------- scheduling
def test_chunks_cover_every_task_once_and_balance_cost():
    costs = [100.0] * 3 + [1.0] * 300 + [0.01] * 2000
    tasks = [Task(fn="x:y", payload={}, cost=c) for c in costs]
    chunks = E.chunk_tasks(tasks, n_workers=4)
    flat = sorted(i for c in chunks for i in c)
    assert flat == list(range(len(tasks)))
    loads = [sum(costs[i] for i in c) for c in chunks]
    assert len(chunks) >= 4 * 4 or len(chunks) >= len(tasks) / 512
    assert max(loads) <= 100.0 + 1e-6  # no chunk holds more than the single costliest task
    assert loads == sorted(loads, reverse=True)  # costliest chunks go out first
    assert all(len(c) <= 512 for c in chunks)


def test_chunks_of_many_tiny_tasks_are_few_and_even():
    tasks = [Task(fn="x:y", payload={}, cost=0.01) for _ in range(10_000)]
    chunks = E.chunk_tasks(tasks, n_workers=2)
    sizes = [len(c) for c in chunks]
    assert sum(sizes) == 10_000
    assert len(chunks) <= 40  # amortise the inter-process round trip
    assert max(sizes) - min(sizes) <= 1
    assert E.chunk_tasks([], 2) == []


def test_scheduler_keeps_every_worker_busy_and_returns_results_in_order():
    """A slow worker takes fewer chunks; results come back in task order regardless."""
    submitted: list[int] = []
    speed = {0: 1, 1: 5}  # worker 1 finishes chunks 5x faster

    class Handle:
        def __init__(self, chunk, w):
            self.chunk, self.w, self.left = chunk, w, 10 // speed[w]

    def submit(chunk, w):
        submitted.append(w)
        return Handle(chunk, w)

    def wait_any(handles, timeout):
        for h in handles:
            h.left -= 1
        done = [h for h in handles if h.left <= 0]
        return done, [h for h in handles if h not in done]

    tasks = _tasks("whoami_task", 200)
    results = E._Scheduler(2).run(tasks, submit, wait_any,
                                  lambda h: [({"i": t.payload["i"]}, []) for t in h.chunk], None)
    assert [r["i"] for r, _ in results] == list(range(200))
    share = Counter(submitted)
    assert share[1] > share[0]  # the fast worker was handed more chunks


# ---------------------------------------------------------------- backends
def test_make_backend_plans_a_gpu_pool_without_initialising_cuda(tmp_path, monkeypatch):
    def no_cuda_here(*a, **k):
        raise AssertionError("the coordinating process must not initialise CUDA")

    monkeypatch.setattr(torch.cuda, "set_device", no_cuda_here)
    monkeypatch.setattr(torch.cuda, "init", no_cuda_here)
    Store.init(tmp_path / "s").close()
    be = E.make_backend(str(tmp_path / "s" / "blobs"), device="cuda", workers=None, device_count=FOUR_GPUS)
    try:
        assert isinstance(be, E.ProcessPool)
        assert be.describe()["devices"] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
        assert be.describe()["workers"] == 4
    finally:
        be.close()
    be = E.make_backend(str(tmp_path / "s" / "blobs"), device="cuda", workers_per_device=2, device_count=FOUR_GPUS)
    try:
        assert Counter(be.describe()["devices"]) == {f"cuda:{i}": 2 for i in range(4)}
    finally:
        be.close()
    assert not torch.cuda.is_initialized()
    assert isinstance(E.make_backend(str(tmp_path / "s" / "blobs"), device="cpu", workers=1), E.InProcess)
    with pytest.raises(UmigError, match="unknown backend"):
        E.make_backend(str(tmp_path / "s" / "blobs"), backend="dask")
    with pytest.raises(UmigError, match="--backend ray"):
        E.make_backend(str(tmp_path / "s" / "blobs"), ray_address="auto")


def test_pool_pins_one_worker_per_device_and_uses_every_device(tmp_path, monkeypatch):
    """Two fake GPUs: each worker is pinned (in the worker) to its own device; both devices get work."""
    monkeypatch.setattr(torch.cuda, "set_device", lambda *a, **k: pytest.fail("set_device in the coordinator"))
    Store.init(tmp_path / "s").close()
    slots = E.worker_devices(E.parse_devices("cuda:0,2", count=FOUR_GPUS), None)
    pool = E.ProcessPool(str(tmp_path / "s" / "blobs"), slots, pin=fake_pin)
    try:
        workers = pool.workers()
        assert sorted(w["slot"] for w in workers) == ["cuda:0", "cuda:2"]
        assert all(w["device"] == "cpu" and w["threads"] == E.threads_per_worker(2) for w in workers)
        done: list[int] = []
        out = pool.run(_tasks("whoami_task", 60, sleep=0.01), lambda d, t: done.append(d))
        assert [r["i"] for r, _ in out] == list(range(60))
        assert done[-1] == 60 and done == sorted(done)
        assert {r["slot"] for r, _ in out} == {"cuda:0", "cuda:2"}  # both devices kept busy
        for r, _ in out:
            assert r["pinned_slot"] == r["slot"] and r["pinned_pid"] == str(r["pid"]) != str(os.getpid())
            assert not r["cuda_initialized"]
    finally:
        pool.close()
    assert not torch.cuda.is_initialized()
    assert "UMIG_TEST_PINNED_SLOT" not in os.environ  # pinning happened in the workers only


def test_cpu_pool_coordinator_works_while_workers_start(tmp_path):
    """On CPU the coordinator takes chunks itself until (and while) the spawned workers run."""
    Store.init(tmp_path / "s").close()
    E.shutdown_workers()
    # Work estimated above spawn_after_s: the worker is started, and the coordinator keeps working meanwhile.
    pool = E.ProcessPool(str(tmp_path / "s" / "blobs"), ["cpu", "cpu"], start="auto", spawn_after_s=0.05)
    threads = torch.get_num_threads()
    try:
        assert pool.describe()["coordinator_helps"]
        out = pool.run(_tasks("whoami_task", 60, sleep=0.05))
        assert [r["i"] for r, _ in out] == list(range(60))
        where = Counter(r["slot"] for r, _ in out)
        assert where["cpu (coordinator)"] > 0  # work started before any worker was up
        assert pool.describe()["workers_started"] and pool.describe()["decision"].startswith("started")
        assert torch.get_num_threads() == threads  # restored after the local chunks
    finally:
        pool.close()


def test_cpu_pool_runs_a_small_phase_in_process_and_keeps_workers_for_the_process(tmp_path):
    """--workers 2 never pays a worker's start-up for work shorter than it; started workers are reused."""
    Store.init(tmp_path / "s").close()
    E.shutdown_workers()
    small = E.ProcessPool(str(tmp_path / "s" / "blobs"), ["cpu", "cpu"])
    try:
        out = small.run(_tasks("whoami_task", 30))
        d = small.describe()
        assert {r["pid"] for r, _ in out} == {os.getpid()} and not d["workers_started"]
        assert d["start"] == "auto" and d["decision"].startswith("not started") and d["chunks_in_workers"] == 0
    finally:
        small.close()
    eager = E.ProcessPool(str(tmp_path / "s" / "blobs"), ["cpu", "cpu"], start="always")
    try:
        pids = {w["pid"] for w in eager.workers()}
        assert len(pids) == 2 and os.getpid() not in pids
    finally:
        eager.close()
    again = E.ProcessPool(str(tmp_path / "s" / "blobs"), ["cpu", "cpu"], start="always")
    try:
        d = again.describe()
        assert d["workers_reused"] and d["workers_started"]
        out = again.run(_tasks("whoami_task", 8))
        assert {r["pid"] for r, _ in out} <= pids  # the same processes: start-up paid once
    finally:
        again.close()
        E.shutdown_workers()


def test_in_process_work_on_small_models_uses_one_thread_unless_the_user_chose(tmp_path, monkeypatch, fl_store):
    snap = fl_store.snapshots(["fl/r1/c0"])["fl/r1/c0"]
    tasks = [Task(fn="x:y", node="fl/r1/c0", payload={"snap": snap})]
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "UMIG_THREADS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(E, "_TORCH_DEFAULT_THREADS", 4)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(4)), raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (4.5, 4.0, 4.0))  # 3.5 cores busy besides this process
    assert E.intra_op_threads(tasks, fl_store.blobs)[0] == 1  # a digits CNN on busy cores: one thread
    monkeypatch.setattr(os, "getloadavg", lambda: (2.6, 2.0, 2.0))
    assert E.intra_op_threads(tasks, fl_store.blobs)[0] == 2  # 2.4 idle cores
    monkeypatch.setattr(os, "getloadavg", lambda: (0.3, 0.3, 0.3))
    assert E.intra_op_threads(tasks, fl_store.blobs)[0] == 4  # idle machine: torch's default
    monkeypatch.setattr(os, "getloadavg", lambda: (4.5, 4.0, 4.0))
    monkeypatch.setattr(E, "SMALL_MODEL_BYTES", 1000)
    assert E.intra_op_threads(tasks, fl_store.blobs)[0] is None  # above the size: torch's default
    monkeypatch.setattr(E, "SMALL_MODEL_BYTES", 8 << 20)
    assert E.intra_op_threads([Task(fn="x:y", payload={})], fl_store.blobs)[0] is None  # no model named
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert E.intra_op_threads(tasks, fl_store.blobs) == (None, "set by the caller (torch.set_num_threads)")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert E.intra_op_threads(tasks, fl_store.blobs)[0] is None
    monkeypatch.setenv("UMIG_THREADS", "3")
    assert E.intra_op_threads(tasks, fl_store.blobs)[0] == 3


def test_pool_reports_blobs_and_names_the_failing_node(tmp_path):
    Store.init(tmp_path / "s").close()
    pool = E.ProcessPool(str(tmp_path / "s" / "blobs"), ["cpu", "cpu"])
    try:
        out = pool.run(_tasks("write_task", 10))
        blobs = BlobStore(tmp_path / "s" / "blobs")
        for (digest, created), i in zip(out, range(10)):
            assert created == [digest] and blobs.load(digest)["t"][0] == i  # durable when reported
        tasks = _tasks("write_task", 5) + [Task(fn="test_execution:write_then_fail_task", node="bad", payload={})]
        with pytest.raises(UnlearningError, match="node 'bad': boom") as err:
            pool.run(tasks)
        leftovers = set(err.value.created_blobs)
        assert leftovers and all(blobs.exists(d) for d in leftovers)  # reported, so the coordinator can drop them
    finally:
        pool.close()


def test_inprocess_overlaps_writes_but_reports_them_durable(tmp_path):
    Store.init(tmp_path / "s").close()
    be = E.InProcess(str(tmp_path / "s" / "blobs"))
    out = be.run(_tasks("write_task", 50))
    blobs = BlobStore(tmp_path / "s" / "blobs")
    assert all(blobs.exists(d) and created == [d] for d, created in out)
    again = be.run(_tasks("write_task", 3))  # content-addressed: rewriting creates nothing
    assert all(created == [] for _, created in again)
    with pytest.raises(UnlearningError, match="node 'bad'") as err:
        be.run([Task(fn="test_execution:write_then_fail_task", node="bad", payload={})])
    assert len(err.value.created_blobs) == 1
    be.close()


# --------------------------------------------------------------- blob writes
def test_buffered_blobs_are_readable_before_flush_and_durable_after(tmp_path):
    b = BufferedBlobStore(tmp_path / "blobs")
    b.ensure()
    digests = [b.put_deferred({"x": torch.arange(i + 1.0)}, tag=i) for i in range(20)]
    assert all(b.exists(d) for d in digests)
    assert torch.equal(b.load(digests[5])["x"], torch.arange(6.0))  # served while its write may be pending
    created = b.flush()
    assert sorted(created) == sorted(enumerate(digests))
    plain = BlobStore(tmp_path / "blobs")
    assert all(plain.exists(d) for d in digests)
    assert b.flush() == []
    assert b.put_deferred({"x": torch.arange(1.0)}) == digests[0] and b.flush() == []  # already there
    b.close()


def test_buffered_blob_write_errors_surface_at_flush(tmp_path):
    b = BufferedBlobStore(tmp_path / "blobs")
    b.ensure()
    ok = b.put_deferred({"x": torch.zeros(3)})
    b.flush()
    real = b._write
    calls = []

    def failing(digest, data):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(digest, data)

    b._write = failing  # type: ignore[method-assign]
    for i in range(3):
        b.put_deferred({"x": torch.full((3,), float(i + 1))})
    with pytest.raises(OSError, match="disk full") as err:
        b.flush()
    assert len(err.value.created_blobs) == 2 and ok not in err.value.created_blobs
    b.close()


def test_store_batch_commits_only_durable_blobs_and_rolls_back_cleanly(tmp_path):
    from umig.arch import ArchSpec

    arch = ArchSpec("umig.models:tiny_mlp", {"in_features": 4, "hidden": 8, "num_classes": 3})
    store = Store.init(tmp_path / "s")
    before = store.blobs.all_digests()
    with pytest.raises(RuntimeError, match="abort"):
        with store.batch():
            for i in range(5):
                store.add_node(f"m{i}", arch.build(), arch, compute_fim=False)
            raise RuntimeError("abort")
    assert len(store) == 0 and store.blobs.all_digests() == before  # every deferred blob removed again
    with store.batch():
        for i in range(5):
            store.add_node(f"m{i}", arch.build(), arch, compute_fim=False)
    plain = BlobStore(tmp_path / "s" / "blobs")
    for i in range(5):
        v = store.version(f"m{i}")
        assert plain.exists(v.body_blob) and plain.exists(v.head_blob)  # on disk once the batch committed
    store.close()


# ------------------------------------------------------------- blobs in S3
def test_workers_open_an_s3_blob_store_from_its_url(s3_url):
    """Tasks in this process and in a spawned worker (which inherits the AWS variables) write to the bucket
    named by the URL alone; every blob is there when reported, and content already stored is not created again."""
    blobs = open_blobs(s3_url)
    be = E.InProcess(s3_url)
    try:
        out = be.run(_tasks("write_task", 5))
    finally:
        be.close()
    for i, (digest, created) in enumerate(out):
        assert created == [digest] and blobs.load(digest)["t"][0] == i
    pool = E.ProcessPool(s3_url, ["cpu"])  # one spawned worker, started now (with this test's environment)
    try:
        more = pool.run(_tasks("write_task", 7))  # fewer than the pool's bridge: every chunk goes to the worker
        assert pool.describe()["chunks_in_workers"] > 0 and pool.describe()["chunks_in_coordinator"] == 0
    finally:
        pool.close()
        E.shutdown_workers()
    assert [created for _, created in more[:5]] == [[]] * 5  # already in the bucket
    for i, (digest, created) in list(enumerate(more))[5:]:
        assert created == [digest] and blobs.load(digest)["t"][0] == i
    assert blobs.all_digests() == {d for d, _ in more}


# ----------------------------------------------------------- real unlearning
def _heads(store: Store) -> dict[str, dict[str, torch.Tensor]]:
    return {n.name: store.blobs.load(store.version(n.name).head_blob) for n in store.nodes()}


def test_pool_results_match_the_in_process_path(fl_store: Store, tmp_path: Path):
    """The same request with --workers 2 (spawned pool) and --workers 1 (in-process): same nodes, same heads."""
    import shutil

    shutil.copytree(fl_store.root, tmp_path / "copy")
    shutil.copytree(fl_store.root, tmp_path / "workers")
    other, third = Store.open(tmp_path / "copy"), Store.open(tmp_path / "workers")
    # Spawned workers from the start; then --workers 2 as users get it (the coordinator computes too,
    # spawning its helper only if the work is long: here it is not).
    pool = E.ProcessPool(other.blobs.url, ["cpu", "cpu"], start="always")
    try:
        one = fl_store.unlearn([1], workers=1, device="cpu", evaluate=False)
        two = other.unlearn([1], backend=pool, evaluate=False)
        three = third.unlearn([1], workers=2, device="cpu", evaluate=False)
        assert one.backend["backend"] == "inprocess" and two.backend["backend"] == three.backend["backend"] == "pool"
        assert two.backend["workers_started"] and not two.backend["coordinator_helps"]
        assert two.backend["chunks_in_workers"] > 0
        assert three.backend["coordinator_helps"] and not three.backend["workers_started"]
        for res in (two, three):
            assert [n.name for n in one.nodes] == [n.name for n in res.nodes]
            assert [n.version_after for n in one.nodes] == [n.version_after for n in res.nodes]
        h1, h2, h3 = _heads(fl_store), _heads(other), _heads(third)
        for name in h1:
            for k in h1[name]:
                torch.testing.assert_close(h1[name][k], h2[name][k], rtol=1e-5, atol=1e-6)
                assert torch.equal(h2[name][k], h3[name][k])  # one thread per worker, wherever it ran
    finally:
        pool.close()
        E.shutdown_workers()
        other.close()
        third.close()
