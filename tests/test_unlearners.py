"""Per-node unlearners on the real FL lineage fixture: FUSED, influential channels, the baselines."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import store_state
from umig.demo import DEFAULT_ARCH
from umig.errors import UmigError, UnlearningError
from umig.models import digits_cnn
from umig.train import fedavg
from umig import unlearner as U
from umig.unlearners.channel import ablation_effects, channel_index, select_channels
from umig.unlearners.fused import layer_l1, layers, masks, rank_layers

HELDOUT = "sklearn:digits?split=test"
ARCH = DEFAULT_ARCH
R1 = ["fl/r1/c0", "fl/r1/c1", "fl/r1/c2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models on 2 busy cores: intra-op threading only adds overhead.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def snapshot(store, names=None):
    names = names or [n.name for n in store.nodes()]
    return {n: store.state_dict(n) for n in names}


def assert_same(a, b):
    assert set(a) == set(b)
    for n in a:
        assert set(a[n]) == set(b[n]), n
        for k in a[n]:
            assert a[n][k].dtype == b[n][k].dtype and torch.equal(a[n][k], b[n][k]), f"{n}:{k}"


def assert_forgotten(result, max_f=0.05, max_drop=0.05):
    for node in result.nodes:
        m = node.metrics
        for split in ("train", "heldout"):
            assert m[f"AD_f_{split}_after"] <= max_f, (node.name, split, m[f"AD_f_{split}_after"])
            drop = m[f"AD_r_{split}_before"] - m[f"AD_r_{split}_after"]
            assert drop <= max_drop, (node.name, split, drop)


# ------------------------------------------------------------------- FUSED
def test_fused_forgets_with_adapter_blob_and_reverts_bit_exact(fl_store):
    before = snapshot(fl_store)
    versions = {n: fl_store.version(n) for n in before}
    res = fl_store.unlearn([3], method="fused", params={"rounds": 3}, from_nodes=["fl/r2/c0"], eval_data=HELDOUT)
    assert [n.name for n in res.nodes] == ["fl/r2/c0", "fl/r2/global"]
    assert_forgotten(res)
    for node in res.nodes:
        m, old, new = node.metrics, versions[node.name], fl_store.version(node.name)
        # "base + adapter": the base blobs are shared with the previous version, the adapter is its own blob.
        assert (new.body_blob, new.head_blob) == (old.body_blob, old.head_blob) and old.delta_blob is None and new.delta_blob
        assert m["critical_layers"] == [name for name, _ in m["layer_ranking"][:2]]
        assert len(m["layer_ranking"]) == 4  # digits_cnn: 2 convs, 1 hidden linear, the head (BN excluded)
        assert 0 < m["adapter_nonzero"] <= m["adapter_params"] < 0.05 * m["params_total"] + 4
        if node.name == "fl/r2/global":  # adapters travel between the server and its 3 clients
            assert 0 < m["comm_params"] < m["comm_params_full"] / 10
        else:  # a client trains its adapter on its own data: nothing is communicated
            assert m["comm_params"] == m["comm_params_full"] == 0
    assert res.nodes[1].metrics["clients"] == 3 and res.nodes[1].metrics["cli_from"] == "parents"

    # Only masked entries of the critical layers changed; BatchNorm statistics and everything else did not.
    g = "fl/r2/global"
    after = fl_store.state_dict(g)
    crit = res.nodes[1].metrics["critical_layers"]
    delta = fl_store.blobs.load(fl_store.version(g).delta_blob)
    for k, v in after.items():
        if not any(k.startswith(c + ".") for c in crit):
            assert torch.equal(v, before[g][k]), k
    for key, idx in delta.items():
        if key.endswith("::idx"):
            p = key[:-5]
            changed = (after[p] != before[g][p]).reshape(-1).nonzero().reshape(-1)
            assert set(changed.tolist()) <= set(idx.tolist())
            assert idx.numel() <= round(0.05 * after[p].numel()) + 1

    # Exported weights are base + adapter.
    path = fl_store.export(g, fl_store.root / "g.safetensors")
    from safetensors.torch import load_file

    assert all(torch.equal(t, after[k]) for k, t in load_file(str(path)).items())

    fl_store.revert(res.operation)
    assert_same(snapshot(fl_store), before)


def test_fused_paper_objective_and_local_round_for_root(fl_store):
    # A root node with data (no parents): CLI runs one local round on its retain data.
    fl_store.add_node("solo", fl_store.state_dict("fl/r2/global"), ARCH,
                      data=fl_store.node_data("fl/r1/c0"), recipe={"epochs": 1}, compute_fim=False)
    res = fl_store.unlearn([3], method="fused", from_nodes=["solo"], evaluate=False,
                           params={"objective": "paper", "rounds": 1, "local_epochs": 1})
    m = res.nodes[0].metrics
    assert res.nodes[0].name == "solo" and m["cli_from"] == "local round" and m["clients"] == 1
    assert fl_store.version("solo").delta_blob


def test_fused_merge_stores_full_weights_that_purge_can_drop(fl_store):
    params = {"rounds": 1, "local_epochs": 1}
    g = "fl/r2/global"
    base = fl_store.state_dict(g)
    res = fl_store.unlearn([3], method="fused", params={**params, "merge": True}, from_nodes=[g], evaluate=False)
    m = res.nodes[0].metrics
    assert m["stored_as"] == "merged" and fl_store.version(g).delta_blob is None
    merged = fl_store.state_dict(g)
    changed = sum(int((merged[k] != base[k]).sum()) for k in base)
    assert 0 < changed <= m["adapter_nonzero"]  # only the adapter's entries, merged into the weights
    assert fl_store.purge(res.operation)["blobs_deleted"] >= 1  # the original weights are gone
    # An adapter operation keeps its base: purging it frees nothing (the knowledge is only masked).
    res = fl_store.unlearn([3], method="fused", params=params, from_nodes=[g], evaluate=False)
    assert res.nodes[0].metrics["stored_as"] == "delta"
    assert fl_store.purge(res.operation)["blobs_deleted"] == 0


def test_critical_layer_ranking_and_masks():
    model = digits_cnn()
    lays = layers(model)
    assert [n for n, _ in lays] == ["features.0", "features.3", "features.8", "fc"]
    own = {k: v.clone() for k, v in model.state_dict().items()}
    parent = {k: v.clone() for k, v in own.items()}
    parent["fc.bias"] += 100.0  # the head moved most (Eq. 12: summed |difference|)
    parent["features.0.weight"] += 1.0  # 144 entries -> 144
    diff = layer_l1(parent, own, lays)
    assert diff[3] == pytest.approx(1000.0) and diff[0] == pytest.approx(144.0) and diff[1] == diff[2] == 0
    assert rank_layers(lays, diff) == [3, 0, 2, 1]  # ties: later layers first
    named = dict(model.named_parameters())
    m1 = masks(named, ["features.8.weight"], 0.05, seed=7)
    m2 = masks(named, ["features.8.weight"], 0.05, seed=7)
    assert torch.equal(m1["features.8.weight"], m2["features.8.weight"])  # seeded
    assert m1["features.8.weight"].numel() == round(0.05 * named["features.8.weight"].numel())


# ----------------------------------------------------------------- channel
class _Known(nn.Module):
    """Hidden unit 1 carries all the evidence for label 0; a conv shortcut added in place."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1, bias=False)
        self.short = nn.Conv2d(1, 3, 1, bias=False)
        self.hidden = nn.Linear(3, 3)
        self.fc = nn.Linear(3, 2)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.short.weight.copy_(torch.tensor([0.0, 1.0, 0.0]).view(3, 1, 1, 1))
            self.hidden.weight.copy_(torch.eye(3))
            self.hidden.bias.zero_()
            self.fc.weight.copy_(torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))
            self.fc.bias.copy_(torch.tensor([0.0, 1.0]))

    def forward(self, x):
        out = self.conv(x)
        out += self.short(x)  # in place: the ablation must batch from an enclosing module
        return self.fc(torch.relu(self.hidden(out.mean((2, 3)))))


def test_channel_selection_picks_the_channel_that_carries_the_label():
    model = _Known().eval()
    x = torch.ones(8, 1, 2, 2)
    y = torch.zeros(8, dtype=torch.long)  # all label 0: predicted through hidden unit 1 only
    eff = ablation_effects(model, x, y, (0, 1), chunk=2)
    assert eff["hidden"][0].tolist() == [0.0, 1.0, 0.0]
    assert eff["short"][0].tolist() == [0.0, 1.0, 0.0]
    assert eff["fc"][0].tolist() == [1.0, 0.0]
    chosen = select_channels(eff, 0.3)
    assert chosen["hidden"].tolist() == [1] and chosen["short"].tolist() == [1] and chosen["fc"].tolist() == [0]
    # Ties in accuracy (conv: nothing changes) fall back to the loss increase, still one channel.
    assert chosen["conv"].numel() == 1
    idx = channel_index(model, {"hidden": torch.tensor([1])})
    assert idx["hidden.weight"].tolist() == [3, 4, 5] and idx["hidden.bias"].tolist() == [1]


def test_vectorised_ablation_matches_one_pass_per_channel():
    torch.manual_seed(0)
    model = digits_cnn().eval()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    eff = ablation_effects(model, x, y, tuple(range(10)), chunk=7)
    with torch.no_grad():
        z0 = model(x)
        acc0, loss0 = (z0.argmax(1) == y).float().mean(), nn.functional.cross_entropy(z0, y)
        for name in ("features.3", "features.8"):
            mod = dict(model.named_modules())[name]
            for c in range(mod.weight.shape[0]):
                w = mod.weight.detach().clone()
                b = mod.bias.detach().clone() if mod.bias is not None else None
                mod.weight[c] = 0
                if b is not None:
                    mod.bias[c] = 0
                z = model(x)
                mod.weight.copy_(w)
                if b is not None:
                    mod.bias.copy_(b)
                assert float(eff[name][0][c]) == pytest.approx(float(acc0 - (z.argmax(1) == y).float().mean()))
                assert float(eff[name][1][c]) == pytest.approx(float(nn.functional.cross_entropy(z, y) - loss0),
                                                               abs=1e-5)


def test_channel_forgets_and_changes_only_selected_channels(fl_store):
    before = snapshot(fl_store)
    res = fl_store.unlearn([3], method="channel", from_nodes=["fl/r2/c0"], eval_data=HELDOUT,
                           params={"epochs": 3})
    assert_forgotten(res)
    for node in res.nodes:
        m = node.metrics
        after = fl_store.state_dict(node.name)
        sel = m["channels_selected"]
        assert sel["fc"] == [3]  # the forgotten label's own logit is the most influential head channel
        assert set(sel) == {"features.0", "features.3", "features.8", "fc"}
        for k, v in after.items():
            layer, _, _ = k.rpartition(".")
            diff = (v != before[node.name][k]).reshape(v.shape[0], -1).any(1) if v.dim() else v != before[node.name][k]
            rows = set(diff.nonzero().reshape(-1).tolist()) if v.dim() else set()
            assert rows <= set(sel.get(layer, [])), k  # BN statistics, other rows: untouched
        assert m["comm_params"] == 0 and m["train_samples"] <= 2 * 1600
    fl_store.revert(res.operation)
    assert_same(snapshot(fl_store), before)


def test_channel_decentralized_fedavg_over_clients(fl_store):
    res = fl_store.unlearn([3], method="channel", from_nodes=["fl/r2/global"], eval_data=HELDOUT,
                           params={"variant": "decentralized", "rounds": 2, "epochs": 2})
    m = res.nodes[0].metrics
    assert m["variant"] == "decentralized" and m["comm_params"] == 2 * m["trainable_params"] * 3 * 2
    assert_forgotten(res)


def test_inherited_node_without_the_label_uses_its_ancestors_forget_samples(fl_store):
    # A fine-tuned child of the last global model whose own data never held label 3.
    no3 = fl_store.node_data("fl/r2/c0").filter_labels(drop=[3])
    fl_store.add_node("fl/no3", fl_store.state_dict("fl/r2/global"), ARCH, parents=["fl/r2/global"], data=no3,
                      compute_fim=False, recipe={"epochs": 1})
    res = fl_store.unlearn([3], method="channel", eval_data=HELDOUT, params={"epochs": 2})
    m = {n.name: n.metrics for n in res.nodes}
    assert m["fl/no3"]["forget_from"] == "ancestors" and m["fl/r2/c0"]["forget_from"] == "own data"
    assert m["fl/r2/global"]["forget_from"] == "clients"
    assert m["fl/no3"]["AD_f_heldout_after"] <= 0.05


# ---------------------------------------------------------------- baselines
def test_retrain_along_the_lineage(fl_store):
    res = fl_store.unlearn([3], method="retrain", eval_data=HELDOUT)
    assert [n.name for n in res.nodes][:4] == R1 + ["fl/r1/global"]
    for node in res.nodes:
        assert node.metrics["AD_f_train_after"] == 0.0 and node.metrics["AD_f_heldout_after"] == 0.0
        # Retrained from scratch along the lineage: retained accuracy close to what training gave originally.
        assert node.metrics["AD_r_heldout_after"] > node.metrics["AD_r_heldout_before"] - 0.1
        assert fl_store.version(node.name).delta_blob is None
    # Aggregates re-aggregate their retrained clients (sequential generations see the new weights).
    for rnd in (1, 2):
        clients = [f"fl/r{rnd}/c{i}" for i in range(3)]
        # FedAvg weights re-scaled by the share of its data each client keeps without label 3.
        weights = [w * (1 - fl_store.node(p).label_counts.get(3, 0) / fl_store.node(p).data_size)
                   for p, _, w in fl_store.node(f"fl/r{rnd}/global").parents]
        expect = fedavg([fl_store.state_dict(c) for c in clients], weights)
        got = fl_store.state_dict(f"fl/r{rnd}/global")
        assert all(torch.equal(expect[k], got[k]) for k in got)
    phases = fl_store.plan_unlearning([3], method="retrain").phases
    assert len(phases) == 4 and phases[0]["nodes"] == R1


def test_retrain_method_matches_the_library_retraining_reference(fl_store):
    lineage = pytest.importorskip("umig.lineage")
    if not hasattr(lineage, "retrain_reference"):
        pytest.skip("umig.lineage.retrain_reference not available")
    ref = lineage.retrain_reference(fl_store, [3])
    fl_store.unlearn([3], method="retrain", evaluate=False)
    for n in ref.nodes:
        got = fl_store.state_dict(n)
        assert all(torch.equal(ref.states[n][k], v) for k, v in got.items()), n


def test_retrain_refuses_without_recipe_and_leaves_store_unchanged(fl_store):
    fl_store.add_node("fl/ft", fl_store.state_dict("fl/r2/global"), ARCH,
                      parents=["fl/r2/global"], data=fl_store.node_data("fl/r2/c0"), compute_fim=False)
    state = store_state(fl_store.root)
    with pytest.raises(UnlearningError, match=r"recipe.*fl/ft"):
        fl_store.unlearn([3], method="retrain")
    assert store_state(fl_store.root) == state


def test_missing_prerequisites_are_clear_errors_before_anything_runs(fl_store):
    # A node whose data holds only the label to forget has no retain data.
    only3 = fl_store.node_data("fl/r2/c0").filter_labels(keep=[3])
    fl_store.add_node("fl/only3", fl_store.state_dict("fl/r2/global"), ARCH,
                      parents=["fl/r2/global"], data=only3, compute_fim=False, recipe={"epochs": 1})
    state = store_state(fl_store.root)
    for method in ("fused", "channel", "finetune", "distill"):
        with pytest.raises(UnlearningError, match=r"fl/only3.*no retain data"):
            fl_store.unlearn([3], method=method)
    with pytest.raises(UnlearningError, match="unknown method 'nope'"):
        fl_store.unlearn([3], method="nope")
    with pytest.raises(UmigError, match="no parameter bogus"):
        fl_store.unlearn([3], method="fused", params={"bogus": 1})
    with pytest.raises(UmigError, match="keep must be in"):
        fl_store.unlearn([3], method="fused", params={"keep": 0})
    with pytest.raises(UmigError, match="not a valid int"):
        fl_store.unlearn([3], method="channel", params={"samples": "many"})
    assert store_state(fl_store.root) == state


@pytest.mark.parametrize("method,params", [
    ("finetune", {"epochs": 1}),
    ("gradient-ascent", {"epochs": 5}),
    ("distill", {"epochs": 2}),
])
def test_baselines_update_full_weights(fl_store, method, params):
    before = snapshot(fl_store, ["fl/r2/global"])
    res = fl_store.unlearn([3], method=method, params=params, from_nodes=["fl/r2/global"])
    (node,) = res.nodes
    assert node.metrics["params_changed"] > 0 and fl_store.version("fl/r2/global").delta_blob is None
    if method == "gradient-ascent":
        assert node.metrics["AD_f_train_after"] < node.metrics["AD_f_train_before"]
    fl_store.revert(res.operation)
    assert_same(snapshot(fl_store, ["fl/r2/global"]), before)


def test_registry_lists_every_method_with_params():
    described = {d["name"]: d for d in U.describe()}
    for name in ("fiun", "fused", "channel", "retrain", "finetune", "gradient-ascent", "distill"):
        assert name in described and "error" not in described[name], name
    assert described["fused"]["params"]["k"]["default"] == 2
    assert described["fused"]["params"]["keep"]["default"] == 0.05
    assert described["channel"]["params"]["samples"]["default"] == 1600
    assert described["retrain"]["per_node"] and U.get("retrain").sequential


def test_builtin_methods_load_without_scanning_every_distribution_and_win_over_plugins(monkeypatch):
    from umig.unlearners.fiun import FIUn

    def no_scan(**_kw):
        raise AssertionError("scanned every installed distribution for a built-in method")

    monkeypatch.setattr(U, "_INSTALLED", None)
    monkeypatch.setattr(U, "entry_points", no_scan)
    assert isinstance(U.get("fiun"), FIUn)
    # A plugin that claims a built-in name neither replaces it nor hides it from the listing.
    monkeypatch.setattr(U, "_installed", lambda: {"fiun": "elsewhere:Impostor", "extra": "elsewhere:Extra"})
    listed = U.available()
    assert listed["fiun"] == "umig.unlearners.fiun:FIUn" and listed["extra"] == "elsewhere:Extra"
    assert isinstance(U.get("fiun"), FIUn)
    with pytest.raises(UnlearningError, match="'extra'.*cannot be loaded"):
        U.get("extra")


class _StateAndDelta(U.NodeUnlearner):
    """New full weights and a delta on top of them (test of the NodeUpdate plumbing)."""

    name = "test-state-and-delta"

    def unlearn_node(self, ctx):
        state = ctx.state_of(ctx.node.name)
        state["fc.bias"] = state["fc.bias"].clone()
        state["fc.bias"][3] -= 100.0
        return U.NodeUpdate(state=state, delta={"fc.bias": (torch.tensor([3]), torch.tensor([-1.0]))})


class _EmptyDelta(U.NodeUnlearner):
    name = "test-empty-delta"

    def unlearn_node(self, ctx):
        return U.NodeUpdate(delta={})


@pytest.fixture
def test_methods():
    U.register("test-state-and-delta", "test_unlearners:_StateAndDelta")
    U.register("test-empty-delta", "test_unlearners:_EmptyDelta")
    yield
    U.unregister("test-state-and-delta")
    U.unregister("test-empty-delta")


def test_node_update_with_state_and_delta_keeps_both(fl_store, test_methods):
    g = "fl/r2/global"
    before = fl_store.state_dict(g)
    fl_store.unlearn([3], method="test-state-and-delta", from_nodes=[g], evaluate=False)
    assert fl_store.version(g).delta_blob is not None
    assert torch.equal(fl_store.state_dict(g)["fc.bias"][3], before["fc.bias"][3] - 100.0 - 1.0)
    v = fl_store.version(g)
    fl_store.unlearn([3], method="test-empty-delta", from_nodes=[g], evaluate=False)
    w = fl_store.version(g)
    assert (w.body_blob, w.head_blob, w.delta_blob) == (v.body_blob, v.head_blob, v.delta_blob)



class _Diverges(U.NodeUnlearner):
    name = "test-diverges"

    def unlearn_node(self, ctx):
        state = ctx.state_of(ctx.node.name)
        return U.NodeUpdate(state={k: v * float("nan") if v.is_floating_point() else v for k, v in state.items()})


def test_non_finite_weights_fail_the_operation_and_change_nothing(fl_store):
    U.register("test-diverges", "test_unlearners:_Diverges")
    try:
        state = store_state(fl_store.root)
        with pytest.raises(UnlearningError, match="non-finite weights"):
            fl_store.unlearn([3], method="test-diverges", evaluate=False)
        assert store_state(fl_store.root) == state
    finally:
        U.unregister("test-diverges")
