"""Tests for umig.train: recipe, seeded training on real digits, FedAvg, accuracy."""

from __future__ import annotations

import json

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn

from umig.errors import NotFoundError, UmigError
from umig.models import digits_cnn, tiny_mlp
from umig.train import Recipe, accuracy, fedavg, train

CLASSES = tuple(range(10))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny models: with 2 busy cores, intra-op threading makes each step tens of times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    return x, y


def make_batches(x, y, batch_size=64):
    """batches_fn for train(): a fresh seeded shuffle per epoch."""

    def batches_fn(epoch):
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(1000 + epoch))
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            yield x[idx], y[idx]

    return batches_fn


def fixed(x, y, batch_size=512):
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]


# Min train accuracy over 8 init seeds was 0.98 for this recipe, so the 0.90 bar has slack.
FAST = Recipe(optimizer="adam", lr=3e-3, epochs=2, batch_size=64, seed=0)


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------------------- training


def test_digits_cnn_learns_real_digits(digits):
    x, y = digits
    torch.manual_seed(0)
    model = digits_cnn()
    seen = []
    result = train(model, make_batches(x, y), FAST, CLASSES, progress=lambda e, loss: seen.append((e, loss)))
    assert [e for e, _ in seen] == [0, 1]
    assert seen[-1][1] == pytest.approx(result["loss"])
    assert seen[1][1] < seen[0][1]
    assert result["seconds"] > 0
    assert accuracy(model, fixed(x, y), CLASSES) > 0.90


def test_sgd_recipe_trains(digits):
    x, y = digits
    torch.manual_seed(0)
    model = digits_cnn(width=8)
    before = accuracy(model, fixed(x, y), CLASSES)
    train(model, make_batches(x, y), Recipe(optimizer="sgd", lr=0.02, momentum=0.9, epochs=1, seed=1), CLASSES)
    assert accuracy(model, fixed(x, y), CLASSES) > max(before, 0.5)


def test_training_is_deterministic(digits):
    x, y = digits[0][:512], digits[1][:512]
    recipe = Recipe(optimizer="sgd", lr=0.05, epochs=1, seed=7)
    cnns = []
    for _ in range(2):
        torch.manual_seed(123)  # same init; anything random inside train() must come from recipe.seed
        cnns.append(digits_cnn(width=8))
        train(cnns[-1], make_batches(x, y), recipe, CLASSES)
    assert _same_weights(cnns[0], cnns[1])

    # Dropout draws from the global RNG, so the recipe seed decides the result.
    torch.manual_seed(0)
    init = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10)).state_dict()
    nets = []
    for seed in (3, 3, 4):
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 10))
        net.load_state_dict(init)
        train(net, make_batches(x, y), Recipe(lr=0.05, epochs=1, seed=seed), CLASSES)
        nets.append(net)
    assert _same_weights(nets[0], nets[1])
    assert not _same_weights(nets[0], nets[2])


def test_train_maps_label_ids_through_classes(digits):
    x, y = digits
    keep = (y == 3) | (y == 7)
    xs, ys = x[keep], y[keep]
    classes = (7, 3)  # row 0 predicts label 7, row 1 predicts label 3
    torch.manual_seed(0)
    model = digits_cnn(num_classes=2, width=8)
    train(model, make_batches(xs, ys), Recipe(lr=0.05, epochs=1), classes)
    assert accuracy(model, fixed(xs, ys), classes) > 0.9
    # Swapping the rows' meaning must turn a good classifier into a bad one.
    assert accuracy(model, fixed(xs, ys), (3, 7)) < 0.1
    with pytest.raises(ValueError, match="is not among the head.s classes"):
        train(model, make_batches(x[:64], y[:64]), Recipe(epochs=1), classes)


def test_train_rejects_bad_inputs(digits):
    x, y = digits
    with pytest.raises(ValueError, match="logits"):
        train(digits_cnn(num_classes=5), make_batches(x[:64], y[:64] % 3), Recipe(epochs=1), (0, 1, 2))
    with pytest.raises(ValueError, match="no batches"):
        train(digits_cnn(), lambda epoch: iter(()), Recipe(epochs=1), CLASSES)
    with pytest.raises(ValueError, match="more than once"):
        train(digits_cnn(), make_batches(x[:64], y[:64]), Recipe(epochs=1), (1, 1, 2))


def test_train_only_freezes_everything_else(digits):
    x, y = digits
    model = digits_cnn(width=8)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grads_before = {n: p.requires_grad for n, p in model.named_parameters()}
    train(model, make_batches(x, y), Recipe(lr=0.05, epochs=1, train_only="fc"), CLASSES)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"fc.weight", "fc.bias"}  # BN running stats included: frozen parts run in eval
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads_before
    assert all(m.training for m in model.modules())
    with pytest.raises(UmigError, match="nope"):
        train(model, make_batches(x, y), Recipe(epochs=1, train_only="nope"), CLASSES)
    # A prefix matches whole module names only: "f" is not "fc" or "features".
    with pytest.raises(UmigError):
        train(model, make_batches(x, y), Recipe(epochs=1, train_only="f"), CLASSES)


# ---------------------------------------------------------------------------- fedavg


def test_fedavg_identity_and_weights(digits):
    x, y = digits
    a = digits_cnn(width=8)
    train(a, make_batches(x[:256], y[:256]), Recipe(epochs=1), CLASSES)
    sa = a.state_dict()
    same = fedavg([sa, sa, sa], [1.0, 2.0, 7.0])
    assert all(torch.equal(same[k], sa[k]) for k in sa)

    b = digits_cnn(width=8)
    sb = b.state_dict()
    mixed = fedavg([sa, sb], [1, 3])
    for k, v in sa.items():
        if v.is_floating_point():
            assert torch.allclose(mixed[k], 0.25 * v + 0.75 * sb[k], atol=1e-6)
            assert mixed[k].dtype == v.dtype
    # Integer step counters take the max (a trained for some steps, b for none).
    key = "features.1.num_batches_tracked"
    assert int(sa[key]) > 0 and int(sb[key]) == 0
    assert torch.equal(mixed[key], sa[key]) and mixed[key].dtype == torch.int64
    only_b = fedavg([sa, sb], [0, 1])
    assert torch.equal(only_b["fc.weight"], sb["fc.weight"])


def test_fedavg_rejects_mismatch():
    sa = tiny_mlp().state_dict()
    with pytest.raises(ValueError, match="keys differ"):
        fedavg([sa, {k: v for k, v in sa.items() if k != "fc.bias"}], [1, 1])
    with pytest.raises(ValueError, match="shape"):
        fedavg([sa, tiny_mlp(num_classes=3).state_dict()], [1, 1])
    with pytest.raises(ValueError):
        fedavg([sa, sa], [1])
    with pytest.raises(ValueError):
        fedavg([sa, sa], [1, -1])
    with pytest.raises(ValueError):
        fedavg([], [])


# ---------------------------------------------------------------------------- accuracy


def test_accuracy_counts_unknown_labels_wrong_and_restores_mode():
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.0, 5.0, 0.0]))  # always row 1
    model.train()
    classes = (10, 20, 30)
    x = torch.zeros(4, 2)
    assert accuracy(model, [(x, torch.tensor([20, 20, 20, 20]))], classes) == 1.0
    assert accuracy(model, [(x, torch.tensor([20, 10, 99, 20]))], classes) == 0.5
    assert model.training
    with pytest.raises(ValueError):
        accuracy(model, [], classes)


# ---------------------------------------------------------------------------- recipe


def test_recipe_json_round_trip_and_file(tmp_path):
    r = Recipe(optimizer="adam", lr=1e-3, epochs=3, batch_size=32, seed=5, momentum=0.0, weight_decay=1e-4, train_only="fc")
    assert Recipe.from_json(r.to_json()) == r
    assert Recipe.from_json(json.dumps(r.to_json())) == r
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"optimizer": "adam", "lr": 1, "epochs": 2}))
    loaded = Recipe.from_file(path)
    assert loaded == Recipe(optimizer="adam", lr=1.0, epochs=2) and isinstance(loaded.lr, float)


def test_recipe_file_errors(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"lr": 0.1, "epoch": 3, "batchsize": 8}))
    with pytest.raises(UmigError) as exc:
        Recipe.from_file(path)
    assert "batchsize" in str(exc.value) and "epoch" in str(exc.value)
    path.write_text("{not json")
    with pytest.raises(UmigError, match="not valid JSON"):
        Recipe.from_file(path)
    path.write_text("[1, 2]")
    with pytest.raises(UmigError, match="object"):
        Recipe.from_file(path)
    with pytest.raises(NotFoundError):
        Recipe.from_file(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "bad",
    [
        {"optimizer": "rmsprop"},
        {"lr": 0},
        {"lr": "fast"},
        {"epochs": 0},
        {"epochs": 1.5},
        {"batch_size": True},
        {"momentum": 1.0},
        {"weight_decay": -1},
        {"train_only": ""},
    ],
)
def test_recipe_validation(bad):
    with pytest.raises(UmigError):
        Recipe(**bad)


def test_batchnorm_model_trains_when_the_last_batch_has_one_item(digits):
    # 65 items at batch size 64 leave a last batch of one, which BatchNorm cannot normalise in
    # training mode (ResNets in recorders' fit and in retrain used to crash on it).
    x, y = digits
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))
    before = model[4].weight.detach().clone()
    out = train(model, make_batches(x[:65].reshape(65, -1), y[:65]), Recipe(epochs=2, batch_size=64), CLASSES)
    assert out["loss"] == out["loss"] and not torch.equal(before, model[4].weight)
    with pytest.raises(ValueError, match="BatchNorm needs two"):
        train(model, make_batches(x[:1].reshape(1, -1), y[:1]), Recipe(epochs=1, batch_size=64), CLASSES)
