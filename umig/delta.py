"""The sparse delta: what an adapter or channel fine-tuning changed, kept apart from the weights.

In memory a delta is ``{param: (flat_indices int64, values)}``; stored as a blob it is the
flat tensor dict ``{"P::idx": indices, "P::val": values}``. Adding a delta to the weights
it was trained on gives the adapted model; dropping it restores them bit for bit.

>>> import torch
>>> w = {"fc.weight": torch.zeros(2, 2)}
>>> d = encode({"fc.weight": (torch.tensor([3]), torch.tensor([1.5]))})
>>> sorted(d)
['fc.weight::idx', 'fc.weight::val']
>>> apply(w, d); w["fc.weight"].tolist()
[[0.0, 0.0], [0.0, 1.5]]
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from umig.errors import UmigError

Delta = Mapping[str, tuple[Tensor, Tensor]]
_IDX, _VAL = "::idx", "::val"


def sparse(index: Mapping[str, Tensor], values: Mapping[str, Tensor]) -> dict[str, tuple[Tensor, Tensor]]:
    """Keep only the non-zero entries (adding 0.0 changes nothing, so the model is the same)."""
    out = {}
    for n, i in index.items():
        v = values[n].detach().cpu()
        nz = v != 0
        if bool(nz.any()):
            out[n] = (i.cpu().long()[nz], v[nz].clone())
    return out


def entries(delta: Delta) -> int:
    """How many weights a delta changes."""
    return sum(int(i.numel()) for i, _ in delta.values())


def encode(delta: Delta) -> dict[str, Tensor]:
    """The stored (blob) form of a delta: CPU, contiguous, int64 indices."""
    out: dict[str, Tensor] = {}
    for pname, (idx, val) in delta.items():
        out[pname + _IDX] = idx.detach().cpu().long().contiguous()
        out[pname + _VAL] = val.detach().cpu().contiguous()
    return out


def apply(state: dict[str, Tensor], stored: Mapping[str, Tensor]) -> None:
    """Add a stored delta to ``state`` in place (each changed tensor is copied, never aliased)."""
    for key in stored:
        if not key.endswith(_IDX):
            continue
        pname = key[: -len(_IDX)]
        if pname not in state:
            raise UmigError(f"delta refers to unknown tensor '{pname}'")
        t = state[pname].clone()
        t.view(-1).index_add_(0, stored[key].long(), stored[pname + _VAL].to(t.dtype))
        state[pname] = t


def stack(earlier: Mapping[str, Tensor], later: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """One stored delta equal to applying ``earlier`` then ``later`` (so one revert undoes both)."""
    out = dict(earlier)
    for key in later:
        if not key.endswith(_IDX):
            continue
        p = key[: -len(_IDX)]
        if key in out:
            out[key] = torch.cat([out[key], later[key]])
            out[p + _VAL] = torch.cat([out[p + _VAL], later[p + _VAL]])
        else:
            out[key] = later[key]
            out[p + _VAL] = later[p + _VAL]
    return out


def merged(state: Mapping[str, Tensor], delta: Delta) -> dict[str, Tensor]:
    """Full weights with ``delta`` added exactly as the store applies it."""
    out = {k: v.detach().cpu() for k, v in state.items()}
    apply(out, encode(delta))
    return out
