"""FP8 GEMMs as torchao's float8 training recipes compute them: the oracle the library is checked against.

Three recipes (``torchao.float8.Float8LinearConfig.from_recipe_name``), each a table of how every
operand of the three GEMMs of a linear layer (output, grad_input, grad_weight) is cast:

============== ===================== ========================== ============================ ==========
recipe          output: x, w          grad_input: dy, w          grad_weight: dy, x           scales
============== ===================== ========================== ============================ ==========
tensorwise     E4M3 / tensor, same   E5M2 / tensor, E4M3/tensor E5M2 / tensor, E4M3 / tensor fmax/amax
rowwise        E4M3 / row, / column  E4M3 / row, / column       E4M3 / row, / column         power of 2
rowwise_gw_hp  E4M3 / row, / column  E4M3 / row, E4M3 / tensor  high precision (no cast)     power of 2
============== ===================== ========================== ============================ ==========

"per row" is one scale per row of the GEMM's left operand, "per column" one per column of its right
operand. A scale is ``float32(fmax / max(float64(amax), 1e-12))``, rounded down to a power of two
(``exp2(floor(log2(s)))``) where the recipe says so; an operand is ``clamp(x.float() * s)`` cast to FP8.

The GEMM follows torchao's ``addmm_float8_unwrapped``: its result takes the left operand's dtype; a
row-scaled GEMM without fast accumulation (the two backward GEMMs) runs with unit scales, is rounded to
BF16 and then multiplied by the outer product of the inverse scales, and a row-scaled result is
produced in BF16 even for FP32 or FP16 inputs. Natively (CUDA, FP8 Tensor Cores) it is
``torch._scaled_mm`` with the same arguments; emulated it is ``(qa * 1/sa) @ (qb * 1/sb)`` in FP32,
which is what ``torch._scaled_mm`` computes on the CPU, bit for bit (``tests/test_recipes_torchao.py``).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .formats import FORMATS, Format
from .fp8 import quantize_fp8

__all__ = ["Cast", "Recipe", "RECIPES", "EPS", "scale_of", "recipe_matmul", "rowwise_native", "fits_scaled_mm",
           "gemm_fits", "cpu_scaled_mm_is_emulation"]

E4M3, E5M2 = FORMATS["fp8_e4m3"], FORMATS["fp8_e5m2"]
#: torchao's guard against a zero amax (``torchao.float8.float8_utils.EPS``).
EPS = 1e-12


@dataclass(frozen=True)
class Cast:
    """How one operand of one GEMM is cast: to ``fmt`` (None: kept in high precision), with one scale
    per row of a left operand / per column of a right one (``axiswise``) or one for the tensor."""

    fmt: Format | None
    axiswise: bool = False


@dataclass(frozen=True)
class Recipe:
    """The casts of the three GEMMs of ``y = x @ w`` and whether scales are rounded down to powers of 2."""

    name: str
    output: tuple[Cast, Cast]  # (x, w)
    grad_input: tuple[Cast, Cast]  # (dy, w^T)
    grad_weight: tuple[Cast, Cast]  # (dy^T, x)
    pow2: bool


_T4, _T5, _R4, _HP = Cast(E4M3), Cast(E5M2), Cast(E4M3, True), Cast(None)
RECIPES: dict[str, Recipe] = {
    "tensorwise": Recipe("tensorwise", (_T4, _T4), (_T5, _T4), (_T5, _T4), pow2=False),
    "rowwise": Recipe("rowwise", (_R4, _R4), (_R4, _R4), (_R4, _R4), pow2=True),
    "rowwise_gw_hp": Recipe("rowwise_gw_hp", (_R4, _R4), (_R4, _T4), (_HP, _HP), pow2=True),
}


def scale_of(x: torch.Tensor, fmt: Format, dim: int | None, pow2: bool) -> torch.Tensor:
    """``fmax / amax`` as torchao computes it: amax over ``dim`` (kept) or the whole tensor, divided in
    FP64 with a floor of :data:`EPS`, rounded to FP32, then down to a power of two with ``pow2``."""
    a = x.detach().abs()
    amax = a.amax(dim=dim, keepdim=True) if dim is not None else a.max()
    s = (torch.finfo(fmt.dtype).max / amax.double().clamp(min=EPS)).float()
    # torchao's own expression (float8_utils._round_scale_down_to_power_of_2): log2 rounds in FP32,
    # so the oracle uses the same one rather than an exact frexp
    return torch.exp2(torch.floor(torch.log2(s))) if pow2 else s


def _cast(x: torch.Tensor, cast: Cast, left: bool, pow2: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(FP8 operand, its scale) for a left (scales per row) or right (per column) GEMM operand; the
    operand itself and None where the cast keeps high precision."""
    if cast.fmt is None:
        return x, None
    s = scale_of(x, cast.fmt, (-1 if left else 0) if cast.axiswise else None, pow2)
    return quantize_fp8(x, cast.fmt, s), s


@functools.lru_cache(maxsize=None)
def rowwise_native(device: str) -> str | None:
    """Why ``torch._scaled_mm`` cannot take row-wise scales on the CUDA ``device`` (None if it can):
    tried once per device on a 16x16 GEMM, since support depends on the GPU and the torch build."""
    if not hasattr(torch, "_scaled_mm"):
        return f"torch {torch.__version__} lacks torch._scaled_mm"
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        b = a.t().contiguous().t()
        torch._scaled_mm(a, b, scale_a=torch.ones(16, 1, device=device), scale_b=torch.ones(1, 16, device=device),
                         out_dtype=torch.bfloat16, use_fast_accum=True)
    except (RuntimeError, NotImplementedError) as exc:
        return f"torch._scaled_mm takes no row-wise scales here ({str(exc).splitlines()[0][:120]})"
    return None


@functools.lru_cache(maxsize=1)
def cpu_scaled_mm_is_emulation() -> bool:
    """Whether ``torch._scaled_mm`` on this CPU computes what the emulation does, bit for bit (torch's
    dequantize-then-GEMM fallback; a CPU whose oneDNN has FP8 kernels may accumulate otherwise). Tried
    once on a 64x64 GEMM with row-wise and with tensor-wise scales and an FP32 result (BF16 would
    round the difference away)."""
    if not hasattr(torch, "_scaled_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    a = (torch.randn(64, 64, generator=g) * 100).to(torch.float8_e4m3fn)
    b = (torch.randn(64, 64, generator=g) * 100).to(torch.float8_e4m3fn).t().contiguous().t()
    for sa, sb in ((torch.rand(64, 1, generator=g) + 0.5, torch.rand(1, 64, generator=g) + 0.5),
                   (torch.rand((), generator=g) + 0.5, torch.rand((), generator=g) + 0.5)):
        try:
            got = torch._scaled_mm(a, b, scale_a=sa.reciprocal(), scale_b=sb.reciprocal(), out_dtype=torch.float32,
                                   use_fast_accum=True)
        except (RuntimeError, NotImplementedError):
            return False
        if not torch.equal(got, _dequantized_mm(a, sa.reciprocal(), b, sb.reciprocal())):
            return False
    return True


def fits_scaled_mm(m: int, k: int, n: int) -> bool:
    """Whether ``torch._scaled_mm`` on a GPU takes an (m, k) @ (k, n) GEMM: every dimension a multiple of
    16 (the backward GEMMs make each of them an inner dimension)."""
    return m % 16 == 0 and k % 16 == 0 and n % 16 == 0


def _dequantized_mm(qa: torch.Tensor, ia: torch.Tensor, qb: torch.Tensor, ib: torch.Tensor) -> torch.Tensor:
    """The emulated scaled GEMM in FP32: each FP8 operand times its inverse scale, then the product."""
    return (qa.float() * ia) @ (qb.float() * ib)


def _gemm(qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor, out_dtype: torch.dtype,
          fast_accum: bool, native: bool) -> torch.Tensor:
    """torchao's scaled GEMM of two FP8 operands (``addmm_float8_unwrapped``, see module doc)."""
    if sa.dim() != sb.dim():  # one operand per tensor, the other per row/column: repeat the single scale
        sa = sa.reshape(()).repeat(qa.shape[0]).reshape(-1, 1) if sa.dim() == 0 else sa
        sb = sb.reshape(()).repeat(qb.shape[1]).reshape(1, -1) if sb.dim() == 0 else sb
    ia, ib = sa.reciprocal(), sb.reciprocal()
    rowwise = sa.dim() == 2
    post = None
    if rowwise and not fast_accum:  # torchao: tensorwise kernel with unit scales, scaled afterwards
        post, ia, ib = ia * ib, ia.new_ones(()), ia.new_ones(())
    od = torch.bfloat16 if rowwise and out_dtype in (torch.float16, torch.float32) else out_dtype
    if native:
        out = torch._scaled_mm(qa.contiguous(), qb.t().contiguous().t(), scale_a=ia, scale_b=ib, out_dtype=od,
                               use_fast_accum=fast_accum)
        out = out[0] if isinstance(out, tuple) else out
    else:
        out = _dequantized_mm(qa, ia, qb, ib).to(od)
    if post is not None:
        out *= post  # in the output dtype, as torchao does
    return out.to(out_dtype)


def _product(a: torch.Tensor, b: torch.Tensor, casts: tuple[Cast, Cast], recipe: Recipe, fast_accum: bool,
             native: bool) -> torch.Tensor:
    """One GEMM ``a @ b`` of the recipe: both operands cast as ``casts`` say, or both kept (torch.mm)."""
    qa, sa = _cast(a, casts[0], True, recipe.pow2)
    qb, sb = _cast(b, casts[1], False, recipe.pow2)
    if sa is None or sb is None:
        return torch.mm(a, b)
    return _gemm(qa, sa, qb, sb, a.dtype, fast_accum, native)


class _RecipeMatMul(torch.autograd.Function):
    """``x @ w`` (2-D) with the recipe's three GEMMs (torchao: ``matmul_with_hp_or_float8_args``)."""

    @staticmethod
    def forward(ctx, x, w, recipe, native):  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.meta = (recipe, native)
        return _product(x, w, recipe.output, recipe, True, native)  # torchao: fast accumulation forward

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w = ctx.saved_tensors
        recipe, native = ctx.meta
        gx = _product(dy, w.t(), recipe.grad_input, recipe, False, native)
        gw = _product(dy.t(), x, recipe.grad_weight, recipe, False, native).t()
        return gx, gw, None, None


def recipe_matmul(a: torch.Tensor, b: torch.Tensor, recipe: str, native: bool) -> torch.Tensor:
    """``a @ b`` with autograd under the torchao-style ``recipe`` (a key of :data:`RECIPES`); leading
    dims of ``a`` are flattened. The result has ``a``'s dtype; run it outside autocast.

    >>> a = torch.tensor([[1.0, 2.0], [300.0, -5.0]])
    >>> recipe_matmul(a, torch.eye(2), "rowwise", native=False).tolist()
    [[1.0, 2.0], [288.0, -5.0]]
    """
    lead = a.shape[:-1]
    out = _RecipeMatMul.apply(a.reshape(-1, a.shape[-1]), b, RECIPES[recipe], native)
    return out.reshape(*lead, b.shape[-1])


def gemm_fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """:func:`fits_scaled_mm` for ``a @ b`` with ``a``'s leading dims flattened."""
    return fits_scaled_mm(a.numel() // max(a.shape[-1], 1), a.shape[-1], b.shape[-1])
