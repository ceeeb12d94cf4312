"""The per-step bookkeeping of :class:`harness.run.training.Trainer` in a few fused kernels and one read-back.

A training step must cost about what the user's own loop costs: nothing per parameter that waits for the
device, gradients unscaled and checked for inf/NaN by one multi-tensor kernel (the one
``torch.amp.GradScaler`` runs), and every number the host needs from the step read back in one copy.
"""
from __future__ import annotations

import math

import torch

__all__ = ["fp32_grads", "unscale_and_check", "read_back"]


def fp32_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each parameter's gradient in FP32 (the gradient itself where it is FP32 already, to be unscaled in
    place; the step replaces ``.grad`` with it), zeros where it has none."""
    return [p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32) for p in params]


def unscale_and_check(grads: list[torch.Tensor], inv: torch.Tensor, scale: float) -> torch.Tensor:
    """Multiply ``grads`` by ``inv`` (= 1/scale in FP32) in place; returns a 1-element FP32 device tensor, 1
    where any product is inf or NaN, else 0. Bit for bit ``g * inv`` and ``not isfinite(g * inv).all()``.

    The fused kernel flags non-finite *inputs*; for ``1 <= scale < inf`` (``0 < inv <= 1``) a product is
    non-finite exactly where its input is, so one pass does both. Otherwise (a scale below 1 can overflow
    a finite gradient, a subnormal scale makes ``inv`` inf) the products are checked after the multiply."""
    dev = inv.device
    found = torch.zeros((1,), dtype=torch.float32, device=dev)
    if not grads:
        return found
    if 1.0 <= scale < math.inf:
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv.reshape(1))
    else:
        torch._foreach_mul_(grads, inv)
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones((1,), device=dev))
    return found


def read_back(*tensors: torch.Tensor) -> list[float]:
    """The one-element ``tensors`` as Python floats, in one device-to-host copy (one synchronisation)."""
    flat = torch.cat([t.detach().reshape(-1)[:1].float() for t in tensors])
    return flat.tolist()


