"""Nothing forgotten slips back in (issue 19, items 2 and 3): parent versions on every edge, the
add-node guard against superseded versions and forgotten data, --catch-up, and `umig forgotten`.

The CLI runs in-process through typer's CliRunner (as in test_cli and test_requests).
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FAST_RECIPE, cli_error_line, cli_ok, cli_run, store_state
from safetensors.torch import save_file

from umig.api import Store
from umig.data import save_subset, source_positions
from umig.demo import DEFAULT_ARCH
from umig.errors import NotFoundError, SupersededError, UmigError
from umig.lineage import FederatedRecorder
from umig.unlearning import evaluate_node

ARCH = "umig.models:digits_cnn"
TRAIN = "sklearn:digits?split=train"
TEST = "sklearn:digits?split=test"
GLOBAL = "fl/r2/global"


def weights_file(store: Store, node: str, path: Path, version: int | None = None) -> Path:
    """A checkpoint as a training job would hold it (written without recording an export)."""
    save_file({k: v.contiguous() for k, v in store.state_dict(node, version).items()}, str(path))
    return path


def states(store: Store) -> dict[str, dict[str, torch.Tensor]]:
    return {n.name: store.state_dict(n.name) for n in store.nodes()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ parent versions
def test_every_edge_records_the_parent_version(fl_store: Store, tmp_path: Path):
    root = fl_store.root
    # Recorders: the parent's live version at record time.
    assert {p["name"]: p["version"] for p in fl_store.node(GLOBAL).to_json()["parents"]} == {
        "fl/r2/c0": 0, "fl/r2/c1": 0, "fl/r2/c2": 0}
    w = weights_file(fl_store, GLOBAL, tmp_path / "g.safetensors")
    fl_store.unlearn([5], evaluate=False)  # the global is at v1 now; v0 is superseded
    # Without @V: the live version, recorded explicitly; NAME@V:WEIGHT works, NAME:WEIGHT still does.
    node = json.loads(cli_ok("add-node", "a", "--weights", str(w), "--arch", ARCH, "--parent", GLOBAL, "--json",
                         store=root))
    assert node["parents"] == [{"name": GLOBAL, "relation": "finetune", "weight": None, "version": 1}]
    assert node["version"] == 0 and "caught_up" not in node
    node = json.loads(cli_ok("add-node", "b", "--weights", str(w), "--arch", ARCH, "--parent", f"{GLOBAL}@1:0.5",
                         "--parent", "a:0.5", "--json", store=root))
    assert {(p["name"], p["weight"], p["version"]) for p in node["parents"]} == {(GLOBAL, 0.5, 1), ("a", 0.5, 0)}
    # Names may contain '@' and ':': an existing node's full name wins.
    cli_ok("add-node", "m@2", "--weights", str(w), "--arch", ARCH, "--parent", "b@0", store=root)
    cli_ok("add-node", "n", "--weights", str(w), "--arch", ARCH, "--parent", "m@2", "--parent", "b", store=root)
    assert fl_store.node("n").parent_versions == {"m@2": 0, "b": 0}
    assert "@0" in cli_ok("node", "show", "n", store=root)
    # The API: a 3-tuple, and the version this Store object last loaded when none is given.
    fl_store.add_node("c", fl_store.state_dict("a"), ARCH, parents=[("a", None, 0)])
    assert fl_store.node("c").parent_versions == {"a": 0}
    fl_store.state_dict(GLOBAL, 0)  # a training job loads the superseded version...
    with pytest.raises(SupersededError, match=r"derived from fl/r2/global v0"):
        fl_store.add_node("d", fl_store.state_dict("a"), ARCH, parents=[GLOBAL])  # ...and records its child
    fl_store.state_dict(GLOBAL)
    assert fl_store.add_node("d", fl_store.state_dict("a"), ARCH, parents=[GLOBAL]).parent_versions == {GLOBAL: 1}


def test_superseded_parent_is_refused_then_caught_up_and_reverted_bit_exact(fl_store: Store, tmp_path: Path):
    root = fl_store.root
    pre = states(fl_store)
    child_w = weights_file(fl_store, GLOBAL, tmp_path / "job.safetensors")  # the job loads v0 ...
    op = json.loads(cli_ok("unlearn", "--labels", "1,2", "--ticket", "DSR-7", "--no-eval", "--json", store=root))
    op_id = op["operation"]  # ... meanwhile the labels are forgotten ...
    kept = fl_store.operation_blobs(op_id)
    before = store_state(root)
    add = ["add-node", "fl/late", "--weights", str(child_w), "--arch", ARCH, "--parent", f"{GLOBAL}@0",
           "--framework", "fl"]
    line = cli_error_line(cli_run(*add, store=root), op_id, "DSR-7", "fl/r2/global v0", "--catch-up",
                                 f"{GLOBAL}@1")
    assert "superseded" in line
    assert store_state(root) == before

    # --catch-up: recorded, then unlearned by the same operation in the same command.
    out = cli_ok(*add, "--catch-up", store=root)
    assert "caught up with " + op_id in " ".join(out.split())
    child = fl_store.node("fl/late")
    assert child.version == 1 and child.parent_versions == {GLOBAL: 0}
    ev = evaluate_node(fl_store, "fl/late", [1, 2], data=TEST)
    ev0 = evaluate_node(fl_store, "fl/late", [1, 2], data=TEST, version=0)
    assert ev0["heldout"]["AD_f"] > 0.9  # what was added knew the labels
    assert ev["heldout"]["AD_f"] == 0.0 and ev["heldout"]["AD_r"] > 0.9  # retrain level: 0% held-out
    assert fl_store.version("fl/late").operation == op_id
    assert fl_store.operation_blobs(op_id) == kept == []  # erase keeps nothing derived from the forgotten data

    [entry] = json.loads(cli_ok("history", "--json", store=root))
    [caught] = entry["caught_up"]
    assert (caught["name"], caught["version_before"], caught["version_after"]) == ("fl/late", 0, 1)
    assert "fl/r2/global v0" in caught["reason"]
    rep = json.loads(cli_ok("report", op_id, "--format", "json", store=root))
    [c] = rep["caught_up"]
    assert c["name"] == "fl/late" and c["after"]["head_blob"] == fl_store.version("fl/late").head_blob
    assert c["before"]["head_blob"] == fl_store.version("fl/late", 0).head_blob and c["current_version"] == 1
    assert "fl/late" not in {n["name"] for n in rep["nodes"]}  # affected by the operation itself: unchanged
    md = cli_ok("report", op_id, store=root)
    assert "`fl/late`: v0 -> v1" in md.split("## Models caught up later")[1]

    # Revert: every node back, bit for bit, the caught-up child to what was added.
    reverted = json.loads(cli_ok("revert", op_id, "--json", store=root))["reverted"]
    assert "fl/late" in reverted
    assert fl_store.node("fl/late").version == 0
    assert same_weights(fl_store.state_dict("fl/late"), pre[GLOBAL])  # the file it was added from
    for name, sd in pre.items():
        assert same_weights(fl_store.state_dict(name), sd), name
    # Reverted: nothing supersedes v0 any more, so a second child from it is accepted as it is.
    cli_ok("add-node", "fl/late2", "--weights", str(child_w), "--arch", ARCH, "--parent", f"{GLOBAL}@0", store=root)
    assert fl_store.node("fl/late2").version == 0


def test_forgotten_labels_in_the_data_are_refused_or_caught_up(fl_store: Store, tmp_path: Path):
    root = fl_store.root
    w = weights_file(fl_store, GLOBAL, tmp_path / "g.safetensors")
    op_id = fl_store.unlearn([1, 2], request={"ticket": "DSR-8"}, evaluate=False).operation
    w1 = weights_file(fl_store, GLOBAL, tmp_path / "g1.safetensors")
    before = store_state(root)
    add = ["add-node", "ft", "--weights", str(w1), "--arch", ARCH, "--parent", GLOBAL, "--data", TRAIN]
    cli_error_line(cli_run(*add, store=root), op_id, "DSR-8", "label(s) 1,2", "--catch-up")
    assert store_state(root) == before
    cli_ok(*add[:-2], "--data", TRAIN, "--only-labels", "0,3-9", store=root)  # without them: accepted as it is
    assert fl_store.node("ft").version == 0
    # --catch-up on a root model trained on everything (unrelated to the lineage): unlearned on the spot.
    cli_ok("add-node", "solo", "--weights", str(w), "--arch", ARCH, "--data", TRAIN, "--catch-up", store=root)
    assert fl_store.node("solo").version == 1
    assert evaluate_node(fl_store, "solo", [1, 2], data=TEST)["heldout"]["AD_f"] == 0.0
    assert [c["name"] for c in fl_store.operation(op_id)["caught_up"]] == ["solo"]
    # Recorders refuse the same way, and catch up when asked.
    rec = FederatedRecorder(fl_store, DEFAULT_ARCH, prefix="fl2", recipe=FAST_RECIPE)
    with pytest.raises(SupersededError, match=op_id):
        rec.client(1, 0, fl_store.load_model(GLOBAL), TRAIN, parent=GLOBAL)
    info = FederatedRecorder(fl_store, DEFAULT_ARCH, prefix="fl2", catch_up=True).client(
        1, 0, fl_store.load_model(GLOBAL), TRAIN, parent=GLOBAL)
    assert info.version == 1 and fl_store.version(info.name).operation == op_id


def test_forgotten_samples_stay_out(fl_store: Store, tmp_path: Path):
    root = fl_store.root
    c1 = fl_store.node("fl/r1/c1").data_ref
    _, c1_positions = source_positions(TRAIN + f"[subset={c1['subset']}]")
    forget = np.sort(c1_positions[:15])
    np.save(tmp_path / "forget.npy", forget)
    w = weights_file(fl_store, GLOBAL, tmp_path / "g.safetensors")
    op = json.loads(cli_ok("unlearn", "--samples", str(tmp_path / "forget.npy"), "--data", TRAIN, "--ticket", "DSR-9",
                       "--no-eval", "--json", store=root))
    op_id = op["operation"]
    before = store_state(root)
    add = ["add-node", "late", "--weights", str(w), "--arch", ARCH, "--data", TRAIN]
    cli_error_line(cli_run(*add, store=root), op_id, "DSR-9", "15 forgotten sample(s)", "umig forgotten")
    # A subset that holds only some of them: the count is what it holds.
    save_subset(tmp_path / "some.npy", forget[:4])
    cli_error_line(cli_run(*add, "--subset", str(tmp_path / "some.npy"), store=root), op_id,
                          "4 forgotten sample(s)")
    assert store_state(root) == before

    # umig forgotten: which operation forgot which share, and the rest as an index file.
    keep = tmp_path / "keep.npy"
    rep = json.loads(cli_ok("forgotten", "--data", TRAIN, "-o", str(keep), "--json", store=root))
    n = len(source_positions(TRAIN)[1])
    assert (rep["items"], rep["forgotten"], rep["kept"]) == (n, 15, n - 15)
    [entry] = rep["operations"]
    assert (entry["operation"], entry["ticket"], entry["samples"], entry["labels"]) == (op_id, "DSR-9", 15, [])
    assert entry["share"] == pytest.approx(15 / n) and rep["output"] == str(keep) and rep["unchecked"] == []
    kept = np.load(keep)
    assert kept.size == n - 15 and not np.isin(kept, forget).any()
    text = cli_ok("forgotten", "--data", TRAIN, store=root)
    assert op_id in text and "15 item(s)" in text
    # The client's own shard: all 15 of its items are forgotten.
    shard = json.loads(cli_ok("forgotten", "--data", TRAIN + f"[subset={c1['subset']}]", "--json", store=root))
    assert shard["forgotten"] == 15 and shard["operations"][0]["share"] == pytest.approx(15 / len(c1_positions))
    assert store_state(root) == before  # forgotten only reads

    cli_ok(*add, "--subset", str(keep), store=root)  # nothing forgotten: accepted
    assert fl_store.node("late").data_size == n - 15 and fl_store.node("late").version == 0

    # --catch-up (API): recorded on everything, then the operation (retrain) runs on it.
    info = fl_store.add_node("late-all", fl_store.state_dict(GLOBAL), ARCH, data=TRAIN, recipe=FAST_RECIPE,
                             catch_up=True)
    assert info.version == 1
    [c] = fl_store.operation(op_id)["caught_up"]
    assert c["name"] == "late-all" and "15 forgotten sample(s)" in c["reason"]
    added = fl_store.state_dict("late-all", 0)
    assert not same_weights(fl_store.state_dict("late-all"), added)
    fl_store.revert(op_id)
    assert same_weights(fl_store.state_dict("late-all"), added)
    # Reverted: the guard lets the samples in again, and forgotten says nothing forgot them.
    assert json.loads(cli_ok("forgotten", "--data", TRAIN, "--json", store=root))["forgotten"] == 0
    cli_ok("add-node", "late2", "--weights", str(w), "--arch", ARCH, "--data", TRAIN, store=root)


def test_client_forget_set_is_guarded_by_the_clients_data(fl_store: Store, tmp_path: Path):
    op_id = fl_store.unlearn(clients=["fl/r1/c1"], method="federaser", evaluate=False).operation
    data = fl_store.node_data("fl/r1/c1")
    before = store_state(fl_store.root)
    with pytest.raises(SupersededError, match=rf"holds {len(data)} forgotten sample\(s\) of client fl/r1/c1's data "
                                              rf"that operation {op_id} forgot"):
        fl_store.add_node("again", fl_store.state_dict("fl/r1/c1"), ARCH, data=data)
    assert store_state(fl_store.root) == before
    # The kept indices outlive a purge: the guard still works.
    fl_store.purge(op_id)
    with pytest.raises(SupersededError, match=op_id):
        fl_store.add_node("again", fl_store.state_dict(GLOBAL), ARCH, data=TRAIN)


@pytest.mark.parametrize("mode", ["erase", "rows"])
def test_catch_up_after_purge_purges_what_was_added(fl_store: Store, tmp_path: Path, mode: str):
    w0 = fl_store.state_dict(GLOBAL)
    op_id = fl_store.unlearn([3], evaluate=False, params={"mode": mode}).operation
    assert len(fl_store.operation_blobs(op_id)) == (0 if mode == "erase" else 3)  # rows: the unlearning FIMs
    fl_store.purge(op_id)
    info = fl_store.add_node("fl/late", w0, ARCH, parents=[(GLOBAL, None, 0)], catch_up=True)
    assert info.version == 1
    v0 = fl_store.version("fl/late", 0)
    assert v0.purged and not fl_store.blobs.exists(v0.head_blob)  # the copy that knew label 3 is gone
    assert fl_store.blobs.exists(fl_store.version("fl/late").head_blob)
    assert fl_store.operation_blobs(op_id) == []  # nothing computed from the forgotten data is kept
    with pytest.raises(UmigError, match="purged"):
        fl_store.state_dict("fl/late", 0)


def test_bad_input_one_line_store_unchanged(fl_store: Store, tmp_path: Path):
    root = fl_store.root
    fl_store.unlearn([1], evaluate=False)
    w = weights_file(fl_store, GLOBAL, tmp_path / "g.safetensors")
    (tmp_path / "notes.txt").write_text("not a dataset\n")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    before = store_state(root)
    add = ["add-node", "x", "--weights", str(w), "--arch", ARCH]
    cases = [
        ([*add, "--parent", f"{GLOBAL}@x"], "malformed parent 'fl/r2/global@x'"),
        ([*add, "--parent", f"{GLOBAL}@-1"], "malformed parent"),
        ([*add, "--parent", f"{GLOBAL}@"], "malformed parent"),
        ([*add, "--parent", f"{GLOBAL}@7"], "node 'fl/r2/global' has no version 7"),
        ([*add, "--parent", f"{GLOBAL}@7:0.5"], "no version 7"),
        ([*add, "--parent", "nope@1"], "unknown parent node 'nope'"),
        (["forgotten", "--data", str(tmp_path / "notes.txt")], "notes.txt"),
        (["forgotten", "--data", str(junk)], "junk.safetensors"),
        (["forgotten", "--data", str(tmp_path / "missing.safetensors")], "missing.safetensors"),
        (["forgotten", "--data", "sklearn:nope"], "nope"),
        (["forgotten", "--data", TRAIN, "-o", str(tmp_path / "keep.txt")], "keep.txt"),
        (["forgotten", "--data", TRAIN, "-o", "/proc/no/such/dir/keep.npy"], "keep.npy"),
    ]
    for argv, needle in cases:
        cli_error_line(cli_run(*argv, store=root), needle)
        assert store_state(root) == before, argv
    with pytest.raises(NotFoundError, match="no version 9"):
        fl_store.add_node("x", w, ARCH, parents=[(GLOBAL, None, 9)])
    with pytest.raises(UmigError, match="a parent is"):
        fl_store.add_node("x", w, ARCH, parents=[(GLOBAL,)])
    assert store_state(root) == before
    for argv, needle in ((["forgotten", "--help"], "--subset"), (["add-node", "--help"], "--catch-up")):
        res = cli_run(*argv)
        assert res.exit_code == 0 and needle in res.stdout, (argv, res.stdout)


def test_older_store_migrates_edges_unknown_and_labels_guarded(fl_store: Store, tmp_path: Path):
    op_id = fl_store.unlearn([1], evaluate=False).operation
    root = fl_store.root
    fl_store.close()
    db = sqlite3.connect(root / "umig.db")  # back to schema 4: no parent versions, nothing kept per label
    db.executescript("DROP TABLE operation_labels; DROP TABLE operation_samples; DROP TABLE caught_up; "
                     "ALTER TABLE edges DROP COLUMN parent_version; ALTER TABLE operations DROP COLUMN purge_summary; "
                     "UPDATE meta SET value='4' WHERE key='schema_version';")
    db.close()
    with Store.open(root) as s:
        assert s.node(GLOBAL).parent_versions == {"fl/r2/c0": None, "fl/r2/c1": None, "fl/r2/c2": None}
        assert s.node(GLOBAL).to_json()["parents"][0]["version"] is None
        with pytest.raises(SupersededError, match=op_id):  # the migration filled in the forgotten labels
            s.add_node("x", s.state_dict(GLOBAL), ARCH, data=TRAIN)
