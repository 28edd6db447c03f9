"""Diagonal Fisher information of a classifier's last layer (FIUn Eqs. 3-5), storage-agnostic.

For a linear head ``z = W h + b`` with softmax ``p`` the per-sample gradient of the
cross-entropy is ``(p - e) h^T`` (``e`` the one-hot target), so the diagonal Fisher has a
closed form that needs only the head's input and output, taken from ONE forward pass:

* empirical: ``F_W = ((e - p)^2).T @ h^2 / N``, ``F_b = mean((e - p)^2)``
* true:      replace ``(e - p)^2`` by ``p (1 - p)`` (the expectation over ``y ~ p``)

Rows are tied to label ids through ``classes`` (row r <-> label ``classes[r]``), and every
merge aligns rows by label id, never by row index, because heads in incremental and
transfer lineages differ in size and order.

``autograd_fisher`` is the slow reference the closed form is validated against.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from umig.errors import ArchError, UmigError
from umig.heads import check_unique, label_rows

__all__ = [
    "FIM",
    "LABEL_STATS_MAX",
    "FisherCapture",
    "FisherDataError",
    "FisherError",
    "FisherShapeError",
    "KeptFIM",
    "autograd_fisher",
    "eval_mode",
    "head_fisher",
    "input_dtype",
    "keep_fim",
    "kept_fim",
    "last_linear",
    "logit_grad_sq",
    "merge_max",
    "move_input",
    "parse_metadata",
    "resolve_head",
    "weighted_mean",
    "without_label_stats",
]

KINDS = ("empirical", "true")
# Per-label FIM sums cost K x K x d floats per node; kept up to this many elements by default
# (1,048,576: 4 MiB; a store's ``fisher.label_stats_max`` overrides it).
LABEL_STATS_MAX = 1 << 20


class FisherError(UmigError):
    """FIMs that cannot be combined (different kind or temperature), or malformed FIM tensors."""


class FisherShapeError(FisherError):
    """FIMs whose feature widths (or bias presence) differ, so no merged FIM can be formed."""


class FisherDataError(UmigError, ValueError):
    """Data that cannot give a FIM: no samples, or a label the head has no row for."""


# --------------------------------------------------------------------------- FIM


@dataclass(frozen=True, eq=False)
class FIM:
    """Diagonal last-layer Fisher information; row r belongs to label id ``classes[r]``.

    Tensors are float32 on the CPU. ``samples`` is the number of samples behind it,
    ``kind`` is ``"empirical"`` or ``"true"``, ``temperature`` the softmax temperature used.
    """

    weight: Tensor
    bias: Tensor | None
    classes: tuple[int, ...]
    samples: int
    kind: str = "empirical"
    temperature: float = 1.0
    # Per-label sums behind ``weight``/``bias`` (row l: samples labelled ``classes[l]``), so that
    # any label set's unlearning FIM is a sum, without a forward pass (see :meth:`for_labels`).
    label_weight: Tensor | None = None  # (L, K, d)
    label_bias: Tensor | None = None  # (L, K)
    label_counts: Tensor | None = None  # (L,) int64

    def __post_init__(self) -> None:
        classes = tuple(int(c) for c in self.classes)
        check_unique(classes, "FIM classes")
        weight = self.weight.detach().to(device="cpu", dtype=torch.float32)
        if weight.dim() != 2 or weight.shape[0] != len(classes):
            raise FisherShapeError(
                f"FIM weight has shape {tuple(weight.shape)}; expected ({len(classes)}, d) for {len(classes)} classes"
            )
        bias = self.bias
        if bias is not None:
            bias = bias.detach().to(device="cpu", dtype=torch.float32)
            if tuple(bias.shape) != (len(classes),):
                raise FisherShapeError(f"FIM bias has shape {tuple(bias.shape)}; expected ({len(classes)},)")
        _check_settings(self.kind, self.temperature, self.samples)
        if self.label_weight is not None:
            k = len(classes)
            if (tuple(self.label_weight.shape) != (k, k, weight.shape[1]) or self.label_counts is None
                    or tuple(self.label_counts.shape) != (k,)):
                raise FisherShapeError(f"FIM per-label statistics have shape {tuple(self.label_weight.shape)}; "
                                       f"expected ({k}, {k}, {weight.shape[1]}) with ({k},) counts")
            object.__setattr__(self, "label_weight", self.label_weight.detach().to("cpu", torch.float32))
            object.__setattr__(self, "label_counts", self.label_counts.detach().to("cpu", torch.int64))
            if self.label_bias is not None:
                object.__setattr__(self, "label_bias", self.label_bias.detach().to("cpu", torch.float32))
        # Frozen dataclass: normalise once (CPU float32, int labels) so merges never mix devices or dtypes.
        object.__setattr__(self, "classes", classes)
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)
        object.__setattr__(self, "samples", int(self.samples))
        object.__setattr__(self, "temperature", float(self.temperature))

    @property
    def feature_dim(self) -> int:
        """Width d of the head's input features."""
        return int(self.weight.shape[1])

    def to_tensors(self) -> dict[str, Tensor]:
        """Contiguous CPU tensors ready for ``safetensors.torch.save_file``."""
        out = {
            "weight": self.weight.detach().cpu().contiguous(),
            "classes": torch.tensor(self.classes, dtype=torch.int64),
        }
        if self.bias is not None:
            out["bias"] = self.bias.detach().cpu().contiguous()
        if self.label_weight is not None:
            out["label_weight"] = self.label_weight.contiguous()
            out["label_counts"] = self.label_counts.contiguous()
            if self.label_bias is not None:
                out["label_bias"] = self.label_bias.contiguous()
        return out

    @property
    def has_label_stats(self) -> bool:
        return self.label_weight is not None

    def for_labels(self, labels: Iterable[int]) -> FIM:
        """The FIM of only the samples labelled ``labels`` (an unlearning FIM), from the per-label
        sums: equal to :func:`head_fisher` on those samples with the same weights, no forward pass."""
        if self.label_weight is None:
            raise FisherError("this FIM has no per-label statistics")
        wanted = {int(x) for x in labels}
        rows = [r for r, c in enumerate(self.classes) if c in wanted]
        n = int(self.label_counts[rows].sum()) if rows else 0
        if n == 0:
            raise FisherDataError("no samples with those labels behind this FIM")
        bias = self.label_bias[rows].sum(0) / n if self.label_bias is not None else None
        return FIM(self.label_weight[rows].sum(0) / n, bias, self.classes, n, self.kind, self.temperature)

    def without_labels(self, labels: Iterable[int]) -> FIM | None:
        """This FIM with the samples labelled ``labels`` taken out, from the per-label sums: the sums
        over the other samples only (their per-label sums kept, those of ``labels`` zeroed), no forward
        pass. ``None`` when no sample is left. What ``purge`` keeps of a model FIM once a label
        forget set's superseded versions are gone."""
        if self.label_weight is None or self.label_counts is None:
            raise FisherError("this FIM has no per-label statistics")
        dropped = {int(x) for x in labels}
        gone = torch.tensor([c in dropped for c in self.classes], dtype=torch.bool)
        if not bool(gone.any()):
            return self
        if int(self.label_counts[~gone].sum()) == 0:
            return None
        kept = self.for_labels([c for c, g in zip(self.classes, gone.tolist()) if not g])
        lw, lc = self.label_weight.clone(), self.label_counts.clone()
        lw[gone], lc[gone] = 0, 0
        lb = None
        if self.label_bias is not None:
            lb = self.label_bias.clone()
            lb[gone] = 0
        return replace(kept, label_weight=lw, label_bias=lb, label_counts=lc)

    def metadata(self) -> dict[str, str]:
        """String metadata (safetensors only stores str -> str)."""
        return {"samples": str(self.samples), "kind": self.kind, "temperature": repr(self.temperature)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> FIM:
        """Inverse of ``to_tensors`` / ``metadata``; missing metadata means 0 samples, empirical, T=1."""
        if "weight" not in tensors or "classes" not in tensors:
            raise FisherError(f"FIM tensors need 'weight' and 'classes', got {sorted(tensors)}")
        samples, kind, temperature = parse_metadata(metadata or {})
        return cls(
            weight=tensors["weight"],
            bias=tensors.get("bias"),
            classes=tuple(int(c) for c in tensors["classes"].reshape(-1).tolist()),
            samples=samples,
            kind=kind,
            temperature=temperature,
            label_weight=tensors.get("label_weight"),
            label_bias=tensors.get("label_bias"),
            label_counts=tensors.get("label_counts"),
        )

    def aligned(self, classes: Sequence[int]) -> FIM:
        """This FIM with rows re-ordered to ``classes``; labels it has no row for get zero rows.

        Zero is the right fill: a head without a row for a label puts no probability
        on it, so that row carries no information.
        """
        classes = tuple(int(c) for c in classes)
        check_unique(classes, "target classes")
        if classes == self.classes:
            return self
        src = label_rows(torch.tensor(classes, dtype=torch.int64), self.classes, strict=False)
        have = src >= 0
        weight = self.weight.new_zeros((len(classes), self.feature_dim))
        weight[have] = self.weight[src[have]]
        bias = None
        if self.bias is not None:
            bias = self.bias.new_zeros(len(classes))
            bias[have] = self.bias[src[have]]
        return FIM(weight, bias, classes, self.samples, self.kind, self.temperature)

    def __repr__(self) -> str:
        return (
            f"FIM(classes={len(self.classes)}, feature_dim={self.feature_dim}, bias={self.bias is not None}, "
            f"samples={self.samples}, kind={self.kind!r}, temperature={self.temperature})"
        )


# --------------------------------------------------------------------------- helpers


def resolve_head(model: nn.Module, head: nn.Module | str) -> nn.Linear:
    """The head module: ``head`` itself, or the submodule of ``model`` with that dotted name."""
    if isinstance(head, str):
        try:
            head = model.get_submodule(head)
        except AttributeError as exc:
            raise ArchError(f"model has no module named {head!r}") from exc
    if not isinstance(head, nn.Linear):
        raise ArchError(f"head must be an nn.Linear, got {type(head).__name__}")
    return head


def last_linear(model: nn.Module) -> str:
    """Name of the last ``nn.Linear`` in ``named_modules()`` order: the head ``find_head`` assumes."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ArchError("model has no nn.Linear layer to use as classifier head")
    return names[-1]


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def input_dtype(model: nn.Module) -> torch.dtype | None:
    """The model's floating dtype (float inputs are cast to it), or None if it has no float parameters."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    return None


@contextlib.contextmanager
def eval_mode(model: nn.Module, device: torch.device | str | None = None) -> Iterator[torch.device]:
    """Put ``model`` in eval mode (on ``device`` if given) and restore both afterwards.

    Training flags are restored per module, since callers may hold some submodules
    (e.g. frozen BatchNorm) in eval while the model trains. Yields the device used.
    """
    modes = [(m, m.training) for m in model.modules()]
    original = _model_device(model)
    target = original if device is None else torch.device(device)
    if target.type == original.type and target.index is None:
        target = original  # "cuda" means the model's current CUDA device, not a move to cuda:0
    moved = target != original
    if moved:
        model.to(target)
    model.eval()
    try:
        yield target
    finally:
        for m, mode in modes:
            m.training = mode
        if moved:
            model.to(original)


def move_input(x: Tensor, device: torch.device, dtype: torch.dtype | None) -> Tensor:
    """``x`` on ``device``; floating inputs cast to ``dtype`` when given."""
    # Data arrives as float32; a half-precision model needs its own dtype.
    if dtype is not None and x.is_floating_point():
        return x.to(device=device, dtype=dtype, non_blocking=True)
    return x.to(device=device, non_blocking=True)


def _check_kind(kind: str, temperature: float) -> None:
    if kind not in KINDS:
        raise FisherError(f"Fisher kind must be one of {KINDS}, got {kind!r}")
    if not temperature > 0:
        raise FisherError(f"softmax temperature must be > 0, got {temperature}")


def _check_width(head: nn.Linear, classes: Sequence[int]) -> None:
    if head.out_features != len(classes):
        raise ArchError(f"head has {head.out_features} outputs but classes lists {len(classes)} labels")


# --------------------------------------------------------------------------- closed form


def _softmax_rows(z: Tensor) -> Tensor:
    """``softmax(z, dim=1)``. On the CPU, torch's kernel over rows of a few classes (fewer than 16) measured
    3-4x slower than max, exp, sum and divide for a few hundred rows (torch 2.x): that path there."""
    if z.device.type == "cpu" and z.shape[1] < 16:
        e = (z - z.amax(1, keepdim=True)).exp_()
        return e.div_(e.sum(1, keepdim=True))
    return torch.softmax(z, dim=1)


def logit_grad_sq(z: Tensor, rows: Tensor, kind: str, temperature: float) -> Tensor:
    """Per-sample squared gradient of the cross-entropy w.r.t. the logits: the closed form's core.

    Empirical Fisher: ``(e - p)^2`` (``e`` the one-hot target); true Fisher: ``p (1 - p)``. The
    head's diagonal Fisher is then ``g.T @ h^2`` (weight) and ``g.sum(0)`` (bias), over N samples.
    """
    p = _softmax_rows(z if temperature == 1.0 else z / temperature)
    if kind != "empirical":
        return p * (1.0 - p)
    # (e - p)^2 without materialising e: p^2 everywhere, (1 - p)^2 at the target (not p^2 + 1 - 2p,
    # which cancels catastrophically where p is near 1).
    r = rows.unsqueeze(1)
    return p.square().scatter_(1, r, (1.0 - p.gather(1, r)).square())


def _check_settings(kind: str, temperature: float, samples: int) -> None:
    if kind not in KINDS:
        raise FisherError(f"FIM kind must be one of {KINDS}, got {kind!r}")
    if not temperature > 0:
        raise FisherError(f"FIM temperature must be > 0, got {temperature}")
    if int(samples) < 0:
        raise FisherError(f"FIM samples must be >= 0, got {samples}")


def parse_metadata(meta: dict[str, str]) -> tuple[int, str, float]:
    """``(samples, kind, temperature)`` of a stored FIM's metadata (missing: 0 samples, empirical, T=1),
    validated as :class:`FIM` validates them; :class:`FisherError` otherwise."""
    try:
        samples = int(meta.get("samples", "0"))
        temperature = float(meta.get("temperature", "1.0"))
    except ValueError as exc:
        raise FisherError(f"FIM metadata is malformed: {meta}") from exc
    kind = meta.get("kind", "empirical")
    _check_settings(kind, temperature, samples)
    return samples, kind, temperature


class _Sums:
    """The closed form's running sums over batches (shared by :func:`head_fisher` and
    :class:`FisherCapture`): ``g.T @ h^2`` and ``g.sum(0)``, and with ``per_label`` the same
    sums per label row (``K x K x d``), on the device the batches arrive on."""

    def __init__(self, lin: nn.Linear, classes: tuple[int, ...], kind: str, temperature: float,
                 per_label: bool, dtype: torch.dtype, device: torch.device) -> None:
        self.classes, self.kind, self.temperature, self.per_label = classes, kind, temperature, per_label
        self.has_bias = lin.bias is not None
        k, d = len(classes), lin.in_features
        if per_label:  # the totals are the per-label sums added up (in fim())
            self.l_w = torch.zeros(k, k, d, dtype=dtype, device=device)
            self.l_b = torch.zeros(k, k, dtype=dtype, device=device)
            self.l_n = torch.zeros(k, dtype=torch.int64, device=device)
            # Bound the (chunk, K, d) temporary of the per-label scatter to ~1M elements.
            self._chunk = max(1, (1 << 20) // (k * d))
        else:
            self.f_w = torch.zeros(k, d, dtype=dtype, device=device)
            self.f_b = torch.zeros(k, dtype=dtype, device=device)
        self.n = 0

    def add(self, h: Tensor, z: Tensor, rows: Tensor) -> None:
        """Add one batch: head inputs ``h`` (N, d), logits ``z`` (N, K), label rows ``rows`` (N,)."""
        g = logit_grad_sq(z, rows, self.kind, self.temperature)
        h2 = h.square()
        if self.per_label:
            # One scatter per chunk instead of a Python loop over the labels present.
            for i in range(0, len(rows), self._chunk):
                r, gi, hi = rows[i:i + self._chunk], g[i:i + self._chunk], h2[i:i + self._chunk]
                self.l_w.index_add_(0, r, gi.unsqueeze(2) * hi.unsqueeze(1))
            self.l_b.index_add_(0, rows, g)
            self.l_n += torch.bincount(rows, minlength=len(self.classes))
        else:
            self.f_w.addmm_(g.T, h2)
            self.f_b += g.sum(0)
        self.n += int(rows.numel())

    def fim(self) -> FIM:
        """Means over the samples seen, as CPU float32."""
        if self.n == 0:
            raise FisherDataError("no samples to compute a Fisher information on")
        f_w, f_b = (self.l_w.sum(0), self.l_b.sum(0)) if self.per_label else (self.f_w, self.f_b)
        lw = self.l_w.to(torch.float32).cpu() if self.per_label else None
        return FIM(
            weight=(f_w / self.n).to(torch.float32).cpu(),
            bias=(f_b / self.n).to(torch.float32).cpu() if self.has_bias else None,
            classes=self.classes, samples=self.n, kind=self.kind, temperature=self.temperature,
            label_weight=lw,
            label_bias=self.l_b.to(torch.float32).cpu() if self.per_label and self.has_bias else None,
            label_counts=self.l_n.cpu() if self.per_label else None,
        )


def head_fisher(
    model: nn.Module,
    head: nn.Module | str,
    batches: Iterable[tuple[Tensor, Tensor]],
    classes: Sequence[int],
    *,
    kind: str = "empirical",
    temperature: float = 1.0,
    device: torch.device | str | None = None,
    per_label: bool = False,
) -> FIM:
    """Closed-form diagonal Fisher of the head's weight and bias: one forward pass per batch.

    ``per_label`` also keeps the per-label sums (``K x K x d`` floats) in the same pass, so a
    label set's unlearning FIM needs no pass later (:meth:`FIM.for_labels`).

    ``y`` holds label ids, mapped to rows through ``classes``. ``temperature`` softens
    ``p = softmax(z / T)``; the constant ``1/T^2`` of the tempered loss's gradient is left
    out (it cancels in FIUn's ratios and keeps values comparable across temperatures).
    Accumulates in float32 (float64 for a float64 model); returns CPU tensors.
    """
    _check_kind(kind, temperature)
    classes = tuple(int(c) for c in classes)
    check_unique(classes, "classes")
    lin = resolve_head(model, head)
    _check_width(lin, classes)
    x_dtype = input_dtype(model)
    acc = torch.float64 if x_dtype == torch.float64 else torch.float32

    captured: list[tuple[Tensor, Tensor]] = []

    def hook(_mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        captured.append((inputs[0], output))

    handle = lin.register_forward_hook(hook)
    try:
        with eval_mode(model, device) as dev, torch.no_grad():
            sums = _Sums(lin, classes, kind, temperature, per_label, acc, dev)
            for x, y in batches:
                captured.clear()
                model(move_input(x, dev, x_dtype))
                if not captured:
                    raise ArchError("the head was not called during the forward pass")
                h = torch.cat([c[0].reshape(-1, lin.in_features) for c in captured]).to(acc)
                z = torch.cat([c[1].reshape(-1, lin.out_features) for c in captured]).to(acc)
                captured.clear()
                y = y.to(dev).reshape(-1)
                if y.numel() != z.shape[0]:
                    raise FisherDataError(
                        f"batch has {y.numel()} labels but the head produced {z.shape[0]} rows of logits"
                    )
                if y.numel() == 0:
                    continue
                sums.add(h, z, label_rows(y, classes))
    finally:
        handle.remove()
    return sums.fim()


def _held(t: Tensor) -> Tensor:
    """``t`` detached, copied only where it is a view into a larger storage."""
    t = t.detach()
    return t if t.untyped_storage().nbytes() <= t.numel() * t.element_size() else t.clone()


class FisherCapture:
    """The model FIM accumulated from a training epoch's own forward passes (no extra pass).

    A forward hook on the head reads its input ``h`` and logits ``z`` while the training
    loop runs, on the training device, and adds the closed-form diagonal Fisher of every
    batch (the same closed form, and with ``per_label`` the same per-label sums, as
    :func:`head_fisher`). Wrap the *last* epoch's batches with :meth:`wrap` so the hook knows
    their labels::

        cap = FisherCapture(model, classes)
        for epoch in range(epochs):
            batches = loader(epoch)
            for x, y in (cap.wrap(batches) if epoch == epochs - 1 else batches):
                ...forward, loss, step...
        rec.client(r, c, model, shard, fim=cap.fim())

    (:func:`umig.train.fit` does this by default.) What it captures is the FIM of the last
    epoch's parameters *as they evolved*: batch ``b`` is scored by the weights after ``b - 1``
    optimiser steps of that epoch, with BatchNorm/dropout in training mode, over the same data
    as the exact pass (less a last batch of one, which training skips for a BatchNorm model). ``head`` defaults to the last ``nn.Linear`` (:func:`last_linear`);
    ``kind``/``temperature`` must match the store's Fisher settings (``store.fisher_settings()``).
    ``seconds`` is the time the capture took (set-up, hook, :meth:`fim`): its share of the training loop.
    """

    FLUSH_ELEMENTS = 1 << 20  # head inputs and logits held before they are summed (4 MiB of float32)

    def __init__(self, model: nn.Module, classes: Sequence[int], *, head: str | None = None,
                 kind: str = "empirical", temperature: float = 1.0, per_label: bool = False) -> None:
        t0 = time.perf_counter()
        _check_kind(kind, temperature)
        self.classes = tuple(int(c) for c in classes)
        check_unique(self.classes, "classes")
        self.kind, self.temperature, self.per_label = kind, float(temperature), per_label
        self.head = head if head is not None else last_linear(model)
        self.lin = resolve_head(model, self.head)
        _check_width(self.lin, self.classes)
        self._y: Tensor | None = None
        self._sums: _Sums | None = None
        # (h, z, y, h's and z's version counters) of batches not summed yet
        self._pending: list[tuple[Tensor, Tensor, Tensor, int, int]] = []
        self._pending_size = 0
        self._spoiled: str | None = None  # why the batches seen cannot give the FIM (see _flush)
        self._handle = self.lin.register_forward_hook(self._hook)
        self.seconds = time.perf_counter() - t0

    @property
    def samples(self) -> int:
        """Samples captured so far."""
        return (self._sums.n if self._sums is not None else 0) + sum(len(p[2]) for p in self._pending)

    def wrap(self, batches):
        """Yield ``batches`` unchanged, telling the hook each batch's labels."""
        try:
            for x, y in batches:
                self._y = y
                yield x, y
        finally:
            self._y = None

    def _hook(self, _mod: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if self._y is None:
            return
        t0 = time.perf_counter()
        y, self._y = self._y, None  # one head call per batch
        if y.numel() == output.numel() // self.lin.out_features and y.numel():
            # Summed in one go every FLUSH_ELEMENTS: per batch the closed form's dozen small ops would cost
            # more than the math. Held as they are, with their in-place version counters (which detach()
            # shares), not copied: a copy per batch cost more than the sums. A view of a larger tensor (a
            # transformer's first token) is copied, so as not to hold the whole batch's activations.
            h, z = _held(inputs[0]), _held(output)
            self._pending.append((h, z, y if y.device == z.device else y.to(z.device), h._version, z._version))
            self._pending_size += h.numel() + z.numel()
            if self._pending_size >= self.FLUSH_ELEMENTS:
                self._flush()
        self.seconds += time.perf_counter() - t0

    def _flush(self) -> None:
        """Add the pending batches to the sums."""
        if not self._pending:
            return
        d, k = self.lin.in_features, self.lin.out_features
        pending, self._pending, self._pending_size = self._pending, [], 0
        if self._spoiled is not None:
            return
        if any(h._version != hv or z._version != zv for h, z, _, hv, zv in pending):
            # Raised by fim(), not here: this may run inside the training loop's forward pass.
            self._spoiled = (f"the inputs or outputs of head '{self.head}' were changed in place after it ran "
                             "(e.g. logits scaled by an in-place op): FisherCapture cannot capture this loop's FIM")
            return
        h = torch.cat([t.reshape(-1, d) for t, _, _, _, _ in pending])
        z = torch.cat([t.reshape(-1, k) for _, t, _, _, _ in pending])
        y = torch.cat([t.reshape(-1) for _, _, t, _, _ in pending])
        if self._sums is None:
            self._sums = _Sums(self.lin, self.classes, self.kind, self.temperature, self.per_label,
                               torch.float32, z.device)
        self._sums.add(h.float(), z.float(), label_rows(y, self.classes))

    def close(self) -> None:
        """Remove the hook (``fim()`` still works afterwards)."""
        self._handle.remove()

    def __enter__(self) -> FisherCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def fim(self) -> FIM:
        """The captured :class:`FIM` (CPU tensors); closes the hook."""
        self.close()
        if not self.samples:
            raise FisherDataError("FisherCapture saw no labelled batch: wrap the last epoch's batches with wrap()")
        t0 = time.perf_counter()
        self._flush()
        if self._spoiled is not None:
            raise FisherDataError(self._spoiled)
        out = self._sums.fim()
        self.seconds += time.perf_counter() - t0
        return out


# --------------------------------------------------------------------------- FIMs kept with a model
# What training captured for a model's *current* weights (umig.train.fit keeps it; umig.ingest.add_node
# records it instead of running the FIM pass). Keyed weakly by the module, so a model that is dropped
# or deep-copied carries nothing over.
_KEPT: weakref.WeakKeyDictionary[nn.Module, KeptFIM] = weakref.WeakKeyDictionary()


@dataclass(frozen=True, eq=False)
class KeptFIM:
    """A FIM training captured for a model: ``fim`` over ``data`` through head ``head``, ``seconds`` of
    capture in the training loop. ``weights`` identifies the weights it belongs to (see :func:`kept_fim`)."""

    fim: FIM
    head: str
    data: Any
    seconds: float
    weights: tuple[Any, Tensor | None]


def _weights_token(model: nn.Module) -> tuple[Any, Tensor | None]:
    """What must not change for a kept FIM to stay the model's: each parameter's and buffer's identity,
    storage and in-place version counter, plus the float64 sum of the floating ones per device (which also
    sees writes through ``.data``, whose version counter is separate). One reduction per device: a sum
    per tensor would be a dozen small ops per record on a small model."""
    # Every parameter and buffer once, in one walk over the modules (parameters() and buffers() walk twice).
    tensors, seen = [], set()
    for mod in model.modules():
        for t in (*mod._parameters.values(), *mod._buffers.values()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                tensors.append(t)
    ids = tuple((id(t), t.data_ptr(), t._version, t.device) for t in tensors)
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        if t.is_floating_point():
            by_device.setdefault(t.device, []).append(t.reshape(-1))
    if not by_device:
        return ids, None
    with torch.no_grad():
        return ids, torch.stack([torch.cat(ts).sum(dtype=torch.float64).cpu() for ts in by_device.values()])


def keep_fim(model: nn.Module, fim: FIM, *, head: str, data: Any, seconds: float = 0.0) -> KeptFIM:
    """Keep ``fim`` (captured over ``data`` through ``head``, in ``seconds``) as the FIM of ``model``'s current
    weights; the time this takes is added to ``seconds``."""
    t0 = time.perf_counter()
    token = _weights_token(model)
    kept = KeptFIM(fim, head, data, seconds + time.perf_counter() - t0, token)
    _KEPT[model] = kept
    return kept


def kept_fim(model: nn.Module, *, check: bool = True) -> KeptFIM | None:
    """The FIM kept for ``model`` by :func:`keep_fim`, or None when there is none or (with ``check``) the
    weights changed since (another step, ``load_state_dict``, a moved or replaced tensor, a write through
    ``.data``). ``check=False`` skips that comparison, e.g. to read only ``seconds``."""
    kept = _KEPT.get(model)
    if kept is None or not check:
        return kept
    ids, sums = _weights_token(model)
    if ids != kept.weights[0] or (sums is None) != (kept.weights[1] is None) or (
            sums is not None and not torch.equal(sums, kept.weights[1])):
        del _KEPT[model]
        return None
    return kept


def without_label_stats(fim: FIM) -> FIM:
    """``fim`` without its per-label sums."""
    return replace(fim, label_weight=None, label_bias=None, label_counts=None)


# --------------------------------------------------------------------------- merges


def _check_compatible(fims: Sequence[FIM], op: str) -> None:
    if not fims:
        raise FisherError(f"{op} needs at least one FIM")
    widths = sorted({f.feature_dim for f in fims})
    if len(widths) > 1:
        raise FisherShapeError(
            f"{op}: FIMs have different feature widths {widths}; heads of different width cannot be merged"
        )
    if len({f.bias is None for f in fims}) > 1:
        raise FisherShapeError(f"{op}: some FIMs have a bias term and some do not")
    kinds = sorted({f.kind for f in fims})
    if len(kinds) > 1:
        raise FisherError(f"{op}: FIMs of different kinds {kinds} cannot be combined")
    temps = sorted({f.temperature for f in fims})
    if len(temps) > 1:
        raise FisherError(f"{op}: FIMs computed at different temperatures {temps} cannot be combined")


def weighted_mean(fims: Sequence[FIM], weights: Sequence[float], classes: Sequence[int] | None = None) -> FIM:
    """Data-size-weighted mean of FIMs, aligned by label id onto ``classes``.

    ``classes`` defaults to the sorted union of the inputs' classes. A FIM without a row
    for some label contributes zero to it (its head puts no probability there).
    Used for data-less nodes such as FL aggregates.
    """
    fims = list(fims)
    _check_compatible(fims, "weighted_mean")
    w = [float(v) for v in weights]
    if len(w) != len(fims):
        raise FisherError(f"weighted_mean: {len(fims)} FIMs but {len(w)} weights")
    if any(v < 0 for v in w) or sum(w) <= 0:
        raise FisherError(f"weighted_mean: weights must be >= 0 with a positive sum, got {w}")
    if classes is None:
        classes = sorted(set().union(*(f.classes for f in fims)))
    classes = tuple(int(c) for c in classes)
    total = sum(w)
    aligned = [f.aligned(classes) for f in fims]
    weight = sum(a.weight * (v / total) for a, v in zip(aligned, w))
    bias = None
    if aligned[0].bias is not None:
        bias = sum(a.bias * (v / total) for a, v in zip(aligned, w))
    return FIM(weight, bias, classes, sum(f.samples for f in fims), fims[0].kind, fims[0].temperature)


def merge_max(fims: Sequence[FIM], classes: Sequence[int]) -> FIM:
    """FIUn Eq. 5: element-wise max over unlearning FIMs, aligned by label id onto ``classes``.

    Rows for labels a FIM does not have count as 0. ``samples`` is the total behind the inputs.
    """
    fims = list(fims)
    _check_compatible(fims, "merge_max")
    classes = tuple(int(c) for c in classes)
    aligned = [f.aligned(classes) for f in fims]
    weight = torch.stack([a.weight for a in aligned]).amax(0)
    bias = None
    if aligned[0].bias is not None:
        bias = torch.stack([a.bias for a in aligned]).amax(0)
    return FIM(weight, bias, classes, sum(f.samples for f in fims), fims[0].kind, fims[0].temperature)


# --------------------------------------------------------------------------- reference


@contextlib.contextmanager
def _head_requires_grad(lin: nn.Linear) -> Iterator[list[Tensor]]:
    params = [p for p in (lin.weight, lin.bias) if p is not None]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        yield params
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def autograd_fisher(
    model: nn.Module,
    head: nn.Module | str,
    batches: Iterable[tuple[Tensor, Tensor]],
    classes: Sequence[int],
    *,
    kind: str = "empirical",
    temperature: float = 1.0,
    per_batch: bool = False,
    device: torch.device | str | None = None,
) -> FIM:
    """Reference Fisher by autograd (slow; for tests and the benchmark only).

    Default: per sample (one forward per sample), the squared gradient of the CE loss
    w.r.t. the head's weight and bias, averaged over samples. ``kind="true"`` takes the
    expectation over ``y ~ p`` by differentiating the loss for every class. With a
    temperature the loss is ``T * CE(z / T, y)`` so its gradient matches the closed form.

    ``per_batch=True`` is what the FIUn authors' code does: the squared gradient of the
    batch-mean loss, averaged over batches, with backward through ALL parameters
    (so its cost is theirs). It is not equal to the per-sample Fisher.
    """
    _check_kind(kind, temperature)
    if per_batch and kind != "empirical":
        raise FisherError("per_batch autograd Fisher is only defined for kind='empirical'")
    classes = tuple(int(c) for c in classes)
    check_unique(classes, "classes")
    lin = resolve_head(model, head)
    _check_width(lin, classes)
    x_dtype = input_dtype(model)
    k = len(classes)

    def loss_of(z: Tensor, rows: Tensor) -> Tensor:
        return temperature * nn.functional.cross_entropy(z.float() / temperature, rows, reduction="sum")

    with eval_mode(model, device) as dev, _head_requires_grad(lin) as head_params, torch.enable_grad():
        f_w = torch.zeros(k, lin.in_features, dtype=torch.float64, device=dev)
        f_b = torch.zeros(k, dtype=torch.float64, device=dev)
        n = 0
        batches_seen = 0
        for x, y in batches:
            x = move_input(x, dev, x_dtype)
            y = y.to(dev)
            if per_batch:
                z = model(x).reshape(-1, k)
                rows = label_rows(y, classes)
                if rows.numel() == 0:
                    continue
                others = [p for p in model.parameters() if p.requires_grad and all(p is not q for q in head_params)]
                grads = torch.autograd.grad(loss_of(z, rows) / rows.numel(), head_params + others)
                f_w += grads[0].double().square()
                if lin.bias is not None:
                    f_b += grads[1].double().square()
                n += rows.numel()
                batches_seen += 1
                continue
            for i in range(x.shape[0]):
                z = model(x[i : i + 1]).reshape(-1, k)
                rows_i = label_rows(y[i : i + 1], classes)
                for r in range(z.shape[0]):
                    if kind == "empirical":
                        targets = [(rows_i[r : r + 1], 1.0)]
                    else:
                        p = torch.softmax(z[r].detach().double() / temperature, dim=0)
                        targets = [(torch.tensor([c], device=dev), float(p[c])) for c in range(k)]
                    for target, prob in targets:
                        grads = torch.autograd.grad(loss_of(z[r : r + 1], target), head_params, retain_graph=True)
                        f_w += prob * grads[0].double().square()
                        if lin.bias is not None:
                            f_b += prob * grads[1].double().square()
                    n += 1
    if n == 0:
        raise FisherDataError("no samples to compute a Fisher information on")
    denom = batches_seen if per_batch else n
    return FIM(
        weight=(f_w / denom).float().cpu(),
        bias=(f_b / denom).float().cpu() if lin.bias is not None else None,
        classes=classes,
        samples=n,
        kind=kind,
        temperature=temperature,
    )
