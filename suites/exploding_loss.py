"""``exploding_loss`` family: values past FP16's maximum, 65504: in the loss, in scaled gradients, in
forward activations and attention logits, and in a one-step gradient spike."""
from __future__ import annotations

import torch

from harness.core.scenario import Expect, Output, Scenario, register
from harness.run.training import Trainer

from ._models import DYNAMIC, FP4, Probe, dot_loss, frozen, training_output, wide

FP16 = ("fp16*",)


# -- a loss past 65504 --------------------------------------------------------------------------------
def _inputs(p: dict, g: torch.Generator) -> dict:
    b, k, m = 16, 64, 32
    return {"x": torch.randn(b, k, generator=g), "w": torch.randn(k, m, generator=g) / 8}


#: Steps of loss_past_fp16_max: an FP16 loss times the initial scale 2^16 = 65536 overflows FP16 in the
#: backward pass (the loss's own gradient is S), so a dynamic scaler skips step 0 and trains from step 1.
LOSS_STEPS = 4


def _loss_past_max_run(ex, inp: dict, p: dict) -> Output:
    """loss = mean(y^2) + K, reduced in the activation format, with K = 2^log2_loss - 1: a loss dominated by
    a term without gradient (a normaliser, the rest of a summed batch). Past 65504 the FP16 loss is inf
    whatever the scaler does, while the gradients, 2y/numel, stay small and finite."""
    trainer = Trainer(ex, Probe(inp["w"], ex), optimizer=frozen)
    k = 2.0 ** p["log2_loss"] - 1.0

    def loss_fn(mod, batch):
        (x,) = batch
        y = mod(x)
        return (y * y).mean() + k

    res = trainer.train(loss_fn, lambda i: (inp["x"],), steps=LOSS_STEPS)
    return training_output(ex, res, value=torch.tensor(res.losses[:1]))


register(Scenario(
    name="loss_past_fp16_max",
    family="exploding_loss",
    description=(
        "loss = mean(y^2) + K with K = 2^log2_loss - 1, reduced in the activation format: a loss dominated by "
        "a term without gradient (a normaliser, the rest of a summed batch). Past 65504 (log2_loss >= 17) the "
        "FP16 loss is inf whatever the scaler does: scaling acts on gradients, and these (2y/512) stay small "
        "and finite, so what a user logs is inf. With a dynamic scaler step 0 is also skipped, for a reason "
        "worth knowing: an FP16 loss times the initial scale 65536 overflows in the backward pass (the loss's "
        "own gradient is S), so it backs off once (1 of 4 steps skipped). BF16 keeps FP32's range."),
    grid={"log2_loss": [12, 17, 20, 24]},
    quick={"log2_loss": [12, 20]},
    inputs=_inputs,
    run=_loss_past_max_run,
    n=lambda p: 4,  # y, y*y, the mean and the sum with K are rounded: the mean accumulates in FP32
    expect=(Expect(FP16, "overflow", "the loss itself, 2^log2_loss > 65504, is inf in FP16: no loss scale acts on it",
                   when=lambda p: p["log2_loss"] >= 17),),
))


# -- scaled gradients overflowing at the initial scale --------------------------------------------------
#: max_k |sum_b x[b, k]|: the largest gradient is COLSUM * 2^log2_grad / 4 = 1.5 * 2^log2_grad.
COLSUM = 6.0


def _scaled_inputs(p: dict, g: torch.Generator) -> dict:
    inp = _inputs(p, g)
    x = inp["x"]
    inp["x"] = x * (COLSUM / x.sum(0).abs().max())  # the largest column sum of x is exactly COLSUM
    return inp


def _scaled_run(ex, inp: dict, p: dict) -> Output:
    """loss = sum(y) * 2^log2_grad / 4, so dL/dW[k, m] = colsum_k * 2^(log2_grad-2), at most 1.5*2^log2_grad:
    finite in FP16, but S * 1.5 * 2^log2_grad > 65504 once S >= 2^(16-log2_grad)."""
    trainer = Trainer(ex, Probe(inp["w"], ex), optimizer=frozen)
    weight = 2.0 ** p["log2_grad"] / 4.0

    def loss_fn(mod, batch):
        (x,) = batch
        return wide(mod(x)).sum() * weight

    return training_output(ex, trainer.train(loss_fn, lambda i: (inp["x"],), steps=p["steps"]))


register(Scenario(
    name="scaled_grad_overflow",
    family="exploding_loss",
    description=(
        "Gradients FP16 holds whose scaled values it does not: loss = sum(y) * 2^log2_grad/4 with x normalised "
        "so that the largest weight gradient is exactly 1.5*2^log2_grad. S*1.5*2^log2_grad passes 65504 for "
        "S >= 2^(16-log2_grad), so a dynamic scaler starting at 2^16 backs off log2_grad+1 times, skipping "
        "those steps (counted in the record), then trains: in 16 steps 11 are skipped at log2_grad = 10 "
        "(stalled), 7 at 6 and 3 at 2 (pass); in 64 steps all pass. A static 2^10 overflows on every step from "
        "log2_grad = 6 (stalled). Parameters frozen (lr 0): every step presents the same gradients."),
    grid={"log2_grad": [2, 6, 10], "steps": [16, 64]},
    quick={"log2_grad": [6, 10], "steps": [16]},
    inputs=_scaled_inputs,
    run=_scaled_run,
    n=lambda p: 16,
    expect=(Expect(("fp16-static",), "stalled", "S*g = 1.5*2^(10+log2_grad) > 65504 on every step",
                   when=lambda p: p["log2_grad"] >= 6),
            Expect(DYNAMIC, "stalled", "log2_grad+1 backoffs from 2^16 are more than half of the steps",
                   when=lambda p: (p["log2_grad"] + 1) / p["steps"] > 0.5),
            Expect(FP4, "underflow", "E2M1 elements keep 3 binades below their block's scale: the smallest "
                   "gradients of a block flush (measured at log2_grad 10: 1.56% of the non-zero values)",
                   when=lambda p: p["log2_grad"] >= 10)),
    version=2,
))


# -- a forward activation past 65504: no loss scale can help ----------------------------------------------
#: Steps a strategy without a dynamic scaler runs: with frozen parameters every step repeats the first.
FEW_STEPS = 8


def _act_inputs(p: dict, g: torch.Generator) -> dict:
    x = torch.randn(8, 16, generator=g)
    w = torch.randn(16, 16, generator=g)
    w = w * (1.25 * 2.0 ** p["log2_act"] / (x @ w).abs().max())   # max |x @ w| = 1.25 * 2^log2_act
    return {"x": x, "w": w, "t": torch.randn(8, 16, generator=g)}


def _act_run(ex, inp: dict, p: dict) -> Output:
    """y = x @ w with max |y| = 1.25*2^log2_act, MSE loss in FP32. Past 65504 the FP16 forward pass is inf,
    so the loss and every gradient are inf/NaN on every step whatever the loss scale."""
    trainer = Trainer(ex, Probe(inp["w"], ex), optimizer=frozen)

    def loss_fn(mod, batch):
        x, t = batch
        return ((wide(mod(x)) - wide(t)) ** 2).mean()

    steps = p["steps"] if ex.strategy.scaler.dynamic else min(p["steps"], FEW_STEPS)
    return training_output(ex, trainer.train(loss_fn, lambda i: (inp["x"], inp["t"]), steps=steps))


register(Scenario(
    name="activation_overflow",
    family="exploding_loss",
    description=(
        "y = x @ w with max |y| = 1.25*2^log2_act and an FP32 MSE loss, parameters frozen (lr 0). At "
        "log2_act = 15 (40960) FP16 holds the activations: the scaled gradients overflow until a dynamic "
        "scaler has backed off ~13 times (pass), a static 2^10 overflows on every step (stalled). From "
        "log2_act = 17 the FP16 forward pass itself is inf, so the loss and every gradient are inf/NaN on every "
        "step whatever the scale: a dynamic scaler backs off on every step, and the torch policy (min 0; "
        "fp16-dynamic, fp16-gradscaler, fp16-pure, fp16-master) collapses below FP32's normal range after "
        "143 steps (scale_exhausted); a floor of 1 with hysteresis 2 (DeepSpeed) is reached and raises after "
        "17. fp16 without a scaler overflows, static skips every step (stalled); BF16, FP8 (BF16 "
        "activations) and TF32 pass. Strategies without a dynamic scaler run 8 steps: with frozen parameters "
        "every step repeats the first."),
    grid={"log2_act": [15, 17, 20], "steps": [160]},
    quick={"log2_act": [17]},
    inputs=_act_inputs,
    run=_act_run,
    n=lambda p: 4,
    expect=(Expect(("fp16",), "overflow", "activations past 65504 are inf in the FP16 forward pass",
                   when=lambda p: p["log2_act"] >= 16),
            Expect(("fp16-static",), "stalled", "S*g > 65504 (log2_act 15) or an inf forward pass: every step skipped"),
            Expect(DYNAMIC, "scale_exhausted", "an inf forward pass overflows at every scale: the torch policy "
                   "halves S on every step until it collapses below 2^-126", when=lambda p: p["log2_act"] >= 16)),
))


# -- attention logits growing past 1e4 -------------------------------------------------------------------
T, D = 64, 64


def _attn_inputs(p: dict, g: torch.Generator) -> dict:
    """q_i = (1, a_i), k_j = (L, b_j) with a, b ~ N(0, 1/4) in D-1 dimensions: the logit q_i.k_j is
    L + a_i.b_j, a shared part L = logit_max that the softmax cancels plus a spread of std ~2."""
    s = (4.0 / (D - 1)) ** 0.25
    a = torch.round(8 * s * torch.randn(T, D - 1, generator=g)) / 8      # multiples of 2^-3 and of 2^-4:
    b = torch.round(16 * s * torch.randn(T, D - 1, generator=g)) / 16    # every logit is exact in FP32
    q = torch.cat([torch.ones(T, 1), a], dim=1)
    k = torch.cat([torch.full((T, 1), float(p["logit_max"])), b], dim=1)
    return {"q": q, "k": k, "v": torch.randn(T, D, generator=g)}


def _attn_run(ex, inp: dict, p: dict) -> Output:
    q, k, v = ex.act(inp["q"]), ex.act(inp["k"]), ex.act(inp["v"])
    with ex.autocast():
        logits = ex.matmul(q, k.t(), key="qk")
        probs = torch.softmax(logits, dim=-1)
        out = ex.matmul(probs, v, key="pv")
    return Output(value=out.float())


register(Scenario(
    name="attention_logit_growth",
    family="exploding_loss",
    description=(
        "Attention softmax(q k^T) v over 64 keys whose logits are L + a spread of std ~2, L = logit_max: the "
        "keys share a direction the queries align with (logit growth along a shared direction), so the softmax "
        "sees only the spread while the GEMM output carries L (spread values on a grid that keeps every logit "
        "exact in FP32). The logits leave the GEMM rounded at magnitude L: at L = 100 FP16's ulp is 1/16 and "
        "BF16's 1/2, enough to distort the probabilities (ratio ~3.5); at 1e4 they are 8 and 64, the spread is "
        "gone; past 65504 FP16's logits are inf (overflow). FP8 recipes quantise k per tensor: L sets the scale "
        "and the spread falls to E4M3's coarse low end, failing from 1e4. L = 1 passes everywhere."),
    grid={"logit_max": [1.0, 100.0, 1e4, 7e4]},
    quick={"logit_max": [100.0, 1e4, 7e4]},
    inputs=_attn_inputs,
    run=_attn_run,
    n=lambda p: 4,  # q, k and v, the logits, the probabilities, the output: a chain of 4
    expect=(Expect(FP16, "overflow", "logits past 65504 are inf in FP16", when=lambda p: p["logit_max"] > 65504),
            Expect(FP16 + ("bf16*",), "diverged", "logits rounded at magnitude L >= 100: errors ulp(L)/2 >= 1/32 "
                   "in the exponent", when=lambda p: p["logit_max"] >= 100),
            Expect(("fp8*",), "diverged", "per-tensor E4M3 scaling of k is set by L: the spread keeps ~no bits",
                   when=lambda p: p["logit_max"] >= 1e4),
            Expect(("mxfp8",), "diverged", "E4M3 elements over a block of 32 whose power-of-two scale L sets: the "
                   "logits' spread keeps ~no bits (measured rel_err 0.96)", when=lambda p: p["logit_max"] >= 1e4),
            Expect(("nvfp4",), "diverged", "E2M1 elements (u = 2^-2) under an E4M3 block scale: logits of magnitude "
                   ">= 100 lose their exponent's fraction (measured rel_err 0.68 at 100, 0.95 beyond)",
                   when=lambda p: p["logit_max"] >= 100),
            Expect(("mxfp4",), "underflow", "E2M1 keeps 3 binades below a block's power-of-two scale: the probabilities "
                   "below it flush (measured 2.4% of the output's norm at 100, 12.8% at 7e4)",
                   when=lambda p: p["logit_max"] in (100.0, 7e4)),
            Expect(("mxfp4",), "diverged", "E2M1 elements under a power-of-two block scale: at L = 1e4 the rounding "
                   "error (rel_err 0.96) outweighs the flushed share", when=lambda p: p["logit_max"] == 1e4)),
))


# -- a one-step gradient spike ------------------------------------------------------------------------------
#: The step whose gradients spike.
SPIKE_AT = 3


def _spike_run(ex, inp: dict, p: dict) -> Output:
    """Gradients of ~2^-4 (S*g = 2^12 at S = 2^16) on every step but one, where the loss, and with it every
    gradient, is multiplied by 2^log2_spike: S*g*2^log2_spike passes 65504 on that step only."""
    trainer = Trainer(ex, Probe(inp["w"], ex), optimizer=frozen)
    spike = 2.0 ** p["log2_spike"]
    base = 2.0 ** -4 / float((inp["x"].t() @ inp["t"]).abs().max())   # max |dL/dW| = 2^-4 off the spike
    res = trainer.train(dot_loss(), lambda i: (inp["x"], inp["t"], base * (spike if i == SPIKE_AT else 1.0)),
                        steps=p["steps"])
    return training_output(ex, res, skipped_at=[i for i, s in enumerate(res.trace.skipped) if s])


register(Scenario(
    name="grad_spike",
    family="exploding_loss",
    description=(
        "Gradients of ~2^-4 (S*g = 2^12 at S = 2^16) on every step but step 3, where the loss, and every "
        "gradient, is multiplied by 2^log2_spike. At 2^8 only the dynamic scalers overflow (S*g*2^8 = 2^20): "
        "they skip exactly step 3, back off to 2^15 and train on (skipped_at = [3] in the record), and every "
        "strategy passes. At 2^20 the spike also overflows at S = 2^10, which skips that one step too, and in "
        "unscaled FP16 (2^16 > 65504): without a scaler nothing checks for inf, the inf gradients are applied "
        "and the weights turn NaN (overflow). A control otherwise: a scaler that skipped more than the spike, "
        "or stopped, would show here. Parameters frozen (lr 0; 0 * inf is still NaN)."),
    grid={"log2_spike": [8, 20], "steps": [8]},
    quick={"log2_spike": [8]},
    inputs=lambda p, g: {"x": torch.randn(16, 64, generator=g), "w": torch.randn(64, 32, generator=g) / 8,
                         "t": torch.randn(16, 32, generator=g)},
    run=_spike_run,
    n=lambda p: 16,
    expect=(Expect(("fp16",), "overflow", "no scaler checks for inf: the spike's inf gradients (2^16 > 65504) are "
                   "applied and the weights turn NaN", when=lambda p: p["log2_spike"] >= 20),),
))
