"""pytest-benchmark micro-benchmarks: the harness's hot paths and the per-strategy ops (docs/asv.md).

The normal test run executes each benchmarked call once (``--benchmark-disable`` in pyproject) and checks
what it computed, so a benchmark of wrong code fails as a test. Timed, and compared with a saved run::

    python -m pytest tests/test_bench.py --benchmark-enable --benchmark-only --benchmark-autosave
    python -m pytest tests/test_bench.py --benchmark-enable --benchmark-only --benchmark-compare \
        --benchmark-compare-fail=median:25%

On a GPU every timed call ends with a device synchronization (``sync``, and ``_ops.Workload`` for the
ops), so the times include the kernels, not just their launch.
"""
from __future__ import annotations

import json
import math
from typing import Any, Callable

import pytest
import torch

from harness.values.formats import FORMATS
from harness.judge.metrics import compare
from harness.run.reference import ReferenceCache
from harness.results import RunWriter, read_records
from harness.core.scaling import Scaler, parse_scaler
from harness.core.scenario import Case, Output, Scenario, seed_generator
from harness.run.timing import sync
from harness.judge.tolerance import bound
from suites.benchmarks import _ops

DEVICE = _ops.device()
SIZES = _ops.sizes(DEVICE)


class Counted:
    """A callable that counts its calls and synchronizes the device after each one."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn, self.calls = fn, 0

    def __call__(self) -> Any:
        self.calls += 1
        out = self.fn()
        sync(DEVICE)
        return out


# -- hot paths ----------------------------------------------------------------------------------------
def _sum_run(ex: Any, inp: dict, p: dict) -> Output:
    return Output(value=ex.act(inp["x"]).sum().float().reshape(1))


SUM = Scenario(name="bench_sum", family="reduction", description="a sum, for benchmarking the reference cache",
               grid={"n": [4096]}, inputs=lambda p, g: {"x": torch.rand(p["n"], generator=g)}, run=_sum_run,
               n=lambda p: p["n"])


def test_reference_cache_reuses(benchmark: Any) -> None:
    case = Case(SUM, {"n": 4096}, 0)
    inputs = {k: v.to(DEVICE) for k, v in SUM.inputs(case.params, seed_generator(case)).items()}
    cache = ReferenceCache()
    first = cache.get(case, inputs, DEVICE)
    get = Counted(lambda: cache.get(case, inputs, DEVICE))
    assert benchmark(get) is first
    assert (cache.computed, cache.reused) == (1, get.calls)
    assert first.format == "fp32"


def test_metrics_compare(benchmark: Any) -> None:
    """Every entry off by exactly 2^-10 relative, on powers of two: the errors are exact numbers."""
    ref = (2.0 ** torch.arange(-8.0, 8.0)).repeat(4096).to(DEVICE)  # exact powers (CPU pow)
    cand = ref * (1 + 2.0**-10)
    m = benchmark(Counted(lambda: compare(Output(value=cand), Output(value=ref), FORMATS["fp16"])))
    assert m["rel_err"] == m["max_rel_err"] == 2.0**-10
    assert m["ulp_err"] == 1.0  # 2^-10 relative is one FP16 ulp at a power of two
    assert m["sqnr_db"] == 20 * math.log10(2.0**10)
    assert (m["nonfinite"], m["underflow_frac"], m["numel"]) == (0, 0.0, 16 * 4096)


SCALER = parse_scaler("dynamic(init=2^16,growth=2,backoff=0.5,interval=2,min=1,max=2^24,hysteresis=1)")


def _scaler_steps() -> tuple[float, int, int]:
    """1000 updates, an overflow every 5th: +2 grows -1 backoff a cycle, capped at 2^24."""
    s = Scaler(SCALER)
    events = [s.update(i % 5 == 4) for i in range(1000)]
    return s.scale, sum(d.skipped for d in events), sum(d.event == "grow" for d in events)


def test_scaler_update(benchmark: Any) -> None:
    scale, skipped, grows = benchmark(_scaler_steps)
    # 7 cycles climb 2^16 -> 2^23 (two grows each); then each cycle grows once to the cap 2^24 and
    # backs off to 2^23, the second grow held by the cap: 7*2 + 193 grows, 200 skips, ends at 2^23
    assert (scale, skipped, grows) == (2.0**23, 200, 207)


def test_record_writing(benchmark: Any, tmp_path: Any) -> None:
    writer = RunWriter(tmp_path, {"bench": True})
    record = {"schema_version": 1, "scenario": "bench_sum", "case": "bench_sum[n=4096]", "family": "reduction",
              "params": {"n": 4096}, "seed": 0, "strategy": "fp16", "strategy_spec": "compute=fp16",
              "device": DEVICE.type, "outcome": "overflow", "reason": "output: 1 of 4096 values inf/NaN",
              "metrics": {"rel_err": math.inf, "nonfinite": 1, "sqnr_db": -math.inf}, "seconds": 0.001}
    append = Counted(lambda: writer.append(record))
    benchmark(append)
    writer.close({"records": append.calls})
    back = list(read_records(tmp_path / "records.jsonl"))
    assert len(back) == append.calls
    assert back[-1]["metrics"] == {"rel_err": "inf", "nonfinite": 1, "sqnr_db": "-inf"}
    assert json.loads((tmp_path / "run.json").read_text())["summary"] == {"records": append.calls}


# -- per-strategy ops ---------------------------------------------------------------------------------
def _execution(strategy: str) -> Any:
    try:
        return _ops.execution(strategy, DEVICE)
    except _ops.Unsupported as exc:
        pytest.skip(str(exc))


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def _check_reduced(strategy: str, err: float, n: int) -> None:
    """FP32 within its bound; a reduced format within its bound and visibly not FP32 (no silent upgrade):
    rounding to a format with unit roundoff u leaves a normwise error of about u/sqrt(3) > u/8."""
    s = _execution(strategy).strategy
    if not s.reduced:
        assert err <= bound(FORMATS["fp32"], n)
    else:
        assert s.format.u / 8 < err <= bound(s.format, n)


@pytest.mark.parametrize("strategy", _ops.OP_STRATEGIES)
def test_gemm(benchmark: Any, strategy: str) -> None:
    ex = _execution(strategy)
    w = _ops.gemm(ex, SIZES.gemm)
    out = benchmark(w)
    assert out.dtype == (torch.float32 if ex.dtype == torch.float32 else ex.dtype)
    a = _ops.randn(DEVICE, SIZES.gemm, SIZES.gemm, seed=1).double()
    b = _ops.randn(DEVICE, SIZES.gemm, SIZES.gemm, seed=2).double()
    # against the exact product of the unrounded operands: operand and output rounding both count
    _check_reduced(strategy, _rel_err(out, a @ b), SIZES.gemm)


@pytest.mark.parametrize("strategy", _ops.OP_STRATEGIES)
def test_softmax(benchmark: Any, strategy: str) -> None:
    ex = _execution(strategy)
    out = benchmark(_ops.softmax(ex, SIZES.rows, SIZES.cols))
    x = ex.act(_ops.randn(DEVICE, SIZES.rows, SIZES.cols)).double()
    # against FP64 on the same (rounded) logits: only the op's own rounding counts (measured: 2.4u in FP32, 0.43u in FP16)
    err = _rel_err(out, torch.softmax(x, dim=-1))
    assert err <= 8 * FORMATS[ex.strategy.activation_format].u


@pytest.mark.parametrize("strategy", _ops.OP_STRATEGIES)
def test_layer_norm(benchmark: Any, strategy: str) -> None:
    ex = _execution(strategy)
    out = benchmark(_ops.layer_norm(ex, SIZES.rows, SIZES.cols))
    x = ex.act(_ops.randn(DEVICE, SIZES.rows, SIZES.cols)).double()
    err = _rel_err(out, torch.nn.functional.layer_norm(x, (SIZES.cols,)))
    assert err <= 8 * FORMATS[ex.strategy.activation_format].u


@pytest.mark.parametrize("strategy", _ops.TRAIN_STRATEGIES)
def test_train_step(benchmark: Any, strategy: str) -> None:
    ex = _execution(strategy)
    loss, grads, decision = benchmark(_ops.train_step(ex, SIZES.batch, SIZES.width))
    assert math.isfinite(loss) and 0.5 < loss < 4  # MSE of two unit-variance tensors, about 1 + |y|^2
    assert not decision.skipped and decision.found_inf is False
    assert sorted(grads) == ["0.bias", "0.weight", "2.bias", "2.weight"]
    assert all(g.dtype == torch.float32 and bool(torch.isfinite(g).all()) for g in grads.values())
    assert decision.scale == (2.0**16 if ex.strategy.scaler.dynamic else 1.0)


def test_throughput_counts_flops() -> None:
    w = _ops.gemm(_execution("fp32"), 64)
    assert w.flops == 2 * 64**3
    rate = _ops.throughput(w, min_seconds=0.001, rounds=3)
    assert 1e6 < rate < 1e15  # a FLOP/s figure, not seconds or TFLOP/s
    with pytest.raises(ValueError, match="FLOP count"):
        _ops.throughput(_ops.softmax(_execution("fp32"), 4, 8))
