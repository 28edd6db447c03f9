"""What the examples share: the command line, a throwaway store, the console and the result report.

Only plumbing lives here; what is specific to each framework (how its lineage is trained
and recorded) stays in the example itself. Importing this module puts the repository on
``sys.path``, so an example run as ``python examples/<name>.py`` can import ``umig`` and
``cli`` without installing them. The digits data references and the architecture come
from :mod:`umig.demo` (``DIGITS_TRAIN``, ``DIGITS_TEST``, ``DEFAULT_ARCH``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from umig.api import Store  # noqa: E402

if TYPE_CHECKING:
    from rich.console import Console

    from umig.unlearning import UnlearnResult

CLASSES = tuple(range(10))  # the digit labels, 0-9


def example_parser(doc: str | None, *, quick: str, labels: str, labels_help: str) -> argparse.ArgumentParser:
    """A parser with the options every example starts with: ``--quick``, ``--store``, ``--labels``.

    ``quick`` says what ``--quick`` shrinks the run to (e.g. ``"1 round, 1 epoch"``); ``labels``
    is the default forget set. Add the example's own options, then call :func:`parse_args`.
    """
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"{quick} (for tests)")
    ap.add_argument("--store", type=Path, help="store directory (default: a temporary one, removed at exit)")
    ap.add_argument("--labels", default=labels, help=labels_help)
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None, *,
               capture_fim: str | None = None) -> argparse.Namespace:
    """Add the options every example ends with, parse ``argv`` and set torch's threads.

    Those options: ``--capture-fim`` (only if ``capture_fim`` names what the FIM is taken from,
    e.g. ``"training epoch"``), ``--threads`` and ``--seed``.
    """
    if capture_fim is not None:
        ap.add_argument("--capture-fim", action="store_true",
                        help=f"model FIMs from the last {capture_fim} (FisherCapture) instead of an extra pass")
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
