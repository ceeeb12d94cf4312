"""``tensor_core`` family: what the GPU's Tensor Cores do to inner products, measured on the device.

``tc_profile`` runs the directed tests of :mod:`harness.device.device_profile` for the input format the
strategy's GEMMs use (FP16, BF16, TF32 or FP8 E4M3) and puts the device's numerical profile in the
record (``metrics.profile``); ``tc_long_dot`` shows what that profile means for a user: long inner
products of inputs that every format holds exactly, so the only error left is the accumulator's.
Both run on CUDA only: the CPU has no Tensor Cores, so there every strategy records ``unsupported``.
"""
from __future__ import annotations

import math

import torch

from harness.values.formats import FORMATS
from harness.core.scenario import Expect, Output, Scenario, register

#: The Tensor-Core input format of each strategy's GEMMs (FP32 GEMMs do not use Tensor Cores).
TC_FORMAT = {"fp16": "fp16", "bf16": "bf16", "tf32": "tf32", "fp8": "fp8_e4m3"}


def _profile_run(ex, inp: dict, p: dict) -> Output:
    fmt = TC_FORMAT.get(ex.strategy.compute)
    if fmt is None:
        return Output(extra={"profile": None, "profile_note": f"compute={ex.strategy.compute} GEMMs do not run "
                                                              "on Tensor Cores"})
    from harness.device.device_profile import device_profile
    res = device_profile(str(ex.device), (fmt,), p["backend"])
    prof = res["formats"][fmt]
    if "error" in prof or "unsupported" in prof:
        raise RuntimeError(f"{fmt} probes on {p['backend']}: {prof.get('error') or prof.get('unsupported')}")
    return Output(extra={"profile": prof, "profile_device": res["device"]})


register(Scenario(
    name="tc_profile",
    family="tensor_core",
    description=("The device's Tensor-Core numerical profile for the input format of the strategy's GEMMs, "
                 "found by directed tests (Fasi, Higham, Mikaitis, Pranesh 2021) and written to the record: "
                 "exact products, products per fused step, alignment bits, truncation or rounding, accumulator "
                 "bits (FP32 or fewer for FP8), subnormal inputs. 'triton' accumulates C inside the fused sum; "
                 "'cublas' is what torch's GEMMs call."),
    grid={"backend": ["triton", "cublas"]},
    quick={"backend": ["triton"]},
    inputs=lambda p, g: {},
    run=_profile_run,
    devices=("cuda",),
))


# -- long inner products with exact inputs ----------------------------------------------------------------
M = N = 64


def _exact_values(shape: tuple[int, ...], k: int, g: torch.Generator) -> torch.Tensor:
    """Positive values with 3 fraction bits and exponents -2..1, scaled by 2^-ceil(log2(k)/2): exact in
    FP8 E4M3, FP16, BF16 and TF32 alike, and sums of k products stay near 1."""
    sig = 1 + torch.randint(0, 8, shape, generator=g, dtype=torch.int16).float() / 8
    exp = torch.randint(-2, 2, shape, generator=g, dtype=torch.int16).float()
    return sig * torch.exp2(exp - math.ceil(math.log2(k) / 2))


def _dot_inputs(p: dict, g: torch.Generator) -> dict:
    return {"a": _exact_values((M, p["k"]), p["k"], g), "b": _exact_values((p["k"], N), p["k"], g)}


def _tensor_core_gemm(ex, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with K walked in order into one Tensor-Core accumulator (Triton), in the strategy's
    Tensor-Core input format; rounded to its activation format as a library GEMM's output would be."""
    fmt = TC_FORMAT.get(ex.strategy.compute)
    if fmt is None:  # FP32 and FP64 (the reference and its check): a plain GEMM, TF32 off
        return a @ b
    from harness.values import _triton_dot
    dtype = FORMATS[fmt].dtype  # TF32 operands live in FP32 registers
    d = _triton_dot.gemm(a.float().to(dtype), b.float().to(dtype), tf32=fmt == "tf32")
    return d.to(ex.dtype)


def _dot_run(ex, inp: dict, p: dict) -> Output:
    a, b = ex.act(inp["a"]), ex.act(inp["b"])
    with ex.autocast():
        y = ex.matmul(a, b, key="long_dot") if p["gemm"] == "library" else _tensor_core_gemm(ex, a, b)
    return Output(value=y if y.dtype == torch.float64 else y.float())  # the FP64 check stays FP64


register(Scenario(
    name="tc_long_dot",
    family="tensor_core",
    description=("A 64 x k by k x 64 GEMM of positive inputs exact in every format (3 fraction bits, even "
                 "FP8 E4M3), so a user expects only the output's rounding (n=2); what is left is the "
                 "accumulator's. 'library' is the strategy's own GEMM (cuBLAS, which may split K into partial "
                 "sums; torch._scaled_mm with per-tensor scales for FP8). 'tensor_core' walks K in order into "
                 "one Tensor-Core accumulator (Triton): a truncating accumulator drifts by about k/block "
                 "half-ulps of its precision, and once the sum is 2^bits times a product, products are lost "
                 "whole; FP8's narrow accumulator (see tc_profile) shows it first."),
    grid={"k": [4096, 65536, 262144], "gemm": ["library", "tensor_core"]},
    quick={"k": [65536]},
    inputs=_dot_inputs,
    run=_dot_run,
    n=lambda p: 2,
    devices=("cuda",),
    expect=(Expect(("fp8*",), "diverged", "FP8 Tensor Cores accumulate in fewer bits than FP32 (tc_profile's "
                   "accumulator_bits: 14 on Hopper): the truncated sum drifts, and once it is 2^bits times a "
                   "product, products are lost whole (on an H200 rel_err 7.1e-2 at k=4096, 3.7x the bound, and "
                   "0.72 at k=262144)", when=lambda p: p["gemm"] == "tensor_core", device="cuda"),),
))
