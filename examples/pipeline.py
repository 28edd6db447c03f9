"""An MLOps-style flow around a deletion request, end to end on digits.

1. Train and register: a federated lineage is trained and every model recorded in the
   store (``FederatedRecorder``); the last global model is the one "in production".
2. A deletion request arrives: every sample of a label (default 8) must be forgotten.
3. Plan: which models hold or inherit that data (dry run, nothing changes).
4. Unlearn: FIUn across the whole lineage, one atomic operation.
5. Evaluate against a retrained reference: every affected model retrained from scratch
   without the label along the lineage (``umig.lineage.retrain_reference``); release gates
   on the production model: AD_f <= 1% and AD_r within 3 points of the reference.
6. Export the unlearned production model as safetensors and check the exported file.
7. Print the audit entry the store keeps for the operation.

    python examples/pipeline.py [--quick] [--store DIR] [--labels 8] [--out model.safetensors]
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import console, example_parser, parse_args
from federated import build  # the federated lineage of examples/federated.py

from umig.data import parse_labels, resolve
from umig.demo import DIGITS_TEST
from umig.lineage import evaluate_models, retrain_reference
from umig.api import Store

MAX_AD_F = 0.01
MAX_GAP = 0.03


def main(argv: list[str] | None = None) -> int:
    ap = example_parser(__doc__, quick="1 round, 1 epoch", labels="8", labels_help="labels the deletion request covers")
    ap.add_argument("--out", type=Path, help="where to export the unlearned production model")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    args = parse_args(ap, argv)
    if args.quick:
        args.rounds, args.epochs = 1, 1
    from rich.table import Table

    from umig.cli.render import plan_view, result_table

    con = console()
    tmp = tempfile.mkdtemp(prefix="umig-pipeline-")
    root = args.store or Path(tmp) / "store"
    out_path = args.out or Path(tmp) / "production-unlearned.safetensors"
    gates_ok = True
    try:
        shutil.rmtree(root, ignore_errors=True)
        store = Store.init(root)

        con.rule("1. train and register")
        t0 = time.perf_counter()
        run = build(store, clients=args.clients, edges=1, rounds=args.rounds, epochs=args.epochs, seed=args.seed,
                    dag=False)
        prod = run["globals"][-1]
        print(f"trained and registered {len(store)} models in {time.perf_counter() - t0:.1f} s; "
              f"production model: {prod} (version {store.node(prod).version})")

        con.rule("2. deletion request")
        labels = parse_labels(args.labels)
        request = {"request": "DR-0001", "kind": "class deletion", "labels": list(labels),
                   "reason": "data owner withdrew consent for every sample of these labels"}
        print(json.dumps(request))

        con.rule("3. plan")
        dry = store.plan_unlearning(labels)
        con.print(plan_view(dry))
        print(f"{len(dry.plan.affected)} model(s) affected, production model affected: {prod in dry.plan.affected}")

        con.rule("4. unlearn")
        result = store.unlearn(labels, eval_data=DIGITS_TEST)
        con.print(result_table(result))

        con.rule("5. evaluate against a retrained reference")
        ref = retrain_reference(store, labels)
        ref_metrics = evaluate_models(store, ref.states, labels, heldout=DIGITS_TEST)
        t = Table(title=f"FIUn ({result.wall_s:.3f} s for all {len(result.nodes)}) vs retraining "
                        f"({ref.wall_s:.1f} s sequential), held-out digits, %")
        for col in ("node", "AD_f FIUn", "AD_f retrain", "AD_r FIUn", "AD_r retrain", "retrain s (cumulative)"):
            t.add_column(col, justify="left" if col == "node" else "right")
        by = {n.name: n.metrics for n in result.nodes}
        for n in result.nodes:
            m, r = by[n.name], ref_metrics[n.name]
            t.add_row(n.name, f"{100 * m['AD_f_heldout_after']:.1f}", f"{100 * r['AD_f_heldout']:.1f}",
                      f"{100 * m['AD_r_heldout_after']:.1f}", f"{100 * r['AD_r_heldout']:.1f}",
                      f"{ref.cumulative(n.name):.2f}")
        con.print(t)
        m, r = by[prod], ref_metrics[prod]
        gate_f = m["AD_f_heldout_after"] <= MAX_AD_F
        gate_r = m["AD_r_heldout_after"] >= r["AD_r_heldout"] - MAX_GAP
        gates_ok = gate_f and gate_r
        speedup = 100 * (1 - result.wall_s / max(ref.cumulative(prod), 1e-9))
        print(f"release gates for {prod}: AD_f {100 * m['AD_f_heldout_after']:.1f}% <= {100 * MAX_AD_F:.0f}%: "
              f"{'PASS' if gate_f else 'FAIL'}; AD_r {100 * m['AD_r_heldout_after']:.1f}% vs retrained "
              f"{100 * r['AD_r_heldout']:.1f}% (within {100 * MAX_GAP:.0f} points): {'PASS' if gate_r else 'FAIL'}; "
              f"FIUn {speedup:.1f}% faster than retraining it")

        con.rule("6. export")
        store.export(prod, out_path)
        from safetensors.torch import load_file

        from umig.arch import ArchSpec, load_weights
        from umig.evaluate import unlearning_accuracy

        exported = ArchSpec.from_json(store.node(prod).arch).build()
        load_weights(exported, load_file(str(out_path)))
        acc = unlearning_accuracy(exported, resolve(DIGITS_TEST).batches(512), store.node(prod).classes, labels)
        print(f"exported {prod} v{store.node(prod).version} to {out_path} ({out_path.stat().st_size} bytes); "
              f"reloaded: AD_f {100 * acc['AD_f']:.1f}%, AD_r {100 * acc['AD_r']:.1f}% on held-out digits")

        con.rule("7. audit entry")
        entry = store.history()[-1]
        entry = {**entry, "nodes": [f"{n['name']} ({n['role']}) v{n['version_before']} -> v{n['version_after']}"
                                    for n in entry["nodes"]]}
        entry.pop("affected", None)  # the same names as "nodes"
        print(json.dumps({"request": request["request"], **entry}, indent=1, default=str))
        print(f"pipeline {'complete' if gates_ok else 'FAILED its release gates'}: operation "
              f"{result.operation} forgot label(s) {','.join(map(str, labels))} on {len(result.nodes)} models")
        store.close()
    finally:
        if not args.store:
            if args.out is None:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(Path(tmp) / "store", ignore_errors=True)
    return 0 if gates_ok or args.quick else 1


if __name__ == "__main__":
    raise SystemExit(main())
