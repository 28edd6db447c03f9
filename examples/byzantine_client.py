"""A Byzantine client in federated learning: forget everything one client contributed.

4 FL clients, 2 FedAvg rounds on digits; one client (default client 3) is Byzantine: it flips
every label (y -> 9 - y) in its share. Its flipped data is written to ``flipped.safetensors``
(x, y), and that file is its data reference, so the lineage records what it really trained on.
The flipped updates drag the global model's held-out accuracy down.

The client is then forgotten with ``store.unlearn(clients=[<its round-1 node>], method=METHOD)``
(its data, at every round it was recorded with it) and with ``retrain`` (the affected nodes
retrained without that data from their recorded recipes, FedAvg re-weighted: the exact
reference), each on its own copy of the store. The final global is exported and the exported
checkpoint evaluated: held-out accuracy, accuracy on the Byzantine client's (flipped) data and the
method's wall time. ``--check`` exits 1 unless METHOD's held-out accuracy is at most 2 points below
retrain's.

    python examples/byzantine_client.py [--quick] [--check] [--method retrain] [--store DIR]
"""

from __future__ import annotations

import time

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import (accuracy, check_method, comparison_table, console, example_parser, exported_model,
                     fedavg_lineage, method_options, parse_args, recorded_line, unlearn_copy, work_dir)

from safetensors.torch import save_file

from umig.api import Store
from umig.data import digits_client_split, resolve
from umig.demo import DIGITS_TEST, DIGITS_TRAIN
from umig.lineage import subset_ref

MAX_ACC_GAP = 0.02


def main(argv: list[str] | None = None) -> int:
    ap = example_parser(__doc__, quick="2 rounds, 3 epochs", store_help="directory for the data, the recorded "
                        "store and its unlearned copies (default: a temporary one, removed at exit)")
    method_options(ap)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--byzantine", type=int, default=3, help="the client that flips its labels")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5, help="local epochs per client and round")
    args = parse_args(ap, argv)
    check_method(args.method, "client")
    if args.quick:
        args.epochs = 3
    con = console()
    with work_dir(args.store, "umig-byzantine-") as work:
        store = Store.init(work / "original")
        parts = digits_client_split(args.clients, split="train", seed=args.seed)
        shards = [subset_ref(store, DIGITS_TRAIN, p) for p in parts]
        x, y = shards[args.byzantine].dataset.tensors
        flipped = work / "flipped.safetensors"
        save_file({"x": x.contiguous(), "y": (9 - y).contiguous()}, str(flipped))
        shards[args.byzantine] = resolve(str(flipped))
        print(f"client {args.byzantine} trains on {flipped}: its {len(x)} training digits with labels y -> 9 - y")
        print(f"training a {args.clients}-client x {args.rounds}-round FedAvg lineage ...", flush=True)
        t0 = time.perf_counter()
        run = fedavg_lineage(store, shards, rounds=args.rounds, epochs=args.epochs, seed=args.seed)
        print(recorded_line(run, time.perf_counter() - t0))
        final, byzantine = run["globals"][-1], run["clients"][0][args.byzantine]
        original = exported_model(store, final, work / "original.safetensors")
        store.close()

        tx, ty = resolve(DIGITS_TEST).dataset.tensors
        fx, fy = shards[args.byzantine].dataset.tensors

        def scores(model) -> tuple[float, float]:  # held-out accuracy, accuracy on the flipped client data
            return accuracy(model, tx, ty), accuracy(model, fx, fy)

        rows = {"original": (scores(original), None)}
        for method, dest in (("retrain", "retrain"), (args.method, "unlearned")):
            print(f"forgetting client {byzantine} with {method} (copy of the store: {work / dest}) ...", flush=True)
            model, result = unlearn_copy(work / "original", work / dest, final, clients=[byzantine], method=method)
            rows[method if method not in rows else f"{method} (again)"] = (scores(model), result.wall_s)
        print(f"{final}, exported checkpoint: accuracy on all {len(tx)} held-out digits and on the {len(fx)} flipped "
              f"digits client {args.byzantine} trained on; wall s of the unlearning operation")
        con.print(comparison_table("Byzantine client, forgotten",
                                   ["model", "held-out acc %", "flipped-client-data acc %", "wall s"],
                                   [[k, f"{100 * a:.1f}", f"{100 * f:.1f}", "-" if s is None else f"{s:.2f}"]
                                    for k, ((a, f), s) in rows.items()]))
        print(f"CLI equivalent: umig unlearn --store {work / 'original'} --client {byzantine} --method {args.method} "
              "--no-eval")

        (acc0, f0), _ = rows["original"]
        (acc_r, f_r), _ = rows["retrain"]
        (acc_m, f_m), _ = list(rows.values())[-1]
        ok = acc_m >= acc_r - MAX_ACC_GAP
        print(f"byzantine client: held-out accuracy {100 * acc0:.1f}% -> {100 * acc_m:.1f}% with {args.method} "
              f"(retrain {100 * acc_r:.1f}%), flipped-data accuracy {100 * f0:.1f}% -> {100 * f_m:.1f}% "
              f"(retrain {100 * f_r:.1f}%): {'PASS' if ok else 'FAIL'} (held-out accuracy at most "
              f"{100 * MAX_ACC_GAP:.0f} points below retrain)")
    if args.check and not ok:
        print(f"--check: {args.method} missed the target", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
