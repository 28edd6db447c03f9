"""Unlearning metrics, storage-agnostic: AD_f / AD_r and a loss-threshold membership inference.

Models are evaluated on iterables of ``(x, y)`` batches where ``y`` holds label ids and the
model's output row r predicts label ``classes[r]`` (see docs/contracts.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from umig.errors import ArchError
from umig.fisher import eval_mode, input_dtype, move_input
from umig.heads import label_rows

__all__ = [
    "predict_labels",
    "unlearning_accuracy",
    "per_sample_loss",
    "threshold_attack_accuracy",
    "membership_inference",
    "edit_head",
]

Batches = Iterable[tuple[Tensor, Tensor]]


def _logits(
    model: nn.Module, batches: Batches, classes: Sequence[int], device: torch.device | str | None
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (logits as (n, K) float32, labels as (n,)) per batch, in eval mode, no grad."""
    k = len(classes)
    dtype = input_dtype(model)
    with eval_mode(model, device) as dev, torch.no_grad():
        for x, y in batches:
            z = model(move_input(x, dev, dtype))
            if z.shape[-1] != k:
                raise ArchError(f"model outputs {z.shape[-1]} scores per sample but classes lists {k} labels")
            z = z.reshape(-1, k).float()
            y = y.to(dev).reshape(-1).to(torch.int64)
            if y.numel() != z.shape[0]:
                raise ArchError(f"batch has {y.numel()} labels but the model produced {z.shape[0]} predictions")
            yield z, y


def predict_labels(
    model: nn.Module, batches: Batches, classes: Sequence[int], *, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """(predicted label ids, true label ids), both int64 on the CPU; argmax row mapped via ``classes``."""
    table = torch.as_tensor([int(c) for c in classes], dtype=torch.int64)
    preds: list[Tensor] = []
    trues: list[Tensor] = []
    for z, y in _logits(model, batches, classes, device):
        preds.append(z.argmax(1).cpu())
        trues.append(y.cpu())
    if not preds:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone()
    return table[torch.cat(preds)], torch.cat(trues)


def unlearning_accuracy(
    model: nn.Module,
    batches: Batches,
    classes: Sequence[int],
    forget_labels: Iterable[int],
    *,
    device: torch.device | str | None = None,
    forget_mask: torch.Tensor | None = None,
) -> dict[str, float | int | None]:
    """Accuracy split into forgotten and retained: ``AD_f`` on samples whose label is in
    ``forget_labels`` (or that ``forget_mask``, one flag per sample in batch order, marks), ``AD_r``
    on the rest.

    Accuracies are in [0, 1], or None where there are no such samples (``n_f`` / ``n_r`` = 0).
    A sample whose label the head has no row for simply counts as wrong.
    """
    pred, true = predict_labels(model, batches, classes, device=device)
    forget = torch.as_tensor(sorted({int(c) for c in forget_labels}), dtype=torch.int64)
    is_f = torch.isin(true, forget)
    if forget_mask is not None:
        is_f |= forget_mask.to(is_f.device)
    correct = pred == true
    n_f = int(is_f.sum())
    n_r = int((~is_f).sum())
    return {
        "AD_f": float(correct[is_f].float().mean()) if n_f else None,
        "AD_r": float(correct[~is_f].float().mean()) if n_r else None,
        "n_f": n_f,
        "n_r": n_r,
    }


def per_sample_loss(
    model: nn.Module, batches: Batches, classes: Sequence[int], *, device: torch.device | str | None = None
) -> Tensor:
    """Cross-entropy of every sample (float32, CPU); +inf for a label the head has no row for.

    +inf is the largest possible loss: such a sample cannot look like a training member.
    """
    out: list[Tensor] = []
    for z, y in _logits(model, batches, classes, device):
        rows = label_rows(y, classes, strict=False)
        logp = torch.log_softmax(z, dim=1)
        loss = -logp.gather(1, rows.clamp(min=0).unsqueeze(1)).squeeze(1)
        out.append(torch.where(rows >= 0, loss, torch.full_like(loss, float("inf"))).cpu())
    return torch.cat(out) if out else torch.empty(0)


def threshold_attack_accuracy(member_losses: Tensor, nonmember_losses: Tensor) -> float:
    """Best balanced accuracy of a loss-threshold attack, over every threshold and both directions.

    Equals ``0.5 + KS / 2`` where KS is the two-sample Kolmogorov-Smirnov distance between
    the loss distributions. Both directions count because a forgotten set whose loss is
    *higher* than unseen data's also gives away that it was special. Vectorised: one sort
    and cumulative sums, no loop over thresholds.
    """
    m = member_losses.detach().reshape(-1).double().cpu()
    u = nonmember_losses.detach().reshape(-1).double().cpu()
    if m.numel() == 0 or u.numel() == 0:
        raise ValueError("membership inference needs at least one member and one non-member sample")
    losses = torch.nan_to_num(torch.cat([m, u]), nan=float("inf"))
    is_member = torch.cat([torch.ones_like(m), torch.zeros_like(u)])
    order = torch.argsort(losses, stable=True)
    s = losses[order]
    lab = is_member[order]
    tpr = torch.cumsum(lab, 0) / m.numel()
    fpr = torch.cumsum(1.0 - lab, 0) / u.numel()
    # A threshold can only fall between distinct losses: cut after the last of each tie run.
    cut = torch.ones_like(s, dtype=torch.bool)
    cut[:-1] = s[1:] != s[:-1]
    ks = float((tpr - fpr)[cut].abs().max().clamp(min=0.0))
    return 0.5 + ks / 2.0


def membership_inference(
    model: nn.Module,
    forget_batches: Batches,
    unseen_batches: Batches,
    classes: Sequence[int],
    *,
    device: torch.device | str | None = None,
) -> float:
    """Shadow-free loss-threshold MIA on the forget data against unseen data, in [0.5, 1].

    The attacker sees per-sample losses and picks the single best threshold. 0.5 means
    nothing leaks (forget samples look exactly like data the model never saw); 1 means
    every forget sample is recognisable. Unseen data should come from the same labels'
    distribution (e.g. held-out samples of the forgotten labels).
    """
    member = per_sample_loss(model, forget_batches, classes, device=device)
    nonmember = per_sample_loss(model, unseen_batches, classes, device=device)
    return threshold_attack_accuracy(member, nonmember)


def edit_head(weight: Tensor, bias: Tensor | None, rows: Sequence[int]) -> tuple[Tensor, Tensor | None]:
    """The white-box head edit an attacker holding the checkpoint can try: every row in ``rows`` gets
    the other rows' mean bias and mean row norm, keeping its own direction. Returns new tensors.

    A head that only scaled or biased the forgotten rows down gets them back this way; a zero row
    has no direction left and stays zero.
    """
    rows = sorted({int(r) for r in rows})
    others = [r for r in range(weight.shape[0]) if r not in set(rows)]
    w = weight.detach().clone()
    b = bias.detach().clone() if bias is not None else None
    if not rows or not others:
        return w, b
    norms = w.norm(dim=1)
    target = norms[others].mean()
    sel = torch.as_tensor(rows, dtype=torch.long)
    scale = torch.where(norms[sel] > 0, target / norms[sel].clamp(min=1e-12), torch.zeros_like(norms[sel]))
    w[sel] = w[sel] * scale.unsqueeze(1)
    if b is not None:
        b[sel] = b[others].mean()
    return w, b
