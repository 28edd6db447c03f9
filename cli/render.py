"""Rendering for the CLI: rich tables and trees, Graphviz DOT, PNG/SVG pictures, JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import networkx as nx
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.padding import Padding
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from umig import graph as G
from umig.errors import UmigError

console = Console()
err_console = Console(stderr=True)


class FitTable:
    """A table that fits the terminal it prints on without cutting a word; node names are words.

    Built like a rich ``Table`` (``add_column``, ``add_row``; string cells are rich markup). At print
    time it picks the first layout that fits the width: the natural table; the table with columns
    narrowed towards their longest word, so figures and lists wrap at spaces; or, when even that is
    too wide (long names next to many columns), one record per row: the first cell on its own line,
    the others under it as ``column: value``.
    """

    def __init__(self, title: str | None = None, *, show_header: bool = True) -> None:
        self.title = title
        self.show_header = show_header
        self.columns: list[tuple[str, dict[str, Any]]] = []
        self.min_widths: list[int] = []
        self.rows: list[list[Text]] = []

    def add_column(self, header: str, *, min_width: int = 0, **kwargs: Any) -> None:
        """A column never narrower than ``min_width`` (or its longest word); ``kwargs`` go to
        ``rich.table.Table.add_column`` (``justify``, ``style``)."""
        self.columns.append((header, kwargs))
        self.min_widths.append(min_width)

    def add_row(self, *cells: str | Text) -> None:
        row = [c.copy() if isinstance(c, Text) else Text.from_markup(c) for c in cells]
        self.rows.append(row + [Text() for _ in range(len(self.columns) - len(row))])

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        cols = list(zip(*([[Text.from_markup(h) for h, _ in self.columns]] + self.rows)))
        if not self.show_header:
            cols = [c[1:] or (Text(),) for c in cols]
        natural = [max(max(cell_len(ln) for ln in t.plain.split("\n")) for t in c) for c in cols]
        shortest = [max([m] + [max((cell_len(w) for w in t.plain.split()), default=0) for t in c])
                    for c, m in zip(cols, self.min_widths)]
        natural = [max(n, s) for n, s in zip(natural, shortest)]
        chrome = 3 * len(self.columns) + 1  # one space either side of each cell, one rule between columns
        if sum(natural) + chrome <= width:
            widths = natural
        elif sum(shortest) + chrome <= width:
            widths = _share(shortest, natural, width - chrome)
        else:
            yield from self._records(width)
            return
        table = Table(title=self.title, show_header=self.show_header)
        for (header, kwargs), w in zip(self.columns, widths):
            table.add_column(header, width=max(w, 1), overflow="fold", **kwargs)
        for row in self.rows:
            table.add_row(*row)
        if self.title:  # a title wraps within the table: never narrower than its longest word
            longest = max((cell_len(w) for w in Text.from_markup(self.title).plain.split()), default=0)
            table.min_width = min(width, longest)
        yield table

    def _records(self, width: int) -> RenderResult:
        """One record per row: the key cell, then ``column: value`` pairs packed into indented lines."""
        if self.title:
            yield Text.from_markup(self.title, style="italic")
        headers = [Text.from_markup(h).plain.replace("\n", " ") for h, _ in self.columns]
        for row in self.rows:
            key = row[0].copy()
            key.stylize("bold")
            yield key
            line = Text()
            for header, cell in zip(headers[1:], row[1:]):
                if not cell.plain.strip():
                    continue
                pair = Text.assemble((f"{header}: ", "dim") if self.show_header else "",
                                     Text(" ").join(cell.split("\n")))
                if line.plain and cell_len(line.plain) + 3 + cell_len(pair.plain) > width - 2:
                    yield Padding(line, (0, 0, 0, 2), expand=False)
                    line = Text()
                line.append_text(Text("   ") + pair if line.plain else pair)
            if line.plain:
                yield Padding(line, (0, 0, 0, 2), expand=False)


def _share(shortest: list[int], natural: list[int], room: int) -> list[int]:
    """Column widths: each its longest word, then the room left handed out, columns that want
    little first (a role or a version stays on one line; long lists wrap)."""
    widths = list(shortest)
    extra = room - sum(shortest)
    wanting = sorted(range(len(widths)), key=lambda i: natural[i] - shortest[i])
    for k, i in enumerate(wanting):
        give = min(natural[i] - shortest[i], extra // (len(wanting) - k))
        widths[i] += give
        extra -= give
    return widths


FRAMEWORK_STYLE = {"fl": "cyan", "ddp": "magenta", "il": "green", "tl": "yellow", "other": "white"}


def emit(
    data: Any,
    *,
    as_json: bool,
    human: Callable[[Any], Any] | None = None,
    to_json: Callable[[Any], Any] | None = None,
) -> None:
    """The CLI's one output path; every command ends here instead of branching on ``--json`` itself.

    ``as_json``: ``data`` (passed through ``to_json`` first when given; an object with a ``to_json()`` method is
    serialised through it) goes to stdout as plain JSON, nothing else. Otherwise ``human(data)`` says what a person
    sees: a rich renderable or markup string, a list/tuple of them (printed in turn), or None when it wrote its own
    output (raw DOT). Without ``human`` the JSON is the human output too. Errors never come here: they leave through
    the CLI's single ``error:`` line on stderr.
    """
    if as_json or human is None:
        print_json(to_json(data) if to_json is not None else data)
        return
    view = human(data)
    for item in () if view is None else view if isinstance(view, (list, tuple)) else (view,):
        console.print(item)


def print_json(data: Any) -> None:
    """Machine-readable output: plain JSON on stdout, nothing else."""
    sys.stdout.write(json_text(data))


def json_text(data: Any) -> str:
    """The JSON the CLI prints (and writes to files), one trailing newline."""
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, frozenset, tuple)):
        return sorted(o) if isinstance(o, (set, frozenset)) else list(o)
    if hasattr(o, "to_json"):
        return o.to_json()
    return str(o)


def _label(g: nx.DiGraph, n: str) -> str:
    a = g.nodes[n]
    fw = a.get("framework", "other")
    style = FRAMEWORK_STYLE.get(fw, "white")
    labels = a.get("labels") or ()
    data = f" data={_ranges(sorted(labels))}" if labels else ""
    ver = f" v{a['version']}" if a.get("version") else ""
    return f"[bold {style}]{n}[/] [dim]{fw}{ver}{data}[/]"


def _ranges(labels: list[int]) -> str:
    """Compact label list: 0-4,7."""
    out: list[str] = []
    i = 0
    while i < len(labels):
        j = i
        while j + 1 < len(labels) and labels[j + 1] == labels[j] + 1:
            j += 1
        out.append(str(labels[i]) if i == j else f"{labels[i]}-{labels[j]}")
        i = j + 1
    return ",".join(out)


def graph_tree(g: nx.DiGraph, max_nodes: int) -> Tree:
    """A tree from the roots; a node with several parents is expanded once and referenced elsewhere."""
    s = G.summary(g)
    root = Tree(f"[bold]UMIG[/] {s['nodes']} nodes, {s['edges']} edges")
    expanded: set[str] = set()
    shown = 0

    def walk(parent_tree: Tree, n: str, via: str | None) -> None:
        nonlocal shown
        rel = f"[dim]<{via}>[/] " if via else ""
        if n in expanded:
            parent_tree.add(f"{rel}[italic]{n}[/] [dim](shown above)[/]")
            return
        if shown >= max_nodes:
            return
        expanded.add(n)
        shown += 1
        t = parent_tree.add(rel + _label(g, n))
        for c in sorted(g.successors(n)):
            walk(t, c, g.edges[n, c].get("relation"))

    for r in sorted(n for n, d in g.in_degree() if d == 0):
        walk(root, r, None)
    if shown < g.number_of_nodes():
        root.add(f"[dim]... {g.number_of_nodes() - shown} more nodes (raise --max-nodes to see them)[/]")
    return root


def summary_table(g: nx.DiGraph) -> Table:
    s = G.summary(g)
    t = Table(title=f"UMIG: {s['nodes']} nodes, {s['edges']} edges, {s['roots']} roots, {s['leaves']} leaves")
    t.add_column("framework")
    t.add_column("nodes", justify="right")
    for fw, c in sorted(s["frameworks"].items()):
        t.add_row(f"[{FRAMEWORK_STYLE.get(fw, 'white')}]{fw}[/]", str(c))
    d = Table(title="nodes per depth")
    d.add_column("depth", justify="right")
    d.add_column("nodes", justify="right")
    rows = list(s["depths"].items())
    if len(rows) > 12:  # a deep lineage: first levels, a count of the middle, the last levels
        hidden = rows[8:-2]
        rows = rows[:8] + [(f"{hidden[0][0]}-{hidden[-1][0]}", sum(c for _, c in hidden))] + rows[-2:]
    for depth, c in rows:
        d.add_row(str(depth), str(c))
    outer = Table.grid(padding=(0, 4))
    outer.add_row(t, d)
    return outer


def first_levels(g: nx.DiGraph, max_nodes: int, *, levels: int = 6, per_level: int = 6) -> FitTable:
    """The first depth levels of a large graph, one line each (a few names and a count)."""
    by_depth: dict[int, list[str]] = {}
    for n, d in G.depths(g).items():
        by_depth.setdefault(d, []).append(n)
    t = FitTable(title=f"first levels ({g.number_of_nodes()} nodes > --max-nodes {max_nodes}: summary only; "
                       "raise --max-nodes for the whole tree, or use --format json|dot, --output FILE.png)")
    t.add_column("depth", justify="right")
    t.add_column("nodes", justify="right")
    t.add_column("names")
    for depth in sorted(by_depth)[:levels]:
        names = sorted(by_depth[depth])
        shown = ", ".join(_label(g, n) for n in names[:per_level])
        t.add_row(str(depth), str(len(names)), shown + (f" [dim]... (+{len(names) - per_level})[/]"
                                                        if len(names) > per_level else ""))
    if len(by_depth) > levels:
        t.add_row("...", str(sum(len(v) for d, v in by_depth.items() if d >= levels)),
                  f"[dim]{len(by_depth) - levels} more level(s)[/]")
    return t


def node_table(g: nx.DiGraph, names: Iterable[str]) -> FitTable:
    t = FitTable(title="nodes")
    for col in ("name", "framework", "version", "classes", "data labels", "data size", "parents"):
        t.add_column(col)
    for n in names:
        a = g.nodes[n]
        t.add_row(
            n,
            a.get("framework", ""),
            str(a.get("version", 0)),
            str(len(a.get("classes", ()))),
            _ranges(sorted(a.get("labels") or ())),
            str(a.get("data_size", 0)),
            ", ".join(sorted(g.predecessors(n))),
        )
    return t


def graph_json(g: nx.DiGraph) -> dict:
    return {
        "summary": G.summary(g),
        "nodes": [
            {
                "name": n,
                "framework": a.get("framework"),
                "version": a.get("version", 0),
                "classes": list(a.get("classes", ())),
                "labels": sorted(a.get("labels") or ()),
                "data_size": a.get("data_size", 0),
                "head": a.get("head"),
            }
            for n, a in g.nodes(data=True)
        ],
        "edges": [
            {"parent": u, "child": v, "relation": a.get("relation"), "weight": a.get("weight")}
            for u, v, a in g.edges(data=True)
        ],
    }


def graph_view(g: nx.DiGraph, fmt: str, max_nodes: int) -> Any:
    """What ``graph show`` prints for a non-JSON format (see ``emit``); DOT is written raw, not through rich."""
    if fmt == "dot":
        sys.stdout.write(graph_dot(g))
        return None
    if fmt == "summary" or g.number_of_nodes() > max_nodes:
        # A large graph gets a bounded summary (counts per framework and depth, the first levels), never a flood.
        return summary_table(g), first_levels(g, max_nodes)
    if fmt == "table":
        return node_table(g, G.bfs_order(g)[:max_nodes])
    return graph_tree(g, max_nodes)


def write_graph(g: nx.DiGraph, path: Path, fmt: str) -> None:
    """``graph show --output``: a picture (fmt "image"), DOT or JSON file."""
    if fmt == "image":
        graph_image(g, path)
    elif fmt == "dot":
        path.write_text(graph_dot(g))
    else:
        path.write_text(json.dumps(graph_json(g), indent=2))


def node_json(info: Any, versions: Iterable[Any], fim: Any) -> dict:
    """``node show`` data: the node record, its versions and a description of its model FIM."""
    data = info.to_json()
    data["versions"] = [
        {"version": v.version, "operation": v.operation, "purged": v.purged, "adapter": bool(v.delta_blob),
         "created": v.created}
        for v in versions
    ]
    data["fim"] = (
        {"weight_shape": list(fim.weight.shape), "bias_shape": list(fim.bias.shape) if fim.bias is not None else None,
         "classes": list(fim.classes), "samples": fim.samples, "kind": fim.kind, "temperature": fim.temperature}
        if fim is not None
        else None
    )
    return data


def node_view(data: dict) -> FitTable:
    t = FitTable(title=f"node {data['name']}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k in ("framework", "arch", "head", "classes", "data", "data_size", "label_counts", "version",
              "parents", "children", "meta", "recipe", "fim"):
        v = data[k]
        if k == "parents":  # one per line: name@version (relation, weight)
            text = "\n".join(f"{p['name']}" + (f"@{p['version']}" if p.get("version") is not None else "")
                              + f" ({p['relation']}" + (f", {p['weight']:.4g})" if p["weight"] is not None else ")")
                              for p in v)
        elif k == "children":
            text = ", ".join(v)
        else:
            text = v if isinstance(v, str) else json.dumps(v, default=_json_default)
        t.add_row(k, Text(text or "-"))  # plain text: stored values are never markup
    return t


def graph_dot(g: nx.DiGraph) -> str:
    def q(s: str) -> str:
        return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'

    colors = {"fl": "lightblue", "ddp": "plum", "il": "palegreen", "tl": "khaki", "other": "white"}
    lines = ["digraph umig {", "  rankdir=TB;", "  node [shape=box, style=filled];"]
    for n, a in g.nodes(data=True):
        labels = _ranges(sorted(a.get("labels") or ()))
        text = n + (f"\\n{a.get('framework')} data={labels}" if labels else f"\\n{a.get('framework')}")
        lines.append(f"  {q(n)} [label={q(text)}, fillcolor={colors.get(a.get('framework'), 'white')}];")
    for u, v, a in g.edges(data=True):
        w = a.get("weight")
        lab = a.get("relation", "") + (f" {w:.2f}" if w is not None else "")
        lines.append(f"  {q(u)} -> {q(v)} [label={q(lab)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def graph_image(g: nx.DiGraph, path: Path) -> None:
    """PNG/SVG picture with nodes laid out in rows by depth."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dep = G.depths(g)
    h = g.copy()
    nx.set_node_attributes(h, dep, "depth")
    pos = nx.multipartite_layout(h, subset_key="depth", align="horizontal", scale=1.0)
    pos = {n: (x, -y) for n, (x, y) in pos.items()}
    colors = {"fl": "#8ecae6", "ddp": "#cdb4db", "il": "#b7e4c7", "tl": "#ffe066", "other": "#dddddd"}
    width = max(6.0, min(40.0, 1.2 * max((list(dep.values()).count(d) for d in set(dep.values())), default=1)))
    fig, ax = plt.subplots(figsize=(width, max(4.0, 1.3 * (max(dep.values(), default=0) + 1))))
    nx.draw_networkx_edges(h, pos, ax=ax, arrows=True, arrowsize=14, edge_color="#888888", node_size=900)
    nx.draw_networkx_nodes(
        h, pos, ax=ax, node_color=[colors.get(h.nodes[n].get("framework"), "#ddd") for n in h], node_size=900
    )
    if h.number_of_nodes() <= 300:
        nx.draw_networkx_labels(h, pos, ax=ax, font_size=7)
    ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------ unlearning
class phase_progress:
    """Context manager yielding a ``progress(phase, done, total)`` callback that drives rich bars."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and console.is_terminal
        self._tasks: dict[str, Any] = {}
        self._progress: Any = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=err_console, transient=False)
        self._progress.start()
        return self.update

    def update(self, phase: str, done: int, total: int) -> None:
        if phase not in self._tasks:
            self._tasks[phase] = self._progress.add_task(phase, total=total)
        self._progress.update(self._tasks[phase], completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def forget_text(forget: dict, labels: list[int]) -> str:
    """A forget set's audit record in a few words: labels, sample counts, clients."""
    parts = [f"labels {_ranges(labels)}"] if labels else []
    for smp in (forget or {}).get("samples", []):
        parts.append(f"client {smp['client']}" if "client" in smp else f"{smp['count']} samples")
    return ", ".join(parts) or "-"


def request_text(request: dict) -> str:
    """A deletion request in a few words (ticket, requester), or "" when there is none."""
    parts = [f"ticket {request['ticket']}"] if request.get("ticket") else []
    if request.get("requester"):
        parts.append(f"from {request['requester']}")
    return " ".join(parts)


def plan_view(result: Any) -> FitTable:
    plan = result.plan
    req = request_text(result.request.to_json())
    t = FitTable(title=f"plan: forget {forget_text(plan.forget, list(plan.labels))} with {result.method} "
                       f"({len(plan.discovery)} discovery, {len(plan.inherited)} inherited)" + (f"; {req}" if req else ""))
    t.add_column("phase")
    t.add_column("tasks", justify="right")
    t.add_column("nodes")
    for ph in result.phases:
        nodes = ph["nodes"]
        shown = ", ".join(nodes[:8]) + (f" ... (+{len(nodes) - 8})" if len(nodes) > 8 else "")
        extra = f" [dim]{ph['merge_groups']} merge group(s)[/]" if "merge_groups" in ph else ""
        t.add_row(ph["name"], str(len(nodes)), shown + extra)
    for node, (gone, left) in plan.counts.items():
        if gone:
            t.add_row("[dim]holds forget data[/]", "", f"[dim]{node}: {gone} forgotten, {left} remain[/]")
    if any("merge_groups" in ph for ph in result.phases):  # merge groups mean something to FIUn only
        for key, nodes in plan.groups[:20]:
            t.add_row("[dim]merge group[/]", str(len(nodes)), f"[dim]from {', '.join(sorted(key))}[/]")
    return t


# Accuracy columns of the result table: (metric, split) -> title.
RESULT_METRICS = {("AD_f", "train"): "AD_f train", ("AD_r", "train"): "AD_r train",
                  ("AD_f", "heldout"): "AD_f held-out", ("AD_r", "heldout"): "AD_r held-out"}


def result_table(result: Any) -> FitTable:
    req = request_text(result.request.to_json())
    t = FitTable(title=f"{result.operation}: forgot {forget_text(result.plan.forget, list(result.labels))} with {result.method} "
                       f"on {len(result.nodes)} node(s) in {result.wall_s:.3f} s (eval {result.eval_s:.1f} s)"
                       + (f"; {req}" if req else ""))

    def pair(m: dict, key: str, split: str) -> str | None:
        b, a = m.get(f"{key}_{split}_before"), m.get(f"{key}_{split}_after")
        return None if b is None and a is None else f"{_pct(b)} -> {_pct(a)}"

    # Only the figures this run measured (no held-out columns without --eval-data, none with --no-eval).
    shown = [k for k in RESULT_METRICS if any(pair(n.metrics, *k) is not None for n in result.nodes)]
    t.add_column("node")
    t.add_column("role")
    t.add_column("version", justify="right")
    for k in shown:  # a figure wraps after its arrow ("75.2 ->" / "0.0"), never inside "75.2 -> 0.0"
        t.add_column(RESULT_METRICS[k], justify="right", min_width=len("100.0 ->"))
    t.add_column("s", justify="right")
    for n in result.nodes:
        t.add_row(n.name, n.role, f"{n.version_before} -> {n.version_after}",
                  *(pair(n.metrics, *k) or "-" for k in shown), f"{n.seconds:.3f}")
    return t


def _time(t: float) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def history_table(entries: list[dict]) -> FitTable:
    t = FitTable(title="unlearning operations")
    # Request and verification columns only when some operation has them: fewer columns to fit.
    extra = [k for k in ("ticket", "requester") if any(e.get(k) for e in entries)]
    verified = any(e.get("verification") for e in entries)
    for col in ("operation", "time", "forgot", "method", "state", *extra, "disc.", "nodes", "wall s",
                *(["Avg. Gap"] if verified else [])):
        t.add_column(col)
    for e in entries:
        v = e.get("verification")  # the worst node's Avg. Gap to retraining, once verified
        gap = "-" if not v or v.get("max_avg_gap") is None else f"{v['max_avg_gap']:.2f}"
        t.add_row(e["operation"], _time(e["created"]), forget_text(e.get("forget"), e["labels"]), e["method"],
                  e["state"], *(Text(e.get(k) or "-") for k in extra), str(len(e["discovery"])),
                  str(len(e["affected"])), f"{e['wall_s']:.3f}", *([gap] if verified else []))
    return t


def exports_table(exports: list[Any]) -> FitTable:
    """``umig history --exports``: every node version written out of the store."""
    t = FitTable(title="exports (copies outside the store)")
    for col in ("node", "version", "time", "path"):
        t.add_column(col, justify="right" if col == "version" else "left")
    for e in exports:
        t.add_row(e.node, str(e.version), _time(e.created), Text(e.path))
    return t


def forgotten_view(report: dict) -> list[Text]:
    """``umig forgotten``: which live operations forgot which share of a dataset (plain text: data
    references and paths are never markup)."""
    lines = [(f"{report['data']}: {report['forgotten']} of {report['items']} item(s) forgotten by "
              f"{len(report['operations'])} live operation(s); {report['kept']} kept")]
    for e in report["operations"]:
        what = ", ".join(p for p in (f"label(s) {_ranges(sorted(e['labels']))}" if e["labels"] else "",
                                     f"{e['samples']} sample(s)" if e["samples"] else "") if p)
        lines.append(f"  {e['operation']}" + (f" (ticket {e['ticket']})" if e["ticket"] else "")
                     + f": {e['forgotten']} item(s), {100 * e['share']:.1f}% ({what})")
    if report["unchecked"]:
        lines.append("  not checked (recorded before umig kept forgotten indices): " + ", ".join(report["unchecked"]))
    if report["output"]:
        lines.append(f"wrote the {report['kept']} index(es) nothing forgot to {report['output']} (use it as --subset)")
    return [Text(line) for line in lines]


def write_document(path: Path, text: str) -> None:
    """Write a document (``umig report -o``) as UTF-8; a path that cannot be written is a user error."""
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UmigError(f"cannot write {path}: {e.strerror or e}") from None


def raw(text: str) -> None:
    """Write text to stdout as it is: no markup, no wrapping (a Markdown document)."""
    sys.stdout.write(text)


# Columns of the verification table and plot: metric key -> short title.
VERIFY_COLUMNS = {"forget_acc": "forget", "retain_acc": "retain", "heldout_acc": "held-out",
                  "mia_efficacy": "MIA eff.", "relearn_acc": "relearn", "relearn_reset_acc": "relearn (reset)",
                  "probe_acc": "probe",
                  "head_edit_acc": "head edit"}


def verify_view(out: dict) -> list[Any]:
    """``umig verify``: per node, each metric as unlearned / reference (gap in points), and the Avg. Gap."""
    t = FitTable(title=f"{out['operation']}: {out['method']} vs {out['reference_method']} "
                       f"(reference {out['reference']}, {out['reference_s']:.1f} s); "
                       f"% unlearned / reference (gap, points)")
    t.add_column("node")
    t.add_column("Avg. Gap", justify="right")
    for title in VERIFY_COLUMNS.values():
        t.add_column(title, justify="right")
    for n in out["nodes"]:
        cells = []
        for m in VERIFY_COLUMNS:
            u, r, g = n["unlearned"].get(m), n["reference"].get(m), n["gap"].get(m)
            cells.append("-" if g is None else f"{_pct(u)} / {_pct(r)} ({g:+.1f})")
        t.add_row(n["name"], "-" if n["avg_gap"] is None else f"{n['avg_gap']:.2f}", *cells)
    lines: list[Any] = [t, f"Avg. Gap (mean |gap| over forget, retain, held-out, MIA efficacy): "
                           f"mean {_num(out['avg_gap'])}, worst {_num(out['max_avg_gap'])} points"]
    if out["max_gap"] is not None:
        lines.append(f"--max-gap {out['max_gap']:g}: " + ("[green]passed[/]" if out["passed"] else "[red]exceeded[/]"))
    return lines


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.2f}"


def gap_plot(out: dict, path: Path) -> None:
    """``umig verify --plot``: grouped bars of each node's gap to the reference, metric by metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nodes = [n["name"] for n in out["nodes"]]
    metrics = [m for m in VERIFY_COLUMNS if any(n["gap"].get(m) is not None for n in out["nodes"])]
    width = 0.8 / max(len(metrics) + 1, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(nodes) + 2), 4.5))
    xs = list(range(len(nodes)))
    for i, m in enumerate(metrics):
        ax.bar([x + i * width for x in xs], [n["gap"].get(m) or 0.0 for n in out["nodes"]], width,
               label=VERIFY_COLUMNS[m])
    ax.bar([x + len(metrics) * width for x in xs], [n["avg_gap"] or 0.0 for n in out["nodes"]], width,
           label="Avg. Gap", color="black")
    if out.get("max_gap") is not None:
        ax.axhline(out["max_gap"], color="red", linestyle="--", linewidth=1, label="--max-gap")
    ax.axhline(0, color="#888888", linewidth=0.8)
    ax.set_xticks([x + len(metrics) * width / 2 for x in xs], nodes, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("unlearned - reference (points)")
    ax.set_title(f"{out['operation']}: {out['method']} vs {out['reference_method']}")
    ax.legend(fontsize=7, ncol=4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def eval_table(out: dict) -> FitTable:
    t = FitTable(title=f"{out['node']} v{out['version']}: forgotten labels {_ranges(out['labels'])}")
    for col in ("data", "AD_f", "AD_r", "n_f", "n_r"):
        t.add_column(col)
    for split in ("train", "heldout"):
        if split in out:
            a = out[split]
            t.add_row(split, _pct(a["AD_f"]), _pct(a["AD_r"]), str(a["n_f"]), str(a["n_r"]))
    return t


def methods_table(methods: list[dict]) -> FitTable:
    t = FitTable(title="unlearning methods")
    for col in ("method", "kind", "parameters", "description"):
        t.add_column(col)
    for m in methods:
        params = ", ".join(f"{k}={v['default']}" for k, v in m["params"].items())
        kind = "per-node" if m.get("per_node") else "graph-wide"
        t.add_row(m["name"], kind if "error" not in m else "[red]broken[/]", params, m.get("description") or m.get("error", ""))
    return t


def attribution_view(out: dict) -> list[Any]:
    """``umig attribute``: the ranking (samples, clients or nodes), and the index files ``-o`` wrote."""
    by = out["by"]
    t = FitTable(title=f"{out['node']}: {out['method']} for label(s) {_ranges(out['labels'])}, {out['queries']} "
                       f"query input(s), {out['checkpoints']} checkpoint(s), {out['seconds']:.2f} s; by {by}")
    columns = {"sample": ("rank", "data", "index", "label", "client", "score"),
               "client": ("rank", "client", "nodes", "samples", "score"),
               "node": ("rank", "node", "client", "samples", "score")}[by]
    for col in columns:
        t.add_column(col, justify="right" if col in ("rank", "index", "label", "samples", "score") else "left")
    for row in out["ranking"]:
        cells = []
        for col in columns:
            v = row.get(col)
            text = (f"{v:.4g}" if col == "score" else ", ".join(v) if isinstance(v, list) else "-" if v is None
                    else str(v))
            cells.append(Text(text))  # names and paths are never markup
        t.add_row(*cells)
    lines: list[Any] = [t]
    for w in out.get("written", []):
        lines.append(Text(f"wrote {w['count']} sample index(es) of {w['data']} to {w['path']}: "
                          f"umig unlearn --samples {w['path']} --data {w['data']}"))
    return lines
