"""``training`` family: small models trained for a number of steps under each strategy, against the
FP32 trajectory with the same initial weights and the same batches.

Each case is the run ``check-model`` makes of a user's model (:func:`harness.models.user_model.train_trajectory`):
a deep copy of the model trained through :class:`harness.run.training.Trainer` (autocast or cast, loss
scaling with our scaler or the real ``torch.amp.GradScaler``, FP32 master weights, skipped steps
retried on the same batch), every ``nn.Linear`` routed through the strategy's GEMM (FP8, emulated
TF32). What is judged: the net parameter update (its ``rel_err`` is the parameter drift relative to
how far FP32 moved), the share of (update, weight) pairs the weights absorbed (``w + dw == w``) beyond
FP32's own, the first update's gradients, the loss curve (``loss_divergence``, ``final_loss_ratio``)
and the scaler's trace.

The bound: ``n = steps * (2*depth + 1)`` roundings chained over the run (``depth`` = modules holding
parameters), so the probabilistic model of :mod:`harness.judge.tolerance` allows ``lambda*sqrt(n)*u``:
error growing like a random walk over the steps. Each scenario also gives its run as ``perturbed``: the
reference runs it from weights one ulp apart to measure FP32's own sensitivity (:mod:`harness.judge.sensitivity`),
which floors each error metric's bound. See docs/check_model.md.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from harness.core.execution import Execution
from harness.core.scenario import Expect, Output, Scenario, Tolerance, register
from harness.models.user_model import CHAIN_REASON, ModelSpec, chain_length, depth, train_trajectory

TOLERANCE = Tolerance(reason=CHAIN_REASON)


# -- models ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    def __init__(self, d_in: int = 32, width: int = 64, d_out: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self, channels: int = 8, classes: int = 4) -> None:
        super().__init__()
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1, stride=2), nn.BatchNorm2d(2 * c), nn.ReLU(),
        )
        self.head = nn.Linear(2 * c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Attention(nn.Module):
    """Causal multi-head self-attention with ``nn.Linear`` projections (so FP8/TF32 routing applies)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)  # a key bias shifts every score of a row alike: softmax
        self.out = nn.Linear(d, d)                   # ignores it, its true gradient is 0 and Adam's update noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        att = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
        return self.out((att.to(v.dtype) @ v).transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(d), Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    def __init__(self, vocab: int = 16, d: int = 32, heads: int = 4, layers: int = 2, seq: int = 16) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos[: idx.shape[1]]
        return self.head(self.ln(self.blocks(x)))


# -- helpers ---------------------------------------------------------------------------------------
def _seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """A model whose initial weights are drawn from ``seed`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _seed(g: torch.Generator) -> int:
    return int(torch.randint(0, 2**62, (), generator=g))


def _run(build: Callable[[], nn.Module], loss: Callable, data: Callable[[dict, int], tuple],
         optimizer: Callable[[dict], Callable]) -> Callable[..., Output]:
    """The case's training run; ``perturb=k`` starts it from weights one ulp away (the reference's FP32
    sensitivity runs, :mod:`harness.judge.sensitivity`)."""
    def run(ex: Execution, inp: dict, p: dict, perturb: int | None = None) -> Output:
        spec = ModelSpec("model", _seeded(build, inp["seed"]), lambda i: data(inp, i), loss, optimizer(p))
        return train_trajectory(ex, spec, p["steps"], perturb=perturb)
    return run


DEPTH = {"mlp": depth(MLP()), "cnn": depth(SmallCNN()), "transformer": depth(TinyTransformer())}


# -- MLP: teacher-student regression, plain SGD ------------------------------------------------------
def _mlp_inputs(p: dict, g: torch.Generator) -> dict:
    teacher = _seeded(MLP, _seed(g))
    x = torch.randn(p["steps"], 32, 32, generator=g)
    with torch.no_grad():
        y = teacher(x)
    y = (y - y.mean()) / y.std() + 0.1 * torch.randn(y.shape, generator=g)
    return {"x": x, "y": y, "seed": _seed(g)}


_MLP_RUN = _run(MLP, lambda m, b: F.mse_loss(m(b[0]), b[1]), lambda inp, i: (inp["x"][i], inp["y"][i]),
                lambda p: (lambda ps: torch.optim.SGD(ps, lr=p["lr"])))

register(Scenario(
    name="train_mlp",
    family="training",
    description=("A 3-layer GELU MLP regressing a teacher network (MSE, plain SGD at learning rate `lr`). "
                 "Strategies that keep FP32 weights (autocast, or FP32 master copies) follow FP32's "
                 "trajectory; weights stored in FP16/BF16 lose every update lr*g smaller than half a unit "
                 "in the last place of w (w + dw == w below |w|*2^-12 in FP16, |w|*2^-9 in BF16)."),
    grid={"steps": [128], "lr": [0.01, 0.1]},
    quick={"steps": [16], "lr": [0.01]},
    inputs=_mlp_inputs,
    run=_MLP_RUN,
    perturbed=_MLP_RUN,
    n=lambda p: chain_length(DEPTH["mlp"], p["steps"]),
    tolerance=TOLERANCE,
    expect=(Expect(("bf16-pure",), "diverged", "BF16 weights absorb most updates lr*g: they are below half an ulp "
                   "(|w|*2^-9)"),
            Expect(("bf16-sr",), "diverged", "stochastic rounding keeps updates below half an ulp in expectation, "
                   "but each one rounds to 0 or a whole ulp of |w| (2^-8 |w|): over 16 steps the net update of one "
                   "run is that noise (measured rel_err 0.38; Kahan, which keeps the remainder, passes)",
                   when=lambda p: p["steps"] <= 16),
            Expect(("fp16-pure",), "underflow", "in the first updates many weights' net change is below FP16's "
                   "smallest normal, and the absorbed ones carry more than 1% of FP32's update",
                   when=lambda p: p["steps"] <= 16),
            Expect(("fp16-pure",), "diverged", "FP16 weights absorb updates below |w|*2^-12",
                   when=lambda p: p["steps"] > 16)),
))


# -- CNN with BatchNorm: noisy class patterns, SGD with momentum --------------------------------------
def _cnn_inputs(p: dict, g: torch.Generator) -> dict:
    patterns = torch.randn(4, 1, 8, 8, generator=g)
    labels = torch.randint(0, 4, (p["steps"], 32), generator=g)
    x = patterns[labels] + torch.randn(p["steps"], 32, 1, 8, 8, generator=g)
    return {"x": x, "labels": labels, "seed": _seed(g)}


_CNN_RUN = _run(SmallCNN, lambda m, b: F.cross_entropy(m(b[0]), b[1]),
                lambda inp, i: (inp["x"][i], inp["labels"][i]),
                lambda p: (lambda ps: torch.optim.SGD(ps, lr=0.02, momentum=0.9)))

register(Scenario(
    name="train_cnn",
    family="training",
    description=("Two conv + BatchNorm + ReLU blocks classifying noisy 8x8 patterns (cross-entropy, SGD with "
                 "momentum 0.9). BatchNorm normalises each batch with statistics of the low-precision "
                 "activations; FP32 weights (autocast or master copies) keep the trajectory within the "
                 "rounding model's bound. Stored in FP16 or BF16, the weights absorb the small updates."),
    grid={"steps": [128]},
    quick={"steps": [16]},
    inputs=_cnn_inputs,
    run=_CNN_RUN,
    perturbed=_CNN_RUN,
    n=lambda p: chain_length(DEPTH["cnn"], p["steps"]),
    tolerance=TOLERANCE,
    expect=(Expect(("bf16-pure",), "diverged", "BF16 weights absorb the SGD steps below half an ulp (|w|*2^-9)"),
            Expect(("fp16-pure",), "diverged", "FP16 weights absorb the SGD steps below |w|*2^-12")),
))


# -- transformer: next token of copy sequences, cross-entropy, AdamW --------------------------------
def _tf_inputs(p: dict, g: torch.Generator) -> dict:
    half = torch.randint(0, 16, (p["steps"], 8, 8), generator=g)
    return {"tokens": torch.cat([half, half], dim=-1), "seed": _seed(g)}


def _next_token_loss(m: nn.Module, b: tuple) -> torch.Tensor:
    (tokens,) = b
    logits = m(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


_TF_RUN = _run(TinyTransformer, _next_token_loss, lambda inp, i: (inp["tokens"][i],),
               lambda p: (lambda ps: torch.optim.AdamW(ps, lr=3e-3)))

register(Scenario(
    name="train_transformer",
    family="training",
    description=("A 2-block pre-norm transformer (causal attention, layer norm, GELU MLP) learning to "
                 "predict the second half of copy sequences (cross-entropy over 16 tokens, AdamW)."),
    grid={"steps": [128]},
    quick={"steps": [16]},
    inputs=_tf_inputs,
    run=_TF_RUN,
    perturbed=_TF_RUN,
    n=lambda p: chain_length(DEPTH["transformer"], p["steps"]),
    tolerance=TOLERANCE,
    expect=(
        Expect(("bf16-pure",), "diverged", "BF16 weights absorb AdamW steps (~lr) below half an ulp (|w|*2^-9)"),
        Expect(("mxfp4",), "diverged", "E2M1's u = 2^-2 caps the bound at 1/2, and 16 AdamW steps through E2M1 GEMMs "
               "reach it (measured rel_err 0.508)", when=lambda p: p["steps"] <= 16),
        # AdamW's state in FP16: eps = 1e-8 rounds to 0, so rows of the embedding whose gradient is 0
        # get 0/0 = NaN in the first update; every later attempt overflows and the scaler halves S:
        # after 2*steps - 1 skips S = 2^(17 - 2*steps), below FP32's normal range past 71 steps.
        Expect(("fp16-pure",), "stalled", "AdamW writes NaN weights (eps 1e-8 is 0 in FP16): every later step "
               "skips", when=lambda p: 17 - 2 * p["steps"] >= -126),
        Expect(("fp16-pure",), "scale_exhausted", "AdamW writes NaN weights (eps 1e-8 is 0 in FP16): the scaler "
               "halves S on every skip until it leaves FP32's range", when=lambda p: 17 - 2 * p["steps"] < -126),
    ),
))
