"""Per-layer diagnosis of a failing strategy: which module went non-finite first, which parameter
tensors lost gradients to underflow, and whether any single FP16 loss scale could have worked.

The diagnosis re-runs the strategy's training (:func:`harness.models.user_model.train_trajectory`) with
hooks on a deep copy of the model, attached only for that run and removed after it, so a plain run
pays nothing for them (``bench/hooks_overhead.py`` measures both):

* a forward hook on every module checks its output: the first module, in execution order, whose
  output holds inf/NaN is named (children finish before their parents, so the innermost one), and
  whether its inputs were still finite (if not, the values went bad in code outside any module);
* in that same hook a tensor hook on each output that requires a gradient, and a hook on every
  parameter, check gradients as backward produces them: the first non-finite one, in backward
  order, names the module whose output (or parameter) gradient overflowed first, with the loss scale
  in force. A forward overflow makes every later gradient non-finite, so backward events are only
  looked for while the forward pass is finite, and the run stops at the first forward overflow.

Underflow compares the strategy's unscaled gradients of the first update with FP32's at the same
weights and batch: per parameter tensor, the share of entries non-zero in FP32 and zero here. The
loss-scale window is :func:`harness.judge.window.scale_window` of the FP32 gradients.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import torch

from ..judge import sensitivity
from ..core.execution import FP64, Execution
from ..core.formats import FORMATS
from ..judge import metrics
from ..core.scaling import format_number
from ..core.scenario import Output
from ..core.strategy import PRESETS, Strategy
from .user_model import ModelSpec, Probe, train_trajectory
from ..judge.window import Window, scale_window

__all__ = ["NonFinite", "Diagnosis", "LayerProbe", "fp32_gradients", "significant_gradients", "window_gradients", "underflow_by_tensor",
           "diagnose", "fp16_window"]

ROOT = "(model)"


@dataclass(frozen=True)
class NonFinite:
    """Where values first became inf/NaN: ``phase`` forward or backward, the module's dotted name.

    ``cause`` (forward only): ``overflow`` when the module's inputs and own weights were finite (its
    computation overflowed), ``weights`` when its own parameters already held inf/NaN (an earlier
    optimizer step wrote them), ``inputs`` when its inputs did (code outside any module made them)."""

    phase: str
    module: str
    what: str  # "output", "gradient at the output", "gradient of parameter <name>"
    attempt: int
    update: int
    scale: float
    cause: str = ""
    detail: str = ""

    def describe(self) -> str:
        at = f"update {self.update}" + (f", attempt {self.attempt}" if self.attempt != self.update else "")
        if self.phase == "forward":
            return f"forward: first non-finite output at `{self.module}` ({at}): {self.detail}"
        return f"backward: first non-finite {self.what} of `{self.module}` ({at}, loss scale " \
               f"{format_number(self.scale)}): {self.detail}"

    def as_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "module": self.module, "what": self.what, "attempt": self.attempt,
                "update": self.update, "scale": self.scale, "cause": self.cause, "detail": self.detail,
                "describe": self.describe()}


def _tensors(x: Any) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x] if x.is_floating_point() else []
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def _largest(ts: list[torch.Tensor]) -> float:
    vals = [float(t.detach().abs().nan_to_num(0.0, 0.0, 0.0).max()) for t in ts if t.numel()]
    return max(vals, default=0.0)


class LayerProbe(Probe):
    """Hooks that find the first non-finite activation and gradient (see module doc)."""

    def __init__(self) -> None:
        self.forward: NonFinite | None = None
        self.backward: NonFinite | None = None
        self.handles: list[Any] = []
        self._at = (0, 0, 1.0)

    @property
    def stop(self) -> bool:  # type: ignore[override]
        return self.forward is not None

    def attach(self, model: torch.nn.Module) -> None:
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_hook(functools.partial(self._on_forward, name or ROOT)))
        owner = {id(p): (mname or ROOT) for mname, m in model.named_modules() for p in m.parameters(recurse=False)}
        for pname, p in model.named_parameters():
            if p.requires_grad:
                self.handles.append(p.register_hook(functools.partial(self._on_param_grad, owner[id(p)], pname)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def begin(self, attempt: int, update: int, scale: float) -> None:
        self._at = (attempt, update, scale)

    def _event(self, phase: str, module: str, what: str, cause: str, detail: str) -> NonFinite:
        attempt, update, scale = self._at
        return NonFinite(phase, module, what, attempt, update, scale, cause, detail)

    def _on_forward(self, name: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        outs = _tensors(output)
        if self.forward is None and not all(_finite(t) for t in outs):
            ins, own = _tensors(args), [p.detach() for p in module.parameters(recurse=False)]
            bad_w = [n for n, p in module.named_parameters(recurse=False) if not _finite(p.detach())]
            if bad_w:
                cause, why = "weights", (f"its parameters {', '.join(bad_w)} already hold inf/NaN: an optimizer "
                                         "step wrote them")
            elif not all(_finite(t) for t in ins):
                cause, why = "inputs", ("its inputs were already non-finite: code between modules made them (a "
                                        "parent's forward or the loss function)")
            else:
                cause = "overflow"
                why = (f"from finite inputs (largest |x| {_largest(ins):.3g}) and weights (largest "
                       f"{_largest(own):.3g})" if ins else f"from finite weights (largest {_largest(own):.3g})")
            bad = sum(int((~torch.isfinite(t)).sum()) for t in outs)
            self.forward = self._event("forward", name, "output", cause, f"{bad} of {sum(t.numel() for t in outs)} "
                                       f"values inf/NaN{_finite_part(outs)}; {why}")
        if self.forward is None and self.backward is None and torch.is_grad_enabled():
            for t in outs:
                if t.requires_grad:
                    t.register_hook(functools.partial(self._on_output_grad, name))

    def _on_output_grad(self, name: str, grad: torch.Tensor) -> None:
        if self.forward is None and self.backward is None and not _finite(grad):
            self.backward = self._event("backward", name, "gradient at the output", "", _count(grad))

    def _on_param_grad(self, module: str, pname: str, grad: torch.Tensor) -> None:
        if self.forward is None and self.backward is None and not _finite(grad):
            self.backward = self._event("backward", module, f"gradient of parameter {pname}", "",
                                        f"{_count(grad)}; the gradient at the module's output was finite: its "
                                        "weight-gradient product overflowed")


def _count(g: torch.Tensor) -> str:
    return f"{int((~torch.isfinite(g)).sum())} of {g.numel()} values inf/NaN{_finite_part([g])}"


def _finite_part(ts: list[torch.Tensor]) -> str:
    big = _largest(ts)
    return f" (largest finite |value| {big:.3g})" if big > 0 else ""


@dataclass
class Diagnosis:
    """What went wrong under one strategy, layer by layer."""

    strategy: str
    forward: NonFinite | None
    backward: NonFinite | None
    underflow: dict[str, float] = field(default_factory=dict)  # parameter -> share of FP32-non-zero entries lost
    attempts: int = 0

    def lines(self, limit: int = 5) -> list[str]:
        out = [e.describe() for e in (self.forward, self.backward) if e is not None]
        if not out:
            out.append("no inf/NaN in any module's output or gradient")
        if self.underflow:
            worst = sorted(self.underflow.items(), key=lambda kv: -kv[1])
            parts = [f"`{k}` {100 * v:.3g}%" for k, v in worst[:limit]]
            more = f" and {len(worst) - limit} more tensors" if len(worst) > limit else ""
            out.append(f"underflow: gradients non-zero in FP32 and zero here: {', '.join(parts)}{more}")
        else:
            out.append("underflow: no gradient that is non-zero in FP32 was flushed to zero")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "forward": self.forward.as_dict() if self.forward else None,
                "backward": self.backward.as_dict() if self.backward else None, "underflow": self.underflow,
                "attempts": self.attempts, "lines": self.lines()}


def fp32_gradients(spec: ModelSpec, device: torch.device | str) -> dict[str, torch.Tensor]:
    """FP32 (TF32 off) unscaled gradients of the first update: what underflow and windows compare with
    (after :func:`significant_gradients`)."""
    out = train_trajectory(Execution(PRESETS["fp32"], device), spec, 1)
    assert out.grads is not None
    return out.grads


def significant_gradients(spec: ModelSpec, device: torch.device | str, grads: dict[str, torch.Tensor]
                          ) -> dict[str, torch.Tensor]:
    """``grads`` (FP32's, :func:`fp32_gradients`) with its computational zeros set to 0: entries that move
    by half their size or more between FP32 runs one ulp apart or against FP64 (rounding noise of a
    gradient that is 0 in exact arithmetic, such as a key bias's under softmax) are no gradient to lose,
    and no loss scale must lift them (:func:`harness.judge.sensitivity.computational_zeros`)."""
    others = [train_trajectory(Execution(PRESETS["fp32"], device), spec, 1, perturb=k) for k in range(sensitivity.RUNS)]
    zeros = sensitivity.computational_zeros(Output(grads=grads), others + [train_trajectory(FP64(device), spec, 1)])
    if zeros is None or not zeros.any():
        return grads
    sizes = [g.numel() for g in grads.values()]
    return {k: torch.where(z.reshape(g.shape).to(g.device), torch.zeros_like(g), g)
            for (k, g), z in zip(grads.items(), zeros.split(sizes))}


def underflow_by_tensor(grads: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], fmt_name: str
                        ) -> dict[str, float]:
    """Per tensor, the share of entries non-zero in ``ref`` and zero in ``grads`` (only tensors that lost some)."""
    return metrics.underflow_by_tensor(grads, ref, FORMATS[fmt_name])


def window_gradients(spec: ModelSpec, device: torch.device | str, grads: dict[str, torch.Tensor]
                     ) -> dict[str, torch.Tensor]:
    """:func:`significant_gradients` for the loss-scale window, or ``grads`` as they are where the model
    cannot run the FP64 and perturbed runs that find the computational zeros (its reference then gives
    error records of their own; the window keeps the noise)."""
    try:
        return significant_gradients(spec, device, grads)
    except Exception:  # noqa: BLE001
        return grads


def diagnose(spec: ModelSpec, strategy: Strategy, device: torch.device | str, steps: int,
             ref_grads: dict[str, torch.Tensor] | None = None) -> Diagnosis:
    """Re-run ``strategy`` with hooks and report the first non-finite module and the underflow per tensor."""
    ex = Execution(strategy, device)
    ref = ref_grads if ref_grads is not None else significant_gradients(spec, device, fp32_gradients(spec, device))
    probe = LayerProbe()
    out = train_trajectory(ex, spec, steps, probe=probe)
    under = underflow_by_tensor(out.grads or {}, ref, strategy.format.name)
    return Diagnosis(strategy.label, probe.forward, probe.backward, under, int(out.extra.get("attempts", 0)))


def fp16_window(ref_grads: dict[str, torch.Tensor]) -> Window:
    """The FP16 loss-scale window of the FP32 gradients (per tensor and their intersection)."""
    return scale_window(ref_grads, FORMATS["fp16"])
