"""Find what to forget: attribute a model's behaviour to the samples, nodes and clients of its lineage.

A deletion request names its data; an incident does not. ``umig attribute NODE --inputs FILE``
takes query inputs that show a behaviour (triggered images classified as the target, say), the
label the behaviour is about (``--labels``; else the file's ``y``; else the node's own
prediction) and scores the training samples of every ancestor of NODE that trained on data of
its own (NODE included), using the checkpoints the store already keeps: for each such ancestor
the weights it started from (its parents', taken over as training took them over: rows by label
id, the FedAvg of several parents with its own classes) and the weights it ended with (its current
version). Scores then add up by sample (an item of a dataset's whole source, wherever it was
trained on), by client (every node trained on the same data, as ``umig unlearn --client``
counts it: one client across rounds) or by node. Nothing is written to the store.

Scoring methods sit in :data:`METHODS` (name -> function of a :class:`Lineage`, giving each
ancestor's per-item scores; higher means more responsible for the behaviour):

* ``tracin`` (default): TracIn (Pruthi et al. 2020) over the lineage's checkpoints, on the
  classifier head, cosine-normalised, each item scored by its strongest query. The head's per-sample
  gradient has a closed form, ``(softmax - onehot) (x) features``
  (:func:`umig.evaluate.head_gradients`), so a checkpoint costs one forward pass over the
  ancestor's data and no backward pass. The gradient is taken in the head's centred
  parametrisation (features less their mean at that checkpoint; the same function), so what every
  item shares because features are non-negative does not count as similarity.
* ``tracin-mean``: the same with the mean over the queries (the influence on their mean loss).
* ``tracin-uncentred``: cosine TracIn on the head's weight and bias as stored, mean over the queries.
* ``tracin-plain``: plain TracIn (no normalisation) on the head as stored, mean over the queries.
* ``tracin-all``: cosine TracIn on every parameter (``torch.func`` per-sample gradients; slower).
* ``spectral``: spectral signatures (Tran et al. 2018) on the queried node's penultimate features:
  per target label, every ancestor's items of that label are projected on the top singular
  direction of their centred features, oriented so the queries lie on the positive side.

Every item's score is then shifted by the median item's (the typical training item scores 0),
so a client's or node's total counts what stands out, not how many items it holds.
The benchmark behind the default is ``benchmarks/bench_attribution.py`` (README, "Finding what
to forget").
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from umig import graph as G
from umig.arch import build_model
from umig.data import Data, DataRef, save_subset, source_positions
from umig.errors import ArchError, DataError, UmigError
from umig.evaluate import (
    head_gradients,
    head_tracin,
    head_tracin_pairs,
    outputs,
    predict_labels,
)
from umig.forget import source_fingerprint
from umig.heads import label_rows
from umig.store import NodeSnapshot, SqlStore, load_state
from umig.train import fedavg, inherit_weights

__all__ = [
    "BY",
    "DEFAULT_METHOD",
    "METHODS",
    "Attribution",
    "Holder",
    "HolderScores",
    "Lineage",
    "attribute",
    "output_paths",
    "read_inputs",
]

BY = ("sample", "client", "node")
BATCH = 512  # items per forward pass
GRAD_CHUNK = 128  # items per per-sample-gradient pass of tracin-all
PAIR_CHUNK = 2048  # training items per (items x queries) score matrix


# ------------------------------------------------------------------ what a scoring method sees
@dataclass
class Holder:
    """An ancestor of the queried node that trained on data of its own, with its two checkpoints."""

    name: str
    client: str  # the first node, in lineage order, trained on the same data
    data: Data  # its own training data
    source: str  # the whole source its data indexes (a data reference umig unlearn --data takes)
    dataset: str  # that source's fingerprint (how forget sets name a dataset)
    positions: np.ndarray  # each item's index in the source (int64)
    start: nn.Module | None  # the weights it started from; None for a root (its initialisation is not kept)
    end: nn.Module  # the weights it ended with (its current version)
    classes: tuple[int, ...]
    head: str

    def checkpoints(self) -> list[nn.Module]:
        """Its start (when known) and end models."""
        return [m for m in (self.start, self.end) if m is not None]


@dataclass
class Lineage:
    """One attribution request as a scoring method sees it."""

    node: str
    model: nn.Module  # the queried node's current weights
    classes: tuple[int, ...]
    head: str
    inputs: Tensor  # (m, ...) the queries, each once per target label
    targets: Tensor  # (m,) the label each query's behaviour is about
    holders: list[Holder]
    batch_size: int = BATCH

    def query_batches(self) -> Iterator[tuple[Tensor, Tensor]]:
        """The queries as ``(x, y)`` batches, y = the target label."""
        for i in range(0, len(self.inputs), self.batch_size):
            yield self.inputs[i : i + self.batch_size], self.targets[i : i + self.batch_size]


Scorer = Callable[[Lineage], dict[str, np.ndarray]]


# ------------------------------------------------------------------ scoring methods
def _linear_head(model: nn.Module, head: str) -> nn.Linear:
    """The model's head module, which the closed-form gradient needs to be an ``nn.Linear``."""
    layer = model.get_submodule(head)
    if not isinstance(layer, nn.Linear):
        raise ArchError(f"head '{head}' is a {type(layer).__name__}, not nn.Linear: the closed-form head "
                        "gradient needs a linear classifier (use --method spectral)")
    return layer


def _head_factors(model: nn.Module, batches: Any, classes: Sequence[int], head: str) -> tuple[Tensor, Tensor]:
    """``(g, h)`` of :func:`umig.evaluate.head_gradients` for every item of ``batches`` at ``model``."""
    bias = _linear_head(model, head).bias is not None
    logits, feats, labels = outputs(model, batches, classes, head)
    g, h, _ = head_gradients(logits, feats, labels, classes, bias=bias)
    return g, h


def _tracin_head(ctx: Lineage, *, normalise: bool, centre: bool, strongest: bool) -> dict[str, np.ndarray]:
    """TracIn on the head over each holder's checkpoints: per item, the sum over its checkpoints of
    the per-pair scores, then the strongest query (``strongest``) or the mean over the queries."""
    queries: dict[int, tuple[Tensor, Tensor]] = {}  # per checkpoint (shared starts are computed once)
    out: dict[str, np.ndarray] = {}
    for h in ctx.holders:
        factors = []
        for model in h.checkpoints():
            if id(model) not in queries:
                queries[id(model)] = _query_factors(ctx, model, h.classes, h.head)
            qg, qh = queries[id(model)]
            g, f = _head_factors(model, h.data.batches(ctx.batch_size), h.classes, h.head)
            if centre:
                f, qh = _centred(f, qh, _linear_head(model, h.head).bias is not None)
            factors.append((g, f, qg, qh))
        if not strongest:
            total = sum((head_tracin(g, f, qg, qh, normalise=normalise) for g, f, qg, qh in factors),
                        torch.zeros(len(h.data), dtype=torch.float64))
        else:
            parts = []
            for i in range(0, len(h.data), PAIR_CHUNK):  # (items x queries) pairs, a chunk of items at a time
                pairs = sum(head_tracin_pairs(g[i : i + PAIR_CHUNK], f[i : i + PAIR_CHUNK], qg, qh, normalise=normalise)
                            for g, f, qg, qh in factors)
                parts.append(pairs.max(dim=1).values)
            total = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        out[h.name] = total.numpy()
    return out


def _centred(f: Tensor, qf: Tensor, bias: bool) -> tuple[Tensor, Tensor]:
    """The head's weight gradient in its centred parametrisation, ``W (h - mu) + (b + W mu)``: the
    features less their mean ``mu`` over the items trained on at that checkpoint, without the bias
    column. The head computes the same function; what the gradients share only because every
    feature is non-negative (after a ReLU) no longer counts as similarity."""
    d = f.shape[1] - int(bias)
    mu = f[:, :d].mean(0)
    return f[:, :d] - mu, qf[:, :d] - mu


def _query_factors(ctx: Lineage, model: nn.Module, classes: Sequence[int], head: str) -> tuple[Tensor, Tensor]:
    """The queries' head-gradient factors at ``model`` (a query whose label it has no row for gets g = 0)."""
    return _head_factors(model, ctx.query_batches(), classes, head)


def tracin(ctx: Lineage) -> dict[str, np.ndarray]:
    """Cosine TracIn over every ancestor's start and end checkpoints, on the head's weight in its
    centred parametrisation (:func:`_centred`); each item scores its strongest query."""
    return _tracin_head(ctx, normalise=True, centre=True, strongest=True)


def tracin_mean(ctx: Lineage) -> dict[str, np.ndarray]:
    """The same, with each item's mean over the queries (its TracIn influence on the queries' mean loss)."""
    return _tracin_head(ctx, normalise=True, centre=True, strongest=False)


def tracin_uncentred(ctx: Lineage) -> dict[str, np.ndarray]:
    """Cosine TracIn over the same checkpoints on the head's weight and bias as stored, mean over the queries."""
    return _tracin_head(ctx, normalise=True, centre=False, strongest=False)


def tracin_plain(ctx: Lineage) -> dict[str, np.ndarray]:
    """Plain TracIn (gradient dot products, no normalisation) on the head as stored, mean over the queries."""
    return _tracin_head(ctx, normalise=False, centre=False, strongest=False)


def _per_sample_grads(model: nn.Module, x: Tensor, rows: Tensor) -> Tensor:
    """(n, P) cross-entropy gradients of every parameter, one row per item (eval mode, via torch.func)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss(p: dict[str, Tensor], xi: Tensor, ri: Tensor) -> Tensor:
        z = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(z.reshape(1, -1).float(), ri.unsqueeze(0))

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, rows)
    return torch.cat([t.reshape(len(x), -1) for t in grads.values()], dim=1).double()


def _unit_grads(model: nn.Module, batches: Any, classes: Sequence[int]) -> Iterator[Tensor]:
    """Unit-norm per-sample gradients, chunk by chunk; items without a head row get zeros."""
    for x, y in batches:
        for i in range(0, len(x), GRAD_CHUNK):
            xb, yb = x[i : i + GRAD_CHUNK], y[i : i + GRAD_CHUNK]
            rows = label_rows(yb, classes, strict=False)
            out = torch.zeros(len(xb), sum(p.numel() for p in model.parameters()), dtype=torch.float64)
            ok = rows >= 0
            if ok.any():
                g = _per_sample_grads(model, xb[ok], rows[ok])
                out[ok] = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)
            yield out


def tracin_all(ctx: Lineage) -> dict[str, np.ndarray]:
    """Cosine-normalised TracIn on every parameter over the same checkpoints (per-sample gradients)."""
    queries: dict[int, Tensor] = {}
    out: dict[str, np.ndarray] = {}
    for h in ctx.holders:
        total = torch.zeros(len(h.data), dtype=torch.float64)
        for model in h.checkpoints():
            model.eval()
            if id(model) not in queries:
                chunks = list(_unit_grads(model, ctx.query_batches(), h.classes))
                queries[id(model)] = torch.cat(chunks).mean(0) if chunks else torch.zeros(0, dtype=torch.float64)
            q = queries[id(model)]
            scores = [g @ q for g in _unit_grads(model, h.data.batches(ctx.batch_size), h.classes)]
            if scores:
                total += torch.cat(scores)
        out[h.name] = total.numpy()
    return out


def spectral(ctx: Lineage) -> dict[str, np.ndarray]:
    """Spectral signatures on the queried node's penultimate features, oriented by the queries.

    Per target label: the items of that label in every ancestor's data (each client's data once),
    centred; the top singular direction of that matrix, signed so the queries' mean projection is
    positive; each item's score is its projection in units of the projections' standard deviation.
    Items of other labels score 0. (Tran et al. square the projection and assume the poison is a
    small minority of its label; the queries' side needs neither.)
    """
    _, q_feats, _ = outputs(ctx.model, ctx.query_batches(), ctx.classes, ctx.head)
    by_client: dict[str, tuple[Tensor, Tensor]] = {}  # client -> (features, labels) of its items
    for h in ctx.holders:
        if h.client not in by_client:
            _, feats, labels = outputs(ctx.model, h.data.batches(ctx.batch_size), ctx.classes, ctx.head)
            by_client[h.client] = (feats.double(), labels)
    scores = {c: torch.zeros(len(lab), dtype=torch.float64) for c, (_, lab) in by_client.items()}
    for t in torch.unique(ctx.targets).tolist():
        parts = {c: labels == t for c, (_, labels) in by_client.items()}
        feats = torch.cat([by_client[c][0][m] for c, m in parts.items()])
        if len(feats) < 2:
            continue
        mean = feats.mean(0)
        centred = feats - mean
        v = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        if float(((q_feats[ctx.targets == t].double() - mean) @ v).mean()) < 0:
            v = -v
        proj = centred @ v
        proj = proj / proj.std().clamp(min=1e-12)
        start = 0
        for c, m in parts.items():
            n = int(m.sum())
            scores[c][m] = proj[start : start + n]
            start += n
    return {h.name: scores[h.client].numpy() for h in ctx.holders}


METHODS: dict[str, Scorer] = {
    "tracin": tracin,
    "tracin-mean": tracin_mean,
    "tracin-uncentred": tracin_uncentred,
    "tracin-plain": tracin_plain,
    "tracin-all": tracin_all,
    "spectral": spectral,
}
DEFAULT_METHOD = "tracin"


# ------------------------------------------------------------------ results
@dataclass
class HolderScores:
    """One ancestor's scores: one per item of its own data."""

    name: str
    client: str
    source: str
    dataset: str
    positions: np.ndarray
    labels: np.ndarray
    scores: np.ndarray


@dataclass
class Attribution:
    """The scores of one request, and the rankings by sample, client or node built from them."""

    node: str
    method: str
    targets: tuple[int, ...]  # the label ids the queries' behaviour is about
    queries: int  # query inputs (each scored once per target label when --labels names several)
    checkpoints: int  # distinct checkpoints the method read
    holders: list[HolderScores]
    baseline: float  # the median item's raw score, subtracted from every score
    seconds: float
    _samples: list[dict[str, Any]] | None = field(default=None, repr=False)

    def by_client(self) -> list[dict[str, Any]]:
        """Every client (nodes trained on the same data), highest total score first."""
        rows: dict[str, dict[str, Any]] = {}
        for h in self.holders:
            row = rows.setdefault(h.client, {"client": h.client, "nodes": [], "data": h.source,
                                             "samples": len(h.scores), "score": 0.0})
            row["nodes"].append(h.name)
            row["score"] += float(h.scores.sum())
        return _ranked(rows.values(), "client")

    def by_node(self) -> list[dict[str, Any]]:
        """Every ancestor with data, highest total score first."""
        return _ranked(({"node": h.name, "client": h.client, "samples": len(h.scores),
                         "score": float(h.scores.sum())} for h in self.holders), "node")

    def by_sample(self) -> list[dict[str, Any]]:
        """Every training sample (an item of a dataset's whole source, summed over the nodes that
        trained on it), highest score first; ties by dataset, then index."""
        if self._samples is None:
            self._samples = self._rank_samples()
        return self._samples

    def _rank_samples(self) -> list[dict[str, Any]]:
        datasets = list(dict.fromkeys(h.dataset for h in self.holders))
        keys, scores, labels, which = [], [], [], []
        for d, dataset in enumerate(datasets):
            hs = [h for h in self.holders if h.dataset == dataset]
            pos = np.concatenate([h.positions for h in hs])
            uniq, first, inv = np.unique(pos, return_index=True, return_inverse=True)
            keys.append(uniq)
            scores.append(np.bincount(inv, weights=np.concatenate([h.scores for h in hs]), minlength=len(uniq)))
            labels.append(np.concatenate([h.labels for h in hs])[first])
            which.append(np.full(len(uniq), d))
        index, score, label, ds = (np.concatenate(a) for a in (keys, scores, labels, which))
        order = np.lexsort((index, ds, -score))
        source = {h.dataset: h.source for h in reversed(self.holders)}  # the first holder's name for it
        rows = []
        for i in order:
            dataset = datasets[int(ds[i])]
            rows.append({"data": source[dataset], "dataset": dataset, "index": int(index[i]), "label": int(label[i]),
                         "score": float(score[i])})
        for r, row in enumerate(rows, start=1):
            row["rank"] = r
        return rows

    def sample_nodes(self, rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
        """The nodes that trained on each sample row."""
        out: list[list[str]] = [[] for _ in rows]
        for h in self.holders:
            idx = [i for i, r in enumerate(rows) if r["dataset"] == h.dataset]
            if not idx:
                continue
            hit = np.isin(np.array([rows[i]["index"] for i in idx], dtype=np.int64), h.positions)
            for i, ok in zip(idx, hit):
                if ok:
                    out[i].append(h.name)
        return out

    def ranking(self, by: str, top: int | None = None) -> list[dict[str, Any]]:
        """The rows for ``by`` (sample, client or node), at most ``top``; sample rows name their
        client and nodes."""
        if by not in BY:
            raise UmigError(f"--by must be one of {', '.join(BY)}, got '{by}'")
        rows = {"sample": self.by_sample, "client": self.by_client, "node": self.by_node}[by]()
        rows = [dict(r) for r in (rows if top is None else rows[:top])]
        if by == "sample":
            client = {h.name: h.client for h in self.holders}
            for row, nodes in zip(rows, self.sample_nodes(rows)):
                row["client"] = client[nodes[0]] if nodes else None
                row["nodes"] = nodes
        return rows

    def top_samples(self, k: int) -> list[tuple[str, np.ndarray]]:
        """The ``k`` highest-scoring samples as ``(source, int64 indices in rank order)`` per dataset."""
        picked: dict[str, list[int]] = {}
        source: dict[str, str] = {}
        for row in self.by_sample()[:k]:
            picked.setdefault(row["dataset"], []).append(row["index"])
            source[row["dataset"]] = row["data"]
        return [(source[d], np.asarray(v, dtype=np.int64)) for d, v in picked.items()]

    def leading_run(self, client: str | None = None) -> int:
        """How many of the top-ranked samples, in a row, ``client`` (default: the top-ranked client)
        trained on: the ranking down to the first sample of another client. With one poisoning
        client, the other clients' data shows how high clean samples score, so this is a cut that
        needs no ``k``."""
        client = client if client is not None else self.by_client()[0]["client"]
        own: dict[str, np.ndarray] = {}
        for h in self.holders:
            if h.client == client:
                own[h.dataset] = np.union1d(own.get(h.dataset, np.zeros(0, np.int64)), h.positions)
        if not own:
            raise UmigError(f"'{client}' is not a client of {self.node}'s lineage")
        rows = self.by_sample()
        held = np.zeros(len(rows), dtype=bool)
        for dataset, positions in own.items():
            mine = np.array([r["dataset"] == dataset for r in rows], dtype=bool)
            index = np.array([r["index"] for r in rows], dtype=np.int64)
            held |= mine & np.isin(index, positions)
        misses = np.flatnonzero(~held)
        return int(misses[0]) if misses.size else len(rows)

    def write_samples(self, path: str | os.PathLike[str], k: int) -> list[dict[str, Any]]:
        """Write the ``k`` top samples as int64 index files ``umig unlearn --samples FILE --data REF``
        takes: ``path`` for one dataset, else one file per dataset (:func:`output_paths`).
        Returns ``{"path", "data", "count"}`` per file."""
        groups = self.top_samples(k)
        paths = output_paths(path, len(groups))
        return [{"path": save_subset(p, idx), "data": src, "count": len(idx)}
                for p, (src, idx) in zip(paths, groups)]

    def to_json(self, by: str, top: int | None = None) -> dict[str, Any]:
        return {"node": self.node, "method": self.method, "by": by, "labels": list(self.targets),
                "queries": self.queries, "checkpoints": self.checkpoints, "baseline": self.baseline,
                "seconds": round(self.seconds, 4),
                "ranking": self.ranking(by, top)}


def _ranked(rows: Any, key: str) -> list[dict[str, Any]]:
    out = sorted(rows, key=lambda r: (-r["score"], r[key]))
    for r, row in enumerate(out, start=1):
        row["rank"] = r
    return out


def output_paths(path: str | os.PathLike[str], count: int) -> list[Path]:
    """Where ``count`` index files go: ``path`` itself for one; ``STEM-1.SUFFIX``, ``STEM-2.SUFFIX``,
    ... for several (one per dataset). The suffix must be ``.npy`` or ``.safetensors``."""
    p = Path(path)
    if p.suffix.lower() not in (".npy", ".safetensors"):
        raise DataError(f"-o {path}: write a .npy or .safetensors index file")
    if count <= 1:
        return [p]
    return [p.with_name(f"{p.stem}-{i}{p.suffix}") for i in range(1, count + 1)]


# ------------------------------------------------------------------ inputs
def read_inputs(path: str | os.PathLike[str]) -> tuple[Tensor, Tensor | None]:
    """Query inputs from a safetensors file: ``x`` (float, one row per input), optional ``y`` (labels)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"inputs file {path} not found")
    try:
        tensors = load_file(str(p))
    except Exception as e:  # safetensors raises several types for corrupt files
        raise DataError(f"inputs file {path} is not a readable safetensors file ({type(e).__name__})") from None
    if "x" not in tensors:
        raise DataError(f"inputs file {path} has no tensor 'x' (found {', '.join(sorted(tensors)) or 'none'})")
    x, y = tensors["x"], tensors.get("y")
    if not x.is_floating_point() or x.dim() < 2:
        raise DataError(f"inputs file {path}: 'x' must be a float tensor with one row per input "
                        f"(got {x.dtype} {tuple(x.shape)})")
    if len(x) == 0:
        raise DataError(f"inputs file {path} holds no inputs ('x' has 0 rows)")
    if y is not None and (y.is_floating_point() or y.dim() != 1 or len(y) != len(x)):
        raise DataError(f"inputs file {path}: 'y' must hold one integer label per input "
                        f"(got {y.dtype} {tuple(y.shape)} for {len(x)} inputs)")
    return x, (y.long() if y is not None else None)


def _check_inputs(x: Tensor, snap: NodeSnapshot, model: nn.Module, input_shape: Sequence[int] | None) -> None:
    """Refuse inputs the node's model cannot take, in one line."""
    if input_shape and tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"inputs have shape {tuple(x.shape[1:])} per item but node '{snap.name}' takes "
                        f"{tuple(input_shape)}")
    try:
        with torch.no_grad():
            z = model(x[:1].to(next(iter(model.parameters())).dtype))
    except Exception as e:  # a shape mismatch surfaces as RuntimeError/ValueError from deep in the model
        raise DataError(f"inputs of shape {tuple(x.shape[1:])} do not fit node '{snap.name}' "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if z.reshape(1, -1).shape[1] != len(snap.classes):
        raise DataError(f"node '{snap.name}' gives {z.reshape(1, -1).shape[1]} outputs per input for "
                        f"{len(snap.classes)} classes")


# ------------------------------------------------------------------ building the lineage
def _start_model(snap: NodeSnapshot, end_state: Mapping[str, Tensor], state_of: Callable[[str], dict[str, Tensor]],
                 snaps: Mapping[str, NodeSnapshot]) -> nn.Module | None:
    """The weights ``snap``'s node started training from, as ``train.retrain_node`` builds them:
    the FedAvg of several parents with its classes, else its first parent's weights taken over by
    label id; tensors the parent lacks (a transfer fork's new head) come from its end weights."""
    if not snap.parents:
        return None
    parents = [(state_of(p), float(w) if w is not None else float(max(snaps[p].data_size, 1)), snaps[p].classes)
               for p, _rel, w in snap.parents]
    model = build_model(snap.arch, end_state)
    if len(parents) > 1 and all(tuple(c) == tuple(snap.classes) for *_, c in parents):
        try:
            model.load_state_dict(fedavg([s for s, _, _ in parents], [w for _, w, _ in parents]))
            return model.eval()
        except (ValueError, RuntimeError):
            pass  # parents of another architecture: take the first one's weights, as below
    state, _, pcls = parents[0]
    inherit_weights(model, state, pcls, snap.classes, snap.head, strict=False)
    return model.eval()


def _holders(store: SqlStore, order: Sequence[str], snaps: Mapping[str, NodeSnapshot]) -> list[Holder]:
    states: dict[str, dict[str, Tensor]] = {}

    def state_of(name: str) -> dict[str, Tensor]:
        if name not in states:
            states[name] = load_state(store.blobs, snaps[name].blobs(), owner=name)
        return states[name]

    data: dict[str, tuple[Data, str, str, np.ndarray, str]] = {}  # data key -> (data, source, fp, positions, client)
    starts: dict[str, nn.Module | None] = {}  # (parents, classes, arch) -> the shared start model
    out: list[Holder] = []
    for name in order:
        snap = snaps[name]
        if snap.data_ref is None:
            continue
        key = json.dumps([snap.data_ref, snap.data_fingerprint], sort_keys=True)
        if key not in data:
            own = store.node_data(name)
            assert own is not None
            ref = DataRef.from_json(snap.data_ref)
            _, positions = source_positions(ref)
            data[key] = (own, ref.source, source_fingerprint(ref.source), positions, name)
        own, source, fp, positions, client = data[key]
        end_state = state_of(name)
        start_key = json.dumps([snap.parents, snap.classes, snap.arch, snap.head], sort_keys=True, default=str)
        if start_key not in starts:
            starts[start_key] = _start_model(snap, end_state, state_of, snaps)
        out.append(Holder(name=name, client=client, data=own, source=source, dataset=fp, positions=positions,
                          start=starts[start_key], end=build_model(snap.arch, end_state).eval(),
                          classes=tuple(snap.classes), head=snap.head))
    return out


def attribute(store: SqlStore, node: str, inputs: str | os.PathLike[str] | tuple[Tensor, Tensor | None], *,
              labels: Sequence[int] | None = None, method: str = DEFAULT_METHOD,
              batch_size: int = BATCH) -> Attribution:
    """Score the training samples of ``node``'s lineage for the behaviour ``inputs`` show.

    ``inputs``: a safetensors file (``x``, optional ``y``) or ``(x, y or None)``. The label each
    query's behaviour is about: every one of ``labels`` when given, else ``y``, else the node's own
    prediction. ``method``: a name in :data:`METHODS`. Reads the store, never writes it.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise UmigError(f"unknown attribution method '{method}' (known: {', '.join(METHODS)})")
    info = store.node(node)  # NotFoundError for an unknown node
    g = store.graph()
    lineage = nx.ancestors(g, node) | {node}
    order = [n for n in G.bfs_order(g) if n in lineage]
    snaps = store.snapshots(order)
    if not any(snaps[n].data_ref is not None for n in order):
        raise UmigError(f"node '{node}' has no ancestor with training data of its own (nor data itself): "
                        "nothing to attribute its behaviour to")
    x, y = read_inputs(inputs) if isinstance(inputs, (str, os.PathLike)) else inputs
    if len(x) == 0:
        raise DataError("no query inputs were given")
    snap = snaps[node]
    model = build_model(snap.arch, load_state(store.blobs, snap.blobs(), owner=node)).eval()
    x = x.to(next(iter(model.parameters())).dtype)
    n_queries = len(x)
    _check_inputs(x, snap, model, info.input_shape)
    if labels is not None:
        targets = torch.as_tensor(sorted({int(v) for v in labels}), dtype=torch.long)
        if targets.numel() == 0:
            raise UmigError("--labels names no label")
        x, targets = x.repeat(len(targets), *([1] * (x.dim() - 1))), targets.repeat_interleave(len(x))
    elif y is not None:
        targets = y.long()
    else:
        targets = predict_labels(model, [(x[i : i + batch_size], torch.zeros(len(x[i : i + batch_size]),
                                 dtype=torch.long)) for i in range(0, len(x), batch_size)], snap.classes)[0]
    missing = sorted(set(targets.tolist()) - set(snap.classes))
    if missing:
        raise UmigError(f"label(s) {', '.join(map(str, missing))} are not among node '{node}''s classes "
                        f"({', '.join(map(str, snap.classes))})")
    holders = _holders(store, order, snaps)
    ctx = Lineage(node=node, model=model, classes=tuple(snap.classes), head=snap.head, inputs=x, targets=targets,
                  holders=holders, batch_size=batch_size)
    with torch.no_grad():  # torch.func.grad (tracin-all) is a transform: an outer no_grad does not stop it
        scores = METHODS[method](ctx)
    checkpoints = len({id(m) for h in holders for m in h.checkpoints()}) if method.startswith("tracin") else 1
    raw = {h.name: np.asarray(scores[h.name], dtype=np.float64) for h in holders}
    baseline = float(np.median(np.concatenate(list(raw.values()))))
    result = [HolderScores(name=h.name, client=h.client, source=h.source, dataset=h.dataset, positions=h.positions,
                           labels=h.data.targets.numpy(), scores=raw[h.name] - baseline) for h in holders]
    return Attribution(node=node, method=method, targets=tuple(sorted(set(targets.tolist()))), queries=n_queries,
                       checkpoints=checkpoints, holders=result, baseline=baseline, seconds=time.perf_counter() - t0)

