"""bench/sharding.py's comparison of kept runs (``--from DIR``): speed-up, record differences, and where
the sharded run spent its extra time, on two hand-made run directories."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from harness.results import RunWriter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import sharding  # noqa: E402


def _rec(case: str, strategy: str, seconds: float, peak: int, outcome: str = "pass") -> dict:
    return {"schema_version": 1, "scenario": case.split("[")[0], "case": case, "family": "reduction",
            "params": {}, "seed": 0, "strategy": strategy, "strategy_spec": strategy, "device": "cuda",
            "outcome": outcome, "reason": "", "metrics": {}, "seconds": seconds, "peak_bytes": peak}


def _write(d: Path, recs: list[dict], summary: dict) -> None:
    (d / "records.jsonl").unlink(missing_ok=True)  # rewritten on purpose: a RunWriter never writes over a run
    w = RunWriter(d, {"environment": {"device": "cuda"}})
    for r in recs:
        w.append(r)
    w.close(summary)


@pytest.fixture
def kept(tmp_path: Path) -> Path:
    single = [_rec("a[n=1]", "fp32", 1.0, 100), _rec("a[n=1]", "bf16", 0.5, 100),
              _rec("b[n=2]", "fp32", 2.0, 200), _rec("b[n=2]", "bf16", 0.5, 200)]
    sharded = [_rec("a[n=1]", "fp32", 5.0, 100), _rec("a[n=1]", "bf16", 0.75, 100),  # start-up in a's fp32
               _rec("b[n=2]", "fp32", 4.0, 264), _rec("b[n=2]", "bf16", 0.5, 200)]  # and b's, one peak moved
    _write(tmp_path / "single", single, {"wall_seconds": 10.0, "seconds_in_scenarios": 4.0,
                                         "seconds_in_references": 1.0, "seconds_building_inputs": 0.5})
    ranks = [{"rank": 0, "cases": 1, "wall_seconds": 6.0}, {"rank": 1, "cases": 1, "wall_seconds": 6.5}]
    _write(tmp_path / "sharded-2-hinted", sharded, {"wall_seconds": 6.25, "seconds_in_scenarios": 8.0,
                                                    "seconds_in_references": 2.25, "seconds_building_inputs": 0.5,
                                                    "ranks": ranks})
    return tmp_path


def test_from_kept_runs_names_where_the_sharded_run_spent_more(kept: Path, capsys) -> None:
    assert sharding.main(["--from", str(kept)]) == 0
    out = capsys.readouterr().out
    assert "run     6.2 s -> speed-up 1.60x (run); target 1.8x" in out  # 10 / 6.25, no process walls known
    assert "rank 0: 1 cases, 6.0 s; rank 1: 1 cases, 6.5 s (max/mean 1.040)" in out
    assert "records differ from the single run in: none" in out  # seconds and peak_bytes are measurements
    assert "in scenarios 4.0 -> 8.0 s, in references 1.0 -> 2.2 s, building inputs 0.5 -> 0.5 s" in out
    assert ("records' seconds: +6.2 s in all; largest +4.00 s a[n=1] fp32; +2.00 s b[n=2] fp32; "
            "the other 2 records +0.2 s") in out
    assert "peak_bytes differs in 1 of 4 records" in out
    assert sharding.main(["--from", str(kept), "--check"]) == 1  # 1.60x is below the target


def test_from_kept_runs_counts_a_changed_outcome_and_rejects_a_bad_dir(kept: Path, capsys) -> None:
    recs = [dict(r) for r in sharding.read_run(kept / "sharded-2-hinted")[1]]
    recs[3]["outcome"] = "diverged"
    _write(kept / "sharded-2-hinted", recs, sharding.read_run(kept / "sharded-2-hinted")[0]["summary"])
    assert sharding.main(["--from", str(kept)]) == 0
    assert 'records differ from the single run in: {"outcome": 1}' in capsys.readouterr().out
    assert sharding.main(["--from", str(kept / "nothing")]) == 2
    assert "expected the folders single/ and sharded-2-*/" in capsys.readouterr().err


def test_from_kept_runs_compares_single_runs_made_at_once_with_the_one_alone(kept: Path, capsys) -> None:
    base = [_rec("a[n=1]", "fp32", 1.0, 100)]
    _write(kept / "concurrent-0", base, {"wall_seconds": 10.5})
    _write(kept / "concurrent-1", base, {"wall_seconds": 9.0})
    assert sharding.main(["--from", str(kept)]) == 0
    out = capsys.readouterr().out
    assert "2 single-process runs at once (one GPU each): run 10.5, 9.0 s = 1.05x, 0.90x the run alone" in out


def test_concurrent_runs_each_get_their_own_gpu(tmp_path: Path, monkeypatch) -> None:
    """Popen is replaced: each process must be told a different visible GPU, in the user's own list."""
    seen: list[str] = []

    class Done:
        def __init__(self, cmd, env, stderr, **kw):
            seen.append(env["CUDA_VISIBLE_DEVICES"])
            stderr.write("a warning\n")
            out = Path(cmd[cmd.index("--out") + 1])
            _write(out, [_rec("a[n=1]", "fp32", 1.0, 100)], {"wall_seconds": 1.0})

        def wait(self) -> int:
            return 0

    monkeypatch.setattr(sharding.subprocess, "Popen", Done)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    runs = sharding._run_concurrent(["--device", "cuda"], tmp_path, 2, "cuda")
    assert seen == ["3", "5"] and [r["run_s"] for r in runs] == [1.0, 1.0]
    assert (tmp_path / "stderr-concurrent-1.txt").read_text() == "a warning\n"


def test_repeat_measures_the_speed_up_against_the_second_single_run(kept: Path, capsys) -> None:
    recs = sharding.read_run(kept / "single")[1]
    _write(kept / "single-again", recs, {"wall_seconds": 9.0, "seconds_in_scenarios": 4.0,
                                         "seconds_in_references": 1.0, "seconds_building_inputs": 0.5})
    assert sharding.main(["--from", str(kept), "--repeat"]) == 0
    out = capsys.readouterr().out
    assert "1 rank, again: run     9.0 s (the baseline below" in out
    assert "run     6.2 s -> speed-up 1.44x (run)" in out  # 9.0 / 6.25, not 10.0 / 6.25
    assert "two single-process runs differ in (records per field): none" in out
