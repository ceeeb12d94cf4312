"""Shared helpers: one CPU thread, the repository on sys.path, a CLI runner, throwaway scenarios, and
``quick_run``, the quick tier under the acceptance strategies, run once per session by the real CLI.

The machine these tests run on is shared, so torch uses one thread.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
# check-model keeps references on disk by default; tests compute theirs (tests/test_refcache.py turns it on)
os.environ["MP_HARNESS_CACHE"] = "off"
torch.set_num_threads(1)

from harness.core.scenario import REGISTRY, Scenario  # noqa: E402

#: Strategies of the issue's acceptance checks (``quick_run``).
ACCEPTANCE_STRATEGIES = ("fp32", "fp16", "fp16-dynamic", "fp16-gradscaler", "bf16")


@dataclass
class CLIResult:
    rc: int
    stdout: str
    stderr: str


def same_bits(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Bit for bit (FP32 tensors on any devices), NaN where NaN: NaN payloads and signs differ between
    kernels (CUDA writes its canonical NaN, the CPU keeps the input's) and carry nothing."""
    x, y = x.detach().cpu().contiguous(), y.detach().cpu().contiguous()
    nan = x.isnan()
    return torch.equal(nan, y.isnan()) and torch.equal(x.view(torch.int32)[~nan], y.view(torch.int32)[~nan])


def cli_env(pythonpath: Path | None = None) -> dict[str, str]:
    """Environment of a child interpreter: one thread, the repository (and ``pythonpath``) importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    paths = [str(ROOT)] + ([str(pythonpath)] if pythonpath else []) + [env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def run_cli(*args: str, pythonpath: Path | None = None, timeout: float = 300) -> CLIResult:
    """``python -m harness ARGS`` in a subprocess from the repository root."""
    proc = subprocess.run([sys.executable, "-m", "harness", *args], cwd=ROOT, env=cli_env(pythonpath),
                          capture_output=True, text=True, timeout=timeout)
    return CLIResult(proc.returncode, proc.stdout, proc.stderr)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    """``python -m harness run --tier quick`` on the CPU under the acceptance strategies: (run.json, records)."""
    out = tmp_path_factory.mktemp("quick") / "run"
    args = ["run", "--device", "cpu", "--tier", "quick", "--quiet", "--out", str(out)]
    for s in ACCEPTANCE_STRATEGIES:
        args += ["--strategy", s]
    res = run_cli(*args, timeout=600)
    assert res.rc == 0, res.stderr
    return json.loads((out / "run.json").read_text()), read_jsonl(out / "records.jsonl")


@pytest.fixture
def temp_scenarios() -> Iterator[list[Scenario]]:
    """A list for :func:`add_scenario`: what it registers is removed from the registry after the test."""
    added: list[Scenario] = []
    yield added
    for s in added:
        REGISTRY.remove(s.name)


def add_scenario(bucket: list[Scenario], scenario: Scenario) -> Scenario:
    """Register ``scenario`` in the global registry for the duration of one test."""
    REGISTRY.add(scenario)
    bucket.append(scenario)
    return scenario


def declared_outcome(record: dict) -> str:
    """What a record's declaration says it should be. A recipe that only running can find inapplicable (no
    optimizer step for an ``update=``/``states=`` recipe, no library equivalent of the scenario's optimizer,
    nothing for ``compile=yes`` to compile) is ``unsupported`` with a reason starting ``not applicable:``;
    that outcome matches any declaration (the declaration says what happens where the recipe applies)."""
    if record["outcome"] == "unsupported" and record["reason"].startswith("not applicable:"):
        return "unsupported"
    return (record["expected"] or {}).get("outcome", "pass")
