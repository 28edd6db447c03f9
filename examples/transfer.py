"""Transfer learning on digits, recorded with umig.lineage.TransferRecorder.

A base CNN is trained on digits 0-5. Heads are then fine-tuned from it with only the
classifier trained (``Recipe(train_only="fc")``; the body, BatchNorm statistics included,
stays frozen, so the store keeps one copy of it for all of them):

* ``tl/head0``: digits 0-7 (8 outputs), transferred from the base;
* ``tl/head1``: digits 0-9 (10 outputs), transferred from head0;
* ``tl/task69``: a new task, digits 6-9 only (4 outputs), transferred from the base.

FIUn then forgets a base label (default 3). The heads that predict it lose it; ``tl/task69``
is in the affected subgraph (it inherits the base's features) but has no row for label 3,
so FIUn leaves it unchanged and its AD_f column stays empty.

    python examples/transfer.py [--quick] [--store DIR] [--labels 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from umig.arch import ArchSpec  # noqa: E402
from umig.data import parse_labels  # noqa: E402
from umig.lineage import FisherCapture, TransferRecorder, fit, fresh_model, inherit_weights, subset_ref  # noqa: E402
from umig.store import Store  # noqa: E402
from umig.train import Recipe  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from incremental import class_pools, step_indices, summary_line  # noqa: E402

DIGITS_TRAIN = "sklearn:digits?split=train"
DIGITS_TEST = "sklearn:digits?split=test"
ARCH = ArchSpec("umig.models:digits_cnn", {"num_classes": 10})
BASE = (0, 1, 2, 3, 4, 5)
CHAIN = ((6, 7), (8, 9))  # head k adds these classes to its parent's
SIDE = (6, 7, 8, 9)  # a new-task head from the base


def build(store: Store, *, base=BASE, chain=CHAIN, side=SIDE, epochs: int = 5, head_epochs: int = 10,
          replay: int = 40, seed: int = 0, arch: ArchSpec = ARCH, prefix: str = "tl", lr: float = 0.01,
          capture: bool = False, log=print) -> dict:
    """Train and record a base and its transfer heads; returns the recorded names."""
    pools = class_pools(seed)
    rec = TransferRecorder(store, arch, prefix=prefix)
    out: dict = {"heads": [], "recorder": rec}
    train_s = 0.0
    with rec.batch():  # one transaction for the whole run
        base = tuple(base)
        data = subset_ref(store, DIGITS_TRAIN, step_indices(pools, base, (), replay, seed))
        recipe = Recipe(optimizer="adam", lr=lr, epochs=epochs, batch_size=64, seed=seed)
        t0 = time.perf_counter()
        base_model = fresh_model(rec.arch_for(base), recipe.seed)
        cap = FisherCapture(base_model, base, **store.fisher_settings()) if capture else None
        fit(base_model, data, recipe, base, capture=cap)
        train_s += time.perf_counter() - t0
        out["base"] = rec.base(base_model, data, classes=base, recipe=recipe, fim=cap.fim() if cap else None).name
        log(f"  {out['base']}: full training on classes {base[0]}-{base[-1]}, {len(data)} samples")

        def transfer(parent_model, parent_classes, new, parent_name, k, name=None, keep_old=True):
            nonlocal train_s
            classes = tuple(sorted(set(parent_classes) | set(new))) if keep_old else tuple(new)
            old = tuple(c for c in classes if c not in new)
            d = subset_ref(store, DIGITS_TRAIN, step_indices(pools, tuple(new), old, replay, seed + 10 + k))
            r = Recipe(optimizer="adam", lr=lr, epochs=head_epochs, batch_size=64, seed=seed + 10 + k,
                       train_only="fc")
            t0 = time.perf_counter()
            m = fresh_model(rec.arch_for(classes), r.seed)
            inherit_weights(m, parent_model, parent_classes, classes)  # body copied, known head rows kept
            cap = FisherCapture(m, classes, **store.fisher_settings()) if capture else None
            fit(m, d, r, classes, capture=cap)
            train_s += time.perf_counter() - t0
            info = rec.head(m, d, classes=classes, parent=parent_name, recipe=r, name=name,
                            fim=cap.fim() if cap else None)
            log(f"  {info.name}: head-only fine-tune from {parent_name} for classes "
                f"{','.join(map(str, classes))}, {info.data_size} samples")
            return m, classes, info.name

        model, classes, parent = base_model, base, out["base"]
        for k, new in enumerate(chain):
            model, classes, parent = transfer(model, classes, tuple(new), parent, k)
            out["heads"].append(parent)
        if side:
            _, _, out["side"] = transfer(base_model, base, tuple(side), out["base"], 99,
                                         name=f"{prefix}/task{''.join(map(str, side))}", keep_old=False)
    out["train_s"] = train_s
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 base epochs, 3 head epochs (for tests)")
    ap.add_argument("--store", type=Path, help="store directory (default: a temporary one, removed at exit)")
    ap.add_argument("--labels", default="3", help="labels to forget (from the base's 0-5), e.g. 3 or 1,3")
    ap.add_argument("--epochs", type=int, default=5, help="base training epochs")
    ap.add_argument("--head-epochs", type=int, default=10, help="head-only fine-tuning epochs")
    ap.add_argument("--capture-fim", action="store_true",
                    help="model FIMs from the last training epoch (FisherCapture) instead of an extra pass")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.head_epochs = 2, 3
    torch.set_num_threads(args.threads)
    from rich.console import Console

    from cli.render import node_table, result_table

    con = Console(width=max(Console().width, 150))
    tmp = None if args.store else tempfile.mkdtemp(prefix="umig-tl-")
    root = args.store or Path(tmp) / "store"
    try:
        shutil.rmtree(root, ignore_errors=True)
        store = Store.init(root)
        print("training a base model and transfer heads on digits ...", flush=True)
        t0 = time.perf_counter()
        run = build(store, epochs=args.epochs, head_epochs=args.head_epochs, seed=args.seed, capture=args.capture_fim)
        rec = run["recorder"]
        print(f"recorded {len(rec.nodes)} models in {time.perf_counter() - t0:.1f} s "
              f"(training {run['train_s']:.1f} s, recording {rec.seconds:.2f} s)")
        base_sd = store.state_dict(run["base"])
        same = all(torch.equal(v, base_sd[k]) for n in rec.nodes for k, v in store.state_dict(n).items()
                   if not k.startswith("fc."))
        print(f"body weights (BatchNorm statistics included) of every head identical to the base's: {same}")
        con.print(node_table(store.graph(), rec.nodes))
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
