"""Lineage recorders: small helpers a training loop calls to record its models as it trains.

Each recorder writes nodes and edges with the right relations, data references,
classes and recipes, so users never hand-type ``add-node`` for a thousand clients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from umig.data import Data, DataRef, parse_ref, resolve, save_subset
from umig.store import NodeInfo, Store


def subset_ref(store: Store, source: str, indices: Sequence[int] | np.ndarray | torch.Tensor,
               only_labels: Sequence[int] | None = None) -> Data:
    """Data for ``indices`` of a reference, with its index file kept in the store (content-addressed)."""
    idx = np.asarray(torch.as_tensor(indices).cpu().numpy(), dtype=np.int64)
    import hashlib

    digest = hashlib.sha256(idx.tobytes()).hexdigest()[:32]
    path = Path(store.root) / "subsets" / f"{digest}.npy"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_subset(path, idx)
    return resolve(parse_ref(source, subset=str(path), only_labels=only_labels))


class FederatedRecorder:
    """Record a federated run: per round, each client's local model and the aggregate.

    Client ``i`` of round ``r`` has the previous global model as parent; the
    aggregate has the round's clients as parents with FedAvg weights (data shares).
    """

    def __init__(self, store: Store, arch: Any, *, prefix: str = "fl", classes: Sequence[int] | None = None,
                 head: str | None = None, recipe: Any = None) -> None:
        self.store, self.arch, self.prefix = store, arch, prefix
        self.classes, self.head, self.recipe = classes, head, recipe
        self.global_node: str | None = None
        self._clients: dict[int, list[tuple[str, int]]] = {}

    def initial(self, model: nn.Module | Mapping[str, torch.Tensor], name: str | None = None) -> NodeInfo:
        """The initial global model (no data of its own)."""
        info = self.store.add_node(name or f"{self.prefix}/init", model, self.arch, framework="fl",
                                   classes=self.classes, head=self.head)
        self.global_node = info.name
        return info

    def client(self, round: int, client: int | str, model: nn.Module | Mapping[str, torch.Tensor],
               data: Data | str, *, recipe: Any = None, name: str | None = None) -> NodeInfo:
        """A client's model after local training in ``round`` on ``data``."""
        parents = [self.global_node] if self.global_node else []
        info = self.store.add_node(
            name or f"{self.prefix}/r{round}/c{client}", model, self.arch, parents=parents, relation="finetune",
            framework="fl", data=data, classes=self.classes, head=self.head, recipe=recipe or self.recipe,
            meta={"round": round, "client": client})
        self._clients.setdefault(round, []).append((info.name, info.data_size))
        return info

    def aggregate(self, round: int, model: nn.Module | Mapping[str, torch.Tensor], *,
                  name: str | None = None) -> NodeInfo:
        """The aggregated global model of ``round`` (parents: that round's clients, weighted by data share)."""
        clients = self._clients.get(round)
        if not clients:
            raise ValueError(f"round {round} has no recorded clients")
        total = sum(n for _, n in clients) or 1
        info = self.store.add_node(
            name or f"{self.prefix}/r{round}/global", model, self.arch,
            parents=[(c, n / total) for c, n in clients], relation="aggregate", framework="fl",
            classes=self.classes, head=self.head, meta={"round": round})
        self.global_node = info.name
        return info
