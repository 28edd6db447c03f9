"""Execution backends: run a phase of independent tasks in-process, in a worker pool, or on Ray.

Every backend has one interface, :meth:`Backend.run`, taking a list of
``umig.unlearner.Task`` and returning their results in order. Workers read
blobs and write new ones; they never touch the metadata database (only the
coordinating process commits). Each result comes back with the digests of the
blobs its task created, so the coordinator can delete them if the operation
fails before it commits.

Backends:

* :class:`InProcess` - ``--workers 1``: tasks run one after another in this process.
* :class:`ProcessPool` - spawned worker processes, each pinned to one device (one per GPU, or
  ``--workers-per-device`` per GPU). Tasks go out in cost-balanced chunks that idle workers
  pull, so every device stays busy; CUDA is initialised only inside the workers.
* :class:`RayBackend` - ``--backend ray [--ray-address ADDR]``: the same chunks run on Ray
  actors (with a GPU each where ``--device cuda``); the store must be on a path every node of
  the cluster can read and write (see docs/ray.md).

Blob writes are durable before they are reported: every blob is fsynced before it is renamed
into place (``umig.blobs``), and a task's results are handed back only after all of its writes
finished. Writes go through a few threads (:class:`umig.blobs.BufferedBlobStore`) so that the fsyncs of
many small blobs overlap; ext4 and most journaling file systems then commit them together.
"""

from __future__ import annotations

import contextlib
import heapq
import importlib
import math
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch
from torch import nn

from umig.arch import build_model
from umig.blobs import BufferedBlobStore
from umig.data import Data, DataRef, verify
from umig.errors import UmigError, UnlearningError
from umig.store import NodeSnapshot, load_state

Progress = Callable[[int, int], None]  # (done, total)
BACKENDS = ("local", "ray")


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
    """What a task sees on its worker: the blob store, its device, and loaders with a small cache."""

    def __init__(self, store_root: str, device: str = "cpu", *, slot: str | None = None,
                 write_threads: int = 4) -> None:
        self.store_root = store_root
        self.device = torch.device(device)
        self.slot = slot or device  # the device this worker was scheduled as (for reports)
        self.blobs = BufferedBlobStore(os.path.join(store_root, "blobs"), threads=write_threads)
        self.tag: Any = None  # which task the blobs written now belong to
        self._data_cache: dict[tuple[str, str | None], Any] = {}
        # Per-worker memo for tasks (e.g. a merged FIM shared by many nodes of one group).
        self.cache: dict[Any, Any] = {}

    def put(self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        """Write a blob; durable before the task's result is handed back (see :func:`run_tasks`)."""
        return self.blobs.put_deferred(dict(tensors), metadata, tag=self.tag)

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


def run_tasks(tasks: Sequence[Any], env: WorkerEnv,
              progress: Callable[[int], None] | None = None) -> list[tuple[Any, list[str]]]:
    """Run tasks one after another in ``env``; return ``(result, created blobs)`` per task.

    Blob writes of all the tasks overlap; this returns only once every one is durable. On an
    error, the blobs written so far are on the exception as ``created_blobs`` (the coordinator
    removes them with the rolled-back operation).
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

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name}

    def __enter__(self) -> "Backend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InProcess(Backend):
    """Runs tasks one after another in this process (``--workers 1``: easiest to debug)."""

    name = "inprocess"

    def __init__(self, store_root: str, device: str = "cpu") -> None:
        self.env = WorkerEnv(store_root, device)

    def run(self, tasks: Sequence[Any], progress: Progress | None = None) -> list[tuple[Any, list[str]]]:
        n = len(tasks)
        return run_tasks(tasks, self.env, (lambda d: progress(d, n)) if progress else None)

    def close(self) -> None:
        self.env.close()

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": 1, "devices": [str(self.env.device)]}


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


# Per-process state of a pool worker (set by the initializer).
_WORKER_ENV: WorkerEnv | None = None


def _init_worker(store_root: str, device_queue: Any, threads: int, pin: Callable[[str], str] = pin_device,
                 ready_dir: str | None = None) -> None:
    global _WORKER_ENV
    slot = device_queue.get()
    torch.set_num_threads(threads)
    _WORKER_ENV = WorkerEnv(store_root, pin(slot), slot=slot)
    if ready_dir is not None:  # the last step: a worker without this file has not touched a task queue
        with contextlib.suppress(OSError):
            open(os.path.join(ready_dir, str(os.getpid())), "x").close()


def _ready() -> int:
    """Answered by a worker once its initializer ran: it is up and pinned."""
    assert _WORKER_ENV is not None, "worker initializer did not run"
    return os.getpid()


def _run_chunk(tasks: Sequence[Any]) -> list[tuple[Any, list[str]]]:
    assert _WORKER_ENV is not None, "worker initializer did not run"
    return run_tasks(tasks, _WORKER_ENV)


def _worker_info(linger: float = 0.0) -> dict[str, Any]:
    assert _WORKER_ENV is not None, "worker initializer did not run"
    time.sleep(linger)  # keep this worker busy a moment, so the next request reaches another one
    return {"pid": os.getpid(), "slot": _WORKER_ENV.slot, "device": str(_WORKER_ENV.device),
            "threads": torch.get_num_threads()}


class ProcessPool(Backend):
    """A pool of spawned worker processes, each pinned to one device slot.

    ``devices`` lists one slot per worker (see :func:`worker_devices`). Each worker takes one
    slot when it starts and calls ``pin`` on it (default :func:`pin_device`: CUDA is
    initialised there, never in this process). Tasks go out in cost-balanced chunks; a worker
    is handed the next chunk as soon as it is done, so every device stays busy.

    Workers start at once. Starting one (a process importing torch) takes seconds: on CPU, a
    phase of at least ``bridge_min_tasks`` tasks (default: four per process) does not wait for
    them, the coordinating process works through chunks itself until the first worker is up,
    then only hands out chunks (smaller phases run on the workers only: ``--workers N`` means N
    worker processes).

    With ``help_locally`` (CPU only) the coordinating process is one of the workers instead
    (``N`` workers: this process and ``N - 1`` spawned ones) for every phase, and starts the
    others only once the work left is estimated above ``spawn_after_s`` seconds; they join in
    as soon as each is up (``make_backend(coordinator_helps=True)``).
    """

    name = "pool"

    def __init__(self, store_root: str, devices: Sequence[str], threads: int | None = None, *,
                 pin: Callable[[str], str] = pin_device, help_locally: bool = False,
                 spawn_after_s: float = 2.0, bridge_min_tasks: int | None = None) -> None:
        import torch.multiprocessing as mp

        self.devices = list(devices)
        # On CPU the coordinator is one of the workers (with the workers' thread count, so results
        # do not depend on where a chunk ran); with GPUs it never computes: CUDA stays in the workers.
        on_cpu = all(d == "cpu" for d in self.devices)
        self.help_locally = help_locally and len(self.devices) > 1 and on_cpu
        # Bridging pays where a phase splits into several chunks per process (each chunk is then a
        # small share of the phase, so a worker that comes up waits at most that long for work).
        self.bridge_min_tasks = (bridge_min_tasks or 4 * (len(self.devices) + 1)) if on_cpu else None
        spawned = self.devices[1:] if self.help_locally else self.devices
        ctx = mp.get_context("spawn")  # fork is unsafe once torch (or CUDA) holds threads
        queue = ctx.Queue()
        for d in spawned:
            queue.put(d)
        self.threads = threads or threads_per_worker(len(self.devices))
        self._queue = queue
        self._ready_dir = tempfile.mkdtemp(prefix="umig-pool-")
        self.pool = ProcessPoolExecutor(
            max_workers=len(spawned),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(os.path.abspath(store_root), queue, self.threads, pin, self._ready_dir),
        )
        self._spawned = len(spawned)
        self._scheduler = _Scheduler(len(spawned))
        self.spawn_after_s = spawn_after_s
        self._store_root = store_root
        self._local_env: WorkerEnv | None = None
        self._local_done, self._local_s, self._left, self._local_chunks = 0, 0.0, 0, 0
        self._started: list[Future] = []
        if not self.help_locally:
            self.start()

    def start(self) -> None:
        """Start every worker now (spawning one and importing torch takes seconds)."""
        if not self._started:
            self._started = [self.pool.submit(_ready) for _ in range(self._spawned)]

    def _up(self) -> set[int]:
        """Pids of the workers whose initializer has finished."""
        try:
            return {int(n) for n in os.listdir(self._ready_dir)}
        except OSError:
            return set()

    def _run_locally(self, chunk: list[Any]) -> list[tuple[Any, list[str]]]:
        if self._local_env is None:
            self._local_env = WorkerEnv(self._store_root, "cpu", slot="cpu (coordinator)")
        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        try:
            return run_tasks(chunk, self._local_env)
        finally:
            torch.set_num_threads(before)
            # Workers are worth starting only when the work left would keep this process busy for
            # longer than ``spawn_after_s``: a small request is done before they could even start.
            self._local_chunks += 1
            self._local_done += len(chunk)
            self._local_s += time.perf_counter() - t0
            self._left -= len(chunk)
            if not self._started and self._left * self._local_s / max(1, self._local_done) > self.spawn_after_s:
                self.start()

    def run(self, tasks: Sequence[Any], progress: Progress | None = None) -> list[tuple[Any, list[str]]]:
        def wait_any(handles: list[Future], timeout: float | None) -> tuple[list[Any], list[Any]]:
            done, pending = wait(handles, timeout=timeout, return_when=FIRST_COMPLETED)
            return list(done), list(pending)

        self._left = len(tasks)
        bridge = (not self.help_locally and self.bridge_min_tasks is not None
                  and len(tasks) >= self.bridge_min_tasks)
        try:
            # Which process runs a chunk is up to the executor: any idle worker takes the next one.
            return self._scheduler.run(tasks, lambda chunk, _w: self.pool.submit(_run_chunk, chunk), wait_any,
                                       lambda f: f.result(), progress,
                                       local=self._run_locally if self.help_locally or bridge else None,
                                       ready=lambda: len(self._up()),
                                       local_now=None if self.help_locally else (lambda: not self._up()))
        except BrokenProcessPool as e:
            err = UnlearningError("a worker process died before finishing its tasks; no node was changed")
            err.created_blobs = getattr(e, "created_blobs", [])  # type: ignore[attr-defined]
            raise err from None

    def workers(self) -> list[dict[str, Any]]:
        """Start every worker (if not yet) and describe it: pid, slot, device, threads."""
        self.start()
        seen: dict[int, dict[str, Any]] = {}
        deadline = time.monotonic() + 120
        while len(seen) < self._spawned and time.monotonic() < deadline:
            futs = [self.pool.submit(_worker_info, 0.2) for _ in range(self._spawned)]
            for f in futs:
                info = f.result()
                seen[info["pid"]] = info
        return sorted(seen.values(), key=lambda i: i["pid"])

    def close(self) -> None:
        # Every result (and its blobs) is already in: no need to wait for the workers' interpreters
        # to exit. A worker still starting up (the coordinator did the work without it) never ran a
        # task: stop it, rather than wait seconds for it to boot only to exit.
        up = self._up()
        for proc in list((getattr(self.pool, "_processes", None) or {}).values()):
            if proc.pid not in up and proc.is_alive():
                proc.terminate()
        self.pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._ready_dir, ignore_errors=True)
        if self._local_env is not None:
            self._local_env.close()
            self._local_env = None

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": len(self.devices), "devices": self.devices, "threads": self.threads,
                "coordinator_helps": self.help_locally, "workers_started": bool(self._started),
                "chunks_in_coordinator": self._local_chunks}


# ------------------------------------------------------------------------ Ray
class _RayWorker:
    """A Ray actor: one WorkerEnv on one device (Ray sets CUDA_VISIBLE_DEVICES to its GPU)."""

    def __init__(self, store_root: str, use_gpu: bool, threads: int, slot: str) -> None:
        torch.set_num_threads(threads)
        device = pin_device("cuda:0") if use_gpu else "cpu"
        self.env = WorkerEnv(store_root, device, slot=slot)

    def run(self, tasks: Sequence[Any]) -> list[tuple[Any, list[str]]]:
        return run_tasks(tasks, self.env)

    def info(self) -> dict[str, Any]:
        import socket

        return {"pid": os.getpid(), "host": socket.gethostname(), "slot": self.env.slot,
                "device": str(self.env.device), "threads": torch.get_num_threads(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES")}


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
    actor asks Ray for ``1 / workers_per_device`` GPU. Actors read and write blobs under
    ``store_root``, which must be the same path on every node (a shared file system); only
    this process (the driver) writes metadata.
    """

    name = "ray"

    def __init__(self, store_root: str, *, workers: int | None = 1, device: str | None = "auto",
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
            self._start_actors(store_root, workers, device, workers_per_device, threads)
        except BaseException:
            self.close()
            raise

    def _start_actors(self, store_root: str, workers: int | None, device: str | None,
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
        actor = ray.remote(num_cpus=self.threads, num_gpus=(1.0 / per_gpu) if per_gpu else 0)(_RayWorker)
        root = os.path.abspath(store_root)
        self.actors = [actor.remote(root, self.use_gpu, self.threads, slot) for slot in self.devices]
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
    store_root: str,
    *,
    workers: int | None = 1,
    device: str | None = "auto",
    workers_per_device: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    device_count: Callable[[], int] = cuda_count,
    coordinator_helps: bool = False,
) -> Backend:
    """Choose a backend from CLI/API options (``coordinator_helps``: see :class:`ProcessPool`)."""
    if backend not in BACKENDS:
        raise UmigError(f"unknown backend '{backend}' ({', '.join(BACKENDS)})")
    if backend == "ray":
        return RayBackend(store_root, workers=workers, device=device, workers_per_device=workers_per_device,
                          address=ray_address)
    if ray_address is not None:
        raise UmigError("--ray-address needs --backend ray")
    devices = parse_devices(device, count=device_count)
    slots = worker_devices(devices, workers, workers_per_device)
    if len(slots) == 1:
        return InProcess(store_root, slots[0])
    return ProcessPool(store_root, slots, help_locally=coordinator_helps)
