"""Cost of the closed-form last-layer Fisher against plain inference and autograd baselines.

One run, same model and data for every method:

* inference            - a plain forward pass over all samples (the floor)
* head_fisher          - umig's closed form: one forward pass with a hook on the head
* per-batch autograd   - squared batch-mean gradients with backward through all parameters
                         (what the FIUn authors' code does)
* per-sample autograd  - one forward + head gradient per sample, timed on a small subset and
                         extrapolated per sample to the full set (labelled as such)

Target: head_fisher <= 1.2x inference. Random-init models and random 32x32 inputs, no downloads.

    python benchmarks/bench_fisher.py --model resnet18 --samples 512 --batch 64 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

# Runnable from a plain checkout, without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from umig.fisher import autograd_fisher, head_fisher  # noqa: E402

TARGET = 1.2
NUM_CLASSES = 100


class SmallCNN(nn.Module):
    """A CIFAR-sized two-block CNN with a linear head named ``fc``."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(),
        )
        self.fc = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build(name: str) -> nn.Module:
    if name == "resnet18":
        from torchvision.models import resnet18

        return resnet18(weights=None, num_classes=NUM_CLASSES)
    return SmallCNN()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def timed(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["resnet18", "cnn"], default="resnet18")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--per-sample-subset", type=int, default=64, help="samples timed for per-sample autograd")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", dest="json_out", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()

    torch.set_num_threads(cores())
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = build(args.model).to(device).eval()
    classes = tuple(range(NUM_CLASSES))
    x = torch.randn(args.samples, 3, 32, 32, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.samples,), device=device)
    batches = [(x[i : i + args.batch], y[i : i + args.batch]) for i in range(0, args.samples, args.batch)]
    sub_n = min(args.per_sample_subset, args.samples)
    subset = [(x[i : min(i + args.batch, sub_n)], y[i : min(i + args.batch, sub_n)]) for i in range(0, sub_n, args.batch)]

    def inference() -> None:
        with torch.no_grad():
            for xb, _ in batches:
                model(xb)

    methods: dict[str, Callable[[], object]] = {
        "inference": inference,
        "head_fisher": lambda: head_fisher(model, "fc", batches, classes),
        "per-batch autograd": lambda: autograd_fisher(model, "fc", batches, classes, per_batch=True),
        "per-sample autograd": lambda: autograd_fisher(model, "fc", subset, classes),  # head grads only
    }

    # Correctness on the subset before timing anything: the closed form must equal per-sample
    # autograd. It doubles as the warm-up of those two; the others warm up on one batch.
    load_before = os.getloadavg()[0]
    fast = head_fisher(model, "fc", subset, classes)
    ref = autograd_fisher(model, "fc", subset, classes)
    rel = float((fast.weight - ref.weight).abs().max() / ref.weight.abs().max())
    with torch.no_grad():
        model(batches[0][0])
    autograd_fisher(model, "fc", batches[:1], classes, per_batch=True)

    times: dict[str, list[float]] = {k: [] for k in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():  # interleaved so load drift hits every method alike
            times[name].append(timed(fn, device))
    # Per-sample autograd ran on the subset only: scale its per-sample cost to the full set.
    scale = {k: (args.samples / sub_n if k == "per-sample autograd" else 1.0) for k in methods}
    med = {k: statistics.median(v) * scale[k] for k, v in times.items()}
    best = {k: min(v) * scale[k] for k, v in times.items()}
    load_after = os.getloadavg()[0]

    print(
        f"model={args.model} samples={args.samples} batch={args.batch} repeats={args.repeats} "
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} "
        f"load average {load_before:.1f} -> {load_after:.1f} (timings are only fair when it stays below the cores)"
    )
    print(f"closed form vs per-sample autograd on {sub_n} samples: max relative difference {rel:.2e}")
    print(f"{'method':<52}{'median s':>10}{'min s':>9}{'x inference':>13}")
    for name in methods:
        label = name + (f" (extrapolated from {sub_n} samples)" if name == "per-sample autograd" else "")
        print(f"{label:<52}{med[name]:>10.3f}{best[name]:>9.3f}{med[name] / med['inference']:>13.2f}")
    ratio = med["head_fisher"] / med["inference"]
    verdict = "PASS" if ratio <= TARGET else "FAIL"
    print(f"FIM / inference           = {ratio:.2f} (min-based {best['head_fisher'] / best['inference']:.2f})"
          f"  target <= {TARGET}x: {verdict}")
    print(f"FIM / per-batch autograd  = {med['head_fisher'] / med['per-batch autograd']:.2f}")
    print(f"FIM / per-sample autograd = {med['head_fisher'] / med['per-sample autograd']:.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({
            "model": args.model, "samples": args.samples, "batch": args.batch, "repeats": args.repeats,
            "device": str(device), "threads": torch.get_num_threads(), "median_s": med, "min_s": best,
            "fim_over_inference": ratio, "target": TARGET, "max_rel_diff": rel,
            "load": [load_before, load_after]}, indent=1))


if __name__ == "__main__":
    main()
