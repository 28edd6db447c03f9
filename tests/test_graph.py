"""Pure planning tests for umig.graph on hand-built networkx DiGraphs (no store, no I/O)."""

from __future__ import annotations

import time

import networkx as nx
import pytest

from umig import graph as G
from umig.errors import GraphError, NotFoundError, UnlearningError


def dag(edges, labels=None, classes=None, nodes=()):
    """A UMIG-shaped DiGraph: ``labels`` maps node -> own training labels (default: none)."""
    g = nx.DiGraph()
    for n in nodes:
        g.add_node(n)
    g.add_edges_from(edges)
    for n in g:
        g.nodes[n]["labels"] = frozenset((labels or {}).get(n, ()))
        g.nodes[n]["classes"] = tuple((classes or {}).get(n, range(10)))
        g.nodes[n]["framework"] = "fl"
    return g


def group_map(plan: G.Plan) -> dict[frozenset, list[str]]:
    return {key: nodes for key, nodes in plan.groups}


def assert_plan_consistent(plan: G.Plan) -> None:
    # Every affected node appears exactly once, in exactly one merge group, with its upstream set as key.
    assert len(plan.affected) == len(set(plan.affected))
    grouped = [n for _, nodes in plan.groups for n in nodes]
    assert sorted(grouped) == sorted(plan.affected)
    for key, nodes in plan.groups:
        for n in nodes:
            assert plan.upstream[n] == key
        assert key <= set(plan.discovery)
    assert set(plan.inherited) == set(plan.affected) - set(plan.discovery)


# ----------------------------------------------------------------- BFS order
def test_bfs_order_visits_each_node_once_after_all_parents():
    # a -> b -> c -> d and a shortcut a -> d: d is reachable at depth 1 and 3.
    g = dag([("a", "b"), ("b", "c"), ("c", "d"), ("a", "d"), ("d", "e")])
    order = G.bfs_order(g)
    assert order == ["a", "b", "c", "d", "e"]
    pos = {n: i for i, n in enumerate(order)}
    assert all(pos[u] < pos[v] for u, v in g.edges)
    assert G.depths(g)["d"] == 3


def test_bfs_order_multiple_roots_and_isolated_nodes():
    g = dag([("r2", "x"), ("r1", "x"), ("x", "y")], nodes=["lonely"])
    order = G.bfs_order(g)
    assert sorted(order) == sorted(g.nodes)
    assert order.index("x") > max(order.index("r1"), order.index("r2"))
    assert G.summary(g)["roots"] == 3


# ------------------------------------------------------------------ discovery
def chain_graph():
    # a(1) -> b(1) -> c(-) ;  d(2) -> c ; e(3) alone below c
    return dag(
        [("a", "b"), ("b", "c"), ("d", "c"), ("c", "e")],
        labels={"a": {1}, "b": {1, 4}, "d": {2}, "e": {3}},
    )


def test_discovery_policy_first_keeps_only_topmost_holders():
    g = chain_graph()
    assert G.discovery_nodes(g, [1, 2], "first") == ["a", "d"]
    # b holds 1 but has discovery node a upstream; e holds 3 which is not forgotten.
    assert G.discovery_nodes(g, [4], "first") == ["b"]
    assert G.discovery_nodes(g, [1, 3], "first") == ["a"]  # e is below a (a -> b -> c -> e)
    assert G.discovery_nodes(g, [3], "first") == ["e"]


def test_discovery_policy_all_keeps_every_holder():
    g = chain_graph()
    assert G.discovery_nodes(g, [1, 2], "all") == ["a", "d", "b"]
    assert G.discovery_nodes(g, [1, 3], "all") == ["a", "b", "e"]
    p_first = G.plan(g, [1, 3], policy="first")
    p_all = G.plan(g, [1, 3], policy="all")
    assert p_first.discovery == ["a"] and set(p_all.discovery) == {"a", "b", "e"}
    # Same affected subgraph, different upstream sets.
    assert p_first.affected == p_all.affected == ["a", "b", "c", "e"]
    assert p_all.upstream["e"] == {"a", "b", "e"}
    assert p_first.upstream["e"] == {"a"}
    assert_plan_consistent(p_first)
    assert_plan_consistent(p_all)


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(UnlearningError, match="unknown discovery policy 'sometimes'"):
        G.plan(chain_graph(), [1], policy="sometimes")


# ------------------------------------------------------------- merge groups
def test_multi_root_merge_gets_both_discovery_nodes():
    # Two roots with different forget labels feed one aggregate and its descendants.
    g = dag(
        [("r1", "agg"), ("r2", "agg"), ("agg", "child"), ("r1", "side")],
        labels={"r1": {1, 5}, "r2": {2, 5}, "child": {7}},
    )
    p = G.plan(g, [1, 2])
    assert p.discovery == ["r1", "r2"]
    assert p.upstream["agg"] == p.upstream["child"] == frozenset({"r1", "r2"})
    assert p.upstream["side"] == frozenset({"r1"})
    groups = group_map(p)
    assert groups[frozenset({"r1", "r2"})] == ["agg", "child"]
    assert groups[frozenset({"r1"})] == ["r1", "side"]
    assert groups[frozenset({"r2"})] == ["r2"]
    assert_plan_consistent(p)
    # Forgetting only label 1: r2 is not a discovery node, agg traces back to r1 alone.
    p1 = G.plan(g, [1])
    assert p1.discovery == ["r1"]
    assert p1.upstream["agg"] == frozenset({"r1"})
    assert "r2" not in p1.affected
    assert_plan_consistent(p1)


def test_upstream_sets_are_interned():
    # 200 clients -> one aggregate -> 50 next-round nodes: every node below holds the same set object.
    edges = [(f"c{i}", "agg") for i in range(200)] + [("agg", f"n{j}") for j in range(50)]
    g = dag(edges, labels={f"c{i}": {i % 10} for i in range(200)})
    p = G.plan(g, [3])
    below = [p.upstream[n] for n in ["agg"] + [f"n{j}" for j in range(50)]]
    assert all(s is below[0] for s in below)
    assert len(below[0]) == 20


def test_imbalanced_paths_node_planned_once():
    # d is reachable from the discovery node a by paths of length 1 and 3.
    g = dag(
        [("a", "b"), ("b", "c"), ("c", "d"), ("a", "d"), ("x", "c"), ("d", "e")],
        labels={"a": {1}, "x": {2}},
    )
    p = G.plan(g, [1, 2])
    assert p.affected.count("d") == 1
    assert p.affected.count("e") == 1
    pos = {n: i for i, n in enumerate(p.affected)}
    assert pos["c"] < pos["d"] < pos["e"]
    assert p.upstream["d"] == frozenset({"a", "x"})
    assert sum(len(nodes) for _, nodes in p.groups) == len(p.affected)
    assert_plan_consistent(p)


def test_plan_json_shape():
    p = G.plan(chain_graph(), [1, 2])
    j = p.to_json()
    assert set(j) == {"labels", "policy", "discovery", "inherited", "affected", "holders", "merge_groups"}
    assert j["labels"] == [1, 2]
    assert j["inherited"] == ["b", "c", "e"]
    assert {tuple(m["discovery"]) for m in j["merge_groups"]} == {("a",), ("d",), ("a", "d")}
    assert p.role("a") == "discovery" and p.role("c") == "inherited"


# ------------------------------------------------------------- --from scope
def test_from_restricts_affected_but_keeps_source_discovery_nodes():
    g = dag(
        [("r1", "agg"), ("r2", "agg"), ("agg", "m1"), ("agg", "m2"), ("m1", "leaf")],
        labels={"r1": {1}, "r2": {1}},
    )
    full = G.plan(g, [1])
    p = G.plan(g, [1], from_nodes=["m1"])
    assert p.affected == ["m1", "leaf"]
    # The merged FIM of m1 still needs both discovery nodes, though they are not updated.
    assert set(p.discovery) == {"r1", "r2"}
    assert p.inherited == ["m1", "leaf"]
    assert p.upstream == {n: full.upstream[n] for n in p.affected}
    assert group_map(p) == {frozenset({"r1", "r2"}): ["m1", "leaf"]}

    p2 = G.plan(g, [1], from_nodes=["r1"])
    assert p2.affected == ["r1", "agg", "m1", "m2", "leaf"]
    assert "r2" not in p2.affected
    assert set(p2.discovery) == {"r1", "r2"}  # agg traces back to r2 as well
    assert_plan_consistent(p2)

    p3 = G.plan(g, [1], from_nodes=["m1", "m2"])
    assert p3.affected == ["m1", "m2", "leaf"]


def test_from_errors():
    g = dag([("a", "b"), ("c", "d")], labels={"a": {1}, "c": {2}})
    with pytest.raises(NotFoundError, match="nope"):
        G.plan(g, [1], from_nodes=["nope"])
    with pytest.raises(UnlearningError, match="nothing below c"):
        G.plan(g, [1], from_nodes=["c"])


# ------------------------------------------------------------------- errors
def test_cycle_detection():
    g = dag([("a", "b"), ("b", "c")], labels={"a": {1}})
    assert G.would_create_cycle(g, "c", "a")
    assert G.would_create_cycle(g, "b", "b")  # a node naming itself as parent
    assert not G.would_create_cycle(g, "a", "c")
    assert not G.would_create_cycle(g, "a", "new")
    g.add_edge("c", "a")
    with pytest.raises(GraphError, match="cycle"):
        G.check_dag(g)
    with pytest.raises(GraphError, match="cycle"):
        G.bfs_order(g)
    with pytest.raises(GraphError, match="cycle"):
        G.plan(g, [1])


def test_unseen_labels_error_names_them():
    g = chain_graph()
    with pytest.raises(UnlearningError, match=r"label\(s\) 8,9 were never"):
        G.plan(g, [1, 8, 9])
    with pytest.raises(UnlearningError, match="no labels"):
        G.plan(g, [])
    # Labels only in a head's classes, never in any node's own data, are unseen too.
    g2 = dag([("a", "b")], labels={"a": {1}}, classes={"b": range(12)})
    with pytest.raises(UnlearningError, match="11"):
        G.plan(g2, [11])


def test_effective_ancestors():
    g = chain_graph()
    anc = G.effective_ancestors(g, "c")
    assert set(anc) == {"a", "b", "c", "d"} and anc[-1] == "c" and anc.index("a") < anc.index("b")
    with pytest.raises(NotFoundError):
        G.effective_ancestors(g, "zz")


def test_plan_scales_to_large_fl_lineage():
    # 100 rounds x 100 clients = 10,100 nodes, ~20,000 edges: planning stays well under a few seconds.
    edges, labels = [], {}
    prev = "init"
    for r in range(100):
        glob = f"g{r}"
        for c in range(100):
            n = f"r{r}c{c}"
            edges += [(prev, n), (n, glob)]
            labels[n] = {c % 10}
        prev = glob
    g = dag(edges, labels=labels)
    t0 = time.perf_counter()
    p = G.plan(g, [1, 2])
    elapsed = time.perf_counter() - t0
    assert len(p.discovery) == 20  # round 0's clients holding 1 or 2
    assert len(p.affected) == g.number_of_nodes() - 81  # all but init and round 0's other 80 clients
    assert len(p.groups) == 21
    assert elapsed < 10, elapsed


def test_planning_walks_agree_with_ancestor_searches_on_random_dags():
    """bfs_order, discovery_nodes and upstream_discovery (one pass over networkx's adjacency dicts) against
    their definitions by ancestor search, on random DAGs with shared and diamond-shaped ancestry."""
    import random

    rng = random.Random(7)
    for _ in range(60):
        n = rng.randint(1, 25)
        g = nx.DiGraph()
        g.add_nodes_from((f"n{i}", {"labels": frozenset(rng.sample(range(5), rng.randint(0, 2)))}) for i in range(n))
        g.add_edges_from((f"n{i}", f"n{j}") for j in range(n) for i in range(j) if rng.random() < 0.15)
        order = G.bfs_order(g)
        assert sorted(order) == sorted(g) and all(order.index(p) < order.index(c) for p, c in g.edges)
        forget = {rng.randint(0, 4)}
        holds = {v for v in g if g.nodes[v]["labels"] & forget}
        for policy in G.POLICIES:
            found = G.discovery_nodes(g, forget, policy, order)
            want = [v for v in order if v in holds and (policy == "all" or not (nx.ancestors(g, v) & holds))]
            assert found == want
            up = G.upstream_discovery(g, found, order)
            for v in g:
                traced = (nx.ancestors(g, v) | {v}) & set(found)
                assert up.get(v, frozenset()) == traced
            assert len({id(s) for s in up.values()}) == len(set(up.values()))  # equal sets are one object
