"""Every example runs end to end with ``--quick`` in a subprocess and prints its result line.

The runs the selected tests need start together, two at a time (most of each run is
interpreter and torch start-up), the first time any test here asks for them; each test then
checks one run. ``backdoor`` and ``byzantine_client`` also get ``--check``: they exit 1 when
forgetting misses their targets against ``retrain``; so does ``incident`` when attribution does not
rank the poisoning client first or forgetting what it found misses the true-set retrain.
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
    "backdoor": r"backdoor: ASR [\d.]+% -> [\d.]+% with \S+ \(retrain [\d.]+%\), clean accuracy .*: PASS",
    "byzantine_client": r"byzantine client: held-out accuracy [\d.]+% -> [\d.]+% with \S+ \(retrain [\d.]+%\).*: PASS",
    "incident": r"incident: \S+ ranked first \(poisoner \S+\); forgot \d+ samples \(\d+ of \d+ poisoned found\): .*: PASS",
}
EXTRA_ARGS = {"backdoor": ["--check"], "byzantine_client": ["--check"], "incident": ["--check"]}
# Tests that read an example's run without being parametrised by it (so its run starts with the others).
USES = {"test_pipeline_exports_and_audits": "pipeline", "test_transfer_heads_keep_the_base_body": "transfer",
        "test_backdoor_is_planted_then_removed": "backdoor"}


def _run(name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(REPO / "examples" / f"{name}.py"), "--quick", *EXTRA_ARGS.get(name, [])],
                          capture_output=True, text=True, timeout=300, env=env, cwd=REPO, check=False)


class _Runs(dict):
    def __missing__(self, name: str) -> subprocess.CompletedProcess:  # a run no selected test announced
        self[name] = _run(name)
        return self[name]


@pytest.fixture(scope="module")
def runs(request) -> dict[str, subprocess.CompletedProcess]:
    """The runs of the examples the selected tests of this module need (``-k`` runs only those)."""
    wanted = []
    for item in request.session.items:
        if item.module is request.module:
            callspec = getattr(item, "callspec", None)
            name = callspec.params.get("name") if callspec else USES.get(item.originalname)
            if name and name not in wanted:
                wanted.append(name)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_run, name) for name in wanted}
        return _Runs({name: f.result() for name, f in futures.items()})


@pytest.mark.parametrize("name", list(EXPECT))
def test_example_runs_quick(runs, name):
    proc = runs[name]
    assert proc.returncode == 0, f"examples/{name}.py --quick exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    m = re.search(EXPECT[name], proc.stdout)
    assert m, f"examples/{name}.py printed no result line:\n{proc.stdout[-3000:]}"
    for worst_ad_f in m.groups():  # forgotten labels are really gone, on train and held-out data (FIUn examples)
        assert float(worst_ad_f) <= 5.0, m.group(0)


def test_pipeline_exports_and_audits(runs):
    out = runs["pipeline"].stdout
    assert re.search(r"exported fl/r1/global v1 to \S+\.safetensors", out)
    assert '"operation": "op-' in out and '"request": "DR-0001"' in out
    # The release gate is umig verify's verdict against retraining, kept with the operation (audit entry).
    gate = re.search(r"release gate \(umig verify, reference computed\) on (\d+) models: worst Avg\. Gap ([\d.]+) "
                     r"<= 1\.5 points: (PASS|FAIL); worst head-edit gap ([+-][\d.]+) <= 5 points: (PASS|FAIL); "
                     r"production model fl/r1/global: Avg\. Gap [\d.]+", out)
    assert gate, out[-3000:]
    assert (gate.group(3) == "PASS") == (float(gate.group(2)) <= 1.5)
    # FIUn's erase mode leaves the head nothing the white-box edit can bring back.
    assert gate.group(5) == "PASS" and float(gate.group(4)) <= 5.0, gate.group(0)
    assert ("pipeline complete:" in out) == (gate.group(3) == gate.group(5) == "PASS")
    kept = re.search(r'"verification": \{\s*"reference": "computed",.*?"max_gap": 1\.5,\s*"passed": (true|false)', out,
                     re.DOTALL)
    assert kept and (kept.group(1) == "true") == (gate.group(3) == "PASS"), kept


def test_transfer_heads_keep_the_base_body(runs):
    assert "identical to the base's: True" in runs["transfer"].stdout


def test_backdoor_is_planted_then_removed(runs):
    m = re.search(r"backdoor: ASR ([\d.]+)% -> ([\d.]+)%", runs["backdoor"].stdout)
    assert m and float(m.group(1)) >= 50.0 and float(m.group(2)) <= 5.0, m and m.group(0)
