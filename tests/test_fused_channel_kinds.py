"""FUSED and influential-channel fine-tuning on sample and client forget sets (issue 11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from umig.api import Store
from umig.data import DataRef, digits_client_split, from_tensors, resolve, source_positions
from umig.demo import DEFAULT_ARCH, train_client
from umig.errors import UnlearningError
from umig.forget import ForgetSet, samples
from umig.lineage import FederatedRecorder, subset_ref
from umig.train import Recipe, fedavg
from umig import unlearner as U
from umig.unlearners.channel import perturbation
from umig.unlearners.fused import overwrite_term

TRAIN = "sklearn:digits?split=train"
# Small settings: the tests check what runs and what changes, not how well it converges.
FAST = {"fused": {"rounds": 2, "local_epochs": 1}, "channel": {"epochs": 2}}
RECIPE = Recipe(optimizer="adam", lr=0.01, epochs=3, batch_size=64, seed=0)


def snapshot(store: Store) -> dict[str, dict[str, torch.Tensor]]:
    return {n.name: store.state_dict(n.name) for n in store.nodes()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


def assert_reverts_bit_for_bit(store: Store, operation: str, before: dict) -> None:
    store.revert(operation)
    after = snapshot(store)
    assert set(after) == set(before)
    for n, state in after.items():
        assert set(state) == set(before[n]), n
        for k, v in state.items():
            assert v.dtype == before[n][k].dtype and torch.equal(v, before[n][k]), f"{n}:{k}"


def c0_forget_indices(store: Store) -> np.ndarray:
    """60 indices of the digits train split that lie in fl/r1/c0's (and fl/r2/c0's) own data."""
    pos = source_positions(DataRef.from_json(store.node("fl/r1/c0").data_ref))[1]
    return np.sort(pos[::7][:60])


def accuracy(store: Store, node: str, x: torch.Tensor, y: torch.Tensor) -> float:
    model = store.load_model(node)
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ----------------------------------------------------------------- kinds
def test_fused_and_channel_serve_every_kind():
    for name in ("fused", "channel"):
        assert U.get(name).kinds == frozenset({"labels", "samples", "client"})


# ---------------------------------------------------------------- client
@pytest.mark.parametrize("method", ["fused", "channel"])
def test_client_forget_set_changes_affected_nodes_and_reverts(fl_store, method):
    before = snapshot(fl_store)
    res = fl_store.unlearn(clients=["fl/r1/c1"], method=method, params=FAST[method], evaluate=False)
    affected = {n.name for n in res.nodes}
    assert affected == {"fl/r1/c1", "fl/r1/global", "fl/r2/c0", "fl/r2/c1", "fl/r2/c2", "fl/r2/global"}
    after = snapshot(fl_store)
    for n in before:
        assert changed(after[n], before[n]) == (n in affected), n
        if n in affected:  # base + sparse delta, not new full weights
            assert fl_store.version(n).delta_blob is not None, n
    m = {n.name: n.metrics for n in res.nodes}
    # The forgotten client's own models keep no data: they train on the rest of their round.
    for n in ("fl/r1/c1", "fl/r2/c1"):
        assert m[n]["retain_from"] == "peers" and m[n]["forget_from"] == "own data", n
    for n in ("fl/r1/global", "fl/r2/global"):
        assert m[n]["retain_from"] == "clients" and m[n]["forget_from"] == "clients", n
    assert m["fl/r2/c0"]["retain_from"] == "own data" and m["fl/r2/c0"]["forget_from"] == "ancestors"
    if method == "fused":
        # The forgotten client left no retain data: the aggregates train over the two others only.
        assert m["fl/r1/global"]["clients"] == m["fl/r2/global"]["clients"] == 2
    assert_reverts_bit_for_bit(fl_store, res.operation, before)


def test_a_fully_forgotten_node_without_peers_is_still_refused(fl_store):
    # A fine-tuned leaf trained only on fl/r1/c1's data: it feeds no aggregate, so it has no peers.
    fl_store.add_node("fl/c1-only", fl_store.state_dict("fl/r2/global"), DEFAULT_ARCH, parents=["fl/r2/global"],
                      data=fl_store.node_data("fl/r1/c1"), compute_fim=False, recipe={"epochs": 1})
    before = snapshot(fl_store)
    for method in ("fused", "channel"):
        with pytest.raises(UnlearningError, match=r"fl/c1-only.*no retain data"):
            fl_store.unlearn(clients=["fl/r1/c1"], method=method, evaluate=False)
    assert not any(changed(snapshot(fl_store)[n], before[n]) for n in before)


# --------------------------------------------------------------- samples
@pytest.mark.parametrize("method", ["fused", "channel"])
def test_sample_forget_set_changes_affected_nodes_and_reverts(fl_store, method):
    idx = c0_forget_indices(fl_store)
    fs = ForgetSet(samples=(samples(idx, TRAIN),))
    before = snapshot(fl_store)
    forgotten = resolve(TRAIN).select(torch.as_tensor(idx))
    x, y = forgotten.dataset.tensors[0], forgotten.targets
    acc_before = accuracy(fl_store, "fl/r1/c0", x, y)
    res = fl_store.unlearn(fs, method=method, params=FAST[method], evaluate=False)
    affected = {n.name for n in res.nodes}
    assert res.plan.discovery == ["fl/r1/c0"]
    assert {"fl/r1/c0", "fl/r1/global", "fl/r2/c0", "fl/r2/global"} <= affected
    assert "fl/r1/c1" not in affected and "fl/init" not in affected
    after = snapshot(fl_store)
    for n in before:
        assert changed(after[n], before[n]) == (n in affected), n
    m = {n.name: n.metrics for n in res.nodes}
    assert m["fl/r1/c0"]["forget_from"] == "own data" and m["fl/r2/c1"]["forget_from"] == "ancestors"
    if method == "channel":
        assert m["fl/r1/c0"]["ablation_batch"] == 60  # the ablation batch is the forgotten samples
    else:
        # The overwrite term on the samples' own labels: fl/r1/c0 stops predicting them as it did.
        assert accuracy(fl_store, "fl/r1/c0", x, y) < acc_before
    assert_reverts_bit_for_bit(fl_store, res.operation, before)


# -------------------------------------------------------- label flipping
def flipped_store(root: Path) -> tuple[Store, torch.Tensor, torch.Tensor]:
    """One FedAvg round of 3 digits clients; client 1 trains on its shard with every label flipped to
    ``(y + 1) % 10``. Returns the store and client 1's inputs with their true labels."""
    store = Store.init(root)
    torch.manual_seed(0)
    shards = [subset_ref(store, TRAIN, idx) for idx in digits_client_split(3, split="train", seed=0)]
    x, y = (torch.cat(t) for t in zip(*shards[1].batches(4096)))
    save_file({"x": x.contiguous(), "y": (y + 1) % 10}, str(root / "flipped.safetensors"))
    shards[1] = resolve(str(root / "flipped.safetensors"))
    rec = FederatedRecorder(store, DEFAULT_ARCH, prefix="fl", recipe=RECIPE, compute_fim=False)
    with store.batch():
        glob = DEFAULT_ARCH.build()
        rec.initial(glob)
        states = []
        for c, data in enumerate(shards):
            model = DEFAULT_ARCH.build()
            model.load_state_dict(glob.state_dict())
            recipe = Recipe(**{**RECIPE.to_json(), "seed": RECIPE.seed + 100 + c})
            train_client(model, data, recipe)
            rec.client(1, c, model, data, recipe=recipe)
            states.append(model.state_dict())
        glob.load_state_dict(fedavg(states, [len(d) for d in shards]))
        rec.aggregate(1, glob)
    return store, x, y


def test_label_flipping_client_is_forgotten(tmp_path):
    store, x, y = flipped_store(tmp_path / "store")
    flipped = (y + 1) % 10
    before = snapshot(store)
    c1, glob = "fl/r1/c1", "fl/r1/global"
    assert accuracy(store, c1, x, flipped) > 0.8  # the poisoned client learned its flipped labels
    g_flip, g_true = accuracy(store, glob, x, flipped), accuracy(store, glob, x, y)
    c1_flip = {}
    for method, params in [("fused", {}), ("fused", {"objective": "paper"}), ("channel", {})]:
        res = store.unlearn(clients=[c1], method=method, params=params, evaluate=False)
        assert {n.name for n in res.nodes} == {c1, glob}
        # The aggregate stops predicting the flipped labels on the client's inputs and recovers the true ones.
        assert accuracy(store, glob, x, flipped) < min(0.05, g_flip), (method, params)
        assert accuracy(store, glob, x, y) > g_true, (method, params)
        c1_flip[(method, params.get("objective"))] = accuracy(store, c1, x, flipped)
        assert_reverts_bit_for_bit(store, res.operation, before)
    # The client's own model: overwriting its flipped labels forgets them better than retain data alone.
    assert c1_flip[("fused", None)] < c1_flip[("fused", "paper")] < 0.8
    assert c1_flip[("channel", None)] < 0.8
    store.close()


# ------------------------------------------------------------- the parts
def test_overwrite_term_is_minus_log_one_minus_p_of_own_and_forgotten_labels():
    torch.manual_seed(0)
    z = torch.randn(6, 4)
    p = z.softmax(1)
    rows = torch.tensor([0, 1, 2, 3, 1, -1])  # -1: a label the head lacks
    none = torch.zeros(4, dtype=torch.bool)
    own = torch.cat([p[torch.arange(5), rows[:5]], torch.zeros(1)])
    assert float(overwrite_term(z, rows, none)) == pytest.approx(float(-torch.log1p(-own).mean()), rel=1e-5)
    two = none.clone()
    two[2] = True  # a forgotten label too: counted once where it is also the item's own label
    pf = p[:, 2] + torch.where(rows == 2, 0.0, own)
    assert float(overwrite_term(z, rows, two)) == pytest.approx(float(-torch.log1p(-pf).mean()), rel=1e-5)


def test_perturbation_never_teaches_an_items_own_label_and_keeps_the_label_draw():
    g = torch.Generator().manual_seed(1)
    data = from_tensors(torch.randn(500, 1, 8, 8, generator=g), torch.randint(0, 10, (500,), generator=g))
    out = perturbation(data, tuple(range(10)), (), seed=3)
    assert len(out) == 500 and not bool((out.targets == data.targets).any())
    assert set(out.targets.tolist()) == set(range(10))
    # Forgotten labels: a random retained label, drawn exactly as before samples existed.
    only3 = data.filter_labels(keep=[3])
    keep = torch.tensor([c for c in range(10) if c != 3])
    expect = keep[torch.randint(len(keep), (len(only3),), generator=torch.Generator().manual_seed(3))]
    assert torch.equal(perturbation(only3, tuple(range(10)), (3,), seed=3).targets, expect)
    # Mixed forget sets: neither a forgotten label nor the item's own.
    mixed = perturbation(data, tuple(range(10)), (3, 4), seed=3).targets
    assert not bool(torch.isin(mixed, torch.tensor([3, 4])).any()) and not bool((mixed == data.targets).any())
