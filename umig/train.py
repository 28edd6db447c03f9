"""Training recipe, a seeded cross-entropy training loop, FedAvg and accuracy.

Compute code sees data only as iterables of ``(x, y)`` batches with ``y`` global label ids; the
head's ``classes`` tuple maps output row ``r`` to label ``classes[r]`` (docs/contracts.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from umig.arch import ArchSpec, eval_mode
from umig.errors import ArchError, NotFoundError, UmigError
from umig.fisher import LABEL_STATS_MAX, FisherCapture, FisherDataError, keep_fim, last_linear
from umig.heads import check_unique, label_rows, shared_rows

__all__ = ["Recipe", "accuracy", "fedavg", "train"]

Batches = Iterable[tuple[Tensor, Tensor]]

_OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Recipe:
    """Hyper-parameters of one training run; recorded on the node so the run can be repeated.

    ``momentum`` applies to SGD only. ``train_only`` names a dotted module prefix (e.g. ``"fc"``)
    to train while everything else stays frozen, in eval mode.
    """

    optimizer: str = "sgd"
    lr: float = 0.01
    epochs: int = 5
    batch_size: int = 64
    seed: int = 0
    momentum: float = 0.9
    weight_decay: float = 0.0
    train_only: str | None = None

    def __post_init__(self) -> None:
        def bad(msg: str) -> UmigError:
            return UmigError(f"bad training recipe: {msg}")

        for name in ("epochs", "batch_size", "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(f"{name} must be an int, got {value!r}")
        for name in ("lr", "momentum", "weight_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise bad(f"{name} must be a number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.optimizer not in _OPTIMIZERS:
            raise bad(f"optimizer must be one of {', '.join(_OPTIMIZERS)}, got {self.optimizer!r}")
        if not self.lr > 0:
            raise bad(f"lr must be > 0, got {self.lr}")
        if self.epochs < 1:
            raise bad(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise bad(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.momentum < 1:
            raise bad(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise bad(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.train_only is not None and (not isinstance(self.train_only, str) or not self.train_only):
            raise bad(f"train_only must be a non-empty module prefix or null, got {self.train_only!r}")

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict of all fields."""
        # Every field is a scalar: no deep copy (asdict's) needed, and this runs once per recorded node.
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> Recipe:
        """Build from a dict (or its JSON string); missing keys take defaults, unknown keys are an error."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise UmigError(f"training recipe is not valid JSON: {exc}") from exc
        if not isinstance(data, Mapping):
            raise UmigError(f"training recipe must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise UmigError(
                f"unknown training recipe keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        return cls(**data)

    @classmethod
    def from_file(cls, path: str | Path) -> Recipe:
        """Read a recipe from a JSON file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise NotFoundError(f"recipe file not found: {p}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UmigError(f"cannot read recipe file {p}: {exc}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UmigError(f"recipe file {p} is not valid JSON: {exc}") from exc
        try:
            return cls.from_json(data)
        except UmigError as exc:
            raise UmigError(f"{p}: {exc}") from exc


# --------------------------------------------------------------------------------------------


def _in_prefix(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _logits(out: Any) -> Tensor:
    # Inception/GoogLeNet return (logits, aux...) in train mode; the main logits come first.
    return out if isinstance(out, Tensor) else out[0]


def _model_device(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def train(
    model: nn.Module,
    batches_fn: Callable[[int], Batches],
    recipe: Recipe,
    classes: Sequence[int],
    *,
    device: str | torch.device | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place with cross-entropy; returns ``{"loss": last epoch mean, "seconds": ...}``.

    ``batches_fn(epoch)`` (epoch counts from 0) yields ``(x, y)`` batches of global label ids,
    mapped to head rows through ``classes``; a label outside ``classes`` raises ``LabelError`` (a ValueError).
    ``torch.manual_seed(recipe.seed)`` runs first, so equal inputs give equal weights on CPU.
    ``progress(epoch, loss)`` is called after each epoch. Training flags and ``requires_grad``
    are restored afterwards.
    """
    start = time.perf_counter()
    check_unique([int(c) for c in classes])
    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    torch.manual_seed(recipe.seed)

    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        if recipe.train_only is not None:
            prefix = recipe.train_only
            if not any(_in_prefix(n, prefix) for n in grad_flags):
                raise UmigError(f"train_only {prefix!r} matches no parameters of the model")
            for name, p in model.named_parameters():
                p.requires_grad_(_in_prefix(name, prefix))
            # Frozen parts run as feature extractors: eval mode keeps BatchNorm running stats
            # fixed and dropout off. Set flags one by one since Module.eval() recurses.
            for name, m in model.named_modules():
                if not _in_prefix(name, prefix):
                    m.training = False
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise UmigError("no trainable parameters (all are frozen)")
        if recipe.optimizer == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
            )
        else:
            opt = torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay)

        n_classes = len(classes)
        batch_stats = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
        skipped = 0
        loss_mean = float("nan")
        for epoch in range(recipe.epochs):
            total, count = 0.0, 0
            for x, y in batches_fn(epoch):
                if len(y) == 1 and batch_stats:
                    # BatchNorm in training mode cannot normalise a batch of one (a dataset one
                    # item past a multiple of the batch size): skip it rather than fail the run.
                    skipped += 1
                    continue
                x, y = x.to(dev), y.to(dev)
                rows = label_rows(y, classes)
                logits = _logits(model(x))
                if logits.shape[-1] != n_classes:
                    raise ValueError(f"model outputs {logits.shape[-1]} logits but classes has {n_classes} labels")
                loss = F.cross_entropy(logits, rows)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(y)
                count += len(y)
            if count == 0:
                raise ValueError(f"batches_fn({epoch}) yielded no batches"
                                 + (" of more than one item (BatchNorm needs two)" if skipped else ""))
            loss_mean = total / count
            if progress is not None:
                progress(epoch, loss_mean)
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags[name])
        for m, mode in modes:
            m.training = mode
    return {"loss": loss_mean, "seconds": time.perf_counter() - start}


def fedavg(state_dicts: Sequence[Mapping[str, Tensor]], weights: Sequence[float]) -> dict[str, Tensor]:
    """Weighted mean of state dicts (weights are normalised to sum 1).

    Floating tensors are averaged in float64 and cast back, so averaging identical models is
    exact. Integer/bool tensors (BatchNorm ``num_batches_tracked``) cannot be averaged
    meaningfully; they take the element-wise max, i.e. the most-trained member's step count.
    """
    if not state_dicts:
        raise ValueError("fedavg needs at least one state dict")
    if len(weights) != len(state_dicts):
        raise ValueError(f"fedavg got {len(state_dicts)} state dicts but {len(weights)} weights")
    w = [float(x) for x in weights]
    if any(not x >= 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"fedavg weights must be >= 0 with a positive sum, got {w}")
    total = sum(w)
    w = [x / total for x in w]
    first = state_dicts[0]
    keys = list(first)
    for i, sd in enumerate(state_dicts[1:], start=1):
        if set(sd) != set(first):
            missing, extra = sorted(set(first) - set(sd)), sorted(set(sd) - set(first))
            raise ValueError(f"state dict {i} keys differ from state dict 0: missing {missing[:3]}, extra {extra[:3]}")
    out: dict[str, Tensor] = {}
    for key in keys:
        ref = first[key]
        tensors = [sd[key] for sd in state_dicts]
        for i, t in enumerate(tensors):
            if t.shape != ref.shape:
                raise ValueError(f"{key}: shape {tuple(t.shape)} in state dict {i} vs {tuple(ref.shape)} in state dict 0")
        if ref.is_floating_point() or ref.is_complex():
            acc_dtype = torch.complex128 if ref.is_complex() else torch.float64
            acc = torch.zeros(ref.shape, dtype=acc_dtype, device=ref.device)
            for wi, t in zip(w, tensors):
                acc += wi * t.to(device=ref.device, dtype=acc_dtype)
            out[key] = acc.to(ref.dtype)
        else:
            acc = ref.clone()
            for t in tensors[1:]:
                acc = torch.maximum(acc, t.to(ref.device))
            out[key] = acc
    return out


def accuracy(
    model: nn.Module, batches: Batches, classes: Sequence[int], device: str | torch.device | None = None
) -> float:
    """Fraction of examples whose predicted label (``classes[argmax]``) equals ``y``.

    Labels outside ``classes`` count as wrong rather than raising: a head that had a class
    removed by unlearning must score 0 on it, not fail.
    """
    check_unique([int(c) for c in classes])
    dev = torch.device(device) if device is not None else _model_device(model)
    model.to(dev)
    correct, count = 0, 0
    with eval_mode(model), torch.no_grad():
        for x, y in batches:
            x, y = x.to(dev), y.to(dev)
            rows = label_rows(y, classes, strict=False)
            pred = _logits(model(x)).argmax(dim=-1)
            correct += int(((pred == rows) & (rows >= 0)).sum())
            count += len(y)
    if count == 0:
        raise ValueError("accuracy: no examples in batches")
    return correct / count


# ------------------------------------------------------------------ lineage training steps
def fit(model: nn.Module, data: Any, recipe: Recipe | Mapping[str, Any], classes: Sequence[int],
        device: str | torch.device | None = None, capture: FisherCapture | bool = True) -> dict[str, float]:
    """Train ``model`` on ``data`` (a ``umig.data.Data``) with ``recipe``: shuffled epochs seeded by
    ``recipe.seed + epoch``, the way recorders' training loops and retraining do it.

    The last epoch's forward passes also accumulate the model FIM (:class:`umig.fisher.FisherCapture`,
    empirical at temperature 1, on the last ``nn.Linear``, with per-label sums up to
    ``umig.fisher.LABEL_STATS_MAX`` elements), kept with the model (:func:`umig.fisher.keep_fim`):
    recording ``model`` on the same ``data`` before its weights change stores that FIM instead of
    running a FIM pass over the data. ``capture=False`` captures nothing; a ``FisherCapture`` of
    the caller's own is filled instead (read it with ``capture.fim()``).
    """
    rec = recipe if isinstance(recipe, Recipe) else Recipe.from_json(dict(recipe))
    cap = capture if isinstance(capture, FisherCapture) else None
    own = capture is True and rec.epochs > 0

    def batches(epoch: int):
        nonlocal cap
        it = data.batches(rec.batch_size, shuffle=True, seed=rec.seed + epoch, device=device)
        if epoch != rec.epochs - 1:
            return it
        if own:  # hooked for the last epoch only: the other epochs run without it
            cap = _own_capture(model, classes)
        return cap.wrap(it) if cap is not None else it

    try:
        out = train(model, batches, rec, classes, device=device)
    finally:
        if own and cap is not None:
            cap.close()
    if own and cap is not None and cap.samples:
        try:
            fim = cap.fim()
        except FisherDataError:  # the loop changed the head's outputs in place: recording runs the FIM pass
            pass
        else:
            keep_fim(model, fim, head=cap.head, data=data, seconds=cap.seconds)
    return out


def _own_capture(model: nn.Module, classes: Sequence[int]) -> FisherCapture | None:
    """The capture :func:`fit` runs by default, or None for a model whose last ``nn.Linear`` is not a
    head over ``classes`` (recording then runs the FIM pass, as for a model trained elsewhere)."""
    try:
        head = last_linear(model)
        lin = model.get_submodule(head)
    except ArchError:
        return None
    k, d = len(classes), lin.in_features
    if lin.out_features != k:
        return None
    return FisherCapture(model, classes, head=head, per_label=k * k * d <= LABEL_STATS_MAX)


def fresh_model(arch: ArchSpec | Mapping[str, Any], seed: int) -> nn.Module:
    """A freshly initialised model, seeded so a retrain builds the same initial weights."""
    spec = arch if isinstance(arch, ArchSpec) else ArchSpec.from_json(arch)
    torch.manual_seed(seed)
    return spec.build()


def inherit_weights(model: nn.Module, parent: nn.Module | Mapping[str, Tensor], parent_classes: Sequence[int],
                    classes: Sequence[int], head: str = "fc", *, strict: bool = True) -> nn.Module:
    """Load ``parent``'s weights into ``model``; head rows are copied by label id. Returns ``model``.

    Rows of labels the parent had are copied (an incremental step keeps what it knew); rows
    of new labels keep ``model``'s own initialisation. With ``strict`` every non-head tensor
    must exist in the parent with the same shape (ValueError otherwise); without it, tensors
    the parent lacks or shapes differently keep ``model``'s own values (a transfer fork).
    """
    src = parent.state_dict() if isinstance(parent, nn.Module) else dict(parent)
    own = model.state_dict()
    prefix = head + "."
    dst_rows, src_rows = shared_rows(classes, parent_classes)
    new: dict[str, Tensor] = {}
    for k, v in own.items():
        p = src.get(k)
        if not k.startswith(prefix):
            if p is None or tuple(p.shape) != tuple(v.shape):
                if strict:
                    raise ValueError(f"parent has no tensor '{k}'" if p is None else
                                     f"'{k}': parent {tuple(p.shape)} vs model {tuple(v.shape)}")
                new[k] = v
                continue
            new[k] = p.detach().to(v.device, v.dtype).clone()
            continue
        t = v.detach().clone()
        if p is not None and len(dst_rows) and p.dim() >= 1 and p.shape[1:] == t.shape[1:]:
            t[dst_rows.to(t.device)] = p[src_rows.to(p.device)].to(t.device, t.dtype)
        new[k] = t
    model.load_state_dict(new)
    return model


def retrain_node(model: nn.Module, *, parents: Sequence[tuple[Mapping[str, Tensor], float, Sequence[int]]],
                 classes: Sequence[int], head: str, data: Any, recipe: Recipe | None, aggregate: bool,
                 device: str | torch.device | None = None,
                 train_fn: Callable[[nn.Module, Any, Recipe, Sequence[int]], Any] | None = None) -> dict[str, Any]:
    """Rebuild one lineage node from its (retrained) parents, in place on ``model``: the one
    retraining step behind the ``retrain`` method and ``umig.lineage.retrain_reference``.

    ``parents``: ``(state, weight, classes)`` per in-edge. An ``aggregate`` node (FedAvg / sync,
    no data of its own) becomes the weighted mean of its parents. Any other node starts from
    ``model`` (freshly initialised by the caller, seeded by its recipe), takes its parents'
    weights (their FedAvg when several heads agree, else the first parent's, rows by label id),
    then trains on ``data`` (its data minus the forget set) with ``recipe`` (through ``train_fn``
    when given, else :func:`fit`).
    Returns what happened (``start``, ``trained``, ``samples``).
    """
    if aggregate:
        if not parents:
            raise ValueError("an aggregate needs parents")
        model.load_state_dict(fedavg([s for s, _, _ in parents], [w for _, w, _ in parents]))
        return {"start": "fedavg", "trained": False, "samples": 0}
    start = "init"
    if parents:
        same = all(tuple(c) == tuple(classes) for _, _, c in parents)
        if len(parents) > 1 and same:
            model.load_state_dict(fedavg([s for s, _, _ in parents], [w for _, w, _ in parents]))
        else:
            state, _, pcls = parents[0]
            inherit_weights(model, state, pcls, classes, head, strict=False)
        start = "parents"
    samples = len(data) if data is not None else 0
    if samples:
        if recipe is None:
            raise UmigError("cannot retrain a node that has data but no recorded recipe")
        if device is not None:
            model.to(device)
        if train_fn is not None:
            train_fn(model, data, recipe, classes)
        else:
            fit(model, data, recipe, classes, device=device, capture=False)  # retrained weights get no FIM
    return {"start": start, "trained": bool(samples), "samples": samples}
