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
from _common import (accuracy, against_retrain, check_exit, comparison_table, console, exported_model,
                     fedavg_lineage, forget_parser, parse_forget_args, recorded_line, verdict_line, work_dir)

from safetensors.torch import save_file

from umig.api import Store
from umig.data import digits_client_split, resolve
from umig.demo import DIGITS_TEST, DIGITS_TRAIN
from umig.lineage import subset_ref

MAX_ACC_GAP = 0.02


def main(argv: list[str] | None = None) -> int:
    ap = forget_parser(__doc__)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--byzantine", type=int, default=3, help="the client that flips its labels")
    args = parse_forget_args(ap, argv, "client")
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

        rows, wall = against_retrain(work, final, args.method, f"client {byzantine}", scores, original,
                                     clients=[byzantine])
        print(f"{final}, exported checkpoint: accuracy on all {len(tx)} held-out digits and on the {len(fx)} flipped "
              f"digits client {args.byzantine} trained on; wall s of the unlearning operation")
        con.print(comparison_table("Byzantine client, forgotten",
                                   ["model", "held-out acc %", "flipped-client-data acc %", "wall s"], rows, wall))
        print(f"CLI equivalent: umig unlearn --store {work / 'original'} --client {byzantine} --method {args.method} "
              "--no-eval")

        _, (acc_r, _), (acc_m, _) = rows.values()  # original, retrain, METHOD: held-out accuracy
        ok = acc_m >= acc_r - MAX_ACC_GAP
        print(verdict_line("byzantine client", args.method, ("held-out accuracy", "flipped-data accuracy"), rows, ok,
                           f"held-out accuracy at most {100 * MAX_ACC_GAP:.0f} points below retrain"))
    return check_exit(args.check, ok, f"{args.method} missed the target")


if __name__ == "__main__":
    raise SystemExit(main())
