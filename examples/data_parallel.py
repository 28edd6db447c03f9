"""Distributed data-parallel training on digits, recorded with umig.lineage.DataParallelRecorder.

Three ranks each hold a fixed shard of the training set. Between two sync points every
rank trains a replica of the last synced model on its shard (local SGD for
``--local-epochs``); the sync point averages the replicas, weighted by shard size. Each
replica and each sync point is a node (relations ``finetune`` and ``sync``), so a deletion
request reaches every model that saw the data. Then FIUn forgets the labels (default 5)
and the before/after table is printed.

    python examples/data_parallel.py [--quick] [--store DIR] [--labels 5] [--ranks 3] [--syncs 3]
"""

from __future__ import annotations

import time

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import (CLASSES, Stopwatch, averaged, console, example_parser, example_store, parse_args, print_result,
                     recorded_line, train_copy)

from umig.arch import ArchSpec
from umig.data import digits_client_split, parse_labels
from umig.demo import DEFAULT_ARCH as ARCH, DIGITS_TEST, DIGITS_TRAIN
from umig.lineage import DataParallelRecorder, fresh_model, subset_ref
from umig.api import Store
from umig.train import Recipe


def build(store: Store, *, ranks: int = 3, syncs: int = 3, local_epochs: int = 2, seed: int = 0,
          arch: ArchSpec = ARCH, prefix: str = "ddp", lr: float = 0.01, exact_fim: bool = False, log=print) -> dict:
    """Train and record ``syncs`` sync steps of ``ranks``-way data parallelism; returns the names.

    Each replica's model FIM is the one ``fit`` captured from its last local epoch; ``exact_fim``
    computes it with an extra pass instead.
    """
    base = Recipe(optimizer="adam", lr=lr, epochs=local_epochs, batch_size=64, seed=seed)
    shards = [subset_ref(store, DIGITS_TRAIN, idx) for idx in digits_client_split(ranks, split="train", seed=seed)]
    rec = DataParallelRecorder(store, arch, prefix=prefix, classes=CLASSES, recipe=base, exact_fim=exact_fim)
    out: dict = {"shards": [], "syncs": [], "recorder": rec}
    training = Stopwatch()
    with rec.batch():  # one transaction for the whole run
        model = fresh_model(arch, seed)
        out["init"] = rec.initial(model).name
        for s in range(1, syncs + 1):
            replicas, names = [], []
            for r, shard in enumerate(shards):  # every rank: local SGD from the last synced model
                with training:
                    replica, recipe = train_copy(model, shard, base, seed=seed + 100 * s + r, capture=not exact_fim)
                names.append(rec.shard(s, r, replica, shard, recipe=recipe).name)
                replicas.append(replica.state_dict())
            with training:
                model = averaged(arch, seed, replicas, rec.weights(names))  # the sync point
            out["shards"].append(names)
            out["syncs"].append(rec.sync(s, model).name)
            log(f"  sync {s}: {ranks} replicas -> {out['syncs'][-1]}")
    out["train_s"] = training.seconds
    return out


def main(argv: list[str] | None = None) -> int:
    ap = example_parser(__doc__, quick="2 syncs of 1 local epoch", labels="5",
                        labels_help="labels to forget, e.g. 5 or 1,2")
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=2, help="local epochs between two sync points")
    args = parse_args(ap, argv, exact_fim=True, quick={"syncs": 2, "local_epochs": 1})
    from umig.cli.render import summary_table

    con = console()
    with example_store(args.store, prefix="umig-ddp-") as store:
        print(f"training {args.ranks}-way data parallel on digits, {args.syncs} sync points ...", flush=True)
        t0 = time.perf_counter()
        run = build(store, ranks=args.ranks, syncs=args.syncs, local_epochs=args.local_epochs, seed=args.seed,
                    exact_fim=args.exact_fim)
        print(recorded_line(run, time.perf_counter() - t0))
        con.print(summary_table(store.graph()))
        labels = parse_labels(args.labels)
        result = store.unlearn(labels, eval_data=DIGITS_TEST)
        print_result(con, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
