"""Backdoor removal in federated learning: forget exactly the samples one client poisoned.

One of 3 FL clients (default client 1, a data-rich one holding half the training digits) adds
poisoned copies of about a third of its digits: a 2x2 patch in the top-left corner, as bright as
the brightest pixel, relabelled as the target class (0). After 2 FedAvg rounds the global model
has the backdoor: triggered held-out images of other digits come out as 0 (attack success rate,
ASR) while clean accuracy stays high. (With equal shares FedAvg dilutes this 2-round backdoor to
an ASR of 15-50%; ``--victim-share 0.33`` shows it.)

The training digits plus the poisoned copies are written to one ``train.safetensors`` (x, y);
every client's data is a subset of it, and the copies' indices go to ``poison.npy``. Those
samples are then forgotten across the lineage with METHOD, and with ``retrain`` (every affected
node retrained without them from its recorded recipe: the exact reference), each on its own copy
of the store. The final global is exported and the exported checkpoint evaluated: ASR, clean
held-out accuracy and the method's wall time. ``--check`` exits 1 unless the backdoor was planted
(ASR >= 50% before) and METHOD's ASR is at most 2 points above retrain's and its clean accuracy at
most 1 point below.

    python examples/backdoor.py [--quick] [--check] [--method retrain] [--store DIR]
"""

from __future__ import annotations

import argparse
import time

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import (accuracy, against_retrain, check_exit, comparison_table, console, exported_model,
                     fedavg_lineage, forget_parser, parse_forget_args, recorded_line, verdict_line, work_dir)

import numpy as np
import torch
from safetensors.torch import save_file

from umig.api import Store
from umig.data import read_indices, resolve, save_subset
from umig.demo import DIGITS_TEST, DIGITS_TRAIN
from umig.forget import ForgetSet, samples
from umig.lineage import subset_ref

MIN_ASR_BEFORE, MAX_ASR_GAP, MAX_ACC_GAP = 0.50, 0.02, 0.01


def trigger(x: torch.Tensor, value: float) -> torch.Tensor:
    """Copies of ``x`` (N, 1, 8, 8) with a 2x2 patch of ``value`` in the top-left corner."""
    out = x.clone()
    out[..., :2, :2] = value
    return out


def poison_options(ap: argparse.ArgumentParser) -> None:
    """``--victim``, ``--victim-share``, ``--target`` and ``--fraction``: which client poisons how much of its
    data, and towards which label (:func:`poison_data`)."""
    ap.add_argument("--victim", type=int, default=1, help="the client that poisons its data")
    ap.add_argument("--victim-share", type=float, default=0.5, help="the victim's share of the training digits")
    ap.add_argument("--target", type=int, default=0, help="the label triggered images are relabelled to")
    ap.add_argument("--fraction", type=float, default=1 / 3, help="poisoned copies, as a share of the client's data")


def poison_data(work, *, clients: int, victim: int, share: float, target: int, fraction: float, seed: int):
    """Write train.safetensors (the training digits, then the poisoned copies) and poison.npy.

    Returns the path and each client's indices into it: ``share`` of the digits for the victim
    and equal parts of the rest for the others, plus the poisoned copies for the victim (copies
    of non-target digits, ``fraction`` as many as its own).
    """
    x, y = resolve(DIGITS_TRAIN).dataset.tensors
    order = np.random.RandomState(seed).permutation(len(x))
    n_victim = round(share * len(x))
    parts = [np.sort(p) for p in np.array_split(order[n_victim:], clients - 1)]
    parts.insert(victim, np.sort(order[:n_victim]))
    own = parts[victim][y[parts[victim]].numpy() != target]
    chosen = np.sort(np.random.RandomState(seed).choice(own, round(fraction * len(parts[victim])), replace=False))
    px = trigger(x[chosen], float(x.max()))
    path = work / "train.safetensors"
    save_file({"x": torch.cat([x, px]).contiguous(), "y": torch.cat([y, torch.full((len(chosen),), target)])},
              str(path))
    poison = np.arange(len(x), len(x) + len(chosen))
    save_subset(work / "poison.npy", poison)
    parts[victim] = np.concatenate([parts[victim], poison])
    return path, parts


def main(argv: list[str] | None = None) -> int:
    ap = forget_parser(__doc__)
    ap.add_argument("--clients", type=int, default=3)
    poison_options(ap)
    args = parse_forget_args(ap, argv, "samples")
    con = console()
    with work_dir(args.store, "umig-backdoor-") as work:
        train_path, parts = poison_data(work, clients=args.clients, victim=args.victim, share=args.victim_share,
                                        target=args.target, fraction=args.fraction, seed=args.seed)
        n_poison = len(read_indices(work / "poison.npy"))
        print(f"wrote {train_path} ({sum(map(len, parts))} client samples; client {args.victim} holds "
              f"{n_poison} triggered copies labelled {args.target}) and {work / 'poison.npy'}")
        print(f"training a {args.clients}-client x {args.rounds}-round FedAvg lineage on it ...", flush=True)
        t0 = time.perf_counter()
        store = Store.init(work / "original")
        run = fedavg_lineage(store, [subset_ref(store, str(train_path), p) for p in parts], rounds=args.rounds,
                             epochs=args.epochs, seed=args.seed)
        print(recorded_line(run, time.perf_counter() - t0))
        final = run["globals"][-1]
        original = exported_model(store, final, work / "original.safetensors")
        store.close()

        tx, ty = resolve(DIGITS_TEST).dataset.tensors
        others = ty != args.target
        triggered = trigger(tx[others], float(tx.max()))

        def scores(model) -> tuple[float, float]:  # (ASR, clean accuracy), held-out digits
            return accuracy(model, triggered, torch.full((len(triggered),), args.target)), accuracy(model, tx, ty)

        forget = ForgetSet(samples=(samples(read_indices(work / "poison.npy"), str(train_path)),))
        rows, wall = against_retrain(work, final, args.method, f"the {n_poison} poisoned samples", scores, original,
                                     forget=forget)
        print(f"{final}, exported checkpoint: ASR on {len(triggered)} triggered held-out images of digits other "
              f"than {args.target}, clean accuracy on all {len(tx)} held-out digits; wall s of the unlearning operation")
        con.print(comparison_table("backdoor in federated learning, forgotten", ["model", "ASR %", "clean acc %", "wall s"],
                                   rows, wall))
        print(f"CLI equivalent: umig unlearn --store {work / 'original'} --samples {work / 'poison.npy'} "
              f"--data {train_path} --method {args.method} --no-eval")

        (asr0, _), (asr_r, acc_r), (asr_m, acc_m) = rows.values()  # original, retrain, METHOD
        ok = asr0 >= MIN_ASR_BEFORE and asr_m <= asr_r + MAX_ASR_GAP and acc_m >= acc_r - MAX_ACC_GAP
        print(verdict_line("backdoor", args.method, ("ASR", "clean accuracy"), rows, ok,
                           f"ASR before >= {100 * MIN_ASR_BEFORE:.0f}%, at most {100 * MAX_ASR_GAP:.0f} points above "
                           f"retrain, clean accuracy at most {100 * MAX_ACC_GAP:.0f} below"))
    return check_exit(args.check, ok, f"{args.method} missed the targets")


if __name__ == "__main__":
    raise SystemExit(main())
