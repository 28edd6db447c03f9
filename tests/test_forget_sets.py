"""Forget sets that name samples and clients, not only labels (issue 11)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import cli_run, store_state

from umig.data import DataRef, read_indices, save_subset, source_positions
from umig.errors import NotFoundError, UmigError, UnlearningError
from umig.forget import ForgetSet, samples
from umig.train import fedavg

TRAIN = "sklearn:digits?split=train"
REPO = Path(__file__).resolve().parents[1]


def cli(*args: str, store) -> tuple[int, str, str]:
    res = cli_run(*args, store=store.root)
    return res.exit_code, res.stdout, res.stderr


def own_positions(store, name: str) -> np.ndarray:
    return source_positions(DataRef.from_json(store.node(name).data_ref))[1]


def test_client_is_found_at_every_round_with_counts(fl_store):
    plan = fl_store.plan_unlearning(clients=["fl/r1/c1"], method="retrain").plan.to_json()
    n = fl_store.node("fl/r1/c1").data_size
    # The same client's data was recorded at rounds 1 and 2: both hold it, entirely.
    assert plan["holders"] == {"fl/r1/c1": {"forgotten": n, "remaining": 0},
                               "fl/r2/c1": {"forgotten": n, "remaining": 0}}
    assert plan["discovery"] == ["fl/r1/c1"]
    assert {"fl/r1/global", "fl/r2/c1", "fl/r2/global"} <= set(plan["affected"])
    assert "fl/r1/c0" not in plan["affected"]
    assert plan["forget"]["kinds"] == ["client"] and plan["forget"]["samples"][0]["client"] == "fl/r1/c1"


def test_sample_counts_match_each_nodes_subset(fl_store):
    forget = np.arange(0, 300, 3)
    plan = fl_store.plan_unlearning(ForgetSet(samples=(samples(forget, TRAIN),)), method="retrain").plan
    for name in ("fl/r1/c0", "fl/r1/c1", "fl/r1/c2"):
        pos = own_positions(fl_store, name)
        gone = int(np.isin(pos, forget).sum())
        assert plan.counts[name] == (gone, pos.size - gone)
    assert set(plan.discovery) == {n for n in ("fl/r1/c0", "fl/r1/c1", "fl/r1/c2") if plan.counts[n][0]}


def test_retrain_client_reweights_fedavg_and_replays_bit_for_bit(fl_template, tmp_path):
    import shutil

    from umig import Store

    states = []
    for i in range(2):
        root = tmp_path / f"s{i}"
        shutil.copytree(fl_template, root)
        with Store.open(root) as s:
            s.unlearn(clients=["fl/r1/c1"], method="retrain", evaluate=False)
            states.append({n.name: s.state_dict(n.name) for n in s.nodes()})
            w = {p: wt for p, _, wt in s.node("fl/r1/global").parents}
    a, b = states
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])  # seeded recipe: identical replay
    # The forgotten client has no data left: it drops out of the aggregate.
    expect = fedavg([a["fl/r1/c0"], a["fl/r1/c2"]], [w["fl/r1/c0"], w["fl/r1/c2"]])
    assert all(torch.allclose(a["fl/r1/global"][k].float(), expect[k].float()) for k in expect)


def test_sample_operation_is_audited_and_reverts_bit_for_bit(fl_store):
    before = {n.name: fl_store.state_dict(n.name) for n in fl_store.nodes()}
    fs = ForgetSet(samples=(samples(np.arange(40), TRAIN),))
    op = fl_store.unlearn(fs, method="finetune", params={"epochs": 1}, evaluate=False)
    entry = fl_store.history()[-1]
    rec = entry["forget"]
    assert rec["kinds"] == ["samples"] and rec["samples"][0]["count"] == 40
    assert rec["samples"][0]["dataset"] == fs.samples[0].dataset and len(rec["samples"][0]["digest"]) == 64
    assert "indices" not in json.dumps(rec)
    fl_store.revert(op.operation)
    for n in fl_store.nodes():
        after = fl_store.state_dict(n.name)
        assert all(torch.equal(after[k], before[n.name][k]) for k in after)


@pytest.mark.parametrize("make, error", [
    (lambda s: s.plan_unlearning(ForgetSet(samples=(samples([10**6], TRAIN),)), method="retrain"), "out of range"),
    (lambda s: s.plan_unlearning(ForgetSet(samples=(samples([0, 1], "sklearn:digits?split=test"),)),
                                 method="retrain"), "no node"),
    (lambda s: s.unlearn(clients=["nope"], method="retrain"), "unknown node"),
    (lambda s: s.unlearn(clients=["fl/r1/global"], method="retrain"), "no training data of its own"),
    (lambda s: s.unlearn(ForgetSet(), method="retrain"), "empty"),
    (lambda s: s.unlearn(clients=["fl/r1/c1"], method="fiun"), "cannot forget client"),
])
def test_bad_forget_sets_fail_clearly_and_change_nothing(fl_store, make, error):
    state = store_state(fl_store.root)
    with pytest.raises((UnlearningError, NotFoundError, UmigError), match=error):
        make(fl_store)
    assert store_state(fl_store.root) == state


def test_cli_samples_and_client_dry_run_json(fl_store, tmp_path):
    idx = save_subset(tmp_path / "poison.npy", np.arange(0, 60, 2))
    assert read_indices(idx).tolist() == list(range(0, 60, 2))
    state = store_state(fl_store.root)
    code, out, err = cli("unlearn", "--samples", idx, "--data", TRAIN, "--method", "retrain", "--dry-run", "--json",
                         store=fl_store)
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert plan["forget"]["samples"][0]["count"] == 30 and plan["discovery"]
    code, out, err = cli("unlearn", "--client", "fl/r2/c2", "--method", "retrain", "--dry-run", "--json", store=fl_store)
    assert code == 0, err
    assert set(json.loads(out)["plan"]["holders"]) == {"fl/r1/c2", "fl/r2/c2"}
    for args, needle in [(("--samples", idx), "--samples needs --data"), ((), "nothing to forget"),
                         (("--client", "fl/r1/c1", "--method", "fiun"), "cannot forget client")]:
        code, out, err = cli("unlearn", *args, store=fl_store)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 1 and len(lines) == 1 and needle in lines[0], (code, err)
    assert store_state(fl_store.root) == state


@pytest.mark.parametrize("method", ["finetune", "gradient-ascent", "distill"])
def test_baselines_serve_a_client_whose_data_is_entirely_forgotten(fl_store, method):
    # The forgotten client's own nodes keep no data: they train on their federation peers' data.
    res = fl_store.unlearn(clients=["fl/r1/c1"], method=method, params={"epochs": 1}, evaluate=False)
    assert {"fl/r1/c1", "fl/r2/c1", "fl/r2/global"} <= {n.name for n in res.nodes}
    if method == "finetune":
        # purge takes the client's samples out of the model FIMs: the client's own nodes keep none (no
        # data of their own is left), the other clients' FIMs hold none of it, and an aggregate whose
        # FIM was its clients' mean becomes the mean of the clients that still have one.
        from umig.ingest import mean_parent_fim

        before = {n.name: fl_store.version(n.name).fim_blob for n in res.nodes}
        recorded = {n: fl_store.fim(n) for n in before}
        out = fl_store.purge(res.operation)
        after = {n: fl_store.version(n).fim_blob for n in before}
        assert after["fl/r1/c1"] is None and after["fl/r2/c1"] is None
        assert not fl_store.blobs.exists(before["fl/r1/c1"])
        assert out["fims_kept"] == 0 and out["fims_replaced"] >= 2
        for agg in ("fl/r1/global", "fl/r2/global"):
            info = fl_store.node(agg)
            rest = [(p, w) for p, _, w in info.parents if p != info.name.replace("global", "c1")]
            want = mean_parent_fim(fl_store, rest, info.classes)  # the remaining clients' live (cleaned) FIMs
            got = fl_store.fim(agg)
            assert after[agg] != before[agg] and torch.allclose(got.weight, want.weight, rtol=1e-6, atol=0)
            assert not torch.equal(got.weight, recorded[agg].weight)


def test_forgotten_il_step_trains_only_on_labels_its_head_predicts(tmp_path):
    # il/step1's data is forgotten entirely; its peer (il/step2) knows labels step1's head has no row for.
    import sys

    from umig import Store

    sys.path.insert(0, str(REPO / "examples"))
    from incremental import build

    with Store.init(tmp_path / "il") as s:
        build(s, epochs=1, log=lambda *a: None)
        res = s.unlearn(clients=["il/step1"], method="finetune", params={"epochs": 1}, evaluate=False)
        assert [n.name for n in res.nodes] == ["il/step1", "il/step2"]


def test_purge_takes_forgotten_samples_out_of_the_model_fims(fl_store):
    """After purging a sample forget set, each client's model FIM is the FIM of its live weights over its
    own data minus those samples (a forward pass agrees), and the aggregates are their clients' mean."""
    from umig.data import DataRef, source_positions
    from umig.fisher import head_fisher
    from umig.ingest import mean_parent_fim

    fs = ForgetSet(samples=(samples(np.arange(40), TRAIN),))
    op = fl_store.unlearn(fs, method="finetune", params={"epochs": 1}, evaluate=False)
    old = {n.name: fl_store.version(n.name).fim_blob for n in op.nodes}
    out = fl_store.purge(op.operation)
    assert out["fims_kept"] == 0 and out["fims_replaced"] == len(op.nodes)
    holders = [n.name for n in op.nodes if fl_store.node(n.name).data_ref is not None]
    assert holders
    forgotten = set(range(40))
    for n in holders:
        data = fl_store.node_data(n)
        _, pos = source_positions(DataRef.from_json(fl_store.node(n).data_ref))
        keep = np.flatnonzero([int(p) not in forgotten for p in pos])
        assert len(keep) < len(data)  # this client held some of them
        expect = head_fisher(fl_store.load_model(n), fl_store.node(n).head, data.select(keep).batches(256),
                             fl_store.fim(n).classes, per_label=fl_store.fim(n).has_label_stats)
        assert torch.allclose(fl_store.fim(n).weight, expect.weight) and fl_store.fim(n).samples == len(keep)
        assert not fl_store.blobs.exists(old[n])
    for n in (n.name for n in op.nodes if fl_store.node(n.name).data_ref is None):
        parents = [(p, w) for p, _, w in fl_store.node(n).parents]
        assert torch.equal(fl_store.fim(n).weight, mean_parent_fim(fl_store, parents, fl_store.fim(n).classes).weight)
