"""FIUn: Fisher Inheritance Unlearning (graph-wide, fully parallel).

Phase 1 computes the *unlearning FIM* of every discovery node on its forget data
(Eq. 3). Phase 2 updates every affected node at once: the unlearning FIMs of
the discovery nodes it traces back to are merged by element-wise max, aligned
by label id (Eq. 5), and compared with the node's stored *model FIM* (Eq. 4)
to scale the critical head parameters (Eq. 6). No update depends on another
node's new weights (the paper's "Hyper-Distance"), and a phase-2 task reads
only the node's head blob and FIMs, never the rest of its checkpoint.

Modes (README "FIUn, and the modes"): ``erase`` (default) replaces each forgotten
label's row by one built from the retained rows and the retained labels' Fisher
only, so the head keeps nothing a white-box edit can turn back into the label;
``rows`` is Eq. 6 on the forgotten rows plus a bias floor (it masks: the rows keep
their direction); ``paper`` is Eq. 6 exactly as published. ``erase`` reads no
unlearning FIM, so it runs phase 2 alone: no forward pass, and nothing computed
from the forgotten data is written beside the new heads.
"""

from __future__ import annotations

import time
from collections.abc import Generator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from umig.errors import UnlearningError
from umig.fisher import FIM, FisherError, FisherShapeError, head_fisher, merge_max, parse_metadata
from umig.unlearner import Job, NodeResult, Param, Task, Unlearner

MODES = ("erase", "rows", "paper")


def fiun_update(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    model_fim: FIM,
    merged: FIM | None,
    forget: Sequence[int],
    *,
    gamma: float,
    tau: float,
    eta: float,
    eps: float,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The FIUn update of one head; FIMs already aligned to the head's classes.

    ``erase`` (default): :func:`erase_rows`; it reads only ``model_fim`` (``merged`` may be None and
    gamma/tau/eta are unused). ``paper``: every head parameter whose merged-to-model Fisher ratio
    exceeds gamma is scaled by ``min(tau * F / M, eta)`` (Eq. 6). ``rows``: the same rule,
    restricted to the output rows of the forgotten labels, whose bias is then set below every
    retained row's reachable logit so that the label can no longer win the argmax (a scaled row
    alone still gives logit ~0, which beats negative logits; see README "FIUn, and the modes").
    """
    if mode == "erase":
        return erase_rows(weight, bias, model_fim, forget)
    if merged is None:
        raise UnlearningError(f"FIUn mode {mode!r} needs the merged unlearning FIM")
    # Element-wise float32 math in numpy (the same IEEE operations as torch, without the per-op
    # dispatch that dominates on a 10x64 head); the one float reduction stays in torch, so the
    # result is bit for bit what the torch formulation gives.
    classes = model_fim.classes
    fs = set(forget)
    rows = np.array([c in fs for c in classes], dtype=bool)
    rows_only = mode == "rows"

    def scale(w: torch.Tensor, f: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, int]:
        if (any(t.device.type != "cpu" for t in (w, f, m)) or f.dtype != torch.float32 or m.dtype != torch.float32
                or w.dtype not in (torch.float32, torch.float64)):
            return _scale_torch(w, f, m, torch.from_numpy(rows), rows_only, gamma=gamma, tau=tau, eta=eta, eps=eps)
        wn, fn, mn = w.detach().numpy(), f.detach().numpy(), m.detach().numpy()
        e, g = np.float32(eps), np.float32(gamma)
        crit = (mn / (fn + e)) > g
        if rows_only:
            crit &= rows.reshape(-1, *([1] * (wn.ndim - 1)))
        factor = np.minimum(np.float32(tau) * fn / (mn + e), np.float32(eta)).astype(wn.dtype, copy=False)
        return torch.from_numpy(np.where(crit, factor * wn, wn)), int(crit.sum())

    changed = 0
    out_w, n = scale(weight, model_fim.weight, merged.weight)
    changed += n
    out_b = bias.clone() if bias is not None else None
    if bias is not None and model_fim.bias is not None and merged.bias is not None:
        out_b, n = scale(bias, model_fim.bias, merged.bias)
        changed += n
    if rows_only and out_b is not None and bool(rows.any()) and bool((~rows).any()):
        # Lowest logit a retained row can reach is unbounded for unbounded features; use
        # the head's own scale: every forgotten row gets bias = min retained bias minus the
        # largest L1 row norm times the typical feature magnitude seen in the model FIM.
        forget_rows = torch.from_numpy(rows)
        w_abs = out_w.abs().sum(dim=1)  # the float reduction: torch's summation order
        f32 = all(t is not None and t.dtype == torch.float32 and t.device.type == "cpu"
                  for t in (out_w, out_b, w_abs, model_fim.weight, model_fim.bias))
        if f32:
            fw, fb = model_fim.weight.numpy(), model_fim.bias.numpy()
            top = np.maximum(fw / (fb.reshape(-1, 1) + np.float32(1e-12)), np.float32(0)).max()
            feat = torch.from_numpy(np.asarray(top)).sqrt().numpy()  # torch's sqrt, as _feature_scale
            wa, ob = w_abs.numpy(), out_b.numpy()
            margin = (wa[rows].max() + wa[~rows].max()) * feat
            floor = ob[~rows].min() - margin - np.float32(1.0)
            out_b = torch.from_numpy(np.where(rows, np.minimum(ob, floor), ob))
        else:
            feat = _feature_scale(model_fim)
            margin = (w_abs[forget_rows].max() + w_abs[~forget_rows].max()) * feat
            floor = out_b[~forget_rows].min() - margin - 1.0
            out_b = torch.where(forget_rows, torch.minimum(out_b, floor), out_b)
        changed += int(rows.sum())
    total = weight.numel() + (bias.numel() if bias is not None else 0)
    return out_w, out_b, {"params_changed": changed, "params_total": total}


def erase_rows(
    weight: torch.Tensor, bias: torch.Tensor | None, model_fim: FIM, forget: Sequence[int],
) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """FIUn ``erase``: every forgotten label's row becomes ``w = mean_r(w_r) - lam * v``, its bias a floor.

    ``r`` runs over the retained rows, ``v`` is the unit direction of the retained labels' feature
    magnitudes (``sqrt`` of the model FIM's retained weight rows summed: ``E[g h^2]`` per feature)
    and ``lam > 0`` makes ``|w|`` equal the retained rows' mean norm. Nothing in the new row comes
    from the forgotten rows or the forgotten labels' statistics, so the checkpoint keeps no direction
    that separates them. A model retrained without the labels ends with such a row too: gradient
    descent only ever pushes an absent label's row against the features (``-E[p h]``).

    Why this row: the attacker's edit (give the row the retained mean norm and bias, keep its
    direction) leaves its weights as they are, and its logit is then the retained rows' mean logit minus
    ``lam * v.h``, which never wins for non-negative features (ReLU / pooled heads). A bare mean row
    would be rescaled by the edit and win where the retained logits are flat; a zero row gets the
    mean bias and wins where all retained logits are negative; ``-v`` built from the forgotten
    labels' own statistics would give them back when negated.
    """
    rows = _forget_rows(model_fim.classes, forget)
    stats = _erase_stats(rows, weight.shape[1], weight.numel(), bias.numel() if bias is not None else None)
    if not rows.any():
        return weight.detach().clone(), (bias.detach().clone() if bias is not None else None), stats
    # One float32-or-wider CPU copy, then numpy: on a 10x64 head torch's per-op dispatch costs ~5x the math.
    # (Half precision would lose the norm match; the result is cast back to the head's dtype and device.)
    dt = torch.promote_types(weight.dtype, torch.float32)
    w, b = _numpy_copy(weight, dt), (_numpy_copy(bias, dt) if bias is not None else None)
    _erase_in_place(w, b, rows, model_fim.weight.numpy(),
                    model_fim.bias.numpy() if model_fim.bias is not None else None)
    out_w = torch.from_numpy(w).to(device=weight.device, dtype=weight.dtype)
    out_b = torch.from_numpy(b).to(device=bias.device, dtype=bias.dtype) if bias is not None else None
    return out_w, out_b, stats


def _forget_rows(classes: Sequence[int], forget: Sequence[int]) -> np.ndarray:
    fs = {int(c) for c in forget}
    return np.array([c in fs for c in classes], dtype=bool)


def _erase_stats(rows: np.ndarray, width: int, n_weight: int, n_bias: int | None) -> dict[str, Any]:
    n_rows = int(rows.sum())
    return {"params_changed": n_rows * (width + (1 if n_bias is not None else 0)),
            "params_total": n_weight + (n_bias or 0)}


def _erase_in_place(w: np.ndarray, b: np.ndarray | None, rows: np.ndarray, fim_w: np.ndarray,
                    fim_b: np.ndarray | None) -> None:
    """:func:`erase_rows`' arithmetic on writable copies ``w``/``b`` of the head (``rows``: the forgotten
    ones, at least one), given the model FIM's weight and bias as float32 arrays aligned to the rows."""
    keep = ~rows
    if not keep.any():
        # Every label forgotten: no retained row to build from; an all-zero head carries nothing.
        w[:] = 0
        if b is not None:
            b[:] = 0
        return
    # The reductions spelt out (the same float operations as kept.mean(0), np.linalg.norm(...).mean()
    # and np.linalg.norm(v)): numpy's wrappers cost more than the arithmetic on a 10x64 head.
    kept = w[keep]
    n_kept = kept.shape[0]
    mean_row = kept.sum(0) / n_kept
    target = np.sqrt((kept * kept).sum(1)).sum() / n_kept
    v = np.sqrt(np.maximum(fim_w[keep].sum(0), 0)).astype(w.dtype)
    v_norm = np.sqrt(v @ v)
    if v_norm > 0:
        v /= v_norm
        c = mean_row @ v
        # Positive root of |mean_row - lam v|^2 = target^2; target >= |mean_row| (triangle inequality).
        lam = c + np.sqrt(c * c + max(target * target - mean_row @ mean_row, 0))
        w[rows] = mean_row - lam * v
    else:
        w[rows] = mean_row  # no feature statistics: the retained mean row is still label-free
    if b is not None:
        # Bias below every retained row's reachable logit (as in ``rows`` mode), so the unlearned model
        # itself never predicts the label; it depends only on retained rows and the feature scale.
        w_abs = np.abs(w).sum(1)
        feat = 1.0  # |h| estimate as _feature_scale, from the retained rows only
        if fim_b is not None:
            ratio = fim_w[keep] / (fim_b[keep, None] + np.float32(1e-12))
            feat = float(np.sqrt(max(ratio.max(), 0)))
        margin = (w_abs[rows].max() + w_abs[keep].max()) * feat
        b[rows] = b[keep].min() - margin - 1.0


def _numpy_copy(t: torch.Tensor, dtype: torch.dtype) -> np.ndarray:
    """A writable float32-or-wider CPU copy of ``t`` as numpy (no torch dispatch for a CPU tensor already so)."""
    t = t.detach()
    if t.device.type == "cpu" and t.dtype == dtype:
        return t.numpy().copy()
    return t.to(device="cpu", dtype=dtype, copy=True).numpy()


def _scale_torch(w: torch.Tensor, f: torch.Tensor, m: torch.Tensor, forget_rows: torch.Tensor, rows_only: bool, *,
                 gamma: float, tau: float, eta: float, eps: float) -> tuple[torch.Tensor, int]:
    """Eq. 6 on one tensor with torch ops (any dtype/device)."""
    ratio = m / (f + eps)
    crit = ratio > gamma
    if rows_only:
        crit &= forget_rows.to(crit.device).view(-1, *([1] * (w.dim() - 1)))
    factor = torch.clamp(tau * f / (m + eps), max=eta)
    return torch.where(crit, factor.to(w.dtype) * w, w), int(crit.sum())


def _feature_scale(model_fim: FIM) -> torch.Tensor:
    """A robust upper estimate of |h| from the model FIM: F_W[r, j] / F_b[r] = E[g h_j^2] / E[g]."""
    if model_fim.bias is None:
        return torch.tensor(1.0)
    ratio = model_fim.weight / (model_fim.bias.view(-1, 1) + 1e-12)
    return ratio.clamp(min=0).max().sqrt()


class FIUn(Unlearner):
    """Fisher Inheritance Unlearning over the whole affected subgraph."""

    name = "fiun"
    description = ("Fisher Inheritance Unlearning: a parallel head update of every affected node from stored FIMs "
                   "(default erase: forgotten rows rebuilt label-free; mode=paper: Eqs. 3-6 as published).")
    kinds_note = ("FIUn edits only the classifier head, which cannot remove what specific samples taught the "
                  "features; use method 'retrain' or 'federaser' (see README 'Forgetting clients and samples')")
    params: Mapping[str, Param] = {
        "gamma": Param(1.0, "threshold on merged/model Fisher ratio (Eq. 6)"),
        "tau": Param(1.0, "scale numerator (Eq. 6)"),
        "eta": Param(0.1, "largest scale factor applied to a critical parameter (Eq. 6)"),
        "eps": Param(1e-12, "added to denominators"),
        "mode": Param("erase", "erase: forgotten rows rebuilt from retained rows + retained Fisher, bias floor "
                      "(nothing recoverable; gamma/tau/eta unused); rows: Eq. 6 on forgotten-label rows + bias "
                      "floor (masks only); paper: Eq. 6 on the whole head", choices=MODES),
        "batch_size": Param(256, "batch size for unlearning-FIM passes"),
    }

    def check(self, job: Job) -> None:
        missing = [n for n in job.plan.affected if job.nodes[n].fim_blob is None]
        if missing:
            raise UnlearningError(
                f"node(s) {', '.join(missing[:5])} have no model FIM (added with --no-fim and no parent FIMs); "
                "FIUn needs one"
            )
        nodata = [n for n in job.plan.discovery if job.nodes[n].data_ref is None]
        if nodata:
            raise UnlearningError(f"discovery node(s) {', '.join(nodata)} have no data reference")

    def describe_phases(self, job: Job) -> list[dict[str, Any]]:
        if not _merges(job.params):
            return [{"name": "update", "nodes": list(job.plan.affected)}]
        todo = [n for n in job.plan.discovery if ("unlearning_fim", n) not in job.reuse]
        return [
            *([{"name": "unlearning FIM", "nodes": todo}] if todo or not job.plan.discovery else []),
            {"name": "merge + update", "nodes": list(job.plan.affected),
             "merge_groups": len(job.plan.groups)},
        ]

    def schedule(self, job: Job) -> Generator[list[Task], list[Any], list[NodeResult]]:
        p = job.params
        if not _merges(p):
            # erase rebuilds each node's forgotten rows from its own head and model FIM: no unlearning
            # FIM is read, so none is computed, and nothing derived from the forgotten data is kept.
            results: list[NodeResult] = yield [_update(job, n, []) for n in job.plan.affected]
            return results
        # A catch-up reuses its operation's unlearning FIMs: computed on the discovery nodes as they were
        # when the operation ran, what every other node's update was merged from.
        disc_fim = {n: job.reuse[("unlearning_fim", n)] for n in job.plan.discovery
                    if ("unlearning_fim", n) in job.reuse}
        phase1 = [
            Task(fn="umig.unlearners.fiun:unlearning_fim_task", node=n, cost=float(job.nodes[n].data_size or 1),
                 payload={"snap": job.nodes[n], "labels": job.labels, "batch_size": p["batch_size"],
                          # The stored per-label sums match the node's weights only as it was added.
                          "stats": job.nodes[n].version == 0 and n not in job.positions})
            for n in job.plan.discovery if n not in disc_fim
        ]
        fims: list[dict[str, Any]] = (yield phase1) if phase1 or not job.plan.discovery else []
        disc_fim.update({r["node"]: r["fim"] for r in fims})
        job.op_blobs.extend((r["fim"], "unlearning_fim") for r in fims)
        phase2 = []
        for key, nodes in job.plan.groups:
            digests = sorted(disc_fim[d] for d in key)
            phase2.extend(_update(job, n, digests) for n in nodes)
        results = yield phase2
        return results


def _update(job: Job, node: str, discovery_fims: list[str]) -> Task:
    """The phase-2 task of ``node``: its head update, merged from ``discovery_fims`` where the mode merges."""
    return Task(fn="umig.unlearners.fiun:update_task", node=node, cost=0.01, payload={
        "snap": job.nodes[node], "discovery_fims": discovery_fims, "labels": job.labels, "params": job.params,
        "role": job.plan.role(node)})


def _merges(params: Mapping[str, Any]) -> bool:
    """Whether the mode reads the merged FIM (Eq. 5) of the discovery nodes' unlearning FIMs."""
    return params["mode"] != "erase"


def unlearning_fim_task(payload: dict[str, Any], env: Any) -> dict[str, Any]:
    """Phase 1 (Eq. 3): the discovery node's last-layer FIM on its forget data."""
    snap = payload["snap"]
    model_fim = _load_fim(env, snap.fim_blob, snap.name)
    if payload.get("stats") and model_fim.has_label_stats and set(payload["labels"]) & set(model_fim.classes):
        # Per-label sums stored at add-node: the unlearning FIM without reading data or running the model.
        fim = model_fim.for_labels(payload["labels"])
        digest = env.put(fim.to_tensors(), {**fim.metadata(), "node": snap.name, "role": "unlearning"})
        return {"node": snap.name, "fim": digest, "samples": fim.samples}
    data = env.node_data(snap)
    forget = data.filter_labels(keep=payload["labels"])
    if not len(forget):
        raise UnlearningError(f"discovery node '{snap.name}' holds none of the labels to forget")
    model = env.load_model(snap)
    fim = head_fisher(model, snap.head, forget.batches(payload["batch_size"]), snap.classes,
                      kind=model_fim.kind, temperature=model_fim.temperature, device=env.device)
    digest = env.put(fim.to_tensors(), {**fim.metadata(), "node": snap.name, "role": "unlearning"})
    return {"node": snap.name, "fim": digest, "samples": fim.samples}


_FIM_KEYS = ("weight", "bias", "classes")  # what an update reads: not the per-label statistics


def _load_fim(env: Any, digest: str, owner: str, *, stats: bool = True) -> FIM:
    """An FIM blob (hash-verified); ``stats=False`` leaves its per-label sums unread (a head update
    uses only the FIM itself; only phase 1 sums the statistics)."""
    if stats:
        tensors, meta = env.blobs.load_with_metadata(digest, owner=owner)
    else:
        tensors, meta = env.blobs.load_parts(digest, _FIM_KEYS, owner=owner)
    return FIM.from_tensors(tensors, meta)


def _merged(env: Any, digests: Sequence[str], node: str, feature_dim: int) -> FIM:
    """Eq. 5: the element-wise max of the discovery nodes' unlearning FIMs, once per worker and set."""
    key = ("merged", tuple(digests))
    merged_all = env.cache.get(key)
    if merged_all is None:
        fims = [_load_fim(env, d, node, stats=False) for d in digests]
        union = sorted({c for f in fims for c in f.classes})
        try:
            merged_all = merge_max(fims, union)
        except FisherShapeError as e:
            raise UnlearningError(f"node '{node}': unlearning FIMs cannot be merged: {e}") from None
        env.cache[key] = merged_all
    if merged_all.feature_dim != feature_dim:
        raise UnlearningError(
            f"node '{node}': head input width {feature_dim} differs from its discovery nodes' "
            f"({merged_all.feature_dim}); a merged FIM cannot be formed for it"
        )
    return merged_all


def update_task(payload: dict[str, Any], env: Any) -> NodeResult:
    """Phase 2 (Eqs. 5-6): merged FIM of the node's discovery set, then the head update.

    ``erase`` reads only the node's head and model FIM: its update does not use the merged FIM."""
    t0 = time.perf_counter()
    snap, p = payload["snap"], payload["params"]
    if p["mode"] == "erase":
        done = _erase_arrays(snap, payload["labels"], env)
        if done is not None:
            digest, stats = done
            return NodeResult(node=snap.name, head_blob=digest, metrics=stats, seconds=time.perf_counter() - t0)
    model_fim = _load_fim(env, snap.fim_blob, snap.name, stats=False)
    merged = None
    if p["mode"] != "erase":
        merged = _merged(env, payload["discovery_fims"], snap.name, model_fim.feature_dim).aligned(snap.classes)
    model_fim = model_fim.aligned(snap.classes)
    head = env.head_tensors(snap)
    wkey, bkey = f"{snap.head}.weight", f"{snap.head}.bias"
    w, b, stats = fiun_update(head[wkey], head.get(bkey), model_fim, merged, payload["labels"],
                              gamma=p["gamma"], tau=p["tau"], eta=p["eta"], eps=p["eps"], mode=p["mode"])
    new_head = {wkey: w}
    if b is not None:
        new_head[bkey] = b
    digest = env.put(new_head, {"part": "head"})
    return NodeResult(node=snap.name, head_blob=digest, metrics=stats, seconds=time.perf_counter() - t0)


_F32 = np.dtype(np.float32)
_I64 = np.dtype(np.int64)


def _erase_arrays(snap: Any, labels: Sequence[int], env: Any) -> tuple[str, dict[str, Any]] | None:
    """``erase`` on numpy arrays over the node's head and model-FIM blobs: the same reads, arithmetic
    (:func:`_erase_in_place`) and blob as the tensor path, without the dozen tensors it makes and frees per
    node (most of a 10x64 head's update). None, with nothing written, for anything but a float32 head and FIM
    whose rows are the node's classes and which :class:`~umig.fisher.FIM` accepts as it is: the tensor
    path then runs (and says what is wrong)."""
    fim = env.blobs.load_arrays(snap.fim_blob, _FIM_KEYS, owner=snap.name)
    if fim is None:
        return None
    (f, meta), classes = fim, snap.classes
    fw, fb, fc = f.get("weight"), f.get("bias"), f.get("classes")
    if (fw is None or fc is None or fw.dtype != _F32 or fc.dtype != _I64 or fw.ndim != 2
            or fw.shape[0] != len(classes) or (fb is not None and (fb.dtype != _F32 or fb.shape != (len(classes),)))
            or fc.reshape(-1).tolist() != list(classes) or len(set(classes)) != len(classes)
            or not _plain_fim_metadata(meta)):
        return None
    head = env.blobs.load_arrays(snap.head_blob, owner=snap.name)
    if head is None:
        return None
    wkey, bkey = f"{snap.head}.weight", f"{snap.head}.bias"
    w, b = head[0].get(wkey), head[0].get(bkey)
    if (w is None or w.dtype != _F32 or w.ndim != 2 or w.shape[0] != len(classes)
            or (b is not None and (b.dtype != _F32 or b.shape != (len(classes),)))):
        return None
    rows = _forget_rows(classes, labels)
    stats = _erase_stats(rows, w.shape[1], w.size, b.size if b is not None else None)
    w, b = w.copy(), (b.copy() if b is not None else None)
    if rows.any():
        _erase_in_place(w, b, rows, fw, fb)
    digest = env.put_arrays({wkey: w} if b is None else {wkey: w, bkey: b}, {"part": "head"})
    return digest, stats


def _plain_fim_metadata(meta: dict[str, str]) -> bool:
    """Whether :meth:`FIM.from_tensors` takes this metadata without complaint."""
    try:
        parse_metadata(meta)
    except FisherError:
        return False
    return True
