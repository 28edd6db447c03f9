"""What recording a lineage costs next to training it, on the digits examples.

Each example's ``build`` function trains its lineage and records every model through a
lineage recorder; it times its training loop (local training, FedAvg/sync, head growth)
and the recorder times every ``record`` call (``Store.add_node``: state copy, head check,
blob writes, SQLite rows, and the model FIM where it is computed there). The target is
recording < 5% of the training loop's time with default settings.

Two settings per lineage, each in its own runs:

* **default**: ``umig.train.fit`` captures each model FIM from the last epoch's forward passes and
  the recorder stores it. The capture runs inside the training loop; its time (``FisherCapture``'s
  hook, summed by the recorder as ``capture_seconds``) is moved from the training side to the
  recording side, so the overhead is ``(recording + capture) / (training - capture)``.
* **exact FIM pass** (``exact_fim=True``, ``--exact-fim`` in the examples): no capture; the store
  computes each model FIM with one extra forward pass over the node's data (recording / training).

A warm-up run in a scratch store goes first so one-off costs (torch.optim's lazy import of
torch._dynamo, first-call kernel set-up) count for neither side. Results are printed and
written to ``benchmarks/results/recording.md``.

    python benchmarks/bench_recording.py [--quick] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

import data_parallel  # noqa: E402
import federated  # noqa: E402
import incremental  # noqa: E402
import transfer  # noqa: E402

import bench_integrations  # noqa: E402  (benchmarks/, the script's own folder)

from umig.api import Store  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def cases(quick: bool, exact: bool):
    """(name, builder) for each digits example at its default size (smaller with ``quick``)."""
    q, e = quick, exact
    return [
        ("FL (multi-layer, 4 clients x 2 rounds x 5 epochs + DAG)",
         lambda s: federated.build(s, rounds=1 if q else 2, epochs=1 if q else 5, exact_fim=e, log=_quiet)),
        ("DDP (3 ranks x 3 syncs, 2 local epochs each)",
         lambda s: data_parallel.build(s, syncs=2 if q else 3, local_epochs=1 if q else 2, exact_fim=e, log=_quiet)),
        ("IL (3 steps x 5 epochs, 6/8/10-way heads)",
         lambda s: incremental.build(s, epochs=2 if q else 5, exact_fim=e, log=_quiet)),
        ("TL (base 5 epochs + 3 head-only fine-tunes x 10)",
         lambda s: transfer.build(s, epochs=2 if q else 5, head_epochs=3 if q else 10, exact_fim=e, log=_quiet)),
    ]


def _quiet(*_a, **_k) -> None:
    pass


def measure(builder, repeat: int) -> dict:
    rows = []
    for _ in range(repeat):
        tmp = tempfile.mkdtemp(prefix="umig-bench-rec-")
        try:
            store = Store.init(Path(tmp) / "store")
            t0 = time.perf_counter()
            run = builder(store)
            total = time.perf_counter() - t0
            rec = run["recorder"]
            trained = sum(1 for n in rec.nodes if store.node(n).data_size)
            cap = rec.capture_seconds  # inside the training loop: a recording cost, not training
            rows.append({"train": run["train_s"] - cap, "record": rec.seconds + cap, "capture": cap,
                         "recorder": rec.seconds, "total": total, "nodes": len(rec.nodes), "trained": trained})
            store.close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    # the median run by overhead ratio: robust to a noisy neighbour on a shared machine
    rows.sort(key=lambda r: r["record"] / r["train"])
    return rows[len(rows) // 2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller lineages, one repeat")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the median overhead is reported")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=RESULTS / "recording.md")
    ap.add_argument("--json", dest="json_out", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeat = 1 if args.quick else args.repeat

    print("warm-up ...", flush=True)
    tmp = tempfile.mkdtemp(prefix="umig-bench-warm-")
    try:
        incremental.build(Store.init(Path(tmp) / "s"), steps=((0, 1), (2,)), epochs=1, log=_quiet)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    lines = [
        "# Recording overhead on the digits examples",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores (shared with other "
        f"jobs), torch {torch.__version__}, {args.threads} thread(s); median of {repeat} run(s) per lineage"
        f"{' (--quick sizes)' if args.quick else ''}.",
        "Training = the example's training loop (local training, FedAvg / sync, head growth) without recording; "
        "recording = every recorder call (`Store.add_node`: state copy, arch/head checks, blob writes, SQLite rows, "
        "the model FIM where the store computes it; one transaction per lineage) plus, with default settings, the "
        "FIM capture inside the training loop (moved from the training side to this one).",
        "",
        "* **default**: `umig.train.fit` captures each model FIM from the last training epoch's own forward passes "
        "(`FisherCapture`, kept with the model) and the recorder stores it: no pass over the data at recording.",
        "* **exact FIM pass** (`exact_fim=True`): no capture; the store computes each model FIM with one extra "
        "forward pass over the node's data (the exact FIM of the trained weights).",
        "",
        "| lineage | nodes | training s | training ms / trained node | recording s (default) "
        "| of which capture s | recording ms / node (default) | overhead (default) | recording s (exact pass) "
        "| overhead (exact pass) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst = {"default": 0.0, "exact": 0.0}
    tot = {"default": [0.0, 0.0], "exact": [0.0, 0.0]}
    figures = []
    for (name, default), (_, exact) in zip(cases(args.quick, False), cases(args.quick, True)):
        r = {"default": measure(default, repeat), "exact": measure(exact, repeat)}
        ratio = {k: v["record"] / v["train"] for k, v in r.items()}
        figures.append({"lineage": name, **r, "overhead_default": ratio["default"], "overhead_exact": ratio["exact"]})
        for k in r:
            worst[k] = max(worst[k], ratio[k])
            tot[k][0] += r[k]["train"]
            tot[k][1] += r[k]["record"]
        d, e = r["default"], r["exact"]
        row = (f"| {name} | {d['nodes']} | {d['train']:.2f} | {1000 * d['train'] / d['trained']:.0f} | "
               f"{d['record']:.3f} | {d['capture']:.3f} | {1000 * d['record'] / d['nodes']:.1f} | "
               f"{100 * ratio['default']:.1f}% | {e['record']:.3f} | {100 * ratio['exact']:.1f}% |")
        print(row, flush=True)
        lines.append(row)
    lines += [
        f"| **all** | | {tot['default'][0]:.2f} | | {tot['default'][1]:.3f} | | | "
        f"**{100 * tot['default'][1] / tot['default'][0]:.1f}%** | {tot['exact'][1]:.3f} | "
        f"**{100 * tot['exact'][1] / tot['exact'][0]:.1f}%** |",
        "",
        f"Worst lineage: {100 * worst['default']:.1f}% with default settings (target < 5%), "
        f"{100 * worst['exact']:.1f}% with the exact FIM pass.",
    ]
    summary = lines[-2:]
    print("integrations ...", flush=True)
    integrations = bench_integrations.table(bench_integrations.rows(args.quick, repeat))
    print("\n".join(integrations), flush=True)
    lines += ["", "## Through the integrations", "",
              "Recording the same models through each integration (Flower strategy, Lightning callback) next to "
              "the plain recorder; see `benchmarks/bench_integrations.py` for what each column times.", "",
              *integrations]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    if args.json_out:
        args.json_out.write_text(json.dumps({
            "repeat": repeat, "quick": args.quick, "threads": args.threads, "lineages": figures,
            "overall_default": tot["default"][1] / tot["default"][0], "overall_exact": tot["exact"][1] / tot["exact"][0],
            "worst_default": worst["default"], "worst_exact": worst["exact"]}, indent=1))
    print("\n".join(summary))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
