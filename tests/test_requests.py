"""Deletion requests end to end (issue 19, items 1, 4, 5, 6): who asked, recorded exports, the
auditor's report, and CLI tables that read in 80 columns.

The CLI runs in-process through typer's CliRunner (as in test_cli); two checks run the real
entry point in a subprocess with COLUMNS=80.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
from conftest import FAST_RECIPE, cli_error_line, cli_ok, cli_run, store_state, umig_cli
from rich.console import Console

from umig import store as store_mod
from umig.api import Store
from umig.cli import render as R
from umig.demo import build_fl_digits
from umig.errors import UmigError
from umig.requests import deletion_report, to_markdown
from umig.store import Request
from umig.train import Recipe
from umig.unlearner import describe
from umig.unlearning import evaluate_node

REQUEST = ["--requester", "dpo@example.org", "--reason", "erasure request", "--ticket", "DSR-7"]
DIGITS_TEST = "sklearn:digits?split=test"


# ------------------------------------------------------------------ acceptance
def test_request_export_report_and_purge_on_an_fl_lineage(fl_store: Store, tmp_path: Path):
    root = fl_store.root
    nodes_before = {n.name: n.version for n in fl_store.nodes()}
    pre = tmp_path / "pre" / "global.safetensors"
    cli_ok("export", "fl/r2/global", "-o", str(pre), store=root)  # a copy made before the operation

    out = json.loads(cli_ok("unlearn", "--labels", "1,2", *REQUEST, "--no-eval", "--json", store=root))
    op = out["operation"]
    assert (out["requester"], out["reason"], out["ticket"]) == ("dpo@example.org", "erasure request", "DSR-7")
    post = tmp_path / "post.safetensors"
    cli_ok("export", "fl/r2/global", "-o", str(post), store=root)  # of the unlearned version: holds nothing

    # History: the three fields, and filters on ticket and requester (in SQL, in the store).
    [entry] = json.loads(cli_ok("history", "--json", store=root))
    assert entry["operation"] == op
    assert {k: entry[k] for k in ("requester", "reason", "ticket")} == {
        "requester": "dpo@example.org", "reason": "erasure request", "ticket": "DSR-7"}
    assert entry["forget"] == {"kinds": ["labels"], "labels": [1, 2], "samples": []}
    other = fl_store.unlearn([3], evaluate=False)  # no request at all
    assert [e["operation"] for e in json.loads(cli_ok("history", "--ticket", "DSR-7", "--json", store=root))] == [op]
    assert [e["operation"] for e in json.loads(cli_ok("history", "--requester", "DPO@Example.org", "--json",
                                                  store=root))] == [op]
    assert json.loads(cli_ok("history", "--ticket", "DSR-8", "--json", store=root)) == []
    assert json.loads(cli_ok("history", "--ticket", "DSR-7", "--node", "fl/init", "--json", store=root)) == []
    no_request = json.loads(cli_ok("history", "--json", store=root))[1]
    assert no_request["operation"] == other.operation and no_request["ticket"] is None
    assert "DSR-7" in cli_ok("history", store=root) and "dpo@example.org" in cli_ok("history", store=root)

    # Exports are in the audit log: node, version, absolute destination, time.
    exports = json.loads(cli_ok("history", "--exports", "--json", store=root))
    assert [(e["node"], e["version"], e["path"]) for e in exports] == [
        ("fl/r2/global", 0, str(pre.resolve())), ("fl/r2/global", 1, str(post.resolve()))]
    assert exports[0]["created"] < entry["created"] < exports[1]["created"]
    assert "fl/r2/global" in cli_ok("history", "--exports", store=root)

    # The report: every affected node with versions and digests before and after, not purged, the
    # export of a pre-operation version (the post-operation one holds nothing), no verification.
    rep = json.loads(cli_ok("report", op, "--format", "json", store=root))
    assert rep["operation"] == op and rep["state"] == "applied" and rep["purged"] is False
    assert {k: rep["request"][k] for k in ("requester", "reason", "ticket")} == {
        "requester": "dpo@example.org", "reason": "erasure request", "ticket": "DSR-7"}
    assert rep["request"]["time"] == entry["created"]
    assert rep["forget"] == entry["forget"] and rep["method"] == "fiun" and rep["params"] == entry["params"]
    assert [n["name"] for n in rep["nodes"]] == [n["name"] for n in entry["nodes"]]
    assert len(rep["nodes"]) == 8  # every node but fl/init
    for n in rep["nodes"]:
        assert n["version_before"] == nodes_before[n["name"]] == 0 and n["version_after"] == 1
        for side in ("before", "after"):
            v = fl_store.version(n["name"], n[f"version_{side}"])
            assert (n[side]["body_blob"], n[side]["head_blob"], n[side]["delta_blob"]) == (
                v.body_blob, v.head_blob, v.delta_blob)
            assert n[side]["missing"] == [] and n[side]["purged"] is False
        assert n["before"]["head_blob"] != n["after"]["head_blob"]  # FIUn rewrote the head
    assert [(e["node"], e["version"], e["path"], e["before_operation"], e["file_present"])
            for e in rep["exports"]] == [("fl/r2/global", 0, str(pre.resolve()), True, True)]
    assert rep["verification"] is None and rep["caught_up"] == []
    assert rep["superseded_blobs"] > 0 and rep["superseded_blobs_gone"] is False
    assert rep["operation_blobs"] == []  # erase keeps nothing computed from the forgotten data
    md = cli_ok("report", op, store=root)
    for text in ("# Deletion report: operation " + op, "dpo@example.org", "erasure request", "DSR-7",
                 "Labels: 1, 2", "`fl/r2/c1`", "Not purged", "Not verified", str(pre.resolve()),
                 "before the operation", "## Models caught up later"):
        assert text in md, text

    # After purge the report says so, and the superseded blobs are gone from the store.
    cli_ok("purge", op, "--yes", store=root)
    rep = json.loads(cli_ok("report", op, "--json", store=root))
    assert rep["state"] == "purged" and rep["purged"] is True and rep["purged_at"] is not None
    assert rep["superseded_blobs_gone"] is True and rep["superseded_blobs_present"] == []
    assert rep["operation_blobs"] == []
    # Every affected node's model FIM was cleaned of the forgotten labels, none kept as recorded.
    assert rep["model_fims"]["kept"] == 0 and rep["model_fims"]["replaced"] >= len(rep["nodes"])
    for n in rep["nodes"]:
        assert n["before"]["purged"] is True and "head" in n["before"]["missing"]
        assert not fl_store.blobs.exists(n["before"]["head_blob"]) and n["after"]["missing"] == []
    assert len(rep["exports"]) == 1  # the copy outside the store still holds the data: still listed
    md_file = tmp_path / "report.md"
    res = cli_run("report", op, "-o", str(md_file), store=root)
    assert res.exit_code == 0 and res.stdout.strip() == f"wrote {md_file}"
    md = md_file.read_text()
    assert "Purged on" in md and "gone from the store" in md and "Not purged" not in md
    assert "now hold nothing of the forgotten data" in md and "could not be cleaned" not in md
    json_file = tmp_path / "report.json"
    cli_ok("report", op, "--format", "json", "-o", str(json_file), store=root)
    assert json.loads(json_file.read_text())["purged"] is True


def test_request_through_the_python_api(fl_store: Store):
    res = fl_store.unlearn([4], request={"requester": "  legal@example.org ", "ticket": "T-1"}, evaluate=False)
    assert res.request == Request(requester="legal@example.org", ticket="T-1")
    assert res.to_json()["ticket"] == "T-1" and res.to_json()["reason"] is None
    dry = fl_store.plan_unlearning([5], request=Request(reason="audit drill"))
    assert dry.to_json()["reason"] == "audit drill"
    [entry] = fl_store.history(requester="LEGAL@example.org")
    assert entry["operation"] == res.operation and entry["reason"] is None
    assert fl_store.history(ticket="T-1") == [entry]
    assert Request(ticket="   ") == Request() and not Request(reason="")
    before = store_state(fl_store.root)
    for bad, needle in (({"ticket": "a\nb"}, "one line"), ({"who": "x"}, r"unknown request field\(s\) who"),
                        ({"requester": 7}, "must be text"), ("DSR-1", "a request is a Request")):
        with pytest.raises(UmigError, match=needle):
            fl_store.unlearn([1], request=bad, evaluate=False)
    assert store_state(fl_store.root) == before


def test_export_records_and_failures_record_nothing(fl_store: Store, tmp_path: Path):
    out = fl_store.export("fl/r1/c0", tmp_path / "a" / "c0.safetensors")
    [e] = fl_store.exports()
    assert (e.node, e.version, e.path) == ("fl/r1/c0", 0, str(out.resolve()))
    assert fl_store.exports(node="fl/r1/c0") == [e] and fl_store.exports(node="fl/r1/c1") == []
    before = store_state(fl_store.root)
    for path in (tmp_path, Path("/proc/no/such/dir/x.safetensors")):
        with pytest.raises(UmigError):
            fl_store.export("fl/r1/c0", path)
    with pytest.raises(UmigError, match="no version 7"):
        fl_store.export("fl/r1/c0", tmp_path / "v7.safetensors", version=7)
    assert store_state(fl_store.root) == before and not (tmp_path / "v7.safetensors").exists()


def test_bad_input_one_line_store_unchanged(fl_store: Store, tmp_path: Path):
    root = fl_store.root
    op = fl_store.unlearn([1], request={"ticket": "DSR-9"}, evaluate=False).operation
    before = store_state(root)
    cases = [
        (["report", "op-nope"], "unknown operation 'op-nope'"),
        (["report", "op-nope", "--format", "json"], "unknown operation 'op-nope'"),
        (["report", op, "--format", "xml"], "unknown format 'xml'"),
        (["report", op, "-o", "/proc/no/such/dir/r.md"], "cannot write"),
        (["history", "--exports", "--ticket", "DSR-9"], "--ticket and --requester filter operations"),
        (["history", "--node", "nope"], "unknown node 'nope'"),
        (["history", "--exports", "--node", "nope"], "unknown node 'nope'"),
        (["unlearn", "--labels", "2", "--ticket", "A\nB", "--no-eval"], "one line"),
    ]
    for argv, needle in cases:
        cli_error_line(cli_run(*argv, store=root), needle)
        assert store_state(root) == before, argv


def test_old_store_migrates_with_empty_request_and_exports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    old = 3  # the schema before requests and exports (migration 4)
    with monkeypatch.context() as m:
        m.setattr(store_mod, "MIGRATIONS", store_mod.MIGRATIONS[:old])
        m.setattr(store_mod, "SCHEMA_VERSION", old)
        Store.init(tmp_path / "s").close()
    with Store.open(tmp_path / "s") as s:
        assert s.history(ticket="x") == [] and s.exports() == []
        cols = {r[1] for r in s.db.execute("PRAGMA table_info(operations)")}
        assert {"requester", "reason", "ticket"} <= cols


def test_help_on_new_commands_and_options():
    for argv, needle in ((["report", "--help"], "--format"), (["history", "--help"], "--exports"),
                         (["unlearn", "--help"], "--requester")):
        res = cli_run(*argv)
        assert res.exit_code == 0 and needle in res.stdout, (argv, res.stdout)
    assert "--ticket" in cli_run("history", "--help").stdout and "--reason" in cli_run("unlearn", "--help").stdout


# ------------------------------------------------------------------ 80 columns
PREFIX = "p" * 34  # client nodes are PREFIX + "/r1/c0": 40 characters


@pytest.fixture(scope="module")
def long_names(tmp_path_factory: pytest.TempPathFactory):
    """A 2-client FL round whose node names are 39 to 44 characters long, unlearned once with a
    request, with one export."""
    root = tmp_path_factory.mktemp("long") / "store"
    store = Store.init(root)
    build_fl_digits(store, clients=2, rounds=1, recipe=Recipe(**{**FAST_RECIPE.to_json(), "epochs": 1}),
                    prefix=PREFIX)
    names = [n.name for n in store.nodes()]
    assert len(f"{PREFIX}/r1/c0") == 40 and min(map(len, names)) >= 39
    store.export(names[1], root.parent / "c0.safetensors")
    plan = store.plan_unlearning([1, 2])
    result = store.unlearn([1, 2], eval_data=DIGITS_TEST, request={"requester": "dpo@example.org", "ticket": "DSR-7"})
    yield store, names, plan, result
    store.close()


def render80(*renderables) -> str:
    con = Console(width=80, record=True, file=io.StringIO())
    for r in renderables:
        con.print(r)
    return con.export_text()


def assert_fits(text: str, names) -> None:
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text, text
    for n in names:
        assert n in text, (n, text)


def test_every_table_fits_80_columns_with_whole_names(long_names):
    store, names, plan, result = long_names
    g = store.graph()
    n = names[-1]
    views = {
        "plan_view": (R.plan_view(plan), plan.plan.affected),
        "result_table": (R.result_table(result), [x.name for x in result.nodes]),
        "history_table": (R.history_table(store.history()), []),
        "exports_table": (R.exports_table(store.exports()), [names[1]]),
        "node_table": (R.node_table(g, names), names),
        "graph summary": (R.graph_view(g, "summary", 1), names[:1]),
        "node_view": (R.node_view(R.node_json(store.node(n), store.versions(n), store.fim(n))),
                      [n, *(p for p, _, _ in store.node(n).parents)]),
        "eval_table": (R.eval_table(evaluate_node(store, names[1], [1, 2], data=DIGITS_TEST)), [names[1]]),
        "methods_table": (R.methods_table(describe()), ["fiun", "retrain"]),
    }
    for renderable, shown in views.values():
        text = render80(*(renderable if isinstance(renderable, tuple) else (renderable,)))
        assert_fits(text, shown)
    # The figures are all there too, whole (every column of the wide table, as column: value).
    text = render80(R.result_table(result))
    for col in ("AD_f train", "AD_r held-out", "version", "role"):
        assert col in text
    for x in result.nodes:
        m = x.metrics
        assert f"{100 * m['AD_f_train_before']:.1f} -> {100 * m['AD_f_train_after']:.1f}" in text


def test_wide_terminals_keep_the_table(long_names):
    result = long_names[3]
    con = Console(width=200, record=True, file=io.StringIO())
    con.print(R.result_table(result))
    text = con.export_text()
    assert "┃ node" in text and all(x.name in text for x in result.nodes)


def test_cli_prints_whole_names_at_columns_80(long_names, tmp_path: Path):
    store, names, _, result = long_names
    root = tmp_path / "store"
    shutil.copytree(store.root, root)
    out = umig_cli("unlearn", "--labels", "3", "--ticket", "DSR-8", store=root, check=True, env={"COLUMNS": "80"})
    assert_fits(out.stdout, names[1:])  # every affected node (all but the initial model)
    out = umig_cli("history", store=root, check=True, env={"COLUMNS": "80"})
    assert_fits(out.stdout, ["DSR-7", "DSR-8", result.operation])
    with Store.open(root) as s:
        rep = deletion_report(s, result.operation)
    assert all(x["name"] in to_markdown(rep) for x in rep["nodes"])
