"""FUSED: reversible unlearning through sparse adapters on critical layers (the paper, not the authors' code).

Per affected node:

1. **Critical Layer Identification** (Eqs. 11-13) from the lineage itself. A *layer* is a module
   that owns parameters directly, normalisation layers excluded (they stay frozen). For a node
   with parents, ``Diff_l = sum_n w_n * sum |p_l^n - p_l|`` over its parents ``n`` (for an FL
   aggregate: its clients, ``w_n`` their data shares from the edge weights; for a client: its
   parent, the global model it was trained from, ``w = 1``). For a node without parents, one local
   round on its retain data (its recorded recipe, ``local_epochs`` epochs) stands in for the
   client. Layers are ranked by ``Diff_l`` (ties: later layers first) and the top ``k`` kept; the
   whole ranking is returned in the node's metrics.
2. **Sparse adapters**: for each parameter tensor ``W`` of a critical layer, a seeded random mask
   keeps ``keep`` of its entries; the layer computes with ``W + mask * A`` and only ``A`` trains.
   Every other parameter is frozen and the whole model runs in eval mode, so BatchNorm statistics
   never change.
3. Training: for a data-less node (an FL aggregate) ``rounds`` rounds of FedAvg over its clients'
   retain data (each client trains the adapter ``local_epochs`` epochs from the global adapter;
   averaged with the edge weights); clients holding only forgotten labels take no part. A node with
   its own data trains on its own retain data (the same loop with one client).

   Objective. ``objective=paper`` is Eq. 14 exactly: cross-entropy on the retain data only. On a
   converged model that does not forget a class: the retain loss is already ~0, so there is no
   gradient that opposes the forgotten knowledge (measured on the demo lineage, k=2: AD_f stayed
   at 81-96% on every node after 5 rounds; with k=3, head included, 98% on the last global model). The default,
   ``objective=overwrite``, adds on each client's own forget inputs ``forget_weight`` times
   ``-log(1 - p_forgotten(x))``: it pushes probability off the forgotten labels only until they
   stop winning, and then fades (unlike gradient ascent). For forgotten samples and clients
   there is no forgotten label: ``p_forgotten(x_f)`` is then the probability of the sample's own
   label ``y_f`` (plus any forgotten labels), so the model stops predicting what the sample
   taught it (a backdoor's target class on triggered inputs, a flipped label). Everything else -
   which layers, which entries, what is frozen, FedAvg, the adapter as a separate blob - is the
   paper's. A node whose own clients never held the forgotten data (an inherited node) uses the
   forget samples of the nearest ancestors that did.

   Sources. A node whose own data is entirely forgotten (a forgotten client's own models) has
   no retain data: it trains on the retain data of the rest of its federation (the other
   sources of the aggregates it feeds, :func:`peer_names`) and overwrites on its own forget
   data; without such peers it is refused.
4. The adapter is returned as a sparse delta (``param -> (flat indices, values)``) that the store
   keeps as its own blob beside the unchanged base weights: the node's new version is "base +
   adapter", and reverting drops the adapter, restoring the model bit for bit.

Communication is reported per node: adapter entries (non-zero) against the model's parameters, and
the volume a federated run of the adapter moves (down + up per client per round) against what the
same rounds would move with full models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from umig import delta as delta_mod
from umig.errors import UnlearningError
from umig.heads import label_rows, rows_of, shared_rows
from umig.train import Recipe, fit
from umig.unlearner import (
    Job,
    NodeContext,
    NodeUnlearner,
    NodeUpdate,
    Param,
)
from umig.unlearners.baselines import (
    OPTIMIZERS,
    check_data,
    concat,
    forget_source_names,
    forget_sources,
    make_optimizer,
    param_count,
    seed_of,
    training_sources,
)

OBJECTIVES = ("overwrite", "paper")
_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


# ------------------------------------------------------------ sparse deltas
def train_sparse(
    model: nn.Module,
    index: Mapping[str, Tensor],
    clients: Sequence[tuple[float, Any] | tuple[float, Any, Any]],
    classes: Sequence[int],
    *,
    rounds: int,
    local_epochs: int,
    lr: float,
    optimizer: str,
    batch_size: int,
    seed: int,
    device: Any,
    forget_labels: Sequence[int] = (),
    forget_weight: float = 1.0,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Train sparse additive values on the flat entries ``index[P]`` of parameters ``P``; FedAvg over clients.

    The model computes with ``P.flatten().index_add(0, index[P], values[P])`` - exactly what
    ``umig.store.apply_delta`` does with the stored delta, so the trained and the stored model agree
    bit for bit. All parameters are frozen and the model stays in eval mode (BatchNorm statistics
    unchanged). ``clients`` are ``(weight, Data)``; each round every client trains a copy of the
    global values for ``local_epochs`` epochs (fresh optimizer, as in FL) and the server averages
    them with the weights. Returns the values and ``{"loss": last round's mean loss, "steps": n}``.

    A client given as ``(weight, retain, forget)`` also pushes probability mass off the rows of
    ``forget_labels`` on its forget inputs: each step adds ``forget_weight`` times the mean of
    ``-log(1 - p_forget(x))`` over a (cycled) forget batch. That term is bounded: it fades once a
    forget input no longer predicts a forgotten label, unlike gradient ascent. When the forget data
    holds items of labels that are not forgotten (forgotten samples or clients), ``p_forget(x)``
    also counts each item's own label (see :func:`overwrite_term`).
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    named = dict(model.named_parameters())
    base = {n: named[n].detach() for n in index}
    idx = {n: i.to(device=base[n].device, dtype=torch.long) for n, i in index.items()}
    glob = {n: torch.zeros(len(i), dtype=base[n].dtype, device=base[n].device) for n, i in idx.items()}
    total_w = float(sum(c[0] for c in clients))
    if not clients or total_w <= 0:
        raise UnlearningError("no client with data to train the adapter on")
    keep_rows = torch.tensor(rows_of(classes, set(classes) - set(forget_labels)), device=device)
    forget_rows = torch.zeros(len(classes), dtype=torch.bool, device=device)
    forget_rows[rows_of(classes, forget_labels)] = True
    # Per client: does its forget data need each item's own label (samples, clients)? Forget data of
    # forgotten labels only keeps the label term exactly as it always was.
    own_label = [_holds_kept_labels(c[2] if len(c) > 2 else None, forget_labels) for c in clients]
    steps, loss_mean = 0, float("nan")
    for r in range(rounds):
        acc = {n: torch.zeros_like(v, dtype=torch.float64) for n, v in glob.items()}
        tot, cnt = 0.0, 0
        for c, (w, data, *rest) in enumerate(clients):
            forget = rest[0] if rest and rest[0] is not None and len(rest[0]) else None
            vals = {n: v.clone().requires_grad_(True) for n, v in glob.items()}
            opt = make_optimizer(vals.values(), optimizer, lr)
            fbatches = _cycle(forget, batch_size, seed_of(seed, r, c, "forget")) if forget is not None else None
            for e in range(local_epochs):
                for x, y in data.batches(batch_size, shuffle=True, seed=seed_of(seed, r, c, e)):
                    n_r = len(y)
                    if fbatches is not None:
                        xf, yf = next(fbatches)
                        x = torch.cat([x, xf])
                    x, y = x.to(device), y.to(device)
                    eff = {n: base[n].reshape(-1).index_add(0, idx[n], vals[n]).view_as(base[n]) for n in idx}
                    z = functional_call(model, eff, (x,))
                    loss = F.cross_entropy(z[:n_r], label_rows(y, classes))
                    if fbatches is not None:
                        zf = z[n_r:]
                        if own_label[c]:
                            rows = label_rows(yf.to(device), classes, strict=False)
                            loss = loss + forget_weight * overwrite_term(zf, rows, forget_rows)
                        else:
                            loss = loss + forget_weight * (zf.logsumexp(1) - zf[:, keep_rows].logsumexp(1)).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    steps += 1
                    tot += float(loss.detach()) * n_r
                    cnt += n_r
            for n, v in vals.items():
                acc[n] += (w / total_w) * v.detach().double()
        glob = {n: acc[n].to(glob[n].dtype) for n in glob}
        loss_mean = tot / max(cnt, 1)
        if progress:
            progress(r, loss_mean)
    return glob, {"loss": loss_mean, "steps": steps}


def overwrite_term(z: Tensor, rows: Tensor, forget_rows: Tensor) -> Tensor:
    """Mean of ``-log(1 - p(x))`` where ``p(x)`` is the probability of the forgotten-label rows
    (``forget_rows``, a bool mask over the head) plus each item's own row (``rows``, -1 for a label
    the head lacks). An item with every row suppressed has nothing to move to and adds 0."""
    suppress = forget_rows.unsqueeze(0).repeat(len(z), 1)
    has = rows >= 0
    suppress[has.nonzero().flatten(), rows[has]] = True
    kept = z.masked_fill(suppress, float("-inf")).logsumexp(1)
    total = z.logsumexp(1)
    return (total - torch.where(torch.isinf(kept), total, kept)).mean()


def _holds_kept_labels(forget: Any, forget_labels: Sequence[int]) -> bool:
    """Whether ``forget`` (a ``Data`` or None) has items whose label is not a forgotten label."""
    if forget is None or not len(forget):
        return False
    return bool((~torch.isin(forget.targets, torch.tensor(list(forget_labels), dtype=torch.long))).any())


def _cycle(data: Any, batch_size: int, seed: int):
    """Endless shuffled batches of ``data`` (a new order every pass)."""
    k = 0
    while True:
        yield from data.batches(batch_size, shuffle=True, seed=seed + k)
        k += 1


MERGE_HELP = ("store the result as full weights (base + delta merged) instead of a separate delta blob: "
              "'umig purge' can then delete the original weights; revert still restores them until then")


def as_update(ctx: NodeContext, model: nn.Module, delta: Mapping[str, tuple[Tensor, Tensor]], merge: bool,
              metrics: dict[str, Any]) -> NodeUpdate:
    """A sparse delta as its own blob (default), or merged into full weights exactly as the store applies it."""
    if not merge:
        return NodeUpdate(delta=delta, metrics={**metrics, "stored_as": "delta"})
    return NodeUpdate(state=delta_mod.merged(model.state_dict(), delta), metrics={**metrics, "stored_as": "merged"})


# ------------------------------------------------------------------ layers
def layers(model: nn.Module) -> list[tuple[str, list[str]]]:
    """``(module name, [its own parameter names])`` of every parameterised, non-normalisation module."""
    out = []
    for mname, mod in model.named_modules():
        if isinstance(mod, _NORMS):
            continue
        own = [f"{mname}.{p}" if mname else p for p, _ in mod.named_parameters(recurse=False)]
        if own:
            out.append((mname, own))
    return out


def layer_l1(a: Mapping[str, Tensor], b: Mapping[str, Tensor], lays: Sequence[tuple[str, list[str]]], *,
             head: str | None = None, rows: tuple[Tensor, Tensor] | None = None) -> list[float]:
    """Eq. 12 per layer: sum of |a - b| over the layer's tensors.

    Heads of different sizes (an incremental step) are compared on the rows of the labels both
    have: ``rows = (rows in a, rows in b)`` for tensors under ``head``. Other tensors whose shapes
    differ are skipped.
    """
    out = []
    for _, params in lays:
        d = 0.0
        for p in params:
            if p not in a or p not in b:
                continue
            x, y = a[p], b[p]
            if x.shape != y.shape and head is not None and rows is not None and p.startswith(head + "."):
                if x.dim() == 0 or x.shape[1:] != y.shape[1:]:
                    continue
                x, y = x[rows[0]], y[rows[1]]
            if x.shape == y.shape:
                d += float((x.double() - y.double()).abs().sum())
        out.append(d)
    return out


def rank_layers(lays: Sequence[tuple[str, list[str]]], diff: Sequence[float]) -> list[int]:
    """Indices of ``lays`` by decreasing ``Diff``; ties go to later layers (the paper finds those most sensitive)."""
    return sorted(range(len(lays)), key=lambda i: (-diff[i], -i))


def masks(named: Mapping[str, Tensor], params: Iterable[str], keep: float, seed: int) -> dict[str, Tensor]:
    """Seeded random masks: ``max(1, round(keep * numel))`` sorted flat indices per tensor."""
    out = {}
    for p in params:
        n = named[p].numel()
        m = min(n, max(1, int(round(keep * n))))
        g = torch.Generator().manual_seed(seed_of(seed, p))
        out[p] = torch.sort(torch.randperm(n, generator=g)[:m]).values
    return out


# ----------------------------------------------------------------- sources
def forget_origin(ctx: NodeContext) -> str:
    """Where a node's forget samples come from, for the metrics: own data, clients or ancestors."""
    if forget_source_names(ctx.snapshots, ctx.node.name, ctx.holds_forget)[1]:
        return "ancestors"
    return "own data" if ctx.node.data_ref is not None else "clients"


# ------------------------------------------------------------------- FUSED
class Fused(NodeUnlearner):
    """FUSED: critical-layer sparse adapters trained on the retain data (FedAvg over clients)."""

    name = "fused"
    description = ("FUSED: critical layers by L1 distance along the lineage, seeded sparse adapters "
                   "(W + mask*A) trained on retain data; the adapter is a separate blob, revert is bit-exact.")
    kinds = frozenset({"labels", "samples", "client"})
    params: Mapping[str, Param] = {
        "k": Param(2, "number of critical layers that get an adapter"),
        "keep": Param(0.05, "fraction of a critical layer's entries the adapter may change"),
        "rounds": Param(5, "federated rounds of adapter training (FedAvg of adapters over clients)"),
        "local_epochs": Param(2, "local epochs per round (also the CLI round of a node without parents)"),
        "lr": Param(0.01, "adapter learning rate"),
        "optimizer": Param("adam", "adapter optimizer", choices=OPTIMIZERS),
        "batch_size": Param(64, "batch size"),
        "objective": Param("overwrite", "paper: cross-entropy on retain data only (Eq. 14); overwrite: plus "
                           "-log(1 - p_forgotten) on the same clients' forget inputs, p_forgotten being the "
                           "forgotten labels' or, for samples and clients, the sample's own label's "
                           "probability (see module docs)", choices=OBJECTIVES),
        "forget_weight": Param(1.0, "weight of the overwrite term (objective=overwrite)"),
        "merge": Param(False, MERGE_HELP),
    }

    def check(self, job: Job) -> None:
        p = job.params
        if not (isinstance(p["k"], int) and p["k"] >= 1):
            raise UnlearningError(f"method 'fused': k must be a positive integer, got {p['k']!r}")
        if not 0 < p["keep"] <= 1:
            raise UnlearningError(f"method 'fused': keep must be in (0, 1], got {p['keep']!r}")
        for n in ("rounds", "local_epochs", "batch_size"):
            if p[n] < 1:
                raise UnlearningError(f"method 'fused': {n} must be >= 1, got {p[n]!r}")
        if not p["lr"] > 0:
            raise UnlearningError(f"method 'fused': lr must be > 0, got {p['lr']!r}")
        check_data(job, self.name, retain=True)

    # -- Critical Layer Identification
    def _diffs(self, ctx: NodeContext, model: nn.Module, lays: list[tuple[str, list[str]]],
               own: Mapping[str, Tensor], clients: list[tuple[str, float, Any]]) -> tuple[list[float], str]:
        p = ctx.params
        parents = ctx.parents()
        total = [0.0] * len(lays)
        if parents:
            ws = [float(w) if w is not None else float(max(ctx.snapshots[n].data_size, 1)) for n, _, w in parents]
            s = sum(ws) or 1.0
            for (pname, _, _), w in zip(parents, ws):  # one parent state at a time: memory stays flat
                d = layer_l1(ctx.state_of(pname), own, lays, head=ctx.head,
                             rows=shared_rows(ctx.snapshots[pname].classes, ctx.classes))
                total = [t + (w / s) * x for t, x in zip(total, d)]
            return total, "parents"
        # No parents: one local round on the node's retain data stands in for the clients' round.
        local = ctx.model()
        seed = seed_of(ctx.seed, ctx.node.name, "cli")
        if ctx.node.recipe:
            recipe = Recipe.from_json({**ctx.node.recipe, "epochs": int(p["local_epochs"]), "seed": seed})
        else:
            recipe = Recipe(optimizer=p["optimizer"], lr=float(p["lr"]), epochs=int(p["local_epochs"]),
                            batch_size=int(p["batch_size"]), seed=seed)
        data = clients[0][2]
        fit(local, data, recipe, ctx.classes, ctx.device, capture=False)  # a probe round: no FIM wanted
        after = {k: v.detach() for k, v in local.state_dict().items()}
        return layer_l1(after, own, lays), "local round"

    def unlearn_node(self, ctx: NodeContext) -> NodeUpdate:
        t0 = time.perf_counter()
        p = ctx.params
        model = ctx.model()
        own = {k: v.detach() for k, v in model.state_dict().items()}
        lays = layers(model)
        clients, by_peers = training_sources(ctx)
        diff, how = self._diffs(ctx, model, lays, own, clients)
        order = rank_layers(lays, diff)
        chosen = order[: p["k"]]
        t_cli = time.perf_counter() - t0
        named = dict(model.named_parameters())
        index = masks(named, [q for i in chosen for q in lays[i][1]], p["keep"], seed_of(ctx.seed, ctx.node.name))
        forget_from = "none"
        if p["objective"] == "paper":
            parts: list[tuple] = [(w, d) for _, w, d in clients]
        else:
            # Peers train beside the node's own forget data (what it must stop predicting), not theirs.
            own_f = {} if by_peers else {n: ctx.forget_data(n) for n, _, _ in clients}
            own_f = {n: d for n, d in own_f.items() if d is not None and len(d)}
            if own_f:
                forget_from = "own data" if ctx.node.data_ref is not None else "clients"
                parts = [(w, d, own_f.get(n)) for n, w, d in clients]
            else:
                # A node whose training clients hold nothing to forget (an inherited node; an aggregate
                # whose forgotten clients left no retain data; peers): the forget samples that stand for
                # it (its own, its forgotten clients', or its ancestors') go beside every client's retain data.
                anc = forget_sources(ctx)
                fallback = concat([d for _, _, d in anc]) if anc else None
                forget_from = forget_origin(ctx) if anc else "none"
                parts = [(w, d, fallback) for _, w, d in clients]
        values, stats = train_sparse(
            model, index, parts, ctx.classes, rounds=p["rounds"], local_epochs=p["local_epochs"], lr=p["lr"],
            optimizer=p["optimizer"], batch_size=p["batch_size"], seed=seed_of(ctx.seed, ctx.node.name, "train"),
            device=ctx.device, forget_labels=ctx.labels, forget_weight=p["forget_weight"])
        delta = delta_mod.sparse(index, values)
        entries = sum(int(i.numel()) for i in index.values())
        nonzero = delta_mod.entries(delta)
        total = param_count(model)
        n_clients = len(clients)
        # Communication happens where the adapter travels between a server and clients: a data-less
        # (aggregate) node. A node trained on its own data keeps the adapter local.
        federated = ctx.node.data_ref is None
        return as_update(ctx, model, delta, p["merge"], {
            "critical_layers": [lays[i][0] for i in chosen],
            "layer_ranking": [[lays[i][0], round(diff[i], 6)] for i in order],
            "cli_from": how,
            "forget_from": forget_from,
            "retain_from": "peers" if by_peers else ("own data" if ctx.node.data_ref is not None else "clients"),
            "clients": n_clients,
            "adapter_params": entries,
            "adapter_nonzero": nonzero,
            "params_changed": nonzero,
            "params_total": total,
            "adapter_fraction": nonzero / total if total else 0.0,
            # Down + up per participating client per round, against the same rounds with full models.
            "comm_params": 2 * entries * n_clients * p["rounds"] if federated else 0,
            "comm_params_full": 2 * total * n_clients * p["rounds"] if federated else 0,
            "train_loss": stats["loss"],
            "seconds_cli": t_cli,
            "seconds_train": time.perf_counter() - t0 - t_cli,
        })
