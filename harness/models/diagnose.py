"""Per-layer diagnosis of a failing strategy: which module went non-finite first, which parameter
tensors lost gradients to underflow, and whether any single FP16 loss scale could have worked.

The diagnosis re-runs the strategy's training (:func:`harness.models.user_model.train_trajectory`) with
hooks on a deep copy of the model, attached only for that run and removed after it, so a plain run
pays nothing for them (``bench/hooks_overhead.py`` measures both):

* a forward hook on every module checks its output: the first module, in execution order, whose
  output holds inf/NaN is named (children finish before their parents, so the innermost one), and
  whether its inputs were still finite. A module whose inputs were already non-finite did not make
  them: the enclosing module whose own inputs were finite did, in its own code between its children
  (an attention module's ``q @ k^T``, which is no module, handing inf to its output projection), and
  it is the one named;
* in that same hook a tensor hook on each output that requires a gradient, and a hook on every
  parameter, check gradients as backward produces them: the first non-finite one, in backward
  order, names the module whose output (or parameter) gradient overflowed first, with the loss scale
  in force. A forward overflow makes every later gradient non-finite, so backward events are only
  looked for while the forward pass is finite, and the run stops at the first forward overflow.

Lost updates: per parameter tensor, the share of entries with a non-zero gradient that an applied
update left unchanged (``w + dw == w``), over the run (:func:`lost_updates`): what a pure-BF16 run loses,
and where (weights near 1, such as LayerNorm's, absorb updates below 2^-9 of themselves).

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
from ..values.formats import FORMATS
from ..judge import metrics
from ..core.scaling import format_number
from ..core.scenario import Output
from ..core.strategy import PRESETS, Strategy
from .user_model import ModelSpec, Probe, train_trajectory
from ..judge.window import Window, scale_window

__all__ = ["NonFinite", "Diagnosis", "LayerProbe", "parameter_owners", "fp32_gradients", "significant_gradients",
           "window_gradients",
           "underflow_by_tensor", "diagnose", "fp16_window", "lost_updates", "about_updates", "negligible_floor"]

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


def parameter_owners(model: torch.nn.Module) -> dict[int, list[str]]:
    """Every module that holds each parameter (by ``id``), in ``named_modules`` order: the first is the one
    whose name prefixes the parameter's in ``named_parameters`` (a tied weight, such as GPT-2's embedding
    and output head, is named once, after its first owner); the others share it."""
    owners: dict[int, list[str]] = {}
    for mname, m in model.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            names = owners.setdefault(id(p), [])
            if (mname or ROOT) not in names:
                names.append(mname or ROOT)
    return owners


class LayerProbe(Probe):
    """Hooks that find the first non-finite activation and gradient (see module doc)."""

    def __init__(self) -> None:
        self.forward: NonFinite | None = None
        self.backward: NonFinite | None = None
        self.handles: list[Any] = []
        self._at = (0, 0, 1.0)
        self._sizes: list[tuple[str, int]] = []
        self.lost: dict[str, list[int]] = {}  # parameter -> [entries left unchanged, entries with a gradient]

    @property
    def stop(self) -> bool:  # type: ignore[override]
        return self.forward is not None

    def attach(self, model: torch.nn.Module) -> None:
        self._sizes = [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad]
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_hook(functools.partial(self._on_forward, name or ROOT)))
        owners = parameter_owners(model)
        for pname, p in model.named_parameters():
            if p.requires_grad:
                first, *also = owners[id(p)]
                shown = pname + (f" (tied: also {', '.join(f'`{o}`' for o in also)}'s)" if also else "")
                self.handles.append(p.register_hook(functools.partial(self._on_param_grad, first, shown)))

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def begin(self, attempt: int, update: int, scale: float) -> None:
        self._at = (attempt, update, scale)

    def applied(self, names: list[str], live: torch.Tensor, kept: torch.Tensor) -> None:
        sizes = [n for _, n in self._sizes]
        assert [k for k, _ in self._sizes] == names, "the probe's parameters are the trainer's, in its order"
        for name, lv, kp in zip(names, live.split(sizes), kept.split(sizes)):
            c = self.lost.setdefault(name, [0, 0])
            c[0] += int((lv & kp).sum())
            c[1] += int(lv.sum())

    def _event(self, phase: str, module: str, what: str, cause: str, detail: str) -> NonFinite:
        attempt, update, scale = self._at
        return NonFinite(phase, module, what, attempt, update, scale, cause, detail)

    def _on_forward(self, name: str, module: torch.nn.Module, args: Any, output: Any) -> None:
        outs = _tensors(output)
        if self.forward is not None and self.forward.cause == "inputs" and not all(_finite(t) for t in outs):
            self._blame_parent(name, module, args, outs)
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

    def _blame_parent(self, name: str, module: torch.nn.Module, args: Any, outs: list[torch.Tensor]) -> None:
        """A module that encloses the one first named (whose inputs were non-finite) and whose own inputs
        and weights were finite made the values in its own code: it is named instead."""
        child = self.forward
        assert child is not None
        encloses = name == ROOT or child.module.startswith(name + ".")
        ins, own = _tensors(args), [p.detach() for p in module.parameters(recurse=False)]
        if not encloses or child.attempt != self._at[0] or not all(_finite(t) for t in ins + own):
            return
        bad = sum(int((~torch.isfinite(t)).sum()) for t in outs)
        self.forward = self._event("forward", name, "output", "overflow", (
            f"{bad} of {sum(t.numel() for t in outs)} values inf/NaN{_finite_part(outs)}; from finite inputs (largest "
            f"|x| {_largest(ins):.3g}), in its own forward code between its child modules (an operation that is no "
            f"module, such as attention's q @ k^T): its child `{child.module}` received them non-finite"))

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
    #: parameter -> share of its entries with a gradient that an update left unchanged (w + dw == w), largest
    #: first; only tensors that lost some (:func:`lost_updates`)
    lost_updates: dict[str, float] = field(default_factory=dict)
    #: parameter -> mean |w| at the start, for the tensors in ``lost_updates`` (why they absorb updates)
    weight_size: dict[str, float] = field(default_factory=dict)
    #: the verdict's reason the diagnosis explains (check-model sets it); it picks the lines that explain it
    verdict: str = ""

    def lines(self, limit: int = 5) -> list[str]:
        out = [e.describe() for e in (self.forward, self.backward) if e is not None]
        if not out:
            out.append("no inf/NaN in any module's output or gradient")
        if about_updates(self.verdict) or (not self.verdict and self.lost_updates):
            out.append(self._lost_line(limit))
            if about_updates(self.verdict):  # underflow of the first update's gradients is another failure
                return out
        if self.underflow:
            worst = sorted(self.underflow.items(), key=lambda kv: -kv[1])
            parts = [f"`{k}` {100 * v:.3g}%" for k, v in worst[:limit]]
            more = f" and {len(worst) - limit} more tensors" if len(worst) > limit else ""
            out.append(f"underflow: gradients non-zero in FP32 and zero here: {', '.join(parts)}{more}")
        else:
            out.append("underflow: no gradient that is non-zero in FP32 was flushed to zero")
        return out

    def _lost_line(self, limit: int) -> str:
        if not self.lost_updates:
            return "updates: no update was absorbed (w + dw == w never held for a non-zero gradient)"
        worst = list(self.lost_updates.items())
        parts = [f"`{k}` {100 * v:.3g}%" + (f" (mean |w| {self.weight_size[k]:.2g})" if k in self.weight_size else "")
                 for k, v in worst[:limit]]
        more = f" and {len(worst) - limit} more tensors" if len(worst) > limit else ""
        return f"updates absorbed (w + dw == w) per tensor, of its entries with a gradient: {', '.join(parts)}{more}"

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "forward": self.forward.as_dict() if self.forward else None,
                "backward": self.backward.as_dict() if self.backward else None, "underflow": self.underflow,
                "lost_updates": self.lost_updates, "weight_size": self.weight_size, "verdict": self.verdict,
                "attempts": self.attempts, "lines": self.lines()}


def about_updates(reason: str) -> bool:
    """Whether a verdict's reason is about absorbed updates (``w + dw == w``: :mod:`harness.judge.verdict`)."""
    return reason.startswith("updates:")


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
    lost = _lost_shares(probe)
    params = dict(spec.model.named_parameters())
    size = {k: float(params[k].detach().abs().float().mean()) for k in lost if k in params}
    return Diagnosis(strategy.label, probe.forward, probe.backward, under, int(out.extra.get("attempts", 0)), lost, size)


def _lost_shares(probe: LayerProbe) -> dict[str, float]:
    shares = {k: lost / live for k, (lost, live) in probe.lost.items() if live and lost}
    return dict(sorted(shares.items(), key=lambda kv: (-kv[1], kv[0])))


def lost_updates(spec: ModelSpec, strategy: Strategy, device: torch.device | str, steps: int) -> dict[str, float]:
    """Per parameter tensor, the share of its (update, entry) pairs with a non-zero gradient that the update
    left unchanged (``w + dw == w``) over ``steps`` updates of ``strategy``, largest first; tensors that
    lost none are left out. Where a fix for absorbed updates starts (which tensors need FP32 master copies,
    or compensated updates)."""
    probe = LayerProbe()
    train_trajectory(Execution(strategy, device), spec, steps, probe=probe)
    return _lost_shares(probe)


def negligible_floor() -> float:
    """The smallest subnormal of every reduced-precision format (BF16's 2^-133): an FP32 gradient below it
    (1e-43 behind a saturated softmax) is zero in every format a strategy computes in, with or without
    a loss scale a scaler would choose, so it is no evidence that the gradients need range."""
    return min(f.smallest for name, f in FORMATS.items() if name not in ("fp32", "fp64", "tf32"))


def fp16_window(ref_grads: dict[str, torch.Tensor]) -> Window:
    """The FP16 loss-scale window of the FP32 gradients (per tensor and their intersection), gradients below
    :func:`negligible_floor` left out."""
    floor = negligible_floor()
    kept = {k: torch.where(g.abs() < floor, torch.zeros_like(g), g) for k, g in ref_grads.items()}
    return scale_window(kept, FORMATS["fp16"])
