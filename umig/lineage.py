"""Lineage recorders: small helpers a training loop calls to record its models as it trains.

Each recorder writes nodes and edges with the right relations, data references,
classes and recipes, so users never hand-type ``add-node`` for a thousand clients.
Recorders record; they never train. A training loop builds and trains its models
as it always did and hands each finished model to the recorder::

    rec = FederatedRecorder(store, arch, recipe=recipe)
    with rec.batch():                        # one transaction for the whole run
        rec.initial(global_model)
        for r in range(1, rounds + 1):
            for c, shard in enumerate(shards):
                ...train a copy of the global model on shard...
                rec.client(r, c, model, shard)
            ...fedavg(states, rec.weights(rec.pending(r)))...
            rec.aggregate(r, global_model)

=====================  ================================================  ===========================
recorder               nodes (relation of their in-edges)                 FedAvg weights / classes
=====================  ================================================  ===========================
FederatedRecorder      clients (finetune from the global), aggregates     data shares, sum to 1
                       (aggregate); intermediate aggregators and DAG-FL
                       nodes with parents of any depth
DataParallelRecorder   shard models (finetune from the last sync) and     shard shares, sum to 1
                       sync points (sync)
IncrementalRecorder    a chain of steps (increment); each head covers     ``classes`` per node, heads
                       every class seen so far                            grow, arch per node
TransferRecorder       a base and heads fine-tuned from it (transfer),    ``classes`` per head, arch
                       only the head trained (recipe ``train_only``)      per node
=====================  ================================================  ===========================

FederatedRecorder also records server-side fine-tuning of the global model
(``server``); every recorder accepts ``name=``/``parent=``/``meta=`` overrides and
``rec.record(...)`` writes any other node with the recorder's defaults.

Model FIMs stay on the training device. A model trained by :func:`fit` carries the FIM its
last epoch's forward passes accumulated (:class:`FisherCapture`), and recording it on the same
data stores that FIM: recording adds no pass over the data. It is the FIM of the last epoch's
parameters as they evolved (weights still moving, BatchNorm in training mode), not of the final
weights; ``exact_fim=True`` (recorder or call) computes the exact one with one forward pass over
the node's data on the device the model lives on, which costs about a third of one training
epoch, and so does a model trained any other way (or given as a state dict) unless the loop
passes ``fim=cap.fim()`` of its own capture. ``benchmarks/bench_recording.py`` measures both.

The module also holds the *retraining reference* the examples and benchmarks
compare unlearning against (:func:`retrain_reference`): every affected node is
retrained without the forgotten labels, in topological order, with its recorded
recipe and the same construction rules a training loop uses here
(:func:`fresh_model`, :func:`inherit_weights`, :func:`fit`, FedAvg for
aggregates and sync points).
"""

from __future__ import annotations

import hashlib
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from umig import graph as G
from umig import unlearning
from umig.arch import ArchSpec, build_model
from umig.data import Data, parse_ref, resolve, save_subset
from umig.errors import UmigError
from umig.evaluate import unlearning_accuracy
from umig.fisher import FisherCapture, kept_fim
from umig.store import NodeInfo, SqlStore
from umig.train import Recipe, fit, fresh_model, inherit_weights, retrain_node
from umig.unlearner import retained_share

__all__ = [
    "DataParallelRecorder",
    "FederatedRecorder",
    "FisherCapture",
    "IncrementalRecorder",
    "LineageRecorder",
    "Reference",
    "TransferRecorder",
    "evaluate_models",
    "fit",
    "fresh_model",
    "inherit_weights",
    "model_device",
    "retrain_reference",
    "subset_ref",
]

Model = nn.Module | Mapping[str, Tensor]


def subset_ref(store: SqlStore, source: str, indices: Sequence[int] | np.ndarray | torch.Tensor,
               only_labels: Sequence[int] | None = None) -> Data:
    """Data for ``indices`` of a reference, with its index file kept in the store (content-addressed)."""
    idx = np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64)
    digest = hashlib.sha256(idx.tobytes()).hexdigest()[:32]
    path = store.local_dir / "subsets" / f"{digest}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_subset(path, idx)
    return resolve(parse_ref(source, subset=str(path), only_labels=only_labels))


def model_device(model: Any) -> torch.device | None:
    """Device of a module's first parameter (or buffer); ``None`` for a state dict or an empty module."""
    if not isinstance(model, nn.Module):
        return None
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


# ------------------------------------------------------------------------------ recorders
class LineageRecorder:
    """Common machinery: one :meth:`record` call per node, timed, on the model's own device.

    ``arch`` is an :class:`umig.arch.ArchSpec` (or ``"module:callable"`` string) shared by
    the nodes unless a call passes its own; ``classes``/``head``/``recipe`` are defaults
    for every node. ``device`` forces the Fisher pass onto a device; by default it runs
    where each model lives. ``exact_fim`` runs that pass even for models :func:`fit` captured a
    FIM for (see the module docstring). ``seconds`` accumulates the time spent recording;
    ``capture_seconds`` the time the recorded models' training loops spent capturing their FIMs
    (a recording cost paid inside training).

    Each edge records the parent's live version at record time (a recorder records children of
    what it just recorded), or the version this store object last loaded of it (``SqlStore.loaded``).
    A node whose data holds what a live unlearning operation forgot is refused, unless
    ``catch_up`` (here or per call): then it is recorded and unlearned on the spot.
    """

    framework = "other"

    def __init__(self, store: SqlStore, arch: Any = None, *, prefix: str = "node",
                 classes: Sequence[int] | None = None, head: str | None = None, recipe: Any = None,
                 device: str | torch.device | None = None, compute_fim: bool = True, fisher_batch: int = 512,
                 num_classes_arg: str = "num_classes", catch_up: bool = False, exact_fim: bool = False) -> None:
        self.store, self.arch, self.prefix = store, arch, prefix
        self.classes = tuple(int(c) for c in classes) if classes is not None else None
        self.head_module, self.recipe, self.device = head, recipe, device
        self.compute_fim, self.fisher_batch, self.num_classes_arg = compute_fim, fisher_batch, num_classes_arg
        self.catch_up, self.exact_fim = catch_up, exact_fim
        self.nodes: list[str] = []
        self.seconds = 0.0
        self.capture_seconds = 0.0
        self._counted: weakref.WeakSet[Any] = weakref.WeakSet()
        self._mass: dict[str, int] = {}

    def record(self, name: str, model: Model, *, arch: Any = None, parents: Sequence[str | tuple[str, float | None]] = (),
               relation: str | None = None, data: Data | str | None = None, classes: Sequence[int] | None = None,
               recipe: Any = None, meta: Mapping[str, Any] | None = None, fim: Any = None,
               catch_up: bool | None = None) -> NodeInfo:
        """Write one node (and its in-edges) through :func:`umig.unlearning.add_node`.

        ``fim`` is a model FIM the training loop already has (:class:`FisherCapture`); without one,
        the FIM :func:`fit` captured for ``model`` on ``data`` if any (unless ``exact_fim``), else
        the store computes it with one forward pass over the node's data.
        """
        t0 = time.perf_counter()
        # Spent in the training loop whether or not this node can use it (add_node checks that); once per capture.
        kept = kept_fim(model, check=False) if isinstance(model, nn.Module) else None
        if kept is not None and kept not in self._counted:
            self._counted.add(kept)
            self.capture_seconds += kept.seconds
        spec = arch if arch is not None else self.arch
        if spec is None:
            raise ValueError(f"node '{name}': no architecture given (pass arch= to the recorder or the call)")
        device = self.device if self.device is not None else model_device(model)
        info = unlearning.add_node(
            self.store, name, model, spec, parents=list(parents), relation=relation, framework=self.framework, data=data,
            classes=classes if classes is not None else self.classes, head=self.head_module,
            recipe=recipe if recipe is not None else self.recipe, meta=dict(meta or {}),
            fim=fim, compute_fim=self.compute_fim, exact_fim=self.exact_fim,
            fisher_batch=self.fisher_batch, device=device,
            catch_up=self.catch_up if catch_up is None else catch_up)
        self.nodes.append(info.name)
        own = info.data_size
        self._mass[info.name] = own if own else sum(self.mass(p if isinstance(p, str) else p[0]) for p in parents)
        self.seconds += time.perf_counter() - t0
        return info

    @contextmanager
    def batch(self) -> Iterator[LineageRecorder]:
        """``store.batch()`` for a whole training run: one transaction, committed at the end.

        The commit (flushing the run's blob writes and the SQLite rows) counts in ``seconds``.
        """
        ctx = self.store.batch()
        ctx.__enter__()
        try:
            yield self
        except BaseException:
            if not ctx.__exit__(*sys.exc_info()):
                raise
        else:
            t0 = time.perf_counter()
            ctx.__exit__(None, None, None)
            self.seconds += time.perf_counter() - t0

    def mass(self, name: str) -> int:
        """Training samples a node stands for: its own data, or for a data-less node its parents' total."""
        if name not in self._mass:
            self._mass[name] = self.store.node(name).data_size
        return self._mass[name]

    def weights(self, parents: Sequence[str]) -> list[float]:
        """FedAvg weights of ``parents``: their data shares (:meth:`mass`), summing to 1."""
        masses = [float(self.mass(p)) for p in parents]
        total = sum(masses)
        if total <= 0:
            return [1.0 / len(parents)] * len(parents) if parents else []
        return [m / total for m in masses]

    def arch_for(self, classes: Sequence[int]) -> ArchSpec:
        """The recorder's arch with ``num_classes`` (``num_classes_arg``) set to ``len(classes)``."""
        spec = self.arch if isinstance(self.arch, ArchSpec) else ArchSpec(str(self.arch))
        return ArchSpec(spec.spec, {**spec.kwargs, self.num_classes_arg: len(tuple(classes))})


class _RoundRecorder(LineageRecorder):
    """Rounds of members trained from the current global model, merged by (possibly layered) aggregation."""

    member_word = "client"
    merge_relation = "aggregate"

    def __init__(self, store: SqlStore, arch: Any, **kwargs: Any) -> None:
        super().__init__(store, arch, **kwargs)
        self.global_node: str | None = None
        self._pending: dict[int, list[str]] = {}
        self._merges: dict[int, int] = {}

    def initial(self, model: Model, name: str | None = None, *, data: Data | str | None = None,
                recipe: Any = None) -> NodeInfo:
        """The initial global model (usually no data of its own: a fresh or imported model)."""
        info = self.record(name or f"{self.prefix}/init", model, data=data, recipe=recipe)
        self.global_node = info.name
        return info

    def _member(self, round: int, member: int | str, model: Model, data: Data | str, *, recipe: Any,
                name: str | None, parent: str | None, meta: Mapping[str, Any] | None, default_name: str,
                fim: Any = None) -> NodeInfo:
        parent = parent if parent is not None else self.global_node
        info = self.record(name or default_name, model, parents=[parent] if parent else [], relation="finetune",
                           data=data, recipe=recipe, fim=fim,
                           meta={"round": round, self.member_word: member, **(meta or {})})
        self._pending.setdefault(round, []).append(info.name)
        return info

    def pending(self, round: int) -> list[str]:
        """Nodes of ``round`` not merged yet: what a default :meth:`aggregate` call merges."""
        return list(self._pending.get(round, []))

    def _merge(self, round: int, model: Model, *, parents: Sequence[str] | None, weights: Sequence[float] | None,
               name: str | None, final: bool, meta: Mapping[str, Any] | None, default_name: str) -> NodeInfo:
        explicit = parents is not None
        parents = list(parents) if explicit else self.pending(round)
        if not parents:
            raise ValueError(f"round {round} has no recorded {self.member_word}s")
        if weights is None:
            w = self.weights(parents)
        else:
            w = [float(x) for x in weights]
            if len(w) != len(parents):
                raise ValueError(f"{len(parents)} parents but {len(w)} weights")
            if any(not x >= 0 for x in w) or sum(w) <= 0:
                raise ValueError(f"weights must be >= 0 with a positive sum, got {w}")
            total = sum(w)
            w = [x / total for x in w]
        info = self.record(name or default_name, model, parents=list(zip(parents, w)), relation=self.merge_relation,
                           meta={"round": round, "final": final, **(meta or {})})
        left = [p for p in self._pending.get(round, []) if p not in set(parents)]
        if final:
            self.global_node = info.name
            self._pending[round] = left
        else:
            self._pending[round] = left + [info.name]
        return info


class FederatedRecorder(_RoundRecorder):
    """Record a federated run: per round, each client's local model and the aggregate.

    Client ``i`` of round ``r`` has the previous global model as parent (or ``parent=``);
    the aggregate has the round's clients as parents with FedAvg weights (data shares).

    * Multi-layer FL: ``aggregate(r, m, parents=[...], final=False)`` records an
      intermediate aggregator (edge server); the round's final ``aggregate(r, m)`` then
      merges the intermediate aggregators (and any client not merged yet).
    * DAG-FL: ``aggregate(r, m, parents=[...])`` with parents of any depth (a stale client,
      an older global); their default weights are the data they stand for.
    """

    framework = "fl"
    member_word = "client"
    merge_relation = "aggregate"

    def __init__(self, store: SqlStore, arch: Any, *, prefix: str = "fl", classes: Sequence[int] | None = None,
                 head: str | None = None, recipe: Any = None, device: str | torch.device | None = None,
                 compute_fim: bool = True, fisher_batch: int = 512, catch_up: bool = False,
                 exact_fim: bool = False) -> None:
        super().__init__(store, arch, prefix=prefix, classes=classes, head=head, recipe=recipe, device=device,
                         compute_fim=compute_fim, fisher_batch=fisher_batch, catch_up=catch_up, exact_fim=exact_fim)

    def client(self, round: int, client: int | str, model: Model, data: Data | str, *, recipe: Any = None,
               name: str | None = None, parent: str | None = None, meta: Mapping[str, Any] | None = None,
               fim: Any = None) -> NodeInfo:
        """A client's model after local training in ``round`` on ``data`` (parent: the global model)."""
        return self._member(round, client, model, data, recipe=recipe, name=name, parent=parent, meta=meta,
                            default_name=f"{self.prefix}/r{round}/c{client}", fim=fim)

    def aggregate(self, round: int, model: Model, *, name: str | None = None, parents: Sequence[str] | None = None,
                  weights: Sequence[float] | None = None, final: bool = True,
                  meta: Mapping[str, Any] | None = None) -> NodeInfo:
        """An aggregate of ``round``: by default the round's global model over its pending clients.

        ``final=False`` records an intermediate aggregator (multi-layer FL); ``parents``
        names any earlier nodes (DAG-FL); ``weights`` default to data shares and are
        normalised to sum 1.
        """
        k = self._merges[round] = self._merges.get(round, 0) + (0 if final else 1)
        default = f"{self.prefix}/r{round}/global" if final else f"{self.prefix}/r{round}/agg{k - 1}"
        return self._merge(round, model, parents=parents, weights=weights, name=name, final=final, meta=meta,
                           default_name=default)


    def server(self, round: int, model: Model, data: Data | str, *, recipe: Any = None, name: str | None = None,
               meta: Mapping[str, Any] | None = None, fim: Any = None) -> NodeInfo:
        """Server-side fine-tuning of the current global model on server data; it becomes the new global."""
        if self.global_node is None:
            raise ValueError("no global model to fine-tune: record initial() or aggregate() first")
        info = self.record(name or f"{self.prefix}/r{round}/server", model, parents=[self.global_node],
                           relation="finetune", data=data, recipe=recipe, meta={"round": round, **(meta or {})},
                           fim=fim)
        self.global_node = info.name
        return info


class DataParallelRecorder(_RoundRecorder):
    """Record distributed data-parallel training: shard models and their sync points.

    Between two syncs every rank trains a copy of the last synced model on its shard
    (``shard``, relation ``finetune``); the sync point averages them (``sync``, relation
    ``sync``, weights = shard shares). Record a sync every k local steps/epochs: each
    sync is a node, the per-step replicas in between are not.
    """

    framework = "ddp"
    member_word = "rank"
    merge_relation = "sync"

    def __init__(self, store: SqlStore, arch: Any, *, prefix: str = "ddp", classes: Sequence[int] | None = None,
                 head: str | None = None, recipe: Any = None, device: str | torch.device | None = None,
                 compute_fim: bool = True, fisher_batch: int = 512, catch_up: bool = False,
                 exact_fim: bool = False) -> None:
        super().__init__(store, arch, prefix=prefix, classes=classes, head=head, recipe=recipe, device=device,
                         compute_fim=compute_fim, fisher_batch=fisher_batch, catch_up=catch_up, exact_fim=exact_fim)

    def shard(self, step: int, rank: int, model: Model, data: Data | str, *, recipe: Any = None,
              name: str | None = None, parent: str | None = None, meta: Mapping[str, Any] | None = None,
              fim: Any = None) -> NodeInfo:
        """Rank ``rank``'s replica after training on its shard since the last sync."""
        return self._member(step, rank, model, data, recipe=recipe, name=name, parent=parent, meta=meta,
                            default_name=f"{self.prefix}/s{step}/rank{rank}", fim=fim)

    def sync(self, step: int, model: Model, *, name: str | None = None, parents: Sequence[str] | None = None,
             weights: Sequence[float] | None = None, meta: Mapping[str, Any] | None = None) -> NodeInfo:
        """The synchronised model of ``step`` (parents: that step's shard replicas)."""
        return self._merge(step, model, parents=parents, weights=weights, name=name, final=True, meta=meta,
                           default_name=f"{self.prefix}/s{step}/sync")


class IncrementalRecorder(LineageRecorder):
    """Record class-incremental learning: a chain where every step's head covers the classes seen so far.

    ``step(model, classes, data)`` records the next model with ``classes`` (output row ->
    label id) and an arch whose ``num_classes`` is ``len(classes)`` (:meth:`arch_for`),
    parent = the previous step (relation ``increment``). A step must keep every class of
    its parent; a step without new classes (consolidation) is allowed.
    """

    framework = "il"

    def __init__(self, store: SqlStore, arch: Any, *, prefix: str = "il", head: str | None = None, recipe: Any = None,
                 device: str | torch.device | None = None, compute_fim: bool = True, fisher_batch: int = 512,
                 num_classes_arg: str = "num_classes", catch_up: bool = False, exact_fim: bool = False) -> None:
        super().__init__(store, arch, prefix=prefix, head=head, recipe=recipe, device=device, compute_fim=compute_fim,
                         fisher_batch=fisher_batch, num_classes_arg=num_classes_arg, catch_up=catch_up,
                         exact_fim=exact_fim)
        self.last: str | None = None
        self.steps = 0

    def step(self, model: Model, classes: Sequence[int], data: Data | str, *, parent: str | None = None,
             name: str | None = None, arch: Any = None, recipe: Any = None,
             meta: Mapping[str, Any] | None = None, fim: Any = None) -> NodeInfo:
        """Record the next incremental step (parent: the previous step unless ``parent=``)."""
        classes = tuple(int(c) for c in classes)
        parent = parent if parent is not None else self.last
        parent_classes = self.store.node(parent).classes if parent else ()
        lost = sorted(set(parent_classes) - set(classes))
        if lost:
            raise ValueError(f"incremental step drops class(es) {lost} of its parent '{parent}'; heads only grow")
        k = self.steps
        info = self.record(name or f"{self.prefix}/step{k}", model, arch=arch or self.arch_for(classes),
                           parents=[parent] if parent else [], relation="increment", data=data, classes=classes,
                           recipe=recipe, fim=fim,
                           meta={"step": k, "new_classes": sorted(set(classes) - set(parent_classes)), **(meta or {})})
        self.last, self.steps = info.name, k + 1
        return info


class TransferRecorder(LineageRecorder):
    """Record transfer learning: a base model and heads fine-tuned from it for other label sets.

    ``base`` records the fully trained source model; ``head`` a model whose body is its
    parent's and whose head (sized for ``classes``) alone was trained (relation
    ``transfer``). Record the head's recipe with ``train_only`` set (e.g.
    ``Recipe(train_only="fc")``): it is kept on the node and used by retraining. As the
    body is unchanged, the store keeps one copy of it for the base and all its heads.
    """

    framework = "tl"

    def __init__(self, store: SqlStore, arch: Any, *, prefix: str = "tl", head: str | None = None, recipe: Any = None,
                 device: str | torch.device | None = None, compute_fim: bool = True, fisher_batch: int = 512,
                 num_classes_arg: str = "num_classes", catch_up: bool = False, exact_fim: bool = False) -> None:
        super().__init__(store, arch, prefix=prefix, head=head, recipe=recipe, device=device, compute_fim=compute_fim,
                         fisher_batch=fisher_batch, num_classes_arg=num_classes_arg, catch_up=catch_up,
                         exact_fim=exact_fim)
        self.base_node: str | None = None
        self._heads = 0

    def base(self, model: Model, data: Data | str, *, classes: Sequence[int], name: str | None = None,
             parents: Sequence[str] = (), arch: Any = None, recipe: Any = None,
             meta: Mapping[str, Any] | None = None, fim: Any = None) -> NodeInfo:
        """The source model, trained on ``data`` with a head for ``classes``."""
        info = self.record(name or f"{self.prefix}/base", model, arch=arch or self.arch_for(classes),
                           parents=list(parents), relation="transfer" if parents else None, data=data,
                           classes=classes, recipe=recipe, meta=meta, fim=fim)
        self.base_node = info.name
        return info

    def head(self, model: Model, data: Data | str, *, classes: Sequence[int], parent: str | None = None,
             name: str | None = None, arch: Any = None, recipe: Any = None,
             meta: Mapping[str, Any] | None = None, fim: Any = None) -> NodeInfo:
        """A model transferred from ``parent`` (default: the base), only its head trained, for ``classes``."""
        parent = parent if parent is not None else self.base_node
        if parent is None:
            raise ValueError("transfer head has no parent: record base() first or pass parent=")
        rec = recipe if recipe is not None else self.recipe
        trained = getattr(rec, "train_only", None) if not isinstance(rec, Mapping) else rec.get("train_only")
        k = self._heads
        info = self.record(name or f"{self.prefix}/head{k}", model, arch=arch or self.arch_for(classes),
                           parents=[parent], relation="transfer", data=data, classes=classes, recipe=rec,
                           meta={"trained": trained, **(meta or {})}, fim=fim)
        self._heads = k + 1
        return info


# ------------------------------------------------------------------ training helpers
# ------------------------------------------------------------------ retraining reference
@dataclass
class Reference:
    """Models retrained without the forgotten labels along the lineage (in memory, never stored)."""

    labels: tuple[int, ...]
    nodes: list[str]  # retrained nodes, topological order
    states: dict[str, dict[str, Tensor]]
    seconds: dict[str, float]  # per node: build + train (or FedAvg)
    wall_s: float
    ancestors: dict[str, set[str]] = field(default_factory=dict)

    def cumulative(self, node: str) -> float:
        """Seconds to retrain ``node`` and every retrained node it inherits from (sequential dependence)."""
        return sum(self.seconds[n] for n in self.ancestors[node] | {node} if n in self.seconds)

    def model(self, store: SqlStore, node: str) -> nn.Module:
        """The retrained model of ``node`` (eval mode, CPU)."""
        return build_model(store.node(node).arch, self.states[node])


def retrain_reference(store: SqlStore, labels: Sequence[int], *, policy: str = "first",
                      train_fn: Callable[[str, nn.Module, Data, Any, Sequence[int]], Any] | None = None,
                      device: str | torch.device | None = None,
                      progress: Callable[[str, float], None] | None = None) -> Reference:
    """Retrain every node an unlearning request affects, without ``labels``, in topological order.

    The gold standard FIUn is compared with (the paper's "Re-training" benchmark): the
    affected nodes are the discovery nodes and all their descendants (as
    ``store.plan_unlearning`` finds them). Each is rebuilt from its in-edges the way the
    recorders' training loops build models:

    * aggregate/sync node: FedAvg of its parents (retrained where affected) with the
      recorded edge weights (data sizes where none);
    * otherwise: :func:`fresh_model` seeded with the recipe's seed, then
      :func:`inherit_weights` from its parent (FedAvg of its parents if several), then
      :func:`fit` on its own data minus ``labels`` with its recorded recipe.

    ``train_fn(name, model, data, recipe, classes)`` replaces :func:`fit`. Nodes are not
    changed in the store; the retrained weights come back in a :class:`Reference`.
    """
    forget = tuple(sorted({int(x) for x in labels}))
    plan = unlearning.plan_unlearning(store, forget, policy=policy).plan
    g = store.graph()
    snaps = store.snapshots(list(g))
    counts = plan.counts  # node with data -> (forgotten, remaining), as the retrain method sees them
    affected = list(plan.affected)
    states: dict[str, dict[str, Tensor]] = {}
    seconds: dict[str, float] = {}
    stored: dict[str, dict[str, Tensor]] = {}

    def state_of(name: str) -> dict[str, Tensor]:
        if name in states:
            return states[name]
        if name not in stored:
            stored[name] = store.state_dict(name)
        return stored[name]

    t_all = time.perf_counter()
    for name in affected:
        t0 = time.perf_counter()
        info = store.node(name)
        recipe = Recipe.from_json(info.recipe) if info.recipe else None
        data = store.node_data(name)
        parents = []
        for p, _, w in info.parents:
            weight = w if w is not None else float(max(snaps[p].data_size, 1))
            if data is None:  # FedAvg re-weighted by the data each parent keeps (as the retrain method does)
                weight *= retained_share(snaps, counts, p)
                if weight <= 0:
                    continue
            parents.append((state_of(p), weight, snaps[p].classes))
        keep = data.filter_labels(drop=forget) if data is not None else None
        model = fresh_model(info.arch, recipe.seed if recipe else 0)
        try:
            retrain_node(model, parents=parents, classes=info.classes, head=info.head, data=keep, recipe=recipe,
                         aggregate=data is None and bool(parents) and all(tuple(c) == info.classes for *_, c in parents),
                         device=device, train_fn=(lambda m, d, r, c, _n=name: train_fn(_n, m, d, r, c)) if train_fn else None)
        except UmigError as e:
            raise UmigError(f"cannot retrain node '{name}': {e}") from None
        states[name] = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        seconds[name] = time.perf_counter() - t0
        if progress:
            progress(name, seconds[name])
    wall = time.perf_counter() - t_all
    ancestors = {n: set(G.effective_ancestors(g, n)) - {n} for n in affected}
    return Reference(labels=forget, nodes=affected, states=states, seconds=seconds, wall_s=wall, ancestors=ancestors)


def evaluate_models(store: SqlStore, models: Mapping[str, Model], labels: Sequence[int], *,
                    heldout: str | Data | None = None, device: str | torch.device | None = None,
                    batch_size: int = 512) -> dict[str, dict[str, float | None]]:
    """AD_f / AD_r of given weights for nodes, keyed like ``UnlearnResult`` metrics.

    ``models`` maps node name -> module or state dict (e.g. ``Reference.states``). Returns
    ``{node: {"AD_f_train": .., "AD_r_train": .., "AD_f_heldout": .., "AD_r_heldout": ..}}``
    on the node's effective training data (``store.effective_data``) and on ``heldout`` (restricted to the node's classes).
    """
    forget = {int(x) for x in labels}
    held = resolve(heldout) if isinstance(heldout, str) else heldout
    out: dict[str, dict[str, float | None]] = {}
    for name, m in models.items():
        info = store.node(name)
        if isinstance(m, nn.Module):
            model = m
        else:
            model = build_model(info.arch, m)
        sets = {"train": store.effective_data(name)}
        if held is not None:
            sets["heldout"] = held.filter_labels(keep=info.classes)
        row: dict[str, float | None] = {}
        for split, d in sets.items():
            if d is None or not len(d):
                continue
            acc = unlearning_accuracy(model, d.batches(batch_size), info.classes, forget, device=device)
            row[f"AD_f_{split}"], row[f"AD_r_{split}"] = acc["AD_f"], acc["AD_r"]
        out[name] = row
    return out
