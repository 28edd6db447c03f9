"""What the examples share: the command line, a throwaway store, the console and the result report.

Only plumbing lives here; what is specific to each framework (how its lineage is trained
and recorded) stays in the example itself. Importing this module puts the repository on
``sys.path``, so an example run as ``python examples/<name>.py`` can import ``umig`` and
``cli`` without installing them. The digits data references and the architecture come
from :mod:`umig.demo` (``DIGITS_TRAIN``, ``DIGITS_TEST``, ``DEFAULT_ARCH``). The training loops share
their timing (:class:`Stopwatch`), a member's local training (:func:`train_copy`) and FedAvg
(:func:`averaged`); the recorder calls that make them a lineage stay in each example. The examples
that forget samples or clients (``backdoor``, ``byzantine_client``) also share a flat FedAvg loop
over client data they prepare, and unlearning on a copy of the store (end of this module).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from umig.api import Store  # noqa: E402

if TYPE_CHECKING:
    from rich.console import Console

    from umig.arch import ArchSpec
    from umig.data import Data
    from umig.train import Recipe
    from umig.unlearning import UnlearnResult

CLASSES = tuple(range(10))  # the digit labels, 0-9


def example_parser(doc: str | None, *, quick: str, labels: str | None = None, labels_help: str = "",
                   store_help: str = "store directory (default: a temporary one, removed at exit)",
                   ) -> argparse.ArgumentParser:
    """A parser with the options every example starts with: ``--quick``, ``--store``, ``--labels``.

    ``quick`` says what ``--quick`` shrinks the run to (e.g. ``"1 round, 1 epoch"``); ``labels``
    is the default forget set (``None``: no ``--labels`` option, for examples that forget
    samples or clients). Add the example's own options, then call :func:`parse_args`.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{quick} (for tests)")
    ap.add_argument("--store", type=Path, help=store_help)
    if labels is not None:
        ap.add_argument("--labels", default=labels, help=labels_help)
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None, *,
               exact_fim: bool = False) -> argparse.Namespace:
    """Add the options every example ends with, parse ``argv`` and set torch's threads.

    Those options: ``--exact-fim`` (only with ``exact_fim``: for examples whose models ``fit``
    trains and a recorder records), ``--threads`` and ``--seed``.
    """
    if exact_fim:
        ap.add_argument("--exact-fim", action="store_true",
                        help="model FIMs from one extra pass over each node's data (the exact FIM of the trained "
                             "weights) instead of the last training epoch's forward passes (the default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    return args


def console() -> Console:
    """A rich console at least 150 columns wide, so the result tables do not wrap."""
    from rich.console import Console

    return Console(width=max(Console().width, 150))


@contextmanager
def example_store(path: Path | None, prefix: str) -> Iterator[Store]:
    """A new, empty store at ``path`` (whatever was there is removed), closed at the end.

    Without ``path`` the store goes to a temporary directory (named ``prefix...``) that is
    removed on exit, error or not.
    """
    tmp = None if path else tempfile.mkdtemp(prefix=prefix)
    root = path or Path(tmp) / "store"
    try:
        shutil.rmtree(root, ignore_errors=True)
        store = Store.init(root)
        yield store
        store.close()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ training loops
class Stopwatch:
    """Seconds spent inside its ``with`` blocks, summed: what a ``build`` reports as training time
    (``train_s``), kept apart from the time its recorder spends recording."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.seconds += time.perf_counter() - self._t0


def train_copy(model: torch.nn.Module, data: Data, base: Recipe, *, capture: bool = True,
               **changes: object) -> tuple[torch.nn.Module, Recipe]:
    """A copy of ``model`` trained on ``data`` (digits, labels 0-9) with :func:`umig.lineage.fit`, and its recipe.

    The recipe is ``base`` with the fields in ``changes`` replaced (a member's own ``seed``, so a
    retrain replays it); record it with the model. ``capture`` is ``fit``'s: the copy keeps the FIM
    of its last epoch, which recording it on ``data`` stores (``False``: the recorder computes it).
    """
    from umig.lineage import fit
    from umig.train import Recipe

    recipe = Recipe(**{**base.to_json(), **changes})
    trained = copy.deepcopy(model)
    fit(trained, data, recipe, CLASSES, capture=capture)
    return trained, recipe


def averaged(arch: ArchSpec, seed: int, states: Sequence[Mapping[str, torch.Tensor]],
             weights: Sequence[float]) -> torch.nn.Module:
    """A fresh model of ``arch`` (seeded with ``seed``) holding the FedAvg of ``states`` with ``weights``:
    an aggregate, or a sync point of data parallelism."""
    from umig.lineage import fresh_model
    from umig.train import fedavg

    model = fresh_model(arch, seed)
    model.load_state_dict(fedavg(list(states), list(weights)))
    return model


def recorded_line(run: dict, seconds: float) -> str:
    """How many models a ``build`` recorded in ``seconds``, and how much of it was training vs recording.

    ``run`` is what the examples' ``build`` functions return (keys ``recorder`` and ``train_s``).
    """
    rec = run["recorder"]
    return (f"recorded {len(rec.nodes)} models in {seconds:.1f} s "
            f"(training {run['train_s']:.1f} s, recording {rec.seconds:.2f} s)")


def summary_line(result: UnlearnResult) -> str:
    """One line a user (and the example test) can read: worst AD_f after, mean held-out AD_r change, FIUn time."""
    def vals(key: str) -> list[float]:
        return [n.metrics[key] for n in result.nodes if n.metrics.get(key) is not None]

    changes = [n.metrics["AD_r_heldout_after"] - n.metrics["AD_r_heldout_before"] for n in result.nodes
               if n.metrics.get("AD_r_heldout_after") is not None]
    return (f"FIUn forgot label(s) {','.join(map(str, result.labels))} on {len(result.nodes)} node(s) in "
            f"{result.wall_s:.3f} s: worst AD_f {100 * max(vals('AD_f_train_after'), default=0):.1f}% (train) / "
            f"{100 * max(vals('AD_f_heldout_after'), default=0):.1f}% (held-out), mean held-out AD_r change "
            f"{100 * sum(changes) / max(len(changes), 1):+.1f} points")


def print_result(con: Console, result: UnlearnResult) -> None:
    """Print an unlearning operation's before/after table (``umig.cli.render.result_table``) and its summary line."""
    from umig.cli.render import result_table

    con.print(result_table(result))
    print(summary_line(result))


# ------------------------------------------------------------------ forgetting samples and clients
# What examples/backdoor.py and examples/byzantine_client.py share: a flat FedAvg run over client
# data the example prepared, unlearning on a copy of the store, and the exported checkpoint.

def method_options(ap: argparse.ArgumentParser) -> None:
    """``--method`` (compared with ``retrain``, the exact reference) and ``--check``."""
    ap.add_argument("--method", default="retrain",
                    help="unlearning method to compare with retrain (any installed one, see 'umig methods')")
    ap.add_argument("--check", action="store_true", help="exit 1 when METHOD misses the targets against retrain")


def check_method(name: str, kind: str) -> None:
    """Stop before any training unless ``name`` is an installed method that forgets ``kind``
    (``"samples"`` or ``"client"``); the method's own refusal says why and what to use instead."""
    import numpy as np

    from umig.errors import UmigError
    from umig.forget import ForgetSet, SampleSet
    from umig.unlearner import available, get

    if name not in available():
        raise SystemExit(f"unknown method '{name}' (installed: {', '.join(sorted(available()))})")
    probe = SampleSet(dataset="", source="", indices=np.zeros(1, np.int64), size=1,
                      client="client" if kind == "client" else None)
    try:
        get(name).check_kinds(ForgetSet(samples=(probe,)))
    except UmigError as e:
        raise SystemExit(str(e)) from None


@contextmanager
def work_dir(path: Path | None, prefix: str) -> Iterator[Path]:
    """``path`` (emptied first) for the example's stores and files, or a temporary directory removed on exit."""
    tmp = None if path else tempfile.mkdtemp(prefix=prefix)
    root = Path(path or tmp).resolve()
    try:
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        yield root
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def fedavg_lineage(store: Store, shards: list, *, rounds: int, epochs: int, seed: int = 0, prefix: str = "fl") -> dict:
    """Train and record flat FedAvg over ``shards`` (one ``umig.data.Data`` per client) on digits.

    Every client records its own recipe (its seed), and models start from :func:`fresh_model`,
    so ``retrain`` replays the run exactly. Returns the names (``init``, ``clients[round][client]``,
    ``globals``), the ``recorder`` and ``train_s`` (seconds training and averaging).
    """
    from umig.demo import DEFAULT_ARCH as ARCH
    from umig.lineage import FederatedRecorder, fresh_model
    from umig.train import Recipe

    base = Recipe(optimizer="adam", lr=0.01, epochs=epochs, batch_size=64, seed=seed)
    rec = FederatedRecorder(store, ARCH, prefix=prefix, classes=CLASSES, recipe=base)
    out: dict = {"clients": [], "globals": [], "recorder": rec}
    training = Stopwatch()
    with rec.batch():
        global_model = fresh_model(ARCH, seed)
        out["init"] = rec.initial(global_model).name
        for r in range(1, rounds + 1):
            names, states = [], []
            for c, shard in enumerate(shards):
                with training:
                    model, recipe = train_copy(global_model, shard, base, seed=seed + 100 * r + c)
                names.append(rec.client(r, c, model, shard, recipe=recipe).name)
                states.append(model.state_dict())
            with training:
                global_model = averaged(ARCH, seed, states, rec.weights(names))
            out["clients"].append(names)
            out["globals"].append(rec.aggregate(r, global_model).name)
    out["train_s"] = training.seconds
    return out


def exported_model(store: Store, node: str, path: Path) -> torch.nn.Module:
    """Export ``node``'s current version with ``store.export`` and load that checkpoint back (what ships)."""
    from safetensors.torch import load_file

    from umig.arch import build_model

    store.export(node, path)
    return build_model(store.node(node).arch, load_file(str(path)))


def unlearn_copy(original: Path, dest: Path, node: str, **unlearn: object) -> tuple[torch.nn.Module, UnlearnResult]:
    """Unlearn on a copy (at ``dest``) of the closed store at ``original``, which stays as recorded.

    ``unlearn`` goes to ``store.unlearn`` (without its label metrics: ``evaluate=False``).
    Returns ``node``'s exported, reloaded checkpoint and the result.
    """
    shutil.copytree(original, dest)
    with Store.open(dest) as store:
        result = store.unlearn(evaluate=False, **unlearn)
        model = exported_model(store, node, dest / f"{node.replace('/', '_')}.safetensors")
    return model, result


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` a digits model (head rows = labels 0-9) predicts as ``y``."""
    from umig.evaluate import predict_labels

    pred, true = predict_labels(model, [(x, y)], CLASSES)
    return float((pred == true).float().mean()) if len(true) else float("nan")


def comparison_table(title: str, columns: list[str], rows: list[list[str]]):
    """A rich table: first column left-aligned, the others right-aligned."""
    from rich.table import Table

    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*row)
    return t
