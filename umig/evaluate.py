"""Unlearning metrics, storage-agnostic: AD_f / AD_r, membership inference, and the attacks that
try to bring forgotten knowledge back (``umig verify`` judges both models of a node with them).

Models are evaluated on iterables of ``(x, y)`` batches where ``y`` holds label ids and the
model's output row r predicts label ``classes[r]`` (see docs/contracts.md).

* AD_f / AD_r (:func:`unlearning_accuracy`) and a loss-threshold MIA (:func:`membership_inference`).
* SalUn's MIA efficacy (:func:`mia_efficacy`): a classifier on the true label's confidence, trained on
  retained members vs held-out non-members, applied to the forget set.
* Attacks: few-shot relearning (:func:`relearn`), a linear probe on the head's input features
  (:func:`linear_probe_accuracy`) and the white-box head edit (:func:`edit_head`).
* Attribution math (``umig attribute``): the closed-form per-sample gradient of the head
  (:func:`head_gradients`), TracIn between two sets of them (:func:`head_tracin`, one score per
  training item; :func:`head_tracin_pairs`, one per item and query) and precision / recall at k
  (:func:`precision_recall_at_k`).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
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
    "outputs",
    "accuracy_of",
    "true_label_confidence",
    "confidence_threshold",
    "mia_efficacy",
    "linear_probe_accuracy",
    "edit_head",
    "relearn",
    "head_gradients",
    "head_tracin",
    "head_tracin_pairs",
    "precision_recall_at_k",
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


# ------------------------------------------------------------------ verification: metrics and attacks
def outputs(
    model: nn.Module, batches: Batches, classes: Sequence[int], head: str, *,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One pass: ``(logits (n, K), penultimate features (n, D), labels (n,))``, all on the CPU.

    The features are the input of the ``head`` module (the classifier), captured by a hook, so
    any architecture with a named head works without knowing its trunk.
    """
    captured: list[Tensor] = []

    def hook(_m: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured.append(args[0].detach().flatten(1).float().cpu())

    handle = model.get_submodule(head).register_forward_pre_hook(hook)
    logits: list[Tensor] = []
    labels: list[Tensor] = []
    try:
        for z, y in _logits(model, batches, classes, device):
            logits.append(z.cpu())
            labels.append(y.cpu())
    finally:
        handle.remove()
    if not logits:
        return torch.empty(0, len(classes)), torch.empty(0, 0), torch.empty(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(captured), torch.cat(labels)


def accuracy_of(logits: Tensor, labels: Tensor, classes: Sequence[int]) -> float | None:
    """Share of rows whose argmax predicts the true label (None when there are none)."""
    if labels.numel() == 0:
        return None
    table = torch.as_tensor([int(c) for c in classes], dtype=torch.int64)
    return float((table[logits.argmax(1)] == labels).float().mean())


def true_label_confidence(logits: Tensor, labels: Tensor, classes: Sequence[int]) -> Tensor:
    """Softmax probability of each item's true label; 0 for a label the head has no row for."""
    rows = label_rows(labels, classes, strict=False)
    p = torch.softmax(logits.float(), dim=1).gather(1, rows.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(rows >= 0, p, torch.zeros_like(p))


def confidence_threshold(member_conf: Tensor, nonmember_conf: Tensor) -> float:
    """The membership classifier behind :func:`mia_efficacy`: "member iff confidence >= t", with ``t``
    the cut of best balanced accuracy between ``member_conf`` and ``nonmember_conf``.

    A threshold rather than a fitted logistic regression: where members and non-members look alike
    (a model that generalises well), a logistic fit can turn its slope around and call every
    low-confidence item a member, which flips the efficacy between 0 and 1 on noise. The cut lies
    midway between the two confidences it separates; ties go to the lowest cut.
    """
    m = torch.sort(member_conf.detach().reshape(-1).double().cpu()).values
    u = torch.sort(nonmember_conf.detach().reshape(-1).double().cpu()).values
    if m.numel() == 0 or u.numel() == 0:
        raise ValueError("a confidence threshold needs at least one member and one non-member")
    values = torch.unique(torch.cat([m, u]))  # sorted; cut i calls members the items >= values[i]
    cuts = torch.cat([values, values.new_tensor([float("inf")])])
    tpr = 1.0 - torch.searchsorted(m, cuts).double() / m.numel()  # members at or above the cut
    tnr = torch.searchsorted(u, cuts).double() / u.numel()  # non-members below it
    i = int(torch.argmax(tpr + tnr))  # first maximum: the lowest cut
    if i == 0:
        return float(values[0])
    if i == len(values):
        return float("inf")
    return float((values[i - 1] + values[i]) / 2)


def mia_efficacy(member_conf: Tensor, nonmember_conf: Tensor, forget_conf: Tensor) -> float | None:
    """SalUn's MIA efficacy: the share of forget items a membership classifier on the true label's
    confidence calls non-members. The classifier (:func:`confidence_threshold`) is fit on
    ``member_conf`` (retained training items) vs ``nonmember_conf`` (held-out items). Higher means the
    forget set looks less like training data. None when a set is empty.
    """
    if not (member_conf.numel() and nonmember_conf.numel() and forget_conf.numel()):
        return None
    t = confidence_threshold(member_conf, nonmember_conf)
    return float((forget_conf.detach().double().cpu() < t).double().mean())


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, *,
                          seed: int = 0) -> float | None:
    """Accuracy on ``test`` of a multinomial logistic regression fit on ``train`` features (standardised
    with the training statistics): how well the features alone still separate the labels."""
    from sklearn.linear_model import LogisticRegression

    if test_y.numel() == 0 or train_y.numel() == 0 or len(torch.unique(train_y)) < 2:
        return None
    mean = train_x.mean(0, keepdim=True)
    std = train_x.std(0, keepdim=True).clamp(min=1e-6)
    clf = LogisticRegression(max_iter=1000, random_state=seed)
    clf.fit(((train_x - mean) / std).numpy(), train_y.numpy())
    return float((clf.predict(((test_x - mean) / std).numpy()) == test_y.numpy()).mean())


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


def relearn(model: nn.Module, x: Tensor, y: Tensor, classes: Sequence[int], *, steps: int = 30, lr: float = 3e-3,
            seed: int = 0, device: torch.device | str | None = None, head: str | None = None,
            reset_rows: Sequence[int] = ()) -> nn.Module:
    """Few-shot relearning attack: a copy of ``model`` trained ``steps`` full-batch Adam steps on the few
    forget samples ``(x, y)``. Returns the attacked copy; ``model`` is untouched.

    ``reset_rows`` (rows of ``head``) first get a zero weight and the other rows' mean bias: whatever a
    head did to those rows (a very low bias defeats a fixed step budget) no longer counts, so the
    attack measures what the rest of the model still knows. BatchNorm statistics stay frozen (eval
    mode): a handful of samples of the forgotten labels would otherwise overwrite them.
    """
    attacked = copy.deepcopy(model)
    rows = sorted({int(r) for r in reset_rows})
    if rows and head is not None:
        layer = attacked.get_submodule(head)
        others = [r for r in range(layer.weight.shape[0]) if r not in set(rows)]
        with torch.no_grad():
            layer.weight[rows] = 0
            if getattr(layer, "bias", None) is not None and others:
                layer.bias[rows] = layer.bias[others].mean()
    torch.manual_seed(seed)
    params = [p for p in attacked.parameters() if p.is_floating_point()]
    opt = torch.optim.Adam(params, lr=lr)
    with eval_mode(attacked, device) as dev, torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        xb = move_input(x, dev, input_dtype(attacked))
        target = label_rows(y.to(dev), classes)
        for _ in range(steps):
            loss = F.cross_entropy(attacked(xb).reshape(len(target), -1).float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return attacked


# ------------------------------------------------------------------ attribution: closed-form head gradients
def head_gradients(logits: Tensor, features: Tensor, labels: Tensor, classes: Sequence[int], *,
                   bias: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """The per-sample cross-entropy gradient of a linear head, as its two factors: ``(g, h, valid)``.

    For logits ``z = W h + b`` the gradient of ``-log softmax(z)[y]`` is ``dW = (p - e_y) h^T`` and
    ``db = p - e_y``, so it is the outer product of ``g = p - e_y`` (n, K) with ``h`` (n, D), the
    features extended by a constant 1 when the head has a bias (n, D + 1). ``valid`` marks the items
    whose label the head has a row for (the others get ``g = 0``). Computed in float64.
    """
    z = logits.detach().double()
    rows = label_rows(labels, classes, strict=False)
    valid = rows >= 0
    g = torch.softmax(z, dim=1)
    g[valid, rows[valid]] -= 1.0
    g[~valid] = 0.0
    h = features.detach().double().flatten(1)
    if bias:
        h = torch.cat([h, torch.ones(len(h), 1, dtype=h.dtype)], dim=1)
    return g, h, valid


def _unit(t: Tensor) -> Tensor:
    return t / t.norm(dim=1, keepdim=True).clamp(min=1e-12)


def head_tracin(g: Tensor, h: Tensor, query_g: Tensor, query_h: Tensor, *, normalise: bool = True) -> Tensor:
    """TracIn at one checkpoint between training items and queries, from :func:`head_gradients`.

    Each training item's score is the mean over the queries of the dot product of the two
    per-sample gradients, ``<g_i h_i^T, g_q h_q^T> = (g_i . g_q)(h_i . h_q)``; with ``normalise``
    the gradients are first scaled to unit norm (their norm is ``|g| |h|``), so the score is a mean
    cosine in [-1, 1] (Pruthi et al. 2020, section 3.3's normalisation, which keeps a few high-loss
    items from dominating). The queries are summed into one (K, D) matrix first, so the cost is
    O(n K D) whatever the number of queries. Items with a zero gradient score 0.
    """
    if len(query_g) == 0:
        return torch.zeros(len(g), dtype=torch.float64)
    if normalise:
        g, h, query_g, query_h = _unit(g), _unit(h), _unit(query_g), _unit(query_h)
    q = query_g.T @ query_h / len(query_g)  # (K, D): the mean query gradient
    return ((g @ q) * h).sum(dim=1)


def head_tracin_pairs(g: Tensor, h: Tensor, query_g: Tensor, query_h: Tensor, *, normalise: bool = True) -> Tensor:
    """TracIn at one checkpoint for every (training item, query) pair: an (n, m) matrix of
    ``(g_i . g_q)(h_i . h_q)``, cosines in [-1, 1] with ``normalise`` (see :func:`head_tracin`)."""
    if normalise:
        g, h, query_g, query_h = _unit(g), _unit(h), _unit(query_g), _unit(query_h)
    return (g @ query_g.T) * (h @ query_h.T)


def precision_recall_at_k(scores: Tensor, relevant: Tensor, k: int) -> tuple[float, float]:
    """``(precision, recall)`` of the ``k`` highest ``scores`` against the boolean mask ``relevant``.

    Ties at the cut are broken by position (a stable sort), so the figure never flatters a method
    that scores everything alike. Recall is NaN when nothing is relevant.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    order = torch.sort(scores.detach().reshape(-1).double(), descending=True, stable=True).indices[:k]
    hits = float(relevant.reshape(-1)[order].sum())
    total = float(relevant.sum())
    return hits / len(order) if len(order) else float("nan"), hits / total if total else float("nan")
