"""The unlearning engine: plan -> unlearner phases -> backend -> one committed operation.

``Store.unlearn`` and ``umig unlearn`` both land here. The coordinator holds the
store lock and an open transaction for the whole request; workers only write
blobs; the new node versions, the operation and its audit data are committed
together at the end, so an error or a kill leaves every node where it was.

``Store.add_node`` lands here too (:func:`add_node`): a node derived from a version an
operation superseded, or trained on data it forgot, is refused by ``umig.ingest``'s guard,
or with ``catch_up`` recorded and brought up to date (:func:`catch_up_node`): each
superseding operation runs again on the new node alone, and the update is attached to
that operation (not a new one), so reverting or purging it covers the node too.
"""

from __future__ import annotations

import gc
import json
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from umig import graph as G
from umig import ingest
from umig import unlearner as U
from umig.data import Data, DataRef, parse_ref, resolve, source_positions, verify
from umig.errors import UnlearningError
from umig.evaluate import unlearning_accuracy
from umig.execution import Backend, make_backend
from umig.fisher import FIM, head_fisher
from umig.forget import ForgetSet, SampleSet, source_fingerprint
from umig.store import NewVersion, NodeInfo, Request, SqlStore

PhaseProgress = Callable[[str, int, int], None]  # (phase name, done, total)


@dataclass
class NodeOutcome:
    """One affected node in an operation's result."""

    name: str
    role: str
    version_before: int
    version_after: int
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "role": self.role,
            "version_before": self.version_before,
            "version_after": self.version_after,
            "seconds": round(self.seconds, 6),
            **self.metrics,
        }


@dataclass
class UnlearnResult:
    """What ``unlearn`` did (or, with ``dry_run``, would do)."""

    operation: str | None
    labels: tuple[int, ...]
    method: str
    params: dict[str, Any]
    plan: G.Plan
    phases: list[dict[str, Any]]
    nodes: list[NodeOutcome]
    wall_s: float
    eval_s: float
    backend: dict[str, Any]
    dry_run: bool = False
    request: Request = field(default_factory=Request)  # the deletion request it answers

    def to_json(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "dry_run": self.dry_run,
            **self.request.to_json(),
            "labels": list(self.labels),
            "method": self.method,
            "params": self.params,
            "plan": self.plan.to_json(),
            "phases": self.phases,
            "backend": self.backend,
            "nodes": [n.to_json() for n in self.nodes],
            "wall_s": round(self.wall_s, 6),
            "eval_s": round(self.eval_s, 6),
        }


Forget = ForgetSet | Sequence[int]
# The deletion request an operation answers: a Request, or a mapping of requester/reason/ticket.
RequestLike = Request | Mapping[str, Any] | None

# The method used when a request names none, by the kinds its forget set holds (README
# "Forgetting samples and clients" gives the measurements behind the choice).
DEFAULT_METHODS = {"labels": "fiun", "samples": "retrain", "client": "retrain"}


def default_method(forget: ForgetSet) -> str:
    """FIUn for labels alone; for samples or clients, the method chosen from measurements."""
    kinds = [k for k in forget.kinds if k != "labels"] or ["labels"]
    return DEFAULT_METHODS[kinds[0]]


def forget_set(store: SqlStore, forget: Forget, clients: Sequence[str] = ()) -> ForgetSet:
    """The request's forget set, with every client (given here or in ``forget``) resolved to
    the sample set of that node's own training data (its reference and subset)."""
    fs = forget if isinstance(forget, ForgetSet) else ForgetSet(labels=tuple(forget))
    samples = list(fs.samples)
    for name in dict.fromkeys(clients):
        info = store.node(name)
        if info.data_ref is None:
            raise UnlearningError(f"node '{name}' has no training data of its own to forget (is it an aggregate?)")
        ref = DataRef.from_json(info.data_ref)
        _, positions = source_positions(ref)
        samples.append(SampleSet(dataset=source_fingerprint(ref.source), source=ref.source,
                                 indices=np.unique(positions), size=int(positions.size), client=name))
    return ForgetSet(labels=fs.labels, samples=tuple(samples))


def _holdings(store: SqlStore, fs: ForgetSet, g: Any) -> tuple[dict[str, np.ndarray], dict[str, tuple[int, int]]]:
    """Per node with data: positions (within its own data) of forgotten samples, and
    (forgotten, remaining) counts. Labels alone are counted from label counts, without I/O."""
    positions: dict[str, np.ndarray] = {}
    counts: dict[str, tuple[int, int]] = {}
    datasets = {s.dataset for s in fs.samples}
    labels = set(fs.labels)
    # Labels alone need no data reference parsed: only which nodes have data.
    refs = store.data_refs() if datasets else dict.fromkeys(store.data_nodes(), (None, None))
    attrs = g._node  # node -> attributes, without networkx's view per look-up
    empty: dict[int, int] = {}
    for name, (ref_json, _fp) in refs.items():
        node = attrs.get(name)
        if node is None:
            continue
        size = int(node.get("data_size", 0))
        label_counts = node.get("label_counts", empty)
        by_label = 0
        for lab in labels:  # a few labels, not every count the node holds
            by_label += label_counts.get(lab, 0)
        ref = DataRef.from_json(ref_json) if datasets else None
        if ref is not None and source_fingerprint(ref.source) in datasets:
            base, pos = source_positions(ref)
            mask = fs.mask(base.targets[pos].numpy(), source_fingerprint(ref.source), pos)
            positions[name] = np.flatnonzero(mask)
            gone = int(mask.sum())
        else:
            gone = by_label
        counts[name] = (gone, size - gone)
    return positions, counts


@contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Planning builds hundreds of thousands of long-lived objects at once (the graph, the snapshots);
    the cyclic collector would scan them over and over (a third of planning 50,000 nodes). Reference
    counting still frees everything acyclic; the collector runs again afterwards."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _job(store: SqlStore, forget: ForgetSet, method: U.Unlearner, params: Mapping[str, Any], policy: str,
         from_nodes: Sequence[str] | None, seed: int) -> U.Job:
    with _no_cycle_collection():
        return _build_job(store, forget, params, policy, from_nodes, seed)


def _build_job(store: SqlStore, forget: ForgetSet, params: Mapping[str, Any], policy: str,
               from_nodes: Sequence[str] | None, seed: int) -> U.Job:
    if not forget:
        raise UnlearningError("the forget set is empty: no labels, samples or clients were given")
    g = store.graph()
    positions, counts = _holdings(store, forget, g)
    if forget.samples and not any(counts.get(n, (0, 0))[0] for n in positions):
        named = "; ".join(s.to_json().get("client") or s.source for s in forget.samples)
        raise UnlearningError(f"no node was trained on the samples to forget ({named}): "
                              "no node's data comes from that dataset or holds those indices")
    bfs = G.bfs_order(g)
    plan = G.plan(g, forget.labels, policy=policy, from_nodes=from_nodes,
                  holders=[n for n in g if counts.get(n, (0, 0))[0] and n in positions], what=forget.describe(),
                  order=bfs)
    plan.forget, plan.counts = forget.to_json(), counts
    # Parents are part of a node's lineage context (FedAvg clients, retrain inputs); so are the
    # nodes below an aggregate whose data it stands for (multi-layer FL).
    # One walk up from every affected node at once (not one ancestor search per node: quadratic on
    # a long lineage, whose nodes share most of their ancestors).
    names = set(plan.affected)
    stack = list(names)
    pred = g._pred  # networkx's adjacency dict: its views cost more than this walk
    while stack:
        for p in pred[stack.pop()]:
            if p not in names:
                names.add(p)
                stack.append(p)
    names |= set(plan.discovery)  # with --from, a discovery node may lie outside
    order = bfs if len(names) == len(bfs) else [n for n in bfs if n in names]
    return U.Job(blobs_url=store.blobs.url, labels=plan.labels, plan=plan, graph=g,
                 nodes=store.snapshots(order), params=dict(params), seed=seed, forget=forget,
                 positions={n: positions[n] for n in order if n in positions},
                 counts={n: counts[n] for n in order if n in counts})


def plan_unlearning(store: SqlStore, forget: Forget = (), *, clients: Sequence[str] = (), method: str | None = None,
                    params: Mapping[str, Any] | None = None, policy: str = "first",
                    from_nodes: Sequence[str] | None = None, request: RequestLike = None) -> UnlearnResult:
    """The plan of a request, without running it (``umig unlearn --dry-run``)."""
    req = Request.of(request)
    fs = forget_set(store, forget, clients)
    method = method or default_method(fs)
    m = U.get(method)
    resolved = m.resolve_params(params or {})
    m.check_kinds(fs)
    with _no_cycle_collection():
        job = _build_job(store, fs, resolved, policy, from_nodes, 0)
        m.check(job)
        return UnlearnResult(
            operation=None, labels=job.labels, method=method, params=resolved, plan=job.plan,
            phases=m.describe_phases(job), nodes=[
                NodeOutcome(n, job.plan.role(n), job.nodes[n].version, job.nodes[n].version, 0.0)
                for n in job.plan.affected
            ], wall_s=0.0, eval_s=0.0, backend={}, dry_run=True, request=req,
        )


def _drive(method: U.Unlearner, job: U.Job, backend: Backend, store: SqlStore,
           progress: PhaseProgress | None) -> list[U.NodeResult]:
    phase_names = [p["name"] for p in method.describe_phases(job)]
    gen = method.schedule(job)
    # One durable flush for all the phases where the backend allows it (it writes in this process):
    # the commit needs every blob on disk, not each phase.
    with backend.deferred_flush(store.adopt_blobs):
        try:
            tasks = next(gen)
            i = 0
            while True:
                name = phase_names[i] if i < len(phase_names) else f"phase {i + 1}"
                cb = (lambda d, t, _n=name: progress(_n, d, t)) if progress else None
                if progress:
                    progress(name, 0, len(tasks))
                pairs = backend.run(tasks, cb)
                for _, created in pairs:
                    store.adopt_blobs(created)
                tasks = gen.send([r for r, _ in pairs])
                i += 1
        except StopIteration as stop:
            results = list(stop.value or [])
    return results


def unlearn(
    store: SqlStore,
    forget: Forget = (),
    *,
    clients: Sequence[str] = (),
    method: str | None = None,
    params: Mapping[str, Any] | None = None,
    policy: str = "first",
    from_nodes: Sequence[str] | None = None,
    workers: int | None = None,
    device: str | None = "auto",
    workers_per_device: int | None = None,
    backend: str | Backend = "local",
    ray_address: str | None = None,
    evaluate: bool = True,
    eval_data: str | None = None,
    seed: int = 0,
    progress: PhaseProgress | None = None,
    request: RequestLike = None,
) -> UnlearnResult:
    """Forget ``forget`` (a :class:`umig.forget.ForgetSet`, or labels) and the data of ``clients``
    across the lineage as one operation; see the module docstring. ``request`` (who asked, why,
    the ticket: a :class:`umig.store.Request` or a mapping) is recorded with the operation."""
    req = Request.of(request)  # a malformed request fails before anything runs
    fs = forget_set(store, forget, clients)
    method = method or default_method(fs)
    m = U.get(method)
    resolved = m.resolve_params(params or {})
    eval_ref = _eval_ref(eval_data) if eval_data else None
    m.check_kinds(fs)
    with store.transaction():
        job = _job(store, fs, m, resolved, policy, from_nodes, seed)
        m.check(job)
        with _backend(store, backend, workers=workers, device=device, workers_per_device=workers_per_device,
                      ray_address=ray_address) as be:
            by_node, wall = _results(m, method, job, be, store, progress)
            t1 = time.perf_counter()
            metrics = _evaluate(store, job, by_node, be, eval_ref, progress) if evaluate else {}
            eval_s = time.perf_counter() - t1
        op = _commit(store, job, method, resolved, by_node, metrics, wall, eval_s, be.describe(), req)
        op.phases = m.describe_phases(job)
    return op


def reference(
    store: SqlStore,
    operation: str,
    forget: ForgetSet,
    *,
    nodes: Sequence[str],
    policy: str = "first",
    method: str = "retrain",
    workers: int | None = None,
    device: str | None = "auto",
    backend: str | Backend = "local",
    seed: int = 0,
    progress: PhaseProgress | None = None,
) -> dict[str, dict[str, str | None]]:
    """Run ``method`` (exact retraining by default) for ``forget`` on an operation's ``nodes`` and keep the
    results as that operation's *reference* (``SqlStore.commit_reference``), not as versions: nothing
    becomes live. ``forget`` must be resolved (clients as sample sets, see :func:`forget_set`).

    Returns node -> blob digests by part (``body``/``head``/``delta``/``fim``).
    """
    m = U.get(method)
    resolved = m.resolve_params({})
    m.check_kinds(forget)
    with store.transaction():
        job = _job(store, forget, m, resolved, policy, None, seed)
        keep = set(nodes)
        gone = [n for n in nodes if n not in set(job.plan.affected)]
        if gone:
            raise UnlearningError(f"operation {operation}'s forget set no longer reaches {', '.join(gone[:5])} "
                                  "(the lineage changed since); its reference cannot be rebuilt")
        # Exactly the operation's nodes: a node added below them later is not part of what it changed.
        job.plan.affected = [n for n in job.plan.affected if n in keep]
        m.check(job)
        with _backend(store, backend, workers=workers, device=device) as be:
            by_node, _ = _results(m, method, job, be, store, progress)
        parts = {n: {**by_node[n].blobs_after(job.nodes[n]), "fim": by_node[n].fim_blob} for n in job.plan.affected}
        store.commit_reference(operation, method, parts, {n: by_node[n].seconds for n in parts})
    return parts


@contextmanager
def _backend(store: SqlStore, backend: str | Backend, *, workers: int | None, device: str | None,
             workers_per_device: int | None = None, ray_address: str | None = None) -> Iterator[Backend]:
    """The backend a request runs on; one made here is closed when the request ends."""
    if isinstance(backend, Backend):
        yield backend
        return
    be = make_backend(store.blobs.url, workers=workers, device=device, workers_per_device=workers_per_device,
                      backend=backend, ray_address=ray_address)
    try:
        yield be
    finally:
        be.close()


def _results(m: U.Unlearner, method: str, job: U.Job, be: Backend, store: SqlStore,
             progress: PhaseProgress | None) -> tuple[dict[str, U.NodeResult], float]:
    """Run the method's phases: one result per affected node, and the wall time."""
    t0 = time.perf_counter()
    results = _drive(m, job, be, store, progress)
    wall = time.perf_counter() - t0
    by_node = {r.node: r for r in results}
    missing = [n for n in job.plan.affected if n not in by_node]
    if missing:
        raise UnlearningError(f"method '{method}' returned no update for {', '.join(missing[:5])}")
    return by_node, wall


def _eval_ref(ref: str) -> dict:
    r = parse_ref(ref)
    resolve(r)  # fail early, before anything runs, when it does not resolve
    return r.to_json()


def _commit(store: SqlStore, job: U.Job, method: str, params: dict, by_node: dict[str, U.NodeResult],
            metrics: dict[str, dict], wall: float, eval_s: float, backend: dict,
            request: Request | None = None) -> UnlearnResult:
    op_id = "op-" + uuid.uuid4().hex[:10]
    versions = []
    for name in job.plan.affected:
        snap, r = job.nodes[name], by_node[name]
        after = r.blobs_after(snap)
        versions.append(NewVersion(
            node=name, role=job.plan.role(name), version_before=snap.version, body_blob=after["body"],
            head_blob=after["head"], delta_blob=after["delta"], fim_blob=r.fim_blob or snap.fim_blob,
            metrics={**r.metrics, **metrics.get(name, {})}))
    numbers = store.commit_operation(
        op_id, labels=job.labels, forget=job.forget.to_json(), method=method, params=params, plan=job.plan.to_json(),
        result={"eval_s": eval_s, "backend": backend}, wall_s=wall, versions=versions, blobs=job.op_blobs,
        request=request, samples=job.forget.samples)
    outcomes = [NodeOutcome(v.node, v.role, v.version_before, numbers[v.node], by_node[v.node].seconds,
                            dict(v.metrics)) for v in versions]
    return UnlearnResult(
        operation=op_id, labels=job.labels, method=method, params=params, plan=job.plan,
        phases=[], nodes=outcomes, wall_s=wall, eval_s=eval_s, backend=backend, request=request or Request())


# ------------------------------------------------------------------ catch-up
def add_node(store: SqlStore, name: str, weights: Any, arch: Any, *, catch_up: bool = False,
             **kwargs: Any) -> NodeInfo:
    """Record a node (:func:`umig.ingest.add_node`, same arguments). A node derived from a version a live
    operation superseded, or whose data holds what one forgot, is refused; with ``catch_up`` it is
    recorded and those operations are applied to it in the same transaction (:func:`catch_up_node`)."""
    return ingest.add_node(store, name, weights, arch, catch_up=catch_up_node if catch_up else None, **kwargs)


def purge(store: SqlStore, operation: str) -> dict[str, Any]:
    """Purge an operation (:meth:`umig.store.SqlStore.purge`), and take what it forgot out of the model
    FIMs its nodes still carry: a model FIM is a sum over the node's training data, forgotten samples
    included, and revert needed it as it was until now. Each FIM becomes (in this order of preference):

    * for a label forget set and a FIM with per-label sums: the sums over the other labels' samples
      (:meth:`umig.fisher.FIM.without_labels`), no forward pass;
    * for a node with data of its own: the FIM of its live weights over its data minus the forget set
      (one forward pass; what a sample or client forget set needs);
    * for an aggregate whose FIM is provably its parents' mean: the mean of their cleaned FIMs, over the
      parents that still have one (none: no FIM).

    The old FIM blobs are deleted with the superseded versions. A FIM none of these apply to is kept
    and counted in ``fims_kept``."""
    with store.transaction():
        entry = store.operation(operation)
        if entry["state"] != "applied":  # the store says why (purged already, reverted)
            return SqlStore.purge(store, operation)
        try:
            forget = operation_forget_set(store, operation)
        except UnlearningError:  # recorded before umig kept the forgotten indices: no FIM can be cleaned
            return SqlStore.purge(store, operation, fims_kept=len(store.live_fims(operation)))
        positions = _holdings(store, forget, store.graph())[0] if forget.samples else {}
        clean: dict[str, FIM | None] = {}  # old FIM digest -> the FIM without the forgotten data
        unchanged: set[str] = set()  # FIMs that hold none of it
        kept = 0
        # Parents before children (the store lists an operation's nodes in insertion order): an
        # aggregate's FIM is rebuilt from its parents' cleaned ones.
        for node, version, digest in store.live_fims(operation):
            if digest in clean:
                continue
            fim = store.fim(node, version)
            if _holds_none(store, node, fim, forget, positions.get(node)):
                clean[digest] = fim
                unchanged.add(digest)
                continue
            new = _clean_fim(store, node, version, fim, forget, positions, clean)
            if new is fim:
                kept += 1
            else:
                clean[digest] = new
        written = {d: None if f is None else store.put_tensors(f.to_tensors(), f.metadata())
                   for d, f in clean.items() if d not in unchanged}
        # The store's own (umig.Store.purge is this function).
        return SqlStore.purge(store, operation, fims=written, fims_kept=kept)


def _holds_none(store: SqlStore, node: str, fim: FIM, forget: ForgetSet, positions: np.ndarray | None) -> bool:
    """Whether ``fim`` is known to hold nothing of ``forget``: no forgotten sample in the node's own data
    and none of its labels (zero per-label counts, or not among its classes)."""
    if positions is not None and positions.size:
        return False
    if forget.samples and store.node(node).data_ref is None:
        return False  # an aggregate: its clients' samples are in it
    labels = [c for c in forget.labels if c in fim.classes]
    if not labels:
        return True
    return fim.label_counts is not None and all(int(fim.label_counts[fim.classes.index(c)]) == 0 for c in labels)


def _clean_fim(store: SqlStore, node: str, version: int, fim: FIM, forget: ForgetSet,
               positions: Mapping[str, np.ndarray], clean: Mapping[str, FIM | None]) -> FIM | None:
    """``fim`` (the model FIM of ``node`` at ``version``, which holds some of the forgotten data) without it
    (see :func:`purge`); ``fim`` itself when that cannot be done. ``positions``: each holder's forgotten
    samples; ``clean``: the cleaned FIMs so far, by old digest (parents come first)."""
    if not forget.samples and fim.has_label_stats:
        return fim.without_labels(forget.labels)
    info = store.node(node)
    own = positions.get(node)
    if info.data_ref is not None:
        data = store.node_data(node)
        if own is not None and own.size:
            keep = np.ones(len(data), dtype=bool)
            keep[own] = False
            data = data.select(np.flatnonzero(keep))
        if forget.labels:
            data = data.filter_labels(drop=forget.labels)
        if not len(data):
            return None
        model = store.load_model(node, version)
        return head_fisher(model, info.head, data.batches(256), fim.classes, kind=fim.kind,
                           temperature=fim.temperature, per_label=fim.has_label_stats)
    if not info.parents:
        return fim
    parent_fims = {}  # parent -> (the FIM the aggregate was recorded from, its cleaned form or None)
    for p, _relation, _weight in info.parents:
        v = info.parent_versions.get(p)
        d = store.version(p, v).fim_blob if v is not None else None
        if d is None:
            return fim
        recorded = store.fim(p, v)
        if d in clean:
            parent_fims[p] = (recorded, clean[d])
        elif _holds_none(store, p, recorded, forget, positions.get(p)):  # a parent the operation left alone
            parent_fims[p] = (recorded, recorded)
        else:
            return fim
    weights = [(p, w) for p, _relation, w in info.parents]
    before = ingest.mean_parent_fim(store, weights, fim.classes, lambda p: parent_fims[p][0])
    if before is None or not torch.equal(before.weight, fim.weight) or (
            (before.bias is None) != (fim.bias is None)) or (
            before.bias is not None and not torch.equal(before.bias, fim.bias)):
        return fim  # not its parents' mean (captured or given): cannot be rebuilt from them
    # A parent left with no FIM (all its data forgotten) drops out of the mean, as a client with no
    # data left drops out of FedAvg; with none left the aggregate keeps no FIM either.
    remaining = [(p, w) for p, w in weights if parent_fims[p][1] is not None]
    if not remaining:
        return None
    return ingest.mean_parent_fim(store, remaining, fim.classes, lambda p: parent_fims[p][1])


def operation_forget_set(store: SqlStore, operation: str) -> ForgetSet:
    """What ``operation`` forgot, rebuilt from the store: its labels, and its sample sets from the
    indices it kept. Raises ``UnlearningError`` for an operation recorded before umig kept them."""
    entry = store.operation(operation)
    kept = store.sample_forgets(operation=operation, live=False)
    if len(kept) != len(entry["forget"].get("samples") or []):
        raise UnlearningError(f"operation {operation} forgot samples but was recorded before umig kept their "
                              "indices; it cannot be applied to another node")
    return ForgetSet(labels=tuple(entry["labels"]), samples=tuple(
        SampleSet(dataset=k.dataset, source=k.source, indices=store.forgotten_indices(k), size=k.size,
                  client=k.client) for k in kept))


def catch_up_node(store: SqlStore, node: str, superseded: Sequence[ingest.Superseded], *,
                  device: str | None = "auto") -> list[dict[str, Any]]:
    """Bring ``node`` (just recorded) up to date with the live operations in ``superseded``, oldest first.

    Each operation runs again with its own forget set, method, parameters and discovery policy,
    restricted to the node (``from_nodes=[node]``); the blobs it kept are handed to the method
    (FIUn's rows and paper modes reuse their unlearning FIMs). The new version is attached to the operation
    (``SqlStore.commit_catch_up``), which then lists the node as caught up. Returns the catch-ups.
    """
    reasons: dict[str, list[str]] = {}
    ops = {}
    for s in superseded:
        reasons.setdefault(s.operation.id, []).append(s.detail)
        ops[s.operation.id] = s.operation
    out = []
    with store.transaction():
        for op in sorted(ops.values(), key=lambda o: o.created):
            entry = store.operation(op.id)
            fs = operation_forget_set(store, op.id)
            method = entry["method"]
            m = U.get(method)
            params = m.resolve_params(entry["params"])
            m.check_kinds(fs)
            store.flush_blobs()  # workers read the node's blobs (and any earlier catch-up's) from disk
            job = _job(store, fs, m, params, entry.get("policy") or "first", [node], 0)
            if job.plan.affected != [node]:
                raise UnlearningError(f"operation {op.id}'s forget set does not reach node '{node}'; "
                                      "it cannot be caught up")
            job.reuse = _kept_blobs(store, op.id)
            m.check(job)
            with _backend(store, "local", workers=1, device=device) as be:
                by_node, wall = _results(m, method, job, be, store, None)
            snap, r = job.nodes[node], by_node[node]
            after = r.blobs_after(snap)
            version = NewVersion(node=node, role="caught-up", version_before=snap.version, body_blob=after["body"],
                                 head_blob=after["head"], delta_blob=after["delta"],
                                 fim_blob=r.fim_blob or snap.fim_blob, metrics={**r.metrics, "wall_s": wall})
            number = store.commit_catch_up(op.id, version, reason="; ".join(reasons[op.id]), blobs=job.op_blobs)
            out.append({"operation": op.id, "name": node, "version_before": snap.version, "version_after": number})
    return out


def _kept_blobs(store: SqlStore, operation: str) -> dict[tuple[str, str], str]:
    """(kind, node) -> digest of the per-node blobs ``operation`` kept (gone once it is purged)."""
    out = {}
    for digest, kind in store.operation_blobs(operation):
        node = store.blobs.metadata(digest).get("node") if store.blobs.exists(digest) else None
        if node:
            out[(kind, node)] = digest
    return out


# ---------------------------------------------------------------- evaluation
def _evaluate(store: SqlStore, job: U.Job, by_node: dict[str, U.NodeResult], backend: Backend, eval_ref: dict | None,
              progress: PhaseProgress | None) -> dict[str, dict]:
    g = job.graph
    data_refs = store.data_refs()
    # One topological pass gives every node's data lineage; nodes sharing one share its list.
    own = {n: json.dumps(ref, sort_keys=True) for n, (ref, _) in data_refs.items() if n in g}
    holder = {k: n for n, k in reversed(list(own.items()))}
    lineage_refs = G.data_lineage(g, own)
    # Forgotten samples by data key: every node with that data holds the same positions.
    forget_pos = {own[n]: pos for n, pos in job.positions.items() if n in own}
    shared: dict[int, tuple[tuple[str, ...], list[tuple[dict, str | None]], list]] = {}
    tasks = []
    for name in job.plan.affected:
        snap, r = job.nodes[name], by_node[name]
        keys = lineage_refs[name]
        if id(keys) not in shared:  # one list per interned set: pickled once per chunk
            shared[id(keys)] = (keys, [data_refs[holder[k]] for k in keys], [forget_pos.get(k) for k in keys])
        keys, train, positions = shared[id(keys)]
        after = r.blobs_after(snap)
        tasks.append(U.Task(fn="umig.unlearning:eval_task", node=name, cost=float(len(train) or 1), payload={
            "snap": snap, "after": after, "labels": job.labels, "train": train, "train_key": keys,
            "forget_positions": positions, "heldout": eval_ref}))
    cb = (lambda d, t: progress("evaluate", d, t)) if progress else None
    if progress:
        progress("evaluate", 0, len(tasks))
    return {t.node: r for t, (r, _) in zip(tasks, backend.run(tasks, cb))}


def eval_task(payload: dict[str, Any], env: Any) -> dict[str, Any]:
    """Worker: AD_f / AD_r before and after, on the node's effective training data and held-out data.

    AD_f is the accuracy on forgotten items (forgotten labels, and forgotten samples of the
    node's training data), AD_r on the rest.
    """
    snap = payload["snap"]
    labels = set(payload["labels"])
    classes = set(snap.classes)
    sets: dict[str, Data] = {}
    masks: dict[str, torch.Tensor] = {}
    # Nodes of one lineage share their effective data: keep the last few concatenations.
    recent = env.cache.setdefault("eval-train", {})
    tkey = (payload.get("train_key"), tuple(sorted(classes)))
    if tkey[0] is not None and tkey in recent:
        sets["train"], masks["train"] = recent[tkey]
    else:
        parts = []
        for ref, fp in payload["train"]:
            key = ("eval", json.dumps(ref, sort_keys=True))
            d = env.cache.get(key)
            if d is None:
                d = verify(DataRef.from_json(ref), fp) if fp else resolve(DataRef.from_json(ref))
                env.cache[key] = d
            parts.append(d)
        if parts:
            whole = parts[0] if len(parts) == 1 else Data.concat(parts)
            forgotten = torch.zeros(len(whole), dtype=torch.bool)
            start = 0
            for d, pos in zip(parts, payload.get("forget_positions") or [None] * len(parts)):
                if pos is not None and len(pos):
                    forgotten[start + torch.as_tensor(pos, dtype=torch.long)] = True
                start += len(d)
            keep = torch.isin(whole.targets, torch.tensor(sorted(classes), dtype=torch.long))
            sets["train"], masks["train"] = whole.select(keep), forgotten[keep]
            if tkey[0] is not None:
                while len(recent) >= 8:
                    recent.pop(next(iter(recent)))
                recent[tkey] = (sets["train"], masks["train"])
    if payload["heldout"]:
        key = ("eval", json.dumps(payload["heldout"], sort_keys=True))
        if key not in env.cache:
            env.cache[key] = resolve(DataRef.from_json(payload["heldout"]))
        sets["heldout"] = env.cache[key].filter_labels(keep=classes)
    before = env.load_model(snap)
    after = env.load_model(snap, env.state_from_digests(payload["after"], snap.name))
    out: dict[str, Any] = {}
    for split, data in sets.items():
        if not len(data):
            continue
        for when, model in (("before", before), ("after", after)):
            acc = unlearning_accuracy(model, data.batches(512), snap.classes, labels, device=env.device,
                                      forget_mask=masks.get(split))
            out[f"AD_f_{split}_{when}"] = acc["AD_f"]
            out[f"AD_r_{split}_{when}"] = acc["AD_r"]
    return out


def evaluate_node(store: SqlStore, name: str, labels: Sequence[int], *, data: str | None = None,
                  version: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """AD_f / AD_r of one node (at ``version``) on its effective training data and on ``data``."""
    forget = set(int(x) for x in labels)
    if not forget:
        raise UnlearningError("no labels were given")
    info = store.node(name)
    model = store.load_model(name, version, device=device)
    sets = {}
    train = store.effective_data(name)
    if train is not None:
        sets["train"] = train
    if data:
        sets["heldout"] = resolve(parse_ref(data)).filter_labels(keep=info.classes)
    out: dict[str, Any] = {"node": name, "version": version if version is not None else info.version,
                           "labels": sorted(forget)}
    for split, d in sets.items():
        if len(d):
            out[split] = unlearning_accuracy(model, d.batches(512), info.classes, forget, device=device)
    return out
