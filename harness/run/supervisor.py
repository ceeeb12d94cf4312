"""The supervisor: starts, feeds and watches the worker processes that run the cases.

The process that writes the run directory runs no scenario code. It forks workers
(:mod:`harness.run.worker`), sends each one case at a time ``(scenario name, params, seed, strategy
labels)`` and receives the records as plain dicts. It notices a worker's death by its process sentinel
and a missed deadline by its own clock (the case's ``timeout`` plus :func:`grace`; the whole case
counts: ``inputs()``, the reference, the run, the scenario's ``Expect``/``n`` callables), kills and
replaces the worker, writes an ``error`` record naming what happened (signal, exit code, deadline)
for the strategy in progress and runs the case's other strategies in a fresh worker. A case whose
worker fails twice before finishing any strategy (its inputs or its reference are the likely cause)
gets an ``error`` record for the rest instead of a third try.

Forking is what makes this cheap (torch, the suites and the user's modules are imported once, in the
supervisor), and it needs a supervisor that never initialised CUDA: :func:`can_fork` says whether this
process still can; where it cannot, the engine runs the cases in-process and the run stats say so.
"""
from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any, Callable, Iterable, Iterator

import torch

from ..results import SCHEMA_VERSION
from ..core.scenario import Case
from ..core.strategy import Strategy
from .worker import prepare_fork, death_reason, fork_context, worker_main

__all__ = ["Supervisor", "can_fork", "fork_usable", "default_workers", "grace", "failure_record", "fork_safe_cuda_check",
           "SUMMED_COUNTERS"]

#: The counters a worker reports with every record; the supervisor sums them over every worker it started.
SUMMED_COUNTERS = ("references_computed", "references_reused", "seconds_in_references", "seconds_in_scenarios",
                   "seconds_building_inputs")


def fork_safe_cuda_check() -> None:
    """Make ``torch.cuda.is_available()`` ask NVML instead of initialising the CUDA driver here, so the
    workers forked later can still use CUDA (see torch's "poison fork" note). Call before the first check."""
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")


def can_fork() -> tuple[bool, str]:
    """(whether workers can be forked from this process, why not)."""
    if not hasattr(os, "fork"):
        return False, "this platform cannot fork"
    if torch.cuda.is_initialized():
        return False, "CUDA was initialised in this process before the run, so a forked worker could not use it"
    return True, ""


_PROBED: dict[str, tuple[bool, str, dict[str, Any] | None]] = {}


def fork_usable(device: torch.device) -> tuple[bool, str, dict[str, Any] | None]:
    """(whether workers forked from here can run on ``device``, why not, the environment read by the
    probe). On CUDA a forked process reads the environment (GPU name and all): that tells whether a
    fork can use CUDA (not after this process started the driver) without starting it here."""
    ok, why = can_fork()
    if not ok or device.type != "cuda":
        return ok, why, None
    key = str(device)
    if key not in _PROBED:
        from ..results import environment
        from .worker import IsolatedFailure, isolated
        try:
            _PROBED[key] = (True, "", isolated(environment, (device.type,), 120.0))
        except IsolatedFailure as exc:
            _PROBED[key] = (False, f"a forked process cannot use CUDA here ({exc})", None)
    return _PROBED[key]


def default_workers(device: torch.device) -> int:
    """Worker processes a run starts when ``--workers`` is not given: one per core (of this rank's share),
    up to 4, on the CPU and on a GPU alike.

    On the CPU each worker computes with one thread (:meth:`Supervisor._threads`). Most of the quick tier
    is Python-bound (the FP8, MX and optimizer emulations call many small kernels), so a second process on
    a 2-core machine took it from 32.9 s to 21.8 s wall (``python -m harness run --tier quick --device cpu
    --workers 1|2``; same outcomes, and FP32 sums in another order where torch's threads split them
    differently).

    On a GPU the cases look as host-bound: in the H100 full tier of results/h100/round5 (one worker) a
    128-update training of a 2-block, d=32 transformer took 1.1 to 2.0 s, 8 to 15 ms an update
    (``full_tier_seconds.txt`` there), so one process leaves the GPU idle most of the time, and several
    share it. Each worker has its own CUDA context and the same deterministic kernels, so a case should
    compute the same bits in any worker, only the records' ``seconds`` and their order in the file
    changing; neither that nor the time saved has been measured on a GPU yet (``tools/gpu_measure.sh``
    part ``parallel``). ``--workers 1`` is the run of one process."""
    ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # torchrun's ranks on this host share its cores
    return max(1, min(4, (os.cpu_count() or 1) // max(1, ranks)))


def grace(timeout: float) -> float:
    """Seconds the supervisor waits past a case's timeout before it kills the worker: the worker's own
    deadline (SIGALRM) gets the first chance to end the case with a traceback."""
    return min(max(1.0, 0.1 * timeout), 30.0)


def failure_record(case: Case, strategy: Strategy, device: torch.device, reason: str, seconds: float,
                   detail: dict[str, Any]) -> dict[str, Any]:
    """An ``error`` record written by the supervisor. It calls no scenario code (``n``, ``Expect``: they
    may be what failed), so ``n`` and ``expected`` are null."""
    s = case.scenario
    return {"schema_version": SCHEMA_VERSION, "scenario": s.name, "case": case.id, "family": s.family,
            "params": case.params, "seed": case.seed, "strategy": strategy.label, "strategy_spec": str(strategy),
            "device": device.type, "outcome": "error", "reason": reason[:300], "metrics": {}, "seconds": seconds,
            "bound": None, "margin": None, "n": None, "expected": None, "scenario_version": s.version, **detail}


@dataclass
class _Job:
    case: Case
    todo: list[Strategy]
    retried: bool = False  # the previous attempt at this case failed before it finished a strategy
    done: int = 0  # records received in this attempt


@dataclass
class _Worker:
    proc: Any
    conn: Any
    job: _Job | None = None
    since: float = 0.0  # when the strategy in progress started (the job's start, or the last record)
    counters: dict[str, float] = field(default_factory=dict)


class Supervisor:
    """Runs jobs ``(case, strategies)`` in ``workers`` forked processes; see the module doc.

    ``close_fds``: descriptors the workers close at once (the run directory's lock). ``init``: called
    in each new worker; returns scenarios by name that replace the inherited ones (check-model).
    ``fanout``: runs of one case at once in each worker (:mod:`harness.run.fanout`)."""

    def __init__(self, scenarios: list, strategies: list[Strategy], device: torch.device, timeout: float | None,
                 workers: int = 1, close_fds: Iterable[int] = (), init: Callable[[], dict] | None = None,
                 fanout: int = 1) -> None:
        self.scenarios, self.strategies, self.device, self.timeout = scenarios, strategies, device, timeout
        self.fanout = fanout
        self.size, self.close_fds, self.init = max(1, workers), tuple(close_fds), init
        self.started = 0
        self._live: list[_Worker] = []
        self._retired: list[dict[str, float]] = []  # the last counters of workers that ended
        self._queue: deque[_Job] = deque()
        self._ctx = fork_context()
        self._case_done: Callable[[Case], None] | None = None

    def parts(self) -> dict[str, float]:
        """The counters of every worker started, summed (a worker's last report where it died)."""
        every = self._retired + [w.counters for w in self._live]
        return {k: sum(c.get(k, 0) for c in every) for k in SUMMED_COUNTERS}

    def records(self, jobs: Iterable[tuple[Case, list[Strategy]]],
                case_done: Callable[[Case], None] | None = None) -> Iterator[dict[str, Any]]:
        """Records of ``jobs`` as they arrive (with several workers, in the order they finish);
        ``case_done(case)`` is called when a case has all its records."""
        source, self._case_done = iter(jobs), case_done
        while True:
            self._feed(source)
            busy = [w for w in self._live if w.job is not None]
            if not busy:
                return
            wait([w.conn for w in busy] + [w.proc.sentinel for w in busy], self._wait_for(busy))
            for w in busy:
                yield from self._watch(w, case_done)

    def _feed(self, source: Iterator[tuple[Case, list[Strategy]]]) -> None:
        while True:
            for dead in [w for w in self._live if w.job is None and not w.proc.is_alive()]:  # killed while idle
                self._live.remove(dead)
                self._retired.append(dead.counters)
                dead.conn.close()
            idle = next((w for w in self._live if w.job is None), None)
            if idle is None and len(self._live) >= self.size:
                return
            job = self._queue.popleft() if self._queue else None
            if job is None:
                nxt = next(source, None)
                if nxt is None:
                    return
                job = _Job(nxt[0], list(nxt[1]))
            w = idle or self._start()
            w.job, w.since = job, time.monotonic()
            c = job.case
            w.conn.send((c.scenario.name, c.params, c.seed, [s.label for s in job.todo]))

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=worker_main, daemon=True, name=f"mp-harness-worker-{self.started}",
                                 args=(child, self.scenarios, self.strategies, self.device, self.timeout,
                                       self.close_fds, self.init, self._threads(), self.fanout))
        proc.start()
        child.close()
        self.started += 1
        w = _Worker(proc, parent)
        self._live.append(w)
        return w

    def _threads(self) -> int | None:
        """torch threads per CPU worker: the supervisor's, shared out (two workers of two threads each
        on two cores ran the quick tier 2.3 times slower than one; of one thread each, 1.4 times faster).
        A lone worker keeps the supervisor's threads, so check-model's single worker computes what it
        always did; torch splits an FP32 reduction by its thread count, so ``--workers 1`` and the CPU
        default sum FP32 in another order (the outcomes are the same). Before each fork the OpenMP pool is
        freed, or the worker gets one thread where that cannot be done (:func:`harness.run.worker.prepare_fork`)."""
        if self.device.type != "cpu" or self.size == 1:
            return prepare_fork(None)
        return prepare_fork(max(1, torch.get_num_threads() // self.size))

    def _deadline(self) -> float | None:
        return None if not self.timeout else self.timeout + grace(self.timeout)

    def _wait_for(self, busy: list[_Worker]) -> float | None:
        limit = self._deadline()
        if limit is None:
            return None
        now = time.monotonic()
        return max(0.0, min(w.since + limit - now for w in busy))

    def _watch(self, w: _Worker, case_done: Callable[[Case], None] | None) -> Iterator[dict[str, Any]]:
        """Everything ``w`` sent, then whether it died or missed its deadline."""
        try:
            while w.job is not None and w.conn.poll():
                yield from self._message(w, w.conn.recv(), case_done)
        except (EOFError, OSError):
            pass  # the pipe closed: the worker is dead (below)
        if w.job is None:
            return
        if not w.proc.is_alive() or w.conn.closed:
            w.proc.join()
            yield from self._fail(w, death_reason(w.proc.exitcode), {"worker": {
                "event": "died", "exitcode": w.proc.exitcode}}, replace=True)
        elif self._deadline() is not None and time.monotonic() - w.since > self._deadline():
            w.proc.kill()
            w.proc.join()
            reason = (f"deadline: the case ran past its {self.timeout:g} s timeout (+ {grace(self.timeout):g} s "
                      "grace) without returning (scenario code that catches the timeout, or a call that never "
                      "returns); the worker was killed (SIGKILL) and replaced")
            yield from self._fail(w, reason, {"worker": {"event": "deadline", "exitcode": w.proc.exitcode}},
                                  replace=True)

    def _message(self, w: _Worker, msg: tuple, case_done: Callable[[Case], None] | None) -> Iterator[dict]:
        job = w.job
        assert job is not None
        if msg[0] == "record":
            _, rec, w.counters = msg
            job.todo.pop(0)
            job.done += 1
            w.since = time.monotonic()
            yield rec
        elif msg[0] == "done":
            w.job = None
            if case_done is not None:
                case_done(job.case)
        elif msg[0] == "raised":
            yield from self._fail(w, msg[1], {"traceback": msg[2]}, replace=False)

    def _fail(self, w: _Worker, reason: str, detail: dict[str, Any], replace: bool) -> Iterator[dict[str, Any]]:
        """The strategy in progress gets an error record; the case's others go to a (fresh) worker."""
        job = w.job
        assert job is not None
        w.job = None
        if replace:
            self._live.remove(w)
            self._retired.append(w.counters)
            w.conn.close()
        seconds = time.monotonic() - w.since
        yield failure_record(job.case, job.todo[0], self.device, reason, seconds, detail)
        rest = job.todo[1:]
        if replace and job.done == 0 and job.retried:  # twice before a first record: do not try a third time
            why = (f"not run: the worker failed twice on this case before it finished a strategy (last: "
                   f"{reason}); its inputs or its reference are the likely cause")
            for s in rest:
                yield failure_record(job.case, s, self.device, why, 0.0, {"worker": {"event": "skipped"}})
            rest = []
        if rest:
            self._queue.appendleft(_Job(job.case, rest, retried=replace and job.done == 0))
        elif self._case_done is not None:  # the case's last strategy failed: the case is done all the same
            self._case_done(job.case)

    def close(self) -> None:
        """Stop every worker: idle ones are told to, busy ones (an interrupted run) are killed."""
        for w in self._live:
            try:
                if w.job is None:
                    w.conn.send(None)
                else:
                    w.proc.kill()
            except OSError:
                w.proc.kill()
        for w in self._live:
            w.proc.join(5)
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join()
            w.conn.close()
            self._retired.append(w.counters)
        self._live = []
