"""Every GEMM a model runs, sent through the strategy's GEMM path, and the coverage of what was.

Where the harness computes the GEMMs itself (FP8 recipes everywhere, TF32 on the CPU), a model's forward
pass runs under a :class:`GemmRouter`, a ``torch.overrides.TorchFunctionMode`` that sees each call of
``F.linear`` (``nn.Linear``, ``nn.MultiheadAttention``'s projections, any functional call), ``torch.matmul``
and ``@``, ``mm``, ``bmm``, ``addmm`` (Hugging Face ``Conv1D``), ``baddbmm``, ``einsum``, the convolutions
and transposed convolutions, and ``F.scaled_dot_product_attention``, and sends those in the recipe's
scope through :meth:`~harness.core.execution.Execution.matmul` or :func:`harness.values.bilinear.bilinear`.

What each recipe covers (:func:`scope`):

* ``tf32`` (CPU emulation): every GEMM, as cuBLAS and cuDNN do on a GPU with TF32 allowed: layers,
  functional products, the attention products (``SDPA`` through its math decomposition when it has no
  dropout).
* ``fp8=tensorwise|delayed``: every GEMM with a weight operand: ``F.linear``, ``addmm`` and the convolutions
  (whose second operand is a weight whatever it is), and ``matmul``/``mm``/``bmm``/``einsum`` with a
  parameter operand. Products of two activations (attention's ``Q K^T`` and ``P V``) stay in the activation
  format, BF16, as in torchao's and Transformer Engine's FP8 training; the coverage lists them apart.
* other recipes: the weight GEMMs that :meth:`Execution.matmul` carries out; convolutions only where the
  recipe defines them (they are reported as not covered otherwise, never run as another recipe).
"""
from __future__ import annotations

import contextlib
import functools
import math
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..values.bilinear import TF32, bilinear, fp8_rounding

__all__ = ["GemmRouter", "route_gemms", "gemm_coverage", "routing_notes", "scope", "is_conv1d", "Site"]

_CONVS = {F.conv1d: "conv1d", F.conv2d: "conv2d", F.conv3d: "conv3d", F.conv_transpose1d: "conv_transpose1d",
          F.conv_transpose2d: "conv_transpose2d", F.conv_transpose3d: "conv_transpose3d"}
_PRODUCTS = {torch.matmul: "matmul", torch.Tensor.matmul: "matmul", torch.mm: "mm", torch.Tensor.mm: "mm",
             torch.bmm: "bmm", torch.Tensor.bmm: "bmm"}
_OTHERS = (F.linear, torch.addmm, torch.baddbmm, torch.einsum, F.scaled_dot_product_attention,
           F.multi_head_attention_forward)
#: Recipes whose per-tensor scaling defines an FP8 convolution (quantize input and weight, convolve in FP32).
CONV_RECIPES = ("tensorwise", "delayed")


def scope(strategy: Any) -> frozenset[str]:
    """The GEMM kinds a routing strategy computes in its format: ``weight`` (a weight operand),
    ``activation`` (two activations) and ``conv`` (convolutions)."""
    if strategy.compute == "tf32":
        return frozenset({"weight", "activation", "conv"})
    if strategy.recipe in CONV_RECIPES:
        return frozenset({"weight", "conv"})
    return frozenset({"weight"})


def describe_scope(strategy: Any) -> str:
    """One line for the record: what the strategy's routed GEMMs cover."""
    s = scope(strategy)
    parts = ["weight GEMMs"] + (["convolutions"] if "conv" in s else []) + \
            (["activation-by-activation products (attention)"] if "activation" in s else [])
    return ", ".join(parts)


def is_conv1d(mod: torch.nn.Module) -> bool:
    """Whether ``mod`` is a Hugging Face ``Conv1D`` (transformers.pytorch_utils; GPT-2's attention and MLP):
    ``x @ W + b`` with ``W`` of shape (in, out). Recognised by duck typing, so transformers is no dependency."""
    w = getattr(mod, "weight", None)
    return (type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2
            and getattr(mod, "nf", None) == w.shape[1])


def layer_type(mod: torch.nn.Module) -> str | None:
    """The name a GEMM layer is reported under, or None for a module that is no GEMM layer.
    ``nn.MultiheadAttention`` counts once, for its in-projection (its ``out_proj`` is an ``nn.Linear``)."""
    if isinstance(mod, torch.nn.Linear):
        return "Linear"
    if is_conv1d(mod):
        return "Conv1D"
    if isinstance(mod, torch.nn.modules.conv._ConvNd):
        return type(mod).__name__
    if isinstance(mod, torch.nn.MultiheadAttention):
        return "MultiheadAttention.in_proj"
    return None


@dataclass(frozen=True)
class Site:
    """One GEMM call site of a forward pass: what it is reported as, the GEMM layer it belongs to (module
    name, or None for a functional call), whether the recipe covers it, and whether it ran routed."""

    label: str
    layer: str | None
    in_scope: bool
    routed: bool


@functools.lru_cache(maxsize=None)
def _outside_graphs(fn: Callable) -> Callable:
    """``torch.compiler.disable(fn)``, made on first use: decorating at import would import ``torch._dynamo``
    (about a second) into every process that imports the harness."""
    return torch.compiler.disable(fn)


def _undispatched(fn: Callable) -> Callable:
    """``fn`` (a Python function of torch.nn.functional) without its ``__torch_function__`` check, so that
    the GEMMs inside it reach the router: a mode sees a Python-level function as one call and runs its
    body with the mode switched off (``F.multi_head_attention_forward`` holds three GEMMs)."""
    g = dict(fn.__globals__, has_torch_function=lambda *_: False)
    out = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__kwdefaults__ = fn.__kwdefaults__
    return out


_MHA = _undispatched(F.multi_head_attention_forward)
#: The functions the router handles (everything else passes through untouched).
_GEMMS = frozenset([*_CONVS, *_PRODUCTS, *_OTHERS])


class GemmRouter(TorchFunctionMode):
    """Routes a model's GEMMs through an execution while its forward pass runs (see module doc)."""

    def __init__(self, ex: Any, model: torch.nn.Module) -> None:
        super().__init__()
        self.ex, self.scope = ex, scope(ex.strategy)
        # id(param) -> [(module name, module, parameter name)], more than one for a tied weight (GPT-2's
        # lm_head and token embedding); ``Module.to`` keeps the Parameter objects (it replaces their data), so
        # a model moved or cast after routing keeps these keys
        self.owners: dict[int, list[tuple[str, torch.nn.Module, str]]] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for pname, p in mod.named_parameters(recurse=False, remove_duplicate=False):
                self.owners.setdefault(id(p), []).append((mname, mod, pname))
        self.active = False
        self._seen: dict[str, int] = {}

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """One forward pass: call sites are numbered afresh (the same site gets the same key every step)."""
        self.active, self._seen = True, {}
        try:
            with self:
                yield
        finally:
            self.active = False

    # -- bookkeeping ------------------------------------------------------------------------------
    def owner(self, t: Any, layer_label: str | None = None) -> tuple[str, torch.nn.Module, str] | None:
        """The (module name, module, parameter name) of a parameter operand, or of the parameter a view
        (``w.t()``, a chunk of ``in_proj_weight``) was taken from; of a tied weight, the owner that is a
        ``layer_label`` layer where there is one."""
        if not isinstance(t, torch.Tensor):
            return None
        owns = self.owners.get(id(t)) or (self.owners.get(id(t._base), []) if t._base is not None else [])
        return next((o for o in owns if layer_type(o[1]) == layer_label), owns[0] if owns else None)

    def _key(self, base: str) -> str:
        n = self._seen.get(base, 0)
        self._seen[base] = n + 1
        return base if n == 0 else f"{base}#{n}"

    def _site(self, key: str, label: str, layer: str | None, in_scope: bool, routed: bool) -> None:
        self.ex.gemm_sites[key] = Site(label, layer, in_scope, routed)

    def _weight_site(self, op: str, w: Any, layer_label: str) -> tuple[str, str, str | None]:
        """(key, label, layer) of a GEMM whose weight operand is ``w`` (``layer_label``: its layer type)."""
        own = self.owner(w, layer_label)
        if own is not None and layer_type(own[1]) == layer_label:
            return self._key(own[0] or op), layer_label, own[0]
        where = ".".join(part for part in (own[0], own[2]) if part) if own else op
        return self._key(where), f"{op} (functional)", None

    # -- the mode -----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: D105
        if func in _GEMMS:
            return _outside_graphs(GemmRouter._gemm)(self, func, args, kwargs or {})
        return func(*args, **(kwargs or {}))

    def _gemm(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """One GEMM call: its site recorded, and routed where the recipe covers it. Kept out of
        ``torch.compile``'s graphs (a graph break per GEMM), so that a compiled routed model neither guards on
        the bookkeeping nor fuses into the emulation; every other op of the forward compiles as usual.
        Inside a module a precision plan keeps (:meth:`Execution.native`) torch runs it, unrecorded: the
        coverage counts that layer as not in the recipe's format."""
        if self.ex._native_depth:
            return func(*args, **kwargs)
        if func is F.linear:
            return self._linear(func, args, kwargs)
        if func in _PRODUCTS:
            return self._product(func, _PRODUCTS[func], args, kwargs)
        if func in _CONVS:
            return self._conv(func, _CONVS[func], args, kwargs)
        if func is torch.addmm or func is torch.baddbmm:
            return self._add_product(func, args, kwargs)
        if func is torch.einsum:
            return self._einsum(func, args, kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(func, args, kwargs)
        with self:  # F.multi_head_attention_forward: its body's F.linear, bmm and SDPA come back here
            return _MHA(*args, **kwargs)

    def _linear(self, func, args, kwargs):
        x, w, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        own = self.owner(w, "MultiheadAttention.in_proj")
        want = "MultiheadAttention.in_proj" if own and isinstance(own[1], torch.nn.MultiheadAttention) else "Linear"
        key, label, layer = self._weight_site("linear", w, want)
        routed = "weight" in self.scope
        self._site(key, label, layer, True, routed)
        return self.ex.linear(x, w, b, key=key) if routed else func(*args, **kwargs)

    def _product(self, func, op: str, args, kwargs):
        a, b = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "other" if op == "matmul" else "mat2")
        weighted = self.owner(a) is not None or self.owner(b) is not None
        if weighted:
            key, label, layer = self._weight_site(op, b if self.owner(b) else a, "Conv1D")
            kind = "weight"
        else:
            key, label, layer, kind = self._key(op), f"{op} (activations)", None, "activation"
        fn = self._matmul_fn(a, b, kind)
        self._site(key, label, layer, kind in self.scope, fn is not None)
        return fn(key) if fn is not None else func(*args, **kwargs)

    def _matmul_fn(self, a: Any, b: Any, kind: str) -> Callable[[str], torch.Tensor] | None:
        """How :meth:`Execution.matmul` can compute a @ b (FP8 takes a 2-D second operand, so a product
        whose parameter comes first is computed transposed), or None where it cannot."""
        if kind not in self.scope or not all(isinstance(t, torch.Tensor) and t.dim() >= 2 for t in (a, b)):
            return None
        mm = self.ex.matmul
        if self.ex.strategy.compute == "tf32" or b.dim() == 2:
            return lambda key: mm(a, b, key=key)
        if a.dim() == 2:  # (a @ b)^T = b^T @ a^T, batch dims on b
            return lambda key: mm(b.mT, a.t(), key=key).mT
        return None

    def _add_product(self, func, args, kwargs):
        """``addmm``/``baddbmm``: ``input + m1 @ m2`` where beta and alpha are 1 (Conv1D's addmm)."""
        base, m1, m2 = (_arg(args, kwargs, i, n) for i, n in enumerate(("input", "mat1" if func is torch.addmm
                                                                         else "batch1", "mat2" if func is torch.addmm
                                                                         else "batch2")))
        plain = kwargs.get("beta", 1) == 1 and kwargs.get("alpha", 1) == 1 and len(args) <= 3
        op = "addmm" if func is torch.addmm else "baddbmm"
        weighted = self.owner(m1) is not None or self.owner(m2) is not None
        if weighted:
            key, label, layer = self._weight_site(op, m2 if self.owner(m2) else m1, "Conv1D")
        else:
            key, label, layer = self._key(op), f"{op} (activations)", None
        kind = "weight" if weighted else "activation"
        fn = self._matmul_fn(m1, m2, kind) if plain else None
        self._site(key, label, layer, kind in self.scope, fn is not None)
        return self.ex.add_bias(fn(key), base) if fn is not None else func(*args, **kwargs)

    def _bilinear(self, f: Callable, a: torch.Tensor, b: torch.Tensor, key: str) -> torch.Tensor:
        ex = self.ex
        ex.emulated_gemms += 1  # as Execution.matmul counts the GEMMs it emulates
        ex.routed_keys.add(key)
        if ex.strategy.compute == "tf32":
            return bilinear(f, a, b, TF32)
        rounding = fp8_rounding(ex.fp8_history, key, ex.strategy.recipe == "delayed")
        return bilinear(f, a, b, rounding, ex.dtype)

    def _conv(self, func, op: str, args, kwargs):
        x, w, bias = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        key, label, layer = self._weight_site(op, w, _conv_layer(op))
        # a convolution is a weight GEMM: a recipe without a convolution of its own leaves it uncovered
        routed = "conv" in self.scope and isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)
        self._site(key, label, layer, True, routed)
        if not routed:
            return func(*args, **kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        y = self._bilinear(lambda a, b: func(a, b, None, *args[3:], **rest), x, w, key)
        # added after the GEMM, as a Linear's bias is: per output channel (dim 1 of an N, C, ... output)
        return y if bias is None else y + bias.reshape(-1, *[1] * (y.dim() - 2))

    def _einsum(self, func, args, kwargs):
        ops = args[1:] if len(args) > 1 else ()
        ops = tuple(ops[0]) if len(ops) == 1 and isinstance(ops[0], (list, tuple)) else ops
        weighted = any(self.owner(t) is not None for t in ops)
        kind = "weight" if weighted else "activation"
        key = self._key("einsum")
        routed = kind in self.scope and len(ops) == 2 and not kwargs
        self._site(key, "einsum (functional)" if weighted else "einsum (activations)", None, kind in self.scope,
                   routed)
        if not routed:
            return func(*args, **kwargs)
        eq = args[0]
        return self._bilinear(lambda a, b: torch.einsum(eq, a, b), ops[0], ops[1], key)

    def _sdpa(self, func, args, kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        p = {n: _arg(args, kwargs, i, n) for i, n in enumerate(names)}
        site = self._key("sdpa")
        routed = "activation" in self.scope and not p["dropout_p"]
        self._site(site, "attention (SDPA)", None, "activation" in self.scope, routed)
        return _sdpa_math(self.ex, site, **p) if routed else func(*args, **kwargs)


def _conv_layer(op: str) -> str:
    """The module type whose forward calls ``F.<op>`` (``conv_transpose2d`` -> ``ConvTranspose2d``)."""
    return op.replace("conv_transpose", "ConvTranspose").replace("conv", "Conv")


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
    return args[i] if len(args) > i else kwargs.get(name)


def _sdpa_math(ex: Any, site: str, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask=None,
               dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
               enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` without dropout, through its math decomposition (what torch's math
    backend computes) with both products through :meth:`Execution.matmul`."""
    if enable_gqa:
        rep = query.size(-3) // key.size(-3)
        key, value = key.repeat_interleave(rep, -3), value.repeat_interleave(rep, -3)
    s = ex.matmul(query, key.transpose(-2, -1), key=f"{site}.qk")
    s = s * (1.0 / math.sqrt(query.size(-1)) if scale is None else scale)
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
    return ex.matmul(torch.softmax(s, dim=-1).to(value.dtype), value, key=f"{site}.pv")


def route_gemms(model: torch.nn.Module, ex: Any) -> torch.nn.Module:
    """Run ``model``'s forward (and that of each of its GEMM layers, should a loss call one directly) under a
    :class:`GemmRouter` of ``ex``. Strategies whose GEMMs torch runs natively (FP32, FP16, BF16, TF32 on a
    GPU) leave the model as is. Returns ``model``."""
    if not ex.routes_gemms:
        return model
    if ex.strategy.lib == "torchao" and ex.strategy.compute == "fp8":
        return _torchao_convert(model, ex)
    router = GemmRouter(ex, model)
    for _, mod in model.named_modules():
        if mod is model or layer_type(mod) is not None:
            _enter_on_call(mod, router)
    return model


def is_kept(name: str, kept: frozenset[str] | tuple[str, ...]) -> bool:
    """Whether module ``name`` is one of ``kept`` or inside one (``a.b`` is inside ``a``)."""
    return any(name == k or name.startswith(k + ".") for k in kept)


def _torchao_convert(model: torch.nn.Module, ex: Any) -> torch.nn.Module:
    """torchao converts the ``nn.Linear`` layers itself (nothing else: no router runs), less those a
    precision plan keeps; each converted layer that runs is a routed site, so :func:`gemm_coverage` reports
    what the library covered."""
    from ..recipes import torchao_float8

    def ran(key: str) -> None:
        ex.emulated_gemms += 1
        ex.routed_keys.add(key)
        ex.gemm_sites[key] = Site("Linear", key, True, True)
    return torchao_float8.convert(model, ex.strategy.recipe, ran, gpu=ex.device.type == "cuda",
                                  skip=lambda fqn: is_kept(fqn, ex.keep_high))


def _enter_on_call(mod: torch.nn.Module, router: GemmRouter) -> None:
    inner = mod.forward

    @functools.wraps(inner)
    def forward(*args: Any, **kwargs: Any) -> Any:
        if router.active:
            return inner(*args, **kwargs)
        with router.forward():
            return inner(*args, **kwargs)
    mod.forward = forward  # type: ignore[method-assign]


def gemm_coverage(model: torch.nn.Module, ex: Any) -> dict:
    """How many of ``model``'s GEMMs ran in the strategy's compute format, by type.

    Where torch runs the GEMMs natively (autocast or cast to FP16/BF16, FP32, TF32 on a GPU) every GEMM
    layer does. Where the harness routes them (FP8, TF32 on the CPU) a GEMM layer (``Linear``,
    ``Conv1D``, ``Conv2d``..., ``MultiheadAttention.in_proj``) counts when its GEMM went through the routed
    path in this run, and each functional GEMM the router saw in the recipe's scope counts under its own
    type (``matmul (functional)``, ``bmm (activations)``, ``attention (SDPA)``...). Products the recipe
    leaves in the activation format by design (an FP8 recipe's attention products) are listed under
    ``outside_recipe``, with the recipe's ``scope``.
    Returns ``{"format", "covered", "total", "by_type": {type: [covered, total]}[, "outside_recipe", "scope"]}``."""
    by_type: dict[str, list[int]] = {}
    sites = ex.gemm_sites.values() if ex.routes_gemms else ()
    routed = {s.layer for s in sites if s.layer is not None and s.routed}
    missed = {s.layer for s in sites if s.layer is not None and s.in_scope and not s.routed}
    for name, mod in model.named_modules():
        kind = layer_type(mod)
        if kind is not None:
            ran = not ex.routes_gemms or (name in routed and name not in missed)
            c = by_type.setdefault(kind, [0, 0])
            c[0], c[1] = c[0] + int(ran), c[1] + 1
    outside: dict[str, int] = {}
    for s in sites:
        if s.layer is not None:
            continue
        if s.in_scope:
            c = by_type.setdefault(s.label, [0, 0])
            c[0], c[1] = c[0] + int(s.routed), c[1] + 1
        else:
            outside[s.label] = outside.get(s.label, 0) + 1
    out = {"format": ex.format.name, "covered": sum(c for c, _ in by_type.values()),
           "total": sum(t for _, t in by_type.values()), "by_type": by_type}
    if outside:
        out.update(outside_recipe=outside, scope=describe_scope(ex.strategy))
    return out


def routing_notes(ex: Any) -> list[str]:
    """What the router emulated on a GPU where a native GEMM ran before: FP8 convolutions and einsums (no FP8
    kernel takes them; they run as the exact FP32 emulation)."""
    if ex.device.type != "cuda" or ex.strategy.compute != "fp8":
        return []
    n = sum(1 for s in ex.gemm_sites.values() if s.routed and s.label.split(" ")[0] in _BILINEAR_LABELS)
    return [f"{n} FP8 convolution/einsum call sites emulated in FP32 (quantized operands): no FP8 kernel "
            "takes them"] if n else []


_BILINEAR_LABELS = {"Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
                    *_CONVS.values(), "einsum"}
