"""Multi-root unlearning (the paper's Fig. 4 case): two discovery nodes with different forget labels.

Three label-skewed federated clients on digits: client 0 holds digits 0-4 (so label 1 but
not 7), client 1 holds 5-9 (7 but not 1), client 2 holds every digit except 1 and 7. Forget
{1, 7}: round 1's client 0 is the discovery node for label 1, client 1 the one for label 7.

* Their own personalised models (``fl/personal0`` below client 0, ``fl/personal1`` below
  client 1) inherit from one discovery node each: single-root subgraphs.
* Round 1's global model and everything after it inherit from both: the subgraphs overlap
  and these nodes use the merged FIM (element-wise max of both discovery nodes' unlearning
  FIMs), computed once for the whole group. (After each FedAvg the server fine-tunes the
  global model on a small public set, so the shared models really know both labels.)

    python examples/multi_root.py [--quick] [--store DIR] [--labels 1,7]
"""

from __future__ import annotations

import time

import numpy as np

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import CLASSES, averaged, console, example_parser, example_store, parse_args, train_copy

from umig.arch import ArchSpec
from umig.data import parse_labels, resolve
from umig.demo import DEFAULT_ARCH as ARCH, DIGITS_TEST, DIGITS_TRAIN
from umig.lineage import FederatedRecorder, fresh_model, subset_ref
from umig.api import Store
from umig.train import Recipe

CLIENT_LABELS = ((0, 1, 2, 3, 4), (5, 6, 7, 8, 9), (0, 2, 3, 4, 5, 6, 8, 9))


def skewed_shards(client_labels=CLIENT_LABELS, seed: int = 0, public: int = 15) -> tuple[list[np.ndarray], np.ndarray]:
    """Client shards (each label split evenly among the clients that hold it) and the server's public set.

    The public set holds ``public`` samples of every label; it is kept out of the shards.
    """
    y = resolve(DIGITS_TRAIN).targets.numpy()
    rs = np.random.RandomState(seed)
    parts: list[list[np.ndarray]] = [[] for _ in client_labels]
    pub = []
    for c in range(10):
        idx = rs.permutation(np.flatnonzero(y == c))
        pub.append(idx[:public])
        holders = [i for i, labels in enumerate(client_labels) if c in labels]
        for i, chunk in zip(holders, np.array_split(idx[public:], len(holders))):
            parts[i].append(chunk)
    return ([np.sort(np.concatenate(p)).astype(np.int64) for p in parts],
            np.sort(np.concatenate(pub)).astype(np.int64))


def build(store: Store, *, rounds: int = 2, epochs: int = 3, server_epochs: int = 3, personal_epochs: int = 2,
          seed: int = 0, arch: ArchSpec = ARCH, prefix: str = "fl", log=print) -> dict:
    """Label-skewed FL with server-side fine-tuning and personalised models; returns the recorded names.

    FedAvg alone never predicts a label only one of three skewed clients holds (the other
    two push its logit down), so after each aggregation the server fine-tunes the global
    model on a small public set with every label (``FederatedRecorder.server``); the
    next round starts from that model.
    """
    base = Recipe(optimizer="adam", lr=0.01, epochs=epochs, batch_size=64, seed=seed)
    shard_idx, public_idx = skewed_shards(seed=seed)
    shards = [subset_ref(store, DIGITS_TRAIN, idx) for idx in shard_idx]
    public = subset_ref(store, DIGITS_TRAIN, public_idx)
    rec = FederatedRecorder(store, arch, prefix=prefix, classes=CLASSES, recipe=base)
    out: dict = {"clients": [], "globals": [], "servers": [], "personal": [], "recorder": rec}
    with rec.batch():  # one transaction for the whole run
        global_model = fresh_model(arch, seed)
        out["init"] = rec.initial(global_model).name
        for r in range(1, rounds + 1):
            states, names = [], []
            for c, shard in enumerate(shards):
                model, recipe = train_copy(global_model, shard, base, seed=seed + 100 * r + c)
                names.append(rec.client(r, c, model, shard, recipe=recipe).name)
                states.append(model.state_dict())
                if r == 1 and c < 2:  # a personalised model below each discovery client
                    personal, p_recipe = train_copy(model, shard, base, epochs=personal_epochs, lr=0.005,
                                                    seed=seed + 7 + c)
                    out["personal"].append(rec.record(f"{prefix}/personal{c}", personal, parents=[names[-1]],
                                                      relation="finetune", data=shard, recipe=p_recipe).name)
            global_model = averaged(arch, seed, states, rec.weights(names))
            out["clients"].append(names)
            out["globals"].append(rec.aggregate(r, global_model).name)
            global_model, s_recipe = train_copy(global_model, public, base, epochs=server_epochs, lr=0.005,
                                                seed=seed + 50 + r)
            out["servers"].append(rec.server(r, global_model, public, recipe=s_recipe).name)
            log(f"  round {r}: clients hold {', '.join(_ranges(l) for l in CLIENT_LABELS)} -> {out['globals'][-1]}"
                f" -> {out['servers'][-1]} ({len(public)} public samples)")
    return out


def _ranges(labels) -> str:
    from umig.data import format_labels

    return "{" + format_labels(labels) + "}"


def main(argv: list[str] | None = None) -> int:
    ap = example_parser(__doc__, quick="1 round, 2 epochs", labels="1,7",
                        labels_help="labels to forget (default 1,7: one per discovery client)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3)
    args = parse_args(ap, argv, quick={"rounds": 1, "epochs": 2})
    from rich.table import Table

    from umig.cli.render import graph_tree, result_table

    con = console()
    with example_store(args.store, prefix="umig-multiroot-") as store:
        print("training label-skewed federated clients with personalised models on digits ...", flush=True)
        t0 = time.perf_counter()
        build(store, rounds=args.rounds, epochs=args.epochs, seed=args.seed)
        print(f"trained and recorded {len(store)} models in {time.perf_counter() - t0:.1f} s")
        con.print(graph_tree(store.graph(), max_nodes=40))

        labels = parse_labels(args.labels)
        plan = store.plan_unlearning(labels).plan
        g = store.graph()
        t = Table(title=f"unlearning subgraphs for labels {','.join(map(str, labels))}: "
                        f"{len(plan.discovery)} discovery nodes, {len(plan.groups)} merge groups")
        for col in ("traces back to (discovery)", "their forget labels", "nodes (one merged FIM each group)"):
            t.add_column(col)
        for key, nodes in plan.groups:
            held = sorted(set(labels) & set().union(*(g.nodes[d]["labels"] for d in key)))
            kind = "multi-root" if len(key) > 1 else "single-root"
            t.add_row(f"{', '.join(sorted(key))} [dim]({kind})[/]", ",".join(map(str, held)), ", ".join(nodes))
        con.print(t)

        result = store.unlearn(labels, eval_data=DIGITS_TEST)
        con.print(result_table(result))
        multi = [n for key, nodes in plan.groups if len(key) > 1 for n in nodes]
        by = {n.name: n.metrics for n in result.nodes}
        worst = max((max(by[n].get("AD_f_train_after") or 0, by[n].get("AD_f_heldout_after") or 0) for n in multi),
                    default=0.0)
        print(f"FIUn forgot label(s) {','.join(map(str, labels))} on {len(result.nodes)} node(s) in "
              f"{result.wall_s:.3f} s from {len(plan.discovery)} discovery nodes; worst AD_f on the "
              f"{len(multi)} multi-root node(s): {100 * worst:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
