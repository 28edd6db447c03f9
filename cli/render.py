"""Rendering for the CLI: rich tables and trees, Graphviz DOT, PNG/SVG pictures, JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import networkx as nx
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from umig import graph as G

console = Console()
err_console = Console(stderr=True)

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
    sys.stdout.write(json.dumps(data, indent=2, default=_json_default) + "\n")


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


def first_levels(g: nx.DiGraph, max_nodes: int, *, levels: int = 6, per_level: int = 6) -> Table:
    """The first depth levels of a large graph, one line each (a few names and a count)."""
    by_depth: dict[int, list[str]] = {}
    for n, d in G.depths(g).items():
        by_depth.setdefault(d, []).append(n)
    t = Table(title=f"first levels ({g.number_of_nodes()} nodes > --max-nodes {max_nodes}: summary only; "
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


def node_table(g: nx.DiGraph, names: Iterable[str]) -> Table:
    t = Table(title="nodes")
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


def node_view(data: dict) -> Table:
    t = Table(title=f"node {data['name']}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k in ("framework", "arch", "head", "classes", "data", "data_size", "label_counts", "version",
              "parents", "children", "meta", "recipe", "fim"):
        v = data[k]
        t.add_row(k, _json_default(v) if not isinstance(v, (str, int)) else str(v))
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


def plan_view(result: Any) -> Table:
    plan = result.plan
    t = Table(title=f"plan: forget {forget_text(plan.forget, list(plan.labels))} with {result.method} "
                    f"({len(plan.discovery)} discovery, {len(plan.inherited)} inherited)")
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


def result_table(result: Any) -> Table:
    t = Table(title=f"{result.operation}: forgot {forget_text(result.plan.forget, list(result.labels))} with {result.method} "
                    f"on {len(result.nodes)} node(s) in {result.wall_s:.3f} s (eval {result.eval_s:.1f} s)")
    for col in ("node", "role", "version", "AD_f train", "AD_r train", "AD_f held-out", "AD_r held-out", "s"):
        t.add_column(col, justify="left" if col in ("node", "role") else "right")
    for n in result.nodes:
        m = n.metrics

        def pair(key: str, split: str) -> str:
            b, a = m.get(f"{key}_{split}_before"), m.get(f"{key}_{split}_after")
            return "-" if b is None and a is None else f"{_pct(b)} -> {_pct(a)}"

        t.add_row(n.name, n.role, f"{n.version_before} -> {n.version_after}", pair("AD_f", "train"),
                  pair("AD_r", "train"), pair("AD_f", "heldout"), pair("AD_r", "heldout"), f"{n.seconds:.3f}")
    return t


def history_table(entries: list[dict]) -> Table:
    import datetime as dt

    t = Table(title="unlearning operations")
    for col in ("operation", "time", "labels", "method", "state", "discovery", "affected", "wall s", "Avg. Gap"):
        t.add_column(col)
    for e in entries:
        v = e.get("verification")  # the worst node's Avg. Gap to retraining, once verified
        gap = "-" if not v or v.get("max_avg_gap") is None else f"{v['max_avg_gap']:.2f}"
        t.add_row(e["operation"], dt.datetime.fromtimestamp(e["created"]).strftime("%Y-%m-%d %H:%M:%S"),
                  _ranges(e["labels"]), e["method"], e["state"], str(len(e["discovery"])),
                  str(len(e["affected"])), f"{e['wall_s']:.3f}", gap)
    return t


# Columns of the verification table and plot: metric key -> short title.
VERIFY_COLUMNS = {"forget_acc": "forget", "retain_acc": "retain", "heldout_acc": "held-out",
                  "mia_efficacy": "MIA eff.", "relearn_acc": "relearn", "relearn_reset_acc": "relearn (reset)",
                  "probe_acc": "probe",
                  "head_edit_acc": "head edit"}


def verify_view(out: dict) -> list[Any]:
    """``umig verify``: per node, each metric as unlearned / reference (gap in points), and the Avg. Gap."""
    t = Table(title=f"{out['operation']}: {out['method']} vs {out['reference_method']} "
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



def eval_table(out: dict) -> Table:
    t = Table(title=f"{out['node']} v{out['version']}: forgotten labels {_ranges(out['labels'])}")
    for col in ("data", "AD_f", "AD_r", "n_f", "n_r"):
        t.add_column(col)
    for split in ("train", "heldout"):
        if split in out:
            a = out[split]
            t.add_row(split, _pct(a["AD_f"]), _pct(a["AD_r"]), str(a["n_f"]), str(a["n_r"]))
    return t


def methods_table(methods: list[dict]) -> Table:
    t = Table(title="unlearning methods")
    for col in ("method", "kind", "parameters", "description"):
        t.add_column(col)
    for m in methods:
        params = ", ".join(f"{k}={v['default']}" for k, v in m["params"].items())
        kind = "per-node" if m.get("per_node") else "graph-wide"
        t.add_row(m["name"], kind if "error" not in m else "[red]broken[/]", params, m.get("description") or m.get("error", ""))
    return t
