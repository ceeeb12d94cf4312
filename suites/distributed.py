"""``distributed`` family: data-parallel gradient reduction in the compute format, and loss scalers that
must agree across ranks.

Every scenario here reduces per-rank tensors with the ring collectives simulated on one device
(:func:`harness.distributed.ring_all_reduce`, :func:`~harness.distributed.ring_reduce_scatter`): a
case runs on one rank of a sharded run like any other, and a real collective would need every rank
in the same case at once. ``python -m harness.distributed check`` runs the real collectives on >= 2
ranks and compares them with this simulation (docs/distributed.md).

The reduce dtype is the strategy's activation format (``ex.dtype``: FP16, BF16; FP8 recipes keep
BF16 between layers; FP32 and TF32 reduce in FP32, the reference's way).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from harness.distributed import ring_all_reduce, ring_reduce_scatter
from harness.core.execution import Execution
from harness.core.scaling import Scaler
from harness.core.scenario import Expect, Output, Scenario, register

from ._models import DYNAMIC

WORLDS = [2, 3, 4, 5, 6, 7, 8]
#: Gradient entries per rank: divisible by every world size up to 8 (840 = lcm(1..8)).
NUMEL = 840 * 8


def _kappa(g: torch.Tensor) -> float:
    """Condition number of the sum over ranks (dim 0): ||sum |g_r| || / ||sum g_r||."""
    g = g.double()
    return float(g.abs().sum(0).norm() / g.sum(0).norm().clamp_min(1e-300))


def _grads(p: dict, gen: torch.Generator) -> dict:
    """Rank r's gradient: a signal shared by all ranks plus rank r's own noise (its micro-batch),
    ``noise`` times as large."""
    signal = torch.randn(NUMEL, generator=gen)
    noise = torch.randn(p["world"], NUMEL, generator=gen)
    return {"g": signal + p.get("noise", 1.0) * noise}


# -- DDP: all-reduce of the gradient buckets ----------------------------------------------------------
def _allreduce_run(ex: Execution, inp: dict, p: dict) -> Output:
    """DDP's comm hooks: each rank casts its gradient bucket to the reduce dtype and divides it by the
    world size, then all-reduces (sums) it. ``rel_err_by_world`` holds the error of the same reduction
    over the first w ranks, w = 2..world, against the exact mean (FP64)."""
    g = inp["g"]
    means = {w: ring_all_reduce(list(ex.act(g[:w]) / w)).float() for w in range(2, p["world"] + 1)}
    curve = []
    for w, m in means.items():
        exact = g[:w].double().mean(0)
        curve.append([w, float((m.double() - exact).norm() / exact.norm())])
    return Output(value=means[p["world"]], kappa=_kappa(g), extra={"world": p["world"], "rel_err_by_world": curve})


register(Scenario(
    name="allreduce_grads",
    family="distributed",
    description=("DDP-style gradient all-reduce in the reduce dtype: each of `world` ranks casts its gradient "
                 "to the compute format, divides it by the world size and the ring sums the shares, rounding "
                 "every partial sum. Ranks' gradients share a signal and carry their own noise (`noise` times "
                 "as large); the mean is small against the ranks' gradients when noise dominates, so its error "
                 "grows with the condition number and with the world size (rel_err_by_world)."),
    grid={"world": WORLDS, "noise": [1.0, 16.0]},
    quick={"world": [8], "noise": [16.0]},
    inputs=_grads,
    run=_allreduce_run,
    n=lambda p: p["world"] + 1,  # the cast, the division, world-1 additions
))


# -- FSDP: reduce-scatter with a low-precision reduce dtype -------------------------------------------
def fsdp_predivide_factor(world: int) -> int:
    """FSDP's ``gradient_predivide_factor``: the power of two f with f*f ~ world (divide by f before the
    sum and by world/f after it, so the sum neither overflows nor underflows)."""
    f = 1
    while world % f == 0 and world / f > f:
        f *= 2
    return f


DIVIDE = {"pre": lambda w: w, "split": fsdp_predivide_factor, "post": lambda w: 1}
#: Where FP16 runs out of range: 2^15 is half its maximum (65504), 2^-24 its smallest subnormal.
NEAR_MAX, TINY, TYPICAL = 2.0**15, 2.0**-24, 2.0**-8


def _fsdp_inputs(p: dict, gen: torch.Generator) -> dict:
    """``tiny`` and ``typical``: a shared signal plus per-rank noise at 2^-24 or 2^-8. ``near_max``: every
    rank's entry has the same sign and a magnitude in [1.5, 1.9] * 2^15, so any sum of two or more of
    them (or of halves of three) is past 65504, while their mean is not."""
    if p["grads"] != "near_max":
        return {"g": _grads({"world": p["world"]}, gen)["g"] * (TINY if p["grads"] == "tiny" else TYPICAL)}
    sign = torch.where(torch.rand(NUMEL, generator=gen) < 0.5, -1.0, 1.0)
    mag = 1.5 + 0.4 * torch.rand(p["world"], NUMEL, generator=gen)
    return {"g": sign * mag * NEAR_MAX}


def _fsdp_run(ex: Execution, inp: dict, p: dict) -> Output:
    """Parameters and gradients in FP32, reduce dtype = the compute format (FSDP's
    ``MixedPrecision(reduce_dtype=...)``): each rank's loss-scaled gradient is cast, divided by
    ``pre``, reduce-scattered (summed), divided by ``world/pre`` on its shard, cast back to FP32 and
    unscaled by 1/S in FP32."""
    w, scale = p["world"], ex.strategy.scaler.initial_scale
    pre = DIVIDE[p["divide"]](w)
    h = ex.act(inp["g"] * scale) / pre
    shards = [s / (w / pre) for s in ring_reduce_scatter(list(h))]
    avg = torch.cat(shards).float() * (1.0 / scale)
    return Output(value=avg, kappa=_kappa(inp["g"]),
                  extra={"world": w, "predivide": pre, "postdivide": w / pre, "loss_scale": scale})


_SCALED_FP16 = ("fp16-static",) + DYNAMIC

register(Scenario(
    name="fsdp_reduce_scatter",
    family="distributed",
    description=("FSDP-style mixed precision: FP32 parameters, gradients (times the strategy's loss scale) "
                 "averaged over `world` ranks by a reduce-scatter in the compute format. Dividing by the world "
                 "size before the sum (`pre`, DDP's hooks) pushes tiny gradients further into FP16's "
                 "subnormals; dividing after it (`post`) lets the sum of near-maximal gradients pass 65504; "
                 "FSDP's predivide factor (`split`) divides by ~sqrt(world) on each side. BF16 has FP32's range."),
    grid={"world": WORLDS, "divide": ["pre", "split", "post"], "grads": ["tiny", "typical", "near_max"]},
    quick={"world": [8], "grads": ["tiny", "near_max"]},
    inputs=_fsdp_inputs,
    run=_fsdp_run,
    n=lambda p: p["world"] + 2,  # the cast, two divisions, world-1 additions
    expect=(
        Expect(("fp16",), "underflow", "gradients of ~2^-24 cast to FP16 without a loss scale flush to zero",
               when=lambda p: p["grads"] == "tiny"),
        Expect(_SCALED_FP16, "overflow", "gradients of ~2^15 times a loss scale of 2^10 or more pass 65504 at the cast",
               when=lambda p: p["grads"] == "near_max"),
        Expect(("fp16",), "overflow", "summing more than one near-maximal share before dividing passes 65504",
               when=lambda p: p["grads"] == "near_max" and DIVIDE[p["divide"]](p["world"]) < p["world"]),
    ),
))


# -- loss-scaler agreement across ranks ---------------------------------------------------------------
D, BATCH, STEPS, LR = 32, 256, 40, 1.0
#: The outlier batch: rank 0's first batch has one feature 64 times larger, so at the initial scale
#: 2^16 one entry of its scaled FP16 gradient (about 2^18) overflows; at 2^10 or unscaled it does not.
SPIKE = 64.0


def _agreement_inputs(p: dict, gen: torch.Generator) -> dict:
    """Per-rank least-squares data: rank r fits t_r = X_r w_r with its own optimum w_r (non-IID data),
    so the data-parallel optimum is a weighted mean of the w_r."""
    w = p["world"]
    x = torch.randn(w, BATCH, D, generator=gen)
    opt = (torch.randn(D, generator=gen) + 0.5 * torch.randn(w, D, generator=gen)) / 16
    t = torch.einsum("rbd,rd->rb", x, opt)
    return {"x": x, "t": t}


def _scalers(ex: Execution, world: int) -> list[Scaler]:
    """One scaler per rank. ``gradscaler`` specs run the same policy (init, growth, backoff, interval)
    in our scaler: torch.amp.GradScaler has no notion of a reduced-across-ranks flag of its own."""
    spec = ex.strategy.scaler
    if spec.kind == "gradscaler":
        spec = replace(spec, kind="dynamic")
    return [Scaler(spec) for _ in range(world)]


def _agreement_run(ex: Execution, inp: dict, p: dict) -> Output:
    """ZeRO/FSDP-style sharded data parallelism: rank r owns shard r of the FP32 weights. Each step every
    rank computes its loss-scaled gradient in the compute format, a ring reduce-scatter sums it, and each
    owner unscales its shard with its own scale and checks it for inf/NaN. ``found_inf=reduced`` takes
    the maximum of the flags over ranks (ShardedGradScaler, DeepSpeed, Megatron), so all ranks skip
    together; ``local`` lets each rank decide alone, so the ranks' steps and loss scales drift apart."""
    world = p["world"]
    x, t = ex.act(inp["x"]), inp["t"].to(ex.device)
    spiked = x[0].clone()
    spiked[:, -1] *= SPIKE
    w = torch.zeros(D, device=ex.device)
    scalers = _scalers(ex, world)
    taken, skipped = [0] * world, [0] * world
    for step in range(STEPS):
        scales = [s.scale for s in scalers]
        wc = ex.act(w)
        local = []
        for r in range(world):
            xr = spiked if (step == 0 and r == 0) else x[r]
            resid = (xr @ wc).float() - t[r]
            local.append(xr.t() @ ex.act(resid * (scales[r] / BATCH)))
        shards = ring_reduce_scatter(local)
        grads = [s.float() * (1.0 / (scales[r] * world)) for r, s in enumerate(shards)]
        found = [not bool(torch.isfinite(g).all()) for g in grads]
        if p["found_inf"] == "reduced":
            found = [any(found)] * world
        for r, (g, f) in enumerate(zip(grads, found)):
            if scalers[r].update(f).skipped:
                skipped[r] += 1
            else:
                taken[r] += 1
                w[r * (D // world):(r + 1) * (D // world)] -= LR * g
    final = [s.scale for s in scalers]
    return Output(value=w.clone(), extra={
        "world": world, "steps_taken_by_rank": taken, "skipped_by_rank": skipped, "final_scale_by_rank": final,
        "step_skew": max(taken) - min(taken), "scale_ratio": max(final) / min(final)})


register(Scenario(
    name="scaler_agreement",
    family="distributed",
    description=("One rank's outlier batch overflows FP16 at the loss scale 2^16 on the first step. With the "
                 "found-inf flag reduced across ranks (`reduced`) every rank skips that step and backs off, and "
                 "training converges to the FP32 weights; when each rank checks only its own gradient shard "
                 "(`local`) one shard skips and halves its scale while the others step, the ranks then scale "
                 "their losses differently, and the weights converge somewhere else (step_skew, scale_ratio)."),
    grid={"world": [2, 4, 8], "found_inf": ["reduced", "local"]},
    quick={"world": [4]},
    inputs=_agreement_inputs,
    run=_agreement_run,
    n=lambda p: p["world"] + 2,
    expect=(Expect(DYNAMIC, "diverged",
                   "the rank that overflowed skips and halves its scale alone: shards step out of lockstep",
                   when=lambda p: p["found_inf"] == "local"),),
))
