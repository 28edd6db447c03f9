"""Federated learning on digits, recorded with umig.lineage.FederatedRecorder, then unlearned with FIUn.

Topology (default, multi-layer FL): 4 clients under 2 edge aggregators, 2 rounds. In every
round each client trains the previous global model on its shard (node parent: the global),
each edge aggregator FedAvg-merges its clients, and the global FedAvg-merges the edge
aggregators (weights = data shares). After the last round a DAG-FL node merges the final
global with a "late" client trained from round 1's global: two parents at different depths.

Then the labels (default 3) are forgotten across the lineage with FIUn and the before/after
table (AD_f / AD_r on every node's training data and on held-out digits) is printed.

    python examples/federated.py [--quick] [--store DIR] [--labels 3] [--flat]
"""

from __future__ import annotations

import copy
import time

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import (CLASSES, Stopwatch, averaged, console, example_parser, example_store, parse_args, print_result,
                     recorded_line, train_copy)

from umig.arch import ArchSpec
from umig.data import digits_client_split, parse_labels
from umig.demo import DEFAULT_ARCH as ARCH, DIGITS_TEST, DIGITS_TRAIN
from umig.lineage import FederatedRecorder, fresh_model, subset_ref
from umig.api import Store
from umig.train import Recipe


def build(store: Store, *, clients: int = 4, edges: int = 2, rounds: int = 2, epochs: int = 5, seed: int = 0,
          dag: bool = True, alpha: float | None = None, arch: ArchSpec = ARCH, prefix: str = "fl",
          lr: float = 0.01, exact_fim: bool = False, log=print) -> dict:
    """Train and record a (multi-layer) FedAvg lineage on digits; returns the recorded names.

    ``edges`` <= 1 gives flat FL (clients -> global). Every client records its own recipe
    (its seed), so the lineage can be retrained exactly. Each client's model FIM is the one ``fit``
    captured from its last training epoch; ``exact_fim`` computes it with an extra pass instead. Returns
    the recorder too (key ``recorder``, with ``train_s``: seconds spent training and averaging).
    """
    base = Recipe(optimizer="adam", lr=lr, epochs=epochs, batch_size=64, seed=seed)
    shards = [subset_ref(store, DIGITS_TRAIN, idx)
              for idx in digits_client_split(clients + (1 if dag else 0), split="train", seed=seed, alpha=alpha)]
    late_shard = shards.pop() if dag else None
    groups = [list(range(clients))[i::max(edges, 1)] for i in range(max(edges, 1))]
    rec = FederatedRecorder(store, arch, prefix=prefix, classes=CLASSES, recipe=base, exact_fim=exact_fim)
    out: dict = {"clients": [], "edges": [], "globals": [], "recorder": rec}
    training = Stopwatch()
    with rec.batch():  # one transaction for the whole run
        global_model = fresh_model(arch, seed)
        out["init"] = rec.initial(global_model).name
        for r in range(1, rounds + 1):
            names, states = {}, {}
            for c, shard in enumerate(shards):  # every client trains the global model on its shard
                with training:
                    model, recipe = train_copy(global_model, shard, base, seed=seed + 100 * r + c, capture=not exact_fim)
                names[c] = rec.client(r, c, model, shard, recipe=recipe).name
                states[names[c]] = model.state_dict()
            out["clients"].append([names[c] for c in range(clients)])
            edge_names = []
            if edges > 1:
                for e, members in enumerate(groups):
                    parents = [names[c] for c in members]
                    with training:
                        m = averaged(arch, seed, [states[p] for p in parents], rec.weights(parents))
                    edge_names.append(rec.aggregate(r, m, parents=parents, final=False, name=f"{prefix}/r{r}/edge{e}").name)
                    states[edge_names[-1]] = m.state_dict()
            out["edges"].append(edge_names)
            parents = rec.pending(r)  # the edge aggregators (or the clients, in flat FL)
            with training:
                global_model = averaged(arch, seed, [states[p] for p in parents], rec.weights(parents))
            out["globals"].append(rec.aggregate(r, global_model).name)
            if r == 1 and dag:
                first_global = copy.deepcopy(global_model)
            log(f"  round {r}: {len(shards)} clients, {len(edge_names)} edge aggregators -> {out['globals'][-1]}")
        if dag:
            with training:
                late, recipe = train_copy(first_global, late_shard, base, seed=seed + 999, capture=not exact_fim)
            late_name = rec.client(1, "late", late, late_shard, recipe=recipe, parent=out["globals"][0],
                                   name=f"{prefix}/late").name
            parents = [out["globals"][-1], late_name]
            with training:
                m = averaged(arch, seed, [global_model.state_dict(), late.state_dict()], rec.weights(parents))
            out["late"] = late_name
            out["dag"] = rec.aggregate(rounds, m, parents=parents, name=f"{prefix}/dag").name
            log(f"  DAG-FL: {out['dag']} merges {parents[0]} and {late_name} (depths differ)")
    out["train_s"] = training.seconds
    return out


def main(argv: list[str] | None = None) -> int:
    ap = example_parser(__doc__, quick="1 round, 1 epoch", labels="3", labels_help="labels to forget, e.g. 3 or 1,2")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--edges", type=int, default=2, help="edge aggregators per round (<= 1: flat FL)")
    ap.add_argument("--flat", action="store_true", help="flat FL: no edge aggregators")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5, help="local epochs per client and round")
    ap.add_argument("--alpha", type=float, default=None, help="Dirichlet label skew (default IID)")
    args = parse_args(ap, argv, exact_fim=True, quick={"rounds": 1, "epochs": 1})
    from umig.cli.render import graph_tree

    con = console()
    with example_store(args.store, prefix="umig-fl-") as store:
        print(f"training a {args.clients}-client x {args.rounds}-round FedAvg lineage on digits "
              f"({'flat' if args.flat or args.edges <= 1 else f'{args.edges} edge aggregators'}) ...", flush=True)
        t0 = time.perf_counter()
        run = build(store, clients=args.clients, edges=1 if args.flat else args.edges, rounds=args.rounds,
                    epochs=args.epochs, seed=args.seed, alpha=args.alpha, exact_fim=args.exact_fim)
        print(recorded_line(run, time.perf_counter() - t0))
        con.print(graph_tree(store.graph(), max_nodes=60))
        labels = parse_labels(args.labels)
        plan = store.plan_unlearning(labels).plan
        print(f"plan: {len(plan.discovery)} discovery node(s) ({', '.join(plan.discovery)}), "
              f"{len(plan.inherited)} inherited")
        result = store.unlearn(labels, eval_data=DIGITS_TEST)
        print_result(con, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
