"""The GPU paths of :mod:`harness.values.blockwise`: blockwise FP8 GEMMs on the FP8 Tensor Cores.

Two, tried in order, each feature-detected at run time (an unusable one falls back, with a note):

* ``torch.nn.functional.scaled_mm`` with ``ScalingType.BlockWise1x128`` / ``BlockWise128x128`` scales
  (cuBLAS's blockwise kernels, torch 2.9+ on Hopper): the library path, for the default interval of 128,
  whose partial sums cuBLAS promotes per 128-tile as it applies the tiles' scales;
* one ``torch._scaled_mm`` per interval of N products (unit scales, FP32 output), multiplied by its tiles'
  factors and added in FP32: the promotion exactly as DeepSeek-V3 describes it, with the Tensor Cores'
  own accumulator inside each interval. It needs N dividing 128 and dimensions multiple of 16.

Anything else (N=0, intervals spanning tiles, odd shapes) returns None: the caller runs the model.
"""
from __future__ import annotations

import torch

__all__ = ["native_gemm", "blockwise_scaled_mm"]

TILE = 128
_BROKEN: dict[str, str] = {}  # path (and scale layout) -> why it failed once in this process (not retried)


def _col_major(x: torch.Tensor) -> torch.Tensor:
    return x.t().contiguous().t()


def _b_scales(gb: torch.Tensor, b_cols: int) -> list[torch.Tensor]:
    """``gb``'s factors in the layouts torch's blockwise GEMM takes, newest first (torch 2.13's checks, in
    ``torch/_meta_registrations.py``: 128x1 tiles as (N, K/128) with strides (1, N); 128x128 blocks as
    (round_up(K/128, 4), N/128) with strides (1, rows), the padding rows unused), then older spellings."""
    gb = gb.float()
    if b_cols != TILE:
        return [gb.contiguous().t(), _col_major(gb)]
    pad = -gb.shape[0] % 4
    padded = torch.cat([gb, torch.ones(pad, gb.shape[1], device=gb.device)]) if pad else gb
    return [_col_major(padded), _col_major(gb)] if pad else [_col_major(gb)]


def blockwise_scaled_mm(qa: torch.Tensor, ga: torch.Tensor, qb: torch.Tensor, gb: torch.Tensor, b_cols: int,
                        out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``F.scaled_mm`` with 1x128 scales for ``qa`` and 128x128 (``b_cols=128``) or 128x1 (``b_cols=1``)
    scales for ``qb``; ``ga`` (M x K/128), ``gb`` (K/128 x N/128 or K/128 x N) are dequantization factors
    (what torch multiplies by). Raises where torch or the GPU lacks the kernel."""
    F = torch.nn.functional
    st = F.ScalingType
    rb = st.BlockWise128x128 if b_cols == TILE else st.BlockWise1x128
    a8 = qa.to(torch.float8_e4m3fn).contiguous()
    b8 = _col_major(qb.to(torch.float8_e4m3fn))
    variants = _b_scales(gb, b_cols)
    for i, sb in enumerate(variants):
        try:
            return F.scaled_mm(a8, b8, _col_major(ga.float()), st.BlockWise1x128, sb, rb, output_dtype=out_dtype)
        except (RuntimeError, ValueError):
            if i == len(variants) - 1:
                raise
    raise AssertionError("unreachable")


def _chunked(qa: torch.Tensor, da: torch.Tensor, qb: torch.Tensor, db: torch.Tensor, promote: int) -> torch.Tensor:
    """One ``_scaled_mm`` per interval of ``promote`` products, promoted to FP32 with its tiles' factors."""
    one = torch.ones((), device=qa.device, dtype=torch.float32)
    a8, b8 = qa.to(torch.float8_e4m3fn), qb.to(torch.float8_e4m3fn)
    out = torch.zeros(qa.shape[0], qb.shape[1], device=qa.device, dtype=torch.float32)
    for k0 in range(0, qa.shape[1], promote):
        k1, t = min(k0 + promote, qa.shape[1]), k0 // TILE
        part = torch._scaled_mm(a8[:, k0:k1].contiguous(), _col_major(b8[k0:k1]), scale_a=one, scale_b=one,
                                out_dtype=torch.float32)
        part = part[0] if isinstance(part, tuple) else part
        out = out + part * (da[:, t, None] * db[t][None, :])
    return out


_CHECKED: set[int] = set()  # b_cols values whose native result was checked against the chunked path


def _trusted(out: torch.Tensor, qa, ga, a_rows: int, qb, gb, b_cols: int) -> bool:
    """The first native result per scale layout is checked against one ``_scaled_mm`` per 128 products (the
    same promotion, scales applied by the harness): a scale layout torch reads differently than meant would
    otherwise give wrong numbers silently. A disagreement beyond 2^-10 (normwise) marks the path broken."""
    if b_cols in _CHECKED:
        return True
    key = f"scaled_mm:{b_cols}"
    from .blockwise import _factors
    da, db = _factors(ga, a_rows, gb, b_cols, qa.shape[0], qb.shape[1])
    ref = _chunked(qa, da, qb, db, TILE)
    err = float((out.float() - ref).norm() / ref.norm().clamp_min(torch.finfo(torch.float32).tiny))
    if not err <= 2.0**-10:  # NaN too
        _BROKEN[key] = f"disagrees with one torch._scaled_mm per 128 products (rel. diff {err:.2e})"
        return False
    _CHECKED.add(b_cols)
    return True


def native_gemm(qa, ga, a_rows: int, qb, gb, b_cols: int, promote: int, notes: set[str] | None
                ) -> torch.Tensor | None:
    """The FP32 GEMM on the GPU, or None where no native path applies (see module doc)."""
    notes = notes if notes is not None else set()
    m, k = qa.shape
    n = qb.shape[1]
    fits16 = m % 16 == 0 and n % 16 == 0 and k % 16 == 0
    key = f"scaled_mm:{b_cols}"  # each scale layout (B in 128x128 blocks or 128x1 tiles) stands alone
    if promote == TILE and a_rows == 1 and k % TILE == 0 and fits16 and key not in _BROKEN:
        if not hasattr(getattr(torch.nn.functional, "ScalingType", None), "BlockWise1x128"):
            _BROKEN[key] = f"torch {torch.__version__} has no F.scaled_mm with blockwise scales"
        else:
            try:
                out = blockwise_scaled_mm(qa, ga, qb, gb, b_cols)
                if _trusted(out, qa, ga, a_rows, qb, gb, b_cols):
                    notes.add("blockwise FP8 GEMMs native: torch.nn.functional.scaled_mm, BlockWise1x128 x "
                              f"BlockWise{'128x128' if b_cols == TILE else '1x128'} (cuBLAS)")
                    return out
            except (RuntimeError, NotImplementedError, TypeError, ValueError, AttributeError) as exc:
                _BROKEN[key] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    if key in _BROKEN and promote == TILE:
        notes.add(f"native blockwise scaled_mm not used for B in {'128x128' if b_cols == TILE else '128x1'} "
                  f"tiles ({_BROKEN[key]})")
    from .blockwise import _factors
    if promote > 0 and TILE % promote == 0 and promote % 16 == 0 and fits16 and hasattr(torch, "_scaled_mm"):
        da, db = _factors(ga, a_rows, gb, b_cols, m, n)
        notes.add(f"blockwise FP8 GEMMs on the FP8 Tensor Cores, one torch._scaled_mm per {promote} products, "
                  "promoted to FP32 with the tiles' factors")
        return _chunked(qa, da, qb, db, promote)
    notes.add(f"blockwise FP8 GEMMs emulated (promote={promote}, {m}x{k}x{n}: no native GEMM accumulates "
              "this way): the H200's 14-bit FP8 accumulator modelled")
    return None
