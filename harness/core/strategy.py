"""Precision strategies: frozen values with a string grammar, and the named presets.

A strategy says which format the compute runs in, how it is applied (``autocast`` the forward pass,
or ``cast`` the model and its inputs), how parameters are stored, whether FP32 master weights keep
the update, which loss scaler runs, whether low-precision reductions are allowed inside GEMMs, and
the FP8 recipe. It prints to and parses from one grammar, and ``parse(str(s)) == s``::

    compute=fp16,apply=autocast,params=fp32,master=no,scaler=none,reduction=fp32,fp8=none

Four more keys say how a recipe is carried out and print only where they differ from their default,
so the specs written before they existed still read the same: ``lib`` (which library drives the
recipe: ``none`` is the harness's own implementation, the exact emulation every library recipe is
checked against), ``update`` (how a low-precision parameter takes its update: round to ``nearest``,
stochastic rounding ``sr``, or a ``kahan``-compensated sum), ``states`` (optimizer states kept as the
parameters are, or in ``8bit`` blocks) and ``compile`` (``yes`` runs the workload through
``torch.compile``). A preset can be followed by overrides: ``bf16,compile=yes``.

>>> str(parse("fp16-dynamic")) == str(PRESETS["fp16-dynamic"])
True
>>> str(parse("fp8-rowwise,compile=yes"))
'compute=fp8,apply=autocast,params=fp32,master=no,scaler=none,reduction=fp32,fp8=rowwise,compile=yes'
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

import torch

from ..values.formats import Format, get_format
from ..values.fp8_rowwise import cpu_scaled_mm_is_emulation, rowwise_native
from .scaling import SCALER_PRESETS, ScalerSpec, parse_scaler

__all__ = ["Strategy", "PRESETS", "parse", "resolve", "support", "tensor_core_support", "MIN_CAPABILITY"]

COMPUTE = ("fp64", "fp32", "tf32", "fp16", "bf16", "fp8", "fp4")
APPLY = ("autocast", "cast")
PARAMS = ("fp64", "fp32", "fp16", "bf16")
REDUCTION = ("fp32", "reduced")
#: Low-precision GEMM recipes (the ``fp8`` key): per-tensor scales from the tensor itself (``tensorwise``)
#: or from an amax history (``delayed``); one scale per row of each operand (``rowwise``; ``rowwise_gw_hp``
#: keeps the weight-gradient GEMM in high precision); DeepSeek-V3's 1x128 / 128x128 blocks with partial
#: sums promoted to FP32 every N products (``blockwise(N)``, N=0: never); OCP MX blocks of 32 with E8M0
#: scales (``mxfp8``, ``mxfp4``) and NVIDIA's blocks of 16 with E4M3 scales and a tensor scale (``nvfp4``).
FP8_RECIPES = ("none", "tensorwise", "delayed", "rowwise", "rowwise_gw_hp", "blockwise", "mxfp8", "mxfp4", "nvfp4")
#: The recipes whose elements are 4-bit (``compute=fp4``); the others are FP8 (``compute=fp8``).
FP4_RECIPES = ("mxfp4", "nvfp4")
BLOCKWISE_PROMOTE = 128  # DeepSeek-V3's promotion interval, the default of ``blockwise``
LIBS = ("none", "torchao", "optimi", "bnb")
UPDATES = ("nearest", "sr", "kahan")
STATES = ("param", "8bit")
BOOL = {"yes": True, "no": False, "true": True, "false": False, "1": True, "0": False}
#: Activation (and cast-parameter) format of the computes that differ from it: FP8 and FP4 recipes keep
#: BF16 between GEMMs, TF32 only changes GEMMs.
_ACTIVATION = {"fp8": "bf16", "fp4": "bf16", "tf32": "fp32"}
KEYS = ("compute", "apply", "params", "master", "scaler", "reduction", "fp8", "lib", "update", "states", "compile")
#: Keys printed only where they differ from these defaults (added after specs were first recorded).
OPTIONAL = {"lib": "none", "update": "nearest", "states": "param", "compile": False}


@dataclass(frozen=True)
class Strategy:
    """One way of running a workload in reduced precision (see module doc for the grammar)."""

    compute: str = "fp32"
    apply: str = "autocast"
    params: str = "fp32"
    master: bool = False
    scaler: ScalerSpec = field(default_factory=ScalerSpec)
    reduction: str = "fp32"
    fp8: str = "none"
    lib: str = "none"
    update: str = "nearest"
    states: str = "param"
    compile: bool = False
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.fp8 == "blockwise":  # the one spelling of the default interval
            object.__setattr__(self, "fp8", f"blockwise({BLOCKWISE_PROMOTE})")
        for key, allowed in (("compute", COMPUTE), ("apply", APPLY), ("params", PARAMS),
                             ("reduction", REDUCTION), ("fp8", FP8_RECIPES), ("lib", LIBS),
                             ("update", UPDATES), ("states", STATES)):
            value = getattr(self, key)
            if key == "fp8":
                value = self.recipe
            if value not in allowed:
                raise ValueError(f"strategy {key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
        if self.recipe == "blockwise" and self.promote < 0:
            raise ValueError(f"fp8={self.fp8}: the promotion interval must be a whole number >= 0 (0: never)")
        if self.recipe != "blockwise" and "(" in self.fp8:
            raise ValueError(f"fp8={self.fp8}: only blockwise takes a parameter, e.g. fp8=blockwise(128)")
        want = "none" if self.fp8 == "none" else ("fp4" if self.recipe in FP4_RECIPES else "fp8")
        if (self.compute in ("fp8", "fp4") or want != "none") and self.compute != want:
            raise ValueError(f"compute=fp8 needs an fp8 recipe (fp8="
                             f"{'|'.join(r for r in FP8_RECIPES[1:] if r not in FP4_RECIPES)}), compute=fp4 an FP4 "
                             f"one (fp8={'|'.join(FP4_RECIPES)}), and each recipe its compute; got "
                             f"compute={self.compute}, fp8={self.fp8}")
        if self.update != "nearest" and (self.params not in ("fp16", "bf16") or self.master):
            raise ValueError(f"update={self.update} rounds the update into low-precision parameters: it needs "
                             "params=bf16 or fp16 and master=no (FP32 master weights already keep it exactly)")
        if self.master and self.params not in ("fp16", "bf16"):
            raise ValueError("master=yes keeps FP32 copies of low-precision parameters; it needs params=fp16 or bf16")
        if self.master and self.scaler.kind == "gradscaler":
            raise ValueError("torch's GradScaler unscales the optimizer's own (FP32) gradients and cannot drive "
                             "master weights; use scaler=dynamic(...) with master=yes")
        if self.apply == "cast" and self.params != self.activation_format:
            raise ValueError(f"apply=cast stores parameters in the compute format: set params={self.activation_format}")

    def __str__(self) -> str:
        return ",".join(f"{k}={self._value_str(k)}" for k in KEYS
                        if k not in OPTIONAL or getattr(self, k) != OPTIONAL[k])

    @property
    def recipe(self) -> str:
        """The GEMM recipe without its parameter (``blockwise(128)`` -> ``blockwise``)."""
        return self.fp8.split("(", 1)[0]

    @property
    def promote(self) -> int:
        """Products between promotions of a blockwise recipe's partial sums to FP32 (0: never)."""
        if self.recipe != "blockwise":
            return 0
        arg = self.fp8[len("blockwise("):-1] if "(" in self.fp8 else str(BLOCKWISE_PROMOTE)
        return int(arg) if arg.isdigit() else -1

    def _value_str(self, key: str) -> str:
        v = getattr(self, key)
        return ("yes" if v else "no") if isinstance(v, bool) else str(v)

    @property
    def label(self) -> str:
        return self.name or str(self)

    @property
    def activation_format(self) -> str:
        """Format of activations between layers (FP8 recipes keep BF16 there; TF32 only affects GEMMs)."""
        return _ACTIVATION.get(self.compute, self.compute)

    @property
    def format(self) -> Format:
        """The format whose unit roundoff bounds this strategy's error: the lowest precision it computes in
        (for the FP8 recipes E5M2, u = 2^-3, which carries the gradients into the backward GEMMs; the
        forward operands are E4M3, u = 2^-4; the recipes that keep every operand in E4M3 are judged by
        it, and the FP4 recipes by E2M1, u = 2^-2)."""
        if self.compute == "fp4":
            return get_format("fp4_e2m1")
        if self.compute == "fp8" and self.recipe in ("rowwise", "rowwise_gw_hp", "blockwise", "mxfp8"):
            return get_format("fp8_e4m3")
        return get_format({"fp8": "fp8_e5m2"}.get(self.compute, self.compute))

    @property
    def reduced(self) -> bool:
        return self.compute not in ("fp32", "fp64")

    def with_name(self, name: str) -> "Strategy":
        return replace(self, name=name)


_TORCH = str(SCALER_PRESETS["torch"])
_PRESET_SPECS = (
    ("fp32", "compute=fp32"),
    ("tf32", "compute=tf32"),
    ("fp16", "compute=fp16"),
    ("fp16-static", "compute=fp16,scaler=static(1024)"),
    ("fp16-dynamic", f"compute=fp16,scaler={_TORCH}"),
    ("fp16-gradscaler", "compute=fp16,scaler=gradscaler(init=2^16,growth=2,backoff=0.5,interval=2000)"),
    ("fp16-pure", f"compute=fp16,apply=cast,params=fp16,scaler={_TORCH}"),
    ("fp16-master", f"compute=fp16,apply=cast,params=fp16,master=yes,scaler={_TORCH}"),
    ("bf16", "compute=bf16"),
    ("bf16-pure", "compute=bf16,apply=cast,params=bf16"),
    ("bf16-master", "compute=bf16,apply=cast,params=bf16,master=yes"),
    ("fp8-tensorwise", "compute=fp8,fp8=tensorwise"),
    ("fp8-delayed", "compute=fp8,fp8=delayed"),
    ("fp8-rowwise", "compute=fp8,fp8=rowwise"),
    ("fp8-rowwise-gw-hp", "compute=fp8,fp8=rowwise_gw_hp"),
    ("fp8-blockwise", f"compute=fp8,fp8=blockwise({BLOCKWISE_PROMOTE})"),
    ("mxfp8", "compute=fp8,fp8=mxfp8"),
    ("mxfp4", "compute=fp4,fp8=mxfp4"),
    ("nvfp4", "compute=fp4,fp8=nvfp4"),
    ("torchao-fp8-tensorwise", "compute=fp8,fp8=tensorwise,lib=torchao"),
    ("torchao-fp8-rowwise", "compute=fp8,fp8=rowwise,lib=torchao"),
    ("torchao-fp8-rowwise-gw-hp", "compute=fp8,fp8=rowwise_gw_hp,lib=torchao"),
    ("bf16-sr", "compute=bf16,apply=cast,params=bf16,update=sr"),
    ("bf16-kahan", "compute=bf16,apply=cast,params=bf16,update=kahan"),
    ("torchao-bf16-sr", "compute=bf16,apply=cast,params=bf16,update=sr,lib=torchao"),
    ("optimi-bf16-kahan", "compute=bf16,apply=cast,params=bf16,update=kahan,lib=optimi"),
    ("bf16-8bit-states", "compute=bf16,states=8bit"),
    ("torchao-bf16-8bit-states", "compute=bf16,states=8bit,lib=torchao"),
    ("bnb-bf16-8bit-states", "compute=bf16,states=8bit,lib=bnb"),
)
#: The named presets (names fixed by the project's contract), filled in below once parse exists.
PRESETS: dict[str, Strategy] = {}


def _split_top(text: str) -> list[str]:
    """The top-level ``key=value`` parts (commas inside a scaler's parentheses stay with it)."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:  # a ')' before its '(' would otherwise balance a later '(' and split inside it
                break
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth != 0:
        raise ValueError(f"unbalanced parentheses in strategy spec {text!r}")
    parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def parse(text: str) -> Strategy:
    """Parse a preset name, a ``key=value,...`` spec, or a preset followed by overrides
    (``fp8-rowwise,compile=yes``); unknown names suggest the nearest presets."""
    t = text.strip()
    if t in PRESETS:
        return PRESETS[t]
    head = _split_top(t)[0] if t else t
    if "=" not in head and "," in t:
        return _with_overrides(head, t)
    if "=" not in t:
        near = difflib.get_close_matches(t, list(PRESETS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(near)}?" if near else ""
        raise ValueError(f"unknown strategy {t!r}{hint} (presets: {', '.join(PRESETS)}; "
                         f"or a spec like compute=fp16,scaler=static(1024))")
    kw: dict = {}
    for part in _split_top(t):
        if "=" not in part:
            raise ValueError(f"strategy spec part {part!r} must be key=value; keys: {', '.join(KEYS)}")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in KEYS:
            near = difflib.get_close_matches(k, KEYS, n=1)
            raise ValueError(f"unknown strategy key {k!r}{' (did you mean ' + near[0] + '?)' if near else ''}; "
                             f"keys: {', '.join(KEYS)}")
        if k in kw:
            raise ValueError(f"strategy key {k!r} given twice in {text!r}")
        if k in ("master", "compile"):
            if v not in BOOL:
                raise ValueError(f"{k}={v!r}: use yes or no")
            kw[k] = BOOL[v]
        elif k == "scaler":
            kw[k] = parse_scaler(v)
        else:
            kw[k] = v
    if kw.get("apply") == "cast" and "params" not in kw:
        compute = kw.get("compute", "fp32")
        kw["params"] = _ACTIVATION.get(compute, compute)
    strategy = Strategy(**kw)
    for preset in PRESETS.values():  # a spec equal to a preset takes its name
        if preset == strategy:
            return preset
    return strategy


def _with_overrides(preset: str, text: str) -> Strategy:
    """``PRESET,key=value,...``: the preset with those keys replaced, named as written (normalised)."""
    base = parse(preset)
    if not base.name:
        raise ValueError(f"{preset!r} in {text!r} is not a preset; write the whole spec as key=value pairs")
    over = _split_top(text)[1:]
    merged = {p.split("=", 1)[0].strip(): p for p in _split_top(str(base))}
    seen: set[str] = set()
    for part in over:
        if "=" not in part:
            raise ValueError(f"strategy override {part!r} must be key=value; keys: {', '.join(KEYS)}")
        key = part.split("=", 1)[0].strip()
        if key in seen:
            raise ValueError(f"strategy key {key!r} given twice in {text!r}")
        seen.add(key)
        merged[key] = part
    strategy = parse(",".join(merged.values()))
    if strategy.name:  # the overrides led back to a preset
        return strategy
    return strategy.with_name(",".join([base.name] + [p.replace(" ", "") for p in over]))


PRESETS.update((name, parse(spec).with_name(name)) for name, spec in _PRESET_SPECS)


def resolve(names: list[str] | None) -> list[Strategy]:
    """Strategies for the given names or specs (all presets when empty), without duplicates."""
    if not names:
        return list(PRESETS.values())
    out: list[Strategy] = []
    for n in names:
        s = parse(n)
        if s not in out:
            out.append(s)
    return out


#: The presets the project's contract names (DESIGN.md section 4): the default strategies of the full tier.
CONTRACT_PRESETS = ("fp32", "tf32", "fp16", "fp16-static", "fp16-dynamic", "fp16-gradscaler", "fp16-pure",
                    "fp16-master", "bf16", "bf16-pure", "bf16-master", "fp8-tensorwise", "fp8-delayed")


def tier_presets(tier: str) -> list[str]:
    """The preset names a tier runs when no strategy is given: every preset for ``quick`` and ``all``, the
    contract's for ``full`` (the default GPU run stays within its time budget), BF16 and every FP8/FP4
    recipe for ``recipes`` (the run that tells the recipes apart: ``python -m harness report`` says which
    scenario separates which)."""
    if tier == "full":
        return list(CONTRACT_PRESETS)
    if tier == "recipes":
        return ["bf16"] + [n for n, s in PRESETS.items() if s.compute in ("fp8", "fp4")]
    return list(PRESETS)


#: The compute capability whose Tensor Cores take each input format (FP16 from the first generation).
MIN_CAPABILITY = {"fp16": (7, 0), "bf16": (8, 0), "tf32": (8, 0), "fp8": (8, 9)}


def tensor_core_support(compute: str, device: torch.device | str) -> str | None:
    """Why the CUDA ``device`` has no Tensor Cores for ``compute`` inputs (``fp8`` or ``fp8_e4m3``, ``bf16``,
    ...), or None when it has them (and for formats no Tensor Core takes: FP32, FP64)."""
    need = MIN_CAPABILITY.get(compute.split("_")[0])
    cap = torch.cuda.get_device_capability(device)
    if need is None or cap >= need:
        return None
    name = torch.cuda.get_device_name(device)
    return (f"{name} (sm_{cap[0]}{cap[1]}) has no {compute.split('_')[0].upper()} Tensor Cores "
            f"(needs sm_{need[0]}{need[1]}+)")


#: Recipes that scale per block, each with its own emulation (harness.values.blockwise, harness.values.mx).
BLOCK_RECIPES = ("blockwise", "mxfp8", "mxfp4", "nvfp4")


def _block_recipe_notes(strategy: Strategy, device: torch.device) -> list[str]:
    """What a block-scaled recipe runs as on ``device`` (the record names the emulation)."""
    r = strategy.recipe
    if r == "blockwise":
        every = f"every {strategy.promote} products" if strategy.promote else "never (promote=0)"
        where = ("on the GPU: torch's blockwise-scaled GEMM or one torch._scaled_mm per interval where they apply, "
                 "else emulated" if device.type == "cuda" else "emulated on the CPU")
        return [f"blockwise FP8 {where}: E4M3 1x128 activation/gradient tiles and 128x128 weight blocks, the "
                f"FP8 Tensor-Core accumulator modelled (14 bits, H200 profile), partial sums promoted to FP32 {every}"]
    if r in ("mxfp8", "mxfp4", "nvfp4"):
        blocks = ("blocks of 16, E4M3 block scales over an FP32 tensor scale" if r == "nvfp4"
                  else "blocks of 32, E8M0 scales (OCP MX, floor)")
        return [f"{r} emulated: {blocks}, GEMM of the dequantized blocks with FP32 accumulation; the hardware "
                "path needs a Blackwell GPU (sm_100+), and torchao's MX training path too"]
    return []


#: The ``fp8=`` recipes torchao's float8 training drives (``lib=torchao``; :mod:`harness.recipes.torchao_float8`).
TORCHAO_FP8 = ("tensorwise", "rowwise", "rowwise_gw_hp")


def _torchao_fp8(strategy: Strategy) -> bool:
    """Whether ``strategy`` is one of torchao's float8 training recipes."""
    return strategy.lib == "torchao" and strategy.compute == "fp8" and strategy.recipe in TORCHAO_FP8


def _not_built(strategy: Strategy) -> str | None:
    """The part of a valid spec that no code path carries out yet (never run as something else)."""
    if strategy.recipe not in ("none", "tensorwise", "delayed", "rowwise", "rowwise_gw_hp") + BLOCK_RECIPES:
        return f"fp8={strategy.fp8} has no implementation yet"
    for key in ("lib", "update", "states"):
        if _optimizer_recipe_built(strategy):
            continue
        if key == "lib" and _torchao_fp8(strategy):
            continue
        if getattr(strategy, key) != OPTIONAL[key]:
            return f"{key}={strategy._value_str(key)} has no implementation yet"
    return None


#: The libraries that drive optimizer recipes, and the recipes each has (harness.recipes.optimizers).
OPTIMIZER_LIBS = {"none": ("sr", "kahan", "8bit"), "torchao": ("sr", "8bit"), "optimi": ("kahan",), "bnb": ("8bit",)}


def _optimizer_recipe_built(strategy: Strategy) -> bool:
    """Whether the strategy is an optimizer recipe (``update=sr|kahan``, ``states=8bit``, with ``lib=`` one
    of :data:`OPTIMIZER_LIBS`) with a code path: then its lib/update/states keys are built."""
    asked = [v for v in (strategy.update, strategy.states) if v not in ("nearest", "param")]
    # a library named together with an FP8 recipe would drive that too: not this condition's to lift
    return bool(asked) and strategy.lib in OPTIMIZER_LIBS and (strategy.lib == "none" or strategy.fp8 == "none")


def optimizer_support(strategy: Strategy) -> str | None:
    """Why an optimizer recipe cannot run anywhere here (a library without that recipe, a missing library,
    stochastic rounding to FP16), or None. Optimizers a library has no equivalent for are refused per run."""
    asked = [v for v in (strategy.update, strategy.states) if v not in ("nearest", "param")]
    if not asked:
        return None
    lacking = [v for v in asked if v not in OPTIMIZER_LIBS[strategy.lib]]
    if lacking:
        has = ", ".join(lib for lib, r in OPTIMIZER_LIBS.items() if all(v in r for v in asked))
        return f"lib={strategy.lib} has no {'/'.join(lacking)} recipe (libraries that have it: {has})"
    if strategy.update == "sr" and strategy.params != "bf16":
        return "update=sr is stochastic rounding to BF16 (torchao's recipe); FP16 parameters: use update=kahan"
    if strategy.lib != "none":
        from .libraries import missing_reason
        return missing_reason(strategy.lib)
    return None


def _compile_missing(strategy: Strategy, device: torch.device) -> str | None:
    """Why ``compile=yes`` cannot run on ``device`` (no C++ compiler, no Triton, a Python torch.compile does
    not support), or None."""
    if not strategy.compile:
        return None
    from ..recipes.torch_compile import missing_reason
    return missing_reason(device)


def _recipe_support(recipe: str, torchao: bool, device: torch.device) -> tuple[str | None, list[str]]:
    """For a torchao-style recipe, own or driven through torchao: (why ``device`` cannot run it, or None;
    the notes every record carries: the library and its version, and how the GEMMs ran)."""
    from .libraries import missing_reason, version
    if torchao and missing_reason("torchao"):
        return missing_reason("torchao"), []
    what = f"torchao {version('torchao')} float8 {recipe}" if torchao else f"own float8 {recipe} (torchao's recipe)"
    if device.type == "cpu":
        if torchao and not cpu_scaled_mm_is_emulation():
            return None, [f"{what}; torch._scaled_mm on the CPU (oneDNN FP8 kernels: not the emulation's arithmetic)"]
        how = "torch._scaled_mm on the CPU" if torchao else "emulated on the CPU"
        return None, [f"{what}; {how}: FP8 inputs dequantized, FP32 GEMM"]
    if device.type == "cuda" and recipe != "tensorwise" and not tensor_core_support("fp8", device):
        why = rowwise_native(str(device))
        if why and torchao:
            return why, []
        if why:
            return None, [what, f"fp8={recipe} emulated: {why}"]
    return None, [what]


def support(strategy: Strategy, device: torch.device) -> tuple[bool, str, list[str]]:
    """Whether ``strategy`` runs on ``device``: (supported, reason if not, emulation notes).

    Nothing is downgraded silently: an emulated path is named in the notes (and in every record),
    and a path the device lacks is unsupported with a reason.
    """
    notes: list[str] = []
    missing = _not_built(strategy) or optimizer_support(strategy) or _compile_missing(strategy, device)
    if missing:
        return False, missing, notes
    if strategy.compute == "fp8" and (_torchao_fp8(strategy) or strategy.recipe in ("rowwise", "rowwise_gw_hp")):
        why, notes = _recipe_support(strategy.recipe, strategy.lib == "torchao", device)
        if why:
            return False, why, notes
    if device.type == "cpu":
        if strategy.compute == "tf32":
            notes.append("tf32 emulated on the CPU: GEMM inputs rounded to 10 fraction bits, FP32 accumulation")
        if strategy.compute == "fp8" and strategy.recipe not in BLOCK_RECIPES and not notes:
            notes.append("fp8 emulated on the CPU: GEMM inputs cast to e4m3/e5m2 with per-tensor scales, "
                         "FP32 accumulation")
        notes.extend(_block_recipe_notes(strategy, device))
        if strategy.reduction == "reduced":
            return False, ("reduction=reduced needs cuBLAS (allow_fp16/bf16_reduced_precision_reduction); "
                           "no CPU kernel honours it"), notes
        return True, "", notes
    if device.type == "cuda":
        why = tensor_core_support(strategy.compute, device)
        if why:
            return False, why, notes
        notes.extend(_block_recipe_notes(strategy, device))
        if strategy.compute == "fp8":
            if not hasattr(torch, "_scaled_mm"):
                return False, f"torch {torch.__version__} lacks torch._scaled_mm", notes
        return True, "", notes
    return False, f"device type {device.type!r} is not supported (use cpu or cuda)", notes
