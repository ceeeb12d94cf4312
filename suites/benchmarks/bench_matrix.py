"""What the harness finds, charted over commits: the quick matrix (every scenario's quick tier under every
strategy preset, on the device ``run --device auto`` picks) runs once per asv process in ``setup_cache``,
and ``track_*`` read its numbers: the failure rate per strategy, the worst error per family and strategy,
and the runner's own cost. ``peakmem_quick_matrix`` runs it again to chart the peak memory of a run.

A failure rate that moves between commits means a scenario, a bound or a strategy changed what it
finds; bump ``version`` when the meaning of a number changes (not when the harness's findings do).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any


def _metric_error(metrics: dict[str, Any]) -> float | None:
    """A record's normwise relative error (output or gradients, the larger), if it has a finite one."""
    vals = []
    for key in ("rel_err", "grad_rel_err"):
        try:
            v = float(metrics[key])
        except (KeyError, TypeError, ValueError):
            continue
        if math.isfinite(v):
            vals.append(v)
    return max(vals) if vals else None


def summarize(by_strategy: dict[str, dict[str, int]], records: list[dict[str, Any]], stats: dict[str, Any]
              ) -> dict[str, Any]:
    """The numbers the ``track_*`` benchmarks return, from a run's outcome counts, records and stats.

    ``failure_rate[strategy]`` is 100 * failures / judged cases (None when no case was judged: the
    strategy is unsupported here); ``worst_error[family][strategy]`` is the largest finite normwise
    relative error among that family's records (non-finite results are overflows, counted as failures).
    """
    from harness.report.tables import failure_rate
    rates: dict[str, float | None] = {}
    for strategy, counts in by_strategy.items():
        failed, judged = failure_rate(counts)
        rates[strategy] = 100.0 * failed / judged if judged else None
    worst: dict[str, dict[str, float]] = {}
    for r in records:
        err = _metric_error(r.get("metrics") or {})
        if err is not None:
            fam = worst.setdefault(r["family"], {})
            fam[r["strategy"]] = max(err, fam.get(r["strategy"], 0.0))
    return {"failure_rate": rates, "worst_error": worst, "records": stats["records"],
            "wall_seconds": stats["wall_seconds"],
            "bookkeeping_ms_per_record": stats["bookkeeping_ms_per_record"]}


def run_quick_matrix() -> dict[str, Any]:
    """Run the quick matrix into a temporary directory and :func:`summarize` it."""
    from harness.run.engine import RunConfig, resolve_device, run_matrix
    from harness.results import read_run
    from harness.core.scenario import discover
    from harness.core.strategy import resolve
    with tempfile.TemporaryDirectory(prefix="asv-matrix-") as tmp:
        cfg = RunConfig(discover().select(), resolve(None), resolve_device("auto"), tier="quick",
                        out=Path(tmp) / "run")
        out, summary, stats = run_matrix(cfg)
        _, records = read_run(out)
    return summarize(summary.by_strategy, records, stats)


def _strategies() -> list[str]:
    from harness.core.strategy import PRESETS
    return list(PRESETS)


def _families() -> list[str]:
    from harness.core.scenario import FAMILIES
    return list(FAMILIES)


class _Matrix:
    setup_cache = staticmethod(run_quick_matrix)  # one function: asv runs it once for every class here
    timeout = 600
    version = "1"


class FailureRate(_Matrix):
    params = [_strategies()]
    param_names = ["strategy"]

    def setup(self, cache: dict[str, Any], strategy: str) -> None:
        if cache["failure_rate"].get(strategy) is None:
            raise NotImplementedError(f"{strategy}: no case judged on this device")

    def track_failure_rate(self, cache: dict[str, Any], strategy: str) -> float:
        """Percentage of the strategy's judged quick-tier cases that failed (any failing verdict)."""
        return cache["failure_rate"][strategy]

    track_failure_rate.unit = "%"  # type: ignore[attr-defined]


class WorstError(_Matrix):
    params = [_families(), _strategies()]
    param_names = ["family", "strategy"]

    def setup(self, cache: dict[str, Any], family: str, strategy: str) -> None:
        if strategy not in cache["worst_error"].get(family, {}):
            raise NotImplementedError(f"no finite error for {family} under {strategy} on this device")

    def track_worst_error(self, cache: dict[str, Any], family: str, strategy: str) -> float:
        """Largest finite normwise relative error of the family's quick-tier cases under the strategy."""
        return cache["worst_error"][family][strategy]

    track_worst_error.unit = "relative error"  # type: ignore[attr-defined]


class Runner(_Matrix):
    def track_records(self, cache: dict[str, Any]) -> int:
        """Records in the quick matrix (scenarios' quick grids x seeds x strategies)."""
        return cache["records"]

    track_records.unit = "records"  # type: ignore[attr-defined]

    def track_quick_matrix_seconds(self, cache: dict[str, Any]) -> float:
        """Wall time of the whole quick matrix (DESIGN target on the 2-core CPU: 60 s)."""
        return cache["wall_seconds"]

    track_quick_matrix_seconds.unit = "seconds"  # type: ignore[attr-defined]

    def track_bookkeeping_ms(self, cache: dict[str, Any]) -> float:
        """Harness time per record outside the scenarios' own compute (DESIGN target: 5 ms)."""
        return cache["bookkeeping_ms_per_record"]

    track_bookkeeping_ms.unit = "ms"  # type: ignore[attr-defined]


def peakmem_quick_matrix() -> None:
    """Peak RSS of a process that runs the quick matrix (DESIGN target on the CPU: 3 GiB)."""
    run_quick_matrix()


peakmem_quick_matrix.timeout = 600  # type: ignore[attr-defined]
peakmem_quick_matrix.version = "1"  # type: ignore[attr-defined]
