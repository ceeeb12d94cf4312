"""The workloads that both benchmark tools time: asv (``bench_*.py`` here) and pytest-benchmark
(``tests/test_bench.py``). Written once, so both measure the same thing.

Each workload runs under one strategy through the harness's own :class:`~harness.core.execution.Execution`
(the GEMM routing, FP8 scaling, TF32 emulation and autocast the scenarios use) or its
:class:`~harness.run.training.Trainer`, and synchronizes the device at the end of every call, so a wall
clock around a call times the GPU work too. Sizes suit the device: small on the CPU, large on CUDA.

``tools/asv_history.sh`` runs these benchmarks against older commits' harness: import at module level
only what the oldest recorded commit has (everything below dates from the first commit), and newer API
inside the function that needs it, so an older commit fails that one benchmark, not asv's discovery.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch

from harness.run.engine import resolve_device
from harness.core.execution import Execution, route_linears
from harness.core.strategy import parse
from harness.run.timing import Timer, sync
from harness.run.training import Trainer

__all__ = ["OP_STRATEGIES", "TRAIN_STRATEGIES", "Sizes", "SIZES", "Unsupported", "device", "sizes", "execution",
           "Workload", "randn", "gemm", "softmax", "layer_norm", "train_step", "throughput"]

#: Strategies the single-op benchmarks run under (one per compute format).
OP_STRATEGIES = ("fp32", "tf32", "fp16", "bf16", "fp8-tensorwise")
#: Strategies the training-step benchmarks run under (scalers and master weights change the step).
TRAIN_STRATEGIES = ("fp32", "tf32", "fp16-dynamic", "fp16-master", "bf16", "bf16-master", "fp8-tensorwise")


@dataclass(frozen=True)
class Sizes:
    """Problem sizes: an n x n x n GEMM; softmax and layer norm over rows x cols; a training step of a
    width -> 4*width -> width MLP on a batch of ``batch`` rows."""

    gemm: int
    rows: int
    cols: int
    batch: int
    width: int


SIZES = {"cpu": Sizes(gemm=256, rows=64, cols=4096, batch=64, width=128),
         "cuda": Sizes(gemm=8192, rows=8192, cols=8192, batch=8192, width=4096)}


class Unsupported(NotImplementedError):
    """The strategy does not run on this device (asv skips a benchmark whose setup raises
    NotImplementedError; the pytest benchmarks skip too)."""


def device() -> torch.device:
    """CUDA when there is a GPU, else the CPU (the harness's ``--device auto``)."""
    return resolve_device("auto")


def sizes(dev: torch.device) -> Sizes:
    """The problem sizes for ``dev``'s type (``cpu`` or ``cuda``)."""
    return SIZES[dev.type]


def execution(strategy: str, dev: torch.device) -> Execution:
    """The strategy applied on ``dev``; :class:`Unsupported` (with the harness's reason) if it cannot run there."""
    ex = Execution(parse(strategy), dev)
    if not ex.supported:
        raise Unsupported(f"{strategy} on {dev.type}: {ex.unsupported_reason}")
    return ex


@dataclass
class Workload:
    """One call of an op under a strategy; calling it runs the op and synchronizes the device.

    ``flops`` is the arithmetic of one call (0 where the op is memory-bound and FLOP/s means nothing)."""

    fn: Callable[[], Any]
    device: torch.device
    flops: float = 0.0

    def __call__(self) -> Any:
        out = self.fn()
        sync(self.device)
        return out


def randn(dev: torch.device, *shape: int, seed: int = 0) -> torch.Tensor:
    """Standard normal FP32 values made on ``dev`` from a seeded generator (the same on every call)."""
    return torch.randn(*shape, generator=torch.Generator(dev).manual_seed(seed), device=dev)


def gemm(ex: Execution, n: int) -> Workload:
    """a @ b (n x n x n) through ``ex.matmul`` in the forward region, operands already in the
    strategy's activation format (as the previous layer hands them over)."""
    a, b = ex.act(randn(ex.device, n, n, seed=1)), ex.act(randn(ex.device, n, n, seed=2))

    def fn() -> torch.Tensor:
        with ex.autocast():
            return ex.matmul(a, b, key="bench")
    return Workload(fn, ex.device, 2.0 * n**3)


def softmax(ex: Execution, rows: int, cols: int) -> Workload:
    """Row softmax as the reduction suite computes it (autocast decides the precision)."""
    x = ex.act(randn(ex.device, rows, cols))

    def fn() -> torch.Tensor:
        with ex.autocast():
            return torch.softmax(x, dim=-1)
    return Workload(fn, ex.device)


def layer_norm(ex: Execution, rows: int, cols: int) -> Workload:
    """Layer norm over the last dimension, as the reduction suite computes it."""
    x = ex.act(randn(ex.device, rows, cols))

    def fn() -> torch.Tensor:
        with ex.autocast():
            return torch.nn.functional.layer_norm(x, (cols,))
    return Workload(fn, ex.device)


def train_step(ex: Execution, batch: int, width: int) -> Workload:
    """One :meth:`Trainer.step` (forward, scaled backward, unscale and inf check, scaler update,
    optimizer step) of a width -> 4*width -> width GELU MLP with an MSE loss."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                torch.nn.Linear(4 * width, width))
    trainer = Trainer(ex, route_linears(model, ex))
    data = (randn(ex.device, batch, width, seed=1), randn(ex.device, batch, width, seed=2))

    def loss_fn(m: torch.nn.Module, b: tuple) -> torch.Tensor:
        return torch.nn.functional.mse_loss(m(b[0]).float(), b[1].float())

    def fn() -> tuple:  # (loss, unscaled FP32 gradients, the scaler's decision)
        return trainer.step(loss_fn, data)
    return Workload(fn, ex.device, 3 * 2.0 * batch * 8 * width * width)  # forward + two backward GEMMs


def throughput(w: Workload, min_seconds: float = 0.05, rounds: int = 5) -> float:
    """Median FLOP/s of ``w`` over ``rounds`` timed batches of calls, each batch long enough
    (``min_seconds``) that one device synchronization at its ends costs nothing measurable."""
    if w.flops <= 0:
        raise ValueError("throughput needs a workload with a FLOP count")
    w()  # warm-up: kernels chosen, caches and FP8 scales filled
    with Timer(w.device) as t:
        w.fn()
    reps = max(1, int(min_seconds / max(t.seconds, 1e-9)))
    rates = []
    for _ in range(rounds):
        with Timer(w.device) as t:
            for _ in range(reps):
                w.fn()
        rates.append(w.flops * reps / t.seconds)
    return statistics.median(rates)
