"""bench/check_model.py at a tiny size: the bare loop and check-model's step on the same model, their ratio,
and check-model's seconds by part, with the reference read from the cache the second time."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import check_model as bench  # noqa: E402


def test_bench_prints_ratios_and_where_the_seconds_go(tmp_path: Path, capsys, monkeypatch) -> None:
    out = tmp_path / "b.json"
    import torch
    ratios = bench.step_ratios

    def ratios_then_cuda_started(*a, **k):  # on a GPU the step ratios start CUDA in the bench's process,
        rows = ratios(*a, **k)  # after which check-model can no longer fork its workers
        monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
        return rows
    monkeypatch.setattr(bench, "step_ratios", ratios_then_cuda_started)
    assert bench.main(["--model", "example", "--steps", "4", "--device", "cpu", "--strategy", "fp32",
                       "--strategy", "fp16-gradscaler", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = {r["strategy"]: r for r in res["steps_ratio"]}
    assert list(rows) == ["fp32", "fp16-gradscaler"]
    for r in rows.values():
        assert r["bare_ms"] > 0 and r["harness_ms"] > 0 and r["ratio"] == r["harness_ms"] / r["bare_ms"]
    cold, warm = res["cold cache"], res["warm cache"]
    assert cold["references_computed"] == 1 and warm["references_computed"] == 0  # the reference, kept on disk
    assert cold["verdicts"] == warm["verdicts"] == {"fp32": "pass", "fp16-gradscaler": "pass"}
    assert res["start_up"] > 0 and cold["reference"] > 0
    assert "worker process" in cold["isolation"]  # check-model ran before the ratios started CUDA
    text = capsys.readouterr().out
    assert "ratio" in text and "check-model, warm cache" in text


def test_bench_profiles_the_bare_loop_and_the_harness_step(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    assert bench.main(["--model", "example", "--steps", "2", "--device", "cpu", "--strategy", "bf16", "--no-check",
                       "--no-ratios", "--profile", "--json", str(out)]) == 0
    prof = json.loads(out.read_text())["profile"]
    assert list(prof) == ["bare", "bare, deterministic kernels", "harness"]
    for rows in prof.values():  # the model's own matmuls are among the top kernels of every loop
        assert rows and all(r["calls"] >= 1 for r in rows)
        assert any(r["kernel"] in ("aten::mm", "aten::addmm") for r in rows)
        # 4 updates less 1: the optimizer stepped 3 times, and the model's copy (set-up) cancelled
        assert {r["kernel"]: r["calls"] for r in rows}.get("Optimizer.step#AdamW.step") == 3, rows


def test_loops_take_turns_and_the_ratio_is_the_median_of_paired_ratios() -> None:
    """Fake loops whose time is exact (c + a*n seconds): per update is a, the fixed cost c cancels; the loops
    alternate within each repeat; a drift that slows both loops alike in one repeat leaves the paired ratio."""
    calls: list[str] = []
    drift = iter([1.0] * 6 + [3.0] * 4 + [1.0] * 4)  # the second repeat runs 3x slower, for both loops

    def loop(name: str, a: float, c: float):
        def run(n: int) -> float:
            calls.append(name)
            return (c + a * n) * next(drift)
        return run
    t = bench.interleaved({"bare": loop("bare", 0.010, 0.5), "harness": loop("harness", 0.012, 2.0)}, 20, 3)
    # warm-up once each (2 calls), then per repeat each loop twice (20 and 2 updates), turn by turn
    assert calls == ["bare", "harness"] + ["bare", "bare", "harness", "harness"] * 3
    assert [round(x, 12) for x in t["bare"]] == [0.010, 0.030, 0.010]
    assert [round(x, 12) for x in t["harness"]] == [0.012, 0.036, 0.012]
    assert abs(bench._paired(t["harness"], t["bare"]) - 1.2) < 1e-9


def test_the_profile_keeps_what_the_updates_add_not_the_set_up(monkeypatch) -> None:
    """steps+1 updates less 1 update, per kernel: the model's copy to the device (148 transfers in the H100's
    GPT-2 profile, every one in the set-up) cancels; the GEMMs of 3 updates remain."""
    import torch
    fake = {4: {"Memcpy HtoD": (60.0, 148), "aten::mm": (20.0, 400)},
            1: {"Memcpy HtoD": (60.0, 148), "aten::mm": (5.0, 100)}}
    monkeypatch.setattr(bench, "_kernel_times", lambda run, n, device: fake[n])
    monkeypatch.setattr(bench, "bare_loop", lambda *a, **k: 0.0)
    monkeypatch.setattr(bench, "harness_loop", lambda *a, **k: 0.0)
    from harness.core.strategy import PRESETS
    prof = bench.profile_steps(None, PRESETS["bf16"], torch.device("cpu"), steps=3)
    assert all(rows == [{"kernel": "aten::mm", "ms": 15.0, "calls": 300}] for rows in prof.values()), prof


def test_a_row_gives_the_median_ratio_and_the_range_of_the_repeats(monkeypatch) -> None:
    """step_ratios over fake loops: per update 10 ms bare; the harness 12, 15, 12 ms in the three repeats
    (a slow repeat of the harness alone): ratio 1.2 (the median), spread 1.2 to 1.5, medians in ms."""
    import torch
    from harness.core.strategy import PRESETS
    harness_a = iter([0.012] + [0.012] * 2 + [0.015] * 2 + [0.012] * 2)  # warm-up, then 2 runs a repeat
    monkeypatch.setattr(bench, "bare_loop", lambda spec, ex, n, deterministic=False: 0.3 + 0.010 * n)
    monkeypatch.setattr(bench, "harness_loop", lambda spec, ex, n, deterministic=True: 0.7 + next(harness_a) * n)
    (row,) = bench.step_ratios(None, [PRESETS["bf16"]], torch.device("cpu"), 20, 3)
    assert row["repeats"] == 3 and abs(row["ratio"] - 1.2) < 1e-9
    assert [round(x, 9) for x in row["ratio_spread"]] == [1.2, 1.5]
    assert abs(row["bare_ms"] - 10.0) < 1e-6 and abs(row["harness_ms"] - 12.0) < 1e-6 and "bare_det_ms" not in row
