"""Scale of the views: wall time and peak memory of ``report`` and ``gate`` against the record count.

A run of N records is synthesized from the golden CPU run's records (``tests/golden/cpu_small``: about
1.4 KB a record, every family and outcome), each copy under its own seed so every case key is unique,
with the golden header (status complete). Then, each in its own interpreter through ``harness.cli.main``
(what ``python -m harness`` calls), which prints its own wall time and peak RSS (``ru_maxrss``):

* ``report DIR`` (the text tables; ``--html`` draws every record and holds the run, see docs/reports.md),
* ``gate DIR --baseline B --update`` (a baseline of all N cases),
* ``gate DIR --baseline B`` (the run against that baseline: N cases compared, the worst case for the gate).

Memory must be flat in N (the target is < 500 MB at 1,000,000 records) and time linear.

Usage: ``python bench/views_scale.py [--records 10000 100000 1000000] [--check] [--json] [--root DIR]``
(``--check``: exit 1 when a peak RSS exceeds ``--max-rss-mb``; ``--root``: the checkout whose harness runs,
e.g. an older one to measure before a change).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "cpu_small"

DRIVER = """
import json, os, resource, sys, time
from harness.cli import main
sys.stdout = open(os.devnull, "w")  # the tables of a million records are not the measurement
t0 = time.perf_counter()
rc = main(sys.argv[1:])
wall = time.perf_counter() - t0
sys.stdout = sys.__stdout__
print(json.dumps({"rc": rc, "wall_s": wall, "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
"""


def synthesize(n: int, out: Path) -> float:
    """A run directory of ``n`` records made from the golden run's; returns records.jsonl's size in MiB."""
    templates = [json.loads(line) for line in (GOLDEN / "records.jsonl").read_text().splitlines() if line.strip()]
    out.mkdir(parents=True)
    shutil.copy(GOLDEN / "run.json", out / "run.json")
    with open(out / "records.jsonl", "w") as f:
        for i in range(n):
            r = templates[i % len(templates)]
            r["seed"] = i // len(templates)
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
    return (out / "records.jsonl").stat().st_size / 2**20


def measure(argv: list[str], root: Path) -> dict:
    """One command in its own interpreter: its exit code, wall time and peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", DRIVER, *argv], cwd=root, env=env, capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(argv[:1])} failed: {proc.stderr[-2000:]}")
    res = json.loads(lines[-1])
    return {"rc": res["rc"], "wall_s": res["wall_s"], "peak_rss_mib": res["peak_rss_kib"] / 1024}


def scale(counts: list[int], root: Path) -> list[dict]:
    rows = []
    for n in sorted(counts):
        with tempfile.TemporaryDirectory(prefix="views-scale-") as tmp:
            run, base = Path(tmp) / "run", Path(tmp) / "base.json"
            size = synthesize(n, run)
            for name, argv in (("report", ["report", str(run)]),
                               ("gate --update", ["gate", str(run), "--baseline", str(base), "--update"]),
                               ("gate", ["gate", str(run), "--baseline", str(base)])):
                m = measure(argv, root)
                if m["rc"] != 0:
                    raise RuntimeError(f"{name} on {n} records exited {m['rc']}")
                rows.append({"records": n, "records_mib": size, "command": name, **m,
                             "us_per_record": 1e6 * m["wall_s"] / n})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--max-rss-mb", type=float, default=500.0, help="allowed peak RSS of each command")
    p.add_argument("--root", type=Path, default=ROOT, help="checkout whose harness runs (default: this one)")
    p.add_argument("--check", action="store_true")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rows = scale(a.records, a.root.resolve())
    if a.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"{'records':>9} {'jsonl MiB':>10} {'command':<14} {'wall s':>8} {'us/record':>10} {'peak RSS MiB':>13}")
        for r in rows:
            print(f"{r['records']:>9} {r['records_mib']:>10.1f} {r['command']:<14} {r['wall_s']:>8.1f} "
                  f"{r['us_per_record']:>10.1f} {r['peak_rss_mib']:>13.1f}")
        print(f"{time.perf_counter() - t0:.0f} s in all")
    worst = max(r["peak_rss_mib"] for r in rows)
    return 0 if worst <= a.max_rss_mb or not a.check else 1


if __name__ == "__main__":
    sys.exit(main())
