"""The Python API's facade: one object that records, plans and forgets.

``Store`` is the metadata store (:class:`umig.store.SqlStore`) plus the operations of the
layers above it: :func:`umig.unlearning.add_node` (:func:`umig.ingest.add_node` with the
catch-up), :func:`umig.unlearning.unlearn` and :func:`umig.unlearning.purge`. It adds no logic of its own.
"""

from __future__ import annotations

from typing import Any

from umig import unlearning
from umig.store import NodeInfo, SqlStore


class Store(SqlStore):
    """A lineage store. Open with :meth:`init` or :meth:`open`; see the README for a tour."""

    def add_node(self, name: str, weights: Any, arch: Any, **kwargs: Any) -> NodeInfo:
        """Record a model node; see :func:`umig.ingest.add_node`. ``catch_up=True`` records a node derived
        from a superseded version (or trained on forgotten data) and unlearns it on the spot instead of
        refusing it; see :func:`umig.unlearning.add_node`."""
        return unlearning.add_node(self, name, weights, arch, **kwargs)

    def plan_unlearning(self, forget: unlearning.Forget = (), **kwargs: Any) -> unlearning.UnlearnResult:
        """The plan of an unlearning request without running it; see :func:`umig.unlearning.plan_unlearning`."""
        return unlearning.plan_unlearning(self, forget, **kwargs)

    def purge(self, op_id: str) -> dict[str, Any]:
        """Irreversibly delete what an operation superseded, and its forgotten labels' statistics from the
        model FIMs its nodes keep; see :func:`umig.unlearning.purge`."""
        return unlearning.purge(self, op_id)

    def unlearn(self, forget: unlearning.Forget = (), **kwargs: Any) -> unlearning.UnlearnResult:
        """Forget a forget set (labels, samples, clients) across the lineage as one operation, recording
        the deletion request it answers (``request={"requester": ..., "reason": ..., "ticket": ...}``);
        see :func:`umig.unlearning.unlearn`."""
        return unlearning.unlearn(self, forget, **kwargs)
