"""GPU throughput per precision strategy: GEMM, a transformer block's forward and backward, a training step.

For each strategy this times, on random (never zero) inputs:

* ``gemm``: an n x n x n product (n = 8192) through torch.matmul on cuBLAS for FP32 (TF32 off), TF32,
  FP16 and BF16, and through ``torch._scaled_mm`` for FP8 E4M3 (unit per-tensor scales, BF16 output;
  with and without ``use_fast_accum``);
* ``block``: forward and backward of a pre-LN transformer block (d=4096, 32 heads, 4 x 2048 tokens) run
  by the harness's own :class:`~harness.core.execution.Execution` (autocast, FP8 GEMMs through fp8_matmul);
* ``train``: a full training step of that block by the harness's :class:`~harness.run.training.Trainer`
  (loss, scaled backward, unscale, overflow check, AdamW update).

Times are the median over many back-to-back calls, each bracketed by CUDA events, after a warm-up of a
second that brings the GPU to its sustained clock (``regime: sustained``); each is checked against
``triton.testing.do_bench`` (median) on the same callable right after, which must agree within 5%.
GEMMs are also timed the way the ceilings of DESIGN.md section 7 were measured (``regime: burst``: after
a second idle, 3 calls of warm-up and 10 timed calls; do_bench over a window of as many calls, after
another second idle), because under a second of load the H200 ran its Tensor-Core GEMMs at a lower
clock (each row records the SM clock and board power read through NVML while its calls ran): a share
of a burst ceiling is only like-for-like with a burst time. The target is judged
in both regimes and both are reported. Rates are
model FLOPs (2mnk per GEMM; 3x the forward for forward+backward) per second, and a share of the ceilings
of DESIGN.md section 7. A compact table is printed last; ``--out FILE`` writes every number as JSON.

Usage (on a GPU): ``python bench/gpu_throughput.py --out results/h200/throughput.json``; ``--quick`` runs
small sizes in a few seconds (a smoke test, not a measurement).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from harness.device.device_profile import device_info  # noqa: E402
from harness.core.execution import Execution, route_linears  # noqa: E402
from harness.core.strategy import parse  # noqa: E402
from harness.run.training import Trainer  # noqa: E402

#: GEMM ceilings measured on the H200 (DESIGN.md section 7; FP32 runs on the CUDA cores, the rest on
#: Tensor Cores), TFLOP/s, by compute format.
CEILINGS = {"fp32": 51.0, "tf32": 363.0, "fp16": 755.0, "bf16": 786.0, "fp8": 1394.0}
TARGET_SHARE = 0.90
DO_BENCH_TOLERANCE = 0.05
STRATEGIES = ("fp32", "tf32", "fp16", "bf16", "fp8-tensorwise")


@dataclass(frozen=True)
class Sizes:
    gemm: int = 8192
    d: int = 4096
    heads: int = 32
    batch: int = 4
    seq: int = 2048
    iters: int = 20  # at least this many timed calls ...
    measure_s: float = 0.3  # ... and at least this long
    warm_s: float = 1.0  # warm-up: the GPU settles at its sustained clock under load


QUICK = Sizes(gemm=1024, d=512, heads=8, batch=2, seq=256, iters=5, measure_s=0.02, warm_s=0.05)


# -- timing ------------------------------------------------------------------------------------------------
def warm_up(fn: Callable[[], Any], seconds: float) -> float:
    """Call ``fn`` (synchronized) for at least ``seconds`` and 3 calls; returns milliseconds per call.

    On the H200 a GEMM timed right after a short warm-up ran faster (at 1980 MHz) than after a second of
    load (1365 to 1530 MHz for the Tensor-Core GEMMs), which overstates what a training run sustains;
    this warm-up reaches the sustained state first."""
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        fn()
        torch.cuda.synchronize()
        n += 1
    return 1000 * (time.perf_counter() - t0) / n


def gpu_load() -> dict[str, float | None]:
    """The SM clock (MHz) and board power (W) now, through NVML (None where it cannot be read)."""
    out: dict[str, float | None] = {"sm_clock_mhz": None, "power_w": None}
    try:
        out["sm_clock_mhz"] = float(torch.cuda.clock_rate())
        out["power_w"] = torch.cuda.power_draw() / 1000.0
    except Exception:  # no NVML (pynvml) here, or a device that does not report it
        pass
    return out


def time_events(fn: Callable[[], Any], iters: int) -> tuple[list[float], dict[str, float | None]]:
    """Milliseconds of each of ``iters`` back-to-back calls, each bracketed by its own pair of CUDA events,
    and the GPU's clock and power read while the queued calls still run (:func:`gpu_load`)."""
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    torch.cuda.synchronize()
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    load = gpu_load()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)], load


def time_do_bench(fn: Callable[[], Any], warmup_ms: float, rep_ms: float) -> float | None:
    """triton.testing.do_bench's median with that warm-up and repetition window (None without Triton)."""
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


#: Burst regime, as the ceilings were measured: seconds idle first, warm-up calls, timed calls.
BURST_IDLE_S, BURST_WARM_CALLS, BURST_CALLS = 1.0, 3, 10


def measure_burst(kind: str, name: str, fmt: str, flops: float, fn: Callable[[], Any], sizes: Sizes,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Time ``fn`` from idle like the ceilings: :data:`BURST_WARM_CALLS` calls, then the median of
    :data:`BURST_CALLS` event-timed calls; then, after another idle second, do_bench over the same window
    (warm-up and repetitions of as many calls: with its default 100 ms window it disagreed
    with the 10-call burst by up to 13.5% on the H200). ``--quick`` shortens the idle with the warm-up."""
    idle = BURST_IDLE_S * min(1.0, sizes.warm_s)
    torch.cuda.synchronize()
    time.sleep(idle)
    for _ in range(BURST_WARM_CALLS):
        fn()
    ms, load = time_events(fn, BURST_CALLS)
    torch.cuda.synchronize()
    time.sleep(idle)
    est = statistics.median(ms)
    db = time_do_bench(fn, BURST_WARM_CALLS * est, BURST_CALLS * est)
    return _row(kind, name, fmt, flops, ms, db, dict(extra or {}, regime="burst", **load))


def measure(kind: str, name: str, fmt: str, flops: float, fn: Callable[[], Any], sizes: Sizes,
            extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Warm up, time ``fn`` with events (median), check against do_bench right after (same thermal
    state), and turn the median into TFLOP/s and a share of the format's ceiling."""
    est = warm_up(fn, sizes.warm_s)
    ms, load = time_events(fn, max(sizes.iters, math.ceil(1000 * sizes.measure_s / est)))
    med = statistics.median(ms)
    db = time_do_bench(fn, max(25, int(3 * med)), max(100, int(10 * med)))  # about ten calls or more
    return _row(kind, name, fmt, flops, ms, db, dict(extra or {}, regime="sustained", **load))


def _row(kind: str, name: str, fmt: str, flops: float, ms: list[float], db: float | None,
         extra: dict[str, Any]) -> dict[str, Any]:
    """A result row: the median of ``ms`` as TFLOP/s and a share of the format's ceiling, with do_bench's
    median ``db`` and whether the two agree within :data:`DO_BENCH_TOLERANCE`."""
    med = statistics.median(ms)
    tflops = flops / (med * 1e-3) / 1e12
    row = {"kind": kind, "name": name, "format": fmt, "flops": flops, "ms": med, "ms_min": min(ms),
           "ms_max": max(ms), "iters": len(ms), "ms_do_bench": db,
           "do_bench_diff": None if db is None else abs(med - db) / db,
           "tflops": tflops, "ceiling_tflops": CEILINGS[fmt], "share": tflops / CEILINGS[fmt], **extra}
    row["do_bench_agrees"] = None if db is None else row["do_bench_diff"] <= DO_BENCH_TOLERANCE
    if kind == "gemm":
        row["meets_target"] = row["share"] >= TARGET_SHARE
    return row


# -- GEMMs ------------------------------------------------------------------------------------------------
def _tf32(on: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def gemm_rows(sizes: Sizes) -> list[dict[str, Any]]:
    n = sizes.gemm
    flops = 2.0 * n ** 3
    g = torch.Generator(device="cuda").manual_seed(0)
    a32 = torch.randn(n, n, device="cuda", generator=g)
    b32 = torch.randn(n, n, device="cuda", generator=g)
    rows = []
    for name, fmt, dtype, tf32 in (("fp32", "fp32", torch.float32, False), ("tf32", "tf32", torch.float32, True),
                                   ("fp16", "fp16", torch.float16, False), ("bf16", "bf16", torch.bfloat16, False)):
        a, b = a32.to(dtype), b32.to(dtype)
        _tf32(tf32)
        try:
            for how in (measure, measure_burst):
                rows.append(how("gemm", name, fmt, flops, lambda: torch.matmul(a, b), sizes,
                                {"shape": [n, n, n], "api": "torch.matmul"}))
        finally:
            _tf32(False)
        del a, b
    if torch.cuda.get_device_capability() >= (8, 9) and hasattr(torch, "_scaled_mm"):
        a8 = a32.to(torch.float8_e4m3fn)
        b8 = b32.t().contiguous().to(torch.float8_e4m3fn).t()  # column-major, as _scaled_mm wants
        one = torch.ones((), dtype=torch.float32, device="cuda")
        for name, fast in (("fp8-e4m3", False), ("fp8-e4m3-fastacc", True)):
            def fn(fast: bool = fast) -> Any:
                return torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast)
            for how in (measure, measure_burst):
                rows.append(how("gemm", name, "fp8", flops, fn, sizes,
                                {"shape": [n, n, n], "api": f"torch._scaled_mm(use_fast_accum={fast})"}))
    return rows


# -- a transformer block -----------------------------------------------------------------------------------
class Block(torch.nn.Module):
    """Pre-LN transformer block: attention (fused SDPA) and a 4x GELU MLP; its four nn.Linear layers are
    what FP8 strategies route through the harness's FP8 GEMM."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(att.transpose(1, 2).reshape(b, s, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


def block_flops(sizes: Sizes) -> float:
    """Forward + backward model FLOPs: 3 x (24 d^2 per token in the linears + 4 s d in attention)."""
    tokens = sizes.batch * sizes.seq
    return 3.0 * (24.0 * tokens * sizes.d ** 2 + 4.0 * tokens * sizes.seq * sizes.d)


def block_rows(names: list[str], sizes: Sizes) -> list[dict[str, Any]]:
    rows = []
    flops = block_flops(sizes)
    for name in names:
        strategy = parse(name)
        ex = Execution(strategy, "cuda")
        fmt = strategy.compute
        extra = {"strategy_spec": str(strategy), "d": sizes.d, "tokens": sizes.batch * sizes.seq}
        if not ex.supported:
            rows.append({"kind": "block", "name": name, "format": fmt, "unsupported": ex.unsupported_reason})
            continue
        torch.manual_seed(0)
        x = torch.randn(sizes.batch, sizes.seq, sizes.d, device="cuda")
        model = route_linears(Block(sizes.d, sizes.heads).cuda().to(ex.param_dtype), ex)
        params = list(model.parameters())

        def fwd_bwd() -> None:
            for p in params:
                p.grad = None
            with ex.autocast():
                loss = model(ex.act(x)).float().square().mean()
            with ex.gemm_flags():  # TF32 in the backward pass too, as the Trainer does
                loss.backward()

        rows.append(measure("block", name, fmt, flops, fwd_bwd, sizes, extra))
        trainer = Trainer(ex, Block(sizes.d, sizes.heads), optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-5))
        route_linears(trainer.model, ex)
        batch = (x,)

        def step() -> None:
            trainer.step(lambda m, bt: m(bt[0]).float().square().mean(), batch)

        rows.append(measure("train", name, fmt, flops, step, sizes, dict(extra, optimizer="AdamW")))
        del model, trainer, params, x
        torch.cuda.empty_cache()
    return rows


# -- output ------------------------------------------------------------------------------------------------
def render(rows: list[dict[str, Any]]) -> str:
    head = ["kind", "name", "regime", "ms", "TFLOP/s", "ceiling", "share", "do_bench ms", "diff", "MHz", "W", "ok"]
    body = []
    for r in rows:
        if "unsupported" in r:
            body.append([r["kind"], r["name"], *["-"] * 9, r["unsupported"][:40]])
            continue
        ok = []
        if r.get("meets_target") is not None:
            ok.append("target" if r["meets_target"] else "BELOW-90%")
        if r.get("do_bench_agrees") is not None:
            ok.append("do_bench" if r["do_bench_agrees"] else "DO_BENCH-DIFF")
        body.append([r["kind"], r["name"], r.get("regime", "sustained"), f"{r['ms']:.3f}", f"{r['tflops']:.1f}", f"{r['ceiling_tflops']:.0f}",
                     f"{100 * r['share']:.1f}%", "-" if r["ms_do_bench"] is None else f"{r['ms_do_bench']:.3f}",
                     "-" if r["do_bench_diff"] is None else f"{100 * r['do_bench_diff']:.1f}%",
                     "-" if r.get("sm_clock_mhz") is None else f"{r['sm_clock_mhz']:.0f}",
                     "-" if r.get("power_w") is None else f"{r['power_w']:.0f}", " ".join(ok)])
    table = [head] + body
    w = [max(len(row[i]) for row in table) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w[i]) if 3 <= i <= 10 else c.ljust(w[i])
                               for i, c in enumerate(row)).rstrip() for row in table)


def environment() -> dict[str, Any]:
    """The device profile's environment (GPU, capability, torch, CUDA, Triton) and the SM count."""
    return {**device_info("cuda"), "sms": torch.cuda.get_device_properties(0).multi_processor_count}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, metavar="FILE", help="write all numbers as JSON")
    ap.add_argument("--strategy", action="append", default=[], metavar="NAME",
                    help=f"strategies for block and train (default: {', '.join(STRATEGIES)})")
    ap.add_argument("--only", choices=("gemm", "block", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test, not a measurement")
    ap.add_argument("--warm-s", type=float, default=None, metavar="S",
                    help="seconds of warm-up per op (default 1: the sustained clock; 0 gives burst numbers)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench/gpu_throughput.py needs a CUDA device", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else Sizes()
    if args.warm_s is not None:
        sizes = replace(sizes, warm_s=args.warm_s)
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    if args.only in ("gemm", "all"):
        rows += gemm_rows(sizes)
    if args.only in ("block", "all"):
        rows += block_rows(args.strategy or list(STRATEGIES), sizes)
    result = {"schema": "gpu_throughput/1", "environment": environment(), "sizes": sizes.__dict__,
              "ceilings_tflops": CEILINGS, "target_share": TARGET_SHARE, "do_bench_tolerance": DO_BENCH_TOLERANCE,
              "quick": args.quick, "rows": rows, "seconds": time.perf_counter() - t0}
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['environment']['gpu']}, torch {torch.__version__}: {result['seconds']:.0f} s"
          + (f" -> {args.out}" if args.out else ""))
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
