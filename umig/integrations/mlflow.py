"""MLflow (``umig[mlflow]``): registered model versions into the lineage, umig's lineage and forgetting back as tags.

Three calls, all through an ``MlflowClient`` (any tracking/registry URI; tests use SQLite):

* :func:`log_state_dict` logs a model's state dict as a safetensors artifact of a run, the
  form umig reads best (no pickle anywhere).
* :func:`import_version` / :func:`import_registered_model` download a registered model version
  and record it as a node. The weights are the version's ``*.safetensors`` file, or a pytorch
  flavor's ``data/model.pth`` (or any ``.pt``/``.pth``) read with ``torch.load(weights_only=True)``:
  umig never unpickles, so a pickled module (what ``mlflow.pytorch.log_model`` saves) is refused
  with a line saying what to log instead. Whatever the call does not give is read from the
  version's tags, then its run's tags: ``umig.arch`` (``module:callable``), ``umig.arch_args``
  (JSON), ``umig.data`` (data reference), ``umig.parents`` (comma-separated node names),
  ``umig.relation``, ``umig.classes`` (e.g. ``0-9``), ``umig.recipe`` (JSON). Importing a whole
  registered model chains its versions (each the ``finetune`` child of the previous one unless
  its tags name parents) and skips versions already imported, so it can run again as new
  versions arrive.
* :func:`tag_operation` tags the model versions (and their runs) of the nodes an unlearning
  operation changed with the operation, what it forgot and the node's new version; with
  ``register=True`` it also logs each new version as a new model version of the same registered
  model, tagged with its node and operation.

* :func:`sync` (``umig mlflow sync --tracking-uri URI``) goes the other way: it registers every
  node version of a store that MLflow does not hold yet (an MLflow 3 ``LoggedModel`` with the
  safetensors weights, from a run, plus a registered model version) with its lineage as tags
  (:func:`lineage_tags`), and tags the versions a later one superseded. It is idempotent.

Every imported or registered version carries ``umig.node`` and ``umig.node_version``, so
``client.search_model_versions("tags.`umig.node` = 'NAME'")`` finds a node's versions.

MLflow is imported when a function needs it (:func:`require_extra`), not with this module, so the
``umig`` CLI starts without it; without ``umig[mlflow]`` a call fails with one line naming the extra.
"""

from __future__ import annotations

import itertools
import json
import pickle
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from umig import ingest
from umig.arch import ArchSpec
from umig.data import DataRef, format_labels, parse_labels
from umig.errors import NotFoundError, UmigError
from umig.store import NodeInfo, SqlStore

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

__all__ = ["import_registered_model", "import_version", "load_weights", "log_state_dict", "node_versions",
           "require_extra", "sync", "tag_operation", "TAG_NODE", "TAG_NODE_VERSION"]

TAG_NODE = "umig.node"
TAG_NODE_VERSION = "umig.node_version"
TAG_STORE = "umig.store"
_WEIGHT_SUFFIXES = (".pt", ".pth")


def require_extra() -> Any:
    """The ``mlflow`` module, or one clear line naming the extra when MLflow is not installed.

    MLflow is imported here, not at module level, so ``umig`` (and its CLI) start without paying
    for it and ``umig mlflow ...`` without the extra fails with that line.
    """
    try:
        import mlflow
        import mlflow.artifacts
        import mlflow.exceptions
    except ImportError as e:
        raise UmigError(f"umig's MLflow integration needs MLflow: pip install 'umig[mlflow]' ({e})") from None
    return mlflow


def _client(client: MlflowClient | None = None, tracking_uri: str | None = None) -> MlflowClient:
    """``client``, else an ``MlflowClient`` for ``tracking_uri`` (default: MLflow's own default)."""
    mlflow = require_extra()
    return client if client is not None else mlflow.MlflowClient(tracking_uri)


def log_state_dict(model: nn.Module | Mapping[str, Tensor], *, client: MlflowClient | None = None,
                   run_id: str | None = None, artifact_path: str = "model") -> str:
    """Log a state dict as ``{artifact_path}/model.safetensors`` of ``run_id`` (default: the active run).

    Returns the artifact URI of ``artifact_path``, to register with ``client.create_model_version``.
    """
    client = _client(client)
    if run_id is None:
        run = require_extra().active_run()
        if run is None:
            raise UmigError("no run to log to: pass run_id= or call inside mlflow.start_run()")
        run_id = run.info.run_id
    state = model.state_dict() if isinstance(model, nn.Module) else model
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, Tensor)}
    with tempfile.TemporaryDirectory() as tmp:
        save_file(tensors, str(Path(tmp) / "model.safetensors"))
        client.log_artifacts(run_id, tmp, artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


def load_weights(directory: str | Path, weights_file: str | None = None) -> tuple[dict[str, Tensor], str]:
    """The state dict in a downloaded model directory, and the file it came from (never unpickles)."""
    root = Path(directory)
    if weights_file is not None:
        path = root / weights_file
        if not path.is_file():
            raise NotFoundError(f"no file '{weights_file}' in the model's artifacts")
    else:
        safes = sorted(root.rglob("*.safetensors"))
        named = [p for p in safes if p.name == "model.safetensors"]
        if len(safes) > 1 and len(named) != 1:
            raise UmigError(f"the model's artifacts hold {len(safes)} safetensors files; pass weights_file=")
        torch_files = sorted(p for p in root.rglob("*") if p.suffix in _WEIGHT_SUFFIXES)
        flavor = [p for p in torch_files if p.relative_to(root).as_posix().endswith("data/model.pth")]
        if named or safes:
            path = (named or safes)[0]
        elif flavor or len(torch_files) == 1:
            path = (flavor or torch_files)[0]
        else:
            raise NotFoundError("the model's artifacts hold no .safetensors file and no single .pt/.pth file")
    rel = path.relative_to(root).as_posix()
    if path.suffix == ".safetensors":
        return load_file(str(path)), rel
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, TypeError) as e:
        raise UmigError(f"{rel} is a pickled Python object, not a state dict; umig never unpickles. Log the state "
                        "dict instead (umig.integrations.mlflow.log_state_dict, or torch.save(model.state_dict()))"
                        f" [{str(e).splitlines()[0][:120]}]") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UmigError(f"{rel} does not hold a state dict (a mapping of tensors)")
    return dict(obj), rel


def _tags(client: MlflowClient, mv: ModelVersion) -> dict[str, str]:
    """The version's tags over its run's tags (the version's win)."""
    tags: dict[str, str] = {}
    if mv.run_id:
        try:
            tags.update(client.get_run(mv.run_id).data.tags)
        except require_extra().exceptions.MlflowException:
            pass
    tags.update(mv.tags or {})
    return tags


def _json_tag(tags: Mapping[str, str], key: str) -> Any:
    if key not in tags:
        return None
    try:
        return json.loads(tags[key])
    except json.JSONDecodeError as e:
        raise UmigError(f"tag {key} is not valid JSON: {e}") from None


def default_node_name(name: str, version: int | str) -> str:
    """``{registered model}/v{version}``, with characters node names do not allow replaced by ``_``."""
    return re.sub(r"[^A-Za-z0-9_.:@/+-]", "_", f"{name}/v{version}")


def _get_version(client: MlflowClient, name: str, version: int | str) -> ModelVersion:
    try:
        return client.get_model_version(name, str(version))
    except require_extra().exceptions.MlflowException:
        raise NotFoundError(f"MLflow has no registered model '{name}' version {version}") from None


def import_version(store: SqlStore, name: str, version: int | str, *, client: MlflowClient | None = None,
                   arch: Any = None, node: str | None = None, parents: Sequence[str | tuple[str, float]] | None = None,
                   relation: str | None = None, data: Any = None, classes: Sequence[int] | None = None,
                   recipe: Any = None, framework: str = "other", weights_file: str | None = None,
                   meta: Mapping[str, Any] | None = None, compute_fim: bool = True, tag: bool = True) -> NodeInfo:
    """Record registered model ``name`` version ``version`` as node ``node`` (default ``{name}/v{version}``).

    Arguments left out come from the ``umig.*`` tags of the version, then of its run (see the
    module docstring). ``tag`` writes ``umig.node``/``umig.node_version``/``umig.store`` on the
    version and ``umig.node`` on its run.
    """
    client = _client(client)
    mv = _get_version(client, name, version)
    tags = _tags(client, mv)
    node = node or default_node_name(name, mv.version)
    if arch is None:
        if "umig.arch" not in tags:
            raise UmigError(f"model '{name}' v{mv.version}: no architecture (pass arch= or tag umig.arch)")
        arch = ArchSpec(tags["umig.arch"], _json_tag(tags, "umig.arch_args") or {})
    if parents is None:
        parents = [p.strip() for p in tags.get("umig.parents", "").split(",") if p.strip()]
    data = data if data is not None else tags.get("umig.data")
    if classes is None and "umig.classes" in tags:
        classes = parse_labels(tags["umig.classes"])
    recipe = recipe if recipe is not None else _json_tag(tags, "umig.recipe")
    relation = relation or tags.get("umig.relation") or ("finetune" if parents else None)
    with tempfile.TemporaryDirectory() as tmp:
        local = require_extra().artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, mv.version), dst_path=tmp,
            tracking_uri=client.tracking_uri)
        state, source = load_weights(local, weights_file)
    info = ingest.add_node(
        store, node, state, arch, parents=list(parents), relation=relation, framework=framework, data=data,
        classes=classes, recipe=recipe, compute_fim=compute_fim,
        meta={"mlflow": {"registered_model": name, "version": int(mv.version), "run_id": mv.run_id,
                         "source": mv.source, "weights": source}, **dict(meta or {})})
    if tag:
        _tag_version(client, mv, info, store)
    return info


def _tag_version(client: MlflowClient, mv: ModelVersion, info: NodeInfo, store: SqlStore) -> None:
    client.set_model_version_tag(mv.name, mv.version, TAG_NODE, info.name)
    client.set_model_version_tag(mv.name, mv.version, TAG_NODE_VERSION, str(info.version))
    client.set_model_version_tag(mv.name, mv.version, TAG_STORE, store.url)
    if mv.run_id:
        client.set_tag(mv.run_id, TAG_NODE, info.name)


def import_registered_model(store: SqlStore, name: str, *, client: MlflowClient | None = None, chain: bool = True,
                            parent: str | None = None, **kwargs: Any) -> list[NodeInfo]:
    """Import every version of registered model ``name`` not imported yet, oldest first.

    A version already tagged ``umig.node`` with that node in the store is skipped. With
    ``chain`` a version whose tags name no parents becomes the ``finetune`` child of the
    previous version's node (the first one of ``parent``, if given). ``kwargs`` go to
    :func:`import_version` for every version. Returns the nodes recorded now.
    """
    client = _client(client)
    versions = sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
    if not versions:
        raise NotFoundError(f"MLflow has no registered model '{name}' (or it has no versions)")
    done: list[NodeInfo] = []
    previous = parent
    for mv in versions:
        existing = (mv.tags or {}).get(TAG_NODE)
        if existing and store.has_node(existing):
            previous = existing
            continue
        tags = _tags(client, mv)
        parents = kwargs.get("parents")
        if parents is None and chain and not tags.get("umig.parents") and previous:
            parents = [previous]
        info = import_version(store, name, mv.version, client=client, **{**kwargs, "parents": parents})
        done.append(info)
        previous = info.name
    return done


def node_versions(client: MlflowClient, node: str) -> list[ModelVersion]:
    """The MLflow model versions tagged with umig node ``node``, oldest first."""
    found = client.search_model_versions(f"tags.`{TAG_NODE}` = '{node}'")
    return sorted(found, key=lambda v: (v.name, int(v.version)))


def _forgot(entry: Mapping[str, Any]) -> str:
    forget = entry.get("forget") or {}
    parts = []
    if forget.get("labels") or entry.get("labels"):
        parts.append("labels " + ",".join(map(str, forget.get("labels") or entry.get("labels"))))
    samples = forget.get("samples") or []
    if samples:
        parts.append(f"{len(samples)} sample set(s)")
    return "; ".join(parts) or "-"


def tag_operation(store: SqlStore, op_id: str, *, client: MlflowClient | None = None, register: bool = False,
                  experiment: str | None = None) -> dict[str, list[str]]:
    """Tag the MLflow model versions and runs of the nodes unlearning operation ``op_id`` changed.

    Each version tagged ``umig.node`` with a changed node gets ``umig.unlearned_by`` (the
    operation), ``umig.forgotten``, ``umig.method``, ``umig.ticket`` when the request has one,
    and ``umig.superseded_by`` (``NODE@vN``, the node's version the operation made). With
    ``register`` each node's new version is logged (safetensors, in a run of ``experiment``; by
    default the experiment of the run behind the node's latest MLflow version, so artifacts go
    where that model's already are) and registered as a new version of the node's registered
    model, tagged with node and operation.
    Returns ``{"tagged": ["model/vK", ...], "registered": [...]}``.
    """
    client = _client(client)
    entry = store.operation(op_id)
    tags = {"umig.unlearned_by": op_id, "umig.forgotten": _forgot(entry), "umig.method": str(entry.get("method"))}
    if entry.get("ticket"):
        tags["umig.ticket"] = str(entry["ticket"])
    out: dict[str, list[str]] = {"tagged": [], "registered": []}
    for row in entry["nodes"]:
        node, after = row["name"], row["version_after"]
        if after is None or after == row["version_before"]:
            continue
        versions = node_versions(client, node)
        for mv in versions:
            if mv.tags.get("umig.operation") == op_id:
                continue  # registered by this operation already
            for k, v in {**tags, "umig.superseded_by": f"{node}@v{after}"}.items():
                client.set_model_version_tag(mv.name, mv.version, k, v)
            if mv.run_id:
                client.set_tag(mv.run_id, "umig.unlearned_by", op_id)
            out["tagged"].append(f"{mv.name}/v{mv.version}")
        if register and versions and not any(v.tags.get("umig.operation") == op_id for v in versions):
            out["registered"].append(_register_node(store, client, node, after, versions[-1], op_id, tags,
                                                    experiment))
    return out


def _experiment_id(client: MlflowClient, latest: ModelVersion, experiment: str | None) -> str:
    """``experiment`` (created if missing), else the experiment of ``latest``'s run."""
    if experiment is None and latest.run_id:
        return client.get_run(latest.run_id).info.experiment_id
    name = experiment or "umig"
    exp = client.get_experiment_by_name(name)
    return exp.experiment_id if exp else client.create_experiment(name)


def _register_node(store: SqlStore, client: MlflowClient, node: str, version: int, latest: ModelVersion,
                   op_id: str, tags: Mapping[str, str], experiment: str | None) -> str:
    """Log ``node`` at ``version`` and register it as the next version of ``latest``'s model."""
    exp_id = _experiment_id(client, latest, experiment)
    extra = {k: v for k, v in tags.items() if k != "umig.unlearned_by"}
    mv = _log_version(store, client, exp_id, latest.name, node, version, {**extra, "umig.operation": op_id})
    return f"{mv.name}/v{mv.version}"


def lineage_tags(store: SqlStore, node: str, version: int) -> dict[str, str]:
    """The tags a node version carries in MLflow: its lineage, what made it, how to import it back.

    ``umig.node``, ``umig.node_version``, ``umig.store``, ``umig.parents`` (comma-separated
    names), ``umig.relation`` (the parents' relations, comma-separated in the same order),
    ``umig.framework``, ``umig.data`` and ``umig.data_fingerprint`` (when it has data of its
    own), ``umig.arch``/``umig.arch_args``/``umig.classes`` (what :func:`import_version` reads),
    and ``umig.operation`` (the unlearning operation that made the version; absent for v0).
    """
    info = store.node(node)
    arch = info.arch if isinstance(info.arch, dict) else {"spec": str(info.arch)}
    tags = {TAG_NODE: node, TAG_NODE_VERSION: str(version), TAG_STORE: store.url,
            "umig.parents": ",".join(p for p, *_ in info.parents),
            "umig.relation": ",".join(r for _, r, _ in info.parents),
            "umig.framework": info.framework, "umig.arch": str(arch.get("spec", "")),
            "umig.arch_args": json.dumps(arch.get("kwargs") or {}, sort_keys=True),
            "umig.classes": format_labels(info.classes)}
    if info.data_ref:
        ref = info.data_ref
        labels = ref.get("only_labels")
        tags["umig.data"] = str(DataRef(ref["source"], ref.get("subset"), tuple(labels) if labels is not None else None))
        tags["umig.data_fingerprint"] = str(info.data_fingerprint)
    op = store.version(node, version).operation
    if op:
        tags["umig.operation"] = op
    return {k: v for k, v in tags.items() if v and len(v) <= 5000}  # MLflow's tag value limit


def _log_version(store: SqlStore, client: MlflowClient, experiment_id: str, model: str, node: str, version: int,
                 tags: Mapping[str, str]) -> ModelVersion:
    """Log ``node`` at ``version`` (safetensors) and register it as the next version of ``model``.

    With MLflow 3 the weights are a ``LoggedModel`` (``client.create_logged_model``, its artifacts,
    status READY) and the model version points at it; an older MLflow gets a run holding the
    artifact instead. Both carry :func:`lineage_tags` (over ``tags``).
    """
    all_tags = {**lineage_tags(store, node, version), **tags}
    state = store.state_dict(node, version)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if isinstance(v, Tensor)}
    if not client.search_registered_models(f"name='{model}'"):
        client.create_registered_model(model, tags={"umig.store": all_tags[TAG_STORE]})
    run_tags = {k: all_tags[k] for k in (TAG_NODE, TAG_NODE_VERSION, "umig.operation") if k in all_tags}
    run = client.create_run(experiment_id, tags=run_tags, run_name=f"umig {node}@v{version}")
    run_id = run.info.run_id
    try:
        if hasattr(client, "create_logged_model"):  # MLflow 3
            logged = client.create_logged_model(experiment_id, name=_model_name(node), source_run_id=run_id,
                                                tags=all_tags, model_type="umig")
            with tempfile.TemporaryDirectory() as tmp:
                save_file(tensors, str(Path(tmp) / "model.safetensors"))
                client.log_model_artifacts(logged.model_id, tmp)
            client.finalize_logged_model(logged.model_id, "READY")
            # run_id given: MLflow's SQL registry would otherwise look the model up through the default URI
            return client.create_model_version(model, source=logged.artifact_location, run_id=run_id,
                                               tags=all_tags, model_id=logged.model_id)
        uri = log_state_dict(tensors, client=client, run_id=run_id)
        return client.create_model_version(model, source=uri, run_id=run_id, tags=all_tags)
    finally:
        client.set_terminated(run_id)


def _model_name(node: str) -> str:
    """A registered model name for ``node``: MLflow refuses ``/`` and ``:`` in names."""
    return re.sub(r"[/:]", "_", node)


def _all_versions(client: MlflowClient) -> list[ModelVersion]:
    """Every model version of the registry tagged with a umig node, page by page."""
    out: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"tags.`{TAG_NODE}` LIKE '%'", max_results=1000, page_token=token)
        out.extend(page)
        token = page.token
        if not token:
            return out


def sync(store: SqlStore, tracking_uri: str | None = None, *, client: MlflowClient | None = None,
         registered_model: str | None = None, experiment: str = "umig",
         artifact_location: str | None = None) -> dict[str, list[str]]:
    """Register every node version of ``store`` not in MLflow yet; tag superseded versions.

    A version is in MLflow when some model version is tagged with its ``umig.node`` and
    ``umig.node_version`` and this store's path as ``umig.store`` (or no store tag): one this
    function registered, or one :func:`import_version` brought in, so a second call adds only
    what is new. Each new one is logged (a MLflow 3
    ``LoggedModel`` in ``experiment``, created with ``artifact_location`` if missing) and
    registered as a version of ``registered_model``, else of the registered model that already
    holds the node's versions, else of a registered model named after the node (``/`` and ``:``
    become ``_``), with :func:`lineage_tags`. Purged versions are not registered.

    Every MLflow version of a node version that a later version replaced gets
    ``umig.superseded_by`` (``NODE@vN``, the next version) and, when an unlearning operation made
    it, ``umig.unlearned_by``, ``umig.forgotten``, ``umig.method`` and ``umig.ticket``, as
    :func:`tag_operation` writes them. Returns ``{"registered": ["model/vK", ...], "tagged":
    [...], "skipped": ["NODE@vN", ...]}`` (skipped: already in MLflow).
    """
    if registered_model is not None and (not registered_model.strip() or any(c in registered_model for c in "/:")):
        raise UmigError(f"registered model name {registered_model!r}: MLflow names cannot be empty or hold '/' or ':'")
    mlflow = require_extra()
    try:
        return _sync(store, _client(client, tracking_uri), registered_model, experiment, artifact_location)
    except mlflow.exceptions.MlflowException as e:
        raise UmigError(f"MLflow ({tracking_uri or (client.tracking_uri if client else 'default URI')}): "
                        f"{str(e.message).strip().splitlines()[0][:300]}") from None


def _sync(store: SqlStore, client: MlflowClient, registered_model: str | None, experiment: str,
          artifact_location: str | None) -> dict[str, list[str]]:
    root = store.url
    existing: dict[tuple[str, int], list[ModelVersion]] = {}
    for mv in _all_versions(client):
        tags = mv.tags or {}
        if tags.get(TAG_STORE, root) != root:
            continue  # another store's node of the same name
        try:
            key = (tags[TAG_NODE], int(tags.get(TAG_NODE_VERSION, "0")))
        except ValueError:
            continue
        existing.setdefault(key, []).append(mv)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment, artifact_location=artifact_location)
    out: dict[str, list[str]] = {"registered": [], "tagged": [], "skipped": []}
    for info in store.nodes():
        node = info.name
        versions = store.versions(node)
        home = registered_model
        if home is None:
            known = sorted((mv for (n, _), mvs in existing.items() if n == node for mv in mvs),
                           key=lambda v: int(v.version))
            home = known[-1].name if known else _model_name(node)
        for v in versions:
            if (node, v.version) in existing:
                out["skipped"].append(f"{node}@v{v.version}")
                continue
            if v.purged:
                continue
            mv = _log_version(store, client, exp_id, home, node, v.version, {})
            existing[(node, v.version)] = [mv]
            out["registered"].append(f"{mv.name}/v{mv.version}")
        for older, newer in itertools.pairwise(versions):
            tags = {"umig.superseded_by": f"{node}@v{newer.version}"}
            if newer.operation:
                entry = store.operation(newer.operation)
                tags.update({"umig.unlearned_by": newer.operation, "umig.forgotten": _forgot(entry),
                             "umig.method": str(entry.get("method"))})
                if entry.get("ticket"):
                    tags["umig.ticket"] = str(entry["ticket"])
            for mv in existing.get((node, older.version), []):
                changed = {k: val for k, val in tags.items() if (mv.tags or {}).get(k) != val}
                for k, val in changed.items():
                    client.set_model_version_tag(mv.name, mv.version, k, val)
                if changed:
                    out["tagged"].append(f"{mv.name}/v{mv.version}")
    return out
