"""FIUn against its floor and against retraining, measured in the same run.

The floor (``benchmarks/floor.py``) is the least the same operation can cost on the same
nodes, the same store and with the same durability: one query for the nodes' digests, each
node's head and model FIM read, one element-wise pass, each new head written durably (temp
file, fsync, rename, one fsync per directory) and one metadata commit. Its new heads are
checked to be bit for bit FIUn's.

Part 1 (digits, real training): a ``--clients`` x ``--rounds`` FedAvg lineage of small CNNs.
* FIUn (default ``erase``) vs the floor, forgetting a different pair of labels each repeat (so
  that every run writes its heads: blobs are content-addressed), floor and FIUn interleaved:
  warm (this process, median of ``--repeats``) and cold (a fresh process per run, after
  ``import umig`` and opening the store; the floor's process has imported what it needs:
  interpreter start and module imports are left out of both). Times cover the whole call:
  planning, both phases, the commit; no evaluation.
* Retraining (``--method retrain``: every affected node retrained without the forget labels,
  same recipes, topological order), timed the same way (whole call without evaluation); the
  ratio to FIUn warm and cold, beside the bound the floor sets (retraining / floor).
* AD_f / AD_r (train and held-out) of the original, FIUn and retrained models per node.

Part 2 (synthetic, ``--synthetic-nodes``, the FL lineage of ``bench_scale.py``): FIUn vs the
floor, warm and cold, as in part 1; then ``--workers 1`` vs ``--workers 2`` throughput on copies.

Targets: FIUn within 1.5x of the floor warm and 3x cold; AD_f at most 2% and AD_r within 3
points of the original on every affected node. Benchmarks, not timed tests: on a shared
machine compare ratios from one run (``--json`` writes them for ``benchmarks/summary.py``).

    python benchmarks/bench_unlearn.py                 # 5 clients x 3 rounds, 1,000-node part 2
    python benchmarks/bench_unlearn.py --quick         # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _bench_common import cpu_model, usable_cores

WARM_TARGET, COLD_TARGET = 1.5, 3.0
AD_F_TARGET = 0.02
AD_R_DROP_TARGET = 0.03


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:5.1f}"


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


# ------------------------------------------------------------------ floor vs FIUn
def _cold(kind: str, root: Path, labels: list[int], nodes: list[str] | None = None) -> float:
    """One cold run in a fresh process (``kind`` fiun or floor); returns its seconds."""
    cmd = [sys.executable, __file__, f"--cold-{kind}", str(root), "--labels", ",".join(map(str, labels))]
    if nodes is not None:
        cmd += ["--nodes-file", _write_nodes(root, nodes)]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"cold {kind} run failed:\n{proc.stdout}\n{proc.stderr}")
    return float(json.loads(proc.stdout.strip().splitlines()[-1])["s"])


def _write_nodes(root: Path, nodes: list[str]) -> str:
    path = root.parent / f"{root.name}-nodes.json"
    path.write_text(json.dumps(nodes))
    return str(path)


def cold_fiun_main(root: str, labels: list[int]) -> None:
    from umig.api import Store

    store = Store.open(root)
    t0 = time.perf_counter()
    r = store.unlearn(labels, method="fiun", evaluate=False)
    dt = time.perf_counter() - t0
    store.revert(r.operation)
    store.close()
    print(json.dumps({"s": dt}))


def cold_floor_main(root: str, labels: list[int], nodes_file: str) -> None:
    from floor import Floor

    nodes = json.loads(Path(nodes_file).read_text())
    fl = Floor(root)
    t0 = time.perf_counter()
    fl.run(nodes, labels)
    dt = time.perf_counter() - t0
    fl.undo()
    fl.close()
    print(json.dumps({"s": dt}))


def floor_vs_fiun(store, root: Path, label_sets: list[list[int]], repeats: int, cold_repeats: int,
                  log=print) -> dict:
    """Warm (this process) and cold (fresh processes) FIUn and floor on the same operations."""
    from floor import Floor

    floors = [Floor(root), Floor(root, threads=1)]  # overlapped fsyncs (as umig) and one after another
    sets = iter(label_sets)
    # Warm-up: the first request in this process pays one-off costs (measured cold, below).
    L = next(sets)
    store.revert(store.unlearn(L, method="fiun", evaluate=False).operation)
    for f in floors:
        f.run(store.plan_unlearning(L).plan.affected, L)
        f.undo()
    warm_floor, warm_fiun, nodes_n = [], [], []
    for _ in range(repeats):
        L = next(sets)
        nodes = list(store.plan_unlearning(L).plan.affected)
        times = []
        for f in floors:
            t0 = time.perf_counter()
            heads = f.run(nodes, L)
            times.append(time.perf_counter() - t0)
            f.undo()
        t0 = time.perf_counter()
        r = store.unlearn(L, method="fiun", evaluate=False)
        warm_fiun.append(time.perf_counter() - t0)
        got = {n: s.head_blob for n, s in store.snapshots(nodes).items()}
        if got != heads:
            raise SystemExit("the floor's new heads differ from FIUn's: the floor is not the same operation")
        store.revert(r.operation)
        warm_floor.append(min(times))  # the cheaper write strategy this time
        nodes_n.append(len(nodes))
    for f in floors:
        f.close()
    cold_floor, cold_fiun = [], []
    for _ in range(cold_repeats):
        L = next(sets)
        nodes = list(store.plan_unlearning(L).plan.affected)
        cold_floor.append(_cold("floor", root, L, nodes))
        cold_fiun.append(_cold("fiun", root, L))
    out = {"nodes": int(_median(nodes_n)), "repeats": repeats, "cold_repeats": cold_repeats,
           "floor_warm_s": _median(warm_floor), "fiun_warm_s": _median(warm_fiun),
           "floor_cold_s": _median(cold_floor), "fiun_cold_s": _median(cold_fiun),
           "runs": {"floor_warm": warm_floor, "fiun_warm": warm_fiun, "floor_cold": cold_floor,
                    "fiun_cold": cold_fiun}}
    # The ratio of medians, and the median of the per-repeat ratios (each pair ran back to back).
    out["ratio_warm"] = out["fiun_warm_s"] / out["floor_warm_s"]
    out["ratio_cold"] = out["fiun_cold_s"] / out["floor_cold_s"]
    out["ratio_warm_paired"] = _median([a / b for a, b in zip(warm_fiun, warm_floor)])
    out["ratio_cold_paired"] = _median([a / b for a, b in zip(cold_fiun, cold_floor)])
    out["ratio_warm_min"] = min(warm_fiun) / min(warm_floor)  # the quietest run of each
    out["ratio_cold_min"] = min(cold_fiun) / min(cold_floor)
    log(f"  {out['nodes']} nodes: floor {1e3 * out['floor_warm_s']:.1f} ms warm, {1e3 * out['floor_cold_s']:.1f} ms "
        f"cold | FIUn {1e3 * out['fiun_warm_s']:.1f} ms warm, {1e3 * out['fiun_cold_s']:.1f} ms cold | FIUn / floor: "
        f"{out['ratio_warm']:.2f}x warm (target <= {WARM_TARGET}x: {'PASS' if out['ratio_warm'] <= WARM_TARGET else 'FAIL'}), "
        f"{out['ratio_cold']:.2f}x cold (target <= {COLD_TARGET}x: {'PASS' if out['ratio_cold'] <= COLD_TARGET else 'FAIL'})"
        f"; paired medians {out['ratio_warm_paired']:.2f}x / {out['ratio_cold_paired']:.2f}x, quietest runs "
        f"{out['ratio_warm_min']:.2f}x / {out['ratio_cold_min']:.2f}x")
    return out


def label_sets(n: int) -> list[list[int]]:
    """Distinct pairs of labels, spread over the ten digits, so that no run re-creates another's heads."""
    pairs = list(itertools.combinations(range(10), 2))
    step = 7  # coprime with 45: visits every pair once
    return [list(pairs[(i * step) % len(pairs)]) for i in range(min(n, len(pairs)))]


# ------------------------------------------------------------------ part 1
def part1(args: argparse.Namespace, tmp: Path) -> dict:
    from rich.console import Console
    from rich.table import Table

    from umig.api import Store
    from umig.demo import DEFAULT_RECIPE, DIGITS_TEST, build_fl_digits
    from umig.train import Recipe

    console = Console(width=170)
    root = tmp / "fl"
    store = Store.init(root)
    recipe = Recipe(**{**DEFAULT_RECIPE.to_json(), "epochs": args.epochs})
    t0 = time.perf_counter()
    run = build_fl_digits(store, clients=args.clients, rounds=args.rounds, recipe=recipe)
    build_s = time.perf_counter() - t0
    console.print(f"part 1: a {args.clients}x{args.rounds} FL lineage of digits CNNs ({len(run.nodes)} nodes) "
                  f"trained in {build_s:.1f} s")

    console.print("FIUn (erase) vs its floor, forgetting a new pair of labels each run:")
    sets = label_sets(1 + args.repeats + args.cold_repeats + 1)
    fl = floor_vs_fiun(store, root, sets[:-1], args.repeats, args.cold_repeats, log=console.print)

    # Accuracy and retraining on the bench's own forget set.
    labels = sets[-1] if args.labels is None else args.labels
    fiun = store.unlearn(labels, method="fiun", eval_data=DIGITS_TEST)
    store.revert(fiun.operation)
    # Thread policy: the same retraining with one thread and with torch's default forced (UMIG_THREADS,
    # the user's choice, wins over the policy); the measured runs below use umig's own choice.
    threads_runs: dict[str, float] = {}
    if args.thread_check:
        from umig.execution import _TORCH_DEFAULT_THREADS

        for n in sorted({1, _TORCH_DEFAULT_THREADS}):
            os.environ["UMIG_THREADS"] = str(n)
            try:
                t0 = time.perf_counter()
                forced = store.unlearn(labels, method="retrain", evaluate=False)
                threads_runs[str(n)] = time.perf_counter() - t0
            finally:
                del os.environ["UMIG_THREADS"]
            store.revert(forced.operation)
    retrain_runs = []
    for i in range(args.retrain_repeats):
        t0 = time.perf_counter()
        retrain = store.unlearn(labels, method="retrain", eval_data=DIGITS_TEST)
        retrain_runs.append(time.perf_counter() - t0 - retrain.eval_s)
        if i + 1 < args.retrain_repeats:
            store.revert(retrain.operation)
    retrain_s = _median(retrain_runs)

    t = Table(title=f"forget {labels}: original -> FIUn | retrain (accuracy %, train / held-out)")
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
    out = {**fl, "lineage": f"{args.clients}x{args.rounds} FL digits CNN", "build_s": build_s,
           "retrain_s": retrain_s, "retrain_runs": retrain_runs, "ad_ok": ok,
           "retrain_backend": retrain.backend}
    if threads_runs:
        from umig.execution import _TORCH_DEFAULT_THREADS

        out["retrain_threads_s"] = threads_runs
        out["default_threads"] = _TORCH_DEFAULT_THREADS
        out["load_at_thread_check"] = os.getloadavg()[0]
        forced = ", ".join(f"{n} thread(s) {t:.2f} s" for n, t in threads_runs.items())
        console.print(f"thread policy: retraining with umig's choice ({retrain.backend.get('threads')} thread(s): "
                      f"{retrain.backend.get('threads_why')}) {retrain_s:.2f} s; forced: {forced} "
                      f"(load average {out['load_at_thread_check']:.1f})")
    out["retrain_over_fiun_warm"] = retrain_s / out["fiun_warm_s"]
    out["retrain_over_fiun_cold"] = retrain_s / out["fiun_cold_s"]
    out["retrain_over_floor"] = retrain_s / out["floor_warm_s"]  # the most any method could reach
    console.print(
        f"retraining {retrain_s:.2f} s (median of {len(retrain_runs)}) | FIUn is {out['retrain_over_fiun_warm']:.0f}x "
        f"faster warm, {out['retrain_over_fiun_cold']:.0f}x cold | the floor's bound: retraining / floor = "
        f"{out['retrain_over_floor']:.0f}x (warm FIUn reaches {out['retrain_over_fiun_warm'] / out['retrain_over_floor']:.0%} of it)")
    console.print(f"AD targets on every affected node (AD_f <= {100 * AD_F_TARGET:.0f}%, AD_r drop <= "
                  f"{100 * AD_R_DROP_TARGET:.0f} points, train and held-out): {'PASS' if ok else 'FAIL'}")
    store.close()
    return out


# ------------------------------------------------------------------ part 2
def part2(args: argparse.Namespace, tmp: Path) -> dict:
    from bench_scale import build  # the synthetic FL lineage builder shared with bench_scale.py

    from umig.api import Store

    src = tmp / "synthetic"
    t0 = time.perf_counter()
    shape = build(src, args.synthetic_nodes, clients=args.synthetic_clients, samples=32)
    print(f"\npart 2: synthetic FL lineage of tiny MLPs (head 10x64), {shape['nodes']} nodes recorded in "
          f"{time.perf_counter() - t0:.1f} s")
    root = tmp / "synthetic-run"
    shutil.copytree(src, root)
    store = Store.open(root)
    print("FIUn (erase) vs its floor:")
    out = floor_vs_fiun(store, root, label_sets(1 + args.synthetic_repeats + args.cold_repeats),
                        args.synthetic_repeats, args.cold_repeats)
    store.close()
    out["lineage"] = f"{shape['nodes']}-node synthetic FL"
    L = [3]
    # Interleaved (w1, w2, w2, w1, ...): a shared machine's load drifts between runs, and the ratio
    # should not depend on which setting ran during the busier minute, nor on which came second.
    runs: dict[int, list[float]] = {1: [], 2: []}
    result: dict[int, Any] = {}
    for i in range(args.worker_repeats):
        for workers in ((1, 2) if i % 2 == 0 else (2, 1)):
            run_root = tmp / f"synthetic-w{workers}"
            shutil.rmtree(run_root, ignore_errors=True)
            shutil.copytree(src, run_root)
            os.sync()  # the copy's writeback (thousands of files) must not spill into the timed run's fsyncs
            s = Store.open(run_root)
            t0 = time.perf_counter()
            result[workers] = s.unlearn(L, workers=workers, device="cpu", evaluate=False)
            runs[workers].append(time.perf_counter() - t0)
            s.close()
    for workers in (1, 2):
        r, dt = result[workers], _median(runs[workers])
        out[f"workers{workers}_s"] = dt
        out[f"workers{workers}_nps"] = len(r.nodes) / dt
        out[f"workers{workers}_backend"] = r.backend
        print(f"FIUn --workers {workers}: {len(r.nodes)} nodes in {dt:.2f} s (median of {len(runs[workers])}) -> "
              f"{len(r.nodes) / dt:,.0f} nodes/s; backend {json.dumps(r.backend)}")
    print(f"--workers 2 / --workers 1 time: {out['workers2_s'] / out['workers1_s']:.2f}")
    return out


def machine() -> dict:
    import torch

    return {"cores": usable_cores(), "cpu": cpu_model(), "torch": torch.__version__, "python": sys.version.split()[0],
            "load_before": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--labels", default=None, help="labels for the accuracy table and retraining (default: a pair "
                    "no timed run used)")
    ap.add_argument("--repeats", type=int, default=11, help="warm runs (floor and FIUn) to take the median of")
    ap.add_argument("--synthetic-repeats", type=int, default=5, help="the same on the synthetic lineage")
    ap.add_argument("--cold-repeats", type=int, default=3, help="cold runs, each in a fresh process")
    ap.add_argument("--retrain-repeats", type=int, default=1)
    ap.add_argument("--worker-repeats", type=int, default=5,
                    help="interleaved runs of each --workers setting (the median is reported)")
    ap.add_argument("--no-thread-check", dest="thread_check", action="store_false",
                    help="skip retraining once more with torch's default thread count")
    ap.add_argument("--synthetic-nodes", type=int, default=1000)
    ap.add_argument("--synthetic-clients", type=int, default=100)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--quick", action="store_true", help="3x2 lineage, 2 epochs, 300 synthetic nodes, fewer repeats")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--cold-fiun", default=None, help=argparse.SUPPRESS)  # internal: one cold FIUn run
    ap.add_argument("--cold-floor", default=None, help=argparse.SUPPRESS)  # internal: one cold floor run
    ap.add_argument("--nodes-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.labels is not None:
        args.labels = [int(x) for x in args.labels.split(",")]
    if args.cold_fiun:
        return cold_fiun_main(args.cold_fiun, args.labels)
    if args.cold_floor:
        return cold_floor_main(args.cold_floor, args.labels, args.nodes_file)
    if args.quick:
        args.clients, args.rounds, args.epochs, args.synthetic_nodes = 3, 2, 2, 300
        args.repeats, args.synthetic_repeats, args.cold_repeats = 3, 2, 1
    # No torch.set_num_threads here: umig's own policy picks the threads (one for in-process work on
    # small models), as it would for a user; the thread check compares it with torch's default.
    info = machine()
    print(f"machine: {info['cores']} cores ({info['cpu']}), torch {info['torch']}, load average "
          f"{info['load_before']:.1f} before the run")
    tmp = Path(tempfile.mkdtemp(prefix="umig-bench-"))
    results: dict = {"machine": info}
    try:
        results["fl"] = part1(args, tmp)
        if not args.skip_synthetic:
            results["synthetic"] = part2(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    results["machine"]["load_after"] = os.getloadavg()[0]
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
