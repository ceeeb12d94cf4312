"""MXFP8, MXFP4 and NVFP4 block-scaled GEMMs, emulated exactly (``fp8=mxfp8|mxfp4|nvfp4``).

**MX** (OCP Microscaling Formats v1.0): blocks of 32 consecutive elements along the reduction dimension
share one E8M0 scale, a power of two ``2^(floor(log2(amax)) - emax_elem)`` (``emax_elem``: the element
format's largest exponent, 8 for E4M3 and 2 for E2M1), the OCP spec's rule and torchao's default
``ScaleCalculationMode.FLOOR``: the exponent is read from amax's FP32 bits and clamped to E8M0's range
[-127, 127]. Elements are ``x / scale`` saturated to the element format's max and rounded to nearest even:
E4M3 (mxfp8) or E2M1 (mxfp4: magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6).

**NVFP4**: blocks of 16 with an E4M3 block scale over an FP32 tensor scale ``amax / (448 * 6)``, as
torchao's ``NVFP4Tensor`` computes them: block scale ``(block_amax / 6) / tensor_scale`` cast to E4M3
(clamped to [2^-6, 448]), elements ``x * ((1 / tensor_scale) / block_scale)`` rounded to E2M1.

The values are bit for bit torchao's (``MXTensor.to_mx``, ``NVFP4Tensor.to_nvfp4``, dequantized) on finite
and non-finite inputs (``tests/test_mx.py``): a NaN makes its MX block NaN (E8M0's NaN scale); an inf
gets the scale 2^(128 - emax), stays inf and flushes the rest of its block to 0; under NVFP4 an inf or NaN
anywhere makes the tensor scale, hence every value, NaN. Two deliberate differences where torchao loses
information:

* an MX block whose scale is E8M0's smallest, 2^-127, is quantized with that scale (torchao divides by
  2^-126 and multiplies back by 2^-127, halving such blocks: amax below 2^-118 for E4M3, 2^-124 for E2M1);
* an all-zero tensor stays zero under NVFP4 (torchao's tensor scale 0 makes it NaN).

The GEMM multiplies the dequantized blocks and accumulates in FP32, as the hardware does after applying
block scales. Every operand is quantized along its own reduction dimension, in the backward pass too
(input gradient: ``g`` and ``w`` along N; weight gradient: ``x`` and ``g`` along the tokens), as
torchao's MX training recipe does.
"""
from __future__ import annotations

import torch

from .formats import FORMATS

__all__ = ["MX_BLOCK", "NVFP4_BLOCK", "E8M0_BIAS", "round_e2m1", "mx_scale_exponents", "mx_quantize",
           "nvfp4_quantize", "quantize", "mx_matmul"]

MX_BLOCK, NVFP4_BLOCK = 32, 16
E8M0_BIAS = 127  # E8M0 holds 2^(e - 127) for e in 0..254; 255 is NaN
E4M3, E2M1 = FORMATS["fp8_e4m3"], FORMATS["fp4_e2m1"]
ELEMENT = {"mxfp8": E4M3, "mxfp4": E2M1, "nvfp4": E2M1}


def round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """``y`` (FP32) rounded to nearest even on E2M1's magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6, saturating at 6
    (NaN stays NaN). The spacing is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]."""
    mag = y.abs().clamp(max=E2M1.max)
    _, e = torch.frexp(mag)  # mag = m * 2^e, 0.5 <= m < 1: floor(log2 mag) = e - 1
    step = torch.exp2((e - 2).clamp(min=-1).float())  # 2^(max(floor(log2), 0) - 1)
    return torch.copysign(torch.round(mag / step) * step, y)  # torch.round: ties to even


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """``x`` (FP32) with its last dimension zero-padded to whole blocks, viewed as (..., blocks, block)."""
    pad = -x.shape[-1] % block
    xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
    return xp.reshape(*x.shape[:-1], -1, block)


def mx_scale_exponents(blocks: torch.Tensor, elem_emax: int) -> torch.Tensor:
    """The biased E8M0 scale (int32, 0..255) of each block of ``blocks`` (..., B): amax's FP32 exponent field
    minus ``elem_emax``, clamped to E8M0's finite range; 255 (NaN) where a block holds NaN. An inf block reads
    exponent 128 and keeps a finite scale, so the inf survives the quantization."""
    amax = blocks.abs().amax(dim=-1)
    e = ((amax.view(torch.int32) >> 23) & 0xFF) - 127  # floor(log2(amax)) for normals; -127 for 0 and subnormals
    biased = (e - elem_emax).clamp(-E8M0_BIAS, E8M0_BIAS) + E8M0_BIAS
    return torch.where(amax.isnan(), torch.full_like(biased, 255), biased)


def _e8m0_value(biased: torch.Tensor) -> torch.Tensor:
    """2^(biased - 127) as FP32 (2^-127 is an FP32 subnormal, exact); NaN for 255."""
    v = torch.exp2((biased - E8M0_BIAS).float())
    return torch.where(biased == 255, torch.full_like(v, float("nan")), v)


def mx_quantize(x: torch.Tensor, recipe: str = "mxfp8", block: int = MX_BLOCK) -> torch.Tensor:
    """``x`` quantized to MX blocks along its last dimension and dequantized (FP32, ``x``'s shape)."""
    elem = ELEMENT[recipe]
    xb = _blocked(x.float(), block)
    scale = _e8m0_value(mx_scale_exponents(xb, elem.emax))[..., None]
    y = (xb / scale).clamp(-elem.max, elem.max)  # clamp keeps NaN
    q = y.to(torch.float8_e4m3fn).float() if elem is E4M3 else round_e2m1(y)
    return (q * scale).reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]


def nvfp4_quantize(x: torch.Tensor, block: int = NVFP4_BLOCK) -> torch.Tensor:
    """``x`` quantized to NVFP4 along its last dimension (E4M3 block scales over an FP32 tensor scale) and
    dequantized (FP32, ``x``'s shape)."""
    xf = x.float()
    amax = xf.abs().amax() if xf.numel() else torch.zeros(())
    tensor_scale = torch.where(amax > 0, amax / (E4M3.max * E2M1.max), torch.ones_like(amax))
    if not torch.isfinite(amax):  # an inf or NaN makes the tensor scale non-finite: every value NaN
        tensor_scale = torch.full_like(amax, float("nan"))
    xb = _blocked(xf, block)
    block_scale = xb.abs().amax(dim=-1) / E2M1.max
    s8 = (block_scale / tensor_scale).clamp(E4M3.min_normal, E4M3.max).to(torch.float8_e4m3fn).float()
    q = round_e2m1((xb * ((1.0 / tensor_scale) / s8)[..., None]).clamp(-E2M1.max, E2M1.max))
    return (q * (tensor_scale * s8)[..., None]).reshape(*x.shape[:-1], -1)[..., : x.shape[-1]]


def quantize(x: torch.Tensor, recipe: str) -> torch.Tensor:
    """``x`` quantized along its last dimension by ``recipe`` (mxfp8, mxfp4, nvfp4) and dequantized (FP32)."""
    if recipe == "nvfp4":
        return nvfp4_quantize(x)
    if recipe in ("mxfp8", "mxfp4"):
        return mx_quantize(x, recipe)
    raise ValueError(f"unknown block recipe {recipe!r}; choose one of mxfp8, mxfp4, nvfp4")


def _along_rows(x: torch.Tensor, recipe: str) -> torch.Tensor:
    """``x`` quantized along its first dimension (the reduction of ``x.T @ ...``)."""
    return quantize(x.t().contiguous(), recipe).t()


class _MXMatMul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, recipe, out_dtype):  # type: ignore[override]
        with torch.autocast(a.device.type, enabled=False):
            ctx.save_for_backward(a, b)
            ctx.recipe = recipe
            return (quantize(a, recipe) @ _along_rows(b, recipe)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        a, b = ctx.saved_tensors
        r = ctx.recipe
        with torch.autocast(grad.device.type, enabled=False):
            ga = quantize(grad, r) @ quantize(b, r).t()  # reduction over N: g and w along N
            gw = quantize(a.t().contiguous(), r) @ _along_rows(grad, r)  # over the tokens
        return ga.to(a.dtype), gw.to(b.dtype), None, None


def mx_matmul(a: torch.Tensor, b: torch.Tensor, recipe: str, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``a @ b`` with ``recipe`` (mxfp8, mxfp4, nvfp4) block scaling along K and FP32 accumulation, with
    autograd; leading batch dims of ``a`` are flattened.

    >>> mx_matmul(torch.full((1, 32), 3.0), torch.full((32, 1), 0.5), "mxfp4", torch.float32).item()
    48.0
    """
    lead = a.shape[:-1]
    out = _MXMatMul.apply(a.reshape(-1, a.shape[-1]), b, recipe, out_dtype)
    return out.reshape(*lead, b.shape[-1])
