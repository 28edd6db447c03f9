"""The data behind ``umig ui``: each JSON document the page reads, built by the functions the CLI's
``--json`` uses, so the two never drift.

| endpoint | same as | built by |
|---|---|---|
| ``GET /api/graph`` | ``umig graph show --format json`` | :func:`umig.cli.render.graph_json` |
| ``GET /api/nodes/{name}`` | ``umig node show NAME --json`` | :func:`umig.cli.render.node_json` |
| ``GET /api/operations`` | ``umig history --json`` | :meth:`umig.store.SqlStore.history` |
| ``GET /api/operations/{id}`` | one entry of ``umig history --json`` | :meth:`umig.store.SqlStore.operation` |
| ``GET /api/plan?labels=1,2`` | ``umig unlearn --labels 1,2 --dry-run --json`` | :func:`umig.unlearning.plan_unlearning` |
| ``GET /api/methods`` | ``umig methods --json`` | :func:`umig.unlearner.describe` |
| ``POST /api/unlearn`` (``--allow-write``) | ``umig unlearn ... --json`` | :func:`umig.unlearning.unlearn` |
| ``POST /api/operations/{id}/revert`` (``--allow-write``) | ``umig revert ID --json`` | :meth:`umig.store.SqlStore.revert` |

Nothing here knows about HTTP: every function takes the store and plain values and returns plain
JSON data, or raises :class:`umig.errors.UmigError` with one line for the user.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from umig.api import Store
from umig.cli import render as R
from umig.data import parse_labels
from umig.errors import UmigError
from umig.forget import ForgetSet
from umig.store import Request
from umig.unlearner import describe, parse_params

# Fields a POST /api/unlearn body may hold (the options of `umig unlearn` the page offers).
UNLEARN_FIELDS = frozenset({"labels", "clients", "method", "params", "discovery", "from", "eval", "eval_data",
                            "requester", "reason", "ticket"})


def info(store: Store, *, allow_write: bool) -> dict[str, Any]:
    """What the page shows in its header: the store, its size, and whether writes are allowed."""
    return {"store": store.url, "nodes": len(store), "allow_write": allow_write}


def graph(store: Store) -> dict[str, Any]:
    """Every node and edge, and the summary (``umig graph show --format json``)."""
    return R.graph_json(store.graph())


def node(store: Store, name: str) -> dict[str, Any]:
    """One node: record, versions and FIM (``umig node show NAME --json``)."""
    return R.node_json(store.node(name), store.versions(name), store.fim(name))


def operations(store: Store, *, node: str | None = None, ticket: str | None = None,
               requester: str | None = None) -> list[dict[str, Any]]:
    """The audit log, oldest first, optionally filtered (``umig history --json [--node/--ticket/--requester]``).
    Each entry carries its forget set, per-node metrics and ``verification`` (``None`` until verified)."""
    return store.history(node=node, ticket=ticket, requester=requester)


def operation(store: Store, op_id: str) -> dict[str, Any]:
    """One operation's audit entry (as in :func:`operations`)."""
    return store.operation(op_id)


def methods() -> list[dict[str, Any]]:
    """Installed unlearning methods with their parameters (``umig methods --json``)."""
    return describe()


def forget_of(labels: str | Sequence[int] | None) -> ForgetSet:
    """The forget set of a request's labels: text as ``--labels`` takes it (``1,2``, ``0-4``) or a list of ids."""
    if labels is None or labels == "":
        return ForgetSet()
    if isinstance(labels, str):
        return ForgetSet(labels=parse_labels(labels))
    if not isinstance(labels, Sequence) or not all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        raise UmigError(f"labels must be text like '1,2' or a list of label ids, got {labels!r}")
    return ForgetSet(labels=tuple(labels))


def plan(store: Store, *, labels: str | Sequence[int] | None = None, clients: Sequence[str] = (),
         method: str | None = None, params: Mapping[str, Any] | None = None, discovery: str = "first",
         from_nodes: Sequence[str] = ()) -> dict[str, Any]:
    """The plan of a forget request, changing nothing (``umig unlearn ... --dry-run --json``)."""
    forget = forget_of(labels)
    if not forget and not clients:
        raise UmigError("nothing to forget: give labels (e.g. 1,2 or 0-4) or a client node")
    result = store.plan_unlearning(forget, clients=list(clients), method=method or None, params=dict(params or {}),
                                   policy=discovery, from_nodes=list(from_nodes) or None)
    return result.to_json()


def unlearn(store: Store, body: Mapping[str, Any]) -> dict[str, Any]:
    """Run a forget request as one operation (``umig unlearn ... --json``); only with ``--allow-write``.

    ``body``: ``labels`` (text or ids), ``clients``, ``method``, ``params`` (a mapping), ``discovery``,
    ``from``, ``eval`` (default true, as the CLI), ``eval_data``, ``requester``, ``reason``, ``ticket``.
    """
    if not isinstance(body, Mapping):
        raise UmigError("the request body must be a JSON object")
    unknown = sorted(set(body) - UNLEARN_FIELDS)
    if unknown:
        raise UmigError(f"unknown field(s) {', '.join(unknown)} (use {', '.join(sorted(UNLEARN_FIELDS))})")
    request = Request.of({k: body[k] for k in ("requester", "reason", "ticket") if k in body})
    forget = forget_of(body.get("labels"))
    clients = _names(body.get("clients", []), "clients")
    if not forget and not clients:
        raise UmigError("nothing to forget: give labels (e.g. 1,2 or 0-4) or a client node")
    params = body.get("params") or {}
    if not isinstance(params, Mapping):
        raise UmigError("params must be an object of name: value")
    evaluate = body.get("eval", True)
    if not isinstance(evaluate, bool):
        raise UmigError("eval must be true or false")
    result = store.unlearn(forget, clients=clients, method=body.get("method") or None, params=dict(params),
                           policy=body.get("discovery") or "first", from_nodes=_names(body.get("from", []), "from")
                           or None, evaluate=evaluate, eval_data=body.get("eval_data") or None, request=request)
    return result.to_json()


def revert(store: Store, op_id: str) -> dict[str, Any]:
    """Move an operation's nodes back to their previous versions (``umig revert ID --json``)."""
    return {"operation": op_id, "reverted": store.revert(op_id)}


def _names(value: Any, what: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise UmigError(f"{what} must be a list of node names")
    return value


def dumps(data: Any) -> bytes:
    """Compact JSON for the browser: the CLI's data, with NaN and infinities (which ``JSON.parse``
    rejects) written as ``null``."""
    try:
        text = json.dumps(data, separators=(",", ":"), allow_nan=False, default=_default)
    except ValueError:  # a non-finite float somewhere: rare, so only then walk the data
        text = json.dumps(_finite(data), separators=(",", ":"), allow_nan=False, default=_default)
    return text.encode()


def _default(o: Any) -> Any:
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if hasattr(o, "to_json"):
        return o.to_json()
    return str(o)


def _finite(data: Any) -> Any:
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, Mapping):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [_finite(v) for v in data]
    return data
