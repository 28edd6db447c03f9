"""Every example runs end to end with ``--quick`` in a subprocess and prints its result line.

The six runs start together, two at a time (most of each run is interpreter and torch
start-up), the first time any test here asks for them; each test then checks one run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIUN_LINE = r"FIUn forgot label\(s\) [\d,]+ on \d+ node\(s\) in [\d.]+ s: worst AD_f ([\d.]+)% \(train\) / ([\d.]+)% \(held-out\)"
EXPECT = {
    "federated": FIUN_LINE,
    "data_parallel": FIUN_LINE,
    "incremental": FIUN_LINE,
    "transfer": FIUN_LINE,
    "multi_root": r"FIUn forgot label\(s\) 1,7 on \d+ node\(s\) in [\d.]+ s from 2 discovery nodes; "
                  r"worst AD_f on the \d+ multi-root node\(s\): ([\d.]+)%",
    "pipeline": r"pipeline (?:complete|FAILED its release gates): operation op-\w+ forgot label\(s\) 8 on \d+ models",
}


def _run(name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(REPO / "examples" / f"{name}.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=REPO)


@pytest.fixture(scope="module")
def runs() -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, name) for name in EXPECT}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", list(EXPECT))
def test_example_runs_quick(runs, name):
    proc = runs[name]
    assert proc.returncode == 0, f"examples/{name}.py --quick exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    m = re.search(EXPECT[name], proc.stdout)
    assert m, f"examples/{name}.py printed no result line:\n{proc.stdout[-3000:]}"
    for worst_ad_f in m.groups():  # forgotten labels are really gone, on train and held-out data
        assert float(worst_ad_f) <= 5.0, m.group(0)


def test_pipeline_exports_and_audits(runs):
    out = runs["pipeline"].stdout
    assert re.search(r"exported fl/r1/global v1 to \S+\.safetensors", out)
    assert '"operation": "op-' in out and '"request": "DR-0001"' in out
    assert re.search(r"release gates for fl/r1/global: AD_f [\d.]+% <= 1%: (PASS|FAIL)", out)


def test_transfer_heads_keep_the_base_body(runs):
    assert "identical to the base's: True" in runs["transfer"].stdout
