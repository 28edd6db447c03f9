"""FIUn leaves nothing in the head that a white-box edit turns back into the forgotten labels (issue 18, item 2).

The attack (:func:`umig.evaluate.edit_head`): an attacker holding only the checkpoint gives every
forgotten row the retained rows' mean bias and mean norm, keeping its direction. Judged against
the model retrained without the labels along the same lineage (``umig.lineage.retrain_reference``),
on ``fl_store`` (3 clients x 2 rounds FedAvg on digits) with held-out digits.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch

from umig.arch import build_model
from umig.blobs import serialise
from umig.data import Data, resolve
from umig.evaluate import edit_head, unlearning_accuracy
from umig.execution import WorkerEnv
from umig.fisher import FIM
from umig.lineage import retrain_reference
from umig.store import SqlStore
from umig.unlearners.fiun import erase_rows, update_task

FORGET = (1, 2)
HELDOUT = "sklearn:digits?split=test"
MARGIN = 0.05  # the target: no more than 5 points above the retrained reference


def _attacked_accuracy(store: SqlStore, name: str, state: dict[str, torch.Tensor], held: Data) -> dict[str, float]:
    """Held-out AD_f of ``state`` after the head edit, and its AD_f / AD_r as it is."""
    info = store.node(name)
    rows = [r for r, c in enumerate(info.classes) if c in FORGET]
    wkey, bkey = f"{info.head}.weight", f"{info.head}.bias"
    edited = dict(state)
    edited[wkey], edited[bkey] = edit_head(state[wkey], state.get(bkey), rows)
    data = held.filter_labels(keep=info.classes)
    plain = unlearning_accuracy(build_model(info.arch, state), data.batches(512), info.classes, FORGET)
    attacked = unlearning_accuracy(build_model(info.arch, edited), data.batches(512), info.classes, FORGET)
    return {"attacked": attacked["AD_f"], "AD_f": plain["AD_f"], "AD_r": plain["AD_r"]}


def _unlearn(store: SqlStore, mode: str | None) -> dict[str, dict[str, torch.Tensor]]:
    """The unlearned weights of every affected node in ``mode`` (None: the default), then revert."""
    res = store.unlearn(list(FORGET), params={"mode": mode} if mode else None, evaluate=False)
    if mode is None:
        assert res.params["mode"] == "erase"  # the hardened mode is the default
    states = {n.name: store.state_dict(n.name) for n in res.nodes}
    store.revert(res.operation)
    return states


def test_head_edit_gives_back_no_more_than_retraining(fl_store):
    held = resolve(HELDOUT)
    ref = retrain_reference(fl_store, FORGET)
    erase, rows = _unlearn(fl_store, None), _unlearn(fl_store, "rows")
    assert list(erase) == list(rows) == ref.nodes
    table = {n: {"ref": _attacked_accuracy(fl_store, n, ref.states[n], held),
                 "erase": _attacked_accuracy(fl_store, n, erase[n], held),
                 "rows": _attacked_accuracy(fl_store, n, rows[n], held)} for n in ref.nodes}
    report = {n: {k: round(v["attacked"], 3) for k, v in t.items()} for n, t in table.items()}
    for n, t in table.items():
        # Default mode: the edit gives back no more than it does on the retrained model, at every node.
        assert t["erase"]["attacked"] <= t["ref"]["attacked"] + MARGIN, (n, report)
        assert t["erase"]["AD_f"] == 0.0, (n, t["erase"])  # and the labels are gone before any attack
        # Retained accuracy as with `rows` (both leave the retained rows untouched).
        assert t["erase"]["AD_r"] >= t["rows"]["AD_r"] - 0.01, (n, t["erase"], t["rows"])
    # The same check fails on `rows` mode (it masks: the rows keep their direction), so it distinguishes.
    assert any(t["rows"]["attacked"] > t["ref"]["attacked"] + MARGIN for t in table.values()), report


def _fim(classes: tuple[int, ...], d: int, seed: int) -> FIM:
    g = torch.Generator().manual_seed(seed)
    return FIM(torch.rand(len(classes), d, generator=g), torch.rand(len(classes), generator=g) + 0.1, classes, 100)


def test_erased_rows_depend_only_on_retained_rows_and_survive_the_edit():
    classes, d = (3, 0, 7, 1, 9), 6
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(len(classes), d, generator=g), torch.randn(len(classes), generator=g)
    fim = _fim(classes, d, 1)
    forget = (7, 9)  # rows 2 and 4, by label id
    w2, b2, stats = erase_rows(w, b, fim, forget)
    keep = [0, 1, 3]
    assert torch.equal(w2[keep], w[keep]) and torch.equal(b2[keep], b[keep])
    assert stats == {"params_changed": 2 * (d + 1), "params_total": w.numel() + b.numel()}
    # Nothing of the old forgotten rows survives: other values there give the same head.
    w_other, b_other = w.clone(), b.clone()
    w_other[[2, 4]], b_other[[2, 4]] = torch.randn(2, d, generator=g) * 10, torch.randn(2, generator=g)
    w3, b3, _ = erase_rows(w_other, b_other, fim, forget)
    assert torch.equal(w3, w2) and torch.equal(b3, b2)
    # The row already has the retained rows' mean norm, so the attacker's re-norm leaves it as it is,
    # and it points against the features: for non-negative features it never beats the retained mean logit.
    target = w[keep].norm(dim=1).mean()
    assert torch.allclose(w2[[2, 4]].norm(dim=1), target.expand(2), rtol=1e-5)
    we, be = edit_head(w2, b2, [2, 4])
    assert torch.allclose(we, w2, rtol=1e-5, atol=1e-6)
    h = torch.rand(256, d, generator=g)
    z = h @ we.T + be
    assert bool((z[:, 2] < z[:, keep].mean(1)).all())
    assert bool((b2[[2, 4]] < b[keep].min()).all())  # and the unlearned head itself never predicts them


def test_erase_edge_cases():
    classes, d = (0, 1, 2), 4
    w, b, fim = torch.randn(3, d), torch.randn(3), _fim(classes, d, 2)
    same_w, same_b, stats = erase_rows(w, b, fim, (8,))  # a label this head has no row for
    assert torch.equal(same_w, w) and torch.equal(same_b, b) and stats["params_changed"] == 0
    zero_w, zero_b, _ = erase_rows(w, b, fim, classes)  # everything forgotten: nothing to build from
    assert not zero_w.any() and not zero_b.any()
    no_bias_w, none_b, _ = erase_rows(w, None, FIM(fim.weight, None, classes, 100), (1,))
    assert none_b is None and torch.equal(no_bias_w[[0, 2]], w[[0, 2]])
    half_w, half_b, _ = erase_rows(w.half(), b.half(), fim, (1,))
    assert half_w.dtype == torch.float16 and half_b.dtype == torch.float16


def test_update_task_writes_the_head_erase_rows_gives(tmp_path):
    """The update task's array path (float32 head and FIM in the node's class order) and the tensor path
    it leaves everything else to write the blob that erase_rows' tensors serialise to."""
    env = WorkerEnv(str(tmp_path / "blobs"))
    env.blobs.ensure()
    classes, d = (3, 0, 7, 1, 9), 6
    g = torch.Generator().manual_seed(2)
    fim = _fim(classes, d, 3)
    reordered = FIM(fim.weight[[1, 0, 2, 3, 4]], fim.bias[[1, 0, 2, 3, 4]], (0, 3, 7, 1, 9), 100)
    params = {"gamma": 1.0, "tau": 1.0, "eta": 0.1, "eps": 1e-12, "mode": "erase"}
    cases = [(dtype, bias, stored, forget) for dtype in (torch.float32, torch.float16, torch.float64)
             for bias in (True, False) for stored in (fim, reordered) for forget in ((7, 9), (8,), classes)]
    for dtype, bias, stored, forget in cases:
        head = {"fc.weight": torch.randn(len(classes), d, generator=g).to(dtype)}
        if bias:
            head["fc.bias"] = torch.randn(len(classes), generator=g).to(dtype)
        snap = SimpleNamespace(name="n", head="fc", classes=classes,
                               head_blob=env.blobs.put_tensors(head)[0],
                               fim_blob=env.blobs.put_tensors(stored.to_tensors(), stored.metadata())[0])
        got = update_task({"snap": snap, "labels": forget, "params": params}, env)
        w, b, stats = erase_rows(head["fc.weight"], head.get("fc.bias"), stored.aligned(classes), forget)
        want = hashlib.sha256(serialise({"fc.weight": w} if b is None else {"fc.weight": w, "fc.bias": b},
                                        {"part": "head"})).hexdigest()
        assert got.head_blob == want and got.metrics == stats, (dtype, bias, stored.classes, forget)
    env.blobs.flush()
    assert sum(1 for _ in (tmp_path / "blobs").glob("??/*.safetensors")) > len(cases)
