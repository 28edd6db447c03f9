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

import argparse
import copy
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from umig.arch import ArchSpec  # noqa: E402
from umig.data import digits_client_split, parse_labels  # noqa: E402
from umig.lineage import DataParallelRecorder, FisherCapture, fit, fresh_model, subset_ref  # noqa: E402
from umig.store import Store  # noqa: E402
from umig.train import Recipe, fedavg  # noqa: E402

DIGITS_TRAIN = "sklearn:digits?split=train"
DIGITS_TEST = "sklearn:digits?split=test"
ARCH = ArchSpec("umig.models:digits_cnn", {"num_classes": 10})
CLASSES = tuple(range(10))


def build(store: Store, *, ranks: int = 3, syncs: int = 3, local_epochs: int = 2, seed: int = 0,
          arch: ArchSpec = ARCH, prefix: str = "ddp", lr: float = 0.01, capture: bool = False, log=print) -> dict:
    """Train and record ``syncs`` sync steps of ``ranks``-way data parallelism; returns the names.

    ``capture``: each replica's model FIM comes from its last local epoch (``FisherCapture``).
    """
    base = Recipe(optimizer="adam", lr=lr, epochs=local_epochs, batch_size=64, seed=seed)
    shards = [subset_ref(store, DIGITS_TRAIN, idx) for idx in digits_client_split(ranks, split="train", seed=seed)]
    rec = DataParallelRecorder(store, arch, prefix=prefix, classes=CLASSES, recipe=base)
    out: dict = {"shards": [], "syncs": [], "recorder": rec}
    train_s = 0.0
    with rec.batch():  # one transaction for the whole run
        model = fresh_model(arch, seed)
        out["init"] = rec.initial(model).name
        for s in range(1, syncs + 1):
            replicas, names = [], []
            for r, shard in enumerate(shards):
                t0 = time.perf_counter()
                recipe = Recipe(**{**base.to_json(), "seed": seed + 100 * s + r})
                replica = copy.deepcopy(model)
                cap = FisherCapture(replica, CLASSES, **store.fisher_settings()) if capture else None
                fit(replica, shard, recipe, CLASSES, capture=cap)
                train_s += time.perf_counter() - t0
                names.append(rec.shard(s, r, replica, shard, recipe=recipe, fim=cap.fim() if cap else None).name)
                replicas.append(replica.state_dict())
            t0 = time.perf_counter()
            model = fresh_model(arch, seed)
            model.load_state_dict(fedavg(replicas, rec.weights(names)))
            train_s += time.perf_counter() - t0
            out["shards"].append(names)
            out["syncs"].append(rec.sync(s, model).name)
            log(f"  sync {s}: {ranks} replicas -> {out['syncs'][-1]}")
    out["train_s"] = train_s
    return out


def summary_line(result) -> str:
    """Worst AD_f after, mean held-out AD_r change, FIUn time."""
    def vals(key):
        return [n.metrics[key] for n in result.nodes if n.metrics.get(key) is not None]

    changes = [n.metrics["AD_r_heldout_after"] - n.metrics["AD_r_heldout_before"] for n in result.nodes
               if n.metrics.get("AD_r_heldout_after") is not None]
    return (f"FIUn forgot label(s) {','.join(map(str, result.labels))} on {len(result.nodes)} node(s) in "
            f"{result.wall_s:.3f} s: worst AD_f {100 * max(vals('AD_f_train_after'), default=0):.1f}% (train) / "
            f"{100 * max(vals('AD_f_heldout_after'), default=0):.1f}% (held-out), mean held-out AD_r change "
            f"{100 * sum(changes) / max(len(changes), 1):+.1f} points")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 syncs of 1 local epoch (for tests)")
    ap.add_argument("--store", type=Path, help="store directory (default: a temporary one, removed at exit)")
    ap.add_argument("--labels", default="5", help="labels to forget, e.g. 5 or 1,2")
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--local-epochs", type=int, default=2, help="local epochs between two sync points")
    ap.add_argument("--capture-fim", action="store_true",
                    help="model FIMs from the last local epoch (FisherCapture) instead of an extra pass")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.syncs, args.local_epochs = 2, 1
    torch.set_num_threads(args.threads)
    from rich.console import Console

    from cli.render import result_table, summary_table

    con = Console(width=max(Console().width, 150))
    tmp = None if args.store else tempfile.mkdtemp(prefix="umig-ddp-")
    root = args.store or Path(tmp) / "store"
    try:
        shutil.rmtree(root, ignore_errors=True)
        store = Store.init(root)
        print(f"training {args.ranks}-way data parallel on digits, {args.syncs} sync points ...", flush=True)
        t0 = time.perf_counter()
        run = build(store, ranks=args.ranks, syncs=args.syncs, local_epochs=args.local_epochs, seed=args.seed,
                    capture=args.capture_fim)
        rec = run["recorder"]
        print(f"recorded {len(rec.nodes)} models in {time.perf_counter() - t0:.1f} s "
              f"(training {run['train_s']:.1f} s, recording {rec.seconds:.2f} s)")
        con.print(summary_table(store.graph()))
        labels = parse_labels(args.labels)
        result = store.unlearn(labels, eval_data=DIGITS_TEST)
        con.print(result_table(result))
        print(summary_line(result))
        store.close()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
