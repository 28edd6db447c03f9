"""PyTorch Lightning (``umig[lightning]``): a ``Callback`` that records the model a ``fit`` trained.

Add :class:`UmigCallback` to a ``Trainer`` and the trained model becomes a node of the lineage,
a child of ``parent`` (relation ``finetune`` by default), when ``fit`` ends (or one node per
epoch with ``every_epoch=True``)::

    cb = UmigCallback(store, "umig.models:digits_cnn", name="ft/v2", parent="base", classes=range(10))
    Trainer(max_epochs=3, callbacks=[cb]).fit(module, datamodule=dm)
    cb.nodes    # ["ft/v2"]

What it records, and where it looks:

* the model: ``pl_module.model`` when that is an ``nn.Module`` (``model_attr``), else the
  LightningModule itself; its state dict must fit ``arch``;
* the data reference: ``data=``, else ``datamodule.umig_data``, else ``pl_module.umig_data``
  (a reference string or :class:`umig.data.Data`); a fit with none fails before training;
* the recipe: ``recipe=``, else ``umig_recipe`` on the datamodule or module, else one read from
  the run (optimizer SGD/Adam with its lr, momentum and weight decay, the epochs run, the batch
  size from ``hparams`` or the train loader, the seed of ``seed_everything``); what does not fit a
  :class:`umig.train.Recipe` (another optimizer) goes to the node's meta instead;
* the model FIM: accumulated by :class:`umig.fisher.FisherCapture` from the last epoch's own
  batches (no extra pass over the data), with the per-label sums the store keeps (so forgetting
  labels needs no pass either); ``capture_fim=False`` lets the store compute it.

Under DDP every rank captures the FIM of its own batches, the sums are reduced across ranks,
and rank 0 records the (synchronised) model; the other ranks record nothing.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
except ImportError as e:  # the extra is optional; say which one is missing
    raise ImportError(f"umig.integrations.lightning needs Lightning (pip install 'umig[lightning]'): {e}") from e

from umig.data import Data
from umig.errors import UmigError
from umig.fisher import FIM, FisherCapture
from umig.ingest import keeps_label_stats
from umig.lineage import LineageRecorder
from umig.store import NodeInfo, SqlStore
from umig.train import Recipe

__all__ = ["UmigCallback", "batch_labels", "run_recipe"]

_LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def batch_labels(batch: Any) -> Tensor:
    """The labels of a training batch: ``batch[1]`` of a tuple/list, or a dict's y/label(s)/target(s)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[1]
    if isinstance(batch, Mapping):
        for key in _LABEL_KEYS:
            if key in batch:
                return batch[key]
    raise UmigError("cannot find the labels in a training batch: pass labels=lambda batch: ... to UmigCallback")


def _first(objs: Sequence[Any], attr: str) -> Any:
    for obj in objs:
        value = getattr(obj, attr, None) if obj is not None else None
        if value is not None:
            return value
    return None


def _hparam(objs: Sequence[Any], key: str) -> Any:
    for obj in objs:
        hp = getattr(obj, "hparams", None) if obj is not None else None
        if hp is not None and key in hp:
            return hp[key]
    return None


def run_recipe(trainer: Trainer, pl_module: LightningModule, epochs: int) -> tuple[Recipe | None, dict[str, Any]]:
    """The recipe a Lightning run used, read from its optimizer, hparams and loader; and what did not fit one."""
    seen: dict[str, Any] = {"epochs": epochs}
    objs = [getattr(trainer, "datamodule", None), pl_module]
    batch = _hparam(objs, "batch_size")
    if batch is None:
        loader = getattr(trainer, "train_dataloader", None)
        batch = getattr(loader, "batch_size", None)
    if batch is not None:
        seen["batch_size"] = int(batch)
    seed = os.environ.get("PL_GLOBAL_SEED")
    if seed is not None:
        seen["seed"] = int(seed)
    opts = trainer.optimizers
    if len(opts) != 1:
        return None, {**seen, "optimizers": [type(o).__name__ for o in opts]}
    opt = opts[0]
    group = opt.param_groups[0]
    seen.update(optimizer=type(opt).__name__, lr=float(group.get("lr", 0.0)),
                weight_decay=float(group.get("weight_decay", 0.0)))
    if "momentum" in group:
        seen["momentum"] = float(group["momentum"])
    kind = {torch.optim.SGD: "sgd", torch.optim.Adam: "adam"}.get(type(opt))
    if kind is None or "batch_size" not in seen:
        return None, seen
    fields = {"optimizer": kind, "lr": seen["lr"], "epochs": epochs, "batch_size": seen["batch_size"],
              "seed": seen.get("seed", 0), "weight_decay": seen["weight_decay"]}
    if kind == "sgd" and 0 <= seen.get("momentum", 0.0) < 1:
        fields["momentum"] = seen.get("momentum", 0.0)
    try:
        return Recipe(**fields), seen
    except UmigError:
        return None, seen


class _Recorder(LineageRecorder):
    framework = "other"


class UmigCallback(Callback):
    """Record the model a Lightning ``fit`` trained as a node of ``store`` (see the module docstring).

    ``name`` is the node's name (``{name}/epoch{k}`` per epoch with ``every_epoch``, each the
    parent of the next); ``parent`` a node name (or ``[(name, weight), ...]``); ``relation``
    the in-edges' relation (``finetune`` when there is a parent). ``labels(batch)`` reads a
    batch's labels for the FIM. ``meta`` is added to the node's meta.
    """

    def __init__(self, store: SqlStore, arch: Any, *, name: str, parent: str | Sequence[Any] | None = None,
                 relation: str | None = None, data: Data | str | None = None, classes: Sequence[int] | None = None,
                 head: str | None = None, recipe: Any = None, model_attr: str | None = "model",
                 every_epoch: bool = False, capture_fim: bool = True,
                 labels: Callable[[Any], Tensor] = batch_labels, meta: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.recorder = _Recorder(store, arch, classes=classes, head=head)
        self.name, self.relation, self.data, self.recipe = name, relation, data, recipe
        self.parents: list[Any] = [parent] if isinstance(parent, str) else list(parent or [])
        for p in self.parents:
            pname = p if isinstance(p, str) else p[0]
            if not store.has_node(pname):
                raise UmigError(f"parent node '{pname}' is not in the store")
        if store.has_node(name):
            raise UmigError(f"node '{name}' already exists")
        self.model_attr, self.every_epoch, self.capture_fim = model_attr, every_epoch, capture_fim
        self.labels, self.meta = labels, dict(meta or {})
        self.nodes: list[str] = []
        self._cap: FisherCapture | None = None
        self._batch_gen: Any = None
        self._data: Data | str | None = None
        self._epochs = 0

    # ------------------------------------------------------------------ what to record
    def model_of(self, pl_module: LightningModule) -> nn.Module:
        """The torch model the node holds: ``pl_module.<model_attr>`` if it is a module, else ``pl_module``."""
        inner = getattr(pl_module, self.model_attr, None) if self.model_attr else None
        return inner if isinstance(inner, nn.Module) else pl_module

    def _head_name(self, model: nn.Module) -> str:
        if self.recorder.head_module:
            return self.recorder.head_module
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise UmigError("the model has no nn.Linear classifier head to capture the FIM from (pass head=)")
        return linears[-1]

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Resolve the data reference before any training, so a missing one costs nothing."""
        objs = [getattr(trainer, "datamodule", None), pl_module]
        self._data = self.data if self.data is not None else _first(objs, "umig_data")
        if self._data is None:
            raise UmigError(f"node '{self.name}': no data reference (pass data= to UmigCallback "
                            "or set umig_data on the LightningDataModule or LightningModule)")

    # ------------------------------------------------------------------ FIM capture
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start a fresh capture: the one of the last epoch that ran is the one recorded."""
        if self._cap is not None:
            self._cap.close()
        self._cap = None
        if self.capture_fim:
            model = self.model_of(pl_module)
            classes = self.recorder.classes
            head = self._head_name(model)
            lin = model.get_submodule(head)
            if classes is None:
                classes = tuple(range(lin.out_features))
            store = self.recorder.store
            self._cap = FisherCapture(model, classes, head=head, **store.fisher_settings(),
                                      per_label=keeps_label_stats(store, len(classes), lin.in_features))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._cap is not None:
            self._batch_gen = self._cap.wrap(iter([(None, self.labels(batch))]))
            next(self._batch_gen)  # the hook now knows this batch's labels, until the batch ends

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._batch_gen is not None:
            self._batch_gen.close()
            self._batch_gen = None

    def _fim(self, trainer: Trainer) -> FIM | None:
        """This epoch's captured FIM, summed over every rank (a collective: all ranks call it)."""
        if self._cap is None:
            return None
        cap, self._cap = self._cap, None
        if trainer.world_size <= 1:
            return cap.fim()
        dev = trainer.strategy.root_device
        total = float(trainer.strategy.reduce(torch.tensor(float(cap.samples), device=dev), reduce_op="sum"))
        empty = float(trainer.strategy.reduce(torch.tensor(float(cap.samples == 0), device=dev), reduce_op="sum"))
        if empty:  # every rank takes this branch: the store computes the FIM with one pass instead
            cap.close()
            return None
        local = cap.fim()

        def summed(t: Tensor | None) -> Tensor | None:
            if t is None:
                return None
            s = trainer.strategy.reduce(t.to(trainer.strategy.root_device) * cap.samples, reduce_op="sum")
            return (s / total).cpu()

        def added(t: Tensor | None) -> Tensor | None:  # the per-label statistics are sums already
            return None if t is None else trainer.strategy.reduce(t.to(dev), reduce_op="sum").cpu()

        return dataclasses.replace(local, weight=summed(local.weight), bias=summed(local.bias), samples=int(total),
                                   label_weight=added(local.label_weight), label_bias=added(local.label_bias),
                                   label_counts=added(local.label_counts))

    # ------------------------------------------------------------------ recording
    def _record(self, trainer: Trainer, pl_module: LightningModule, name: str, epochs: int) -> NodeInfo | None:
        fim = self._fim(trainer)
        if not trainer.is_global_zero:
            return None
        objs = [getattr(trainer, "datamodule", None), pl_module]
        recipe = self.recipe if self.recipe is not None else _first(objs, "umig_recipe")
        seen: dict[str, Any] = {}
        if recipe is None:
            recipe, seen = run_recipe(trainer, pl_module, epochs)
        meta = {**({"lightning": seen} if seen else {}), "epoch": trainer.current_epoch,
                "global_step": trainer.global_step, **self.meta}
        parents = [self.nodes[-1]] if self.nodes else self.parents
        relation = self.relation or ("finetune" if parents else None)
        info = self.recorder.record(name, self.model_of(pl_module), parents=parents, relation=relation,
                                    data=self._data, recipe=recipe, meta=meta, fim=fim)
        self.nodes.append(info.name)
        return info

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epochs += 1
        if self.every_epoch:  # each epoch node is one epoch on from the previous one
            self._record(trainer, pl_module, f"{self.name}/epoch{trainer.current_epoch}", 1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Record the trained model (unless every epoch already was)."""
        if not self.every_epoch and self._epochs:
            self._record(trainer, pl_module, self.name, self._epochs)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self._cap is not None:
            self._cap.close()
            self._cap = None

    @property
    def node(self) -> str | None:
        """The last node recorded (the trained model)."""
        return self.nodes[-1] if self.nodes else None
