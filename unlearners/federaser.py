"""``federaser``: history-based unlearning for federated lineages, after FedEraser (Liu et al., IWQoS 2021).

umig already stores every client's checkpoint at every round, so each client's original local
update ``U = client - its parent`` is known. The lineage is replayed in topological order:

* an aggregate (no data of its own) is the FedAvg of its replayed parents, its edge weights
  re-scaled by the share of data each keeps (a client left with none drops out), exactly as
  ``retrain`` re-aggregates;
* a client at a round starts from its parent's replayed weights and trains briefly on its retained
  data (``calibration_ratio`` of its recorded epochs); per parameter tensor, the new update takes
  the *direction* of that short training and the *magnitude* ``||U||`` of the stored update;
  buffers (BatchNorm statistics) come from the short training;
* a client that keeps no data (a forgotten client) takes its parent's replayed weights unchanged;
  it carries no weight in the aggregates above it.

Nodes this recipe does not fit (several parents, no parent, a parent with other classes) are
retrained the way ``retrain`` does it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import Tensor

from umig.errors import UnlearningError
from umig.train import Recipe, fit
from umig.unlearner import (
    Job,
    NodeContext,
    NodeSnapshot,
    NodeUnlearner,
    NodeUpdate,
    Param,
)
from umig.unlearners.baselines import (
    check_recipes,
    cpu_state,
    lineage_parents,
    model_update,
    parent_state,
    retrain_from,
)


def calibration_epochs(epochs: int, ratio: float) -> int:
    """Epochs of the short calibration run: ``ratio`` of the recorded ones, rounded half up, at least 1."""
    return max(1, math.floor(ratio * epochs + 0.5))


def calibrated_state(start: Mapping[str, Tensor], calibrated: Mapping[str, Tensor],
                     original: Mapping[str, Tensor], parent_original: Mapping[str, Tensor],
                     params: Iterable[str]) -> tuple[dict[str, Tensor], int]:
    """FedEraser's calibrated update, tensor by tensor: ``start + ||U|| * C / ||C||`` with
    ``U = original - parent_original`` (the stored update) and ``C = calibrated - start`` (the short run).

    Only floating ``params`` are calibrated; every other entry (BatchNorm statistics, counters) is
    taken from ``calibrated``. A tensor the short run left unchanged (``C = 0``, e.g. frozen by
    ``train_only``) keeps ``start``. Returns the new state and how many tensors kept ``start``.
    """
    out = {k: v.clone() for k, v in calibrated.items()}
    kept = 0
    for k in params:
        s = start[k]
        if not s.is_floating_point():
            continue
        # float64 so that the rescaled update's norm matches ||U|| to rounding of the final cast only.
        s64 = s.detach().to("cpu", torch.float64)
        c = calibrated[k].detach().to("cpu", torch.float64) - s64
        norm_c = torch.linalg.vector_norm(c)
        if norm_c == 0:
            out[k] = s.detach().cpu().clone()
            kept += 1
            continue
        u = original[k].detach().to("cpu", torch.float64) - parent_original[k].detach().to("cpu", torch.float64)
        out[k] = (s64 + c * (torch.linalg.vector_norm(u) / norm_c)).to(s.dtype)
    return out, kept


class FedEraser(NodeUnlearner):
    """Replay a federated lineage: stored update magnitudes, directions from short retained-data calibration."""

    name = "federaser"
    description = ("FedEraser: replay the lineage; each client's update keeps its stored magnitude and takes "
                   "its direction from brief training on its retained data (a fraction of its epochs).")
    kinds = frozenset({"labels", "samples", "client"})
    params: Mapping[str, Param] = {
        "calibration_ratio": Param(0.5, "share of each node's recorded epochs its calibration run trains (>0)"),
    }
    sequential = True

    def check(self, job: Job) -> None:
        if not job.params["calibration_ratio"] > 0:
            raise UnlearningError(
                f"method '{self.name}': parameter calibration_ratio must be > 0, got {job.params['calibration_ratio']}")
        check_recipes(job, self.name)

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        t0 = time.perf_counter()
        snap = ctx.node
        before = ctx.state_of(snap.name)
        parents = ctx.parents()
        # The stored update U = node - parent only means something when both have the same tensors.
        if snap.data_ref is None or len(parents) != 1 or not self._same_layout(ctx.snapshots[parents[0][0]], snap):
            return self._retrain(ctx, before, t0)
        recipe = Recipe.from_json(snap.recipe)
        p = parents[0][0]
        model = ctx.build()
        model.load_state_dict(parent_state(ctx, p))
        retain = ctx.retain_data()
        if retain is None or not len(retain):
            # Nothing of its own is left: it passes its parent on and weighs nothing in the aggregates.
            return model_update(ctx, before, model, path="parent", epochs_run=0, retain_samples=0,
                                seconds_train=time.perf_counter() - t0)
        start = cpu_state(model)
        epochs = calibration_epochs(recipe.epochs, float(ctx.params["calibration_ratio"]))
        fit(model, retain, replace(recipe, epochs=epochs), snap.classes, ctx.device, capture=False)
        pnames = [n for n, _ in model.named_parameters()]
        new, kept = calibrated_state(start, cpu_state(model), before, ctx.state_of(p), pnames)
        model.load_state_dict(new)
        return model_update(ctx, before, model, path="calibrated", epochs_run=epochs, epochs_recorded=recipe.epochs,
                            tensors_kept=kept, retain_samples=len(retain), seconds_train=time.perf_counter() - t0)

    @staticmethod
    def _same_layout(parent: NodeSnapshot, node: NodeSnapshot) -> bool:
        """Same architecture and the same head rows (a transfer fork or a class change has neither)."""
        return parent.arch == node.arch and tuple(parent.classes) == tuple(node.classes)

    def _retrain(self, ctx: NodeContext, before: Mapping[str, Tensor], t0: float) -> NodeUpdate:
        """An aggregate re-aggregates; any other node outside the replay recipe is retrained in full."""
        model, done = retrain_from(ctx, lineage_parents(ctx))
        aggregate = ctx.node.data_ref is None
        epochs = Recipe.from_json(ctx.node.recipe).epochs if done["trained"] else 0
        return model_update(ctx, before, model, path="fedavg" if aggregate else "retrain", epochs_run=epochs,
                            retain_samples=done["samples"], seconds_train=time.perf_counter() - t0)
