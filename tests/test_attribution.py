"""`umig attribute` (issue 21): trace a behaviour back to the clients, nodes and samples of a lineage.

The lineage is conftest's 3-client x 2-round FL digits store (``fl_store``). One check runs the
real entry point in a subprocess; the others run the same typer app in-process (typer's
CliRunner), as test_cli does, because each subprocess pays a torch import on busy cores. The
math (closed-form head gradient, TracIn, precision at k) is checked against autograd and by hand.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import store_state, umig_cli
from conftest import cli_run as run
from safetensors.torch import save_file

from umig import graph as G
from umig.attribution import METHODS, _holders, _per_sample_grads, attribute
from umig.data import DataRef, resolve, source_positions
from umig.demo import DIGITS_TEST
from umig.evaluate import (
    head_gradients,
    head_tracin,
    head_tracin_pairs,
    precision_recall_at_k,
)
from umig.models import digits_cnn

FINAL = "fl/r2/global"
CLIENTS = ["fl/r1/c0", "fl/r1/c1", "fl/r1/c2"]


def files(root: Path) -> dict[str, str]:
    """sha256 of every file under a store (the database, blobs, index files, the lock), but SQLite's
    write-ahead log and its index, which come and go with open connections (the rows they could
    hold are what ``store_state`` compares)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


@pytest.fixture
def queries(tmp_path: Path) -> Path:
    """40 held-out digits, as an incident's inputs file (x only)."""
    x, _ = resolve(DIGITS_TEST).dataset.tensors
    path = tmp_path / "q.safetensors"
    save_file({"x": x[:40].contiguous()}, str(path))
    return path


def test_by_client_lists_every_client_highest_first_through_the_real_cli(fl_store, queries):
    root = Path(fl_store.root)
    before, blobs = store_state(root), files(root)
    proc = umig_cli("attribute", FINAL, "--inputs", str(queries), "--labels", "7", "--by", "client", "--json",
                    store=root, check=True)
    out = json.loads(proc.stdout)
    assert out["node"] == FINAL and out["labels"] == [7] and out["by"] == "client" and out["queries"] == 40
    ranking = out["ranking"]
    assert sorted(r["client"] for r in ranking) == CLIENTS
    scores = [r["score"] for r in ranking]
    assert all(isinstance(s, float) and np.isfinite(s) for s in scores) and scores == sorted(scores, reverse=True)
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    for r in ranking:  # a client is its data across rounds
        assert r["nodes"] == [r["client"], r["client"].replace("/r1/", "/r2/")]
    assert store_state(root) == before and files(root) == blobs  # attribute only reads: byte-identical


def test_samples_written_with_o_are_a_forget_set_unlearn_takes(fl_store, queries, tmp_path):
    root = Path(fl_store.root)
    before, blobs = store_state(root), files(root)
    found = tmp_path / "found.npy"
    res = run("attribute", FINAL, "--inputs", str(queries), "--labels", "7", "--by", "sample", "--top", "15",
              "-o", str(found), "--json", store=root)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["ranking"]) == 15 and [r["score"] for r in out["ranking"]] == sorted(
        (r["score"] for r in out["ranking"]), reverse=True)
    [written] = out["written"]
    assert Path(written["path"]) == found.resolve() and written["count"] == 15
    idx = np.load(found)
    assert idx.dtype == np.int64 and idx.shape == (15,) and len(np.unique(idx)) == 15
    assert idx.tolist() == [r["index"] for r in out["ranking"]]  # rank order, indices into the whole source
    ref = written["data"]
    base, _ = source_positions(DataRef(ref))
    assert idx.max() < len(base)
    for row in out["ranking"]:  # each sample names the nodes that trained on it, and their client
        assert row["nodes"] and row["client"] in CLIENTS and all(n.endswith(row["client"][-3:]) for n in row["nodes"])
    assert store_state(root) == before and files(root) == blobs
    plan = run("unlearn", "--samples", str(found), "--data", ref, "--dry-run", "--json", store=root)
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["plan"]["forget"]["samples"][0]["count"] == 15
    assert store_state(root) == before


def test_by_node_and_the_human_table(fl_store, queries):
    res = run("attribute", FINAL, "--inputs", str(queries), "--by", "node", "--json", store=Path(fl_store.root))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert sorted(r["node"] for r in out["ranking"]) == sorted(CLIENTS + [c.replace("/r1/", "/r2/") for c in CLIENTS])
    assert set(out["labels"]) <= set(range(10))  # default: the node's own predictions
    table = run("attribute", FINAL, "--inputs", str(queries), "--labels", "3", "--top", "5", store=Path(fl_store.root))
    assert table.exit_code == 0 and "tracin" in table.stdout and "fl/r1/c" in table.stdout


def _bad_inputs(tmp_path: Path) -> dict[str, Path]:
    x, _ = resolve(DIGITS_TEST).dataset.tensors
    out = {}
    for name, tensor in (("wrong", torch.zeros(4, 3, 8, 8)), ("flat", torch.zeros(4, 64)),
                         ("empty", torch.zeros(0, 1, 8, 8)), ("good", x[:4].contiguous())):
        out[name] = tmp_path / f"{name}.safetensors"
        save_file({"x": tensor}, str(out[name]))
    return out


@pytest.mark.parametrize("case, needle", [
    ("unknown node", "unknown node 'nope'"),
    ("wrong shape", "shape (3, 8, 8)"),
    ("flat inputs", "shape (64,)"),
    ("no ancestor with data", "no ancestor with training data"),
    ("empty inputs", "holds no inputs"),
    ("top 0", "--top must be at least 1"),
    ("missing file", "not found"),
    ("unknown method", "unknown attribution method"),
    ("label not in classes", "label(s) 12"),
    ("-o with --by client", "-o writes samples"),
])
def test_bad_input_is_one_line_and_changes_nothing(fl_store, tmp_path, case, needle):
    root = Path(fl_store.root)
    f = _bad_inputs(tmp_path)
    args = {
        "unknown node": ["nope", "--inputs", str(f["good"])],
        "wrong shape": [FINAL, "--inputs", str(f["wrong"])],
        "flat inputs": [FINAL, "--inputs", str(f["flat"])],
        "no ancestor with data": ["fl/init", "--inputs", str(f["good"])],
        "empty inputs": [FINAL, "--inputs", str(f["empty"])],
        "top 0": [FINAL, "--inputs", str(f["good"]), "--top", "0"],
        "missing file": [FINAL, "--inputs", str(tmp_path / "absent.safetensors")],
        "unknown method": [FINAL, "--inputs", str(f["good"]), "--method", "oracle"],
        "label not in classes": [FINAL, "--inputs", str(f["good"]), "--labels", "12"],
        "-o with --by client": [FINAL, "--inputs", str(f["good"]), "--by", "client", "-o", str(tmp_path / "x.npy")],
    }[case]
    before, blobs = store_state(root), files(root)
    res = run("attribute", *args, store=root)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert store_state(root) == before and files(root) == blobs
    assert not (tmp_path / "x.npy").exists()


def test_a_client_s_own_samples_are_traced_back_to_it(fl_store):
    """Queries that are 12 of client c1's training items with their labels (a memorised record):
    TracIn, each item scored by its strongest query, puts those very items at the top and c1 first.
    (The clients are IID: a method that pools the queries, like tracin-mean, has nothing to go on.)"""
    info = fl_store.node("fl/r1/c1")
    _, positions = source_positions(DataRef.from_json(info.data_ref))
    data = fl_store.node_data("fl/r1/c1")
    pick = np.arange(0, 12 * 25, 25)
    x, y = data.dataset.tensors
    a = attribute(fl_store, FINAL, (x[pick], y[pick]), method="tracin")
    assert a.by_client()[0]["client"] == "fl/r1/c1", a.by_client()
    top = {r["index"] for r in a.by_sample()[:12]}
    assert len(top & set(positions[pick].tolist())) >= 10
    assert a.leading_run() >= 10


def test_every_method_scores_every_item(fl_store):
    x, _ = resolve(DIGITS_TEST).dataset.tensors
    sizes = {h.name: h.data_size for h in fl_store.snapshots(CLIENTS).values()}
    for method in [m for m in METHODS if m != "tracin-all"]:  # tracin-all: its gradients are checked below
        a = attribute(fl_store, FINAL, (x[:6], None), labels=[4], method=method)
        assert {h.name: len(h.scores) for h in a.holders if h.name in sizes} == sizes
        assert all(np.isfinite(h.scores).all() for h in a.holders)
        assert abs(float(np.median(np.concatenate([h.scores for h in a.holders])))) < 1e-9  # the median item is 0


def test_closed_form_head_gradient_matches_autograd():
    torch.manual_seed(0)
    model = digits_cnn().eval()
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 3, 3, 9, 5])
    classes = tuple(range(10))
    feats = model.features(x)
    g, h, valid = head_gradients(model(x), feats, y, classes)
    assert valid.all()
    for i in range(len(x)):
        model.zero_grad()
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        auto = torch.cat([model.fc.weight.grad, model.fc.bias.grad.unsqueeze(1)], dim=1).double()
        assert torch.allclose(torch.outer(g[i], h[i]), auto, atol=1e-6)
    # the per-sample gradients tracin-all uses agree on the head slice
    full = _per_sample_grads(model, x, y)
    head = full[:, -(10 * 64 + 10):]  # fc.weight then fc.bias, the last parameters
    closed = torch.cat([(g[:, :, None] * h[:, None, :-1]).reshape(5, -1), g], dim=1)
    assert torch.allclose(head, closed, atol=1e-5)
    # a label the head has no row for has no gradient
    _, _, ok = head_gradients(model(x), feats, torch.tensor([0, 3, 3, 9, 11]), classes)
    assert ok.tolist() == [True, True, True, True, False]


def test_tracin_mean_is_the_mean_of_its_pairs_and_precision_at_k():
    torch.manual_seed(1)
    g, h, qg, qh = torch.randn(7, 4).double(), torch.randn(7, 5).double(), torch.randn(3, 4).double(), torch.randn(3, 5).double()
    for normalise in (True, False):
        pairs = head_tracin_pairs(g, h, qg, qh, normalise=normalise)
        assert torch.allclose(head_tracin(g, h, qg, qh, normalise=normalise), pairs.mean(1))
    assert head_tracin_pairs(g, h, qg, qh).abs().max() <= 1 + 1e-9  # cosines
    scores = torch.tensor([0.9, 0.1, 0.8, 0.8, 0.2])
    relevant = torch.tensor([True, False, False, True, True])
    assert precision_recall_at_k(scores, relevant, 2) == (0.5, 1 / 3)  # the tie at 0.8 goes to the earlier item
    assert precision_recall_at_k(scores, relevant, 5) == (0.6, 1.0)
    with pytest.raises(ValueError):
        precision_recall_at_k(scores, relevant, 0)


def test_holders_start_from_their_parents_weights(fl_store):
    g = fl_store.graph()
    order = [n for n in G.bfs_order(g) if n in nx.ancestors(g, FINAL) | {FINAL}]
    holders = {h.name: h for h in _holders(fl_store, order, fl_store.snapshots(order))}
    assert sorted(holders) == sorted(CLIENTS + [c.replace("/r1/", "/r2/") for c in CLIENTS])
    init, g1 = fl_store.state_dict("fl/init"), fl_store.state_dict("fl/r1/global")
    for name, h in holders.items():
        parent = init if "/r1/" in name else g1
        assert all(torch.equal(v, parent[k]) for k, v in h.start.state_dict().items())
        assert h.client == name.replace("/r2/", "/r1/")
    assert holders["fl/r2/c0"].start is holders["fl/r2/c1"].start  # one shared start model per parent
