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
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umig.errors import UnlearningError
from umig.fisher import label_rows
from umig.train import Recipe, fedavg, train
from unlearners.base import Job, NodeContext, NodeSnapshot, NodeUnlearner, NodeUpdate, Param

OPTIMIZERS = ("sgd", "adam")


# ------------------------------------------------------------------ helpers
def seed_of(*parts: Any) -> int:
    """A stable 31-bit seed from any printable parts (Python's ``hash`` is salted per process)."""
    return zlib.crc32(":".join(map(str, parts)).encode()) & 0x7FFFFFFF


def source_names(nodes: Mapping[str, NodeSnapshot], name: str) -> list[tuple[str, float]]:
    """Whose data trains ``name``: itself when it has data, else its parents that have data.

    Returns ``(node, weight)``; a parent's weight is its edge weight (FedAvg data share) or, when
    the edge has none, the parent's data size.
    """
    snap = nodes[name]
    if snap.data_ref is not None:
        return [(name, 1.0)]
    out = []
    for p, _rel, w in snap.parents:
        ps = nodes.get(p)
        if ps is not None and ps.data_ref is not None:
            out.append((p, float(w) if w is not None else float(max(ps.data_size, 1))))
    return out


def has_retain(snap: NodeSnapshot, labels: Iterable[int]) -> bool:
    return bool(set(snap.labels) - set(int(x) for x in labels))


def has_forget(snap: NodeSnapshot, labels: Iterable[int]) -> bool:
    return bool(set(snap.labels) & set(int(x) for x in labels))


def forget_source_names(nodes: Mapping[str, NodeSnapshot], name: str,
                        labels: Iterable[int]) -> tuple[list[tuple[str, float]], bool]:
    """Whose forget samples stand for ``name``: its own sources that hold a forgotten label or, when none
    does (an inherited node whose own data never had the label), the nearest ancestors whose own data
    has it (the discovery nodes it inherited the label from). Returns ``(sources, from_ancestors)``."""
    direct = [(s, w) for s, w in source_names(nodes, name) if has_forget(nodes[s], labels)]
    if direct:
        return direct, False
    frontier = [p for p, _, _ in nodes[name].parents]
    seen = {name}
    while frontier:
        found = sorted({n for n in frontier if n in nodes and nodes[n].data_ref is not None
                        and has_forget(nodes[n], labels)})
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
            problems.append(f"{n} (no training data of its own and no parent with data)")
            continue
        if retain and not any(has_retain(job.nodes[s], job.labels) for s, _ in srcs):
            where = "its data" if srcs[0][0] == n else "its parents' data"
            problems.append(f"{n} ({where} holds only the labels to forget: no retain data)")
        if forget and not forget_source_names(job.nodes, n, job.labels)[0]:
            problems.append(f"{n} (no forget data of its own, its parents' or its ancestors')")
    if problems:
        more = f" and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise UnlearningError(f"method '{method}' cannot run on {'; '.join(problems[:5])}{more}")


def retain_sources(ctx: NodeContext) -> list[tuple[str, float, Any]]:
    """``(name, weight, Data)`` of every source with retain data (see :func:`source_names`)."""
    out = []
    for name, w in source_names(ctx.snapshots, ctx.node.name):
        d = ctx.retain_data(name)
        if d is not None and len(d):
            out.append((name, w, d))
    if not out:
        raise UnlearningError(f"node '{ctx.node.name}' has no retain data to train on")
    return out


def forget_sources(ctx: NodeContext) -> list[tuple[str, float, Any]]:
    """``(name, weight, Data)`` of the forget samples that stand for this node (see :func:`forget_source_names`)."""
    out = []
    for name, w in forget_source_names(ctx.snapshots, ctx.node.name, ctx.labels)[0]:
        d = ctx.forget_data(name)
        if d is not None and len(d):
            out.append((name, w, d))
    return out


def concat(datas: Sequence[Any]):
    from umig.data import Data

    return datas[0] if len(datas) == 1 else Data.concat(list(datas))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def changed_entries(before: Mapping[str, Tensor], after: Mapping[str, Tensor], params: Iterable[str]) -> int:
    """Parameter entries whose value differs (buffers such as BatchNorm statistics not counted)."""
    return sum(int((before[k] != after[k]).sum()) for k in params if k in before and k in after)


def cpu_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def rows_of(y: Tensor, classes: Sequence[int]) -> Tensor:
    return label_rows(y, classes)


def make_optimizer(params: Iterable[Tensor], name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    return torch.optim.Adam(params, lr=lr)


def _recipe(p: Mapping[str, Any], seed: int) -> Recipe:
    return Recipe(optimizer=p["optimizer"], lr=float(p["lr"]), epochs=int(p["epochs"]),
                  batch_size=int(p["batch_size"]), seed=seed)


def train_on(model: nn.Module, data: Any, recipe: Recipe, classes: Sequence[int], device: Any) -> dict[str, float]:
    """``umig.train.train`` over shuffled, seeded epochs of ``data`` (what the demo's clients do)."""
    return train(model, lambda e: data.batches(recipe.batch_size, shuffle=True, seed=recipe.seed + e),
                 recipe, classes, device=device)


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


def _update(ctx: NodeContext, before: Mapping[str, Tensor], model: nn.Module, **metrics: Any) -> NodeUpdate:
    after = cpu_state(model)
    pnames = [n for n, _ in model.named_parameters()]
    return NodeUpdate(state=after, metrics={
        "params_changed": changed_entries(before, after, pnames),
        "params_total": param_count(model),
        **metrics,
    })


# ------------------------------------------------------------------ retrain
def inherit(model: nn.Module, parent: Mapping[str, Tensor], parent_classes: Sequence[int],
            classes: Sequence[int], head: str) -> None:
    """Start ``model`` from a parent's weights: every tensor of equal name and shape is copied;
    head rows (weight and bias) are copied by label id where the heads differ (incremental)."""
    sd = model.state_dict()
    prefix = head + "."
    pos = {c: i for i, c in enumerate(parent_classes)}
    shared = [(r, pos[c]) for r, c in enumerate(classes) if c in pos]
    for k, v in sd.items():
        pv = parent.get(k)
        if pv is None:
            continue
        if pv.shape == v.shape and (not k.startswith(prefix) or tuple(parent_classes) == tuple(classes)):
            sd[k] = pv.to(v.dtype).clone()
        elif k.startswith(prefix) and shared and pv.dim() == v.dim() and pv.shape[1:] == v.shape[1:]:
            t = v.clone()
            rows = torch.tensor([r for r, _ in shared])
            prow = torch.tensor([q for _, q in shared])
            t[rows] = pv[prow].to(v.dtype)
            sd[k] = t
    model.load_state_dict(sd)


class Retrain(NodeUnlearner):
    """Retrain every affected node without the forget data, along the lineage (topological order)."""

    name = "retrain"
    description = ("Gold standard: retrain affected nodes without the forget data in topological order "
                   "(recorded recipes; aggregates re-aggregate their retrained parents by FedAvg).")
    params: Mapping[str, Param] = {}
    sequential = True

    def check(self, job: Job) -> None:
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
                f"method 'retrain' needs each retrained node's training recipe; none was recorded for "
                f"{', '.join(missing[:5])}{more} (add nodes with --recipe FILE / recipe=...)")
        if nodata:
            raise UnlearningError(f"method 'retrain': node(s) {', '.join(nodata)} have neither data nor parents")

    def _parent_state(self, ctx: NodeContext, p: str) -> dict[str, Tensor]:
        new = ctx.updated_state_of(p)
        return new if new is not None else ctx.state_of(p)

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        t0 = time.perf_counter()
        snap = ctx.node
        before = ctx.state_of(snap.name)
        parents = ctx.parents()
        if snap.data_ref is None:
            # An aggregate (or sync/copy) re-aggregates its parents, retrained where they were affected.
            states, weights = [], []
            for p, _rel, w in parents:
                states.append(self._parent_state(ctx, p))
                weights.append(float(w) if w is not None else float(max(ctx.snapshots[p].data_size, 1)))
            try:
                new = fedavg(states, weights)
            except ValueError as e:
                raise UnlearningError(f"node '{snap.name}': cannot re-aggregate its parents: {e}") from None
            model = ctx.build()
            model.load_state_dict(new)
            return _update(ctx, before, model, retrain="fedavg", parents=len(states),
                           seconds_train=time.perf_counter() - t0)
        recipe = Recipe.from_json(snap.recipe)
        torch.manual_seed(recipe.seed)
        model = ctx.build()
        start = "init"
        if parents:
            same = [p for p, _, _ in parents if tuple(ctx.snapshots[p].classes) == tuple(snap.classes)]
            if len(parents) > 1 and len(same) == len(parents):
                ws = [float(w) if w is not None else float(max(ctx.snapshots[p].data_size, 1)) for p, _, w in parents]
                model.load_state_dict(fedavg([self._parent_state(ctx, p) for p, _, _ in parents], ws))
            else:
                p = parents[0][0]
                inherit(model, self._parent_state(ctx, p), ctx.snapshots[p].classes, snap.classes, snap.head)
            start = "parents"
        retain = ctx.retain_data()
        trained = retain is not None and len(retain) > 0
        if trained:
            train_on(model, retain, recipe, snap.classes, ctx.device)
        return _update(ctx, before, model, retrain=start, trained=trained,
                       retain_samples=len(retain) if retain is not None else 0,
                       seconds_train=time.perf_counter() - t0)


# ----------------------------------------------------------------- finetune
class Finetune(NodeUnlearner):
    """Fine-tune the whole model on the retain data (its own, or its parents' for an aggregate)."""

    name = "finetune"
    description = "Baseline: fine-tune all parameters on the retain data."
    params: Mapping[str, Param] = _common_params(3, 0.001)

    def check(self, job: Job) -> None:
        _validate_positive(job, self.name, "epochs", "lr", "batch_size")
        check_data(job, self.name, retain=True)

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        t0 = time.perf_counter()
        before = ctx.state_of(ctx.node.name)
        model = ctx.model()
        data = concat([d for _, _, d in retain_sources(ctx)])
        train_on(model, data, _recipe(ctx.params, seed_of(ctx.seed, ctx.node.name)), ctx.classes, ctx.device)
        return _update(ctx, before, model, retain_samples=len(data), seconds_train=time.perf_counter() - t0)


# ----------------------------------------------------------- gradient ascent
class GradientAscent(NodeUnlearner):
    """Gradient ascent on the forget data (BatchNorm frozen), stopped once forget accuracy <= stop_at."""

    name = "gradient-ascent"
    description = "Baseline: maximise the loss on the forget data until its accuracy falls to stop_at."
    params: Mapping[str, Param] = {
        **_common_params(20, 0.005, "sgd"),
        "stop_at": Param(0.05, "stop once accuracy on the whole forget data is at most this"),
    }

    def check(self, job: Job) -> None:
        _validate_positive(job, self.name, "epochs", "lr", "batch_size")
        check_data(job, self.name, retain=False, forget=True)

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        from umig.train import accuracy

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
                rows = rows_of(y, ctx.classes)
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
        return _update(ctx, before, model, steps=steps, forget_acc=acc, seconds_train=time.perf_counter() - t0)


# ------------------------------------------------------------------ distill
class Distill(NodeUnlearner):
    """A student trained on the retain data to match the original model (teacher)."""

    name = "distill"
    description = "Baseline: distil the original model into a student using only the retain data."
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
        return _update(ctx, before, student, retain_samples=len(data), seconds_train=time.perf_counter() - t0)
