"""FP8 GEMMs with per-tensor scaling: E4M3 for activations and weights, E5M2 for gradients.

On a GPU with FP8 Tensor Cores the product runs through ``torch._scaled_mm``; elsewhere it is emulated
by casting to the FP8 dtype and multiplying in FP32 (the record says which). Scales are
``fmt.max / amax``: ``tensorwise`` takes amax from the tensor itself, ``delayed`` from a history of
previous amaxes (the current one joins the history after use, as in Transformer Engine).
"""
from __future__ import annotations

from collections import deque
from typing import Callable

import torch

from .formats import FORMATS

__all__ = ["AmaxHistory", "fp8_matmul", "quantize_fp8"]

E4M3, E5M2 = FORMATS["fp8_e4m3"], FORMATS["fp8_e5m2"]


class AmaxHistory:
    """Per-tensor amax histories for delayed scaling, keyed by call site and role."""

    def __init__(self, length: int = 16) -> None:
        self.length = length
        self._h: dict[str, deque] = {}

    def scale(self, key: str, amax: float, fmax: float, delayed: bool) -> float:
        hist = self._h.setdefault(key, deque(maxlen=self.length))
        ref = max(hist) if (delayed and hist) else amax
        hist.append(amax)
        return fmax / ref if ref > 0 else 1.0


def quantize_fp8(x: torch.Tensor, fmt, scale: float) -> torch.Tensor:
    """Scale then cast to FP8. Finite values past the format's max saturate to it, as the scaled GEMMs
    do; inf and NaN stay non-finite (NaN in E4M3, which has no inf), so an overflow upstream is never
    hidden: torch's cast alone saturates inf to 448 in E4M3."""
    y = x.float() * scale
    keep = y if not fmt.finite_only else torch.full_like(y, float("nan"))
    return torch.where(torch.isfinite(y), y.clamp(-fmt.max, fmt.max), keep).to(fmt.dtype)


def _mm(x8: torch.Tensor, y8: torch.Tensor, sx: float, sy: float, out_dtype: torch.dtype,
        native: bool) -> torch.Tensor:
    """(x8 / sx) @ (y8 / sy) with FP32 accumulation."""
    if native and x8.shape[0] % 16 == 0 and x8.shape[1] % 16 == 0 and y8.shape[1] % 16 == 0:
        inv_x = torch.tensor(1.0 / sx, dtype=torch.float32, device=x8.device)  # _scaled_mm: FP32 scales
        inv_y = torch.tensor(1.0 / sy, dtype=torch.float32, device=x8.device)
        yt = y8.t().contiguous().t()  # column-major second operand
        out = torch._scaled_mm(x8.contiguous(), yt, scale_a=inv_x, scale_b=inv_y, out_dtype=out_dtype)
        return out[0] if isinstance(out, tuple) else out
    return ((x8.float() @ y8.float()) / (sx * sy)).to(out_dtype)


class _FP8MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, key, history, delayed, native, out_dtype):  # type: ignore[override]
        with torch.autocast(a.device.type, enabled=False):
            sa = history.scale(f"{key}.a", float(a.detach().abs().max()), E4M3.max, delayed)
            sb = history.scale(f"{key}.b", float(b.detach().abs().max()), E4M3.max, delayed)
            qa, qb = quantize_fp8(a, E4M3, sa), quantize_fp8(b, E4M3, sb)
            ctx.save_for_backward(qa, qb)
            ctx.meta = (sa, sb, key, history, delayed, native, a.dtype, b.dtype)
            return _mm(qa, qb, sa, sb, out_dtype, native)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        qa, qb = ctx.saved_tensors
        sa, sb, key, history, delayed, native, da, db = ctx.meta
        with torch.autocast(grad.device.type, enabled=False):
            sg = history.scale(f"{key}.grad", float(grad.detach().abs().max()), E5M2.max, delayed)
            qg = quantize_fp8(grad, E5M2, sg)
            # E5M2 x E4M3 is a supported _scaled_mm pairing; keep the E5M2 operand first.
            ga = _mm(qg, qb.t(), sg, sb, torch.float32, native).to(da)
            gb = _mm(qg.t().contiguous(), qa, sg, sa, torch.float32, native).t().to(db)
        return ga, gb, None, None, None, None, None


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, key: str, history: AmaxHistory, delayed: bool,
               native: bool, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """2-D FP8 GEMM a @ b with autograd; leading batch dims of ``a`` are flattened."""
    lead = a.shape[:-1]
    out = _FP8MatMul.apply(a.reshape(-1, a.shape[-1]), b, key, history, delayed, native, out_dtype)
    return out.reshape(*lead, b.shape[-1])


MatMul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
