"""The lineage store through its Python API: init/open, schema, add_node, graph, versions, blobs, edits."""

from __future__ import annotations

import dataclasses
import sqlite3

import pytest
import torch
from safetensors.torch import load_file, save_file

import umig.store as store_mod
from conftest import corrupt_blob, delete_blob_file, store_state
from postgres import VERSIONS, database
from umig.arch import ArchSpec
from umig.data import digits_client_split, save_subset
from umig.errors import ArchError, DataError, GraphError, IntegrityError, NotFoundError, UmigError
from umig.models import digits_cnn
from umig.api import Store
from umig.store import SCHEMA_VERSION

DIGITS = "sklearn:digits?split=train"
CNN = ArchSpec("umig.models:digits_cnn", {"num_classes": 10})
CNN5 = ArchSpec("umig.models:digits_cnn", {"num_classes": 5})


@pytest.fixture(params=["local", *VERSIONS], ids=["local", *(f"{v}+s3" for v in VERSIONS)])
def small(request, tmp_path, monkeypatch):
    """A fresh store with untrained models: root 'a' (digits shard), children added by tests.

    Once embedded (a directory: SQLite + blob files), and shared (PostgreSQL + S3) once per PostgreSQL
    version the tests found."""
    torch.manual_seed(0)
    if request.param == "local":
        store = Store.init(tmp_path / "s")
    else:
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # a server store's local side files
        store = Store.init(database(request, request.param), blobs=request.getfixturevalue("s3_url"))
    idx = digits_client_split(3, split="train", seed=0)[0]
    subset = save_subset(tmp_path / "a.npy", idx)
    model = digits_cnn()
    store.add_node("a", model, CNN, framework="fl", data=DIGITS, subset=subset, meta={"round": 1})
    store.model_a = model  # the module it was added from, for comparisons
    store.subset_a = subset
    store.shard_size = len(idx)
    yield store
    store.close()


def location(store):
    """What ``Store.open`` takes to open ``store`` again: its directory, or its database URL."""
    return store.url if store.root is None else store.root


def schema_version(store) -> int:
    return int(store.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0])


# ------------------------------------------------------------------ opening
def test_init_open_and_schema_version(tmp_path):
    import umig

    assert umig.Store is Store  # the public API: `from umig import Store`
    root = tmp_path / "st"
    s = Store.init(root)
    assert (root / "umig.db").is_file() and (root / "blobs").is_dir() and (root / "lock").exists()
    row = s.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert int(row[0]) == SCHEMA_VERSION
    s.close()
    with pytest.raises(UmigError, match="already exists"):
        Store.init(root)
    Store.init(root, exist_ok=True).close()
    with pytest.raises(NotFoundError, match="no umig store"):
        Store.open(tmp_path / "missing")
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(UmigError, match="cannot create a umig store"):
        Store.init(tmp_path / "a_file")
    with Store.open(root) as s2:
        assert len(s2) == 0


def test_store_with_newer_schema_is_refused(small):
    # A newer umig wrote the store (autocommit: the change is visible to the next connection).
    small.db.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION + 1),))
    before = store_state(small)
    with pytest.raises(UmigError, match=rf"schema version {SCHEMA_VERSION + 1} is newer.*upgrade umig"):
        Store.open(location(small))
    assert store_state(small) == before


def test_older_store_is_migrated(small, monkeypatch):
    where = location(small)
    names = [n.name for n in small.nodes()]
    small.close()  # (closing twice is harmless: the fixture closes it again)
    # A future umig with one more migration opens today's store: data kept, schema upgraded.
    monkeypatch.setattr(store_mod, "MIGRATIONS", [*store_mod.MIGRATIONS, "ALTER TABLE nodes ADD COLUMN note TEXT"])
    monkeypatch.setattr(store_mod, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with Store.open(where) as s:
        assert schema_version(s) == SCHEMA_VERSION + 1
        cols = [d[0] for d in s.db.execute("SELECT * FROM nodes LIMIT 0").description]
        assert "note" in cols
        assert [n.name for n in s.nodes()] == names
        s.state_dict("a")
    with Store.open(where) as s:  # idempotent
        assert schema_version(s) == SCHEMA_VERSION + 1


def test_empty_database_is_migrated_from_version_zero(tmp_path):
    root = tmp_path / "old"
    root.mkdir()
    sqlite3.connect(root / "umig.db").close()  # a store from before any schema
    with Store.open(root) as s:
        assert int(s.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0]) == SCHEMA_VERSION
        assert len(s) == 0


def test_garbage_database_is_a_clear_error(tmp_path):
    root = tmp_path / "junk"
    root.mkdir()
    (root / "umig.db").write_bytes(b"this is not an SQLite database, just text " * 10)
    with pytest.raises(UmigError, match="not a readable umig database"):
        Store.open(root)


# ---------------------------------------------------------------- add_node
def test_add_node_from_module_records_everything(small):
    info = small.node("a")
    assert info.name == "a" and info.framework == "fl" and info.version == 0
    assert info.head == "fc" and info.classes == tuple(range(10)) and info.input_shape == (1, 8, 8)
    assert info.arch == CNN.to_json()
    assert info.data_ref["source"] == DIGITS and info.data_ref["subset"] == small.subset_a
    assert info.data_size == small.shard_size == sum(info.label_counts.values())
    assert info.labels == frozenset(range(10))
    assert info.meta == {"round": 1}
    assert info.data_fingerprint and len(info.data_fingerprint) == 64
    # Weights round-trip exactly, and the rebuilt model computes the same function.
    sd = small.state_dict("a")
    ref = small.model_a.state_dict()
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    x = torch.randn(4, 1, 8, 8)
    m = small.load_model("a")
    assert not m.training
    small.model_a.eval()
    assert torch.equal(m(x), small.model_a(x))
    fim = small.fim("a")
    assert tuple(fim.weight.shape) == (10, 64) and tuple(fim.bias.shape) == (10,)
    assert fim.classes == tuple(range(10)) and fim.samples == small.shard_size
    v = small.version("a")
    assert v.version == 0 and v.operation is None and not v.purged and v.delta_blob is None
    assert all(small.blobs.exists(d) for d in v.blobs())


def test_add_node_from_state_dict_with_relabelled_head(small):
    # A transfer child with a 5-way head predicting labels 5..9, added from a plain state dict.
    m5 = digits_cnn(num_classes=5)
    info = small.add_node("t5", m5.state_dict(), "umig.models:digits_cnn", arch_args={"num_classes": 5},
                          parents=["a"], framework="tl", data=DIGITS, only_labels="5-9", classes=range(5, 10))
    assert info.classes == (5, 6, 7, 8, 9)
    assert info.parents == (("a", "transfer", None),)
    assert set(info.label_counts) == {5, 6, 7, 8, 9}
    assert info.data_ref["only_labels"] == [5, 6, 7, 8, 9]
    fim = small.fim("t5")
    assert tuple(fim.weight.shape) == (5, 64) and fim.classes == (5, 6, 7, 8, 9)
    assert small.node("a").children == ("t5",)
    sd = small.state_dict("t5")
    assert all(torch.equal(sd[k], v) for k, v in m5.state_dict().items())

    # A data-less aggregate inherits the weighted mean of its parents' FIMs, aligned by label id.
    agg = small.add_node("agg", digits_cnn(), CNN, parents=[("a", 0.75), ("t5", 0.25)], framework="fl")
    assert agg.parents == (("a", "aggregate", 0.75), ("t5", "aggregate", 0.25))
    assert agg.data_ref is None and agg.data_size == 0 and agg.labels == frozenset()
    fa, ft, fg = small.fim("a"), small.fim("t5").aligned(range(10)), small.fim("agg")
    assert torch.allclose(fg.weight, 0.75 * fa.weight + 0.25 * ft.weight)
    assert torch.allclose(fg.weight[:5], 0.75 * fa.weight[:5])  # t5 has no rows for labels 0..4

    g = small.graph()
    assert set(g.nodes) == {"a", "t5", "agg"}
    assert set(g.edges) == {("a", "t5"), ("a", "agg"), ("t5", "agg")}
    assert g.nodes["t5"]["classes"] == (5, 6, 7, 8, 9) and g.nodes["t5"]["labels"] == frozenset(range(5, 10))
    assert g.nodes["agg"]["labels"] == frozenset()
    assert g.edges["a", "agg"]["weight"] == 0.75 and g.edges["a", "t5"]["relation"] == "transfer"


def test_add_node_from_files_safetensors_and_pt(small, tmp_path):
    sd = digits_cnn().state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "w.safetensors"))
    torch.save({"state_dict": sd}, tmp_path / "w.pt")
    small.add_node("f1", tmp_path / "w.safetensors", CNN, parents=["a"])
    small.add_node("f2", str(tmp_path / "w.pt"), CNN, parents=["a"])
    for n in ("f1", "f2"):
        got = small.state_dict(n)
        assert all(torch.equal(got[k], v) for k, v in sd.items())
        assert small.node(n).parents == (("a", "finetune", None),)


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pt_with_code_is_refused_without_unpickling(small, tmp_path, capsys):
    torch.save({"fc.weight": torch.zeros(10, 64), "x": _Payload()}, tmp_path / "evil.pt")
    before = store_state(small)
    with pytest.raises(ArchError, match="weights_only"):
        small.add_node("evil", tmp_path / "evil.pt", CNN)
    assert "must never run" not in capsys.readouterr().out
    assert store_state(small) == before


def test_bad_input_raises_clear_errors_and_changes_nothing(small, tmp_path):
    before = store_state(small)
    m = digits_cnn()
    cases = [
        (NotFoundError, "unknown parent node 'nope'", dict(name="x", weights=m, arch=CNN, parents=["nope"])),
        (GraphError, "own parent", dict(name="x", weights=m, arch=CNN, parents=["x"])),
        (GraphError, "'a' already exists", dict(name="a", weights=m, arch=CNN)),
        (GraphError, "parent twice", dict(name="x", weights=m, arch=CNN, parents=["a", ("a", 0.5)])),
        (ArchError, "does not fit the architecture", dict(name="x", weights=digits_cnn(num_classes=5), arch=CNN)),
        (ArchError, "does not fit", dict(name="x", weights=digits_cnn(num_classes=5).state_dict(), arch=CNN)),
        (ArchError, "not found", dict(name="x", weights=tmp_path / "missing.safetensors", arch=CNN)),
        (DataError, "nope", dict(name="x", weights=m, arch=CNN, data="sklearn:nope")),
        (DataError, "not found", dict(name="x", weights=m, arch=CNN, data=DIGITS, subset=str(tmp_path / "no.npy"))),
        (UmigError, "5 labels but head 'fc' has 10", dict(name="x", weights=m, arch=CNN, classes=range(5))),
        (UmigError, "twice", dict(name="x", weights=m, arch=CNN, classes=[0] * 10)),
        (UmigError, "cannot predict", dict(name="x", weights=digits_cnn(num_classes=5), arch=CNN5, data=DIGITS)),
        (UmigError, "invalid node name", dict(name="bad name!", weights=m, arch=CNN)),
        (UmigError, "unknown framework", dict(name="x", weights=m, arch=CNN, framework="nope")),
        (UmigError, "unknown relation", dict(name="x", weights=m, arch=CNN, relation="nope")),
        (UmigError, "need --data", dict(name="x", weights=m, arch=CNN, subset=store_mod.__file__)),
    ]
    for exc, msg, kw in cases:
        with pytest.raises(exc, match=msg) as info:
            small.add_node(kw.pop("name"), kw.pop("weights"), kw.pop("arch"), **kw)
        assert "\n" not in str(info.value), str(info.value)
    assert store_state(small) == before


def test_failed_batch_rolls_back_rows_and_blobs(small):
    before = store_state(small)
    with pytest.raises(RuntimeError, match="boom"):
        with small.batch():
            small.add_node("b1", digits_cnn(), CNN, parents=["a"])
            small.add_node("b2", digits_cnn(), CNN, parents=["b1"])
            raise RuntimeError("boom")
    assert store_state(small) == before
    assert not small.has_node("b1")


def test_config_read_inside_a_batch_follows_its_changes_and_its_rollback(small):
    with small.batch():
        assert small.fisher_settings()["temperature"] == 1.0  # read once here, then served from memory
        small.set_config("fisher.temperature", 2.0)
        assert small.fisher_settings()["temperature"] == 2.0
        small.config()["fisher.kind"] = "true"  # a caller's copy: not the store's
        assert small.fisher_settings()["kind"] == "empirical"
    with pytest.raises(RuntimeError, match="undo"):
        with small.batch():
            small.set_config("fisher.temperature", 3.0)
            assert small.config()["fisher.temperature"] == "3.0"
            raise RuntimeError("undo")
    assert small.config()["fisher.temperature"] == "2.0"
    with small.batch():
        assert small.config()["fisher.temperature"] == "2.0"


def test_remove_inside_a_rolled_back_batch_keeps_the_blobs(small):
    small.add_node("b", digits_cnn(), CNN, parents=["a"])
    before = store_state(small)
    with pytest.raises(RuntimeError, match="changed my mind"):
        with small.batch():
            small.remove("a", recursive=True)
            assert not small.has_node("b")
            raise RuntimeError("changed my mind")
    assert store_state(small) == before
    small.load_model("b")  # every blob still there
    with small.batch():
        small.remove("b")
    # Committed: b's blobs are gone, a's remain.
    assert store_state(small)["blobs"] == sorted(set(small.version("a").blobs()))


def test_parent_names_with_colons(small):
    small.add_node("ckpt:3", digits_cnn(), CNN, parents=["a"])
    assert small.add_node("x", digits_cnn(), CNN, parents=["ckpt:3"]).parents == (("ckpt:3", "finetune", None),)
    y = small.add_node("y", digits_cnn(), CNN, parents=["ckpt:3:0.25", "a:0.75"], framework="fl")
    assert y.parents == (("a", "aggregate", 0.75), ("ckpt:3", "aggregate", 0.25))


# --------------------------------------------------------------- edits
def test_link_refuses_cycles_and_bad_edges(small):
    small.add_node("b", digits_cnn(), CNN, parents=["a"])
    small.add_node("c", digits_cnn(), CNN, parents=["b"])
    small.add_node("d", digits_cnn(), CNN)
    before = store_state(small)
    for (p, c), exc, msg in [
        (("c", "a"), GraphError, "cycle"),
        (("b", "b"), GraphError, "cycle"),
        (("a", "b"), GraphError, "already exists"),
        (("a", "nope"), NotFoundError, "nope"),
    ]:
        with pytest.raises(exc, match=msg):
            small.link(p, c)
    with pytest.raises(UmigError, match="unknown relation"):
        small.link("a", "d", relation="magic")
    assert store_state(small) == before
    small.link("a", "c", relation="copy", weight=0.5)
    assert ("a", "copy", 0.5) in small.node("c").parents


def test_remove_refused_with_children_unless_recursive(small):
    small.add_node("b", digits_cnn(), CNN, parents=["a"])
    small.add_node("c", digits_cnn(), CNN, parents=["b"])
    shared = small.add_node("twin", small.state_dict("b"), CNN)  # same weights as b, but not b's child
    before = store_state(small)
    with pytest.raises(GraphError, match=r"node 'b' has children \(c\); use --recursive"):
        small.remove("b")
    with pytest.raises(NotFoundError, match="unknown node 'zz'"):
        small.remove("zz")
    assert store_state(small) == before
    c_blobs = set(small.version("c").blobs())
    assert sorted(small.remove("b", recursive=True)) == ["b", "c"]
    assert sorted(n.name for n in small.nodes()) == ["a", "twin"]
    assert not any(small.blobs.exists(d) for d in c_blobs - set(small.version("a").blobs()))
    assert all(small.blobs.exists(d) for d in small.version(shared.name).blobs())
    small.load_model("twin")
    assert small.remove("twin") == ["twin"]


def test_corrupted_or_missing_blob_fails_naming_the_node(small, tmp_path):
    v = small.version("a")
    corrupt_blob(small, v.body_blob)
    for call in (lambda: small.state_dict("a"), lambda: small.load_model("a"),
                 lambda: small.export("a", tmp_path / "out.safetensors")):
        with pytest.raises(IntegrityError, match=r"node 'a' is corrupted"):
            call()
    assert not (tmp_path / "out.safetensors").exists()
    corrupt_blob(small, v.fim_blob)
    with pytest.raises(IntegrityError, match="node 'a'"):
        small.fim("a")
    corrupt_blob(small, v.body_blob)  # repaired: the body loads again
    delete_blob_file(small, v.head_blob)
    with pytest.raises(NotFoundError, match=r"node 'a' is missing"):
        small.state_dict("a")


def test_export_round_trip(small, tmp_path):
    out = small.export("a", tmp_path / "sub" / "a.safetensors")
    got = load_file(str(out))
    ref = small.model_a.state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["umig.node"] == "a" and meta["umig.head"] == "fc" and meta["umig.version"] == "0"
    # The export re-imports as an identical node.
    small.add_node("a2", out, CNN)
    again = small.state_dict("a2")
    assert all(torch.equal(again[k], ref[k]) for k in ref)


def test_unknown_nodes_and_versions(small):
    for call in (lambda: small.node("zz"), lambda: small.state_dict("zz"), lambda: small.versions("zz"),
                 lambda: small.export("zz", "x.safetensors"), lambda: small.history(node="zz")):
        with pytest.raises(NotFoundError, match="unknown node 'zz'"):
            call()
    with pytest.raises(NotFoundError, match="no version 7"):
        small.state_dict("a", 7)
    with pytest.raises(NotFoundError, match="unknown operation"):
        small.revert("op-nope")
    with pytest.raises(NotFoundError, match="unknown operation"):
        small.purge("op-nope")


def test_equal_content_gets_one_digest_whatever_the_metadata_order(tmp_path):
    """safetensors writes its header from a hash map; blobs canonicalise it so content dedupes."""
    import torch

    from umig.blobs import BlobStore

    blobs = BlobStore(tmp_path / "blobs")
    t = {"b.weight": torch.ones(3, 2), "a.bias": torch.zeros(3)}
    digests = {blobs.put_tensors(dict(t), {f"k{i}": str(i) for i in order})[0]
               for order in ([0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [2, 0, 5, 1, 4, 3]) for _ in range(3)}
    assert len(digests) == 1
    (d,) = digests
    loaded, meta = blobs.load_with_metadata(d)
    assert torch.equal(loaded["b.weight"], t["b.weight"]) and meta == {f"k{i}": str(i) for i in range(6)}


def test_gc_removes_half_written_temp_files(fl_store):
    tmp = fl_store.blobs.tmp
    tmp.mkdir(parents=True, exist_ok=True)
    part = tmp / "deadbeef.0.part"
    part.write_bytes(b"x" * 100)
    before = fl_store.blobs.all_digests()
    assert fl_store.gc() >= 100
    assert not part.exists()
    assert fl_store.blobs.all_digests() == before  # every referenced blob survives


def test_snapshots_are_the_dataclass_they_claim_to_be(tmp_path):
    import pickle

    from umig.store import NodeSnapshot, _snapshot

    values = ("a", 1, {"k": 1}, "fc", (0, 1), "b", "h", None, "f", None, None, 0, frozenset({1}), None, "torch", ())
    snap = _snapshot(*values)
    assert snap == NodeSnapshot(*values) and pickle.loads(pickle.dumps(snap)) == snap
    with pytest.raises(dataclasses.FrozenInstanceError):
        snap.version = 2  # type: ignore[misc]
    with pytest.raises(TypeError):
        _snapshot(*values[:-1])
