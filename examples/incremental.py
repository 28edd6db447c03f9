"""Class-incremental learning on digits, recorded with umig.lineage.IncrementalRecorder.

A chain of models: step 0 learns digits 0-5, step 1 adds 6-7, step 2 adds 8-9. Each step
starts from the previous model, grows the head (rows of known labels are copied by label
id, new rows are fresh) and trains on the new classes' data plus a small replay buffer of
the old classes. Every node records its own ``classes`` and an arch whose ``num_classes``
matches its head (6, 8, 10 outputs). FIUn then forgets a label learnt at step 0 (default
2) in every step, aligning Fisher rows by label id across the different head sizes.

    python examples/incremental.py [--quick] [--store DIR] [--labels 2] [--steps 0-5/6-7/8-9]
"""

from __future__ import annotations

import time

import numpy as np

# shared example plumbing (examples/_common.py); imported first, it puts the repository on sys.path
from _common import Stopwatch, console, example_parser, example_store, parse_args, print_result, recorded_line

from umig.arch import ArchSpec
from umig.data import parse_labels, resolve
from umig.demo import DEFAULT_ARCH as ARCH, DIGITS_TEST, DIGITS_TRAIN
from umig.lineage import IncrementalRecorder, fit, fresh_model, inherit_weights, subset_ref
from umig.api import Store
from umig.train import Recipe

DEFAULT_STEPS = ((0, 1, 2, 3, 4, 5), (6, 7), (8, 9))


def class_pools(seed: int = 0, primary: float = 0.7) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per label: (positions used when the class is introduced, pool replay samples come from)."""
    y = resolve(DIGITS_TRAIN).targets.numpy()
    rs = np.random.RandomState(seed)
    out = {}
    for c in np.unique(y):
        idx = rs.permutation(np.flatnonzero(y == c))
        k = int(round(primary * len(idx)))
        out[int(c)] = (idx[:k], idx[k:])
    return out


def step_indices(pools, new: tuple[int, ...], old: tuple[int, ...], replay: int, seed: int) -> np.ndarray:
    """A step's data: every primary sample of the new classes plus ``replay`` per old class."""
    rs = np.random.RandomState(seed)
    parts = [pools[c][0] for c in new]
    for c in old:
        pool = pools[c][1]
        parts.append(rs.choice(pool, size=min(replay, len(pool)), replace=False))
    return np.sort(np.concatenate(parts)).astype(np.int64)


def build(store: Store, *, steps=DEFAULT_STEPS, epochs: int = 5, replay: int = 40, seed: int = 0,
          arch: ArchSpec = ARCH, prefix: str = "il", lr: float = 0.01, exact_fim: bool = False, log=print) -> dict:
    """Train and record a class-incremental chain; returns the recorded names (one per step).

    Each step's model FIM is the one ``fit`` captured from its last epoch; ``exact_fim`` computes it
    with an extra pass instead.
    """
    pools = class_pools(seed)
    rec = IncrementalRecorder(store, arch, prefix=prefix, exact_fim=exact_fim)
    out: dict = {"steps": [], "classes": [], "recorder": rec}
    training = Stopwatch()
    seen: tuple[int, ...] = ()
    model = None
    with rec.batch():  # one transaction for the whole run
        for k, new in enumerate(steps):
            new = tuple(int(c) for c in new)
            classes = tuple(sorted(set(seen) | set(new)))
            data = subset_ref(store, DIGITS_TRAIN, step_indices(pools, new, seen, replay, seed + k))
            recipe = Recipe(optimizer="adam", lr=lr if k == 0 else lr / 2, epochs=epochs, batch_size=64,
                            seed=seed + k)
            with training:
                grown = fresh_model(rec.arch_for(classes), recipe.seed)
                if model is not None:
                    inherit_weights(grown, model, seen, classes)  # head grows: known rows copied by label id
                fit(grown, data, recipe, classes, capture=not exact_fim)
            info = rec.step(grown, classes, data, recipe=recipe)
            out["steps"].append(info.name)
            out["classes"].append(classes)
            log(f"  {info.name}: classes {classes[0]}-{classes[-1]} ({len(classes)} outputs), "
                f"{info.data_size} samples, new {list(new)}")
            model, seen = grown, classes
    out["train_s"] = training.seconds
    return out


def parse_steps(text: str) -> tuple[tuple[int, ...], ...]:
    """``"0-5/6-7/8-9"`` -> new classes per step."""
    return tuple(parse_labels(part) for part in text.split("/"))


def main(argv: list[str] | None = None) -> int:
    ap = example_parser(__doc__, quick="2 epochs per step", labels="2", labels_help="labels to forget, e.g. 2 or 1,3")
    ap.add_argument("--steps", default="0-5/6-7/8-9", help="new classes per step, '/'-separated")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--replay", type=int, default=40, help="replay samples per old class and step")
    args = parse_args(ap, argv, exact_fim=True, quick={"epochs": 2})
    from umig.cli.render import node_table

    con = console()
    with example_store(args.store, prefix="umig-il-") as store:
        steps = parse_steps(args.steps)
        print(f"training a {len(steps)}-step class-incremental chain on digits ...", flush=True)
        t0 = time.perf_counter()
        run = build(store, steps=steps, epochs=args.epochs, replay=args.replay, seed=args.seed, exact_fim=args.exact_fim)
        print(recorded_line(run, time.perf_counter() - t0))
        con.print(node_table(store.graph(), run["steps"]))
        labels = parse_labels(args.labels)
        result = store.unlearn(labels, eval_data=DIGITS_TEST)
        print_result(con, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
