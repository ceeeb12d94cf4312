"""FP8 quantization in one pass on the GPU: ``x * scale``, saturated to the format's max, cast to FP8.

The same function as :func:`harness.values.fp8.quantize_fp8`'s PyTorch expression, which reads and writes the
tensor five times (scale, finiteness, clamp, select, cast); this kernel reads it once and writes the FP8
bytes once. Semantics, bit for bit (``tests/test_gpu.py`` compares the two on random and special values):
the product is FP32 (``x`` upcast, times the FP32 scale read from the device: no host synchronization),
finite values saturate to +-max and round to nearest even, NaN stays NaN, and an infinity stays
non-finite: +-inf in E5M2, NaN in E4M3 (which has no inf). The kernel selects NaN and writes E5M2's
infinity bits itself rather than rely on how the conversion instruction treats non-finite inputs.

Imported only where Triton and a CUDA device are present (:func:`harness.values.fp8.quantize_fp8` decides).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["quantize"]

BLOCK = 4096
_TL = {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e5m2: tl.float8e5}


@triton.jit
def _quantize_kernel(x_ptr, s_ptr, y_ptr, n, fmax, OUT: tl.constexpr, HAS_INF: tl.constexpr,
                     BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = x * tl.load(s_ptr)
    finite = (y == y) & (tl.abs(y) != float("inf"))
    q = tl.minimum(tl.maximum(y, -fmax), fmax)
    q = tl.where(finite, q, float("nan"))  # min/max would turn NaN into a number: select after
    bits = q.to(OUT).to(tl.uint8, bitcast=True)
    if HAS_INF:  # E5M2's infinities: sign, exponent all ones, mantissa zero
        inf_bits = tl.where(y > 0, 0x7C, 0xFC).to(tl.uint8)
        bits = tl.where(tl.abs(y) == float("inf"), inf_bits, bits)
    tl.store(y_ptr + offs, bits, mask=mask)


def quantize(x: torch.Tensor, dtype: torch.dtype, fmax: float, has_inf: bool, scale: torch.Tensor) -> torch.Tensor:
    """FP8 (``dtype``) of ``x * scale``; ``x`` contiguous on CUDA, ``scale`` a 0-d FP32 CUDA tensor."""
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    n = x.numel()
    if n:
        _quantize_kernel[(triton.cdiv(n, BLOCK),)](x, scale.reshape(1), y.view(torch.uint8), n, fmax,
                                                   OUT=_TL[dtype], HAS_INF=has_inf, BLOCK=BLOCK)
    return y
