"""FIUn against retraining on a real federated lineage, and FIUn throughput on a large synthetic one.

Part 1 (digits, real training): a ``--clients`` x ``--rounds`` FedAvg lineage of
small CNNs. In the same run, unlearn ``--labels`` with FIUn, revert, and unlearn
again by retraining every affected node from scratch without the forget data
(``--method retrain``: same recipes, topological order, aggregates re-aggregated).
Prints both wall times and their ratio, and AD_f / AD_r (train and held-out) of
the original, FIUn and retrained models per node.

Targets: FIUn at least 50x faster than retraining; AD_f at most 2% and AD_r within
3 points of the original on every affected node.

Part 2 (synthetic): a ``--synthetic-nodes`` FL lineage of tiny MLPs (head 10x64),
FIUn throughput in nodes/s for ``--workers 1`` and ``--workers 2`` (no evaluation).

    python benchmarks/bench_unlearn.py                 # 5 clients x 3 rounds, 2,000-node part 2
    python benchmarks/bench_unlearn.py --quick         # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SPEEDUP_TARGET = 50.0
AD_F_TARGET = 0.02
AD_R_DROP_TARGET = 0.03


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:5.1f}"


def part1(args: argparse.Namespace, tmp: Path) -> bool:
    from rich.console import Console
    from rich.table import Table

    from umig.demo import DEFAULT_RECIPE, DIGITS_TEST, build_fl_digits
    from umig.api import Store
    from umig.train import Recipe

    console = Console(width=170)
    store = Store.init(tmp / "fl")
    recipe = Recipe(**{**DEFAULT_RECIPE.to_json(), "epochs": args.epochs})
    t0 = time.perf_counter()
    run = build_fl_digits(store, clients=args.clients, rounds=args.rounds, recipe=recipe)
    build_s = time.perf_counter() - t0
    console.print(f"built a {args.clients}x{args.rounds} FL lineage ({len(run.nodes)} nodes) in {build_s:.1f} s")

    # The first request in a process pays one-off costs (imports, resolving each data reference,
    # building models): report it, then time each method warm, as a long-lived service runs it.
    cold = store.unlearn(args.labels, method="fiun", evaluate=False)
    store.revert(cold.operation)
    fiun_walls = []
    for _ in range(args.repeats):
        r = store.unlearn(args.labels, method="fiun", evaluate=False)
        fiun_walls.append(r.wall_s)
        store.revert(r.operation)
    fiun = store.unlearn(args.labels, method="fiun", eval_data=DIGITS_TEST)
    store.revert(fiun.operation)
    fiun_s = sorted(fiun_walls)[len(fiun_walls) // 2]
    retrain = store.unlearn(args.labels, method="retrain", eval_data=DIGITS_TEST)

    ratio = retrain.wall_s / max(fiun_s, 1e-9)
    t = Table(title=f"forget {args.labels}: original -> FIUn | retrain (accuracy %, train / held-out)")
    for col in ("node", "role", "AD_f train", "AD_f held-out", "AD_r train", "AD_r held-out",
                "retrain AD_f", "retrain AD_r"):
        t.add_column(col, justify="left" if col in ("node", "role") else "right")
    ok = True
    by_name = {n.name: n for n in retrain.nodes}
    for n in fiun.nodes:
        m, r = n.metrics, by_name[n.name].metrics
        worst_f = max(m["AD_f_train_after"], m["AD_f_heldout_after"])
        drop = max(m["AD_r_train_before"] - m["AD_r_train_after"], m["AD_r_heldout_before"] - m["AD_r_heldout_after"])
        node_ok = worst_f <= AD_F_TARGET and drop <= AD_R_DROP_TARGET
        ok &= node_ok
        t.add_row(
            n.name + ("" if node_ok else " [red]✗[/]"), n.role,
            f"{_pct(m['AD_f_train_before'])} -> {_pct(m['AD_f_train_after'])}",
            f"{_pct(m['AD_f_heldout_before'])} -> {_pct(m['AD_f_heldout_after'])}",
            f"{_pct(m['AD_r_train_before'])} -> {_pct(m['AD_r_train_after'])}",
            f"{_pct(m['AD_r_heldout_before'])} -> {_pct(m['AD_r_heldout_after'])}",
            f"{_pct(r['AD_f_train_after'])} / {_pct(r['AD_f_heldout_after'])}",
            f"{_pct(r['AD_r_train_after'])} / {_pct(r['AD_r_heldout_after'])}",
        )
    console.print(t)
    speed_ok = ratio >= SPEEDUP_TARGET
    console.print(f"FIUn wall {fiun_s:.3f} s (median of {args.repeats} warm runs; first run in this process "
                  f"{cold.wall_s:.3f} s) | retrain wall {retrain.wall_s:.1f} s | FIUn is {ratio:.0f}x faster warm, "
                  f"{retrain.wall_s / max(cold.wall_s, 1e-9):.0f}x cold (target >= {SPEEDUP_TARGET:.0f}x warm: "
                  f"{'PASS' if speed_ok else 'FAIL'})")
    console.print(f"AD targets on every affected node (AD_f <= {100 * AD_F_TARGET:.0f}%, AD_r drop <= "
                  f"{100 * AD_R_DROP_TARGET:.0f} points, train and held-out): {'PASS' if ok else 'FAIL'}")
    store.close()
    return ok and speed_ok


def part2(args: argparse.Namespace, tmp: Path) -> None:
    from bench_scale import build  # the synthetic FL lineage builder shared with bench_scale.py

    from umig.api import Store

    src = tmp / "synthetic"
    t0 = time.perf_counter()
    shape = build(src, args.synthetic_nodes, clients=args.synthetic_clients, samples=64)
    print(f"\nsynthetic lineage: {shape.get('nodes', args.synthetic_nodes)} nodes recorded in "
          f"{time.perf_counter() - t0:.1f} s")
    labels = [shape["labels"][0]] if "labels" in shape else [0]
    for workers in (1, 2):
        root = tmp / f"synthetic-w{workers}"
        shutil.copytree(src, root)
        store = Store.open(root)
        t0 = time.perf_counter()
        r = store.unlearn(labels, workers=workers, device="cpu", evaluate=False)
        total = time.perf_counter() - t0
        print(f"FIUn --workers {workers}: {len(r.nodes)} nodes in {total:.2f} s "
              f"(phases {r.wall_s:.2f} s) -> {len(r.nodes) / total:,.0f} nodes/s")
        store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--labels", default="1,2")
    ap.add_argument("--repeats", type=int, default=5, help="warm FIUn runs to take the median of")
    ap.add_argument("--synthetic-nodes", type=int, default=2000)
    ap.add_argument("--synthetic-clients", type=int, default=20)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--quick", action="store_true", help="3x2 lineage, 2 epochs, 300 synthetic nodes")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.rounds, args.epochs, args.synthetic_nodes = 3, 2, 2, 300
    args.labels = [int(x) for x in args.labels.split(",")]
    import torch

    torch.set_num_threads(1)  # tiny models: threads only add contention on 2 cores
    tmp = Path(tempfile.mkdtemp(prefix="umig-bench-"))
    try:
        part1(args, tmp)
        if not args.skip_synthetic:
            part2(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
