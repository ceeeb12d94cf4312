"""The runs of one case at once: helper processes of a worker, for a device that one run leaves idle.

A case's runs are independent of one another until they are judged: the reference's FP32 and FP64 runs,
its perturbed FP32 runs (:mod:`harness.judge.sensitivity`), its rerun, and every strategy's run each start
from the same inputs and seeds (:func:`harness.run.reference.reference_run`, :func:`harness.run.engine.execute`).
Run one after another they cost their sum; a training of a small model leaves a GPU idle most of the time
(the host launching kernels is the bottleneck), so on a GPU they can share it. A worker with ``fanout``
N > 1 forks N helpers when it starts, before it touches the device (a process that started CUDA cannot
fork one that uses it). At each case the worker queues the case's runs (:meth:`Helpers.begin`); idle
helpers take them in order and send back what the run produced, on the CPU (an Output, or the strategy's
:class:`~harness.run.engine.Ran`), as ``torch.save`` of plain containers that the worker reads with
``weights_only=True`` (:func:`_pack`): no code is unpickled. The worker judges exactly as it does alone, asking for each run as it
needs it (:meth:`Helpers.reference`, :meth:`Helpers.strategy`); it asks in the order they were queued, so
it waits for each. While it waits the worker runs nothing: the deadline armed for a run
(:func:`harness.run.guard.deadline`) can only fire on that run, as without helpers. Each helper's run has a
deadline of its own. A run the worker asks for that was never queued (the full rerun a training's 4-update
probe can call for) runs in the worker.

A run is meant to compute the same bits in a helper as in the worker: same inputs (built from the case's
seed), same seeds, the same deterministic kernels, and results copied between devices exactly; a record
then differs from the serial one only in ``seconds`` and ``peak_bytes``. ``tests/test_fanout.py`` checks
this on the CPU; on a GPU it is a CUDA test there and ``tools/gpu_measure.sh`` part ``parallel``, not run
on one yet.

Faults: a run that raises in a helper becomes the record it would be in the worker (its verdict and
traceback are made there); one that ran out of memory beside the others, or whose helper died (the OOM
killer), runs again in the worker, alone: no further run of the case starts in a helper, those in flight
finish, and the worker runs the rest one at a time (a model that fits once but not four times is checked
as it was before helpers). A reference run that failed in a helper runs again in the worker,
so that the reference fails as it would there. A dead helper is not replaced (the worker has started
CUDA by then): the others carry on, and where none is left the worker runs the rest itself. Helpers die with their worker (``PR_SET_PDEATHSIG``),
so the supervisor's deadline still ends a stuck case.
"""
from __future__ import annotations

import dataclasses
import io
import os
import signal
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Sequence

import torch

from ..core.batches import map_tensors
from ..core.execution import Execution
from ..core.scenario import Case
from .guard import CaseTimeout, cleanup, deadline, is_oom

__all__ = ["Helpers", "Failed", "default_fanout", "MAX_FANOUT"]

#: At most this many runs at once (helpers + the worker).
MAX_FANOUT = 16


def default_fanout(device: torch.device) -> int:
    """Runs of one case at once where the caller does not say: 4 on a GPU (bounded by the cores), 1 on the
    CPU, where the runs compute with every core already and split FP32 sums by the thread count."""
    if device.type != "cuda":
        return 1
    return max(1, min(4, os.cpu_count() or 1))


@dataclass
class Failed:
    """A strategy's run that raised in a helper: the record's verdict and traceback, made there."""

    verdict: Any
    traceback: str | None
    inner: float = 0.0


@dataclass
class _Lost:
    """A run to do again in the worker: out of memory beside the others, its helper died, or it raised."""

    why: str
    timeout: str | None = None  # the helper's deadline fired: raised again here, not rerun
    alone: bool = False  # memory ran out: the rest of the case runs one at a time, in the worker


def _to(device: torch.device | str, obj: Any) -> Any:
    """``obj`` (an Output or a Ran, and what they hold) with every tensor on ``device``, copied exactly."""
    return _rebuilt(map_tensors(lambda t: t.detach().to(device), _plain(obj)), _classes())


def _attempt(case: Case, key: tuple, device: torch.device, inputs: dict, strategies: dict[str, Any],
             timeout: float | None) -> Any:
    """Run ``key`` of ``case`` in a helper: its result, tensors on the CPU (to be sent), a :class:`Failed`
    strategy run, or :class:`_Lost`."""
    from .engine import execute, failure_verdict
    from .reference import reference_run
    t0 = time.perf_counter()
    try:
        with deadline(timeout):
            if key[0] == "ref":
                got: Any = reference_run(case, inputs, device, key[1])
            else:
                got = execute(case, Execution(strategies[key[1]], device), device, inputs)
            return _to("cpu", got)
    except (Exception, SystemExit) as exc:  # noqa: BLE001: the worker decides what a failure becomes
        cleanup(device)
        if is_oom(exc):
            return _Lost(f"out of memory beside the case's other runs: {str(exc).splitlines()[0][:200]}", alone=True)
        if isinstance(exc, CaseTimeout):
            return _Lost("deadline", timeout=str(exc))
        if key[0] == "ref":
            return _Lost(f"{type(exc).__name__}: {exc}"[:300])
        verdict, keep = failure_verdict(exc)
        return Failed(verdict, traceback.format_exc() if keep else None, time.perf_counter() - t0)


def _helper_main(conn: Connection, scenarios: dict[str, Any], strategies: dict[str, Any], device: torch.device,
                 timeout: float | None) -> None:
    """A helper's loop: ``(job id, (scenario, params, seed), key)`` in, ``(job id, result)`` out."""
    from .engine import case_inputs
    from .worker import _detach, pin_device
    _detach(())
    pin_device(device)
    built: tuple[str, tuple[dict, BaseException | None]] | None = None
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        job_id, (name, params, seed), key = job
        case = Case(scenarios[name], params, seed)
        if built is None or built[0] != case.key:
            built = None  # the last case's inputs go before the next ones are built
            built = (case.key, case_inputs(case, device))
        inputs, exc = built[1]
        result = _attempt(case, key, device, inputs, strategies, timeout) if exc is None else _Lost(
            f"building inputs failed: {type(exc).__name__}: {exc}"[:300])
        try:
            conn.send_bytes(_pack(job_id, result))
        except (OSError, ValueError):
            return
        del result
        if device.type == "cuda":
            torch.cuda.empty_cache()  # what this run cached, for the runs of the other processes


class Helpers:
    """``n`` helper processes forked from this worker, and the queue of the current case's runs."""

    def __init__(self, n: int, scenarios: dict[str, Any], strategies: dict[str, Any], device: torch.device,
                 timeout: float | None) -> None:
        from .worker import prepare_fork
        self.device, self.timeout, self.strategies = device, timeout, strategies
        self._idle: list[Connection] = []
        self._busy: dict[Connection, int] = {}  # connection -> job id it runs
        self._pids: dict[Connection, int] = {}
        self._queue: deque[tuple[int, tuple]] = deque()
        self._results: dict[tuple, Any] = {}
        self._jobs: dict[int, tuple] = {}  # job id -> key, of the current case
        self._next = 0
        self._case: Case | None = None
        self._inputs: dict | None = None
        self._alone = False  # a run ran out of memory beside others: the rest of this case runs in the worker
        if not 0 <= n <= MAX_FANOUT:
            raise ValueError(f"{n} helpers: a case's runs go at most {MAX_FANOUT} at once")
        if torch.cuda.is_initialized():  # a fork could not use the GPU: every run stays in the worker
            print(f"warning: CUDA was started in the worker before its helpers were forked (a model factory that "
                  f"moves tensors to the GPU?); the case's runs go one at a time, not {n} at once",
                  file=sys.stderr, flush=True)
            return
        threads = prepare_fork(None)
        for _ in range(n):
            a, b = _pipe()
            pid = os.fork()
            if pid == 0:  # the helper: never returns into the worker's code
                code = 0
                try:
                    a.close()
                    if threads is not None:
                        torch.set_num_threads(threads)
                    _helper_main(b, scenarios, strategies, device, timeout)
                except BaseException:  # noqa: BLE001
                    code = 1
                finally:
                    os._exit(code)
            b.close()
            self._idle.append(a)
            self._pids[a] = pid

    @property
    def size(self) -> int:
        """Helpers alive."""
        return len(self._idle) + len(self._busy)

    # -- a case ---------------------------------------------------------------------------------
    def begin(self, case: Case, inputs: dict, reference: Sequence[tuple], strategies: Sequence[str]) -> None:
        """Queue ``case``'s runs: the reference's (``reference``: :func:`~harness.run.reference.reference_keys`,
        empty where it is held already) and those of the strategies labelled ``strategies``, in that order."""
        self._queue.clear()
        self._results.clear()
        self._jobs.clear()
        self._case, self._inputs = case, inputs
        self._alone = False
        for key in [("ref", k) for k in reference] + [("strategy", s) for s in strategies]:
            self._jobs[self._next] = key
            self._queue.append((self._next, key))
            self._next += 1
        self._dispatch()

    def end(self) -> None:
        """The case is done: queued runs are dropped; running ones finish and are ignored."""
        self._queue.clear()
        self._results.clear()
        self._jobs.clear()
        self._case = self._inputs = None

    def reference(self, key: tuple) -> Any:
        """The Output of the reference run ``key`` (on the device), or None: run it in the worker."""
        return self._result(("ref", key))

    def strategy(self, strategy: Any) -> Any:
        """The strategy's :class:`~harness.run.engine.Ran` (on the device), its :class:`Failed` run, or None:
        run it in the worker."""
        return self._result(("strategy", strategy.label))

    def _result(self, key: tuple) -> Any:
        """What the helper gave for ``key``; None where the worker must run it (a lost run included); a
        helper's deadline raises :class:`CaseTimeout` here, as the run would have in the worker."""
        got = self._take(key)
        if isinstance(got, _Lost):
            if got.timeout:
                raise CaseTimeout(got.timeout)
            what = f"{key[1]}'s run" if key[0] == "strategy" else "a reference run"
            print(f"warning: {self._case.id if self._case else 'a case'}: {what} runs again in the worker: {got.why}",
                  file=sys.stderr, flush=True)
            if got.alone:  # what would fit alone must not fail beside others: no more runs start in helpers
                while self._busy:  # (see _receive), and the worker runs this one and the rest once those in
                    self._receive(None)  # flight are done
            return None
        return got

    # -- the queue ------------------------------------------------------------------------------
    def _take(self, key: tuple) -> Any:
        """``key``'s result, waiting for the helper that runs it (or will: the worker asks for the runs in
        the order they were queued, so one still queued goes to the next helper that is free); None where
        ``key`` was never queued, or no helper is left to run it (the caller runs it, under its own
        deadline: the worker runs nothing else while it waits, so a deadline that fires is always the run's
        it was armed for)."""
        if key in self._results:
            return self._finish(self._results.pop(key))
        if key not in self._jobs.values():
            return None
        while key not in self._results:
            if not self._busy:  # no helper will run it (every one died, or memory ran out): the worker does
                self._queue = deque((j, k) for j, k in self._queue if k != key)
                return None
            self._receive(None)
        return self._finish(self._results.pop(key))

    def _finish(self, got: Any) -> Any:
        return got if isinstance(got, (_Lost, Failed)) else _to(self.device, got)

    def _ready(self, timeout: float | None) -> list[Connection]:
        return wait(list(self._busy), timeout)  # type: ignore[return-value]

    def _receive(self, timeout: float | None) -> None:
        for conn in self._ready(timeout):
            job_id = self._busy[conn]
            with _alarm_held():  # a deadline firing halfway through a message would corrupt the pipe
                try:
                    data = conn.recv_bytes()
                except (EOFError, OSError):
                    self._died(conn, job_id)
                    continue
                del self._busy[conn]
                self._idle.append(conn)
                got_id, result = _unpack(data, job_id)
                if got_id in self._jobs:
                    self._results[self._jobs[got_id]] = result
                    self._alone = self._alone or (isinstance(result, _Lost) and result.alone)
        self._dispatch()

    def _died(self, conn: Connection, job_id: int) -> None:
        self._busy.pop(conn, None)
        try:
            _, status = os.waitpid(self._pids.pop(conn), 0)
        except ChildProcessError:
            status = 0
        conn.close()
        if job_id in self._jobs:
            self._results[self._jobs[job_id]] = _Lost(f"its helper process died (wait status {status}): the OOM "
                                                      "killer, or a fault in native code", alone=True)
            self._alone = True

    def _dispatch(self) -> None:
        while self._idle and self._queue and self._case is not None and not self._alone:
            conn = self._idle.pop()
            job_id, key = self._queue.popleft()
            c = self._case
            try:
                conn.send((job_id, (c.scenario.name, c.params, c.seed), key))
            except (OSError, ValueError):
                self._died(conn, job_id)
                continue
            self._busy[conn] = job_id

    def close(self) -> None:
        """Stop the helpers: an idle one when told, a busy one at once (its result, which nobody will read,
        could fill the pipe and block it for ever)."""
        for conn in self._busy:
            try:
                os.kill(self._pids[conn], signal.SIGKILL)
            except (OSError, KeyError):
                pass
        for conn in list(self._idle) + list(self._busy):
            try:
                conn.send(None)
            except (OSError, ValueError):
                pass
            conn.close()
        for pid in self._pids.values():
            try:
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
        self._idle, self._busy, self._pids = [], {}, {}


def _classes() -> dict[str, type]:
    """The dataclasses a helper's result is made of, by name: all that :func:`_unpack` rebuilds."""
    from ..core.scaling import ScaleTrace
    from ..core.scenario import Output
    from ..judge.verdict import Verdict
    from .engine import Ran
    return {c.__name__: c for c in (Output, ScaleTrace, Verdict, Ran, Failed, _Lost)}


def _plain(obj: Any) -> Any:
    """``obj`` as containers of tensors and plain values (a dataclass as a dict naming its class)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__dataclass__": type(obj).__name__,
                **{f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}}
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    return obj


def _rebuilt(obj: Any, classes: dict[str, type]) -> Any:
    if isinstance(obj, dict):
        fields = {k: _rebuilt(v, classes) for k, v in obj.items() if k != "__dataclass__"}
        if "__dataclass__" not in obj:
            return fields
        new = object.__new__(classes[obj["__dataclass__"]])  # a name not in the list: KeyError, a lost run
        for k, v in fields.items():
            object.__setattr__(new, k, v)
        return new
    if isinstance(obj, tuple):
        return tuple(_rebuilt(v, classes) for v in obj)
    if isinstance(obj, list):
        return [_rebuilt(v, classes) for v in obj]
    return obj


def _pack(job_id: int, result: Any) -> bytes:
    """A helper's message: ``torch.save`` of plain containers, read back with ``weights_only`` (no code runs)."""
    buf = io.BytesIO()
    torch.save({"job": job_id, "result": _plain(result)}, buf)
    return buf.getvalue()


def _unpack(data: bytes, job_id: int) -> tuple[int, Any]:
    """(job id, result) of a helper's message; a result that cannot be read back safely (a type outside
    plain containers and the classes of :func:`_classes`) is a lost run, done again in the worker."""
    try:
        msg = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        return int(msg["job"]), _rebuilt(msg["result"], _classes())
    except Exception as exc:  # noqa: BLE001
        return job_id, _Lost(f"its result could not be read back safely ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''})")


def _pipe() -> tuple[Connection, Connection]:
    from .worker import fork_context
    return fork_context().Pipe()


class _alarm_held:
    """SIGALRM held back for the body (delivered when it ends)."""

    def __enter__(self) -> None:
        self._on = hasattr(signal, "pthread_sigmask")
        if self._on:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})

    def __exit__(self, *exc: Any) -> None:
        if self._on:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})


def runs_of(case: Case, strategies: Sequence[Any], device: torch.device, refs: Any) -> tuple[list[tuple], list[str]]:
    """(the reference runs ``refs`` would compute, the labels of the strategies that would run) of ``case``."""
    from .reference import reference_keys
    s = case.scenario
    if device.type not in s.devices:
        return [], []
    ref = reference_keys(case, device) if refs.computes(case, device) else []
    labels = [st.label for st in strategies if Execution(st, device).supported]
    return ref, labels
