"""A user's model as a training run: the factory contract, its validation, and the run itself.

``FACTORY()`` returns a dict::

    {"model": torch.nn.Module,                    # any module, left unchanged
     "batch": lambda step: (x, y),                # the inputs of step `step`, a tuple
     "loss": lambda model, batch: scalar_tensor,  # runs the forward pass
     "optimizer": lambda params: torch.optim...,  # optional; default AdamW(lr=1e-3)
     "observe": lambda model: {"name": float}}     # optional; what to record after each step

The batch's tuple may nest tensors in dicts and lists (``({"input_ids": ids, "labels": ids},)``): they are
moved to the device and, for pure strategies, cast, wherever they sit. ``observe`` makes a failure's
mechanism visible in the record: its numbers after every training step (attempt) land in the record's
``metrics["observed"]`` as ``{name: [value per step]}`` (the attention-logit maximum of a regime of
:mod:`harness.models.zoo_regimes`). ``zoo:NAME[@SIZE]`` names a model of :mod:`harness.models.zoo`.

:func:`train_trajectory` trains a deep copy of the model (the same initial weights every time) for a
number of updates on the same batches under one strategy, and returns what the verdict judges
against the FP32 trajectory: the net parameter update (its ``rel_err`` is the parameter drift), the
share of updates the weights absorbed (``w + dw == w``), the first update's gradients, the loss curve
and the scaler's trace. ``check-model`` (:mod:`harness.models.model_check`) runs it on a user's model, the
``training`` family (``suites/training.py``) on built-in ones: both are judged the same way.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..core.batches import clone
from ..core.execution import Execution, gemm_coverage, route_linears
from ..core.scaling import LossScaleFloorError
from ..core.scenario import Output, Scenario, Tolerance
from ..run.training import Trainer

__all__ = ["ModelSpec", "load_spec", "depth", "train_trajectory", "training_kernels", "chain_length",
           "model_scenario", "Probe",
           "DEFAULT_STRATEGIES", "DEFAULT_STEPS", "EXPECTED", "CHAIN_REASON", "RNG_NOTE", "target_module", "ZOO_PREFIX", "model_grid"]

#: Autocast strategies: they apply to any model unchanged (casting strategies such as ``bf16-pure``
#: need a model whose code accepts FP16/BF16 inputs; pass them with ``--strategy``).
DEFAULT_STRATEGIES = ("fp32", "fp16", "fp16-dynamic", "fp16-gradscaler", "bf16")
DEFAULT_STEPS = 32
EXPECTED = ("a dict with keys model (torch.nn.Module), batch (callable step -> tuple), loss (callable "
            "(model, batch) -> scalar tensor) and optionally optimizer (callable params -> torch.optim.Optimizer) and "
            "observe (callable model -> dict of numbers)")
#: ``check-model zoo:NAME`` names a model of the zoo: this prefix stands for its module.
ZOO_PREFIX = "zoo:"
ZOO_MODULE = "harness.models.zoo"
CHAIN_REASON = ("a training run chains steps*(2*depth+1) roundings (each step's forward and backward through "
                "`depth` parameterised layers, and the next step starts from this one's result): the error "
                "bound grows like a random walk over the steps")


def _default_optimizer(params: list) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


@dataclass(frozen=True)
class ModelSpec:
    """A validated factory result: the model and how to train it."""

    name: str
    model: torch.nn.Module
    batch: Callable[[int], tuple]
    loss: Callable[[torch.nn.Module, tuple], torch.Tensor]
    optimizer: Callable[[list], torch.optim.Optimizer] = _default_optimizer
    observe: Callable[[torch.nn.Module], dict] | None = None
    #: the seed of the factory's RNG, the batches drawn from the global RNG and the training's randomness
    seed: int = 0
    #: ``batch(step)`` as first drawn, in the factory's own default dtype, so every run (the FP64 one
    #: too) trains on bit-identical inputs; and the RNG state batches are drawn from (see :meth:`batch_at`)
    drawn: dict[int, tuple] = field(default_factory=dict, compare=False, repr=False)
    dtype: torch.dtype = field(default_factory=torch.get_default_dtype, compare=False)
    _rng: list = field(default_factory=list, compare=False, repr=False)

    @property
    def depth(self) -> int:
        return depth(self.model)

    def loss_at(self, model: torch.nn.Module, batch: tuple) -> torch.Tensor:
        """``loss(model, batch)``, checked to be a scalar tensor."""
        out = self.loss(model, batch)
        if not isinstance(out, torch.Tensor) or out.numel() != 1 or not out.is_floating_point():
            what = f"a tensor of shape {tuple(out.shape)} and dtype {out.dtype}" if isinstance(out, torch.Tensor) \
                else f"a {type(out).__name__}"
            raise ValueError(f"{self.name}: loss(model, batch) returned {what}; expected a scalar floating tensor "
                             "(reduce it, e.g. with .mean())")
        return out.reshape(())

    def batch_at(self, step: int) -> tuple:
        """``batch(step)`` as a tuple (anything else is an error saying what was expected), the same
        bit for bit in every run: drawn once, under the factory's own default dtype (a batch drawn with
        ``torch.randn`` under FP64's default dtype would hold other numbers) and from an RNG stream of its
        own (a batch drawn from the global RNG neither takes numbers from a run's dropout nor depends on
        how many a run consumed), then handed out as fresh copies (a loss that writes into its batch
        cannot change the next run's)."""
        if step not in self.drawn:
            self.drawn[step] = self._draw(step)
        return clone(self.drawn[step])

    def _draw(self, step: int) -> tuple:
        with torch.random.fork_rng(devices=[]), _dtype(self.dtype):
            if self._rng:
                torch.set_rng_state(self._rng[0])
            else:
                torch.manual_seed(self.seed)  # a batch drawn from the global RNG: the same numbers in every process
            b = self.batch(step)
            self._rng[:] = [torch.get_rng_state()]
        if isinstance(b, list):
            b = tuple(b)
        if not isinstance(b, tuple):
            raise ValueError(f"{self.name}: batch({step}) returned {type(b).__name__}; expected a tuple of "
                             "inputs, e.g. (x, y), that loss(model, batch) unpacks")
        return b


def depth(model: torch.nn.Module) -> int:
    """Modules that hold parameters themselves: an upper bound on the layers a signal passes through."""
    return max(1, sum(1 for m in model.modules() if any(True for _ in m.parameters(recurse=False))))


def _sanitize(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "model"


def target_module(target: str) -> str:
    """The module a ``MODULE:FACTORY`` target imports (``zoo:NAME`` is :mod:`harness.models.zoo`'s)."""
    return ZOO_MODULE if target.startswith(ZOO_PREFIX) else target.split(":")[0]


def factory_of(target: str | Callable[[], dict] | dict) -> tuple[str, str] | None:
    """Where a target's factory lives, ``(module, name)``: ``MODULE:FACTORY`` as written, ``zoo:NAME[@SIZE]``
    in :mod:`harness.models.zoo`, a function at its own module and qualified name; None for a dict."""
    if isinstance(target, str):
        module, name = target_module(target), target.split(":", 1)[1]
        return module, _zoo_name(name) if module == ZOO_MODULE else name
    if callable(target) and hasattr(target, "__qualname__") and hasattr(target, "__module__"):
        return target.__module__, target.__qualname__
    return None


def _zoo_name(text: str) -> str:
    """``NAME[@SIZE]`` of a zoo target as ``NAME@SIZE`` (``gpt2`` is ``gpt2@tiny``: one model, one name, one
    cached reference, however it is written); an unknown name or size raises one line naming the close ones."""
    from . import zoo
    name, size = zoo.parse_target(text)
    zoo.get(name)
    return f"{name}@{size}"


def _resolve(target: str) -> tuple[Callable, str]:
    if target.count(":") != 1 or not all(target.split(":")):
        raise ValueError(f"{target!r}: expected MODULE:FACTORY, e.g. examples.third_party_model:factory, or "
                         "zoo:NAME for a model of the zoo (python -m harness zoo --help)")
    mod_name, attr = target_module(target), target.split(":")[1]
    if mod_name == ZOO_MODULE:
        attr = _zoo_name(attr)
    try:
        mod = importlib.import_module(mod_name)
    except Exception as exc:
        raise ValueError(f"cannot import module {mod_name!r} ({type(exc).__name__}: {exc}); pass a module on "
                         "sys.path or PYTHONPATH, e.g. examples.third_party_model:factory") from None
    if not hasattr(mod, attr):
        found = sorted(n for n, v in vars(mod).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == mod.__name__)
        raise ValueError(f"module {mod_name!r} has no {attr!r}" + (f"; callables there: {', '.join(found)}"
                                                                    if found else ""))
    fac = getattr(mod, attr)
    if not callable(fac):
        raise ValueError(f"{target} is a {type(fac).__name__}, not callable; expected a factory returning {EXPECTED}")
    return fac, _sanitize(f"{mod_name.rsplit('.', 1)[-1]}-{attr}")


def _call(fac: Callable[[], Any], seed: int) -> Any:
    """``fac()`` with the global RNG seeded with ``seed`` (a factory that draws its weights without seeding
    builds the same model in every process) and restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fac()


def load_spec(target: str | Callable[[], dict] | dict, name: str | None = None, seed: int = 0) -> ModelSpec:
    """A :class:`ModelSpec` from ``"MODULE:FACTORY"`` (or ``"zoo:NAME[@SIZE]"``), a factory, or the factory's
    dict; the factory is called with the global RNG seeded with ``seed``.

    Raises ValueError naming what was expected when the factory is missing or returns the wrong shape."""
    if isinstance(target, str):
        fac, default = _resolve(target)
    elif callable(target):
        fac, default = target, _sanitize(getattr(target, "__qualname__", "model"))
    else:
        fac, default = (lambda: target), "model"
    name = name or default
    try:
        d = _call(fac, seed)
    except Exception as exc:
        raise ValueError(f"{name}: the factory raised {type(exc).__name__}: {exc}") from None
    if not isinstance(d, dict):
        raise ValueError(f"{name}: the factory returned {type(d).__name__}; expected {EXPECTED}")
    missing = [k for k in ("model", "batch", "loss") if k not in d]
    unknown = sorted(set(d) - {"model", "batch", "loss", "optimizer", "observe"})
    if missing or unknown:
        what = (f"lacks {', '.join(missing)}" if missing else "") + ("; " if missing and unknown else "") + \
               (f"has unknown keys {', '.join(unknown)}" if unknown else "")
        raise ValueError(f"{name}: the factory's dict {what}; expected {EXPECTED}")
    if not isinstance(d["model"], torch.nn.Module):
        raise ValueError(f"{name}: model is a {type(d['model']).__name__}; expected a torch.nn.Module")
    if not any(p.requires_grad for p in d["model"].parameters()):
        raise ValueError(f"{name}: the model has no trainable parameters; nothing to train")
    for k in ("batch", "loss", "optimizer", "observe"):
        if k in d and not callable(d[k]):
            raise ValueError(f"{name}: {k} is a {type(d[k]).__name__}, not callable; expected {EXPECTED}")
    return ModelSpec(name, d["model"], d["batch"], d["loss"], d.get("optimizer") or _default_optimizer,
                     d.get("observe"), seed)


def chain_length(depth: int, steps: int) -> int:
    """Roundings chained over a training run of ``steps`` updates: ``steps * (2*depth + 1)``."""
    return max(1, steps) * (2 * depth + 1)


class Probe:
    """What :func:`train_trajectory` tells an observer (the diagnosis): attach, each attempt, detach."""

    stop: bool = False

    def attach(self, model: torch.nn.Module) -> None: ...
    def begin(self, attempt: int, update: int, scale: float) -> None: ...
    def detach(self) -> None: ...

    def applied(self, names: list[str], live: torch.Tensor, kept: torch.Tensor) -> None:
        """After an applied update: flat masks (in the order of ``names``' parameters) of the entries with a
        non-zero gradient (``live``) and of those the update left unchanged (``kept``)."""


def _flat(tensors: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])


def train_trajectory(ex: Execution, spec: ModelSpec, steps: int, probe: Probe | None = None,
                     seed: int | None = None, perturb: int | None = None, deterministic: bool = True) -> Output:
    """Train a deep copy of ``spec.model`` for ``steps`` updates under ``ex``; what the verdict judges.

    Batches are indexed by applied update: a step the scaler skips is retried on the same batch, so a
    dynamic scaler's back-off costs attempts, not data, and update ``i`` of every strategy sees the
    same batch as FP32's (bit for bit: :meth:`ModelSpec.batch_at`). The run ends after ``steps``
    updates, after ``2*steps`` attempts (more than half skipped: stalled), at a skip under a fixed
    scale (retrying cannot change it), or when the scaler raises at its floor. Returned: the net
    parameter update (``value``), the first update's unscaled gradients (or the non-finite ones that
    stopped the run), the loss of each update, the scaler's trace, and in ``extra``: ``updates_lost``,
    the share of (update, entry) pairs with a non-zero gradient that left the weight unchanged
    (``w + dw == w``); ``gemm_coverage``, the GEMM layers that ran in the strategy's format
    (:func:`harness.core.execution.gemm_coverage`); ``inputs_identical``, False with ``inputs_note`` when
    the model or loss draws random numbers (dropout), which runs in other dtypes may draw differently.
    Dropout and other randomness are seeded with ``seed`` (None: ``spec.seed``). With ``spec.observe``,
    ``observed`` holds its numbers after every attempt. ``perturb=k`` first moves every weight one
    ulp of its storage format up or down (signs drawn from seed ``k``): the run
    :mod:`harness.judge.sensitivity` measures FP32's own sensitivity with. ``deterministic=False`` runs
    torch's default CUDA kernels instead of its deterministic ones (:func:`reproducible`; what
    ``bench/check_model.py`` measures the deterministic kernels' cost with).
    """
    dev = [ex.device.index or 0] if ex.device.type == "cuda" else []
    kernels = training_kernels(ex) if deterministic else contextlib.nullcontext()
    with torch.random.fork_rng(devices=dev), _default_dtype(ex.dtype), kernels:
        torch.manual_seed(spec.seed if seed is None else seed)
        trainer = Trainer(ex, route_linears(copy.deepcopy(spec.model), ex), spec.optimizer)
        if perturb is not None:
            _perturb(trainer, perturb)
        names = trainer.names
        start = _flat(trainer.parameters_fp32(), names).clone()
        losses: list[float] = []
        grads: dict[str, torch.Tensor] | None = None
        stopped, update, attempts, rng_used = None, 0, 0, False
        lost_of = torch.zeros(2, dtype=torch.int64, device=ex.device)  # counted on the device, read once at the end
        observed: dict[str, list[float]] = {}
        if probe is not None:
            probe.attach(trainer.model)
        try:
            while update < steps and attempts < 2 * steps and not (probe is not None and probe.stop):
                if probe is not None:
                    probe.begin(attempts, update, trainer.scaler.scale)
                attempts += 1
                before = _flat(trainer.parameters_fp32(), names)  # a copy: torch.cat allocates
                batch = spec.batch_at(update)
                rng = _rng_states(ex.device) if attempts == 1 else None
                try:
                    loss, g, decision = trainer.step(spec.loss_at, batch)
                except LossScaleFloorError as exc:
                    trainer.trace.raised = stopped = f"update {update}: {exc}"
                    break
                finally:
                    if rng is not None:
                        rng_used = not all(torch.equal(a, b) for a, b in zip(rng, _rng_states(ex.device)))
                trainer.trace.add(decision)
                _observe(spec, trainer.model, observed)
                losses[update:] = [loss]  # the loss of update `update`'s latest attempt
                if update == 0:  # the first update's gradients: FP32's first step has the same params and batch
                    grads = g
                if not decision.skipped:
                    live = _flat(g, names) != 0
                    kept = _flat(trainer.parameters_fp32(), names) == before
                    lost_of += torch.stack([(live & kept).sum(), live.sum()])
                    if probe is not None:
                        probe.applied(names, live, kept)
                    update += 1
                elif not ex.strategy.scaler.dynamic:
                    grads, stopped = g, f"update {update}: non-finite gradients under a fixed loss scale"
                    break
        finally:
            if probe is not None:
                probe.detach()
        delta = _flat(trainer.parameters_fp32(), names) - start
        lost, nonzero = lost_of.tolist()
    extra: dict[str, Any] = {"updates": update, "attempts": attempts, "update_norm": float(delta.double().norm()),
                             **_lost_metrics(ex, lost, nonzero),
                             "gemm_coverage": gemm_coverage(trainer.model, ex), "inputs_identical": not rng_used}
    if rng_used:
        extra["inputs_note"] = RNG_NOTE
    if observed:
        extra["observed"] = observed
    if stopped:
        extra["stopped"] = stopped
    trace = trainer.trace if ex.strategy.scaler.kind != "none" else None
    return Output(value=delta, grads=grads, losses=losses, trace=trace, extra=extra)


def _lost_metrics(ex: Execution, lost: int, nonzero: int) -> dict[str, Any]:
    """The share of (update, weight) pairs that left the weight unchanged. Under round to nearest such an
    update is lost (``updates_lost``, judged against a budget). Under ``update=sr`` or ``kahan`` it is not:
    the Kahan compensation keeps it and stochastic rounding moves the weight by it in expectation, so the
    same count is ``updates_unmoved``, reported, and the run is judged by its drift and loss instead."""
    share = lost / nonzero if nonzero else 0.0
    if ex.strategy.update in ("sr", "kahan"):
        return {"updates_unmoved": share, "updates_unmoved_of": [lost, nonzero]}
    return {"updates_lost": share, "updates_lost_of": [lost, nonzero]}


def _observe(spec: ModelSpec, model: torch.nn.Module, into: dict[str, list[float]]) -> None:
    """Append ``spec.observe(model)``'s numbers (after one attempt) to ``into``."""
    if spec.observe is None:
        return
    got = spec.observe(model)
    if not isinstance(got, dict):
        raise ValueError(f"{spec.name}: observe(model) returned {type(got).__name__}; expected a dict name -> number")
    for k, v in got.items():
        into.setdefault(str(k), []).append(float(v))


#: Why a run whose model or loss draws random numbers cannot be made to see its reference's inputs.
RNG_NOTE = ("the model or loss draws from the global RNG (dropout, torch.rand* inside loss): every run is "
            "seeded alike, but a run in another dtype (the FP64 reference, FP16/BF16) can draw other numbers, "
            "so part of the difference may be the draws, not precision; set dropout to 0 for the check")


def _rng_states(device: torch.device) -> list[torch.Tensor]:
    """The global generators' states a model or loss can draw from (the CPU's, and the device's)."""
    states = [torch.default_generator.get_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return states


def _perturb(trainer: Trainer, k: int) -> None:
    """Move every trainable weight one ulp of its storage format up or down, the direction drawn per entry
    from seed ``k`` (a generator of its own: the run's RNG stream is untouched). FP32 master copies move
    with their weights."""
    g = torch.Generator().manual_seed(0x5E115 + k)
    with torch.no_grad():
        for i, p in enumerate(trainer.params):
            up = (torch.rand(p.shape, generator=g) < 0.5).to(p.device)
            p.copy_(torch.nextafter(p, torch.where(up, math.inf, -math.inf).to(p.dtype)))
            if trainer.master is not None:
                trainer.master[i].copy_(p)


def deterministic_cublas() -> None:
    """Ask cuBLAS for its deterministic workspace configuration (``CUBLAS_WORKSPACE_CONFIG``, which torch reads
    once, at its first cuBLAS call): call before any CUDA work. Without it every cuBLAS call under
    :func:`reproducible` warns (torch's ``TORCH_WARN``, a Python warning per GEMM)."""
    if not torch.cuda.is_initialized():
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


@contextlib.contextmanager
def reproducible(device: torch.device, exact_attention: bool = False) -> Iterator[None]:
    """Deterministic CUDA kernels for the run: kernels that add with atomics (embedding backward, some
    attention backward passes) give a different FP32 result on every run, and FP32 must reproduce
    itself for the differences between strategies to be precision's. Where no deterministic kernel
    exists torch warns and runs the usual one: the memory-efficient and cuDNN attention backward (on an
    H100, GPT-2's and LLaMA's FP32 references differed between two runs by 2.5e-6 and 1.3e-4 through them).
    ``exact_attention`` (the FP32 and FP64 runs) therefore also restricts ``scaled_dot_product_attention``
    to its math backend, whose backward is matrix products and a softmax, with no atomic adds.
    Reduced-precision runs keep the fused kernels they train with."""
    if device.type != "cuda":
        yield
        return
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with _math_attention() if exact_attention else contextlib.nullcontext():
            yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])


def training_kernels(ex: Execution) -> contextlib.AbstractContextManager:
    """The kernels a training run of ``ex`` uses: :func:`reproducible`, with the math attention for the FP32
    and FP64 runs (the reference's, and the ``fp32`` strategy judged against it)."""
    return reproducible(ex.device, exact_attention=ex.strategy.compute in ("fp32", "fp64"))


def _math_attention() -> contextlib.AbstractContextManager:
    """``scaled_dot_product_attention`` on its math backend only (torch >= 2.3), restored on exit."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # an older torch: the fused kernels stay, and the rerun check says so
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _default_dtype(dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """FP64 runs create their own tensors (masks, constants) in FP64, as FP32 runs do in FP32. (Batches
    are drawn outside it, in the factory's own dtype: :meth:`ModelSpec.batch_at`.)"""
    return _dtype(torch.float64) if dtype == torch.float64 else contextlib.nullcontext()


@contextlib.contextmanager
def _dtype(dtype: torch.dtype) -> Iterator[None]:
    """``dtype`` as torch's default dtype inside, restored on exit."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def model_grid(steps: int, seed: int = 0) -> dict[str, list[int]]:
    """A user model's one case: ``{"steps": [steps]}``, and ``"seed"`` where ``--seed`` is not 0 (a run with
    the default seed keeps the parameters it always had)."""
    return {"steps": [steps], **({"seed": [seed]} if seed else {})}


def model_scenario(spec: ModelSpec, steps: int) -> Scenario:
    """The user's model as a ``training`` scenario of one case (params ``{"steps": steps}``)."""
    return Scenario(
        name=spec.name, family="training",
        description=f"user model {spec.name} ({type(spec.model).__name__}, {spec.depth} parameterised layers) "
                    f"trained {steps} updates under each strategy against FP32",
        grid=model_grid(steps, spec.seed), inputs=lambda p, g: {},
        run=lambda ex, inputs, p: train_trajectory(ex, spec, p["steps"]),
        perturbed=lambda ex, inputs, p, k: train_trajectory(ex, spec, p["steps"], perturb=k),
        n=lambda p: chain_length(spec.depth, p["steps"]),
        tolerance=Tolerance(reason=CHAIN_REASON),
    )
