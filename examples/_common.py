"""What the examples share: the command line, a throwaway store, the console and the result report.

Only plumbing lives here; what is specific to each framework (how its lineage is trained
and recorded) stays in the example itself. Importing this module puts the repository on
``sys.path``, so an example run as ``python examples/<name>.py`` can import ``umig`` and
``cli`` without installing them. The digits data references and the architecture come
from :mod:`umig.demo` (``DIGITS_TRAIN``, ``DIGITS_TEST``, ``DEFAULT_ARCH``). The training loops share
their timing (:class:`Stopwatch`), a member's local training (:func:`train_copy`) and FedAvg
(:func:`averaged`); the recorder calls that make them a lineage stay in each example. The examples
that forget samples or clients (``backdoor``, ``byzantine_client``, ``incident``) also share their
command line, a flat FedAvg loop over client data they prepare, unlearning on a copy of the store
and the comparison with ``retrain`` (end of this module).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from umig.api import Store  # noqa: E402

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

    from umig.arch import ArchSpec
    from umig.data import Data
    from umig.train import Recipe
    from umig.unlearning import UnlearnResult

CLASSES = tuple(range(10))  # the digit labels, 0-9
S = TypeVar("S")  # what an example scores a model with (see against_retrain)


def example_parser(doc: str | None, *, quick: str, labels: str | None = None, labels_help: str = "",
                   store_help: str = "store directory (default: a temporary one, removed at exit)",
                   ) -> argparse.ArgumentParser:
    """A parser with the options every example starts with: ``--quick``, ``--store``, ``--labels``.

    ``quick`` says what ``--quick`` shrinks the run to (e.g. ``"1 round, 1 epoch"``; the values
    themselves go to :func:`parse_args`); ``labels`` is the default forget set (``None``: no
    ``--labels`` option, for examples that forget samples or clients). Add the example's own
    options, then call :func:`parse_args`.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{quick} (for tests)")
    ap.add_argument("--store", type=Path, help=store_help)
    if labels is not None:
        ap.add_argument("--labels", default=labels, help=labels_help)
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None, *, exact_fim: bool = False,
               quick: Mapping[str, object] | None = None) -> argparse.Namespace:
    """Add the options every example ends with, parse ``argv`` and set torch's threads.

    Those options: ``--exact-fim`` (only with ``exact_fim``: for examples whose models ``fit``
    trains and a recorder records), ``--threads`` and ``--seed``. With ``--quick`` the options
    named in ``quick`` (by their ``args`` names) take its values instead.
    """
    if exact_fim:
        ap.add_argument("--exact-fim", action="store_true",
                        help="model FIMs from one extra pass over each node's data (the exact FIM of the trained "
                             "weights) instead of the last training epoch's forward passes (the default)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        vars(args).update(quick or {})
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
# What examples/backdoor.py, examples/byzantine_client.py and examples/incident.py share: their
# command line, a flat FedAvg run over client data the example prepared, unlearning on a copy of
# the store, the exported checkpoint and how it compares with retraining.

def forget_parser(doc: str | None, *, copies: str = "unlearned copies") -> argparse.ArgumentParser:
    """:func:`example_parser` for the examples that forget from a flat FedAvg run, with ``--method`` and ``--check``.

    ``--quick`` means 2 rounds, 3 epochs; ``--store`` is the directory for the data, the recorded
    store and its ``copies``; ``--method`` is compared with ``retrain`` (the exact reference). Add
    the example's own options, then call :func:`parse_forget_args`.
    """
    ap = example_parser(doc, quick="2 rounds, 3 epochs", store_help=f"directory for the data, the recorded store and "
                        f"its {copies} (default: a temporary one, removed at exit)")
    ap.add_argument("--method", default="retrain",
                    help="unlearning method to compare with retrain (any installed one, see 'umig methods')")
    ap.add_argument("--check", action="store_true", help="exit 1 when METHOD misses the targets against retrain")
    return ap


def parse_forget_args(ap: argparse.ArgumentParser, argv: list[str] | None, kind: str) -> argparse.Namespace:
    """Add ``--rounds`` and ``--epochs`` (the FedAvg run), parse (:func:`parse_args`) and check ``--method``.

    Stops unless the method forgets ``kind`` (:func:`check_method`); ``--quick`` trains 3 local epochs.
    """
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=5, help="local epochs per client and round")
    args = parse_args(ap, argv, quick={"epochs": 3})
    check_method(args.method, kind)
    return args


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


def against_retrain(work: Path, node: str, method: str, what: str, scores: Callable[[torch.nn.Module], S],
                    original: torch.nn.Module, **forget: object) -> tuple[dict[str, S], dict[str, float | None]]:
    """``scores`` of ``node``'s exported checkpoint as recorded (``original``) and after forgetting, and the wall times.

    ``what`` (e.g. ``"client fl/r1/c3"``, for the progress lines) is forgotten with ``retrain`` (the
    exact reference) and with ``method``, each by :func:`unlearn_copy` on its own copy of the store at
    ``work / "original"`` (``work / "retrain"``, ``work / "unlearned"``); ``forget`` goes to
    ``store.unlearn`` (``forget=`` or ``clients=``). Both dicts are keyed ``"original"``, ``"retrain"``
    and ``method`` (``"retrain (again)"`` when it is retrain), in that order.
    """
    by: dict[str, S] = {"original": scores(original)}
    wall: dict[str, float | None] = {"original": None}
    for name, dest in (("retrain", "retrain"), (method, "unlearned")):
        print(f"forgetting {what} with {name} (copy of the store: {work / dest}) ...", flush=True)
        model, result = unlearn_copy(work / "original", work / dest, node, method=name, **forget)
        key = name if name not in by else f"{name} (again)"
        by[key], wall[key] = scores(model), result.wall_s
    return by, wall


def verdict_line(what: str, method: str, metrics: Sequence[str], scores: Mapping[str, Sequence[float]], ok: bool,
                 targets: str) -> str:
    """The result line of a comparison with retrain, one ``metrics`` name per score, the targets after the verdict:

    ``<what>: <metric> before% -> after% with METHOD (retrain x%), <metric> ...: PASS|FAIL (<targets>)``.
    ``scores`` are :func:`against_retrain`'s: the original's, retrain's and ``method``'s, in that order.
    """
    original, retrain, forgotten = scores.values()
    changes = [f"{name} {100 * o:.1f}% -> {100 * f:.1f}%{f' with {method}' if i == 0 else ''} (retrain {100 * r:.1f}%)"
               for i, (name, o, r, f) in enumerate(zip(metrics, original, retrain, forgotten))]
    return f"{what}: {', '.join(changes)}: {'PASS' if ok else 'FAIL'} ({targets})"


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Share of ``x`` a digits model (head rows = labels 0-9) predicts as ``y``."""
    from umig.evaluate import predict_labels

    pred, true = predict_labels(model, [(x, y)], CLASSES)
    return float((pred == true).float().mean()) if len(true) else float("nan")


def comparison_table(title: str, columns: list[str], scores: Mapping[str, Sequence[float]],
                     wall_s: Mapping[str, float | None] | None = None) -> Table:
    """A rich table, a row per model (left-aligned): its ``scores`` as percentages, then with ``wall_s``
    the seconds its unlearning took ("-" for none), right-aligned. ``columns`` names them all."""
    from rich.table import Table

    t = Table(title=title)
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for name, values in scores.items():
        wall = [] if wall_s is None else ["-" if wall_s[name] is None else f"{wall_s[name]:.2f}"]
        t.add_row(name, *(f"{100 * v:.1f}" for v in values), *wall)
    return t


def check_exit(check: bool, ok: bool, missed: str) -> int:
    """The example's exit status: 1 when ``--check`` was asked (``check``) and the targets were not met
    (``ok`` false), saying ``--check: <missed>``; else 0."""
    if check and not ok:
        print(f"--check: {missed}", flush=True)
        return 1
    return 0
