"""Collectives simulated in ring order on one device, and the real ones checked against them."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist

from ..values.formats import FORMATS
from ..judge.metrics import ulp
from ..judge.tolerance import bound
from .group import Group

__all__ = ["ring_reduce_scatter", "ring_all_reduce", "check_collectives", "CHECK_NUMEL"]


def _ring_chunks(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Chunk ``c`` of the ring sum for every ``c`` at once: a (world, chunk) tensor in the inputs' dtype."""
    world = len(xs)
    if world < 1:
        raise ValueError("a collective needs at least one rank's tensor")
    flat = torch.stack([t.reshape(-1) for t in xs])
    pad = (-flat.shape[1]) % world
    if pad:  # zeros are exact in any sum
        flat = torch.cat([flat, flat.new_zeros(world, pad)], dim=1)
    parts = flat.reshape(world, world, -1)  # [rank, chunk, element]
    chunk = torch.arange(world, device=flat.device)
    acc = parts[(chunk + 1) % world, chunk]
    for hop in range(2, world + 1):
        acc = acc + parts[(chunk + hop) % world, chunk]
    return acc


def ring_reduce_scatter(xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Shard ``r`` of ``sum(xs)`` for each rank ``r``, reduced in ring order in the tensors' dtype.

    ``xs[r]`` is rank r's tensor; their element count must divide by the world size (as
    ``torch.distributed.reduce_scatter_tensor`` requires).

    >>> [s.tolist() for s in ring_reduce_scatter([torch.tensor([1., 2.]), torch.tensor([10., 20.])])]
    [[11.0], [22.0]]
    """
    if xs[0].numel() % len(xs):
        raise ValueError(f"reduce-scatter of {xs[0].numel()} elements over {len(xs)} ranks: the count must "
                         "divide by the world size")
    return list(_ring_chunks(xs))


def ring_all_reduce(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum(xs)`` as every rank receives it from a ring all-reduce (a ring reduce-scatter, then an
    exact all-gather), in the tensors' dtype and shape."""
    n = xs[0].numel()
    return _ring_chunks(xs).reshape(-1)[:n].reshape(xs[0].shape)


#: Elements per rank in the check: divisible by every world size up to 8, several NCCL chunks long.
CHECK_NUMEL = 840 * 64
CHECK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view({2: torch.int16, 4: torch.int32}[x.element_size()])


def _real(op: str, local: torch.Tensor, world: int) -> torch.Tensor:
    """The sum over ranks by the real collective, all-gathered so every rank holds all of it (exact)."""
    # torch 2.13 renamed these (the old names warn); 2.11 has only the old ones
    _reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    _all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    if op == "all_reduce":
        y = local.clone()
        dist.all_reduce(y)
        full = torch.empty(world * y.numel(), dtype=y.dtype, device=y.device)
        _all_gather(full, y)
        return full.view(world, -1)  # row r: what rank r received
    shard = torch.empty(local.numel() // world, dtype=local.dtype, device=local.device)
    _reduce_scatter(shard, local)
    full = torch.empty_like(local)
    _all_gather(full, shard)
    return full.view(1, -1)


def check_collectives(g: Group, numel: int = CHECK_NUMEL, seed: int = 0) -> list[dict[str, Any]]:
    """All-reduce and reduce-scatter, in FP32, FP16 and BF16, by the real collective of the process
    group and by the ring simulation on the same inputs: the share of bit-identical results, and both
    errors against the exact sum with the bound of :mod:`harness.judge.tolerance` (n = world size).

    Every rank builds the same inputs from ``seed`` (a shared signal plus per-rank noise) and takes its
    row. ``ok``: bit for bit, or both within the bound; on two ranks every order computes fl(a+b), so
    anything but bit for bit there is a bug. ``ranks_agree``: every rank received the same bits (None
    for a reduce-scatter, whose ranks hold different shards)."""
    if numel % g.world:
        raise ValueError(f"--numel {numel} must divide by the world size {g.world} (reduce-scatter needs equal shards)")
    gen = torch.Generator().manual_seed(seed)
    xs = torch.randn(numel, generator=gen) + torch.randn(g.world, numel, generator=gen)
    exact = xs.double().sum(0)
    kappa = float(xs.double().abs().sum(0).norm() / exact.norm())
    rows = []
    for name, dtype in CHECK_DTYPES.items():
        inputs = [x.to(g.device, dtype) for x in xs]
        sim = ring_all_reduce(inputs).reshape(-1)
        for op in ("all_reduce", "reduce_scatter"):
            got = _real(op, inputs[g.rank], g.world)
            real, fmt = got[0], FORMATS[name]
            err = {k: float((v.double().cpu() - exact).norm() / exact.norm())
                   for k, v in (("real", real), ("sim", sim))}
            b = bound(fmt, g.world, kappa)
            same = float((_bits(real) == _bits(sim)).double().mean())
            ulps = (real.double() - sim.double()).abs() / ulp(sim.double(), fmt).double()
            rows.append({"op": op, "dtype": name, "world": g.world, "numel": numel, "device": g.device.type,
                         "bitwise_equal": same, "max_ulp_diff": float(ulps.max()), "rel_err_real": err["real"],
                         "rel_err_sim": err["sim"], "bound": b,
                         # only an all-reduce leaves every rank the same result to compare
                         "ranks_agree": bool((_bits(got) == _bits(got[:1])).all()) if len(got) > 1 else None,
                         "ok": same == 1.0 or (err["real"] <= b and err["sim"] <= b)})
    return rows


