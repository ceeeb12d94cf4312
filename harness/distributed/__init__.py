"""Beyond one process: collectives simulated in ring order, the matrix sharded over torchrun ranks,
and a check of the real collectives against the simulation.

**Simulated collectives.** :func:`ring_reduce_scatter` and :func:`ring_all_reduce` reduce per-rank
tensors on one device the way a ring does: chunk ``c`` of the sum starts at rank ``c+1`` and goes
round the ring, every partial sum rounded to the tensors' dtype, ``((x[c+1] + x[c+2]) + ...) + x[c]``.
The ``distributed`` family uses them in every run (one process, any world size), so it is part of the
default matrix. On two ranks every order computes ``fl(a + b)``, so a real collective matches the
simulation bit for bit; on more ranks the real order depends on the library's algorithm (ring
channels, trees) and the two agree within the rounding-error bound. ``check`` measures both.

**Sharded matrix.** ``torchrun --nproc-per-node N -m harness run ...`` hands the run to
:func:`run_sharded` (see :mod:`harness.cli`): one process per GPU (``cuda:LOCAL_RANK``) or per CPU
share, in a gloo process group (the ranks exchange Python objects only; ``check`` adds NCCL for its
CUDA tensors). Ranks claim whole cases from a counter in the
rendezvous store, largest first when an earlier run says what each case costs (:func:`cost_hints`),
so a rank never waits for work while another has a queue. Each rank streams every record to its own
shard file (``<run>/shards/<session>-rank-<r>.jsonl``), preceded by a line claiming the case; at the
end rank 0 gathers the shards with ``gather_object`` (no shared filesystem needed) and writes one run
directory whose records are in single-process order. If a rank dies, torchrun stops the others; every
record already finished is in a shard file, and ``python -m harness.distributed merge DIR`` writes
the run from them (the case the dead rank had claimed becomes an ``error`` record for each missing
strategy); ``run --resume DIR`` then runs the cases nobody reached. See docs/distributed.md.

NVLink multicast stays off: :data:`MULTICAST_OFF` is put into the environment (where unset) before
any process group starts.
"""
from __future__ import annotations

from typing import Any

from .collectives import check_collectives, ring_all_reduce, ring_reduce_scatter
from .group import MULTICAST_OFF, Group, init_group, is_leader, launched

__all__ = ["ring_reduce_scatter", "ring_all_reduce", "check_collectives", "MULTICAST_OFF", "Group", "init_group",
           "launched", "is_leader", "cost_hints", "claim_order", "merge_shard_lines", "run_sharded", "merge_run"]

_SHARDING = ("cost_hints", "claim_order", "merge_shard_lines", "run_sharded", "merge_run")


def __getattr__(name: str) -> Any:
    """The sharded runner imports the engine: loaded on first use, so suites can import the ring
    collectives while the engine itself is still being imported."""
    if name in _SHARDING:
        from . import sharding
        return getattr(sharding, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
