"""Worker processes: scenario code runs here, never in the process that writes the run directory.

A worker is forked from the supervisor (:mod:`harness.run.supervisor`) after it imported torch, the
registry and the user's modules, so it finds the scenarios (whose callables are lambdas, which cannot
be pickled) in its own copy of the supervisor's memory and torch is imported once per worker, not per
case. It reads jobs ``(scenario name, params, seed, strategy labels)`` from a pipe, runs them with
:func:`harness.run.engine.run_case_records` (the per-case reference cache lives here, reused across the
case's strategies) and sends each record back as a plain dict. Whatever the scenario does to this
process (segfault, ``os._exit``, a timeout it swallows, the OOM killer) the supervisor sees by the
process sentinel or its own clock, and turns into an ``error`` record.

:func:`isolated` runs one call the same way (``check-model``: the user's factory, the diagnosis).
"""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any, Callable, Sequence

__all__ = ["worker_main", "isolated", "IsolatedFailure", "death_reason", "fork_context", "prepare_fork"]

#: Linux prctl option: the signal the kernel sends this process when its parent dies.
_PR_SET_PDEATHSIG = 1


def fork_context() -> mp.context.BaseContext:
    """The ``fork`` start method: the child inherits the registry, the suites and the user's modules."""
    return mp.get_context("fork")


_GOMP: list[Any] = []  # this process's GNU OpenMP runtime (ctypes handle), once found


def _gomp() -> Any:
    """The GNU OpenMP runtime loaded in this process, or None (not loaded yet, or not Linux: torch's OpenMP
    there is not GNU's). A miss is not kept: torch may load it later."""
    if not _GOMP:
        try:
            with open("/proc/self/maps") as maps:
                path = next((line.split()[-1] for line in maps if "/libgomp" in line), None)
            if path:
                _GOMP.append(ctypes.CDLL(path))
        except OSError:
            return None
    return _GOMP[0] if _GOMP else None


def prepare_fork(wanted: int | None) -> int | None:
    """Call just before forking; returns torch's intra-op threads for the child (None: as inherited). GNU
    OpenMP's thread pool does not survive ``fork``: a child that enters a parallel region with more than one thread
    waits forever for pool threads that exist only in its parent (check-model's Python API called after the
    user's own CPU work: one large ``clone`` is enough). So the pool is freed here first (OpenMP 5's
    ``omp_pause_resource_all``; the parent makes a new one at its next parallel region, the child its own),
    and the child gets ``wanted``. Where that cannot be done (an OpenMP runtime without the call), the child
    computes with one thread. No GNU OpenMP in this process: nothing to do."""
    lib = _gomp()
    if lib is None:
        return wanted
    try:
        if lib.omp_pause_resource_all(ctypes.c_int(2)) == 0:  # omp_pause_hard
            return wanted
    except AttributeError:
        pass
    return 1


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        import torch
        torch.set_num_threads(threads)


def _detach(close_fds: Sequence[int]) -> None:
    """Set up a fresh worker: die with the supervisor; let it alone handle Ctrl-C and SIGTERM; drop the
    supervisor's descriptors (the run directory's lock must not outlive the supervisor in a hung worker)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker still ends when its pipe closes
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the supervisor decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for fd in close_fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _counters(refs: Any, summary: Any) -> dict[str, float]:
    """This worker's running totals, sent with every record (a worker that dies keeps its last ones)."""
    return {"references_computed": refs.computed, "references_reused": refs.reused,
            "seconds_in_references": refs.seconds, "seconds_in_scenarios": summary.seconds_in_scenarios,
            "seconds_building_inputs": summary.seconds_building_inputs}


def worker_main(conn: Connection, scenarios: Sequence[Any], strategies: Sequence[Any], device: Any,
                timeout: float | None, close_fds: Sequence[int] = (),
                init: Callable[[], dict[str, Any]] | None = None, threads: int | None = None,
                fanout: int = 1) -> None:
    """The loop of one worker: a job in, ``("record", rec, counters)`` per strategy, then ``("done",)``.

    A job that raises outside the engine's own handling (an ``Expect``/``n`` callable of the scenario,
    the engine itself) sends ``("raised", reason, traceback)`` for the strategy in progress; the
    supervisor runs the case's other strategies again. ``init`` (check-model) builds the scenarios in
    the worker instead of inheriting them: the user's factory runs under the supervisor's deadline.
    ``threads``: torch's intra-op threads here (None: as inherited). ``fanout`` > 1: that many runs of a
    case at once, in as many helpers forked here before the device is touched (:mod:`harness.run.fanout`)."""
    _detach(close_fds)
    import torch
    _set_threads(threads)  # several CPU workers share the cores (and see prepare_fork)
    from .engine import Summary, run_case_records
    from .reference import ReferenceCache
    from ..results import clean
    from ..core.scenario import Case
    by_name = {s.name: s for s in scenarios}
    by_label = {s.label: s for s in strategies}
    refs, summary = ReferenceCache(), Summary()
    broken: tuple[str, str] | None = None
    if fanout <= 1:
        pin_device(device)
    if init is not None:
        try:
            by_name.update(init())
        except BaseException as exc:  # noqa: BLE001 (SystemExit too): every job it gets becomes an error record
            broken = (_one_line("setting up the worker failed", exc), traceback.format_exc())
    runs = None
    if fanout > 1 and broken is None:  # forked before this process touches the device (set_device included)
        from .fanout import Helpers
        if getattr(device, "type", None) == "cpu":  # the runs share the cores: every process computes with
            torch.set_num_threads(max(1, torch.get_num_threads() // fanout))  # as many threads as the others
        runs = Helpers(fanout, by_name, by_label, device, timeout)
    if fanout > 1:
        pin_device(device)
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the supervisor is gone
            job = None
        if job is None:
            if runs is not None:
                runs.close()
            return
        if broken is not None:
            conn.send(("raised", *broken))
            continue
        name, params, seed, labels = job
        case = Case(by_name[name], params, seed)
        try:
            for rec in run_case_records(case, [by_label[x] for x in labels], device, refs, summary, timeout, runs):
                conn.send(("record", clean(rec), _counters(refs, summary)))
        except BaseException as exc:  # noqa: BLE001: scenario code raised where the engine does not catch it
            conn.send(("raised", _one_line("the case raised outside the engine's handling", exc),
                       traceback.format_exc()))
            continue
        conn.send(("done",))


def pin_device(device: Any) -> None:
    """Scenario code that says "cuda" means this rank's GPU (``device`` with an index)."""
    if getattr(device, "type", None) == "cuda" and device.index is not None:
        import torch
        torch.cuda.set_device(device)


def _one_line(what: str, exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{what}: {type(exc).__name__}: {text}"[:300]


def death_reason(exitcode: int | None) -> str:
    """What a worker's exit code says happened to it, in words."""
    if exitcode is None:
        return "the worker process is still running"
    if exitcode < 0:
        sig = -exitcode
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        why = {"SIGSEGV": " (a segmentation fault in scenario or native code)",
               "SIGKILL": " (the kernel's OOM killer sends this when memory runs out; or another process killed it)",
               "SIGABRT": " (an abort in native code)", "SIGBUS": " (a bus error in native code)"}.get(name, "")
        return f"the worker process was killed by {name} ({sig}){why}"
    return (f"the worker process exited with code {exitcode} while running this case (os._exit, or a native "
            "exit, in scenario code)")


class IsolatedFailure(Exception):
    """A call run by :func:`isolated` raised, died or ran past its deadline; ``kind`` says which."""

    def __init__(self, kind: str, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.kind, self.detail = kind, detail  # kind: "raised", "exit" (SystemExit), "died", "deadline"


def _call_child(conn: Connection, fn: Callable, args: tuple, threads: int | None = None) -> None:
    _detach(())
    _set_threads(threads)
    try:
        conn.send(("ok", fn(*args)))
    except SystemExit as exc:
        conn.send(("exit", f"called sys.exit({exc.code!r})", traceback.format_exc()))
    except BaseException as exc:  # noqa: BLE001
        conn.send(("raised", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


def isolated(fn: Callable, args: tuple, timeout: float | None, grace: float = 2.0) -> Any:
    """``fn(*args)`` in a forked process under ``timeout`` seconds (+ ``grace``); its (picklable) result.

    Raises :class:`IsolatedFailure` when the call raised (``kind`` ``raised``, or ``exit`` for
    ``SystemExit``), when its process died (``died``) or ran past the deadline (``deadline``: killed)."""
    ctx = fork_context()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_call_child, args=(child, fn, args, prepare_fork(None)), daemon=True)
    proc.start()
    child.close()
    try:
        limit = None if not timeout else timeout + grace
        ready = mp.connection.wait([parent, proc.sentinel], limit)
        if parent in ready:
            try:
                msg = parent.recv()
            except EOFError:
                msg = None
            if msg is not None:
                if msg[0] == "ok":
                    return msg[1]
                raise IsolatedFailure(msg[0], msg[1], msg[2])
        if not ready:
            raise IsolatedFailure("deadline", f"ran past its {timeout:g} s timeout and was killed")
        proc.join()
        raise IsolatedFailure("died", death_reason(proc.exitcode))
    finally:
        if proc.is_alive():
            proc.kill()
        proc.join()
        parent.close()
