"""Flower (``umig[flower]``): a FedAvg strategy that records every round in a lineage store.

Flower's Message API (flwr 1.2x): the ServerApp's strategy sends the global ``ArrayRecord``
to the sampled SuperNodes and aggregates their replies in ``aggregate_train``. The
strategies here do exactly what Flower's do and, around that, record

* the initial global model (when round 1 is configured, unless ``initial=`` names a node),
* each replying client's model, read from its reply's ``ArrayRecord`` (a child of the global
  model it trained from, relation ``finetune``, with the client's data reference),
* the aggregate (relation ``aggregate``) with the replies' FedAvg weights, ``num-examples``
  (``weighted_by_key``) normalised to sum 1,

one transaction per round. The client's identity comes from the reply's metadata
(``src_node_id``) unless ``client_id`` maps a reply to a stable id (e.g. a partition id the
ClientApp puts in its metrics). The data reference is the user's: a mapping from client id
to reference, or a callable ``data(reply) -> reference``::

    strategy = UmigFedAvg(store, arch, data=lambda msg: shards[int(msg.content["metrics"]["partition-id"])],
                          classes=range(10), fraction_evaluate=0.0)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=3)

``LineageStrategy`` is a mixin: ``class Recorded(LineageStrategy, FedProx)`` records any
strategy whose aggregate is FedAvg's weighted mean.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

try:
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import FedAvg
except ImportError as e:  # the extra is optional; say which one is missing
    raise ImportError(f"umig.integrations.flower needs Flower (pip install 'umig[flower]'): {e}") from e

from umig.data import Data
from umig.errors import UmigError
from umig.lineage import FederatedRecorder
from umig.store import NodeInfo, SqlStore

__all__ = ["LineageStrategy", "UmigFedAvg", "reply_state"]

DataSpec = Mapping[Any, Data | str | None] | Callable[[Message], Data | str | None] | None


def reply_state(reply: Message, key: str = "arrays") -> dict[str, torch.Tensor]:
    """The model a reply carries, as a torch state dict: its only ``ArrayRecord``, or the one at ``key``."""
    records = reply.content.array_records
    if len(records) == 1:
        record = next(iter(records.values()))
    elif key in records:
        record = records[key]
    else:
        raise UmigError(f"reply from Flower node {reply.metadata.src_node_id} carries {len(records)} "
                        f"ArrayRecords and none named '{key}'")
    return dict(record.to_torch_state_dict())


def _weight(reply: Message, key: str) -> float:
    """The reply's FedAvg weight: ``key`` in its first ``MetricRecord`` (as Flower's FedAvg reads it)."""
    for record in reply.content.metric_records.values():
        if key in record:
            return float(record[key])
        break
    raise UmigError(f"reply from Flower node {reply.metadata.src_node_id} has no metric '{key}' "
                    "(the FedAvg weight; send it in the reply's MetricRecord)")


class LineageStrategy:
    """Mixin for a Flower strategy (FedAvg or a subclass): records each round's clients and aggregate.

    ``store``/``arch`` as for :class:`umig.lineage.FederatedRecorder` (``classes``, ``head``,
    ``recipe``, ``prefix``, ``compute_fim`` too). ``data`` maps a client id to its data
    reference, or is a callable ``data(reply)``; a client with no reference (``None``) is
    recorded without data. ``client_id(reply)`` gives the id used in node names
    (``{prefix}/r{round}/c{id}``) and ``data`` keys; the default is the reply's
    ``src_node_id``. ``recipe`` may be a callable ``recipe(reply)`` for per-client recipes.
    ``initial`` names an existing node as the first global model instead of recording the
    arrays round 1 sends. Other keyword arguments go to the strategy.
    """

    weighted_by_key: str
    arrayrecord_key: str

    def __init__(self, store: SqlStore, arch: Any, *, data: DataSpec = None,
                 client_id: Callable[[Message], int | str] | None = None, classes: Sequence[int] | None = None,
                 head: str | None = None, recipe: Any = None, prefix: str = "flower", initial: str | None = None,
                 compute_fim: bool = True, device: str | torch.device | None = None, **strategy_kwargs: Any) -> None:
        super().__init__(**strategy_kwargs)
        client_recipe = recipe if callable(recipe) and not isinstance(recipe, type) else None
        self.recorder = FederatedRecorder(store, arch, prefix=prefix, classes=classes, head=head,
                                          recipe=None if client_recipe else recipe, device=device,
                                          compute_fim=compute_fim)
        self.data, self.client_id, self.client_recipe = data, client_id, client_recipe
        if initial is not None:
            if not store.has_node(initial):
                raise UmigError(f"initial node '{initial}' is not in the store")
            self.recorder.global_node = initial
        self.rounds: dict[int, list[str]] = {}  # round -> the nodes recorded for it (clients, then aggregate)

    @property
    def store(self) -> SqlStore:
        return self.recorder.store

    @property
    def global_node(self) -> str | None:
        """The node of the current global model (what the next round's clients train from)."""
        return self.recorder.global_node

    def record_initial(self, arrays: ArrayRecord, name: str | None = None) -> NodeInfo:
        """Record ``arrays`` as the initial global model (done for you when round 1 is configured)."""
        return self.recorder.initial(dict(arrays.to_torch_state_dict()), name=name)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """Flower's ``configure_train``, after recording the initial model if no global is known yet."""
        if self.recorder.global_node is None:
            self.record_initial(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def _client_key(self, reply: Message) -> int | str:
        return self.client_id(reply) if self.client_id else reply.metadata.src_node_id

    def _data_of(self, reply: Message, key: int | str) -> Data | str | None:
        if self.data is None:
            return None
        if callable(self.data):
            return self.data(reply)
        if key not in self.data:
            raise UmigError(f"no data reference for Flower client {key!r} (node {reply.metadata.src_node_id}); "
                            "add it to the strategy's data mapping")
        return self.data[key]

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's aggregation, then one transaction recording the round's clients and the aggregate."""
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        valid = [m for m in replies if not m.has_error()]
        if arrays is None or not valid:
            return arrays, metrics
        if self.recorder.global_node is None:
            raise UmigError("no global model recorded: call record_initial() or pass initial=")
        # Read and check everything before the first write.
        clients = []
        for reply in valid:
            key = self._client_key(reply)
            clients.append((key, reply, reply_state(reply, self.arrayrecord_key),
                            _weight(reply, self.weighted_by_key), self._data_of(reply, key)))
        rec = self.recorder
        parent, done = rec.global_node, len(rec.nodes)
        try:
            with self.store.batch():
                names = []
                for key, reply, state, weight, data in clients:
                    meta = {"round": server_round, "client": key, "flower_node_id": reply.metadata.src_node_id,
                            self.weighted_by_key: weight}
                    recipe = self.client_recipe(reply) if self.client_recipe else None
                    names.append(rec.record(f"{rec.prefix}/r{server_round}/c{key}", state, parents=[parent],
                                            relation="finetune", data=data, recipe=recipe, meta=meta).name)
                agg = rec.aggregate(server_round, dict(arrays.to_torch_state_dict()), parents=names,
                                    weights=[c[3] for c in clients], meta={"flower_strategy": type(self).__name__})
        except BaseException:
            del rec.nodes[done:]  # the round's transaction rolled back: nothing of it was written
            rec.global_node = parent
            raise
        self.rounds[server_round] = [*names, agg.name]
        return arrays, metrics


class UmigFedAvg(LineageStrategy, FedAvg):
    """Flower's ``FedAvg`` that records every round in a umig store (see :class:`LineageStrategy`)."""
