"""Loss-scaling failure analysis: the dynamic scaler policies driven until they run out of room.

Each scenario hands the backward pass gradients of a known range: parameters ``w_p`` enter the loss as
``sum(<x @ w_p, G_p>)`` with ``x = I``, so ``dL/dw_p = G_p`` exactly in FP32, and in FP16 the scaled
``S*G_p`` is rounded once, where the backward pass meets it (``n = 2``). The learning rate is zero:
every step sees the same gradients, so a run is the scaler searching for a scale that works, and the
verdict reads its trace (:func:`harness.judge.verdict._scaling`). The reference window of every record says
which scales would have worked.

``policy`` replaces the loss scaler of every strategy that has a dynamic one (``fp16-dynamic``,
``fp16-gradscaler``, ``fp16-pure``, ``fp16-master``) with a preset of :data:`harness.core.scaling.SCALER_PRESETS`
or the real ``torch.amp.GradScaler``, **time-compressed**: the presets' growth intervals of 1000-2000
steps become a few steps (each scenario's ``interval``) so that a CPU run of tens of steps shows what
a real run shows after thousands. GradScaler refuses to unscale FP16 gradients, so under
``policy=gradscaler`` the strategies with FP16 parameters keep their own scaler (the record's
``scaler_policy`` says so). Strategies without a dynamic scaler (none, static) run their own for
:data:`SHORT` steps: it does not adapt. See docs/scaling.md.
"""
from __future__ import annotations

import math
from dataclasses import replace

import torch

from harness.core.execution import Execution
from harness.core.scaling import SCALER_PRESETS, ScalerSpec
from harness.core.scenario import Expect, Output, Scenario, register
from harness.run.training import Trainer

from ._models import DYNAMIC, FP4, frozen, magnitudes

POLICIES = ["torch", "apex", "deepspeed", "megatron", "gradscaler"]
#: Steps for strategies whose scaler does not adapt, and for the reference.
SHORT = 8
SIZE = 16


def policy_spec(own: ScalerSpec, policy: str | None, params: str, interval: int) -> tuple[ScalerSpec, str]:
    """The scaler a strategy runs under ``policy`` with growth ``interval`` (time-compressed), and a note for
    the record."""
    if policy is None or not own.dynamic:
        return own, "the strategy's own scaler"
    if policy == "gradscaler":
        if params != "fp32":
            return replace(own, interval=interval), (f"the strategy's own (torch.amp.GradScaler refuses to unscale "
                                                     f"{params.upper()} gradients), time-compressed")
        return ScalerSpec("gradscaler", init=2.0**16, growth=2, backoff=0.5, interval=interval), \
            "torch.amp.GradScaler, time-compressed"
    if policy not in SCALER_PRESETS:
        raise ValueError(f"unknown scaler policy {policy!r}; policies: {', '.join(POLICIES)}")
    return replace(SCALER_PRESETS[policy], interval=interval), f"{policy} preset, time-compressed"


class KnownGrads(torch.nn.Module):
    """Parameters whose gradient is a given tensor: ``loss = sum_p <ex.matmul(x, w_p), G_p>`` (``G_p`` is a
    plain FP32 attribute, so neither the model's cast nor the batch's touches it)."""

    def __init__(self, ex: Execution, weights: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.ex, self.targets = ex, targets
        for name, w in weights.items():
            setattr(self, name, torch.nn.Parameter(w.clone()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sum((self.ex.matmul(x, getattr(self, n), key=n).float() * g).sum() for n, g in self.targets.items())


def drive(ex: Execution, inp: dict, p: dict, steps: int, interval: int = 0, burst: int = 0) -> Output:
    """Train ``steps`` steps (``SHORT`` for a scaler that does not adapt) under the policy's scaler with growth
    ``interval``. The first ``burst`` of them (scaled down for a short run) see inputs of 2^17, past FP16's
    max. The output holds the gradients of the last step (what the scaler ended the run with) and the
    weights (the learning rate is zero: they change only where an inf/NaN step reached them)."""
    spec, note = policy_spec(ex.strategy.scaler, p.get("policy"), ex.strategy.params, interval)
    if spec != ex.strategy.scaler:
        ex = Execution(replace(ex.strategy, scaler=spec), ex.device)
    if not spec.dynamic:
        burst, steps = (burst * SHORT) // steps, SHORT
    targets = {n[2:]: t for n, t in inp.items() if n.startswith("g_")}
    weights = {n: inp["w"][: t.shape[0], : t.shape[1]] for n, t in targets.items()}
    trainer = Trainer(ex, KnownGrads(ex, weights, targets), optimizer=frozen)
    eye = torch.eye(SIZE, device=ex.device)

    def batch(i: int) -> tuple:
        return (eye * 2.0**17,) if i < burst else (eye,)

    def loss_fn(mod: torch.nn.Module, b: tuple) -> torch.Tensor:
        return mod(b[0])

    res = trainer.train(loss_fn, batch, steps - 1)  # the trace is the trainer's: both calls add to it
    last = trainer.train(loss_fn, lambda i: batch(steps - 1), 1) if res.stopped is None else res
    grads = last.first_grads if last.stopped is None else {n: torch.full_like(t, math.nan) for n, t in targets.items()}
    final_w = torch.cat([w.reshape(-1) for w in trainer.parameters_fp32().values()])
    extra = {"scaler_policy": note, "steps_planned": steps, "burst_steps": burst,
             "nonfinite_params": int((~torch.isfinite(final_w)).sum())}
    if last.stopped:
        extra["stopped"] = last.stopped
    # the trace even without a scaler: the Trainer skips a non-finite step whatever the scaler, and says so
    return Output(value=final_w, grads=grads, trace=trainer.trace, extra=extra)


def _inputs(ranges: dict[str, tuple[float, float]]):
    def build(p: dict, g: torch.Generator) -> dict:
        out = {"w": torch.randn(SIZE, SIZE, generator=g)}
        out.update({f"g_{n}": magnitudes(SIZE * SIZE, lo, hi, g).reshape(SIZE, SIZE) for n, (lo, hi) in ranges.items()})
        return out
    return build


def _is(policy: str | tuple[str, ...]):
    names = (policy,) if isinstance(policy, str) else policy
    return lambda p: p.get("policy") in names


# -- at the cap: gradients need more than apex's 2^24 --------------------------------------------
CAP_STEPS, CAP_INTERVAL = 40, 2
register(Scenario(
    name="scaler_cap_underflow",
    family="tiny_gradient",
    description=("Gradients log-uniform in 2^-54..2^-46: FP16 keeps them only for loss scales S > ~2^29. A policy "
                 "capped at 2^24 (apex) sits at its cap with most of them flushed (scale_exhausted, max); "
                 "uncapped policies grow past 2^29 (growth every 2 steps, time-compressed); Megatron starts at 2^32."),
    grid={"policy": POLICIES},
    quick={"policy": ["apex", "torch"]},
    inputs=_inputs({"w": (-54, -46)}),
    run=lambda ex, inp, p: drive(ex, inp, p, CAP_STEPS, CAP_INTERVAL),
    n=lambda p: 2,
    expect=(
        Expect(DYNAMIC, "scale_exhausted", "max: at apex's cap 2^24, S*|g| < 2^-25 for |g| < 2^-49 (5 of 8 binades)",
               when=_is("apex")),
        Expect(("fp16", "fp16-static"), "underflow", "without a scale (or at 2^10) every |g| < 2^-35 flushes to zero"),
        Expect(FP4, "underflow", "E2M1 elements keep 3 binades below their block's scale; these gradients spread over "
               "8 binades per block, so the small ones flush (measured 36-38%)"),
    ),
))


# -- at the floor: gradients overflow FP16 even at S = 1 -----------------------------------------
FLOOR_STEPS, FLOOR_INTERVAL = 64, 8
register(Scenario(
    name="scaler_floor_overflow",
    family="exploding_loss",
    description=("Gradients log-uniform in 2^16..2^18 (a summed loss over a large batch): past 65504 even at S = 1. "
                 "Policies floored at 1 exhaust the scale downwards: DeepSpeed raises there, Megatron keeps skipping "
                 "every step (scale_exhausted, min); policies without a floor back off below 1 and train."),
    grid={"policy": POLICIES},
    quick={"policy": ["deepspeed", "megatron"]},
    inputs=_inputs({"w": (16, 18)}),
    run=lambda ex, inp, p: drive(ex, inp, p, FLOOR_STEPS, FLOOR_INTERVAL),
    n=lambda p: 2,
    expect=(
        Expect(DYNAMIC, "scale_exhausted", "min: |g| >= 2^16 overflows at the floor S = 1; DeepSpeed raises there",
               when=_is("deepspeed")),
        Expect(DYNAMIC, "scale_exhausted", "min: |g| >= 2^16 overflows at the floor S = 1; Megatron stalls there",
               when=_is("megatron")),
        Expect(("fp16-pure",), "overflow", "the scaler finds S < 1, but the unscaled |g| >= 2^16 does not fit the "
                                           "FP16 .grad of pure FP16 weights: inf, and the weights turn NaN",
               when=_is(("torch", "apex", "gradscaler"))),
        Expect(("fp16-static",), "stalled", "|g| > 65504 at S = 2^10: every step overflows and is skipped"),
        Expect(("fp16",), "overflow", "|g| > 65504 in FP16 and no scaler checks for it: the inf gradients are "
                                      "applied and the weights turn inf/NaN"),
    ),
))


# -- collapse: a burst of overflowing batches drives the scale to zero ---------------------------
BURST, AFTER, BURST_INTERVAL = 150, 32, 8
register(Scenario(
    name="scaler_collapse_burst",
    family="exploding_loss",
    description=(f"{BURST} steps whose inputs (2^17) overflow FP16 in the forward pass, then {AFTER} healthy ones. "
                 "A scaler without a floor halves S every step: below 2^-128 1/S is inf in FP32, so once the burst "
                 "ends every step still overflows and is skipped, silently, for ever (GradScaler's FP32 scale "
                 "reaches 0). DeepSpeed raises at its floor 1; Megatron waits there and recovers (stalled)."),
    grid={"policy": POLICIES},
    quick={"policy": ["gradscaler", "megatron"]},
    inputs=_inputs({"w": (-20, -8)}),
    run=lambda ex, inp, p: drive(ex, inp, p, BURST + AFTER, BURST_INTERVAL, burst=BURST),
    n=lambda p: 2,
    expect=(
        Expect(FP4, "underflow", "E2M1 elements keep 3 binades below their block's scale: the burst's spread "
               "gradients flush within their blocks (measured 55-58%)"),
        Expect(DYNAMIC, "scale_exhausted", "min: S halves every burst step to below 2^-128, where 1/S = inf in FP32",
               when=_is(("torch", "apex", "gradscaler"))),
        Expect(DYNAMIC, "scale_exhausted", "min: the burst overflows at the floor S = 1; DeepSpeed raises there",
               when=_is("deepspeed")),
        Expect(DYNAMIC, "stalled", "the floor S = 1 holds through the burst: skipped steps, then recovery",
               when=_is("megatron")),
        Expect(("fp16-static",), "stalled", "a scaler that does not adapt skips every burst step (6 of 8)"),
        Expect(("fp16",), "overflow", "without a scaler nothing checks the burst's inf gradients: they are applied"),
    ),
))


# -- no single scale: the gradients' range is wider than FP16's ----------------------------------
WINDOW_STEPS = 16
register(Scenario(
    name="scale_window_empty",
    family="tiny_gradient",
    description=("Two tensors: a's gradients in 2^-46..2^-40 need S > ~2^21, b's in 2^1..2^5 need S < ~2^11. No "
                 "single loss scale works (the record's window says so with both numbers): any FP16 scaler "
                 "settles where b fits and flushes a. BF16 has the range; FP8's per-tensor scales treat a and b "
                 "apart."),
    grid={},
    inputs=_inputs({"a": (-46, -40), "b": (1, 5)}),
    run=lambda ex, inp, p: drive(ex, inp, p, WINDOW_STEPS),  # no policy: every strategy's own scaler
    n=lambda p: 2,
    expect=(
        Expect(FP4, "underflow", "E2M1 elements keep 3 binades below their block's scale: a's gradients flush in "
               "the blocks b's set (measured 9.4-10%)"),
        Expect(("fp16", "fp16-*"), "underflow", "every scale b survives (S < 2^11) flushes a (|g| < 2^-40)"),
    ),
))
