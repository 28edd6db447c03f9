"""Ingest: turn what a user hands over into a validated node, then let the store write it.

Builds the architecture and loads the weights strictly, detects the classifier head,
resolves the data reference (with its fingerprint and label counts) and computes the
model FIM, all before anything is written. ``Store.add_node`` (the facade) and the
lineage recorders call :func:`add_node` (through ``umig.unlearning.add_node``, which
supplies the catch-up).

The lineage guard (:func:`superseded`): every edge records the parent version the node was
derived from. A node derived from a version that a live unlearning operation superseded, or
whose own data holds samples or labels a live operation forgot, is refused with one line
naming the operation, unless the caller passes ``catch_up``: then it is recorded and
``catch_up`` brings it up to date in the same transaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from umig import arch as A
from umig import data as D
from umig import fisher as F
from umig.errors import GraphError, NotFoundError, SupersededError, UmigError
from umig.forget import source_fingerprint
from umig.store import FRAMEWORKS, RELATIONS, NodeInfo, OperationRef, SqlStore, split_head
from umig.train import Recipe

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@/+-]{0,199}$")
# Rebuilding from the spec and the dummy forward that finds the head depend only on the
# architecture and the state's keys/shapes/dtypes: done once per combination (bulk recording).
_VALIDATED: dict[tuple, tuple[A.HeadInfo, nn.Module | None]] = {}
# A parent as add_node takes it: "NAME", "NAME@VERSION", "NAME:WEIGHT", "NAME@VERSION:WEIGHT",
# (name, weight) or (name, weight, version).
ParentSpec = str | tuple[str, float | None] | tuple[str, float | None, int | None]


@dataclass(frozen=True)
class Superseded:
    """Why a node being added holds what a live unlearning operation forgot."""

    operation: OperationRef
    reason: str  # "parent", "samples" or "labels"
    detail: str  # e.g. "derived from fl/r2/global v0", "holds 20 forgotten sample(s) of ..."
    count: int = 0  # items of the node's data it concerns (samples, labels)
    hint: str = ""  # what to do instead, e.g. "derive it from fl/r2/global@1"


# Called inside add_node's transaction once the node is written: brings it up to date with the
# operations in the list (umig.unlearning.catch_up_node). Without one, such a node is refused.
CatchUp = Callable[[SqlStore, str, Sequence[Superseded]], Any]


def add_node(
    store: SqlStore,
    name: str,
    weights: nn.Module | Mapping[str, torch.Tensor] | str | Path,
    arch: Any,
    *,
    arch_args: Mapping[str, Any] | None = None,
    parents: Sequence[ParentSpec] = (),
    relation: str | None = None,
    framework: str = "other",
    data: Any = None,
    data_ref: str | None = None,
    subset: str | None = None,
    only_labels: str | Sequence[int] | None = None,
    classes: Sequence[int] | None = None,
    head: str | None = None,
    input_shape: Sequence[int] | None = None,
    fim: F.FIM | None = None,
    compute_fim: bool = True,
    exact_fim: bool = False,
    meta: Mapping[str, Any] | None = None,
    recipe: Any = None,
    fisher_batch: int = 256,
    device: str | torch.device | None = None,
    catch_up: CatchUp | None = None,
) -> NodeInfo:
    """Record a model node (version 0) with its edges, data reference and model FIM.

    ``weights`` is an ``nn.Module``, a state dict or a path (``.safetensors``,
    or ``.pt`` read with ``weights_only=True``). ``data`` is a reference string,
    a ``umig.data.Data``, or a ``torch.utils.data.Dataset`` with ``data_ref``
    naming it. ``fim`` is a model FIM already computed (e.g. during training by
    ``umig.fisher.FisherCapture``). Without one, a module that :func:`umig.train.fit` just trained on
    this same data (weights unchanged since, same head and classes, the store's Fisher settings) is
    recorded with the FIM that training captured from its last epoch (:func:`umig.fisher.kept_fim`);
    otherwise, or with ``exact_fim``, ``compute_fim`` computes it with one forward pass over the data
    (the exact FIM of the final weights), or for a data-less node as the mean of its parents' FIMs.
    Everything is validated before anything is written.

    ``parents`` name the version each was derived from as ``NAME@VERSION`` (or a 3-tuple); without
    one, the version this store object last loaded of it (``SqlStore.loaded``), else its live version.
    A node derived from a superseded version, or whose data holds what a live operation forgot, raises
    :class:`SupersededError` (nothing written) unless ``catch_up`` is given (see the module docstring).
    """
    if not _NAME_RE.match(name or ""):
        raise UmigError(f"invalid node name {name!r} (letters, digits and _.:@/+- only)")
    if framework not in FRAMEWORKS:
        raise UmigError(f"unknown framework '{framework}' (choose from {', '.join(FRAMEWORKS)})")
    if relation is not None and relation not in RELATIONS:
        raise UmigError(f"unknown relation '{relation}' (choose from {', '.join(RELATIONS)})")
    # One query for the name and every parent as written (recorders add nodes inside training loops).
    written = [p for p in parents if isinstance(p, str)]
    written += [p[0] for p in parents if isinstance(p, tuple) and p and isinstance(p[0], str)]
    live = store.live_versions([name, *written])
    if name in live:
        raise GraphError(f"node '{name}' already exists")
    # An existing node's full name wins over NAME@VERSION and NAME:WEIGHT (names may contain '@' and
    # ':', e.g. 'ckpt:3').
    parent_specs = [_parse_parent(store, p, known=live) for p in parents]
    split = [p for p, _, _ in parent_specs if p not in live]
    if split:
        live.update(store.live_versions(split))
    for p, _, v in parent_specs:
        if p == name:
            raise GraphError(f"node '{name}' cannot be its own parent (cycle)")
        if p not in live:
            raise NotFoundError(f"unknown parent node '{p}'")
        if v is not None:
            store.version(p, v)  # NotFoundError: node 'p' has no version v
    if len({p for p, _, _ in parent_specs}) != len(parent_specs):
        raise GraphError(f"node '{name}' lists a parent twice")
    parent_list = [(p, w) for p, w, _ in parent_specs]
    relation = relation or _default_relation(framework, len(parent_list))

    spec = arch if isinstance(arch, A.ArchSpec) else A.ArchSpec(str(arch), dict(arch_args or {}))
    if not isinstance(weights, nn.Module):
        weights = A.load_state_dict_file(weights) if isinstance(weights, (str, Path)) else dict(weights)
    # Rebuilding from the spec and the dummy forward that finds the head depend only on the
    # architecture and the state's keys/shapes/dtypes: done once per combination (bulk recording).
    given = weights.state_dict() if isinstance(weights, nn.Module) else weights
    vkey = (json.dumps(spec.to_json(), sort_keys=True, default=str), head,
            tuple(input_shape) if input_shape else None, isinstance(weights, nn.Module),
            tuple((k, tuple(v.shape), v.dtype) for k, v in given.items()))
    validated = _VALIDATED
    hit = validated.get(vkey)
    if hit is not None:
        hinfo, template = hit
        state = {k: v.detach().cpu() for k, v in given.items()}
        model = weights if isinstance(weights, nn.Module) else template
        if model is template and (fim is None and compute_fim) and (data is not None or data_ref is not None):
            A.load_weights(model, state)  # the FIM below runs this node's weights
    elif isinstance(weights, nn.Module):
        model = weights
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        rebuilt = spec.build()
        A.load_weights(rebuilt, state)  # the spec must be able to rebuild this module later
    else:
        state = weights
        model = spec.build()
        A.load_weights(model, state)
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if hit is None:
        if input_shape is None:
            input_shape = getattr(model, "input_shape", None)
        hinfo = A.find_head(model, head=head, input_shape=tuple(input_shape) if input_shape else None)
        # Reuse only where the state is stored exactly as given (same keys and dtypes as the model's).
        exact = isinstance(weights, nn.Module) or (
            state.keys() == given.keys() and all(state[k].dtype == given[k].dtype for k in state))
        if exact:
            if len(validated) >= 64:
                validated.pop(next(iter(validated)))
            validated[vkey] = (hinfo, None if isinstance(weights, nn.Module) else spec.build())
    cls = tuple(int(c) for c in classes) if classes is not None else tuple(range(hinfo.out_features))
    if len(cls) != hinfo.out_features:
        raise UmigError(
            f"--classes has {len(cls)} labels but head '{hinfo.name}' has {hinfo.out_features} outputs"
        )
    if len(set(cls)) != len(cls):
        raise UmigError("--classes lists a label twice")

    dataset = _data_arg(data, data_ref, subset, only_labels)
    counts: dict[int, int] = {}
    fingerprint = None
    ref_json = None
    if dataset is not None:
        counts = {int(k): int(v) for k, v in dataset.label_counts().items()}
        unknown = sorted(set(counts) - set(cls))
        if unknown:
            raise UmigError(
                f"data of node '{name}' has label(s) {','.join(map(str, unknown))} that its head cannot predict"
            )
        fingerprint = D.fingerprint(dataset)
        ref_json = dataset.ref.to_json() if dataset.ref is not None else None
        if ref_json is None:
            raise UmigError(f"data of node '{name}' needs a reference string (data_ref=...) to be recorded")

    model_fim = None
    if fim is not None:  # computed by the caller, e.g. during training (umig.fisher.FisherCapture)
        if fim.feature_dim != hinfo.in_features:
            raise UmigError(f"given FIM of node '{name}' has feature width {fim.feature_dim}, "
                            f"head '{hinfo.name}' has {hinfo.in_features}")
        want = store.fisher_settings()
        if (fim.kind, fim.temperature) != (want["kind"], want["temperature"]):
            raise UmigError(f"given FIM of node '{name}' is {fim.kind} at temperature {fim.temperature:g}; "
                            f"this store uses {want['kind']} at {want['temperature']:g}")
        model_fim = fim.aligned(cls)
    elif compute_fim:
        if dataset is not None and len(dataset):
            per_label = keeps_label_stats(store, len(cls), hinfo.in_features)
            if not exact_fim and isinstance(weights, nn.Module):
                model_fim = _trained_fim(store, weights, hinfo.name, cls, dataset, fingerprint, per_label)
            if model_fim is None:
                model_fim = F.head_fisher(
                    model, hinfo.name, dataset.batches(fisher_batch, device=device), cls,
                    **store.fisher_settings(), device=device, per_label=per_label,
                )
        elif parent_list:
            model_fim = mean_parent_fim(store, parent_list, cls)

    body, head_t = split_head(state, hinfo.name)
    recipe_json = _recipe_json(recipe)
    with store.transaction():  # the guard reads the live lineage under the lock that the write holds
        live = store.live_versions(p for p, _, _ in parent_specs)
        gone = [p for p, _, _ in parent_specs if p not in live]  # removed by a concurrent writer
        if gone:
            raise NotFoundError(f"unknown parent node '{gone[0]}'")
        derived = [(p, w, v if v is not None else store.loaded.get(p, live[p])) for p, w, v in parent_specs]
        found = superseded(store, [(p, v) for p, _, v in derived], dataset, counts, live=live)
        if found and catch_up is None:
            raise SupersededError(refusal(name, found, dataset))
        info = store.insert_node(
            name, arch=spec.to_json(), head=hinfo.name, classes=cls, input_shape=hinfo.input_shape,
            data_ref=ref_json, data_fingerprint=fingerprint, label_counts=counts, framework=framework,
            meta=dict(meta or {}), recipe=recipe_json, parents=derived, relation=relation,
            body=body, head_tensors=head_t, fim=model_fim,
        )
        if found and catch_up is not None:
            catch_up(store, name, found)
            info = store.node(name)
    return info


def superseded(store: SqlStore, parents: Sequence[tuple[str, int]], data: D.Data | None,
               label_counts: Mapping[int, int], *, live: Mapping[str, int] | None = None) -> list[Superseded]:
    """What a live unlearning operation forgot that a node would hold: ``parents`` (name, version
    derived from) at superseded versions, and (``data``, with its ``label_counts``) forgotten labels
    and forgotten samples of its dataset; oldest operation first. ``live`` (the parents' live versions,
    when the caller read them already) spares a query for each parent derived from its live version."""
    found: list[Superseded] = []
    for p, v in parents:
        found += [Superseded(op, "parent", f"derived from {p} v{v}", hint=f"derive it from {p}@{store.live_version(p)}")
                  for op in store.superseded_by(p, v, current=None if live is None else live.get(p))]
    if data is not None and label_counts:
        by_op: dict[OperationRef, list[int]] = {}
        for op, label in store.label_forgets(label_counts):
            by_op.setdefault(op, []).append(label)
        for op, labels in by_op.items():
            n = sum(label_counts.get(x, 0) for x in labels)
            found.append(Superseded(op, "labels", f"holds {n} sample(s) of forgotten label(s) "
                                                  f"{D.format_labels(labels)}", n))
    if data is not None and data.ref is not None and store.sample_forgets():
        fp = source_fingerprint(data.ref.source)
        forgets = store.sample_forgets(dataset=fp)
        if forgets:
            _, positions = D.source_positions(data.ref)
            for f in forgets:
                n = int(np.isin(positions, store.forgotten_indices(f)).sum())
                if n:
                    what = f"client {f.client}'s data" if f.client else f.source
                    found.append(Superseded(f.operation, "samples", f"holds {n} forgotten sample(s) of {what}", n))
    return sorted(found, key=lambda s: s.operation.created)


def refusal(name: str, found: Sequence[Superseded], data: D.Data | None = None) -> str:
    """The one line that refuses a node (``found`` from :func:`superseded`, non-empty)."""
    first = found[0]
    op = first.operation
    who = f"operation {op.id}" + (f" (ticket {op.ticket})" if op.ticket else "")
    if first.reason == "parent":
        text = f"node '{name}' is {first.detail}, which {who} superseded; {first.hint}"
    else:
        text = f"data of node '{name}' {first.detail} that {who} forgot; leave them out"
        if data is not None and data.ref is not None:
            text += (f" ('umig forgotten --data \"{data.ref}\" -o keep.npy' writes the rest, for "
                     f"--data {data.ref.source} --subset keep.npy)")
    others = sorted({s.operation.id for s in found} - {op.id})
    if others:
        text += f" (also superseded by {', '.join(others[:3])}{', ...' if len(others) > 3 else ''})"
    return text + ", or add it with --catch-up to unlearn it on the spot"

def _data_arg(data: Any, data_ref: str | None, subset: str | None, only_labels: Any):
    if data is None:
        if data_ref is None:
            if subset or only_labels:
                raise UmigError("--subset/--only-labels need --data")
            return None
        data = data_ref
    if isinstance(data, str):
        return D.resolve(D.parse_ref(data, subset=subset, only_labels=only_labels))
    if isinstance(data, D.Data):
        return data
    if isinstance(data, torch.utils.data.Dataset):
        ref = D.parse_ref(data_ref) if data_ref else None
        return D.from_dataset(data, ref=ref)
    raise UmigError(f"unsupported data argument of type {type(data).__name__}")

def keeps_label_stats(store: SqlStore, classes: int, features: int) -> bool:
    """Per-label FIM sums cost ``K x K x d`` floats per node: kept up to the store's
    ``fisher.label_stats_max`` elements (default ``umig.fisher.LABEL_STATS_MAX``, 1,048,576: 4 MiB)."""
    cap = int(store.config().get("fisher.label_stats_max", str(F.LABEL_STATS_MAX)))
    return classes * classes * features <= cap


def _trained_fim(store: SqlStore, model: nn.Module, head: str, classes: tuple[int, ...], dataset: D.Data,
                 fingerprint: str, per_label: bool) -> F.FIM | None:
    """The FIM training captured for ``model`` (:func:`umig.fisher.kept_fim`) when it stands for this node:
    same weights, head, classes and Fisher settings, taken over this node's data (the same object, or data
    with the same fingerprint), with per-label sums if the store keeps them. None otherwise: the caller
    then runs the exact pass."""
    kept = F.kept_fim(model)
    if kept is None or kept.head != head or kept.fim.classes != classes:
        return None
    want = store.fisher_settings()
    if (kept.fim.kind, kept.fim.temperature) != (want["kind"], want["temperature"]):
        return None
    if kept.data is not dataset and (not isinstance(kept.data, D.Data) or len(kept.data) != len(dataset)
                                     or D.fingerprint(kept.data) != fingerprint):
        return None
    if per_label and not kept.fim.has_label_stats:
        return None
    return kept.fim if per_label else F.without_label_stats(kept.fim)


def mean_parent_fim(store: SqlStore, parents: Sequence[tuple[str, float | None]], classes: Sequence[int],
                    fim_of: Callable[[str], F.FIM | None] | None = None) -> F.FIM | None:
    """An aggregate's model FIM: its parents' FIMs (``fim_of(parent)``, default their live ones) averaged
    with the edge weights, or the parents' data sizes where an edge has none. None if a parent has none."""
    fims, weights = [], []
    for p, w in parents:
        pf = store.fim(p) if fim_of is None else fim_of(p)
        if pf is None:
            return None
        fims.append(pf)
        weights.append(w if w is not None else max(store.node(p).data_size, 1))
    return F.weighted_mean(fims, weights, classes=classes)


def _parse_parent(store: SqlStore, p: ParentSpec, known: Container[str] = ()) -> tuple[str, float | None, int | None]:
    """``(name, weight, version)`` of a parent: an existing node's full name wins, then ``:WEIGHT``
    (a number) and ``@VERSION`` (digits) are split off, in that order. ``known`` names nodes the caller
    has just looked up."""
    if isinstance(p, tuple):
        if len(p) not in (2, 3) or not isinstance(p[0], str):
            raise UmigError(f"a parent is NAME, (name, weight) or (name, weight, version), got {p!r}")
        try:
            weight = float(p[1]) if p[1] is not None else None
            version = int(p[2]) if len(p) == 3 and p[2] is not None else None
        except (TypeError, ValueError):
            raise UmigError(f"parent {p!r}: the weight must be a number and the version a whole number") from None
        return p[0], weight, version
    if not isinstance(p, str):
        raise UmigError(f"a parent is a node name or a tuple, got {type(p).__name__}")
    if p in known or store.has_node(p):
        return p, None, None
    name, weight = p, None
    head, sep, tail = p.rpartition(":")
    if sep and _is_float(tail):
        name, weight = head, float(tail)
    if store.has_node(name):
        return name, weight, None
    base, sep, version = name.rpartition("@")
    if sep and version.isascii() and version.isdigit():
        return base, weight, int(version)
    if sep and store.has_node(base):
        raise UmigError(f"malformed parent '{p}': the version after '@' must be a whole number "
                        "(NAME@VERSION, optionally NAME@VERSION:WEIGHT)")
    return name, weight, None


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _default_relation(framework: str, n_parents: int) -> str:
    if framework == "fl" and n_parents > 1:
        return "aggregate"
    if framework == "ddp" and n_parents > 1:
        return "sync"
    return {"il": "increment", "tl": "transfer"}.get(framework, "finetune")


def _recipe_json(recipe: Any) -> dict | None:
    if recipe is None:
        return None
    if isinstance(recipe, Mapping):
        return Recipe.from_json(dict(recipe)).to_json()  # validates keys
    if isinstance(recipe, (str, Path)):
        return Recipe.from_file(recipe).to_json()
    return recipe.to_json()
