"""A strategy applied on a device: the context a scenario runs in.

Scenarios never read the strategy's fields themselves; they ask the execution to do what the
strategy says: hand an activation over in the precision a previous layer would produce it in
(:meth:`act`), store a parameter (:meth:`param`), run a GEMM (:meth:`matmul`, which routes FP8 and
emulated TF32), enter the forward-pass region (:meth:`autocast`), and make a fresh loss scaler.

>>> import torch
>>> from harness.core.strategy import PRESETS
>>> ex = Execution(PRESETS["fp16"], torch.device("cpu"))
>>> ex.act(torch.tensor([70000.0, 1e-8])).tolist()
[inf, 0.0]
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .emulation import tf32_matmul
from .formats import Format, get_format
from .fp8 import AmaxHistory, fp8_matmul
from .strategy import Strategy, support

__all__ = ["Execution", "FP64", "route_linears", "gemm_coverage", "is_conv1d", "is_kept", "KEEP_FORMATS"]

#: The formats a precision plan may keep modules in (:meth:`Execution.keeping`).
KEEP_FORMATS = ("fp32", "bf16")


def is_kept(name: str, kept: frozenset[str] | tuple[str, ...]) -> bool:
    """Whether module ``name`` is one of ``kept`` or inside one (``a.b`` is inside ``a``)."""
    return any(name == k or name.startswith(k + ".") for k in kept)


class Execution:
    """Everything a scenario needs to run under one strategy on one device."""

    def __init__(self, strategy: Strategy, device: torch.device | str = "cpu") -> None:
        self.strategy = strategy
        self.device = torch.device(device)
        self.supported, self.unsupported_reason, self.notes = support(strategy, self.device)
        self.act_format: Format = get_format(strategy.activation_format)
        self.dtype: torch.dtype = self.act_format.dtype
        self.param_dtype: torch.dtype = get_format(strategy.params).dtype
        self.fp8_history = AmaxHistory()
        self.emulated_gemms = 0  # GEMMs that ran through the FP8 or emulated-TF32 path (see routes_gemms)
        self.routed_keys: set[str] = set()  # the call sites (``key``) of those GEMMs: layers, for coverage
        self._native_fp8 = self.device.type == "cuda" and strategy.compute == "fp8"
        #: Modules (dotted names) a precision plan keeps out of the strategy's low precision, and the format
        #: they keep (:meth:`keeping`; :mod:`harness.core.keep` applies it). Empty: the strategy as it is.
        self.keep_high: frozenset[str] = frozenset()
        self.keep_format: str = "fp32"
        self._native_depth = 0  # > 0 inside a kept module's forward: its GEMMs run natively (:meth:`native`)
        self.optimizer_recipe_steps = 0  # optimizer steps an update=/states= recipe acted in (run.training)

    # -- what the strategy is --------------------------------------------------------------
    @property
    def format(self) -> Format:
        return self.strategy.format

    @property
    def routes_gemms(self) -> bool:
        """Whether :meth:`matmul` runs the GEMM itself (FP8, and TF32 where no TF32 hardware path is
        used) instead of handing it to torch."""
        s = self.strategy
        return s.compute == "fp8" or (s.compute == "tf32" and self.device.type != "cuda")

    @property
    def judged_format(self) -> Format:
        """The format a case's error bound is taken from, once it ran: the strategy's lowest precision
        where that precision was used. FP8 strategies keep BF16 activations and TF32 keeps FP32 outside
        GEMMs, so a case without an FP8 GEMM is judged as BF16, and a CPU case without a TF32 GEMM as
        FP32 (on a GPU the strategy allows cuBLAS and cuDNN to use TF32 for every matmul and convolution)."""
        if self.routes_gemms and not self.emulated_gemms:
            return self.act_format
        return self.format

    def emulation_notes(self) -> list[str]:
        """What ran other than natively, for the record: the strategy's own notes (CPU emulation), and
        the native FP8 GEMMs that fell back to the emulation (never a silent downgrade)."""
        n = self.fp8_history.fallbacks
        return self.notes + ([f"{n} FP8 GEMMs emulated: dimensions not multiples of 16, which torch._scaled_mm "
                              "requires"] if n else [])

    def keeping(self, modules: tuple[str, ...] | frozenset[str], fmt: str = "fp32") -> "Execution":
        """This execution with ``modules`` (dotted names, each with everything inside it) kept in ``fmt``
        (``fp32`` or ``bf16``): not routed to FP8/TF32 (:func:`route_linears`), run outside the strategy's
        autocast or with their parameters stored in ``fmt`` (:func:`harness.core.keep.apply_keep`). Only a
        reduced-precision strategy keeps anything: FP32 and FP64 runs (references) stay as they are."""
        if fmt not in KEEP_FORMATS:
            raise ValueError(f"keep format {fmt!r} is not allowed; choose one of {', '.join(KEEP_FORMATS)}")
        if self.strategy.reduced:
            self.keep_high, self.keep_format = frozenset(modules), fmt
        return self

    @contextlib.contextmanager
    def native(self) -> Iterator[None]:
        """Inside: :meth:`matmul` hands every GEMM to torch (the autocast in force picks its precision),
        however it was routed: the forward of a module a plan keeps (:mod:`harness.core.keep`)."""
        self._native_depth += 1
        try:
            yield
        finally:
            self._native_depth -= 1

    # -- what scenarios call ---------------------------------------------------------------
    def act(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as a low-precision layer would hand it over: rounded to the activation format."""
        return x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)

    def param(self, x: torch.Tensor, requires_grad: bool = False) -> torch.Tensor:
        """A parameter in the strategy's storage format (a fresh leaf tensor)."""
        p = x.detach().to(self.device, self.param_dtype).clone()
        return p.requires_grad_(requires_grad)

    @contextlib.contextmanager
    def gemm_flags(self) -> Iterator[None]:
        """The GEMM flags the strategy asks for (TF32 on only for ``compute=tf32``; reduced-precision
        reductions only for ``reduction=reduced``), restored on exit. The backward pass runs under them
        too, as it does where a user sets them globally."""
        s = self.strategy
        if self.device.type != "cuda":  # the flags only steer cuBLAS/cuDNN: nothing to set elsewhere
            yield
            return
        saved = _flags()
        try:
            _set_flags(tf32=s.compute == "tf32", reduced=s.reduction == "reduced")
            yield
        finally:
            _set_flags(**saved)

    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """The forward-pass region: autocast when the strategy autocasts, under :meth:`gemm_flags`."""
        with self.gemm_flags():
            if self.strategy.apply == "autocast" and self.dtype in (torch.float16, torch.bfloat16):
                with torch.autocast(self.device.type, dtype=self.dtype):
                    yield
            else:
                yield

    def matmul(self, a: torch.Tensor, b: torch.Tensor, key: str = "mm") -> torch.Tensor:
        """a @ b as the strategy computes it (``key`` names the call site for FP8 amax histories)."""
        s = self.strategy
        if not self.routes_gemms or self._native_depth:
            return a @ b
        self.emulated_gemms += 1
        self.routed_keys.add(key)
        if s.compute == "fp8":
            return fp8_matmul(a, b, key, self.fp8_history, s.fp8 == "delayed", self._native_fp8, self.dtype)
        return tf32_matmul(a, b)

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
               key: str = "linear") -> torch.Tensor:
        """x @ w.T + b, like ``torch.nn.functional.linear``, routed through :meth:`matmul`."""
        y = self.matmul(x, w.t(), key)
        return y if b is None else y + b


def _flags() -> dict:
    """The four GEMM flags as they are now (each saved on its own, so a restore returns each one)."""
    m = torch.backends.cuda.matmul
    return {"tf32": m.allow_tf32, "cudnn_tf32": torch.backends.cudnn.allow_tf32,
            "reduced": m.allow_fp16_reduced_precision_reduction,
            "bf16_reduced": m.allow_bf16_reduced_precision_reduction}


def _set_flags(tf32: bool, reduced: bool, cudnn_tf32: bool | None = None, bf16_reduced: bool | None = None) -> None:
    """Set TF32 (cuBLAS and cuDNN) and reduced-precision reductions (FP16 and BF16); the cuDNN and
    BF16 flags follow the first two unless given."""
    m = torch.backends.cuda.matmul
    m.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32 if cudnn_tf32 is None else cudnn_tf32
    m.allow_fp16_reduced_precision_reduction = reduced
    m.allow_bf16_reduced_precision_reduction = reduced if bf16_reduced is None else bf16_reduced


def FP64(device: torch.device | str = "cpu") -> Execution:
    """The FP64 execution used to check an FP32 reference."""
    from .strategy import parse
    return Execution(parse("compute=fp64,apply=cast,params=fp64"), device)


def is_conv1d(mod: torch.nn.Module) -> bool:
    """Whether ``mod`` is a Hugging Face ``Conv1D`` (transformers.pytorch_utils; GPT-2's attention and MLP):
    ``x @ W + b`` with ``W`` of shape (in, out). Recognised by duck typing, so transformers is no dependency."""
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(mod, "nf", None) == w.shape[1])


def route_linears(model: torch.nn.Module, ex: Execution) -> torch.nn.Module:
    """Send every ``nn.Linear`` of ``model`` through ``ex.linear``, and every Hugging Face ``Conv1D``
    through ``ex.matmul`` (FP8 and emulated TF32 GEMMs).

    Strategies whose GEMMs torch runs natively (FP32, FP16, BF16, TF32 on a GPU) leave the model as is.
    What stays outside (convolutions, ``nn.MultiheadAttention``'s functional projections) runs in the
    strategy's activation format; :func:`gemm_coverage` counts it. Modules a plan keeps in higher
    precision (:meth:`Execution.keeping`) are not routed."""
    if not ex.routes_gemms:
        return model
    for name, mod in model.named_modules():
        if ex.keep_high and is_kept(name, ex.keep_high):
            continue
        if isinstance(mod, torch.nn.Linear):
            def fwd(x, _m=mod, _k=name or "linear"):
                return ex.linear(x, _m.weight, _m.bias, key=_k)
            mod.forward = fwd  # type: ignore[method-assign]
        elif is_conv1d(mod):
            def conv1d(x, _m=mod, _k=name or "conv1d"):
                y = ex.matmul(x.reshape(-1, x.shape[-1]), _m.weight, key=_k)
                y = y if _m.bias is None else y + _m.bias
                return y.reshape(*x.shape[:-1], _m.nf)
            mod.forward = conv1d  # type: ignore[method-assign]
    return model


#: Module types whose parameters feed a GEMM (a convolution is one too, on Tensor Cores), by the name
#: the coverage reports them under. ``nn.MultiheadAttention`` counts once, for its in-projection (its
#: ``out_proj`` is an ``nn.Linear`` child that it calls functionally).
def _gemm_type(mod: torch.nn.Module) -> str | None:
    if isinstance(mod, torch.nn.Linear):
        return "Linear"
    if is_conv1d(mod):
        return "Conv1D"
    if isinstance(mod, torch.nn.modules.conv._ConvNd):
        return type(mod).__name__
    if isinstance(mod, torch.nn.MultiheadAttention):
        return "MultiheadAttention.in_proj"
    return None


def gemm_coverage(model: torch.nn.Module, ex: Execution) -> dict:
    """How many of ``model``'s parameterised GEMM layers ran in the strategy's compute format, by layer type.

    Where torch runs the GEMMs natively (autocast or cast to FP16/BF16, FP32, TF32 on a GPU) every one
    does. Where the harness routes them (FP8, TF32 on the CPU) only the layers whose GEMM went through
    :meth:`Execution.matmul` in this run count: an FP8 strategy's other GEMMs ran in its activation format.
    Returns ``{"format", "covered", "total", "by_type": {type: [covered, total]}}``."""
    by_type: dict[str, list[int]] = {}
    for name, mod in model.named_modules():
        kind = _gemm_type(mod)
        if kind is None:
            continue
        ran = not ex.routes_gemms or (name or kind.lower()) in ex.routed_keys
        if isinstance(mod, torch.nn.MultiheadAttention) and ex.routes_gemms:
            ran = False  # its projections are called functionally, never through a routed forward
        c = by_type.setdefault(kind, [0, 0])
        c[0] += int(ran)
        c[1] += 1
    return {"format": ex.format.name, "covered": sum(c for c, _ in by_type.values()),
            "total": sum(t for _, t in by_type.values()), "by_type": by_type}
