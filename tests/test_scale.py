"""Structural checks behind the scale benchmark (benchmarks/bench_scale.py), on small synthetic lineages.

No timings: these check the properties that keep big lineages linear - a bounded number of
queries however many nodes there are, indexed lookups, one-pass lineage computations, shared
blobs, a bounded ``graph show``.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import REPO, umig_cli
from umig import arch as A
from umig import graph as G
from umig.execution import InProcess
from umig.api import Store

sys.path.insert(0, str(REPO / "benchmarks"))
import bench_scale  # noqa: E402


def _build(tmp_path: Path, nodes: int, clients: int = 4, name: str = "s") -> Store:
    bench_scale.build(tmp_path / name, nodes, clients, samples=12)
    return Store.open(tmp_path / name)


@pytest.fixture
def small(tmp_path: Path) -> Store:
    s = _build(tmp_path, 46)
    yield s
    s.close()


def test_synthetic_fl_lineage_shape(small: Store):
    g = small.graph()
    clients, rounds = 4, 9
    assert g.number_of_nodes() == 1 + rounds * (clients + 1)
    aggregates = [n for n in g if n.endswith("/global")]
    assert len(aggregates) == rounds and all(g.in_degree(a) == clients for a in aggregates)
    assert G.summary(g)["frameworks"] == {"fl": g.number_of_nodes()}
    assert all(small.version(n).fim_blob for n in g if n != "fl/init")  # FIUn needs a model FIM everywhere
    plan = small.plan_unlearning([3]).plan
    # Label 3 is held by clients c with 3 in {c, c+1, c+3} mod 10: c = 0, 2, 3 of the first round.
    assert plan.discovery == ["fl/r1/c0", "fl/r1/c2", "fl/r1/c3"]
    assert len(plan.affected) == g.number_of_nodes() - 1 - 1  # all but the initial model and client 1
    assert len(plan.groups) == 4  # three discovery nodes on their own, then everything below all three


def _statements(store: Store, fn) -> list[str]:
    seen: list[str] = []
    store.db.conn.set_trace_callback(seen.append)
    try:
        fn()
    finally:
        store.db.conn.set_trace_callback(None)
    return seen


def test_planning_issues_a_bounded_number_of_queries(tmp_path: Path):
    """No per-node round trips: planning 4x the nodes issues the same queries."""
    counts = []
    for i, n in enumerate((23, 91)):
        s = _build(tmp_path, n, name=f"s{i}")
        counts.append(len(_statements(s, lambda: s.plan_unlearning([3]))))
        s.close()
    assert counts[0] == counts[1]


def test_hot_queries_use_indexes(small: Store):
    """Every statement that scans a whole table runs a few times per request, never once per node."""
    arch = A.ArchSpec("umig.models:tiny_mlp", {"in_features": 16, "hidden": 64, "num_classes": 10})

    def work():
        with small.batch():
            for i in range(5):
                small.add_node(f"extra/{i}", arch.build(), arch, parents=["fl/r9/global"], framework="fl")
        op = small.unlearn([3], evaluate=True)
        small.history(node="fl/r9/global")
        small.revert(op.operation)

    executed = Counter(_statements(small, work))
    scans: dict[str, int] = {}
    for sql, n in executed.items():
        if not re.match(r"\s*(SELECT|UPDATE|DELETE)", sql, re.I):
            continue
        plan = " | ".join(r[3] for r in small.db.execute("EXPLAIN QUERY PLAN " + sql))
        if re.search(r"\bSCAN (?!CONSTANT)(?!meta\b)", plan):
            scans[sql] = n
    per_node = {sql[:120]: n for sql, n in scans.items() if n > 3}
    assert not per_node, f"full scans repeated per node: {per_node}"


def test_evaluation_finds_lineage_data_in_one_pass(small: Store, monkeypatch):
    """Each node's effective training data is found in one topological pass (no ancestor search per node),
    and equals what a per-node ancestor search gives."""
    g = small.graph()
    data_of = {n.name: n.data_ref for n in small.nodes()}
    expected = {n: {str(data_of[a]) for a in G.effective_ancestors(g, n) if data_of[a]} for n in g}

    monkeypatch.setattr(G, "effective_ancestors", lambda *a: pytest.fail("per-node ancestor search"))
    seen: dict[str, set[str]] = {}

    class Capture(InProcess):
        def run(self, tasks, progress=None):
            for t in tasks:
                if t.fn.endswith(":eval_task"):
                    seen[t.node] = {str(ref) for ref, _ in t.payload["train"]}
            return super().run(tasks, progress)

    be = Capture(small.blobs.url)
    try:
        small.unlearn([3], backend=be, evaluate=True)
    finally:
        be.close()
    assert seen and all(seen[n] == expected[n] for n in seen)


def test_unlearning_shares_every_unchanged_blob(small: Store):
    before = small.blobs.all_digests()
    bodies = {n.name: small.version(n.name).body_blob for n in small.nodes()}
    op = small.unlearn([3], evaluate=False)
    new = small.blobs.all_digests() - before
    heads = {small.version(n.name).head_blob for n in op.nodes}
    unlearning_fims = {r[0] for r in small.db.execute(
        "SELECT digest FROM operation_blobs WHERE operation=?", (op.operation,))}
    assert len(heads) == len(op.nodes) and not unlearning_fims  # erase reads no unlearning FIM
    assert new == heads  # nothing else was written: bodies and model FIMs are shared
    for n in op.nodes:
        v = small.version(n.name)
        assert v.body_blob == bodies[n.name] and v.fim_blob == small.version(n.name, n.version_before).fim_blob


def test_bulk_recording_validates_each_architecture_once(tmp_path: Path, monkeypatch):
    """Same arch + same state shapes: the dummy forward runs once; the blobs are those of a fresh validation."""
    arch = A.ArchSpec("umig.models:tiny_mlp", {"in_features": 4, "hidden": 8, "num_classes": 3})
    states = []
    for i in range(4):
        torch.manual_seed(i)
        states.append({k: v.clone() for k, v in arch.build().state_dict().items()})
    calls = []
    real = A.find_head
    monkeypatch.setattr(A, "find_head", lambda *a, **k: calls.append(1) or real(*a, **k))
    bulk = Store.init(tmp_path / "bulk")
    with bulk.batch():
        for i, sd in enumerate(states):
            bulk.add_node(f"m{i}", sd, arch, compute_fim=False)
    assert len(calls) == 1
    for i, sd in enumerate(states):
        fresh = Store.init(tmp_path / f"fresh{i}")
        fresh.add_node(f"m{i}", sd, arch, compute_fim=False)
        for part in ("body", "head"):
            # Compared by content: safetensors writes header metadata in no fixed key order.
            x = fresh.blobs.load_with_metadata(getattr(fresh.version(f"m{i}"), part + "_blob"))
            y = bulk.blobs.load_with_metadata(getattr(bulk.version(f"m{i}"), part + "_blob"))
            assert x[1] == y[1] and x[0].keys() == y[0].keys()
            assert all(torch.equal(x[0][k], y[0][k]) and x[0][k].dtype == y[0][k].dtype for k in x[0])
        fresh.close()
    # A float64 state is stored as the model's float32, with or without the cache.
    bulk.add_node("m64", {k: v.double() for k, v in states[0].items()}, arch, compute_fim=False)
    bulk.add_node("m64b", {k: v.double() for k, v in states[1].items()}, arch, compute_fim=False)
    assert all(t.dtype == torch.float32 for t in bulk.state_dict("m64b").values())
    bulk.close()


def test_graph_show_summarises_a_graph_larger_than_max_nodes(small: Store):
    root = small.root
    small.close()
    out = umig_cli("graph", "show", "--max-nodes", "10", store=root, check=True).stdout
    lines = out.splitlines()
    assert len(lines) < 60
    assert "first levels" in out and "46 nodes" in out
    assert "fl/r9/c3" not in out  # not every node is listed
    full = umig_cli("graph", "show", "--max-nodes", "100", store=root, check=True).stdout
    assert "fl/r9/c3" in full and "first levels" not in full
