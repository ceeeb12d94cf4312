"""The trade-off table: speed next to failure rate, per format and per recipe.

Two tables, each from a run directory's failure rates (read with :func:`harness.results.read_run`, with 95%
Wilson intervals):

* per format (``--throughput T.json``): FP16 against BF16 against FP8, speed from a
  ``bench/gpu_throughput.py`` JSON file (GEMM, transformer block forward+backward and training step, in
  TFLOP/s and as a share of the ceiling), failures pooled over every strategy computing in the format,
  overall and per family. A pure function of those two files: it runs anywhere.
* per recipe (``--measure``): each strategy's training step (:mod:`step_time`: an MLP block of Linears
  d -> 4d -> d through the strategy's GEMMs, AdamW; d = 4096 and 8192 tokens on a GPU) timed here, its
  speed-up over the BF16 step (what a user buys with the recipe), and its own failure rate in the run.
  On the CPU it runs at small sizes (a smoke test of the code, not a measurement).

Usage: ``python bench/tradeoff.py --run RUN_DIR (--throughput T.json | --measure [--strategy S]...)
[--markdown FILE] [--out FILE]``.
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
from harness.report.tables import counts_from_records  # noqa: E402
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


def recipe_tradeoff(steps: list[dict[str, Any]], records: list[dict[str, Any]]) -> tuple[Table, list[dict]]:
    """The per-recipe table: each timed strategy's step time, speed-up over the BF16 step and failure rate in
    ``records`` (by strategy name), and the numbers behind it."""
    by_strategy, _ = counts_from_records(records)
    base = next((r["ms"] for r in steps if r["strategy"] == "bf16" and "ms" in r), None)
    t = Table("recipes: training-step speed against failure rate",
              ["strategy", "step ms", "speed-up vs bf16", "failures [95% CI]"],
              note="step: forward, backward and AdamW update of an MLP block through the strategy's GEMMs (median "
                   "of timed steps after warm-up); failures over the run's judged cases of that strategy")
    rows = []
    for r in steps:
        k, n = failure_rate(by_strategy.get(r["strategy"], {}))
        ms = r.get("ms")
        speedup = base / ms if ms and base else None
        t.rows.append([r["strategy"], f"{ms:.3f}" if ms else f"unsupported: {r.get('unsupported', '?')}",
                       f"{speedup:.2f}x" if speedup else "-", rate_cell(k, n)])
        rows.append({**r, "speedup_vs_bf16": speedup, "failures": k, "judged": n, "rate": k / n if n else None})
    return t, rows


def _measure(args: argparse.Namespace, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Time the strategies of ``--strategy`` (default: BF16 and every FP8/FP4 strategy of the run, else of the
    presets) with :mod:`step_time`."""
    import torch

    import step_time
    from harness.core.strategy import PRESETS, parse
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    specs = {r["strategy"]: r.get("strategy_spec", "") for r in records}
    names = args.strategy or [s for s, spec in specs.items() if _low_precision(spec)] \
        or [n for n, s in PRESETS.items() if s.compute in ("fp8", "fp4")]
    strategies = [parse(n) for n in dict.fromkeys(["bf16", *names])]
    default = step_time.GPU_SIZES if device.type == "cuda" else step_time.CPU_SIZES
    sizes = step_time.Sizes(d=args.d or default.d, tokens=args.tokens or default.tokens,
                            iters=args.iters or default.iters)
    return [step_time.time_step(s, device, sizes) for s in strategies]


def _low_precision(spec: str) -> bool:
    return any(p.strip() in ("compute=fp8", "compute=fp4") for p in spec.split(","))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--throughput", type=Path, default=None, metavar="FILE", help="gpu_throughput.py JSON")
    ap.add_argument("--run", type=Path, required=True, metavar="DIR", help="a run directory")
    ap.add_argument("--measure", action="store_true", help="time each recipe's training step here (per-recipe table)")
    ap.add_argument("--strategy", action="append", default=[], metavar="NAME",
                    help="strategies to time with --measure (default: bf16 and the run's FP8/FP4 strategies)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--d", type=int, default=0, metavar="N", help="model width (default 4096 on a GPU, 64 on the CPU)")
    ap.add_argument("--tokens", type=int, default=0, metavar="N", help="tokens per step (default 8192; CPU 128)")
    ap.add_argument("--iters", type=int, default=0, metavar="N", help="timed steps (default 20; CPU 3)")
    ap.add_argument("--markdown", type=Path, default=None, metavar="FILE")
    ap.add_argument("--out", type=Path, default=None, metavar="FILE", help="the numbers as JSON")
    args = ap.parse_args(argv)
    if args.throughput is None and not args.measure:
        print("error: give --throughput FILE (per-format table) or --measure (per-recipe table), or both",
              file=sys.stderr)
        return 2
    try:
        header, records = read_run(args.run)
        throughput = json.loads(args.throughput.read_text()) if args.throughput is not None else None
        steps = _measure(args, records) if args.measure else None
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out: dict[str, Any] = {"run_gpu": header.get("environment", {}).get("gpu")}
    texts: list[Table] = []
    if steps is not None:
        table, rows = recipe_tradeoff(steps, records)
        texts.append(table)
        out["recipes"] = rows
        print(f"steps timed on {steps[0]['device']}; failures: {args.run} ({len(records)} records)")
    if throughput is not None:
        _format_tables(throughput, header, records, args, texts, out)
    print("\n\n".join(render_text(t) for t in texts))
    if args.markdown is not None:
        args.markdown.write_text("\n".join(markdown_table(t, level=2) for t in texts))
    if args.out is not None:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _format_tables(throughput: dict, header: dict, records: list[dict], args: argparse.Namespace,
                   texts: list[Table], out: dict[str, Any]) -> None:
    """The per-format tables (from a throughput file) added to ``texts`` and ``out``."""
    tables, summary = tradeoff(throughput, records)
    gpu = throughput.get("environment", {}).get("gpu")
    run_gpu = header.get("environment", {}).get("gpu")
    print(f"speed: {gpu} ({args.throughput}); failures: {run_gpu or header.get('environment', {}).get('device')} "
          f"({args.run}, {len(records)} records)")
    texts.extend(tables)
    out.update(throughput_gpu=gpu, formats=summary)


if __name__ == "__main__":
    sys.exit(main())
