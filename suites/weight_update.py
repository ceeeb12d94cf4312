"""``weight_update`` family: the optimizer step itself in low precision.

Both scenarios fix the gradient (the loss is linear in the weights, ``L = sum(w * c)``, so
``dL/dw = c`` exactly) and isolate what happens when the update is applied: with pure FP16/BF16
weights the optimizer adds a small update to a large weight in the storage format, and with FP32
master weights (``*-master``) it adds it to an FP32 copy. The output is the parameter drift after
several steps, ``w_final - w0``, against FP32's; the inputs are chosen on a coarse binary grid so
that FP32's own drift is exact and every error is the strategy's.
"""
from __future__ import annotations

import torch

from harness.core.scenario import Expect, Output, Scenario, Tolerance, register
from harness.run.training import Trainer

#: Weights |w0| in [1, 2): FP16's ulp there is 2^-10 (an update below 2^-11 is lost), BF16's is 2^-7.
SGD_LR = 2.0**-4
SWAMP_STEPS = 8


class LinearLoss(torch.nn.Module):
    """``forward(c) = sum(w * c)`` in FP32: the gradient of ``w`` is exactly ``c``."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return (self.w.float() * c.float()).sum()


def _grid(n: int, lo: float, bits: int, g: torch.Generator) -> torch.Tensor:
    """n values with random signs, uniform in [lo, 2*lo) on a grid of ``bits`` fraction bits (exact in BF16
    for bits <= 7, so the cast to any low-precision storage format is exact)."""
    steps = 2**bits
    mant = 1.0 + torch.randint(0, steps, (n,), generator=g).double() / steps
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).double()
    return (sign * mant * lo).float()


def _drift_output(trainer: Trainer, w0: torch.Tensor, **extra) -> Output:
    drift = trainer.parameters_fp32()["w"] - w0
    finite = torch.isfinite(drift)
    return Output(value=drift, extra={"swamped_frac": float(((drift == 0) & finite).float().mean()), **extra})


# -- update swamping -----------------------------------------------------------------------------
def _swamp_inputs(p: dict, g: torch.Generator) -> dict:
    n = 1024
    w0 = _grid(n, 1.0, 7, g)
    # |dw| in [2^r, 2^(r+1)) with 8 significant bits: w0 - k*dw stays within FP32's 24 bits
    dw = _grid(n, 2.0 ** p["log2_ratio"], 7, g)
    return {"w0": w0, "c": dw / SGD_LR}  # SGD's step w -= lr * c is then exactly -dw


def _swamp_run(ex, inp: dict, p: dict) -> Output:
    trainer = Trainer(ex, LinearLoss(inp["w0"]), optimizer=lambda ps: torch.optim.SGD(ps, lr=SGD_LR))
    res = trainer.train(lambda mod, batch: mod(batch[0]), lambda i: (inp["c"],), steps=SWAMP_STEPS)
    ratio = (inp["c"] * SGD_LR).abs() / inp["w0"].abs()
    return _drift_output(trainer, inp["w0"], update_ratio_median=float(ratio.median()),
                         skipped=res.trace.summary()["skipped"])


_LOST = "update swamped: |dw| < 2^-11 is below half an FP16 ulp of w in [1, 2), so w + dw == w"
_ROUNDED = ("every step rounds w + dw to FP16's grid (ulp 2^-10): an error of up to 2^-11 per step, "
            "the same sign every step, far above the bound")
register(Scenario(
    name="update_swamping",
    family="weight_update",
    description=(f"SGD for {SWAMP_STEPS} steps on weights |w| in [1, 2) with updates |dw|/|w| around 2^log2_ratio "
                 "(the gradient is fixed, so the lost updates add up). Pure FP16 weights lose an update below half "
                 "an ulp (2^-11 relative), BF16 below 2^-8, and round every larger one to their grid; FP32 master "
                 "weights keep it. Output: the drift w_final - w0 against FP32's (exact here)."),
    grid={"log2_ratio": [-7, -8, -9, -10, -11, -12, -14]},
    quick={"log2_ratio": [-9, -12]},
    inputs=_swamp_inputs,
    run=_swamp_run,
    n=lambda p: SWAMP_STEPS + 1,  # the weight is rounded to the storage format once per step
    tolerance=Tolerance(reason="a swamped update leaves the drift exactly zero: that is an absorbed update, not a "
                               "value below the format's range; it is judged by the drift's relative error",
                        underflow_budget=1.0),
    expect=(
        Expect(("fp16-pure",), "diverged", _LOST, when=lambda p: p["log2_ratio"] <= -12),
        Expect(("fp16-pure",), "diverged", _ROUNDED),
        Expect(("bf16-pure",), "diverged", "update swamped: |dw| < 2^-8 is below half a BF16 ulp (2^-7) of w",
               when=lambda p: p["log2_ratio"] <= -9),
        Expect(("bf16-pure",), "diverged", "every step rounds w + dw to BF16's grid (ulp 2^-7): up to 2^-8 per step"),
        Expect(("bf16-sr",), "diverged", "8 stochastically rounded steps: each weight's error is a random walk of "
                                         "standard deviation sqrt(8*|dw|*ulp), above the bound of 8 roundings "
                                         "(bf16_update_swamping shows SR over hundreds of steps)"),
        Expect(("bf16-kahan", "optimi-bf16-kahan"), "diverged",
               "8 updates of |dw| <= 2^-11 add up to at most half a BF16 ulp (2^-8): the Kahan compensation holds "
               "the drift, the stored weight has not moved yet", when=lambda p: p["log2_ratio"] <= -11),
        Expect(("bf16-kahan", "optimi-bf16-kahan"), "diverged",
               "the stored weight is within half a BF16 ulp (2^-8) of FP32's, but 8 updates drift only 8|dw|: "
               "that half ulp is a relative error above the bound", when=lambda p: p["log2_ratio"] <= -9),
        Expect(("bf16-8bit-states",), "unsupported", "not applicable: SGD without momentum keeps no optimizer state"),
        Expect(("torchao-bf16-*", "bnb-bf16-8bit-states"), "unsupported",
               "the library has no SGD recipe (torchao: AdamW/Adam; bitsandbytes mapped for Adam/AdamW)"),
    ),
))


# -- Adam's second moment and epsilon in low precision -------------------------------------------
ADAM_LR = 2.0**-7
ADAM_EPS = 1e-8
ADAM_STEPS = 8


def _adam_inputs(p: dict, g: torch.Generator) -> dict:
    n = 1024
    return {"w0": _grid(n, 2.0**-2, 7, g), "c": _grid(n, 2.0 ** p["log2_grad"], 7, g)}


def _adam_run(ex, inp: dict, p: dict) -> Output:
    """Adam on a fixed gradient: each step moves w by about lr * sign(g). Its state (m, v) lives in the
    parameters' dtype: for pure FP16, v = (1-beta2)*g^2 underflows to zero and eps = 1e-8 rounds to zero
    in FP16, so the step m / (sqrt(v) + eps) is m / 0 = inf."""
    trainer = Trainer(ex, LinearLoss(inp["w0"]),
                      optimizer=lambda ps: torch.optim.Adam(ps, lr=ADAM_LR, eps=ADAM_EPS))
    trainer.train(lambda mod, batch: mod(batch[0]), lambda i: (inp["c"],), steps=ADAM_STEPS)
    (state,) = [trainer.opt.state[q] for q in trainer.opt.param_groups[0]["params"]]
    if "exp_avg_sq" not in state:  # a library's optimizer (lib=bnb) names its states otherwise
        return _drift_output(trainer, inp["w0"])
    v = state["exp_avg_sq"]
    eps_stored = float(torch.tensor(ADAM_EPS, dtype=v.dtype))
    return _drift_output(trainer, inp["w0"], v_zero_frac=float((v == 0).float().mean()),
                         eps_in_state_dtype=eps_stored, state_dtype=str(v.dtype).replace("torch.", ""))


register(Scenario(
    name="adam_eps_underflow",
    family="weight_update",
    description=(f"Adam (lr 2^-7, eps 1e-8) for {ADAM_STEPS} steps on a fixed gradient of magnitude ~2^log2_grad. "
                 "The optimizer state lives in the parameters' dtype: with pure FP16 weights the second moment "
                 "(1-beta2)*g^2 underflows to zero once |g| < ~2^-8, eps = 1e-8 is below half FP16's smallest "
                 "subnormal and rounds to zero too, and the step m/(sqrt(v)+eps) divides by zero: the weights "
                 "become inf. BF16 has FP32's range; FP32 master weights keep FP32 state."),
    grid={"log2_grad": [-4, -6, -8, -10, -12, -16]},
    quick={"log2_grad": [-6, -12]},
    inputs=_adam_inputs,
    run=_adam_run,
    n=lambda p: ADAM_STEPS + 1,
    expect=(
        Expect(("fp16-pure",), "overflow", "(1-beta2)*g^2 < 2^-25 flushes v to zero in FP16 and eps = 1e-8 rounds "
                                           "to zero: m / (sqrt(v) + eps) = m / 0 = inf",
               when=lambda p: p["log2_grad"] <= -8),
        Expect(("fp16-pure",), "diverged", "(1-beta2)*g^2 ~ 2^-22 is subnormal in FP16 and keeps a few bits: "
                                           "sqrt(v), and so every step, is off by percents",
               when=lambda p: -8 < p["log2_grad"] <= -6),
        Expect(("*8bit-states",), "unsupported", "not applicable: 1024 weights, and states under 4096 entries stay "
                                                 "in full precision (as in torchao and bitsandbytes)"),
    ),
))


# -- BF16 update swamping over hundreds of steps: stochastic rounding and Kahan sums ----------------------
BF16_SWAMP_STEPS = 256
BF16_SWAMP_ROWS, BF16_SWAMP_COLS = 16, 256  # 4096 weights: large enough for 8-bit states (harness.values.optim_states)


def _bf16_swamp_inputs(p: dict, g: torch.Generator) -> dict:
    n = BF16_SWAMP_ROWS * BF16_SWAMP_COLS
    # weights and gradients in [1, 2), positive: every weight moves the same way, so row means do not cancel
    return {"w0": _grid(n, 1.0, 7, g).abs(), "c": _grid(n, 1.0, 7, g).abs()}


def _bf16_swamp_run(ex, inp: dict, p: dict) -> Output:
    """Adam (lr 2^log2_lr, no weight decay) on a fixed gradient: every step moves each weight by lr (Adam
    normalises the step; eps is negligible here), far below half a BF16 ulp of weights in [1, 2) (2^-8).
    Output: the mean drift of each row of 256 weights (what a layer's output on a constant input sees, and
    where stochastic rounding's independent errors average out). Extra: the share of (step, weight) pairs
    that left the stored weight unchanged, the mean drift against the intended one, and the per-weight
    distance from the intended final weights."""
    lr = 2.0 ** p["log2_lr"]
    trainer = Trainer(ex, LinearLoss(inp["w0"]), optimizer=lambda ps: torch.optim.Adam(ps, lr=lr))
    unmoved, skipped = torch.zeros((), dtype=torch.int64, device=ex.device), 0  # counted on the device: no sync
    for _ in range(BF16_SWAMP_STEPS):
        before = trainer.parameters_fp32()["w"].clone()
        _, _, decision = trainer.step(lambda mod, batch: mod(batch[0]), (inp["c"],))
        skipped += int(decision.skipped)
        if not decision.skipped:
            unmoved += (trainer.parameters_fp32()["w"] == before).sum()
    drift = (trainer.parameters_fp32()["w"] - inp["w0"]).double()
    intended = -BF16_SWAMP_STEPS * lr  # Adam's step on a constant gradient is lr: FP32 follows it to ~1e-7
    applied = max(1, BF16_SWAMP_STEPS - skipped) * drift.numel()
    return Output(value=drift.view(BF16_SWAMP_ROWS, BF16_SWAMP_COLS).mean(-1).float(), extra={
        "absorbed_frac": int(unmoved) / applied, "drift_ratio": float(drift.mean() / intended),
        "weight_rel_dist": float((drift - intended).norm() / (abs(intended) * drift.numel() ** 0.5)),
        "skipped": skipped})


_STALL = ("every update (lr <= 2^-9) is below half a BF16 ulp (2^-8) of weights in [1, 2): w + dw == w at every "
          "step, the weights never move")
register(Scenario(
    name="bf16_update_swamping",
    family="weight_update",
    description=(f"Adam for {BF16_SWAMP_STEPS} steps with lr 2^log2_lr on weights in [1, 2) and a fixed gradient: "
                 "each update is below half a BF16 ulp of its weight. Pure BF16 weights stall (w + dw == w every "
                 "step); stochastic rounding (update=sr) moves each weight by the update in expectation and a Kahan "
                 "compensation (update=kahan) carries what the weight cannot take to the next step, so both follow "
                 "FP32. Output: the mean drift of each row of 256 weights against FP32's."),
    # 256 host-bound steps per record (78 records, 27.7 s on an H100: results/h100/round5/full_tier_seconds.txt):
    # three rates, FP16's boundary between -9 and -11;
    # on the H100 -10, -12 and -14 gave the outcomes of their neighbours under every preset
    grid={"log2_lr": [-9, -11, -13]},
    quick={"log2_lr": [-13]},  # one case keeps the quick tier short; it shows every mechanism
    inputs=_bf16_swamp_inputs,
    run=_bf16_swamp_run,
    n=lambda p: BF16_SWAMP_STEPS + 1,  # the weight is rounded to its storage format once per step
    tolerance=Tolerance(reason="a stalled weight leaves its drift exactly zero: an absorbed update, not a value below "
                               "the format's range; judged by the drift's relative error", underflow_budget=1.0),
    expect=(
        Expect(("bf16-pure",), "diverged", _STALL),
        Expect(("fp16-pure",), "diverged", "the update (<= 2^-11) is at most half an FP16 ulp (2^-10) of weights in "
                                           "[1, 2): rounded to nearest, w + dw == w every step",
               when=lambda p: p["log2_lr"] <= -11),
    ),
))
