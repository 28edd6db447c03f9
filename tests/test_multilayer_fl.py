"""Every installed method runs on the multi-layer FL lineage of ``examples/federated.py`` (issue 11).

The global's parents are edge aggregators, not clients: a data-driven method must find the
data of the clients below them, at any depth.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from umig import Store
from umig import unlearner as U

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
from federated import build  # noqa: E402

# Small settings so each method takes a second or two on a shared core.
PARAMS = {"finetune": {"epochs": 1}, "gradient-ascent": {"epochs": 1}, "distill": {"epochs": 1},
          "fused": {"rounds": 1}, "channel": {"epochs": 1}}


@pytest.fixture(scope="module")
def multilayer(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multilayer") / "store"
    with Store.init(root) as s:
        build(s, clients=4, edges=2, rounds=1, epochs=2, dag=False, log=lambda *_: None)
    return root


@pytest.mark.parametrize("method", sorted(U.available()))
def test_every_method_runs_on_a_multilayer_fl_lineage(multilayer, tmp_path, method):
    root = tmp_path / "store"
    shutil.copytree(multilayer, root)
    with Store.open(root) as s:
        g = s.graph()
        assert set(g.predecessors("fl/r1/global")) == {"fl/r1/edge0", "fl/r1/edge1"}
        m = U.get(method)
        params = {k: v for k, v in PARAMS.get(method, {}).items() if k in m.params}
        before = s.state_dict("fl/r1/global")
        res = s.unlearn([3], method=method, params=params, evaluate=False)
        assert "fl/r1/global" in [n.name for n in res.nodes]
        after = s.state_dict("fl/r1/global")
        assert any(not torch.equal(before[k], after[k]) for k in after), f"{method} left the global unchanged"
