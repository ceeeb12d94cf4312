"""GEMM-shaped operations other than a plain matrix product (convolutions, einsum), emulated in TF32 or
FP8 through one autograd function.

Each is bilinear in its two operands (``f(x, w)``: a convolution's input and weight, an einsum's two
operands), so the emulation is the same for all: round both operands as the recipe says, run ``f`` in
FP32 (the products of two FP8 or two TF32 values are exact in FP32, the sums accumulate in FP32, as on
Tensor Cores), undo the scales; in the backward pass round the incoming gradient (E5M2 for FP8) and take
``f``'s two adjoints on the rounded operands, again in FP32. That is exactly what
:func:`harness.values.fp8.fp8_matmul` and :func:`harness.values.emulation.tf32_matmul` do for a matmul.

>>> import torch, torch.nn.functional as F
>>> x, w = torch.randn(1, 1, 4, 4), torch.randn(2, 1, 3, 3)
>>> y = bilinear(lambda a, b: F.conv2d(a, b), x, w, TF32)
>>> y.dtype
torch.float32
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .formats import quantize
from .fp8 import E4M3, E5M2, AmaxHistory, quantize_fp8

__all__ = ["Rounding", "TF32", "fp8_rounding", "bilinear"]

Bilinear = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Rounding:
    """How the operands and the gradient of an emulated GEMM are rounded: to TF32 (no scale), or to FP8
    with per-tensor scales from an amax history (``delayed``: the history's largest previous amax)."""

    kind: str  # "tf32" or "fp8"
    history: AmaxHistory | None = None
    key: str = ""
    delayed: bool = False

    def operand(self, x: torch.Tensor, role: str, fmt=E4M3) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x rounded, as FP32; its scale, or None where there is none)."""
        if self.kind == "tf32":
            return quantize(x.float(), "tf32"), None
        assert self.history is not None
        s = self.history.scale(f"{self.key}.{role}", torch.linalg.vector_norm(x.detach(), float("inf")),
                               fmt.max, self.delayed)
        return quantize_fp8(x, fmt, s).float(), s


TF32 = Rounding("tf32")


def fp8_rounding(history: AmaxHistory, key: str, delayed: bool) -> Rounding:
    """FP8 rounding of the GEMM at call site ``key``: E4M3 operands, E5M2 gradient, per-tensor scales."""
    return Rounding("fp8", history, key, delayed)


def _unscale(y: torch.Tensor, sa: torch.Tensor | None, sb: torch.Tensor | None) -> torch.Tensor:
    return y if sa is None or sb is None else y / (sa * sb)


class _Bilinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, f, rounding, out_dtype):  # type: ignore[override]
        with torch.autocast(a.device.type, enabled=False):
            qa, sa = rounding.operand(a, "a")
            qb, sb = rounding.operand(b, "b")
            # the adjoints of f are taken by autograd on the rounded operands: kept, not recomputed
            with torch.enable_grad():
                ra, rb = qa.detach().requires_grad_(), qb.detach().requires_grad_()
                y = f(ra, rb)
            ctx.inner = (y, ra, rb, sa, sb)
            ctx.meta = (rounding, a.dtype, b.dtype)
            return _unscale(y.detach(), sa, sb).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        y, ra, rb, sa, sb = ctx.inner
        rounding, da, db = ctx.meta
        with torch.autocast(grad.device.type, enabled=False):
            qg, sg = rounding.operand(grad, "grad", E5M2)
            ga, gb = torch.autograd.grad(y, (ra, rb), qg)
            ctx.inner = None
        return _unscale(ga, sg, sb).to(da), _unscale(gb, sg, sa).to(db), None, None, None


def bilinear(f: Bilinear, a: torch.Tensor, b: torch.Tensor, rounding: Rounding,
             out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``f(a, b)`` with both operands (and, backward, the gradient) rounded as ``rounding`` says and every
    product accumulated in FP32; the result in ``out_dtype`` (differentiable in ``a`` and ``b``)."""
    return _Bilinear.apply(a, b, f, rounding, out_dtype)
