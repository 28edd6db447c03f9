"""``make bench``: every headline ratio of the README, each against its baseline measured in the same run.

Runs the benchmarks one after another (each in its own process, so one's memory and threads do
not weigh on the next), collects their JSON and writes ``benchmarks/results/summary.md`` (and
``summary.json``): one table, one row per ratio, with the baseline it was measured against in the
same run (retraining, the floor, training without recording, plain inference, ``--workers 1``),
and the machine (cores, CPU model, torch) and its load before and after. About 8-10 minutes on 2
busy cores; ``--quick`` is a smoke run of the same steps (a minute or two).

    python benchmarks/summary.py [--quick] [--only unlearn,scale]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# _bench_common: this script's own folder, benchmarks/ (first on sys.path when it runs)
from _bench_common import change_with_spread, cpu_model, usable_cores

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
RESULTS = BENCH / "results"


def steps(quick: bool, tmp: Path) -> list[tuple[str, list[str]]]:
    """(name, command line) of each benchmark, writing ``tmp/<name>.json``."""
    def js(name: str) -> list[str]:
        return ["--json", str(tmp / f"{name}.json")]

    return [
        ("fisher", ["bench_fisher.py", "--samples", "128" if quick else "512", "--repeats", "1" if quick else "3",
                    *js("fisher")]),
        ("unlearn", ["bench_unlearn.py", *(["--quick"] if quick else []), *js("unlearn")]),
        ("scale", ["bench_scale.py", "--sizes", "1000" if quick else "10000", "--workers", "1,2", "--no-cli",
                   "--repeats", "1" if quick else "3", *js("scale")]),
        # The full run's table is the one the README points to (benchmarks/results/recording.md).
        ("recording", ["bench_recording.py", *(["--quick"] if quick else ["--repeat", "9"]),
                       "--out", str(tmp / "recording.md" if quick else RESULTS / "recording.md"), *js("recording")]),
        ("paper", ["reproduce_paper.py", "--no-depth", "--out", str(tmp / "paper"),
                   *(["--quick", "--frameworks", "il", "--cf", "1"] if quick else [])]),
        # The paper's training length (its Table 8: 100 epochs): retraining grows with it, FIUn does not.
        ("paper100", ["reproduce_paper.py", "--no-depth", "--out", str(tmp / "paper100"),
                      *(["--quick", "--frameworks", "il", "--cf", "1", "--epochs", "20"] if quick
                        else ["--epochs", "100"])]),
    ]


def machine() -> dict:
    import torch

    return {"cores": usable_cores(), "cpu": cpu_model(), "machine": platform.machine(), "torch": torch.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M %Z")}


def _x(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}x"


def _pct(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{100 * v:.{digits}f}%"


def _s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{1000 * v:.1f} ms" if v < 1 else f"{v:.2f} s"


def _verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("met" if ok else "**missed**")


def rows(res: dict) -> list[tuple[str, str, str, str, str, str]]:
    """(what, baseline (same run), measured, ratio, target, verdict)."""
    out = []
    u = res.get("unlearn") or {}
    for key in ("fl", "synthetic"):
        r = u.get(key)
        if not r:
            continue
        where = f"{r['lineage']}, {r['nodes']} affected nodes"
        out.append((f"FIUn (erase) / its floor, warm: {where}", f"floor {_s(r['floor_warm_s'])}",
                    f"FIUn {_s(r['fiun_warm_s'])}", _x(r["ratio_warm"]), "<= 1.5x", _verdict(r["ratio_warm"] <= 1.5)))
        out.append((f"FIUn (erase) / its floor, cold (first call in a process): {where}",
                    f"floor {_s(r['floor_cold_s'])}", f"FIUn {_s(r['fiun_cold_s'])}", _x(r["ratio_cold"]), "<= 3x",
                    _verdict(r["ratio_cold"] <= 3.0)))
    r = u.get("fl")
    if r:
        out.append(("Retraining / FIUn, warm (speed-up)", f"retraining {_s(r['retrain_s'])}", f"FIUn {_s(r['fiun_warm_s'])}",
                    _x(r["retrain_over_fiun_warm"], 0), f"bound: retraining / floor = {r['retrain_over_floor']:.0f}x", "-"))
        out.append(("Retraining / FIUn, cold (speed-up)", f"retraining {_s(r['retrain_s'])}", f"FIUn {_s(r['fiun_cold_s'])}",
                    _x(r["retrain_over_fiun_cold"], 0), "-", "-"))
        forced = r.get("retrain_threads_s") or {}
        if forced:
            best = min(forced.values())
            chosen = r["retrain_backend"].get("threads")
            runs = ", ".join(f"{n} thread(s) {_s(t)}" for n, t in sorted(forced.items()))
            out.append((f"Thread policy: retraining, umig's choice ({chosen} thread(s): "
                        f"{r['retrain_backend'].get('threads_why')}; load {r.get('load_at_thread_check', 0):.1f}) / "
                        f"the faster forced count", f"forced: {runs}", f"umig's choice {_s(r['retrain_s'])}",
                        _x(r["retrain_s"] / best), "~1x (picks the faster)", _verdict(r["retrain_s"] <= 1.25 * best)))
    r = u.get("synthetic")
    if r and r.get("workers1_s"):
        ratio = r["workers2_s"] / r["workers1_s"]
        decision = (r.get("workers2_backend") or {}).get("decision", "")
        out.append((f"`--workers 2` / `--workers 1` time, {r['lineage']} ({decision})",
                    f"w1 {_s(r['workers1_s'])}", f"w2 {_s(r['workers2_s'])}", _x(ratio), "<= 1x (noise aside)",
                    _verdict(ratio <= 1.1)))
    for r in res.get("scale") or []:
        n = r["nodes"]
        for w in ("1", "2"):
            nps = r.get(f"fiun_w{w}_nps")
            if nps is not None:
                runs = len(r.get(f"fiun_w{w}_runs") or [1])
                med = f", median of {runs} interleaved runs" if runs > 1 else ""
                base = (f"floor {r['floor_s']:.2f} s ({r['floor_nps']:,.0f} nodes/s; FIUn takes "
                        f"{r[f'fiun_w{w}_s'] / r['floor_s']:.2f}x its time)" if r.get("floor_s") else "-")
                out.append((f"FIUn throughput, `--workers {w}`, {n:,}-node synthetic FL lineage (whole call{med})",
                            base, f"{r[f'fiun_w{w}_s']:.2f} s", f"{nps:,.0f} nodes/s",
                            ">= 1,000 nodes/s" if n >= 10_000 else "-",
                            _verdict(nps >= 1000) if n >= 10_000 else "-"))
        if r.get("fiun_w1_s") and r.get("fiun_w2_s"):
            ratio = r["fiun_w2_s"] / r["fiun_w1_s"]
            out.append((f"`--workers 2` / `--workers 1` time, {n:,} nodes", f"w1 {r['fiun_w1_s']:.2f} s",
                        f"w2 {r['fiun_w2_s']:.2f} s", _x(ratio), "<= 1x (noise aside)", _verdict(ratio <= 1.1)))
        target = 2.0 * n / 50_000
        out.append((f"planning {n:,} nodes (`plan_unlearning`)", "-", f"{r['plan_s']:.2f} s", "-",
                    f"< {target:.2f} s (2 s at 50,000, linear)", _verdict(r["plan_s"] < target)))
        workers = r.get("peak_rss_workers_mb") or 0
        out.append((f"peak memory (RSS), {n:,} nodes: coordinator / each pool worker", "-",
                    f"{r['peak_rss_mb']:.0f} MB / " + (f"{workers:.0f} MB" if workers else "none started"),
                    "-", "-", "-"))
    f = res.get("fisher")
    if f:
        out.append((f"Closed-form model FIM / plain inference ({f['model']}, {f['samples']} inputs)",
                    f"inference {_s(f['median_s']['inference'])}", f"FIM {_s(f['median_s']['head_fisher'])}",
                    _x(f["fim_over_inference"]), "<= 1.2x", _verdict(f["fim_over_inference"] <= 1.2)))
    rec = res.get("recording")
    if rec:
        rounds = rec.get("repeat", 1)
        for lin in rec["lineages"]:
            name = lin["lineage"].split(" (")[0]
            d, e, n = lin["default"], lin["exact"], lin["none"]
            d_e2e, e_e2e = (change_with_spread(m["end_to_end"], m["end_to_end_iqr"]) for m in (d, e))
            out.append((f"Recording / training, {lin['lineage']} (default settings: model FIMs captured from the last "
                        "training epoch, the capture counted as recording; in brackets, end to end: the recorded "
                        f"build's wall time / the unrecorded one's, median and quartiles of {rounds} round{'s' if rounds != 1 else ''})",
                        f"training {_s(d['train'])} (not recorded: {_s(n['train'])})",
                        f"recording {_s(d['record'])} (capture {_s(d['capture'])}) (end to end {d_e2e})",
                        _pct(d["overhead"]), "<= 5%", _verdict(d["overhead"] <= 0.05)))
            out.append((f"... {name} with the exact FIM pass (`exact_fim=True`: one extra forward pass per node)",
                        f"training {_s(e['train'])}", f"recording {_s(e['record'])} (end to end {e_e2e})",
                        _pct(e["overhead"]), "-", "-"))
    for key in ("paper", "paper100"):
        p = res.get(key)
        if not p:
            continue
        s = p["summary"]
        cfg = p["config"]
        fws = ", ".join(fr["framework"].upper() for fr in p["frameworks"])
        size = f"{cfg['epochs']} epochs" + (" as the paper (its Table 8)" if cfg["epochs"] == 100 else "")
        rt = [row["time_retrain"][n] for fr in p["frameworks"] for row in fr["rows"].values() for n in fr["nodes"]]
        ft = [row["fiun_wall_s"] for fr in p["frameworks"] for row in fr["rows"].values()]
        base = f"retraining {_s(min(rt))}-{_s(max(rt))} per node (cumulative)"
        meas = f"FIUn {_s(min(ft))}-{_s(max(ft))} per operation"
        bound = s.get("bound_every_min")
        target = ">= 99% at every node" + (f" (bound: the floor allows {_pct(bound, 2)})" if bound is not None else "")
        out.append((f"FIUn time saved vs retraining at w_b, the paper's deepest node ({fws}; digits CNN, {size}): "
                    "min / mean", base, meas, f"{_pct(s.get('speedup_min'), 2)} / {_pct(s.get('speedup_mean'), 2)}",
                    ">= 99%", _verdict(s.get("speedup_min") is not None and s["speedup_min"] >= 0.99)))
        out.append((f"... at every node w_g, w_a, w_b ({size}; a node's FIUn time: its affected ancestors' and "
                    "its own head updates, each with its share of the operation's shared part): min / mean", base, meas,
                    f"{_pct(s.get('speedup_every_min'), 2)} / {_pct(s.get('speedup_every_mean'), 2)}", target,
                    _verdict(s.get("speedup_every_min") is not None and s["speedup_every_min"] >= 0.99)))
        if s.get("speedup_every_whole_min") is not None:
            out.append((f"... at every node ({size}), stricter: each node charged the operation's whole shared part "
                        "(planning, every head's durable write, the commit): min", base, meas,
                        _pct(s["speedup_every_whole_min"], 2), "- (information)", "-"))
    r18 = RESULTS / "resnet18" / "paper_results.json"
    if r18.exists():  # too slow for make bench (25 minutes on 2 cores): read from its own run, and said so
        p = json.loads(r18.read_text())
        s = p["summary"]
        fws = ", ".join(fr["framework"].upper() for fr in p["frameworks"])
        out.append((f"FIUn time saved vs retraining, ResNet-18 ({fws}, `--quick`), at w_b / at every node: min "
                    "(not rerun by make bench: `benchmarks/results/resnet18/`, its own run)", "retraining (cumulative)",
                    "FIUn (a node's share of the operation, as above"
                    + (f"; {_pct(s['speedup_every_whole_min'], 2)} charged the whole shared part)"
                       if s.get("speedup_every_whole_min") is not None else ")"),
                    f"{_pct(s.get('speedup_min'), 2)} / {_pct(s.get('speedup_every_min'), 2)}",
                    ">= 99% at every node", _verdict(s.get("speedup_every_min", 0) >= 0.99)))
    return out


def markdown(res: dict, info: dict, timings: dict, quick: bool, load: tuple[float, float]) -> str:
    lines = [
        "# Benchmark summary (`make bench`)",
        "",
        f"Generated by `benchmarks/summary.py{' --quick' if quick else ''}` on {info['date']} in "
        f"{sum(timings.values()):.0f} s. Machine: {info['cores']} cores ({info['cpu']}, {info['machine']}), "
        f"torch {info['torch']}, Python {info['python']}; load average {load[0]:.1f} before and {load[1]:.1f} after "
        "(the machine is shared: figures are noisy, which is why every ratio is taken against a baseline measured "
        "in the same run, and timed figures are medians where the step repeats).",
        "",
        "| ratio | baseline (same run) | measured | ratio | target | |",
        "|---|---|---|---:|---|---|",
    ]
    for what, base, meas, ratio, target, verdict in rows(res):
        lines.append(f"| {what} | {base} | {meas} | {ratio} | {target} | {verdict} |")
    lines += [
        "",
        "Sources: `bench_unlearn.py` (FIUn vs the floor of the same operation and vs retraining, `--workers`), "
        "`bench_scale.py` (throughput, planning, memory), `bench_fisher.py`, `bench_recording.py`, "
        "`reproduce_paper.py --no-depth` (and `--epochs 100`). Step times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ".",
    ]
    u = res.get("unlearn") or {}
    for key in ("fl", "synthetic"):
        r = u.get(key)
        if r:
            lines.append(f"\n{r['lineage']}: warm runs (ms) floor {[round(1000 * x, 1) for x in r['runs']['floor_warm']]}, "
                         f"FIUn {[round(1000 * x, 1) for x in r['runs']['fiun_warm']]}; cold floor "
                         f"{[round(1000 * x, 1) for x in r['runs']['floor_cold']]}, FIUn "
                         f"{[round(1000 * x, 1) for x in r['runs']['fiun_cold']]}.")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a smoke run of every step (smaller sizes)")
    ap.add_argument("--only", default=None, help="comma-separated steps: fisher,unlearn,scale,recording,paper,paper100")
    ap.add_argument("--out", type=Path, default=RESULTS / "summary.md")
    args = ap.parse_args()
    info = machine()
    load0 = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="umig-summary-"))
    results: dict = {}
    timings: dict[str, float] = {}
    only = set(args.only.split(",")) if args.only else None
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name, cmd in steps(args.quick, tmp):
        if only and name not in only:
            continue
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(BENCH / cmd[0]), *cmd[1:]], env=env, cwd=REPO, check=False)
        timings[name] = time.perf_counter() - t0
        if proc.returncode != 0:
            print(f"   {name} failed (exit {proc.returncode}); its rows are left out", flush=True)
            continue
        path = tmp / (f"{name}/paper_results.json" if name.startswith("paper") else f"{name}.json")
        if path.exists():
            results[name] = json.loads(path.read_text())
    load1 = os.getloadavg()[0]
    md = markdown(results, info, timings, args.quick, (load0, load1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(md)
    args.out.with_suffix(".json").write_text(json.dumps({"machine": info, "load": [load0, load1], "timings": timings,
                                                         "results": results}, indent=1, default=str))
    print(md)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
