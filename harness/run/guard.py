"""Faults inside a case: a deadline, and cleaning up after an exception or out-of-memory.

The deadline uses SIGALRM (POSIX, main thread): it interrupts Python code between operations, so a
scenario stuck in a loop or in many short kernels is stopped; a single native call that never returns
cannot be interrupted in-process and is stopped when it returns. Off the main thread the deadline
cannot be armed; the engine then records ``deadline: "not armed"``.
"""
from __future__ import annotations

import contextlib
import gc
import signal
import threading
from typing import Iterator

import torch

__all__ = ["CaseTimeout", "deadline", "sigterm_as_interrupt", "cleanup", "is_oom"]


class CaseTimeout(Exception):
    """A case ran past its deadline."""


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _can_alarm() -> bool:
    return hasattr(signal, "setitimer") and _main_thread()


def _on_sigterm(signum, frame):  # noqa: ARG001
    raise KeyboardInterrupt("SIGTERM")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt in the body (main thread only), so a terminated run closes
    its files as an interrupted one does; the previous handler is restored on exit."""
    if not _main_thread():
        yield
        return
    old = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[bool]:
    """Raise :class:`CaseTimeout` in the body after ``seconds``; yields whether the deadline is armed."""
    if not seconds or seconds <= 0 or not _can_alarm():
        yield False
        return

    def _fire(signum, frame):  # noqa: ARG001
        raise CaseTimeout(f"case exceeded its {seconds:g} s timeout")

    old = signal.signal(signal.SIGALRM, _fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


#: How allocators word a failed allocation: CUDA's caching allocator, and torch's CPU allocator (whose
#: ``RuntimeError`` is not a ``MemoryError``).
OOM_MESSAGES = ("out of memory", "can't allocate memory")


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` says an allocation failed (host or device)."""
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return isinstance(exc, MemoryError) or (bool(oom) and isinstance(exc, oom)) or \
        any(m in str(exc) for m in OOM_MESSAGES)


def cleanup(device: torch.device) -> None:
    """Free what a failed case left behind so the next case runs."""
    gc.collect()
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except RuntimeError:
            pass  # a sticky CUDA error: the next allocation will report it as its own error record
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
