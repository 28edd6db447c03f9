"""Deletion requests, end to end: the report an auditor files for one operation.

:func:`deletion_report` gathers, for one unlearning operation, everything a deletion request is
answered with: who asked (requester, reason, ticket, time), what was forgotten (the forget set's
audit record: kinds, fingerprints, counts, digests; never the data), the method and its parameters,
every affected model with its version and weight digests before and after, the verification verdict
(``umig verify``), whether the superseded versions are purged and their blobs gone, exports of
versions that still hold the forgotten data, and the models caught up later. :func:`to_markdown`
writes it as a document that reads well as plain text.

:func:`forgotten` answers the question a training job asks before it records a model: which
live operations forgot which share of a dataset, and which of its items nothing forgot (an
index file usable as ``--subset``, so that the next node passes ``add-node``'s guard).

All of it is read through :class:`umig.store.SqlStore`; this module runs no SQL.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from umig.data import parse_ref, save_subset, source_positions
from umig.errors import UmigError
from umig.forget import source_fingerprint
from umig.store import REQUEST_FIELDS, SqlStore, Version

REPORT_FORMAT = "umig-deletion-report/1"  # bump when a field changes meaning
WEIGHT_PARTS = ("body", "head", "delta")  # the blobs that make up a version's weights
SHORT = 12  # hex digits of a digest in tables; the full digests follow them


def deletion_report(store: SqlStore, operation: str) -> dict[str, Any]:
    """Everything the store knows about how ``operation`` answered its deletion request (JSON-ready)."""
    entry = store.operation(operation)  # NotFoundError for an unknown id
    nodes: list[dict[str, Any]] = []
    before_blobs: set[str] = set()
    after_blobs: set[str] = set()
    exports: list[dict[str, Any]] = []
    for n in entry["nodes"]:
        name = n["name"]
        before = store.version(name, n["version_before"])
        after = store.version(name, n["version_after"])
        before_blobs.update(before.blobs())
        after_blobs.update(after.blobs())
        nodes.append({
            "name": name,
            "role": n["role"],
            "version_before": before.version,
            "version_after": after.version,
            "current_version": store.node(name).version,
            "before": _version_json(store, before),
            "after": _version_json(store, after),
        })
        exports += _holding_exports(store, name, after.version, entry["created"])
    # Blobs only the superseded versions had: what purge deletes. A blob the new version shares
    # (an unchanged body under a new head) is not superseded.
    superseded = sorted(before_blobs - after_blobs)
    remaining = [d for d in superseded if store.blobs.exists(d)]
    op_blobs = [{"digest": d, "kind": k, "present": store.blobs.exists(d)}
                for d, k in store.operation_blobs(operation)]
    return {
        "format": REPORT_FORMAT,
        "generated": time.time(),
        "store": store.url,
        "operation": operation,
        "state": entry["state"],
        "request": {**{k: entry.get(k) for k in REQUEST_FIELDS}, "time": entry["created"]},
        "forget": entry["forget"],
        "method": entry["method"],
        "params": entry["params"],
        "policy": entry.get("policy"),
        "discovery": entry["discovery"],
        "nodes": nodes,
        "verification": entry.get("verification"),
        "reverted": entry["reverted"] is not None,
        "reverted_at": entry["reverted"],
        "purged": entry["state"] == "purged",
        "purged_at": entry["purged"],
        # Model FIMs the purge took the forgotten data out of, and those it kept as recorded.
        "model_fims": ({"replaced": entry["purge"]["fims_replaced"], "kept": entry["purge"]["fims_kept"]}
                       if entry.get("purge") else None),
        "superseded_blobs": len(superseded),
        "superseded_blobs_present": remaining,
        "superseded_blobs_gone": not remaining,
        "operation_blobs": op_blobs,
        "exports": exports,
        # Models recorded later from a superseded version (or on forgotten data) and unlearned on the
        # spot, with their versions before and after the catch-up.
        "caught_up": [_caught_up_json(store, c) for c in entry.get("caught_up") or []],
    }


def _caught_up_json(store: SqlStore, c: Mapping[str, Any]) -> dict[str, Any]:
    name = c["name"]
    before, after = store.version(name, c["version_before"]), store.version(name, c["version_after"])
    return {**c, "current_version": store.node(name).version,
            "before": _version_json(store, before), "after": _version_json(store, after),
            "exports": _holding_exports(store, name, after.version, c["created"])}


def _version_json(store: SqlStore, v: Version) -> dict[str, Any]:
    parts = {"body": v.body_blob, "head": v.head_blob, "delta": v.delta_blob, "fim": v.fim_blob}
    return {
        "version": v.version,
        **{f"{k}_blob": d for k, d in parts.items()},
        "purged": v.purged,
        "missing": [k for k, d in parts.items() if d and not store.blobs.exists(d)],  # blobs gone from the store
    }


def _holding_exports(store: SqlStore, name: str, version_after: int, op_time: float) -> list[dict[str, Any]]:
    """Exports of ``name`` at a version that does not descend from the operation's result: copies
    outside the store that may still hold what the operation forgot (before or after it ran)."""
    sources = store.version_sources(name)
    derived = {version_after}
    grew = True
    while grew:  # versions later operations made from the result (or from those), transitively
        new = {a for a, b in sources.items() if b in derived and a not in derived}
        derived |= new
        grew = bool(new)
    return [{**e.to_json(), "before_operation": e.created < op_time, "file_present": Path(e.path).exists()}
            for e in store.exports(node=name) if e.version not in derived]


# ------------------------------------------------------------------ forgotten
def forgotten(store: SqlStore, data: str, *, output: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Which live operations (applied or purged, not reverted) forgot which share of the dataset
    ``data`` names (any data reference: its subset and label filter count), and how many of its items
    nothing forgot. With ``output``, those items' indices into the whole source are written there
    (``.npy`` or ``.safetensors``): ``add-node --data SOURCE --subset FILE`` then holds nothing forgotten.

    Sample forget sets are matched by the source's fingerprint and the indices the operation kept;
    an operation recorded before umig kept them is listed under ``unchecked``.
    """
    ref = parse_ref(data)
    base, positions = source_positions(ref)
    fingerprint = source_fingerprint(ref.source)
    targets = base.targets[positions].numpy()
    gone = np.zeros(len(positions), dtype=bool)
    ops: dict[str, dict[str, Any]] = {}
    masks: dict[str, np.ndarray] = {}

    def entry(op: Any) -> dict[str, Any]:
        if op.id not in ops:
            ops[op.id] = {"operation": op.id, "ticket": op.ticket, "created": op.created, "labels": [], "samples": 0}
            masks[op.id] = np.zeros(len(positions), dtype=bool)
        return ops[op.id]

    for op, label in store.label_forgets(np.unique(targets).tolist()):
        entry(op)["labels"].append(label)
        masks[op.id] |= targets == label
    kept = store.sample_forgets(dataset=fingerprint)
    for f in kept:
        hit = np.isin(positions, store.forgotten_indices(f))
        entry(f.operation)["samples"] += int(hit.sum())
        masks[f.operation.id] |= hit
    stored = {f.operation.id for f in kept}
    unchecked = [e["operation"] for e in store.history()
                 if e["state"] != "reverted" and e["operation"] not in stored
                 and any(s.get("dataset") == fingerprint for s in e["forget"].get("samples") or [])]
    n = len(positions)
    for op_id, e in ops.items():
        gone |= masks[op_id]
        e["forgotten"] = int(masks[op_id].sum())
        e["share"] = e["forgotten"] / n if n else 0.0
    keep = positions[~gone]
    try:
        path = save_subset(output, keep) if output is not None else None
    except OSError as e:
        raise UmigError(f"cannot write {output}: {e.strerror or e}") from None
    return {
        "data": str(ref),
        "dataset": fingerprint,
        "items": n,
        "forgotten": int(gone.sum()),
        "kept": int(keep.size),
        "operations": sorted((e for e in ops.values() if e["forgotten"]), key=lambda e: e["created"]),
        "unchecked": unchecked,
        "output": str(path) if path is not None else None,
    }


# ------------------------------------------------------------------ Markdown
def to_markdown(report: Mapping[str, Any]) -> str:
    """The report as a Markdown document that reads well unrendered too."""
    op = report["operation"]
    req = report["request"]
    out = [f"# Deletion report: operation {op}", "",
           f"Generated {_when(report['generated'])} from the umig store at {_code(report['store'])}.", "",
           f"**Status:** {_status(report)}", "",
           "## Request", "",
           f"- Requester: {_text(req.get('requester'))}",
           f"- Reason: {_text(req.get('reason'))}",
           f"- Ticket: {_text(req.get('ticket'))}",
           f"- Answered: {_when(req['time'])} by operation {op}", "",
           "## What was forgotten", "",
           *_forget_lines(report["forget"]), "",
           "The record keeps what identifies the forgotten data (dataset fingerprints, counts and a digest",
           "of the sample indices), never the data itself.", "",
           "## Method", "",
           f"- Method: {_code(report['method'])}",
           f"- Parameters: {_params(report['params'])}"]
    if report.get("policy"):
        out.append(f"- Discovery policy: {report['policy']} "
                   f"({_count(len(report['discovery']), 'discovery node')}: "
                   f"{', '.join(_code(n) for n in report['discovery']) or 'none'})")
    out += ["", "## Affected models", ""]
    out += _nodes_section(report["nodes"])
    out += ["", "## Verification", "", _verification(report), "",
            "## Superseded versions", "", _purge(report), "",
            "## Exported copies that may still hold the forgotten data", ""]
    out += _exports_section(report["exports"])
    out += ["", "## Models caught up later", ""]
    out += _caught_up_section(report["caught_up"])
    return "\n".join(out) + "\n"


def _caught_up_section(caught: list[Mapping[str, Any]]) -> list[str]:
    if not caught:
        return ["None: no model was recorded later from a superseded version or on forgotten data."]
    lines = [("These models were recorded after the operation from a version it superseded, or on data it "
              "forgot, and the operation was applied to them when they were added (same forget set, method "
              "and parameters). Reverting or purging the operation covers them too."), ""]
    for c in caught:
        after = c["after"]
        lines.append(f"- {_code(c['name'])}: v{c['version_before']} -> v{c['version_after']} on {_when(c['created'])} "
                     f"({_text(c.get('reason'))}); now v{c['current_version']}; weights after: "
                     f"body {_code(after['body_blob'])}, head {_code(after['head_blob'])}")
    return lines


def _status(r: Mapping[str, Any]) -> str:
    if r["state"] == "reverted":
        return (f"reverted on {_when(r['reverted_at'])}. The affected models are back at their versions from "
                "before the operation and hold the forgotten data again.")
    moved = [n["name"] for n in r["nodes"] if n["current_version"] != n["version_after"]]
    text = "applied. The affected models' live versions are the unlearned ones"
    if moved:
        text += f" (except {', '.join(_code(n) for n in moved[:5])}{', ...' if len(moved) > 5 else ''}: changed since)"
    if r["purged"]:
        text += f"; the superseded versions were purged on {_when(r['purged_at'])}."
    else:
        text += f"; the superseded versions are still in the store (not purged: `umig purge {r['operation']}`)."
    if r["exports"]:
        text += f" {_count(len(r['exports']), 'exported copy', 'exported copies')} may still hold the forgotten data."
    return text


def _forget_lines(forget: Mapping[str, Any]) -> list[str]:
    lines = [f"- Kinds: {', '.join(forget.get('kinds') or []) or 'none'}"]
    if forget.get("labels"):
        lines.append(f"- Labels: {', '.join(map(str, forget['labels']))}")
    for s in forget.get("samples") or []:
        what = f"Client {_code(s['client'])}'s training data" if s.get("client") else "Samples"
        lines.append(f"- {what}: {_count(s['count'], 'sample')} of dataset {_code(s['dataset'])}; "
                     f"indices digest {_code(s['digest'])}")
    return lines


def _nodes_section(nodes: list[Mapping[str, Any]]) -> list[str]:
    if not nodes:
        return ["None."]
    lines = ["| Node | Role | Before | After | Now | Weights before (body / head) | Weights after (body / head) |",
             "|---|---|---|---|---|---|---|"]
    for n in nodes:
        lines.append(f"| {_code(n['name'])} | {n['role']} | v{n['version_before']} | v{n['version_after']} | "
                     f"v{n['current_version']} | {_short(n['before'])} | {_short(n['after'])} |")
    lines += ["", ("Full weight digests (sha256 of the stored safetensors blobs; a delta is a sparse adapter "
                   "added to body and head):"), ""]
    for n in nodes:
        lines.append(f"- {_code(n['name'])}")
        for side in ("before", "after"):
            v = n[side]
            parts = ", ".join(f"{k} {_code(v[f'{k}_blob'])}" for k in WEIGHT_PARTS if v.get(f"{k}_blob"))
            gone = f" (purged; gone from the store: {', '.join(v['missing'])})" if v["missing"] else \
                " (purged)" if v["purged"] else ""
            lines.append(f"  - v{v['version']} ({side}): {parts}{gone}")
    return lines


def _short(v: Mapping[str, Any]) -> str:
    text = f"`{v['body_blob'][:SHORT]}` / `{v['head_blob'][:SHORT]}`"
    return text + (" + delta" if v.get("delta_blob") else "")


def _verification(r: Mapping[str, Any]) -> str:
    v = r.get("verification")
    if not v:
        return f"Not verified (`umig verify {r['operation']}` compares the unlearned models with retraining)."
    text = f"Verified on {_when(v['created'])}" if v.get("created") else "Verified"
    if v.get("reference_method"):
        text += f" against {_code(v['reference_method'])}"
    gaps = [f"{k} {v[key]:.2f}" for k, key in (("mean", "avg_gap"), ("worst", "max_avg_gap"))
            if isinstance(v.get(key), (int, float))]
    if gaps:
        text += f": Avg. Gap {', '.join(gaps)} percentage points"
    if v.get("max_gap") is not None and v.get("passed") is not None:
        text += f"; threshold {v['max_gap']:g}: {'passed' if v['passed'] else 'exceeded'}"
    return text + "."


def _purge(r: Mapping[str, Any]) -> str:
    if r["purged"]:
        return _purged(r) + _model_fims(r.get("model_fims"))
    return _not_purged(r)


def _model_fims(m: Mapping[str, int] | None) -> str:
    if m is None:
        return ""  # purged before umig cleaned model FIMs
    text = f" The model FIMs of {_count(m['replaced'], 'version')} now hold nothing of the forgotten data"
    if m["kept"]:
        return text + (f"; {_count(m['kept'], 'model FIM')} could not be cleaned without the data and "
                       "still hold sums over it (diagonal squared head inputs, no weights, no samples).")
    return text + "."


def _purged(r: Mapping[str, Any]) -> str:
    text = f"Purged on {_when(r['purged_at'])}. "
    left = r["superseded_blobs_present"]
    if not left:
        return text + (f"All {_count(r['superseded_blobs'], 'blob')} that only the superseded versions held "
                       "are gone from the store, and so are the blobs the method computed from the "
                       "forgotten data. The operation can no longer be reverted.")
    return text + (f"{_count(len(left), 'blob')} of the superseded versions are still in the store because "
                   f"other versions share them: {', '.join(_code(d[:SHORT]) for d in left)}.")


def _not_purged(r: Mapping[str, Any]) -> str:
    kept = r["operation_blobs"]
    text = (f"Not purged. The versions from before the operation ({_count(r['superseded_blobs'], 'blob')} "
            "only they hold) are still in the store")
    if kept:
        text += f", and so {'is' if len(kept) == 1 else 'are'} {_count(len(kept), 'blob')} the method computed " \
                f"from the forgotten data ({', '.join(sorted({b['kind'] for b in kept}))})"
    if r["state"] == "reverted":
        return text + ": the operation was reverted, so they are the live versions again."
    return text + f". `umig purge {r['operation']}` deletes them for good."


def _exports_section(exports: list[Mapping[str, Any]]) -> list[str]:
    if not exports:
        return ["None recorded: no version that holds the forgotten data was exported with `umig export`."]
    lines = [("These files were written out of the store from versions that hold the forgotten data. "
              "umig cannot delete them; each must be deleted where it is."), "",
             "| Node | Version | Exported | Path | File here |", "|---|---|---|---|---|"]
    for e in exports:
        when = _when(e["created"]) + (" (before the operation)" if e["before_operation"] else " (after it)")
        lines.append(f"| {_code(e['node'])} | v{e['version']} | {when} | {_code(e['path'])} | "
                     f"{'yes' if e['file_present'] else 'no'} |")
    return lines


# ------------------------------------------------------------------ text helpers
def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _code(s: Any) -> str:
    """An inline code span; one with a backtick inside gets a longer fence. Pipes are escaped for tables."""
    s = str(s).replace("|", "\\|")
    return f"`` {s} ``" if "`" in s else f"`{s}`"


def _text(s: str | None) -> str:
    """Free text as written, with Markdown's emphasis and link characters escaped; '-' when absent."""
    if not s:
        return "-"
    for ch in "\\`*[]<>|":
        s = s.replace(ch, "\\" + ch)
    return s.replace("\n", "\n  ")  # further lines stay inside the list item


def _params(params: Mapping[str, Any]) -> str:
    return ", ".join(_code(f"{k}={v}") for k, v in params.items()) or "none (defaults)"


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"

