"""One strategy's training step on an MLP block, timed: the speed half of the per-recipe trade-off table.

The block is what FP8 recipes are for: a pre-LN residual MLP, ``x + W2 gelu(W1 ln(x))`` with Linears d -> 4d
-> d (on a GPU d = 4096 and 8192 tokens a step: GEMMs large enough for FP8 to pay off), its Linears routed
through the strategy's GEMMs (:func:`harness.core.execution.route_linears`: the harness's own recipes, or the
library's conversion for ``lib=`` strategies), trained by the harness's
:class:`~harness.run.training.Trainer` (autocast or cast, loss scaling where the strategy has it, AdamW).
A step is timed from its start to the device being idle again (CUDA events on a GPU, the wall clock on the
CPU); the median of ``iters`` steps after ``warm`` untimed ones is reported.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from harness.core.execution import Execution, route_linears
from harness.core.strategy import Strategy
from harness.run.training import Trainer

__all__ = ["Sizes", "GPU_SIZES", "CPU_SIZES", "MLPBlock", "time_step"]


@dataclass(frozen=True)
class Sizes:
    d: int = 4096
    tokens: int = 8192
    iters: int = 20
    warm: int = 3


GPU_SIZES = Sizes()
#: A smoke test of the code on the CPU (the FP8 recipes are emulated there: their times mean nothing).
CPU_SIZES = Sizes(d=64, tokens=128, iters=3, warm=1)


class MLPBlock(torch.nn.Module):
    """``x + fc2(gelu(fc1(ln(x))))`` with fc1: d -> 4d and fc2: 4d -> d."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.ln(x))))


def _loss(model: torch.nn.Module, batch: tuple) -> torch.Tensor:
    return model(batch[0]).float().square().mean()


def time_step(strategy: Strategy, device: torch.device, sizes: Sizes = GPU_SIZES) -> dict[str, Any]:
    """``{"strategy", "spec", "device", "ms" (median step time) or "unsupported" (why), "notes", sizes}``."""
    ex = Execution(strategy, device)
    row: dict[str, Any] = {"strategy": strategy.label, "spec": str(strategy), "device": str(device),
                           "d": sizes.d, "tokens": sizes.tokens, "iters": sizes.iters}
    if not ex.supported:
        return {**row, "unsupported": ex.unsupported_reason}
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = route_linears(MLPBlock(sizes.d).to(device, ex.param_dtype), ex)
    trainer = Trainer(ex, model, optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-5))
    x = torch.randn(sizes.tokens, sizes.d, generator=gen).to(device)
    for _ in range(sizes.warm):
        trainer.step(_loss, (x,))
    times = [_timed(lambda: trainer.step(_loss, (x,)), device) for _ in range(sizes.iters)]
    row.update(ms=statistics.median(times), notes=ex.emulation_notes())
    del trainer, model, x
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def _timed(fn, device: torch.device) -> float:
    """Milliseconds from the call to the device being idle (the Trainer's step synchronizes for its overflow
    check; the events also catch work queued after it)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3
