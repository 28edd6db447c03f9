"""Pure graph questions over the UMIG, a ``networkx.DiGraph`` of model nodes.

Node attributes used here: ``labels`` (frozenset of label ids in the node's *own*
training data; empty for data-less nodes such as FL aggregates) and ``classes``
(head output rows -> label ids). Edges point parent -> child. Nothing here does
I/O; the store builds the graph and the engine executes the plan.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import networkx as nx

from umig.errors import GraphError, NotFoundError, UnlearningError

POLICIES = ("first", "all")


def would_create_cycle(g: nx.DiGraph, parent: str, child: str) -> bool:
    """True when adding the edge parent -> child closes a cycle."""
    return parent == child or (child in g and parent in g and nx.has_path(g, child, parent))


def check_dag(g: nx.DiGraph) -> None:
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise GraphError("lineage graph has a cycle: " + " -> ".join(str(u) for u, _ in cycle))


def seen_labels(g: nx.DiGraph) -> set[int]:
    """Every label id some node was trained on (its own data)."""
    out: set[int] = set()
    for _, labels in g.nodes(data="labels"):
        out.update(labels or ())
    return out


def _unseen(g: nx.DiGraph, labels: Iterable[int]) -> set[int]:
    """The labels no node was trained on; stops at the first nodes that hold them all (usually the roots).

    >>> _unseen(nx.DiGraph([("a", "b")]), [1]), _unseen(nx.DiGraph(), [])
    ({1}, set())
    """
    missing = set(labels)
    for _, own in g.nodes(data="labels"):
        if not missing:
            break
        if own:
            missing.difference_update(own)
    return missing


def bfs_order(g: nx.DiGraph) -> list[str]:
    """Breadth-first order from the roots (in-degree 0), each node after all of its parents.

    A node is visited once every parent has been, so a node reachable by paths of
    different depth (the imbalanced-path case) is visited exactly once, at its
    deepest level.
    """
    # networkx's adjacency dicts (node -> {neighbour: edge data}) directly: its views cost more per call
    # than the walk itself on 50,000 nodes.
    succ = g._succ
    indeg = {n: len(p) for n, p in g._pred.items()}
    queue = deque(sorted(n for n, d in indeg.items() if d == 0))
    order: list[str] = []
    while queue:
        n = queue.popleft()
        order.append(n)
        for c in succ[n]:
            indeg[c] -= 1
            if indeg[c] == 0:
                queue.append(c)
    if len(order) != g.number_of_nodes():
        check_dag(g)
    return order


def discovery_nodes(
    g: nx.DiGraph, labels: Iterable[int], policy: str = "first", order: Sequence[str] | None = None,
    holders: Iterable[str] = (),
) -> list[str]:
    """Discovery nodes for a forget set, in BFS order.

    A node *holds* the forget set when its own data has a forgotten label or is one of
    ``holders`` (nodes whose own data holds forgotten samples, found by the caller).
    ``first`` (the paper's default) keeps holders that have no holder upstream; ``all``
    keeps every holder.

    >>> g = nx.DiGraph([("a", "b"), ("b", "c")])
    >>> discovery_nodes(g, [], holders=["b", "c"]), discovery_nodes(g, [], "all", holders=["b", "c"])
    (['b'], ['b', 'c'])
    """
    if policy not in POLICIES:
        raise UnlearningError(f"unknown discovery policy '{policy}' (choose from {', '.join(POLICIES)})")
    forget = frozenset(labels)
    order = list(order) if order is not None else bfs_order(g)
    holds = {n for n, own in g.nodes(data="labels") if own and not forget.isdisjoint(own)} | set(holders)
    if policy == "all":
        return [n for n in order if n in holds]
    # One linear pass: a node is shadowed when any parent is a discovery node or shadowed.
    shadowed: set[str] = set()
    found: list[str] = []
    pred = g._pred
    for n in order:
        if shadowed and not shadowed.isdisjoint(pred[n]):
            shadowed.add(n)
        elif n in holds:
            found.append(n)
            shadowed.add(n)
    return found


def upstream_discovery(
    g: nx.DiGraph, discovery: Sequence[str], order: Sequence[str]
) -> dict[str, frozenset[str]]:
    """For every node below (or at) a discovery node, the discovery nodes it traces back to.

    One pass in topological order; identical sets are interned, so a 10,000-node
    FL lineage whose nodes all trace back to the same clients holds one set.
    """
    disc = set(discovery)
    interned: dict[frozenset[str], frozenset[str]] = {}
    up: dict[str, frozenset[str]] = {}
    pred = g._pred
    for n in order:
        parents = pred[n]
        if len(parents) == 1 and n not in disc:  # one parent (most nodes): its set as it is
            s = up.get(next(iter(parents)))
            if s is not None:
                up[n] = s
            continue
        sets = [s for p in parents if (s := up.get(p)) is not None]
        if n in disc:
            sets.append(frozenset((n,)))
        elif not sets:
            continue
        elif all(s is sets[0] for s in sets):  # parents that share one set: no new set to build and intern
            up[n] = sets[0]
            continue
        key = frozenset().union(*sets)
        up[n] = interned.setdefault(key, key)
    return up


@dataclass
class Plan:
    """What one unlearning request touches, computed without I/O."""

    labels: tuple[int, ...]
    policy: str
    discovery: list[str]
    affected: list[str]  # BFS/topological order
    upstream: dict[str, frozenset[str]]
    groups: list[tuple[frozenset[str], list[str]]] = field(default_factory=list)
    forget: dict = field(default_factory=dict)  # the forget set's audit record (umig.forget)
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)  # node -> (forgotten, remaining) of its own data

    @property
    def inherited(self) -> list[str]:
        d = set(self.discovery)
        return [n for n in self.affected if n not in d]

    def role(self, node: str) -> str:
        # Called once per affected node: keep the set (rebuilt only if ``discovery`` is replaced or grows).
        cached = self.__dict__.get("_discovery_set")
        if cached is None or cached[0] is not self.discovery or cached[1] != len(self.discovery):
            cached = (self.discovery, len(self.discovery), frozenset(self.discovery))
            self.__dict__["_discovery_set"] = cached
        return "discovery" if node in cached[2] else "inherited"

    def to_json(self) -> dict:
        return {
            "labels": list(self.labels),
            **({"forget": self.forget} if self.forget else {}),
            "policy": self.policy,
            "discovery": self.discovery,
            "inherited": self.inherited,
            "affected": self.affected,
            # Every node whose own data holds forgotten items (discovery or not), with its counts.
            "holders": {n: {"forgotten": c[0], "remaining": c[1]} for n, c in self.counts.items() if c[0]},
            "merge_groups": [
                {"discovery": sorted(key), "nodes": nodes} for key, nodes in self.groups
            ],
        }


def plan(
    g: nx.DiGraph,
    labels: Iterable[int],
    *,
    policy: str = "first",
    from_nodes: Sequence[str] | None = None,
    holders: Iterable[str] = (),
    what: str | None = None,
    order: Sequence[str] | None = None,
) -> Plan:
    """Plan an unlearning request: discovery nodes, affected subgraph, merge groups.

    ``labels`` and ``holders`` (nodes whose own data holds forgotten samples) say what is
    forgotten; ``what`` names it in messages; ``order`` is :func:`bfs_order` when the caller has it.
    Raises ``UnlearningError`` for labels no node was trained on and for a request that touches nothing.
    """
    forget = tuple(sorted(set(int(x) for x in labels)))
    holders = [n for n in holders]
    if not forget and not holders:
        raise UnlearningError("the forget set is empty: no labels, samples or clients were given")
    unseen = sorted(_unseen(g, forget))
    if unseen:
        raise UnlearningError(
            f"label(s) {','.join(map(str, unseen))} were never in any node's training data"
        )
    what = what or f"label(s) {','.join(map(str, forget))}"
    order = list(order) if order is not None else bfs_order(g)
    discovery = discovery_nodes(g, forget, policy, order, holders)
    up = upstream_discovery(g, discovery, order)
    affected = [n for n in order if n in up]
    if from_nodes:
        missing = [n for n in from_nodes if n not in g]
        if missing:
            raise NotFoundError(f"unknown node(s): {', '.join(missing)}")
        scope: set[str] = set(from_nodes)
        for n in from_nodes:
            scope |= nx.descendants(g, n)
        affected = [n for n in affected if n in scope]
        # Keep every discovery node an in-scope node traces back to (even one outside the scope):
        # its unlearning FIM is still needed for the merge; only ``affected`` nodes are updated.
        sources = set().union(*(up[n] for n in affected))
        discovery = [n for n in discovery if n in sources]
        if not affected:
            raise UnlearningError(
                f"nothing below {', '.join(from_nodes)} was trained on {what}"
            )
    groups: dict[frozenset[str], list[str]] = {}
    for n in affected:
        groups.setdefault(up[n], []).append(n)
    return Plan(
        labels=forget,
        policy=policy,
        discovery=discovery,
        affected=affected,
        upstream={n: up[n] for n in affected},
        groups=list(groups.items()),
    )


def depths(g: nx.DiGraph, order: Sequence[str] | None = None) -> dict[str, int]:
    """Longest-path depth of every node from the roots (roots are 0)."""
    order = order if order is not None else bfs_order(g)
    d: dict[str, int] = {}
    for n in order:
        d[n] = max((d[p] + 1 for p in g.predecessors(n)), default=0)
    return d


def summary(g: nx.DiGraph) -> dict:
    """Counts per framework and per depth, roots and leaves: what a large graph shows instead of every node."""
    dep = depths(g)
    return {
        "nodes": g.number_of_nodes(),
        "edges": g.number_of_edges(),
        "roots": sum(1 for _, d in g.in_degree() if d == 0),
        "leaves": sum(1 for _, d in g.out_degree() if d == 0),
        "frameworks": dict(Counter(f for _, f in g.nodes(data="framework", default="other"))),
        "depths": {int(k): v for k, v in sorted(Counter(dep.values()).items())},
    }


def effective_ancestors(g: nx.DiGraph, node: str) -> list[str]:
    """The node and every ancestor, in topological order: whose data the node has seen."""
    if node not in g:
        raise NotFoundError(f"unknown node '{node}'")
    members = nx.ancestors(g, node) | {node}
    return [n for n in nx.topological_sort(g.subgraph(members))]


def data_lineage(g: nx.DiGraph, own: Mapping[str, Hashable]) -> dict[str, tuple[Hashable, ...]]:
    """For every node, the data it has seen: the distinct keys of ``own`` (node -> data key)
    held by the node and its ancestors, in the order they first appear in :func:`bfs_order`.

    One topological pass for the whole graph (not an ancestor search per node); equal
    results are the same tuple object, so a large FL lineage holds a handful of them.

    >>> g = nx.DiGraph([("c0", "agg"), ("c1", "agg"), ("agg", "ft")])
    >>> data_lineage(g, {"c0": "A", "c1": "B", "ft": "A"})["ft"]
    ('A', 'B')
    """
    order = bfs_order(g)
    rank: dict[Hashable, int] = {}
    for i, n in enumerate(order):
        if n in own:
            rank.setdefault(own[n], i)
    sets: dict[str, frozenset] = {}
    interned: dict[frozenset, frozenset] = {}
    for n in order:
        acc: frozenset | None = None
        for p in g.predecessors(n):
            s = sets[p]
            acc = s if acc is None or acc <= s else (acc if s <= acc else acc | s)
        acc = acc or frozenset()
        if n in own and own[n] not in acc:
            acc = acc | {own[n]}
        sets[n] = interned.setdefault(acc, acc)
    ordered: dict[int, tuple[Hashable, ...]] = {}
    out: dict[str, tuple[Hashable, ...]] = {}
    for n in order:
        s = sets[n]
        if id(s) not in ordered:
            ordered[id(s)] = tuple(sorted(s, key=rank.__getitem__))
        out[n] = ordered[id(s)]
    return out
