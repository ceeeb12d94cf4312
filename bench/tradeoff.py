"""The trade-off table: FP16 against BF16 against FP8, speed next to failure rate.

Speed comes from a ``bench/gpu_throughput.py`` JSON file (GEMM, transformer block forward+backward and
training step, in TFLOP/s and as a share of the ceiling); failure rates from a run directory (read with
:func:`harness.results.read_run`), pooled over every strategy that computes in the format, with 95%
Wilson intervals, overall and per family. A pure function of those two files: it runs anywhere.

Usage: ``python bench/tradeoff.py --throughput T.json --run RUN_DIR [--markdown FILE] [--out FILE]``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.report.markdown import render_table as markdown_table  # noqa: E402
from harness.report.tables import Table, failure_rate, format_counts, format_strategies, rate_cell, render_text  # noqa: E402
from harness.results import read_run  # noqa: E402

FORMATS = ("fp16", "bf16", "fp8")
#: The GEMM row of each format in the throughput file (FP8: the _scaled_mm path the strategies use).
GEMM_ROW = {"fp32": "fp32", "tf32": "tf32", "fp16": "fp16", "bf16": "bf16", "fp8": "fp8-e4m3"}


def _row(rows: list[dict], kind: str, fmt: str) -> dict | None:
    """The throughput row of ``kind`` for format ``fmt`` (for block/train: the fastest strategy of it)."""
    if kind == "gemm":
        return next((r for r in rows if r["kind"] == "gemm" and r["name"] == GEMM_ROW[fmt] and "tflops" in r
                     and r.get("regime", "sustained") == "sustained"), None)  # what a training run sustains
    cands = [r for r in rows if r["kind"] == kind and r.get("format") == fmt and "tflops" in r]
    return max(cands, key=lambda r: r["tflops"]) if cands else None


def _speed(r: dict | None) -> str:
    return "-" if r is None else f"{r['tflops']:.0f} ({100 * r['share']:.0f}%)"


def _ratio(r: dict | None, base: dict | None) -> str:
    return "-" if r is None or base is None else f"{r['tflops'] / base['tflops']:.1f}x"


def tradeoff(throughput: dict[str, Any], records: list[dict[str, Any]]) -> tuple[list[Table], dict[str, Any]]:
    """The two tables (speed and failures; failures per family) and the numbers behind them."""
    rows = throughput.get("rows", [])
    base = {k: _row(rows, k, "fp32") for k in ("gemm", "block", "train")}
    summary: dict[str, Any] = {}
    t = Table("speed against failure rate", ["format", "GEMM TFLOP/s (of ceiling)", "GEMM vs FP32",
                                             "block fwd+bwd TFLOP/s", "train step TFLOP/s", "train vs FP32",
                                             "failures [95% CI]", "strategies"],
              note="TFLOP/s: model FLOPs per second, ceiling share in brackets; failures pooled over every "
                   "strategy computing in the format (unsupported cases not counted).")
    for fmt in FORMATS:
        sp = {k: _row(rows, k, fmt) for k in ("gemm", "block", "train")}
        k, n = failure_rate(format_counts(records, fmt))
        strategies = format_strategies(records, fmt)
        t.rows.append([fmt, _speed(sp["gemm"]), _ratio(sp["gemm"], base["gemm"]), _speed(sp["block"]),
                       _speed(sp["train"]), _ratio(sp["train"], base["train"]), rate_cell(k, n),
                       ", ".join(strategies) or "-"])
        summary[fmt] = {"failures": k, "judged": n, "rate": k / n if n else None, "strategies": strategies,
                        **{f"{kind}_tflops": (r["tflops"] if r else None) for kind, r in sp.items()}}
    families = sorted({r["family"] for r in records})
    fam = Table("failure rate per family", ["family", *FORMATS],
                note="failures/judged cases, rate and 95% Wilson interval")
    for f in families:
        fam.rows.append([f, *(rate_cell(*failure_rate(format_counts(records, x, f))) for x in FORMATS)])
    return [t, fam], summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--throughput", type=Path, required=True, metavar="FILE", help="gpu_throughput.py JSON")
    ap.add_argument("--run", type=Path, required=True, metavar="DIR", help="a run directory")
    ap.add_argument("--markdown", type=Path, default=None, metavar="FILE")
    ap.add_argument("--out", type=Path, default=None, metavar="FILE", help="the numbers as JSON")
    args = ap.parse_args(argv)
    try:
        throughput = json.loads(args.throughput.read_text())
        header, records = read_run(args.run)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tables, summary = tradeoff(throughput, records)
    gpu = throughput.get("environment", {}).get("gpu")
    run_gpu = header.get("environment", {}).get("gpu")
    print(f"speed: {gpu} ({args.throughput}); failures: {run_gpu or header.get('environment', {}).get('device')} "
          f"({args.run}, {len(records)} records)")
    print("\n\n".join(render_text(t) for t in tables))
    if args.markdown is not None:
        args.markdown.write_text("\n".join(markdown_table(t, level=2) for t in tables))
    if args.out is not None:
        args.out.write_text(json.dumps({"throughput_gpu": gpu, "run_gpu": run_gpu, "formats": summary}, indent=1)
                            + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
