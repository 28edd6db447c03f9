"""Flower integration: ``UmigFedAvg.aggregate_train`` on real ``flwr`` Messages records a round (no Ray)."""

from __future__ import annotations

import os
import time

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import pytest
import torch

pytest.importorskip("flwr", reason="Flower not installed: pip install 'umig[flower]'")

from flwr.app import ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict  # noqa: E402

from umig.api import Store  # noqa: E402
from umig.arch import ArchSpec  # noqa: E402
from umig.data import digits_client_split  # noqa: E402
from umig.errors import UmigError  # noqa: E402
from umig.integrations.flower import UmigFedAvg  # noqa: E402
from umig.lineage import subset_ref  # noqa: E402
from umig.train import fedavg  # noqa: E402

ARCH = ArchSpec("umig.models:digits_mlp", {"num_classes": 10, "hidden": 16})
TRAIN = "sklearn:digits?split=train"


def reply(node_id: int, state: dict[str, torch.Tensor], n: int, round: int = 1) -> Message:
    """A real reply Message as a SuperNode's ClientApp sends it back (metadata from the SuperLink)."""
    meta = Metadata(run_id=1, message_id=f"m{node_id}", src_node_id=node_id, dst_node_id=0,
                    reply_to_message_id=f"i{node_id}", group_id=str(round), created_at=time.time(), ttl=600.0,
                    message_type="train")
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": n, "pid": node_id})})
    return Message(content, metadata=meta)


def perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
            for k, v in state.items()}


@pytest.fixture
def setup(tmp_path):
    store = Store.init(tmp_path / "s")
    shards = [subset_ref(store, TRAIN, idx) for idx in digits_client_split(2, seed=0)]
    init = ARCH.build().state_dict()
    yield store, shards, init
    store.close()


def test_aggregate_train_records_clients_and_aggregate(setup):
    store, shards, init = setup
    ids = {101: 0, 202: 1}  # Flower node id -> partition
    strategy = UmigFedAvg(store, ARCH, data={101: shards[0], 202: shards[1]}, classes=range(10),
                          fraction_evaluate=0.0)
    strategy.record_initial(ArrayRecord(init))
    states = {nid: perturbed(init, nid) for nid in ids}
    sizes = {101: 300, 202: 100}
    arrays, metrics = strategy.aggregate_train(1, iter([reply(nid, states[nid], sizes[nid]) for nid in ids]))

    assert arrays is not None and metrics is not None
    assert strategy.rounds[1] == ["flower/r1/c101", "flower/r1/c202", "flower/r1/global"]
    c0 = store.node("flower/r1/c101")
    assert [p for p, *_ in c0.parents] == ["flower/init"] and c0.data_size == len(shards[0])
    assert c0.meta["flower_node_id"] == 101 and c0.meta["num-examples"] == 300
    torch.testing.assert_close(store.state_dict("flower/r1/c101")["fc.weight"], states[101]["fc.weight"])
    agg = store.node("flower/r1/global")
    assert {r for _, r, _ in agg.parents} == {"aggregate"}
    assert {p: w for p, _, w in agg.parents} == pytest.approx({"flower/r1/c101": 0.75, "flower/r1/c202": 0.25})
    # The recorded aggregate is Flower's FedAvg of the replies.
    expect = fedavg([states[101], states[202]], [0.75, 0.25])
    torch.testing.assert_close(store.state_dict("flower/r1/global")["fc.weight"], expect["fc.weight"])
    assert strategy.global_node == "flower/r1/global"
    # Unlearning plans over the recorded round.
    plan = store.plan_unlearning([1]).to_json()
    assert "flower/r1/global" in str(plan)


def test_callable_data_client_id_and_initial_from_configure(setup):
    store, shards, init = setup
    strategy = UmigFedAvg(store, ARCH, classes=range(10), prefix="fl", min_available_nodes=1, min_train_nodes=1,
                          client_id=lambda m: int(m.content["metrics"]["pid"]) % 100,
                          data=lambda m: shards[int(m.content["metrics"]["pid"]) // 100 - 1])

    class OneNodeGrid:  # only what configure_train asks of a Grid before it builds messages
        def get_node_ids(self):
            return [7]

    try:  # outside a running Flower app the messages themselves may not build; the initial model comes first
        list(strategy.configure_train(1, ArrayRecord(init), ConfigRecord(), OneNodeGrid()))
    except RuntimeError:
        pass
    assert strategy.global_node == "fl/init" and store.has_node("fl/init")
    strategy.aggregate_train(1, [reply(101, perturbed(init, 1), 10), reply(202, perturbed(init, 2), 30)])
    assert store.has_node("fl/r1/c1") and store.has_node("fl/r1/c2")
    assert store.node("fl/r1/c2").data_size == len(shards[1])


def test_bad_round_writes_nothing(setup, tmp_path):
    store, shards, init = setup
    strategy = UmigFedAvg(store, ARCH, data={101: shards[0]}, classes=range(10))
    strategy.record_initial(ArrayRecord(init))
    before = {n.name for n in store.nodes()}
    with pytest.raises(UmigError, match="no data reference for Flower client 202"):
        strategy.aggregate_train(1, [reply(101, init, 10), reply(202, init, 10)])
    strategy.data = {101: shards[0], 202: str(tmp_path / "missing.safetensors")}
    with pytest.raises(UmigError):  # the second client's data does not resolve: the whole round rolls back
        strategy.aggregate_train(1, [reply(101, perturbed(init, 3), 10), reply(202, init, 10)])
    assert {n.name for n in store.nodes()} == before and strategy.global_node == "flower/init"


def test_flower_example_records_rounds_then_plans(tmp_path):
    pytest.importorskip("ray", reason="Flower's simulation engine needs Ray: pip install 'umig[ray]'")
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    store = tmp_path / "S"
    proc = subprocess.run([sys.executable, str(repo / "examples" / "flower_digits.py"), "--quick", "--store", str(store)],
                          capture_output=True, text=True, timeout=300, cwd=repo,
                          env={**os.environ, "PYTHONPATH": str(repo), "FLWR_TELEMETRY_ENABLED": "0"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "flower: recorded 7 models" in proc.stdout
    with Store.open(store) as s:
        assert s.has_node("flower/r2/global") and len(s.plan_unlearning([1]).plan.affected) == 6
