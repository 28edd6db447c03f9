"""Closed-form last-layer Fisher against autograd, label alignment, merges, and side effects."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from umig.errors import ArchError, LabelError, UmigError
from umig.heads import label_rows
from umig.fisher import (
    FIM,
    FisherDataError,
    FisherError,
    FisherShapeError,
    autograd_fisher,
    head_fisher,
    merge_max,
    weighted_mean,
)


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-5) -> None:
    # Relative to the tensor's scale: single tiny entries carry float32 rounding noise.
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * float(b.abs().max()))


@pytest.fixture(scope="module")
def digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:120], dtype=torch.float32) / 16.0
    y = torch.tensor(d.target[:120], dtype=torch.int64)
    return x, y


def _mlp(k: int = 10, seed: int = 0, d_in: int = 64, width: int = 12) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.Tanh(), nn.Linear(width, k))


def _batches(x: torch.Tensor, y: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


# Head rows in a non-trivial order so a row/label mix-up cannot pass.
CLASSES = (3, 1, 4, 0, 5, 9, 2, 6, 8, 7)


def test_empirical_closed_form_equals_per_sample_autograd(digits):
    x, y = digits
    model = _mlp()
    batches = _batches(x[:40], y[:40], 15)  # uneven last batch: division must be by N, not by batches
    fast = head_fisher(model, "2", batches, CLASSES)
    ref = autograd_fisher(model, "2", batches, CLASSES)
    assert fast.samples == ref.samples == 40
    assert fast.classes == CLASSES and fast.kind == "empirical"
    assert float(fast.weight.abs().max()) > 1e-4  # not trivially zero
    _close(fast.weight, ref.weight)
    _close(fast.bias, ref.bias)


def test_true_fisher_matches_expectation_over_classes(digits):
    x, y = digits
    model = _mlp(seed=1)
    batches = _batches(x[:30], y[:30], 16)
    fast = head_fisher(model, "2", batches, CLASSES, kind="true")
    ref = autograd_fisher(model, "2", batches, CLASSES, kind="true")
    _close(fast.weight, ref.weight)
    _close(fast.bias, ref.bias)
    emp = head_fisher(model, "2", batches, CLASSES, kind="empirical")
    assert not torch.allclose(fast.weight, emp.weight)


def test_temperature_softens_and_matches_autograd(digits):
    x, y = digits
    model = _mlp(seed=2)
    with torch.no_grad():
        model[2].weight.mul_(8.0)  # saturate the softmax, where temperature matters most
    batches = _batches(x[:40], y[:40], 20)
    t1 = head_fisher(model, "2", batches, CLASSES)
    t4 = head_fisher(model, "2", batches, CLASSES, temperature=4.0)
    assert t4.temperature == 4.0
    assert not torch.allclose(t1.weight, t4.weight, rtol=1e-2)
    _close(t4.weight, autograd_fisher(model, "2", batches, CLASSES, temperature=4.0).weight)


def test_head_by_module_or_name_and_bad_head(digits):
    x, y = digits
    model = _mlp()
    batches = _batches(x[:20], y[:20], 10)
    a = head_fisher(model, "2", batches, CLASSES)
    b = head_fisher(model, model[2], batches, CLASSES)
    assert torch.equal(a.weight, b.weight)
    with pytest.raises(ArchError, match="no module named 'fc'"):
        head_fisher(model, "fc", batches, CLASSES)
    with pytest.raises(ArchError, match="nn.Linear"):
        head_fisher(model, "1", batches, CLASSES)
    with pytest.raises(ArchError, match="10 outputs but classes lists 3"):
        head_fisher(model, "2", batches, (2, 5, 7))


def test_unknown_label_raises_naming_it(digits):
    x, y = digits
    model = _mlp()
    y = y[:20].clone()
    y[7] = 42
    with pytest.raises(ValueError, match="label 42"):
        head_fisher(model, "2", [(x[:20], y)], CLASSES)
    with pytest.raises(UmigError):
        head_fisher(model, "2", [(x[:20], y)], CLASSES)


def test_zero_samples_raises():
    model = _mlp()
    with pytest.raises(ValueError, match="no samples"):
        head_fisher(model, "2", [], CLASSES)
    empty = (torch.empty(0, 64), torch.empty(0, dtype=torch.int64))
    with pytest.raises(FisherDataError):
        head_fisher(model, "2", [empty], CLASSES)


def test_hook_removed_and_modes_restored_even_on_error(digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 10))
    model.train()
    model[1].eval()  # a caller's frozen BatchNorm inside a training model must stay frozen
    before = [m.training for m in model.modules()]
    running = model[1].running_mean.clone()
    fim = head_fisher(model, "4", _batches(x[:40], y[:40], 20), CLASSES)
    assert [m.training for m in model.modules()] == before
    assert len(model[4]._forward_hooks) == 0
    assert torch.equal(model[1].running_mean, running)  # the pass ran in eval mode
    # Dropout off during the pass: two runs agree exactly.
    again = head_fisher(model, "4", _batches(x[:40], y[:40], 20), CLASSES)
    assert torch.equal(fim.weight, again.weight)
    bad = y[:20].clone()
    bad[0] = 99
    with pytest.raises(LabelError):
        head_fisher(model, "4", [(x[:20], bad)], CLASSES)
    assert [m.training for m in model.modules()] == before
    assert len(model[4]._forward_hooks) == 0


def test_sequence_head_input_is_flattened():
    # Head applied per token: input (N, T, d), labels (N, T).
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    x = torch.randn(7, 3, 6)
    y = torch.randint(0, 4, (7, 3))
    seq = head_fisher(model, "2", [(x, y)], (0, 1, 2, 3))
    flat = head_fisher(model, "2", [(x.reshape(-1, 6), y.reshape(-1))], (0, 1, 2, 3))
    assert seq.samples == 21
    _close(seq.weight, flat.weight)


def test_low_precision_model_accumulates_in_float32(digits):
    x, y = digits
    model = _mlp(seed=4)
    ref = head_fisher(model, "2", _batches(x[:60], y[:60], 30), CLASSES)
    low = head_fisher(model.to(torch.bfloat16), "2", _batches(x[:60], y[:60], 30), CLASSES)
    assert low.weight.dtype == torch.float32
    torch.testing.assert_close(low.weight, ref.weight, rtol=0.1, atol=0.02 * float(ref.weight.abs().max()))


def test_per_batch_variant_is_squared_batch_mean_gradient(digits):
    x, y = digits
    model = _mlp(seed=5)
    # With one sample per batch the authors' per-batch estimate is the per-sample Fisher.
    singles = _batches(x[:15], y[:15], 1)
    _close(autograd_fisher(model, "2", singles, CLASSES, per_batch=True).weight,
           head_fisher(model, "2", singles, CLASSES).weight)
    # With real batches it is not: squared mean gradients lose most of the mass.
    big = _batches(x[:60], y[:60], 30)
    pb = autograd_fisher(model, "2", big, CLASSES, per_batch=True)
    assert float(pb.weight.sum()) < 0.5 * float(head_fisher(model, "2", big, CLASSES).weight.sum())


# --------------------------------------------------------------------------- alignment and merges


def _permuted_copy(model: nn.Sequential, perm: list[int]) -> nn.Sequential:
    clone = _mlp()
    clone.load_state_dict(model.state_dict())
    with torch.no_grad():
        clone[2].weight.copy_(model[2].weight[perm])
        clone[2].bias.copy_(model[2].bias[perm])
    return clone


def test_aligned_by_label_id_not_row(digits):
    x, y = digits
    model = _mlp()
    classes = tuple(range(10))
    perm = [7, 2, 5, 0, 9, 1, 3, 8, 4, 6]
    shuffled = _permuted_copy(model, perm)  # same function, rows in another order
    batches = _batches(x[:40], y[:40], 20)
    a = head_fisher(model, "2", batches, classes)
    b = head_fisher(shuffled, "2", batches, tuple(perm))
    assert not torch.allclose(a.weight, b.weight)
    _close(b.aligned(classes).weight, a.weight)
    _close(b.aligned(classes).bias, a.bias)
    sub = a.aligned((5, 2, 11))
    assert sub.classes == (5, 2, 11)
    assert torch.equal(sub.weight[0], a.weight[5]) and torch.equal(sub.weight[1], a.weight[2])
    assert torch.equal(sub.weight[2], torch.zeros(a.feature_dim))  # label 11 absent -> zero row
    assert float(sub.bias[2]) == 0.0


def _fim(classes, d=4, seed=0, samples=10, bias=True) -> FIM:
    g = torch.Generator().manual_seed(seed)
    k = len(classes)
    return FIM(torch.rand(k, d, generator=g), torch.rand(k, generator=g) if bias else None, tuple(classes), samples)


def test_merge_max_aligns_heads_of_different_size():
    big = _fim(range(10), seed=1)
    small = _fim((7, 2, 5), seed=2)
    small = FIM(small.weight * 3.0, small.bias, small.classes, small.samples)  # mostly wins on its rows
    merged = merge_max([big, small], classes=range(10))
    assert merged.classes == tuple(range(10)) and merged.samples == 20
    for label in range(10):
        expect = big.weight[label]
        if label in small.classes:
            expect = torch.maximum(expect, small.weight[small.classes.index(label)])
        assert torch.equal(merged.weight[label], expect), label
    assert torch.equal(merged.weight[7], small.weight[0])
    assert torch.equal(merged.bias[5], torch.maximum(big.bias[5], small.bias[2]))
    # Onto a target order the inputs do not share.
    onto = merge_max([big, small], classes=(5, 0))
    assert torch.equal(onto.weight[0], torch.maximum(big.weight[5], small.weight[2]))
    assert torch.equal(onto.weight[1], big.weight[0])


def test_weighted_mean_aligns_and_weights():
    big = _fim(range(10), seed=1, samples=30)
    small = _fim((7, 2, 5), seed=2, samples=10)
    mean = weighted_mean([big, small], weights=[3, 1])
    assert mean.classes == tuple(range(10)) and mean.samples == 40
    _close(mean.weight[2], 0.75 * big.weight[2] + 0.25 * small.weight[1])
    _close(mean.weight[0], 0.75 * big.weight[0])  # absent row counts as zero
    _close(mean.bias[7], 0.75 * big.bias[7] + 0.25 * small.bias[0])
    only = weighted_mean([small, _fim((9, 2), seed=3)], weights=[1, 1])
    assert only.classes == (2, 5, 7, 9)  # default: sorted union
    with pytest.raises(FisherError, match="2 FIMs but 1 weights"):
        weighted_mean([big, small], weights=[1])


def test_feature_width_mismatch_raises():
    a = _fim(range(3), d=4)
    b = _fim(range(3), d=5)
    with pytest.raises(FisherShapeError, match=r"feature widths \[4, 5\]"):
        merge_max([a, b], classes=range(3))
    with pytest.raises(FisherShapeError, match="feature widths"):
        weighted_mean([a, b], weights=[1, 1])
    assert issubclass(FisherShapeError, UmigError)
    with pytest.raises(FisherShapeError, match="bias"):
        merge_max([a, _fim(range(3), bias=False)], classes=range(3))


def test_kind_or_temperature_mismatch_raises():
    a = _fim(range(3))
    b = FIM(a.weight, a.bias, a.classes, 5, kind="true")
    c = FIM(a.weight, a.bias, a.classes, 5, temperature=4.0)
    with pytest.raises(FisherError, match="kinds"):
        merge_max([a, b], classes=range(3))
    with pytest.raises(FisherError, match="temperatures"):
        weighted_mean([a, c], weights=[1, 1])


def test_tensors_round_trip_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file, safe_open

    fim = FIM(torch.rand(5, 3).T.contiguous().T[:, :2], torch.rand(5), (9, 4, 1, 0, 7), 33, "true", 2.5)
    path = tmp_path / "fim.safetensors"
    save_file(fim.to_tensors(), str(path), metadata=fim.metadata())
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    back = FIM.from_tensors(load_file(str(path)), meta)
    assert back.classes == fim.classes and back.samples == 33 and back.kind == "true" and back.temperature == 2.5
    assert torch.equal(back.weight, fim.weight) and torch.equal(back.bias, fim.bias)
    no_bias = FIM.from_tensors(FIM(torch.ones(2, 3), None, (1, 2), 1).to_tensors())
    assert no_bias.bias is None and no_bias.feature_dim == 3


def test_fim_validates_shape_and_classes():
    with pytest.raises(FisherShapeError):
        FIM(torch.ones(3, 2), None, (0, 1), 1)
    with pytest.raises(LabelError, match="more than once"):
        FIM(torch.ones(2, 2), None, (1, 1), 1)


def test_label_rows():
    rows = label_rows(torch.tensor([7, 3, 7, 100]), (100, 3, 7), strict=False)
    assert rows.tolist() == [2, 1, 2, 0]
    assert label_rows(torch.tensor([-5, 8]), (100, 3, 7), strict=False).tolist() == [-1, -1]
    with pytest.raises(LabelError, match="label 8"):
        label_rows(torch.tensor([3, 8]), (100, 3, 7))
    # A head over 0..K-1 maps labels to themselves (the fast path) with the same checks.
    y = torch.tensor([2, 0, 2, 1])
    rows = label_rows(y, (0, 1, 2))
    assert rows.tolist() == [2, 0, 2, 1] and rows.data_ptr() != y.data_ptr()
    assert label_rows(torch.tensor([-1, 3, 1]), range(3), strict=False).tolist() == [-1, -1, 1]
    for bad in (-1, 3):
        with pytest.raises(LabelError, match=f"label {bad} is not"):
            label_rows(torch.tensor([0, bad]), (0, 1, 2))


def test_per_label_sums_give_the_unlearning_fim_without_a_pass(digits):
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
    full = head_fisher(model, "3", _batches(x[:200], y[:200], 64), CLASSES, per_label=True)
    keep = (y[:200] == 1) | (y[:200] == 7)
    direct = head_fisher(model, "3", _batches(x[:200][keep], y[:200][keep], 64), CLASSES)
    from_sums = full.for_labels([1, 7])
    assert from_sums.samples == direct.samples == int(keep.sum())
    _close(from_sums.weight, direct.weight)
    _close(from_sums.bias, direct.bias)
    # The per-label sums add up to the model FIM, and survive a round trip through a blob.
    _close(full.label_weight.sum(0) / full.samples, full.weight)
    again = FIM.from_tensors(full.to_tensors(), full.metadata())
    assert again.has_label_stats and torch.equal(again.label_weight, full.label_weight)
    assert not head_fisher(model, "3", _batches(x[:50], y[:50], 64), CLASSES).has_label_stats


def test_without_labels_is_the_fim_of_the_other_samples(digits):
    """purge's cleaning: the FIM over every sample but those labelled 1 and 7 (a forward pass on them
    agrees), per-label sums kept for the others and zeroed for 1 and 7."""
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
    full = head_fisher(model, "3", _batches(x[:200], y[:200], 64), CLASSES, per_label=True)
    rest = (y[:200] != 1) & (y[:200] != 7)
    direct = head_fisher(model, "3", _batches(x[:200][rest], y[:200][rest], 64), CLASSES, per_label=True)
    clean = full.without_labels(iter([1, 7]))  # any iterable, a one-shot one included
    assert clean.samples == direct.samples == int(rest.sum())
    _close(clean.weight, direct.weight)
    _close(clean.bias, direct.bias)
    _close(clean.label_weight, direct.label_weight)
    assert clean.label_counts.tolist() == direct.label_counts.tolist()
    assert full.for_labels(iter([1, 7])).samples == int((~rest).sum())
    assert full.without_labels([42]) is full  # no such label: nothing to take out
    assert full.without_labels(CLASSES) is None  # no sample left
    with pytest.raises(FisherError, match="per-label"):
        head_fisher(model, "3", _batches(x[:50], y[:50], 64), CLASSES).without_labels([1])
