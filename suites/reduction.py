"""``reduction`` family: reductions that lose precision in a low-precision format, through the rounding of
their inputs, through cancellation, through the chain of roundings of a low-precision accumulator, or
through a statistic that overflows. Thresholds in the descriptions are measured (docs/scenarios.md)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from harness.values.formats import FORMATS, quantize
from harness.core.scenario import Expect, Output, Scenario, register

from ._models import blocked_sum, ema, one_pass_layernorm, rms_norm, wide

#: Rows of cross_entropy_vocab and logsumexp_long: enough that the normwise error is an average, not one
#: row's luck. softmax_long spreads the mass over many entries of a row and needs fewer.
ROWS, SOFTMAX_ROWS = 32, 16
#: Running sums of sum_long: the threads of a reduction kernel with a compute-format accumulator.
LANES = 4096
#: FP8 and FP4 recipes keep BF16 activations, so these reductions run in BF16 under every one of them (the
#: presets fp8-*, mxfp8, mxfp4, nvfp4, and specs spelled out)
FP16, BF16 = ("fp16*",), ("bf16*",)
FP8 = ("fp8*", "mxfp*", "nvfp4*", "compute=fp8,*", "compute=fp4,*")
CAST = ("fp16-pure", "fp16-master", "bf16-pure", "bf16-master")


# -- softmax, cross-entropy and logsumexp over long rows ---------------------------------------------
def _softmax_run(ex, inp: dict, p: dict) -> Output:
    x = ex.act(inp["x"])
    with ex.autocast():
        y = torch.softmax(x, dim=-1)
    return Output(value=y.float())


register(Scenario(
    name="softmax_long",
    family="reduction",
    description=(
        "Softmax over rows of n logits of magnitude `offset` (offset + unit-spread noise, so that many entries "
        "share the mass, as a language model's candidate tokens do), handed over in the compute format as a "
        "GEMM produces them. Softmax is shift-invariant, but the rounding happens at the logits' magnitude: "
        "each carries an error up to ulp(offset)/2, and the probabilities' relative error is ~0.4*ulp(offset), "
        "about 0.12*2^floor(log2 offset) times the bound 3.46*sqrt(2)*u, for FP16 and BF16 alike. torch "
        "reduces the row in FP32, so n barely matters. Offsets <= 4 pass (ratio <= 0.5); 30 (ratio 2.9) and "
        "300 (30) fail in FP16 and BF16, and in the FP8 recipes, whose activations are BF16 (no FP8 GEMM runs, so "
        "they are judged as BF16); "
        "past 65504 FP16's logits are inf (overflow at 1e5)."),
    grid={"n": [4096, 16384], "offset": [0.0, 4.0, 30.0, 300.0, 1e5]},
    quick={"n": [4096], "offset": [4.0, 300.0]},
    inputs=lambda p, g: {"x": p["offset"] + torch.randn(SOFTMAX_ROWS, p["n"], generator=g)},
    run=_softmax_run,
    n=lambda p: 2,  # the input and the output are rounded; the row sum accumulates in FP32
    expect=(Expect(FP16, "overflow", "logits past 65504 are inf in FP16",
                   when=lambda p: p["offset"] > FORMATS["fp16"].max),
            Expect(FP16 + BF16 + FP8, "diverged", "logits rounded at magnitude offset >= 16: errors ulp(offset)/2 "
                   "in every exponent", when=lambda p: p["offset"] >= 16)),
    version=2,
))


def _ce_inputs(p: dict, g: torch.Generator) -> dict:
    x = torch.randn(ROWS, p["n"], generator=g) * p["scale"]
    t = x.argmax(-1) if p["target"] == "top" else torch.randint(p["n"], (ROWS,), generator=g)
    return {"x": x, "t": t}


def _ce_run(ex, inp: dict, p: dict) -> Output:
    x = ex.act(inp["x"])
    with ex.autocast():
        loss = F.cross_entropy(x, inp["t"].to(x.device), reduction="none")
    return Output(value=loss.float())


register(Scenario(
    name="cross_entropy_vocab",
    family="reduction",
    description=(
        "Per-row cross-entropy (log-softmax and NLL) over a vocabulary of n logits of standard deviation "
        "`scale`. target=top is each row's arg-max (a confident, trained model: small losses), target=random a "
        "random class (an untrained model: losses ~scale*sqrt(2 ln n)). autocast runs cross_entropy in FP32 "
        "and the cast strategies accumulate in FP32 too, so the error is the logits' rounding: the loss's "
        "absolute error is ~|x_top|*u times the mass outside the target, which for a confident target is about "
        "the loss itself, so the relative error is ~|x_top|*u: with target=top FP16 and BF16 fail from scale 16 "
        "(logits ~70) and pass at scale <= 4; random targets give large losses and every strategy passes. FP8 "
        "recipes keep BF16 activations and fail with BF16."),
    grid={"n": [8192, 32768], "scale": [1.0, 4.0, 16.0], "target": ["top", "random"]},
    quick={"n": [8192], "scale": [4.0, 16.0], "target": ["top"]},
    inputs=_ce_inputs,
    run=_ce_run,
    n=lambda p: 2,
    expect=(Expect(FP16 + BF16 + FP8, "diverged", "a small loss computed from logits ~|x_top| rounded by |x_top|*u",
                   when=lambda p: p["target"] == "top" and p["scale"] >= 16),),
))


def _lse_run(ex, inp: dict, p: dict) -> Output:
    x = ex.act(inp["x"])
    if p["impl"] == "naive":  # a hand-written kernel: exp, sum and log in the compute format, no max shift
        y = torch.log(torch.exp(x).sum(-1))
    else:
        with ex.autocast():
            y = torch.logsumexp(x, dim=-1)
    return Output(value=y.float())


def _naive_lse_overflows(p: dict) -> bool:
    """exp(x) passes 65504 once x > ln(65504) = 11.09 (scale 8: max logit ~30); the sum of n exponentials
    once n*E[exp(x)] = n*exp(scale^2/2) > 65504."""
    fmax = FORMATS["fp16"].max
    return p["impl"] == "naive" and (p["scale"] >= 8 or p["n"] * math.exp(p["scale"] ** 2 / 2) > fmax)


register(Scenario(
    name="logsumexp_long",
    family="reduction",
    description=(
        "log(sum(exp(x))) over rows of n logits of standard deviation `scale`. impl=torch subtracts the row "
        "max and accumulates in FP32: every strategy passes (relative error ~u). impl=naive evaluates exp, sum "
        "and log in the compute format without the max shift, as a hand-written kernel might: FP16's exp "
        "overflows once a logit passes ln(65504) = 11.09 (scale 8), and the sum of n exponentials passes 65504 "
        "once n*exp(scale^2/2) does (n = 65536 at scale 1: ~1.08e5), so FP16 returns inf; BF16 has FP32's "
        "range and passes."),
    grid={"impl": ["torch", "naive"], "n": [1024, 65536], "scale": [1.0, 8.0]},
    quick={"n": [65536], "scale": [1.0]},
    inputs=lambda p, g: {"x": torch.randn(ROWS, p["n"], generator=g) * p["scale"]},
    run=_lse_run,
    n=lambda p: 4 if p["impl"] == "naive" else 2,  # naive: input, exp, sum, log
    expect=(Expect(FP16, "overflow", "exp(x) or the sum of n exponentials passes 65504 without the max shift",
                   when=_naive_lse_overflows),),
))


# -- normalisation statistics ------------------------------------------------------------------------
def _ln_run(ex, inp: dict, p: dict) -> Output:
    x = ex.act(inp["x"])
    with ex.autocast():
        y = F.layer_norm(x, (x.shape[-1],))
    return Output(value=y.float())


register(Scenario(
    name="layernorm_offset",
    family="reduction",
    description=(
        "torch's layer norm of rows with mean `offset` and unit spread. The kernel keeps its statistics in "
        "FP32, but the input arrives rounded to the compute format: an element at offset o carries an error up "
        "to ulp(o)/2 = 2^floor(log2 o)*u, which normalisation by the unit std turns into a relative output "
        "error ~0.29*ulp(o), about 0.12*2^floor(log2 o) times the bound 3.46*sqrt(2)*u, for FP16 and BF16 "
        "alike. Offsets <= 3 pass (ratio 0.3); 30 fails (1.9) and 300 fails (30) in FP16 and BF16, "
        "and in the FP8 recipes, whose activations are BF16."),
    grid={"n": [1024, 8192], "offset": [0.0, 3.0, 30.0, 300.0]},
    quick={"n": [1024], "offset": [3.0, 300.0]},
    inputs=lambda p, g: {"x": p["offset"] + torch.randn(8, p["n"], generator=g)},
    run=_ln_run,
    n=lambda p: 2,  # the input and the output are rounded; mean and variance stay in FP32
    expect=(Expect(FP16 + BF16 + FP8, "diverged", "the input's rounding error ulp(offset)/2 survives "
                   "normalisation", when=lambda p: p["offset"] >= 16),),
    version=2,
))


def _formula_run(ex, inp: dict, p: dict) -> Output:
    if p["impl"] == "torch":
        return _ln_run(ex, inp, p)
    return Output(value=one_pass_layernorm(ex.act(inp["x"])).float())


register(Scenario(
    name="layernorm_formula",
    family="reduction",
    description=(
        "Layer norm of rows with mean `offset` and unit spread whose values lie on BF16's grid, so that "
        "rounding them costs nothing in any format and only the formula differs. impl=torch passes at every "
        "offset. impl=one_pass computes var = E[x^2] - E[x]^2 in the compute format: both moments are rounded "
        "at magnitude offset^2, so the variance loses ~offset^2*u and cancels once that reaches it: offset 3 "
        "passes (ratio <= 0.55); at offset 12 FP16 loses ~144*2^-11 = 7% of the variance (ratio ~9) and BF16 "
        "all of it (the difference is 0 or negative, clamped to 0, and the output is scaled by 1/sqrt(eps)), "
        "and FP8 recipes (BF16 compute) fail with it. Larger offsets are left out on purpose: from ~20 BF16's "
        "rounded mean equals many inputs exactly, and the exact zeros of x - mean would be read as underflow."),
    grid={"impl": ["torch", "one_pass"], "offset": [0.0, 3.0, 12.0]},
    quick={"offset": [12.0]},
    inputs=lambda p, g: {"x": quantize(p["offset"] + torch.randn(8, 1024, generator=g), "bf16")},
    run=_formula_run,
    n=lambda p: 6 if p["impl"] == "one_pass" else 2,  # x*x, two means, m*m, the difference, rsqrt
    expect=(Expect(FP16 + BF16 + FP8, "diverged", "E[x^2] - E[x]^2 cancels: offset^2*u of the variance is lost",
                   when=lambda p: p["impl"] == "one_pass" and p["offset"] >= 12),),
))


def _rms_run(ex, inp: dict, p: dict) -> Output:
    x = ex.act(inp["x"])
    y, rms = rms_norm(x, x.dtype if p["stat"] == "compute" else torch.float32)
    return Output(value=torch.cat([y.float().reshape(-1), rms.float().reshape(-1)]))


register(Scenario(
    name="rmsnorm_offset",
    family="reduction",
    description=(
        "RMS norm y = x/sqrt(mean(x^2) + eps) of rows with mean `offset` (the value is the normalised rows "
        "followed by each row's RMS, so an overflowed statistic reads as overflow, not as an output flushed to "
        "zero). Without a mean subtraction the offset costs no precision: relative error ~u at every offset. "
        "stat=compute squares and averages in the compute format (a kernel without an upcast): in FP16 x^2 "
        "passes 65504 once |x| > 255.9, so at offset 300 the statistic is inf and the output 0. stat=fp32 "
        "upcasts first, as LLaMA's reference RMSNorm does, and passes; BF16 has FP32's range either way."),
    grid={"stat": ["compute", "fp32"], "offset": [0.0, 30.0, 300.0]},
    quick={"offset": [300.0]},
    inputs=lambda p, g: {"x": p["offset"] + torch.randn(8, 1024, generator=g)},
    run=_rms_run,
    n=lambda p: 6 if p["stat"] == "compute" else 2,  # x*x, the mean, + eps, rsqrt, the product
    expect=(Expect(FP16, "overflow", "x^2 > 65504 for |x| > 255.9: the mean square is inf",
                   when=lambda p: p["stat"] == "compute" and p["offset"] >= 256),),
))


def _bn_run(ex, inp: dict, p: dict) -> Output:
    x = ex.act(inp["x"])
    with ex.autocast():
        var = torch.var(x, dim=(0, 2, 3), unbiased=False)
    return Output(value=var.float())


register(Scenario(
    name="batchnorm_stats",
    family="reduction",
    description=(
        "Per-channel batch variance (torch.var, as batch norm computes it) of activations with mean `offset` "
        "and unit variance, batch*64 values per channel. The kernel accumulates in FP32; rounding the "
        "activations to the compute format adds noise of variance ulp(offset)^2/12 to the unit variance "
        "(plus a random cross term ~ulp/sqrt(3N)). BF16 fails from offset 150 (ulp 1: +8%); FP16 passes at 150 "
        "(ulp 1/8: 0.13% < 0.24%) and fails at 1000 (ulp 1/2: 2%); FP8 recipes keep BF16 activations and fail with BF16."),
    grid={"batch": [128, 512], "offset": [0.0, 10.0, 150.0, 1000.0]},
    quick={"batch": [128], "offset": [150.0, 1000.0]},
    inputs=lambda p, g: {"x": p["offset"] + torch.randn(p["batch"], 16, 8, 8, generator=g)},
    run=_bn_run,
    n=lambda p: 2,  # the input and the output are rounded; torch accumulates in FP32
    expect=(Expect(BF16 + FP8, "diverged", "rounding noise ulp(offset)^2/12 in the variance, ulp >= 1 from offset 128",
                   when=lambda p: p["offset"] >= 128),
            Expect(FP16, "diverged", "rounding noise ulp(offset)^2/12 in the variance, ulp >= 1/2 from offset 512",
                   when=lambda p: p["offset"] >= 512)),
    version=2,
))


def _running_steps(p: dict) -> int:
    return round(2 / p["momentum"])


def _running_inputs(p: dict, g: torch.Generator) -> dict:
    c = 8
    mean = 3.0 + 0.1 * torch.arange(c)  # one binade, [2, 4): half an ulp of the buffer is 2u
    std = 0.5 + 0.05 * torch.arange(c)
    return {"x": mean + std * torch.randn(_running_steps(p), 64, c, generator=g)}


def _running_run(ex, inp: dict, p: dict) -> Output:
    var, mean = torch.var_mean(wide(ex.act(inp["x"])), dim=1)  # each step's batch statistics, in FP32
    c = mean.shape[1]
    state = torch.cat([torch.zeros(c), torch.ones(c)]).to(ex.device, ex.param_dtype)  # torch's initial buffers
    return Output(value=ema(state, torch.cat([mean, var], dim=1), p["momentum"]).float())


register(Scenario(
    name="batchnorm_running",
    family="reduction",
    description=(
        "Batch-norm running mean and variance (initial buffers 0 and 1, update r <- (1-m)*r + m*batch) over "
        "2/m steps of batches of 64, channel means 3.0..3.7 and variances 0.25..0.72. The buffers are stored "
        "like the parameters: FP32 under autocast (pass), FP16/BF16 in the pure and master-weight strategies "
        "(master weights keep FP32 copies of parameters, not of buffers; apex's O2 keeps batch norm in FP32 for "
        "this). A low-precision buffer stops moving once m*|batch - r| < ulp(r)/2: it stalls up to ulp(r)/(2m) "
        "short of its target, a gap growing like 1/m while the bound (an EMA damps old roundings: n = 1/m) grows "
        "like 1/sqrt(m); batch noise larger than ulp/2 dithers it back. m = 0.1 and 0.01 pass (BF16 ratio "
        "0.35); at m = 0.001 FP16 buffers end ~12% off (ratio 1.6) and BF16 ones ~67% (the means stall at 1.0, "
        "the variances never leave it): fp16-pure, fp16-master, bf16-pure and bf16-master fail."),
    grid={"momentum": [0.1, 0.01, 0.001]},
    quick={"momentum": [0.001]},
    inputs=_running_inputs,
    run=_running_run,
    n=lambda p: math.ceil(1 / p["momentum"]),  # sum_k (1-m)^k = 1/m: the chain an EMA remembers
    expect=(Expect(CAST, "diverged", "low-precision running buffers stall ulp/(2m) short of the batch statistics",
                   when=lambda p: p["momentum"] <= 0.001),),
))


# -- long sums and means -----------------------------------------------------------------------------
def _sum_inputs(p: dict, g: torch.Generator) -> dict:
    x = torch.rand(p["n"], generator=g)
    if p["data"] == "zero_mean":  # centred, then the sum set to its typical size sqrt(n/12): never ~0 by luck
        x = x - x.mean() + math.sqrt(p["n"] / 12) / p["n"]
    xd = x.double()
    return {"x": x, "kappa": xd.abs().sum() / xd.sum().abs()}  # sum|x| / |sum x|: the sum's condition number


def _sum_run(ex, inp: dict, p: dict) -> Output:
    lanes = min(LANES, p["n"])
    acc = blocked_sum(ex.act(inp["x"]), lanes)
    total = acc.sum() if p["op"] == "sum" else acc.mean() / (p["n"] // lanes)
    return Output(value=total.float().reshape(1), kappa=float(inp["kappa"]))


register(Scenario(
    name="sum_long",
    family="reduction",
    description=(
        "Sum (op=sum) or mean (op=mean) of n values in a compute-format accumulator: 4096 running sums, the "
        "threads of a reduction kernel, each add n/4096 values with one rounding per addition, then the lanes "
        "are combined. Same-sign data (uniform [0,1)): a lane's total grows until half its ulp exceeds the "
        "values added (BF16 from 256, FP16 from 2048) and additions are lost (stagnation): at n = 2^24 BF16 "
        "lanes stop at 256 of 2048 (error 0.875 > 1/2) while FP16 lanes only reach 2048 at the end (0.5%). "
        "The FP16 sum passes 65504 from n = 2^17 (overflow); the mean does not overflow. Zero-mean data "
        "(centred, its sum set to its typical size sqrt(n/12)): the lane totals stay small, so do their "
        "roundings, and the error relative to sum|x| hardly grows (the bound carries kappa = sum|x|/|sum x|): "
        "every strategy passes (BF16 at 2^24: 14% of the sum, below the 1/2 cap)."),
    grid={"n": [2**12, 2**16, 2**20, 2**24], "data": ["same_sign", "zero_mean"], "op": ["sum", "mean"]},
    quick={"n": [2**20]},
    inputs=_sum_inputs,
    run=_sum_run,
    n=lambda p: p["n"] // min(LANES, p["n"]) + 3,  # the input, n/4096 additions, the combination, the division
    expect=(Expect(FP16, "overflow", "a same-sign sum of n values ~0.5 passes 65504 from n = 2^17",
                   when=lambda p: p["data"] == "same_sign" and p["op"] == "sum" and p["n"] >= 2**17),
            Expect(BF16 + FP8, "diverged", "BF16 lanes stagnate at 256 while their true total n/8192 passes 512",
                   when=lambda p: p["data"] == "same_sign" and p["n"] > 2**22)),
    version=2,
))
