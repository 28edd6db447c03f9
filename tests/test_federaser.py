"""The ``federaser`` method (history-based FL unlearning) on the real 3-client x 2-round FL digits lineage."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from conftest import store_state
from umig.api import Store
from umig.arch import ArchSpec
from umig.demo import DEFAULT_ARCH, heldout
from umig.errors import UnlearningError
from umig.train import Recipe, accuracy, fedavg
from umig.unlearners.federaser import calibrated_state, calibration_epochs

FORGOTTEN = "fl/r1/c1"
PARAMS = [n for n, _ in DEFAULT_ARCH.build().named_parameters()]


def states(store: Store) -> dict[str, dict[str, torch.Tensor]]:
    return {n.name: store.state_dict(n.name) for n in store.nodes()}


def copy_store(template: Path, root: Path) -> Store:
    shutil.copytree(template, root)
    return Store.open(root)


def global_accuracy(store: Store) -> float:
    return accuracy(store.load_model("fl/r2/global"), heldout().batches(512), store.node("fl/r2/global").classes)


def sample_epochs(res, store: Store, method: str) -> int:
    """Samples x epochs an operation trained: federaser reports its epochs, retrain runs each recipe in full."""
    total = 0
    for n in res.nodes:
        m = n.metrics
        if method == "federaser":
            epochs = m["epochs_run"]
        else:
            epochs = Recipe.from_json(store.node(n.name).recipe).epochs if m["trained"] else 0
        total += epochs * m["retain_samples"]
    return total


def test_calibrated_update_takes_direction_from_calibration_and_norm_from_history():
    start = {"w": torch.zeros(2), "z": torch.ones(2), "bn": torch.zeros(2)}
    calibrated = {"w": torch.tensor([3.0, 4.0]), "z": torch.ones(2), "bn": torch.tensor([7.0, 7.0])}
    original = {"w": torch.tensor([0.0, 10.0]), "z": torch.tensor([5.0, 5.0]), "bn": torch.zeros(2)}
    parent = {"w": torch.zeros(2), "z": torch.zeros(2), "bn": torch.zeros(2)}
    new, kept = calibrated_state(start, calibrated, original, parent, ["w", "z"])
    assert torch.allclose(new["w"], torch.tensor([6.0, 8.0]))  # ||U|| = 10 along (3, 4) / 5
    assert torch.equal(new["z"], start["z"]) and kept == 1  # the short run left it unchanged
    assert torch.equal(new["bn"], calibrated["bn"])  # buffers come from the calibration run
    assert [calibration_epochs(e, 0.5) for e in (1, 3, 5, 10)] == [1, 2, 3, 5]


def test_client_forgetting_reaggregates_without_it_and_keeps_stored_update_norms(fl_store):
    before = states(fl_store)
    res = fl_store.unlearn(clients=[FORGOTTEN], method="federaser", evaluate=False)
    after = states(fl_store)
    m = {n.name: n.metrics for n in res.nodes}
    assert m[FORGOTTEN]["path"] == "parent" and m["fl/r2/c1"]["path"] == "parent"
    assert m["fl/r2/c0"]["path"] == m["fl/r2/c2"]["path"] == "calibrated"
    assert m["fl/r2/c0"]["epochs_run"] == 2  # half of the recorded 3 epochs, rounded up
    # The forgotten client keeps no data: it passes its parent on and drops out of the FedAvg.
    assert all(torch.equal(after[FORGOTTEN][k], before["fl/init"][k]) for k in after[FORGOTTEN])
    w = {p: wt for p, _, wt in fl_store.node("fl/r1/global").parents}
    expect = fedavg([after["fl/r1/c0"], after["fl/r1/c2"]], [w["fl/r1/c0"], w["fl/r1/c2"]])
    assert all(torch.equal(after["fl/r1/global"][k], expect[k]) for k in expect)
    assert all(torch.equal(after["fl/r2/c1"][k], after["fl/r1/global"][k]) for k in after["fl/r2/c1"])
    # A replayed client's update from its replayed parent has, tensor by tensor, the stored update's norm.
    for c in ("fl/r2/c0", "fl/r2/c2"):
        assert not torch.equal(after[c]["fc.weight"], before[c]["fc.weight"])
        for k in PARAMS:
            new = torch.linalg.vector_norm(after[c][k].double() - after["fl/r1/global"][k].double())
            old = torch.linalg.vector_norm(before[c][k].double() - before["fl/r1/global"][k].double())
            assert torch.allclose(new, old, rtol=1e-4), (c, k)
    w2 = {p: wt for p, _, wt in fl_store.node("fl/r2/global").parents}
    expect = fedavg([after["fl/r2/c0"], after["fl/r2/c2"]], [w2["fl/r2/c0"], w2["fl/r2/c2"]])
    assert all(torch.equal(after["fl/r2/global"][k], expect[k]) for k in expect)


def test_revert_is_bit_exact(fl_store):
    before = states(fl_store)
    op = fl_store.unlearn(clients=[FORGOTTEN], method="federaser", evaluate=False)
    assert not torch.equal(fl_store.state_dict("fl/r2/global")["fc.weight"], before["fl/r2/global"]["fc.weight"])
    fl_store.revert(op.operation)
    after = states(fl_store)
    assert all(torch.equal(after[n][k], before[n][k]) for n in before for k in before[n])


def test_two_runs_give_identical_weights(fl_template, tmp_path):
    runs = []
    for i in range(2):
        with copy_store(fl_template, tmp_path / f"s{i}") as s:
            s.unlearn(clients=[FORGOTTEN], method="federaser", evaluate=False)
            runs.append(states(s))
    a, b = runs
    assert all(torch.equal(a[n][k], b[n][k]) for n in a for k in a[n])


def test_heldout_accuracy_near_retrain_with_fewer_training_epochs(fl_store, fl_template, tmp_path):
    fed = fl_store.unlearn(clients=[FORGOTTEN], method="federaser", evaluate=False)
    with copy_store(fl_template, tmp_path / "retrain") as ref:
        ret = ref.unlearn(clients=[FORGOTTEN], method="retrain", evaluate=False)
        acc_retrain = global_accuracy(ref)
        work_retrain = sample_epochs(ret, ref, "retrain")
    assert abs(global_accuracy(fl_store) - acc_retrain) <= 0.05
    work = sample_epochs(fed, fl_store, "federaser")
    assert 0 < work < work_retrain


def test_a_child_with_other_classes_is_retrained_in_full(fl_store):
    five = ArchSpec("umig.models:digits_cnn", {"num_classes": 5})
    torch.manual_seed(0)
    fl_store.add_node("fl/five", five.build().state_dict(), five, parents=["fl/r2/global"], classes=range(5),
                      data=fl_store.node_data("fl/r2/c0").filter_labels(keep=range(5)), compute_fim=False,
                      recipe={"epochs": 1})
    res = fl_store.unlearn(clients=[FORGOTTEN], method="federaser", evaluate=False)
    m = {n.name: n.metrics for n in res.nodes}["fl/five"]
    # No stored update to rescale across a head change: the node is retrained in full, as `retrain` would.
    assert m["path"] == "retrain" and m["epochs_run"] == 1 and m["retain_samples"] > 0


def test_refuses_a_node_with_data_but_no_recipe_and_a_bad_ratio(fl_store):
    fl_store.add_node("fl/ft", fl_store.state_dict("fl/r2/global"), DEFAULT_ARCH,
                      parents=["fl/r2/global"], data=fl_store.node_data("fl/r2/c0"), compute_fim=False)
    state = store_state(fl_store.root)
    with pytest.raises(UnlearningError, match=r"'federaser'.*recipe.*fl/ft"):
        fl_store.unlearn(clients=[FORGOTTEN], method="federaser")
    with pytest.raises(UnlearningError, match=r"calibration_ratio must be > 0"):
        fl_store.unlearn(clients=[FORGOTTEN], method="federaser", params={"calibration_ratio": 0})
    assert store_state(fl_store.root) == state
