"""Execution backends: run a phase of independent tasks in-process, in a worker pool, or on Ray.

Every backend has one interface, :meth:`Backend.run`, taking a list of
``umig.unlearner.Task`` and returning their results in order. Workers read
blobs and write new ones; they never touch the metadata database (only the
coordinating process commits). Each result comes back with the digests of the
blobs its task created, so the coordinator can delete them if the operation
fails before it commits.

Backends:

* :class:`InProcess` - ``--workers 1``: tasks run one after another in this process (one torch
  thread for small models unless the user chose: :func:`intra_op_threads`).
* :class:`ProcessPool` - spawned worker processes, each pinned to one device (one per GPU, or
  ``--workers-per-device`` per GPU). Tasks go out in cost-balanced chunks that idle workers
  pull, so every device stays busy; CUDA is initialised only inside the workers. Workers are
  started once per process and kept for later requests; on CPU they are started only when the
  work would outlast their start-up (the coordinator computes meanwhile, and alone for a small
  request), so ``--workers 2`` is not slower than ``--workers 1``.
* :class:`RayBackend` - ``--backend ray [--ray-address ADDR]``: the same chunks run on Ray
  actors (with a GPU each where ``--device cuda``); with blobs in S3 they need only the blob URL
  and the AWS variables (no shared file system); a local blob directory must be at the same path
  on every node of the cluster (see docs/ray.md).

Every backend takes the blob store's URL (``store.blobs.url``: an absolute directory or
``s3://bucket/prefix``) and each worker opens the store from it (:func:`umig.blobs.open_blobs`).

Blob writes are durable before they are reported: every local blob is fsynced before it is renamed
into place, and an S3 blob is checked after its PUT (``umig.blobs``); a task's results are handed
back only after all of its writes finished. Writes go through a few threads (deferred writes of
:func:`umig.blobs.open_blobs`' stores) so that the fsyncs of many small blobs (or the round trips
to S3) overlap; ext4 and most journaling file systems then commit them together.
"""

from __future__ import annotations

import atexit
import contextlib
import heapq
import importlib
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np
import torch
from torch import nn

from umig.arch import build_model
from umig.blobs import blobs_url as canonical_blobs_url
from umig.blobs import open_blobs, serialise_arrays
from umig.data import Data, DataRef, verify
from umig.errors import NotFoundError, UmigError, UnlearningError
from umig.store import NodeSnapshot, load_state

Progress = Callable[[int, int], None]  # (done, total)
BACKENDS = ("local", "ray")
POOL_STARTS = ("auto", "always")  # when a CPU pool spawns its workers (ProcessPool, UMIG_POOL_START)


# ------------------------------------------------------------------- devices
def cuda_count() -> int:
    """Number of visible CUDA devices (does not initialise CUDA in this process)."""
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(spec: str | None, *, count: Callable[[], int] = cuda_count) -> list[str]:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:0,1`` -> a list of device strings."""
    spec = (spec or "auto").strip().lower()
    if spec == "cpu":
        return ["cpu"]
    n = count()
    if spec == "auto":
        return [f"cuda:{i}" for i in range(n)] or ["cpu"]
    if spec == "cuda":
        if n == 0:
            raise UmigError("--device cuda was asked for but no CUDA device is visible")
        return [f"cuda:{i}" for i in range(n)]
    if spec.startswith("cuda:"):
        try:
            ids = [int(x) for x in spec[5:].split(",") if x.strip()]
        except ValueError:
            raise UmigError(f"bad device list '{spec}' (expected e.g. cuda:0,1)") from None
        bad = [i for i in ids if i < 0 or i >= n]
        if not ids or bad:
            raise UmigError(f"device '{spec}' names GPU(s) that are not visible ({n} visible)")
        if len(set(ids)) != len(ids):
            raise UmigError(f"device '{spec}' names a GPU twice (use --workers-per-device for more workers per GPU)")
        return [f"cuda:{i}" for i in ids]
    raise UmigError(f"unknown device '{spec}' (auto, cpu, cuda, cuda:0,1)")


def worker_devices(devices: Sequence[str], workers: int | None, workers_per_device: int | None = None) -> list[str]:
    """The device each worker slot is pinned to.

    ``workers_per_device`` gives every device that many workers; otherwise ``workers`` slots
    are dealt round-robin (default: one per GPU, or a single CPU worker), so devices stay
    evenly loaded. Slots of one device are spread out (``cuda:0, cuda:1, cuda:0, cuda:1``) so
    that the first workers to start cover every device.
    """
    if not devices:
        raise UmigError("no device to run on")
    if workers_per_device is not None:
        if workers_per_device < 1:
            raise UmigError("--workers-per-device must be at least 1")
        return [d for _ in range(workers_per_device) for d in devices]
    if workers is None:
        workers = len(devices) if devices[0] != "cpu" else 1
    if workers < 1:
        raise UmigError("--workers must be at least 1")
    return [devices[i % len(devices)] for i in range(workers)]


def threads_per_worker(n_workers: int, cores: int | None = None) -> int:
    """CPU threads each worker may use so that workers together do not oversubscribe the cores."""
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, n_workers))


def pin_device(device: str) -> str:
    """Worker side: make ``device`` this process's device. CUDA is initialised here, in the worker only."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    return device


# ---------------------------------------------------------------- worker env
class WorkerEnv:
    """What a task sees on its worker: the blob store, its device, and loaders with a small cache.

    The blob store is opened from ``blobs_url`` (a directory or ``s3://bucket/prefix``, see
    :func:`umig.blobs.open_blobs`); ``write_threads`` defaults to the store kind's own.
    """

    def __init__(self, blobs_url: str, device: str = "cpu", *, slot: str | None = None,
                 write_threads: int | None = None) -> None:
        self.blobs_url = blobs_url
        self.device = torch.device(device)
        self.slot = slot or device  # the device this worker was scheduled as (for reports)
        self.blobs = open_blobs(blobs_url, threads=write_threads)
        self.tag: Any = None  # which task the blobs written now belong to
        self._data_cache: dict[tuple[str, str | None], Any] = {}
        # Per-worker memo for tasks (e.g. a merged FIM shared by many nodes of one group).
        self.cache: dict[Any, Any] = {}

    def put(self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Write a blob; durable before the task's result is handed back (see :func:`run_tasks`)."""
        return self.blobs.put_deferred(dict(tensors), metadata, tag=self.tag)

    def put_arrays(self, arrays: Mapping[str, np.ndarray], metadata: dict[str, str] | None = None) -> str:
        """:meth:`put` of numpy arrays (the same blob as of the tensors they would become)."""
        data = serialise_arrays(arrays, metadata)
        if data is None:
            return self.put({k: torch.from_numpy(np.ascontiguousarray(a)) for k, a in arrays.items()}, metadata)
        return self.blobs.put_serialised(data, tag=self.tag)

    def head_tensors(self, snap: Any) -> dict[str, torch.Tensor]:
        """Only the head blob: a head-only update never reads the rest of the checkpoint."""
        return self.blobs.load(snap.head_blob, owner=snap.name)

    def state_from_digests(self, digests: Mapping[str, str | None], owner: str | None = None) -> dict[str, torch.Tensor]:
        return load_state(self.blobs, digests, owner=owner)

    def state_dict(self, snap: NodeSnapshot) -> dict[str, torch.Tensor]:
        return load_state(self.blobs, snap.blobs(), owner=snap.name)

    def build(self, snap: NodeSnapshot) -> nn.Module:
        return build_model(snap.arch)

    def load_model(self, snap: NodeSnapshot, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        return build_model(snap.arch, state if state is not None else self.state_dict(snap)).to(self.device)

    def node_data(self, snap: NodeSnapshot) -> Data | None:
        """The node's own training data, resolved once per worker and checked against its fingerprint."""
        if snap.data_ref is None:
            return None
        key = (repr(sorted(snap.data_ref.items())), snap.data_fingerprint)
        if key not in self._data_cache:
            self._data_cache[key] = verify(DataRef.from_json(snap.data_ref), snap.data_fingerprint)
        return self._data_cache[key]

    def reset(self) -> None:
        """Forget what earlier requests cached (a pool worker outlives the request that started it)."""
        self._data_cache.clear()
        self.cache.clear()

    def close(self) -> None:
        self.blobs.close()


_FUNCTIONS: dict[str, Callable[..., Any]] = {}


def _import(spec: str) -> Callable[..., Any]:
    """``"module:function"`` -> the function (looked up once per process)."""
    fn = _FUNCTIONS.get(spec)
    if fn is None:
        module, _, attr = spec.partition(":")
        fn = _FUNCTIONS[spec] = getattr(importlib.import_module(module), attr)
    return fn


def _call(task: Any, env: WorkerEnv) -> Any:
    try:
        return _import(task.fn)(task.payload, env)
    except UmigError as e:
        # Name the node: in a pool, which task failed is otherwise lost.
        if task.node and task.node not in str(e):
            raise type(e)(f"node '{task.node}': {e}") from None
        raise


def run_tasks(tasks: Sequence[Any], env: WorkerEnv, progress: Callable[[int], None] | None = None, *,
              flush: bool = True) -> list[tuple[Any, list[str]]]:
    """Run tasks one after another in ``env``; return ``(result, created blobs)`` per task.

    Blob writes of all the tasks overlap; this returns only once every one is durable. On an
    error, the blobs written so far are on the exception as ``created_blobs`` (the coordinator
    removes them with the rolled-back operation). ``flush=False`` leaves the writes pending (and
    the created lists empty) for one later ``env.blobs.flush()`` (see :meth:`Backend.deferred_flush`).
    """
    results: list[Any] = []
    try:
        for i, t in enumerate(tasks):
            env.tag = i
            results.append(_call(t, env))
            if progress:
                progress(i + 1)
    except BaseException as e:
        env.tag = None
        created = env.blobs.flush(check=False)
        e.created_blobs = [d for _, d in created]  # type: ignore[attr-defined]
        raise
    env.tag = None
    per_task: list[list[str]] = [[] for _ in tasks]
    if not flush:
        return list(zip(results, per_task))
    for tag, digest in env.blobs.flush():
        per_task[tag if isinstance(tag, int) and 0 <= tag < len(tasks) else 0].append(digest)
    return list(zip(results, per_task))


def execute_task(task: Any, env: WorkerEnv) -> tuple[Any, list[str]]:
    """Run one task in ``env``; return its result and the blobs it created (durable)."""
    return run_tasks([task], env)[0]


# ------------------------------------------------------------------ chunking
def chunk_tasks(tasks: Sequence[Any], n_workers: int, per_worker: int = 4, max_chunk: int = 512) -> list[list[int]]:
    """Split task indices into cost-balanced chunks, costliest first.

    Big enough to amortise the inter-process round trip over thousands of tiny tasks, small
    enough (about ``per_worker`` chunks per worker, at most ``max_chunk`` tasks each) that idle
    workers can pick up the rest and every device stays busy.
    """
    if not tasks:
        return []
    cost = [float(getattr(t, "cost", 1.0)) for t in tasks]
    order = sorted(range(len(tasks)), key=lambda i: -cost[i])
    n_chunks = min(len(tasks), max(1, n_workers * per_worker, math.ceil(len(tasks) / max_chunk)))
    chunks: list[list[int]] = [[] for _ in range(n_chunks)]
    heap = [(0.0, j) for j in range(n_chunks)]  # greedy longest-processing-time assignment
    for i in order:
        load, j = heapq.heappop(heap)
        chunks[j].append(i)
        heapq.heappush(heap, (load + cost[i], j))
    chunks = [sorted(c) for c in chunks if c]
    # Costliest chunks go out first, so a long one does not start last.
    chunks.sort(key=lambda c: -sum(cost[i] for i in c))
    return chunks


def _collect_created(pairs: Sequence[Any]) -> list[str]:
    return [d for p in pairs if p is not None for d in p[1]]


# ------------------------------------------------------------------- backends
class Backend(ABC):
    """Runs a list of independent tasks and returns ``(result, created_blobs)`` pairs in task order.

    When :meth:`run` raises, the exception carries ``created_blobs``: every blob the phase had
    already written, for the coordinator to remove with the rolled-back operation.
    """

    name: str = "backend"

    @abstractmethod
    def run(self, tasks: Sequence[Any], progress: Progress | None = None) -> list[tuple[Any, list[str]]]: ...

    def close(self) -> None:
        """Release workers."""

    @contextlib.contextmanager
    def deferred_flush(self, adopt: Callable[[list[str]], None]) -> Iterator[None]:
        """Phases run inside share one durable flush at the end, where the backend writes in this process
        (one flush per operation, not per phase); every blob created is handed to ``adopt`` then, or
        when anything fails. Other backends flush each phase, as :meth:`run` says."""
        yield

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------- thread policy
SMALL_MODEL_BYTES = 8 << 20  # weights (body + head blobs) up to this size count as a small model
_THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # what torch chose, before anyone set it


def _task_snapshot(task: Any) -> Any:
    payload = getattr(task, "payload", None) or {}
    snap = payload.get("snap")
    if snap is None and isinstance(payload.get("snapshots"), Mapping):
        snap = payload["snapshots"].get(payload.get("node"))
    return snap if hasattr(snap, "body_blob") else None


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _idle_cores() -> float:
    """Cores not in use by others: the cores less the 1-minute load average, this process counted once."""
    try:
        others = max(0.0, os.getloadavg()[0] - 1.0)
    except OSError:
        others = 0.0
    return max(0.0, _cores() - others)


_SIZES: dict[str, int] = {}  # blob digest -> bytes: content-addressed, so one digest has one size


def _blob_size(blobs: Any, digest: str) -> int:
    """A blob's size for the thread policy, asked of the store once per digest (a stat, or an S3 round trip)."""
    size = _SIZES.get(digest)
    if size is None:
        size = blobs.size(digest)
        if len(_SIZES) >= 1 << 16:
            _SIZES.clear()
        _SIZES[digest] = size
    return size


def intra_op_threads(tasks: Sequence[Any], blobs: Any, device: torch.device | str = "cpu") -> tuple[int | None, str]:
    """The torch threads in-process CPU work on ``tasks`` should use, and why (None: leave torch as it is).

    Small models get as many threads as there are idle cores (at least one, at most torch's default):
    an op on a model this small is over in microseconds, so a thread that has to wait for a busy core
    stalls every op; on two busy cores a retrain of digits CNNs ran 5-20x slower with torch's default
    two threads than with one, while on two idle cores two threads are ~20% faster. Idle cores are the
    cores less the 1-minute load average, this process counted once. The user's choice wins:
    ``UMIG_THREADS``, ``OMP_NUM_THREADS``/``MKL_NUM_THREADS``, or a ``torch.set_num_threads`` call.
    Larger models, GPUs, and tasks that name no model keep torch's default.
    """
    umig_threads = os.environ.get("UMIG_THREADS", "").strip()
    if umig_threads:
        try:
            return max(1, int(umig_threads)), "UMIG_THREADS"
        except ValueError:
            raise UmigError(f"UMIG_THREADS={umig_threads!r} is not a number of threads") from None
    if any(os.environ.get(v, "").strip() for v in _THREAD_VARS):
        return None, "set by the environment (OMP_NUM_THREADS/MKL_NUM_THREADS)"
    if torch.get_num_threads() != _TORCH_DEFAULT_THREADS:
        return None, "set by the caller (torch.set_num_threads)"
    if torch.device(device).type != "cpu" or _TORCH_DEFAULT_THREADS <= 1:
        return None, "torch default"
    biggest = 0
    for task in tasks[:16]:
        snap = _task_snapshot(task)
        if snap is None:
            continue
        try:
            size = sum(_blob_size(blobs, d) for d in (snap.body_blob, snap.head_blob, snap.delta_blob) if d)
        except (OSError, NotFoundError):  # a missing blob: the task itself will say so
            continue
        biggest = max(biggest, size)
    if biggest == 0:
        return None, "torch default"
    if biggest > SMALL_MODEL_BYTES:
        return None, f"torch default ({biggest / 2**20:.0f} MB of weights)"
    idle = _idle_cores()
    threads = max(1, min(_TORCH_DEFAULT_THREADS, round(idle)))  # 1.96 idle cores are two
    return threads, f"small model ({biggest / 2**20:.1f} MB of weights), {idle:.1f} idle cores"


class InProcess(Backend):
    """Runs tasks one after another in this process (``--workers 1``: easiest to debug).

    CPU work on small models runs with one torch thread unless the user chose a thread count
    (:func:`intra_op_threads`); the caller's setting is restored afterwards.
    """

    name = "inprocess"

    def __init__(self, blobs_url: str, device: str = "cpu") -> None:
        self.env = WorkerEnv(blobs_url, device)
        self.threads_used: int | None = None
        self.threads_why = "torch default"
        self._defer = False

    @contextlib.contextmanager
    def deferred_flush(self, adopt: Callable[[list[str]], None]) -> Iterator[None]:
        self._defer = True
        try:
            yield
        except BaseException:
            self._defer = False
            adopt([d for _, d in self.env.blobs.flush(check=False)])
            raise
        self._defer = False
        adopt([d for _, d in self.env.blobs.flush()])  # a write error is raised with its created_blobs

    def run(self, tasks: Sequence[Any], progress: Progress | None = None) -> list[tuple[Any, list[str]]]:
        n = len(tasks)
        cb = (lambda d: progress(d, n)) if progress else None
        threads, why = intra_op_threads(tasks, self.env.blobs, self.env.device)
        before = torch.get_num_threads()
        self.threads_used, self.threads_why = threads or before, why
        flush = not self._defer
        if threads is None or threads == before:
            return run_tasks(tasks, self.env, cb, flush=flush)
        torch.set_num_threads(threads)
        try:
            return run_tasks(tasks, self.env, cb, flush=flush)
        finally:
            torch.set_num_threads(before)

    def close(self) -> None:
        self.env.close()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": 1, "devices": [str(self.env.device)],
                "threads": self.threads_used or torch.get_num_threads(), "threads_why": self.threads_why}


class _Scheduler:
    """Hands cost-balanced chunks to workers as they free up; gathers results in task order.

    ``submit(chunk_tasks, worker) -> handle`` and ``wait_any(handles, timeout) -> (done, pending)``
    are the backend's; a worker gets a new chunk as soon as its previous one finished, so a slow
    device simply takes fewer chunks. With ``local`` (a CPU pool), the coordinating process runs
    chunks itself whenever ``local_now()`` says so and no result is waiting; chunks then go only
    to workers that are up (``ready()``), so none sits queued behind a worker still starting.
    """

    def __init__(self, n_workers: int, depth: int = 2) -> None:
        self.n_workers = n_workers
        self.depth = depth  # chunks in flight per worker: one running, one queued behind it

    def run(self, tasks: Sequence[Any], submit: Callable[[list[Any], int], Any],
            wait_any: Callable[[list[Any], float | None], tuple[list[Any], list[Any]]],
            result: Callable[[Any], Any], progress: Progress | None,
            local: Callable[[list[Any]], list[tuple[Any, list[str]]]] | None = None,
            ready: Callable[[], int] | None = None,
            local_now: Callable[[], bool] | None = None) -> list[tuple[Any, list[str]]]:
        results: list[tuple[Any, list[str]] | None] = [None] * len(tasks)
        todo = deque(chunk_tasks(tasks, self.n_workers + (1 if local else 0)))
        inflight: dict[Any, tuple[list[int], int]] = {}
        load = [0] * self.n_workers
        done = 0

        def record(idx: list[int], pairs: Sequence[Any]) -> None:
            nonlocal done
            for i, r in zip(idx, pairs):
                results[i] = r
            done += len(idx)
            if progress:
                progress(done, len(tasks))

        try:
            while todo or inflight:
                helping = local is not None and (local_now is None or local_now())
                # While this process helps, chunks go only to workers that are up.
                usable = min(self.n_workers, ready()) if helping and ready is not None else self.n_workers
                while todo:
                    w = min(range(self.n_workers), key=load.__getitem__)
                    if load[w] >= self.depth or sum(load) >= usable * self.depth:
                        break
                    idx = todo.popleft()
                    inflight[submit([tasks[i] for i in idx], w)] = (idx, w)
                    load[w] += 1
                if helping and todo:
                    finished, _ = wait_any(list(inflight), 0) if inflight else ([], [])
                    if not finished:  # nothing to collect: do a chunk here instead of waiting
                        idx = todo.pop()  # the cheapest one, so workers are not kept waiting long
                        record(idx, local([tasks[i] for i in idx]))
                        continue
                else:
                    finished, _ = wait_any(list(inflight), None)
                for h in finished:
                    idx, w = inflight.pop(h)
                    load[w] -= 1
                    record(idx, result(h))
        except BaseException as e:
            created = list(getattr(e, "created_blobs", []) or []) + _collect_created(results)
            if not isinstance(e, KeyboardInterrupt):
                # Let chunks in flight finish so that every blob the phase wrote is known and removed.
                for h in list(inflight):
                    try:
                        created += _collect_created(result(h))
                    except BaseException as other:  # noqa: BLE001
                        created += list(getattr(other, "created_blobs", []) or [])
            try:
                e.created_blobs = created  # type: ignore[attr-defined]
            except AttributeError:
                pass
            raise
        return results  # type: ignore[return-value]


# Per-process state of a pool worker (set by the initializer; its WorkerEnv is made per store).
_WORKER: dict[str, Any] = {"slot": None, "device": None, "env": None, "request": None}


def _init_worker(device_queue: Any, threads: int, pin: Callable[[str], str] = pin_device,
                 ready_dir: str | None = None) -> None:
    slot = device_queue.get()
    torch.set_num_threads(threads)
    _WORKER.update(slot=slot, device=pin(slot))
    if ready_dir is not None:  # the last step: a worker without this file has not touched a task queue
        with contextlib.suppress(OSError):
            open(os.path.join(ready_dir, str(os.getpid())), "x").close()


def _worker_env(blobs_url: str | None, request: str | None) -> WorkerEnv:
    """This worker's env for the blob store at ``blobs_url``; a new request starts with empty caches (a
    worker outlives requests)."""
    assert _WORKER["slot"] is not None, "worker initializer did not run"
    env: WorkerEnv | None = _WORKER["env"]
    if env is None or (blobs_url is not None and env.blobs_url != blobs_url):
        if env is not None:
            env.close()
        if blobs_url is None:
            raise UmigError("a pool worker got a task before any store")
        env = WorkerEnv(blobs_url, _WORKER["device"], slot=_WORKER["slot"])
        _WORKER["env"] = env
    elif request != _WORKER["request"]:
        env.reset()
    _WORKER["request"] = request
    return env


def _ready() -> int:
    """Answered by a worker once its initializer ran: it is up and pinned."""
    assert _WORKER["slot"] is not None, "worker initializer did not run"
    return os.getpid()


def _run_chunk(tasks: Sequence[Any], blobs_url: str | None = None,
               request: str | None = None) -> list[tuple[Any, list[str]]]:
    return run_tasks(tasks, _worker_env(blobs_url, request))


def _worker_info(linger: float = 0.0) -> dict[str, Any]:
    assert _WORKER["slot"] is not None, "worker initializer did not run"
    time.sleep(linger)  # keep this worker busy a moment, so the next request reaches another one
    return {"pid": os.getpid(), "slot": _WORKER["slot"], "device": str(_WORKER["device"]),
            "threads": torch.get_num_threads()}


class _Workers:
    """Spawned worker processes, each pinned to one device slot; kept for the life of this process.

    Spawning a worker (a process importing torch) takes seconds: a process pays it once, and
    later requests with the same slots reuse the workers (:func:`_workers`). Workers are not
    tied to a store: each chunk names its blob store's URL and request. (A worker keeps the
    environment it was spawned with, AWS variables included.)
    """

    def __init__(self, slots: Sequence[str], threads: int, pin: Callable[[str], str]) -> None:
        import torch.multiprocessing as mp

        self.slots = list(slots)
        ctx = mp.get_context("spawn")  # fork is unsafe once torch (or CUDA) holds threads
        queue = ctx.Queue()
        for d in self.slots:
            queue.put(d)
        self.ready_dir = tempfile.mkdtemp(prefix="umig-pool-")
        self.executor = ProcessPoolExecutor(max_workers=len(self.slots), mp_context=ctx, initializer=_init_worker,
                                            initargs=(queue, threads, pin, self.ready_dir))
        self.started: list[Future] = []
        self.started_at: float | None = None
        self.startup_s: float | None = None  # measured: from start() to the first worker up

    def start(self) -> None:
        if not self.started:
            self.started_at = time.perf_counter()
            self.started = [self.executor.submit(_ready) for _ in self.slots]

    def up(self) -> set[int]:
        """Pids of the workers whose initializer has finished."""
        try:
            pids = {int(n) for n in os.listdir(self.ready_dir)}
        except OSError:
            return set()
        if pids and self.startup_s is None and self.started_at is not None:
            self.startup_s = time.perf_counter() - self.started_at
            _STARTUP_MEASURED.append(self.startup_s)
        return pids

    @property
    def broken(self) -> bool:
        return bool(getattr(self.executor, "_broken", False))

    def shutdown(self) -> None:
        # A worker still starting up never ran a task: stop it rather than wait seconds for it to boot.
        up = self.up()
        for proc in list((getattr(self.executor, "_processes", None) or {}).values()):
            if proc.pid not in up and proc.is_alive():
                proc.terminate()
        self.executor.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.ready_dir, ignore_errors=True)


_POOL: dict[tuple, _Workers] = {}  # at most one: the process's current workers, by (slots, threads, pin)
_STARTUP_GUESS_S = 3.0  # a spawned CPU worker's start-up before one was measured in this process
_STARTUP_MEASURED: list[float] = []  # start-ups measured in this process (newest last)
_TASK_SECONDS: dict[str, tuple[float, int]] = {}  # task fn -> (seconds per task, weight), timed in this process


def _workers(slots: Sequence[str], threads: int, pin: Callable[[str], str], *, make: bool = True) -> _Workers | None:
    """The process's workers for these slots: reused, or made (replacing others: one set is kept);
    with ``make=False`` only the existing ones (None: none yet)."""
    key = (tuple(slots), threads, getattr(pin, "__module__", ""), getattr(pin, "__qualname__", repr(pin)))
    w = _POOL.get(key)
    if w is not None and not w.broken:
        return w
    if not make:
        return None
    shutdown_workers()
    w = _POOL[key] = _Workers(slots, threads, pin)
    return w


class _NoWorkers:
    """Stands for workers not made yet (a request that never starts them costs no pool set-up)."""

    started: tuple[Future, ...] = ()
    startup_s = None

    def up(self) -> set[int]:
        return set()


def _note_seconds(tasks: Sequence[Any], seconds: float) -> None:
    """Remember how long tasks of each kind took here (the pool's estimate for later phases)."""
    if not tasks:
        return
    kinds = {getattr(t, "fn", "") for t in tasks}
    if len(kinds) == 1:
        kind = kinds.pop()
        rate = seconds / len(tasks)
        old = _TASK_SECONDS.get(kind)
        # The newer runs count more: the first one in a process pays one-off costs.
        _TASK_SECONDS[kind] = (rate if old is None else 0.5 * old[0] + 0.5 * rate, 1)


def _seconds_per_task(tasks: Sequence[Any]) -> float | None:
    """Seconds per task for ``tasks``, from what tasks of their kind took in this process (None: unknown).
    Tasks of one kind scale with their ``cost``; the estimate is the measured mean."""
    kinds = {getattr(t, "fn", "") for t in tasks}
    if not tasks or len(kinds) != 1:
        return None if tasks else 0.0
    seen = _TASK_SECONDS.get(kinds.pop())
    return seen[0] / seen[1] if seen and seen[1] else None


def shutdown_workers() -> None:
    """Stop this process's pool workers (they are otherwise kept until it exits)."""
    while _POOL:
        _POOL.popitem()[1].shutdown()


# Stop workers before concurrent.futures joins them at exit (a worker still booting would hold the exit up).
if hasattr(threading, "_register_atexit"):
    threading._register_atexit(shutdown_workers)  # type: ignore[attr-defined]
else:  # pragma: no cover
    atexit.register(shutdown_workers)


class ProcessPool(Backend):
    """A pool of worker processes, each pinned to one device slot; started once per process.

    Workers open the blob store from ``blobs_url`` (see :class:`WorkerEnv`). ``devices`` lists one
    slot per worker (see :func:`worker_devices`). Each worker takes one
    slot when it starts and calls ``pin`` on it (default :func:`pin_device`: CUDA is
    initialised there, never in this process). Tasks go out in cost-balanced chunks; a worker
    is handed the next chunk as soon as it is done, so every device stays busy. The workers
    outlive the request: the next ``ProcessPool`` with the same slots in this process reuses them.

    ``start`` says when workers are spawned (default: ``UMIG_POOL_START``, else ``auto``):

    * ``auto`` (CPU): the coordinating process is one of the ``N`` workers and starts the other
      ``N - 1`` only when they pay off: once the work left, timed on the tasks it ran itself, is
      more than ``spawn_after_s`` (default: twice a worker's start-up, measured in this process or
      guessed at 3 s) and a core is idle for them (cores less the 1-minute load average; a helper
      sharing a busy core with the coordinator only slows it; not checked when ``spawn_after_s`` is
      given). A small request, or one on busy cores, runs entirely in this process, as
      ``--workers 1`` would; :meth:`describe` says which happened and why. Workers already up from
      an earlier request join at once.
    * ``always``: all ``N`` workers start at once, as GPU slots always do (the coordinator never
      computes with GPUs: CUDA stays in the workers). On CPU, a phase of at least
      ``bridge_min_tasks`` tasks (default: four per process) does not wait for them: the
      coordinator works through chunks until the first worker is up.

    ``help_locally`` is the older name of ``start="auto"`` (True) / ``"always"`` (False).
    """

    name = "pool"

    def __init__(self, blobs_url: str, devices: Sequence[str], threads: int | None = None, *,
                 pin: Callable[[str], str] = pin_device, help_locally: bool | None = None,
                 start: str | None = None, spawn_after_s: float | None = None,
                 bridge_min_tasks: int | None = None) -> None:
        self.devices = list(devices)
        on_cpu = all(d == "cpu" for d in self.devices)
        if start is None:
            start = ("auto" if help_locally else "always") if help_locally is not None else \
                (os.environ.get("UMIG_POOL_START", "").strip().lower() or "auto")
        if start not in POOL_STARTS:
            raise UmigError(f"UMIG_POOL_START={start!r}: expected one of {', '.join(POOL_STARTS)}")
        # On CPU the coordinator is one of the workers (with the workers' thread count, so results
        # do not depend on where a chunk ran); with GPUs it never computes: CUDA stays in the workers.
        self.start_mode = start if on_cpu and len(self.devices) > 1 else "always"
        self.help_locally = self.start_mode == "auto"
        # Bridging pays where a phase splits into several chunks per process (each chunk is then a
        # small share of the phase, so a worker that comes up waits at most that long for work).
        self.bridge_min_tasks = (bridge_min_tasks or 4 * (len(self.devices) + 1)) if on_cpu else None
        spawned = self.devices[1:] if self.help_locally else self.devices
        self.threads = threads or threads_per_worker(len(self.devices))
        self._slots_spawned, self._pin = list(spawned), pin
        self._workers: _Workers | _NoWorkers = _workers(spawned, self.threads, pin, make=False) or _NoWorkers()
        self._spawned = len(spawned)
        self._scheduler = _Scheduler(len(spawned))
        self._spawn_after_s = spawn_after_s
        self._blobs_url = canonical_blobs_url(blobs_url)
        self._request = uuid.uuid4().hex  # workers start each request with empty caches
        self._local_env: WorkerEnv | None = None
        self._local_done, self._local_s, self._left, self._local_chunks = 0, 0.0, 0, 0
        self._remote_chunks = 0
        self._no_idle = False  # no idle core for the helpers was found in this request
        self._defer = False  # inside deferred_flush: in-process phases leave their writes pending
        self._reused = bool(self._workers.started)
        self._decision = ("workers were already up in this process" if self._reused else
                          "started with the pool" if not self.help_locally else
                          "not started: the work never outgrew this process")
        if not self.help_locally:
            self.start()

    @contextlib.contextmanager
    def deferred_flush(self, adopt: Callable[[list[str]], None]) -> Iterator[None]:
        """Phases that run entirely in this process share one flush at the end (as :class:`InProcess`);
        a phase that hands chunks to workers flushes first, since they read blobs from disk."""
        self._defer = True
        try:
            yield
        except BaseException:
            self._defer = False
            if self._local_env is not None:
                adopt([d for _, d in self._local_env.blobs.flush(check=False)])
            raise
        self._defer = False
        if self._local_env is not None:
            adopt([d for _, d in self._local_env.blobs.flush()])

    @property
    def spawn_after_s(self) -> float:
        if self._spawn_after_s is not None:
            return self._spawn_after_s
        return 2.0 * (_STARTUP_MEASURED[-1] if _STARTUP_MEASURED else _STARTUP_GUESS_S)

    def start(self) -> None:
        """Start every worker now (spawning one and importing torch takes seconds)."""
        if isinstance(self._workers, _NoWorkers):
            self._workers = _workers(self._slots_spawned, self.threads, self._pin)
        self._workers.start()

    def _up(self) -> set[int]:
        return self._workers.up()

    def _run_locally(self, chunk: Sequence[Any], progress: Callable[[int], None] | None = None
                     ) -> list[tuple[Any, list[str]]]:
        if self._local_env is None:
            self._local_env = WorkerEnv(self._blobs_url, "cpu", slot="cpu (coordinator)")
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        try:
            return run_tasks(chunk, self._local_env, progress)
        finally:
            torch.set_num_threads(before)
            dt = time.perf_counter() - t0
            self._local_chunks += 1
            self._local_done += len(chunk)
            self._local_s += dt
            self._left -= len(chunk)
            _note_seconds(chunk, dt)
            # Workers are worth starting only when the work left would keep this process busy for
            # longer than ``spawn_after_s``: a small request is done before they could even start.
            if not self._workers.started and not self._no_idle:
                left_s = self._left * self._local_s / max(1, self._local_done)
                if left_s > self.spawn_after_s:
                    self._start_for(left_s)

    def _start_for(self, left_s: float) -> bool:
        """Start the helpers for ``left_s`` of work, if a core is idle for them (a helper that has to share
        a busy core with the coordinator only slows it); returns whether they were started."""
        idle = _idle_cores()
        if idle < 1.0 and self._spawn_after_s is None:
            self._decision = (f"not started: {left_s:.1f} s of work left, but no idle core for a helper "
                              f"({idle:.1f} idle: load average {os.getloadavg()[0]:.1f} on {_cores()} cores)")
            self._no_idle = True
            return False
        self._decision = (f"started: {left_s:.1f} s of work left > {self.spawn_after_s:.1f} s "
                          f"(twice a worker's start-up), {idle:.1f} idle cores")
        self.start()
        return True

    def _in_process(self, tasks: Sequence[Any], progress: Progress | None) -> list[tuple[Any, list[str]]] | None:
        """``auto`` before any worker is up: run the phase here, one task after another with one durable
        flush (as ``--workers 1``), unless the work left would outlast ``spawn_after_s``: estimated from
        tasks of the same kind timed earlier in this process, else from the first few run here (the very
        first excluded: it pays one-off costs), and again every 256 tasks from the time taken so far.
        Returns every result, or None once the workers were started (what ran here is then in
        ``_done_head``)."""
        n = len(tasks)
        if self._local_env is None:
            self._local_env = WorkerEnv(self._blobs_url, "cpu", slot="cpu (coordinator)")
        env = self._local_env
        known = _seconds_per_task(tasks)
        sample = max(2, min(n // 8, 64))  # tasks to time before deciding, when nothing is known
        check = 0 if known is not None else sample  # the next task before which to (re)decide
        results: list[Any] = []
        times: list[float] = []
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        t_start = time.perf_counter()
        try:
            for i, task in enumerate(tasks):
                if i == check:
                    # Re-decided every 256 tasks: once the write queue fills, the time so far includes
                    # the writes too (the first tasks' compute alone under-estimates the phase).
                    per_task = known if known is not None and i == 0 else max(
                        statistics.median(times[1:] or times), (time.perf_counter() - t_start) / i)
                    left_s = per_task * (n - i)
                    if left_s > self.spawn_after_s and not self._no_idle and self._start_for(left_s):
                        break
                    check = i + 256
                env.tag = i
                t0 = time.perf_counter()
                results.append(_call(task, env))
                times.append(time.perf_counter() - t0)
                if progress:
                    progress(i + 1, n)
        except BaseException as e:
            env.tag = None
            e.created_blobs = [d for _, d in env.blobs.flush(check=False)]  # type: ignore[attr-defined]
            raise
        finally:
            torch.set_num_threads(before)
        env.tag = None
        per_task_blobs: list[list[str]] = [[] for _ in results]
        # All of it ran here: inside deferred_flush the writes stay pending for the one flush at the end
        # (as InProcess); otherwise, or before workers join in, they are made durable now.
        if not (self._defer and len(results) == n):
            for tag, digest in env.blobs.flush():
                per_task_blobs[tag if isinstance(tag, int) and 0 <= tag < len(results) else 0].append(digest)
        elapsed = time.perf_counter() - t_start
        self._local_chunks += 1
        self._local_done += len(results)
        self._local_s += elapsed
        if len(times) > 1:  # the first task pays one-off costs; the rest include their writes
            _note_seconds(tasks[1:len(times)], max(elapsed - times[0], sum(times[1:])))
        elif times and known is None:
            _note_seconds(tasks[:1], times[0])
        done = list(zip(results, per_task_blobs))
        if len(done) < n:
            self._done_head = done
            return None
        if not self._decision.startswith("started"):
            self._decision = (f"not started: {n} tasks took {elapsed:.2f} s here; the work left never looked "
                              f"longer than {self.spawn_after_s:.1f} s (twice a worker's start-up)")
        return done

    def run(self, tasks: Sequence[Any], progress: Progress | None = None) -> list[tuple[Any, list[str]]]:
        def wait_any(handles: list[Future], timeout: float | None) -> tuple[list[Any], list[Any]]:
            done, pending = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
            return list(done), list(pending)

        def submit(chunk: list[Any], _w: int) -> Future:
            self._remote_chunks += 1
            return self._workers.executor.submit(_run_chunk, chunk, self._blobs_url, self._request)

        self._left = len(tasks)
        self._done_head: list[tuple[Any, list[str]]] = []
        bridge = (not self.help_locally and self.bridge_min_tasks is not None
                  and len(tasks) >= self.bridge_min_tasks)
        try:
            if self.help_locally and not self._workers.started:
                out = self._in_process(tasks, progress)
                if out is not None:
                    return out
            head = self._done_head
            rest = tasks[len(head):]
            cb = ((lambda d, t: progress(len(head) + d, len(tasks))) if progress and head else progress)
            # Which process runs a chunk is up to the executor: any idle worker takes the next one.
            return head + self._scheduler.run(rest, submit, wait_any, lambda f: f.result(), cb,
                                              local=self._run_locally if self.help_locally or bridge else None,
                                              ready=lambda: len(self._up()),
                                              local_now=None if self.help_locally else (lambda: not self._up()))
        except BrokenProcessPool as e:
            shutdown_workers()  # a worker died: the next request starts fresh ones
            err = UnlearningError("a worker process died before finishing its tasks; no node was changed")
            err.created_blobs = getattr(e, "created_blobs", [])  # type: ignore[attr-defined]
            raise err from None

    def workers(self) -> list[dict[str, Any]]:
        """Start every worker (if not yet) and describe it: pid, slot, device, threads."""
        self.start()
        seen: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 120
        while len(seen) < self._spawned and time.monotonic() < deadline:
            futs = [self._workers.executor.submit(_worker_info, 0.2) for _ in range(self._spawned)]
            for f in futs:
                info = f.result()
                seen[info["pid"]] = info
        return sorted(seen.values(), key=lambda i: i["pid"])

    def close(self) -> None:
        # Every result (and its blobs) is already in. The workers stay for the next request of this
        # process (shutdown_workers() or exit stops them).
        if self._local_env is not None:
            self._local_env.close()
            self._local_env = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": len(self.devices), "devices": self.devices, "threads": self.threads,
                "coordinator_helps": self.help_locally, "start": self.start_mode,
                "workers_started": bool(self._workers.started), "workers_reused": self._reused,
                "decision": self._decision, "chunks_in_coordinator": self._local_chunks,
                "chunks_in_workers": self._remote_chunks,
                **({"worker_startup_s": round(self._workers.startup_s, 3)} if self._workers.startup_s else {})}


# ------------------------------------------------------------------------ Ray
class _RayWorker:
    """A Ray actor: one WorkerEnv on one device (Ray sets CUDA_VISIBLE_DEVICES to its GPU)."""

    def __init__(self, blobs_url: str, use_gpu: bool, threads: int, slot: str) -> None:
        torch.set_num_threads(threads)
        device = pin_device("cuda:0") if use_gpu else "cpu"
        self.env = WorkerEnv(blobs_url, device, slot=slot)

    def run(self, tasks: Sequence[Any]) -> list[tuple[Any, list[str]]]:
        return run_tasks(tasks, self.env)

    def info(self) -> dict[str, Any]:
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "slot": self.env.slot,
                "device": str(self.env.device), "threads": torch.get_num_threads(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


def _aws_env() -> dict[str, str]:
    """The AWS variables of this process (credentials, region, endpoint, retries), for Ray actors: an actor
    inherits the environment of the node's Ray, which may predate them (or be another machine's). Ray keeps
    them in the cluster's metadata: on a cluster with credentials of its own (instance roles), unset them."""
    return {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


def _ray_devices(spec: str | None, gpus: int) -> list[str]:
    """Device slots on a Ray cluster: its GPUs (``cuda`` / ``auto`` with GPUs) or ``cpu``."""
    spec = (spec or "auto").strip().lower()
    if spec == "cpu" or (spec == "auto" and gpus == 0):
        return ["cpu"]
    if spec == "auto" or spec == "cuda":
        if gpus == 0:
            raise UmigError("--device cuda was asked for but the Ray cluster has no GPU")
        return [f"cuda:{i}" for i in range(gpus)]
    if spec.startswith("cuda:"):
        raise UmigError("--device cuda:N names local GPUs; with --backend ray use --device cuda (Ray assigns GPUs)")
    raise UmigError(f"unknown device '{spec}' (auto, cpu, cuda)")


class RayBackend(Backend):
    """Runs the same task chunks on Ray actors, one per worker slot.

    Connects to ``address`` (``auto``, ``HOST:PORT`` or ``ray://HOST:10001``), or to the Ray
    instance this process already initialised, or starts a local one. With GPU slots every
    actor asks Ray for ``1 / workers_per_device`` GPU. Actors open the blob store from
    ``blobs_url``: for ``s3://bucket/prefix`` they need only the URL and the AWS variables, which
    are handed to them from this process's environment (:func:`_aws_env`), so no node needs a
    shared file system; a local directory must be at the same path on every node. Only this
    process (the driver) writes metadata.
    """

    name = "ray"

    def __init__(self, blobs_url: str, *, workers: int | None = 1, device: str | None = "auto",
                 workers_per_device: int | None = None, address: str | None = None,
                 threads: int | None = None) -> None:
        try:
            import ray
        except ImportError:
            raise UmigError("--backend ray needs Ray: pip install 'umig[ray]'") from None
        self._ray = ray
        self._owns = False
        if not ray.is_initialized():
            try:
                ray.init(address=address, include_dashboard=False, logging_level="warning", log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as e:
                where = address or os.environ.get("RAY_ADDRESS") or "a new local instance"
                raise UmigError(f"cannot start or reach Ray ({where}): {str(e).splitlines()[0]}") from None
            self._owns = True
        self.address = address
        self.actors: list[Any] = []
        try:
            self._start_actors(blobs_url, workers, device, workers_per_device, threads)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, blobs_url: str, workers: int | None, device: str | None,
                      workers_per_device: int | None, threads: int | None) -> None:
        ray = self._ray
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        devices = _ray_devices(device, gpus)
        self.devices = worker_devices(devices, workers, workers_per_device)
        self.use_gpu = self.devices[0] != "cpu"
        self.threads = threads or 1
        cpus = int(resources.get("CPU", 0))
        if len(self.devices) * self.threads > cpus:
            raise UmigError(f"{len(self.devices)} Ray worker(s) x {self.threads} CPU need more CPUs than the cluster "
                            f"has ({cpus}); lower --workers")
        per_gpu = 0
        if self.use_gpu:  # actors per GPU: Ray packs them by their fractional GPU request
            per_gpu = workers_per_device or max(1, math.ceil(len(self.devices) / gpus))
        url = canonical_blobs_url(blobs_url)
        options: dict[str, Any] = {"num_cpus": self.threads, "num_gpus": (1.0 / per_gpu) if per_gpu else 0}
        env = _aws_env() if url.startswith("s3://") else {}
        if env:
            options["runtime_env"] = {"env_vars": env}
        actor = ray.remote(**options)(_RayWorker)
        self.actors = [actor.remote(url, self.use_gpu, self.threads, slot) for slot in self.devices]
        self._scheduler = _Scheduler(len(self.actors))

    def run(self, tasks: Sequence[Any], progress: Progress | None = None) -> list[tuple[Any, list[str]]]:
        ray = self._ray

        def wait_any(handles: list[Any], timeout: float | None) -> tuple[list[Any], list[Any]]:
            return ray.wait(handles, num_returns=1, timeout=timeout)

        def result(ref: Any) -> Any:
            try:
                return ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, BaseException):
                    raise cause from None
                raise UnlearningError(f"a Ray task failed: {str(e).splitlines()[0]}") from None
            except ray.exceptions.RayActorError:
                raise UnlearningError("a Ray worker died before finishing its tasks; no node was changed") from None

        return self._scheduler.run(tasks, lambda chunk, w: self.actors[w].run.remote(chunk), wait_any, result,
                                   progress)

    def workers(self) -> list[dict[str, Any]]:
        return self._ray.get([a.info.remote() for a in self.actors])

    def close(self) -> None:
        for a in getattr(self, "actors", []):
            try:
                self._ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        self.actors = []
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": len(self.devices), "devices": self.devices,
                "threads": self.threads, "address": self.address}


def make_backend(
    blobs_url: str,
    *,
    workers: int | None = 1,
    device: str | None = "auto",
    workers_per_device: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    device_count: Callable[[], int] = cuda_count,
    coordinator_helps: bool | None = None,
    pool_start: str | None = None,
) -> Backend:
    """Choose a backend from CLI/API options; its workers open the blob store at ``blobs_url``
    (``store.blobs.url``: a directory, or ``s3://bucket/prefix``). A CPU pool spawns its workers when they pay off
    (``pool_start="auto"``, the default unless ``UMIG_POOL_START`` says otherwise) or at once
    (``"always"``); ``coordinator_helps`` is the older spelling (see :class:`ProcessPool`)."""
    if backend not in BACKENDS:
        raise UmigError(f"unknown backend '{backend}' ({', '.join(BACKENDS)})")
    if backend == "ray":
        return RayBackend(blobs_url, workers=workers, device=device, workers_per_device=workers_per_device,
                          address=ray_address)
    if ray_address is not None:
        raise UmigError("--ray-address needs --backend ray")
    devices = parse_devices(device, count=device_count)
    slots = worker_devices(devices, workers, workers_per_device)
    if len(slots) == 1:
        return InProcess(blobs_url, slots[0])
    return ProcessPool(blobs_url, slots, help_locally=coordinator_helps, start=pool_start)
