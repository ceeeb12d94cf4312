"""bench/tradeoff.py --measure: each recipe's training step timed against BF16's, joined with its failure rate
in a run (CPU: small sizes, the code path, not a measurement)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from harness.core.strategy import parse
from harness.results import RunWriter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import step_time  # noqa: E402
import tradeoff  # noqa: E402


def _rec(strategy: str, outcome: str, case: str) -> dict:
    return {"schema_version": 1, "scenario": "s", "case": case, "family": "tiny_gradient", "params": {}, "seed": 0,
            "strategy": strategy, "strategy_spec": str(parse(strategy)), "device": "cpu", "outcome": outcome,
            "reason": "r", "metrics": {}, "seconds": 0.0}


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    w = RunWriter(tmp_path / "run", {"environment": {"device": "cpu"}})
    for i, (s, o) in enumerate([("bf16", "pass"), ("bf16", "pass"), ("fp8-tensorwise", "underflow"),
                                ("fp8-tensorwise", "pass"), ("fp8-tensorwise", "unsupported"), ("fp8-delayed", "diverged")]):
        w.append(_rec(s, o, f"c{i}"))
    w.close({})
    return tmp_path / "run"


def test_the_step_trains_the_block_through_the_strategys_gemms() -> None:
    sizes = step_time.Sizes(d=16, tokens=32, iters=2, warm=1)
    row = step_time.time_step(parse("fp8-tensorwise"), torch.device("cpu"), sizes)
    assert row["ms"] > 0 and (row["d"], row["tokens"], row["iters"]) == (16, 32, 2)
    assert any("fp8 emulated" in n for n in row["notes"])
    block = step_time.MLPBlock(16)
    assert (block.fc1.weight.shape, block.fc2.weight.shape) == ((64, 16), (16, 64))
    bad = step_time.time_step(parse("compute=fp16,reduction=reduced"), torch.device("cpu"), sizes)
    assert "ms" not in bad and "cuBLAS" in bad["unsupported"]


def test_measure_joins_step_times_and_each_strategys_failure_rate(run_dir: Path, tmp_path: Path) -> None:
    out, md = tmp_path / "t.json", tmp_path / "t.md"
    assert tradeoff.main(["--run", str(run_dir), "--measure", "--d", "16", "--tokens", "32", "--iters", "1",
                          "--out", str(out), "--markdown", str(md)]) == 0
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["recipes"]}
    assert list(rows) == ["bf16", "fp8-tensorwise", "fp8-delayed"]  # bf16 first, then the run's FP8 strategies
    assert rows["bf16"]["speedup_vs_bf16"] == 1.0
    tw = rows["fp8-tensorwise"]
    assert (tw["failures"], tw["judged"], tw["rate"]) == (1, 2, 0.5)  # unsupported is not judged
    assert tw["speedup_vs_bf16"] == pytest.approx(rows["bf16"]["ms"] / tw["ms"])
    assert (rows["fp8-delayed"]["failures"], rows["fp8-delayed"]["judged"]) == (1, 1)
    text = md.read_text()
    assert "recipes: training-step speed against failure rate" in text and "1/2 50.0%" in text


def test_a_strategy_the_run_lacks_has_no_failure_rate_and_bad_input_exits_2(run_dir: Path, tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "t.json"
    assert tradeoff.main(["--run", str(run_dir), "--measure", "--strategy", "compute=fp16,reduction=reduced",
                          "--d", "16", "--tokens", "32", "--iters", "1", "--out", str(out)]) == 0
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["recipes"]}
    odd = rows["compute=fp16,apply=autocast,params=fp32,master=no,scaler=none,reduction=reduced,fp8=none"]
    assert odd["judged"] == 0 and odd["rate"] is None and odd["speedup_vs_bf16"] is None and "unsupported" in odd
    assert tradeoff.main(["--run", str(run_dir), "--measure", "--strategy", "fp9"]) == 2
    assert "unknown strategy 'fp9'" in capsys.readouterr().err
    assert tradeoff.main(["--run", str(run_dir)]) == 2
    assert "--throughput" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_fp8_and_fp4_preset_steps_on_the_gpu(run_dir: Path, tmp_path: Path) -> None:
    from harness.core.strategy import PRESETS
    names = [n for n, s in PRESETS.items() if s.compute in ("fp8", "fp4")]
    out = tmp_path / "t.json"
    args = ["--run", str(run_dir), "--measure", "--device", "cuda", "--d", "256", "--tokens", "512", "--iters", "2",
            "--out", str(out)]
    assert tradeoff.main(args + [a for n in names for a in ("--strategy", n)]) == 0
    rows = {r["strategy"]: r for r in json.loads(out.read_text())["recipes"]}
    assert set(rows) == {"bf16", *names} and rows["bf16"]["ms"] > 0
    for n in names:  # a step time, or the reason the GPU cannot run it: never a crash
        assert rows[n].get("ms", 0) > 0 or rows[n]["unsupported"], rows[n]
