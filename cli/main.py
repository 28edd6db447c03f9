"""The ``umig`` command line: parse arguments, call the library, hand results to ``cli.render``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer

from cli import render as R
from umig.errors import UmigError

app = typer.Typer(
    name="umig",
    help="Model lineage manager that can make a whole family of models forget (UMIG + FIUn).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
graph_app = typer.Typer(help="Look at the lineage graph.", no_args_is_help=True)
node_app = typer.Typer(help="Look at one node.", no_args_is_help=True)
app.add_typer(graph_app, name="graph")
app.add_typer(node_app, name="node")

StoreOpt = Annotated[
    Optional[Path],
    typer.Option("--store", envvar="UMIG_STORE", help="Store directory [default: ./.umig, or $UMIG_STORE]."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]


def fail(message: str) -> None:
    """One clear line on stderr, exit code 1."""
    R.err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def handles_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a user-caused error into one line and exit 1; a Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except UmigError as e:
            fail(str(e))
        except KeyboardInterrupt:
            R.err_console.print("interrupted; the store is unchanged")
            raise typer.Exit(130) from None

    return wrapper


def open_store(path: Optional[Path]):
    from umig.store import Store

    return Store.open(path)


def parse_kv(items: list[str], what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise UmigError(f"{what} expects key=value, got '{item}'")
        out[k] = v
    return out


@app.command()
@handles_errors
def init(store: StoreOpt = None, json_out: JsonOpt = False) -> None:
    """Create an empty lineage store."""
    from umig.store import Store

    s = Store.init(store)
    if json_out:
        R.print_json({"store": str(s.root.resolve())})
    else:
        R.console.print(f"initialised umig store at [bold]{s.root}[/]")


@app.command("add-node")
@handles_errors
def add_node(
    name: Annotated[str, typer.Argument(help="Unique node name.")],
    weights: Annotated[Path, typer.Option("--weights", help="Checkpoint: .safetensors, or a .pt state dict.")],
    arch: Annotated[str, typer.Option("--arch", help="torchvision:NAME or package.module:callable.")],
    arch_arg: Annotated[list[str], typer.Option("--arch-arg", help="Builder argument key=value (typed).")] = [],
    parent: Annotated[list[str], typer.Option("--parent", help="Parent node, optionally NAME:WEIGHT.")] = [],
    relation: Annotated[
        Optional[str], typer.Option(help="aggregate|sync|finetune|increment|transfer|copy.")
    ] = None,
    framework: Annotated[str, typer.Option(help="fl|ddp|il|tl|other.")] = "other",
    data: Annotated[Optional[str], typer.Option(help="Training data reference (see README).")] = None,
    subset: Annotated[Optional[Path], typer.Option(help="Index file (.npy or .safetensors) narrowing --data.")] = None,
    only_labels: Annotated[Optional[str], typer.Option(help="Keep only these labels of --data, e.g. 0-4,7.")] = None,
    classes: Annotated[Optional[str], typer.Option(help="Label id of each head output row, e.g. 0-9.")] = None,
    head: Annotated[Optional[str], typer.Option(help="Classifier head module (detected if omitted).")] = None,
    input_shape: Annotated[Optional[str], typer.Option(help="Input shape without batch, e.g. 3,32,32.")] = None,
    no_fim: Annotated[bool, typer.Option("--no-fim", help="Do not compute the model FIM.")] = False,
    meta: Annotated[list[str], typer.Option("--meta", help="Free-form metadata key=value.")] = [],
    recipe: Annotated[Optional[Path], typer.Option(help="Training recipe JSON (needed by --method retrain).")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Record a model node: checkpoint, architecture, parents, data reference and model FIM."""
    from umig.arch import ArchSpec, parse_arch_args
    from umig.data import parse_labels

    if not weights.exists():
        raise UmigError(f"weights file {weights} does not exist")
    if recipe is not None and not recipe.exists():
        raise UmigError(f"recipe file {recipe} does not exist")
    s = open_store(store)
    shape = tuple(int(x) for x in input_shape.split(",")) if input_shape else None
    info = s.add_node(
        name,
        weights,
        ArchSpec(arch, parse_arch_args(arch_arg)),
        parents=parent,
        relation=relation,
        framework=framework,
        data_ref=data,
        subset=str(subset) if subset else None,
        only_labels=only_labels,
        classes=parse_labels(classes) if classes else None,
        head=head,
        input_shape=shape,
        fim=not no_fim,
        meta=parse_kv(meta, "--meta"),
        recipe=recipe,
    )
    if json_out:
        R.print_json(info.to_json())
    else:
        R.console.print(
            f"added node [bold]{info.name}[/] ({info.framework}, head {info.head}, {len(info.classes)} classes, "
            f"{info.data_size} samples)"
        )


@app.command()
@handles_errors
def link(
    parent: Annotated[str, typer.Argument(help="Parent node.")],
    child: Annotated[str, typer.Argument(help="Child node.")],
    relation: Annotated[str, typer.Option(help="aggregate|sync|finetune|increment|transfer|copy.")] = "finetune",
    weight: Annotated[Optional[float], typer.Option(help="Edge weight, e.g. FedAvg data share.")] = None,
    store: StoreOpt = None,
) -> None:
    """Add an inheritance edge between two existing nodes (refused if it closes a cycle)."""
    open_store(store).link(parent, child, relation=relation, weight=weight)
    R.console.print(f"linked {parent} -> {child} ({relation})")


@graph_app.command("show")
@handles_errors
def graph_show(
    format: Annotated[str, typer.Option("--format", "-f", help="tree|table|dot|json|summary.")] = "tree",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write to FILE (.png/.svg render a picture).")] = None,
    max_nodes: Annotated[int, typer.Option(help="Most nodes a tree or table lists before summarising.")] = 200,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show the lineage graph as a tree, table, DOT, JSON or picture."""
    g = open_store(store).graph()
    fmt = "json" if json_out else format
    if output is not None and output.suffix.lower() in (".png", ".svg", ".pdf"):
        R.graph_image(g, output)
        R.console.print(f"wrote {output}")
        return
    if output is not None and fmt not in ("dot", "json"):  # --output g.dot: the suffix picks the format
        fmt = {".dot": "dot", ".gv": "dot", ".json": "json"}.get(output.suffix.lower(), "")
        if not fmt:
            raise UmigError(f"--output {output}: use a .dot, .json, .png, .svg or .pdf file (or --format dot|json)")
    if fmt not in ("tree", "table", "dot", "json", "summary"):
        raise UmigError(f"unknown format '{fmt}' (tree, table, dot, json, summary)")
    if fmt in ("dot", "json"):
        text = R.graph_dot(g) if fmt == "dot" else None
        if output is not None:
            import json as _json

            output.write_text(text if text is not None else _json.dumps(R.graph_json(g), indent=2))
            R.console.print(f"wrote {output}")
        elif text is not None:
            sys.stdout.write(text)
        else:
            R.print_json(R.graph_json(g))
        return
    if fmt == "summary" or g.number_of_nodes() > max_nodes:
        # A large graph gets a bounded summary (counts per framework and depth, the first levels), never a flood.
        R.console.print(R.summary_table(g))
        R.console.print(R.first_levels(g, max_nodes))
        return
    if fmt == "table":
        from umig.graph import bfs_order

        R.console.print(R.node_table(g, bfs_order(g)[:max_nodes]))
    else:
        R.console.print(R.graph_tree(g, max_nodes))


@node_app.command("show")
@handles_errors
def node_show(
    name: Annotated[str, typer.Argument(help="Node name.")],
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one node: architecture, classes, data, parents, versions."""
    s = open_store(store)
    info = s.node(name)
    versions = s.versions(name)
    fim = s.fim(name)
    data = info.to_json()
    data["versions"] = [
        {"version": v.version, "operation": v.operation, "purged": v.purged, "adapter": bool(v.delta),
         "created": v.created}
        for v in versions
    ]
    data["fim"] = (
        {"weight_shape": list(fim.weight.shape), "bias_shape": list(fim.bias.shape) if fim.bias is not None else None,
         "classes": list(fim.classes), "samples": fim.samples, "kind": fim.kind, "temperature": fim.temperature}
        if fim is not None
        else None
    )
    if json_out:
        R.print_json(data)
        return
    from rich.table import Table

    t = Table(title=f"node {name}", show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k in ("framework", "arch", "head", "classes", "data", "data_size", "label_counts", "version",
              "parents", "children", "meta", "recipe", "fim"):
        v = data[k]
        t.add_row(k, R._json_default(v) if not isinstance(v, (str, int)) else str(v))
    R.console.print(t)


@app.command()
@handles_errors
def export(
    name: Annotated[str, typer.Argument(help="Node name.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Destination .safetensors file.")],
    version: Annotated[Optional[int], typer.Option(help="Version (default: current).")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a node's full weights (any adapter merged) to one safetensors file."""
    path = open_store(store).export(name, output, version=version)
    if json_out:
        R.print_json({"node": name, "path": str(path)})
    else:
        R.console.print(f"exported {name} to {path}")


@app.command()
@handles_errors
def remove(
    name: Annotated[str, typer.Argument(help="Node name.")],
    recursive: Annotated[bool, typer.Option("--recursive", "-r", help="Also remove every descendant.")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Remove a node (refused while it has children, unless --recursive)."""
    removed = open_store(store).remove(name, recursive=recursive)
    if json_out:
        R.print_json({"removed": removed})
    else:
        R.console.print(f"removed {', '.join(removed)}")


@app.command()
@handles_errors
def gc(store: StoreOpt = None, json_out: JsonOpt = False) -> None:
    """Delete blobs nothing refers to (left behind by killed runs)."""
    freed = open_store(store).gc()
    if json_out:
        R.print_json({"freed_bytes": freed})
    else:
        R.console.print(f"freed {freed} bytes")


def parse_label_list(text: str) -> list[int]:
    from umig.data import parse_labels

    return list(parse_labels(text))


@app.command()
@handles_errors
def unlearn(
    labels: Annotated[str, typer.Option("--labels", "-l", help="Labels to forget, e.g. 1,2 or 0-4.")],
    method: Annotated[str, typer.Option(help="Unlearning method (see 'umig methods').")] = "fiun",
    param: Annotated[list[str], typer.Option("--param", "-p", help="Method parameter key=value (repeatable).")] = [],
    discovery: Annotated[str, typer.Option(help="Discovery policy: first (paper) or all.")] = "first",
    from_node: Annotated[list[str], typer.Option("--from", help="Only the part reachable from NODE.")] = [],
    workers: Annotated[
        Optional[int], typer.Option(help="Worker processes; 1 runs in-process [default: 1 on CPU, one per GPU].")
    ] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:0,1.")] = "auto",
    workers_per_device: Annotated[Optional[int], typer.Option(help="Workers pinned to each device.")] = None,
    backend: Annotated[str, typer.Option(help="local (worker pool) or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address (with --backend ray).")] = None,
    eval: Annotated[bool, typer.Option("--eval/--no-eval", help="Report AD_f/AD_r before and after.")] = True,
    eval_data: Annotated[Optional[str], typer.Option(help="Held-out data reference for evaluation.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Forget labels across every affected model of the lineage, as one operation."""
    s = open_store(store)
    forget = parse_label_list(labels)
    params = parse_kv(param, "--param")
    if dry_run:
        result = s.plan_unlearning(forget, method=method, params=params, policy=discovery,
                                   from_nodes=from_node or None)
        if json_out:
            R.print_json(result.to_json())
        else:
            R.console.print(R.plan_view(result))
        return
    with R.phase_progress(enabled=not json_out) as progress:
        result = s.unlearn(
            forget, method=method, params=params, policy=discovery, from_nodes=from_node or None,
            workers=workers, device=device, workers_per_device=workers_per_device, backend=backend,
            ray_address=ray_address, evaluate=eval, eval_data=eval_data, progress=progress,
        )
    if json_out:
        R.print_json(result.to_json())
    else:
        R.console.print(R.result_table(result))


@app.command()
@handles_errors
def revert(
    operation: Annotated[str, typer.Argument(help="Operation id (see 'umig history').")],
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Move every node of an operation back to its previous version, bit for bit."""
    nodes = open_store(store).revert(operation)
    if json_out:
        R.print_json({"operation": operation, "reverted": nodes})
    else:
        R.console.print(f"reverted {operation}: {len(nodes)} node(s) back to their previous version")


@app.command()
@handles_errors
def purge(
    operation: Annotated[str, typer.Argument(help="Operation id (see 'umig history').")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Irreversibly delete the weights and FIMs an operation superseded (compliance)."""
    s = open_store(store)
    s._operation(operation)  # unknown id: clear error before asking
    if not yes and sys.stdin.isatty():
        typer.confirm(f"purge {operation}? this cannot be undone", abort=True)
    out = s.purge(operation)
    if json_out:
        R.print_json(out)
    else:
        R.console.print(
            f"purged {operation}: {out['versions_purged']} superseded version(s), {out['blobs_deleted']} blob(s), "
            f"{out['bytes_freed']} bytes"
        )


@app.command()
@handles_errors
def history(
    node: Annotated[Optional[str], typer.Option(help="Only operations that touched NODE.")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The audit log of unlearning operations."""
    entries = open_store(store).history(node=node)
    if json_out:
        R.print_json(entries)
    else:
        R.console.print(R.history_table(entries))


@app.command("eval")
@handles_errors
def eval_node(
    name: Annotated[str, typer.Argument(help="Node name.")],
    labels: Annotated[str, typer.Option("--labels", "-l", help="Forgotten labels, e.g. 1,2.")],
    data: Annotated[Optional[str], typer.Option(help="Held-out data reference.")] = None,
    version: Annotated[Optional[int], typer.Option(help="Version (default: current).")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """AD_f / AD_r of one node on its effective training data (and --data)."""
    from umig.unlearning import evaluate_node

    out = evaluate_node(open_store(store), name, parse_label_list(labels), data=data, version=version)
    if json_out:
        R.print_json(out)
    else:
        R.console.print(R.eval_table(out))


@app.command()
@handles_errors
def methods(json_out: JsonOpt = False) -> None:
    """List installed unlearning methods with their parameters and defaults."""
    from unlearners.base import describe

    out = describe()
    if json_out:
        R.print_json(out)
    else:
        R.console.print(R.methods_table(out))


if __name__ == "__main__":  # pragma: no cover
    app()
