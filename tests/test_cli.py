"""The `umig` command line (issue 2): a small FL lineage built through the real CLI, and bad input.

Building the FL lineage, the graph JSON, export and a corrupted-blob error run `umig` in
subprocesses (the real entry point). The long bad-input matrix and the --help loop run the same typer app in-process
(typer's CliRunner), because each subprocess pays a torch import on busy cores.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import typer.main
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from umig.cli.main import app
from conftest import store_state, umig_cli
from conftest import cli_run as run
from umig.data import digits_client_split, save_subset
from umig.models import digits_cnn
from umig.train import fedavg

DIGITS = "sklearn:digits?split=train"
ARCH = "umig.models:digits_cnn"


def assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert code == 1, (code, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])


def save_st(path: Path, sd: dict) -> Path:
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def lineage(tmp_path_factory):
    """3 FL clients (c2 imported from a .pt state dict) + FedAvg aggregate + a 5-way transfer child,
    recorded with `umig init` / `umig add-node` subprocesses."""
    work = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    clients = [digits_cnn().state_dict() for _ in range(3)]
    shards = digits_client_split(3, split="train", seed=0)
    files, subsets = [], []
    for i, sd in enumerate(clients):
        subsets.append(save_subset(work / f"idx{i}.npy", shards[i]))
        if i == 2:
            torch.save(sd, work / "c2.pt")
            files.append(work / "c2.pt")
        else:
            files.append(save_st(work / f"c{i}.safetensors", sd))
    agg_sd = fedavg(clients, [len(s) for s in shards])
    save_st(work / "agg.safetensors", agg_sd)
    t5_sd = digits_cnn(num_classes=5).state_dict()
    save_st(work / "t5.safetensors", t5_sd)

    root = work / "store"
    init = umig_cli("init", "--json", store=root, check=True)
    assert json.loads(init.stdout)["store"] == str(root.resolve())
    for i in range(3):
        out = umig_cli("add-node", f"c{i}", "--weights", str(files[i]), "--arch", ARCH, "--data", DIGITS,
                       "--subset", subsets[i], "--framework", "fl", "--meta", f"client={i}", store=root, check=True)
        assert f"added node c{i}" in out.stdout
    umig_cli("add-node", "agg", "--weights", str(work / "agg.safetensors"), "--arch", ARCH, "--framework", "fl",
             "--parent", "c0:0.33", "--parent", "c1:0.33", "--parent", "c2:0.34", store=root, check=True)
    # (in-process: the same typer app, without another torch import)
    t5 = run("add-node", "t5", "--weights", str(work / "t5.safetensors"), "--arch", ARCH,
             "--arch-arg", "num_classes=5", "--classes", "5-9", "--data", DIGITS, "--only-labels", "5-9",
             "--framework", "tl", "--parent", "agg", "--json", store=root)
    assert t5.exit_code == 0, t5.stderr
    return SimpleNamespace(root=root, work=work, clients=clients, agg=agg_sd, t5=t5_sd, subsets=subsets,
                           sizes=[len(s) for s in shards], t5_json=json.loads(t5.stdout))


@pytest.fixture
def copy(lineage, tmp_path) -> Path:
    """A private copy of the CLI-built store."""
    dst = tmp_path / "store"
    shutil.copytree(lineage.root, dst)
    return dst


# ------------------------------------------------------------ structure
def test_graph_show_json_structure(lineage):
    out = umig_cli("graph", "show", "--format", "json", store=lineage.root, check=True)
    g = json.loads(out.stdout)
    assert g["summary"]["nodes"] == 5 and g["summary"]["edges"] == 4
    assert g["summary"]["roots"] == 3 and g["summary"]["leaves"] == 1
    assert g["summary"]["frameworks"] == {"fl": 4, "tl": 1}
    assert g["summary"]["depths"] == {"0": 3, "1": 1, "2": 1}
    nodes = {n["name"]: n for n in g["nodes"]}
    assert set(nodes) == {"c0", "c1", "c2", "agg", "t5"}
    for i in range(3):
        c = nodes[f"c{i}"]
        assert c["framework"] == "fl" and c["classes"] == list(range(10)) and c["labels"] == list(range(10))
        assert c["data_size"] == lineage.sizes[i] and c["head"] == "fc" and c["version"] == 0
    assert nodes["agg"]["labels"] == [] and nodes["agg"]["data_size"] == 0
    assert nodes["t5"]["classes"] == [5, 6, 7, 8, 9] and nodes["t5"]["labels"] == [5, 6, 7, 8, 9]
    edges = {(e["parent"], e["child"]): e for e in g["edges"]}
    assert set(edges) == {("c0", "agg"), ("c1", "agg"), ("c2", "agg"), ("agg", "t5")}
    assert {e["relation"] for k, e in edges.items() if k[1] == "agg"} == {"aggregate"}
    assert [edges[(f"c{i}", "agg")]["weight"] for i in range(3)] == [0.33, 0.33, 0.34]
    assert edges[("agg", "t5")]["relation"] == "transfer" and edges[("agg", "t5")]["weight"] is None
    # --json is a synonym of --format json.
    assert json.loads(run("graph", "show", "--json", store=lineage.root).stdout) == g


def test_node_show_json_metadata_and_fim(lineage):
    c0 = json.loads(run("node", "show", "c0", "--json", store=lineage.root).stdout)
    assert c0["name"] == "c0" and c0["framework"] == "fl" and c0["head"] == "fc"
    assert c0["arch"] == {"spec": ARCH, "kwargs": {}}
    assert c0["input_shape"] == [1, 8, 8]
    assert c0["data"] == {"source": DIGITS, "subset": lineage.subsets[0], "only_labels": None}
    assert c0["data_size"] == lineage.sizes[0] == sum(c0["label_counts"].values())
    assert sorted(map(int, c0["label_counts"])) == list(range(10))
    assert len(c0["data_fingerprint"]) == 64
    assert c0["meta"] == {"client": "0"} and c0["version"] == 0
    assert c0["parents"] == [] and c0["children"] == ["agg"]
    assert [v["version"] for v in c0["versions"]] == [0]
    assert c0["fim"]["weight_shape"] == [10, 64] and c0["fim"]["bias_shape"] == [10]
    assert c0["fim"]["classes"] == list(range(10)) and c0["fim"]["samples"] == lineage.sizes[0]

    agg = json.loads(run("node", "show", "agg", "--json", store=lineage.root).stdout)
    assert [p["name"] for p in agg["parents"]] == ["c0", "c1", "c2"]
    assert {p["relation"] for p in agg["parents"]} == {"aggregate"}
    assert agg["data"] is None and agg["fim"]["weight_shape"] == [10, 64]  # mean of the clients' FIMs

    # Label alignment: a 5-way head predicting labels 5..9.
    t5 = json.loads(run("node", "show", "t5", "--json", store=lineage.root).stdout)
    assert t5 == {**lineage.t5_json, "versions": t5["versions"], "fim": t5["fim"]}
    assert t5["classes"] == [5, 6, 7, 8, 9] and t5["arch"]["kwargs"] == {"num_classes": 5}
    assert sorted(map(int, t5["label_counts"])) == [5, 6, 7, 8, 9]
    assert t5["data"]["only_labels"] == [5, 6, 7, 8, 9]
    assert t5["fim"]["weight_shape"] == [5, 64] and t5["fim"]["bias_shape"] == [5]
    assert t5["fim"]["classes"] == [5, 6, 7, 8, 9]
    assert t5["parents"] == [{"name": "agg", "relation": "transfer", "weight": None, "version": 0}]

    # The human view works too.
    text = run("node", "show", "t5", store=lineage.root)
    assert text.exit_code == 0 and "t5" in text.stdout and "transfer" in text.stdout


def test_export_round_trip_equals_original_weights(lineage, tmp_path):
    # c2 was imported from a .pt state dict (torch.load weights_only); its export equals that dict.
    out = tmp_path / "c2.safetensors"
    res = umig_cli("export", "c2", "-o", str(out), "--json", store=lineage.root, check=True)
    assert json.loads(res.stdout) == {"node": "c2", "path": str(out)}
    got = load_file(str(out))
    ref = lineage.clients[2]
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    for name, ref in (("c0", lineage.clients[0]), ("agg", lineage.agg), ("t5", lineage.t5)):
        path = tmp_path / f"{name}.safetensors"
        assert run("export", name, "-o", str(path), store=lineage.root).exit_code == 0
        got = load_file(str(path))
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref), name
    assert load_file(str(tmp_path / "c0.safetensors")).keys() == load_file(
        str(lineage.work / "c0.safetensors")).keys()


def test_graph_show_dot_png_and_text_formats(lineage, tmp_path):
    dot = run("graph", "show", "--format", "dot", store=lineage.root)
    assert dot.exit_code == 0 and dot.stdout.startswith("digraph umig {")
    assert '"c0" -> "agg"' in dot.stdout and '"agg" -> "t5"' in dot.stdout and "0.33" in dot.stdout
    for args, path in ((["--format", "dot", "--output"], tmp_path / "a.dot"),
                       (["--output"], tmp_path / "b.dot"),  # the suffix picks the format
                       (["--output"], tmp_path / "g.json")):
        res = run("graph", "show", *args, str(path), store=lineage.root)
        assert res.exit_code == 0, res.stderr
        assert path.is_file() and path.stat().st_size > 0
    assert (tmp_path / "b.dot").read_text() == dot.stdout
    assert json.loads((tmp_path / "g.json").read_text())["summary"]["nodes"] == 5
    png = tmp_path / "g.png"
    res = run("graph", "show", "--output", str(png), store=lineage.root)
    assert res.exit_code == 0, res.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for fmt in ("tree", "table", "summary"):
        res = run("graph", "show", "--format", fmt, store=lineage.root)
        assert res.exit_code == 0 and ("agg" if fmt != "summary" else "5 nodes") in res.stdout, res.stdout
    tree = run("graph", "show", store=lineage.root).stdout
    assert "c0" in tree and "t5" in tree and "aggregate" in tree
    res = run("graph", "show", "--output", str(tmp_path / "g.txt"), store=lineage.root)
    assert_one_line_error(res.exit_code, res.stderr, "g.txt")


def test_help_works_on_every_command():
    proc = umig_cli("--help")
    assert proc.returncode == 0 and "add-node" in proc.stdout and "unlearn" in proc.stdout

    def walk(cmd, path):
        yield path
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, [*path, name])

    paths = list(walk(typer.main.get_command(app), []))
    assert len(paths) >= 16  # every command, the groups and their subcommands
    names = {" ".join(p) for p in paths}
    for expected in ("init", "add-node", "link", "graph show", "node show", "export", "remove", "gc", "unlearn",
                     "revert", "purge", "history", "eval", "methods"):
        assert expected in names
    for path in paths:
        res = run(*path, "--help")
        assert res.exit_code == 0, (path, res.stdout, res.stderr)
        assert "Usage" in res.stdout and "--help" in res.stdout, path


# ------------------------------------------------------------- bad input
def test_bad_input_exit_1_one_line_store_unchanged(copy, lineage, tmp_path):
    w = lineage.work
    evil = tmp_path / "evil.pt"

    class Payload:
        def __reduce__(self):
            return (print, ("never",))

    torch.save({"fc.weight": torch.zeros(1), "x": Payload()}, evil)
    add = ["add-node", "x", "--arch", ARCH]
    cases = [
        ([*add, "--weights", str(w / "c0.safetensors"), "--parent", "nope"], "unknown parent node 'nope'"),
        ([*add, "--weights", str(w / "c0.safetensors"), "--parent", "x"], "own parent"),
        (["link", "agg", "c0"], "cycle"),
        (["link", "t5", "c1"], "cycle"),
        (["link", "c0", "c0"], "cycle"),
        (["link", "c0", "agg"], "already exists"),
        (["link", "c0", "nope"], "unknown node 'nope'"),
        (["add-node", "c0", "--arch", ARCH, "--weights", str(w / "c0.safetensors")], "'c0' already exists"),
        ([*add, "--weights", str(w / "t5.safetensors")], "does not fit the architecture"),
        ([*add, "--weights", str(w / "c0.safetensors"), "--arch-arg", "num_classes=5"], "does not fit"),
        ([*add, "--weights", str(w / "missing.safetensors")], "missing.safetensors"),
        ([*add, "--weights", str(w / "idx0.npy")], "unsupported checkpoint"),
        ([*add, "--weights", str(evil)], "weights_only"),
        ([*add, "--weights", str(w / "c0.safetensors"), "--data", "sklearn:nope"], "sklearn:nope"),
        ([*add, "--weights", str(w / "c0.safetensors"), "--data", "/no/such/data.safetensors"], "data"),
        ([*add, "--weights", str(w / "c0.safetensors"), "--data", DIGITS, "--subset", str(w / "no.npy")],
         "no.npy"),
        ([*add, "--weights", str(w / "c0.safetensors"), "--classes", "0-4"], "5 labels but head 'fc' has 10"),
        ([*add, "--weights", str(w / "c0.safetensors"), "--framework", "quantum"], "unknown framework"),
        ([*add, "--weights", str(w / "c0.safetensors"), "--meta", "novalue"], "key=value"),
        (["add-node", "bad name", "--arch", ARCH, "--weights", str(w / "c0.safetensors")], "invalid node name"),
        (["node", "show", "nope"], "unknown node 'nope'"),
        (["export", "nope", "-o", str(tmp_path / "x.safetensors")], "unknown node 'nope'"),
        (["export", "c0", "-o", str(tmp_path / "x.safetensors"), "--version", "3"], "no version 3"),
        (["export", "c0", "-o", str(tmp_path)], "is a directory"),
        (["export", "c0", "-o", "/proc/no/such/dir/x.safetensors"], "cannot write"),
        (["remove", "nope"], "unknown node 'nope'"),
        (["remove", "c0"], "has children (agg); use --recursive"),
        (["remove", "agg"], "has children (t5)"),
        (["eval", "nope", "--labels", "1"], "unknown node 'nope'"),
        (["history", "--node", "nope"], "unknown node 'nope'"),
        (["revert", "op-nope"], "unknown operation 'op-nope'"),
        (["purge", "op-nope", "--yes"], "unknown operation 'op-nope'"),
        (["graph", "show", "--format", "bogus"], "unknown format 'bogus'"),
        (["unlearn", "--labels", "42", "--dry-run"], "42"),
        (["unlearn", "--labels", "1", "--param", "nope=1", "--dry-run"], "no parameter nope"),
        (["unlearn", "--labels", "1", "--method", "nope"], "unknown method 'nope'"),
        (["unlearn", "--labels", "1", "--from", "nope", "--dry-run"], "nope"),
        (["unlearn", "--labels", "banana"], "banana"),
        (["init"], "already exists"),
    ]
    before = store_state(copy)
    for argv, needle in cases:
        res = run(*argv, store=copy)
        assert_one_line_error(res.exit_code, res.stderr, needle)
        assert store_state(copy) == before, argv
    assert not (tmp_path / "x.safetensors").exists()
    # No store at all.
    res = run("graph", "show", store=tmp_path / "nowhere")
    assert_one_line_error(res.exit_code, res.stderr, "no umig store")


def test_corrupted_blob_fails_naming_the_node(copy, tmp_path):
    from umig.api import Store

    with Store.open(copy) as s:
        body, fim = s.version("c1").body_blob, s.version("c1").fim_blob
        body_path, fim_path = s.blobs.path(body), s.blobs.path(fim)
    for p in (body_path, fim_path):
        b = bytearray(p.read_bytes())
        b[len(b) // 2] ^= 0x01
        p.write_bytes(bytes(b))
    before = store_state(copy)
    out = tmp_path / "c1.safetensors"
    proc = umig_cli("export", "c1", "-o", str(out), store=copy)
    assert_one_line_error(proc.returncode, proc.stderr, "node 'c1'", "corrupted", body[:12])
    assert not out.exists()
    res = run("node", "show", "c1", store=copy)  # reads the (corrupted) model FIM
    assert_one_line_error(res.exit_code, res.stderr, "node 'c1'", "corrupted")
    res = run("unlearn", "--labels", "1", "--no-eval", store=copy)
    assert_one_line_error(res.exit_code, res.stderr, "c1", "corrupted")
    assert store_state(copy) == before
    # Other nodes are unaffected.
    assert run("export", "c0", "-o", str(tmp_path / "c0.safetensors"), store=copy).exit_code == 0
    # Copying the store fails on the corrupted blob and leaves no new (empty) store behind.
    dst, before = tmp_path / "copied", store_state(copy)
    res = run("store", "copy", str(copy), str(dst))
    assert_one_line_error(res.exit_code, res.stderr, "corrupted")
    assert not dst.exists() and store_state(copy) == before


def test_remove_recursive_and_link(copy, lineage):
    res = run("link", "c0", "t5", "--relation", "finetune", store=copy)
    assert res.exit_code == 0, res.stderr
    res = run("remove", "agg", "--recursive", "--json", store=copy)
    assert res.exit_code == 0, res.stderr
    assert json.loads(res.stdout) == {"removed": ["agg", "t5"]}
    g = json.loads(run("graph", "show", "--json", store=copy).stdout)
    assert sorted(n["name"] for n in g["nodes"]) == ["c0", "c1", "c2"] and g["edges"] == []
    res = run("remove", "c2", store=copy)
    assert res.exit_code == 0 and "removed c2" in res.stdout
    gc = run("gc", "--json", store=copy)
    assert gc.exit_code == 0 and json.loads(gc.stdout) == {"freed_bytes": 0}  # remove left no orphans


def test_dry_run_on_cli_lineage_aligns_heads(lineage):
    before = store_state(lineage.root)
    res = run("unlearn", "--labels", "6,7", "--dry-run", "--json", store=lineage.root)
    assert res.exit_code == 0, res.stderr
    plan = json.loads(res.stdout)["plan"]
    assert plan["discovery"] == ["c0", "c1", "c2"] and plan["inherited"] == ["agg", "t5"]
    assert store_state(lineage.root) == before
    methods = run("methods", "--json")
    assert methods.exit_code == 0 and "fiun" in {m["name"] for m in json.loads(methods.stdout)}


def _commands(group, prefix=()):
    import click

    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def test_every_help_shows_argument_help_and_bracketed_text():
    """--help of every command shows each argument's help and keeps text in brackets ("[default: ...]",
    "umig[ui]") instead of swallowing it as rich markup (click 8.5 dropped typer's argument help)."""
    import re

    import typer

    root = typer.main.get_command(app)
    checked = 0
    for path, cmd in _commands(root):
        res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"})
        assert res.exit_code == 0, (path, res.output)
        text = " ".join(res.output.split())
        for param in cmd.params:
            help_text = getattr(param, "help", None)
            if not help_text:
                continue
            words = " ".join(help_text.replace("\\[", "[").split())
            for bracketed in re.findall(r"\[[^\]]*\]", words):
                assert bracketed in text, (path, param.name, bracketed)
            assert words.split(".")[0][:40] in text, (path, param.name, words)
            checked += 1
    assert checked > 50
    # Arguments' help is declared on the function (click 8.5 loses it before the command exists).
    for argv, needle in ((["add-node", "--help"], "Unique node name."),
                         (["store", "copy", "--help"], "Where to: a new directory or an empty database.")):
        out = " ".join(CliRunner().invoke(app, argv, env={"COLUMNS": "400"}).output.split())
        assert needle in out, (argv, out)
