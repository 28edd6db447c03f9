"""Architecture specs, checkpoint import and classifier-head detection.

A model node stores an :class:`ArchSpec` (how to rebuild the network) next to its safetensors
weights. Unlearning edits the classifier head, so :func:`find_head` locates it and proves by a
dummy forward pass that the model's logits really are that ``nn.Linear``'s output.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import json
import math
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from umig.errors import ArchError

__all__ = [
    "ArchSpec",
    "HeadInfo",
    "count_parameters",
    "eval_mode",
    "find_head",
    "load_state_dict_file",
    "load_weights",
    "parse_arch_args",
]

TORCHVISION_PREFIX = "torchvision"

# Shapes tried, in order, when neither the caller nor the model says what input it takes.
_FALLBACK_SHAPES: tuple[tuple[int, ...], ...] = ((3, 224, 224), (3, 32, 32), (1, 28, 28), (1, 8, 8))
# Spatial sizes tried, smallest first, once the first conv tells us the channel count. RGB
# models start at CIFAR size: ImageNet nets with adaptive pooling run there at a fraction of the
# 224x224 cost, and tiny sizes would record a misleading input shape.
_RGB_SIZES = (32, 64, 224)
_OTHER_SIZES = (8, 28, 32, 64, 224)
_SHOWN = 3  # how many offending keys an error message lists before counting the rest


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _listing(items: Sequence[str], n: int = _SHOWN) -> str:
    shown = ", ".join(items[:n])
    return shown + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------
# Specs


@dataclass(frozen=True)
class ArchSpec:
    """How to rebuild a network: ``torchvision:NAME`` or ``package.module:callable`` plus kwargs.

    Torchvision builders are always called with ``weights=None``: umig never downloads weights,
    they come from the store or an explicit checkpoint import.
    """

    spec: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.spec, str):
            raise ArchError(f"architecture spec must be a string, got {type(self.spec).__name__}")
        module, sep, attr = self.spec.partition(":")
        if not sep or not module.strip() or not attr.strip() or any(c.isspace() for c in self.spec):
            raise ArchError(
                f"bad architecture spec {self.spec!r}: expected 'torchvision:NAME' or 'package.module:callable'"
            )
        if not isinstance(self.kwargs, Mapping):
            raise ArchError(f"architecture kwargs must be a mapping, got {type(self.kwargs).__name__}")
        bad = [k for k in self.kwargs if not isinstance(k, str)]
        if bad:
            raise ArchError(f"architecture kwargs keys must be strings, got {bad!r}")
        # Own a copy so a caller mutating its dict cannot change a frozen spec behind our back.
        object.__setattr__(self, "kwargs", dict(self.kwargs))

    @property
    def is_torchvision(self) -> bool:
        """True for ``torchvision:NAME`` specs."""
        return self.spec.partition(":")[0] == TORCHVISION_PREFIX

    def __str__(self) -> str:
        args = " ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items()))
        return f"{self.spec} {args}".rstrip()

    def build(self) -> nn.Module:
        """Instantiate the network with fresh (random) weights; any failure is an ArchError."""
        if "weights" in self.kwargs or "pretrained" in self.kwargs:
            raise ArchError(
                f"{self.spec}: 'weights'/'pretrained' kwargs are not allowed; import a checkpoint file instead"
            )
        builder = self._resolve()
        try:
            model = builder(weights=None, **self.kwargs) if self.is_torchvision else builder(**self.kwargs)
        except Exception as exc:  # user code may raise anything; report it as one line
            raise ArchError(f"{self.spec} failed to build with kwargs {self.kwargs!r}: {_first_line(exc)}") from exc
        if not isinstance(model, nn.Module):
            raise ArchError(f"{self.spec} returned {type(model).__name__}, not a torch.nn.Module")
        return model

    def _resolve(self) -> Any:
        module_name, _, attr = self.spec.partition(":")
        if module_name == TORCHVISION_PREFIX:
            import torchvision.models

            # Only classification builders: detection/segmentation nets have no single logits head.
            names = torchvision.models.list_models(module=torchvision.models)
            if attr not in names:
                close = difflib.get_close_matches(attr, names, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise ArchError(f"unknown torchvision classification model {attr!r}{hint}")
            return torchvision.models.get_model_builder(attr)
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as exc:  # ImportError, or anything the module raises at import time
            raise ArchError(f"{self.spec}: cannot import module {module_name!r}: {_first_line(exc)}") from exc
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ArchError(f"{self.spec}: module {module_name!r} has no attribute {attr!r}") from None
        if not callable(obj):
            raise ArchError(f"{self.spec}: {attr!r} is not callable")
        return obj

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict ``{"spec": ..., "kwargs": {...}}``."""
        data = {"spec": self.spec, "kwargs": dict(self.kwargs)}
        try:
            json.dumps(data)
        except (TypeError, ValueError) as exc:
            raise ArchError(f"{self.spec}: kwargs are not JSON-serialisable: {_first_line(exc)}") from exc
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | str) -> ArchSpec:
        """Inverse of :meth:`to_json`; also accepts the dict serialised as a JSON string."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except json.JSONDecodeError as exc:
                raise ArchError(f"architecture spec is not valid JSON: {exc}") from exc
        if not isinstance(data, Mapping) or "spec" not in data:
            raise ArchError("architecture spec JSON must be an object with a 'spec' key")
        unknown = sorted(set(data) - {"spec", "kwargs"})
        if unknown:
            raise ArchError(f"unknown keys in architecture spec JSON: {', '.join(unknown)}")
        return cls(data["spec"], data.get("kwargs") or {})


def parse_arch_args(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``key=value`` strings into kwargs typed as int, float, bool (true/false) or str."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ArchError(f"bad architecture argument {item!r}: expected key=value with a Python identifier key")
        if key in out:
            raise ArchError(f"architecture argument {key!r} given twice")
        out[key] = _typed(raw.strip())
    return out


def _typed(raw: str) -> Any:
    low = raw.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(raw)
    except ValueError:
        pass
    try:
        value = float(raw)
    except ValueError:
        return raw
    # 'nan'/'inf' parse as floats but are almost always meant as names, never as a width or rate.
    return value if math.isfinite(value) else raw


# --------------------------------------------------------------------------------------------
# Checkpoints

_PICKLE_SUFFIXES = {".pt", ".pth", ".bin"}


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a checkpoint into a flat ``name -> tensor`` dict without ever unpickling arbitrary code.

    ``.safetensors`` files load directly; ``.pt/.pth/.bin`` go through ``torch.load(weights_only=True)``
    and may nest the weights under ``"state_dict"`` or ``"model"``.
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix != ".safetensors" and suffix not in _PICKLE_SUFFIXES:
        raise ArchError(f"{p}: unsupported checkpoint type {suffix or '(no suffix)'!r}; use .safetensors, .pt, .pth or .bin")
    if not p.is_file():
        raise ArchError(f"{p}: checkpoint file not found")
    if suffix == ".safetensors":
        try:
            return load_file(str(p), device="cpu")
        except Exception as exc:  # SafetensorError for bad headers, OSError/ValueError for odd files
            raise ArchError(f"{p}: not a readable safetensors file ({_first_line(exc)})") from exc
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ArchError(f"{p}: refused by torch.load(weights_only=True): {_unpickler_reason(exc)}") from exc
    except Exception as exc:  # truncated zip, garbage bytes, ...: torch raises a zoo of types
        raise ArchError(f"{p}: not a readable torch checkpoint ({_first_line(exc)})") from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ArchError(f"{p}: checkpoint holds a {type(obj).__name__}, not a state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if bad:
        raise ArchError(f"{p}: state dict has {len(bad)} non-tensor entries: {_listing(bad)}")
    if not obj:
        raise ArchError(f"{p}: checkpoint holds an empty state dict")
    return dict(obj)


def _unpickler_reason(exc: BaseException) -> str:
    """Pull the one informative line out of torch's multi-paragraph weights_only error."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        tail = text.split(marker, 1)[1]
        line = next((ln.strip() for ln in tail.splitlines() if ln.strip()), "")
        # "Unsupported global: GLOBAL io.open was not an allowed global by default. Please use ..."
        return line.split(". ")[0] if line else "not a plain tensor checkpoint"
    return _first_line(exc)


def load_weights(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Strictly load ``state_dict`` into ``model``; any mismatch is a one-line ArchError.

    Keys and shapes are checked before copying anything, so a rejected checkpoint leaves the
    model untouched.
    """
    expected = model.state_dict()
    # Old checkpoints lack BatchNorm's counter and torch fills it in; don't flag it as missing.
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected ({_listing(unexpected)})")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatches ({_listing(shapes)})")
    if problems:
        raise ArchError("checkpoint does not fit the architecture: " + "; ".join(problems))
    try:
        model.load_state_dict(dict(state_dict), strict=True)
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())
        raise ArchError(f"checkpoint does not fit the architecture: {msg[:300]}") from exc


def build_model(arch: ArchSpec | Mapping[str, Any], state_dict: Mapping[str, Tensor] | None = None) -> nn.Module:
    """The one way to get a node's model: build ``arch`` and, if given, load ``state_dict`` strictly (eval mode)."""
    spec = arch if isinstance(arch, ArchSpec) else ArchSpec.from_json(arch)
    model = spec.build()
    if state_dict is not None:
        load_weights(model, state_dict)
    return model.eval()


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (trainable or not; shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Head detection


@dataclass(frozen=True)
class HeadInfo:
    """The classifier head: dotted module name, its Linear sizes, and an input shape the model ran on."""

    name: str
    in_features: int
    out_features: int
    input_shape: tuple[int, ...]


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, then restore every submodule's own training flag.

    Per-module restore matters: models with deliberately frozen (eval) BatchNorm layers inside a
    training model would otherwise all come back in train mode.
    """
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def _candidate_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Guess input shapes from the first conv or linear layer, cheapest plausible first."""
    shapes: list[tuple[int, ...]] = []
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    if isinstance(first, nn.Conv2d):
        c = first.in_channels
        shapes += [(c, s, s) for s in (_RGB_SIZES if c == 3 else _OTHER_SIZES)]
    elif isinstance(first, nn.Linear):
        f = first.in_features
        shapes.append((f,))
        # An MLP over flattened images: recover (C, S, S) when the width factors that way.
        for c in (1, 3):
            s = math.isqrt(f // c)
            if f % c == 0 and s * s * c == f:
                shapes.append((c, s, s))
    shapes += [s for s in _FALLBACK_SHAPES if s not in shapes]
    return shapes


def find_head(
    model: nn.Module, *, head: str | None = None, input_shape: Sequence[int] | None = None
) -> HeadInfo:
    """Locate the classifier head and prove the model's output is exactly its output.

    The candidate is ``head`` if given, else the last ``nn.Linear`` in ``named_modules()`` order.
    A batch of 2 dummy inputs runs through the model in eval mode under no_grad (training flags
    are restored afterwards); the shape is ``input_shape``, else ``model.input_shape``, else a
    guess from the first layer.
    """
    modules = dict(model.named_modules())
    if head is not None:
        if head not in modules:
            raise ArchError(f"model has no module named {head!r}")
        if not isinstance(modules[head], nn.Linear):
            raise ArchError(f"module {head!r} is a {type(modules[head]).__name__}, not an nn.Linear head")
        name = head
    else:
        linears = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linears:
            raise ArchError("model has no nn.Linear layer to use as classifier head")
        name = linears[-1]
    layer: nn.Linear = modules[name]  # type: ignore[assignment]
    label = name or "<root>"

    declared = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if declared is None:
        shapes = _candidate_shapes(model)
    else:
        try:
            shapes = [tuple(int(d) for d in declared)]
        except (TypeError, ValueError):
            raise ArchError(f"input shape must be a sequence of ints, got {declared!r}") from None
        if not shapes[0] or min(shapes[0]) < 1:
            raise ArchError(f"input shape must be non-empty positive ints, got {declared!r}")

    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)

    captured: list[Any] = []
    # Clone: an in-place op after the head (ReLU(inplace=True)) would otherwise rewrite the
    # captured tensor into the model's output and fake a match.
    hook = layer.register_forward_hook(
        lambda _m, _i, out: captured.append(out.clone() if isinstance(out, Tensor) else out)
    )
    errors: list[str] = []
    try:
        with eval_mode(model), torch.no_grad():
            for shape in shapes:
                captured.clear()
                # Random rather than zero input: a constant input can make unrelated tensors agree.
                x = torch.randn((2, *shape), generator=gen).to(device=device, dtype=dtype)
                try:
                    out = model(x)
                except Exception as exc:  # wrong input shape surfaces as any error type
                    errors.append(f"{shape}: {_first_line(exc)}")
                    continue
                _verify(label, layer, out, captured)
                return HeadInfo(name, layer.in_features, layer.out_features, shape)
    finally:
        hook.remove()
    tried = ", ".join(str(s) for s in shapes)
    raise ArchError(
        f"could not run a dummy forward pass with input shape(s) {tried}; give the input shape explicitly"
        f" (last error {errors[-1]})"
    )


def _verify(label: str, layer: nn.Linear, out: Any, captured: list[Any]) -> None:
    hint = "; pass --head with the Linear layer that produces the logits"
    if not captured:
        raise ArchError(f"head candidate {label!r} was not used in the forward pass{hint}")
    got = captured[-1]
    if not isinstance(out, Tensor):
        raise ArchError(f"model returns a {type(out).__name__}, not a logits tensor{hint}")
    if tuple(out.shape) != (2, layer.out_features):
        raise ArchError(
            f"model output shape {tuple(out.shape)} is not (batch, {layer.out_features}) of head {label!r}{hint}"
        )
    if not (isinstance(got, Tensor) and got.shape == out.shape and torch.equal(got, out)):
        raise ArchError(f"model output is not the output of head candidate {label!r}{hint}")
