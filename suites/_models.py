"""Small building blocks shared by suites (not a suite: discovery skips modules starting with '_')."""
from __future__ import annotations

import torch

from harness.execution import Execution


class Probe(torch.nn.Module):
    """y = x @ w through the strategy's GEMM; the weight's gradient is x^T (dL/dy)."""

    def __init__(self, w: torch.Tensor, ex: Execution) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w.clone())
        self.ex = ex

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ex.matmul(x, self.w, key="probe")


def magnitudes(n: int, log2_lo: float, log2_hi: float, g: torch.Generator) -> torch.Tensor:
    """n values with random signs, log-uniform in [2^lo, 2^hi): exact powers spread over binades."""
    e = log2_lo + (log2_hi - log2_lo) * torch.rand(n, generator=g)
    s = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return s * torch.exp2(e)
