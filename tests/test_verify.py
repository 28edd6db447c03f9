"""`umig verify` (issue 18, item 1): an operation judged against retraining, metric by metric and under attack.

The CLI runs in-process (typer's CliRunner) on the 9-node FL digits lineage; the metric and attack math is
checked on hand-made cases with known answers.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from conftest import store_state
from conftest import cli_error_line as one_line_error
from conftest import cli_run as run
from umig.errors import UnlearningError
from umig.evaluate import confidence_threshold, edit_head, mia_efficacy
from umig.forget import ForgetSet
from umig.forget import samples as sample_set
from umig.verify import AVG_GAP_METRICS, METRICS, avg_gap, build_edited
from umig.verify import verify as verify_operation

DIGITS = "sklearn:digits?split=train"


def blob_names(root: Path) -> set[str]:
    return {p.name for p in (root / "blobs").glob("??/*.safetensors")}


# ------------------------------------------------------------------ the command, end to end
def test_verify_a_label_operation(fl_store, tmp_path):
    root = fl_store.root
    op = fl_store.unlearn([1, 2], evaluate=False).operation  # FIUn, the default for labels
    nodes = [n["name"] for n in fl_store.operation(op)["nodes"]]
    before = blob_names(root)

    png = tmp_path / "g.png"
    res = run("verify", op, "--json", "--plot", str(png), store=root)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["operation"] == op and out["method"] == "fiun" and out["reference_method"] == "retrain"
    assert out["reference"] == "computed" and out["heldout"] == "sklearn:digits?split=test"
    assert [n["name"] for n in out["nodes"]] == nodes
    for n in out["nodes"]:
        for side in ("unlearned", "reference"):
            assert set(n[side]) == set(METRICS), n[side].keys()
            for m in METRICS:
                assert 0.0 <= n[side][m] <= 1.0, (n["name"], side, m, n[side][m])
        for m in METRICS:
            assert n["gap"][m] == pytest.approx(100 * (n["unlearned"][m] - n["reference"][m]), abs=1e-2)
        assert n["avg_gap"] == pytest.approx(np.mean([abs(n["gap"][m]) for m in AVG_GAP_METRICS]), abs=1e-2)
        # Both models forgot the labels; the retrained one never saw them, so its head holds nothing.
        assert n["unlearned"]["forget_acc"] <= 0.05 and n["reference"]["forget_acc"] <= 0.05
        assert n["reference"]["retain_acc"] > 0.8
    assert out["max_avg_gap"] == max(n["avg_gap"] for n in out["nodes"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The reference is kept (blobs referenced, so gc leaves them) and is never live.
    refs = fl_store.references(op)
    assert sorted(refs) == sorted(nodes) and all(r["method"] == "retrain" for r in refs.values())
    assert blob_names(root) > before
    assert fl_store.gc() == 0
    assert all(fl_store.node(n).version == fl_store.operation(op)["nodes"][i]["version_after"]
               for i, n in enumerate(nodes))

    # history shows the verification with the operation.
    hist = json.loads(run("history", "--json", store=root).stdout)
    assert hist[-1]["operation"] == op and hist[-1]["verification"]["nodes"] == out["nodes"]
    assert f"{out['max_avg_gap']:.2f}" in run("history", store=root).stdout  # the worst node's Avg. Gap

    # A second verify reuses the reference (no retraining, no new blobs) and gives the same figures;
    # a loose gate passes.
    kept = blob_names(root)
    res = run("verify", op, "--json", "--max-gap", "100", store=root)
    assert res.exit_code == 0, res.stderr
    again = json.loads(res.stdout)
    assert again["reference"] == "reused" and again["reference_s"] < out["reference_s"] and blob_names(root) == kept
    assert [n["gap"] for n in again["nodes"]] == [n["gap"] for n in out["nodes"]]
    assert again["passed"] is True and fl_store.operation(op)["verification"]["passed"] is True

    # --max-gap 0 fails in one line; the figures still print and the failed verdict is stored.
    res = run("verify", op, "--max-gap", "0", store=root)
    one_line_error(res, "exceeds --max-gap 0")
    assert "Avg. Gap" in res.stdout
    assert fl_store.operation(op)["verification"]["passed"] is False

    # purge deletes the reference with the rest of the operation; the verdict stays in the history.
    fl_store.purge(op)
    assert fl_store.references(op) == {}
    assert not any(d in blob_names(root) for r in refs.values() for d in (r["body"], r["head"]))
    assert fl_store.operation(op)["verification"]["operation"] == op
    state = store_state(root)
    one_line_error(run("verify", op, store=root), "was purged")
    assert store_state(root) == state


def test_retrain_operation_on_samples_matches_its_reference(fl_store, tmp_path):
    """A sample set is rebuilt from the --samples file (checked against the recorded digest); verifying
    an exact retrain against the retrained reference gives no gap at all."""
    idx = np.arange(0, 400, 7)
    np.save(tmp_path / "forget.npy", idx)
    op = fl_store.unlearn(ForgetSet(samples=(sample_set(idx, DIGITS),)), method="retrain", evaluate=False).operation

    with pytest.raises(UnlearningError, match="give the same --samples FILE"):
        verify_operation(fl_store, op)
    with pytest.raises(UnlearningError, match="do not match"):
        verify_operation(fl_store, op, samples=[idx[1:]])
    res = run("verify", op, "--json", "--samples", str(tmp_path / "forget.npy"), store=fl_store.root)
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    for n in out["nodes"]:
        for m in ("head_edit_acc", "heldout_forget_acc", "relearn_reset_acc"):  # label sets only
            assert n["unlearned"][m] is None and n["gap"][m] is None
        assert n["unlearned"]["relearn_acc"] is not None and n["unlearned"]["probe_acc"] is not None
        assert n["avg_gap"] == 0.0 and all(g in (0.0, None) for g in n["gap"].values()), n


# ------------------------------------------------------------------ bad input
def test_unknown_operation_one_line_store_unchanged(fl_store):
    state = store_state(fl_store.root)
    one_line_error(run("verify", "op-nope", store=fl_store.root), "unknown operation 'op-nope'")
    one_line_error(run("verify", "op-nope", "--plot", "g.txt", store=fl_store.root), "g.txt")
    op = fl_store.unlearn([3], evaluate=False).operation
    state = store_state(fl_store.root)
    for args, needle in [(("--max-gap", "-1"), "--max-gap must be at least 0"),
                         (("--data", "nowhere:x"), "nowhere"),
                         (("--samples", "missing.npy"), "missing.npy"),
                         (("--samples", str(Path(__file__))), "")]:
        one_line_error(run("verify", op, *args, store=fl_store.root), needle)
    assert store_state(fl_store.root) == state
    assert store_state(fl_store.root) == state


def test_nodes_without_recipes_one_line(fl_store):
    op = fl_store.unlearn([3], evaluate=False).operation
    db = sqlite3.connect(fl_store.root / "umig.db")  # as if the nodes had been recorded without recipes
    db.execute("UPDATE nodes SET recipe=NULL")
    db.commit()
    db.close()
    state = store_state(fl_store.root)
    one_line_error(run("verify", op, store=fl_store.root), "verifying needs recorded recipes for", "fl/r1/c0")
    assert store_state(fl_store.root) == state


# ------------------------------------------------------------------ the math, on known answers
def test_mia_efficacy_known_answers():
    g = torch.Generator().manual_seed(0)
    members = 0.9 + 0.1 * torch.rand(500, generator=g)  # training items: confident
    nonmembers = 0.3 + 0.5 * torch.rand(500, generator=g)  # unseen items: much less so
    like_unseen = 0.3 + 0.5 * torch.rand(200, generator=g)
    like_members = 0.9 + 0.1 * torch.rand(200, generator=g)
    assert mia_efficacy(members, nonmembers, like_unseen) == pytest.approx(1.0, abs=0.02)
    assert mia_efficacy(members, nonmembers, like_members) == pytest.approx(0.0, abs=0.02)
    half = torch.cat([like_unseen[:100], like_members[:100]])
    assert mia_efficacy(members, nonmembers, half) == pytest.approx(0.5, abs=0.03)
    # Forgotten labels get ~0 confidence: every one of them looks unseen.
    assert mia_efficacy(members, nonmembers, torch.zeros(50)) == 1.0
    assert mia_efficacy(members, nonmembers, torch.empty(0)) is None
    # The cut sits midway between the two sets when they separate perfectly.
    assert confidence_threshold(torch.tensor([0.9, 1.0]), torch.tensor([0.1, 0.5])) == pytest.approx(0.7)


def test_white_box_head_edit_on_a_hand_made_head():
    """Three labels on orthogonal features; label 2's row was "forgotten" by shrinking it and lowering its
    bias, keeping its direction. The edit (retained rows' mean bias and mean norm) brings it back."""
    weight = torch.eye(3) * torch.tensor([[4.0], [4.0], [0.2]])
    bias = torch.tensor([0.0, 0.0, -6.0])
    feats = torch.eye(3).repeat(10, 1)
    labels = torch.arange(3).repeat(10)

    def acc(w: torch.Tensor, b: torch.Tensor, label: int) -> float:
        pred = (feats @ w.T + b).argmax(1)
        return float((pred[labels == label] == label).float().mean())

    assert acc(weight, bias, 2) == 0.0
    w, b = edit_head(weight, bias, [2])
    assert acc(w, b, 2) == 1.0 and acc(w, b, 0) == 1.0
    assert w[2].norm() == pytest.approx(4.0) and b[2] == pytest.approx(0.0)
    assert torch.allclose(w[2] / w[2].norm(), weight[2] / weight[2].norm())
    assert torch.equal(w[:2], weight[:2]) and torch.equal(b[:2], bias[:2])  # the others untouched
    assert torch.equal(weight[2], torch.tensor([0.0, 0.0, 0.2]))  # inputs unchanged

    # A zeroed row has no direction left: the edit cannot bring anything back.
    zeroed = weight.clone()
    zeroed[2] = 0
    w, b = edit_head(zeroed, bias, [2])
    assert torch.equal(w[2], torch.zeros(3)) and acc(w, b, 2) == 0.0

    # The same edit on a model's head (what `umig verify` measures), without touching the model.
    model = nn.Sequential(nn.Identity(), nn.Linear(3, 3))
    with torch.no_grad():
        model[1].weight.copy_(weight)
        model[1].bias.copy_(bias)
    edited = build_edited(model, "1", [2])
    assert (edited(feats).argmax(1) == labels).all() and (model(feats).argmax(1)[labels == 2] != 2).all()


def test_avg_gap_skips_what_could_not_be_measured():
    assert avg_gap({"forget_acc": 2.0, "retain_acc": -1.0, "heldout_acc": None, "mia_efficacy": 0.0}) == 1.0
    assert avg_gap({m: None for m in AVG_GAP_METRICS}) is None
