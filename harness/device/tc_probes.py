"""Directed tests that measure how a Tensor-Core unit computes inner products.

Following Fasi, Higham, Mikaitis and Pranesh, "Numerical behavior of NVIDIA tensor cores" (PeerJ CS,
2021), every probe is a set of inner products ``d = c + sum_k x_k y_k`` built from exactly
representable inputs (powers of two and a few one-bit significands), placed where they expose one
property: a large product cancelled by its negative in the same fused step leaves a small one that
survives only if the alignment kept its bits; moving the small one along K finds where the next step
starts; fractions of the last kept bit show the rounding. Nothing here knows any GPU model: each probe
reads what the device returns. The probes take a ``matmul(a, b, c) -> d`` callable, so the same code
measures a GPU (Triton's ``tl.dot`` accumulating into C, or cuBLAS) and, in the tests, the CPU model
:class:`~harness.device.tensor_core_model.TensorCoreModel`, whose parameters they must recover exactly.

The profile of one input format (keys are stable; ``None`` means the probe could not decide, with a
note saying why):

``products_exact``  products kept exactly (not rounded to the input format), over its whole range
``block_size``      products added per fused step (the block FMA size)
``alignment_bits``  bits kept after aligning to the largest exponent, counting its bit
``accumulator_bits`` significant bits of a step's result (24: an FP32 accumulator)
``extra_bits``      alignment_bits - accumulator_bits (the extra alignment bits)
``alignment_rounding`` / ``normalization_rounding``  how bits are dropped when aligning / normalizing
                    (``toward_zero`` is truncation; ``exact`` when the sum kept the bits)
``alignment_reference`` ``exponent_sum`` when a product's place in the alignment is its factors'
                    exponents added (its significand, in [1, 4), may carry one bit above), ``product``
                    when it is the product's leading bit
``subnormals``      ``honoured``, ``flushed`` or ``partial`` for subnormal inputs
``input_rounding``  TF32 only: how an FP32 input is converted to TF32
``c_fused``         C enters the first fused step (Triton) rather than being added afterwards
``model_agreement`` share of random inner products the model with these parameters reproduces bit for bit

:mod:`harness.device.device_profile` runs them on a GPU (and is the command line).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..values.formats import Format, get_format
from .tensor_core_model import ROUNDINGS, MatMul, TensorCoreModel, round_integer

__all__ = ["PROBED_FORMATS", "FIELDS", "K", "Dot", "run_dots", "product_range", "factors", "classify_rounding",
           "probe_block", "probe_accumulator", "probe_alignment", "probe_alignment_rounding",
           "probe_alignment_reference", "probe_normalization", "probe_products", "probe_subnormals",
           "probe_input_rounding", "probe_c_fused", "model_from_profile", "random_operands", "model_agreement",
           "profile_format"]

PROBED_FORMATS = ("fp16", "bf16", "tf32", "fp8_e4m3")
#: Length of every probe's inner product; blocks up to K/2 are found and checked.
K = 128
#: Inner products per matmul call: probe i uses row i of A, column i of B and reads d[i, i].
BATCH = 64
FRACTIONS = (0.25, 0.5, 0.75, -0.25, -0.5, -0.75)
CARRY_FRACTIONS = (0.5, 1.5, -0.5, -1.5)


@dataclass
class Dot:
    """One inner product: ``c + sum`` of ``x * y`` over ``terms = {position: (x, y)}``."""

    terms: dict[int, tuple[float, float]]
    c: float = 0.0


def run_dots(matmul: MatMul, dots: list[Dot], k: int = K) -> list[float]:
    """Evaluate inner products of length ``k`` through ``matmul``, :data:`BATCH` per call."""
    out: list[float] = []
    for i0 in range(0, len(dots), BATCH):
        chunk = dots[i0:i0 + BATCH]
        m = max(16, -(-len(chunk) // 16) * 16)
        a, b, c = torch.zeros(m, k), torch.zeros(k, m), torch.zeros(m, m)
        for i, d in enumerate(chunk):
            for pos, (x, y) in d.terms.items():
                a[i, pos], b[pos, i] = x, y
            c[i, i] = d.c
        res = matmul(a, b, c).cpu().double()
        out += res.diagonal()[:len(chunk)].tolist()
    return out


# -- exact inputs ------------------------------------------------------------------------------------
def product_range(fmt: Format) -> tuple[int, int]:
    """Exponents of powers of two that are products of two normal inputs, kept within +-2^60 (FP32
    normal results; a ratio of 2^120 is far wider than any alignment window)."""
    return max(2 * fmt.emin, -60), min(2 * fmt.emax, 60)


def factors(fmt: Format, v: float) -> tuple[float, float]:
    """(x, y) in ``fmt``'s normal range with x * y == v, for v = m * 2^e with m of a few bits."""
    if v == 0:
        return 0.0, 0.0
    m, e = math.frexp(abs(v))  # |v| = m * 2^e, 0.5 <= m < 1
    m, e = 2 * m, e - 1
    best = None
    for ex in range(fmt.emin, fmt.emax + 1):
        ey = e - ex
        if fmt.emin <= ey <= fmt.emax and m * 2.0 ** ex <= fmt.max:
            if best is None or abs(ex - ey) < abs(best - (e - best)):
                best = ex
    if best is None:
        raise ValueError(f"{v!r} is not a product of two normal {fmt.name} numbers")
    return math.copysign(m * 2.0 ** best, v), 2.0 ** (e - best)


def _dot(fmt: Format, values: dict[int, float], c: float = 0.0) -> Dot:
    return Dot({p: factors(fmt, v) for p, v in values.items() if v != 0}, c)


def classify_rounding(fractions: Sequence[float], observed: Sequence[float]) -> str | None:
    """The rounding mode that maps each fraction of a unit to the observed multiple (or ``exact``)."""
    if all(o == f for f, o in zip(fractions, observed)):
        return "exact"
    for mode in ROUNDINGS:
        pred = round_integer(torch.tensor(list(fractions), dtype=torch.float64), mode).tolist()
        if pred == list(observed):
            return mode
    return None


def _leading_run(flags: list[bool]) -> int:
    """How many leading entries are True."""
    n = 0
    for f in flags:
        if not f:
            break
        n += 1
    return n


# -- the probes ----------------------------------------------------------------------------------------
def probe_block(matmul: MatMul, fmt: Format, k: int = K) -> dict[str, Any]:
    """+big, -big at positions 0 and 1 cancel; a tiny s at position j survives only if it is added in a
    later step than they are (in their step it is aligned to big and lost): the first such j is the block."""
    lo, hi = product_range(fmt)
    big, s = 2.0 ** hi, 2.0 ** lo
    res = run_dots(matmul, [_dot(fmt, {0: big, 1: -big, j: s}) for j in range(2, k)], k)
    later = [r == s for r in res]
    if not any(later):
        return {"block_size": None, "notes": [f"no step boundary within K={k}: the block is >= {k} products"]}
    b = 2 + later.index(True)
    lost = set(res[:b - 2])  # what s became in the first step: 0, or a grid unit under upward rounding
    consistent = len(lost) <= 1 and s not in lost and all(later[b - 2:])
    notes = [] if consistent else [f"block boundary at {b} is not clean: {sorted(lost)[:4]}"]
    if b == 2:
        notes.append("a tiny term survived right after a cancelled pair: block 2, or alignment wider than "
                     f"2^{hi - lo}")
    if consistent and b >= 4 and 2 * b < k:  # the pattern repeats: the second step is positions b..2b-1
        r = run_dots(matmul, [_dot(fmt, {b: big, b + 1: -big, 2 * b - 1: s}),
                              _dot(fmt, {b: big, b + 1: -big, 2 * b: s})], k)
        consistent = r[0] != s and r[1] == s
        if not consistent:
            notes.append(f"the second step is not positions {b}..{2 * b - 1}: got {r}")
    return {"block_size": b, "block_consistent": consistent, "notes": notes}


def probe_accumulator(matmul: MatMul, fmt: Format, k: int = K) -> dict[str, Any]:
    """big + 2^-j*big in one step: the largest j returned exactly gives the accumulator's precision."""
    lo, hi = product_range(fmt)
    js = list(range(1, min(hi - lo, 40) + 1))
    res = run_dots(matmul, [_dot(fmt, {0: 2.0 ** hi, 1: 2.0 ** (hi - j)}) for j in js], k)
    n = _leading_run([r == 2.0 ** hi + 2.0 ** (hi - j) for r, j in zip(res, js)])
    bits = n + 1
    return {"accumulator_bits": bits if n < len(js) else None, "output_fp32": bits == 24 if n < len(js) else None,
            "notes": [] if n < len(js) else [f"all {len(js)} bits kept: beyond FP32's 24"]}


def probe_alignment(matmul: MatMul, fmt: Format, k: int = K) -> dict[str, Any]:
    """+big - big + 2^-j*big in one step: 2^-j*big comes back while j < alignment_bits."""
    lo, hi = product_range(fmt)
    js = list(range(1, hi - lo + 1))
    res = run_dots(matmul, [_dot(fmt, {0: 2.0 ** hi, 1: -2.0 ** hi, 2: 2.0 ** (hi - j)}) for j in js], k)
    kept = [r == 2.0 ** (hi - j) for r, j in zip(res, js)]
    n = _leading_run(kept)
    if n == len(js):
        return {"alignment_bits": None, "notes": [f"every term down to 2^-{hi - lo} of the largest was kept"]}
    # lost terms come back as 0 (or, rounded upward, as one unit of the last kept bit)
    gone = set(res[n:]) <= {0.0, 2.0 ** (hi - n)}
    return {"alignment_bits": n + 1, "notes": [] if gone else
            [f"terms below 2^-{n + 1} of the largest were not all lost: {sorted(set(res[n:]))[:4]}"]}


def probe_alignment_rounding(matmul: MatMul, fmt: Format, bits: int, k: int = K) -> dict[str, Any]:
    """+big - big + f*g with g the last kept bit: the multiple of g that comes back shows the rounding."""
    lo, hi = product_range(fmt)
    if hi - bits - 1 < lo:
        return {"alignment_rounding": None, "notes": ["alignment too wide to place a fraction of its last bit"]}
    g = 2.0 ** (hi - bits + 1)
    res = run_dots(matmul, [_dot(fmt, {0: 2.0 ** hi, 1: -2.0 ** hi, 2: f * g}) for f in FRACTIONS], k)
    mode = classify_rounding(FRACTIONS, [r / g for r in res])
    return {"alignment_rounding": mode,
            "notes": [] if mode else [f"alignment rounding unclassified: {[r / g for r in res]}"]}


def probe_alignment_reference(matmul: MatMul, fmt: Format, bits: int, k: int = K) -> dict[str, Any]:
    """+P - P + 2^(E-bits+1) with P = (1.5*2^x)(1.5*2^y) = 2.25*2^E: the small term sits on the last kept
    bit when the alignment counts from E = x + y (the factors' exponents added), below it when it counts
    from P's leading bit 2^(E+1)."""
    lo, hi = product_range(fmt)
    e = hi - 2
    x, y = e // 2, e - e // 2
    s = 2.0 ** (e - bits + 1)
    if e - bits + 1 < lo or max(x, y) > fmt.emax or 1.5 * 2.0 ** max(x, y) > fmt.max:
        return {"alignment_reference": None, "notes": ["no room for the alignment-reference probe"]}
    p, n = (1.5 * 2.0 ** x, 1.5 * 2.0 ** y), (-1.5 * 2.0 ** x, 1.5 * 2.0 ** y)
    (r,) = run_dots(matmul, [Dot({0: p, 1: n, 2: factors(fmt, s)})], k)
    ref = {s: "exponent_sum", 0.0: "product", 2 * s: "product"}.get(r)  # 2s: rounded up to the coarser grid
    return {"alignment_reference": ref, "notes": [] if ref else [f"alignment reference unclassified: {r}"]}


def probe_normalization(matmul: MatMul, fmt: Format, acc_bits: int, k: int = K) -> dict[str, Any]:
    """big + big + f*ulp: the carry into the next binade leaves a fraction of the result's last bit,
    every term on the alignment grid, so only the normalization rounds."""
    lo, hi = product_range(fmt)
    e = hi - 1
    ulp = 2.0 ** (e + 1 - (acc_bits - 1))
    if math.log2(ulp) - 1 < lo:
        return {"normalization_rounding": None, "notes": ["accumulator too wide for its carry probe"]}
    dots = [_dot(fmt, {0: math.copysign(2.0 ** e, f), 1: math.copysign(2.0 ** e, f), 2: f * ulp})
            for f in CARRY_FRACTIONS]
    res = run_dots(matmul, dots, k)
    obs = [(r - math.copysign(2.0 ** (e + 1), f)) / ulp for r, f in zip(res, CARRY_FRACTIONS)]
    mode = classify_rounding(CARRY_FRACTIONS, obs)
    return {"normalization_rounding": mode, "notes": [] if mode else [f"normalization unclassified: {obs}"]}


def probe_products(matmul: MatMul, fmt: Format, acc_bits: int, k: int = K) -> dict[str, Any]:
    """(1 + 2^(1-p))^2 needs 2p-1 bits; max*max and min_normal^2 test the range where FP32 holds them."""
    if acc_bits < 2 * fmt.precision - 1:
        return {"products_exact": None, "notes": [f"accumulator ({acc_bits} bits) cannot show a "
                                                  f"{2 * fmt.precision - 1}-bit product"]}
    x = 1.0 + 2.0 ** (1 - fmt.precision)
    pairs = [(x, x), (-x, x)]
    if fmt.max ** 2 < 2.0 ** 127:
        pairs.append((fmt.max, fmt.max))
    if fmt.min_normal ** 2 >= 2.0 ** -126:
        pairs.append((fmt.min_normal, fmt.min_normal))
    res = run_dots(matmul, [Dot({0: p}) for p in pairs], k)
    exact = [r == p[0] * p[1] for r, p in zip(res, pairs)]
    return {"products_exact": all(exact),
            "notes": [] if all(exact) else [f"inexact products: {[p for p, e in zip(pairs, exact) if not e]}"]}


def probe_subnormals(matmul: MatMul, fmt: Format, k: int = K) -> dict[str, Any]:
    """The smallest subnormal and half the smallest normal, times 2^emax (an FP32 normal product)."""
    ys = [fmt.min_normal * 2.0 ** -fmt.fraction_bits, fmt.min_normal / 2]
    scale = 2.0 ** fmt.emax
    res = run_dots(matmul, [Dot({0: (y, scale)}) for y in ys], k)
    kept = [r == y * scale for r, y in zip(res, ys)]
    state = "honoured" if all(kept) else ("flushed" if all(r == 0 for r in res) else "partial")
    return {"subnormals": state}


def probe_input_rounding(matmul: MatMul, fmt: Format, k: int = K) -> dict[str, Any]:
    """FP32 inputs 1 + f*ulp that TF32 cannot hold, times 1: how the Tensor Core converts them."""
    u = 2.0 ** -fmt.fraction_bits
    res = run_dots(matmul, [Dot({0: (math.copysign(1.0, f) + f * u, 1.0)}) for f in FRACTIONS], k)
    obs = [(r - math.copysign(1.0, f)) / u for r, f in zip(res, FRACTIONS)]
    mode = classify_rounding(FRACTIONS, obs)
    return {"input_rounding": mode, "notes": [] if mode else [f"input conversion unclassified: {obs}"]}


def probe_c_fused(matmul: MatMul, fmt: Format, block: int, k: int = K) -> dict[str, Any]:
    """c = big, -big in step one, a tiny s in step two: s survives only if c was cancelled in step one."""
    lo, hi = product_range(fmt)
    (r,) = run_dots(matmul, [_dot(fmt, {0: -2.0 ** hi, block: 2.0 ** lo}, c=2.0 ** hi)], k)
    return {"c_fused": r == 2.0 ** lo}


# -- the profile -------------------------------------------------------------------------------------
#: Profile keys in the order tables show them.
FIELDS = ("products_exact", "block_size", "alignment_bits", "accumulator_bits", "extra_bits", "output_fp32",
          "alignment_rounding", "alignment_reference", "normalization_rounding", "subnormals", "input_rounding",
          "c_fused", "model_agreement")


def model_from_profile(fmt: str, prof: dict[str, Any]) -> TensorCoreModel | None:
    """The :class:`TensorCoreModel` a profile describes, or None when a probe left a parameter open."""
    need = ("block_size", "alignment_bits", "accumulator_bits", "alignment_rounding", "alignment_reference",
            "normalization_rounding", "products_exact", "subnormals")
    if any(prof.get(f) is None for f in need) or prof["subnormals"] == "partial" or prof["alignment_bits"] > 48:
        return None
    if fmt == "tf32" and prof.get("input_rounding") in (None, "exact"):
        return None
    exact_sum = prof["normalization_rounding"] == "exact"  # the step's sum is kept whole: FP32 normalizes it
    return TensorCoreModel(
        fmt, block=prof["block_size"], alignment_bits=prof["alignment_bits"],
        alignment_rounding=prof["alignment_rounding"], alignment_reference=prof["alignment_reference"],
        normalization_rounding="nearest_even" if exact_sum else prof["normalization_rounding"],
        accumulator_bits=24 if exact_sum else prof["accumulator_bits"], exact_products=prof["products_exact"],
        subnormals=prof["subnormals"] == "honoured", input_rounding=prof.get("input_rounding") or "nearest_even",
        fused_c=bool(prof.get("c_fused", False)))


def random_operands(fmt: Format, k: int, g: torch.Generator, with_c: bool) -> tuple[torch.Tensor, ...]:
    """64 x k and k x 64 operands exactly in ``fmt``, magnitudes over a few binades either side of 1 so
    that alignment drops bits, and a random FP32 C (or zeros)."""
    span = min(6, (fmt.emax - fmt.emin) // 4)
    f = fmt.fraction_bits

    def draw(*shape: int) -> torch.Tensor:
        sig = 1 + torch.randint(0, 2 ** f, shape, generator=g).double() / 2 ** f
        exp = torch.randint(-span, span + 1, shape, generator=g).double()
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
        return (sign * sig * torch.exp2(exp)).float()

    c = torch.randn(64, 64, generator=g) * 2.0 ** span if with_c else torch.zeros(64, 64)
    return draw(64, k), draw(k, 64), c


def model_agreement(matmul: MatMul, fmt: str, prof: dict[str, Any], k: int = K,
                    calls: int = 4) -> float | None:
    """Share of random inner products (``calls`` x 4096) the profile's model reproduces bit for bit."""
    model = model_from_profile(fmt, prof)
    if model is None:
        return None
    g = torch.Generator().manual_seed(0)
    same = total = 0
    for _ in range(calls):
        a, b, c = random_operands(get_format(fmt), k, g, with_c=model.fused_c)
        d, m = matmul(a, b, c).cpu(), model.matmul(a, b, c)
        same += int((d == m).sum())
        total += d.numel()
    return same / total


def profile_format(matmul: MatMul, fmt_name: str, backend: str = "model", k: int = K,
                   validate: bool = True) -> dict[str, Any]:
    """Run every probe for one input format through ``matmul``; returns the profile (module doc)."""
    fmt = get_format(fmt_name)
    if fmt_name not in PROBED_FORMATS:
        raise ValueError(f"format {fmt_name!r} has no Tensor-Core probes; choose one of {', '.join(PROBED_FORMATS)}")
    prof: dict[str, Any] = {"format": fmt_name, "backend": backend, "k": k, **{f: None for f in FIELDS}}
    notes: list[str] = []

    def take(d: dict[str, Any]) -> None:
        notes.extend(d.pop("notes", []))
        prof.update(d)

    take(probe_block(matmul, fmt, k))
    block = prof["block_size"]
    if block is None or block >= 3:  # positions 0..2 share the first step
        take(probe_accumulator(matmul, fmt, k))
        take(probe_alignment(matmul, fmt, k))
    else:
        notes.append(f"block {block} < 3: the one-step probes need three products in one step")
    bits, acc = prof["alignment_bits"], prof["accumulator_bits"]
    if bits is not None and acc is not None:
        prof["extra_bits"] = bits - acc
        take(probe_alignment_rounding(matmul, fmt, bits, k))
        take(probe_alignment_reference(matmul, fmt, bits, k))
        if bits >= acc:
            take(probe_normalization(matmul, fmt, acc, k))
    if acc is not None:
        take(probe_products(matmul, fmt, acc, k))
    take(probe_subnormals(matmul, fmt, k))
    if fmt_name == "tf32":
        take(probe_input_rounding(matmul, fmt, k))
    if backend != "cublas" and block is not None and block < k:
        take(probe_c_fused(matmul, fmt, block, k))
    if validate:
        prof["model_agreement"] = agree = model_agreement(matmul, fmt_name, prof, k)
        if agree is not None and agree < 1:
            notes.append(f"the model reproduces {100 * agree:.1f}% of random inner products: the rest differ "
                         "(a library may split K into partial sums or reorder it)")
    prof["notes"] = notes
    return prof
