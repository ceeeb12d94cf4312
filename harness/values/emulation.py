"""GEMMs of formats the CPU lacks, emulated with autograd: TF32 rounds every GEMM operand (forward
and backward) to 10 fraction bits and accumulates in FP32, as Tensor Cores do on TF32 inputs."""
from __future__ import annotations

import torch

from .formats import quantize

__all__ = ["tf32_matmul"]


def _q(x: torch.Tensor) -> torch.Tensor:
    return quantize(x, "tf32")


class _TF32MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b):  # type: ignore[override]
        qa, qb = _q(a), _q(b)
        ctx.save_for_backward(qa, qb)
        return qa @ qb

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        qa, qb = ctx.saved_tensors
        qg = _q(g)
        return qg @ qb.transpose(-1, -2), qa.transpose(-1, -2) @ qg


def tf32_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with TF32 operands and FP32 accumulation (differentiable)."""
    return _TF32MatMul.apply(a.float(), b.float())
