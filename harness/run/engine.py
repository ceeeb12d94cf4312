"""The runner: every case of the selected scenarios under every strategy, against one reference.

Cases run case-major: inputs are built once from the seed, the reference is computed once, then each
strategy runs and its record is appended to the run directory as soon as it is judged. A scenario
that raises becomes an ``error`` record carrying its traceback, and the run goes on. Every run (the
reference's and each strategy's) starts from the pristine inputs and global state: one that changes
them is an ``error`` naming what it changed, and the change is undone (:mod:`harness.core.isolation`).
A reference nothing can be judged against (inf/NaN not declared, no floating-point output) makes an
``error`` record for every strategy without running it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from ..core.execution import Execution
from ..values.formats import get_format
from ..core.libraries import RecipeUnsupported
from ..values.optim_precision import optimizer_recipe
from .guard import cleanup, deadline, is_oom, sigterm_as_interrupt
from ..core.isolation import CaseInputs, isolated
from ..judge.metrics import compare, measures_only
from .reference import ReferenceCache
from .rundir import check_size, done_keys, matrix_keys, resumed_header
from ..results import SCHEMA_VERSION, RunLock, RunWriter, environment, read_records, tally
from ..core.scenario import Case, Scenario, count_cases, iter_cases, seed_generator, seed_global
from ..core.strategy import Strategy
from .timing import sync
from ..judge.verdict import UNDERFLOW_BUDGET, Verdict, judge

__all__ = ["RunConfig", "run_matrix", "run_case", "run_case_records", "run_header", "run_stats", "default_out_dir",
           "resolve_device", "Summary", "resume_config"]


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; ``cuda`` without CUDA is an error naming the fix."""
    if name not in ("cpu", "cuda", "auto"):
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available here (torch "
                         f"{torch.__version__}); use --device cpu or auto")
    return torch.device(name)


def default_out_dir(device: torch.device, root: Path = Path("results/runs")) -> Path:
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    d = root / f"{stamp}-{device.type}"
    k = 1
    while d.exists():
        k += 1
        d = root / f"{stamp}-{device.type}-{k}"
    return d


#: Records a run may have without ``--max-records``: more is almost surely a typo in ``--seeds``.
MAX_RECORDS = 1_000_000
#: The harness's own time per record (DESIGN's bookkeeping target): a floor for the time a run takes.
BOOKKEEPING_S = 0.005


@dataclass
class RunConfig:
    scenarios: list[Scenario]
    strategies: list[Strategy]
    device: torch.device
    seeds: int = 1
    tier: str = "quick"
    out: Path | None = None
    imports: list[str] = field(default_factory=list)
    timeout: float | None = 600.0  # seconds per (case, strategy), reference included
    workers: int | None = None  # worker processes (None: supervisor.default_workers; 0: in-process)
    max_records: int | None = MAX_RECORDS  # refuse a larger matrix (None: no limit)
    #: runs of one case at once in each worker (harness.run.fanout); by keyword only, so that no call
    #: passing the fields before it by position can set it
    fanout: int = field(default=1, kw_only=True)

    def __post_init__(self) -> None:
        from .fanout import MAX_FANOUT
        if not 1 <= self.fanout <= MAX_FANOUT:
            raise ValueError(f"fanout must be 1 to {MAX_FANOUT} runs of a case at once, got {self.fanout}")

    def as_dict(self) -> dict[str, Any]:
        return {"scenarios": [s.name for s in self.scenarios], "strategies": [s.label for s in self.strategies],
                "strategy_specs": {s.label: str(s) for s in self.strategies}, "device": self.device.type,
                "seeds": self.seeds, "tier": self.tier, "imports": self.imports, "timeout": self.timeout}


@dataclass
class Summary:
    """Counts per strategy and family, updated record by record (nothing else is kept in memory)."""

    by_strategy: dict[str, dict[str, int]] = field(default_factory=dict)
    by_family: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    records: int = 0
    seconds_in_scenarios: float = 0.0
    seconds_building_inputs: float = 0.0

    def add(self, rec: dict[str, Any]) -> None:
        tally(self.by_strategy, self.by_family, rec)
        self.records += 1

    @classmethod
    def of(cls, records: Iterable[dict[str, Any]]) -> "Summary":
        """The summary of records already written (a resumed run's, a merge's)."""
        summary = cls()
        for r in records:
            summary.add(r)
        return summary

    def as_dict(self) -> dict[str, Any]:
        return {"records": self.records, "by_strategy": self.by_strategy, "by_family": self.by_family}


def _record(case: Case, strategy: Strategy, device: torch.device, verdict: Verdict, metrics: dict,
            seconds: float, extra: dict[str, Any]) -> dict[str, Any]:
    s = case.scenario
    exp = s.expected(strategy.label, case.params, device.type)
    return {
        "schema_version": SCHEMA_VERSION, "scenario": s.name, "case": case.id, "family": s.family,
        "params": case.params, "seed": case.seed, "strategy": strategy.label, "strategy_spec": str(strategy),
        "device": device.type, "outcome": verdict.outcome, "reason": verdict.reason, "metrics": metrics,
        "seconds": seconds, "bound": verdict.bound, "margin": verdict.margin, "n": s.n(case.params),
        "expected": {"outcome": exp.outcome, "reason": exp.reason} if exp else None,
        "scenario_version": s.version, **extra,
    }


def _peak_reset(device: torch.device) -> int:
    """Start measuring a case's GPU memory; returns what is already allocated (inputs, reference)."""
    if device.type != "cuda":
        return 0
    torch.cuda.reset_peak_memory_stats(device)
    return int(torch.cuda.memory_allocated(device))


def _peak(device: torch.device, start: int) -> int | None:
    """Peak GPU memory the case allocated beyond what it started with: independent of which cases ran
    before in this process (so sharded and single-process runs record the same number)."""
    return int(torch.cuda.max_memory_allocated(device)) - start if device.type == "cuda" else None


#: How many measured run-to-run spreads a nondeterministic FP32 result may stray: a fresh FP32 run r'
#: and the reference r are two draws, and |r' - r| <= |r' - r''| + |r'' - r| where the rerun r'' gave the
#: measured spread; each term is distributed like that spread, so one draw can exceed it by chance.
SPREAD_FACTOR = 2.0


def _floor(ref: Any) -> dict[str, Any]:
    """The floors of a case's bounds: :func:`_fp32_floor`, and a training case's FP32 sensitivity to one-ulp
    perturbations (``fp32_sensitivity``, :mod:`harness.judge.sensitivity`), which floors each error metric's own."""
    sens = ref.check.get("fp32_sensitivity")
    return {**_fp32_floor(ref), **({"sensitivity": sens} if sens else {})}


def _fp32_floor(ref: Any) -> dict[str, Any]:
    """The floor of a case's bound. Deterministic: FP32's own error where FP64 is the reference (0 where
    FP32 is). Nondeterministic: that plus :data:`SPREAD_FACTOR` times the FP32 reference's run-to-run
    spread, since the strategy's own FP32 run is another draw (triangle inequality)."""
    fp64 = ref.check["fp32_vs_fp64"] if ref.format == "fp64" else 0.0
    spread = ref.check.get("fp32_rerun_diff", 0.0) if ref.check.get("nondeterministic") else 0.0
    if not math.isfinite(spread) or spread <= 0:  # an inf spread is no floor: it would pass everything
        return {"floor": fp64}
    noise = f"{SPREAD_FACTOR:g} x the FP32 reference's own run-to-run spread {spread:.2e} (nondeterministic)"
    if ref.format == "fp64":
        return {"floor": fp64 + SPREAD_FACTOR * spread,
                "floor_source": f"FP32's own error against FP64 {fp64:.2e} (the reference here) + {noise}"}
    return {"floor": SPREAD_FACTOR * spread, "floor_source": noise}


def _not_judged(s: Scenario, out: Any) -> Verdict:
    """The verdict of a scenario that only measures (a device profile): recorded, never a pass."""
    return Verdict("unsupported", f"not judged: scenario {s.name} returns measurements only "
                                  f"({', '.join(sorted(out.extra))} in the record's metrics), no value, gradients "
                                  "or loss curve to compare")


def _not_applicable(s: Scenario, ex: Execution) -> Verdict | None:
    """``unsupported`` for an optimizer recipe (``update=``, ``states=``) that never acted in the run: the
    scenario takes no optimizer step (or none that moves a weight, or keeps no state large enough for 8
    bits), so the run repeats the strategy without the recipe and would count that one's outcome twice."""
    recipe = optimizer_recipe(ex.strategy)
    if recipe is None or ex.optimizer_recipe_steps:
        return None
    what = ("takes no optimizer step that moves a weight" if ex.strategy.states == "param" else
            "keeps no optimizer state of >= 4096 entries (smaller ones stay in full precision) or takes no step")
    return Verdict("unsupported", f"not applicable: scenario {s.name} {what}, so {recipe} has nothing to act on "
                                  "(the run would repeat the strategy without it)")


def _compiled(s: Scenario, ex: Execution, extra: dict[str, Any]) -> Verdict | None:
    """``compile=yes``: the compile cost into the record (``compile``: models, compilations, seconds, apart
    from the run's own ``seconds`` that include it); a run that compiled nothing is not judged, so that an
    eager result never reads as the compiled one."""
    if not ex.strategy.compile:
        return None
    if ex.compile_stats is None:
        return Verdict("unsupported", f"not applicable: compile=yes, and scenario {s.name} trains no model through "
                                      "the harness's Trainer, the part torch.compile compiles; it ran eagerly, not judged")
    extra["compile"] = ex.compile_stats.as_dict()
    return None


@dataclass
class Ran:
    """A strategy's run of a case, not judged yet: what :func:`run_case` needs of it. Built where the run
    happened (this process, or a helper of :mod:`harness.run.fanout`, whose Execution stays there)."""

    out: Any  # the scenario's Output
    inner: float  # seconds inside the scenario
    peak_bytes: int | None
    emulated: list[str]
    judged_format: str
    early: Verdict | None = None  # :func:`_compiled`'s or :func:`_not_applicable`'s verdict: no judging
    compile: dict[str, Any] | None = None  # ``compile=yes``: the record's ``compile``


def execute(case: Case, ex: Execution, device: torch.device, inputs: dict) -> Ran:
    """Run ``ex``'s strategy on the case, timed between two device synchronisations; raises what it raises."""
    s = case.scenario
    mem0 = _peak_reset(device)
    seed_global(case.seed, device)
    sync(device)
    t1 = time.perf_counter()
    out = s.execute(ex, inputs, case.params)
    sync(device)
    inner = time.perf_counter() - t1
    extra: dict[str, Any] = {}
    early = _compiled(s, ex, extra) or _not_applicable(s, ex)
    return Ran(out, inner, _peak(device, mem0), ex.emulation_notes(), ex.judged_format.name, early,
               extra.get("compile"))


def failure_verdict(exc: BaseException) -> tuple[Verdict, bool]:
    """(the verdict of a run that raised ``exc``, whether the record keeps its traceback)."""
    if isinstance(exc, RecipeUnsupported):  # the strategy's library recipe cannot run what the scenario built
        return Verdict("unsupported", f"not applicable: {exc}"), False
    kind = "out of memory: " if is_oom(exc) else ""
    return Verdict("error", f"{kind}{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]), True


def run_case(case: Case, strategy: Strategy, device: torch.device, inputs: dict, ref_cache: ReferenceCache,
             timeout: float | None = None, runs: Any = None) -> tuple[dict[str, Any], float]:
    """Run and judge one (case, strategy); returns (record, seconds spent inside the scenario).

    Whatever the scenario does (raise, run past ``timeout`` seconds, run out of memory, return
    garbage), the result is a record: an ``error`` one with the reason and the traceback. ``runs``
    (:class:`harness.run.fanout.Helpers`): where the case's runs were started at once; a run it does not
    hold (or lost to an out-of-memory beside the others) runs here."""
    s = case.scenario
    ex = Execution(strategy, device)
    extra: dict[str, Any] = {"emulated": ex.notes}
    if device.type not in s.devices:
        v = Verdict("unsupported", f"scenario {s.name} runs on {', '.join(s.devices)} only, not {device.type}")
        return _record(case, strategy, device, v, {}, 0.0, extra), 0.0
    if not ex.supported:
        return _record(case, strategy, device, Verdict("unsupported", ex.unsupported_reason), {}, 0.0, extra), 0.0
    t0 = time.perf_counter()
    inner = 0.0
    try:
        with deadline(timeout) as armed:  # one deadline for the reference (when computed here) and the run
            if timeout and not armed:
                extra["deadline"] = "not armed"
            ref = ref_cache.get(case, inputs, device, runs)
            extra["reference"] = {"format": ref.format, **ref.check}
            if ref.window is not None:
                extra["window"] = ref.window
            if ref.unjudged is not None:  # nothing to judge against: the strategy need not run
                return _record(case, strategy, device, Verdict("error", ref.unjudged), {},
                               time.perf_counter() - t0, extra), 0.0
            ran = runs.strategy(strategy) if runs is not None else None
            if ran is None:
                ran = execute(case, ex, device, inputs)
            elif not isinstance(ran, Ran):  # raised in the helper: its verdict, as it would be here
                inner = ran.inner
                if ran.traceback:
                    extra["traceback"] = ran.traceback
                return _record(case, strategy, device, ran.verdict, {}, time.perf_counter() - t0, extra), inner
            inner = ran.inner
        extra["peak_bytes"] = ran.peak_bytes
        extra["emulated"] = ran.emulated
        if ran.compile is not None:
            extra["compile"] = ran.compile
        fmt = get_format(ran.judged_format)
        extra["judged_format"] = fmt.name
        out = ran.out
        metrics = compare(out, ref.output, fmt)
        metrics.update(out.extra)
        tol = s.tolerance
        verdict = ran.early or (_not_judged(s, out) if measures_only(ref.output) else judge(
            metrics, fmt, s.n(case.params), kappa=ref.output.kappa, factor=tol.factor if tol else 1.0,
            underflow_budget=(tol.underflow_budget if tol and tol.underflow_budget is not None
                              else UNDERFLOW_BUDGET),
            truncating=bool(out.extra.get("truncating")), scaler=strategy.scaler,
            nonfinite_reference=s.nonfinite_reference, **_floor(ref)))
    except (Exception, SystemExit) as exc:  # a failing scenario is data: an error record, and the run goes on
        # (SystemExit too: a scenario calling exit() must not end the run and leave it marked complete)
        metrics = {}
        verdict, keep = failure_verdict(exc)
        if keep:
            extra["traceback"] = traceback.format_exc()
            cleanup(device)
    seconds = time.perf_counter() - t0
    return _record(case, strategy, device, verdict, metrics, seconds, extra), inner


def _inputs(case: Case, device: torch.device) -> CaseInputs:
    """The case's inputs on ``device``, with the pristine copy every run is checked against; built in
    isolation (``inputs()`` that leaves global state changed fails the case, the state restored). torch's
    global generator is seeded from the case as well, so that ``inputs()`` drawing from it instead of
    the generator it is given still builds the same inputs whatever ran before."""
    g = seed_generator(case)
    with isolated(case.scenario.name, "building its inputs"):
        torch.default_generator.manual_seed(g.initial_seed())
        built = case.scenario.inputs(case.params, g)
    return CaseInputs({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in built.items()})


def _input_error(case: Case, strategy: Strategy, device: torch.device, exc: BaseException) -> dict[str, Any]:
    v = Verdict("error", f"building inputs failed: {type(exc).__name__}: {exc}"[:300])
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return _record(case, strategy, device, v, {}, 0.0, {"traceback": tb})


def run_case_records(case: Case, strategies: list[Strategy], device: torch.device, refs: ReferenceCache,
                     summary: Summary, timeout: float | None = None, runs: Any = None) -> Iterator[dict[str, Any]]:
    """Records of one case under ``strategies``, each added to ``summary`` as it is yielded. The inputs
    are built once from the seed (a failure there is an error record for every strategy); the reference
    is computed once and dropped when the case is done. ``runs`` (:class:`harness.run.fanout.Helpers`):
    the case's runs start there at once, and are judged here in the same order as without."""
    t0 = time.perf_counter()
    inputs, input_exc = case_inputs(case, device)
    summary.seconds_building_inputs += time.perf_counter() - t0
    if runs is not None and input_exc is None:
        from .fanout import runs_of
        runs.begin(case, inputs, *runs_of(case, strategies, device, refs))
    try:
        for strategy in strategies:
            if input_exc is not None:
                rec, inner = _input_error(case, strategy, device, input_exc), 0.0
            else:
                rec, inner = run_case(case, strategy, device, inputs, refs, timeout, runs)
            summary.seconds_in_scenarios += inner
            summary.add(rec)
            yield rec
    finally:
        refs.drop(case, device)
        if runs is not None:
            runs.end()


def case_inputs(case: Case, device: torch.device) -> tuple[dict, BaseException | None]:
    """(inputs on ``device``, None), or ({}, the exception) where building them failed: a broken scenario
    (``exit()`` included) makes error records, not a crash."""
    try:
        return _inputs(case, device), None
    except (Exception, SystemExit) as exc:  # noqa: BLE001
        return {}, exc


def select_matrix(tier: str, device: str, strategies: Sequence[str], imports: Sequence[str] = (),
                  scenario_globs: Sequence[str] = (), families: Sequence[str] = ()) -> tuple[list, list, torch.device]:
    """(scenarios, strategies, device) of a selection, as ``run`` and ``pytest --harness`` take it; raises
    ValueError with one line for an unknown tier, device or strategy, or filters that select nothing."""
    from ..core.scenario import TIERS, discover
    from ..core.strategy import resolve, tier_presets
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
    dev = resolve_device(device)
    chosen = resolve(list(strategies) or tier_presets(tier))
    scenarios = discover(list(imports)).select(scenario_globs, families)
    if not scenarios:
        raise ValueError("the filters select no scenario; `python -m harness list` shows them")
    return scenarios, chosen, dev


def run_header(cfg: RunConfig, n_cases: int, env: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``run.json`` header of a run of ``n_cases`` cases (environment and configuration)."""
    return {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "environment": env if env is not None else environment(cfg.device.type), "config": cfg.as_dict(),
            "cases": n_cases, "expected_records": n_cases * len(cfg.strategies)}


#: The counts and times :func:`run_stats` reports, which a sharded run sums over its ranks.
SUMMED_STATS = ("references_computed", "references_reused", "seconds_in_scenarios", "seconds_in_references",
                "seconds_building_inputs")


def run_stats(wall: float, parts: dict[str, float], records: int, ran: int, resume: bool,
              bookkeeping_ms: float | None = None, workers: int = 1, fanout: int = 1) -> dict[str, Any]:
    """What a run measured about itself: wall time, references and where the time went (``parts``, keyed
    by :data:`SUMMED_STATS`), and the harness's own time per record of this session (by default the time
    its ``workers`` processes spent outside scenarios, references and inputs: ``wall * workers`` less the
    time inside, which ``parts`` sums over the workers; with one worker, the wall time left outside them).
    Where a case's runs overlapped (``fanout`` > 1) the time inside is not the time outside's complement,
    and the bookkeeping is not measured (None)."""
    if bookkeeping_ms is None and fanout <= 1:
        inside = parts["seconds_in_scenarios"] + parts["seconds_in_references"] + parts["seconds_building_inputs"]
        bookkeeping_ms = 1000 * (wall * max(workers, 1) - inside) / max(ran, 1)
    return {"wall_seconds": wall, **{k: parts[k] for k in SUMMED_STATS}, "records": records,
            "records_this_session": ran, "resumed": resume, "workers": max(workers, 1),
            "bookkeeping_ms_per_record": bookkeeping_ms}


def _done_keys(out: Path, matrix: set[tuple[str, str]] | None = None) -> tuple[set[tuple[str, str]], list[dict]]:
    """Records already in a run directory (see :func:`harness.run.rundir.done_keys`)."""
    return done_keys(Path(out), matrix)


class _InProcess:
    """Cases run in this process (``--workers 0``, or a process that cannot fork): no isolation."""

    def __init__(self, cfg: RunConfig, init: Callable[[], dict] | None = None) -> None:
        self.cfg, self.refs, self.scratch = cfg, ReferenceCache(), Summary()
        self.by_name = init() if init is not None else None  # the real scenarios of stand-ins (check-model)

    def records(self, jobs: Iterable[tuple[Case, list[Strategy]]],
                case_done: Callable[[Case], None] | None = None) -> Iterator[dict[str, Any]]:
        for case, todo in jobs:
            if self.by_name is not None:
                case = Case(self.by_name[case.scenario.name], case.params, case.seed)
            yield from run_case_records(case, todo, self.cfg.device, self.refs, self.scratch, self.cfg.timeout)
            if case_done is not None:
                case_done(case)

    def parts(self) -> dict[str, float]:
        return {"references_computed": self.refs.computed, "references_reused": self.refs.reused,
                "seconds_in_references": self.refs.seconds, "seconds_in_scenarios": self.scratch.seconds_in_scenarios,
                "seconds_building_inputs": self.scratch.seconds_building_inputs}

    def close(self) -> None:
        pass


def _runner(cfg: RunConfig, fds: list[int], init: Callable[[], dict] | None) -> tuple[Any, str, dict[str, Any]]:
    """(what runs the cases, how they are isolated in words, the environment for the header).

    Where no worker can be forked (``--workers 0``; a process that already started the CUDA driver,
    see :func:`harness.run.supervisor.fork_usable`) the cases run in-process and the stats say so."""
    from .supervisor import Supervisor, default_workers, fork_usable
    n = cfg.workers if cfg.workers is not None else default_workers(cfg.device)
    if cfg.workers is None:  # no more workers than cases (a case is the unit a worker takes)
        n = min(n, max(1, count_cases(cfg.scenarios, cfg.tier, cfg.seeds)))
    ok, why, env = fork_usable(cfg.device) if n else (False, "--workers 0", None)
    if env is None:
        env = environment(cfg.device.type)
    if not ok:
        return _InProcess(cfg, init), f"in-process ({why})", env
    sup = Supervisor(cfg.scenarios, cfg.strategies, cfg.device, cfg.timeout, n, fds, init, fanout=cfg.fanout)
    runs = f"; each runs up to {cfg.fanout} of a case's runs at once" if cfg.fanout > 1 else ""
    return sup, f"{n} worker process{'es' if n > 1 else ''} (forked, replaced when one dies or hangs){runs}", env


def run_matrix(cfg: RunConfig, progress: Callable[[int, int, str], None] | None = None,
               resume: bool = False, init: Callable[[], dict] | None = None) -> tuple[Path, Summary, dict]:
    """Run the whole matrix into a run directory; returns (directory, summary, run stats).

    Cases run in worker processes (:mod:`harness.run.supervisor`; ``init``: see there); this process holds
    the directory's lock and writes every record. ``resume`` keeps the records already in ``cfg.out``
    and runs exactly the missing (case, strategy) pairs. SIGINT and SIGTERM end the run with what is
    done written and ``run.json`` marked interrupted; so does a write that fails (a full disk), whose
    OSError names the file."""
    out = Path(cfg.out or default_out_dir(cfg.device))
    n_cases = count_cases(cfg.scenarios, cfg.tier, cfg.seeds)
    check_size(n_cases, len(cfg.strategies), cfg.max_records, BOOKKEEPING_S)
    labels = [s.label for s in cfg.strategies]
    lock = RunLock(out)
    try:
        done, previous = (_done_keys(out, matrix_keys(iter_cases(cfg.scenarios, cfg.tier, cfg.seeds), labels))
                          if resume else (set(), []))
        runner, isolation, env = _runner(cfg, [lock.fileno()], init)
        header = (resumed_header(out, env, {"timeout": cfg.timeout}) if resume
                  else run_header(cfg, n_cases, env))
        writer = RunWriter(out, header, append=resume, lock=lock)
    except BaseException:
        lock.release()
        raise
    if hasattr(runner, "close_fds"):
        runner.close_fds += (writer.fileno(),)
    summary = Summary.of(previous)
    total = n_cases * len(cfg.strategies)
    jobs = ((c, todo) for c in iter_cases(cfg.scenarios, cfg.tier, cfg.seeds)
            if (todo := [st for st in cfg.strategies if (c.key, st.label) not in done]))
    t_start = time.perf_counter()
    status = "complete"
    try:
        with sigterm_as_interrupt():
            for rec in runner.records(jobs, lambda case: writer.sync()):
                writer.append(rec)
                summary.add(rec)
                if progress:
                    progress(summary.records, total, f"{rec['case']} {rec['strategy']}")
    except BaseException:  # SIGINT, SIGTERM, a full disk, or a fault of the harness itself: not complete
        status = "interrupted"
        raise
    finally:
        runner.close()
        parts = runner.parts()
        summary.seconds_in_scenarios = parts["seconds_in_scenarios"]
        summary.seconds_building_inputs = parts["seconds_building_inputs"]
        stats = run_stats(time.perf_counter() - t_start, parts, summary.records, summary.records - len(previous),
                          resume, workers=getattr(runner, "size", 1), fanout=getattr(runner, "fanout", 1))
        stats["isolation"] = isolation
        _close(writer, {**summary.as_dict(), **stats}, status)
    return out, summary, stats


def _close(writer: RunWriter, summary: dict[str, Any], status: str) -> None:
    """Close the run; where the run already failed (interrupted), a second failure here (the disk still
    full) must not hide the first one, which is propagating."""
    try:
        writer.close(summary, status=status)
    except OSError:
        if status == "complete":
            raise


def resume_config(out: Path) -> RunConfig:
    """The configuration of an earlier run, from its ``run.json``, to complete it with ``resume``."""
    from ..core.scenario import discover
    from ..core.strategy import parse
    head = Path(out) / "run.json"
    if not head.is_file():
        raise ValueError(f"--resume {out}: no run.json there; pass a directory written by `python -m harness run`")
    try:
        header = json.loads(head.read_text())
        if header.get("schema_version") != SCHEMA_VERSION:
            raise ValueError(f"--resume {out}: run.json has schema version {header.get('schema_version')}, this "
                             f"harness writes {SCHEMA_VERSION}; start a new run instead")
        _check_resumable(Path(out) / "records.jsonl", out)
        c = header["config"]
        specs = c["strategy_specs"]
        reg = discover(c.get("imports", []))
        scenarios = [reg.get(n) for n in c["scenarios"]]
        strategies = [parse(specs.get(label, label)) for label in c["strategies"]]
        last = (header.get("resumes") or [{}])[-1]  # a resume that lengthened the timeout keeps it for the next
        return RunConfig(scenarios, strategies, resolve_device(c["device"]), seeds=int(c["seeds"]), tier=c["tier"],
                         out=Path(out), imports=list(c.get("imports", [])),
                         timeout=last.get("timeout", c.get("timeout")))
    except (KeyError, TypeError, AttributeError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"--resume {out}: run.json is not a harness run header ({type(exc).__name__}: {exc})") from None


_RESUME_FIELDS = ("case", "seed", "strategy", "family", "outcome")


def _check_resumable(path: Path, out: Path) -> None:
    """Refuse records a resumed run could not continue: another schema version, missing fields, or a file
    in which no line is a record (a torn last line alone is fine: it is dropped, with a warning, on resume)."""
    if not path.exists():
        return
    seen = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torn line is reported once, when the records are rewritten
        for r in read_records(path):
            seen += 1
            if r.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"--resume {out}: a record has schema version {r.get('schema_version')}, this "
                                 f"harness writes {SCHEMA_VERSION}; start a new run instead")
            lacking = [k for k in _RESUME_FIELDS if k not in r]
            if lacking:
                raise ValueError(f"--resume {out}: a record lacks {', '.join(lacking)}; records.jsonl was not "
                                 "written by `python -m harness run`; start a new run instead")
    if not seen and path.read_text(errors="replace").strip():
        raise ValueError(f"--resume {out}: no line of records.jsonl is a readable record (the file is corrupted); "
                         "start a new run instead")
