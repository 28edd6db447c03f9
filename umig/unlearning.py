"""The unlearning engine: plan -> unlearner phases -> backend -> one committed operation.

``Store.unlearn`` and ``umig unlearn`` both land here. The coordinator holds the
store lock and an open transaction for the whole request; workers only write
blobs; the new node versions, the operation and its audit data are committed
together at the end, so an error or a kill leaves every node where it was.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from umig import graph as G
from umig.errors import UnlearningError
from umig.execution import Backend, make_backend
from unlearners import base as U

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

    def to_json(self) -> dict[str, Any]:
        return {
            "operation": self.operation,
            "dry_run": self.dry_run,
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


def snapshots(store: Any, names: Sequence[str]) -> dict[str, U.NodeSnapshot]:
    """Bulk-read current-version snapshots of nodes (one query per 500 names, not one per node)."""
    out: dict[str, U.NodeSnapshot] = {}
    names = list(dict.fromkeys(names))
    parents: dict[str, list[tuple[str, str, float | None]]] = {n: [] for n in names}
    # Thousands of nodes share a few distinct JSON texts (arch, classes, data refs): parse each
    # once; the parsed values are shared between the (frozen, read-only) snapshots.
    parsed: dict[tuple[str, str], Any] = {}

    def load(kind: str, text: str | None) -> Any:
        if text is None:
            return None
        v = parsed.get((kind, text))
        if v is None:
            v = json.loads(text)
            v = tuple(v) if kind == "classes" else frozenset(int(k) for k in v) if kind == "labels" else v
            parsed[(kind, text)] = v
        return v

    for i in range(0, len(names), 500):
        part = names[i : i + 500]
        marks = ",".join("?" * len(part))
        for r in store.db.execute(
            f"SELECT c.name AS child, p.name AS parent, e.relation, e.weight FROM edges e "
            f"JOIN nodes c ON c.id=e.child JOIN nodes p ON p.id=e.parent WHERE c.name IN ({marks}) "
            f"ORDER BY p.name",
            part,
        ):
            parents[r["child"]].append((r["parent"], r["relation"], r["weight"]))
        rows = store.db.execute(
            f"SELECT n.*, v.body, v.head AS head_blob, v.delta, v.fim FROM nodes n "
            f"JOIN versions v ON v.node=n.id AND v.version=n.version WHERE n.name IN ({marks})",
            part,
        ).fetchall()
        for r in rows:
            out[r["name"]] = U.NodeSnapshot(
                name=r["name"], version=r["version"], arch=load("arch", r["arch"]), head=r["head"],
                classes=load("classes", r["classes"]), body=r["body"], head_blob=r["head_blob"],
                delta=r["delta"], fim=r["fim"], data_ref=load("json", r["data_ref"]),
                data_fingerprint=r["data_fingerprint"], data_size=r["data_size"],
                labels=load("labels", r["label_counts"]), recipe=load("json", r["recipe"]),
                framework=r["framework"], parents=tuple(parents[r["name"]]),
            )
    missing = [n for n in names if n not in out]
    if missing:
        raise UnlearningError(f"node(s) without a current version: {', '.join(missing[:5])}")
    return {n: out[n] for n in names}


def _job(store: Any, labels: Sequence[int], method: U.Unlearner, params: Mapping[str, Any], policy: str,
         from_nodes: Sequence[str] | None, seed: int) -> U.Job:
    g = store.graph()
    plan = G.plan(g, labels, policy=policy, from_nodes=from_nodes)
    # Parents are part of a node's lineage context (FedAvg clients, retrain inputs).
    names = set(plan.affected) | set(plan.discovery)  # with --from, a discovery node may lie outside
    for n in plan.affected:
        names.update(g.predecessors(n))
    order = [n for n in G.bfs_order(g) if n in names]
    return U.Job(store_root=str(store.root), labels=plan.labels, plan=plan, graph=g,
                 nodes=snapshots(store, order), params=dict(params), seed=seed)


def plan_unlearning(store: Any, labels: Sequence[int], *, method: str = "fiun",
                    params: Mapping[str, Any] | None = None, policy: str = "first",
                    from_nodes: Sequence[str] | None = None) -> UnlearnResult:
    """The plan of a request, without running it (``umig unlearn --dry-run``)."""
    m = U.get(method)
    resolved = m.resolve_params(params or {})
    job = _job(store, labels, m, resolved, policy, from_nodes, 0)
    m.check(job)
    return UnlearnResult(
        operation=None, labels=job.labels, method=method, params=resolved, plan=job.plan,
        phases=m.describe_phases(job), nodes=[
            NodeOutcome(n, job.plan.role(n), job.nodes[n].version, job.nodes[n].version, 0.0)
            for n in job.plan.affected
        ], wall_s=0.0, eval_s=0.0, backend={}, dry_run=True,
    )


def _drive(method: U.Unlearner, job: U.Job, backend: Backend, store: Any,
           progress: PhaseProgress | None) -> list[U.NodeResult]:
    phase_names = [p["name"] for p in method.describe_phases(job)]
    gen = method.schedule(job)
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
        return list(stop.value or [])


def unlearn(
    store: Any,
    labels: Sequence[int],
    *,
    method: str = "fiun",
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
) -> UnlearnResult:
    """Forget ``labels`` across the lineage as one operation; see the module docstring."""
    m = U.get(method)
    resolved = m.resolve_params(params or {})
    eval_ref = _eval_ref(eval_data) if eval_data else None
    with store.transaction():
        job = _job(store, labels, m, resolved, policy, from_nodes, seed)
        m.check(job)
        be = backend if isinstance(backend, Backend) else make_backend(
            str(store.root), workers=workers, device=device, workers_per_device=workers_per_device,
            backend=backend, ray_address=ray_address)
        try:
            t0 = time.perf_counter()
            results = _drive(m, job, be, store, progress)
            wall = time.perf_counter() - t0
            by_node = {r.node: r for r in results}
            missing = [n for n in job.plan.affected if n not in by_node]
            if missing:
                raise UnlearningError(f"method '{method}' returned no update for {', '.join(missing[:5])}")
            t1 = time.perf_counter()
            metrics = _evaluate(store, job, by_node, be, eval_ref, progress) if evaluate else {}
            eval_s = time.perf_counter() - t1
        finally:
            if not isinstance(backend, Backend):
                be.close()
        op = _commit(store, job, method, resolved, by_node, metrics, wall, eval_s, be.describe())
        op.phases = m.describe_phases(job)
    return op


def _eval_ref(ref: str) -> dict:
    from umig.data import parse_ref, resolve

    r = parse_ref(ref)
    resolve(r)  # fail early, before anything runs, when it does not resolve
    return r.to_json()


def _commit(store: Any, job: U.Job, method: str, params: dict, by_node: dict[str, U.NodeResult],
            metrics: dict[str, dict], wall: float, eval_s: float, backend: dict) -> UnlearnResult:
    op_id = "op-" + uuid.uuid4().hex[:10]
    now = time.time()
    outcomes: list[NodeOutcome] = []
    version_rows, op_rows, node_updates = [], [], []
    ids = {r[0]: r[1] for r in store.db.execute("SELECT name, id FROM nodes")}
    latest = dict(store.db.execute("SELECT node, MAX(version) FROM versions GROUP BY node").fetchall())
    for name in job.plan.affected:
        snap, r = job.nodes[name], by_node[name]
        nid = ids[name]
        after = latest[nid] + 1
        delta = None if r.drop_delta else (r.delta or snap.delta)
        version_rows.append((nid, after, r.body or snap.body, r.head or snap.head_blob, delta,
                             r.fim or snap.fim, op_id, now))
        node_updates.append((after, nid))
        m = {**r.metrics, **metrics.get(name, {})}
        op_rows.append((op_id, nid, job.plan.role(name), snap.version, after, json.dumps(m, default=float)))
        outcomes.append(NodeOutcome(name, job.plan.role(name), snap.version, after, r.seconds, m))
    result = UnlearnResult(
        operation=op_id, labels=job.labels, method=method, params=params, plan=job.plan,
        phases=[], nodes=outcomes, wall_s=wall, eval_s=eval_s, backend=backend)
    db = store.db
    db.execute(
        "INSERT INTO operations(id, created, labels, method, params, plan, result, wall_s, state) "
        "VALUES(?,?,?,?,?,?,?,?, 'applied')",
        (op_id, now, json.dumps(list(job.labels)), method, json.dumps(params, default=str),
         json.dumps(job.plan.to_json()), json.dumps({"eval_s": eval_s, "backend": backend}), wall),
    )
    db.executemany(
        "INSERT INTO versions(node, version, body, head, delta, fim, operation, created) VALUES(?,?,?,?,?,?,?,?)",
        version_rows)
    db.executemany("UPDATE nodes SET version=? WHERE id=?", node_updates)
    db.executemany(
        "INSERT INTO operation_nodes(operation, node, role, version_before, version_after, metrics) "
        "VALUES(?,?,?,?,?,?)", op_rows)
    db.executemany("INSERT INTO operation_blobs(operation, digest, kind) VALUES(?,?,?)",
                   [(op_id, d, k) for d, k in job.op_blobs])
    return result


# ---------------------------------------------------------------- evaluation
def _evaluate(store: Any, job: U.Job, by_node: dict[str, U.NodeResult], backend: Backend, eval_ref: dict | None,
              progress: PhaseProgress | None) -> dict[str, dict]:
    g = job.graph
    data_refs = {
        r[0]: (json.loads(r[1]), r[2])
        for r in store.db.execute("SELECT name, data_ref, data_fingerprint FROM nodes WHERE data_ref IS NOT NULL")
    }
    # The data refs of every node's effective lineage, in one topological pass (not one ancestor
    # search per node): identical sets are interned, so a big FL lineage holds a handful of them.
    order = G.bfs_order(g)
    own = {n: json.dumps(data_refs[n][0], sort_keys=True) for n in order if n in data_refs}
    rank: dict[str, int] = {}
    for i, n in enumerate(order):
        if n in own:
            rank.setdefault(own[n], i)
    lineage_refs: dict[str, frozenset[str]] = {}
    interned: dict[frozenset[str], frozenset[str]] = {}
    for n in order:
        acc: frozenset[str] | None = None
        for p in g.predecessors(n):
            s = lineage_refs[p]
            acc = s if acc is None or acc <= s else (acc if s <= acc else acc | s)
        acc = acc or frozenset()
        if n in own and own[n] not in acc:
            acc = acc | {own[n]}
        lineage_refs[n] = interned.setdefault(acc, acc)
    shared: dict[int, tuple[tuple[str, ...], list[tuple[dict, str | None]]]] = {}
    tasks = []
    for name in job.plan.affected:
        snap, r = job.nodes[name], by_node[name]
        refs = lineage_refs[name]
        if id(refs) not in shared:  # one list per interned set: pickled once per chunk
            keys = tuple(sorted(refs, key=rank.__getitem__))
            shared[id(refs)] = (keys, [data_refs[order[rank[k]]] for k in keys])
        keys, train = shared[id(refs)]
        after = {"body": r.body or snap.body, "head": r.head or snap.head_blob,
                 "delta": None if r.drop_delta else (r.delta or snap.delta)}
        tasks.append(U.Task(fn="umig.unlearning:eval_task", node=name, cost=float(len(train) or 1), payload={
            "snap": snap, "after": after, "labels": job.labels, "train": train, "train_key": keys,
            "heldout": eval_ref}))
    cb = (lambda d, t: progress("evaluate", d, t)) if progress else None
    if progress:
        progress("evaluate", 0, len(tasks))
    return {t.node: r for t, (r, _) in zip(tasks, backend.run(tasks, cb))}


def eval_task(payload: dict[str, Any], env: Any) -> dict[str, Any]:
    """Worker: AD_f / AD_r before and after, on the node's effective training data and held-out data."""
    from umig.data import Data, DataRef, resolve, verify
    from umig.evaluate import unlearning_accuracy

    snap = payload["snap"]
    labels = set(payload["labels"])
    classes = set(snap.classes)
    sets: dict[str, Data] = {}
    # Nodes of one lineage share their effective data: keep the last few concatenations.
    recent = env.cache.setdefault("eval-train", {})
    tkey = (payload.get("train_key"), tuple(sorted(classes)))
    if tkey[0] is not None and tkey in recent:
        sets["train"] = recent[tkey]
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
            sets["train"] = (parts[0] if len(parts) == 1 else Data.concat(parts)).filter_labels(keep=classes)
            if tkey[0] is not None:
                while len(recent) >= 8:
                    recent.pop(next(iter(recent)))
                recent[tkey] = sets["train"]
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
            acc = unlearning_accuracy(model, data.batches(512), snap.classes, labels, device=env.device)
            out[f"AD_f_{split}_{when}"] = acc["AD_f"]
            out[f"AD_r_{split}_{when}"] = acc["AD_r"]
    return out


def evaluate_node(store: Any, name: str, labels: Sequence[int], *, data: str | None = None,
                  version: int | None = None, device: str = "cpu") -> dict[str, Any]:
    """AD_f / AD_r of one node (at ``version``) on its effective training data and on ``data``."""
    from umig.data import parse_ref, resolve
    from umig.evaluate import unlearning_accuracy
    from umig.lineage import effective_data

    forget = set(int(x) for x in labels)
    if not forget:
        raise UnlearningError("no labels were given")
    info = store.node(name)
    model = store.load_model(name, version, device=device)
    sets = {}
    train = effective_data(store, name)
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
