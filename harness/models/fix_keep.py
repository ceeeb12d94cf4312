"""Which modules a precision plan keeps in higher precision: the module tree a search walks, delta
debugging over it, and what a kept set costs (:mod:`harness.models.fix_search` drives it).

A model is a tree of modules. Keeping a module keeps its own code (the ops between its children: an
attention's ``q @ k^T``) as well as its children, so the search works top-down (hierarchical delta
debugging, Misherghi and Su 2006): ``ddmin`` over a list of modules finds a set from which none can be
dropped, then each kept module is replaced by a subset of its children wherever keeping only those still
passes. Containers without a forward of their own (``nn.ModuleList``, ``nn.ModuleDict``) are never kept
themselves: their children are.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..core.execution import is_conv1d, is_kept

__all__ = ["ddmin", "refine", "callable_children", "gemm_layers", "param_share", "covers_all"]

Passes = Callable[[tuple[str, ...]], bool]


def ddmin(items: list[str], passes: Passes) -> tuple[str, ...]:
    """A subset of ``items`` for which ``passes`` holds and from which no single item can be dropped
    (1-minimal), by delta debugging (Zeller and Hildebrandt 2002); ``passes(tuple(items))`` must hold.
    Subsets keep ``items``' order.

    >>> ddmin(list("abcdefgh"), lambda s: {"c", "f"} <= set(s))
    ('c', 'f')
    """
    cur, n = list(items), 2
    while len(cur) >= 2:
        size = math.ceil(len(cur) / n)
        chunks = [cur[i:i + size] for i in range(0, len(cur), size)]
        for c in chunks:  # one chunk alone
            if passes(tuple(c)):
                cur, n = c, 2
                break
        else:
            for c in chunks:  # everything but one chunk
                rest = [x for x in cur if x not in c]
                if len(chunks) > 2 and passes(tuple(rest)):
                    cur, n = rest, max(n - 1, 2)
                    break
            else:
                if n >= len(cur):
                    break
                n = min(len(cur), 2 * n)
    return tuple(cur)


def _is_container(mod: torch.nn.Module) -> bool:
    """A module nobody calls: it defines no forward (``ModuleList``, ``ModuleDict``)."""
    return type(mod).forward is torch.nn.Module.forward


def callable_children(model: torch.nn.Module, name: str = "") -> list[str]:
    """The dotted names of the modules ``name``'s forward calls directly: its children, with containers
    replaced by their own children (none for ``nn.MultiheadAttention``, which reads its ``out_proj``'s
    weight instead of calling it)."""
    mod = model.get_submodule(name)
    if isinstance(mod, torch.nn.MultiheadAttention):  # it uses its out_proj's weight functionally, never calls it
        return []
    out: list[str] = []
    for child, sub in mod.named_children():
        full = f"{name}.{child}" if name else child
        out += callable_children(model, full) if _is_container(sub) else [full]
    return out


def gemm_layers(model: torch.nn.Module) -> list[str]:
    """The ``nn.Linear`` and Hugging Face ``Conv1D`` layers, in the model's order: what an FP8 recipe routes."""
    return [n for n, m in model.named_modules() if n and (isinstance(m, torch.nn.Linear) or is_conv1d(m))]


def refine(keep: tuple[str, ...], model: torch.nn.Module, passes: Passes) -> tuple[str, ...]:
    """``keep`` with each module replaced by a 1-minimal subset of its callable children wherever keeping
    those (and the rest of ``keep``) passes, recursively; ``passes(keep)`` must hold."""
    todo, done = list(keep), []
    while todo:
        m = todo.pop(0)
        kids = [k for k in callable_children(model, m) if any(True for _ in model.get_submodule(k).parameters())
                or callable_children(model, k)]
        others = tuple(done + todo)
        if kids and passes(others + tuple(kids)):
            sub = ddmin(kids, lambda s: passes(others + s))
            todo = list(sub) + todo  # each may narrow further
        else:
            done.append(m)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return tuple(sorted(done, key=order.__getitem__))


def param_share(model: torch.nn.Module, keep: tuple[str, ...]) -> float:
    """The share of the model's parameters (entries) that ``keep`` holds in higher precision."""
    total = sum(p.numel() for p in model.parameters())
    kept = sum(p.numel() for n, p in model.named_parameters() if is_kept(n.rsplit(".", 1)[0] if "." in n else "",
                                                                          keep))
    return kept / total if total else 0.0


def covers_all(model: torch.nn.Module, keep: tuple[str, ...], fp8: bool) -> bool:
    """Whether ``keep`` keeps every GEMM layer (FP8) or every parameter: the higher precision itself."""
    if fp8:
        return all(is_kept(n, keep) for n in gemm_layers(model))
    return param_share(model, keep) == 1.0
