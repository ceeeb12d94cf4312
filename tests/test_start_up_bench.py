"""bench/start_up.py: a fresh process's start-up, phase by phase, and one case cold against warm (CPU)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import start_up  # noqa: E402

from harness.core.strategy import PRESETS  # noqa: E402


def test_start_up_times_each_phase_in_fresh_processes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "s.json"
    assert start_up.main(["--device", "cpu", "--tier", "quick", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    phases = dict(res["phases"])
    assert list(phases) == ["import torch", "import the harness, discover the suites",
                            "import torch._dynamo (the first optimizer)"]
    # fresh interpreters: torch and torch._dynamo are really imported there (this process has both loaded)
    assert phases["import torch"] > 0.2 and phases["import torch._dynamo (the first optimizer)"] > 0.2
    commands = dict(res["commands"])
    assert list(commands) == ["python -m harness --help", "python -m harness list, cache off",
                              "python -m harness list, filling the cache", "python -m harness list, cache kept"]
    # --help and a kept listing import no torch: less than the bare import of torch in a fresh process
    assert commands["python -m harness --help"] < phases["import torch"]
    assert commands["python -m harness list, cache kept"] < phases["import torch"]
    case = res["case"]
    assert case["case"].startswith("update_swamping[") and case["strategies"] == len(PRESETS)
    # the cold run imports torch._dynamo (its SGD is the process's first optimizer); the warm one does not
    assert case["cold"] - case["warm"] > 0.5 * phases["import torch._dynamo (the first optimizer)"]
    text = capsys.readouterr().out
    assert "import torch._dynamo (the first optimizer)" in text and "its first run pays +" in text
