"""Unlearning across a lineage (issue 3): plan, FIUn quality, label alignment, revert, purge, history.

Runs on ``fl_store``: a real 3-client x 2-round FedAvg lineage on digits (9 nodes).
"""

from __future__ import annotations

import json

import pytest
import torch

from conftest import store_state, umig_cli
from conftest import cli_error_line as one_line_error
from conftest import cli_run as run
from umig.arch import ArchSpec
from umig.data import resolve
from umig.errors import UmigError, UnlearningError
from umig.fisher import FIM, head_fisher, merge_max
from umig.ingest import mean_parent_fim
from umig.models import digits_cnn
from umig.train import Recipe, train
from umig.unlearning import evaluate_node
from umig.unlearners.fiun import fiun_update

DIGITS = "sklearn:digits?split=train"
HELDOUT = "sklearn:digits?split=test"
DISCOVERY = ["fl/r1/c0", "fl/r1/c1", "fl/r1/c2"]
INHERITED = ["fl/r1/global", "fl/r2/c0", "fl/r2/c1", "fl/r2/c2", "fl/r2/global"]
AFFECTED = DISCOVERY + INHERITED
ALL = ["fl/init", *AFFECTED]


def states(store, names=ALL):
    return {n: store.state_dict(n) for n in names}


def assert_same_states(a, b):
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].keys() == b[n].keys(), n
        for k in a[n]:
            assert torch.equal(a[n][k], b[n][k]), (n, k)


# --------------------------------------------------------------------- plan
def test_dry_run_json_lists_plan_and_changes_nothing(fl_store):
    root = fl_store.root
    before = store_state(root)
    proc = umig_cli("unlearn", "--labels", "1,2", "--dry-run", "--json", store=root)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["dry_run"] is True and out["operation"] is None
    assert out["labels"] == [1, 2] and out["method"] == "fiun"
    assert out["params"] == {"gamma": 1.0, "tau": 1.0, "eta": 0.1, "eps": 1e-12, "mode": "erase", "batch_size": 256}
    plan = out["plan"]
    assert plan["discovery"] == DISCOVERY
    assert plan["inherited"] == INHERITED
    assert plan["affected"] == AFFECTED
    groups = {tuple(g["discovery"]): g["nodes"] for g in plan["merge_groups"]}
    assert groups == {(d,): [d] for d in DISCOVERY} | {tuple(DISCOVERY): INHERITED}
    # The default erase reads no unlearning FIM: one phase, every affected node's head update.
    assert out["phases"] == [{"name": "update", "nodes": AFFECTED}]
    rows = json.loads(umig_cli("unlearn", "--labels", "1,2", "--dry-run", "--json", "-p", "mode=rows",
                               store=root).stdout)
    assert [p["name"] for p in rows["phases"]] == ["unlearning FIM", "merge + update"]
    assert rows["phases"][0]["nodes"] == DISCOVERY and rows["phases"][1]["nodes"] == AFFECTED
    assert rows["phases"][1]["merge_groups"] == 4
    assert [(n["name"], n["role"], n["version_before"]) for n in out["nodes"]] == [
        (n, "discovery" if n in DISCOVERY else "inherited", 0) for n in AFFECTED]
    assert store_state(root) == before

    # The human view, and the policy/--from options.
    text = run("unlearn", "--labels", "1,2", "--dry-run", store=root)
    assert text.exit_code == 0 and "update" in text.stdout and "3 discovery" in text.stdout
    every = json.loads(run("unlearn", "-l", "1", "--dry-run", "--json", "--discovery", "all", store=root).stdout)
    assert every["plan"]["discovery"] == DISCOVERY + ["fl/r2/c0", "fl/r2/c1", "fl/r2/c2"]
    scoped = json.loads(run("unlearn", "-l", "1", "--dry-run", "--json", "--from", "fl/r2/c1", store=root).stdout)
    assert scoped["plan"]["affected"] == ["fl/r2/c1", "fl/r2/global"]
    assert scoped["plan"]["discovery"] == DISCOVERY  # the merged FIM still comes from round 1's clients
    assert store_state(root) == before


def test_unseen_labels_and_bad_requests_are_clear_errors(fl_store):
    root = fl_store.root
    before = store_state(root)
    one_line_error(run("unlearn", "--labels", "10,11", "--dry-run", store=root), "10,11", "never")
    one_line_error(run("unlearn", "--labels", "1,42", store=root), "42")
    one_line_error(run("unlearn", "--labels", "1", "--param", "eta=abc", store=root), "eta")
    one_line_error(run("unlearn", "--labels", "1", "--param", "mode=magic", store=root), "mode")
    one_line_error(run("unlearn", "--labels", "1", "--discovery", "some", store=root), "some")
    one_line_error(run("unlearn", "--labels", "1", "--eval-data", "sklearn:nope", store=root), "nope")
    one_line_error(run("unlearn", "--labels", "1", "--device", "tpu", store=root), "tpu")
    assert store_state(root) == before
    with pytest.raises(UnlearningError, match="never"):
        fl_store.plan_unlearning([12])
    with pytest.raises(UmigError):
        fl_store.unlearn([12])
    assert store_state(root) == before


# ----------------------------------------------------- quality, revert, history
def test_cli_unlearn_meets_targets_then_history_and_revert(fl_store):
    root = fl_store.root
    original = states(fl_store)
    proc = umig_cli("unlearn", "--labels", "1,2", "--eval-data", HELDOUT, "--json", store=root)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    op = res["operation"]
    assert op.startswith("op-") and res["dry_run"] is False
    assert [n["name"] for n in res["nodes"]] == AFFECTED
    assert [p["name"] for p in res["phases"]] == ["update"]
    assert res["backend"]["backend"] == "inprocess"
    for n in res["nodes"]:
        assert n["version_before"] == 0 and n["version_after"] == 1
        for split in ("train", "heldout"):
            f_after, r_before, r_after = (n[f"AD_f_{split}_after"], n[f"AD_r_{split}_before"],
                                          n[f"AD_r_{split}_after"])
            assert n[f"AD_f_{split}_before"] > 0.5, (n["name"], split)  # it knew the labels
            assert f_after <= 0.02, (n["name"], split, f_after)
            assert abs(r_after - r_before) <= 0.03, (n["name"], split, r_before, r_after)
        assert 0 < n["params_changed"] < n["params_total"]

    # The store reports the same; fl/init is untouched.
    fl_store.db.execute("SELECT 1")  # the fixture's connection sees the committed operation
    assert fl_store.node("fl/init").version == 0
    assert all(fl_store.node(n).version == 1 for n in AFFECTED)
    heldout_after = evaluate_node(fl_store, "fl/r2/global", [1, 2], data=HELDOUT)
    assert heldout_after["heldout"]["AD_f"] <= 0.02

    hist = json.loads(run("history", "--json", store=root).stdout)
    assert len(hist) == 1
    h = hist[0]
    assert h["operation"] == op and h["labels"] == [1, 2] and h["method"] == "fiun" and h["state"] == "applied"
    assert h["params"] == res["params"]
    assert h["discovery"] == DISCOVERY and h["affected"] == AFFECTED
    assert h["reverted"] is None and h["purged"] is None and h["wall_s"] > 0
    by_name = {n["name"]: n for n in h["nodes"]}
    assert set(by_name) == set(AFFECTED)
    for n in res["nodes"]:
        hn = by_name[n["name"]]
        assert hn["role"] == n["role"] and hn["version_after"] == 1
        assert hn["AD_f_heldout_after"] == pytest.approx(n["AD_f_heldout_after"])
        assert hn["params_changed"] == n["params_changed"]
    assert json.loads(run("history", "--node", "fl/init", "--json", store=root).stdout) == []
    assert [e["operation"] for e in json.loads(run("history", "--node", "fl/r2/c1", "--json",
                                                   store=root).stdout)] == [op]
    table = run("history", store=root)
    assert table.exit_code == 0 and "unlearning operations" in table.stdout

    rev = run("revert", op, "--json", store=root)
    assert rev.exit_code == 0, rev.stderr
    assert sorted(json.loads(rev.stdout)["reverted"]) == sorted(AFFECTED)
    assert_same_states(states(fl_store), original)  # every tensor, bit for bit
    assert all(fl_store.node(n).version == 0 for n in ALL)
    one_line_error(run("revert", op, store=root), "already reverted")
    one_line_error(run("purge", op, "--yes", store=root), "reverted")
    assert fl_store.history()[0]["state"] == "reverted"


def test_python_api_unlearn_purge_and_revert_rules(fl_store):
    s = fl_store
    plan = s.plan_unlearning([3])
    assert plan.dry_run and plan.operation is None and plan.plan.discovery == DISCOVERY
    original = states(s)
    old = {n: s.version(n) for n in AFFECTED}

    r1 = s.unlearn([3], evaluate=False, params={"mode": "rows"})  # rows keeps its unlearning FIMs (purged below)
    j = r1.to_json()
    assert set(j) >= {"operation", "dry_run", "labels", "method", "params", "plan", "phases", "backend", "nodes",
                      "wall_s", "eval_s"}
    assert j["labels"] == [3] and j["plan"]["affected"] == AFFECTED and len(j["phases"]) == 2
    for n in j["nodes"]:
        assert {"name", "role", "version_before", "version_after", "seconds", "params_changed"} <= set(n)
        assert not any(k.startswith("AD_") for k in n)  # evaluate=False
    # FIUn stores only a new head: body and model FIM are shared with the previous version.
    for n in AFFECTED:
        v = s.version(n)
        assert v.version == 1 and v.operation == r1.operation
        assert v.body_blob == old[n].body_blob and v.fim_blob == old[n].fim_blob and v.head_blob != old[n].head_blob

    # A second operation on top: the first cannot be reverted before it.
    r2 = s.unlearn([5], evaluate=False, from_nodes=["fl/r2/c0"])
    assert [n.name for n in r2.nodes] == ["fl/r2/c0", "fl/r2/global"]
    with pytest.raises(UmigError, match=rf"changed after operation {r1.operation} \(by {r2.operation}\)"):
        s.revert(r1.operation)
    assert sorted(s.revert(r2.operation)) == ["fl/r2/c0", "fl/r2/global"]
    assert [e["state"] for e in s.history()] == ["applied", "reverted"]

    # purge r1 through the CLI: the superseded heads and the unlearning FIMs leave the disk.
    op_fims = [r[0] for r in s.db.execute("SELECT digest FROM operation_blobs WHERE operation=?", (r1.operation,))]
    assert len(op_fims) == len(DISCOVERY) and all(s.blobs.exists(d) for d in op_fims)
    old_fims = {n: s.fim(n, 0) for n in AFFECTED}
    res = run("purge", r1.operation, "--yes", "--json", store=s.root)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["versions_purged"] == len(AFFECTED) and out["bytes_freed"] > 0
    # The live versions' model FIMs lose label 3's samples: the old FIM blobs go with the old heads.
    # Every version that carries a cleaned FIM: the 8 live ones and the 2 the reverted r2 made.
    assert out["fims_replaced"] == len(AFFECTED) + 2 and out["fims_kept"] == 0
    assert out["blobs_deleted"] == 2 * len(AFFECTED) + len(DISCOVERY)
    for n in AFFECTED:
        assert not s.blobs.exists(old[n].head_blob), n
        assert not s.blobs.exists(old[n].fim_blob), n
        assert s.blobs.exists(old[n].body_blob)  # still used by version 1
        new = s.fim(n)
        if old_fims[n].has_label_stats:  # a client: the sums over its other labels' samples
            retained = [c for c in new.classes if c != 3]
            row = new.classes.index(3)
            assert int(new.label_counts[row]) == 0 and not new.label_weight[row].any()
            assert new.samples == int(old_fims[n].label_counts.sum()) - int(old_fims[n].label_counts[row])
            assert torch.equal(new.weight, old_fims[n].for_labels(retained).weight)
        else:  # an aggregate: the mean of its clients' cleaned FIMs, as it was their mean before
            parents = [(p, w) for p, _, w in s.node(n).parents]
            assert torch.equal(new.weight, mean_parent_fim(s, parents, new.classes).weight)
            assert not torch.equal(new.weight, old_fims[n].weight)
        assert s.version(n, 0).purged
        with pytest.raises(UmigError, match="purged"):
            s.state_dict(n, 0)
    assert not any(s.blobs.exists(d) for d in op_fims)
    after = states(s)  # current versions still load (hash-verified)
    assert_same_states({"fl/init": after["fl/init"]}, {"fl/init": original["fl/init"]})
    one_line_error(run("revert", r1.operation, store=s.root), "purged", "no longer exist")
    one_line_error(run("purge", r1.operation, "--yes", store=s.root), "already purged")
    assert s.history()[0]["state"] == "purged" and s.history()[0]["purged"] is not None
    assert json.loads(run("gc", "--json", store=s.root).stdout) == {"freed_bytes": 0}


def test_from_updates_scope_exactly_like_the_full_request(fl_store):
    s = fl_store
    full = s.unlearn([1, 2], evaluate=False)
    updated = states(s, AFFECTED)
    s.revert(full.operation)
    part = s.unlearn([1, 2], evaluate=False, from_nodes=["fl/r2/c1"])
    assert [n.name for n in part.nodes] == ["fl/r2/c1", "fl/r2/global"]
    assert all(s.node(n).version == 0 for n in ALL if n not in ("fl/r2/c1", "fl/r2/global"))
    assert_same_states(states(s, ["fl/r2/c1", "fl/r2/global"]),
                       {n: updated[n] for n in ("fl/r2/c1", "fl/r2/global")})


# ------------------------------------------------------------ label alignment
def _child(store, name, classes, data_ref, only_labels=None, epochs=2):
    """A child of fl/r2/global with a head over ``classes``: body inherited, head trained briefly."""
    base = store.state_dict("fl/r2/global")
    model = digits_cnn(num_classes=len(classes))
    sd = model.state_dict()
    for k, v in base.items():
        if not k.startswith("fc."):
            sd[k] = v
    for i, c in enumerate(classes):  # rows for labels the base knew start from the base's rows
        if c < 10:
            sd["fc.weight"][i] = base["fc.weight"][c]
            sd["fc.bias"][i] = base["fc.bias"][c]
    model.load_state_dict(sd)
    data = resolve(data_ref) if only_labels is None else resolve(f"{data_ref}[labels={only_labels}]")
    recipe = Recipe(optimizer="adam", lr=0.005, epochs=epochs, batch_size=64, seed=1, train_only="fc")
    train(model, lambda e: data.batches(64, shuffle=True, seed=e), recipe, classes)
    return store.add_node(name, model, ArchSpec("umig.models:digits_cnn", {"num_classes": len(classes)}),
                          parents=["fl/r2/global"], framework="tl" if len(classes) < 10 else "il",
                          data=data, classes=classes)


def test_label_alignment_across_head_sizes_and_imbalanced_paths(fl_store):
    s = fl_store
    _child(s, "tl/five", tuple(range(5, 10)), DIGITS, only_labels="5-9")  # rows 0..4 = labels 5..9
    _child(s, "il/twelve", tuple(range(12)), DIGITS, epochs=1)  # two rows for labels never seen yet
    s.link("fl/r1/c0", "fl/r2/global", relation="copy")  # an imbalanced path: depth 1 and depth 3
    forget = (6, 7)
    plan = s.plan_unlearning(list(forget)).plan
    assert plan.affected.count("fl/r2/global") == 1
    assert sorted(plan.affected[-2:]) == ["il/twelve", "tl/five"]
    before = {n: (s.version(n), s.state_dict(n)) for n in plan.affected}
    ev_before = {n: evaluate_node(s, n, forget, data=HELDOUT)["heldout"] for n in ("tl/five", "il/twelve")}

    res = s.unlearn(list(forget), evaluate=False)
    assert [n.name for n in res.nodes] == plan.affected
    for name in plan.affected:
        info = s.node(name)
        v_old, sd_old = before[name]
        assert info.version == 1 and [v.version for v in s.versions(name)] == [0, 1]  # updated once
        sd_new = s.state_dict(name)
        assert all(torch.equal(sd_new[k], sd_old[k]) for k in sd_old if not k.startswith("fc."))
        changed_w = (sd_new["fc.weight"] != sd_old["fc.weight"]).any(dim=1)
        changed_b = sd_new["fc.bias"] != sd_old["fc.bias"]
        rows = {i for i, c in enumerate(info.classes) if c in forget}
        # Only the forgotten labels' rows change, wherever they sit in this head.
        assert set(torch.nonzero(changed_w | changed_b).flatten().tolist()) == rows, name
        assert set(torch.nonzero(changed_b).flatten().tolist()) == rows, name
    assert {i for i, c in enumerate(s.node("tl/five").classes) if c in forget} == {1, 2}
    assert {i for i, c in enumerate(s.node("il/twelve").classes) if c in forget} == {6, 7}

    for n in ("tl/five", "il/twelve"):
        after = evaluate_node(s, n, forget, data=HELDOUT)["heldout"]
        assert ev_before[n]["AD_f"] > 0.5, (n, ev_before[n])
        assert after["AD_f"] <= 0.02, (n, after)
        assert after["AD_r"] >= ev_before[n]["AD_r"] - 0.03, (n, ev_before[n], after)

    # mode=rows merges the discovery nodes' unlearning FIMs by label id: replaying Eq. 6 with
    # label-aligned FIMs reproduces each new head exactly; row-index alignment would not.
    s.revert(res.operation)
    res = s.unlearn(list(forget), evaluate=False, params={"mode": "rows"})
    digests = [r[0] for r in s.db.execute("SELECT digest FROM operation_blobs WHERE operation=?", (res.operation,))]
    fims = [FIM.from_tensors(*s.blobs.load_with_metadata(d)) for d in digests]
    assert len(fims) == 3 and all(f.classes == tuple(range(10)) for f in fims)
    merged = merge_max(fims, range(10))
    params = {k: v for k, v in res.params.items() if k != "batch_size"}
    for name in ("tl/five", "il/twelve", "fl/r2/global"):
        info, (_, sd_old), sd_new = s.node(name), before[name], s.state_dict(name)
        model_fim = s.fim(name).aligned(info.classes)
        w, b, _ = fiun_update(sd_old["fc.weight"], sd_old["fc.bias"], model_fim, merged.aligned(info.classes),
                              forget, **params)
        assert torch.equal(w, sd_new["fc.weight"]) and torch.equal(b, sd_new["fc.bias"]), name
    k = len(s.node("tl/five").classes)
    by_row = FIM(merged.weight[:k], merged.bias[:k], s.node("tl/five").classes, merged.samples)
    # (The default `erase` does not read the merged FIM; `rows` does, so it shows the misalignment.)
    w_rows, _, _ = fiun_update(before["tl/five"][1]["fc.weight"], before["tl/five"][1]["fc.bias"],
                               s.fim("tl/five"), merged.aligned(s.node("tl/five").classes), forget,
                               **{**params, "mode": "rows"})
    w, b, _ = fiun_update(before["tl/five"][1]["fc.weight"], before["tl/five"][1]["fc.bias"],
                          s.fim("tl/five"), by_row, forget, **{**params, "mode": "rows"})
    assert not torch.equal(w, w_rows)

    s.revert(res.operation)
    for name in plan.affected:
        sd = s.state_dict(name)
        assert all(torch.equal(sd[k], before[name][1][k]) for k in sd)


def test_forgetting_labels_with_stored_statistics_runs_no_forward_pass(fl_store, monkeypatch):
    from umig.unlearners import fiun

    assert fl_store.fim("fl/r1/c0").has_label_stats  # kept at add-node (10 x 10 x 64 floats)

    def no_pass(*args, **kwargs):
        raise AssertionError("FIUn ran a forward pass over the forget data")

    monkeypatch.setattr(fiun, "head_fisher", no_pass)
    # erase reads no unlearning FIM; rows sums the discovery nodes' stored per-label statistics into one.
    res = fl_store.unlearn([3], evaluate=False)
    assert res.nodes and all(n.version_after == n.version_before + 1 for n in res.nodes)
    fl_store.revert(res.operation)
    res = fl_store.unlearn([3], evaluate=False, params={"mode": "rows"})
    assert len(fl_store.operation_blobs(res.operation)) == len(res.plan.discovery) > 0
    monkeypatch.undo()  # the same request without statistics (an older store) does run the pass
    fl_store.revert(res.operation)
    calls = []
    monkeypatch.setattr(fiun, "head_fisher", lambda *a, **k: calls.append(1) or head_fisher(*a, **k))
    monkeypatch.setattr(fiun.FIM, "has_label_stats", property(lambda self: False))
    fl_store.unlearn([3], evaluate=False, params={"mode": "rows"})
    assert len(calls) == len(res.plan.discovery)


def test_versions_after_a_revert_are_numbered_above_every_recorded_one(fl_store):
    """A new operation's versions come after the reverted ones (kept for re-application), and snapshots
    read each node's current version, whichever versions the store holds."""
    first = fl_store.unlearn([3], method="fiun", evaluate=False)
    fl_store.revert(first.operation)
    before = fl_store.snapshots([n.name for n in first.nodes])
    assert all(s.version == 0 for s in before.values())
    second = fl_store.unlearn([4], method="fiun", evaluate=False)
    assert all(n.version_before == 0 and n.version_after == 2 for n in second.nodes)
    after = fl_store.snapshots([n.name for n in second.nodes])
    assert all(s.version == 2 and s.head_blob != before[s.name].head_blob for s in after.values())
