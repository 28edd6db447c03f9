"""Tests for umig.arch (specs, checkpoint import, head detection) and umig.models."""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from umig.arch import (
    ArchSpec,
    HeadInfo,
    count_parameters,
    find_head,
    load_state_dict_file,
    load_weights,
    parse_arch_args,
)
from umig.errors import ArchError, UmigError
from umig.models import MODELS, digits_cnn, digits_mlp, tiny_mlp


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny forward passes: thread start-up and contention cost more than they save.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg
    return msg


# ---------------------------------------------------------------------------- parse_arch_args


def test_parse_arch_args_types():
    got = parse_arch_args(
        ["num_classes=10", "neg=-3", "lr=0.5", "eps=1e-3", "flag=true", "off=FALSE", "name=resnet", "empty="]
    )
    assert got == {
        "num_classes": 10,
        "neg": -3,
        "lr": 0.5,
        "eps": 1e-3,
        "flag": True,
        "off": False,
        "name": "resnet",
        "empty": "",
    }
    assert type(got["num_classes"]) is int and type(got["lr"]) is float and type(got["flag"]) is bool
    # Non-finite spellings stay strings: nobody means a width of NaN.
    assert parse_arch_args(["act=nan"]) == {"act": "nan"}
    assert parse_arch_args([]) == {}


@pytest.mark.parametrize("items", [["noequals"], ["=5"], ["bad key=1"], ["a=1", "a=2"], ["1x=3"]])
def test_parse_arch_args_errors(items):
    with pytest.raises(ArchError) as exc:
        parse_arch_args(items)
    _one_line(exc)


# ---------------------------------------------------------------------------- ArchSpec


def test_archspec_json_round_trip_and_copy():
    kwargs = {"num_classes": 5, "width": 8}
    spec = ArchSpec("umig.models:digits_cnn", kwargs)
    kwargs["width"] = 99  # a caller's later mutation must not leak into the frozen spec
    assert spec.kwargs == {"num_classes": 5, "width": 8}
    data = spec.to_json()
    assert data == {"spec": "umig.models:digits_cnn", "kwargs": {"num_classes": 5, "width": 8}}
    assert ArchSpec.from_json(data) == spec
    import json

    assert ArchSpec.from_json(json.dumps(data)) == spec
    assert ArchSpec.from_json({"spec": "torchvision:resnet18"}).kwargs == {}
    with pytest.raises(ArchError, match="extra"):
        ArchSpec.from_json({"spec": "torchvision:resnet18", "extra": 1})
    with pytest.raises(ArchError):
        ArchSpec("umig.models:digits_cnn", {"f": object()}).to_json()


def test_user_callable_spec_builds_in_repo_model():
    model = ArchSpec("umig.models:digits_cnn", {"num_classes": 4, "width": 8}).build()
    info = find_head(model)
    assert info == HeadInfo("fc", 64, 4, (1, 8, 8))
    assert model(torch.zeros(3, 1, 8, 8)).shape == (3, 4)


@pytest.mark.parametrize(
    ("spec", "kwargs", "needle"),
    [
        ("torchvision:resnet1800", {}, "resnet18"),  # suggests the close match
        ("torchvision:fasterrcnn_resnet50_fpn", {}, "classification"),  # not a classifier
        ("no_such_module_xyz.sub:f", {}, "cannot import"),
        ("umig.models:no_such_model", {}, "no attribute"),
        ("umig.models:MODELS", {}, "not callable"),
        ("umig.models:digits_cnn", {"bogus": 1}, "bogus"),
        ("umig.models:digits_cnn", {"num_classes": 0}, "num_classes"),
        ("torchvision:resnet18", {"bogus": 1}, "bogus"),
        ("torchvision:resnet18", {"weights": "IMAGENET1K_V1"}, "weights"),
        ("umig.errors:ArchError", {}, "not a torch.nn.Module"),
    ],
)
def test_bad_specs_raise_arch_error(spec, kwargs, needle):
    with pytest.raises(ArchError) as exc:
        ArchSpec(spec, kwargs).build()
    assert needle in _one_line(exc)


@pytest.mark.parametrize("spec", ["resnet18", "torchvision:", ":f", "a b:c", ""])
def test_malformed_spec_rejected_at_construction(spec):
    with pytest.raises(ArchError):
        ArchSpec(spec)
    assert issubclass(ArchError, UmigError)


# ---------------------------------------------------------------------------- torchvision heads


def test_torchvision_resnet18_head():
    spec = ArchSpec("torchvision:resnet18", {"num_classes": 10})
    model = spec.build()
    assert isinstance(model, nn.Module) and spec.is_torchvision
    info = find_head(model)
    assert (info.name, info.in_features, info.out_features) == ("fc", 512, 10)
    assert info.input_shape == (3, 32, 32)  # cheapest RGB probe, from the first conv's 3 channels
    assert find_head(model, head="fc", input_shape=(3, 64, 64)).input_shape == (3, 64, 64)


def test_torchvision_alexnet_head_probes_past_too_small_input():
    model = ArchSpec("torchvision:alexnet", {"num_classes": 7}).build()
    info = find_head(model)  # 32x32 collapses alexnet's pools; the probe must move on to 64x64
    assert (info.name, info.out_features, info.input_shape) == ("classifier.6", 7, (3, 64, 64))
    # Picking a hidden layer as head must fail verification and point at --head.
    with pytest.raises(ArchError) as exc:
        find_head(model, head="classifier.1", input_shape=(3, 64, 64))
    assert "--head" in _one_line(exc)


@pytest.mark.parametrize(("name", "features"), [("densenet121", 1024), ("densenet161", 2208)])
def test_torchvision_densenet_head(name, features):
    model = ArchSpec(f"torchvision:{name}", {"num_classes": 3}).build()
    info = find_head(model, input_shape=(3, 64, 64))
    assert (info.name, info.in_features, info.out_features) == ("classifier", features, 3)


def test_torchvision_vgg11_head():
    model = ArchSpec("torchvision:vgg11", {"num_classes": 5}).build()
    info = find_head(model, input_shape=(3, 32, 32))
    assert (info.name, info.in_features, info.out_features) == ("classifier.6", 4096, 5)


# ---------------------------------------------------------------------------- find_head edge cases


def test_find_head_models_without_declared_shape():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 16), nn.ReLU(), nn.Linear(16, 5))
    assert find_head(mlp) == HeadInfo("3", 16, 5, (784,))
    # A fixed-size flatten: 8x8 fails, 28x28 fits.
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 4))
    assert find_head(cnn).input_shape == (1, 28, 28)
    assert find_head(tiny_mlp(in_features=20)).input_shape == (20,)
    assert find_head(digits_mlp(num_classes=3)) == HeadInfo("fc", 64, 3, (1, 8, 8))


class _AuxAfterHead(nn.Module):
    """The last registered Linear is an unused auxiliary layer, not the logits."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 2)
        self.input_shape = (6,)

    def forward(self, x):
        return self.fc(torch.relu(self.body(x)))


def test_find_head_rejects_wrong_candidate_and_accepts_explicit_head():
    model = _AuxAfterHead()
    with pytest.raises(ArchError) as exc:
        find_head(model)
    msg = _one_line(exc)
    assert "aux" in msg and "--head" in msg
    assert find_head(model, head="fc").name == "fc"
    with pytest.raises(ArchError, match="no module"):
        find_head(model, head="nope")
    with pytest.raises(ArchError, match="not an nn.Linear"):
        find_head(digits_cnn(), head="features.0")


def test_find_head_rejects_post_processed_output():
    def linear() -> nn.Linear:
        # A fixed, very negative bias on one row: ReLU must change the output whatever the random init
        # (with all logits positive it is the identity, and nothing could tell it apart).
        lin = nn.Linear(4, 3)
        with torch.no_grad():
            lin.bias.copy_(torch.tensor([-100.0, 0.0, 100.0]))
        return lin

    for model in (nn.Sequential(linear(), nn.Softmax(dim=1)), nn.Sequential(linear(), nn.ReLU(inplace=True))):
        with pytest.raises(ArchError) as exc:
            find_head(model)
        assert "--head" in _one_line(exc)
    with pytest.raises(ArchError, match="no nn.Linear"):
        find_head(nn.Sequential(nn.Conv2d(1, 2, 3)))


def test_find_head_bad_input_shape_and_mode_restore():
    model = digits_cnn()
    model.train()
    model.features[1].eval()  # a deliberately frozen BN must stay frozen
    before = {n: m.training for n, m in model.named_modules()}
    with pytest.raises(ArchError) as exc:
        find_head(model, input_shape=(3, 5, 5))
    _one_line(exc)
    assert find_head(model).name == "fc"
    assert {n: m.training for n, m in model.named_modules()} == before
    # eval mode during the probe: BatchNorm running stats must not move.
    assert int(model.features[4].num_batches_tracked) == 0


# ---------------------------------------------------------------------------- checkpoints


def test_load_state_dict_file_safetensors_and_pt(tmp_path):
    sd = {k: v.clone() for k, v in digits_cnn().state_dict().items()}
    st = tmp_path / "w.safetensors"
    save_file(sd, str(st))
    pt = tmp_path / "w.pt"
    torch.save(sd, pt)
    nested = tmp_path / "ckpt.pth"
    torch.save({"epoch": 3, "state_dict": sd}, nested)
    nested_model = tmp_path / "ckpt.bin"
    torch.save({"model": sd, "opt": {"lr": 0.1}}, nested_model)
    for path in (st, pt, nested, nested_model):
        got = load_state_dict_file(path)
        assert set(got) == set(sd)
        assert all(torch.equal(got[k], sd[k]) for k in sd)


class _Evil:
    """Unpickling this would create a file: proof the loader executed pickle code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_load_state_dict_file_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        torch.save({"fc.weight": torch.zeros(2), "payload": _Evil(marker)}, fh)
    with pytest.raises(ArchError) as exc:
        load_state_dict_file(path)
    assert "evil.pt" in _one_line(exc)
    assert not marker.exists()


def test_load_state_dict_file_bad_files(tmp_path):
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00garbage" * 20)
    bad_pt = tmp_path / "bad.pt"
    bad_pt.write_bytes(b"not a zip file at all")
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], not_dict)
    non_tensor = tmp_path / "mixed.pt"
    torch.save({"w": torch.zeros(1), "step": 3}, non_tensor)
    other = tmp_path / "weights.pkl"
    other.write_bytes(b"x")
    for path in (bad_st, bad_pt, not_dict, non_tensor, other, tmp_path / "missing.safetensors"):
        with pytest.raises(ArchError) as exc:
            load_state_dict_file(path)
        assert path.name in _one_line(exc)


def test_load_weights_strict_and_single_line_summary():
    src = digits_cnn(num_classes=10)
    dst = digits_cnn(num_classes=5)
    snapshot = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(ArchError) as exc:
        load_weights(dst, src.state_dict())
    msg = _one_line(exc)
    assert "2 shape mismatches" in msg and "fc.weight" in msg and "(10, 64)" in msg
    assert all(torch.equal(dst.state_dict()[k], v) for k, v in snapshot.items())  # untouched

    sd = dict(src.state_dict())
    sd.pop("fc.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(ArchError) as exc:
        load_weights(digits_cnn(num_classes=10), sd)
    msg = _one_line(exc)
    assert "1 missing (fc.bias)" in msg and "1 unexpected (extra.weight)" in msg

    twin = digits_cnn(num_classes=10)
    load_weights(twin, src.state_dict())
    assert all(torch.equal(twin.state_dict()[k], v) for k, v in src.state_dict().items())


def test_count_parameters_and_registry():
    assert count_parameters(tiny_mlp(in_features=16, num_classes=10, hidden=64)) == 16 * 64 + 64 + 64 * 10 + 10
    assert set(MODELS) == {"digits_cnn", "digits_mlp", "tiny_mlp"}
    for name, factory in MODELS.items():
        model = ArchSpec(f"umig.models:{name}").build()
        assert type(model) is type(factory())
        assert find_head(model).name == "fc"
