"""AD_f / AD_r split and the loss-threshold membership inference."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from umig.evaluate import (
    membership_inference,
    per_sample_loss,
    predict_labels,
    threshold_attack_accuracy,
    unlearning_accuracy,
)


class Logits(nn.Module):
    """The input *is* the logits: lets a test dictate every prediction and loss."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


CLASSES = (7, 3, 9)  # row 0 predicts label 7, row 1 label 3, row 2 label 9


def _onehot_logits(rows: list[int]) -> torch.Tensor:
    z = torch.full((len(rows), 3), -5.0)
    z[torch.arange(len(rows)), torch.tensor(rows)] = 5.0
    return z


def test_predict_maps_rows_to_label_ids():
    x = _onehot_logits([0, 1, 2, 2])
    y = torch.tensor([7, 7, 9, 3])
    pred, true = predict_labels(Logits(), [(x[:2], y[:2]), (x[2:], y[2:])], CLASSES)
    assert pred.tolist() == [7, 3, 9, 9]
    assert true.tolist() == [7, 7, 9, 3]


def test_accuracy_split_by_forget_labels():
    # label:    7  7  7  3  3  9  9  9  5(no row)
    # predicts: 7  3  3  3  3  9  7  9  -
    x = _onehot_logits([0, 1, 1, 1, 1, 2, 0, 2, 2])
    y = torch.tensor([7, 7, 7, 3, 3, 9, 9, 9, 5])
    model = Logits()
    model.train()
    res = unlearning_accuracy(model, [(x, y)], CLASSES, forget_labels=[7, 5])
    assert res["n_f"] == 4 and res["n_r"] == 5
    assert res["AD_f"] == pytest.approx(1 / 4)  # one of three 7s right; the unknown label 5 is wrong
    assert res["AD_r"] == pytest.approx(4 / 5)
    assert model.training  # mode restored
    none = unlearning_accuracy(model, [(x[3:8], y[3:8])], CLASSES, forget_labels={7})
    assert none["AD_f"] is None and none["n_f"] == 0 and none["AD_r"] == pytest.approx(4 / 5)


def test_accuracy_on_trained_digits_model():
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    # Nearest-centroid classifier written as a linear head: a real, imperfect model with no training loop.
    means = torch.stack([x[y == c].mean(0) for c in range(10)])
    model = nn.Linear(64, 10)
    with torch.no_grad():
        model.weight.copy_(means)
        model.bias.copy_(-0.5 * means.square().sum(1))
    res = unlearning_accuracy(model, [(x, y)], tuple(range(10)), forget_labels=[1, 2])
    with torch.no_grad():
        pred = model(x).argmax(1)
    f = (y == 1) | (y == 2)
    assert res["n_f"] == int(f.sum()) and res["n_r"] == int((~f).sum())
    assert res["AD_f"] == pytest.approx(float((pred[f] == y[f]).float().mean()))
    assert res["AD_r"] == pytest.approx(float((pred[~f] == y[~f]).float().mean()))
    assert 0.8 < res["AD_r"] < 1.0


def test_per_sample_loss_and_unknown_label_is_max():
    x = _onehot_logits([0, 1, 2])
    y = torch.tensor([7, 9, 4])
    loss = per_sample_loss(Logits(), [(x, y)], CLASSES)
    expect = nn.functional.cross_entropy(x[:2], torch.tensor([0, 2]), reduction="none")
    torch.testing.assert_close(loss[:2], expect)
    assert torch.isinf(loss[2])


def _brute_force(member: torch.Tensor, nonmember: torch.Tensor) -> float:
    best = 0.5
    for t in itertools.chain([-float("inf")], torch.cat([member, nonmember]).tolist()):
        tpr = float((member <= t).float().mean())
        fpr = float((nonmember <= t).float().mean())
        best = max(best, 0.5 * (tpr + 1 - fpr), 0.5 * (fpr + 1 - tpr))
    return best


def test_threshold_sweep_matches_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        m = torch.randint(0, 6, (23,), generator=g).float()  # heavy ties
        u = torch.randint(2, 9, (31,), generator=g).float()
        assert threshold_attack_accuracy(m, u) == pytest.approx(_brute_force(m, u))
        assert threshold_attack_accuracy(u, m) == pytest.approx(_brute_force(u, m))
    assert threshold_attack_accuracy(torch.tensor([0.1, 0.2]), torch.tensor([0.3, 0.4])) == 1.0
    assert threshold_attack_accuracy(torch.tensor([0.1, 0.3]), torch.tensor([0.2, 0.4])) == 0.75
    assert threshold_attack_accuracy(torch.tensor([1.0, 1.0]), torch.tensor([1.0])) == 0.5
    # Over-forgetting leaks too: forget losses far above unseen ones are just as recognisable.
    assert threshold_attack_accuracy(torch.tensor([5.0, 6.0]), torch.tensor([0.1, 0.2])) == 1.0
    with pytest.raises(ValueError):
        threshold_attack_accuracy(torch.tensor([]), torch.tensor([1.0]))


def test_mia_is_chance_for_identical_distributions():
    g = torch.Generator().manual_seed(1)
    n = 2000
    forget = (torch.randn(n, 3, generator=g), torch.tensor(CLASSES)[torch.randint(0, 3, (n,), generator=g)])
    unseen = (torch.randn(n, 3, generator=g), torch.tensor(CLASSES)[torch.randint(0, 3, (n,), generator=g)])
    mia = membership_inference(Logits(), [forget], [unseen], CLASSES)
    assert 0.5 <= mia < 0.56


def test_mia_is_one_when_forget_losses_are_tiny():
    g = torch.Generator().manual_seed(2)
    rows = torch.randint(0, 3, (300,), generator=g)
    labels = torch.tensor(CLASSES)[rows]
    memorised = _onehot_logits(rows.tolist()) * 4  # loss ~ 0
    unseen = torch.randn(300, 3, generator=g)  # loss ~ log 3
    mia = membership_inference(Logits(), [(memorised, labels)], [(unseen, labels)], CLASSES)
    assert mia == pytest.approx(1.0)
