"""The ``umig`` command line: parse arguments, call the library, hand results to ``umig.cli.render``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
from rich.markup import escape

from umig.api import Store
from umig.arch import ArchSpec, parse_arch_args
from umig.attribution import BY, DEFAULT_METHOD as DEFAULT_ATTRIBUTION, METHODS as ATTRIBUTION_METHODS
from umig.attribution import attribute as attribute_behaviour
from umig.attribution import output_paths
from umig.cli import render as R
from umig.data import parse_labels, read_indices
from umig.errors import UmigError
from umig.forget import ForgetSet
from umig.forget import samples as sample_set
from umig.integrations.hf import card_metadata, card_text, export_with_card, write_card
from umig.integrations.mlflow import sync as mlflow_sync
from umig.requests import deletion_report, to_markdown
from umig.requests import forgotten as forgotten_in
from umig.store import Request
from umig.ui.server import require_extra as require_ui_extra
from umig.ui.server import serve as serve_ui
from umig.unlearner import describe, parse_params
from umig.unlearning import evaluate_node
from umig.verify import verify as verify_operation

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
mlflow_app = typer.Typer(help="MLflow's model registry (needs umig\\[mlflow]).", no_args_is_help=True)
app.add_typer(mlflow_app, name="mlflow")

StoreOpt = Annotated[
    Optional[str],
    typer.Option("--store", envvar="UMIG_STORE", metavar="DIR|URL",
                 help="Store: a directory, or postgresql://user@host/db \\[default: ./.umig, or $UMIG_STORE]."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

# Every command prints through R.emit (JSON with --json, else its human view); errors leave through fail().


def fail(message: str) -> None:
    """One clear line on stderr, exit code 1."""
    R.err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)  # text, not markup
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


def open_store(location: Optional[str]):
    return Store.open(location)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UmigError(f"--input-shape expects integers like 3,32,32, got '{text}'") from None


@app.command()
@handles_errors
def init(
    store: StoreOpt = None,
    blobs: Annotated[Optional[str], typer.Option(
        "--blobs", metavar="DIR|URL",
        help="Where blobs go: a directory or s3://bucket/prefix (AWS_* variables give credentials and "
             "endpoint) \\[default: the store directory's blobs/; a postgresql:// store needs one].")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Create an empty lineage store: embedded (a directory) or shared (PostgreSQL + S3)."""
    s = Store.init(store, blobs=blobs)
    R.emit({"store": s.url, "blobs": s.blobs.url}, as_json=json_out,
           human=lambda d: f"initialised umig store at [bold]{d['store']}[/] (blobs: {d['blobs']})")


@app.command("add-node")
@handles_errors
def add_node(
    name: Annotated[str, typer.Argument(help="Unique node name.")],
    weights: Annotated[Path, typer.Option("--weights", help="Checkpoint: .safetensors, or a .pt state dict.")],
    arch: Annotated[str, typer.Option("--arch", help="torchvision:NAME or package.module:callable.")],
    arch_arg: Annotated[list[str], typer.Option("--arch-arg", help="Builder argument key=value (typed).")] = [],
    parent: Annotated[list[str], typer.Option(
        "--parent", help="Parent node: NAME, or NAME@VERSION (the version it was derived from; default: the live "
                         "one), optionally with :WEIGHT.")] = [],
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
    catch_up: Annotated[bool, typer.Option(
        "--catch-up", help="Derived from a version an unlearning operation superseded, or trained on data it "
                           "forgot: record the node and apply those operations to it, instead of refusing it.")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Record a model node: checkpoint, architecture, parents, data reference and model FIM."""

    if not weights.exists():
        raise UmigError(f"weights file {weights} does not exist")
    if recipe is not None and not recipe.exists():
        raise UmigError(f"recipe file {recipe} does not exist")
    s = open_store(store)
    shape = parse_shape(input_shape) if input_shape else None
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
        compute_fim=not no_fim,
        meta=parse_params(meta, "--meta"),
        recipe=recipe,
        catch_up=catch_up,
    )
    caught = s.caught_up(node=info.name) if catch_up else []
    R.emit({**info.to_json(), **({"caught_up": caught} if catch_up else {})}, as_json=json_out,
           human=lambda _: f"added node [bold]{info.name}[/] ({info.framework}, head {info.head}, "
                           f"{len(info.classes)} classes, {info.data_size} samples)"
                           + (f"; caught up with {', '.join(c['operation'] for c in caught)} "
                              f"(now v{info.version})" if caught else ""))


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
    R.emit(None, as_json=False, human=lambda _: f"linked {parent} -> {child} ({relation})")


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
    fmt = graph_format("json" if json_out else format, output)
    if output is not None:  # a file is written whatever --json says; stdout gets one line naming it
        R.write_graph(g, output, fmt)
        R.emit(None, as_json=False, human=lambda _: f"wrote {output}")
        return
    R.emit(g, as_json=fmt == "json", to_json=R.graph_json, human=lambda g: R.graph_view(g, fmt, max_nodes))


def graph_format(fmt: str, output: Path | None) -> str:
    """The format ``graph show`` writes: "image" for a picture file, else tree|table|dot|json|summary."""
    if output is not None and output.suffix.lower() in (".png", ".svg", ".pdf"):
        return "image"
    if output is not None and fmt not in ("dot", "json"):  # --output g.dot: the suffix picks the format
        fmt = {".dot": "dot", ".gv": "dot", ".json": "json"}.get(output.suffix.lower(), "")
        if not fmt:
            raise UmigError(f"--output {output}: use a .dot, .json, .png, .svg or .pdf file (or --format dot|json)")
    if fmt not in ("tree", "table", "dot", "json", "summary"):
        raise UmigError(f"unknown format '{fmt}' (tree, table, dot, json, summary)")
    return fmt


@node_app.command("show")
@handles_errors
def node_show(
    name: Annotated[str, typer.Argument(help="Node name.")],
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Show one node: architecture, classes, data, parents, versions."""
    s = open_store(store)
    R.emit(R.node_json(s.node(name), s.versions(name), s.fim(name)), as_json=json_out, human=R.node_view)


@app.command()
@handles_errors
def export(
    name: Annotated[str, typer.Argument(help="Node name.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Destination .safetensors file.")] = None,
    model_card: Annotated[Optional[Path], typer.Option(
        "--model-card", help="Write DIR/README.md (the model card) and the weights (DIR/model.safetensors "
                             "unless -o names a file).")] = None,
    version: Annotated[Optional[int], typer.Option(help="Version (default: current).")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Write a node's full weights (any adapter merged) to one safetensors file, optionally with its model card."""
    if output is None and model_card is None:
        raise UmigError("name where to write: -o FILE (.safetensors) and/or --model-card DIR")
    s = open_store(store)
    if model_card is not None:
        out = export_with_card(s, name, model_card, version=version, checkpoint=output)
        R.emit(out, as_json=json_out, human=lambda d: f"exported {name} to {d['path']}, model card {d['card']}")
        return
    path = s.export(name, output, version=version)
    R.emit({"node": name, "path": str(path)}, as_json=json_out, human=lambda _: f"exported {name} to {path}")


@app.command()
@handles_errors
def card(
    name: Annotated[str, typer.Argument(help="Node name.")],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write the card to FILE (a directory gets README.md).")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """A Hugging Face model card for a node: lineage, training data and unlearning history."""
    s = open_store(store)
    if output is not None:  # a file is written; stdout gets one line naming it
        path = write_card(s, name, output)
        R.emit({"node": name, "path": str(path)}, as_json=json_out, human=lambda _: f"wrote {path}")
        return
    R.emit(card_metadata(s, name), as_json=json_out, human=lambda _: R.raw(card_text(s, name)))


@mlflow_app.command("sync")
@handles_errors
def mlflow_sync_cmd(
    tracking_uri: Annotated[str, typer.Option("--tracking-uri", help="MLflow tracking/registry URI, e.g. sqlite:///m.db.")],
    registered_model: Annotated[Optional[str], typer.Option(
        "--registered-model", help="Register every version under this model \\[default: one per node].")] = None,
    experiment: Annotated[str, typer.Option(help="Experiment that holds the logged models.")] = "umig",
    artifact_root: Annotated[Optional[str], typer.Option(
        "--artifact-root", help="Artifact location (URI or folder) of the experiment when it is created.")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Register every node version not in MLflow yet (lineage as tags); tag the superseded ones."""
    if artifact_root is not None and "://" not in artifact_root:
        artifact_root = Path(artifact_root).resolve().as_uri()
    out = mlflow_sync(open_store(store), tracking_uri, registered_model=registered_model, experiment=experiment,
                      artifact_location=artifact_root)
    R.emit(out, as_json=json_out, human=lambda d: (
        f"registered {len(d['registered'])} version(s), tagged {len(d['tagged'])} superseded, "
        f"{len(d['skipped'])} already in MLflow"))


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
    R.emit({"removed": removed}, as_json=json_out, human=lambda d: f"removed {', '.join(d['removed'])}")


@app.command()
@handles_errors
def gc(store: StoreOpt = None, json_out: JsonOpt = False) -> None:
    """Delete blobs nothing refers to (left behind by killed runs)."""
    freed = open_store(store).gc()
    R.emit({"freed_bytes": freed}, as_json=json_out, human=lambda d: f"freed {d['freed_bytes']} bytes")


def parse_label_list(text: str) -> list[int]:

    return list(parse_labels(text))


@app.command()
@handles_errors
def unlearn(
    labels: Annotated[Optional[str], typer.Option("--labels", "-l", help="Labels to forget, e.g. 1,2 or 0-4.")] = None,
    samples: Annotated[Optional[Path], typer.Option(
        "--samples", help="Index file (.npy, or safetensors tensor 'indices') of samples to forget, into --data.")] = None,
    data: Annotated[Optional[str], typer.Option(
        "--data", help="The dataset --samples indexes (any data reference; matched by fingerprint).")] = None,
    client: Annotated[list[str], typer.Option(
        "--client", help="Forget everything in NODE's own training data, at every round (repeatable).")] = [],
    method: Annotated[Optional[str], typer.Option(
        help="Unlearning method (see 'umig methods') \\[default: fiun for labels; for samples and clients the "
             "measured default, see README].")] = None,
    param: Annotated[list[str], typer.Option("--param", "-p", help="Method parameter key=value (repeatable).")] = [],
    discovery: Annotated[str, typer.Option(help="Discovery policy: first (paper) or all.")] = "first",
    from_node: Annotated[list[str], typer.Option("--from", help="Only the part reachable from NODE.")] = [],
    workers: Annotated[
        Optional[int], typer.Option(help="Worker processes; 1 runs in-process \\[default: 1 on CPU, one per GPU].")
    ] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:0,1.")] = "auto",
    workers_per_device: Annotated[Optional[int], typer.Option(help="Workers pinned to each device.")] = None,
    backend: Annotated[str, typer.Option(help="local (worker pool) or ray.")] = "local",
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address (with --backend ray).")] = None,
    eval: Annotated[bool, typer.Option("--eval/--no-eval", help="Report AD_f/AD_r before and after.")] = True,
    eval_data: Annotated[Optional[str], typer.Option(help="Held-out data reference for evaluation.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; change nothing.")] = False,
    requester: Annotated[Optional[str], typer.Option(
        help="Who asked for the deletion (a person, team or e-mail), recorded with the operation.")] = None,
    reason: Annotated[Optional[str], typer.Option(
        help="Why, e.g. 'GDPR art. 17 erasure request', recorded with the operation.")] = None,
    ticket: Annotated[Optional[str], typer.Option(
        help="The ticket or case id that tracks the request (see 'umig history --ticket').")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Forget labels, samples or clients across every affected model of the lineage, as one operation."""
    request = Request(requester=requester, reason=reason, ticket=ticket)  # malformed: one error line, nothing runs
    s = open_store(store)
    if samples is not None and data is None:
        raise UmigError("--samples needs --data naming the dataset its indices refer to")
    if data is not None and samples is None:
        raise UmigError("--data goes with --samples")
    if labels is None and samples is None and not client:
        raise UmigError("nothing to forget: give --labels, --samples with --data, or --client")
    forget = ForgetSet(labels=parse_label_list(labels) if labels is not None else (),
                       samples=(sample_set(read_indices(samples), data),) if samples is not None else ())
    params = parse_params(param, "--param")
    if dry_run:
        result = s.plan_unlearning(forget, clients=client, method=method, params=params, policy=discovery,
                                   from_nodes=from_node or None, request=request)
        R.emit(result, as_json=json_out, to_json=lambda r: r.to_json(), human=R.plan_view)
        return
    with R.phase_progress(enabled=not json_out) as progress:
        result = s.unlearn(
            forget, clients=client, method=method, params=params, policy=discovery, from_nodes=from_node or None,
            workers=workers, device=device, workers_per_device=workers_per_device, backend=backend,
            ray_address=ray_address, evaluate=eval, eval_data=eval_data, progress=progress, request=request,
        )
    R.emit(result, as_json=json_out, to_json=lambda r: r.to_json(), human=R.result_table)


@app.command()
@handles_errors
def revert(
    operation: Annotated[str, typer.Argument(help="Operation id (see 'umig history').")],
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Move every node of an operation back to its previous version, bit for bit."""
    nodes = open_store(store).revert(operation)
    R.emit({"operation": operation, "reverted": nodes}, as_json=json_out,
           human=lambda _: f"reverted {operation}: {len(nodes)} node(s) back to their previous version")


@app.command()
@handles_errors
def purge(
    operation: Annotated[str, typer.Argument(help="Operation id (see 'umig history').")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Irreversibly delete the weights and FIMs an operation superseded, and its forgotten labels' sums
    from the model FIMs its nodes keep (compliance)."""
    s = open_store(store)
    s._operation(operation)  # unknown id: clear error before asking
    if not yes and sys.stdin.isatty():
        typer.confirm(f"purge {operation}? this cannot be undone", abort=True)
    R.emit(s.purge(operation), as_json=json_out,
           human=lambda d: f"purged {operation}: {d['versions_purged']} superseded version(s), "
                           f"{d['blobs_deleted']} blob(s), {d['bytes_freed']} bytes; model FIMs without the "
                           f"forgotten labels: {d['fims_replaced']} version(s)"
                           + (f", {d['fims_kept']} kept as recorded" if d["fims_kept"] else ""))


@app.command()
@handles_errors
def history(
    node: Annotated[Optional[str], typer.Option(help="Only operations that touched NODE (with --exports: "
                                                     "exports of NODE).")] = None,
    ticket: Annotated[Optional[str], typer.Option(help="Only operations that answer ticket ID.")] = None,
    requester: Annotated[Optional[str], typer.Option(
        help="Only operations REQUESTER asked for (exact, case-insensitive).")] = None,
    exports: Annotated[bool, typer.Option(
        "--exports", help="List exports (node, version, destination, time) instead of operations.")] = False,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The audit log: unlearning operations with the requests they answer, or (--exports) exports."""
    s = open_store(store)
    if exports:
        if ticket is not None or requester is not None:
            raise UmigError("--ticket and --requester filter operations; exports have no request "
                            "(use --node with --exports)")
        R.emit(s.exports(node=node), as_json=json_out, to_json=lambda es: [e.to_json() for e in es],
               human=R.exports_table)
        return
    R.emit(s.history(node=node, ticket=ticket, requester=requester), as_json=json_out, human=R.history_table)


@app.command()
@handles_errors
def report(
    operation: Annotated[str, typer.Argument(help="Operation id (see 'umig history').")],
    format: Annotated[str, typer.Option("--format", "-f", help="md (Markdown) or json.")] = "md",
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the report to FILE.")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """One document for an auditor: the request, what was forgotten, how, which models changed,
    verification, purge, exported copies."""
    fmt = "json" if json_out else format
    if fmt not in ("md", "json"):
        raise UmigError(f"unknown format '{format}' (md, json)")
    data = deletion_report(open_store(store), operation)
    if output is not None:  # a file is written; stdout gets one line naming it
        R.write_document(output, to_markdown(data) if fmt == "md" else R.json_text(data))
        R.emit({"operation": operation, "path": str(output)}, as_json=json_out, human=lambda _: f"wrote {output}")
        return
    R.emit(data, as_json=fmt == "json", human=lambda d: R.raw(to_markdown(d)))


@app.command()
@handles_errors
def forgotten(
    data: Annotated[str, typer.Option("--data", help="The dataset to check (any data reference, with its subset).")],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write the indices nothing forgot (into the whole source) to FILE (.npy or "
                               ".safetensors), for add-node --subset.")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Which live unlearning operations forgot which share of a dataset, and what is left to train on."""
    out = forgotten_in(open_store(store), data, output=output)
    R.emit(out, as_json=json_out, human=R.forgotten_view)


@app.command()
@handles_errors
def verify(
    operation: Annotated[str, typer.Argument(help="Operation id (see 'umig history').")],
    data: Annotated[Optional[str], typer.Option(
        help="Held-out data reference (default: sklearn digits' test split when the nodes trained on its "
             "train split).")] = None,
    samples: Annotated[list[Path], typer.Option(
        "--samples", help="The index file an operation that forgot samples was run with (its record keeps "
                          "only a digest; repeatable).")] = [],
    max_gap: Annotated[Optional[float], typer.Option(
        "--max-gap", help="Exit 1 when any node's Avg. Gap to retraining exceeds G percentage points.")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="Draw the per-node gaps to FILE (.png, .svg or .pdf).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Worker processes for the reference retrain.")] = None,
    device: Annotated[str, typer.Option(help="auto|cpu|cuda|cuda:0,1.")] = "auto",
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compare an operation's unlearned models with retraining (kept as its reference), under attack too."""
    if plot is not None and plot.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UmigError(f"--plot {plot}: use a .png, .svg or .pdf file")
    if plot is not None and not plot.resolve().parent.is_dir():
        raise UmigError(f"--plot {plot}: directory {plot.resolve().parent} does not exist")
    for f in samples:
        if not f.exists():
            raise UmigError(f"samples file {f} does not exist")
    s = open_store(store)
    with R.phase_progress(enabled=not json_out) as progress:
        out = verify_operation(s, operation, data=data, samples=[read_indices(f) for f in samples],
                               max_gap=max_gap, workers=workers, device=device, progress=progress)
    if plot is not None:
        R.gap_plot(out, plot)
    R.emit(out, as_json=json_out, human=R.verify_view)
    if out["passed"] is False:
        worst = max((n for n in out["nodes"] if n["avg_gap"] is not None), key=lambda n: n["avg_gap"])
        fail(f"Avg. Gap {worst['avg_gap']:.2f} points at {worst['name']} exceeds --max-gap {max_gap:g}")


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
    out = evaluate_node(open_store(store), name, parse_label_list(labels), data=data, version=version)
    R.emit(out, as_json=json_out, human=R.eval_table)


@app.command()
@handles_errors
def methods(json_out: JsonOpt = False) -> None:
    """List installed unlearning methods with their parameters and defaults."""
    R.emit(describe(), as_json=json_out, human=R.methods_table)


@app.command()
@handles_errors
def attribute(
    name: Annotated[str, typer.Argument(help="The node whose behaviour to trace back.")],
    inputs: Annotated[Path, typer.Option(
        "--inputs", help="Query inputs that show the behaviour: safetensors with x (one row per input) and "
                         "optional y (labels).")],
    labels: Annotated[Optional[str], typer.Option(
        "--labels", "-l", help="The label the behaviour is about, e.g. 7 \\[default: the file's y, else the "
                               "node's own prediction].")] = None,
    by: Annotated[str, typer.Option("--by", help="Rank training samples, clients (the same data across "
                                                 "rounds, as --client counts it) or nodes: sample|client|node.")] = "sample",
    top: Annotated[Optional[int], typer.Option(
        "--top", help="Rows to list, and with -o the samples to write \\[default: 20 samples; every client or node].")] = None,
    method: Annotated[str, typer.Option(
        help=f"Scoring method: {', '.join(ATTRIBUTION_METHODS)} (see README).")] = DEFAULT_ATTRIBUTION,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="With --by sample: write the top samples as int64 indices into their dataset "
                               "(.npy or .safetensors) for 'umig unlearn --samples FILE --data REF'; one file per "
                               "dataset (FILE-1, FILE-2, ...) when there are several.")] = None,
    store: StoreOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Which training samples, clients or nodes of NODE's lineage made it behave as the inputs show (reads only)."""
    if by not in BY:
        raise UmigError(f"--by must be one of {', '.join(BY)}, got '{by}'")
    if top is not None and top < 1:
        raise UmigError(f"--top must be at least 1, got {top}")
    if output is not None:
        if by != "sample":
            raise UmigError("-o writes samples: use it with --by sample (a whole client is forgotten with "
                            "'umig unlearn --client NODE')")
        output_paths(output, 1)  # a bad suffix is refused before any work
    if method not in ATTRIBUTION_METHODS:
        raise UmigError(f"unknown attribution method '{method}' (known: {', '.join(ATTRIBUTION_METHODS)})")
    result = attribute_behaviour(open_store(store), name, inputs, method=method,
                                 labels=parse_labels(labels) if labels is not None else None)
    k = top if top is not None else (20 if by == "sample" else None)
    out = result.to_json(by, k)
    if output is not None and k is not None:  # -o goes with --by sample (checked above), which sets k
        out["written"] = result.write_samples(output, k)
    R.emit(out, as_json=json_out, human=R.attribution_view)


@app.command()
@handles_errors
def ui(
    host: Annotated[str, typer.Option(help="Address to listen on; 127.0.0.1 is this machine only.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free port).")] = 8000,
    allow_write: Annotated[bool, typer.Option(
        "--allow-write", help="Let the page run and revert operations; without it the server has no "
                              "endpoint that changes the store.")] = False,
    store: StoreOpt = None,
) -> None:
    """Browse the lineage in a local web app: the graph, node pages, operations and forget-set previews."""
    require_ui_extra()  # without the extra: one line naming it, exit 1
    s = open_store(store)
    mode = "read-write" if allow_write else "read-only"

    def announce(url: str) -> None:
        R.emit(None, as_json=False, human=lambda _: R.raw(f"umig ui ({mode}) on {url} for {s.url}; Ctrl-C stops it\n"))
        sys.stdout.flush()  # a pipe reading the address sees it now

    serve_ui(s, host=host, port=port, allow_write=allow_write, announce=announce)


store_app = typer.Typer(help="Whole stores: copy between backends.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("copy")
@handles_errors
def store_copy(
    src: Annotated[str, typer.Argument(metavar="SRC", help="The store to copy: a directory or postgresql:// URL.")],
    dst: Annotated[str, typer.Argument(metavar="DST", help="Where to: a new directory or an empty database.")],
    blobs: Annotated[Optional[str], typer.Option(
        "--blobs", metavar="DIR|URL", help="The destination's blob location (as for 'umig init').")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Copy a whole store to another backend (local <-> PostgreSQL/S3), every blob verified by digest."""
    with open_store(src) as s, R.phase_progress(enabled=not json_out) as progress:
        out = s.copy_into(dst, blobs=blobs,
                          progress=(lambda done, total: progress("blobs", done, total)) if progress else None)
    R.emit(out, as_json=json_out,
           human=lambda o: f"copied {o['rows']} rows and {o['blobs']} blobs ({o['bytes'] / 1e6:.1f} MB) "
                           f"from {o['source']} to [bold]{o['destination']}[/]")


if __name__ == "__main__":  # pragma: no cover
    app()
