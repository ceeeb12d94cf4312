"""Precision strategies: frozen values with a string grammar, and the named presets.

A strategy says which format the compute runs in, how it is applied (``autocast`` the forward pass,
or ``cast`` the model and its inputs), how parameters are stored, whether FP32 master weights keep
the update, which loss scaler runs, whether low-precision reductions are allowed inside GEMMs, and
the FP8 recipe. It prints to and parses from one grammar, and ``parse(str(s)) == s``::

    compute=fp16,apply=autocast,params=fp32,master=no,scaler=none,reduction=fp32,fp8=none

>>> str(parse("fp16-dynamic")) == str(PRESETS["fp16-dynamic"])
True
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field, replace

import torch

from .formats import Format, get_format
from .scaling import SCALER_PRESETS, ScalerSpec, parse_scaler

__all__ = ["Strategy", "PRESETS", "parse", "resolve", "support", "tensor_core_support", "MIN_CAPABILITY"]

COMPUTE = ("fp64", "fp32", "tf32", "fp16", "bf16", "fp8")
APPLY = ("autocast", "cast")
PARAMS = ("fp64", "fp32", "fp16", "bf16")
REDUCTION = ("fp32", "reduced")
FP8_RECIPES = ("none", "tensorwise", "delayed")
BOOL = {"yes": True, "no": False, "true": True, "false": False, "1": True, "0": False}
#: Activation (and cast-parameter) format of the computes that differ from it: FP8 recipes keep BF16
#: between GEMMs, TF32 only changes GEMMs.
_ACTIVATION = {"fp8": "bf16", "tf32": "fp32"}
KEYS = ("compute", "apply", "params", "master", "scaler", "reduction", "fp8")


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
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for key, allowed in (("compute", COMPUTE), ("apply", APPLY), ("params", PARAMS),
                             ("reduction", REDUCTION), ("fp8", FP8_RECIPES)):
            value = getattr(self, key)
            if value not in allowed:
                raise ValueError(f"strategy {key}={value!r} is not allowed; choose one of {', '.join(allowed)}")
        if (self.compute == "fp8") != (self.fp8 != "none"):
            raise ValueError("compute=fp8 needs an fp8 recipe (fp8=tensorwise or fp8=delayed), and an fp8 "
                             "recipe needs compute=fp8")
        if self.master and self.params not in ("fp16", "bf16"):
            raise ValueError("master=yes keeps FP32 copies of low-precision parameters; it needs params=fp16 or bf16")
        if self.master and self.scaler.kind == "gradscaler":
            raise ValueError("torch's GradScaler unscales the optimizer's own (FP32) gradients and cannot drive "
                             "master weights; use scaler=dynamic(...) with master=yes")
        if self.apply == "cast" and self.params != self.activation_format:
            raise ValueError(f"apply=cast stores parameters in the compute format: set params={self.activation_format}")

    def __str__(self) -> str:
        return ",".join(f"{k}={self._value_str(k)}" for k in KEYS)

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
        forward operands are E4M3, u = 2^-4)."""
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
    """Parse a preset name or a ``key=value,...`` spec; unknown names suggest the nearest presets."""
    t = text.strip()
    if t in PRESETS:
        return PRESETS[t]
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
        if k == "master":
            if v not in BOOL:
                raise ValueError(f"master={v!r}: use yes or no")
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


def support(strategy: Strategy, device: torch.device) -> tuple[bool, str, list[str]]:
    """Whether ``strategy`` runs on ``device``: (supported, reason if not, emulation notes).

    Nothing is downgraded silently: an emulated path is named in the notes (and in every record),
    and a path the device lacks is unsupported with a reason.
    """
    notes: list[str] = []
    if device.type == "cpu":
        if strategy.compute == "tf32":
            notes.append("tf32 emulated on the CPU: GEMM inputs rounded to 10 fraction bits, FP32 accumulation")
        if strategy.compute == "fp8":
            notes.append("fp8 emulated on the CPU: GEMM inputs cast to e4m3/e5m2 with per-tensor scales, "
                         "FP32 accumulation")
        if strategy.reduction == "reduced":
            return False, ("reduction=reduced needs cuBLAS (allow_fp16/bf16_reduced_precision_reduction); "
                           "no CPU kernel honours it"), notes
        return True, "", notes
    if device.type == "cuda":
        why = tensor_core_support(strategy.compute, device)
        if why:
            return False, why, notes
        if strategy.compute == "fp8":
            if not hasattr(torch, "_scaled_mm"):
                return False, f"torch {torch.__version__} lacks torch._scaled_mm", notes
        return True, "", notes
    return False, f"device type {device.type!r} is not supported (use cpu or cuda)", notes
