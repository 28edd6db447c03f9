"""Execution backends: run a phase of independent tasks in-process or in a worker pool.

Every backend has one interface, :meth:`Backend.run`, taking a list of
``unlearners.base.Task`` and returning their results in order. Workers read
blobs and write new ones; they never touch the metadata database (only the
coordinating process commits). Each result comes back with the digests of the
blobs its task created, so the coordinator can delete them if the operation
fails before it commits.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import torch
from torch import nn

from umig.blobs import BlobStore
from umig.errors import UmigError, UnlearningError

Progress = Callable[[int, int], None]  # (done, total)


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
        return [f"cuda:{i}" for i in ids]
    raise UmigError(f"unknown device '{spec}' (auto, cpu, cuda, cuda:0,1)")


def worker_devices(devices: Sequence[str], workers: int | None, workers_per_device: int | None = None) -> list[str]:
    """The device each worker slot is pinned to (round-robin, so devices stay evenly loaded)."""
    if workers_per_device is not None:
        if workers_per_device < 1:
            raise UmigError("--workers-per-device must be at least 1")
        return [d for d in devices for _ in range(workers_per_device)]
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


# ---------------------------------------------------------------- worker env
class WorkerEnv:
    """What a task sees on its worker: the blob store, its device, and loaders with a small cache."""

    def __init__(self, store_root: str, device: str = "cpu") -> None:
        self.store_root = store_root
        self.device = torch.device(device)
        self.blobs = BlobStore(os.path.join(store_root, "blobs"))
        self.created: list[str] = []
        self._data_cache: dict[tuple[str, str | None], Any] = {}
        # Per-worker memo for tasks (e.g. a merged FIM shared by many nodes of one group).
        self.cache: dict[Any, Any] = {}

    def put(self, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None) -> str:
        digest, created = self.blobs.put_tensors(dict(tensors), metadata)
        if created:
            self.created.append(digest)
        return digest

    def head_tensors(self, snap: Any) -> dict[str, torch.Tensor]:
        """Only the head blob: a head-only update never reads the rest of the checkpoint."""
        return self.blobs.load(snap.head_blob, owner=snap.name)

    def state_from_digests(self, digests: Mapping[str, str | None], owner: str | None = None) -> dict[str, torch.Tensor]:
        from umig.store import apply_delta

        sd = self.blobs.load(digests["body"], owner=owner)
        sd.update(self.blobs.load(digests["head"], owner=owner))
        if digests.get("delta"):
            apply_delta(sd, self.blobs.load(digests["delta"], owner=owner))
        return sd

    def state_dict(self, snap: Any) -> dict[str, torch.Tensor]:
        return self.state_from_digests({"body": snap.body, "head": snap.head_blob, "delta": snap.delta}, snap.name)

    def build(self, snap: Any) -> nn.Module:
        from umig.arch import ArchSpec

        return ArchSpec.from_json(snap.arch).build()

    def load_model(self, snap: Any, state: Mapping[str, torch.Tensor] | None = None) -> nn.Module:
        from umig.arch import load_weights

        model = self.build(snap)
        load_weights(model, state if state is not None else self.state_dict(snap))
        return model.to(self.device).eval()

    def node_data(self, snap: Any):
        """The node's own training data, resolved once per worker and checked against its fingerprint."""
        from umig.data import DataRef, verify

        if snap.data_ref is None:
            return None
        key = (repr(sorted(snap.data_ref.items())), snap.data_fingerprint)
        if key not in self._data_cache:
            self._data_cache[key] = verify(DataRef.from_json(snap.data_ref), snap.data_fingerprint)
        return self._data_cache[key]


def _import(spec: str) -> Callable[..., Any]:
    module, _, attr = spec.partition(":")
    return getattr(importlib.import_module(module), attr)


def execute_task(task: Any, env: WorkerEnv) -> tuple[Any, list[str]]:
    """Run one task in ``env``; return its result and the blobs it created."""
    env.created = []
    try:
        result = _import(task.fn)(task.payload, env)
    except UmigError as e:
        # Name the node: in a pool, which task failed is otherwise lost.
        if task.node and task.node not in str(e):
            raise type(e)(f"node '{task.node}': {e}") from None
        raise
    return result, list(env.created)


# ------------------------------------------------------------------- backends
class Backend(ABC):
    """Runs a list of independent tasks and returns ``(result, created_blobs)`` pairs in task order."""

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
        out = []
        for i, t in enumerate(tasks):
            out.append(execute_task(t, self.env))
            if progress:
                progress(i + 1, len(tasks))
        return out

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": 1, "devices": [str(self.env.device)]}


# Per-process state of a pool worker (set by the initializer).
_WORKER_ENV: WorkerEnv | None = None


def _init_worker(store_root: str, device_queue: Any, threads: int) -> None:
    global _WORKER_ENV
    device = device_queue.get()
    torch.set_num_threads(threads)
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))  # CUDA is initialised here, inside the worker only
    _WORKER_ENV = WorkerEnv(store_root, device)


def _run_chunk(tasks: Sequence[Any]) -> list[tuple[Any, list[str]]]:
    assert _WORKER_ENV is not None, "worker initializer did not run"
    return [execute_task(t, _WORKER_ENV) for t in tasks]


def chunk_tasks(tasks: Sequence[Any], n_workers: int, per_worker: int = 4) -> list[list[int]]:
    """Split task indices into chunks: big enough to amortise inter-process overhead on thousands of
    tiny tasks, small enough (about ``per_worker`` chunks per worker) to balance load; costliest first."""
    if not tasks:
        return []
    order = sorted(range(len(tasks)), key=lambda i: -getattr(tasks[i], "cost", 1.0))
    n_chunks = min(len(tasks), max(1, n_workers * per_worker))
    chunks: list[list[int]] = [[] for _ in range(n_chunks)]
    loads = [0.0] * n_chunks
    for i in order:  # greedy longest-processing-time assignment
        j = min(range(n_chunks), key=loads.__getitem__)
        chunks[j].append(i)
        loads[j] += getattr(tasks[i], "cost", 1.0)
    return [c for c in chunks if c]


class ProcessPool(Backend):
    """A pool of spawned worker processes, each pinned to one device."""

    name = "pool"

    def __init__(self, store_root: str, devices: Sequence[str], threads: int | None = None) -> None:
        import torch.multiprocessing as mp

        self.devices = list(devices)
        ctx = mp.get_context("spawn")  # fork is unsafe once torch (or CUDA) holds threads
        queue = ctx.Queue()
        for d in self.devices:
            queue.put(d)
        self.threads = threads or threads_per_worker(len(self.devices))
        self.pool = ProcessPoolExecutor(
            max_workers=len(self.devices),
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(store_root, queue, self.threads),
        )

    def run(self, tasks: Sequence[Any], progress: Progress | None = None) -> list[tuple[Any, list[str]]]:
        results: list[tuple[Any, list[str]] | None] = [None] * len(tasks)
        chunks = chunk_tasks(tasks, len(self.devices))
        futures = {self.pool.submit(_run_chunk, [tasks[i] for i in c]): c for c in chunks}
        done_count = 0
        pending = set(futures)
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    idx = futures[f]
                    for i, r in zip(idx, f.result()):
                        results[i] = r
                    done_count += len(idx)
                    if progress:
                        progress(done_count, len(tasks))
        except BrokenProcessPool:
            raise UnlearningError("a worker process died before finishing its tasks; no node was changed") from None
        except BaseException:
            for f in pending:
                f.cancel()
            raise
        return results  # type: ignore[return-value]

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.name, "workers": len(self.devices), "devices": self.devices, "threads": self.threads}


def make_backend(
    store_root: str,
    *,
    workers: int | None = 1,
    device: str | None = "auto",
    workers_per_device: int | None = None,
    backend: str = "local",
    ray_address: str | None = None,
    device_count: Callable[[], int] = cuda_count,
) -> Backend:
    """Choose a backend from CLI/API options."""
    if backend not in ("local",):
        raise UmigError(f"unknown backend '{backend}' (local)")
    devices = parse_devices(device, count=device_count)
    slots = worker_devices(devices, workers, workers_per_device)
    if len(slots) == 1:
        return InProcess(store_root, slots[0])
    return ProcessPool(store_root, slots)
