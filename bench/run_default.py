"""CPU benchmark of the default run: wall time, peak RSS and per-record bookkeeping, against the targets.

Runs, each in a subprocess (as a user would), with one BLAS/OpenMP thread unless OMP_NUM_THREADS is set:

1. ``python -m harness run --device cpu --quiet``: the default matrix (quick tier, every scenario x every
   strategy). Wall time is measured around the subprocess; peak RSS is the children's ``ru_maxrss``
   (read right after this run, before anything else is started, so it is this run's own peak).
2. A trivial scenario (it returns its one-element input) registered from a temporary module through
   ``--import``, with many cases: there the scenario does almost nothing, so (wall x workers - time
   inside the scenarios, their references and their inputs) / records is the harness's own cost per
   record in worker-seconds (each worker's wall less its time inside; with one worker it comes out close
   to the run's wall time per record, its upper bound). The run summary's
   ``bookkeeping_ms_per_record`` is checked against it, and the whole process's time per record
   (interpreter start-up and suite discovery included) is shown as well.

Usage: ``python bench/run_default.py [--cases 300] [--check]`` (``--check``: exit 1 when a target is missed).
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.results import read_header  # noqa: E402

TARGETS = {"wall_s": 60.0, "rss_gib": 3.0, "bookkeeping_ms": 5.0}
TRIVIAL_STRATEGIES = ("fp32", "fp16", "fp16-dynamic", "bf16")

TRIVIAL_MODULE = '''
"""A scenario that does almost nothing: what is left of a run's time is the harness's bookkeeping."""
import torch
from harness.core.scenario import Output, Scenario, register

register(Scenario(
    name="bench_trivial", family="reduction", description="returns its one-element input",
    grid={{"i": list(range({cases}))}},
    inputs=lambda p, g: {{"x": torch.ones(1)}},
    run=lambda ex, inp, p: Output(value=ex.act(inp["x"]).float()),
))
'''


def _env(extra_path: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    paths = [str(ROOT)] + ([extra_path] if extra_path else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def _cpu_children() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _run(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``python -m harness ARGS``; returns (wall, CPU) seconds (raises on a non-zero exit). With one
    thread the CPU time is close to the wall time the run would take on an idle machine."""
    t0, c0 = time.perf_counter(), _cpu_children()
    proc = subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    wall, cpu = time.perf_counter() - t0, _cpu_children() - c0
    if proc.returncode != 0:
        raise SystemExit(f"`python -m harness {' '.join(args)}` exited {proc.returncode}: "
                         f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    return wall, cpu


def _summary(out: Path) -> dict:
    s = read_header(out)["summary"]
    # what the scenarios themselves cost: their runs, their references (FP32 and FP64) and their inputs
    s["inside_s"] = (s["seconds_in_scenarios"] + s.get("seconds_in_references", 0.0)
                     + s.get("seconds_building_inputs", 0.0))
    return s


def bench_default(tmp: Path) -> dict:
    out = tmp / "default"
    wall, cpu = _run(["run", "--device", "cpu", "--quiet", "--out", str(out)], _env())
    rss_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux
    s = _summary(out)
    return {"wall_s": wall, "cpu_s": cpu, "rss_gib": rss_kib / 2**20, "records": s["records"], "run_wall_s": s["wall_seconds"],
            "inside_s": s["inside_s"], "bookkeeping_ms": s["bookkeeping_ms_per_record"],
            "references": f"{s['references_computed']} computed, {s['references_reused']} reused"}


def bench_trivial(tmp: Path, cases: int) -> dict:
    (tmp / "a_bench_trivial.py").write_text(textwrap.dedent(TRIVIAL_MODULE.format(cases=cases)))
    out = tmp / "trivial"
    args = ["run", "--device", "cpu", "--quiet", "--import", "a_bench_trivial", "--scenario", "bench_trivial",
            "--out", str(out)]
    for s in TRIVIAL_STRATEGIES:
        args += ["--strategy", s]
    wall, _ = _run(args, _env(str(tmp)))
    s = _summary(out)
    n = s["records"]
    return {"records": n, "wall_s": wall, "run_wall_s": s["wall_seconds"], "inside_s": s["inside_s"],
            "bookkeeping_ms": 1000 * (s["wall_seconds"] * s.get("workers", 1) - s["inside_s"]) / n,
            "summary_bookkeeping_ms": s["bookkeeping_ms_per_record"],
            "run_ms_per_record": 1000 * s["wall_seconds"] / n, "process_ms_per_record": 1000 * wall / n}


def _row(what: str, value: str, target: str, ok: bool | None) -> list[str]:
    return [what, value, target, "" if ok is None else ("ok" if ok else "MISS")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=300, help="cases of the trivial scenario (x4 strategies)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    a = ap.parse_args(argv)
    if a.cases < 1:
        ap.error(f"--cases must be >= 1, got {a.cases}")
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mp-harness-bench-") as d:
        tmp = Path(d)
        dft = bench_default(tmp)
        triv = bench_trivial(tmp, a.cases)
    load = f"{load_start:.1f} -> {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    rows = [
        _row("default run: wall (process)", f"{dft['wall_s']:.1f} s", "<= 60 s", dft["wall_s"] <= TARGETS["wall_s"]),
        _row("default run: CPU time (user + sys)", f"{dft['cpu_s']:.1f} s", "~ idle wall time", None),
        _row("default run: peak RSS", f"{dft['rss_gib']:.2f} GiB", "<= 3 GiB", dft["rss_gib"] <= TARGETS["rss_gib"]),
        _row("default run: records", str(dft["records"]), "", None),
        _row("default run: references", dft["references"], "once per case", None),
        _row("default run: inside scenarios / run wall", f"{dft['inside_s']:.1f} / {dft['run_wall_s']:.1f} s", "", None),
        _row("default run: bookkeeping per record", f"{dft['bookkeeping_ms']:.2f} ms", "<= 5 ms",
             dft["bookkeeping_ms"] <= TARGETS["bookkeeping_ms"]),
        _row(f"trivial scenario: bookkeeping per record ({triv['records']} records)",
             f"{triv['bookkeeping_ms']:.2f} ms", "<= 5 ms", triv["bookkeeping_ms"] <= TARGETS["bookkeeping_ms"]),
        _row("trivial scenario: run wall per record (bound with one worker)", f"{triv['run_ms_per_record']:.2f} ms", "", None),
        _row("trivial scenario: summary's bookkeeping_ms_per_record", f"{triv['summary_bookkeeping_ms']:.2f} ms",
             "= bookkeeping", abs(triv["summary_bookkeeping_ms"] - triv["bookkeeping_ms"]) < 0.05),
        _row("trivial scenario: whole process per record", f"{triv['process_ms_per_record']:.2f} ms",
             "(start-up included)", None),
        _row("machine load (1-min average, start -> end)", load, "numbers assume an idle machine", None),
    ]
    widths = [max(len(r[i]) for r in rows + [["what", "measured", "target", ""]]) for i in range(4)]
    for r in [["what", "measured", "target", ""], *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
    missed = [r[0] for r in rows if r[3] == "MISS"]
    return 1 if (a.check and missed) else 0


if __name__ == "__main__":
    raise SystemExit(main())
