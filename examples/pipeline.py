"""An MLOps-style flow around a deletion request, end to end on digits.

1. Train and register: a federated lineage is trained and every model recorded in the
   store (``FederatedRecorder``); the last global model is the one "in production".
2. A deletion request arrives: every sample of a label (default 8) must be forgotten.
3. Plan: which models hold or inherit that data (dry run, nothing changes).
4. Unlearn: FIUn across the whole lineage, one atomic operation.
5. Release gate: ``umig verify`` (``umig.verify.verify``) judges the operation against the exact
   reference, every changed model retrained without the label along the lineage (kept with the
   operation, never live), metric by metric and under attack. The gate, as ``umig verify OP
   --max-gap 1.5`` plus the white-box check: every changed model within 1.5 points Avg. Gap of its
   retrained reference, and the head edit gives back no more of the label than it does from the
   retrained model (within 5 points). The body's attacks (relearning, linear probe) are printed,
   not gated: FIUn edits only the head (see the README, "Verifying an operation").
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

from umig.api import Store
from umig.data import parse_labels, resolve
from umig.demo import DIGITS_TEST
from umig.verify import verify

MAX_AVG_GAP = 1.5  # points: SalUn's Avg. Gap to the retrained reference, every changed model (umig verify --max-gap)
MAX_HEAD_EDIT_GAP = 5.0  # points: what the white-box head edit gets back beyond the retrained model, every model


def _points(x: float | None) -> str:
    """Points with two decimals, "-" when not measured."""
    return "-" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> int:
    ap = example_parser(__doc__, quick="1 round, 1 epoch", labels="8", labels_help="labels the deletion request covers")
    ap.add_argument("--out", type=Path, help="where to export the unlearned production model")
    ap.add_argument("--clients", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    args = parse_args(ap, argv, quick={"rounds": 1, "epochs": 1})
    from umig.cli.render import plan_view, result_table, verify_view

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

        con.rule("5. release gate: umig verify against retraining")
        out = verify(store, result.operation, data=DIGITS_TEST, max_gap=MAX_AVG_GAP)
        for part in verify_view(out):
            con.print(part)
        edits = [n["gap"]["head_edit_acc"] for n in out["nodes"] if n["gap"].get("head_edit_acc") is not None]
        worst_edit = max(edits, default=0.0)
        gate_gap = bool(out["passed"])
        gate_edit = worst_edit <= MAX_HEAD_EDIT_GAP
        gates_ok = gate_gap and gate_edit
        body = {label: max((n["gap"][key] for n in out["nodes"] if n["gap"].get(key) is not None), default=None, key=abs)
                for label, key in (("relearn", "relearn_acc"), ("relearn after reset", "relearn_reset_acc"),
                                   ("probe", "probe_acc"))}
        print("not gated (the body's attacks; FIUn edits only the head), worst node's gap: "
              + ", ".join(f"{k} {'-' if v is None else format(v, '+.1f')}" for k, v in body.items()) + " points")
        prod_gap = next((n["avg_gap"] for n in out["nodes"] if n["name"] == prod), None)
        speedup = out["reference_s"] / max(result.wall_s, 1e-9)
        print(f"release gate (umig verify, reference {out['reference']}) on {len(out['nodes'])} models: worst Avg. Gap "
              f"{_points(out['max_avg_gap'])} <= {MAX_AVG_GAP:g} points: {'PASS' if gate_gap else 'FAIL'}; worst head-edit "
              f"gap {worst_edit:+.1f} <= {MAX_HEAD_EDIT_GAP:g} points: {'PASS' if gate_edit else 'FAIL'}; production "
              f"model {prod}: Avg. Gap {_points(prod_gap)}; FIUn {result.wall_s:.3f} s vs retraining "
              f"{out['reference_s']:.1f} s ({speedup:.0f}x)")

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
        if entry.get("verification"):  # the gate's verdict, kept with the operation (per node: umig history --json)
            v = entry["verification"]
            entry["verification"] = {k: v.get(k) for k in ("reference", "avg_gap", "max_avg_gap", "max_gap", "passed")}
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
