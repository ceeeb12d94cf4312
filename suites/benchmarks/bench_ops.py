"""Speed and memory of the ops every scenario is made of, per strategy: GEMM, softmax, layer norm and a
training step (``_ops`` builds them; sizes suit the device; CUDA is synchronized after every call).

A strategy the device cannot run (FP8 before sm_89, say) is skipped: setup raises NotImplementedError.
Bump ``version`` when what a benchmark measures changes (sizes, op, strategy list): asv then starts a
new history instead of comparing unlike numbers.
"""
from __future__ import annotations

from . import _ops


class _Timed:
    """Shared asv settings: few, short samples (the CPU machine is small and shared)."""

    params = [list(_ops.OP_STRATEGIES)]
    param_names = ["strategy"]
    rounds = 1
    repeat = (1, 5, 2.0)
    warmup_time = 0.05
    timeout = 300
    version = "1"
    work: _ops.Workload

    def _make(self, strategy: str) -> _ops.Workload:
        raise NotImplementedError

    def setup(self, strategy: str) -> None:
        self.work = self._make(strategy)
        self.work()  # first call outside the timing: kernel selection, lazy init


class Gemm(_Timed):
    def _make(self, strategy: str) -> _ops.Workload:
        dev = _ops.device()
        return _ops.gemm(_ops.execution(strategy, dev), _ops.sizes(dev).gemm)

    def time_gemm(self, strategy: str) -> None:
        self.work()

    def peakmem_gemm(self, strategy: str) -> None:
        self.work()

    def track_tflops(self, strategy: str) -> float:
        """Median TFLOP/s of the GEMM (the DESIGN target compares it with the device's ceiling)."""
        return _ops.throughput(self.work) / 1e12

    track_tflops.unit = "TFLOP/s"  # type: ignore[attr-defined]


class Softmax(_Timed):
    def _make(self, strategy: str) -> _ops.Workload:
        dev = _ops.device()
        s = _ops.sizes(dev)
        return _ops.softmax(_ops.execution(strategy, dev), s.rows, s.cols)

    def time_softmax(self, strategy: str) -> None:
        self.work()


class LayerNorm(_Timed):
    def _make(self, strategy: str) -> _ops.Workload:
        dev = _ops.device()
        s = _ops.sizes(dev)
        return _ops.layer_norm(_ops.execution(strategy, dev), s.rows, s.cols)

    def time_layer_norm(self, strategy: str) -> None:
        self.work()


class TrainStep(_Timed):
    params = [list(_ops.TRAIN_STRATEGIES)]

    def _make(self, strategy: str) -> _ops.Workload:
        dev = _ops.device()
        s = _ops.sizes(dev)
        return _ops.train_step(_ops.execution(strategy, dev), s.batch, s.width)

    def time_train_step(self, strategy: str) -> None:
        self.work()

    def peakmem_train_step(self, strategy: str) -> None:
        self.work()
