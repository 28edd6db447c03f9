"""How umig scales with the size of a lineage: 1,000 / 10,000 / 50,000-node FL graphs.

Each size is built as a synthetic federated run (``--clients`` clients per round,
one FedAvg aggregate per round, as many rounds as it takes to reach the size) of
``umig.models:tiny_mlp`` models (head 10x64), so the figures measure umig, not
torch. Every client node has real data (a shard of one small synthetic
safetensors file, 3 labels per client) and a model FIM; aggregates get the
weighted mean of their clients' FIMs.

Per size, in a fresh process (so peak memory is that size's own):

* add        - recording every node (``FederatedRecorder`` inside one ``store.batch()``)
* open+graph - ``Store.open`` and building the networkx graph
* plan       - ``plan_unlearning`` (what ``umig unlearn --dry-run`` does; median of three), and the CLI
               command itself
* FIUn       - ``unlearn --labels L --no-eval`` per worker setting (``1``: in-process; ``2``: ``--workers 2``
               as users get it: the coordinator computes and spawns its helper only when the work pays
               for its start-up; ``2a``: a pool of two workers spawned at once, ``UMIG_POOL_START=always``),
               each on a fresh copy of the store, with nodes/s over the whole call (planning, the update,
               commit; the median of ``--repeats`` runs, the settings interleaved in alternating order),
               and the largest difference between the new heads of the settings
* graph show - the CLI on the whole store: seconds and lines printed
* floor      - ``benchmarks/floor.py`` on the same affected nodes of a fresh copy (``--no-floor`` skips it):
               the least the same operation costs with umig's durability, timed in the same rounds
* peak RSS of the coordinator, of its pool workers (if any started) and of the CLI runs; store size

Targets (2 CPU cores): planning 50,000 nodes < 2 s (linear: 0.4 s at 10,000); FIUn >= 1,000 nodes/s
on 10,000 nodes; ``--workers 2`` never slower than ``--workers 1``; ``graph show`` prints a bounded
summary. The machine should be otherwise idle: on a shared one, compare runs, not single figures.

    python benchmarks/bench_scale.py --sizes 1000,10000
    python benchmarks/bench_scale.py --sizes 50000 --workers 1,2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Runnable from a plain checkout, without installing the package.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PLAN_TARGET_S = 2.0  # for 50,000 nodes (scaled linearly)
PLAN_TARGET_NODES = 50_000
FIUN_TARGET_NPS = 1000.0  # from 10,000 nodes
IN_FEATURES, HIDDEN, NUM_CLASSES = 16, 64, 10


def _rss_mb(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0  # KiB on Linux


def _workers_peak_mb() -> float:
    """Largest peak RSS (VmHWM) among this process's live pool workers; 0 when none was started."""
    from umig import execution as E

    peak = 0.0
    for w in list(E._POOL.values()):
        for proc in list((getattr(w.executor, "_processes", None) or {}).values()):
            try:
                for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]) / 1024.0)
            except OSError:
                continue
    return peak


def _cli(args: list[str], store: Path) -> tuple[float, subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "umig.cli.main", *args, "--store", str(store)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    dt = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"umig {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return dt, proc


def build(root: Path, n_nodes: int, clients: int, samples: int, seed: int = 0) -> dict:
    """Record a synthetic FL lineage of about ``n_nodes`` nodes; returns its shape and timings."""
    import torch
    from safetensors.torch import save_file

    from umig.arch import ArchSpec
    from umig.lineage import FederatedRecorder, subset_ref
    from umig.api import Store

    rounds = max(1, round((n_nodes - 1) / (clients + 1)))
    g = torch.Generator().manual_seed(seed)
    store = Store.init(root)
    # One data file; client c holds `samples` items of labels {c, c+1, c+3} mod 10.
    n = clients * samples
    x = torch.randn(n, IN_FEATURES, generator=g)
    y = torch.empty(n, dtype=torch.int64)
    for c in range(clients):
        own = torch.tensor([c % 10, (c + 1) % 10, (c + 3) % 10])
        y[c * samples:(c + 1) * samples] = own[torch.randint(0, 3, (samples,), generator=g)]
    data_path = root.parent / f"{root.name}-data.safetensors"
    save_file({"x": x, "y": y}, str(data_path))
    shards = [subset_ref(store, str(data_path), list(range(c * samples, (c + 1) * samples))) for c in range(clients)]

    arch = ArchSpec("umig.models:tiny_mlp", {"in_features": IN_FEATURES, "hidden": HIDDEN, "num_classes": NUM_CLASSES})
    shapes = {k: tuple(v.shape) for k, v in arch.build().state_dict().items()}

    def weights() -> dict:
        return {k: 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()}

    rec = FederatedRecorder(store, arch)
    t0 = time.perf_counter()
    with store.batch():
        rec.initial(weights())
        for r in range(1, rounds + 1):
            for c in range(clients):
                rec.client(r, c, weights(), shards[c])
            rec.aggregate(r, weights())
    add_s = time.perf_counter() - t0
    count = len(store)
    store.close()
    return {"nodes": count, "rounds": rounds, "clients": clients, "add_s": add_s}


def head_digests(root: Path) -> dict[str, str]:
    from umig.store import SqlStore

    with SqlStore.open(root) as store:
        return {n: snap.head_blob for n, snap in store.snapshots([i.name for i in store.nodes()]).items()}


def _setting(spec: str, device: str) -> tuple[int, str | None, str]:
    """``N[a|h][@DEVICE]`` -> (workers, pool start: None for the default, "always" for ``a``, "auto" for
    ``h`` (the coordinator helps: the default since it became one), device)."""
    count, _, dev = spec.partition("@")
    start = {"a": "always", "h": "auto"}.get(count[-1:])
    return int(count.rstrip("ah")), start, dev or device


def heads_max_diff(work: Path, heads: dict[str, dict[str, str]]) -> float:
    """Largest |difference| between the new heads of the first worker setting and every other
    (0.0 when every head blob is bit-identical)."""
    from umig.blobs import BlobStore

    first, *others = list(heads)
    base = BlobStore(work / f"run-w{first}" / "blobs")
    worst = 0.0
    for w in others:
        blobs = BlobStore(work / f"run-w{w}" / "blobs")
        for name, digest in heads[w].items():
            if digest != heads[first][name]:  # digests also differ by safetensors' header key order
                a, b = base.load(heads[first][name]), blobs.load(digest)
                worst = max(worst, max(float((a[k] - b[k]).abs().max()) for k in a))
    return worst


def _floor_run(root: Path, nodes: list[str], label: int) -> float:
    """Seconds of the floor (``benchmarks/floor.py``) of the FIUn operation on ``nodes``: the least it can cost
    on this store with umig's durability (the same reads, arithmetic, durable writes and one commit)."""
    from floor import Floor

    fl = Floor(root)
    try:
        t0 = time.perf_counter()
        fl.run(nodes, [label])
        return time.perf_counter() - t0
    finally:
        fl.close()


def run_one(n_nodes: int, args: argparse.Namespace) -> dict:
    """Everything for one size, in this process."""
    import torch

    from umig.execution import make_backend, shutdown_workers
    from umig.api import Store

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix=f"umig-scale-{n_nodes}-", dir=args.dir))
    out: dict = {"size": n_nodes}
    try:
        root = work / "store"
        out.update(build(root, n_nodes, args.clients, args.samples))

        t0 = time.perf_counter()
        store = Store.open(root)
        g = store.graph()
        out["open_graph_s"] = time.perf_counter() - t0
        assert g.number_of_nodes() == out["nodes"]

        plans = []
        for _ in range(3):  # median of three: the machine is shared
            t0 = time.perf_counter()
            plan = store.plan_unlearning([args.label])
            plans.append(time.perf_counter() - t0)
        out["plan_runs"] = plans
        out["plan_s"] = sorted(plans)[1]
        out["affected"] = len(plan.plan.affected)
        out["discovery"] = len(plan.plan.discovery)
        store.close()
        if args.cli:
            out["plan_cli_s"], _ = _cli(["unlearn", "--labels", str(args.label), "--dry-run"], root)
            out["graph_show_s"], proc = _cli(["graph", "show"], root)
            out["graph_show_lines"] = proc.stdout.count("\n")

        snapshot = work / "pristine"
        shutil.copytree(root, snapshot)
        heads: dict[str, dict[str, str]] = {}
        runs: dict[str, list[float]] = {w: [] for w in args.workers}
        floor_runs: list[float] = []
        workers_mb = 0.0
        # Interleaved, alternating order (floor, w1, w2, w2, w1, floor, ...): a shared machine's load drifts,
        # and the ratios should not depend on which setting ran in the busier minute.
        settings = ["floor", *args.workers] if args.floor else list(args.workers)
        for i in range(args.repeats):
            for w in (settings if i % 2 == 0 else settings[::-1]):
                run_root = work / f"run-w{w}"
                shutil.rmtree(run_root, ignore_errors=True)
                shutil.copytree(snapshot, run_root)
                os.sync()  # the copy's writeback (thousands of files) must not spill into the timed run's fsyncs
                if w == "floor":
                    floor_runs.append(_floor_run(run_root, plan.plan.affected, args.label))
                    continue
                store = Store.open(run_root)
                t0 = time.perf_counter()
                n, start, device = _setting(w, args.device)
                if start:  # a pool started one way or the other (make_backend(pool_start=...))
                    be = make_backend(store.blobs.url, workers=n, device=device, pool_start=start)
                    try:
                        res = store.unlearn([args.label], backend=be, evaluate=False)
                    finally:
                        be.close()
                else:
                    res = store.unlearn([args.label], workers=n, device=device, evaluate=False)
                dt = time.perf_counter() - t0
                store.close()
                runs[w].append(dt)
                out[f"fiun_w{w}_backend"] = res.backend
                out[f"fiun_w{w}_engine_s"] = res.wall_s
                out[f"fiun_w{w}_nodes"] = len(res.nodes)
                heads[w] = head_digests(run_root)
                out["store_mb"] = sum(p.stat().st_size for p in run_root.rglob("*") if p.is_file()) / 2**20
                out["blobs"] = sum(1 for _ in (run_root / "blobs").glob("??/*.safetensors"))
                # Every run starts as a fresh `umig unlearn` would: no worker left up by the one before.
                workers_mb = max(workers_mb, _workers_peak_mb())
                shutdown_workers()
        for w, times in runs.items():
            out[f"fiun_w{w}_runs"] = times
            out[f"fiun_w{w}_s"] = statistics.median(times)
            out[f"fiun_w{w}_nps"] = out[f"fiun_w{w}_nodes"] / out[f"fiun_w{w}_s"]
        if floor_runs:
            out["floor_runs"] = floor_runs
            out["floor_s"] = statistics.median(floor_runs)
            out["floor_nps"] = out["affected"] / out["floor_s"]
        if len(heads) > 1:
            out["heads_max_diff"] = heads_max_diff(work, heads)
        out["store_before_mb"] = sum(p.stat().st_size for p in snapshot.rglob("*") if p.is_file()) / 2**20
        out["peak_rss_mb"] = _rss_mb(resource.RUSAGE_SELF)
        out["peak_rss_workers_mb"] = workers_mb  # the largest pool worker of any run (0: none started)
        out["peak_rss_cli_mb"] = _rss_mb(resource.RUSAGE_CHILDREN)  # the CLI subprocesses (waited for)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            out["kept"] = str(work)
    return out


def report(rows: list[dict], workers: list[int]) -> None:
    cols = [("nodes", "nodes", "{:d}"), ("add_s", "add s", "{:.1f}"), ("add_nps", "add n/s", "{:.0f}"),
            ("open_graph_s", "open+graph s", "{:.2f}"), ("plan_s", "plan s", "{:.2f}"),
            ("plan_cli_s", "dry-run CLI s", "{:.2f}"), ("affected", "affected", "{:d}")]
    cols += [("floor_s", "floor s", "{:.2f}"), ("floor_nps", "floor n/s", "{:.0f}")]
    for w in workers:
        cols += [(f"fiun_w{w}_s", f"FIUn w{w} s", "{:.2f}"), (f"fiun_w{w}_nps", f"w{w} n/s", "{:.0f}")]
    cols += [("graph_show_s", "graph show s", "{:.2f}"), ("graph_show_lines", "show lines", "{:d}"),
             ("peak_rss_mb", "peak MB", "{:.0f}"), ("peak_rss_workers_mb", "workers MB", "{:.0f}"),
             ("peak_rss_cli_mb", "CLI MB", "{:.0f}"),
             ("store_before_mb", "store MB", "{:.1f}"), ("store_mb", "after MB", "{:.1f}")]
    for r in rows:
        r["add_nps"] = r["nodes"] / r["add_s"]
    table = [[h for _, h, _ in cols]] + [[f.format(r[k]) if k in r else "-" for k, _, f in cols] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    for row in table:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    print()
    ok = True
    for r in rows:
        notes = []
        target = PLAN_TARGET_S * r["nodes"] / PLAN_TARGET_NODES
        good = r["plan_s"] < target
        ok &= good
        notes.append(f"plan {r['plan_s']:.2f} s {'<' if good else '>='} {target:.2f} s")
        for w in workers:
            nps = r.get(f"fiun_w{w}_nps")
            if nps is None:
                continue
            judged = r["nodes"] >= 10_000
            good = nps >= FIUN_TARGET_NPS
            ok &= good or not judged
            notes.append(f"FIUn w{w} {nps:.0f} n/s" + (f" {'>=' if good else '<'} {FIUN_TARGET_NPS:.0f}" if judged else "")
                         + (f" ({r[f'fiun_w{w}_s'] / r['floor_s']:.2f}x the floor's time)" if r.get("floor_s") else ""))
        if r.get("fiun_w1_s") and r.get("fiun_w2_s"):
            ratio = r["fiun_w2_s"] / r["fiun_w1_s"]
            ok &= ratio <= 1.1
            notes.append(f"w2/w1 time {ratio:.2f} ({r.get('fiun_w2_backend', {}).get('decision', '')})")
        if "heads_max_diff" in r:
            d = r["heads_max_diff"]
            good = d <= 1e-5
            ok &= good
            notes.append("new heads identical across worker settings" if d == 0 else
                         f"new heads across worker settings differ by at most {d:.2e}" + ("" if good else " (TOO MUCH)"))
        print(f"{r['nodes']} nodes: " + "; ".join(notes))
    print("targets met" if ok else "TARGETS MISSED")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000", help="comma-separated node counts")
    ap.add_argument("--clients", type=int, default=100, help="clients per FL round")
    ap.add_argument("--samples", type=int, default=32, help="data items per client")
    ap.add_argument("--workers", default="1,2", help="worker settings to time FIUn with: N[a][@DEVICE]; 'N': --workers N "
                    "(the coordinator computes, helpers spawn when they pay off); 'Na': N workers spawned at once "
                    "(UMIG_POOL_START=always); '@cuda': on the GPUs "
                    "(e.g. 1@cpu,4@cuda compares the GPU pool's heads with the CPU path)")
    ap.add_argument("--device", default="cpu", help="device of the settings without @DEVICE")
    ap.add_argument("--label", type=int, default=3, help="label to forget")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the coordinator (default 1: tiny models; on a busy machine, spinning "
                         "OpenMP threads make every tiny op cost milliseconds). Pool workers get cores // workers.")
    ap.add_argument("--dir", default=None, help="where to build the stores (default: system temp)")
    ap.add_argument("--no-cli", dest="cli", action="store_false", help="skip the CLI timings (dry run, graph show)")
    ap.add_argument("--no-floor", dest="floor", action="store_false", help="do not time the floor of the same "
                    "FIUn operation (benchmarks/floor.py) beside it")
    ap.add_argument("--repeats", type=int, default=1, help="timed FIUn runs per worker setting, interleaved in "
                    "alternating order, each on a fresh copy of the store; the median is reported")
    ap.add_argument("--keep", action="store_true", help="keep the stores")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: run one size here
    args = ap.parse_args()
    args.workers = [w.strip() for w in args.workers.split(",") if w.strip()]
    bad = [w for w in args.workers if not w.partition("@")[0].rstrip("ah").isdigit()
           or int(w.partition("@")[0].rstrip("ah")) < 1]
    if bad:
        ap.error(f"--workers: {', '.join(bad)} (expected e.g. 1,2,2a or 4@cuda)")

    if args.one is not None:
        print("RESULT " + json.dumps(run_one(args.one, args)), flush=True)
        return

    import torch

    print(f"umig scale benchmark: torch {torch.__version__}, {os.cpu_count()} CPUs, coordinator threads {args.threads}, "
          f"load average {os.getloadavg()[0]:.1f} (timings are noisy when it exceeds the cores)", flush=True)
    rows = []
    for size in [int(s) for s in args.sizes.split(",") if s]:
        cmd = [sys.executable, __file__, "--one", str(size)] + [
            a for a in sys.argv[1:] if not a.startswith("--sizes") and a != args.sizes]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout + proc.stderr)
            raise SystemExit(f"size {size} failed")
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
        rows.append(json.loads(line[len("RESULT "):]))
        print(f"  {size}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    print()
    report(rows, args.workers)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
