"""Modules kept in higher precision: how a precision plan (:mod:`harness.models.fix`) runs a strategy
with a few named modules left out of its low precision.

:meth:`harness.core.execution.Execution.keeping` names the modules and the format they keep (FP32 or
BF16); :func:`to_storage` stores the model in the strategy's format with those modules kept, when the
training step takes the model (:class:`harness.run.training.Trainer`), after it was routed
(:func:`harness.core.execution.route_linears` leaves kept Linears unrouted, so an FP8 strategy runs them
in its BF16 activation format):

* autocast strategies: the kept module's forward runs under ``torch.autocast(enabled=False)`` (FP32) or
  an autocast to BF16, its FP16/BF16 floating inputs cast to FP32 first, and every GEMM inside it that the
  strategy routes (FP8, emulated TF32) runs natively (:meth:`Execution.native`); its outputs are left as
  they come out (autocast casts them again where the next op asks for the low precision), which is what
  users write by hand;
* cast ("pure") strategies: the kept module's parameters are stored in the kept format, its inputs cast
  to it, and its floating outputs cast back to the strategy's format so that the next layer gets the
  dtype its own weights have.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from .execution import Execution, is_kept

__all__ = ["to_storage", "kept_modules", "with_tied"]

_LOW = (torch.float16, torch.bfloat16)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def kept_modules(model: torch.nn.Module, names: frozenset[str]) -> list[tuple[str, torch.nn.Module]]:
    """The outermost modules of ``model`` named in ``names`` (a kept module's children are kept with it; a
    container such as ``nn.ModuleList``, which nobody calls, stands for its children). ValueError names
    the ones the model does not have."""
    have = dict(model.named_modules())
    missing = sorted(n for n in names if n not in have)
    if missing:
        raise ValueError(f"the model has no module {', '.join(missing)}; a plan names modules as "
                         "model.named_modules() does")
    out = []
    for n in sorted(names):
        if is_kept(n, names - {n}):
            continue  # inside another kept module
        if type(have[n]).forward is torch.nn.Module.forward:  # a container (ModuleList): nobody calls it
            out += kept_modules(model, frozenset(f"{n}.{c}" for c, _ in have[n].named_children()))
        else:
            out.append((n, have[n]))
    return out


def with_tied(model: torch.nn.Module, names: frozenset[str] | tuple[str, ...]) -> frozenset[str]:
    """``names`` and every module outside them that holds one of their parameters (tied weights: GPT-2's
    ``lm_head`` shares ``wte``'s): stored in the kept format, such a module must run in it too."""
    names = frozenset(names)
    kept = {id(p) for n, m in model.named_modules() if is_kept(n, names) for p in m.parameters(recurse=False)}
    tied = {n for n, m in model.named_modules() if n and not is_kept(n, names)
            and any(id(p) in kept for p in m.parameters(recurse=False))}
    return names | tied


def _cast(x: Any, dtype: torch.dtype, src: tuple[torch.dtype, ...]) -> Any:
    """``x`` with every floating tensor of a dtype in ``src`` cast to ``dtype`` (nested tuples, lists, dicts)."""
    if isinstance(x, torch.Tensor):
        return x.to(dtype) if x.dtype in src and x.dtype != dtype else x
    if isinstance(x, (tuple, list)):
        return type(x)(_cast(v, dtype, src) for v in x)
    if isinstance(x, dict):
        return {k: _cast(v, dtype, src) for k, v in x.items()}
    return x


def _autocast_forward(fwd: Callable, ex: Execution, keep: torch.dtype) -> Callable:
    device = ex.device.type

    @functools.wraps(fwd)
    def run(*args: Any, **kwargs: Any) -> Any:
        args, kwargs = _cast(args, torch.float32, _LOW), _cast(kwargs, torch.float32, _LOW)
        with ex.native():  # a GEMM routed by call rather than by layer (attention's products) runs natively too
            if keep == torch.float32:
                with torch.autocast(device, enabled=False):
                    return fwd(*args, **kwargs)
            with torch.autocast(device, dtype=keep):
                return fwd(*args, **kwargs)
    return run


def _cast_forward(fwd: Callable, keep: torch.dtype, low: torch.dtype) -> Callable:
    @functools.wraps(fwd)
    def run(*args: Any, **kwargs: Any) -> Any:
        out = fwd(*_cast(args, keep, (low,)), **_cast(kwargs, keep, (low,)))
        return _cast(out, low, (keep,))
    return run


def to_storage(model: torch.nn.Module, ex: Execution) -> torch.nn.Module:
    """``model`` on ``ex``'s device in the strategy's storage format, with the modules ``ex`` keeps
    (:meth:`Execution.keeping`) stored in their own format and their forwards wrapped (see module doc).
    Without kept modules it is ``model.to(device, param_dtype)``. A kept module's weights are its
    original values in the kept format, never the low-precision ones cast back."""
    keep = _DTYPES[ex.keep_format]
    cast = ex.strategy.apply == "cast" and ex.dtype != keep
    kept = kept_modules(model, with_tied(model, ex.keep_high) if cast else ex.keep_high) if ex.keep_high else []
    saved = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in kept} if cast else {}
    model = model.to(ex.device, ex.param_dtype)
    for name, mod in kept:
        fwd = mod.forward  # the routed forward, or the class's own
        if cast:
            mod.to(keep)
            mod.load_state_dict(saved[name])  # copies the original values into the kept-format tensors
            mod.forward = _cast_forward(fwd, keep, ex.dtype)  # type: ignore[method-assign]
        elif ex.strategy.apply != "cast":
            mod.forward = _autocast_forward(fwd, ex, keep)  # type: ignore[method-assign]
    return model
