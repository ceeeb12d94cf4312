"""``accumulation`` family: where a long sum of products is accumulated, and in what.

Two accumulators exist for every strategy:

* ``fp32``: one GEMM of inner dimension K through the strategy (``ex.matmul`` under ``ex.autocast()``).
  CPU kernels accumulate low-precision products in FP32. On a GPU torch allows cuBLAS reduced-precision
  reductions by default (``torch.backends.cuda.matmul.allow_fp16/bf16_reduced_precision_reduction``); the
  harness turns them off for every strategy except ``reduction=reduced`` (``Execution.gemm_flags``), so
  only those strategies let cuBLAS reduce partial sums in FP16/BF16. The CPU has no kernel honouring that flag (such
  strategies are ``unsupported`` there), so:
* ``compute``: the mechanism made explicit, on any device: K is cut into blocks of ``BLOCK`` products,
  each block is one GEMM (FP32 inside, its result rounded to the compute format) and the running total
  is kept in the compute format, as a reduced-precision accumulator does. This is a declared
  emulation of the accumulator, not of any particular GPU's kernel.

Zero-mean data: the rounding errors cancel and the error hardly grows with K (the bound grows with the
condition number sum|a*b|/|sum a*b| ~ sqrt(K)). Same-sign data: the total grows like K and each
addition loses up to half an ulp of it; once a block's sum is below half an ulp of the total, the
total stagnates. Every record carries the error at K/64, K/16, K/4 and K next to the bound
(``extra["err_vs_K"]``, ``extra["bound_vs_K"]``).
"""
from __future__ import annotations

import torch

from harness.core.execution import Execution
from harness.core.scenario import Expect, Output, Scenario, register
from harness.judge.tolerance import bound

from ._models import blocked_prefix_sums, blocked_sum

#: Products per block of the ``compute`` accumulator.
BLOCK = 32
ROWS, COLS = 8, 8
#: FP32 accumulation of K products costs about K*2^-24 = (K/2^13)*2^-11: counted in FP16 roundings.
FP32_PER_FP16_ROUNDING = 2**13


def _n_roundings(accumulator: str, k: int) -> int:
    """Roundings in the compute format: the two GEMM inputs and the output, plus the accumulator's."""
    return 3 + (k // BLOCK if accumulator == "compute" else k // FP32_PER_FP16_ROUNDING)


def _tensor_core(ex: Execution) -> bool:
    return ex.device.type == "cuda" and ex.strategy.compute in ("fp16", "bf16", "tf32", "fp8")


# -- long inner products -------------------------------------------------------------------------
def _ip_inputs(p: dict, g: torch.Generator) -> dict:
    k = p["K"]
    a, b = torch.rand(ROWS, k, generator=g), torch.rand(k, COLS, generator=g)
    if p["data"] == "zero_mean":
        a, b = a - 0.5, b - 0.5
    return {"a": a, "b": b}


def _prefixes(k: int) -> list[int]:
    return [j for j in (k >> 6, k >> 4, k >> 2, k) if j >= BLOCK]


def _blocked(ex: Execution, a: torch.Tensor, b: torch.Tensor, marks: list[int]) -> dict[int, torch.Tensor]:
    """The running total in the compute format after the first j products, for j in ``marks``: each block
    is one GEMM (rounded to the compute format), the blocks are added one by one in that format."""
    with ex.autocast():
        parts = torch.stack([ex.matmul(a[:, j:j + BLOCK], b[j:j + BLOCK], key="block").to(ex.dtype)
                             for j in range(0, a.shape[1], BLOCK)])
    lanes = a.shape[0] * b.shape[1]
    sums = blocked_prefix_sums(parts.reshape(-1), lanes, tuple(j // BLOCK for j in marks))
    return {j: sums[j // BLOCK].reshape(a.shape[0], b.shape[1]).float() for j in marks}


def _gemm(ex: Execution, a: torch.Tensor, b: torch.Tensor, marks: list[int]) -> dict[int, torch.Tensor]:
    with ex.autocast():
        return {j: ex.matmul(a[:, :j], b[:j], key=f"k{j}").float() for j in marks}


def _ip_run(ex: Execution, inp: dict, p: dict) -> Output:
    k, acc = p["K"], p["accumulator"]
    marks = _prefixes(k)
    a, b = ex.act(inp["a"]), ex.act(inp["b"])
    snaps = (_blocked if acc == "compute" else _gemm)(ex, a, b, marks)
    exact_a, exact_b = inp["a"].double(), inp["b"].double()
    err, bnd = {}, {}
    kappa = 1.0
    truncating = acc == "fp32" and p["data"] == "same_sign" and _tensor_core(ex)
    for j in marks:
        ref = exact_a[:, :j] @ exact_b[:j]
        kappa = float((exact_a[:, :j].abs() @ exact_b[:j].abs()).norm() / ref.norm())
        err[str(j)] = float((snaps[j].double() - ref).norm() / ref.norm())
        bnd[str(j)] = bound(ex.format, _n_roundings(acc, j), kappa, truncating=truncating)
    extra = {"K": k, "block": BLOCK if acc == "compute" else None, "err_vs_K": err, "bound_vs_K": bnd,
             "reduced_precision_reduction": ex.strategy.reduction == "reduced"}
    if truncating:
        # the H200's Tensor Cores truncated when aligning products (results/h200/device_profile.json):
        # on same-sign data the errors add up, so the linear bound applies
        extra["truncating"] = True
    return Output(value=snaps[k], kappa=kappa, extra=extra)


register(Scenario(
    name="inner_product_accumulation",
    family="accumulation",
    description=(f"{ROWS}x{COLS} inner products of length K, accumulated in FP32 (one GEMM) or in the compute "
                 f"format ({BLOCK}-product blocks summed into a low-precision running total; the CPU stand-in "
                 "for reduced-precision reductions). Same-sign data: the total outgrows its increments and "
                 "BF16 stagnates first, FP16 at longer K. Zero-mean data: errors cancel. The error at K/64, "
                 "K/16, K/4 and K is recorded next to its bound."),
    grid={"K": [1024, 4096, 16384, 65536], "data": ["same_sign", "zero_mean"], "accumulator": ["fp32", "compute"]},
    quick={"K": [16384]},
    inputs=_ip_inputs,
    run=_ip_run,
    n=lambda p: _n_roundings(p["accumulator"], p["K"]),
    expect=(
        Expect(("bf16*", "fp8*", "compute=bf16,*", "compute=fp8,*"), "diverged",
               "the BF16 running total stagnates: past ~2^11 a 32-product block (~8) is below half its ulp, so "
               "most of the last blocks are lost",
               when=lambda p: p["accumulator"] == "compute" and p["data"] == "same_sign" and p["K"] >= 65536),
    ),
))


# -- gradient accumulation over micro-batches ----------------------------------------------------
MICRO_ROWS, FEATURES, OUTPUTS = 4, 16, 16


def _ga_inputs(p: dict, g: torch.Generator) -> dict:
    m = p["micro"]
    x = torch.rand(m, MICRO_ROWS, FEATURES, generator=g)  # positive activations, as after a ReLU
    t = 1.0 + 0.5 * torch.randn(MICRO_ROWS, OUTPUTS, generator=g)  # a mostly positive upstream gradient
    return {"x": x, "t": t * 2.0**-3}


def _ga_run(ex: Execution, inp: dict, p: dict) -> Output:
    """Micro-batch i's weight gradient, x_i^T (S*t/M), is one GEMM in the compute format (all M at once:
    the micro-batch inputs are stacked); the M results are added one by one into a buffer in the
    parameters' storage dtype, as autograd accumulates ``.grad``: FP32 for autocast strategies, FP16/BF16
    for pure and master-weight ones (whose model keeps low-precision gradients)."""
    m = p["micro"]
    s = ex.strategy.scaler.initial_scale
    xt = ex.act(inp["x"]).transpose(1, 2).reshape(m * FEATURES, MICRO_ROWS)
    dy = ex.act(inp["t"] * (s / m))
    with ex.autocast():
        grads = ex.matmul(xt, dy, key="wgrad").reshape(m, FEATURES, OUTPUTS)
    buf = blocked_sum(grads.to(ex.param_dtype).reshape(-1), FEATURES * OUTPUTS)  # one rounding per micro-batch
    g = buf.reshape(FEATURES, OUTPUTS).float() / s
    return Output(grads={"w": g}, extra={"micro": m, "buffer_dtype": str(ex.param_dtype).replace("torch.", ""),
                                         "loss_scale": s})


register(Scenario(
    name="grad_accumulation_buffer",
    family="accumulation",
    description=("A weight gradient accumulated over `micro` micro-batches (loss divided by their number, scaled "
                 "by the strategy's initial loss scale). The buffer has the parameters' dtype, as autograd's "
                 ".grad: autocast strategies accumulate in FP32; pure and master-weight ones in FP16/BF16, where "
                 "same-sign contributions of total/micro fall below half an ulp of the total and stop counting "
                 "(master weights keep the update in FP32, not the model's gradients)."),
    grid={"micro": [16, 256, 2048, 4096, 8192]},
    quick={"micro": [256, 4096]},
    inputs=_ga_inputs,
    run=_ga_run,
    n=lambda p: p["micro"] + 2,
    expect=(
        Expect(("bf16-pure", "bf16-master"), "diverged", "a contribution of total/micro below half a BF16 ulp of the "
                                                         "total (2^-9..2^-8 of it) is rounded away: the sum stagnates",
               when=lambda p: p["micro"] >= 2048),
        Expect(("fp16-pure", "fp16-master"), "diverged", "a contribution of total/micro below half an FP16 ulp of "
                                                         "the total (2^-12..2^-11 of it) is rounded away",
               when=lambda p: p["micro"] >= 8192),
    ),
))
