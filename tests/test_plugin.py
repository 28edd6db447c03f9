"""A third-party unlearner, pip-installed from a temporary package, found through the
``umig.unlearners`` entry-point group and run through the real command line, in the worker pool.

The package is installed with ``pip install --target`` into the test's temporary directory (offline:
``--no-index --no-deps --no-build-isolation``) and made visible through ``PYTHONPATH`` of the CLI
subprocesses only, so the shared virtual environment is never modified and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import REPO, umig_cli

PLUGIN = '''
"""tinyplug: forget labels by lowering their head bias (a sparse delta, so revert is exact)."""

import torch

from umig.unlearners.base import NodeUnlearner, NodeUpdate, Param


class Lower(NodeUnlearner):
    name = "tiny"
    description = "Lower the forgotten labels' head bias by `margin`."
    params = {"margin": Param(1000.0, "how far to lower the bias")}

    def unlearn_node(self, ctx):
        rows = torch.tensor([r for r, c in enumerate(ctx.classes) if c in ctx.labels])
        values = torch.full((len(rows),), -float(ctx.params["margin"]))
        return NodeUpdate(delta={ctx.head + ".bias": (rows, values)},
                          metrics={"params_changed": len(rows), "plugin": "tinyplug"})
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "umig-tinyplug"
version = "0.1.0"

[project.entry-points."umig.unlearners"]
tiny = "tinyplug:Lower"

[tool.setuptools]
py-modules = ["tinyplug"]
'''


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("tinyplug-src")
    (src / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (src / "tinyplug.py").write_text(textwrap.dedent(PLUGIN))
    site = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300, cwd=src,
        env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(site.glob("umig_tinyplug-*.dist-info/entry_points.txt"))
    return site


def test_third_party_unlearner_installs_lists_and_runs(plugin_site, fl_store):
    env = {"PYTHONPATH": os.pathsep.join([str(REPO), str(plugin_site)])}
    root = fl_store.root
    before = {n.name: fl_store.state_dict(n.name) for n in fl_store.nodes()}
    fl_store.close()  # the CLI subprocesses own the store now

    listed = json.loads(umig_cli("methods", "--json", env=env, check=True).stdout)
    tiny = next(m for m in listed if m["name"] == "tiny")
    assert tiny["target"] == "tinyplug:Lower" and tiny["per_node"]
    assert tiny["params"] == {"margin": {"default": 1000.0, "help": "how far to lower the bias"}}
    builtins = {"fiun", "fused", "channel", "retrain", "finetune", "gradient-ascent", "distill"}
    assert builtins <= {m["name"] for m in listed}

    # In the worker pool: the spawned workers import the plugin's class too.
    out = umig_cli("unlearn", "--labels", "3", "--method", "tiny", "--param", "margin=500", "--json",
                   "--workers", "2", "--device", "cpu", "--eval-data", "sklearn:digits?split=test",
                   store=root, env=env, check=True)
    result = json.loads(out.stdout)
    assert result["method"] == "tiny" and result["params"] == {"margin": 500.0}
    assert result["backend"]["backend"] == "pool" and result["backend"]["workers"] == 2
    assert len(result["nodes"]) == 8
    for node in result["nodes"]:
        assert node["plugin"] == "tinyplug" and node["AD_f_heldout_after"] == 0.0
        assert node["AD_r_heldout_after"] >= node["AD_r_heldout_before"] - 0.05

    from umig.api import Store

    with Store.open(root) as store:
        assert store.history()[-1]["method"] == "tiny"
        g = store.state_dict("fl/r2/global")
        assert torch.equal(g["fc.bias"][3], before["fl/r2/global"]["fc.bias"][3] - 500.0)
        store.revert(result["operation"])
        for name, sd in before.items():
            now = store.state_dict(name)
            assert all(torch.equal(sd[k], now[k]) for k in sd), name
