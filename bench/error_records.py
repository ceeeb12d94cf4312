"""What an error record costs the harness against a passing one: its bookkeeping per record.

Two scenarios with the same grid and inputs, run under ``fp32`` and ``bf16`` through the engine's worker
processes: ``bench_pass`` multiplies its input (every record ``pass``), ``bench_raise`` allocates a few
tensors and raises (every record ``error``, with the cleanup that follows a failed case:
:func:`harness.run.guard.cleanup`). Printed per scenario: records, outcomes, wall seconds, and
``bookkeeping_ms_per_record`` from the run header (wall less the time inside scenarios, references and
inputs, per record)::

    python bench/error_records.py [--cases 40] [--workers 1] [--device cpu|cuda] [--json FILE]

On a GPU the cleanup also synchronises and empties the allocator's cache; measure there with
``--device cuda``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.core.execution import Execution  # noqa: E402
from harness.core.scenario import Output, Scenario  # noqa: E402
from harness.core.strategy import PRESETS  # noqa: E402
from harness.results import read_run  # noqa: E402
from harness.run.engine import RunConfig, resolve_device, run_matrix  # noqa: E402

STRATEGIES = ("fp32", "bf16")


def _inputs(p: dict, g: torch.Generator) -> dict:
    return {"x": torch.randn(64, 64, generator=g)}


def _pass(ex: Execution, inp: dict, p: dict) -> Output:
    with ex.autocast():
        y = inp["x"] @ inp["x"]
    return Output(value=y.float())


def _raise(ex: Execution, inp: dict, p: dict) -> Output:
    held = [torch.randn(256, 256, device=inp["x"].device) for _ in range(4)]  # what a failing case leaves
    raise RuntimeError(f"bench: a failing case ({len(held)} tensors held)")


def scenarios(cases: int) -> list[Scenario]:
    return [Scenario(name=name, family="reduction", description="bench/error_records.py", grid={"i": list(range(cases))},
                     inputs=_inputs, run=run, n=lambda p: 64)
            for name, run in (("bench_pass", _pass), ("bench_raise", _raise))]


def measure(cases: int, workers: int, device: str) -> list[dict[str, Any]]:
    """One run per scenario; the header's numbers for each."""
    dev = resolve_device(device)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in scenarios(cases):
            out, _, _ = run_matrix(RunConfig([s], [PRESETS[n] for n in STRATEGIES], dev, out=Path(tmp) / s.name,
                                             workers=workers))
            header, records = read_run(out)
            stats = header["summary"]
            rows.append({"scenario": s.name, "records": len(records),
                         "outcomes": sorted({r["outcome"] for r in records}), "wall_s": stats["wall_seconds"],
                         "bookkeeping_ms_per_record": stats["bookkeeping_ms_per_record"],
                         "isolation": stats.get("isolation")})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE")
    a = ap.parse_args(argv)
    if a.cases < 1 or a.workers < 0:
        ap.error("--cases must be >= 1 and --workers >= 0")
    rows = measure(a.cases, a.workers, a.device)
    for r in rows:
        print(f"{r['scenario']:12s} {r['records']:4d} records ({', '.join(r['outcomes'])}) in {r['wall_s']:.2f} s: "
              f"{r['bookkeeping_ms_per_record']:.1f} ms of bookkeeping per record ({r['isolation']})")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
