"""`umig ui` (issue 16): the JSON API in-process, the command end to end, and the page in a real
headless Chromium driven by Playwright.

The API must answer what the CLI's ``--json`` prints (the same functions build both), never change
the store without ``--allow-write``, and refuse writes from other origins. The browser tests check
that the graph draws every node and edge, that clicking a node opens its page, that a forget-set
preview highlights exactly the plan's discovery and inherited nodes (changing nothing), and that a
large graph opens collapsed. They are skipped, with the reason, only where no Chromium is installed.
With ``UMIG_SCREENSHOTS=1`` they write the README's screenshots to ``docs/img/``.
"""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO, store_state
from conftest import cli_run as cli
from umig.api import Store
from umig.cli import render as R
from umig.ui import api as ui_api
from umig.ui.server import STATIC, create_app, running
from umig.verify import AVG_GAP_METRICS, METRICS, REFERENCE_METHOD, avg_gap

pytest.importorskip("starlette", reason="the 'ui' extra is not installed: pip install 'umig[ui]'")
pytest.importorskip("uvicorn", reason="the 'ui' extra is not installed: pip install 'umig[ui]'")
from starlette.testclient import TestClient  # noqa: E402

SCREENSHOTS = os.environ.get("UMIG_SCREENSHOTS") == "1"
IMG = REPO / "docs" / "img"
# Debian's Chromium, headless, talking to nothing but the test server.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TICKET = "GDPR-2024-017"


def verification_of(entry: dict) -> dict:
    """A verification record in the shape ``umig.verify.verify`` stores (its keys, metrics and Avg. Gap
    rule), with made-up figures: a real one retrains every node, which is ``umig verify``'s own test."""
    nodes = []
    for i, n in enumerate(entry["nodes"]):
        unlearned = {m: 0.0 if m.startswith(("forget", "heldout_forget")) else 0.95 for m in METRICS}
        reference = {m: v + (0.002 * (i + 1) if m in AVG_GAP_METRICS[1:3] else 0.0) for m, v in unlearned.items()}
        gap = {m: round(100 * (unlearned[m] - reference[m]), 3) for m in METRICS}
        nodes.append({"name": n["name"], "role": n["role"], "version": n["version_after"], "unlearned": unlearned,
                      "reference": reference, "gap": gap, "avg_gap": avg_gap(gap)})
    gaps = [n["avg_gap"] for n in nodes]
    return {"operation": entry["operation"], "method": entry["method"], "forget": entry["forget"],
            "reference": "computed", "reference_method": REFERENCE_METHOD, "reference_s": 1.2,
            "heldout": "sklearn:digits?split=test", "settings": {}, "avg_gap_metrics": list(AVG_GAP_METRICS),
            "nodes": nodes, "avg_gap": round(sum(gaps) / len(gaps), 3), "max_avg_gap": max(gaps), "max_gap": 2.0,
            "passed": max(gaps) <= 2.0, "created": time.time(), "wall_s": 3.0}


@pytest.fixture(scope="module")
def ui_root(fl_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The FL lineage after one verified operation (labels 1,2 with FIUn, evaluated, with a ticket)."""
    root = tmp_path_factory.mktemp("ui") / "store"
    shutil.copytree(fl_template, root)
    with Store.open(root) as store:
        op = store.unlearn([1, 2], request={"requester": "privacy@example.org", "ticket": TICKET,
                                            "reason": "erasure request"}).operation
        store.set_verification(op, verification_of(store.operation(op)))
    return root


@pytest.fixture(scope="module")
def ui_store(ui_root: Path) -> Iterator[Store]:
    with Store.open(ui_root) as store:
        yield store


@pytest.fixture
def client(ui_store: Store) -> Iterator[TestClient]:
    with TestClient(create_app(ui_store), base_url="http://127.0.0.1") as c:
        yield c


def as_cli_json(data) -> object:
    """What the CLI prints for ``data``, parsed back."""
    return json.loads(R.json_text(data))


# ------------------------------------------------------------------ the JSON API
def test_api_graph_is_graph_show_json(client: TestClient, ui_store: Store) -> None:
    res = client.get("/api/graph")
    assert res.status_code == 200 and res.headers["content-type"] == "application/json"
    data = res.json()
    assert data == as_cli_json(R.graph_json(ui_store.graph()))
    g = ui_store.graph()
    assert {n["name"] for n in data["nodes"]} == set(g.nodes) and len(data["nodes"]) == 9
    assert {(e["parent"], e["child"]) for e in data["edges"]} == set(g.edges) and len(data["edges"]) == 12
    cli_out = cli("graph", "show", "--format", "json", store=ui_store.root)
    assert json.loads(cli_out.stdout) == data


def test_api_node_is_node_show_json(client: TestClient, ui_store: Store) -> None:
    res = client.get("/api/nodes/fl/r1/c0")  # names hold slashes: the route takes the rest of the path
    assert res.status_code == 200
    assert res.json() == json.loads(cli("node", "show", "fl/r1/c0", "--json", store=ui_store.root).stdout)
    assert [v["version"] for v in res.json()["versions"]] == [0, 1]
    assert client.get("/api/nodes/fl%2Fr1%2Fc0").json()["name"] == "fl/r1/c0"
    missing = client.get("/api/nodes/nope")
    assert missing.status_code == 404 and missing.json() == {"error": "unknown node 'nope'"}


def test_api_operations_is_history_json(client: TestClient, ui_store: Store) -> None:
    data = client.get("/api/operations").json()
    assert data == json.loads(cli("history", "--json", store=ui_store.root).stdout)
    (op,) = data
    assert op["ticket"] == TICKET and op["verification"]["max_avg_gap"] is not None
    assert {n["name"] for n in op["nodes"]} == set(op["affected"])
    assert all("AD_f_train_after" in n for n in op["nodes"])  # per-node metrics of the evaluated run
    assert client.get("/api/operations", params={"node": "fl/init"}).json() == []
    assert client.get("/api/operations", params={"ticket": TICKET}).json() == data
    assert client.get(f"/api/operations/{op['operation']}").json() == op
    assert client.get("/api/operations/op-nope").status_code == 404


def test_api_plan_is_unlearn_dry_run_json(client: TestClient, ui_store: Store) -> None:
    for query, args in (({"labels": "1,2"}, ["--labels", "1,2"]),
                        ({"client": "fl/r1/c0"}, ["--client", "fl/r1/c0"]),
                        ({"labels": "3", "discovery": "all", "method": "finetune"},
                         ["--labels", "3", "--discovery", "all", "--method", "finetune"])):
        res = client.get("/api/plan", params=query)
        assert res.status_code == 200, res.text
        expected = json.loads(cli("unlearn", *args, "--dry-run", "--json", store=ui_store.root).stdout)
        assert res.json() == expected, query
    plan = client.get("/api/plan", params={"labels": "1,2"}).json()["plan"]
    assert plan["discovery"] == ["fl/r1/c0", "fl/r1/c1", "fl/r1/c2"] and "fl/init" not in plan["affected"]


@pytest.mark.parametrize("query, status, needle", [
    ({}, 400, "nothing to forget"),
    ({"labels": "one"}, 400, "bad label list"),
    ({"labels": "99"}, 400, "99"),
    ({"client": "nope"}, 404, "unknown node 'nope'"),
    ({"labels": "1", "method": "nope"}, 400, "nope"),
    ({"labels": "1", "param": "gamma"}, 400, "key=value"),
])
def test_api_plan_errors_are_one_line(client: TestClient, query: dict, status: int, needle: str) -> None:
    res = client.get("/api/plan", params=query)
    assert res.status_code == status, res.text
    assert needle in res.json()["error"] and "\n" not in res.json()["error"]


def test_read_only_by_default(client: TestClient, ui_store: Store) -> None:
    before = store_state(ui_store.root)
    for path in ("/", "/api/info", "/api/graph", "/api/nodes/fl/r2/global", "/api/operations", "/api/methods",
                 "/api/plan?labels=1,2", "/api/plan?client=fl/r2/c1"):
        assert client.get(path).status_code == 200, path
    for path in ("/api/unlearn", "/api/operations/op-x/revert", "/api/graph"):
        res = client.post(path, json={"labels": "1,2"})
        assert res.status_code == 403 and "--allow-write" in res.json()["error"], path
    assert client.get("/api/info").json()["allow_write"] is False
    assert store_state(ui_store.root) == before
    assert client.get("/api/nope").status_code == 404


def test_allow_write_runs_and_reverts_from_the_page_only(fl_store: Store) -> None:
    with TestClient(create_app(fl_store, allow_write=True), base_url="http://127.0.0.1") as c:
        assert c.get("/api/info").json()["allow_write"] is True
        refused = c.post("/api/unlearn", content="labels=1", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert refused.status_code == 403 and "JSON" in refused.json()["error"]
        cross = c.post("/api/unlearn", json={"labels": "1"}, headers={"Origin": "http://evil.example"})
        assert cross.status_code == 403 and "origin" in cross.json()["error"]
        assert c.post("/api/unlearn", json={"labels": "1", "oops": 1}).json()["error"].startswith("unknown field")
        assert fl_store.history() == []
        res = c.post("/api/unlearn", json={"labels": "1,2", "eval": False, "ticket": "T-9"},
                     headers={"Origin": "http://127.0.0.1"})
        assert res.status_code == 200, res.text
        op = res.json()["operation"]
        assert [h["operation"] for h in fl_store.history(ticket="T-9")] == [op]
        affected = set(res.json()["plan"]["affected"])
        versions = {n["name"]: n["version"] for n in c.get("/api/graph").json()["nodes"]}  # not a stale copy
        assert {n for n, v in versions.items() if v == 1} == affected
        back = c.post(f"/api/operations/{op}/revert", json={})
        assert back.status_code == 200 and set(back.json()["reverted"]) == affected
        assert fl_store.operation(op)["state"] == "reverted"
        assert c.get("/api/graph").json() == as_cli_json(R.graph_json(fl_store.graph()))


def test_other_host_names_are_refused(client: TestClient) -> None:
    """A web page that rebinds its own name to 127.0.0.1 cannot read the store."""
    assert client.get("/api/graph", headers={"Host": "attacker.example"}).status_code == 400
    assert client.get("/api/graph", headers={"Host": "localhost:8000"}).status_code == 200


def test_page_loads_nothing_from_elsewhere(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    assert '<script src="/static/app.js">' in page.text
    files = sorted(p.relative_to(STATIC).as_posix() for p in STATIC.iterdir())
    assert files == ["app.css", "app.js", "favicon.svg", "index.html"]
    for name in files:
        res = client.get(f"/static/{name}")
        assert res.status_code == 200, name
        urls = set(re.findall(r"https?://[^\s\"'`)<>]+", res.text))
        assert urls <= {"http://www.w3.org/2000/svg"}, (name, urls)  # an XML namespace, never fetched


def test_graph_cache_sees_commits_of_other_processes(fl_store: Store) -> None:
    """The cached /api/graph is rebuilt when anyone commits (here the CLI, as another user would)."""
    with TestClient(create_app(fl_store), base_url="http://127.0.0.1") as c:
        assert {n["version"] for n in c.get("/api/graph").json()["nodes"]} == {0}
        assert cli("unlearn", "--labels", "3", "--no-eval", store=fl_store.root).exit_code == 0
        versions = {n["name"]: n["version"] for n in c.get("/api/graph").json()["nodes"]}
        assert versions["fl/r2/global"] == 1 and versions["fl/init"] == 0


def test_dumps_writes_non_finite_floats_as_null() -> None:
    assert json.loads(ui_api.dumps({"a": [1.0, float("nan")], "b": {"c": float("inf")}, "s": {2, 1}})) == {
        "a": [1.0, None], "b": {"c": None}, "s": [1, 2]}


def test_ui_without_the_extra_names_it(ui_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # `import uvicorn` now raises ImportError
    res = cli("ui", store=ui_root)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 1 and lines == ["error: umig ui needs the 'ui' extra: pip install 'umig[ui]'"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_umig_ui_command_serves_the_store(ui_root: Path) -> None:
    """Acceptance: ``umig ui --port P``: the page, every node and edge, the dry-run plan; Ctrl-C stops it."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "umig.cli.main", "ui", "--store", str(ui_root), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line and "read-only" in line, (line, proc.stderr.read() if
                                                                            proc.poll() is not None else "")
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(base + "/", timeout=30) as r:
            assert r.status == 200 and b"app.js" in r.read()
        with urllib.request.urlopen(base + "/api/graph", timeout=30) as r:
            graph = json.load(r)
        assert (len(graph["nodes"]), len(graph["edges"])) == (9, 12)
        with urllib.request.urlopen(base + "/api/plan?labels=1,2", timeout=30) as r:
            assert json.load(r)["plan"]["inherited"] == ["fl/r1/global", "fl/r2/c0", "fl/r2/c1", "fl/r2/c2",
                                                         "fl/r2/global"]
        busy = cli("ui", "--port", str(port), store=ui_root)  # the port is taken: one line, exit 1
        assert busy.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in busy.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, proc.stderr.read()


# ------------------------------------------------------------------ the page, in a real browser
def chromium_path() -> str | None:
    """A Chromium the system installed (never one Playwright downloads): $UMIG_CHROMIUM, else on PATH."""
    if os.environ.get("UMIG_CHROMIUM"):
        return os.environ["UMIG_CHROMIUM"]
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed: pip install 'umig[dev]'")
    path = chromium_path()
    if path is None:
        pytest.skip("no Chromium installed: apt-get install chromium (see README 'Browser view'), "
                    "or set UMIG_CHROMIUM to a Chrome/Chromium executable")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def server(ui_root: Path) -> Iterator[str]:
    """``umig ui`` on the module's store, from a thread, on a free port of 127.0.0.1 (its own store handle)."""
    with Store.open(ui_root) as store, running(store) as url:
        yield url


@pytest.fixture
def page(browser) -> Iterator[object]:
    pg = browser.new_page(viewport={"width": 1400, "height": 860})
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.set_default_timeout(15_000)
    yield pg
    pg.close()
    assert not errors, errors


def expect(locator):
    """Playwright's retrying assertions (no string evaluation in the page: its CSP forbids eval)."""
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def open_page(page, url: str) -> None:
    page.goto(url)
    page.wait_for_selector("html[data-ready='1']")


def shot(page, name: str) -> None:
    if SCREENSHOTS:
        IMG.mkdir(parents=True, exist_ok=True)
        page.mouse.move(0, 0)  # no hover outline in the picture
        page.screenshot(path=str(IMG / name))


def names(page, selector: str) -> set[str]:
    return set(page.eval_on_selector_all(selector, "els => els.map(e => e.dataset.name)"))


def test_page_draws_every_node_and_edge(page, server: str, ui_store: Store) -> None:
    open_page(page, server)
    g = ui_store.graph()
    assert names(page, "g.node") == set(g.nodes)
    assert page.locator("path.edge").count() == g.number_of_edges()
    legend = page.inner_text("#legend")
    assert "fl" in legend and "aggregate" in legend and "finetune" in legend
    assert page.inner_text("#mode") == "read-only"
    assert page.inner_text("#status").startswith("9 nodes")
    shot(page, "ui-graph.png")


def test_clicking_a_node_opens_its_page(page, server: str, ui_store: Store) -> None:
    open_page(page, server)
    page.click('g.node[data-name="fl/r1/c0"]')
    expect(page.locator("#panel h2")).to_have_text("fl/r1/c0")
    assert page.evaluate("location.hash") == "#/node/fl%2Fr1%2Fc0"
    panel = page.inner_text("#panel")
    for needle in ("sklearn:digits?split=train", "449", "umig.models:digits_cnn", "RECIPE", "fl/init",
                   "fl/r1/global", "v1 (current)", "AD_f train", "Avg. Gap", "discovery"):
        assert needle in panel, needle
    op = ui_store.history()[0]["operation"]
    assert page.locator(f'#panel a[href="#/operation/{op}"]').count() >= 1
    assert names(page, "g.node.selected") == {"fl/r1/c0"}
    shot(page, "ui-node.png")
    page.click('#panel a[href="#/node/fl%2Fr1%2Fglobal"]')  # the child, from the page
    expect(page.locator("#panel h2")).to_have_text("fl/r1/global")
    assert names(page, "g.node.selected") == {"fl/r1/global"}


def test_forget_preview_highlights_the_plan_and_changes_nothing(page, server: str, ui_store: Store) -> None:
    before = store_state(ui_store.root)
    expected = ui_store.plan_unlearning([1, 2]).plan
    open_page(page, server)
    page.click('#tabs a[data-tab="plan"]')
    page.fill("#plan-labels", "1,2")
    page.click("#plan-preview")
    page.wait_for_selector("#plan-discovery-count")
    assert page.inner_text("#plan-discovery-count") == "3 discovery"
    assert names(page, "g.node.discovery") == set(expected.discovery)
    assert names(page, "g.node.inherited") == set(expected.inherited)
    assert "fl/init" not in names(page, "g.node.discovery") | names(page, "g.node.inherited")
    assert "nothing was changed" in page.inner_text("#plan-result")
    shot(page, "ui-plan.png")
    # A client instead: only its own node is a discovery node.
    page.fill("#plan-labels", "")
    page.fill("#plan-client", "fl/r1/c0")
    page.click("#plan-preview")
    expect(page.locator("#plan-discovery-count")).to_have_text("1 discovery")
    client_plan = ui_store.plan_unlearning(clients=["fl/r1/c0"]).plan
    assert names(page, "g.node.discovery") == {"fl/r1/c0"}
    assert names(page, "g.node.inherited") == set(client_plan.inherited)
    page.fill("#plan-client", "")
    page.fill("#plan-labels", "42")
    page.click("#plan-preview")
    page.wait_for_selector("#plan-result .error")
    assert "42" in page.inner_text("#plan-result") and names(page, "g.node.discovery") == set()
    assert store_state(ui_store.root) == before


def test_operation_page_shows_forget_set_metrics_and_verification(page, server: str, ui_store: Store) -> None:
    entry = ui_store.history()[0]
    open_page(page, server + "#/operations")
    page.wait_for_selector("table.ops tr[data-op]")
    assert TICKET in page.inner_text("#panel")
    page.click(f'tr[data-op="{entry["operation"]}"] td:nth-child(2)')
    expect(page.locator("#panel h2")).to_have_text(entry["operation"])
    panel = page.inner_text("#panel")
    for needle in ("labels 1-2", TICKET, "privacy@example.org", "AD_f train", "Avg. Gap", "--max-gap 2.0: passed",
                   "fiun", "retrain"):
        assert needle in panel, needle
    assert names(page, "g.node.discovery") == set(entry["discovery"])
    assert names(page, "g.node.inherited") == set(entry["affected"]) - set(entry["discovery"])
    assert page.locator("#panel button[data-revert]").count() == 0  # read-only: no revert button
    shot(page, "ui-operation.png")


def test_large_graph_opens_collapsed_and_expands_on_click(page, server: str) -> None:
    open_page(page, server + "?collapse=4")  # collapse above 4 nodes: the 9-node lineage by depth
    assert page.locator("g.node").count() == 0
    groups = page.eval_on_selector_all("g.group", "els => els.map(e => [e.dataset.key, +e.dataset.count])")
    assert sorted(groups) == [["0-0:fl", 1], ["1-1:fl", 3], ["2-2:fl", 1], ["3-3:fl", 3], ["4-4:fl", 1]]
    page.click('g.group[data-key="1-1:fl"]')
    assert names(page, "g.node") == {"fl/r1/c0", "fl/r1/c1", "fl/r1/c2"}
    page.fill("#search", "r2/global")
    page.press("#search", "Enter")  # a hidden match: its group opens and its page too
    expect(page.locator("#panel h2")).to_have_text("fl/r2/global")
    assert "fl/r2/global" in names(page, "g.node.selected")
    page.click('button[data-action="collapse"]')
    assert page.locator("g.node").count() == 0
