"""bench/error_records.py at a tiny size: both scenarios run through a worker process, one passing every
record and one erring on every record, and the header's bookkeeping per record is reported for each
(the timing itself is the bench's to print, not this test's to assert)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import error_records as bench  # noqa: E402


def test_the_bench_runs_a_passing_and_an_erring_scenario_through_a_worker(tmp_path: Path, capsys) -> None:
    out = tmp_path / "e.json"
    assert bench.main(["--cases", "3", "--json", str(out)]) == 0
    rows = {r["scenario"]: r for r in json.loads(out.read_text())}
    assert rows["bench_pass"]["outcomes"] == ["pass"] and rows["bench_raise"]["outcomes"] == ["error"]
    for r in rows.values():
        assert r["records"] == 3 * len(bench.STRATEGIES) and "1 worker process" in r["isolation"]
        assert r["bookkeeping_ms_per_record"] > 0 and r["wall_s"] > 0
    assert "ms of bookkeeping per record" in capsys.readouterr().out
