"""bench/seconds_by_scenario.py: a run's records' seconds summed per scenario (what docs/scenarios.md quotes
of the H100 full tier)."""
from __future__ import annotations

from pathlib import Path

from bench.seconds_by_scenario import by_scenario, main
from harness.results import read_run

GOLDEN = Path(__file__).parent / "golden" / "cpu_small"


def test_sums_per_scenario_match_the_records(capsys) -> None:
    _, records = read_run(GOLDEN)
    rows = by_scenario(records)
    assert [r["seconds"] for r in rows] == sorted((r["seconds"] for r in rows), reverse=True)
    for row in rows:
        mine = [r for r in records if r["scenario"] == row["scenario"]]
        assert row["records"] == len(mine) and abs(row["seconds"] - sum(r["seconds"] for r in mine)) < 1e-12
        assert row["fastest"][0] == min(r["seconds"] for r in mine)
        assert row["slowest"][0] == max(r["seconds"] for r in mine)
    assert main([str(GOLDEN), "--top", "1", "--scenario", rows[0]["scenario"]]) == 0
    out = capsys.readouterr().out
    assert f"{len(records)} records" in out and rows[0]["scenario"] in out and str(GOLDEN) not in out
    listed = out.split(f"records of {rows[0]['scenario']}")[1].strip().splitlines()[1:]
    assert len(listed) == rows[0]["records"] and all(rows[0]["scenario"] in line for line in listed)
