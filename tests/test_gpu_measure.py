"""tools/gpu_measure.sh: the GPU measurements in one command. It cannot run here (no GPU), so its commands
are checked the way they would first fail there: each harness command parses with the CLI's own parser,
each bench flag is one the bench accepts, and bad input is one line and exit 2."""
from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from harness.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "gpu_measure.sh"


def _dry(*parts: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", *parts], capture_output=True, text=True, cwd=ROOT)


def test_every_command_is_one_the_harness_and_the_benches_accept() -> None:
    res = _dry("tiers", "zoo", "fixes", "speed", "long", "before")
    assert res.returncode == 0, res.stderr
    lines = [re.sub(r"^in_dir \S+ ", "", line) for line in res.stdout.splitlines()]  # the older checkout's run
    harness_cmds = [shlex.split(line)[3:] for line in lines if line.startswith("python -m harness ")]
    assert {a[0] for a in harness_cmds} == {"run", "gate", "report", "zoo", "check-model"}
    for argv in harness_cmds:
        try:
            _parser(argv).parse_args(argv)
        except SystemExit as exc:  # argparse's error: a flag or value the CLI does not take
            pytest.fail(f"{' '.join(argv)}: the CLI refuses it (exit {exc.code})")
    benches = [shlex.split(line)[1:] for line in lines if line.startswith("python bench/")]
    assert {b[0] for b in benches} == {"bench/check_model.py", "bench/tradeoff.py"}
    for bench in {b[0] for b in benches}:
        helptext = subprocess.run([sys.executable, bench, "--help"], capture_output=True, text=True, cwd=ROOT).stdout
        for argv in (b for b in benches if b[0] == bench):
            for flag in (a for a in argv if a.startswith("--")):
                assert re.search(rf"{re.escape(flag)}\b", helptext), f"{bench} has no {flag}"


def test_parts_select_the_steps_and_bad_input_is_one_line() -> None:
    only = _dry("long").stdout.splitlines()
    assert len(only) == 2 and all("--steps 1000" in line for line in only)
    assert "--cache OUT_DIR/refcache" in only[0] and only[0].endswith("long_cold")
    bad = _dry("speed", "everything")
    assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.splitlines()) == 1
    assert "unknown part 'everything'" in bad.stderr
    none = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, cwd=ROOT)
    assert none.returncode == 2 and none.stderr.startswith("usage:")
    before = subprocess.run(["bash", str(SCRIPT), str(ROOT / "never-made"), "before"], capture_output=True, text=True,
                            cwd=ROOT, env={"PATH": "/usr/bin:/bin", "BEFORE": str(ROOT / "no-such-checkout")})
    assert before.returncode == 2 and "needs BEFORE=DIR" in before.stderr and not (ROOT / "never-made").exists()


def test_the_older_checkout_runs_its_own_harness(tmp_path: Path) -> None:
    """``in_dir`` runs ``python -m harness`` from the older checkout, so that checkout's code runs, not
    this one's (the current directory comes first on ``sys.path``)."""
    old = tmp_path / "old" / "harness"
    old.mkdir(parents=True)
    (old / "__init__.py").write_text("")
    (old / "__main__.py").write_text("print('older harness')\n")
    cmd = f"source <(sed -n '/^in_dir()/,/^}}/p' {shlex.quote(str(SCRIPT))}); in_dir {tmp_path / 'old'} {sys.executable} -m harness"
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=ROOT)
    assert res.stdout.strip() == "older harness", res.stderr
