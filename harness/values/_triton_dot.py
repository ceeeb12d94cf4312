"""Triton GEMMs on the Tensor Cores whose accumulation order is known: no split-K, no epilogue.

:func:`dot_acc` is one tile ``d = c + a @ b`` with C accumulated inside the fused sum (the probes of
:mod:`harness.device.device_profile`); :func:`gemm` walks K sequentially into one FP32 accumulator per output
tile (the ``tensor_core`` path of the ``tc_long_dot`` scenario). This module needs Triton and a GPU and
is imported only where they are used.
A single program loads the whole padded problem (``BM x BK`` times ``BK x BN``, at least 64 x 16 x 64
so that Hopper's ``wgmma`` and Ampere's ``mma`` instructions apply), initializes the accumulator from
C and calls ``tl.dot(a, b, acc)`` once: the K dimension is walked in order by the Tensor-Core
instructions Triton emits, with no split-K and no separate epilogue addition of C.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["dot_acc", "gemm"]


@triton.jit
def _dot_acc_kernel(a_ptr, b_ptr, c_ptr, d_ptr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                    PRECISION: tl.constexpr):
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)
    rk = tl.arange(0, BK)
    a = tl.load(a_ptr + rm[:, None] * BK + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * BN + rn[None, :])
    acc = tl.load(c_ptr + rm[:, None] * BN + rn[None, :])
    acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(d_ptr + rm[:, None] * BN + rn[None, :], acc)


def dot_acc(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, tf32: bool = False) -> torch.Tensor:
    """``c + a @ b`` in one Triton tile. ``a`` (BM x BK) and ``b`` (BK x BN) hold the input dtype
    (float16, bfloat16, float8_e4m3fn, or float32 read as TF32 when ``tf32``); ``c`` is float32 (BM x BN).
    Shapes must already be padded to powers of two with BM, BN >= 64 and BK >= 32."""
    BM, BK = a.shape
    BN = b.shape[1]
    d = torch.empty((BM, BN), dtype=torch.float32, device=a.device)
    _dot_acc_kernel[(1,)](a.contiguous(), b.contiguous(), c.contiguous(), d, BM=BM, BN=BN, BK=BK,
                          PRECISION="tf32" if tf32 else "ieee", num_warps=4, num_stages=1)
    return d


@triton.jit
def _gemm_kernel(a_ptr, b_ptr, d_ptr, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                 PRECISION: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * N + rn[None, :])
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(d_ptr + rm[:, None] * N + rn[None, :], acc)


def gemm(a: torch.Tensor, b: torch.Tensor, tf32: bool = False, block: int = 64) -> torch.Tensor:
    """``a @ b`` (float32 result) accumulating K in order, ``block`` at a time, into one FP32 Tensor-Core
    accumulator per 64 x 64 output tile. M and N must be multiples of 64, K of ``block``."""
    (m, k), n = a.shape, b.shape[1]
    if m % 64 or n % 64 or k % block:
        raise ValueError(f"gemm needs M, N multiples of 64 and K of {block}; got {m} x {k} x {n}")
    d = torch.empty((m, n), dtype=torch.float32, device=a.device)
    _gemm_kernel[(m // 64, n // 64)](a.contiguous(), b.contiguous(), d, n, k, BM=64, BN=64, BK=block,
                                     PRECISION="tf32" if tf32 else "ieee", num_warps=4)
    return d
