"""Hugging Face model cards: lineage, data reference and unlearning history of a node (offline)."""

from __future__ import annotations

import json
import sys

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from umig.api import Store
from umig.arch import ArchSpec
from umig.cli.main import app
from umig.data import digits_client_split
from umig.integrations.hf import card_metadata, card_text
from umig.lineage import subset_ref

ARCH = ArchSpec("umig.models:digits_mlp", {"num_classes": 10, "hidden": 16})
TRAIN = "sklearn:digits?split=train"


@pytest.fixture
def store(tmp_path):
    """base (a Hub model) -> ft (fine-tuned on a shard), then labels 1 forgotten for ticket DSR-7."""
    s = Store.init(tmp_path / "s")
    s.add_node("base", ARCH.build(), ARCH, data=TRAIN, meta={"hf_repo_id": "org/digits-base"})
    shard = subset_ref(s, TRAIN, digits_client_split(2, seed=0)[0])
    s.add_node("ft", ARCH.build(), ARCH, parents=["base"], data=shard, relation="finetune")
    s.unlearn([1], request={"ticket": "DSR-7", "requester": "dpo@example.org"}, evaluate=False)
    yield s
    s.close()


def test_card_through_huggingface_hub(store):
    hub = pytest.importorskip("huggingface_hub", reason="huggingface_hub not installed: pip install 'umig[hf]'")
    card = hub.ModelCard(card_text(store, "ft"))  # parses as a Hub model card, offline
    data = card.data.to_dict()
    assert data["base_model"] == "org/digits-base" and data["base_model_relation"] == "finetune"
    assert "machine-unlearning" in data["tags"]
    umig = data["umig"]
    assert umig["parents"] == [{"name": "base", "relation": "finetune", "weight": None}]
    assert umig["data"]["reference"].startswith(TRAIN) and umig["data"]["fingerprint"]
    (op,) = umig["unlearning"]
    assert op["forgot"] == ["labels 1"] and op["ticket"] == "DSR-7" and (op["version_before"], op["version_after"]) == (0, 1)
    assert "## Unlearning history" in card.text and "Forgot labels 1" in card.text and "ticket DSR-7" in card.text


def test_card_without_huggingface_hub_is_the_same_card(store, monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails: the plain writer
    text = card_text(store, "ft")
    front, body = text.split("\n---\n", 1)
    meta = {k: json.loads(v) for k, v in (line.split(": ", 1) for line in front.removeprefix("---\n").splitlines())}
    assert meta == json.loads(json.dumps(card_metadata(store, "ft")))
    assert "# ft" in body and "version 0 -> 1" in body and "dpo@example.org" in body


def test_cli_card_writes_file_and_fails_with_one_line(store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "card"
    out.mkdir()
    res = runner.invoke(app, ["card", "ft", "-o", str(out), "--store", str(store.root)])
    assert res.exit_code == 0, res.output
    assert (out / "README.md").read_text().startswith("---\n") and "wrote" in res.output
    res = runner.invoke(app, ["card", "base", "--store", str(store.root)])
    assert res.exit_code == 0 and "No unlearning operation" not in res.output  # base was unlearned too
    for args, msg in ((["card", "nope"], "unknown node 'nope'"),
                      (["card", "ft", "-o", str(tmp_path / "missing" / "x.md")], "cannot write")):
        res = runner.invoke(app, [*args, "--store", str(store.root)])
        assert res.exit_code == 1 and msg in res.output
        assert len([line for line in res.output.splitlines() if line.strip()]) == 1


def test_export_with_model_card_writes_checkpoint_and_card(store, tmp_path):
    runner = CliRunner()
    out = tmp_path / "hub" / "ft"
    res = runner.invoke(app, ["export", "ft", "--model-card", str(out), "--store", str(store.root), "--json"])
    assert res.exit_code == 0, res.output
    paths = json.loads(res.output)
    assert paths == {"node": "ft", "path": str(out / "model.safetensors"), "card": str(out / "README.md")}
    weights = load_file(str(out / "model.safetensors"))
    assert all(weights[k].equal(v) for k, v in store.state_dict("ft").items())
    assert [e.node for e in store.exports(node="ft")] == ["ft"]  # the copy is in the audit log
    text = (out / "README.md").read_text()
    assert text == card_text(store, "ft")
    assert 'base_model: org/digits-base' in text and "base_model_relation: finetune" in text
    assert "Forgot labels 1" in text and "UTC" in text  # what was forgotten, and when
    # -o puts the checkpoint elsewhere; the card still goes to DIR.
    res = runner.invoke(app, ["export", "base", "-o", str(tmp_path / "b.safetensors"), "--model-card",
                              str(tmp_path / "b"), "--store", str(store.root)])
    assert res.exit_code == 0 and (tmp_path / "b.safetensors").is_file() and (tmp_path / "b" / "README.md").is_file()
    (tmp_path / "f").write_text("x")
    for args, msg in ((["export", "ft"], "-o FILE"), (["export", "ft", "--model-card", str(tmp_path / "f")],
                                                      "not a directory")):
        res = runner.invoke(app, [*args, "--store", str(store.root)])
        assert res.exit_code == 1 and msg in res.output
        assert len([line for line in res.output.splitlines() if line.strip()]) == 1
