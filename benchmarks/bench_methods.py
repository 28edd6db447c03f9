"""Every unlearning method on the same lineages, in one run, one table.

Two lineages on scikit-learn's digits (real data, CPU):

* ``fl``: 3 clients x 2 rounds of FedAvg (``umig.demo.build_fl_digits``, the demo lineage);
* ``il``: class-incremental chain, step 0 learns 0-5, step 1 adds 6-7, step 2 adds 8-9 (heads of
  6, 8 and 10 outputs; each step trains on its new classes plus a small replay of the old ones).

For each lineage and method, the label (default 3) is forgotten from a fresh copy of the lineage
with ``store.unlearn`` (in-process, default parameters) and every affected node is measured:

* wall: the method's own time (its phases; evaluation excluded);
* AD_f: accuracy on the forgotten label, worst affected node, on the node's effective training
  data and on held-out digits (lower is better; retrain gives 0);
* AD_r: accuracy on the other labels, mean over affected nodes; drop = worst loss in points
  against the original node (train or held-out);
* MIA: loss-threshold membership inference (``umig.evaluate.membership_inference``), the node's
  forgotten training samples against held-out samples of the same label; mean over nodes; 50%
  means the forgotten samples look like data the model never saw;
* changed: parameter entries the method changed, as a share of all parameters of the affected
  nodes; comm: parameters a federated run of the method moves (down + up per client per round)
  where the method reports it (FUSED, decentralized channel fine-tuning).

    python benchmarks/bench_methods.py [--labels 3] [--methods fiun,fused,...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from umig.arch import ArchSpec  # noqa: E402
from umig.data import Data, resolve  # noqa: E402
from umig.demo import DIGITS_TEST, DIGITS_TRAIN, build_fl_digits  # noqa: E402
from umig.evaluate import membership_inference  # noqa: E402
from umig.lineage import subset_ref  # noqa: E402
from umig.api import Store  # noqa: E402
from umig.train import Recipe, train  # noqa: E402
from umig.unlearners.baselines import inherit  # noqa: E402

METHODS = ("fiun", "fused", "channel", "retrain", "finetune", "gradient-ascent", "distill")
IL_STEPS = ((0, 1, 2, 3, 4, 5), (6, 7), (8, 9))


def build_il_digits(store: Store, *, steps=IL_STEPS, epochs: int = 5, replay: int = 20, seed: int = 0) -> list[str]:
    """A class-incremental chain on digits; returns the node names."""
    y = resolve(DIGITS_TRAIN).targets.numpy()
    rs = np.random.RandomState(seed)
    pools = {}
    for c in np.unique(y):
        idx = rs.permutation(np.flatnonzero(y == c))
        k = int(round(0.7 * len(idx)))
        pools[int(c)] = (idx[:k], idx[k:])  # (introduced with the class, replay pool)
    names: list[str] = []
    seen: tuple[int, ...] = ()
    prev_state, prev_classes = None, ()
    with store.batch():
        for k, new in enumerate(steps):
            classes = tuple(sorted(set(seen) | set(new)))
            parts = [pools[c][0] for c in new] + [rs.choice(pools[c][1], size=replay, replace=False) for c in seen]
            data = subset_ref(store, DIGITS_TRAIN, np.sort(np.concatenate(parts)))
            arch = ArchSpec("umig.models:digits_cnn", {"num_classes": len(classes)})
            recipe = Recipe(optimizer="adam", lr=0.01 if k == 0 else 0.005, epochs=epochs, batch_size=64, seed=seed + k)
            torch.manual_seed(recipe.seed)
            model = arch.build()
            if prev_state is not None:
                inherit(model, prev_state, prev_classes, classes, "fc")
            train(model, lambda e, d=data, r=recipe: d.batches(r.batch_size, shuffle=True, seed=r.seed + e),
                  recipe, classes)
            name = f"il/step{k}"
            store.add_node(name, model, arch, parents=[names[-1]] if names else [], relation="increment",
                           framework="il", data=data, classes=classes, recipe=recipe)
            names.append(name)
            prev_state, prev_classes, seen = model.state_dict(), classes, classes
    return names


def mia(store: Store, name: str, labels, heldout: Data, version: int | None = None) -> float | None:
    info = store.node(name)
    eff = store.effective_data(name)
    if eff is None:
        return None
    members = eff.filter_labels(keep=labels)
    unseen = heldout.filter_labels(keep=labels)
    if not len(members) or not len(unseen):
        return None
    model = store.load_model(name, version)
    return membership_inference(model, members.batches(512), unseen.batches(512), info.classes)


def run_method(template: Path, work: Path, method: str, labels, heldout: Data, workers: int) -> dict:
    root = work / method
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(template, root)
    store = Store.open(root)
    try:
        t0 = time.perf_counter()
        res = store.unlearn(labels, method=method, eval_data=DIGITS_TEST, workers=workers, device="cpu")
        total = time.perf_counter() - t0
        nodes = []
        for n in res.nodes:
            m = dict(n.metrics)
            m["MIA_after"] = mia(store, n.name, labels, heldout)
            m["MIA_before"] = mia(store, n.name, labels, heldout, version=n.version_before)
            m["name"] = n.name
            nodes.append(m)
    finally:
        store.close()
        shutil.rmtree(root, ignore_errors=True)
    return {"method": method, "wall_s": res.wall_s, "total_s": total, "nodes": nodes}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def summarise(run: dict, when: str = "after") -> dict:
    nodes = run["nodes"]
    out = {
        "AD_f_train": max(n[f"AD_f_train_{when}"] for n in nodes),
        "AD_f_heldout": max(n[f"AD_f_heldout_{when}"] for n in nodes),
        "AD_r_train": _mean(n[f"AD_r_train_{when}"] for n in nodes),
        "AD_r_heldout": _mean(n[f"AD_r_heldout_{when}"] for n in nodes),
        "MIA": _mean(n[f"MIA_{when}"] for n in nodes),
    }
    if when == "after":
        out["drop"] = max(max(n["AD_r_train_before"] - n["AD_r_train_after"],
                              n["AD_r_heldout_before"] - n["AD_r_heldout_after"]) for n in nodes)
        changed = [n.get("params_changed") for n in nodes]
        total = sum(n.get("params_total", 0) or 0 for n in nodes)
        out["changed"] = (sum(c for c in changed if c is not None) / total) if total and None not in changed else None
        comm = [n.get("comm_params") for n in nodes]
        full = [n.get("comm_params_full") for n in nodes]
        out["comm"] = sum(comm) if all(c is not None for c in comm) else None
        out["comm_full"] = sum(full) if out["comm"] is not None else None
    return out


def pct(x, digits=1):
    return "-" if x is None else f"{100 * x:.{digits}f}"


def print_table(rows: list[dict], labels) -> None:
    headers = ["lineage", "method", "wall s", "AD_f tr", "AD_f ho", "AD_r tr", "AD_r ho", "AD_r drop",
               "MIA", "changed %", "comm (params)"]
    body = []
    for r in rows:
        s = r["summary"]
        comm = "-" if s.get("comm") is None else f"{s['comm']:,} / {s['comm_full']:,}"
        body.append([r["lineage"], r["method"], "-" if r["wall_s"] is None else f"{r['wall_s']:.2f}",
                     pct(s["AD_f_train"]), pct(s["AD_f_heldout"]), pct(s["AD_r_train"]), pct(s["AD_r_heldout"]),
                     "-" if "drop" not in s else f"{100 * s['drop']:.1f}",
                     pct(s["MIA"]), pct(s.get("changed"), 2), comm])
    title = (f"forget label(s) {','.join(map(str, labels))}: AD_f worst node, AD_r mean (drop: worst node, points), "
             f"MIA mean (50% = no leak); accuracies in %")
    try:
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in headers:
            t.add_column(h, justify="left" if h in ("lineage", "method") else "right")
        for b in body:
            t.add_row(*b)
        Console(width=200).print(t)
    except ImportError:  # pragma: no cover - rich is a dependency; plain text just in case
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(headers)]
        print(title)
        print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
        for b in body:
            print("  ".join(c.ljust(w) for c, w in zip(b, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", default="3")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--lineages", default="fl,il")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (tiny models: 1 is fastest)")
    ap.add_argument("--json", type=Path, default=None, help="also write every per-node figure here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    labels = [int(x) for x in args.labels.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    heldout = resolve(DIGITS_TEST)
    rows, raw = [], []
    with tempfile.TemporaryDirectory(prefix="bench-methods-") as tmp:
        work = Path(tmp)
        for lineage in [x.strip() for x in args.lineages.split(",") if x.strip()]:
            template = work / f"{lineage}-template"
            store = Store.init(template)
            t0 = time.perf_counter()
            if lineage == "fl":
                names = build_fl_digits(store).nodes
            elif lineage == "il":
                names = build_il_digits(store)
            else:
                raise SystemExit(f"unknown lineage {lineage!r} (fl, il)")
            store.close()
            print(f"[{lineage}] built {len(names)} nodes in {time.perf_counter() - t0:.1f} s", flush=True)
            original = None
            for method in methods:
                t0 = time.perf_counter()
                run = run_method(template, work, method, labels, heldout, args.workers)
                print(f"[{lineage}] {method}: {run['wall_s']:.2f} s method, {time.perf_counter() - t0:.1f} s with "
                      f"evaluation, {len(run['nodes'])} nodes", flush=True)
                if original is None:
                    original = {"lineage": lineage, "method": "(original)", "wall_s": None,
                                "summary": summarise(run, "before")}
                    rows.append(original)
                rows.append({"lineage": lineage, "method": method, "wall_s": run["wall_s"], "summary": summarise(run)})
                raw.append({"lineage": lineage, **run})
    print()
    print_table(rows, labels)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"labels": labels, "rows": rows, "runs": raw}, indent=1, default=float))
        print(f"per-node figures written to {args.json}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
