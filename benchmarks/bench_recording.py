"""What recording a lineage costs next to training it, on the digits examples.

Each example's ``build`` function trains its lineage and records every model through a
lineage recorder; it times its training loop (local training, FedAvg/sync, head growth)
and the recorder times every ``record`` call (``Store.add_node``: state copy, head check,
blob writes, SQLite rows, and the model FIM where it is computed there). The target is
recording < 5% of the training loop's time with default settings.

Each lineage is built three ways per round, back to back (:func:`measure`):

* **default**: ``umig.train.fit`` captures each model FIM from the last epoch's forward passes and
  the recorder stores it. The capture runs inside the training loop; its time (``FisherCapture``'s
  hook, summed by the recorder as ``capture_seconds``) is moved from the training side to the
  recording side.
* **exact FIM pass** (``exact_fim=True``, ``--exact-fim`` in the examples): no capture; the store
  computes each model FIM with one extra forward pass over the node's data.
* **not recorded** (:func:`unrecorded`): the same training loop, with recorders that keep node names
  only.

The overhead (the target) is ``(recording + capture) / (training - capture)`` of the same recorded
run. The end-to-end figure, the recorded build's wall time over the unrecorded one's in the same
round, also sees what recording costs the loop around it (the blob writers' fsyncs share the
cores); it is printed with the quartiles of its rounds, which on a shared machine spread much wider
than the target.

A warm-up run in a scratch store goes first so one-off costs (torch.optim's lazy import of
torch._dynamo, first-call kernel set-up) count for neither side. Results are printed and
written to ``benchmarks/results/recording.md``.

    python benchmarks/bench_recording.py [--quick] [--repeat 9]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "examples"))

import data_parallel  # noqa: E402
import federated  # noqa: E402
import incremental  # noqa: E402
import transfer  # noqa: E402

import bench_integrations  # noqa: E402  (benchmarks/, the script's own folder)
from _bench_common import change_with_spread  # noqa: E402  (benchmarks/, the script's own folder)

from umig import unlearning  # noqa: E402
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


@contextlib.contextmanager
def unrecorded(store: Store) -> Iterator[None]:
    """The training loop alone: every recorder's ``record`` ends in ``umig.unlearning.add_node``, which here
    keeps each node's name, data size and classes only (no state copy, FIM, blob, row or writer thread), and
    ``store.batch``/``store.node`` answer from those. Built with ``exact_fim=True``, the examples' loops capture
    no FIM either."""
    nodes: dict[str, SimpleNamespace] = {}

    def add_node(_store, name, _model, _arch, *, data=None, classes=None, **_kw):
        size = len(data) if data is not None and not isinstance(data, str) else 0
        nodes[name] = SimpleNamespace(name=name, data_size=size, classes=tuple(classes or ()))
        return nodes[name]

    real = unlearning.add_node
    unlearning.add_node = add_node
    store.batch = contextlib.nullcontext  # type: ignore[method-assign]
    store.node = nodes.__getitem__  # type: ignore[method-assign]
    try:
        yield
    finally:
        unlearning.add_node = real


MODES = ("default", "exact", "none")  # recorded with captured FIMs / with the exact FIM pass / not recorded


def _run(index: int, mode: str, quick: bool) -> dict:
    """One build of lineage ``index`` in a fresh store: wall, training (less capture), recording (with capture)."""
    tmp = tempfile.mkdtemp(prefix="umig-bench-rec-")
    try:
        store = Store.init(Path(tmp) / "store")
        build = cases(quick, mode != "default")[index][1]
        with unrecorded(store) if mode == "none" else contextlib.nullcontext():
            t0 = time.perf_counter()
            run = build(store)
            wall = time.perf_counter() - t0
        rec = run["recorder"]
        cap = rec.capture_seconds  # inside the training loop: a recording cost, not training
        store.close()
        return {"wall": wall, "train": run["train_s"] - cap, "record": rec.seconds + cap, "capture": cap,
                "recorder": rec.seconds, "nodes": len(rec.nodes)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(index: int, quick: bool, repeat: int) -> dict:
    """``repeat`` rounds of the three builds of lineage ``index`` (:data:`MODES`), each round in another order.

    Per recorded mode, from the median run by ``record / train`` of that same run: ``overhead`` (the target),
    what the recorder's own calls and the capture cost next to the loop they ran in. ``end_to_end``: the
    median over rounds of the recorded build's wall time over the unrecorded one's in the same round, less
    1, with the quartiles of those ratios (``end_to_end_iqr``; the least and the most, with under 4 rounds). It also holds what recording costs the loop
    around it (the blob writers' fsyncs sharing the cores, caches), which ``overhead`` cannot see, and
    everything else the machine did meanwhile: on a shared machine its rounds spread far wider than 5%.
    """
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for r in range(repeat):
        order = MODES[r % 3:] + MODES[:r % 3]
        for mode in (order if r % 2 == 0 else order[::-1]):
            runs[mode].append(_run(index, mode, quick))
    none = runs["none"]
    out: dict = {"none": {"wall": statistics.median(x["wall"] for x in none),
                          "train": statistics.median(x["train"] for x in none), "nodes": none[0]["nodes"],
                          "walls": [x["wall"] for x in none]}}
    for mode in ("default", "exact"):
        rows = sorted(runs[mode], key=lambda x: x["record"] / x["train"])
        med = dict(rows[len(rows) // 2])
        med["overhead"] = med["record"] / med["train"]
        ratios = sorted(x["wall"] / y["wall"] - 1.0 for x, y in zip(runs[mode], none))
        med["end_to_end"] = statistics.median(ratios)
        med["end_to_end_iqr"] = (ratios[0], ratios[-1]) if len(ratios) < 4 else tuple(
            statistics.quantiles(ratios, n=4)[::2])
        med["walls"] = [x["wall"] for x in runs[mode]]
        out[mode] = med
    return out


def _end_to_end(m: dict) -> str:
    return change_with_spread(m["end_to_end"], m["end_to_end_iqr"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller lineages, one repeat")
    ap.add_argument("--repeat", type=int, default=9, help="rounds per lineage (each builds it three times); medians "
                    "are reported")
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
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}. Machine: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores (shared with other "
        f"jobs), torch {torch.__version__}, {args.threads} thread(s); {repeat} round(s) per lineage"
        f"{' (--quick sizes)' if args.quick else ''}, each round building the lineage three times back to back "
        "(recorded with default settings, recorded with the exact FIM pass, not recorded), in a different order "
        "each round.",
        "",
        "* **training**: the example's training loop (local training, FedAvg / sync, head growth) with recorders "
        "that record nothing (`umig.unlearning.add_node` replaced by one that keeps the node's name: no state copy, "
        "FIM, blob, row or writer thread) and no FIM capture.",
        "* **recording**: every recorder call (`Store.add_node`: state copy, arch/head checks, blob writes, SQLite "
        "rows, the model FIM where the store computes it; one transaction per lineage) plus, with default settings, "
        "the FIM capture inside the training loop.",
        "* **overhead** (the target): recording / the training loop of the same recorded run (the capture moved "
        "from the training side to the recording side); the median run.",
        "* **end to end**: the recorded build's wall time over the unrecorded build's in the same round, less 1: "
        "the median over rounds and, in brackets, the quartiles. Beyond the recorder's calls it holds what recording "
        "costs the loop around it (the blob writers' fsyncs sharing the cores, caches) and whatever else the machine "
        "did meanwhile: on a shared machine the rounds spread much wider than the target, so it is a check, not "
        "the figure the target is judged on.",
        "* **default**: `umig.train.fit` captures each model FIM from the last training epoch's own forward passes "
        "(`FisherCapture`, kept with the model) and the recorder stores it: no pass over the data at recording.",
        "* **exact FIM pass** (`exact_fim=True`): no capture; the store computes each model FIM with one extra "
        "forward pass over the node's data (the exact FIM of the trained weights).",
        "",
        "| lineage | nodes | training s (not recorded) | recording s (default) | of which capture s "
        "| recording ms / node | **overhead (default)** | end to end (default) | overhead (exact pass) "
        "| end to end (exact pass) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    worst = {"default": 0.0, "exact": 0.0}
    figures = []
    for index, (name, _) in enumerate(cases(args.quick, False)):
        r = measure(index, args.quick, repeat)
        d, e = r["default"], r["exact"]
        figures.append({"lineage": name, **r, "overhead_default": d["overhead"], "overhead_exact": e["overhead"]})
        for k in ("default", "exact"):
            worst[k] = max(worst[k], r[k]["overhead"])
        row = (f"| {name} | {d['nodes']} | {r['none']['train']:.2f} | {d['record']:.3f} | {d['capture']:.3f} | "
               f"{1000 * d['record'] / d['nodes']:.1f} | **{100 * d['overhead']:.1f}%** | {_end_to_end(d)} | "
               f"{100 * e['overhead']:.1f}% | {_end_to_end(e)} |")
        print(row, flush=True)
        lines.append(row)
    lines += [
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
            "worst_default": worst["default"], "worst_exact": worst["exact"]}, indent=1))
    print("\n".join(summary))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
