"""What recording through an integration costs next to umig's plain recorder (digits MLP, CPU).

* **Flower**: ``UmigFedAvg.aggregate_train`` on real ``flwr`` reply Messages (4 clients x 2
  rounds), minus Flower's own ``FedAvg.aggregate_train`` on the same replies (the aggregation a
  Flower server does anyway), against ``FederatedRecorder`` recording the same client models and
  aggregates (``client`` + ``aggregate`` calls, FIM pass).
* **Lightning**: a CPU ``Trainer.fit`` with ``UmigCallback`` minus the mean of the same fit without
  it just before and after (everything the callback adds: FIM capture on the last epoch's batches,
  whose hooks run inside the model's forward pass, and the record call), against
  ``LineageRecorder.record`` of the model after a plain fit (the store's FIM pass). The time spent in
  the callback's own hooks, and in its record call, is shown too.

A warm-up run of each case goes first and is discarded.

Each case runs ``repeat`` times in fresh stores; the median is reported. Used by
``bench_recording.py`` (one row per integration), or on its own:

    python benchmarks/bench_integrations.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import torch
from torch.nn import functional as F

from umig.api import Store
from umig.arch import ArchSpec
from umig.data import digits_client_split, resolve
from umig.lineage import FederatedRecorder, LineageRecorder, subset_ref

try:  # each integration is an optional extra: its row is left out when the framework is missing
    from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict
    from flwr.serverapp.strategy import FedAvg

    from umig.integrations.flower import UmigFedAvg
except ImportError:
    UmigFedAvg = None
try:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from umig.integrations.lightning import UmigCallback
except ImportError:
    pl = None

ARCH = ArchSpec("umig.models:digits_mlp", {"num_classes": 10, "hidden": 16})
TRAIN = "sklearn:digits?split=train"


def _fresh() -> tuple[str, Store]:
    tmp = tempfile.mkdtemp(prefix="umig-bench-int-")
    return tmp, Store.init(Path(tmp) / "store")


def _perturbed(state: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


def flower_once(clients: int, rounds: int) -> dict:
    """Seconds: the plain recorder, the UmigFedAvg rounds, Flower's FedAvg rounds; and the node count."""
    init = ARCH.build().state_dict()
    states = {(r, c): _perturbed(init, 100 * r + c) for r in range(1, rounds + 1) for c in range(clients)}
    sizes = {c: 100 + 50 * c for c in range(clients)}

    def replies(r: int) -> list:
        out = []
        for c in range(clients):
            meta = Metadata(run_id=1, message_id=f"m{r}.{c}", src_node_id=c + 1, dst_node_id=0,
                            reply_to_message_id=f"i{r}.{c}", group_id=str(r), created_at=time.time(), ttl=600.0,
                            message_type="train")
            out.append(Message(RecordDict({"arrays": ArrayRecord(states[(r, c)]),
                                           "metrics": MetricRecord({"num-examples": sizes[c]})}), metadata=meta))
        return out

    def aggregation_s(strategy: FedAvg) -> float:
        """Seconds ``strategy`` takes to aggregate every round's replies (built before the clock starts)."""
        msgs = {r: replies(r) for r in range(1, rounds + 1)}
        t0 = time.perf_counter()
        for r in range(1, rounds + 1):
            strategy.aggregate_train(r, iter(msgs[r]))
        return time.perf_counter() - t0

    out = {}
    tmp, store = _fresh()
    try:
        shards = [subset_ref(store, TRAIN, idx) for idx in digits_client_split(clients, seed=0)]
        rec = FederatedRecorder(store, ARCH, classes=range(10))
        rec.initial(init)
        t0 = time.perf_counter()
        for r in range(1, rounds + 1):
            for c in range(clients):
                rec.client(r, c + 1, states[(r, c)], shards[c])
            rec.aggregate(r, _perturbed(init, r))
        out["plain"] = time.perf_counter() - t0
        out["nodes"] = rounds * (clients + 1)
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    tmp, store = _fresh()
    try:
        shards = [subset_ref(store, TRAIN, idx) for idx in digits_client_split(clients, seed=0)]
        strategy = UmigFedAvg(store, ARCH, classes=range(10), data={c + 1: shards[c] for c in range(clients)},
                              fraction_evaluate=0.0)
        strategy.record_initial(ArrayRecord(init))
        out["integration"] = aggregation_s(strategy)
        out["framework"] = aggregation_s(FedAvg(fraction_evaluate=0.0))
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def lightning_once(epochs: int) -> dict:
    """Seconds: the plain fit, the plain recorder after it, the fit with UmigCallback."""
    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.model = ARCH.build()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    def fit(module, callbacks) -> float:
        loader = DataLoader(resolve(TRAIN).dataset, batch_size=64, shuffle=False)
        trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, enable_progress_bar=False,
                             logger=False, enable_checkpointing=False, enable_model_summary=False,
                             callbacks=callbacks)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            trainer.fit(module, train_dataloaders=loader)
            return time.perf_counter() - t0

    out = {}
    tmp, store = _fresh()
    try:
        store.add_node("base", ARCH.build(), ARCH, data=TRAIN)
        module = Classifier()
        before = fit(module, [])
        rec = LineageRecorder(store, ARCH)
        t0 = time.perf_counter()
        rec.record("ft", module.model, parents=["base"], relation="finetune", data=TRAIN)
        out["plain"] = time.perf_counter() - t0
        cb = UmigCallback(store, ARCH, name="ft-cb", parent="base", data=TRAIN, classes=range(10))
        in_hooks = _time_hooks(cb)
        with_cb = fit(Classifier(), [cb])
        out["train"] = (before + fit(Classifier(), [])) / 2  # plain fits on both sides of the recorded one
        out["integration"] = with_cb - out["train"]
        out["hooks"] = in_hooks[0]
        out["recording"] = cb.recorder.seconds
        out["nodes"] = 1
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _time_hooks(callback) -> list[float]:
    """Wrap every ``on_*`` hook of ``callback`` so the time spent in them adds up in the returned cell."""
    total = [0.0]

    def timed(fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - t0
        return wrapper

    for name in dir(callback):
        if name.startswith("on_") and callable(getattr(callback, name)):
            setattr(callback, name, timed(getattr(callback, name)))
    return total


def _median(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def rows(quick: bool = False, repeat: int = 3) -> list[dict]:
    """One row per integration whose framework is installed: name, nodes, plain and integration seconds."""
    repeat = 1 if quick else repeat
    out = []
    if UmigFedAvg is not None:
        c, r = (2, 1) if quick else (4, 2)
        flower_once(1, 1)  # warm-up: lazy imports, first FIM kernels
        m = _median([flower_once(c, r) for _ in range(repeat)])
        out.append({"integration": f"Flower UmigFedAvg ({c} clients x {r} rounds)", "nodes": int(m["nodes"]),
                    "plain_s": m["plain"], "integration_s": m["integration"] - m["framework"],
                    "framework_s": m["framework"]})
    if pl is not None:
        e = 1 if quick else 3
        lightning_once(1)  # warm-up
        m = _median([lightning_once(e) for _ in range(repeat)])
        out.append({"integration": f"Lightning UmigCallback ({e} epoch fit)", "nodes": 1, "plain_s": m["plain"],
                    "integration_s": m["integration"], "framework_s": m["train"], "recording_s": m["recording"],
                    "hooks_s": m["hooks"]})
    return out


def table(found: list[dict]) -> list[str]:
    """Markdown rows (a difference of two fits is noisy on a shared machine: use the median of a few runs)."""
    header = ("| integration | nodes | plain recorder s | through the integration s | ratio | "
              "framework's own s (FedAvg aggregation / fit without the callback) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for row in found:
        extra = (f" (in its hooks {row['hooks_s']:.3f}, of which the record call {row['recording_s']:.3f})"
                 if "recording_s" in row else "")
        lines.append(f"| {row['integration']} | {row['nodes']} | {row['plain_s']:.3f} | {row['integration_s']:.3f}"
                     f"{extra} | {row['integration_s'] / row['plain_s']:.2f}x | {row['framework_s']:.3f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print("\n".join(table(rows(args.quick, args.repeat))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
