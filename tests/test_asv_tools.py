"""The asv side: benchmark discovery, the quick-matrix summary, the gate, tidy, machine info and the
history plot, on constructed asv result files with known numbers (and on the repository's own)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from harness.report.asv_history import FAILURE_RATE, THROUGHPUT, history_svg, load_results, read_result_file

ROOT = Path(__file__).resolve().parent.parent
COLS = ["result", "params", "version", "started_at", "duration"]
GEMM_TIME = "bench_ops.Gemm.time_gemm"
STRATS = ["fp32", "fp16", "bf16"]


def _tool(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


gate = _tool("asv_gate")
asv_env = _tool("asv_env")


def write_result(root: Path, machine: str, commit: str, date: int, benches: dict[str, tuple],
                 env: str = "existing-py3.11", **params: str) -> Path:
    """An asv (format 2) result file; ``benches[name] = (values, grid, version)``."""
    mdir = root / machine
    mdir.mkdir(parents=True, exist_ok=True)
    (mdir / "machine.json").write_text(json.dumps({"machine": machine, "version": 1}))
    results = {name: [vals, [[repr(p) for p in axis] for axis in grid], ver, 0, 1.0]
               for name, (vals, grid, ver) in benches.items()}
    d = {"commit_hash": commit, "env_name": env, "date": date, "python": "3.11", "requirements": {},
         "params": {"machine": machine, "python": "3.11", **params}, "env_vars": {}, "result_columns": COLS,
         "results": results, "durations": {}, "version": 2}
    path = mdir / f"{commit[:8]}-{env}.json"
    path.write_text(json.dumps(d))
    return path


def benches(time: list, tflops: list, rate: list, version: str = "1") -> dict[str, tuple]:
    return {GEMM_TIME: (time, [STRATS], version), THROUGHPUT: (tflops, [STRATS], version),
            FAILURE_RATE: (rate, [STRATS], version)}


@pytest.fixture
def results(tmp_path: Path) -> Path:
    """Two commits on one CPU machine; benchmarks.json gives the units."""
    root = tmp_path / "asv"
    write_result(root, "cpu-x", "a" * 40, 1000, benches([0.25, 0.5, 0.5], [64.0, 32.0, 32.0], [0.0, 25.0, 12.5]),
                 gpu="none", torch="2.13.0+cpu", cuda="none")
    write_result(root, "cpu-x", "b" * 40, 2000, benches([0.25, 0.5, 0.5], [64.0, 32.0, 32.0], [0.0, 25.0, 12.5]),
                 gpu="none", torch="2.13.0+cpu", cuda="none")
    info = {GEMM_TIME: {"unit": "seconds", "version": "1"}, THROUGHPUT: {"unit": "TFLOP/s", "version": "1"},
            FAILURE_RATE: {"unit": "%", "version": "1"}, "version": 2}
    (root / "benchmarks.json").write_text(json.dumps(info))
    return root


def run_gate(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    rc = gate.main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


# -- reading results -------------------------------------------------------------------------------------
def test_read_result_file_keys_values_by_params(results: Path) -> None:
    r = read_result_file(results / "cpu-x" / "aaaaaaaa-existing-py3.11.json")
    assert (r.machine, r.commit, r.date, r.short) == ("cpu-x", "a" * 40, 1000, "aaaaaaaa")
    assert r.values[GEMM_TIME] == {("fp32",): 0.25, ("fp16",): 0.5, ("bf16",): 0.5}
    assert r.versions[THROUGHPUT] == "1" and r.params["torch"] == "2.13.0+cpu"


def test_read_result_file_rejects_other_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        read_result_file(tmp_path / "x.json")
    (tmp_path / "y.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not an asv result file"):
        read_result_file(tmp_path / "y.json")
    with pytest.raises(ValueError, match="no such directory"):
        load_results(tmp_path / "missing")
    with pytest.raises(ValueError, match="no asv result files"):
        load_results(tmp_path)


# -- the gate --------------------------------------------------------------------------------------------
def test_gate_passes_identical_results(results: Path, capsys: pytest.CaptureFixture) -> None:
    rc, out, _ = run_gate(capsys, "aaaa", "bbbb", "--results-dir", str(results))
    assert rc == 0
    assert out.strip().splitlines()[-1] == ("asv gate: 0 regression(s) beyond x1.5 in 9 values "
                                           "(cpu-x aaaaaaaa -> cpu-x bbbbbbbb)")


def test_gate_flags_slower_time_lower_throughput_and_new_failures(results: Path, capsys: pytest.CaptureFixture) -> None:
    write_result(results, "cpu-x", "c" * 40, 3000,
                 benches([0.25, 1.0, 0.5], [64.0, 32.0, 8.0], [2.5, 25.0, 12.5]))
    rc, out, _ = run_gate(capsys, "aaaa", "cccc", "--results-dir", str(results))
    assert rc == 1
    regressions = [line for line in out.splitlines() if line.startswith("REGRESSION")]
    assert regressions == [
        "REGRESSION bench_matrix.FailureRate.track_failure_rate(fp32): 0 -> 2.5 % (xinf worse)",
        "REGRESSION bench_ops.Gemm.time_gemm(fp16): 0.5 -> 1 seconds (x2.00 worse)",
        "REGRESSION bench_ops.Gemm.track_tflops(bf16): 32 -> 8 TFLOP/s (x4.00 worse)",
    ]
    # a factor of 4 tolerates the 2x and the 4x, never a rise from zero
    rc, out, _ = run_gate(capsys, "aaaa", "cccc", "--results-dir", str(results), "--factor", "4")
    assert rc == 1 and out.count("REGRESSION") == 1


def test_gate_higher_throughput_and_lower_time_are_improvements(results: Path, capsys: pytest.CaptureFixture) -> None:
    write_result(results, "cpu-x", "c" * 40, 3000,
                 benches([0.125, 0.5, 0.5], [256.0, 32.0, 32.0], [0.0, 25.0, 12.5]))
    rc, out, _ = run_gate(capsys, "aaaa", "cccc", "--results-dir", str(results))
    assert rc == 0
    assert "improved   bench_ops.Gemm.time_gemm(fp32): 0.25 -> 0.125 seconds (x2.00 better)" in out
    assert "improved   bench_ops.Gemm.track_tflops(fp32): 64 -> 256 TFLOP/s (x4.00 better)" in out


def test_gate_failed_is_a_regression_skipped_and_new_version_are_notes(results: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    new = benches([0.25, None, math.nan], [64.0, 32.0, 32.0], [0.0, 25.0, 12.5])
    new[FAILURE_RATE] = ([0.0, 50.0, 50.0], [STRATS], "2")
    write_result(results, "cpu-x", "c" * 40, 3000, new)
    rc, out, _ = run_gate(capsys, str(results / "cpu-x" / "aaaaaaaa-existing-py3.11.json"),
                          str(results / "cpu-x" / "cccccccc-existing-py3.11.json"), "--results-dir", str(results))
    assert rc == 1
    assert "REGRESSION bench_ops.Gemm.time_gemm(fp16): 0.5 seconds -> failed" in out
    assert "note       bench_ops.Gemm.time_gemm(bf16): skipped in cccccccc" in out
    assert "note       bench_matrix.FailureRate.track_failure_rate: version changed (1 -> 2), not compared" in out
    assert out.count("REGRESSION") == 1


def test_gate_does_not_gate_a_track_without_a_direction(results: Path, capsys: pytest.CaptureFixture) -> None:
    records = "bench_matrix.Runner.track_records"
    info = json.loads((results / "benchmarks.json").read_text())
    info[records] = {"unit": "records", "version": "1"}
    (results / "benchmarks.json").write_text(json.dumps(info))
    for commit, n in (("c" * 40, 247.0), ("d" * 40, 819.0)):
        write_result(results, "cpu-x", commit, 3000, {records: ([n], [], "1"), GEMM_TIME: ([0.25, 0.5, 0.5], [STRATS], "1")})
    rc, out, _ = run_gate(capsys, "cccc", "dddd", "--results-dir", str(results))
    assert rc == 0 and "in 3 values" in out
    assert f"note       {records}: unit 'records' says neither higher nor lower is better, not gated" in out


def test_gate_bench_filter(results: Path, capsys: pytest.CaptureFixture) -> None:
    write_result(results, "cpu-x", "c" * 40, 3000, benches([1.0, 1.0, 1.0], [64.0, 32.0, 32.0], [0.0, 25.0, 12.5]))
    rc, out, _ = run_gate(capsys, "aaaa", "cccc", "--results-dir", str(results), "--bench", "track_")
    assert rc == 0 and "in 6 values" in out


@pytest.mark.parametrize("args, message", [
    (["aaaa"], "required: NEW"),
    (["aaaa", "bbbb", "--factor", "0.9"], "must be a finite number >= 1, got 0.9"),
    (["aaaa", "bbbb", "--factor", "x"], "'x' is not a number"),
    (["aaaa", "dddd"], "no asv results for commit dddd"),
    (["aaaa", "zz"], "'zz' is neither a result file nor a commit hash"),
    (["aaaa", "nothere.json"], "nothere.json: no such result file"),
    (["aaaa", "bbbb", "--bench", "("], "not a regular expression"),
    (["aaaa", "bbbb", "--bench", "nomatch"], "share no benchmark value to compare matching 'nomatch'"),
])
def test_gate_bad_input_is_one_line_and_exit_2(results: Path, capsys: pytest.CaptureFixture, args: list,
                                               message: str) -> None:
    rc, out, err = run_gate(capsys, *args, "--results-dir", str(results))
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and message in err


def test_gate_ambiguous_commit_needs_machine(results: Path, capsys: pytest.CaptureFixture) -> None:
    write_result(results, "nvidia-h200", "a" * 40, 1000, benches([0.25, 0.5, 0.5], [50.0, 700.0, 700.0], [0.0, 25.0, 12.5]))
    rc, _, err = run_gate(capsys, "aaaa", "bbbb", "--results-dir", str(results))
    assert rc == 2 and "ambiguous" in err and "cpu-x:aaaaaaaa, nvidia-h200:aaaaaaaa" in err
    rc, out, _ = run_gate(capsys, "aaaa", "bbbb", "--results-dir", str(results), "--machine", "cpu-x")
    assert rc == 0 and "in 9 values" in out


# -- tidy and machine info -----------------------------------------------------------------------------
def test_tidy_renames_path_named_environments_and_merges(results: Path) -> None:
    local = "existing-py_home_me_proj_.venv_bin_python"
    old = write_result(results, "cpu-x", "b" * 40, 2000, {GEMM_TIME: ([1.0, 1.0, 1.0], [STRATS], "1")}, env=local)
    moved = asv_env.tidy(results, python="3.11")
    target = results / "cpu-x" / "bbbbbbbb-existing-py3.11.json"
    assert moved == [(old, target)] and not old.exists()
    d = json.loads(target.read_text())
    assert (d["env_name"], d["python"], d["params"]["python"]) == ("existing-py3.11", "3.11", "3.11")
    # the newer file's benchmark replaced the older's; the others were kept
    r = read_result_file(target)
    assert r.values[GEMM_TIME] == {("fp32",): 1.0, ("fp16",): 1.0, ("bf16",): 1.0}
    assert r.values[THROUGHPUT][("fp32",)] == 64.0
    assert asv_env.tidy(results) == []


def test_machine_info_records_gpu_torch_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import torch
    info = asv_env.machine_info()
    assert info["torch"] == torch.__version__
    assert info["cuda"] == str(torch.version.cuda or "none")
    if not torch.cuda.is_available():
        assert info["gpu"] == "none"
        assert info["machine"] == f"cpu-{asv_env._slug(info['cpu'])[:40]}-{os.cpu_count()}c"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert asv_env.main(["machine", "--name", "box-1"]) == 0
    saved = json.loads((tmp_path / ".asv-machine.json").read_text())
    assert saved["box-1"]["torch"] == torch.__version__ and saved["box-1"]["machine"] == "box-1"
    assert asv_env.main(["machine", "--name", "a/b"]) == 2
    assert asv_env.main(["tidy", "--results-dir", str(tmp_path / "none")]) == 2


# -- the history plot ------------------------------------------------------------------------------------
def test_history_svg_draws_every_machine_and_commit_and_is_pure(results: Path) -> None:
    write_result(results, "nvidia-h200", "c" * 40, 3000, benches([0.002, 0.001, 0.001], [50.0, 700.0, 700.0],
                                                                 [0.0, 20.0, 10.0]), gpu="NVIDIA H200", torch="2.11.0")
    write_result(results, "cpu-x", "d" * 40, 4000, benches([0.25, 0.5, 0.5], [1, 1, 1], [0, 0, 0], version="0"))
    before = sorted((p, p.stat().st_mtime_ns) for p in results.rglob("*"))
    svg = history_svg(results)
    assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
    assert svg == history_svg(results)  # deterministic
    assert sorted((p, p.stat().st_mtime_ns) for p in results.rglob("*")) == before  # wrote nothing
    for text in ("cpu-x", "nvidia-h200 · gpu NVIDIA H200 · torch 2.11.0", "aaaaaaaa", "bbbbbbbb", "cccccccc",
                 "fp16", "GEMM TFLOP/s", "failure rate"):
        assert text in svg
    assert "dddddddd" not in svg  # an old benchmark version is not drawn with the current one


def test_history_svg_of_the_repository_results() -> None:
    """The committed histories (results/asv: the CPU's and the H200's) render, with a point for each of
    their commits, and each machine has FP16 and BF16 failure rates (a result of one asv call may hold
    only the benchmarks it ran, as the H200's second commit holds bench_ops alone)."""
    rs = load_results(ROOT / "results" / "asv")
    svg = history_svg(ROOT / "results" / "asv")
    assert {r.machine for r in rs} >= {"cpu-amd-epyc-2c", "nvidia-h200"}
    for r in rs:
        assert r.machine in svg and r.short in svg
    for machine in {r.machine for r in rs}:
        rates = [r.values[FAILURE_RATE] for r in rs if r.machine == machine and FAILURE_RATE in r.values]
        assert any({k[0] for k in v} >= {"fp16", "fp16-dynamic", "bf16", "fp8-tensorwise"} for v in rates)


# -- the benchmarks themselves ---------------------------------------------------------------------------
def test_discover_skips_the_benchmarks_package() -> None:
    code = ("import sys; from harness.core.scenario import discover; discover(); "
            "print(sorted(m for m in sys.modules if m.startswith('suites.benchmarks')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_asv_discovers_the_benchmarks(tmp_path: Path) -> None:
    """asv's own discovery (in a subprocess, as asv runs it) finds the names, units and versions the
    history plot and the gate rely on."""
    import asv
    out = tmp_path / "benchmarks.json"
    proc = subprocess.run([sys.executable, str(Path(asv.__file__).parent / "benchmark.py"), "discover",
                           str(ROOT / "suites" / "benchmarks"), str(out)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    found = {b["name"]: b for b in json.loads(out.read_text())}
    assert found[THROUGHPUT]["unit"] == "TFLOP/s" and found[FAILURE_RATE]["unit"] == "%"
    assert {"'fp16'", "'fp16-dynamic'", "'bf16'", "'fp8-tensorwise'"} <= set(found[FAILURE_RATE]["params"][0])
    kinds = {n.rsplit(".", 1)[-1].split("_")[0] for n in found}
    assert kinds == {"time", "peakmem", "track"}
    assert {b["version"] for b in found.values()} == {"1"}
    for op in ("time_gemm", "time_softmax", "time_layer_norm", "time_train_step", "track_worst_error"):
        assert any(n.endswith(op) for n in found), op


def test_summarize_quick_matrix_numbers() -> None:
    from suites.benchmarks.bench_matrix import FailureRate, WorstError, summarize
    by_strategy = {"fp16": {"pass": 3, "diverged": 1}, "bf16": {"pass": 2, "overflow": 2, "unsupported": 4},
                   "fp8-tensorwise": {"unsupported": 5}}
    records = [{"family": "reduction", "strategy": "fp16", "metrics": {"rel_err": 0.25, "grad_rel_err": 0.5}},
               {"family": "reduction", "strategy": "fp16", "metrics": {"rel_err": "inf"}},
               {"family": "reduction", "strategy": "bf16", "metrics": {"rel_err": 0.125}},
               {"family": "tiny_gradient", "strategy": "fp16", "metrics": {}}]
    s = summarize(by_strategy, records, {"records": 20, "wall_seconds": 1.5, "bookkeeping_ms_per_record": 0.25})
    assert s["failure_rate"] == {"fp16": 25.0, "bf16": 50.0, "fp8-tensorwise": None}
    assert s["worst_error"] == {"reduction": {"fp16": 0.5, "bf16": 0.125}}
    assert (s["records"], s["wall_seconds"], s["bookkeeping_ms_per_record"]) == (20, 1.5, 0.25)
    assert FailureRate().track_failure_rate(s, "bf16") == 50.0
    with pytest.raises(NotImplementedError, match="no case judged"):
        FailureRate().setup(s, "fp8-tensorwise")
    assert WorstError().track_worst_error(s, "reduction", "fp16") == 0.5
    with pytest.raises(NotImplementedError):
        WorstError().setup(s, "tiny_gradient", "fp16")


def test_history_script_rejects_bad_input() -> None:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for args, message in ((["--bogus"], "unknown option --bogus"), (["no-such-rev"], "is not a commit"),
                          (["HEAD..HEAD"], "selects no commit"), (["--machine"], "--machine needs a name")):
        p = subprocess.run(["bash", str(ROOT / "tools" / "asv_history.sh"), *args], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.startswith("error: ") and message in p.stderr, (args, p.stderr)
