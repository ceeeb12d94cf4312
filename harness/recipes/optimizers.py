"""Optimizer recipes driven through their libraries (``lib=torchao|optimi|bnb`` with ``update=`` or
``states=``): the scenario's or user's torch optimizer is replaced by the library's equivalent with the
same hyperparameters (lr, betas, eps, weight decay, momentum, per parameter group).

| recipe | torchao 0.18 | torch-optimi 0.3 | bitsandbytes |
|---|---|---|---|
| ``update=sr`` | ``_AdamW(bf16_stochastic_round=True)`` (Adam/AdamW) | - | - |
| ``update=kahan`` | - | ``AdamW``/``Adam``/``SGD(kahan_sum=True)`` | - |
| ``states=8bit`` | ``AdamW8bit``/``Adam8bit`` | - | ``AdamW8bit``/``Adam8bit`` |

An optimizer the library has no equivalent for (SGD under torchao, amsgrad, Nesterov momentum, L2
weight decay where the library only decouples it) raises :class:`RecipeUnsupported` with the reason;
the run records ``unsupported``. torchao compiles its optimizer step with ``torch.compile``; on the CPU
it runs eagerly here (the same code, without a compile of several seconds per parameter shape), and the
record says so. Each library is imported only when a strategy names it.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from ..core.libraries import RecipeUnsupported, missing_reason
from ..values.optim_precision import CountingOptimizer

__all__ = ["library_optimizer", "EAGER_NOTE"]

EAGER_NOTE = ("torchao's optimizer step ran eagerly on the CPU (torchao compiles it with torch.compile; the "
              "compile costs seconds per parameter shape): the library's own code, without inductor's fusion")


def _kind(opt: torch.optim.Optimizer) -> str:
    """``adamw``, ``adam`` or ``sgd``; anything else has no library equivalent here."""
    if isinstance(opt, torch.optim.Adam):  # torch's AdamW is an Adam with decoupled weight decay
        decoupled = isinstance(opt, torch.optim.AdamW) or opt.param_groups[0].get("decoupled_weight_decay", False)
        return "adamw" if decoupled else "adam"
    if type(opt) is torch.optim.SGD:
        return "sgd"
    raise RecipeUnsupported(f"{type(opt).__name__} has no library equivalent here (torch.optim.Adam, AdamW and "
                            "SGD are mapped)")


def _refuse(groups: list[dict], lib: str) -> None:
    for g in groups:
        for key, bad in (("amsgrad", True), ("maximize", True), ("nesterov", True)):
            if g.get(key) == bad:
                raise RecipeUnsupported(f"{key}=True is not mapped to {lib}'s optimizer")
        if g.get("dampening", 0) not in (0, 0.0):
            raise RecipeUnsupported(f"SGD dampening={g['dampening']} is not mapped to {lib}'s SGD")


def _adam_groups(groups: list[dict]) -> list[dict]:
    return [{"params": g["params"], "lr": float(g["lr"]), "betas": tuple(g["betas"]), "eps": g["eps"],
             "weight_decay": g["weight_decay"]} for g in groups]


def _no_l2(kind: str, groups: list[dict], lib: str) -> None:
    """torchao's and bitsandbytes' Adam steps decay weights decoupled only: torch's Adam with L2 decay has
    no equivalent there (without weight decay Adam and AdamW are the same step)."""
    if kind == "adam" and any(g["weight_decay"] for g in groups):
        raise RecipeUnsupported(f"torch.optim.Adam with L2 weight decay has no {lib} equivalent ({lib}'s Adam "
                                "steps decay weights decoupled, as AdamW); use AdamW or weight_decay=0")


def _torchao(strategy, kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    import torchao.optim as tao
    if strategy.update == "kahan":
        raise RecipeUnsupported("torchao has no Kahan-compensated update (lib=optimi has)")
    if kind == "sgd":
        raise RecipeUnsupported("torchao has no SGD with BF16 stochastic rounding or 8-bit states (its recipes are "
                                "AdamW/Adam); use lib=none, the harness's own recipe, for any torch optimizer")
    _no_l2(kind, groups, "torchao")
    sr = strategy.update == "sr"
    if strategy.states == "8bit":
        cls = tao.AdamW8bit if kind == "adamw" else tao.Adam8bit
        return cls(_adam_groups(groups), bf16_stochastic_round=sr)
    return tao._AdamW(_adam_groups(groups), bf16_stochastic_round=sr)


def _optimi(strategy, kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    import optimi
    if strategy.update != "kahan" or strategy.states != "param":
        raise RecipeUnsupported("torch-optimi drives update=kahan only (no stochastic rounding, no 8-bit states)")
    if kind == "sgd":
        return optimi.SGD([{"params": g["params"], "lr": g["lr"], "momentum": g["momentum"],
                            "weight_decay": g["weight_decay"]} for g in groups], lr=groups[0]["lr"], kahan_sum=True)
    cls = optimi.AdamW if kind == "adamw" else optimi.Adam
    return cls([{"params": g["params"], "lr": g["lr"], "beta1": g["betas"][0], "beta2": g["betas"][1],
                 "eps": g["eps"], "weight_decay": g["weight_decay"]} for g in groups],  # optimi names the betas apart
               lr=groups[0]["lr"], kahan_sum=True)


def _bnb(strategy, kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    import bitsandbytes as bnb
    if strategy.update != "nearest" or strategy.states != "8bit":
        raise RecipeUnsupported("bitsandbytes drives states=8bit only (no stochastic rounding or Kahan update)")
    if kind == "sgd":
        raise RecipeUnsupported("bitsandbytes' 8-bit SGD is not mapped (its recipe here is Adam/AdamW)")
    _no_l2(kind, groups, "bitsandbytes")
    cls = bnb.optim.AdamW8bit if kind == "adamw" else bnb.optim.Adam8bit
    return cls(_adam_groups(groups))


_DRIVERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"torchao": _torchao, "optimi": _optimi, "bnb": _bnb}


def _holds_8bit(opt: torch.optim.Optimizer) -> bool:
    """Whether the library keeps a state in 8 bits (torchao's subclass, bitsandbytes' uint8 codes)."""
    return any(isinstance(v, torch.Tensor) and (v.dtype == torch.uint8 or type(v).__name__ == "OptimState8bit")
               for st in opt.state.values() for k, v in st.items() if k != "step")


class _Eager:
    """Runs a torchao optimizer's compiled step eagerly (see :data:`EAGER_NOTE`)."""

    def __init__(self, inner: torch.optim.Optimizer) -> None:
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def step(self, closure: Callable | None = None) -> Any:
        with torch.compiler.set_stance("force_eager"):
            return self.inner.step(closure)


def library_optimizer(strategy, scenario_opt: torch.optim.Optimizer, params: list[torch.Tensor],
                      on_step: Callable[[], None] | None = None) -> tuple[CountingOptimizer, list[str]]:
    """The library's optimizer for ``strategy.lib`` in place of ``scenario_opt`` (built on ``params``), with
    its hyperparameters, and notes for the record. Raises :class:`RecipeUnsupported` where the library is
    missing or has no equivalent."""
    why = missing_reason(strategy.lib)
    if why:
        raise RecipeUnsupported(why)
    kind = _kind(scenario_opt)
    groups = scenario_opt.param_groups
    _refuse(groups, strategy.lib)
    with _quiet():
        inner = _DRIVERS[strategy.lib](strategy, kind, groups)
    notes: list[str] = []
    if strategy.lib == "torchao" and params and params[0].device.type == "cpu":
        inner = _Eager(inner)  # type: ignore[assignment]
        notes.append(EAGER_NOTE)
    states = strategy.states == "8bit"
    seen: list[bool] = []

    def acted(before: bool) -> bool:
        if not states:
            return before
        if not seen and _holds_8bit(inner):  # once a state is kept in 8 bits it stays so
            seen.append(True)
        return bool(seen)

    return CountingOptimizer(inner, params, acted, on_step), notes  # type: ignore[arg-type]


@contextlib.contextmanager
def _quiet():
    """The libraries log what optional kernels they could not load; that is not the run's business."""
    import logging
    import warnings
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
