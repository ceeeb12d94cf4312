"""FP8 GEMMs with per-tensor scaling: E4M3 for activations and weights, E5M2 for gradients.

On a GPU with FP8 Tensor Cores the product runs through ``torch._scaled_mm``; elsewhere it is emulated
by casting to the FP8 dtype and multiplying in FP32 (the record says which). Scales are
``fmt.max / amax``: ``tensorwise`` takes amax from the tensor itself, ``delayed`` from a history of
previous amaxes (the current one joins the history after use, as in Transformer Engine).
"""
from __future__ import annotations

import functools

import torch

from .formats import FORMATS

__all__ = ["AmaxHistory", "fp8_matmul", "quantize_fp8"]

E4M3, E5M2 = FORMATS["fp8_e4m3"], FORMATS["fp8_e5m2"]


class AmaxHistory:
    """Per-tensor amax histories for delayed scaling, keyed by call site and role.

    Amaxes and scales stay on the tensor's device (a ring buffer per key): computing a scale never
    waits for the GPU, so an FP8 GEMM costs a few small kernels, not a host round trip per operand."""

    def __init__(self, length: int = 16) -> None:
        self.length = length
        self._h: dict[str, tuple[torch.Tensor, list[int]]] = {}
        self.fallbacks = 0  # native GEMMs that had to be emulated (shapes _scaled_mm does not take)

    def scale(self, key: str, amax: torch.Tensor, fmax: float, delayed: bool) -> torch.Tensor:
        """``fmax / amax`` as a 0-d FP32 tensor (1 where the reference amax is 0); with ``delayed`` the
        reference is the largest amax of the previous steps (the current one on the first)."""
        amax = amax.detach().float().reshape(())
        buf, count = self._h.setdefault(key, (torch.zeros(self.length, device=amax.device), [0]))
        ref = buf.max() if (delayed and count[0]) else amax
        buf[count[0] % self.length] = amax
        count[0] += 1
        return torch.where(ref > 0, fmax / ref, torch.ones_like(ref))


#: Use the one-pass Triton kernel (:mod:`harness.values._triton_quant`) where it applies; tests switch it off to
#: compare it with the PyTorch expression below, which defines the function.
FUSED_QUANTIZE = True
_FUSED_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _triton_quant():
    """:mod:`harness.values._triton_quant`, or None without Triton."""
    try:
        from . import _triton_quant
    except ImportError:
        return None
    return _triton_quant


def _fused(x: torch.Tensor, fmt, scale: float | torch.Tensor) -> torch.Tensor | None:
    """The fused kernel's result where it applies (CUDA, a device scale, a dense row- or column-major
    operand of a float dtype), else None."""
    if not (FUSED_QUANTIZE and x.is_cuda and isinstance(scale, torch.Tensor) and scale.is_cuda
            and scale.numel() == 1 and scale.dtype == torch.float32 and x.dtype in _FUSED_INPUTS):
        return None
    transposed = not x.is_contiguous()
    if transposed and not (x.dim() == 2 and x.t().is_contiguous()):
        return None
    kernels = _triton_quant()
    if kernels is None:
        return None
    src = x.t() if transposed else x  # a column-major operand stays column-major (what _scaled_mm wants)
    y = kernels.quantize(src, fmt.dtype, fmt.max, not fmt.finite_only, scale)
    return y.t() if transposed else y


def quantize_fp8(x: torch.Tensor, fmt, scale: float | torch.Tensor) -> torch.Tensor:
    """Scale then cast to FP8. Finite values past the format's max saturate to it; inf and NaN stay
    non-finite (NaN in E4M3, which has no inf), so an overflow upstream is never hidden: torch's cast
    alone saturates inf to 448 in E4M3 (seen on the CPU). On a GPU with Triton one fused pass
    computes the same bits (:mod:`harness.values._triton_quant`)."""
    fused = _fused(x, fmt, scale)
    if fused is not None:
        return fused
    y = x.float() * scale
    keep = y if not fmt.finite_only else torch.full_like(y, float("nan"))
    return torch.where(torch.isfinite(y), y.clamp(-fmt.max, fmt.max), keep).to(fmt.dtype)


def _mm(x8: torch.Tensor, y8: torch.Tensor, sx: torch.Tensor, sy: torch.Tensor, out_dtype: torch.dtype,
        native: bool, history: "AmaxHistory | None" = None) -> torch.Tensor:
    """(x8 / sx) @ (y8 / sy) with FP32 accumulation (``sx``, ``sy``: 0-d FP32 scale tensors). A native
    GEMM whose dimensions are not multiples of 16 is emulated and counted in ``history.fallbacks``."""
    fits = x8.shape[0] % 16 == 0 and x8.shape[1] % 16 == 0 and y8.shape[1] % 16 == 0
    if native and not fits and history is not None:
        history.fallbacks += 1
    if native and fits:
        yt = y8.t().contiguous().t()  # column-major second operand
        out = torch._scaled_mm(x8.contiguous(), yt, scale_a=sx.reciprocal(), scale_b=sy.reciprocal(),
                               out_dtype=out_dtype)
        return out[0] if isinstance(out, tuple) else out
    return ((x8.float() @ y8.float()) / (sx * sy)).to(out_dtype)


def _amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| in one read (NaN if any element is NaN), without the copy ``x.abs()`` would write."""
    return torch.linalg.vector_norm(x.detach(), float("inf"))


class _FP8MatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, key, history, delayed, native, out_dtype):  # type: ignore[override]
        with torch.autocast(a.device.type, enabled=False):
            sa = history.scale(f"{key}.a", _amax(a), E4M3.max, delayed)
            sb = history.scale(f"{key}.b", _amax(b), E4M3.max, delayed)
            qa, qb = quantize_fp8(a, E4M3, sa), quantize_fp8(b, E4M3, sb)
            ctx.save_for_backward(qa, qb, sa, sb)
            ctx.meta = (key, history, delayed, native, a.dtype, b.dtype)
            return _mm(qa, qb, sa, sb, out_dtype, native, history)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        qa, qb, sa, sb = ctx.saved_tensors
        key, history, delayed, native, da, db = ctx.meta
        with torch.autocast(grad.device.type, enabled=False):
            sg = history.scale(f"{key}.grad", _amax(grad), E5M2.max, delayed)
            qg = quantize_fp8(grad, E5M2, sg)
            # E5M2 x E4M3 is a supported _scaled_mm pairing; keep the E5M2 operand first.
            ga = _mm(qg, qb.t(), sg, sb, torch.float32, native, history).to(da)
            gb = _mm(qg.t().contiguous(), qa, sg, sa, torch.float32, native, history).t().to(db)
        return ga, gb, None, None, None, None, None


def fp8_matmul(a: torch.Tensor, b: torch.Tensor, key: str, history: AmaxHistory, delayed: bool,
               native: bool, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """2-D FP8 GEMM a @ b with autograd; leading batch dims of ``a`` are flattened."""
    lead = a.shape[:-1]
    out = _FP8MatMul.apply(a.reshape(-1, a.shape[-1]), b, key, history, delayed, native, out_dtype)
    return out.reshape(*lead, b.shape[-1])

