"""Baseline per-node unlearners (``retrain``, ``finetune``, ``gradient-ascent``, ``distill``) and the
helpers every per-node method here shares (whose data trains a node, seeding, counting changes).

Data of a node: a node with its own training data uses it; a data-less node (an FL aggregate, a DDP
sync) uses its parents' data, weighted by the edge weights (data shares) or, where an edge has no
weight, by the parent's data size. ``check(job)`` refuses a request before anything runs when an
affected node would have nothing to train on.

* ``retrain``: the gold standard. Along the lineage in topological order: a node with data starts
  from its parents' *retrained* weights (a root from a fresh, recipe-seeded initialisation) and is
  trained with its recorded recipe on its retain data; an aggregate re-aggregates its (retrained)
  parents by FedAvg. Refused where a node that trains has no recorded recipe.
* ``finetune``: continue training the whole model on the retain data.
* ``gradient-ascent``: maximise the loss on the forget data until its accuracy falls to ``stop_at``.
* ``distill``: a student trained on the retain data to match the original model's (teacher's)
  softened outputs.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umig.data import Data
from umig.errors import UnlearningError
from umig.heads import label_rows
from umig.train import Recipe, accuracy, fit, retrain_node
from umig.unlearner import (
    Job,
    NodeContext,
    NodeSnapshot,
    NodeUnlearner,
    NodeUpdate,
    Param,
    retained_share,
    source_names,
)

OPTIMIZERS = ("sgd", "adam")


# ------------------------------------------------------------------ helpers
def seed_of(*parts: Any) -> int:
    """A stable 31-bit seed from any printable parts (Python's ``hash`` is salted per process)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def forget_source_names(nodes: Mapping[str, NodeSnapshot], name: str,
                        holds: Callable[[str], bool]) -> tuple[list[tuple[str, float]], bool]:
    """Whose forget samples stand for ``name``: its own sources that hold forgotten data or, when none
    does (an inherited node whose own data never had it), the nearest ancestors whose own data
    has it (the discovery nodes it inherited it from). Returns ``(sources, from_ancestors)``."""
    direct = [(s, w) for s, w in source_names(nodes, name) if holds(s)]
    if direct:
        return direct, False
    frontier = [p for p, _, _ in nodes[name].parents]
    seen = {name}
    while frontier:
        found = sorted({n for n in frontier if n in nodes and nodes[n].data_ref is not None and holds(n)})
        if found:
            return [(n, float(max(nodes[n].data_size, 1))) for n in found], True
        nxt = []
        for n in frontier:
            if n not in seen and n in nodes:
                seen.add(n)
                nxt.extend(p for p, _, _ in nodes[n].parents)
        frontier = nxt
    return [], False


def check_data(job: Job, method: str, *, retain: bool = True, forget: bool = False) -> None:
    """Raise ``UnlearningError`` naming the affected nodes that would have nothing to train on."""
    problems = []
    for n in job.plan.affected:
        srcs = source_names(job.nodes, n)
        if not srcs:
            problems.append(f"{n} (no training data of its own or below it)")
            continue
        if retain and not any(job.holds_retain(s) for s, _ in srcs) and not trains_on_peers(
                job.nodes, n, job.holds_forget, job.holds_retain):
            where = "its data" if srcs[0][0] == n else "the data below it"
            problems.append(f"{n} ({where} holds only what is to be forgotten: no retain data)")
        if forget and not forget_source_names(job.nodes, n, job.holds_forget)[0]:
            problems.append(f"{n} (no forget data of its own, its parents' or its ancestors')")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UnlearningError(f"method '{method}' cannot run on {'; '.join(problems[:5])}{more}")


def _own_retain_sources(ctx: NodeContext) -> list[tuple[str, float, Any]]:
    out = []
    for name, w in source_names(ctx.snapshots, ctx.node.name):
        d = ctx.retain_data(name)
        if d is not None and len(d):
            out.append((name, w, d))
    if not out:
        raise UnlearningError(f"node '{ctx.node.name}' has no retain data to train on")
    return out


def peer_names(nodes: Mapping[str, NodeSnapshot], name: str,
               holds_retain: Callable[[str], bool]) -> list[tuple[str, float]]:
    """The rest of the federation of ``name``: the sources (other than ``name``) of the nodes it feeds
    that keep retain data, with their shares there (the largest where a source feeds several)."""
    out: dict[str, float] = {}
    for child, snap in nodes.items():
        if any(p == name for p, _, _ in snap.parents):
            for src, w in source_names(nodes, child):
                if src != name and holds_retain(src):
                    out[src] = max(out.get(src, 0.0), w)
    return sorted(out.items())


def trains_on_peers(nodes: Mapping[str, NodeSnapshot], name: str, holds_forget: Callable[[str], bool],
                    holds_retain: Callable[[str], bool]) -> bool:
    """Whether ``name``'s own data is entirely forgotten and its federation peers keep data to train on."""
    return (nodes[name].data_ref is not None and holds_forget(name) and not holds_retain(name)
            and bool(peer_names(nodes, name, holds_retain)))


def training_sources(ctx: NodeContext) -> tuple[list[tuple[str, float, Any]], bool]:
    """``(name, weight, retain Data)`` to train a node on, and whether they are its peers':
    :func:`retain_sources`, except for a node whose own data is entirely forgotten."""
    name = ctx.node.name
    if trains_on_peers(ctx.snapshots, name, ctx.holds_forget, ctx.holds_retain):
        # A peer may know labels this node's head cannot predict (the next step of an incremental chain).
        peers = [(n, w, ctx.retain_data(n)) for n, w in peer_names(ctx.snapshots, name, ctx.holds_retain)]
        peers = [(n, w, d.filter_labels(keep=ctx.classes)) for n, w, d in peers if d is not None]
        peers = [(n, w, d) for n, w, d in peers if len(d)]
        if peers:
            return peers, True
    return _own_retain_sources(ctx), False


def retain_sources(ctx: NodeContext) -> list[tuple[str, float, Any]]:
    """``(name, weight, Data)`` of the retain data a node trains on: its sources' (see
    :func:`source_names`), or its federation peers' when its own data is entirely forgotten."""
    return training_sources(ctx)[0]


def forget_sources(ctx: NodeContext) -> list[tuple[str, float, Any]]:
    """``(name, weight, Data)`` of the forget samples that stand for this node (see :func:`forget_source_names`)."""
    out = []
    for name, w in forget_source_names(ctx.snapshots, ctx.node.name, ctx.holds_forget)[0]:
        d = ctx.forget_data(name)
        if d is not None and len(d):
            out.append((name, w, d))
    return out


def concat(datas: Sequence[Any]):
    return datas[0] if len(datas) == 1 else Data.concat(list(datas))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def changed_entries(before: Mapping[str, Tensor], after: Mapping[str, Tensor], params: Iterable[str]) -> int:
    """Parameter entries whose value differs (buffers such as BatchNorm statistics not counted)."""
    return sum(int((before[k] != after[k]).sum()) for k in params if k in before and k in after)


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def make_optimizer(params: Iterable[Tensor], name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


def _recipe(p: Mapping[str, Any], seed: int) -> Recipe:
    return Recipe(optimizer=p["optimizer"], lr=float(p["lr"]), epochs=int(p["epochs"]),
                  batch_size=int(p["batch_size"]), seed=seed)


def _common_params(epochs: int, lr: float, optimizer: str = "adam") -> dict[str, Param]:
    return {
        "epochs": Param(epochs, "training epochs over the node's data"),
        "lr": Param(lr, "learning rate"),
        "optimizer": Param(optimizer, "optimizer", choices=OPTIMIZERS),
        "batch_size": Param(64, "batch size"),
    }


def _validate_positive(job: Job, method: str, *names: str) -> None:
    for n in names:
        v = job.params[n]
        if not v > 0:
            raise UnlearningError(f"method '{method}': parameter {n} must be > 0, got {v}")


def model_update(ctx: NodeContext, before: Mapping[str, Tensor], model: nn.Module, **metrics: Any) -> NodeUpdate:
    """The node's new full weights from ``model``, with change counts and ``metrics``."""
    after = cpu_state(model)
    pnames = [n for n, _ in model.named_parameters()]
    return NodeUpdate(state=after, metrics={
        "params_changed": changed_entries(before, after, pnames),
        "params_total": param_count(model),
        **metrics,
    })


# ------------------------------------------------------------------ retrain
def check_recipes(job: Job, method: str) -> None:
    """Refuse, naming them, affected nodes with data but no recorded recipe, or with neither data nor parents."""
    missing, nodata = [], []
    for n in job.plan.affected:
        s = job.nodes[n]
        if s.data_ref is not None:
            if s.recipe is None:
                missing.append(n)
        elif not s.parents:
            nodata.append(n)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise UnlearningError(
            f"method '{method}' needs each retrained node's training recipe; none was recorded for "
            f"{', '.join(missing[:5])}{more} (add nodes with --recipe FILE / recipe=...)")
    if nodata:
        raise UnlearningError(f"method '{method}': node(s) {', '.join(nodata)} have neither data nor parents")


def parent_state(ctx: NodeContext, p: str) -> dict[str, Tensor]:
    """A parent's weights after this operation where a sequential method changed it, else before."""
    new = ctx.updated_state_of(p)
    return new if new is not None else ctx.state_of(p)


def lineage_parents(ctx: NodeContext) -> list[tuple[dict[str, Tensor], float, tuple[int, ...]]]:
    """``(state, weight, classes)`` per in-edge, as retraining along the lineage sees them.

    An aggregate's edge weights are re-scaled by the share of its data each parent keeps, so a
    client left with none drops out of the FedAvg.
    """
    snap = ctx.node
    parents = []
    for p, _rel, w in ctx.parents():
        weight = float(w) if w is not None else float(max(ctx.snapshots[p].data_size, 1))
        if snap.data_ref is None:
            weight *= retained_share(ctx.snapshots, ctx.counts, p)
            if weight <= 0:
                continue
        parents.append((parent_state(ctx, p), weight, ctx.snapshots[p].classes))
    if snap.data_ref is None and ctx.parents() and not parents:
        raise UnlearningError(f"node '{snap.name}': every node it aggregates is forgotten entirely")
    return parents


def retrain_from(ctx: NodeContext, parents: Sequence[tuple[Mapping[str, Tensor], float, Sequence[int]]]
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """Retrain the context's node from ``parents`` (:func:`umig.train.retrain_node`) with its recorded
    recipe on its retain data; returns the model and what happened."""
    snap = ctx.node
    recipe = Recipe.from_json(snap.recipe) if snap.recipe else None
    torch.manual_seed(recipe.seed if recipe else 0)
    model = ctx.build()
    retain = ctx.retain_data()
    try:
        # A data-less node re-aggregates its parents, retrained where they were affected.
        done = retrain_node(model, parents=parents, classes=snap.classes, head=snap.head, data=retain,
                            recipe=recipe, aggregate=snap.data_ref is None, device=ctx.device)
    except ValueError as e:
        raise UnlearningError(f"node '{snap.name}': cannot re-aggregate its parents: {e}") from None
    return model, done


class Retrain(NodeUnlearner):
    """Retrain every affected node without the forget data, along the lineage (topological order)."""

    name = "retrain"
    description = ("Gold standard: retrain affected nodes without the forget data in topological order "
                   "(recorded recipes; aggregates re-aggregate their retrained parents by FedAvg).")
    kinds = frozenset({"labels", "samples", "client"})
    params: Mapping[str, Param] = {}
    sequential = True

    def check(self, job: Job) -> None:
        check_recipes(job, self.name)

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        t0 = time.perf_counter()
        before = ctx.state_of(ctx.node.name)
        model, done = retrain_from(ctx, lineage_parents(ctx))
        return model_update(ctx, before, model, retrain=done["start"], trained=done["trained"],
                            retain_samples=done["samples"], seconds_train=time.perf_counter() - t0)


# ----------------------------------------------------------------- finetune
class Finetune(NodeUnlearner):
    """Fine-tune the whole model on the retain data (its own, or its parents' for an aggregate)."""

    name = "finetune"
    description = "Baseline: fine-tune all parameters on the retain data."
    kinds = frozenset({"labels", "samples", "client"})
    params: Mapping[str, Param] = _common_params(3, 0.001)

    def check(self, job: Job) -> None:
        _validate_positive(job, self.name, "epochs", "lr", "batch_size")
        check_data(job, self.name, retain=True)

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        t0 = time.perf_counter()
        before = ctx.state_of(ctx.node.name)
        model = ctx.model()
        data = concat([d for _, _, d in retain_sources(ctx)])
        fit(model, data, _recipe(ctx.params, seed_of(ctx.seed, ctx.node.name)), ctx.classes, ctx.device,
            capture=False)  # the new version keeps the node's model FIM: none to capture
        return model_update(ctx, before, model, retain_samples=len(data), seconds_train=time.perf_counter() - t0)


# ----------------------------------------------------------- gradient ascent
class GradientAscent(NodeUnlearner):
    """Gradient ascent on the forget data (BatchNorm frozen), stopped once forget accuracy <= stop_at."""

    name = "gradient-ascent"
    description = "Baseline: maximise the loss on the forget data until its accuracy falls to stop_at."
    kinds = frozenset({"labels", "samples", "client"})
    params: Mapping[str, Param] = {
        **_common_params(20, 0.005, "sgd"),
        "stop_at": Param(0.05, "stop once accuracy on the whole forget data is at most this"),
    }

    def check(self, job: Job) -> None:
        _validate_positive(job, self.name, "epochs", "lr", "batch_size")
        check_data(job, self.name, retain=False, forget=True)

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        t0 = time.perf_counter()
        p = ctx.params
        before = ctx.state_of(ctx.node.name)
        model = ctx.model().eval()  # BatchNorm statistics stay those of the original model
        srcs = forget_sources(ctx)
        if not srcs:
            raise UnlearningError(f"node '{ctx.node.name}' has no forget data to ascend on")
        data = concat([d for _, _, d in srcs])
        opt = make_optimizer(model.parameters(), p["optimizer"], p["lr"])
        seed = seed_of(ctx.seed, ctx.node.name)

        def forget_acc() -> float:
            return accuracy(model, data.batches(512), ctx.classes, ctx.device)

        steps, acc = 0, forget_acc()
        for epoch in range(p["epochs"]):
            if acc <= p["stop_at"]:
                break
            for x, y in data.batches(p["batch_size"], shuffle=True, seed=seed + epoch):
                x, y = x.to(ctx.device), y.to(ctx.device)
                z = model(x)
                rows = label_rows(y, ctx.classes)
                # The batch is already forgotten: check the whole set before ascending any further.
                if float((z.argmax(1) == rows).float().mean()) <= p["stop_at"]:
                    acc = forget_acc()
                    if acc <= p["stop_at"]:
                        break
                loss = -F.cross_entropy(z, rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                steps += 1
            else:
                acc = forget_acc()
        return model_update(ctx, before, model, steps=steps, forget_acc=acc, seconds_train=time.perf_counter() - t0)


# ------------------------------------------------------------------ distill
class Distill(NodeUnlearner):
    """A student trained on the retain data to match the original model (teacher)."""

    name = "distill"
    description = "Baseline: distil the original model into a student using only the retain data."
    kinds = frozenset({"labels", "samples", "client"})
    params: Mapping[str, Param] = {
        **_common_params(10, 0.01),
        "temperature": Param(2.0, "softmax temperature of teacher and student"),
        "init": Param("scratch", "student initialisation: fresh weights or a copy of the teacher",
                      choices=("scratch", "teacher")),
    }

    def check(self, job: Job) -> None:
        _validate_positive(job, self.name, "epochs", "lr", "batch_size", "temperature")
        check_data(job, self.name, retain=True)

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        t0 = time.perf_counter()
        p = ctx.params
        before = ctx.state_of(ctx.node.name)
        teacher = ctx.model().eval()
        seed = seed_of(ctx.seed, ctx.node.name)
        torch.manual_seed(seed)
        student = ctx.build() if p["init"] == "scratch" else ctx.model()
        student.train()
        data = concat([d for _, _, d in retain_sources(ctx)])
        opt = make_optimizer(student.parameters(), p["optimizer"], p["lr"])
        temp = float(p["temperature"])
        for epoch in range(p["epochs"]):
            for x, _y in data.batches(p["batch_size"], shuffle=True, seed=seed + epoch):
                x = x.to(ctx.device)
                with torch.no_grad():
                    soft = F.softmax(teacher(x) / temp, dim=1)
                loss = F.kl_div(F.log_softmax(student(x) / temp, dim=1), soft, reduction="batchmean") * temp**2
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        student.eval()
        return model_update(ctx, before, student, retain_samples=len(data), seconds_train=time.perf_counter() - t0)
