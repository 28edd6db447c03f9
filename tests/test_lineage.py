"""Lineage recorders: relations, weights, classes and archs per node, multi-layer and DAG-FL, retraining.

Models are untrained (recorders record, they never train) and data subsets are tiny, so
every test runs in well under a second of compute.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from umig import graph as G
from umig.arch import ArchSpec
from umig.data import resolve
from umig.lineage import (
    DataParallelRecorder,
    FederatedRecorder,
    IncrementalRecorder,
    TransferRecorder,
    evaluate_models,
    fresh_model,
    inherit_weights,
    model_device,
    retrain_reference,
    subset_ref,
)
from umig.api import Store
from umig.train import Recipe, fedavg

TRAIN = "sklearn:digits?split=train"
MLP = ArchSpec("umig.models:digits_mlp", {"num_classes": 10, "hidden": 16})
TINY = Recipe(optimizer="adam", lr=0.01, epochs=1, batch_size=32, seed=0)


@pytest.fixture
def store(tmp_path):
    s = Store.init(tmp_path / "store")
    yield s
    s.close()


@pytest.fixture(scope="module")
def labels_of():
    return resolve(TRAIN).targets.numpy()


def shard(store, labels_of, n, *, labels=range(10), offset=0):
    """``n`` training samples (per label when ``labels`` is given) starting at ``offset`` of each label."""
    idx = np.concatenate([np.flatnonzero(labels_of == c)[offset:offset + n] for c in labels])
    return subset_ref(store, TRAIN, np.sort(idx))


def model(arch=MLP, seed=0):
    return fresh_model(arch, seed)


def parents(store, name):
    return {p: (rel, w) for p, rel, w in store.node(name).parents}


# ------------------------------------------------------------------ federated learning
def test_federated_round_relations_and_fedavg_weights(store, labels_of):
    rec = FederatedRecorder(store, MLP, recipe=TINY)
    with store.batch():
        init = rec.initial(model()).name
        sizes = [1, 2, 3]
        names = [rec.client(1, c, model(seed=c), shard(store, labels_of, n)).name for c, n in enumerate(sizes)]
        glob = rec.aggregate(1, model()).name
        nxt = rec.client(2, 0, model(), shard(store, labels_of, 1)).name
    assert names == ["fl/r1/c0", "fl/r1/c1", "fl/r1/c2"] and glob == "fl/r1/global"
    for n in names:
        assert parents(store, n) == {init: ("finetune", None)}
        info = store.node(n)
        assert info.framework == "fl" and info.recipe == TINY.to_json() and info.meta["round"] == 1
    ps = parents(store, glob)
    assert set(ps) == set(names) and {r for r, _ in ps.values()} == {"aggregate"}
    assert math.isclose(sum(w for _, w in ps.values()), 1.0)
    for n, size in zip(names, sizes):
        assert math.isclose(ps[n][1], size / sum(sizes))  # data shares: 10, 20, 30 samples
    assert rec.weights(names) == pytest.approx([ps[n][1] for n in names])
    assert store.node(glob).data_size == 0 and store.fim(glob) is not None  # data-less: mean of parent FIMs
    assert parents(store, nxt) == {glob: ("finetune", None)}  # next round starts from the aggregate
    assert rec.seconds > 0 and rec.nodes == [init, *names, glob, nxt]


def test_multi_layer_fl_intermediate_aggregators(store, labels_of):
    rec = FederatedRecorder(store, MLP)
    with store.batch():
        rec.initial(model())
        clients = [rec.client(1, c, model(), shard(store, labels_of, n)).name for c, n in enumerate([1, 1, 1, 3])]
        e0 = rec.aggregate(1, model(), parents=clients[:2], final=False).name
        e1 = rec.aggregate(1, model(), parents=clients[2:], final=False).name
        assert rec.pending(1) == [e0, e1]
        glob = rec.aggregate(1, model()).name
        after = rec.client(2, 0, model(), shard(store, labels_of, 1)).name
    assert (e0, e1, glob) == ("fl/r1/agg0", "fl/r1/agg1", "fl/r1/global")
    assert parents(store, e0) == {clients[0]: ("aggregate", 0.5), clients[1]: ("aggregate", 0.5)}
    assert parents(store, e1) == {clients[2]: ("aggregate", 0.25), clients[3]: ("aggregate", 0.75)}
    top = parents(store, glob)
    assert set(top) == {e0, e1}
    assert top[e0][1] == pytest.approx(20 / 60) and top[e1][1] == pytest.approx(40 / 60)  # data each stands for
    assert rec.pending(1) == [] and rec.global_node == glob
    assert parents(store, after) == {glob: ("finetune", None)}
    assert G.depths(store.graph())[glob] == 3


def test_dag_fl_parents_of_different_depth(store, labels_of):
    rec = FederatedRecorder(store, MLP)
    with store.batch():
        rec.initial(model())
        c0 = rec.client(1, 0, model(), shard(store, labels_of, 2)).name
        g1 = rec.aggregate(1, model()).name
        c1 = rec.client(2, 0, model(), shard(store, labels_of, 2)).name
        g2 = rec.aggregate(2, model()).name
        stale = rec.client(2, "stale", model(), shard(store, labels_of, 1), parent=g1, name="fl/stale").name
        dag = rec.aggregate(3, model(), parents=[g2, g1, stale], weights=[2, 1, 1], name="fl/dag").name
        auto = rec.aggregate(3, model(), parents=[g2, stale], name="fl/dag-auto").name
    depth = G.depths(store.graph())
    assert len({depth[g2], depth[g1], depth[stale]}) == 3  # three parents, three different depths
    ps = parents(store, dag)
    assert ps == {g2: ("aggregate", 0.5), g1: ("aggregate", 0.25), stale: ("aggregate", 0.25)}
    auto_ps = parents(store, auto)
    assert math.isclose(sum(w for _, w in auto_ps.values()), 1.0)
    assert auto_ps[g2][1] == pytest.approx(20 / 30)  # g2 stands for c1's 20 samples, stale has 10
    assert depth[dag] == depth[g2] + 1
    assert {c0, c1} <= set(G.effective_ancestors(store.graph(), dag))
    with pytest.raises(ValueError, match="weights"):
        rec.aggregate(3, model(), parents=[g1, g2], weights=[1.0], name="fl/bad")


def test_aggregate_without_clients_is_an_error(store):
    rec = FederatedRecorder(store, MLP)
    rec.initial(model())
    with pytest.raises(ValueError, match="no recorded clients"):
        rec.aggregate(1, model())


def test_server_finetune_becomes_the_global(store, labels_of):
    rec = FederatedRecorder(store, MLP)
    with store.batch():
        rec.initial(model())
        rec.client(1, 0, model(), shard(store, labels_of, 1))
        g = rec.aggregate(1, model()).name
        s = rec.server(1, model(), shard(store, labels_of, 1, offset=5)).name
        c = rec.client(2, 0, model(), shard(store, labels_of, 1)).name
    assert parents(store, s) == {g: ("finetune", None)} and parents(store, c) == {s: ("finetune", None)}


# ------------------------------------------------------------------ data parallel
def test_data_parallel_shards_and_sync_points(store, labels_of):
    rec = DataParallelRecorder(store, MLP)
    with store.batch():
        init = rec.initial(model()).name
        for step in (1, 2):
            ranks = [rec.shard(step, r, model(), shard(store, labels_of, n)).name for r, n in enumerate([1, 3])]
            sync = rec.sync(step, model()).name
            assert parents(store, sync) == {ranks[0]: ("sync", 0.25), ranks[1]: ("sync", 0.75)}
            prev = init if step == 1 else "ddp/s1/sync"
            assert all(parents(store, r) == {prev: ("finetune", None)} for r in ranks)
    assert {n.framework for n in store.nodes()} == {"ddp"}
    assert sync == "ddp/s2/sync" and store.node("ddp/s2/rank1").meta == {"round": 2, "rank": 1}


# ------------------------------------------------------------------ incremental
def test_incremental_heads_grow_with_classes_and_arch_per_node(store, labels_of):
    rec = IncrementalRecorder(store, MLP)
    steps = [(0, 1, 2, 3, 4), (5, 6), (7, 8, 9)]
    seen: tuple[int, ...] = ()
    prev = None
    with store.batch():
        for new in steps:
            classes = tuple(sorted(seen + new))
            m = fresh_model(rec.arch_for(classes), 0)
            if prev is not None:
                inherit_weights(m, prev, seen, classes)
            rec.step(m, classes, shard(store, labels_of, 2, labels=new + seen[:1]))
            prev, seen = m, classes
    names = ["il/step0", "il/step1", "il/step2"]
    infos = [store.node(n) for n in names]
    assert [i.classes for i in infos] == [(0, 1, 2, 3, 4), tuple(range(7)), tuple(range(10))]
    assert [i.arch["kwargs"]["num_classes"] for i in infos] == [5, 7, 10]
    assert [i.meta["new_classes"] for i in infos] == [[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]]
    assert parents(store, names[1]) == {names[0]: ("increment", None)}
    assert parents(store, names[2]) == {names[1]: ("increment", None)}
    assert {i.framework for i in infos} == {"il"}
    assert [store.fim(n).classes for n in names] == [i.classes for i in infos]
    with pytest.raises(ValueError, match="drops class"):
        rec.step(fresh_model(rec.arch_for((0, 1)), 0), (0, 1), shard(store, labels_of, 1, labels=(0, 1)))
    # FIUn aligns rows by label id across the 5/7/10-way heads
    result = store.unlearn([2], evaluate=False)
    assert [n.name for n in result.nodes] == names and result.plan.discovery == [names[0]]


def test_inherit_weights_copies_body_and_rows_by_label(store):
    parent = fresh_model(ArchSpec(MLP.spec, {"num_classes": 3, "hidden": 16}), 1)
    child = fresh_model(ArchSpec(MLP.spec, {"num_classes": 4, "hidden": 16}), 2)
    fresh_row = child.fc.weight[0].detach().clone()
    inherit_weights(child, parent, (4, 7, 9), (2, 4, 7, 9))
    assert torch.equal(child.features[1].weight, parent.features[1].weight)
    assert torch.equal(child.fc.weight[1:], parent.fc.weight) and torch.equal(child.fc.bias[1:], parent.fc.bias)
    assert torch.equal(child.fc.weight[0], fresh_row)  # label 2 is new: its row keeps the fresh init


# ------------------------------------------------------------------ transfer
def test_transfer_base_and_heads(store, labels_of):
    rec = TransferRecorder(store, MLP)
    head_recipe = Recipe(optimizer="adam", lr=0.01, epochs=1, batch_size=32, seed=3, train_only="fc")
    with store.batch():
        base = fresh_model(rec.arch_for(range(5)), 0)
        b = rec.base(base, shard(store, labels_of, 2, labels=range(5)), classes=range(5), recipe=TINY).name
        h = fresh_model(rec.arch_for(range(8)), 1)
        inherit_weights(h, base, range(5), range(8))
        h0 = rec.head(h, shard(store, labels_of, 2, labels=range(8)), classes=range(8), recipe=head_recipe).name
        side = fresh_model(rec.arch_for((5, 6, 7, 8, 9)), 2)
        inherit_weights(side, base, range(5), (5, 6, 7, 8, 9))
        s = rec.head(side, shard(store, labels_of, 2, labels=range(5, 10)), classes=(5, 6, 7, 8, 9),
                     recipe=head_recipe, name="tl/task59").name
    assert (b, h0) == ("tl/base", "tl/head0")
    assert parents(store, h0) == {b: ("transfer", None)} and parents(store, s) == {b: ("transfer", None)}
    assert store.node(h0).meta["trained"] == "fc" and store.node(h0).recipe["train_only"] == "fc"
    assert [store.node(n).arch["kwargs"]["num_classes"] for n in (b, h0, s)] == [5, 8, 5]
    assert store.node(s).classes == (5, 6, 7, 8, 9)
    body = {k: v for k, v in store.state_dict(b).items() if not k.startswith("fc.")}
    assert all(torch.equal(v, store.state_dict(h0)[k]) for k, v in body.items())
    result = store.unlearn([3], evaluate=False)
    assert set(result.plan.affected) == {b, h0, s}
    assert torch.equal(store.state_dict(s)["fc.weight"], store.state_dict(s, 0)["fc.weight"])  # no row for 3


# ------------------------------------------------------------------ device and compat
def test_fisher_pass_runs_on_the_models_device(store, labels_of, monkeypatch):
    from umig import ingest

    seen = []
    orig = ingest.add_node

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device"))
        return orig(*args, **kwargs)

    monkeypatch.setattr(ingest, "add_node", spy)
    rec = FederatedRecorder(store, MLP)
    m = model()
    rec.initial(m)
    rec.client(1, 0, m, shard(store, labels_of, 1))
    assert seen == [model_device(m), model_device(m)] == [torch.device("cpu")] * 2
    assert FederatedRecorder(store, MLP, device="cpu").device == "cpu"


def test_subset_ref_is_content_addressed(store):
    a = subset_ref(store, TRAIN, [3, 1, 2])
    b = subset_ref(store, TRAIN, np.array([3, 1, 2]))
    assert a.ref == b.ref and len(a) == 3
    assert len(list((store.root / "subsets").glob("*.npy"))) == 1
    assert subset_ref(store, TRAIN, range(50), only_labels=[0]).labels() == {0}


# ------------------------------------------------------------------ retraining reference
def test_retrain_reference_follows_the_lineage(store, labels_of):
    rec = FederatedRecorder(store, MLP, recipe=TINY)
    with store.batch():
        g = fresh_model(MLP, 0)
        rec.initial(g)
        states, names = [], []
        for c in range(2):
            m = fresh_model(MLP, 0)
            m.load_state_dict(g.state_dict())
            names.append(rec.client(1, c, m, shard(store, labels_of, 3, offset=3 * c)).name)
            states.append(m.state_dict())
        agg = fresh_model(MLP, 0)
        agg.load_state_dict(fedavg(states, rec.weights(names)))
        glob = rec.aggregate(1, agg).name
    ref = retrain_reference(store, [4])
    assert ref.nodes == [*names, glob]
    expect = fedavg([ref.states[n] for n in names], [0.5, 0.5])
    assert all(torch.allclose(ref.states[glob][k], v) for k, v in expect.items())
    assert ref.cumulative(glob) == pytest.approx(sum(ref.seconds.values()))
    assert ref.cumulative(names[0]) == pytest.approx(ref.seconds[names[0]])
    again = retrain_reference(store, [4])
    assert all(torch.equal(again.states[glob][k], v) for k, v in ref.states[glob].items())  # deterministic
    metrics = evaluate_models(store, {glob: ref.states[glob]}, [4], heldout="sklearn:digits?split=test")
    assert set(metrics[glob]) == {"AD_f_train", "AD_r_train", "AD_f_heldout", "AD_r_heldout"}


# ------------------------------------------------------------------ FIM captured during training
@pytest.mark.parametrize("flush", [1 << 20, 500])  # summed once at the end / every few batches
def test_fisher_capture_matches_the_closed_form_pass(store, labels_of, monkeypatch, flush):
    from umig.fisher import head_fisher
    from umig.lineage import FisherCapture

    monkeypatch.setattr(FisherCapture, "FLUSH_ELEMENTS", flush)
    data = shard(store, labels_of, 4)
    m = model()
    m.eval()
    with FisherCapture(m, range(10), per_label=True) as cap, torch.no_grad():
        for x, _ in cap.wrap(data.batches(16)):
            m(x)
    got = cap.fim()
    ref = head_fisher(m, "fc", data.batches(64), range(10), per_label=True)
    assert got.samples == ref.samples == 40
    assert cap.head == "fc" and cap.seconds > 0
    for a, b in ((got.weight, ref.weight), (got.bias, ref.bias), (got.label_weight, ref.label_weight),
                 (got.label_bias, ref.label_bias)):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
    assert torch.equal(got.label_counts, ref.label_counts)


def _fim_passes(monkeypatch) -> list:
    """Every FIM pass over data the store runs from here on (``umig.fisher.head_fisher``, as ingest calls it)."""
    from umig import fisher

    calls, real = [], fisher.head_fisher

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(fisher, "head_fisher", counting)
    return calls


def test_recording_a_model_fit_trained_runs_no_fim_pass(store, labels_of, monkeypatch):
    from umig.fisher import kept_fim
    from umig.lineage import fit

    passes = _fim_passes(monkeypatch)
    data = shard(store, labels_of, 3)
    rec = FederatedRecorder(store, MLP, recipe=TINY)
    rec.initial(model())
    m = model()
    fit(m, data, TINY, range(10))
    kept = kept_fim(m)
    assert kept is not None and kept.head == "fc" and kept.fim.samples == len(data) and kept.fim.has_label_stats
    name = rec.client(1, 0, m, data).name
    assert passes == []  # the default: the FIM fit captured from the last epoch
    stored = store.fim(name)
    assert torch.equal(stored.weight, kept.fim.weight) and torch.equal(stored.label_weight, kept.fim.label_weight)
    assert rec.capture_seconds == kept.seconds > 0
    # The same data named by its reference string (another Data object, same fingerprint) is the same data.
    m = model()
    fit(m, data, TINY, range(10))
    rec.client(1, 1, m, str(data.ref))
    assert passes == []

    # The opt-out runs the pass: the exact FIM of the final weights.
    exact = FederatedRecorder(store, MLP, recipe=TINY, exact_fim=True)
    exact.global_node = rec.global_node
    m = model()
    fit(m, data, TINY, range(10))
    name = exact.client(1, 2, m, data).name
    assert len(passes) == 1
    assert not torch.equal(store.fim(name).weight, kept_fim(m).fim.weight)
    m = model()
    fit(m, data, TINY, range(10))
    store.add_node("direct/exact", m, MLP, data=data, exact_fim=True)
    assert len(passes) == 2


@pytest.mark.parametrize("change", ["load_state_dict", "data_write", "other_data", "deepcopy", "no_capture",
                                    "not_fit"])
def test_a_captured_fim_is_used_only_for_the_weights_and_data_it_was_taken_on(store, labels_of, monkeypatch, change):
    import copy

    from umig.lineage import fit
    from umig.train import train

    passes = _fim_passes(monkeypatch)
    data = shard(store, labels_of, 3)
    m = model()
    if change == "not_fit":  # a model trained by another loop than fit's: nothing was captured
        train(m, lambda epoch: data.batches(32), TINY, range(10))
    else:
        fit(m, data, TINY, range(10), capture=change != "no_capture")
    if change == "load_state_dict":
        m.load_state_dict(model(seed=1).state_dict())
    elif change == "data_write":  # bypasses the version counter; the weights' sums still see it
        m.fc.weight.data.add_(1e-3)
    elif change == "deepcopy":
        m = copy.deepcopy(m)
    other = shard(store, labels_of, 3, offset=3) if change == "other_data" else data
    store.add_node("n", m, MLP, data=other)
    assert len(passes) == 1


def test_a_capture_whose_logits_change_in_place_is_refused_and_recording_runs_the_pass(store, labels_of, monkeypatch):
    """The capture holds each batch's head inputs and logits without copying them; a forward pass that
    changes them in place afterwards spoils it: fim() says so, fit keeps no FIM, recording runs the pass."""
    from umig.fisher import FisherCapture, FisherDataError, _held, kept_fim
    from umig.lineage import fit

    class Scaled(torch.nn.Module):  # logits doubled in place after the head ran
        def __init__(self):
            super().__init__()
            self.inner = model()

        def forward(self, x):
            return self.inner(x).mul_(2.0)

    passes = _fim_passes(monkeypatch)
    data = shard(store, labels_of, 3)
    m = Scaled()
    with FisherCapture(m, range(10)) as cap, torch.no_grad():
        for x, _ in cap.wrap(data.batches(16)):
            m(x)
    with pytest.raises(FisherDataError, match="changed in place"):
        cap.fim()
    m = Scaled()
    fit(m, data, TINY, range(10))  # trains to the end all the same
    assert kept_fim(m) is None
    store.add_node("scaled", m.inner, MLP, data=data)
    assert len(passes) == 1
    # A view into a larger tensor is copied (not to hold the whole batch); a tensor of its own is not.
    big = torch.randn(8, 5, 4)
    assert _held(big[:, 0]).data_ptr() != big.data_ptr()
    own = torch.randn(8, 4)
    assert _held(own).data_ptr() == own.data_ptr()


def test_recorder_stores_a_captured_fim(store, labels_of):
    from umig.errors import UmigError
    from umig.lineage import FisherCapture, fit

    data = shard(store, labels_of, 3)
    m = model()
    cap = FisherCapture(m, range(10), **store.fisher_settings())
    fit(m, data, TINY, range(10), capture=cap)
    fim = cap.fim()
    assert fim.samples == len(data)  # the last (here: only) epoch, every sample once
    rec = FederatedRecorder(store, MLP, recipe=TINY)
    rec.initial(model())
    name = rec.client(1, 0, m, data, fim=fim).name
    assert torch.equal(store.fim(name).weight, fim.weight)
    assert len(m.fc._forward_hooks) == 0  # fim() removed the hook
    other = FisherCapture(m, range(10), kind="true")
    fit(m, data, TINY, range(10), capture=other)
    with pytest.raises(UmigError, match="true"):
        rec.client(1, 1, m, data, fim=other.fim())
