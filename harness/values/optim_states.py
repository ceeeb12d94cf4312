"""Optimizer states in 8 bits (``states=8bit``): block-wise dynamic quantization, as torchao's
``AdamW8bit`` and bitsandbytes' 8-bit optimizers keep them (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization"), written here without either library so it can be their oracle.

A state tensor is cut into blocks of :data:`BLOCK` values; each block is divided by its largest
magnitude (its scale, kept in FP32) and every value is rounded to the nearest of 256 codes of a
*dynamic* map: a sign, a run of zero bits that acts as a decimal exponent (10^-6 .. 10^0) and the
remaining bits as a linear fraction, so small values keep relative precision. Signed states (Adam's
first moment) use a signed map, non-negative ones (the second moment) an unsigned map with one more
fraction bit. Only tensors of at least :data:`MIN_NUMEL` values, a multiple of the block, are
quantized: smaller ones stay in full precision (torchao's rule, after bitsandbytes'
``min_8bit_size``). Bit for bit with torchao 0.18's ``OptimState8bit`` (``tests/test_recipes_optim.py``).

>>> q = dynamic_map(signed=True)
>>> (q.numel(), round(float(q[0]), 4), float(q[-1]))
(256, -0.993, 1.0)
"""
from __future__ import annotations

import functools

import torch

__all__ = ["BLOCK", "MIN_NUMEL", "UNSIGNED_STATES", "dynamic_map", "quantizable", "quantize", "dequantize",
           "quantize_8bit", "state_tensors"]

BLOCK = 256
MIN_NUMEL = 4096
#: State names known to be non-negative (second moments, sums of squares): they take the unsigned map.
#: Any other state (first moments, momentum buffers) takes the signed one.
UNSIGNED_STATES = ("exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf")


@functools.lru_cache(maxsize=2)
def _map_values(signed: bool) -> tuple[float, ...]:
    """The 256 code values (bitsandbytes' ``create_dynamic_map`` for 8 bits, 7 exponent bits, as torchao
    copies it): per decimal exponent i = 0..6, the midpoints of an FP32 ``linspace(0.1, 1)`` with 2^i
    (signed) or 2^(i+1) (unsigned) intervals, times 10^(i-6); then 0 and 1."""
    data: list[float] = []
    for i in range(7):
        items = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        edges = torch.linspace(0.1, 1, items)
        means = (edges[:-1] + edges[1:]) / 2.0
        data += ((10 ** (i - 6)) * means).tolist()
        if signed:
            data += (-(10 ** (i - 6)) * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256, len(data)
    return tuple(sorted(data))


def dynamic_map(signed: bool, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 code values of the signed or unsigned dynamic map, ascending, in FP32."""
    return torch.tensor(_map_values(signed), dtype=torch.float32, device=device)


def quantizable(t: torch.Tensor) -> bool:
    """Whether a state of this size is kept in 8 bits (>= MIN_NUMEL values, whole blocks)."""
    return t.numel() >= MIN_NUMEL and t.numel() % BLOCK == 0


def quantize(x: torch.Tensor, qmap: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 codes of x's shape, FP32 scale per block): x / amax(block) rounded to the nearest code
    (ties up), as torchao does. The code below is found with one ``searchsorted``: the code torchao's
    branchless binary search finds, whose comparisons send a NaN to code 0 (set here too, so that an
    inf in a block reads back as torchao's does)."""
    flat = x.float().reshape(-1, block)
    scale = flat.abs().amax(-1).clip(1e-12)
    y = (flat / scale.view(-1, 1)).reshape(x.shape)
    codes = (torch.searchsorted(qmap, y.contiguous(), right=True) - 1).clamp(0, 255)
    codes = torch.where(torch.isnan(y), 0, codes)
    up = (codes + 1).clip(max=255)
    down_v, up_v = qmap[codes], qmap[up]
    codes = torch.where(y - down_v >= (up_v - down_v) * 0.5, up, codes)
    return codes.to(torch.uint8), scale


def dequantize(codes: torch.Tensor, scale: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """The FP32 values the codes stand for: code value times its block's scale."""
    return (qmap[codes.int()].view(scale.shape[0], -1) * scale.view(-1, 1)).view(codes.shape)


def quantize_8bit(x: torch.Tensor, signed: bool) -> torch.Tensor:
    """x as an 8-bit state holds it (quantized and read back, FP32), or x itself when it is too small."""
    if not quantizable(x):
        return x
    qmap = dynamic_map(signed, x.device)
    return dequantize(*quantize(x, qmap), qmap)


def state_tensors(state: dict, param: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The per-entry states of one parameter (floating tensors of its shape; never the step count)."""
    return [(k, v) for k, v in state.items() if k != "step" and isinstance(v, torch.Tensor)
            and v.is_floating_point() and v.shape == param.shape]
