"""Number formats: the one table every bound, verdict and plot derives from.

Each format is described by its bit layout (explicit fraction bits, exponent bits, whether it keeps
subnormals, how it spells its maximum); unit roundoff, range and the torch dtype follow from that.

>>> FORMATS["fp16"].u == 2**-11, FORMATS["fp16"].max, FORMATS["fp16"].min_subnormal == 2**-24
(True, 65504.0, True)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Format", "FORMATS", "get_format", "quantize", "representable_range_log2"]


@dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    ``fraction_bits`` is the number of stored mantissa bits (precision p = fraction_bits + 1);
    ``emax``/``emin`` are the exponents of the largest and smallest normal numbers.
    ``finite_only`` marks the OCP FP8 E4M3 variant whose top exponent holds normal numbers
    (max 448) instead of inf; ``all_finite`` a format with no inf or NaN code at all (the OCP FP4 E2M1
    element, max 6).
    """

    name: str
    fraction_bits: int
    exponent_bits: int
    subnormals: bool = True
    finite_only: bool = False
    storage: str = ""  # torch dtype attribute name that holds values of this format
    all_finite: bool = False

    @property
    def precision(self) -> int:
        return self.fraction_bits + 1

    @property
    def u(self) -> float:
        """Unit roundoff, 2^-p (half of torch.finfo(...).eps)."""
        return 2.0 ** -self.precision

    @property
    def eps(self) -> float:
        return 2.0 * self.u

    @property
    def bias(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def emax(self) -> int:
        return self.bias + (1 if self.finite_only or self.all_finite else 0)

    @property
    def emin(self) -> int:
        return 1 - self.bias

    @property
    def max(self) -> float:
        if self.finite_only:  # all-ones exponent and mantissa is NaN: the top mantissa code is lost
            return (2.0 - 2.0 ** (1 - self.fraction_bits)) * 2.0 ** self.emax
        return (2.0 - 2.0 ** -self.fraction_bits) * 2.0 ** self.emax

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def min_subnormal(self) -> float | None:
        return 2.0 ** (self.emin - self.fraction_bits) if self.subnormals else None

    @property
    def smallest(self) -> float:
        """Smallest positive value (subnormal if the format has them)."""
        return self.min_subnormal if self.subnormals else self.min_normal

    @property
    def overflow_threshold(self) -> float:
        """``max + ulp(max)/2``: round to nearest sends magnitudes from here on to inf in the IEEE formats
        (their max ends in an odd bit, so the tie goes up) and magnitudes beyond it to NaN in E4M3 (its
        max, 448 = 1.110b * 2^8, ends in an even bit and keeps the tie)."""
        return self.max + 2.0 ** (self.emax - self.fraction_bits - 1)

    @property
    def dtype(self) -> torch.dtype | None:
        return getattr(torch, self.storage, None) if self.storage else None

    @property
    def dynamic_range_log2(self) -> float:
        """log2(max / smallest positive): how many binades the format spans."""
        return math.log2(self.max) - math.log2(self.smallest)

    def as_dict(self) -> dict:
        return {"name": self.name, "precision": self.precision, "u": self.u, "max": self.max,
                "min_normal": self.min_normal, "min_subnormal": self.min_subnormal}


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("fp64", 52, 11, storage="float64"),
    Format("fp32", 23, 8, storage="float32"),
    # TF32 keeps FP32's exponent and 10 fraction bits; values live in FP32 registers. The H200's
    # Tensor Cores honoured TF32 subnormal inputs (results/h200/device_profile.json), so it has them.
    Format("tf32", 10, 8, storage="float32"),
    Format("fp16", 10, 5, storage="float16"),
    Format("bf16", 7, 8, storage="bfloat16"),
    Format("fp8_e4m3", 3, 4, finite_only=True, storage="float8_e4m3fn"),
    Format("fp8_e5m2", 2, 5, storage="float8_e5m2"),
    # OCP MX / NVFP4 element: 1 sign, 2 exponent, 1 fraction bit; every code is a number (+-0, 0.5 .. 6)
    Format("fp4_e2m1", 1, 2, all_finite=True),
)}


def get_format(name: str) -> Format:
    """Look a format up by name; the error lists the valid names."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown format {name!r}; known formats: {', '.join(FORMATS)}") from None


def quantize(x: torch.Tensor, fmt: Format | str) -> torch.Tensor:
    """Round ``x`` to ``fmt`` (round to nearest even, saturating nothing) and return it as float32.

    Values that round past the format's max become inf; FP8 E4M3, which has no inf, gives NaN (its
    overflow encoding) for them: torch's cast would saturate to 448, so that is checked here.
    TF32 is emulated by rounding FP32's mantissa to 10 bits on the bit pattern.
    """
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    x = x.float()
    if fmt.name == "tf32":
        bits = x.view(torch.int32)
        drop = 23 - fmt.fraction_bits
        half = 1 << (drop - 1)
        lsb = (bits >> drop) & 1
        rounded = ((bits + (half - 1) + lsb) >> drop) << drop
        finite = torch.isfinite(x)
        return torch.where(finite, rounded.view(torch.float32), x)
    if fmt.name in ("fp32", "fp64"):
        return x
    if fmt.finite_only:  # overflow is explicit NaN, not the cast's saturation
        over = x.abs() > fmt.overflow_threshold  # the tie itself keeps max (see Format.overflow_threshold)
        return torch.where(over, torch.full_like(x, float("nan")), x.to(fmt.dtype).float())
    return x.to(fmt.dtype).float()


def representable_range_log2(fmt: Format | str) -> tuple[float, float]:
    """(log2 of the smallest positive value, log2 of max): the band a histogram shades."""
    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    return math.log2(fmt.smallest), math.log2(fmt.max)
