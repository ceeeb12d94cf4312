"""A pure-torch model of a Tensor Core's inner products, with the parameters the directed tests find.

The model follows Fasi, Higham, Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor cores"
(PeerJ Computer Science, 2021). ``d = c + a @ b`` is computed one *fused step* at a time: each step
takes the running accumulator and the next ``block`` products, and

1. forms the products (exactly, or rounded to the input format's precision);
2. aligns every term to the largest exponent, keeping ``alignment_bits`` bits counted from that
   exponent (the rest are lost by ``alignment_rounding``: truncation on NVIDIA parts). With
   ``alignment_reference="exponent_sum"`` a product's exponent is the sum of its factors' exponents,
   as a unit that never looks at the product's significand sees it: a product whose significands
   multiply to 2 or more has its leading bit one place above it, and keeps one bit more;
3. adds the aligned terms exactly;
4. normalizes the sum to ``accumulator_bits`` significant bits (24 for FP32) by
   ``normalization_rounding``, which becomes the accumulator of the next step.

Inputs below the format's smallest normal are flushed to zero unless ``subnormals``; inputs not in
the format (TF32 reads FP32 registers) are converted by ``input_rounding``. With ``fused_c=False``
the C matrix is added after the products' sum, in FP32, as a library epilogue may do.

The model is the CPU stand-in the probes of :mod:`harness.device.device_profile` are tested against, and the
prediction a measured profile is checked with on the device.

>>> m = TensorCoreModel("fp16", block=4, alignment_bits=24)
>>> a = torch.tensor([[1.0, 2.0**-12, 2.0**-12, 0.0]]); b = torch.tensor([[1.0], [2.0**-12], [2.0**-12], [0.0]])
>>> float(m.matmul(a, b, torch.zeros(1, 1))[0, 0])  # 1 + 2^-24 + 2^-24: both halves of an ulp truncated
1.0
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .formats import get_format

__all__ = ["ROUNDINGS", "ALIGNMENT_REFERENCES", "TensorCoreModel", "round_integer", "round_significand", "MatMul",
           "floor_log2"]

#: Rounding modes the model knows and the probes tell apart (``nearest_even`` is IEEE's default).
ROUNDINGS = ("nearest_even", "nearest_away", "toward_zero", "up", "down")

#: What a product's exponent is for the alignment: its leading bit, or its factors' exponents added.
ALIGNMENT_REFERENCES = ("product", "exponent_sum")

#: ``matmul(a, b, c) -> d``: FP32 ``a`` (M x K), ``b`` (K x N), ``c`` (M x N) whose entries are
#: exactly representable in the format under test; returns ``c + a @ b`` as FP32 on the CPU.
MatMul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def round_integer(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Round float64 ``x`` to an integer in ``mode`` (one of :data:`ROUNDINGS`)."""
    if mode == "nearest_even":
        return torch.round(x)  # ties to even
    if mode == "nearest_away":
        return torch.sign(x) * torch.floor(x.abs() + 0.5)
    if mode == "toward_zero":
        return torch.trunc(x)
    if mode == "up":
        return torch.ceil(x)
    if mode == "down":
        return torch.floor(x)
    raise ValueError(f"unknown rounding {mode!r}; choose one of {', '.join(ROUNDINGS)}")


def floor_log2(x: torch.Tensor) -> torch.Tensor:
    """floor(log2|x|) in ``x``'s floating dtype (float64 for others), -inf for zeros."""
    x = x if x.is_floating_point() else x.double()
    _, e = torch.frexp(x)
    return torch.where(x != 0, (e - 1).to(x.dtype), torch.full_like(x, -torch.inf))


def round_significand(x: torch.Tensor, bits: int, mode: str) -> torch.Tensor:
    """Round float64 ``x`` to ``bits`` significant bits in ``mode`` (no exponent range limits)."""
    m, e = torch.frexp(x)  # x = m * 2^e, 0.5 <= |m| < 1
    scaled = torch.ldexp(m, torch.full_like(e, bits))
    return torch.ldexp(round_integer(scaled, mode), e - bits)


@dataclass(frozen=True)
class TensorCoreModel:
    """Parameters of one Tensor-Core inner-product unit for one input format (see module doc)."""

    fmt: str
    block: int = 4
    alignment_bits: int = 24
    alignment_rounding: str = "toward_zero"
    alignment_reference: str = "product"
    normalization_rounding: str = "toward_zero"
    accumulator_bits: int = 24
    exact_products: bool = True
    subnormals: bool = True
    input_rounding: str = "nearest_even"
    fused_c: bool = True

    def __post_init__(self) -> None:
        get_format(self.fmt)
        for name in ("alignment_rounding", "normalization_rounding", "input_rounding"):
            if getattr(self, name) not in ROUNDINGS:
                raise ValueError(f"{name}={getattr(self, name)!r}; choose one of {', '.join(ROUNDINGS)}")
        if self.alignment_reference not in ALIGNMENT_REFERENCES:
            raise ValueError(f"alignment_reference={self.alignment_reference!r}; choose one of "
                             f"{', '.join(ALIGNMENT_REFERENCES)}")
        if self.block < 1:
            raise ValueError(f"block={self.block}: a fused step adds at least one product")
        if not 2 <= self.alignment_bits <= 48:
            raise ValueError(f"alignment_bits={self.alignment_bits}: the model sums exactly in float64 only "
                             "for 2..48 bits")
        if not 2 <= self.accumulator_bits <= 24:
            raise ValueError(f"accumulator_bits={self.accumulator_bits}: the output is FP32 (at most 24 bits)")

    def as_dict(self) -> dict:
        return asdict(self)

    # -- the pieces ----------------------------------------------------------------------------
    def _inputs(self, x: torch.Tensor) -> torch.Tensor:
        f = get_format(self.fmt)
        y = round_significand(x.double(), f.precision, self.input_rounding)
        if not self.subnormals:
            y = torch.where(y.abs() < f.min_normal, torch.zeros_like(y), y)
        return y

    def _step(self, acc: torch.Tensor, prod: torch.Tensor, pexp: torch.Tensor) -> torch.Tensor:
        """One fused step: the accumulator ``acc`` (float64, ...) and the products ``prod`` (block, ...) whose
        alignment exponents are ``pexp`` (-inf for zeros) are aligned to the largest exponent, added exactly
        and normalized."""
        emax = torch.maximum(floor_log2(acc), pexp.amax(dim=0))
        shift = torch.where(torch.isfinite(emax), emax - (self.alignment_bits - 1), torch.zeros_like(emax))
        down = torch.exp2(-shift)
        # exact: integers below 2^(bits+2), (block+1) of them, in float64; scaling by 2^shift is exact too
        ints = round_integer(prod * down, self.alignment_rounding).sum(dim=0)
        total = (ints + round_integer(acc * down, self.alignment_rounding)) * torch.exp2(shift)
        return round_significand(total, self.accumulator_bits, self.normalization_rounding)

    @property
    def exact_in_fp32(self) -> bool:
        """Whether a fused step is exact in float32 (half the memory traffic of float64): products of two
        inputs of at most 12 significant bits, and (block + 1) aligned integers below 2^(alignment_bits + 2)."""
        return (2 * get_format(self.fmt).precision <= 24
                and self.alignment_bits + 2 + (self.block + 1).bit_length() <= 24)

    def products(self, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype = torch.float64
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact products of ``a`` (M x K) and ``b`` (K x N), shape (K, M, N) (K first, so a fused step
        reads a contiguous slice), with the exponents the alignment counts them from (-inf for zeros).
        ``dtype=float32`` only where :attr:`exact_in_fp32` (and the inputs' exponents stay in its range)."""
        A, B = self._inputs(a.cpu()).t().to(dtype), self._inputs(b.cpu()).to(dtype)  # (K, M), (K, N)
        prod = A[:, :, None] * B[:, None, :]  # exact
        if self.alignment_reference == "exponent_sum":
            emin = get_format(self.fmt).emin  # a subnormal's exponent field reads emin
            ea, eb = (torch.where(x != 0, floor_log2(x).clamp_min(emin), -torch.inf) for x in (A, B))
            pexp = ea[:, :, None] + eb[:, None, :]
        else:
            pexp = floor_log2(prod)
        if not self.exact_products:
            prod = round_significand(prod, get_format(self.fmt).precision, "nearest_even")
        return prod, pexp

    def accumulate(self, prod: torch.Tensor, pexp: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
        """Add the products ``prod`` ((K, ...), alignment exponents ``pexp``) into the accumulator ``acc`` (...,
        the products' dtype) one fused step of ``block`` products at a time; returns the new one."""
        for k0 in range(0, prod.shape[0], self.block):
            acc = self._step(acc, prod[k0:k0 + self.block], pexp[k0:k0 + self.block])
        return acc

    def matmul(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """``c + a @ b`` as the modelled unit computes it (FP32 result on the CPU)."""
        prod, pexp = self.products(a, b)
        c64 = c.cpu().double()
        acc = self.accumulate(prod, pexp, c64 if self.fused_c else torch.zeros_like(c64))
        if not self.fused_c:
            acc = acc + c64
        return acc.float()

    __call__ = matmul
