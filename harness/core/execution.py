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

from ..values.emulation import tf32_matmul
from ..values.formats import Format, get_format
from ..values.fp8 import AmaxHistory, fp8_matmul
from ..values.fp8_rowwise import RECIPES as TORCHAO_STYLE, gemm_fits, recipe_matmul, rowwise_native
from .gemm_routing import Site, gemm_coverage, is_conv1d, is_kept, route_gemms, routing_notes
from .strategy import BLOCK_RECIPES, Strategy, support

__all__ = ["Execution", "FP64", "route_gemms", "route_linears", "gemm_coverage", "is_conv1d", "is_kept",
           "KEEP_FORMATS"]

#: The formats a precision plan may keep modules in (:meth:`Execution.keeping`).
KEEP_FORMATS = ("fp32", "bf16")


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
        self.gemm_sites: dict[str, Site] = {}  # every GEMM a routed model ran (harness.core.gemm_routing)
        self.compile_stats = None  # compile=yes: the CompileStats of the models compiled (harness.recipes)
        self._native_fp8 = self.device.type == "cuda" and strategy.compute == "fp8"
        self.block_notes: set[str] = set()  # how the blockwise and MX recipes' GEMMs ran (native or emulated)
        #: Modules (dotted names) a precision plan keeps out of the strategy's low precision, and the format
        #: they keep (:meth:`keeping`; :mod:`harness.core.keep` applies it). Empty: the strategy as it is.
        self.keep_high: frozenset[str] = frozenset()
        self.keep_format: str = "fp32"
        self._native_depth = 0  # > 0 inside a kept module's forward: its GEMMs run natively (:meth:`native`)
        self.optimizer_recipe_steps = 0  # optimizer steps an update=/states= recipe acted in (run.training)
        if self._native_fp8 and self.torchao_style and strategy.recipe != "tensorwise":
            # the own path falls back to the emulation where _scaled_mm takes no row-wise scales (the
            # notes say so; lib=torchao is unsupported there)
            self._native_fp8 = rowwise_native(str(self.device)) is None

    # -- what the strategy is --------------------------------------------------------------
    @property
    def format(self) -> Format:
        return self.strategy.format

    @property
    def routes_gemms(self) -> bool:
        """Whether :meth:`matmul` runs the GEMM itself (FP8, and TF32 where no TF32 hardware path is
        used) instead of handing it to torch."""
        s = self.strategy
        return s.compute in ("fp8", "fp4") or (s.compute == "tf32" and self.device.type != "cuda")

    @property
    def torchao_style(self) -> bool:
        """Whether GEMMs follow torchao's float8 recipes (:mod:`harness.values.fp8_rowwise`): the row-wise
        recipes, and every recipe torchao drives; ``fp8=tensorwise|delayed`` of the own path keep theirs."""
        s = self.strategy
        return s.compute == "fp8" and (s.lib == "torchao" or (s.recipe in TORCHAO_STYLE and s.recipe != "tensorwise"))

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
                              "requires"] if n else []) + sorted(self.block_notes - set(self.notes)) + routing_notes(self)

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

    def matmul(self, a: torch.Tensor, b: torch.Tensor, key: str = "mm",
               out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """a @ b as the strategy computes it (``key`` names the call site for FP8 amax histories).
        ``out_dtype`` (default: the activation format) asks for the GEMM's output in another dtype, e.g.
        FP32 to see a GEMM's accumulation without its output's rounding."""
        s = self.strategy
        if not self.routes_gemms or self._native_depth:
            return a @ b if out_dtype is None else _mm_out(a, b, out_dtype)
        self.emulated_gemms += 1
        self.routed_keys.add(key)
        if s.recipe in BLOCK_RECIPES:  # scaled per block (_block_matmul)
            return self._block_matmul(a, b, out_dtype or self.dtype)
        if self.torchao_style:
            y = self._recipe_matmul(a, b)
            return y if out_dtype is None else y.to(out_dtype)
        if s.compute == "fp8":
            return fp8_matmul(a, b, key, self.fp8_history, s.fp8 == "delayed", self._native_fp8,
                              out_dtype or self.dtype)
        y = tf32_matmul(a, b)
        return y if out_dtype is None else y.to(out_dtype)

    def _block_matmul(self, a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """The block-scaled recipes: DeepSeek's blockwise FP8 (:mod:`.blockwise`), MX and NVFP4 (:mod:`.mx`)."""
        s = self.strategy
        if s.recipe == "blockwise":
            from ..values.blockwise import blockwise_matmul
            return blockwise_matmul(a, b, s.promote, out_dtype, self.device.type == "cuda", self.block_notes)
        from ..values.mx import mx_matmul
        return mx_matmul(a, b, s.recipe, out_dtype)

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
               key: str = "linear") -> torch.Tensor:
        """x @ w.T + b, like ``torch.nn.functional.linear``, routed through :meth:`matmul`."""
        return self.add_bias(self.matmul(x, w.t(), key), b)

    def add_bias(self, y: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """``y + b`` after a routed GEMM: in the output's dtype for torchao-style recipes, as ``Float8Linear``
        adds it (BF16 activations); the own ``tensorwise``/``delayed`` path keeps its promotion to ``b``'s dtype."""
        if b is None:
            return y
        return y + (b.to(y.dtype) if self.torchao_style else b)

    def _recipe_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """A GEMM of a torchao-style recipe, the input in the activation format as ``Float8Linear`` casts
        it under autocast: through torchao where the strategy names it, else the own emulation."""
        s = self.strategy
        a = a.to(self.dtype)
        # torch._scaled_mm on a GPU takes only multiples of 16 (torchao would raise): such a GEMM runs the
        # emulation, which is what torchao computes on the CPU, and is counted in the record's notes
        fits = self.device.type != "cuda" or gemm_fits(a, b)
        if not fits and (self._native_fp8 or s.lib == "torchao"):
            self.fp8_history.fallbacks += 1
        with torch.autocast(self.device.type, enabled=False):
            if s.lib == "torchao" and fits:
                from ..recipes import torchao_float8
                return torchao_float8.matmul(a, b, s.recipe)
            return recipe_matmul(a, b, s.recipe, self._native_fp8 and fits)


def _mm_out(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b under the ambient autocast, its output kept in ``out_dtype``: FP16/BF16 products accumulated in
    FP32 and not rounded to 16 bits at the end (cuBLAS's ``out_dtype`` GEMM on a GPU; on the CPU, whose
    kernels accumulate these GEMMs in FP32 and lack that overload, the FP32 product of the same operands)."""
    if torch.is_autocast_enabled(a.device.type):
        dt = torch.get_autocast_dtype(a.device.type)
        a, b = a.to(dt), b.to(dt)
    low = a.dtype == b.dtype and a.dtype in (torch.float16, torch.bfloat16)
    if low and a.is_cuda and a.dim() == 2 and b.dim() == 2:
        with torch.autocast(a.device.type, enabled=False):
            return torch.mm(a, b, out_dtype=out_dtype)
    if low:
        a, b = a.float(), b.float()
    with torch.autocast(a.device.type, enabled=False):
        return (a @ b).to(out_dtype)


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


#: The name every caller knows: it routes every GEMM now, not only ``nn.Linear`` (see :func:`route_gemms`).
route_linears = route_gemms
