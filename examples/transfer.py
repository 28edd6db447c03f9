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

import time

import torch

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import Stopwatch, console, example_parser, example_store, parse_args, print_result, recorded_line
from incremental import class_pools, step_indices  # the per-class sampling of examples/incremental.py

from umig.arch import ArchSpec
from umig.data import parse_labels
from umig.demo import DEFAULT_ARCH as ARCH, DIGITS_TEST, DIGITS_TRAIN
from umig.lineage import TransferRecorder, fit, fresh_model, inherit_weights, subset_ref
from umig.api import Store
from umig.train import Recipe

BASE = (0, 1, 2, 3, 4, 5)
CHAIN = ((6, 7), (8, 9))  # head k adds these classes to its parent's
SIDE = (6, 7, 8, 9)  # a new-task head from the base


def build(store: Store, *, base=BASE, chain=CHAIN, side=SIDE, epochs: int = 5, head_epochs: int = 10,
          replay: int = 40, seed: int = 0, arch: ArchSpec = ARCH, prefix: str = "tl", lr: float = 0.01,
          exact_fim: bool = False, log=print) -> dict:
    """Train and record a base and its transfer heads; returns the recorded names.

    Each model FIM is the one ``fit`` captured from the model's last epoch; ``exact_fim`` computes it
    with an extra pass instead.
    """
    pools = class_pools(seed)
    rec = TransferRecorder(store, arch, prefix=prefix, exact_fim=exact_fim)
    out: dict = {"heads": [], "recorder": rec}
    training = Stopwatch()
    with rec.batch():  # one transaction for the whole run
        base = tuple(base)
        data = subset_ref(store, DIGITS_TRAIN, step_indices(pools, base, (), replay, seed))
        recipe = Recipe(optimizer="adam", lr=lr, epochs=epochs, batch_size=64, seed=seed)
        with training:
            base_model = fresh_model(rec.arch_for(base), recipe.seed)
            fit(base_model, data, recipe, base, capture=not exact_fim)
        out["base"] = rec.base(base_model, data, classes=base, recipe=recipe).name
        log(f"  {out['base']}: full training on classes {base[0]}-{base[-1]}, {len(data)} samples")

        def transfer(parent_model, parent_classes, new, parent_name, k, name=None, keep_old=True):
            classes = tuple(sorted(set(parent_classes) | set(new))) if keep_old else tuple(new)
            old = tuple(c for c in classes if c not in new)
            d = subset_ref(store, DIGITS_TRAIN, step_indices(pools, tuple(new), old, replay, seed + 10 + k))
            r = Recipe(optimizer="adam", lr=lr, epochs=head_epochs, batch_size=64, seed=seed + 10 + k,
                       train_only="fc")
            with training:
                m = fresh_model(rec.arch_for(classes), r.seed)
                inherit_weights(m, parent_model, parent_classes, classes)  # body copied, known head rows kept
                fit(m, d, r, classes, capture=not exact_fim)
            info = rec.head(m, d, classes=classes, parent=parent_name, recipe=r, name=name)
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
    out["train_s"] = training.seconds
    return out


def main(argv: list[str] | None = None) -> int:
    ap = example_parser(__doc__, quick="2 base epochs, 3 head epochs", labels="3",
                        labels_help="labels to forget (from the base's 0-5), e.g. 3 or 1,3")
    ap.add_argument("--epochs", type=int, default=5, help="base training epochs")
    ap.add_argument("--head-epochs", type=int, default=10, help="head-only fine-tuning epochs")
    args = parse_args(ap, argv, exact_fim=True, quick={"epochs": 2, "head_epochs": 3})
    from umig.cli.render import node_table

    con = console()
    with example_store(args.store, prefix="umig-tl-") as store:
        print("training a base model and transfer heads on digits ...", flush=True)
        t0 = time.perf_counter()
        run = build(store, epochs=args.epochs, head_epochs=args.head_epochs, seed=args.seed, exact_fim=args.exact_fim)
        print(recorded_line(run, time.perf_counter() - t0))
        rec = run["recorder"]
        base_sd = store.state_dict(run["base"])
        same = all(torch.equal(v, base_sd[k]) for n in rec.nodes for k, v in store.state_dict(n).items()
                   if not k.startswith("fc."))
        print(f"body weights (BatchNorm statistics included) of every head identical to the base's: {same}")
        con.print(node_table(store.graph(), rec.nodes))
        labels = parse_labels(args.labels)
        result = store.unlearn(labels, eval_data=DIGITS_TEST)
        print_result(con, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
