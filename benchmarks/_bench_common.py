"""What the benchmark scripts share: the machine a run is measured on, number cells, the tables they
print and the JSON record of a run.

The scripts import it by name from their own folder (``benchmarks/``, first on ``sys.path`` when a
script runs), as ``bench_recording.py`` imports ``bench_integrations``. It is not called
``_common``: the scripts also put ``examples/`` on ``sys.path``, whose ``_common.py`` the examples
import by that name. Only the standard library is imported at load time (torch and rich where a
function needs them), so importing this module adds nothing to what a script times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any


# ------------------------------------------------------------------ the machine
def usable_cores() -> int | None:
    """The cores this process may run on (its affinity), or every core where that is not known."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count()


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``; ``"unknown"`` where it cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores (all and usable), torch's threads, Python, torch."""
    import torch

    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "usable_cores": usable_cores(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "torch": torch.__version__}


def machine_line(host: Mapping[str, Any]) -> str:
    """``machine()`` as the first line of a run's output says it (the caller adds what the run is)."""
    return (f"machine: {host['cpu']}, {host['cores']} cores ({host['usable_cores']} usable), torch {host['torch']} "
            f"with {host['torch_threads']} thread(s)")


def closing_line(host: Mapping[str, Any], seconds: float) -> str:
    """The last line of a run's output: the cores and how long the whole run took."""
    return f"{host['cores']} cores, figures from this run ({seconds:.0f} s in all)"


# ------------------------------------------------------------------ options
KINDS = ("labels", "samples", "client")  # the forget-set kinds the lineage benchmarks measure, in this order


def add_lineage_options(ap: argparse.ArgumentParser, *, clients: int, rounds: int, epochs: int) -> None:
    """The options that shape the digits lineages and forget sets (``--clients`` to ``--sample-share``),
    with this benchmark's defaults for the lineage's size."""
    ap.add_argument("--clients", type=int, default=clients)
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--epochs", type=int, default=epochs, help="local epochs per FL client and round, and per IL step")
    ap.add_argument("--replay", type=int, default=40, help="IL replay samples per old class and step")
    ap.add_argument("--label", type=int, default=3, help="the label the 'labels' forget set names")
    ap.add_argument("--sample-share", type=float, default=0.05, help="share of train rows the sample set names")


def parse_kinds(text: str) -> list[str]:
    """A ``--kinds`` option (comma-separated) as a list; exits naming any kind not in ``KINDS``."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise SystemExit(f"unknown kind(s) {', '.join(bad)} ({', '.join(KINDS)})")
    return kinds


# ------------------------------------------------------------------ numbers
def mean_of_present(xs: Iterable[float | None]) -> float | None:
    """The mean of the values that are not ``None``; ``None`` if there are none."""
    vals = [x for x in xs if x is not None]
    return statistics.fmean(vals) if vals else None


def num(x: float | None, fmt: str = ".2f") -> str:
    """A table cell: ``x`` formatted with ``fmt``, ``-`` for ``None``."""
    return "-" if x is None else format(x, fmt)


def pct(x: float | None, fmt: str = ".1f") -> str:
    """A table cell: the share ``x`` in percent (no sign), formatted with ``fmt``; ``-`` for ``None``."""
    return "-" if x is None else format(100 * x, fmt)


def change_with_spread(median: float, spread: Sequence[float]) -> str:
    """A relative change and its spread, e.g. ``+5.8% (-7..+11%)``: ``median`` and ``spread`` (low, high)
    as fractions (bench_recording's end-to-end figure, also printed by summary.py)."""
    lo, hi = spread
    return f"{100 * median:+.1f}% ({100 * lo:+.0f}..{100 * hi:+.0f}%)"


# ------------------------------------------------------------------ tables
LEFT_COLUMNS = ("lineage", "kind", "method")  # the label columns; every other column is right-aligned


def print_rich_table(headers: Sequence[str], body: Iterable[Sequence[str]], title: str, *, width: int,
                     left: Collection[str] = LEFT_COLUMNS) -> None:
    """Print ``body`` (rows of cells) under ``headers`` as a rich table ``width`` characters wide."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for h in headers:
        t.add_column(h, justify="left" if h in left else "right")
    for b in body:
        t.add_row(*b)
    Console(width=width).print(t)


def markdown_table(headers: Sequence[str], body: Iterable[Sequence[str]]) -> str:
    """``body`` (rows of cells) under ``headers`` as a Markdown table, without a trailing newline."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(b) + " |" for b in body]
    return "\n".join(lines)


# ------------------------------------------------------------------ the JSON record
def write_run_json(path: Path, host: Mapping[str, Any], args: argparse.Namespace, **figures: Any) -> None:
    """Write a run's record to ``path`` (its folder made if need be): ``machine``, ``args`` (every
    option as a string), then ``figures`` in the order given; numpy numbers are written as floats."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": host, "args": {k: str(v) for k, v in vars(args).items()}, **figures},
                               indent=1, default=float))
