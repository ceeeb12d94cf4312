"""Sharding over torchrun ranks, the ring simulation, the real collectives, and the ``distributed`` family.

Exact numbers throughout: ring order decides an FP16 sum of 2048 and two ones; the scaler scenario's
ranks skip and back off on known steps; a 2-process gloo run (torchrun, as a user starts it) writes
the same records as one process, and the real collectives match the simulation bit for bit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from harness.distributed import claim_order, cost_hints, merge_run, merge_shard_lines, ring_all_reduce, \
    ring_reduce_scatter
from harness.distributed.sharding import COSTS_ENV, SHARDS, ShardFile
from harness.run.engine import RunConfig, run_header, run_matrix
from harness.core.execution import Execution
from harness.results import RunWriter, read_run
from harness.core.scenario import REGISTRY, discover
from harness.core.strategy import PRESETS, resolve

from conftest import ROOT, read_jsonl

STRATEGIES = ["fp32", "fp16", "fp16-dynamic", "bf16"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), extra.pop("PYTHONPATH", ""), os.environ.get("PYTHONPATH", "")) if p))
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def _run_args(out: Path, *more: str) -> list[str]:
    args = ["-m", "harness", "run", "--device", "cpu", "--quiet", "--out", str(out), *more]
    for s in STRATEGIES:
        args += ["--strategy", s]
    return args


def _strip(records: list[dict]) -> list[dict]:
    """Records without their timings, case by case (they are appended in the order cases finish): what a
    sharded run must reproduce exactly."""
    return sorted(({k: v for k, v in r.items() if k != "seconds"} for r in records),
                  key=lambda r: (r["case"], r["seed"], r["strategy"]))


# -- the ring simulation ---------------------------------------------------------------------------
def test_ring_order_decides_fp16_sums() -> None:
    # chunk c starts at rank c+1: chunk 0 = (1 + 1) + 2048 = 2050; chunks 1, 2 add each 1 to 2048
    # alone, and 2049 rounds to even (2048) in FP16
    xs = [torch.full((3,), 2048.0, dtype=torch.float16), torch.ones(3, dtype=torch.float16),
          torch.ones(3, dtype=torch.float16)]
    assert [s.tolist() for s in ring_reduce_scatter(xs)] == [[2050.0], [2048.0], [2048.0]]
    assert ring_all_reduce(xs).tolist() == [2050.0, 2048.0, 2048.0]
    assert ring_all_reduce(xs).dtype == torch.float16


def test_ring_all_reduce_pads_uneven_lengths_and_keeps_the_shape() -> None:
    xs = [torch.arange(10.0).reshape(2, 5) * (r + 1) for r in range(3)]  # 10 elements over 3 ranks
    y = ring_all_reduce(xs)
    assert y.shape == (2, 5)
    assert y.tolist() == (torch.arange(10.0).reshape(2, 5) * 6).tolist()


def test_reduce_scatter_needs_a_count_that_divides() -> None:
    with pytest.raises(ValueError, match="10 elements over 3 ranks"):
        ring_reduce_scatter([torch.zeros(10)] * 3)


# -- scheduling and merging --------------------------------------------------------------------------
def test_claim_order_is_costliest_first_unknown_first_ties_in_matrix_order() -> None:
    keys = ["a#0", "b#0", "c#0", "d#0", "e#0"]
    assert claim_order(keys, {"a#0": 1.0, "b#0": 5.0, "c#0": 1.0, "e#0": 3.0}) == [3, 1, 4, 0, 2]
    assert claim_order(keys, {}) == [0, 1, 2, 3, 4]


def _fake_run(d: Path, device: str, tier: str, seconds: dict[str, float], status: str = "complete") -> None:
    w = RunWriter(d, {"config": {"device": device, "tier": tier}})
    for key, s in seconds.items():
        case, seed = key.split("#")
        for strategy in ("fp32", "fp16"):
            w.append({"schema_version": 1, "scenario": case, "family": "reduction", "case": case, "seed": int(seed),
                      "strategy": strategy, "outcome": "pass", "metrics": {}, "seconds": s / 2})
    w.close({}, status=status)


def test_cost_hints_from_the_newest_matching_run_or_the_named_one(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(COSTS_ENV, raising=False)
    _fake_run(tmp_path / "1", "cpu", "full", {"x#0": 4.0})
    _fake_run(tmp_path / "2", "cpu", "full", {"x#0": 6.0, "y#0": 1.0})
    _fake_run(tmp_path / "3", "cuda", "full", {"x#0": 9.0})          # another device
    _fake_run(tmp_path / "4", "cpu", "full", {"x#0": 8.0}, "interrupted")  # not finished
    for i, name in enumerate("1234"):
        os.utime(tmp_path / name / "run.json", (1000 + i, 1000 + i))
    assert cost_hints("cpu", "full", tmp_path) == ({"x#0": 6.0, "y#0": 1.0}, str(tmp_path / "2"))
    assert cost_hints("cpu", "quick", tmp_path) == ({}, None)
    monkeypatch.setenv(COSTS_ENV, str(tmp_path / "3"))
    assert cost_hints("cpu", "full", tmp_path) == ({"x#0": 9.0}, str(tmp_path / "3"))
    monkeypatch.setenv(COSTS_ENV, "none")
    assert cost_hints("cpu", "full", tmp_path) == ({}, None)
    monkeypatch.setenv(COSTS_ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=COSTS_ENV):
        cost_hints("cpu", "full", tmp_path)


def test_merge_shard_lines_orders_slots_and_finds_what_a_dead_rank_lost() -> None:
    lines = [
        json.dumps({"claim": 2, "slots": [0, 1], "case": "c#0", "rank": 1, "host": "h1"}),
        json.dumps({"slot": [2, 0], "record": {"r": "2.0"}}),           # then rank 1 died in case 2
        json.dumps({"claim": 0, "slots": [0, 1], "case": "a#0", "rank": 0, "host": "h0"}),
        json.dumps({"slot": [0, 1], "record": {"r": "0.1"}}),
        json.dumps({"slot": [0, 0], "record": {"r": "0.0"}}),
        json.dumps({"slot": [0, 0], "record": {"r": "duplicate"}}),
        json.dumps({"claim": 1, "slots": [1], "case": "b#0", "rank": 0, "host": "h0"}),
        json.dumps({"released": 1}),                                     # rank 0 was stopped in case 1
        '{"slot": [3, 0], "rec',                                         # torn
    ]
    with pytest.warns(UserWarning, match="torn"):
        recs, lost = merge_shard_lines(lines)
    assert [recs[k][0]["r"] for k in sorted(recs)] == ["0.0", "0.1", "2.0"]
    assert all(json.loads(text) == rec for rec, text in recs.values())  # the text kept is the first record's
    assert [(i, j, c["rank"]) for i, j, c in lost] == [(2, 1, 1)]


def _config(tmp_path: Path, strategies: list[str]) -> RunConfig:
    reg = discover()
    return RunConfig(reg.select(["scaler_agreement"]), resolve(strategies), torch.device("cpu"), 1, "quick",
                     tmp_path / "run", timeout=None)


def test_merge_run_after_a_rank_died_then_resume_completes_it(tmp_path: Path) -> None:
    """Shards as two ranks leave them when rank 1 dies inside case 1 and torchrun stops rank 0."""
    cfg = _config(tmp_path, ["fp32", "fp16", "fp16-dynamic"])
    single, _, _ = run_matrix(replace(cfg, out=tmp_path / "single", workers=1))  # one worker: cases in order
    truth = read_jsonl(single / "records.jsonl")  # case 0: records 0..2, case 1: records 3..5
    RunWriter(cfg.out, run_header(cfg, 2)).close({}, status="running")
    r0, r1 = ShardFile(cfg.out / SHARDS / "t-rank-00000.jsonl"), ShardFile(cfg.out / SHARDS / "t-rank-00001.jsonl")
    r1.claim(1, [0, 1, 2], "c1", 1, "h1")
    r1.record(1, 0, truth[3])
    r1.close()
    r0.claim(0, [0, 1, 2], "c0", 0, "h0")
    r0.record(0, 0, truth[0])
    r0.release(0)
    r0.close()
    assert merge_run(cfg.out) == {"shard_files": 2, "merged": 4, "lost_records": 2, "missing_records": 2}
    head, recs = read_run(cfg.out)
    assert head["status"] == "interrupted" and not list((cfg.out / SHARDS).glob("*"))
    assert [(r["case"], r["strategy"], r["outcome"]) for r in recs] == [
        (truth[0]["case"], "fp32", "pass"), (truth[3]["case"], "fp32", "pass"),
        (truth[3]["case"], "fp16", "error"), (truth[3]["case"], "fp16-dynamic", "error")]
    assert recs[2]["reason"].startswith("rank 1 on h1 stopped while running this case")
    run_matrix(cfg, resume=True)  # runs exactly the two slots rank 0 was stopped in
    head, recs = read_run(cfg.out)
    assert head["status"] == "complete"
    assert _strip(recs) == _strip([truth[0], truth[3], recs[2], recs[3], truth[1], truth[2]])


# -- the distributed family ------------------------------------------------------------------------------
def test_scaler_agreement_ranks_skip_together_only_when_the_flag_is_reduced() -> None:
    reg = discover()
    s = reg.get("scaler_agreement")
    by_mode = {}
    for mode in ("reduced", "local"):
        p = {"world": 4, "found_inf": mode}
        inputs = s.inputs(p, torch.Generator().manual_seed(0))
        by_mode[mode] = s.run(Execution(PRESETS["fp16-dynamic"], "cpu"), inputs, p).extra
    red, loc = by_mode["reduced"], by_mode["local"]
    # rank 0's outlier batch overflows one entry of the last shard (owned by rank 3) on step 0 at 2^16
    assert red["skipped_by_rank"] == [1, 1, 1, 1] and red["final_scale_by_rank"] == [2.0**15] * 4
    assert (red["step_skew"], red["scale_ratio"]) == (0, 1.0)
    assert loc["skipped_by_rank"] == [0, 0, 0, 1] and loc["final_scale_by_rank"] == [2.0**16] * 3 + [2.0**15]
    assert (loc["step_skew"], loc["scale_ratio"]) == (1, 2.0)


def test_family_quick_tier_outcomes_are_the_declared_ones(tmp_path: Path) -> None:
    reg = discover()
    cfg = RunConfig(reg.select([], ["distributed"]), resolve(STRATEGIES), torch.device("cpu"), 1, "quick",
                    tmp_path / "run")
    out, summary, _ = run_matrix(cfg)
    recs = read_jsonl(out / "records.jsonl")
    assert len(recs) == 9 * len(STRATEGIES)  # allreduce 1, fsdp 3 divisions x 2 magnitudes, scaler 2
    got = {(r["case"], r["strategy"]): r["outcome"] for r in recs}
    assert all(r["outcome"] == (r["expected"] or {}).get("outcome", "pass") for r in recs), \
        [(k, v) for k, v in got.items() if v != "pass"]
    assert got[("scaler_agreement[world=4,found_inf=local]", "fp16-dynamic")] == "diverged"
    assert got[("scaler_agreement[world=4,found_inf=reduced]", "fp16-dynamic")] == "pass"
    assert got[("fsdp_reduce_scatter[world=8,divide=pre,grads=near_max]", "fp16")] == "pass"
    assert got[("fsdp_reduce_scatter[world=8,divide=post,grads=near_max]", "fp16")] == "overflow"
    assert got[("fsdp_reduce_scatter[world=8,divide=pre,grads=tiny]", "fp16")] == "underflow"
    curve = next(r for r in recs if r["scenario"] == "allreduce_grads" and r["strategy"] == "fp32")
    assert [w for w, _ in curve["metrics"]["rel_err_by_world"]] == [2, 3, 4, 5, 6, 7, 8]
    assert curve["metrics"]["rel_err"] == 0.0  # the FP32 strategy reduces exactly like its reference


# -- two processes under torchrun (gloo) -------------------------------------------------------------------
def test_torchrun_run_equals_a_single_process_run(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    names = ["scaler_agreement", "allreduce_grads", "grad_magnitude_sweep"]  # two families, 6 cases
    run_matrix(RunConfig(discover().select(names), resolve(STRATEGIES), torch.device("cpu"), out=one))
    args = [a for n in names for a in ("--scenario", n)]
    res = subprocess.run([*TORCHRUN, *_run_args(two, *args)], cwd=ROOT, env=_env(**{COSTS_ENV: "none"}),
                         timeout=120, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("records in") == 1  # rank 0 alone prints the run
    a, b = read_jsonl(one / "records.jsonl"), read_jsonl(two / "records.jsonl")
    assert len(b) == 6 * len(STRATEGIES) and _strip(a) == _strip(b)
    head = json.loads((two / "run.json").read_text())
    assert head["status"] == "complete" and head["distributed"]["world_size"] == 2
    assert head["distributed"]["env"]["NCCL_NVLS_ENABLE"] == "0"
    assert sorted(r["rank"] for r in head["summary"]["ranks"]) == [0, 1]
    assert sum(r["cases"] for r in head["summary"]["ranks"]) == 6
    assert not (two / SHARDS).exists()


def test_torchrun_run_with_a_progress_bar_counts_every_rank_s_records(tmp_path: Path) -> None:
    # without --quiet, on a terminal (FORCE_COLOR makes rich treat the pipe as one), rank 0's bar counts
    # the records of both ranks through a store counter that every rank adds to per record
    out = tmp_path / "p"
    args = [a for a in _run_args(out, "--scenario", "scaler_agreement") if a != "--quiet"]
    res = subprocess.run([*TORCHRUN, *args], cwd=ROOT, env=_env(**{COSTS_ENV: "none", "FORCE_COLOR": "1"}),
                         timeout=120, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    n = len(read_jsonl(out / "records.jsonl"))
    assert n == 2 * len(STRATEGIES) and f"{n}/{n}" in res.stderr  # the bar reached all records, not rank 0's


def test_torchrun_real_collectives_match_the_simulation_bit_for_bit(tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    res = subprocess.run([*TORCHRUN, "-m", "harness.distributed", "check", "--device", "cpu", "--numel", "1680",
                          "--json", str(out)], cwd=ROOT, env=_env(), timeout=120, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [(r["op"], r["dtype"]) for r in rows] == [(op, d) for d in ("fp32", "fp16", "bf16")
                                                     for op in ("all_reduce", "reduce_scatter")]
    assert all(r["world"] == 2 and r["bitwise_equal"] == 1.0 and r["max_ulp_diff"] == 0.0 for r in rows)
    # every rank holds the all-reduced sum; a reduce-scatter's ranks hold different shards: nothing to compare
    assert [r["ranks_agree"] for r in rows] == [True, None] * 3
    assert [r["rel_err_real"] > 0 for r in rows] == [True] * 6  # the sums did round


DYING = '''
import os
import time
import torch
from harness.core.scenario import Output, Scenario, register

def run(ex, inp, p):
    if os.environ.get("RANK") == "1":
        os._exit(17)  # a rank dies hard: no exception, no record
    time.sleep(0.02)  # rank 0 is still busy when rank 1 claims its first case
    return Output(value=ex.act(inp["x"]).float())

register(Scenario(name="t_dist_dying", family="distributed", description="dies on rank 1",
                  grid={"i": list(range(6))}, inputs=lambda p, g: {"x": torch.ones(4) * p["i"]}, run=run))
'''


def test_torchrun_rank_death_keeps_the_other_ranks_records(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "t_dist_dying.py").write_text(DYING)
    env, out = _env(PYTHONPATH=str(mod), **{COSTS_ENV: "none"}), tmp_path / "run"
    # --workers 0: each rank runs its cases itself, so the scenario's os._exit ends the rank
    args = ["--import", "t_dist_dying", "--scenario", "t_dist_dying", "--timeout", "0", "--workers", "0"]
    res = subprocess.run([*TORCHRUN, *_run_args(out, *args)], cwd=ROOT, env=env, timeout=120, capture_output=True,
                         text=True)
    assert res.returncode != 0
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"  # torchrun stopped rank 0
    monkeypatch.syspath_prepend(str(mod))
    try:
        counts = merge_run(out)  # imports t_dist_dying (the run's --import) to rebuild the case list
    finally:
        REGISTRY.remove("t_dist_dying")
        sys.modules.pop("t_dist_dying", None)
    recs = read_jsonl(out / "records.jsonl")
    died = [r for r in recs if r["outcome"] == "error"]
    # rank 1 died in the reference of the one case it claimed: every strategy of that case is an error
    assert len(died) == len(STRATEGIES) and len({r["case"] for r in died}) == 1
    assert died[0]["reason"].startswith("rank 1 on ")
    assert [r["outcome"] for r in recs if r not in died] == ["pass"] * (len(recs) - len(STRATEGIES))
    assert counts["lost_records"] == len(STRATEGIES) and counts["missing_records"] == 6 * len(STRATEGIES) - len(recs)


def test_torchrun_ranks_supervise_workers_so_a_dying_scenario_is_an_error_record(tmp_path: Path) -> None:
    """By default each rank runs its cases in worker processes: the scenario's os._exit on rank 1 ends
    a worker, not the rank, and the run completes with every case of rank 1 an error record."""
    mod = tmp_path / "mods"
    mod.mkdir()
    (mod / "t_dist_dying.py").write_text(DYING)
    env, out = _env(PYTHONPATH=str(mod), **{COSTS_ENV: "none"}), tmp_path / "run"
    args = ["--import", "t_dist_dying", "--scenario", "t_dist_dying", "--timeout", "0"]
    res = subprocess.run([*TORCHRUN, *_run_args(out, *args)], cwd=ROOT, env=env, timeout=120, capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    header = json.loads((out / "run.json").read_text())
    assert header["status"] == "complete" and header["summary"]["lost_records"] == 0
    assert {r["isolation"] for r in header["summary"]["ranks"]} == {"1 worker process (forked, replaced when one "
                                                                    "dies or hangs)"}
    recs = read_jsonl(out / "records.jsonl")
    assert len(recs) == 6 * len(STRATEGIES)
    died = [r for r in recs if r["outcome"] == "error"]
    assert died and [r["outcome"] for r in recs if r not in died] == ["pass"] * (len(recs) - len(died))
    first = [r for r in died if r["worker"]["event"] == "died"]
    assert first and all(r["reason"].startswith("the worker process exited with code 17") for r in first)
    assert all(r["reason"].startswith("not run: the worker failed twice") for r in died if r not in first)


def test_module_command_line_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.distributed.__main__ import main
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["check"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: check compares real collectives across ranks: start it with torchrun, e.g. "
        "torchrun --nproc-per-node 2 -m harness.distributed check"]
    assert main(["merge", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no run.json" in err[0]
    assert main(["frobnicate"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
