"""``check-model`` in worker processes: the user's factory, training and diagnosis never run in the
process that writes the run directory, and each has a deadline.

The factory is called in a forked process (:func:`harness.run.worker.isolated`), once for the FP32
gradients and the loss-scale window (:func:`preflight`), once in each worker that trains the model
under the strategies (:func:`worker_scenarios`), once per diagnosis (:func:`diagnosis`). A target given
as a Python object (a factory or its dict) works the same way: the forked process inherits it. The
supervisor holds only a stand-in scenario (:func:`stand_in`) with the model's name and grid.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch

from ..core.scenario import Output, Scenario
from ..core.strategy import Strategy
from ..run.worker import IsolatedFailure, isolated

__all__ = ["preflight", "stand_in", "worker_scenarios", "diagnosis", "refused"]


def _preflight(target: Any, device: torch.device, seed: int = 0) -> tuple[str, Any]:
    from .diagnose import fp16_window, fp32_gradients, window_gradients
    from .user_model import EXPECTED, load_spec
    spec = load_spec(target, seed=seed)
    try:
        grads = fp32_gradients(spec, device)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{spec.name}: one FP32 training step failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); expected {EXPECTED}") from None
    return spec.name, fp16_window(window_gradients(spec, device, grads))


def refused(target: Any, what: str, exc: IsolatedFailure, timeout: float | None) -> ValueError:
    """The one line for a factory that raised, exited, died or hung while ``what``."""
    name = target if isinstance(target, str) else getattr(target, "__qualname__", "the model")
    if exc.kind == "raised" and exc.args[0].startswith("ValueError: "):
        return ValueError(exc.args[0][len("ValueError: "):])  # the contract's own message
    if exc.kind == "exit":
        return ValueError(f"{name}: the model's module or factory {exc} while {what}; a factory must return "
                          "a dict, not end the process")
    if exc.kind == "deadline":
        return ValueError(f"{name}: {what} did not finish within --timeout {timeout:g} s; raise --timeout, or make "
                          "the factory and one training step faster")
    return ValueError(f"{name}: {what} failed: {exc}")


def preflight(target: Any, device: torch.device, timeout: float | None, seed: int = 0) -> tuple[str, Any]:
    """(model name, FP16 loss-scale window of the FP32 gradients of update 0), computed in a forked
    process under ``timeout``; ValueError (one line) where the factory fails, exits, dies or hangs."""
    try:
        return isolated(_preflight, (target, device, seed), timeout)
    except IsolatedFailure as exc:
        raise refused(target, "building the model and one FP32 training step", exc, timeout) from None


def _never(*args: Any) -> Output:
    raise RuntimeError("the stand-in of a user model ran in the supervisor; its workers build the real one")


def stand_in(name: str, steps: int, seed: int = 0) -> Scenario:
    """What the supervisor knows of the model's scenario: its name and grid (no user code)."""
    from .user_model import CHAIN_REASON, model_grid
    from ..core.scenario import Tolerance
    return Scenario(name=name, family="training", description=f"user model {name}", grid=model_grid(steps, seed),
                    inputs=lambda p, g: {}, run=_never, tolerance=Tolerance(reason=CHAIN_REASON))


def _build(target: Any, steps: int, seed: int = 0) -> dict[str, Scenario]:
    from .user_model import factory_of, load_spec, model_scenario
    from ..run import refcache
    spec = load_spec(target, seed=seed)
    s = model_scenario(spec, steps)
    refcache.register(s.name, factory_of(target), spec)
    return {s.name: s}


def worker_scenarios(target: Any, steps: int, seed: int = 0) -> Callable[[], dict[str, Scenario]]:
    """The ``init`` of the workers: the real scenario, the factory called in the worker."""
    return partial(_build, target, steps, seed)


def _diagnose(target: Any, strategy: Strategy, device: torch.device, steps: int, seed: int = 0) -> Any:
    from .diagnose import diagnose
    from .user_model import load_spec
    return diagnose(load_spec(target, seed=seed), strategy, device, steps)


def diagnosis(target: Any, strategy: Strategy, device: torch.device, steps: int, timeout: float | None,
              seed: int = 0) -> Any:
    """The diagnosis of ``strategy`` (a :class:`~harness.models.diagnose.Diagnosis`) or, where it failed, a
    one-line string saying how."""
    try:
        return isolated(_diagnose, (target, strategy, device, steps, seed), timeout)
    except IsolatedFailure as exc:
        return f"the diagnosis failed: {exc}" + (f" (--timeout {timeout:g} s)" if exc.kind == "deadline" else "")
