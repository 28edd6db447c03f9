"""An incident, not a deletion request: find the poisoned samples behind a backdoor, then forget them.

The lineage is ``examples/backdoor.py``'s: 3 FL clients, 2 FedAvg rounds; client 1 (half the
training digits) adds triggered copies of a third of its digits (a 2x2 patch in the top-left
corner) relabelled 0. This time nobody says which samples are poisoned. What the operator has is
the incident: held-out digits carrying the patch come out as 0. Those inputs go to a file, and

1. ``umig attribute FINAL --inputs incident.safetensors --labels 0 --by client`` ranks the clients
   (TracIn over the lineage's stored checkpoints: every client's start and end model per round);
2. ``--by sample`` ranks the training samples; the top ones down to the first sample of another
   client (``Attribution.leading_run``: the other clients show how high clean samples score) are
   the found set, written with ``-o found.npy`` as indices into ``train.safetensors``;
3. ``umig unlearn --samples found.npy --data train.safetensors --method METHOD`` forgets them
   across the lineage, and ``umig verify OP --samples found.npy`` judges the operation against
   retraining without them;
4. the result is set against a model retrained without the *true* poison (which only this example
   knows): attack success (ASR: triggered held-out digits other than 0 classified as 0) and clean
   held-out accuracy of the exported final global.

Everything runs on copies of the recorded store (the attribution itself never writes). ``--check``
exits 1 unless the poisoning client is ranked first and the forgotten model's ASR is at most 2
points above the true-set retrain's and its clean accuracy at most 1 point below.

    python examples/incident.py [--quick] [--check] [--method retrain] [--store DIR]
"""

from __future__ import annotations

import time

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import (accuracy, check_exit, comparison_table, console, exported_model, fedavg_lineage, forget_parser,
                     parse_forget_args, recorded_line, unlearn_copy, work_dir)
from backdoor import poison_data, poison_options, trigger  # the poisoning of examples/backdoor.py

import numpy as np
import torch
from safetensors.torch import save_file

from umig.api import Store
from umig.attribution import DEFAULT_METHOD, attribute
from umig.cli.render import attribution_view
from umig.data import read_indices, resolve
from umig.demo import DIGITS_TEST
from umig.forget import ForgetSet, samples
from umig.lineage import subset_ref
from umig.verify import verify

MAX_ASR_GAP, MAX_ACC_GAP = 0.02, 0.01


def main(argv: list[str] | None = None) -> int:
    ap = forget_parser(__doc__, copies="copies")
    ap.add_argument("--attribution", default=DEFAULT_METHOD, help="attribution method (umig attribute --method)")
    poison_options(ap)
    args = parse_forget_args(ap, argv, "samples")
    con = console()
    with work_dir(args.store, "umig-incident-") as work:
        train_path, parts = poison_data(work, clients=3, victim=args.victim, share=args.victim_share,
                                        target=args.target, fraction=args.fraction, seed=args.seed)
        poison = read_indices(work / "poison.npy")  # the ground truth: only the final comparison reads it
        print(f"training a 3-client x {args.rounds}-round FedAvg lineage on {train_path}, client {args.victim} "
              f"poisoned ...", flush=True)
        t0 = time.perf_counter()
        with Store.init(work / "original") as store:
            run = fedavg_lineage(store, [subset_ref(store, str(train_path), p) for p in parts], rounds=args.rounds,
                                 epochs=args.epochs, seed=args.seed)
            print(recorded_line(run, time.perf_counter() - t0))
            final = run["globals"][-1]
            victim = run["clients"][0][args.victim]
            original = exported_model(store, final, work / "original.safetensors")

        tx, ty = resolve(DIGITS_TEST).dataset.tensors
        triggered = trigger(tx[ty != args.target], float(tx.max()))
        incident = work / "incident.safetensors"
        save_file({"x": triggered.contiguous()}, str(incident))

        def scores(model: torch.nn.Module) -> tuple[float, float]:  # (ASR, clean accuracy), held-out digits
            return accuracy(model, triggered, torch.full((len(triggered),), args.target)), accuracy(model, tx, ty)

        asr0, acc0 = scores(original)
        print(f"incident: {100 * asr0:.1f}% of {len(triggered)} held-out digits carrying the patch come out as "
              f"{args.target} (clean accuracy {100 * acc0:.1f}%); inputs in {incident}")

        with Store.open(work / "original") as store:
            found_by = attribute(store, final, incident, labels=[args.target], method=args.attribution)
            k = found_by.leading_run()
            for view in (*attribution_view(found_by.to_json("client")), *attribution_view(found_by.to_json("sample", 10))):
                con.print(view)
            written = found_by.write_samples(work / "found.npy", k)
        top_client = found_by.by_client()[0]["client"]
        found = read_indices(written[0]["path"])
        hits = int(np.isin(found, poison).sum())
        print(f"found set: the top {k} samples, down to the first one {top_client} did not train on "
              f"({hits} of them poisoned: precision {hits / max(k, 1):.2f}, recall {hits / len(poison):.2f} "
              f"of the {len(poison)} planted); {written[0]['path']}")
        print(f"CLI equivalent: umig attribute {final} --store {work / 'original'} --inputs {incident} "
              f"--labels {args.target} --by sample --top {k} -o {work / 'found.npy'}")

        print(f"forgetting the {k} found samples with {args.method} (copy of the store: {work / 'unlearned'}) ...",
              flush=True)
        forget = ForgetSet(samples=(samples(found, str(train_path)),))
        model, result = unlearn_copy(work / "original", work / "unlearned", final, forget=forget, method=args.method)
        with Store.open(work / "unlearned") as store:
            judged = verify(store, result.operation, data=DIGITS_TEST, samples=[found])
        print(f"umig verify {result.operation} --samples found.npy --data {DIGITS_TEST}: "
              f"{judged['method']} vs {judged['reference_method']}"
              f" on {len(judged['nodes'])} node(s), Avg. Gap mean {judged['avg_gap']} / worst {judged['max_avg_gap']} "
              f"points")
        print(f"retraining without the true {len(poison)} poisoned samples (the reference only this example has) ...",
              flush=True)
        truth_model, _ = unlearn_copy(work / "original", work / "truth", final,
                                      forget=ForgetSet(samples=(samples(poison, str(train_path)),)), method="retrain")
        rows = {"original": scores(original), f"forgot the {k} found ({args.method})": scores(model),
                f"retrained without the {len(poison)} poisoned": scores(truth_model)}
        print(f"{final}, exported checkpoint: ASR on {len(triggered)} triggered held-out images of digits other than "
              f"{args.target}, clean accuracy on all {len(tx)} held-out digits")
        con.print(comparison_table("incident: before and after forgetting what attribution found",
                                   ["model", "ASR %", "clean acc %"], rows))
        (asr_m, acc_m), (asr_t, acc_t) = list(rows.values())[1:]
        ok = top_client == victim and asr_m <= asr_t + MAX_ASR_GAP and acc_m >= acc_t - MAX_ACC_GAP
        print(f"incident: {top_client} ranked first (poisoner {victim}); forgot {k} samples ({hits} of "
              f"{len(poison)} poisoned found): ASR {100 * asr0:.1f}% -> {100 * asr_m:.1f}% (true set "
              f"{100 * asr_t:.1f}%), clean accuracy {100 * acc0:.1f}% -> {100 * acc_m:.1f}% (true set "
              f"{100 * acc_t:.1f}%): {'PASS' if ok else 'FAIL'} (poisoner first, ASR at most "
              f"{100 * MAX_ASR_GAP:.0f} points above the true-set retrain, clean accuracy at most "
              f"{100 * MAX_ACC_GAP:.0f} below)")
    return check_exit(args.check, ok, "the incident was not traced and removed")


if __name__ == "__main__":
    raise SystemExit(main())
