"""The mixed-precision training step, written once and used by every scenario with gradients.

It is the textbook loop (nanoGPT reads the same)::

    with autocast:  loss = loss_fn(model, batch)        # or the model cast to fp16/bf16
    (loss * S).backward()                               # S: the loss scale, as a 0-d FP32 tensor
    grads = p.grad * (1/S) in FP32; found_inf = any non-finite
    decision = scaler.update(found_inf)                 # recorded: scale, found_inf, skipped
    if not skipped: optimizer.step()                    # on FP32 master weights when the strategy keeps them

``fp16-gradscaler`` strategies drive the real ``torch.amp.GradScaler`` instead of our scaler, and its
decisions are recorded the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..core.batches import to_device
from ..core.execution import Execution
from ..core.keep import to_storage
from ..values.optim_precision import PrecisionOptimizer, optimizer_recipe
from ..core.scaling import Decision, LossScaleFloorError, ScaleTrace, Scaler
from . import fused

__all__ = ["Trainer", "TrainResult", "make_optimizer"]

LossFn = Callable[[torch.nn.Module, tuple], torch.Tensor]


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    trace: ScaleTrace | None = None
    first_grads: dict[str, torch.Tensor] = field(default_factory=dict)  # of the first step not skipped
    stopped: str | None = None  # why training ended early (a scaler raised at its floor)


class _GradScalerAdapter:
    """Drives torch.amp.GradScaler and reports each step as a :class:`Decision`.

    The scale after a step is known on the host without reading the device: a copy of the scaler's state
    on the CPU goes through the same update kernel (``torch._amp_update_scale_``, what
    ``GradScaler.update`` runs) with the overflow flag already read back; the device's scale is compared
    with it at the next read-back (:meth:`check`)."""

    def __init__(self, ex: Execution) -> None:
        spec = ex.strategy.scaler
        self.gs = torch.amp.GradScaler(ex.device.type, init_scale=spec.init, growth_factor=spec.growth,
                                       backoff_factor=spec.backoff, growth_interval=spec.interval)
        self._scale = torch.full((1,), float(self.gs.get_scale()), dtype=torch.float32)
        self._tracker = torch.zeros((1,), dtype=torch.int32)

    @property
    def scale(self) -> float:
        return float(self._scale)

    def advance(self, found_inf: bool) -> float:
        """The scale GradScaler.update set, from the CPU copy of its state."""
        torch._amp_update_scale_(self._scale, self._tracker, torch.full((1,), float(found_inf)),
                                 self.gs.get_growth_factor(), self.gs.get_backoff_factor(),
                                 self.gs.get_growth_interval())
        return float(self._scale)

    def check(self, device_scale: float) -> None:
        """The device's scale, read back this step, against the CPU copy (they cannot differ)."""
        if device_scale != self.scale:
            raise RuntimeError(f"GradScaler's scale {device_scale!r} differs from its CPU copy {self.scale!r}")


#: Mixed into the case's seed for the stochastic rounding of ``update=sr`` (a stream of its own: the
#: scenario's global RNG, which dropout draws from, is left as every other strategy sees it).
SR_SEED = 0x5D5EED


def make_optimizer(ex: Execution, make_opt: Callable[[list], torch.optim.Optimizer],
                   params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer a run steps with: the scenario's or user's own (``make_opt(params)``), or under an
    optimizer recipe (``update=sr|kahan``, ``states=8bit``) the harness's emulation around it (``lib=none``,
    :class:`~harness.values.optim_precision.PrecisionOptimizer`) or the library's equivalent in its place
    (:func:`harness.recipes.optimizers.library_optimizer`). Every step in which the recipe acted counts in
    ``ex.optimizer_recipe_steps``; a library that has no equivalent raises ``RecipeUnsupported``."""
    s = ex.strategy
    if optimizer_recipe(s) is None:
        return make_opt(params)

    def count() -> None:
        ex.optimizer_recipe_steps += 1

    if s.lib == "none":
        gen = None
        if s.update == "sr":  # seeded from the case (the engine seeds torch with it): runs reproduce
            gen = torch.Generator(device=ex.device).manual_seed(torch.initial_seed() ^ SR_SEED)
        return PrecisionOptimizer(make_opt, params, s.update, s.states, gen, count)  # type: ignore[return-value]
    from ..recipes.optimizers import library_optimizer  # imports the library: only runs that name it
    opt, notes = library_optimizer(s, make_opt(params), params, count)
    ex.notes.extend(n for n in notes if n not in ex.notes)
    return opt  # type: ignore[return-value]


def _compile(model: torch.nn.Module, ex: Execution) -> None:
    """``compile=yes``: the model's forward (and through AOTAutograd its backward) compiled in place by
    ``torch.compile``; the compile cost goes to ``ex.compile_stats`` (:mod:`harness.recipes.torch_compile`)."""
    if ex.strategy.compile:
        from ..recipes.torch_compile import compile_model
        ex.compile_stats = compile_model(model, ex.compile_stats)


class Trainer:
    """Runs training steps of ``model`` under an execution's strategy.

    Parameters live in the strategy's storage format; with ``master=yes`` the optimizer updates FP32
    copies and writes them back. ``optimizer`` is a factory ``params -> torch.optim.Optimizer``.
    """

    def __init__(self, ex: Execution, model: torch.nn.Module,
                 optimizer: Callable[[list], torch.optim.Optimizer] | None = None) -> None:
        self.ex = ex
        s = ex.strategy
        self.model = to_storage(model, ex)  # model.to(device, param_dtype), less the modules a plan keeps
        _compile(self.model, ex)
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.master = [p.detach().float().clone().requires_grad_(True) for p in self.params] if s.master else None
        make_opt = optimizer or (lambda ps: torch.optim.SGD(ps, lr=1e-2))
        self.opt = make_optimizer(ex, make_opt, self.master if self.master is not None else self.params)
        self.trace = ScaleTrace(str(s.scaler))
        self._scale_cache: tuple[float, torch.Tensor] | None = None
        if s.scaler.kind == "gradscaler":
            self.scaler: Scaler | _GradScalerAdapter = _GradScalerAdapter(ex)
        else:
            self.scaler = Scaler(s.scaler)

    def _batch(self, batch: tuple) -> tuple:
        """The batch on the device, floating tensors cast for a pure (``apply=cast``) strategy, however deep
        they sit in tuples, lists and dicts."""
        ex = self.ex
        return tuple(to_device(batch, ex.device, ex.dtype if ex.strategy.apply == "cast" else None))

    def step(self, loss_fn: LossFn, batch: tuple) -> tuple[float, dict[str, torch.Tensor], Decision]:
        """One step; returns (loss, unscaled FP32 gradients by parameter name, the scaler's decision).

        The device is synchronised once: the loss and the overflow flag are read back together
        (:func:`harness.run.fused.read_back`); the gradients are unscaled and checked by fused kernels
        (:func:`harness.run.fused.unscale_and_check`), not one tensor at a time.

        Raises :class:`LossScaleFloorError` when the scaler's policy is to raise at its floor."""
        for p in self.params:
            p.grad = None
        with self.ex.autocast():
            loss = loss_fn(self.model, self._batch(batch))
        if isinstance(self.scaler, _GradScalerAdapter):
            return self._gradscaler_step(loss)
        scale = self._scale_tensor(self.scaler.scale)
        with self.ex.gemm_flags():  # TF32 GEMMs of a tf32 strategy in the backward pass too
            (loss * scale).backward()
        inv = scale.double().reciprocal().float()  # as GradScaler: 1/S in FP32 (inf once S is subnormal)
        g32 = fused.fp32_grads(self.params)
        found = fused.unscale_and_check(g32, inv, self.scaler.scale)
        loss_value, found_inf = fused.read_back(loss, found)
        decision = self.scaler.update(bool(found_inf))
        grads = dict(zip(self.names, g32))
        if not decision.skipped:
            self._apply(grads)
        return loss_value, grads, decision

    def _scale_tensor(self, value: float) -> torch.Tensor:
        """The loss scale as a 0-d FP32 device tensor, rebuilt only when the scale changes (a host-to-device
        copy waits for the device)."""
        if self._scale_cache is None or self._scale_cache[0] != value:
            self._scale_cache = (value, torch.tensor(value, dtype=torch.float32, device=self.ex.device))
        return self._scale_cache[1]

    def _gradscaler_step(self, loss: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], Decision]:
        ad = self.scaler
        assert isinstance(ad, _GradScalerAdapter)
        with self.ex.gemm_flags():
            ad.gs.scale(loss).backward()
        assert self.master is None, "Strategy refuses master=yes with a gradscaler"
        ad.gs.unscale_(self.opt)
        found = sum(ad.gs._found_inf_per_device(self.opt).values(), torch.zeros(1, device=self.ex.device))
        grads = {n: (p.grad.detach().float().clone() if p.grad is not None
                     else torch.zeros_like(p, dtype=torch.float32)) for n, p in zip(self.names, self.params)}
        loss_value, found_inf, before = fused.read_back(loss, found, ad.gs._scale)
        ad.check(before)
        ad.gs.step(self.opt)  # reads found_inf again: the device has nothing left to wait for
        ad.gs.update()
        after = ad.advance(bool(found_inf))
        event = "backoff" if after < before else ("grow" if after > before else "hold")
        return loss_value, grads, Decision(before, bool(found_inf), bool(found_inf), after, event)

    def _apply(self, grads: dict[str, torch.Tensor]) -> None:
        if self.master is not None:
            for m, n in zip(self.master, self.names):
                m.grad = grads[n]
            self.opt.step()
            with torch.no_grad():
                for p, m in zip(self.params, self.master):
                    p.copy_(m)
        else:
            for p, n in zip(self.params, self.names):
                p.grad = grads[n].to(p.dtype)
            self.opt.step()

    def train(self, loss_fn: LossFn, batches: Callable[[int], tuple], steps: int) -> TrainResult:
        """Run ``steps`` steps; a scaler that raises at its floor ends training and is recorded."""
        result = TrainResult(trace=self.trace)
        for i in range(steps):
            try:
                loss, grads, decision = self.step(loss_fn, batches(i))
            except LossScaleFloorError as exc:
                self.trace.raised = str(exc)
                result.stopped = f"step {i}: {exc}"
                break
            self.trace.add(decision)
            result.losses.append(loss)
            if not result.first_grads and not decision.skipped:
                # skipped steps leave the parameters alone, so the first applied step's gradients are
                # taken at the same point as the reference's first step
                result.first_grads = grads
        if not result.first_grads and self.trace.steps:
            result.first_grads = grads
        return result

    def parameters_fp32(self) -> dict[str, torch.Tensor]:
        src = self.master if self.master is not None else self.params
        return {n: p.detach().float() for n, p in zip(self.names, src)}
