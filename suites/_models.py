"""Small building blocks shared by suites (not a suite: discovery skips modules starting with '_').

Kernels here compute in the dtype of the tensors they are given, so a scenario that hands them
``ex.act(x)`` gets the compute format's roundings, and a test can call them on FP16/BF16 tensors
directly to prove a mechanism with exact numbers.
"""
from __future__ import annotations

import torch

from harness.core.execution import Execution
from harness.core.scenario import Output
from harness.run.training import TrainResult
from harness.judge.window import budget_count

__all__ = ["DYNAMIC", "wide", "Probe", "Bias", "DeepNarrow", "magnitudes", "training_output", "blocked_sum",
           "blocked_prefix_sums",
           "one_pass_layernorm", "rms_norm", "ema", "realistic_gradients", "REALISTIC_SHARES"]


#: The presets whose loss scale starts at 2^16 and halves on every overflow (the torch policy: our dynamic
#: scaler or torch.amp.GradScaler).
DYNAMIC = ("fp16-dynamic", "fp16-gradscaler", "fp16-pure", "fp16-master")
#: The block-scaled E2M1 presets: elements keep 3 binades below their block's scale.
FP4 = ("mxfp4", "nvfp4")


def wide(x: torch.Tensor) -> torch.Tensor:
    """x in FP32, or in FP64 when it already is: where a computation is meant to leave the compute format
    (a loss, a batch statistic), the FP64 check run must not be narrowed to FP32."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# -- models ------------------------------------------------------------------------------------
class Probe(torch.nn.Module):
    """y = x @ w through the strategy's GEMM; the weight's gradient is x^T (dL/dy)."""

    def __init__(self, w: torch.Tensor, ex: Execution) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.ex = ex

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ex.matmul(x, self.w, key="probe")


class Bias(torch.nn.Module):
    """y = x + b: the bias's gradient is dL/dy summed over the batch, the activation gradient itself
    when the batch is one row, so a gradient distribution reaches the comparison unmixed."""

    def __init__(self, b: torch.Tensor) -> None:
        super().__init__()
        self.b = torch.nn.Parameter(b.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b.to(x.dtype)


class DeepNarrow(torch.nn.Module):
    """``len(weights)`` sigmoid layers, h <- sigmoid(h @ W_l^T), GEMMs through the strategy.

    sigmoid' <= 1/4, so with weights of standard deviation 1/sqrt(width) each layer multiplies the
    backward signal by about 1/4 while the forward activations stay near 1/2: the activation gradient
    reaching layer l, and with it the weight gradient of layer l, is ~4^-(depth-l) times the loss
    gradient. (tanh or a linear chain with a small init shrinks the forward activations by the same
    factor as the backward signal, so every layer's weight gradient would have the same size.)"""

    def __init__(self, weights: torch.Tensor, ex: Execution) -> None:
        super().__init__()
        self.layers = torch.nn.ParameterList([torch.nn.Parameter(w.clone()) for w in weights])
        self.ex = ex

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i, w in enumerate(self.layers):
            h = torch.sigmoid(self.ex.linear(h, w, key=f"layer{i}"))
        return h


def dot_loss(weight: float = 1.0):
    """Loss ``weight * c * sum(y * t)`` on a batch ``(x, t[, c])`` (FP32, FP64 in the check run): its
    activation gradient is ``weight * c * t``, the handle scenarios use to set gradient magnitudes."""
    def loss_fn(mod: torch.nn.Module, batch: tuple) -> torch.Tensor:
        x, t, *c = batch
        return (wide(mod(x)) * wide(t)).sum() * (weight * (c[0] if c else 1.0))
    return loss_fn


def frozen(params: list) -> torch.optim.Optimizer:
    """SGD with lr 0: every step is taken at the same point, so each step's gradients are comparable."""
    return torch.optim.SGD(params, lr=0.0)


def training_output(ex: Execution, res: TrainResult, value: torch.Tensor | None = None, **extra) -> Output:
    """The Output of a training scenario: first applied gradients, loss curve, and the scaler's trace
    when the strategy scales the loss (a run without a scaler has nothing to record)."""
    trace = res.trace if ex.strategy.scaler.kind != "none" else None
    if res.stopped:
        extra["stopped"] = res.stopped
    return Output(value=value, grads=res.first_grads, losses=res.losses, trace=trace, extra=extra)


# -- data ----------------------------------------------------------------------------------------
def magnitudes(n: int, log2_lo: float, log2_hi: float, g: torch.Generator) -> torch.Tensor:
    """n values with random signs, log-uniform in [2^lo, 2^hi): exact powers spread over binades."""
    e = log2_lo + (log2_hi - log2_lo) * torch.rand(n, generator=g)
    s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return s * torch.exp2(e)


#: Shares of a realistic activation-gradient tensor, after Micikevicius et al. 2018 ("Mixed Precision
#: Training", the Multibox SSD histogram): most values exactly zero, about a third of all values
#: below FP16's smallest subnormal 2^-24, a few percent inside FP16's range. (share, log2 lo, log2 hi)
REALISTIC_SHARES = {"zero": (0.67, None, None), "below": (0.31, -40.0, -24.0), "representable": (0.02, -24.0, -8.0)}


def realistic_gradients(n: int, g: torch.Generator) -> torch.Tensor:
    """n gradient values with exactly the :data:`REALISTIC_SHARES` (counts rounded down, the rest zero),
    non-zero ones log-uniform in their band with random signs, at random positions."""
    parts = []
    for share, lo, hi in REALISTIC_SHARES.values():
        if lo is not None:
            parts.append(magnitudes(budget_count(share, n), lo, hi, g))  # exact: 0.31*n rounds in binary
    nonzero = torch.cat(parts)
    out = torch.zeros(n)
    out[torch.randperm(n, generator=g)[: nonzero.numel()]] = nonzero
    return out


# -- kernels that compute in their input's dtype -----------------------------------------------------
def blocked_sum(x: torch.Tensor, lanes: int) -> torch.Tensor:
    """``lanes`` running sums kept in x's dtype, as the threads of a reduction kernel with a
    low-precision accumulator: lane j adds x[j], x[j+lanes], ... one rounding per addition."""
    rows = x.reshape(-1, lanes)
    return blocked_prefix_sums(x, lanes, (rows.shape[0],))[rows.shape[0]]


def blocked_prefix_sums(x: torch.Tensor, lanes: int, marks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """:func:`blocked_sum`'s running sums after the first m rows of ``lanes``, for each m in ``marks``
    (1 <= m <= the number of rows), taken in one pass."""
    rows = x.reshape(-1, lanes)
    acc = rows[0].clone()
    snaps: dict[int, torch.Tensor] = {}
    for i in range(1, rows.shape[0] + 1):
        if i > 1:
            acc.add_(rows[i - 1])
        if i in marks:
            snaps[i] = acc.clone()
    return {m: snaps[m] for m in marks}


def one_pass_layernorm(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Layer norm over the last dim with the one-pass variance E[x^2] - E[x]^2, every step in x's dtype
    (the variance is clamped at 0, as implementations do). The subtraction cancels: each moment is
    rounded at magnitude mean^2, so the variance keeps about log2(var / (mean^2 u)) bits."""
    m = x.mean(-1, keepdim=True)
    m2 = (x * x).mean(-1, keepdim=True)
    var = (m2 - m * m).clamp_min(0)
    return (x - m) * torch.rsqrt(var + eps)


def rms_norm(x: torch.Tensor, stat_dtype: torch.dtype, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS norm y = x / sqrt(mean(x^2) + eps) with the statistic computed in ``stat_dtype`` (x's own dtype
    for a kernel without upcast; FP32 as in LLaMA's reference RMSNorm); y is returned in x's dtype.
    Returns (y, rms)."""
    xs = x.to(torch.promote_types(x.dtype, stat_dtype))
    ms = (xs * xs).mean(-1, keepdim=True)
    y = (xs * torch.rsqrt(ms + eps)).to(x.dtype)
    return y, ms.sqrt()


def ema(state: torch.Tensor, batches: torch.Tensor, momentum: float) -> torch.Tensor:
    """Running average over the rows of ``batches``: per step ``(1-m)*state + m*batch`` computed in FP32
    and stored in the state's dtype, as torch's batch-norm kernels update their running buffers (one
    rounding per step). An increment below half an ulp of the state is lost: the average stalls up to
    ``ulp(state)/(2m)`` short of its target."""
    dtype, keep = state.dtype, 1.0 - momentum
    for mb in (momentum * wide(batches)).unbind(0):
        state = torch.add(mb, wide(state), alpha=keep).to(dtype)
    return state

