"""``umig verify``: judge an operation against exact retraining, metric by metric and under attack.

For every node an operation changed, the unlearned version is compared with the *reference*: the
``retrain`` result for the same forget set, computed once by the unlearning engine
(:func:`umig.unlearning.reference`) and kept with the operation (``SqlStore.commit_reference``),
never live; a second verify reuses it and ``purge`` deletes it with the rest.

Both models of a node are measured the same way (the math is in :mod:`umig.evaluate`):

* ``forget_acc`` / ``retain_acc``: accuracy on the forgotten / retained items of the node's effective
  training data (its own and its ancestors', restricted to its classes);
* ``heldout_acc``: held-out accuracy on the retained labels (all labels for sample and client sets);
  ``heldout_forget_acc``: on the forgotten labels;
* ``mia_efficacy``: SalUn's MIA efficacy (share of forget items a confidence classifier, trained on
  retained members vs held-out non-members, calls non-members);
* attacks: ``relearn_acc`` (a few forget items, a fixed number of Adam steps), ``relearn_reset_acc``
  (the same after resetting the forgotten labels' head rows: what the body alone gives back; label
  sets only), ``probe_acc`` (a linear
  probe on the head's input features) and ``head_edit_acc`` (forgotten rows given the retained rows'
  mean bias and norm; label sets only). Each is measured on held-out items of the forgotten labels,
  or, for sample sets, on a held-back half of the forget items.

The verdict per node is the gap (unlearned minus reference, in percentage points) per metric and
the Avg. Gap, SalUn's mean |gap| over forget, retain and held-out accuracy and MIA efficacy.
"""

from __future__ import annotations

import copy
import json
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from umig import graph as G
from umig import unlearning
from umig.arch import build_model
from umig.data import Data, DataRef, parse_ref, resolve, source_positions
from umig.data import verify as verify_data
from umig.errors import UnlearningError
from umig.evaluate import (
    accuracy_of,
    edit_head,
    linear_probe_accuracy,
    mia_efficacy,
    outputs,
    relearn,
    true_label_confidence,
)
from umig.forget import ForgetSet, SampleSet, source_fingerprint
from umig.forget import samples as sample_set
from umig.heads import rows_of
from umig.store import SqlStore, load_state

# SalUn's Avg. Gap averages these four; the attack metrics are reported gap by gap.
AVG_GAP_METRICS = ("forget_acc", "retain_acc", "heldout_acc", "mia_efficacy")
METRICS = (*AVG_GAP_METRICS, "heldout_forget_acc", "relearn_acc", "relearn_reset_acc", "probe_acc", "head_edit_acc")
# Held-out data used when --data is not given, by the training data's source.
DEFAULT_HELDOUT = {"sklearn:digits?split=train": "sklearn:digits?split=test"}
REFERENCE_METHOD = "retrain"


@dataclass(frozen=True)
class Settings:
    """How the attacks run (fixed, so two verifications of one operation compare)."""

    relearn_k: int = 5  # forget items per forgotten label (label sets) or in all (sample sets)
    relearn_steps: int = 30
    relearn_lr: float = 3e-3
    probe_items: int = 3000  # most training items the linear probe fits on
    seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _NodeData:
    """What both models of one node are measured on."""

    train: Data
    forget: Tensor  # bool per train item: in the forget set
    heldout: Data  # restricted to the node's classes
    relearn_idx: Tensor  # train items the relearning attacker holds
    probe_idx: Tensor  # train items the probe fits on
    attack_eval: Data  # what the attacks are scored on


def verify(store: SqlStore, operation: str, *, data: str | None = None, samples: Sequence[np.ndarray] = (),
           max_gap: float | None = None, settings: Settings = Settings(), workers: int | None = None,
           device: str = "auto", progress: Callable[[str, int, int], None] | None = None) -> dict[str, Any]:
    """Verify ``operation`` against retraining; store and return the verification (see module docstring).

    ``data``: held-out data reference (default: the held-out split of sklearn digits when the nodes
    trained on its train split). ``samples``: the index arrays of an operation that forgot samples by
    index (its record keeps only their digest). ``max_gap``: ``passed`` is False when any node's
    Avg. Gap exceeds it (points).
    """
    t0 = time.perf_counter()
    if max_gap is not None and not max_gap >= 0:
        raise UnlearningError(f"--max-gap must be at least 0 points, got {max_gap:g}")
    op = store.operation(operation)
    if op["state"] == "purged":
        # Purge deleted the reference with the rest; a new one would outlive the purge.
        raise UnlearningError(f"operation {operation} was purged (its reference went with it); verify an "
                              "operation before purging it (the verdict stays in 'umig history')")
    nodes = [n["name"] for n in op["nodes"]]
    version = {n["name"]: n["version_after"] for n in op["nodes"]}
    snaps = store.snapshots(nodes)
    no_recipe = [n for n in nodes if snaps[n].data_ref is not None and snaps[n].recipe is None]
    if no_recipe:
        more = f" and {len(no_recipe) - 5} more" if len(no_recipe) > 5 else ""
        raise UnlearningError(f"verifying needs recorded recipes for {', '.join(no_recipe[:5])}{more} "
                              "(the reference retrains them without the forget set)")
    forget = recorded_forget(store, op, samples)
    heldout_ref = data or default_heldout(store)
    heldout = resolve(parse_ref(heldout_ref))

    refs = store.references(operation)
    reused = all(n in refs for n in nodes)
    t_ref = time.perf_counter()
    if not reused:
        unlearning.reference(store, operation, forget, nodes=nodes, policy=op.get("policy", "first"),
                             method=REFERENCE_METHOD, workers=workers, device=device, progress=progress)
        refs = store.references(operation)
    ref_s = time.perf_counter() - t_ref

    dev = _metric_device(device)
    sets = _node_data(store, forget, nodes, heldout, settings)
    out_nodes = []
    for i, name in enumerate(nodes):
        if progress:
            progress("verify", i, len(nodes))
        snap = snaps[name]
        unlearned = store.load_model(name, version[name], device="cpu")
        reference = build_model(snap.arch, load_state(store.blobs, refs[name], owner=name))
        row: dict[str, Any] = {"name": name, "role": op["nodes"][i]["role"], "version": version[name]}
        for key, model in (("unlearned", unlearned), ("reference", reference)):
            row[key] = measure(model, snap.head, snap.classes, forget, sets[name], settings, device=dev)
        row["gap"] = {m: _gap(row["unlearned"].get(m), row["reference"].get(m)) for m in METRICS}
        row["avg_gap"] = avg_gap(row["gap"])
        out_nodes.append(row)
    if progress:
        progress("verify", len(nodes), len(nodes))
    gaps = [r["avg_gap"] for r in out_nodes if r["avg_gap"] is not None]
    worst = max(gaps) if gaps else None
    result = {
        "operation": operation,
        "method": op["method"],
        "forget": op["forget"],
        "reference": "reused" if reused else "computed",
        "reference_method": REFERENCE_METHOD,
        "reference_s": round(ref_s, 3),
        "heldout": heldout_ref,
        "settings": settings.to_json(),
        "avg_gap_metrics": list(AVG_GAP_METRICS),
        "nodes": out_nodes,
        "avg_gap": round(float(np.mean(gaps)), 3) if gaps else None,
        "max_avg_gap": worst,
        "max_gap": max_gap,
        "passed": None if max_gap is None else bool(worst is None or worst <= max_gap),
        "created": time.time(),
    }
    result["wall_s"] = round(time.perf_counter() - t0, 3)
    store.set_verification(operation, result)
    return result


# ------------------------------------------------------------------ the forget set
def recorded_forget(store: SqlStore, op: Mapping[str, Any], samples: Sequence[np.ndarray] = ()) -> ForgetSet:
    """Rebuild an operation's forget set from its record: labels as recorded, clients from their nodes'
    data, raw sample sets from ``samples`` (index arrays), each checked against the recorded digest."""
    record = op["forget"]
    raw = [s for s in record.get("samples", []) if "client" not in s]
    clients = [s["client"] for s in record.get("samples", []) if "client" in s]
    given = [np.asarray(a) for a in samples]
    if raw and not given:
        n = sum(int(s["count"]) for s in raw)
        raise UnlearningError(f"operation {op['operation']} forgot {n} sample(s) by index and its record keeps "
                              "only their digest: give the same --samples FILE to verify it")
    if given and not raw:
        raise UnlearningError(f"operation {op['operation']} forgot no samples by index: --samples does not apply")
    sources = _sources_by_fingerprint(store, {s["dataset"] for s in raw})
    sets: list[SampleSet] = []
    for idx in given:
        found = None
        for rec in raw:
            if rec["dataset"] not in sources:
                raise UnlearningError(f"no node's data comes from dataset {rec['dataset'][:12]} that operation "
                                      f"{op['operation']} forgot samples of")
            s = sample_set(idx, sources[rec["dataset"]])
            if s.digest == rec["digest"]:
                found = s
                break
        if found is None:
            raise UnlearningError(f"the --samples indices do not match operation {op['operation']}'s record "
                                  "(different digest): give the file it was run with")
        sets.append(found)
    if len(sets) != len(raw):
        raise UnlearningError(f"operation {op['operation']} forgot {len(raw)} sample set(s); {len(sets)} were given")
    fs = unlearning.forget_set(store, ForgetSet(labels=tuple(record.get("labels", [])), samples=tuple(sets)), clients)
    recorded = {s["client"]: s["digest"] for s in record.get("samples", []) if "client" in s}
    for s in fs.samples:
        if s.client is not None and recorded.get(s.client) != s.digest:
            raise UnlearningError(f"client {s.client}'s data no longer matches operation {op['operation']}'s record")
    return fs


def _sources_by_fingerprint(store: SqlStore, wanted: set[str]) -> dict[str, str]:
    """Dataset fingerprint -> a source reference some node's data comes from (for the fingerprints asked)."""
    out: dict[str, str] = {}
    if not wanted:
        return out
    for ref, _fp in store.data_refs().values():
        src = DataRef.from_json(ref).source
        fp = source_fingerprint(src)
        if fp in wanted:
            out.setdefault(fp, src)
    return out


def default_heldout(store: SqlStore) -> str:
    """The held-out reference matching the nodes' training data, when there is a known one."""
    sources = {DataRef.from_json(ref).source for ref, _ in store.data_refs().values()}
    known = {DEFAULT_HELDOUT.get(s) for s in sources}
    if len(known) == 1 and None not in known:
        return next(iter(known))  # type: ignore[return-value]
    raise UnlearningError("give held-out data with --data REF (the nodes' training data has no known "
                          "held-out split)")


# ------------------------------------------------------------------ data per node
def _node_data(store: SqlStore, fs: ForgetSet, nodes: Sequence[str], heldout: Data,
               settings: Settings) -> dict[str, _NodeData]:
    """Each node's effective training data with its forget mask, its held-out data, and the items the
    attacks use. Nodes sharing a data lineage share the concatenation."""
    g = store.graph()
    refs = store.data_refs()
    own = {n: json.dumps(ref, sort_keys=True) for n, (ref, _) in refs.items() if n in g}
    holder = {k: n for n, k in reversed(list(own.items()))}
    lineage = G.data_lineage(g, own)
    parts: dict[str, tuple[Data, np.ndarray]] = {}

    def part(key: str) -> tuple[Data, np.ndarray]:
        if key not in parts:
            ref_json, fp = refs[holder[key]]
            ref = DataRef.from_json(ref_json)
            d = verify_data(ref, fp) if fp else resolve(ref)
            if fs.samples:
                _, pos = source_positions(ref)
                parts[key] = (d, fs.mask(d.targets.numpy(), source_fingerprint(ref.source), pos))
            else:
                parts[key] = (d, fs.mask(d.targets.numpy(), None, None))
        return parts[key]

    out: dict[str, _NodeData] = {}
    for name in nodes:
        classes = tuple(g.nodes[name]["classes"])
        pieces = [part(k) for k in lineage[name]]
        if not pieces:
            raise UnlearningError(f"node '{name}' has no training data of its own or its ancestors to verify on")
        whole = pieces[0][0] if len(pieces) == 1 else Data.concat([d for d, _ in pieces])
        mask = torch.from_numpy(np.concatenate([m for _, m in pieces]))
        keep = torch.isin(whole.targets, torch.tensor(sorted(classes), dtype=torch.long))
        train, forget = whole.select(keep), mask[keep]
        out[name] = _attack_sets(name, train, forget, heldout.filter_labels(keep=classes), fs, settings)
    return out


def _attack_sets(name: str, train: Data, forget: Tensor, heldout: Data, fs: ForgetSet,
                 settings: Settings) -> _NodeData:
    """Pick, seeded by the node's name, the attacker's few forget items, the probe's training items and
    the items the attacks are scored on (identical for both models of the node)."""
    rng = np.random.RandomState((settings.seed + zlib.crc32(name.encode())) & 0x7FFFFFFF)
    forget_idx = np.flatnonzero(forget.numpy())
    y = train.targets.numpy()
    if fs.labels:
        # The attacker holds k items per forgotten label; scored on held-out items of those labels.
        relearn_idx = np.concatenate([
            rng.permutation(forget_idx[y[forget_idx] == lab])[:settings.relearn_k] for lab in fs.labels
        ] or [np.zeros(0, np.int64)])
        probe_pool = np.arange(len(train))
        attack_eval = heldout.filter_labels(keep=fs.labels)
    else:
        # Sample sets: half the forget items are held back to score on; the attacker and the probe
        # see the other half (and the probe all retained items).
        shuffled = rng.permutation(forget_idx)
        held_back = np.sort(shuffled[: len(shuffled) // 2])
        seen = shuffled[len(shuffled) // 2:]
        relearn_idx = seen[: settings.relearn_k]
        probe_pool = np.setdiff1d(np.arange(len(train)), held_back)
        attack_eval = train.select(torch.from_numpy(held_back))
    probe_idx = np.sort(rng.permutation(probe_pool)[: settings.probe_items])
    return _NodeData(train=train, forget=forget, heldout=heldout,
                     relearn_idx=torch.from_numpy(np.sort(relearn_idx).astype(np.int64)),
                     probe_idx=torch.from_numpy(probe_idx.astype(np.int64)), attack_eval=attack_eval)


# ------------------------------------------------------------------ measuring one model
def measure(model: nn.Module, head: str, classes: Sequence[int], fs: ForgetSet, nd: _NodeData,
            settings: Settings, *, device: str = "cpu") -> dict[str, float | None]:
    """Every metric of one model on one node's data (fractions in [0, 1]; None where a set is empty)."""
    z_tr, f_tr, y_tr = outputs(model, nd.train.batches(512), classes, head, device=device)
    z_ho, _, y_ho = outputs(model, nd.heldout.batches(512), classes, head, device=device)
    forget, retain = nd.forget, ~nd.forget
    ho_forget = torch.isin(y_ho, torch.tensor(fs.labels, dtype=torch.long))
    conf_tr = true_label_confidence(z_tr, y_tr, classes)
    conf_ho = true_label_confidence(z_ho, y_ho, classes)
    m: dict[str, float | None] = {
        "forget_acc": accuracy_of(z_tr[forget], y_tr[forget], classes),
        "retain_acc": accuracy_of(z_tr[retain], y_tr[retain], classes),
        "heldout_acc": accuracy_of(z_ho[~ho_forget], y_ho[~ho_forget], classes),
        "heldout_forget_acc": accuracy_of(z_ho[ho_forget], y_ho[ho_forget], classes) if fs.labels else None,
        "mia_efficacy": mia_efficacy(conf_tr[retain], conf_ho[~ho_forget], conf_tr[forget]),
    }
    # Attacks, all scored on the same items.
    def ev_batches() -> Any:
        return nd.attack_eval.batches(512)

    m["relearn_acc"] = m["relearn_reset_acc"] = None
    if len(nd.attack_eval) and len(nd.relearn_idx):
        few = nd.train.select(nd.relearn_idx)
        x_few, y_few = next(iter(few.batches(len(few))))
        # Two tries: relearn the model as it is, and (label sets) after resetting the forgotten rows,
        # which reaches past anything a head did to those rows (a very low bias defeats a fixed step
        # budget) into what the body still knows.
        forgotten_rows = rows_of(classes, fs.labels)
        tries = {"relearn_acc": ()} | ({"relearn_reset_acc": forgotten_rows} if forgotten_rows else {})
        for key, reset in tries.items():
            attacked = relearn(model, x_few, y_few, classes, steps=settings.relearn_steps, lr=settings.relearn_lr,
                               seed=settings.seed, device=device, head=head, reset_rows=reset)
            z, _, y = outputs(attacked, ev_batches(), classes, head, device=device)
            m[key] = accuracy_of(z, y, classes)
    if len(nd.attack_eval):
        _, f_ev, y_ev = outputs(model, ev_batches(), classes, head, device=device)
        m["probe_acc"] = linear_probe_accuracy(f_tr[nd.probe_idx], y_tr[nd.probe_idx], f_ev, y_ev, seed=settings.seed)
    else:
        m["probe_acc"] = None
    m["head_edit_acc"] = _head_edit_accuracy(model, head, classes, fs, ev_batches, device) \
        if fs.labels and len(nd.attack_eval) else None
    return m


def _head_edit_accuracy(model: nn.Module, head: str, classes: Sequence[int], fs: ForgetSet,
                        batches: Callable[[], Any], device: str) -> float | None:
    rows = rows_of(classes, fs.labels)
    if not rows:
        return None
    edited = build_edited(model, head, rows)
    z, _, y = outputs(edited, batches(), classes, head, device=device)
    return accuracy_of(z, y, classes)


def build_edited(model: nn.Module, head: str, rows: Sequence[int]) -> nn.Module:
    """A copy of ``model`` whose head rows ``rows`` got the white-box edit (:func:`umig.evaluate.edit_head`)."""
    edited = copy.deepcopy(model)
    layer = edited.get_submodule(head)
    w, b = edit_head(layer.weight, getattr(layer, "bias", None), rows)
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)
    return edited


# ------------------------------------------------------------------ verdict
def _gap(unlearned: float | None, reference: float | None) -> float | None:
    """Unlearned minus reference, in percentage points (None when either is missing)."""
    if unlearned is None or reference is None:
        return None
    return round(100.0 * (unlearned - reference), 3)


def avg_gap(gaps: Mapping[str, float | None]) -> float | None:
    """SalUn's Avg. Gap: the mean |gap| (points) over :data:`AVG_GAP_METRICS` that could be measured."""
    vals = [abs(gaps[m]) for m in AVG_GAP_METRICS if gaps.get(m) is not None]
    return round(float(np.mean(vals)), 3) if vals else None


def _metric_device(device: str | None) -> str:
    """One device to measure on: CUDA for "auto" when there is one, else the first device listed."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device.split(",")[0].strip() or "cpu"
