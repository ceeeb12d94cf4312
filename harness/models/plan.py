"""A precision plan: the change ``check-model --fix`` (:mod:`harness.models.fix`) found for a failing
strategy, as a value that prints, serialises to JSON and reads back, and the Python snippet that
applies it with the user's own libraries (torch.autocast, torch.amp.GradScaler, torchao).

>>> p = Plan("compute=fp16,apply=autocast,params=fp32,master=no,scaler=none,reduction=fp32,fp8=none",
...          ("blocks.1",), "fp32", fixes="fp16", change="keep")
>>> Plan.from_dict(p.as_dict()) == p
True
>>> p.describe()
'keep `blocks.1` in FP32 (the rest as fp16)'
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..core.execution import KEEP_FORMATS
from ..core.scaling import format_number
from ..core.strategy import Strategy, parse

__all__ = ["Plan", "CHANGES", "snippet"]

#: Modules a plan's one-line description names (the JSON holds them all).
SHOWN = 6

#: The kinds of change a plan makes, cheapest first (the order the search tries them in).
CHANGES = ("scaler", "keep", "optimizer", "format")


@dataclass(frozen=True)
class Plan:
    """A strategy spec, the modules kept in higher precision and the format they keep, and why.

    ``fixes`` is the label of the failing strategy; ``change`` one of :data:`CHANGES`; ``notes`` say
    what the plan rests on (the window, the diagnosis) in words."""

    strategy_spec: str
    keep_high_precision: tuple[str, ...] = ()
    keep_format: str = "fp32"
    notes: tuple[str, ...] = field(default=(), compare=False)
    fixes: str = ""
    change: str = "keep"

    def __post_init__(self) -> None:
        if self.keep_format not in KEEP_FORMATS:
            raise ValueError(f"keep_format {self.keep_format!r} is not allowed; choose one of "
                             f"{', '.join(KEEP_FORMATS)}")
        if self.change not in CHANGES:
            raise ValueError(f"change {self.change!r} is not allowed; choose one of {', '.join(CHANGES)}")
        object.__setattr__(self, "keep_high_precision", tuple(sorted(self.keep_high_precision)))
        parse(self.strategy_spec)  # a spec that does not parse is no plan: ValueError names what is wrong

    @property
    def strategy(self) -> Strategy:
        """The plan's strategy, labelled ``<fixes>+fix`` so that its record is told apart from the failing one."""
        return parse(self.strategy_spec).with_name(f"{self.fixes}+fix" if self.fixes else "")

    def describe(self) -> str:
        """One line: what the plan changes."""
        fmt = self.keep_format.upper()
        if self.change == "keep":
            k = self.keep_high_precision
            mods = ", ".join(f"`{m}`" for m in k[:SHOWN]) + (f" and {len(k) - SHOWN} more" if len(k) > SHOWN else "")
            return f"keep {mods} in {fmt} (the rest as {self.fixes or self.strategy_spec})"
        return f"{self.change}: {self.changed()}"

    def changed(self) -> str:
        """What the plan's strategy changes against the failing one's (``key old -> new``), or its spec
        where the failing label is no spec."""
        try:
            old = parse(self.fixes)
        except ValueError:
            return self.strategy_spec
        new = parse(self.strategy_spec)
        parts = [f"{k} {old._value_str(k)} -> {new._value_str(k)}" for k in _KEYS
                 if getattr(old, k) != getattr(new, k)]
        if old.scaler.kind != new.scaler.kind:
            parts.append(f"scaler {old.scaler} -> {new.scaler}")
        elif old.scaler != new.scaler:
            parts += [f"scaler {f.name} {_num(getattr(old.scaler, f.name))} -> {_num(getattr(new.scaler, f.name))}"
                      for f in fields(new.scaler) if getattr(old.scaler, f.name) != getattr(new.scaler, f.name)]
        return ", ".join(parts) or "nothing"

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep_high_precision"], d["notes"] = list(self.keep_high_precision), list(self.notes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Plan":
        return cls(d["strategy_spec"], tuple(d.get("keep_high_precision", ())), d.get("keep_format", "fp32"),
                   tuple(d.get("notes", ())), d.get("fixes", ""), d.get("change", "keep"))


_KEYS = ("compute", "apply", "params", "master", "reduction", "fp8", "lib", "update", "states", "compile")


def _num(v: Any) -> str:
    return format_number(v) if isinstance(v, float) else str(v)


def _py(x: float) -> str:
    """A number as Python source: ``2.0**32`` for a power of two, else its repr."""
    m, e = math.frexp(x)
    return f"2.0**{e - 1}" if m == 0.5 and abs(e - 1) > 4 else repr(float(x))


_DT = {"fp16": "torch.float16", "bf16": "torch.bfloat16", "fp32": "torch.float32"}


def snippet(plan: Plan, device: str = "cuda") -> str:
    """Python that applies ``plan`` in the user's own training loop (torch only, torchao for FP8)."""
    s = parse(plan.strategy_spec)
    lines = ["import torch"]
    if s.compute == "fp8" and plan.keep_high_precision:
        lines += _fp8_filter(plan)
    elif plan.keep_high_precision:
        lines += _keep(plan, s, device)
    else:
        lines += [f"# run as {s.label}: {_compute_line(s, device)}"]
    lines += _scaler(s, device) + _update(s)
    return "\n".join(lines)


def _compute_line(s: Strategy, device: str) -> str:
    if s.apply == "cast":
        return f"model.to({_DT[s.params]}); no autocast"
    if s.compute in ("fp16", "bf16"):
        return f"with torch.autocast({device!r}, dtype={_DT[s.compute]}): loss = loss_fn(model, batch)"
    return f"compute={s.compute}"


def _fp8_filter(plan: Plan) -> list[str]:
    keep = ", ".join(repr(m) for m in plan.keep_high_precision)
    return ["from torchao.float8 import convert_to_float8_training",
            f"KEEP_BF16 = {{{keep}}}  # Linear layers the plan keeps in BF16",
            "",
            "def module_filter_fn(mod: torch.nn.Module, fqn: str) -> bool:",
            "    # True: convert this Linear to float8; the kept ones (and everything inside them) stay BF16",
            "    return not any(fqn == k or fqn.startswith(k + '.') for k in KEEP_BF16)",
            "",
            "convert_to_float8_training(model, module_filter_fn=module_filter_fn)",
            f"# train under torch.autocast({'cuda'!r}, dtype=torch.bfloat16) as before"]


def _keep(plan: Plan, s: Strategy, device: str) -> list[str]:
    keep = ", ".join(repr(m) for m in plan.keep_high_precision)
    kd = _DT[plan.keep_format]
    lines = [f"KEEP = ({keep},)  # modules the plan keeps in {plan.keep_format.upper()}", "",
             "def _to(x, dtype, src):",
             "    if torch.is_tensor(x) and x.dtype in src and x.dtype != dtype:",
             "        return x.to(dtype)",
             "    if isinstance(x, (tuple, list)):",
             "        return type(x)(_to(v, dtype, src) for v in x)",
             "    return x", ""]
    if s.apply == "cast":
        low = _DT[s.params]
        return lines + [
            f"model.to({low})",
            "for name in KEEP:",
            "    mod = model.get_submodule(name)",
            f"    mod.to({kd})  # cast from the FP32 weights before model.to(...) where you can",
            "    def fwd(*a, _f=mod.forward, **k):",
            f"        out = _f(*_to(a, {kd}, ({low},)), **k)",
            f"        return _to(out, {low}, ({kd},))",
            "    mod.forward = fwd"]
    inner = ("torch.autocast(%r, enabled=False)" % device if plan.keep_format == "fp32"
             else f"torch.autocast({device!r}, dtype=torch.bfloat16)")
    return lines + [
        "for name in KEEP:",
        "    mod = model.get_submodule(name)",
        "    def fwd(*a, _f=mod.forward, **k):",
        f"        with {inner}:",
        "            return _f(*_to(a, torch.float32, (torch.float16, torch.bfloat16)), **k)",
        "    mod.forward = fwd",
        f"# train as before: {_compute_line(s, device)}"]


def _scaler(s: Strategy, device: str) -> list[str]:
    sc = s.scaler
    if sc.kind == "none":
        return []
    if sc.kind == "static":
        return [f"S = {_py(sc.init)}  # static loss scale: (loss * S).backward(); divide the gradients by S"]
    args = f"{device!r}, init_scale={_py(sc.init)}, growth_factor={_py(sc.growth)}, " \
           f"backoff_factor={_py(sc.backoff)}, growth_interval={sc.interval}"
    out = [f"scaler = torch.amp.GradScaler({args})"]
    extra = [f"{k} {format_number(v)}" for k, v in (("floor", sc.min), ("cap", sc.max)) if (k == "floor" and v > 0)
             or (k == "cap" and v != float("inf"))]
    if sc.kind == "dynamic" and sc.hysteresis > 1:
        extra.append(f"hysteresis {sc.hysteresis}")
    if extra:
        out.append(f"# GradScaler has no {', '.join(e.split()[0] for e in extra)}: keep the scale within "
                   f"{', '.join(extra)} yourself (scaler.update(new_scale=...)), or use DeepSpeed's/Megatron's "
                   "scaler (min_loss_scale, hysteresis)")
    return out


def _update(s: Strategy) -> list[str]:
    if s.master:
        return ["# keep FP32 master weights: the optimizer steps FP32 copies, copied back into the model"]
    if s.update == "kahan":
        return ["# BF16 weights with Kahan-compensated updates (e.g. torch-optimi: AdamW(..., kahan_sum=True))"]
    if s.update == "sr":
        return ["# BF16 weights with stochastically rounded updates",
                "# (e.g. torchao's _AdamW(bf16_stochastic_round=True))"]
    return []
