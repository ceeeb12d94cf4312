"""Scale: peak memory of a run against its case count (records are streamed to disk, not kept).

A trivial scenario (it returns its input, so nearly all time and memory are the harness's own) is
registered from a generated module through ``--import``, with a ``full``-tier grid of ``GRID`` parameter
values and ``--seeds`` making up the case count. Each size runs in its own interpreter through
``harness.cli.main`` (what ``python -m harness run`` calls), which then prints its own peak RSS
(``ru_maxrss``), so every number is one run's peak. Memory must stay flat: the growth from the smallest
to the largest run, per 1,000 cases, is reported and checked against ``--max-growth-mb``.

Usage: ``python bench/scale.py [--cases 1000 5000 10000] [--strategies fp32 bf16] [--check]``
(``--check``: exit 1 when the growth per 1,000 cases exceeds the limit).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.results import read_header, read_records  # noqa: E402
from run_default import _env  # noqa: E402  (the same environment for the child runs)

GRID = 100  # parameter values of the scenario's full grid; --seeds makes up the rest of the case count

MODULE = f'''
"""A scenario that does almost nothing, with a {GRID}-value full grid (quick: 1 value)."""
import torch
from harness.core.scenario import Output, Scenario, register

register(Scenario(
    name="scale_trivial", family="reduction", description="returns its 4-element input",
    grid={{"k": list(range({GRID}))}}, quick={{"k": [0]}},
    inputs=lambda p, g: {{"x": torch.rand(4, generator=g) + p["k"]}},
    run=lambda ex, inp, p: Output(value=ex.act(inp["x"]).float())))
'''

DRIVER = """
import json, resource, sys, time
from harness.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def measure(cases: int, strategies: list[str], tmp: Path) -> dict:
    """One run of ``cases`` cases (a multiple of GRID) in its own interpreter: its peak RSS and wall time."""
    if cases % GRID:
        raise ValueError(f"--cases {cases}: must be a multiple of {GRID}")
    out = tmp / f"run-{cases}"
    args = ["run", "--import", "scale_mod", "--scenario", "scale_trivial", "--tier", "full",
            "--seeds", str(cases // GRID), "--device", "cpu", "--quiet", "--out", str(out)]
    for s in strategies:
        args += ["--strategy", s]
    env = _env(str(tmp))
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run of {cases} cases failed: {proc.stderr[-2000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    # streamed, not loaded: loading the 2,000 records here raised the next child run's reported peak RSS by
    # 6 MiB (its ru_maxrss starts from this process's), so this process stays small
    header = read_header(out)
    records = sum(1 for _ in read_records(out / "records.jsonl"))
    if res["rc"] != 0 or header["status"] != "complete" or records != cases * len(strategies):
        raise RuntimeError(f"run of {cases} cases: rc {res['rc']}, status {header['status']}, {records} records")
    return {"cases": cases, "records": records, "peak_rss_mib": res["peak_rss_kib"] / 1024, "wall_s": res["wall_s"],
            "records_mib": (out / "records.jsonl").stat().st_size / 2**20,
            "bookkeeping_ms_per_record": header["summary"]["bookkeeping_ms_per_record"]}


def scale(case_counts: list[int], strategies: list[str]) -> dict:
    """Peak RSS per case count, and the growth per 1,000 cases from the smallest to the largest run."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "scale_mod.py").write_text(MODULE)
        rows = [measure(n, strategies, Path(tmp)) for n in sorted(case_counts)]
    lo, hi = rows[0], rows[-1]
    growth = (hi["peak_rss_mib"] - lo["peak_rss_mib"]) / max(1, (hi["cases"] - lo["cases"]) / 1000)
    return {"strategies": strategies, "rows": rows, "growth_mib_per_1000_cases": growth}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, nargs="+", default=[1000, 5000, 10000])
    p.add_argument("--strategies", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--max-growth-mb", type=float, default=1.0, help="allowed peak-RSS growth per 1,000 cases")
    p.add_argument("--check", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    res = scale(a.cases, a.strategies)
    if a.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{'cases':>7} {'records':>8} {'peak RSS MiB':>13} {'records.jsonl MiB':>18} {'wall s':>7} "
              f"{'bookkeeping ms/rec':>19}")
        for r in res["rows"]:
            print(f"{r['cases']:>7} {r['records']:>8} {r['peak_rss_mib']:>13.1f} {r['records_mib']:>18.1f} "
                  f"{r['wall_s']:>7.1f} {r['bookkeeping_ms_per_record']:>19.2f}")
        print(f"peak RSS growth: {res['growth_mib_per_1000_cases']:.2f} MiB per 1,000 cases "
              f"(limit {a.max_growth_mb:g}); {time.perf_counter() - t0:.0f} s in all")
    ok = res["growth_mib_per_1000_cases"] <= a.max_growth_mb
    return 0 if ok or not a.check else 1


if __name__ == "__main__":
    sys.exit(main())
