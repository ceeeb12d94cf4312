"""Scenarios that tell the FP8 recipes apart: where a scale comes from and what it covers.

Every FP8 (and FP4) recipe multiplies an operand by a scale before the cast, so that its largest magnitude
lands near the format's max. The recipes differ in *which* magnitudes share a scale (the whole tensor, a
row, a tile of 128, a block of 32 or 16) and *when* the amax is taken (this step's, or the largest of a
history of previous steps). Each scenario here puts values where one of those choices fails and another
does not:

* ``fp8_activation_outliers``: a few activation channels far above the rest. One scale for the tensor
  flushes the smallest channels (their weight gradients are zero); a scale per channel keeps them.
* ``fp8_amax_spike``: a step whose activations jump above a calm history. Delayed scaling scales the spike
  with the history's amax and saturates it at the format's max; current scaling does not.
* ``fp8_amax_stale``: the opposite: one large step, then calm ones. The history keeps the obsolete amax and
  delayed scaling flushes the calm steps' activations.
* ``fp8_grad_underflow``: output gradients whose large entries sit in a few features or a few tokens. One
  E5M2 scale for the tensor cannot lift the small features' gradients above E5M2's smallest subnormal
  (2^-16); per-feature scales can. Large gradients in a few tokens are the reverse: E5M2's range holds
  them under one scale, while an E4M3 scale per feature (the row-wise recipes) flushes the other tokens.

Where the model is a single GEMM, ``L = <x @ w, G>`` with a fixed ``G``: ``dL/dw = x^T G`` exactly in
FP32, and every recipe's weight gradient is the product of its quantized ``x`` and ``G``.
"""
from __future__ import annotations

import torch

from harness.core.execution import Execution
from harness.core.scenario import Expect, Output, Scenario, Tolerance, register
from harness.run.training import Trainer

from ._models import frozen, training_output

#: The recipes with one scale per tensor from the current step's amax, and the delayed one.
PER_TENSOR = ("fp8-tensorwise", "torchao-fp8-tensorwise")
DELAYED = ("fp8-delayed",)
ROWWISE = ("fp8-rowwise", "torchao-fp8-rowwise")
ROWWISE_GW_HP = ("fp8-rowwise-gw-hp", "torchao-fp8-rowwise-gw-hp")
BLOCKWISE, MXFP8, MXFP4, NVFP4 = ("fp8-blockwise*",), ("mxfp8",), ("mxfp4",), ("nvfp4",)


def signed(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Values with random signs and magnitudes uniform in [0.5, 1): a binade wide, never zero."""
    s = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0)
    return s * (0.5 + 0.5 * torch.rand(shape, generator=g))


class Gemm(torch.nn.Module):
    """``x @ w`` through the strategy's GEMM (``ex.matmul``, one call site ``key``), the input handed over as
    the previous layer would (``ex.act``)."""

    def __init__(self, ex: Execution, w: torch.Tensor, key: str = "gemm") -> None:
        super().__init__()
        self.ex, self.key = ex, key
        self.w = torch.nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ex.matmul(self.ex.act(x), self.w, key=self.key)


def _dot(target: torch.Tensor):
    """The loss ``<model(x), target>`` (``target`` a fixed FP32 tensor: ``dL/dy = target`` exactly)."""
    def loss(mod: torch.nn.Module, batch: tuple) -> torch.Tensor:
        return (mod(batch[0]).float() * target.to(batch[0].device)).sum()
    return loss


def gemm_grads(ex: Execution, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, steps: int = 1,
               **extra) -> Output:
    """Frozen training steps of ``L = <x @ w, target>``: the first applied weight gradient ``x^T target``,
    through the strategy's trainer (its loss scaler included: ``steps`` leaves a dynamic scaler room to back
    off where the gradient overflows FP16 at its initial scale)."""
    trainer = Trainer(ex, Gemm(ex, w), optimizer=frozen)
    # only a dynamic scaler changes anything from one frozen step to the next
    res = trainer.train(_dot(target), lambda i: (x,), steps=steps if ex.strategy.scaler.dynamic else 1)
    return grads_output(ex, res, **extra)


def grads_output(ex: Execution, res, value: torch.Tensor | None = None, **extra) -> Output:
    """The first applied weight gradients (and the scaler's trace), without the loss curve: ``<y, target>``
    sums terms of both signs, and its relative error says nothing about a recipe."""
    out = training_output(ex, res, value=value, **extra)
    out.losses = None
    return out


# -- activation outliers ---------------------------------------------------------------------------------
TOKENS, CHANNELS, OUT = 128, 256, 64
#: The outlier channels (adjacent, so that a block of 16 or more channels holds both) and the spread of the
#: regular channels' magnitudes below the largest of them (log-uniform, as channel RMS spread in LLMs).
OUTLIERS, SPREAD = (0, 1), 8
#: The upstream gradient's scale: the outlier channels' weight gradient (~2^log2_ratio * sqrt(TOKENS) of it)
#: then fits FP16 once a dynamic scaler backs off from 2^16 to 2^11, within OUTLIER_STEPS steps (skip rate
#: under a half); FP8 recipes scale it whatever its size.
T_SCALE, OUTLIER_STEPS = 2.0**-12, 12


def channel_scales(log2_ratio: float, g: torch.Generator) -> torch.Tensor:
    """Per-channel magnitudes: regular channels log-uniform in [2^-SPREAD, 1), the outliers at 2^log2_ratio."""
    s = torch.exp2(-SPREAD * torch.rand(CHANNELS, generator=g))
    s[list(OUTLIERS)] = 2.0 ** log2_ratio
    return s


def _outlier_inputs(p: dict, g: torch.Generator) -> dict:
    s = channel_scales(p["log2_ratio"], g)
    return {"x": signed((TOKENS, CHANNELS), g) * s, "w": signed((CHANNELS, OUT), g) / 16,
            "t": signed((TOKENS, OUT), g) * T_SCALE}


def _outlier_run(ex: Execution, inp: dict, p: dict) -> Output:
    x = inp["x"]
    regular = torch.ones(CHANNELS, dtype=torch.bool)
    regular[list(OUTLIERS)] = False
    # what the regular channels carry through the GEMM: the same x (its scale set by the outliers) times a
    # weight that reads only them, against the exact product (recorded, not judged: the judged output is dw)
    w_reg = inp["w"] * regular.to(inp["w"].device)[:, None]  # the inputs are on the run's device
    with ex.autocast():
        y = ex.matmul(ex.act(x), ex.param(w_reg), key="regular").double().cpu()
    exact = (x.double() @ w_reg.double()).cpu()
    out = gemm_grads(ex, x, inp["w"], inp["t"], steps=OUTLIER_STEPS,
                     regular_channel_rel_err=float((y - exact).norm() / exact.norm()))
    dw = out.grads["w"].cpu()
    out.extra["regular_channels_zero_grad"] = int((dw[regular] == 0).all(1).sum())
    return out


register(Scenario(
    name="fp8_activation_outliers",
    family="tiny_gradient",
    description=(
        "Activations x (128 tokens x 256 channels) whose regular channels have magnitudes log-uniform in "
        "[2^-8, 1) and two outlier channels at 2^log2_ratio, into a GEMM x @ w; the judged output is the weight "
        "gradient x^T G. One E4M3 scale for the tensor maps the outliers to 448: x below 2^log2_ratio * 2^-18.8 "
        "flushes (half of E4M3's smallest subnormal 2^-9), values below 2^log2_ratio * 2^-14.8 keep only "
        "subnormal bits. At 2^10 (about 1000x, as measured for LLM outlier features) no channel flushes: E4M3's "
        "range absorbs it. At 2^13 every regular channel below 2^-5.8 flushes in every token: its row of dw "
        "is zero (per-tensor and delayed scaling: underflow). The row-wise recipes scale x per channel for the "
        "weight-gradient GEMM (the tokens are contracted), and the block recipes per block of tokens: they "
        "keep every channel. The record holds the regular channels' forward error "
        "(`regular_channel_rel_err`) and how many regular channels got an all-zero gradient."),
    grid={"log2_ratio": [10, 13]},
    quick={"log2_ratio": [13]},
    inputs=_outlier_inputs,
    run=_outlier_run,
    n=lambda p: 2,  # x and G are each rounded once; the GEMM accumulates in FP32
    expect=(
        Expect(PER_TENSOR + DELAYED, "underflow", "the outliers set the tensor's scale: regular channels below "
               "2^(log2_ratio - 18.8) flush in every token, and their rows of dw are zero",
               when=lambda p: p["log2_ratio"] >= 13),
        Expect(NVFP4, "underflow", "the outliers set NVFP4's tensor scale; blocks of regular channels 2^21 below "
               "them need E4M3 block scales under its smallest subnormal and flush",
               when=lambda p: p["log2_ratio"] >= 13),
    ),
))


# -- an amax spike after a calm history, and the history that outlives it -------------------------------
CALM = 8
ROWS, INNER, COLS = 32, 64, 32


def _history_inputs(p: dict, g: torch.Generator) -> dict:
    # t / 256: the weight gradient (~sqrt(ROWS) * |t|) stays under 1, so FP16's scale of 2^16 does not overflow it
    return {"x": signed((CALM + 1, ROWS, INNER), g), "w": signed((INNER, COLS), g) / 8,
            "t": signed((ROWS, COLS), g) / 256}


def _spike_run(ex: Execution, inp: dict, p: dict) -> Output:
    """CALM calm steps, then one step whose activations are 2^log2_spike larger: its output is judged."""
    w = ex.param(inp["w"])
    with ex.autocast():
        for i in range(CALM):
            ex.matmul(ex.act(inp["x"][i]), w, key="layer")
        y = ex.matmul(ex.act(inp["x"][CALM] * 2.0 ** p["log2_spike"]), w, key="layer")
    return Output(value=y.float())


register(Scenario(
    name="fp8_amax_spike",
    family="exploding_loss",
    description=(
        f"{CALM} steps of activations with |x| in [0.5, 1), then a step 2^log2_spike larger (a loss spike), "
        "into the same GEMM (one call site). Delayed scaling takes the scale from the amax history (the largest "
        "of the previous steps, about 1), so the spike's x * 448 / 1 is past E4M3's max and saturates at 448: the "
        "spike step's output comes out 2^log2_spike too small (rel_err ~1). Current scaling (every other recipe) "
        "takes this step's amax and passes. At 2^4 the spike is 16x: still saturated."),
    grid={"log2_spike": [4, 8]},
    quick={"log2_spike": [8]},
    inputs=_history_inputs,
    run=_spike_run,
    n=lambda p: 2,
    expect=(Expect(DELAYED, "diverged", "the history's amax (~1) scales the spike: x * 448 saturates at E4M3's "
                   "max 448 and the output is 2^log2_spike too small"),),
))


def _stale_run(ex: Execution, inp: dict, p: dict) -> Output:
    """One forward step 2^log2_drop larger, then calm training steps: the first calm step's weight gradient
    and the last calm step's output are judged."""
    trainer = Trainer(ex, Gemm(ex, inp["w"], key="layer"), optimizer=frozen)
    big = 2.0 ** p["log2_drop"]
    with torch.no_grad(), ex.autocast():  # forward only: the amax joins the history, nothing is trained on it
        trainer.model(inp["x"][0] * big)
    res = trainer.train(_dot(inp["t"]), lambda i: (inp["x"][i + 1],), steps=CALM - 1)
    with torch.no_grad(), ex.autocast():
        y = trainer.model(inp["x"][CALM])  # one more calm step: the history still holds the large amax
    return grads_output(ex, res, value=y.float())


register(Scenario(
    name="fp8_amax_stale",
    family="tiny_gradient",
    description=(
        f"One forward step of activations 2^log2_drop larger than the {CALM} calm steps after it (|x| in [0.5, 1)), "
        "in one GEMM call site; the calm steps train (frozen weights). Delayed scaling keeps the large amax in its history (16 "
        "steps here, 1024 in Transformer Engine's default) and scales the calm steps by 448 / 2^log2_drop: at "
        "2^20 every calm x lands below 2^-10, half of E4M3's smallest subnormal, and flushes; outputs and weight "
        "gradients are zero (underflow). At 2^10 the calm values still sit in E4M3's normal range and pass. "
        "Current scaling takes each step's own amax and never sees the old one. FP16 overflows on the large "
        "step, which is forward only and not judged."),
    grid={"log2_drop": [10, 20]},
    quick={"log2_drop": [20]},
    tolerance=Tolerance("FP4's eight magnitudes make exact cancellation in a sum of 32 products common (MXFP4 lost "
                        "1.2% of dw's entries so, without any flush); the failure shown loses all of them",
                        underflow_budget=0.05),
    inputs=_history_inputs,
    run=_stale_run,
    n=lambda p: 2,
    expect=(Expect(DELAYED, "underflow", "the history's obsolete amax 2^log2_drop scales the calm activations to "
                   "below 2^-10: they flush, and so does the weight gradient", when=lambda p: p["log2_drop"] >= 20),),
))


# -- E5M2 gradients under one scale per tensor --------------------------------------------------------------
TOKENS_G, FEATURES_G, LARGE = 256, 128, (0, 1)
#: log2 magnitudes of the small gradients: below E5M2's reach under the large ones' scale (2^-32.8 of the
#: amax) for ``features``; within it, but below E4M3's (2^-18.8), for the token layouts.
SMALL = {"features": (-40.0, -26.0), "tokens": (-26.0, -20.0)}
#: The tokens whose weight gradient is judged, per layout: all of them, those in the other 128-token tile
#: than the large tokens, or in the same tile but other blocks of 32.
JUDGED = {"features": range(TOKENS_G), "tokens": range(TOKENS_G), "tokens_other_tile": range(128, 256),
          "tokens_other_block": range(32, 128), "spread": range(TOKENS_G)}
#: ``spread``: no large tokens; per-token magnitudes log-uniform over this many binades below 1.
SPREAD_G = 8


def judged_tokens(layout: str) -> torch.Tensor:
    """A mask of the tokens whose gradients reach dw in ``layout``."""
    m = torch.zeros(TOKENS_G, dtype=torch.bool)
    m[list(JUDGED[layout])] = True
    return m


def _grad_inputs(p: dict, g: torch.Generator) -> dict:
    features = p["layout"] == "features"
    lo, hi = SMALL["features" if features else "tokens"]
    n = FEATURES_G if features else TOKENS_G
    if p["layout"] == "spread":
        lo, hi = -SPREAD_G, 0.0
    mag = torch.exp2(lo + (hi - lo) * torch.rand(n, generator=g))
    if p["layout"] != "spread":
        mag[list(LARGE)] = 1.0
    shape = (1, n) if features else (n, 1)  # per output feature, or per token
    return {"t": signed((TOKENS_G, FEATURES_G), g) * mag.reshape(shape), "w": signed((TOKENS_G, FEATURES_G), g) / 16}


def _grad_run(ex: Execution, inp: dict, p: dict) -> Output:
    # x = diag(judged tokens): dw = x^T G is G's judged rows as each recipe quantized G (a flushed entry is a
    # zero entry of dw); the other tokens' rows of dw are 0 in every run, and their gradients still share scales
    x = torch.diag(judged_tokens(p["layout"]).float())
    return gemm_grads(ex, x, inp["w"], inp["t"])


LARGE_TOKENS_SHARE = ("the two large tokens set the E4M3 scale of every feature's column over all 256 tokens: the "
                      "others' gradients, 2^-18.8 below it or more, flush")
register(Scenario(
    name="fp8_grad_underflow",
    family="tiny_gradient",
    description=(
        "Output gradients G (256 tokens x 128 features) with |G| in [0.5, 1) in two large features "
        "(`layout=features`, a loss term that dominates) or two large tokens (the other layouts), the rest log-"
        "uniform in 2^-40..2^-26 (features) or 2^-26..2^-20 (tokens); the judged output is dw = x^T G with x the "
        "identity on the judged tokens (all; `tokens_other_tile`: 128..255, the other 128-token tile than the "
        "large ones; `tokens_other_block`: 32..127, their tile but other blocks of 32) and 0 elsewhere. One "
        "E5M2 scale per tensor maps the amax 1 to 57344, so gradients below 2^-32.8 fall under half of E5M2's "
        "smallest subnormal (2^-16) and flush: about half of the small features' (underflow); per-feature scales "
        "(the row-wise recipes' weight-gradient GEMM) and blocks along the tokens keep them. NVFP4's E4M3 block "
        "scales sit under its tensor scale and cannot reach 2^-26 either. With large tokens it is the reverse: "
        "E5M2 spans the 2^26 under one scale, but E4M3 scales shared with the large tokens flush the others "
        "below 2^-18.8: the row-wise recipes (a scale per feature over all tokens) everywhere, blockwise FP8 "
        "within the large tokens' 128-token tile, MXFP8 within their block of 32; BF16 weight gradients "
        "(rowwise_gw_hp) keep them all. `layout=spread` has no large tokens, their magnitudes log-uniform over "
        "2^-8..1: every E4M3 and E5M2 scale holds that, but E2M1 spans only 6/0.25 = 2^4.6 in a block of 32 "
        "(MXFP4) or 16 (NVFP4), and the block's smaller gradients flush (full tier only)."),
    grid={"layout": ["features", "tokens", "tokens_other_tile", "tokens_other_block", "spread"]},
    quick={"layout": ["features", "tokens", "tokens_other_tile", "tokens_other_block"]},
    inputs=_grad_inputs,
    run=_grad_run,
    n=lambda p: 2,
    expect=(
        Expect(PER_TENSOR + DELAYED, "underflow", "the two large features set the E5M2 scale: gradients below "
               "2^-32.8 flush", when=lambda p: p["layout"] == "features"),
        Expect(NVFP4, "underflow", "block scales in E4M3 under a tensor scale set by the large gradients: a block "
               "2^-26 or more below them needs a scale under E4M3's smallest subnormal and flushes"),
        Expect(ROWWISE, "underflow", LARGE_TOKENS_SHARE, when=lambda p: p["layout"].startswith("tokens")),
        Expect(BLOCKWISE, "underflow", "the large tokens' 128-token tile shares one E4M3 scale per feature: the "
               "other tokens of that tile flush", when=lambda p: p["layout"] in ("tokens", "tokens_other_block")),
        Expect(MXFP8, "underflow", "the large tokens' block of 32 shares one scale: its other 30 tokens flush "
               "(11.7% of dw)", when=lambda p: p["layout"] == "tokens"),
        Expect(MXFP4, "underflow", "E2M1 spans 2^4.6 in a block of 32 tokens whose gradients spread over 2^6 or "
               "more: the smaller ones flush", when=lambda p: p["layout"] != "features"),
        Expect(("fp16",), "underflow", "no loss scale: gradients below 2^-25 flush in FP16 (2^-40..2^-26 all, "
               "2^-26..2^-20 some)", when=lambda p: p["layout"] != "spread"),
        Expect(("fp16-static",), "underflow", "a scale of 2^10 lifts 2^-40..2^-26 only to 2^-30..2^-16: those "
               "below 2^-25 flush", when=lambda p: p["layout"] == "features"),
    ),
))
