"""Influential-channel fine-tuning (federated unlearning through model explanation).

Per affected node:

1. **Influential channels** (Definition 4, Algorithm 1): on a forget batch ``I`` (``batch`` forgotten
   items - of the forgotten labels, or forgotten samples and clients - drawn with the job's seed
   from the node's forget data, or its clients' for an aggregate), every output channel of every
   convolution and linear layer (the head included) is zeroed one at a time and
   ``S = H_b(I) - H(I)``, the accuracy drop w.r.t. each item's own label, is recorded.
   Ties in ``S`` (frequent on a small batch) are broken by the increase of the loss on ``I``. The
   top ``delta`` fraction of channels per layer (at least one) is kept.

   The ablations are vectorised: for each layer, ``torch.func.vmap`` runs the model over a stack
   of channel masks applied by a forward hook, so everything *before* the layer is computed once
   (it does not depend on the mask) and only the part after it runs once per channel, in chunks
   of ``chunk`` channels. Where the architecture adds a mask-dependent tensor in place into one
   that is not (a ResNet's ``out += identity`` when the ablated conv is on the shortcut), the mask
   is applied one enclosing module higher, and so on up to the model input.
2. **Fine-tuning only those channels** (weights and bias of the selected output channels, through
   the same sparse-delta trainer as FUSED: everything else frozen, eval mode, BatchNorm statistics
   unchanged) with cross-entropy on retain data plus *perturbation samples*: forget inputs relabelled
   to a random wrong label (drawn, seeded, from the head's retained labels other than the item's
   own, so neither a forgotten label nor what a forgotten sample taught is taught again).
   ``variant=centralized`` (the paper's server-side scheme): one training set,
   at most ``samples`` retain samples (the paper used 1,600) plus at most ``samples`` perturbation
   samples, ``epochs`` epochs. ``variant=decentralized``: every source (an aggregate's clients, or
   the node itself) trains on its own retain + perturbation data for ``epochs`` local epochs,
   ``rounds`` rounds of FedAvg weighted by the edges' data shares. A node whose own data is entirely
   forgotten (a forgotten client's own models) trains on its federation peers' retain data plus its
   own perturbation samples (``umig.unlearners.baselines.peer_names``).

The change is returned as a sparse delta on the selected rows, so the node's new version is
"base + delta" (revert is bit-exact).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import vmap

from umig import delta as delta_mod
from umig.data import from_tensors
from umig.errors import UnlearningError
from umig.heads import label_rows
from umig.unlearner import Job, NodeContext, NodeUnlearner, NodeUpdate, Param
from umig.unlearners.baselines import (
    OPTIMIZERS,
    check_data,
    concat,
    forget_source_names,
    forget_sources,
    param_count,
    seed_of,
    training_sources,
)
from umig.unlearners.fused import MERGE_HELP, as_update, train_sparse

VARIANTS = ("centralized", "decentralized")
_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ----------------------------------------------------------------- ablation
def channel_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Convolution and linear layers, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _LAYERS)]


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _apply_mask(m: nn.Module, out: Tensor, mask: Tensor) -> Tensor:
    if isinstance(m, nn.Linear):
        return out * mask  # channels are the last dimension
    return out * mask.view(-1, *([1] * (out.dim() - 2)))  # (N, C, ...): inside vmap N is the leading dim


def ablation_effects(model: nn.Module, x: Tensor, y: Tensor, classes: Sequence[int], *,
                     layers: Sequence[str] | None = None, chunk: int = 32) -> dict[str, tuple[Tensor, Tensor]]:
    """For each layer, ``(accuracy drop, loss increase)`` on ``(x, y)`` when each output channel is zeroed.

    ``model`` runs in eval mode without gradients; results are float CPU tensors of one entry per channel.
    """
    model.eval()
    mods = dict(model.named_modules())
    names = list(layers) if layers is not None else [n for n, _ in channel_layers(model)]
    rows = label_rows(y, classes)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    with torch.no_grad():
        z = model(x)
        acc0 = (z.argmax(1) == rows).float().mean()
        loss0 = F.cross_entropy(z, rows)
        for name in names:
            mod = mods[name]
            c = _out_channels(mod)
            masks = 1.0 - torch.eye(c, dtype=z.dtype, device=x.device)
            holder: dict[str, Tensor] = {}

            def run(mask: Tensor) -> tuple[Tensor, Tensor]:
                holder["mask"] = mask
                zz = model(x)
                return (zz.argmax(1) == rows).float().mean(), F.cross_entropy(zz, rows)

            handle = mod.register_forward_hook(lambda m, i, o: _apply_mask(m, o, holder["mask"]))
            try:
                acc, loss = _vmap_with_fallback(run, masks, name, mods, holder, chunk)
            finally:
                handle.remove()
            out[name] = ((acc0 - acc).cpu(), (loss - loss0).cpu())
    return out


def _vmap_with_fallback(run, masks: Tensor, name: str, mods: Mapping[str, nn.Module], holder: dict,
                        chunk: int) -> tuple[Tensor, Tensor]:
    """vmap ``run`` over ``masks``; when that fails (a ResNet's ``out += identity`` with the ablated conv on
    the shortcut: a batched tensor added in place into an unbatched one), make the input of the nearest
    enclosing module batched, and so on up to the model input (where nothing is shared any more)."""
    parts = name.split(".")
    ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, -1, -1)]  # parent ... "" (the model)
    err: Exception | None = None
    for anc in [None, *ancestors]:
        handle = None
        if anc is not None:
            def pre(m, args, _h=holder):
                # ``x + 0 * mask.sum()`` is numerically x but carries the vmapped dimension.
                return (args[0] + 0 * _h["mask"].sum(), *args[1:])
            handle = mods[anc].register_forward_pre_hook(pre)
        try:
            return vmap(run, chunk_size=max(1, chunk))(masks)
        except RuntimeError as e:  # typically in-place arithmetic of a batched tensor into an unbatched one
            err = e
        finally:
            if handle is not None:
                handle.remove()
    raise UnlearningError(f"channel ablation of layer '{name}' failed even with the model input batched: {err}")


def select_channels(effects: Mapping[str, tuple[Tensor, Tensor]], delta: float) -> dict[str, Tensor]:
    """Top ``ceil(delta * C)`` (at least one) channels per layer by accuracy drop, ties by loss increase."""
    out = {}
    for name, (drop, dloss) in effects.items():
        n = max(1, math.ceil(delta * drop.numel()))
        by_loss = torch.argsort(dloss, descending=True, stable=True)
        order = by_loss[torch.argsort(drop[by_loss], descending=True, stable=True)]
        out[name] = torch.sort(order[:n]).values
    return out


def channel_index(model: nn.Module, chosen: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Flat indices of the selected output channels' weights and bias (``param -> indices``)."""
    mods = dict(model.named_modules())
    index: dict[str, Tensor] = {}
    for name, ch in chosen.items():
        mod = mods[name]
        for pname, p in mod.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            if isinstance(mod, nn.Linear) or p.dim() >= 1 and p.shape[0] == _out_channels(mod):
                row = p[0].numel() if p.dim() > 1 else 1
                index[full] = (ch.view(-1, 1) * row + torch.arange(row).view(1, -1)).reshape(-1)
    return index


# ------------------------------------------------------------------- data
def perturbation(forget: Any, classes: Sequence[int], labels: Sequence[int], seed: int, cap: int | None = None):
    """Forget inputs relabelled to a random retained label other than their own (a ``umig.data.Data``),
    at most ``cap`` of them."""
    keep = torch.tensor([c for c in classes if c not in set(labels)], dtype=torch.long)
    if not len(keep):
        raise UnlearningError("no retained label to relabel perturbation samples with")
    g = torch.Generator().manual_seed(seed)
    if cap is not None and len(forget) > cap:
        forget = forget.select(torch.sort(torch.randperm(len(forget), generator=g)[:cap]).values)
    xs, ys = (torch.cat(t) for t in zip(*forget.batches(512)))
    # Own label among the retained ones: forgotten samples or clients (a label forget set never
    # is, and keeps its draw exactly as it was).
    pos = torch.where(ys.view(-1, 1) == keep.view(1, -1), torch.arange(len(keep)), -1).max(1).values
    if not bool((pos >= 0).any()):
        return from_tensors(xs, keep[torch.randint(len(keep), (len(xs),), generator=g)])
    choices = len(keep) - (pos >= 0).long()  # every retained label but the item's own
    if bool((choices == 0).any()):
        raise UnlearningError(f"no retained label other than {int(keep[0])} to relabel perturbation samples with")
    k = torch.minimum((torch.rand(len(xs), generator=g) * choices).long(), choices - 1)  # rounding can hit `choices`
    k = k + ((pos >= 0) & (k >= pos)).long()  # skip the item's own label
    return from_tensors(xs, keep[k])


def _sample(data: Any, cap: int, seed: int):
    if cap <= 0 or len(data) <= cap:
        return data
    g = torch.Generator().manual_seed(seed)
    return data.select(torch.sort(torch.randperm(len(data), generator=g)[:cap]).values)


def forget_batch(ctx: NodeContext, n: int) -> tuple[Tensor, Tensor]:
    srcs = forget_sources(ctx)
    if not srcs:
        raise UnlearningError(f"node '{ctx.node.name}': no forget data for the channel ablation")
    data = _sample(concat([d for _, _, d in srcs]), n, seed_of(ctx.seed, ctx.node.name, "ablation"))
    xs, ys = zip(*data.batches(512))
    return torch.cat(xs), torch.cat(ys)


# ----------------------------------------------------------------- method
class Channel(NodeUnlearner):
    """Fine-tune only the channels whose ablation hurts the forgotten labels most."""

    name = "channel"
    description = ("Influential-channel fine-tuning: per-layer top-delta channels by ablation on a forget batch, "
                   "fine-tuned (sparse delta) on retain data + perturbation samples; centralized or FedAvg.")
    kinds = frozenset({"labels", "samples", "client"})
    params: Mapping[str, Param] = {
        "delta": Param(0.05, "fraction of output channels per layer to fine-tune"),
        "batch": Param(64, "forget samples in the ablation batch I"),
        "variant": Param("centralized", "centralized: server-side sample; decentralized: FedAvg over clients",
                         choices=VARIANTS),
        "samples": Param(1600, "centralized: at most this many retain (and perturbation) samples"),
        "epochs": Param(5, "epochs (centralized) or local epochs per round (decentralized)"),
        "rounds": Param(3, "decentralized: FedAvg rounds"),
        "lr": Param(0.01, "learning rate"),
        "optimizer": Param("adam", "optimizer", choices=OPTIMIZERS),
        "batch_size": Param(64, "fine-tuning batch size"),
        "chunk": Param(32, "channels ablated per vectorised pass (memory vs. speed)"),
        "merge": Param(False, MERGE_HELP),
    }

    def check(self, job: Job) -> None:
        p = job.params
        if not 0 < p["delta"] <= 1:
            raise UnlearningError(f"method 'channel': delta must be in (0, 1], got {p['delta']!r}")
        for n in ("batch", "epochs", "rounds", "batch_size", "chunk"):
            if p[n] < 1:
                raise UnlearningError(f"method 'channel': {n} must be >= 1, got {p[n]!r}")
        if p["samples"] < 1:
            raise UnlearningError(f"method 'channel': samples must be >= 1, got {p['samples']!r}")
        if not p["lr"] > 0:
            raise UnlearningError(f"method 'channel': lr must be > 0, got {p['lr']!r}")
        check_data(job, self.name, retain=True, forget=True)

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        t0 = time.perf_counter()
        p = ctx.params
        model = ctx.model()
        x, y = forget_batch(ctx, p["batch"])
        effects = ablation_effects(model, x.to(ctx.device), y.to(ctx.device), ctx.classes, chunk=p["chunk"])
        chosen = select_channels(effects, p["delta"])
        t_sel = time.perf_counter() - t0
        index = channel_index(model, chosen)

        node = ctx.node.name
        from_ancestors = forget_source_names(ctx.snapshots, node, ctx.holds_forget)[1]
        retain, by_peers = training_sources(ctx)
        forget = {n: d for n, _, d in forget_sources(ctx)}
        if p["variant"] == "centralized":
            r = _sample(concat([d for _, _, d in retain]), p["samples"], seed_of(ctx.seed, node, "sample"))
            parts = [r]
            if forget:
                parts.append(perturbation(concat(list(forget.values())), ctx.classes, ctx.labels,
                                          seed_of(ctx.seed, node, "perturb"), cap=p["samples"]))
            clients = [(1.0, concat(parts))]
            rounds, n_clients = 1, 0  # server-side: nothing is communicated
        else:
            clients = []
            names = {n for n, _, _ in retain}
            own = {n: d for n, d in forget.items() if n in names}
            # Clients perturb their own forget samples; an inherited node whose clients never held the
            # forgotten data gets those of the ancestors it inherited them from, on every client (so do
            # a forgotten client's peers: its data, on every peer).
            shared = None if own or not forget else concat(list(forget.values()))
            for n, w, d in retain:
                parts = [d]
                f = own.get(n) if own else shared
                if f is not None:
                    parts.append(perturbation(f, ctx.classes, ctx.labels, seed_of(ctx.seed, node, n)))
                clients.append((w, concat(parts)))
            rounds = p["rounds"]
            n_clients = len(clients) if ctx.node.data_ref is None else 0  # own data: nothing travels
        values, stats = train_sparse(
            model, index, clients, ctx.classes, rounds=rounds, local_epochs=p["epochs"], lr=p["lr"],
            optimizer=p["optimizer"], batch_size=p["batch_size"], seed=seed_of(ctx.seed, node, "train"),
            device=ctx.device)
        delta = delta_mod.sparse(index, values)
        entries = sum(int(i.numel()) for i in index.values())
        total = param_count(model)
        return as_update(ctx, model, delta, p["merge"], {
            "variant": p["variant"],
            "forget_from": "ancestors" if from_ancestors else ("own data" if ctx.node.data_ref else "clients"),
            "retain_from": "peers" if by_peers else ("own data" if ctx.node.data_ref is not None else "clients"),
            "channels_selected": {n: c.tolist() for n, c in chosen.items()},
            "channels_total": sum(int(e[0].numel()) for e in effects.values()),
            "ablation_batch": int(len(y)),
            "trainable_params": entries,
            "params_changed": delta_mod.entries(delta),
            "params_total": total,
            "train_samples": sum(len(d) for _, d in clients),
            "comm_params": 2 * entries * n_clients * rounds,
            "comm_params_full": 2 * total * n_clients * rounds,
            "train_loss": stats["loss"],
            "seconds_selection": t_sel,
            "seconds_train": time.perf_counter() - t0 - t_sel,
        })
