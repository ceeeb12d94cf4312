"""``accumulation`` family: long-K FP8 GEMMs and the promotion of partial sums to FP32 (DeepSeek-V3).

DeepSeek-V3's report (section 3.3.2) found that Hopper's FP8 Tensor Cores keep about 14 bits of their
running sum, so that "taking GEMM operations of two random matrices with K = 4096 for example, ... the
limited accumulation precision in Tensor Cores results in a maximum relative error of nearly 2%" (H800),
and fixed it by promoting the partial sum to FP32 every 128 products. ``fp8_long_k`` shows it on any device.

The inputs are exact in E4M3 *and* scale exactly: every value has 3 fraction bits, and every 1x128 tile
of A and every 128-row block of B holds 3.5 (= 448 / 2^7), so every recipe's scale (per tensor, per tile,
per block, E8M0) is a power of two and FP8 quantization loses nothing (except E2M1's, which keeps 1
fraction bit). The GEMM's output is taken in FP32 (``out_dtype``), so the only error left is the
accumulator's. Under ``blockwise(N)`` on the CPU that is the model of the H200's FP8 accumulator
(harness.values.blockwise); on a GPU each interval runs on the FP8 Tensor Cores. On a GPU every FP8
strategy's record also carries what ``torch._scaled_mm`` itself does on these inputs, as
``scaled_mm_max_rel_err``: one GEMM over all of K and one GEMM per 128 products summed in FP32, each in
cuBLAS's default mode and with ``use_fast_accum=True`` (the mode torchao's float8 recipes use for the
forward GEMM). On an H100 the default mode promotes by itself: one GEMM over K=4096 of same-sign data
erred 5.5e-4 at most, as did the 128-product chunks, while torchao's tensorwise recipe (fast accumulation)
erred 7.8e-2, the model's prediction for no promotion (results/h100/round5).
"""
from __future__ import annotations

import torch

from harness.core.execution import Execution
from harness.core.scenario import Expect, Output, Scenario, Tolerance, register

ROWS = COLS = 32
TILE = 128
TILE_MAX = 3.5  # 1.75 * 2^1: 448 / TILE_MAX = 2^7, so every scale taken from it is a power of two


def _exact(shape: tuple[int, int], g: torch.Generator, signed: bool) -> torch.Tensor:
    """Values 1..1.75 (3 fraction bits) times 2^-2..2^1, random signs if ``signed``: exact in E4M3 and BF16."""
    sig = 1 + torch.randint(0, 7, shape, generator=g).float() / 8
    v = sig * torch.exp2(torch.randint(-2, 2, shape, generator=g).float())
    return v * (torch.randint(0, 2, shape, generator=g).float() * 2 - 1) if signed else v


def _inputs(p: dict, g: torch.Generator) -> dict:
    k, signed = p["K"], p["data"] == "zero_mean"
    a, b = _exact((ROWS, k), g, signed), _exact((k, COLS), g, signed)
    a[:, ::TILE] = TILE_MAX  # every 1x128 tile's (and every 32-block's) amax: power-of-two scales
    b[::TILE, :] = TILE_MAX
    b[::32, :] = TILE_MAX  # MX blocks of B run along K too
    a[:, ::32] = TILE_MAX
    return {"a": a, "b": b}


def max_rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| / |ref| over the entries (the DeepSeek-V3 report's measure), on the CPU in FP64 wherever
    the two were computed."""
    y, ref = y.double().cpu(), ref.double().cpu()
    return float(((y - ref).abs() / ref.abs()).max())


def _scaled_mm_errors(a: torch.Tensor, b: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Max relative error of torch._scaled_mm on the exact E4M3 inputs: one GEMM over K, and one per 128
    products summed in FP32 (unit scales, FP32 output), in cuBLAS's default mode and with fast accumulation
    (keys ending ``_fast_accum``)."""
    one = torch.ones((), device=a.device)
    a8, b8 = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)

    def mm(x, y, fast):
        out = torch._scaled_mm(x.contiguous(), y.t().contiguous().t(), scale_a=one, scale_b=one,
                               out_dtype=torch.float32, use_fast_accum=fast)
        return out[0] if isinstance(out, tuple) else out
    errs = {}
    for fast, tag in ((False, ""), (True, "_fast_accum")):
        chunks = sum(mm(a8[:, k:k + TILE], b8[k:k + TILE], fast) for k in range(0, a.shape[1], TILE))
        errs[f"one_gemm{tag}"] = max_rel_err(mm(a8, b8, fast).cpu(), ref)
        errs[f"chunks_128{tag}"] = max_rel_err(chunks.cpu(), ref)
    return errs


def _run(ex: Execution, inp: dict, p: dict) -> Output:
    a, b = ex.act(inp["a"]), ex.act(inp["b"])
    with ex.autocast():
        y = ex.matmul(a, b, key="long_k", out_dtype=torch.float32)
    y = y if y.dtype == torch.float64 else y.float()  # the FP64 check stays FP64
    ref = inp["a"].double() @ inp["b"].double()
    extra = {"K": p["K"], "max_rel_err": max_rel_err(y.cpu(), ref)}
    if ex.strategy.recipe == "blockwise":
        extra["promote"] = ex.strategy.promote
    if ex.device.type == "cuda" and ex.strategy.compute == "fp8" and hasattr(torch, "_scaled_mm"):
        extra["scaled_mm_max_rel_err"] = _scaled_mm_errors(inp["a"].to(ex.device), inp["b"].to(ex.device), ref)
    return Output(value=y, extra=extra)


def _no_promotion(p: dict) -> bool:
    return p["data"] == "same_sign" and p["K"] >= 1024


register(Scenario(
    name="fp8_long_k",
    family="accumulation",
    description=(f"A {ROWS} x K by K x {COLS} GEMM of inputs exact in E4M3 with power-of-two scales under every "
                 "recipe, output taken in FP32, so only the accumulator errs. DeepSeek-V3: the FP8 Tensor Cores "
                 "keep ~14 bits of the running sum (max relative error ~2% at K=4096 on an H800); promoting the "
                 "partial sum to FP32 every 128 products (fp8=blockwise(128)) bounds it, blockwise(0) never "
                 "promotes. The record holds max_rel_err, and on a GPU torch._scaled_mm's own over one GEMM and "
                 "over 128-chunks summed in FP32."),
    grid={"K": [512, 1024, 2048, 4096], "data": ["same_sign", "zero_mean"]},
    quick={"K": [4096], "data": ["same_sign"]},
    inputs=_inputs,
    run=_run,
    n=lambda p: 2,
    tolerance=Tolerance("inputs and their scales are exact and the output is FP32, so a GEMM errs only in its "
                        "accumulator: the bound is the format's for n=2 times 2^-5 (E4M3's u = 2^-4 becomes "
                        "2^-9, a BF16-sized error), which FP32 accumulation of 14-bit partial sums meets",
                        factor=2.0**-5),
    expect=(
        Expect(("*fp8=blockwise(0)*",), "diverged",
               "no promotion: the whole K runs through the 14-bit FP8 accumulator (H200 profile), which truncates "
               "each 32-product step against a running sum that outgrows the products; same-sign sums lose "
               "~2^-14 of themselves per step (emulated: max rel. error 1.6e-2 at K=1024, 7.7e-2 at K=4096)",
               when=_no_promotion),
        Expect(("mxfp4", "*fp8=mxfp4*"), "diverged",
               "E2M1 keeps 1 fraction bit and the E8M0 scale is a power of two: the inputs' 3 fraction bits are "
               "rounded away (quantization, not accumulation: the GEMM accumulates in FP32; nvfp4's E4M3 block "
               "scales fit each block of 16 closer and stay inside the bound)"),
    ),
))
