"""MLflow integration against a local SQLite tracking/registry backend and a file artifact root (offline)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("mlflow", reason="MLflow not installed: pip install 'umig[mlflow]'")

from mlflow import MlflowClient  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from umig.api import Store  # noqa: E402
from umig.arch import ArchSpec  # noqa: E402
from umig.cli.main import app  # noqa: E402
from umig.errors import UmigError  # noqa: E402
from umig.integrations import mlflow as um  # noqa: E402

ARCH = ArchSpec("umig.models:digits_mlp", {"num_classes": 10, "hidden": 16})
TRAIN = "sklearn:digits?split=train"
LINEAGE_TAGS = {"umig.arch": "umig.models:digits_mlp", "umig.arch_args": '{"num_classes": 10, "hidden": 16}',
                "umig.data": TRAIN, "umig.classes": "0-9"}


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> MlflowClient:
    root = tmp_path_factory.mktemp("mlflow")
    c = MlflowClient(f"sqlite:///{root / 'm.db'}")  # one database per module: creating its tables takes seconds
    c.create_experiment("train", artifact_location=(root / "artifacts").as_uri())
    return c


def register(client: MlflowClient, model: str, state: dict, tags: dict | None = None, layout: str = "safetensors"):
    """A training run that logs ``state`` and registers it as the next version of ``model``."""
    exp = client.get_experiment_by_name("train").experiment_id
    run = client.create_run(exp, tags=tags or {})
    if layout == "safetensors":
        uri = um.log_state_dict(state, client=client, run_id=run.info.run_id)
    else:  # a pytorch-flavor directory: data/model.pth written by torch.save
        import tempfile
        from pathlib import Path

        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "data").mkdir()
            torch.save(state, Path(tmp) / "data" / "model.pth")
            client.log_artifacts(run.info.run_id, tmp, "model")
        uri = f"{run.info.artifact_uri}/model"
    client.set_terminated(run.info.run_id)
    if not client.search_registered_models(f"name='{model}'"):
        client.create_registered_model(model)
    return client.create_model_version(model, source=uri, run_id=run.info.run_id)


def states(n: int) -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    return [ARCH.build().state_dict() for _ in range(n)]


@pytest.fixture
def store(tmp_path):
    s = Store.init(tmp_path / "s")
    yield s
    s.close()


def test_import_registered_model_chains_versions_and_is_idempotent(client, store):
    s1, s2, s3 = states(3)
    register(client, "digits", s1, LINEAGE_TAGS)
    register(client, "digits", s2, LINEAGE_TAGS)
    nodes = um.import_registered_model(store, "digits", client=client)
    assert [n.name for n in nodes] == ["digits/v1", "digits/v2"]
    v2 = store.node("digits/v2")
    assert [(p, r) for p, r, _ in v2.parents] == [("digits/v1", "finetune")]
    assert v2.data_ref is not None and v2.classes == tuple(range(10)) and v2.meta["mlflow"]["version"] == 2
    torch.testing.assert_close(store.state_dict("digits/v2")["fc.weight"], s2["fc.weight"])
    mv = client.get_model_version("digits", "2")
    assert mv.tags[um.TAG_NODE] == "digits/v2" and mv.tags[um.TAG_NODE_VERSION] == "0"
    assert client.get_run(mv.run_id).data.tags[um.TAG_NODE] == "digits/v2"

    assert um.import_registered_model(store, "digits", client=client) == []  # nothing new
    register(client, "digits", s3, LINEAGE_TAGS)
    assert [n.name for n in um.import_registered_model(store, "digits", client=client)] == ["digits/v3"]
    assert [p for p, *_ in store.node("digits/v3").parents] == ["digits/v2"]


def test_pytorch_flavor_state_dict_loads_but_pickled_module_is_refused(client, store, tmp_path):
    (s1,) = states(1)
    mv = register(client, "flavor", s1, LINEAGE_TAGS, layout="pth")
    info = um.import_version(store, "flavor", mv.version, client=client, node="flavor-sd")
    assert info.meta["mlflow"]["weights"] == "data/model.pth"
    torch.testing.assert_close(store.state_dict("flavor-sd")["fc.weight"], s1["fc.weight"])

    module_dir = tmp_path / "pickled" / "data"
    module_dir.mkdir(parents=True)
    torch.save(ARCH.build(), module_dir / "model.pth")  # what mlflow.pytorch.log_model stores: a pickled module
    with pytest.raises(UmigError, match="never unpickles"):
        um.load_weights(tmp_path / "pickled")
    with pytest.raises(UmigError, match="no registered model 'nope'"):
        um.import_version(store, "nope", 1, client=client)
    bare = register(client, "bare", s1, {})
    with pytest.raises(UmigError, match="no architecture"):
        um.import_version(store, "bare", bare.version, client=client)


def test_unlearning_operation_tags_versions_and_registers_new_ones(client, store):
    s1, s2 = states(2)
    register(client, "fl", s1, LINEAGE_TAGS)
    register(client, "fl", s2, LINEAGE_TAGS)
    um.import_registered_model(store, "fl", client=client)
    result = store.unlearn([1], request={"ticket": "DSR-7"}, evaluate=False)
    out = um.tag_operation(store, result.operation, client=client, register=True)
    assert sorted(out["tagged"]) == ["fl/v1", "fl/v2"] and len(out["registered"]) == 2
    old = client.get_model_version("fl", "1")
    assert old.tags["umig.unlearned_by"] == result.operation and old.tags["umig.ticket"] == "DSR-7"
    assert old.tags["umig.forgotten"] == "labels 1" and old.tags["umig.superseded_by"] == "fl/v1@v1"
    new = [v for v in um.node_versions(client, "fl/v2") if v.tags.get("umig.operation") == result.operation]
    assert len(new) == 1 and new[0].tags[um.TAG_NODE_VERSION] == "1" and new[0].tags["umig.parents"] == "fl/v1"
    # What MLflow serves for the new version is the unlearned node, bit for bit.
    import mlflow

    local = mlflow.artifacts.download_artifacts(artifact_uri=new[0].source, tracking_uri=client.tracking_uri)
    state, _ = um.load_weights(local)
    torch.testing.assert_close(state["fc.weight"], store.state_dict("fl/v2")["fc.weight"])
    again = um.tag_operation(store, result.operation, client=client, register=True)
    assert again["registered"] == []  # registered once per operation


def lineage_of(client: MlflowClient) -> dict[tuple[str, str], list[dict]]:
    """(umig node, node version) -> the tags of every MLflow model version carrying it."""
    out: dict[tuple[str, str], list[dict]] = {}
    for mv in client.search_model_versions():
        out.setdefault((mv.tags[um.TAG_NODE], mv.tags[um.TAG_NODE_VERSION]), []).append(mv.tags)
    return out


def test_cli_mlflow_sync_registers_every_version_with_lineage_once(tmp_path, monkeypatch):
    """The acceptance path: `umig mlflow sync` twice around an unlearning operation (own SQLite database)."""
    monkeypatch.chdir(tmp_path)  # nothing lands in the working directory
    s = Store.init(tmp_path / "s")
    s1, s2, s3 = states(3)
    s.add_node("base", s1, ARCH, data=TRAIN)
    s.add_node("org/ft", s2, ARCH, parents=["base"], relation="finetune", data="sklearn:digits?split=test")
    s.add_node("other", s3, ARCH, data="sklearn:digits?split=test[labels=0,2]")
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    sync = ["mlflow", "sync", "--tracking-uri", uri, "--artifact-root", str(tmp_path / "art"),
            "--store", str(s.root), "--json"]
    runner = CliRunner()
    res = runner.invoke(app, sync)
    assert res.exit_code == 0, res.output
    client = MlflowClient(uri)
    seen = lineage_of(client)
    assert sorted(seen) == [("base", "0"), ("org/ft", "0"), ("other", "0")]
    ft = seen[("org/ft", "0")][0]
    assert ft["umig.parents"] == "base" and ft["umig.relation"] == "finetune" and ft["umig.framework"] == "other"
    assert ft["umig.data_fingerprint"] == s.node("org/ft").data_fingerprint and ft["umig.arch"] == ARCH.spec
    assert "umig.operation" not in ft and "umig.parents" not in seen[("base", "0")][0]
    assert [m.name for m in client.search_registered_models(order_by=["name"])] == ["base", "org_ft", "other"]
    (mv,) = client.search_model_versions("name='org_ft'")
    local = um.require_extra().artifacts.download_artifacts(artifact_uri=mv.source, tracking_uri=uri)
    state, _ = um.load_weights(local)
    torch.testing.assert_close(state["fc.weight"], s2["fc.weight"])
    assert str(tmp_path / "art") in mv.source

    res = runner.invoke(app, sync)  # nothing new: nothing registered
    assert res.exit_code == 0 and json.loads(res.output)["registered"] == []

    op = s.unlearn([1], request={"ticket": "DSR-9"}, evaluate=False).operation
    res = runner.invoke(app, sync)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    changed = sorted(n["name"] for n in s.operation(op)["nodes"] if n["version_after"] not in (None, n["version_before"]))
    assert changed == ["base", "org/ft"]  # "other" never saw label 1
    assert sorted(out["registered"]) == ["base/v2", "org_ft/v2"] and sorted(out["tagged"]) == ["base/v1", "org_ft/v1"]
    seen = lineage_of(client)
    assert all(len(tags) == 1 for tags in seen.values())  # no duplicates
    assert sorted(seen) == [("base", "0"), ("base", "1"), ("org/ft", "0"), ("org/ft", "1"), ("other", "0")]
    assert seen[("org/ft", "1")][0]["umig.operation"] == op and seen[("org/ft", "1")][0]["umig.parents"] == "base"
    old = seen[("org/ft", "0")][0]
    assert old["umig.superseded_by"] == "org/ft@v1" and old["umig.unlearned_by"] == op
    assert old["umig.forgotten"] == "labels 1" and old["umig.ticket"] == "DSR-9"
    assert "umig.superseded_by" not in seen[("other", "0")][0]
    res = runner.invoke(app, sync)
    assert res.exit_code == 0 and json.loads(res.output) == {
        "registered": [], "tagged": [], "skipped": ["base@v0", "base@v1", "org/ft@v0", "org/ft@v1", "other@v0"]}

    for args, msg in ((["--registered-model", "a/b"], "cannot be empty or hold"),
                      (["--tracking-uri", "nope://x"], "unsupported URI")):
        res = runner.invoke(app, [*sync[:-1], *args])
        assert res.exit_code == 1 and msg in res.output
        assert len([line for line in res.output.splitlines() if line.strip() and "INFO" not in line]) == 1
    s.close()


def test_sync_in_python_skips_imported_versions_and_honours_registered_model(client, store):
    """Versions import_version brought in count as synced; the rest go under one registered model."""
    s1, s2 = states(2)
    register(client, "synced", s1, LINEAGE_TAGS)
    um.import_registered_model(store, "synced", client=client)
    store.add_node("child", s2, ARCH, parents=["synced/v1"], relation="finetune", data=TRAIN)
    out = um.sync(store, client=client, registered_model="fleet", experiment="train")
    assert out == {"registered": ["fleet/v1"], "tagged": [], "skipped": ["synced/v1@v0"]}
    (mv,) = um.node_versions(client, "child")
    assert mv.name == "fleet" and mv.tags["umig.parents"] == "synced/v1"
    assert um.sync(store, client=client, registered_model="fleet", experiment="train")["registered"] == []
