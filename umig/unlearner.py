"""The unlearner contract and its entry-point registry (plugins live in ``umig.unlearners``).

An unlearner turns a *plan* (which nodes a forget request touches) into tasks
that the execution backend runs in parallel, phase by phase. Two shapes:

* :class:`Unlearner` - graph-wide methods (FIUn) write :meth:`Unlearner.schedule`,
  a generator that yields one phase (a list of :class:`Task`) at a time and
  receives that phase's results back, and finally returns one
  :class:`NodeResult` per affected node.
* :class:`NodeUnlearner` - per-node methods (FUSED, channel fine-tuning,
  baselines) write only :meth:`NodeUnlearner.unlearn_node`, which receives a
  :class:`NodeContext` (the node's model, forget/retain data, its parents'
  checkpoints) and returns a :class:`NodeUpdate`. Set ``sequential = True``
  when a node needs its parents' *new* weights (retraining along the lineage):
  nodes then run generation by generation in topological order.

Third parties register a class under the entry-point group ``umig.unlearners``
(``pyproject.toml``: ``[project.entry-points."umig.unlearners"] mine = "pkg.mod:Mine"``).
"""

from __future__ import annotations

import importlib
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution, entry_points
from typing import Any, ClassVar

import networkx as nx
import numpy as np
import torch
from torch import nn

from umig import delta as D
from umig.errors import UmigError, UnlearningError
from umig.forget import ForgetSet
from umig.store import NodeSnapshot, split_head

ENTRY_POINT_GROUP = "umig.unlearners"
_REGISTERED: dict[str, str] = {}  # name -> "module:Class", added by register() (tests, notebooks)


# ------------------------------------------------------------------ parameters
@dataclass(frozen=True)
class Param:
    """One method parameter: default, type and a line of help."""

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None

    def parse(self, name: str, raw: Any) -> Any:
        kind = type(self.default)
        try:
            if isinstance(raw, str) and kind is bool:
                low = raw.lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(raw)
                value: Any = low in ("true", "1", "yes")
            elif self.default is None or isinstance(raw, kind) and not (kind is int and isinstance(raw, bool)):
                value = raw
            else:
                value = kind(raw)
        except (TypeError, ValueError):
            raise UmigError(f"parameter {name}={raw!r} is not a valid {kind.__name__}") from None
        if self.choices is not None and value not in self.choices:
            raise UmigError(f"parameter {name}={value!r} must be one of {', '.join(map(str, self.choices))}")
        return value


# ------------------------------------------------------------------ snapshots
@dataclass
class Job:
    """One unlearning request as an unlearner sees it."""

    blobs_url: str  # where workers open the blob store (umig.blobs.open_blobs)
    labels: tuple[int, ...]
    plan: Any  # umig.graph.Plan
    graph: nx.DiGraph
    nodes: dict[str, NodeSnapshot]  # affected nodes, their parents and ancestors
    params: dict[str, Any]
    seed: int = 0
    forget: ForgetSet = field(default_factory=ForgetSet)
    # Node -> positions (within its own data) of forgotten samples, for sample and client forget sets.
    positions: dict[str, np.ndarray] = field(default_factory=dict)
    # Node with data -> (forgotten, remaining) items of its own data.
    counts: dict[str, tuple[int, int]] = field(default_factory=dict)
    # (digest, kind) of blobs the operation keeps for its audit trail, e.g. unlearning FIMs.
    op_blobs: list[tuple[str, str]] = field(default_factory=list)
    # (kind, node) -> digest of a blob an earlier run of the same forget set kept: a catch-up hands a
    # method its operation's (e.g. FIUn's unlearning FIMs), which it may use instead of recomputing.
    reuse: dict[tuple[str, str], str] = field(default_factory=dict)

    def holds_forget(self, node: str) -> bool:
        """Whether the node's own data holds anything to forget."""
        return self.counts.get(node, (0, 0))[0] > 0

    def holds_retain(self, node: str) -> bool:
        """Whether the node's own data keeps anything once the forget set is removed."""
        return self.counts.get(node, (0, 0))[1] > 0


@dataclass(frozen=True)
class Task:
    """A unit of work for a worker: ``fn`` is ``"module:function"`` taking ``(payload, env)``."""

    fn: str
    payload: dict[str, Any]
    node: str | None = None
    cost: float = 1.0


@dataclass
class NodeResult:
    """New blobs for one node (``None`` keeps the previous version's blob) plus metrics."""

    node: str
    body_blob: str | None = None
    head_blob: str | None = None
    delta_blob: str | None = None
    drop_delta: bool = False  # the new full weights already include any earlier adapter
    fim_blob: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def blobs_after(self, snap: NodeSnapshot) -> dict[str, str | None]:
        """The node's blob digests by part once this result is applied to ``snap``."""
        return {"body": self.body_blob or snap.body_blob, "head": self.head_blob or snap.head_blob,
                "delta": None if self.drop_delta else (self.delta_blob or snap.delta_blob)}


# ------------------------------------------------------------- data sources
def source_names(nodes: Mapping[str, NodeSnapshot], name: str) -> list[tuple[str, float]]:
    """Whose data trains ``name``: itself when it has data, else the nearest nodes with data below
    it, at any depth (an aggregate of edge aggregators stands for their clients).

    Returns ``(node, weight)``; a source's weight is its share along the edges (FedAvg weights,
    or data sizes where an edge has none), so a global's clients keep their FedAvg shares.
    """
    snap = nodes[name]
    if snap.data_ref is not None:
        return [(name, 1.0)]
    out: dict[str, float] = {}
    for p, _rel, w in snap.parents:
        ps = nodes.get(p)
        if ps is None:
            continue
        below = source_names(nodes, p)
        mass = float(w) if w is not None else float(max(ps.data_size, 1) if ps.data_ref is not None
                                                   else sum(v for _, v in below) or 1.0)
        total = sum(v for _, v in below) or 1.0
        for src, v in below:
            out[src] = out.get(src, 0.0) + mass * v / total
    return list(out.items())


def retained_share(nodes: Mapping[str, NodeSnapshot], counts: Mapping[str, tuple[int, int]], name: str) -> float:
    """The share of a node's training data (its own, or that of the sources below it) a request keeps,
    from ``counts`` (node -> (forgotten, remaining)); nodes without counts keep everything."""
    srcs = source_names(nodes, name)
    total = sum(w for _, w in srcs)
    if not srcs or total <= 0:
        return 1.0
    kept = 0.0
    for src, w in srcs:
        gone, left = counts.get(src, (0, 1))
        kept += w * (left / (gone + left) if gone + left else 0.0)
    return kept / total


# ---------------------------------------------------------------- unlearners
class Unlearner(ABC):
    """A graph-wide unlearning method."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    params: ClassVar[Mapping[str, Param]] = {}
    # What this method can forget (see umig.forget.ForgetSet.kinds); others are refused up front.
    kinds: ClassVar[frozenset[str]] = frozenset({"labels"})
    kinds_note: ClassVar[str] = ""  # why a kind is refused, for the error line

    def check_kinds(self, forget: ForgetSet) -> None:
        """Refuse a forget set with a kind this method does not serve, before anything runs."""
        bad = [k for k in forget.kinds if k not in self.kinds]
        if bad:
            raise UnlearningError(
                f"method '{self.name}' cannot forget {' or '.join(bad)} (it serves: {', '.join(sorted(self.kinds))})"
                + (f"; {self.kinds_note}" if self.kinds_note else ""))

    def resolve_params(self, given: Mapping[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(given) - set(self.params))
        if unknown:
            known = ", ".join(self.params) or "none"
            raise UmigError(f"method '{self.name}' has no parameter {', '.join(unknown)} (known: {known})")
        return {k: (p.parse(k, given[k]) if k in given else p.default) for k, p in self.params.items()}

    def check(self, job: Job) -> None:
        """Raise ``UnlearningError`` before anything runs when a prerequisite is missing."""

    @abstractmethod
    def schedule(self, job: Job) -> Generator[list[Task], list[Any], list[NodeResult]]:
        """Yield phases of tasks; receive each phase's results; return one result per affected node."""

    def describe_phases(self, job: Job) -> list[dict[str, Any]]:
        """The phases :meth:`schedule` will run, for ``--dry-run`` and progress bars."""
        return [{"name": "update", "nodes": list(job.plan.affected)}]


@dataclass
class NodeUpdate:
    """What a per-node unlearner returns.

    ``state``: the full new weights (retrain, fine-tune...), or ``delta``: a sparse
    change ``{param: (flat_indices int64, values)}`` kept as its own blob so that
    dropping it restores the model bit for bit (adapters).
    """

    state: dict[str, torch.Tensor] | None = None
    delta: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


class NodeContext:
    """A per-node unlearner's view of its node: model, data and lineage, loaded lazily."""

    def __init__(self, env: Any, job_labels: Sequence[int], node: NodeSnapshot,
                 snapshots: Mapping[str, NodeSnapshot], params: Mapping[str, Any],
                 updated: Mapping[str, str] | None = None, seed: int = 0,
                 positions: Mapping[str, np.ndarray] | None = None,
                 counts: Mapping[str, tuple[int, int]] | None = None) -> None:
        self.env = env
        self.labels = tuple(job_labels)
        self.positions = dict(positions or {})
        self.counts = dict(counts or {})
        self.node = node
        self.snapshots = snapshots
        self.params = dict(params)
        self.device = env.device
        self.seed = seed
        self._updated = dict(updated or {})

    @property
    def classes(self) -> tuple[int, ...]:
        return self.node.classes

    @property
    def head(self) -> str:
        return self.node.head

    def model(self) -> nn.Module:
        """A fresh copy of the node's current model on the worker's device."""
        return self.env.load_model(self.node).to(self.device)

    def state_of(self, name: str) -> dict[str, torch.Tensor]:
        """A node's weights before this operation (parents, the node itself)."""
        return self.env.state_dict(self.snapshots[name])

    def updated_state_of(self, name: str) -> dict[str, torch.Tensor] | None:
        """A parent's weights *after* this operation (sequential methods), or None if unchanged."""
        digests = self._updated.get(name)
        if digests is None:
            return None
        return self.env.state_from_digests(digests)

    def build(self) -> nn.Module:
        """A model of the node's architecture with freshly initialised weights."""
        return self.env.build(self.node).to(self.device)

    def data_of(self, name: str | None = None):
        """A node's own training data (``umig.data.Data``), or None when it has none."""
        return self.env.node_data(self.snapshots[name or self.node.name])

    def _forget_mask(self, name: str, d: Any) -> torch.Tensor:
        mask = torch.isin(d.targets, torch.tensor(self.labels, dtype=torch.long))
        mask[torch.as_tensor(self.positions[name], dtype=torch.long)] = True
        return mask

    def forget_data(self, name: str | None = None):
        """A node's own items that the request forgets (its labels and samples)."""
        name = name or self.node.name
        d = self.data_of(name)
        if d is None or name not in self.positions:
            return None if d is None else d.filter_labels(keep=self.labels)
        return d.select(self._forget_mask(name, d).nonzero().flatten())

    def retain_data(self, name: str | None = None):
        """A node's own items that stay (its data minus the forget set)."""
        name = name or self.node.name
        d = self.data_of(name)
        if d is None or name not in self.positions:
            return None if d is None else d.filter_labels(drop=self.labels)
        return d.select((~self._forget_mask(name, d)).nonzero().flatten())

    def holds_forget(self, name: str) -> bool:
        return self.counts.get(name, (0, 0))[0] > 0

    def holds_retain(self, name: str) -> bool:
        return self.counts.get(name, (0, 0))[1] > 0

    def parents(self) -> list[tuple[str, str, float | None]]:
        return list(self.node.parents)


class NodeUnlearner(Unlearner):
    """A method that updates each affected node on its own (in parallel unless ``sequential``)."""

    sequential: ClassVar[bool] = False

    @abstractmethod
    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        """Unlearn ``ctx.labels`` from one node."""

    def _phases(self, job: Job) -> list[list[str]]:
        if self.sequential:
            return [sorted(gen) for gen in nx.topological_generations(job.graph.subgraph(job.plan.affected))]
        return [list(job.plan.affected)]

    def describe_phases(self, job: Job) -> list[dict[str, Any]]:
        phases = self._phases(job)
        if len(phases) == 1:
            return [{"name": self.name, "nodes": phases[0]}]
        return [{"name": f"{self.name} generation {i + 1}", "nodes": p} for i, p in enumerate(phases)]

    def schedule(self, job: Job) -> Generator[list[Task], list[Any], list[NodeResult]]:
        phases = self._phases(job)
        updated: dict[str, dict[str, str]] = {}
        out: list[NodeResult] = []
        for phase in phases:
            tasks = [
                Task(
                    fn="umig.unlearner:run_node_task",
                    payload={
                        "method": _qualname(type(self)),
                        "node": n,
                        "labels": job.labels,
                        "params": job.params,
                        "snapshots": job.nodes,
                        "updated": {p: updated[p] for p, _, _ in job.nodes[n].parents if p in updated},
                        "seed": job.seed,
                        "positions": job.positions,
                        "counts": job.counts,
                    },
                    node=n,
                    cost=float(job.nodes[n].data_size or 1),
                )
                for n in phase
            ]
            results: list[NodeResult] = yield tasks
            for r in results:
                updated[r.node] = r.blobs_after(job.nodes[r.node])
            out.extend(results)
        return out


def _qualname(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def run_node_task(payload: dict[str, Any], env: Any) -> NodeResult:
    """Worker side of :class:`NodeUnlearner`: build the context, run the method, write blobs."""
    cls = _import(payload["method"])
    method: NodeUnlearner = cls()
    snap: NodeSnapshot = payload["snapshots"][payload["node"]]
    ctx = NodeContext(env, payload["labels"], snap, payload["snapshots"], payload["params"],
                      payload["updated"], payload["seed"], payload.get("positions"), payload.get("counts"))
    t0 = time.perf_counter()
    upd = method.unlearn_node(ctx)
    # A diverged update (e.g. gradient ascent run too long) must fail the operation, not become a version.
    bad = [k for k, v in (upd.state or {}).items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    bad += [k for k, (_, v) in (upd.delta or {}).items() if not bool(torch.isfinite(v).all())]
    if bad:
        raise UnlearningError(f"method '{method.name}' produced non-finite weights for node '{snap.name}' "
                              f"({', '.join(bad[:3])}); nothing was changed (lower its lr or epochs)")
    result = NodeResult(node=snap.name, metrics=dict(upd.metrics))
    if upd.state is not None:
        body, head = split_head({k: v.detach().cpu() for k, v in upd.state.items()}, snap.head)
        result.body_blob = env.put(body, {"part": "body"})
        result.head_blob = env.put(head, {"part": "head"})
        result.drop_delta = True  # full weights already include any earlier adapter
    if upd.delta:  # an empty delta changes nothing: keep the previous version's blobs
        tensors = D.encode(upd.delta)
        if snap.delta_blob and upd.state is None:
            # Stack on the earlier adapter so one revert still restores the previous version exactly.
            earlier = env.blobs.load(snap.delta_blob, owner=snap.name)
            tensors = D.stack(earlier, tensors)
        result.delta_blob = env.put(tensors, {"node": snap.name, "part": "delta"})
        # New full weights *plus* a delta: the delta sits on the new weights (the engine would
        # otherwise drop it together with the earlier adapter).
        result.drop_delta = False
    result.seconds = time.perf_counter() - t0
    return result


def _import(spec: str) -> Any:
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


# ------------------------------------------------------------------- registry
_INSTALLED: tuple[tuple[str, ...], dict[str, str]] | None = None  # (sys.path, entry points found on it)


def _installed() -> dict[str, str]:
    """The group's entry points, scanned once per ``sys.path`` (a scan reads every installed
    distribution's metadata: tens of milliseconds on each request otherwise)."""
    global _INSTALLED
    key = tuple(sys.path)
    if _INSTALLED is None or _INSTALLED[0] != key:
        _INSTALLED = (key, {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)})
    return _INSTALLED[1]


_OWN: dict[str, str] | None = None  # umig's own entry points (its methods), read once per process


def _own() -> dict[str, str]:
    """The methods umig itself installs: its own distribution's entry points (a fraction of a millisecond,
    where a scan of every installed distribution takes 5-25 ms)."""
    global _OWN
    if _OWN is None:
        try:
            eps = distribution("umig").entry_points
        except PackageNotFoundError:  # run from a source tree without an install: the full scan decides
            eps = ()
        _OWN = {ep.name: ep.value for ep in eps if ep.group == ENTRY_POINT_GROUP}
    return _OWN


def available() -> dict[str, str]:
    """Installed methods: name -> ``module:Class`` (entry points, umig's own over a plugin's of the same
    name, then :func:`register` calls). A plugin installed into this process's ``sys.path`` after the first
    call shows up in a new process."""
    found = dict(_installed())
    found.update(_own())
    found.update(_REGISTERED)
    return found


def register(name: str, target: str) -> None:
    """Make ``target`` (``"module:Class"``) available as method ``name`` in this process,
    without an installed entry point (tests, notebooks). A later call replaces it."""
    _REGISTERED[name] = target


def unregister(name: str) -> None:
    """Forget a method added by :func:`register`."""
    _REGISTERED.pop(name, None)


def get(name: str) -> Unlearner:
    """Instantiate the method registered under ``name``: one added by :func:`register`, else umig's own
    (a plugin cannot replace a built-in name), else any installed plugin's."""
    target = _REGISTERED.get(name) or _own().get(name)
    methods = {name: target} if target is not None else available()
    if name not in methods:
        raise UnlearningError(f"unknown method '{name}' (installed: {', '.join(sorted(methods))})")
    try:
        cls = _import(methods[name])
    except (ImportError, AttributeError) as e:
        raise UnlearningError(f"method '{name}' ({methods[name]}) cannot be loaded: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Unlearner)):
        raise UnlearningError(f"method '{name}' ({methods[name]}) is not an umig Unlearner")
    return cls()


def parse_params(items: Sequence[str], what: str = "--param") -> dict[str, str]:
    """``["k=v", ...]`` -> ``{"k": "v"}``, as ``--param`` (or the browser view) gives a method's parameters,
    untyped: each method types its own (:meth:`Unlearner.resolve_params`). The CLI reads ``--meta`` the
    same way. ``what`` names the option in errors."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UmigError(f"{what} expects key=value, got '{item}'")
        out[key] = value
    return out


def describe() -> list[dict[str, Any]]:
    """Every installed method with its parameters and defaults (for ``umig methods``)."""
    out = []
    for name, target in sorted(available().items()):
        try:
            m = get(name)
        except UnlearningError as e:
            out.append({"name": name, "target": target, "error": str(e), "params": {}})
            continue
        out.append({
            "name": name,
            "target": target,
            "description": m.description,
            "per_node": isinstance(m, NodeUnlearner),
            "kinds": sorted(m.kinds),
            "params": {k: {"default": p.default, "help": p.help,
                           **({"choices": list(p.choices)} if p.choices else {})} for k, p in m.params.items()},
        })
    return out
