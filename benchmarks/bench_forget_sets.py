"""Forgetting a label, a client and samples: every method against exact retraining, in one run.

Two lineages on scikit-learn's digits (real data, CPU), built once per run with recorded recipes
(so ``retrain`` replays them):

* ``fl``: ``--clients`` x ``--rounds`` FedAvg (``umig.demo.build_fl_digits``), ``--epochs`` local
  epochs per client and round;
* ``il``: the class-incremental chain of ``examples/incremental.py`` (``build``: digits 0-5, then
  6-7, then 8-9, each step on its new classes plus a replay of old ones), ``--epochs`` per step.

Forget sets, one per kind:

* ``labels``: every item of ``--label`` (default 3);
* ``samples``: ``--sample-share`` (default 5%) random rows of the digits train split (seeded);
* ``client``: all of one node's own data: ``fl/r1/c1`` (a federated client, found at every round),
  ``il/step1`` (the increment that brought digits 6-7) on the IL chain. A forget set names rows, so
  on the chain it also takes the replay rows of digits 0-5 that step 2 shares with step 1.

Every installed method that serves the kind runs on a fresh copy of the lineage (in-process, one
worker, default parameters); ``federaser`` once per ``--ratios`` value of ``calibration_ratio`` for
samples and clients (at its default for labels).
FIUn refuses samples and clients; the ``fiun*`` row shows what its head rule (Eq. 3-6, ``mode=paper``,
default gamma/tau/eta: the Fisher of the forgotten items at the discovery nodes, merged by max,
scaling the critical head parameters of every affected node) would do, computed here, not served.

Measured on each model, as ``umig verify`` measures (the MIA is ``umig.evaluate.mia_efficacy``):

* forget / retain: accuracy on the forgotten / retained items of the node's effective training data
  (the unique rows it and its ancestors trained on, restricted to its classes);
* held-out: accuracy on held-out digits of the node's classes (the retained labels for a label set);
* MIA: SalUn's MIA efficacy: a classifier on the true label's confidence, fit on retained training
  items (members) vs held-out items (non-members), applied to the forget set; the share it calls
  non-members (higher: the forget set looks less like training data);
* Avg. Gap: SalUn's mean |method - retrain| over those four, in points (``umig.verify.avg_gap``).

The table shows the **final model** (``fl/r3/global``, ``il/step2``) and, in the last column, the
Avg. Gap averaged over **every affected node** (the forgotten client's own nodes included). Every
request runs in-process with one torch thread, warm (a throw-away request runs first). ``wall s``
is the method's phases (no evaluation); ``CPU s`` the CPU time of the whole request (plan, method,
commit). Speed-up is ``retrain``'s CPU time over the method's, same lineage and forget set: on a
shared machine CPU time is what other load leaves alone (the wall-time ratio is in ``--json``, as
``speedup_wall``). ``--repeats`` N runs ``retrain``, ``federaser`` and each kind's default N times
and keeps the fastest.
The ``(original)`` row is the lineage before unlearning: the gap that doing nothing leaves.

Targets (issue 11): samples and client forgetting with the default method within 2 points Avg.
Gap of ``retrain`` (final model and mean over affected nodes) and at least 4x faster than it.

    python benchmarks/bench_forget_sets.py [--quick] [--json OUT] [--markdown]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import networkx as nx
import numpy as np
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))
# _bench_common: this script's own folder, benchmarks/ (first on sys.path when it runs)
from _bench_common import (
    KINDS,
    add_lineage_options,
    closing_line,
    machine,
    machine_line,
    markdown_table,
    mean_of_present,
    num,
    parse_kinds,
    pct,
    print_rich_table,
    write_run_json,
)

from umig import unlearner as U
from umig.api import Store
from umig.data import Data, DataRef, parse_ref, resolve, source_positions
from umig.demo import DEFAULT_RECIPE, DIGITS_TEST, DIGITS_TRAIN, build_fl_digits
from umig.errors import UmigError
from umig.evaluate import accuracy_of, mia_efficacy, outputs, true_label_confidence
from umig.fisher import FIM, head_fisher, merge_max
from umig.forget import ForgetSet, samples
from umig.train import Recipe
from umig.unlearners.fiun import fiun_update
from umig.unlearning import DEFAULT_METHODS
from umig.verify import AVG_GAP_METRICS, avg_gap

GAP_TARGET = 2.0  # points of Avg. Gap to retrain
SPEEDUP_TARGET = 4.0  # x faster than retrain
FIUN_RULE = "fiun*"  # the row computed here for kinds FIUn refuses


@dataclass
class Lineage:
    """One recorded lineage (kept as a template store that every run copies)."""

    name: str
    template: Path
    nodes: list[str]
    final: str  # the model a user ships: the last global / the last IL step
    client: str  # the node whose own data the ``client`` forget set names
    build_s: float
    positions: dict[str, np.ndarray] = field(default_factory=dict)  # node -> effective train rows


@dataclass
class Request:
    """One forget set, as ``Store.unlearn`` takes it and as the metrics need it."""

    kind: str
    forget: ForgetSet
    clients: tuple[str, ...]
    labels: tuple[int, ...]  # forgotten labels (label sets)
    rows: np.ndarray | None  # forgotten rows of the digits train split (sample and client sets)

    def kwargs(self) -> dict[str, Any]:
        return {"forget": self.forget, "clients": list(self.clients)}

    def describe(self, train_size: int) -> str:
        if self.kind == "labels":
            return f"label {','.join(map(str, self.labels))}"
        assert self.rows is not None
        if self.kind == "client":
            return f"client {self.clients[0]} ({self.rows.size} rows)"
        return f"{self.rows.size} random rows ({100 * self.rows.size / train_size:.0f}% of the train split)"


# ------------------------------------------------------------------ lineages
def build_fl(root: Path, *, clients: int, rounds: int, epochs: int, seed: int) -> Lineage:
    """The FedAvg lineage on digits, recorded in a fresh store at ``root``."""
    store = Store.init(root)
    t0 = time.perf_counter()
    recipe = Recipe(**{**DEFAULT_RECIPE.to_json(), "epochs": epochs})
    # Exact model FIMs: fiun_rule compares them with unlearning FIMs taken at the final weights.
    run = build_fl_digits(store, clients=clients, rounds=rounds, recipe=recipe, seed=seed, exact_fim=True)
    lin = Lineage("fl", root, run.nodes, run.globals[-1], run.clients[0][min(1, clients - 1)],
                  time.perf_counter() - t0)
    lin.positions = effective_rows(store)
    store.close()
    return lin


def build_il(root: Path, *, epochs: int, replay: int, seed: int) -> Lineage:
    """The class-incremental chain of ``examples/incremental.py``, recorded in a fresh store at ``root``."""
    # examples/incremental.py (examples/ is on sys.path above)
    from incremental import build

    store = Store.init(root)
    t0 = time.perf_counter()
    run = build(store, epochs=epochs, replay=replay, seed=seed, exact_fim=True, log=lambda *_: None)  # as build_fl
    steps = list(run["steps"])
    lin = Lineage("il", root, steps, steps[-1], steps[min(1, len(steps) - 1)], time.perf_counter() - t0)
    lin.positions = effective_rows(store)
    store.close()
    return lin


def effective_rows(store: Store) -> dict[str, np.ndarray]:
    """Every node's effective training data as rows of the digits train split: the unique rows it
    and its ancestors trained on, restricted to its classes."""
    train = resolve(DIGITS_TRAIN)
    source = parse_ref(DIGITS_TRAIN).source
    g = store.graph()
    own: dict[str, np.ndarray] = {}
    for name in g.nodes:
        ref = store.node(name).data_ref
        if ref is None:
            continue
        dref = DataRef.from_json(ref)
        if dref.source != source:
            raise SystemExit(f"node {name} trained on {dref.source}; this benchmark measures digits lineages only")
        own[name] = source_positions(dref)[1]
    out: dict[str, np.ndarray] = {}
    for name in g.nodes:
        parts = [own[a] for a in (nx.ancestors(g, name) | {name}) if a in own]
        rows = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        classes = torch.tensor(store.node(name).classes, dtype=torch.long)
        keep = torch.isin(train.targets[torch.from_numpy(rows)], classes).numpy()
        out[name] = rows[keep]
    return out


def requests(store: Store, lin: Lineage, *, label: int, share: float, seed: int) -> dict[str, Request]:
    """The three forget sets for one lineage."""
    n = len(resolve(DIGITS_TRAIN))
    # A generator of its own: ``RandomState(seed).choice`` is a prefix of ``RandomState(seed).permutation``,
    # which ``digits_client_split`` deals out to clients in order, so it would pick client 0's rows only.
    rng = np.random.default_rng([seed, 11])
    rows = np.sort(rng.choice(n, max(1, round(share * n)), replace=False)).astype(np.int64)
    client_rows = source_positions(DataRef.from_json(store.node(lin.client).data_ref))[1]
    return {
        "labels": Request("labels", ForgetSet(labels=(label,)), (), (label,), None),
        "samples": Request("samples", ForgetSet(samples=(samples(rows, DIGITS_TRAIN),)), (), (), rows),
        "client": Request("client", ForgetSet(), (lin.client,), (), np.unique(client_rows)),
    }


# ------------------------------------------------------------------ measuring
def measure(model: nn.Module, head: str, classes: Sequence[int], rows: np.ndarray, req: Request,
            train: Data, heldout: Data) -> dict[str, float | None]:
    """Forget / retain / held-out accuracy and MIA efficacy of one model (fractions in [0, 1])."""
    node_train = train.select(torch.from_numpy(rows))
    y_rows = node_train.targets
    if req.kind == "labels":
        forget = torch.isin(y_rows, torch.tensor(req.labels, dtype=torch.long))
        ho = heldout.filter_labels(keep=[c for c in classes if c not in req.labels])
    else:
        assert req.rows is not None
        forget = torch.from_numpy(np.isin(rows, req.rows))
        ho = heldout.filter_labels(keep=classes)
    z_tr, _, y_tr = outputs(model, node_train.batches(512), classes, head)
    z_ho, _, y_ho = outputs(model, ho.batches(512), classes, head)
    conf_tr = true_label_confidence(z_tr, y_tr, classes)
    conf_ho = true_label_confidence(z_ho, y_ho, classes)
    return {
        "forget_acc": accuracy_of(z_tr[forget], y_tr[forget], classes),
        "retain_acc": accuracy_of(z_tr[~forget], y_tr[~forget], classes),
        "heldout_acc": accuracy_of(z_ho, y_ho, classes),
        "mia_efficacy": mia_efficacy(conf_tr[~forget], conf_ho, conf_tr[forget]),
    }


def measure_nodes(store: Store, lin: Lineage, nodes: Sequence[str], req: Request, train: Data, heldout: Data,
                  states: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> dict[str, dict]:
    """:func:`measure` on each node's current model (or on ``states`` where given)."""
    out = {}
    for name in nodes:
        info = store.node(name)
        model = store.load_model(name)
        if states is not None and name in states:
            model.load_state_dict(states[name])
        out[name] = measure(model, info.head, info.classes, lin.positions[name], req, train, heldout)
    return out


# ------------------------------------------------------------------ running methods
def run_method(lin: Lineage, work: Path, method: str, params: Mapping[str, Any], req: Request,
               train: Data, heldout: Data, repeats: int = 1) -> dict[str, Any]:
    """One request on a fresh copy of the lineage: the method's wall time and every affected node's metrics.

    ``wall_s`` is the method's phases (``UnlearnResult.wall_s``); ``cpu_s`` the CPU time this process
    spent on the whole request (in-process backend, one torch thread: all of its work), which other
    load on a shared machine barely moves. With ``repeats`` > 1 the request is reverted and run
    again; both times are the fastest run's, the metrics the last run's.
    """
    root = work / f"{lin.name}-{req.kind}-run"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(lin.template, root)
    store = Store.open(root)
    walls: list[float] = []
    cpus: list[float] = []
    try:
        while True:
            c0 = time.process_time()
            res = store.unlearn(**req.kwargs(), method=method, params=dict(params), evaluate=False,
                                workers=1, device="cpu")
            cpus.append(time.process_time() - c0)
            walls.append(res.wall_s)
            if len(walls) >= repeats:
                break
            store.revert(res.operation)
        nodes = [n.name for n in res.nodes]
        metrics = measure_nodes(store, lin, nodes, req, train, heldout)
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    return {"wall_s": min(walls), "cpu_s": min(cpus), "walls_s": walls, "cpus_s": cpus, "nodes": metrics}


def fiun_rule(lin: Lineage, req: Request, train: Data, heldout: Data) -> dict[str, Any]:
    """What FIUn's head rule would do for a sample or client set (FIUn refuses these kinds).

    The discovery nodes' unlearning FIMs on the forgotten items of their own data (Eq. 3), merged
    by element-wise max per merge group (Eq. 5), then Eq. 6 (``mode=paper``, FIUn's default gamma,
    tau and eta) on every affected node's head. Nothing is committed; the new heads are measured
    in memory. The times cover reading, the Fisher passes and the updates, not writing blobs.
    """
    p = {k: v.default for k, v in U.get("fiun").params.items()}
    store = Store.open(lin.template)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        plan = store.plan_unlearning(**req.kwargs(), method="retrain").plan
        assert req.rows is not None
        unlearning_fims: dict[str, FIM] = {}
        for d in plan.discovery:
            info = store.node(d)
            own = store.node_data(d)
            assert own is not None and info.data_ref is not None
            pos = source_positions(DataRef.from_json(info.data_ref))[1]
            forgotten = own.select(torch.from_numpy(np.flatnonzero(np.isin(pos, req.rows))))
            model_fim = store.fim(d)
            assert model_fim is not None
            unlearning_fims[d] = head_fisher(store.load_model(d), info.head, forgotten.batches(int(p["batch_size"])),
                                             info.classes, kind=model_fim.kind, temperature=model_fim.temperature)
        states: dict[str, dict[str, torch.Tensor]] = {}
        for key, group in plan.groups:
            fims = [unlearning_fims[d] for d in sorted(key)]
            merged_all = merge_max(fims, sorted({c for f in fims for c in f.classes}))
            for name in group:
                info = store.node(name)
                model_fim = store.fim(name)
                assert model_fim is not None
                state = store.state_dict(name)
                wkey, bkey = f"{info.head}.weight", f"{info.head}.bias"
                w, b, _ = fiun_update(state[wkey], state.get(bkey), model_fim.aligned(info.classes),
                                      merged_all.aligned(info.classes), (), gamma=p["gamma"], tau=p["tau"],
                                      eta=p["eta"], eps=p["eps"], mode="paper")
                state[wkey] = w
                if b is not None:
                    state[bkey] = b
                states[name] = state
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        metrics = measure_nodes(store, lin, plan.affected, req, train, heldout, states)
    finally:
        store.close()
    return {"wall_s": wall, "cpu_s": cpu, "nodes": metrics}


def methods_for(kind: str, ratios: Sequence[float], only: set[str] | None) -> list[tuple[str, str, dict]]:
    """(row label, method, params) for every installed method that serves ``kind``; ``retrain`` first.

    ``federaser`` runs once per ``ratios`` value of ``calibration_ratio`` (and its default) for samples
    and clients, at its default for labels; ``fiun``, which refuses samples and clients, gives the
    :data:`FIUN_RULE` row there instead.
    """
    rows: list[tuple[str, str, dict]] = [("retrain", "retrain", {})]
    for name in U.available():
        if name == "retrain" or (only is not None and name not in only):
            continue
        m = U.get(name)
        if kind not in m.kinds:
            if name == "fiun":
                rows.append((FIUN_RULE, FIUN_RULE, {}))
            continue
        if name == "federaser":
            # The ratio sweep where the targets apply (samples, client); labels at the default ratio.
            default = m.params["calibration_ratio"].default
            for r in sorted((set(ratios) if kind != "labels" else set()) | {default}, reverse=True):
                rows.append((f"federaser r={r:g}", name, {"calibration_ratio": r}))
        else:
            rows.append((name, name, {}))
    return rows


# ------------------------------------------------------------------ summarising
def final_and_mean(run: Mapping[str, Any], final: str) -> dict[str, Any]:
    """The final model's metrics and the per-metric mean over every affected node."""
    nodes = run["nodes"]
    mean = {m: mean_of_present(v.get(m) for v in nodes.values()) for m in AVG_GAP_METRICS}
    return {"final": nodes.get(final), "mean": mean, "nodes": list(nodes)}


def gap_to(ref: Mapping[str, float | None] | None, other: Mapping[str, float | None] | None) -> float | None:
    """SalUn's Avg. Gap (points) between two metric dicts (fractions)."""
    if ref is None or other is None:
        return None
    gaps = {m: None if ref.get(m) is None or other.get(m) is None else 100.0 * (other[m] - ref[m])
            for m in AVG_GAP_METRICS}
    return avg_gap(gaps)


def node_gaps(ref_run: Mapping[str, Any], run: Mapping[str, Any]) -> float | None:
    """Avg. Gap per affected node, averaged over the nodes both runs changed."""
    common = [n for n in run["nodes"] if n in ref_run["nodes"]]
    return mean_of_present(gap_to(ref_run["nodes"][n], run["nodes"][n]) for n in common)


HEADERS = ["lineage", "kind", "method", "forget %", "retain %", "held-out %", "MIA eff. %", "wall s", "CPU s",
           "speed-up", "Avg. Gap final", "Avg. Gap nodes"]


def table_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    out = []
    for r in rows:
        if r.get("error"):
            out.append([r["lineage"], r["kind"], r["label"], "failed: " + r["error"].splitlines()[0][:90],
                        *["-"] * (len(HEADERS) - 4)])
            continue
        f = r["final"] or {}
        out.append([r["lineage"], r["kind"], r["label"] + (" (default)" if r.get("default") else ""),
                    pct(f.get("forget_acc")), pct(f.get("retain_acc")), pct(f.get("heldout_acc")),
                    pct(f.get("mia_efficacy")), num(r.get("wall_s")), num(r.get("cpu_s")),
                    "-" if r.get("speedup") is None else f"{r['speedup']:.1f}x",
                    num(r.get("gap_final")), num(r.get("gap_nodes"))])
    return out


def verdicts(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """The targets, per lineage, for the default method of each kind and for every federaser setting."""
    lines = []
    for r in rows:
        if r["kind"] == "labels" or r["label"] == "(original)":
            continue
        if not (r.get("default") or r["method"] == "federaser"):
            continue
        gaps = [g for g in (r.get("gap_final"), r.get("gap_nodes")) if g is not None]
        gap_ok = bool(gaps) and max(gaps) <= GAP_TARGET
        speed_ok = r.get("speedup") is not None and r["speedup"] >= SPEEDUP_TARGET
        lines.append(f"{r['lineage']} {r['kind']:7} {r['label'] + (' (default)' if r.get('default') else ''):26} "
                     f"Avg. Gap {num(r.get('gap_final'))} final / {num(r.get('gap_nodes'))} nodes "
                     f"(<= {GAP_TARGET:g}: {'PASS' if gap_ok else 'FAIL'}), "
                     f"{'-' if r.get('speedup') is None else format(r['speedup'], '.1f')}x retrain CPU, "
                     f"{'-' if r.get('speedup_wall') is None else format(r['speedup_wall'], '.1f')}x wall "
                     f"(>= {SPEEDUP_TARGET:g}x: {'PASS' if speed_ok else 'FAIL'})"
                     + ("  -> meets both" if gap_ok and speed_ok else ""))
    return lines


# ------------------------------------------------------------------ main
def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_lineage_options(ap, clients=5, rounds=3, epochs=10)
    ap.add_argument("--ratios", default="0.5,0.25,0.2,0.1", help="federaser calibration_ratio values to measure")
    ap.add_argument("--lineages", default="fl,il")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--methods", default=None, help="only these methods (retrain always runs)")
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of retrain, federaser and each kind's default method; their wall time is the fastest")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: the FL lineage only, 3 clients x 2 rounds, 3 epochs; samples and client; "
                         "ratios 0.5,0.1; one run each")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure, per node, here")
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = ap.parse_args(argv)
    if args.quick:
        args.clients, args.rounds, args.epochs, args.replay, args.repeats = 3, 2, 3, 20, 1
        args.ratios = "0.5,0.1"
        if args.kinds == ",".join(KINDS):
            args.kinds = "samples,client"
        if args.lineages == "fl,il":
            args.lineages = "fl"
    torch.set_num_threads(args.threads)
    kinds = parse_kinds(args.kinds)
    ratios = [float(x) for x in args.ratios.split(",") if x.strip()]
    only = {m.strip() for m in args.methods.split(",")} if args.methods else None
    host = machine()
    print(f"{machine_line(host)}; every figure below comes from this run", flush=True)
    train, heldout = resolve(DIGITS_TRAIN), resolve(DIGITS_TEST)
    rows: list[dict[str, Any]] = []
    runs: list[dict[str, Any]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-forget-") as tmp:
        work = Path(tmp)
        for lname in [x.strip() for x in args.lineages.split(",") if x.strip()]:
            if lname == "fl":
                lin = build_fl(work / "fl", clients=args.clients, rounds=args.rounds, epochs=args.epochs,
                               seed=args.seed)
                shape = f"{args.clients} clients x {args.rounds} rounds, {args.epochs} local epochs"
            elif lname == "il":
                lin = build_il(work / "il", epochs=args.epochs, replay=args.replay, seed=args.seed)
                shape = f"{len(lin.nodes)} steps, {args.epochs} epochs each, replay {args.replay} per old class"
            else:
                raise SystemExit(f"unknown lineage {lname!r} (fl, il)")
            print(f"[{lname}] built {len(lin.nodes)} nodes ({shape}) in {lin.build_s:.1f} s; final model {lin.final}",
                  flush=True)
            with Store.open(lin.template) as store:
                reqs = requests(store, lin, label=args.label, share=args.sample_share, seed=args.seed)
            # Warm-up: the first request in a process pays one-off costs (imports, data, model builds).
            run_method(lin, work, "retrain", {}, reqs["samples"], train, heldout)
            for kind in kinds:
                req = reqs[kind]
                print(f"[{lname}] {kind}: {req.describe(len(train))}", flush=True)
                ref: dict[str, Any] | None = None
                for label, method, params in methods_for(kind, ratios, only):
                    t0 = time.perf_counter()
                    try:
                        if method == FIUN_RULE:
                            run = fiun_rule(lin, req, train, heldout)
                        else:
                            timed = method in ("retrain", "federaser", DEFAULT_METHODS[kind])
                            run = run_method(lin, work, method, params, req, train, heldout,
                                             repeats=args.repeats if timed else 1)
                    except UmigError as e:  # a method that fails here is a finding, not the end of the run
                        if ref is None:
                            raise
                        print(f"[{lname}] {kind} {label}: FAILED: {e}", flush=True)
                        failed = {"wall_s": None, "cpu_s": None, "nodes": {}}
                        rows.append({**_row(lin, kind, label, method, params, failed, ref),
                                     "error": str(e)})
                        continue
                    print(f"[{lname}] {kind} {label}: {run['wall_s']:.2f} s method ({run['cpu_s']:.2f} s CPU), "
                          f"{time.perf_counter() - t0:.1f} s "
                          f"with evaluation, {len(run['nodes'])} nodes", flush=True)
                    if ref is None:  # retrain runs first: it is the reference of every other row
                        ref = run
                        with Store.open(lin.template) as store:
                            orig = {"wall_s": None, "cpu_s": None, "nodes": measure_nodes(store, lin, list(run["nodes"]), req,
                                                                           train, heldout)}
                        rows.append(_row(lin, kind, "(original)", "(original)", {}, orig, ref))
                        runs.append({"lineage": lname, "kind": kind, "label": "(original)", **orig})
                    rows.append(_row(lin, kind, label, method, params, run, ref))
                    runs.append({"lineage": lname, "kind": kind, "label": label, "method": method,
                                 "params": params, **run})
    total = time.perf_counter() - started
    print()
    print_rich_table(HEADERS, table_rows(rows), "forget sets on digits lineages: metrics of the final model (fl: last "
                     "global, il: last step); Avg. Gap to retrain in points, final model and mean over affected nodes; "
                     "accuracies in %", width=200)
    print(f"'(default)': DEFAULT_METHODS in umig/unlearning.py; {FIUN_RULE}: FIUn's head rule computed here "
          "(the method refuses samples and clients); wall: method phases only, warm; CPU: the whole request; "
          "speed-up: retrain CPU / method CPU")
    print()
    print("targets (issue 11): default method for samples and client within "
          f"{GAP_TARGET:g} points Avg. Gap of retrain, >= {SPEEDUP_TARGET:g}x faster")
    for line in verdicts(rows):
        print("  " + line)
    print("\n" + closing_line(host, total))
    if args.markdown:
        print()
        print(markdown_table(HEADERS, table_rows(rows)))
    if args.json:
        write_run_json(args.json, host, args, default_methods=DEFAULT_METHODS, rows=rows, runs=runs, total_s=total)
        print(f"every figure written to {args.json}")
    return 0


def _row(lin: Lineage, kind: str, label: str, method: str, params: Mapping[str, Any], run: Mapping[str, Any],
         ref: Mapping[str, Any]) -> dict[str, Any]:
    """One table row: the final model's metrics, the gaps to retrain, wall time and speed-up."""
    s = final_and_mean(run, lin.final)
    r = final_and_mean(ref, lin.final)
    wall, cpu = run.get("wall_s"), run.get("cpu_s")
    timed = cpu is not None  # retrain's own row: 1.0x
    default = DEFAULT_METHODS.get(kind) == method and (
        method != "federaser" or params.get("calibration_ratio") == U.get("federaser").params["calibration_ratio"].default)
    return {"lineage": lin.name, "kind": kind, "label": label, "method": method, "params": dict(params),
            "default": default, "final_node": lin.final, "final": s["final"], "mean": s["mean"],
            "affected": len(s["nodes"]), "wall_s": wall, "cpu_s": cpu,
            "speedup": ref["cpu_s"] / max(cpu, 1e-9) if timed else None,
            "speedup_wall": ref["wall_s"] / max(wall, 1e-9) if timed and wall is not None else None,
            "gap_final": gap_to(r["final"], s["final"]), "gap_nodes": node_gaps(ref, run)}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
