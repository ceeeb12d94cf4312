"""Which GEMM layers an FP8 recipe's per-tensor scaling hurts: where the amax of an operand is set by a few
outliers, scaling it to E4M3's max (448) leaves the bulk of the tensor below half the smallest subnormal
(2^-10), where it rounds to zero. ``check-model --fix`` (:mod:`harness.models.fix_search`) starts its search
for the layers to keep in BF16 there.

One FP32 training step of the model (:func:`harness.models.user_model.train_trajectory`) with a forward
hook on every ``nn.Linear`` and Hugging Face ``Conv1D``: for its input and its weight, the share of non-zero
entries that ``|t| * 448 / amax(|t|)`` flushes. This is the per-tensor view (tensorwise and delayed
scaling); recipes that scale per row or per block flush less.
"""
from __future__ import annotations

import functools
from typing import Any

import torch

from ..core.execution import Execution, is_conv1d
from ..values.formats import FORMATS, Format
from ..core.strategy import PRESETS
from .user_model import ModelSpec, Probe, train_trajectory

__all__ = ["flushed_share", "saturated_layers"]

E4M3 = FORMATS["fp8_e4m3"]


def flushed_share(t: torch.Tensor, fmt: Format = E4M3) -> float:
    """The share of ``t``'s non-zero finite entries that scaling ``amax`` to ``fmt.max`` puts at or below half
    ``fmt``'s smallest subnormal (they round to zero there; exactly half ties to the even zero).

    >>> flushed_share(torch.tensor([2.0**20, 1.0, -1.0, 0.0]))  # 448 / 2^20 < 2^-10: both ones flush
    0.6666666666666666
    """
    a = t.detach().abs().double().reshape(-1)
    nz = a[torch.isfinite(a) & (a > 0)]
    if nz.numel() == 0:
        return 0.0
    scaled = nz * (fmt.max / float(nz.max()))
    return float((scaled <= fmt.smallest / 2).double().mean())


class _Scan(Probe):
    """Forward hooks on the GEMM layers that keep each layer's worst flushed share (input or weight)."""

    def __init__(self) -> None:
        self.shares: dict[str, tuple[float, str]] = {}
        self.handles: list[Any] = []

    def attach(self, model: torch.nn.Module) -> None:
        for name, mod in model.named_modules():
            if name and (isinstance(mod, torch.nn.Linear) or is_conv1d(mod)):
                self.handles.append(mod.register_forward_hook(functools.partial(self._on_forward, name)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _on_forward(self, name: str, mod: torch.nn.Module, args: Any, out: Any) -> None:
        x = args[0] if args and isinstance(args[0], torch.Tensor) else None
        found = [(flushed_share(mod.weight), "weight")] + ([(flushed_share(x), "input")] if x is not None else [])
        worst = max(found)
        if worst[0] > self.shares.get(name, (-1.0, ""))[0]:
            self.shares[name] = worst


def saturated_layers(spec: ModelSpec, device: torch.device | str, budget: float = 0.01) -> dict[str, tuple[float, str]]:
    """GEMM layer -> (share flushed, ``weight`` or ``input``) for the layers whose worst operand loses more
    than ``budget`` of its non-zero entries to per-tensor E4M3 scaling, worst first."""
    scan = _Scan()
    train_trajectory(Execution(PRESETS["fp32"], device), spec, 1, probe=scan)
    hit = {k: v for k, v in scan.shares.items() if v[0] > budget}
    return dict(sorted(hit.items(), key=lambda kv: -kv[1][0]))
