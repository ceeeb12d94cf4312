"""Speed-up of the sharded matrix: the full tier with 1 rank against N ranks under torchrun.

Runs, each in a subprocess as a user would (one BLAS/OpenMP thread per process unless OMP_NUM_THREADS
is set):

1. ``python -m harness run --tier full --device D`` on one process (one GPU);
2. ``torchrun --nproc-per-node N -m harness run ...`` (one GPU per rank), its cases scheduled costliest
   first from run 1's timings (``MP_HARNESS_COSTS``: what a repeated run reads from the last one);
3. with ``--unhinted`` also the sharded run without cost hints (cases claimed in matrix order);
4. with ``--concurrent`` also N single-process runs at once (one GPU each, through
   ``CUDA_VISIBLE_DEVICES``): whether processes on the other GPUs slow a run down (the host's CPUs, memory,
   PCIe), apart from any sharding.

It prints both walls (the whole process, and the run's own ``wall_seconds``, which leaves out
interpreter start-up and, for torchrun, the launcher), the speed-up, each rank's busy time and cases
(the balance), and whether the merged records equal the single run's apart from timings (any other
field that differs is counted; ``seconds`` and ``peak_bytes`` are measurements and left out; device
indices in error messages are ignored). ``--repeat`` runs the single process twice, so differences that
two single-process runs show as well (a nondeterministic scenario) are told apart from the sharding's, and
the speed-up is then against the second single run: on a fresh machine the first one also fills the
caches (Triton's compiled kernels, the page cache) that the sharded runs after it find filled.
``--check``: exit 1 when the run speed-up is below the target (1.8x on 2 GPUs) or the sharding changed
a record.

Usage: ``python bench/sharding.py [--ranks 2] [--device cuda] [--tier full] [--family F]... [--unhinted]
[--concurrent] [--repeat] [--show K] [--keep DIR] [--check]``; ``--from DIR`` compares the runs an earlier ``--keep DIR``
wrote, running nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.results import read_run  # noqa: E402
import run_default  # noqa: E402  (the environment of the child runs)

TARGET = 1.8
#: Measurements of the process rather than results: how long a record took, and the CUDA memory a
#: case allocated beyond what it started with, which still counts a library's workspace in whichever case
#: first used that library in the process (5 of 3276 records differed so on two H200s).
MEASUREMENTS = ("seconds", "peak_bytes")
#: A rank names its own device in error messages ("cuda:1" where one process says "cuda:0").
_DEVICE_INDEX = re.compile(r"cuda:\d+")


def _env(costs: str) -> dict[str, str]:
    env = dict(run_default._env(), MP_HARNESS_COSTS=costs)
    env.pop("WORLD_SIZE", None)  # a single-process run must not think it is a rank
    return env


def _load(out: Path, wall: float | None = None) -> dict:
    """A run directory's records and summary, with the process wall time where it was measured."""
    head, records = read_run(out)
    return {"wall_s": wall, "run_s": head["summary"]["wall_seconds"], "summary": head["summary"],
            "records": records}


def _run(launcher: list[str], args: list[str], out: Path, costs: str) -> dict:
    """One run into ``out``: its process wall time, its summary and records."""
    t0 = time.perf_counter()
    proc = subprocess.run(_command(launcher, args, out), cwd=ROOT, env=_env(costs), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    _check(proc.returncode, launcher, proc.stderr)
    return _load(out, wall)


def _command(launcher: list[str], args: list[str], out: Path) -> list[str]:
    return [*launcher, "-m", "harness", "run", *args, "--quiet", "--out", str(out)]


def _check(returncode: int, launcher: list[str], stderr: str) -> None:
    if returncode != 0:
        tail = "\n".join(stderr.strip().splitlines()[-15:])
        raise SystemExit(f"{' '.join(launcher)} -m harness run ... exited {returncode}:\n{tail}")


def _run_concurrent(args: list[str], base: Path, n: int, device: str) -> list[dict]:
    """``n`` single-process runs started together, on CUDA one GPU each (the i-th visible one); each
    one's stderr goes to ``stderr-concurrent-<i>.txt`` (a pipe nobody reads could fill and stop it)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = [g.strip() for g in visible.split(",")] if visible else [str(i) for i in range(n)]
    procs = []
    for i in range(n):
        env = _env("none")
        if device == "cuda":
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        with open(base / f"stderr-concurrent-{i}.txt", "w") as err:
            procs.append(subprocess.Popen(_command([sys.executable], args, base / f"concurrent-{i}"), cwd=ROOT,
                                          env=env, stdout=subprocess.DEVNULL, stderr=err, text=True))
    for i, proc in enumerate(procs):
        _check(proc.wait(), [sys.executable], (base / f"stderr-concurrent-{i}.txt").read_text())
    return [_load(base / f"concurrent-{i}") for i in range(n)]


def _concurrent_line(one: dict, runs: list[dict], device: str) -> str:
    where = " (one GPU each)" if device == "cuda" else ""
    walls = ", ".join(f"{r['run_s']:.1f}" for r in runs)
    ratios = ", ".join(f"{r['run_s'] / one['run_s']:.2f}x" for r in runs)
    return f"  {len(runs)} single-process runs at once{where}: run {walls} s = {ratios} the run alone"


def _where_time_went(one: dict, r: dict, top: int = 2) -> list[str]:
    """Where the sharded run spent more than the single one: the harness's time buckets summed over
    ranks, the records' own seconds (the ``top`` largest increases named: start-up costs land in a
    rank's first cases), and how many records' ``peak_bytes`` differ."""
    a, b = one["summary"], r["summary"]
    buckets = ", ".join(f"{k[len('seconds_'):].replace('_', ' ')} {a[k]:.1f} -> {b[k]:.1f} s"
                        for k in ("seconds_in_scenarios", "seconds_in_references", "seconds_building_inputs")
                        if k in a and k in b)
    mine = {(x["case"], x["strategy"]): x for x in one["records"]}
    more = sorted(((y["seconds"] - mine[k]["seconds"], k) for y in r["records"]
                   if (k := (y["case"], y["strategy"])) in mine), reverse=True)
    named = "; ".join(f"{d:+.2f} s {k[0]} {k[1]}" for d, k in more[:top])
    rest = sum(d for d, _ in more[top:])
    peaks = sum(1 for y in r["records"] if (k := (y["case"], y["strategy"])) in mine
                and y.get("peak_bytes") != mine[k].get("peak_bytes"))
    return [f"time, single -> sharded (summed over ranks): {buckets}",
            f"records' seconds: {sum(d for d, _ in more):+.1f} s in all; largest {named}; the other "
            f"{len(more) - top} records {rest:+.1f} s",
            f"peak_bytes differs in {peaks} of {len(more)} records"]


def _normal(v: object) -> object:
    return _DEVICE_INDEX.sub("cuda:N", v) if isinstance(v, str) else v


def _differences(a: list[dict], b: list[dict], show: int = 0) -> dict[str, set]:
    """Per field, the (case, strategy) of every record that differs, measurements left out and device
    indices in messages ignored; ``order``: records out of place. ``show``: print that many examples
    per field (both values, shortened)."""
    diff: dict[str, set] = {}
    if len(a) != len(b):
        diff["count"] = {("", str(abs(len(a) - len(b))))}
    for x, y in zip(a, b):
        key = (x.get("case"), x.get("strategy"))
        if key != (y.get("case"), y.get("strategy")):
            diff.setdefault("order", set()).add(key)
            continue
        for k in sorted(set(x) | set(y)):
            if k in MEASUREMENTS or _normal(x.get(k)) == _normal(y.get(k)):
                continue
            diff.setdefault(k, set()).add(key)
            if len(diff[k]) <= show:
                vx, vy = x.get(k), y.get(k)
                if isinstance(vx, dict) and isinstance(vy, dict):
                    keys = [m for m in sorted(set(vx) | set(vy)) if vx.get(m) != vy.get(m)]
                    vx, vy = {m: vx.get(m) for m in keys}, {m: vy.get(m) for m in keys}
                print(f"      {k}: {key[0]} {key[1]}: {str(vx)[-160:]!r} != {str(vy)[-160:]!r}")
    return diff


def _counts(diff: dict[str, set]) -> str:
    return json.dumps({k: len(v) for k, v in diff.items()}) if diff else "none"


def _ranks(summary: dict) -> str:
    busy = [r["wall_seconds"] for r in summary["ranks"]]
    parts = [f"rank {r['rank']}: {r['cases']} cases, {r['wall_seconds']:.1f} s" for r in summary["ranks"]]
    return "; ".join(parts) + f" (max/mean {max(busy) / (sum(busy) / len(busy)):.3f})"


def _compare(one: dict, r: dict, label: str, inherent: dict[str, set], a: argparse.Namespace) -> tuple[float, bool]:
    """Print how the sharded run ``r`` compares with the single run ``one``; returns (run speed-up, whether
    the sharding changed a record beyond what two single runs differ in)."""
    up_run = one["run_s"] / r["run_s"]
    up_process = (f"{one['wall_s'] / r['wall_s']:.2f}x (process), " if one["wall_s"] and r["wall_s"] else "")
    walls = f"process {r['wall_s']:7.1f} s, " if r["wall_s"] else ""
    diff = _differences(one["records"], r["records"], a.show)
    induced = {k: v - inherent.get(k, set()) for k, v in diff.items() if v - inherent.get(k, set())}
    print(f"  {a.ranks} ranks ({label}): {walls}run {r['run_s']:7.1f} s -> speed-up {up_process}"
          f"{up_run:.2f}x (run); target {TARGET}x", flush=True)
    print(f"    {_ranks(r['summary'])}", flush=True)
    print(f"    records differ from the single run in: {_counts(diff)}"
          + (f"; beyond what two single runs differ in: {_counts(induced)}" if a.repeat else ""), flush=True)
    for line in _where_time_went(one, r):
        print(f"    {line}", flush=True)
    return up_run, bool(induced)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=2, help="torchrun --nproc-per-node (GPUs on the host)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--tier", default="full", choices=("quick", "full"))
    ap.add_argument("--family", action="append", default=[], help="restrict to these families")
    ap.add_argument("--unhinted", action="store_true", help="also run the sharded matrix without cost hints")
    ap.add_argument("--concurrent", action="store_true",
                    help="also run N single processes at once, one GPU each: do they slow each other down?")
    ap.add_argument("--keep", type=Path, default=None, help="write the run directories here")
    ap.add_argument("--from", dest="source", type=Path, default=None, metavar="DIR",
                    help="run nothing: compare the run directories an earlier --keep DIR wrote")
    ap.add_argument("--repeat", action="store_true",
                    help="run the single process twice: fields that differ there too are not the sharding's")
    ap.add_argument("--show", type=int, default=0, metavar="K", help="print K examples of each differing field")
    ap.add_argument("--check", action="store_true", help=f"exit 1 below {TARGET}x or when records differ")
    a = ap.parse_args(argv)
    if a.ranks < 2:
        ap.error(f"--ranks must be >= 2, got {a.ranks}")
    if a.source is not None:
        return _from_kept(a)
    args = ["--device", a.device, "--tier", a.tier] + [x for f in a.family for x in ("--family", f)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks)]
    worst, induced_any = float("inf"), False
    with tempfile.TemporaryDirectory(prefix="mp-harness-shard-") as d:
        base = a.keep or Path(d)
        one = _run([sys.executable], args, base / "single", "none")
        print(f"{a.tier} tier on {a.device}: {len(one['records'])} records", flush=True)
        print(f"  1 rank:  process {one['wall_s']:7.1f} s, run {one['run_s']:7.1f} s", flush=True)
        inherent: dict[str, set] = {}
        if a.repeat:
            again = _run([sys.executable], args, base / "single-again", "none")
            inherent = _differences(one["records"], again["records"], a.show)
            one = _again(again, inherent)
        if a.concurrent:
            print(_concurrent_line(one, _run_concurrent(args, base, a.ranks, a.device), a.device), flush=True)
        for name, costs in [("hinted", str(base / "single"))] + ([("unhinted", "none")] if a.unhinted else []):
            up_run, induced = _compare(one, _run(torchrun, args, base / f"sharded-{a.ranks}-{name}", costs), name,
                                       inherent, a)
            worst = min(worst, up_run) if name == "hinted" else worst
            induced_any = induced_any or induced
    return 1 if (a.check and (worst < TARGET or induced_any)) else 0


def _again(again: dict, inherent: dict[str, set]) -> dict:
    """Print the second single run and what two single runs differ in; it becomes the baseline."""
    walls = f"process {again['wall_s']:7.1f} s, " if again["wall_s"] else ""
    print(f"  1 rank, again: {walls}run {again['run_s']:7.1f} s (the baseline below: it finds the caches the "
          f"first run filled, as the sharded runs do)", flush=True)
    print(f"  two single-process runs differ in (records per field): {_counts(inherent)}", flush=True)
    return again


def _from_kept(a: argparse.Namespace) -> int:
    """``--from DIR``: the comparison of the run directories in DIR (single, sharded-N-*), without timing
    processes (their walls are not in the run files); exit 2 when DIR holds no such runs."""
    runs = sorted(a.source.glob(f"sharded-{a.ranks}-*"))
    if not (a.source / "single").is_dir() or not runs:
        print(f"error: --from {a.source}: expected the folders single/ and sharded-{a.ranks}-*/ that "
              f"--keep writes", file=sys.stderr)
        return 2
    one = _load(a.source / "single")
    print(f"{a.source}: {len(one['records'])} records; 1 rank: run {one['run_s']:7.1f} s", flush=True)
    inherent: dict[str, set] = {}
    if a.repeat and (a.source / "single-again").is_dir():
        again = _load(a.source / "single-again")
        inherent = _differences(one["records"], again["records"], a.show)
        one = _again(again, inherent)
    together = sorted(a.source.glob("concurrent-*"), key=lambda d: d.name)
    if together:
        device = one["records"][0].get("device", "") if one["records"] else ""
        print(_concurrent_line(one, [_load(d) for d in together], "cuda" if device.startswith("cuda") else device),
              flush=True)
    worst, induced_any = float("inf"), False
    for run in runs:
        up_run, induced = _compare(one, _load(run), run.name.split("-", 2)[-1], inherent, a)
        worst, induced_any = min(worst, up_run), induced_any or induced
    return 1 if (a.check and (worst < TARGET or induced_any)) else 0


if __name__ == "__main__":
    raise SystemExit(main())
