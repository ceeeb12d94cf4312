"""Blockwise FP8 GEMMs as DeepSeek-V3 trains with them, emulated exactly (``fp8=blockwise(N)``).

DeepSeek-V3 (technical report, section 3.3) scales FP8 operands per small block instead of per tensor:
activations and activation gradients per 1x128 tile (one token, 128 channels along the reduction), weights
per 128x128 block, every operand E4M3, each scale ``fmax / amax`` of its tile. Hopper's FP8 Tensor Cores
keep only about 14 bits of their running sum (``docs/tensor_cores.md``: measured on an H200), so every
``N`` products (N=128 by default) the partial sum is taken out, multiplied by its tiles' dequantization
factors and added into an FP32 accumulator on the CUDA cores: the *promotion*. ``N=0`` never promotes.

The emulation runs the calibrated Tensor-Core model (:class:`~harness.values.tensor_core_model.TensorCoreModel`,
:data:`HOPPER_FP8`) over each interval of ``N`` products and adds the promoted partial sums in FP32. When
an interval lies in one 128-tile (N divides 128) its products are the FP8 values' own and the tiles'
factors multiply the partial sum at promotion, as DeepSeek's kernels do; an interval that spans tiles (N=0,
or N not dividing 128) can only hold products already multiplied by their tiles' factor (rounded to FP32),
which is how it is modelled.

Every GEMM operand is quantized along its reduction dimension: forward ``x @ w`` (x 1x128 along K, w 128x128),
input gradient ``g @ w.T`` (g 1x128 along N, the same 128x128 weight blocks), weight gradient ``x.T @ g``
(x and g 1x128 along the tokens).
"""
from __future__ import annotations

import torch

from .formats import FORMATS
from .fp8 import quantize_fp8
from .tensor_core_model import TensorCoreModel, floor_log2

__all__ = ["TILE", "HOPPER_FP8", "block_scales", "quantize_blocks", "blockwise_gemm", "blockwise_matmul"]

TILE = 128
E4M3 = FORMATS["fp8_e4m3"]
#: The FP8 Tensor-Core accumulator measured on an H200 (docs/tensor_cores.md): 32 products per fused step,
#: 14 bits kept from the largest exponent sum, truncated, a 14-bit running sum.
HOPPER_FP8 = TensorCoreModel("fp8_e4m3", block=32, alignment_bits=14, accumulator_bits=14,
                             alignment_reference="exponent_sum")


def _blocks(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """``x`` (R x C) zero-padded to whole blocks and viewed as (R/rows, rows, C/cols, cols)."""
    r, c = x.shape
    pr, pc = -r % rows, -c % cols
    xp = torch.nn.functional.pad(x, (0, pc, 0, pr)) if pr or pc else x
    return xp.reshape((r + pr) // rows, rows, (c + pc) // cols, cols)


def block_scales(x: torch.Tensor, rows: int, cols: int, fmax: float = E4M3.max) -> torch.Tensor:
    """``fmax / amax`` of every ``rows x cols`` block of the 2-D ``x`` (FP32; 1 where amax is 0; NaN
    propagates from a NaN block, and an inf block gets scale 0, so it stays non-finite)."""
    amax = _blocks(x.detach().float().abs(), rows, cols).amax(dim=(1, 3))
    return torch.where(amax > 0, fmax / amax, torch.ones_like(amax)).float()


def _expand(grid: torch.Tensor, rows: int, cols: int, shape: torch.Size) -> torch.Tensor:
    """A per-block grid repeated over its blocks and cut to ``shape``."""
    return grid.repeat_interleave(rows, 0)[: shape[0]].repeat_interleave(cols, 1)[:, : shape[1]]


def quantize_blocks(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 values of ``x`` scaled per ``rows x cols`` block (as FP32 holding E4M3 values) and the block grid of
    dequantization factors ``1 / scale`` (FP32)."""
    s = block_scales(x, rows, cols)
    q = quantize_fp8(x, E4M3, _expand(s, rows, cols, x.shape)).float()
    return q, s.reciprocal()


def _factors(a_grid: torch.Tensor, a_rows: int, b_grid: torch.Tensor, b_cols: int, m: int, n: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantization factors in canonical form: A's per (row, K-tile) (M x KT), B's per (K-tile, column)."""
    return a_grid.repeat_interleave(a_rows, 0)[:m], b_grid.repeat_interleave(b_cols, 1)[:, :n]


def blockwise_gemm(qa: torch.Tensor, da: torch.Tensor, qb: torch.Tensor, db: torch.Tensor, promote: int,
                   model: TensorCoreModel = HOPPER_FP8) -> torch.Tensor:
    """FP32 ``sum_k qa[:, k] * qb[k] * da[:, k//128] * db[k//128]`` as the Tensor Cores and the promotion compute it.

    ``qa`` (M x K) and ``qb`` (K x N) hold E4M3 values; ``da`` (M x KT) and ``db`` (KT x N) are the
    dequantization factors of each 128-tile along K. Every ``promote`` products (0: never) the limited
    accumulator's partial sum is added into an FP32 accumulator (round to nearest)."""
    m, k = qa.shape
    n = qb.shape[1]
    dev = qa.device
    interval = promote if promote > 0 else k
    scaled_terms = TILE % interval != 0  # an interval spans tiles: its products carry their factors
    # FP8 products are exact in float32 (E4M3's exponents stay far inside its range); products carrying a
    # 24-bit factor are not
    work = torch.float32 if model.exact_in_fp32 and not scaled_terms else torch.float64
    qa64, qb64, da, db = qa.cpu().to(work), qb.cpu().to(work), da.cpu().float(), db.cpu().float()
    out = torch.zeros(m, n, dtype=torch.float32)
    for p0 in range(0, k, interval):
        acc = torch.zeros(m, n, dtype=work)
        # walk the interval in pieces of 128 so memory stays M*N*128; the accumulator (and its fused steps)
        # carry over from piece to piece
        for c0 in range(p0, min(p0 + interval, k), TILE):
            c1 = min(c0 + TILE, p0 + interval, k)
            prod, pexp = model.products(qa64[:, c0:c1], qb64[c0:c1], work)
            if scaled_terms:  # each product carries its own tile's factor, rounded to FP32
                tk = torch.arange(c0, c1) // TILE
                f = (da[:, tk].t()[:, :, None] * db[tk][:, None, :]).double()
                prod, pexp = prod * f, pexp + floor_log2(f)
            acc = model.accumulate(prod, pexp, acc)
        partial = acc.float()  # the accumulator's 14 bits are exact in FP32
        if not scaled_terms:
            t = p0 // TILE
            partial = partial * (da[:, t, None] * db[t][None, :])
        out = out + partial
    return out.to(dev)


class _BlockwiseMatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, promote, out_dtype, native, notes):  # type: ignore[override]
        with torch.autocast(a.device.type, enabled=False):
            qa, ga = quantize_blocks(a, 1, TILE)
            qb, gb = quantize_blocks(b, TILE, TILE)
            ctx.save_for_backward(a, qb, gb)
            ctx.meta = (promote, native, notes, a.dtype, b.dtype)
            return _gemm(qa, ga, 1, qb, gb, TILE, promote, native, notes).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        a, qb, gb = ctx.saved_tensors
        promote, native, notes, da_t, db_t = ctx.meta
        with torch.autocast(grad.device.type, enabled=False):
            qg, gg = quantize_blocks(grad, 1, TILE)  # 1x128 along N, the input gradient's reduction
            ga = _gemm(qg, gg, 1, qb.t(), gb.t(), TILE, promote, native, notes)  # the same 128x128 weight blocks
            qat, gat = quantize_blocks(a.t(), 1, TILE)  # x.T and g, 1x128 along the tokens
            qgt, ggt = quantize_blocks(grad, TILE, 1)
            gw = _gemm(qat, gat, 1, qgt, ggt, 1, promote, native, notes)
        return ga.to(da_t), gw.to(db_t), None, None, None, None


def _gemm(qa, ga, a_rows, qb, gb, b_cols, promote, native: bool, notes: set[str] | None) -> torch.Tensor:
    """The GEMM of quantized operands (block grids of factors ``ga``, ``gb``): natively where the GPU path
    applies (:mod:`harness.values.blockwise_native`), else on the accumulator model; ``notes`` collects which."""
    if native and qa.is_cuda:
        from .blockwise_native import native_gemm
        out = native_gemm(qa, ga, a_rows, qb, gb, b_cols, promote, notes)
        if out is not None:
            return out
    elif notes is not None:
        notes.add(f"blockwise FP8 GEMMs emulated: E4M3 tiles, the H200's 14-bit FP8 accumulator modelled, "
                  f"promoted to FP32 every {promote or 'never'} products")
    da, db = _factors(ga, a_rows, gb, b_cols, qa.shape[0], qb.shape[1])
    return blockwise_gemm(qa, da, qb, db, promote)


def blockwise_matmul(a: torch.Tensor, b: torch.Tensor, promote: int = TILE, out_dtype: torch.dtype = torch.bfloat16,
                     native: bool = False, notes: set[str] | None = None) -> torch.Tensor:
    """``a @ b`` with DeepSeek-V3's blockwise FP8 recipe and autograd; leading batch dims of ``a`` are flattened.
    ``native`` lets CUDA tensors use the FP8 Tensor Cores; ``notes`` collects how each GEMM ran, for the record.

    >>> a = torch.full((2, 256), 3.5); b = torch.full((256, 2), 1.75)  # scales 448/amax: 2^7, 2^8
    >>> blockwise_matmul(a, b, 128, torch.float32).tolist()  # 256 products of 6.125, exact in 14 bits
    [[1568.0, 1568.0], [1568.0, 1568.0]]
    """
    lead = a.shape[:-1]
    out = _BlockwiseMatMul.apply(a.reshape(-1, a.shape[-1]), b, promote, out_dtype, native, notes)
    return out.reshape(*lead, b.shape[-1])
