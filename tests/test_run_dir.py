"""One writer per run directory, resume that keeps the run's identity, and input the run must refuse,
all through the real CLI: concurrent runs, ``--out ""``, ``--timeout 1e10``, resume flags, resume on
another environment, duplicate and foreign records, a full disk, ``sys.exit`` in user code, a factory
that never returns, and ``.ci/with-venv`` keeping the caller's directory."""
from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, cli_env, read_jsonl, run_cli

SLOW = '''
import os
import time
import torch
from harness.core.scenario import Output, Scenario, register


def run(ex, inp, p):
    time.sleep(float(os.environ.get("D_SLOW_SECONDS", "0.02")))
    return Output(value=ex.act(inp["x"]).float().cumsum(0))


register(Scenario(name="d_slow", family="reduction", description="a slow cumulative sum", grid={"k": list(range(20))},
                  inputs=lambda p, g: {"x": torch.rand(64, generator=g) + 0.5}, run=run, n=lambda p: 64))
'''
ARGS = ("--import", "d_slow", "--scenario", "d_slow", "--strategy", "fp32", "--strategy", "bf16", "--device", "cpu",
        "--quiet")


@pytest.fixture
def mods(tmp_path: Path) -> Path:
    d = tmp_path / "mods"
    d.mkdir()
    (d / "d_slow.py").write_text(SLOW)
    return d


def _popen(mods: Path, *args: str, seconds: float = 0.02) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "harness", "run", *ARGS, *args], cwd=ROOT,
                            env=dict(cli_env(mods), D_SLOW_SECONDS=str(seconds)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_two_runs_on_one_new_directory_one_writes_the_other_is_refused(mods: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    procs = [_popen(mods, "--out", str(out)) for _ in range(2)]
    results = [(p.wait(120), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    err = loser[2].strip().splitlines()
    assert len(err) == 1 and (" another harness process (pid " in err[0] or "already holds a run" in err[0]), err
    recs = read_jsonl(out / "records.jsonl")  # whole lines, each pair once, nothing missing
    assert len(recs) == 40 and len({(r["case"], r["strategy"]) for r in recs}) == 40
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_a_resume_while_the_run_is_still_running_is_refused(mods: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = _popen(mods, "--out", str(out), seconds=0.2)  # 8 s of work: still running when the resume starts
    t0 = time.monotonic()
    while not (out / "records.jsonl").exists() and time.monotonic() - t0 < 60:
        time.sleep(0.01)
    second = run_cli("run", "--resume", str(out), pythonpath=mods)
    assert first.wait(120) == 0
    assert second.rc == 2 and second.stderr.startswith(f"error: {out}: another harness process (pid {first.pid}) "
                                                       "is writing this run directory;"), second.stderr
    assert len(read_jsonl(out / "records.jsonl")) == 40


def test_two_resumes_at_once_one_runs_the_missing_pairs_the_other_is_refused(done_run: Path, mods: Path) -> None:
    lines = (done_run / "records.jsonl").read_text().splitlines()
    (done_run / "records.jsonl").write_text("\n".join(lines[:10]) + "\n")  # 30 pairs missing, 6 s of work
    env = dict(cli_env(mods), D_SLOW_SECONDS="0.2")
    procs = [subprocess.Popen([sys.executable, "-m", "harness", "run", "--resume", str(done_run), "--quiet"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(120), *p.communicate()) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], results  # both exited 0, each appending the 30 pairs
    recs = read_jsonl(done_run / "records.jsonl")
    assert len(recs) == 40 and len({(r["case"], r["strategy"]) for r in recs}) == 40


@pytest.mark.parametrize("args, text", [
    (("--out", ""), "error: python -m harness run: argument --out: is empty; pass the directory"),
    (("--timeout", "1e10"), "error: python -m harness run: argument --timeout: must be a number of seconds from 0 "
                            "(no deadline) to 604800 (a week), got 1e10"),
    (("--timeout", "nan"), "error: python -m harness run: argument --timeout: must be a number of seconds from 0 "
                           "(no deadline) to 604800 (a week), got nan"),
])
def test_bad_run_options_are_one_line_and_exit_2(args: tuple, text: str) -> None:
    res = run_cli("run", "--scenario", "softmax_long", "--device", "cpu", *args)
    assert res.rc == 2 and res.stderr.startswith(text) and len(res.stderr.splitlines()) == 1, res.stderr


@pytest.fixture
def done_run(mods: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    res = run_cli("run", *ARGS, "--out", str(out), pythonpath=mods)
    assert res.rc == 0, res.stderr
    return out


@pytest.mark.parametrize("flag", [("--tier", "full"), ("--seeds", "2"), ("--device", "cpu")])
def test_resume_refuses_a_flag_that_would_change_the_matrix(done_run: Path, mods: Path, flag: tuple) -> None:
    res = run_cli("run", "--resume", str(done_run), *flag, pythonpath=mods)
    assert res.rc == 2 and res.stderr.startswith(f"error: --resume takes the matrix ({flag[0]}) from the run "
                                                 "directory"), res.stderr


def test_resume_honours_a_longer_timeout_and_keeps_the_original_header(done_run: Path, mods: Path) -> None:
    before = json.loads((done_run / "run.json").read_text())
    lines = (done_run / "records.jsonl").read_text().splitlines()
    (done_run / "records.jsonl").write_text("\n".join(lines[:30]) + "\n")
    res = run_cli("run", "--resume", str(done_run), "--timeout", "1200", "--quiet", pythonpath=mods)
    assert res.rc == 0, res.stderr
    after = json.loads((done_run / "run.json").read_text())
    assert after["created"] == before["created"] and after["environment"] == before["environment"]
    assert after["config"] == before["config"] and after["config"]["timeout"] == 600.0
    assert [r["timeout"] for r in after["resumes"]] == [1200.0]
    assert after["resumes"][0]["environment"]["torch"] == before["environment"]["torch"]
    assert after["summary"]["records_this_session"] == 10 and after["summary"]["records"] == 40


def test_resume_refuses_another_torch(done_run: Path, mods: Path) -> None:
    head = json.loads((done_run / "run.json").read_text())
    head["environment"]["torch"] = "1.0.0"
    (done_run / "run.json").write_text(json.dumps(head))
    res = run_cli("run", "--resume", str(done_run), pythonpath=mods)
    assert res.rc == 2 and "this run was started with another environment (torch '1.0.0' -> '" in res.stderr


def test_resume_moves_duplicate_and_foreign_records_aside(done_run: Path, mods: Path) -> None:
    lines = (done_run / "records.jsonl").read_text().splitlines()
    foreign = json.loads(lines[0])
    foreign["case"] = "d_other[k=0]"
    (done_run / "records.jsonl").write_text("\n".join(lines[:35] + lines[:5] + [json.dumps(foreign)]) + "\n")
    res = run_cli("run", "--resume", str(done_run), "--quiet", pythonpath=mods)
    assert res.rc == 0, res.stderr
    assert "moved 5 duplicate and 1 foreign records (not of this run's matrix) to" in res.stderr
    recs = read_jsonl(done_run / "records.jsonl")
    assert len(recs) == 40 and len({(r["case"], r["strategy"]) for r in recs}) == 40
    head = json.loads((done_run / "run.json").read_text())
    assert head["status"] == "complete" and head["summary"]["records"] == 40 == head["expected_records"]
    assert len(read_jsonl(done_run / "dropped-records.jsonl")) == 6


def test_a_full_disk_ends_the_run_interrupted_naming_the_file(mods: Path, tmp_path: Path) -> None:
    """The file-size limit makes a write fail as a full disk does (EFBIG instead of ENOSPC; the same path)."""
    out = tmp_path / "run"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with an error instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (16384, 16384))

    proc = subprocess.run([sys.executable, "-m", "harness", "run", *ARGS, "--out", str(out)], cwd=ROOT,
                          env=cli_env(mods), capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 4  # the system failed (harness.exits), not bad input
    assert len(err) == 1 and f"({out / 'records.jsonl'}): File too large" in err[0], proc.stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    data = (out / "records.jsonl").read_bytes()
    kept = [json.loads(x) for x in data.split(b"\n")[:-1]]  # every whole line is a record
    assert 5 <= len(kept) < 40 and len(data) <= 16384


SYS_EXIT = '''
import sys
sys.exit(3)
'''
FACTORIES = '''
import sys
import time


def exits():
    sys.exit(4)


def hangs():
    while True:
        time.sleep(0.05)
'''


def test_sys_exit_in_an_import_module_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "d_exits.py").write_text(SYS_EXIT)
    res = run_cli("run", "--import", "d_exits", "--device", "cpu", "--out", str(tmp_path / "r"), pythonpath=tmp_path)
    assert res.rc == 2 and res.stderr == ("error: --import d_exits: the module called sys.exit(3) while being "
                                          "imported; a scenario module must only define and register scenarios\n")


def test_sys_exit_in_a_factory_is_bad_input(tmp_path: Path) -> None:
    (tmp_path / "d_factories.py").write_text(FACTORIES)
    res = run_cli("check-model", "d_factories:exits", "--device", "cpu", "--out", str(tmp_path / "r"),
                  pythonpath=tmp_path)
    assert res.rc == 2 and res.stderr.startswith("error: d_factories:exits: the model's module or factory called "
                                                  "sys.exit(4) while building the model"), res.stderr
    assert not (tmp_path / "r").exists()


def test_a_factory_that_never_returns_is_stopped_at_the_timeout(tmp_path: Path) -> None:
    (tmp_path / "d_factories.py").write_text(FACTORIES)
    t0 = time.monotonic()
    res = run_cli("check-model", "d_factories:hangs", "--device", "cpu", "--timeout", "2", "--out",
                  str(tmp_path / "r"), pythonpath=tmp_path, timeout=60)
    assert res.rc == 2 and res.stderr == ("error: d_factories:hangs: building the model and one FP32 training step "
                                          "did not finish within --timeout 2 s; raise --timeout, or make the factory "
                                          "and one training step faster\n")
    assert time.monotonic() - t0 < 30


def test_with_venv_keeps_the_callers_directory(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    stamp = subprocess.run(["cksum"], stdin=open(ROOT / "pyproject.toml"), capture_output=True, text=True).stdout
    (venv / f".installed-{stamp.split()[0]}").touch()  # "already set up": nothing is installed
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "with-venv"), "pwd"], cwd=tmp_path, capture_output=True,
                          text=True, env=dict(os.environ, HARNESS_VENV=str(venv)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path)


def test_records_are_fsynced_after_each_case_and_the_directory_after_each_rename(
        tmp_path: Path, temp_scenarios: list, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from conftest import add_scenario
    from harness import results
    from harness.run.engine import RunConfig, run_matrix
    from harness.core.scenario import Output, Scenario
    from harness.core.strategy import PRESETS
    s = add_scenario(temp_scenarios, Scenario(
        name="d_fsync", family="reduction", description="d", grid={"k": [0, 1, 2]},
        inputs=lambda p, g: {"x": torch.rand(4, generator=g) + 0.5}, run=lambda ex, inp, p: Output(value=inp["x"])))
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(results.os, "fsync", fsync)
    out = tmp_path / "r"
    run_matrix(RunConfig([s], [PRESETS["fp32"], PRESETS["bf16"]], torch.device("cpu"), out=out, workers=1))
    recs, head, folder = str(out / "records.jsonl"), str(out / ".run.json.tmp"), str(out)
    assert synced.count(recs) == 3 + 1  # after each of the 3 cases, and at the end
    assert synced.count(folder) == 2  # after run.json's two renames (running, then complete)
    assert sum(1 for p in synced if p.startswith(head)) == 2
