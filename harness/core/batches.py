"""Tensors nested in a batch (a tuple, list or dict of them, to any depth, as Hugging Face, timm and
torchvision users pass them): moved to a device, cast, or copied, in one recursive walk that every place
preparing a batch calls.

>>> import torch
>>> b = ({"input_ids": torch.tensor([1, 2]), "mask": torch.ones(2)}, [torch.zeros(1)])
>>> out = to_device(b, "cpu", torch.float16)
>>> out[0]["input_ids"].dtype, out[0]["mask"].dtype, out[1][0].dtype
(torch.int64, torch.float16, torch.float16)
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["map_tensors", "to_device", "clone"]


def map_tensors(fn: Callable[[torch.Tensor], Any], obj: Any) -> Any:
    """``obj`` with every tensor ``t`` inside tuples, lists and dicts replaced by ``fn(t)``; containers keep
    their type (named tuples and dict subclasses such as ``BatchEncoding`` included); anything else is
    returned as it is."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        items = [map_tensors(fn, v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return [map_tensors(fn, v) for v in obj]
    if isinstance(obj, dict):
        out = {k: map_tensors(fn, v) for k, v in obj.items()}
        try:
            return type(obj)(out)
        except Exception:  # noqa: BLE001  (a dict subclass whose constructor wants more: a plain dict does)
            return out
    return obj


def to_device(obj: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> Any:
    """Every tensor in ``obj`` moved to ``device``; floating ones also cast to ``dtype`` when given (a pure
    strategy's inputs). Integer tensors (token ids, labels, masks) keep their dtype."""
    def move(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
    return map_tensors(move, obj)


def clone(obj: Any) -> Any:
    """A copy of every tensor in ``obj`` (a loss that writes into its batch cannot change another run's)."""
    return map_tensors(lambda t: t.clone(), obj)
