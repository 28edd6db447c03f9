"""Hugging Face model cards (``umig[hf]``): a node's README.md with its lineage, data and forgetting.

:func:`card_text` writes the model card of a node: YAML metadata (``tags``, ``base_model`` and
``base_model_relation`` when a parent names its Hub id, and a ``umig`` block with the node, its
parents, data reference and unlearning history) and a Markdown body with the same facts:

* **lineage**: the parents (relation, FedAvg weight) and children;
* **training data**: the data reference as recorded, its fingerprint, size and labels, and the recipe;
* **unlearning history**: every operation that changed the node (``store.history(node=...)``):
  when, what was forgotten (labels; sample sets by dataset fingerprint, count and index digest;
  clients), the method, the deletion request's ticket/requester/reason, the node's version
  before and after, and whether the operation was reverted or purged.

With ``huggingface_hub`` installed the card is built and parsed by its ``ModelCard`` /
``ModelCardData`` (offline: nothing is fetched or pushed); without it the same text is written
directly. A parent's Hub id is read from its meta (``hf_repo_id`` or ``base_model``). The CLI is
``umig card NODE [-o README.md]``.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from umig.data import DataRef, format_labels
from umig.errors import UmigError
from umig.store import SqlStore

__all__ = ["card_metadata", "card_text", "export_with_card", "unlearning_history", "write_card"]

# umig relation -> the Hub's base_model_relation (adapter, merge, quantized, finetune).
HUB_RELATION = {"finetune": "finetune", "increment": "finetune", "transfer": "finetune",
                "aggregate": "merge", "sync": "merge"}
HUB_ID_KEYS = ("hf_repo_id", "base_model")


def _when(t: float | None) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if t else "-"


def _data_ref(ref: dict | None) -> str | None:
    if not ref:
        return None
    labels = ref.get("only_labels")
    return str(DataRef(ref["source"], ref.get("subset"), tuple(labels) if labels is not None else None))


def _forgot(entry: dict[str, Any]) -> list[str]:
    """One line per part of the forget set, as its audit record stores it (never the data)."""
    forget = entry.get("forget") or {}
    out = []
    labels = forget.get("labels") or entry.get("labels") or []
    if labels:
        out.append(f"labels {format_labels(labels)}")
    for s in forget.get("samples") or []:
        who = f"client {s['client']}'s data" if s.get("client") else "samples"
        out.append(f"{who}: {s.get('count', '?')} of dataset {str(s.get('dataset', '?'))[:16]} "
                   f"(indices digest {str(s.get('digest', '?'))[:16]})")
    return out or ["-"]


def unlearning_history(store: SqlStore, node: str) -> list[dict[str, Any]]:
    """The operations that changed ``node``, oldest first, as the card records them."""
    out = []
    for entry in store.history(node=node):
        row = next((n for n in entry["nodes"] if n["name"] == node), {})
        state = "purged" if entry.get("purged") else "reverted" if entry.get("reverted") else "applied"
        out.append({
            "operation": entry["operation"], "date": _when(entry.get("created")), "forgot": _forgot(entry),
            "method": entry.get("method"), "params": entry.get("params") or {},
            "ticket": entry.get("ticket"), "requester": entry.get("requester"), "reason": entry.get("reason"),
            "role": row.get("role"), "version_before": row.get("version_before"),
            "version_after": row.get("version_after"), "state": state,
        })
    return out


def card_metadata(store: SqlStore, node: str) -> dict[str, Any]:
    """The card's YAML metadata (JSON-ready)."""
    info = store.node(node)
    history = unlearning_history(store, node)
    hub_ids, relations = [], set()
    for parent, relation, _ in info.parents:
        meta = store.node(parent).meta
        hub = next((meta[k] for k in HUB_ID_KEYS if isinstance(meta.get(k), str)), None)
        if hub:
            hub_ids.append(hub)
            relations.add(HUB_RELATION.get(relation))
    meta: dict[str, Any] = {"tags": ["umig", "model-lineage"] + (["machine-unlearning"] if history else [])}
    if hub_ids:
        meta["base_model"] = hub_ids[0] if len(hub_ids) == 1 else hub_ids
        if len(relations) == 1 and None not in relations:
            meta["base_model_relation"] = relations.pop()
    meta["umig"] = {
        "node": info.name, "version": info.version, "framework": info.framework,
        "arch": info.arch, "classes": format_labels(info.classes),
        "parents": [{"name": p, "relation": r, "weight": w} for p, r, w in info.parents],
        "data": {"reference": _data_ref(info.data_ref), "fingerprint": info.data_fingerprint,
                 "size": info.data_size} if info.data_ref else None,
        "unlearning": [{k: h[k] for k in ("operation", "date", "forgot", "method", "ticket", "version_before",
                                          "version_after", "state")} for h in history],
    }
    return meta


def _body(store: SqlStore, node: str, history: list[dict[str, Any]]) -> str:
    info = store.node(node)
    arch = info.arch.get("spec", info.arch) if isinstance(info.arch, dict) else info.arch
    lines = [f"# {info.name}", "",
             f"A model recorded in a umig lineage store: version {info.version}, "
             f"architecture `{arch}`, {len(info.classes)} classes (label ids {format_labels(info.classes)}), "
             f"framework `{info.framework}`.", "", "## Lineage", ""]
    if info.parents:
        lines += ["| Parent | Relation | Weight |", "|---|---|---|"]
        lines += [f"| `{p}` | {r} | {'' if w is None else f'{w:.4g}'} |" for p, r, w in info.parents]
    else:
        lines.append("No parents: a root of the lineage.")
    if info.children:
        lines += ["", "Children: " + ", ".join(f"`{c}`" for c in info.children) + "."]
    lines += ["", "## Training data", ""]
    if info.data_ref:
        counts = ", ".join(f"{k}: {v}" for k, v in sorted(info.label_counts.items()))
        lines += [f"- Reference: `{_data_ref(info.data_ref)}`", f"- Fingerprint: `{info.data_fingerprint}`",
                  f"- Samples: {info.data_size} ({counts})"]
    else:
        lines.append("No data of its own (its parents' data reaches it through the lineage).")
    if info.recipe:
        lines.append(f"- Recipe: `{json.dumps(info.recipe, sort_keys=True)}`")
    lines += ["", "## Unlearning history", ""]
    if not history:
        lines.append("No unlearning operation has changed this model.")
    for h in history:
        request = ", ".join(f"{k} {h[k]}" for k in ("ticket", "requester") if h.get(k))
        lines += [f"### {h['operation']} ({h['date']}, {h['state']})", "",
                  *[f"- Forgot {f}" for f in h["forgot"]],
                  f"- Method: `{h['method']}`" + (f" {json.dumps(h['params'], sort_keys=True)}" if h["params"] else ""),
                  f"- This model: {h['role']}, version {h['version_before']} -> {h['version_after']}"]
        if request or h.get("reason"):
            lines.append(f"- Request: {request or '-'}" + (f"; reason: {h['reason']}" if h.get("reason") else ""))
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _yaml(meta: dict[str, Any]) -> str:
    """YAML front matter without a YAML library: JSON values are valid YAML flow values."""
    return "\n".join(f"{k}: {json.dumps(v, sort_keys=True)}" for k, v in meta.items())


def card_text(store: SqlStore, node: str) -> str:
    """The model card of ``node`` (``README.md`` text), through ``huggingface_hub`` when installed."""
    meta = card_metadata(store, node)
    body = _body(store, node, unlearning_history(store, node))
    try:
        from huggingface_hub import ModelCard, ModelCardData
    except ImportError:
        return f"---\n{_yaml(meta)}\n---\n\n{body}"
    data = ModelCardData(**meta)
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))


def write_card(store: SqlStore, node: str, path: str | Path) -> Path:
    """Write ``node``'s model card to ``path`` (a file, or a directory that gets ``README.md``)."""
    text = card_text(store, node)
    p = Path(path)
    if p.is_dir():
        p = p / "README.md"
    try:
        p.write_text(text, encoding="utf-8")
    except OSError as e:
        raise UmigError(f"cannot write {p}: {e.strerror or e}") from None
    return p


def export_with_card(store: SqlStore, node: str, directory: str | Path, *, version: int | None = None,
                     checkpoint: str | Path | None = None) -> dict[str, str]:
    """A Hub-ready folder: ``DIR/model.safetensors`` (the node's full weights, through the store's
    recorded export) and ``DIR/README.md`` (its model card). ``checkpoint`` writes the weights
    there instead of ``DIR/model.safetensors``. Returns the node and both paths."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise UmigError(f"--model-card {root}: not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UmigError(f"cannot create {root}: {e.strerror or e}") from None
    weights = store.export(node, Path(checkpoint) if checkpoint is not None else root / "model.safetensors",
                           version=version)
    card = write_card(store, node, root / "README.md")
    return {"node": node, "path": str(weights), "card": str(card)}
