"""Loss scalers: one small protocol, every decision recorded as data.

A scaler holds the current loss scale S. Each step the caller multiplies the loss by ``scale``,
runs backward, checks the unscaled gradients for inf/NaN and calls ``update(found_inf)``, which
returns a :class:`Decision`. The dynamic algorithm (as in torch's GradScaler, apex, DeepSpeed and
Megatron-LM)::

    if found_inf:                       # skip the optimizer step
        hysteresis_left -= 1
        if hysteresis_left <= 0:        # tolerate `hysteresis` overflows before backing off; once
            # used up, every further overflow backs off until the next growth (DeepSpeed, Megatron-LM)
            if S at the floor: stall (keep S, keep skipping) or raise LossScaleFloorError
            else S = store(max(S * backoff, min))
        good_steps = 0; due = interval (+1 with first_growth=interval+1: DeepSpeed >= 0.17.1)
    else:
        good_steps += 1
        if good_steps == due:
            new = store(min(S * growth, max)); good_steps = 0; due = interval
            hysteresis_left = hysteresis
            S = S if new is inf and to_inf=refuse else new   # torch refuses to grow to inf

``store`` rounds to the precision the implementation holds its scale in: ``fp32`` (torch's GradScaler and
Megatron-LM keep a 0-d FP32 tensor: past 2^128 inf, below 2^-149 zero) or ``fp64`` (apex and DeepSpeed keep
a Python float). Which implementation and version each preset of :data:`SCALER_PRESETS` emulates is in
:data:`SCALER_EMULATES`.

Specs print and parse: ``none``, ``static(1024)``,
``dynamic(init=65536,growth=2,backoff=0.5,interval=2000,min=0,max=inf,hysteresis=1,floor=stall,store=fp32,
to_inf=refuse,first_growth=interval)``, ``gradscaler(init=65536,growth=2,backoff=0.5,interval=2000)`` (drives
the real torch.amp.GradScaler).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, fields, replace

__all__ = ["ScalerSpec", "Decision", "Scaler", "LossScaleFloorError", "ScaleTrace", "SCALER_PRESETS",
           "SCALER_EMULATES", "parse_scaler", "format_number", "parse_number"]

KINDS = ("none", "static", "dynamic", "gradscaler")
FLOORS = ("stall", "raise")
STORES = ("fp32", "fp64")
TO_INF = ("refuse", "allow")
FIRST_GROWTH = ("interval", "interval+1")
#: torch's growth tracker is an int32 tensor: a longer interval is never reached (and hysteresis shares the bound).
MAX_COUNT = 2**31 - 1
#: The keys of each kind's spec, in the order they print.
_KEYS = {"gradscaler": ("init", "growth", "backoff", "interval"),
         "dynamic": ("init", "growth", "backoff", "interval", "min", "max", "hysteresis", "floor", "store", "to_inf",
                     "first_growth")}
_WORDS = {"floor": FLOORS, "store": STORES, "to_inf": TO_INF, "first_growth": FIRST_GROWTH}


def _f32(x: float) -> float:
    """``x`` rounded to FP32, as the scale tensor of torch's GradScaler holds it (inf past 2^128,
    subnormal and then zero below 2^-126)."""
    if math.isinf(x) or math.isnan(x):
        return x
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _stored(x: float, lo: float, hi: float, store: str) -> float:
    """``x`` as the scale's ``store`` holds it, kept inside [lo, hi] when rounding to FP32 would step past a
    bound that FP32 cannot represent exactly (max=0.3 must not become 0.30000001). FP64 is Python's float."""
    if store == "fp64":
        return x
    f = _f32(x)
    if math.isfinite(f) and (f > hi or f < lo):
        bits = struct.unpack("<I", struct.pack("<f", f))[0]
        f = struct.unpack("<f", struct.pack("<I", bits - 1 if f > hi else bits + 1))[0]
    return f


class LossScaleFloorError(RuntimeError):
    """Raised by a scaler whose policy is to raise when it overflows at its minimum scale."""


def format_number(x: float) -> str:
    """Shortest exact spelling: powers of two as 2^k, integers plain, else repr."""
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x > 0:
        mant, exp = math.frexp(x)  # exact: x is a power of two iff its mantissa is 1/2
        if mant == 0.5 and abs(exp - 1) >= 8:
            return f"2^{exp - 1}"
    if x == int(x) and abs(x) < 2**53:
        return str(int(x))
    return repr(float(x))


def parse_number(text: str, what: str) -> float:
    """A number as the grammar spells it (65536, 2^16, 0.5, 1e-3, inf); ValueError naming ``what`` otherwise.
    A literal past a double's range (1e400, 2^100000) is refused, not read as inf: inf is spelled inf."""
    t = text.strip()
    try:
        if "^" in t:
            base, exp = t.split("^", 1)
            value = math.pow(float(base), float(exp))  # real or ValueError, unlike ** (complex for (-2)^0.5)
        else:
            value = float(t)
    except OverflowError:
        raise ValueError(f"{what}: {text!r} is too large for a float (use inf for no limit)") from None
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number (use e.g. 65536, 2^16, 0.5, inf)") from None
    if math.isinf(value) and "inf" not in t.lower():  # float("1e400") is inf: a typo, not "no limit"
        raise ValueError(f"{what}: {text!r} is too large for a float (use inf for no limit)")
    return value


def _whole(text: str, what: str) -> int:
    """A whole number as the grammar spells it (8, 2^10, 1e3); ValueError for fractions, inf and NaN."""
    num = parse_number(text, what)
    if not num.is_integer():
        raise ValueError(f"{what} must be a whole number from 1 to 2^31-1, got {text.strip()!r}")
    return int(num)


def _fp32_range(what: str, x: float) -> None:
    """``x`` must be a positive number that stays positive and finite in FP32 (the scale multiplies an FP32
    loss, whatever holds it): 2^-149 up to FP32's max 3.4e38."""
    f = _f32(float(x))
    if not 0 < f < math.inf:
        shown = format_number(float(x))
        raise ValueError(f"{what} must be a number from 2^-149 to 3.4e38 (FP32's range: the scale multiplies an "
                         f"FP32 loss), got {shown}")


@dataclass(frozen=True)
class ScalerSpec:
    """What loss scaling a strategy uses; a frozen value with a string grammar (see module doc)."""

    kind: str = "none"
    init: float = 2.0**16
    growth: float = 2.0
    backoff: float = 0.5
    interval: int = 2000
    min: float = 0.0
    max: float = math.inf
    hysteresis: int = 1
    floor: str = "stall"
    store: str = "fp32"
    to_inf: str = "refuse"
    first_growth: str = "interval"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown scaler kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        for k in ("init", "growth", "backoff", "min", "max"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, int) and abs(v) > 2**1023):
                raise ValueError(f"scaler {k} must be a number within a double's range, got {v!r}")
        printed = {"none": (), "static": ("init",)}.get(self.kind, _KEYS.get(self.kind, ()))
        for f in fields(self):  # a field its kind does not print would be lost by str() and parse()
            if f.name not in ("kind", *printed) and getattr(self, f.name) != f.default:
                raise ValueError(f"scaler {f.name} applies to dynamic scalers, not to {self.kind}")
        if self.kind != "none":
            _fp32_range("loss scale" if self.kind == "static" else "scaler init", self.init)
        if self.dynamic:
            self._check_dynamic()
        for key, allowed in _WORDS.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"scaler {key} must be one of {', '.join(allowed)}, got {getattr(self, key)!r}")

    def _check_dynamic(self) -> None:
        if not (self.growth > 1 and _f32(self.growth) < math.inf):
            raise ValueError(f"scaler growth must be a number > 1 and at most 3.4e38, got {format_number(self.growth)}")
        if not 0 < self.backoff < 1:
            raise ValueError(f"scaler backoff must be a number in (0, 1), got {format_number(self.backoff)}")
        for k in ("interval", "hysteresis"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_COUNT:
                raise ValueError(f"scaler {k} must be a whole number from 1 to 2^31-1, got {v!r}")
        if not (0 <= self.min <= self.init <= self.max and math.isfinite(self.min)):
            raise ValueError(f"scaler needs 0 <= min <= init <= max, got min={format_number(self.min)} "
                             f"init={format_number(self.init)} max={format_number(self.max)}")
        if math.isfinite(self.max):
            _fp32_range("scaler max (or inf for no cap)", self.max)

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "static":
            return f"static({format_number(self.init)})"
        parts = []
        for k in _KEYS[self.kind]:
            v = getattr(self, k)
            parts.append(f"{k}={v if isinstance(v, str) else format_number(v)}")
        return f"{self.kind}({','.join(parts)})"

    @property
    def initial_scale(self) -> float:
        """The scale the first step uses: ``init`` as the spec's store holds it, or 1 without a scaler."""
        if self.kind == "none":
            return 1.0
        return self.init if self.kind == "dynamic" and self.store == "fp64" else _f32(self.init)

    @property
    def dynamic(self) -> bool:
        return self.kind in ("dynamic", "gradscaler")


SCALER_PRESETS: dict[str, ScalerSpec] = {
    "torch": ScalerSpec("dynamic", init=2.0**16, growth=2, backoff=0.5, interval=2000),
    "apex": ScalerSpec("dynamic", init=2.0**16, growth=2, backoff=0.5, interval=2000, max=2.0**24, store="fp64",
                       to_inf="allow"),
    "deepspeed": ScalerSpec("dynamic", init=2.0**16, growth=2, backoff=0.5, interval=1000, min=1, hysteresis=2,
                            floor="raise", store="fp64", to_inf="allow", first_growth="interval+1"),
    "deepspeed-0.17.0": ScalerSpec("dynamic", init=2.0**16, growth=2, backoff=0.5, interval=1000, min=1,
                                   hysteresis=2, floor="raise", store="fp64", to_inf="allow"),
    "megatron": ScalerSpec("dynamic", init=2.0**32, growth=2, backoff=0.5, interval=1000, min=1, hysteresis=2,
                           floor="stall", store="fp32", to_inf="allow"),
}
#: Which implementation, file and version each preset emulates (read from their source; docs/scaling.md).
SCALER_EMULATES: dict[str, str] = {
    "torch": "torch.amp.GradScaler defaults, torch 2.13 (torch._amp_update_scale_: FP32 scale tensor, a growth "
             "that would give inf is skipped)",
    "apex": "apex.amp LossScaler (apex/amp/scaler.py, current master): Python-float scale, cap 2^24, no floor",
    "deepspeed": "DeepSpeed >= 0.17.1 DynamicLossScaler with its config defaults (deepspeed/runtime/fp16/"
                 "loss_scaler.py): Python-number scale, hysteresis 2, floor 1, raises there; the first growth "
                 "after the start or an overflow needs interval+1 good steps",
    "deepspeed-0.17.0": "DeepSpeed <= 0.17.0 DynamicLossScaler: as deepspeed, but every growth after interval good "
                        "steps",
    "megatron": "Megatron-LM DynamicGradScaler (megatron/core/optimizer/grad_scaler.py) with its argument defaults: "
                "FP32 scale tensor that grows to inf unchecked, init 2^32, hysteresis 2, floor 1",
}


def _split_args(body: str) -> list[str]:
    return [a.strip() for a in body.split(",") if a.strip()]


def parse_scaler(text: str) -> ScalerSpec:
    """Parse a scaler spec (see module doc); a bare preset name (``torch``, ``apex``...) is allowed, and
    ``dynamic(PRESET,key=value,...)`` starts from a preset."""
    t = text.strip()
    if t in SCALER_PRESETS:
        return SCALER_PRESETS[t]
    if t == "none":
        return ScalerSpec("none")
    if "(" not in t or not t.endswith(")"):
        raise ValueError(f"malformed scaler {text!r}; use none, static(S), dynamic(k=v,...), gradscaler(k=v,...) "
                         f"or a preset: {', '.join(SCALER_PRESETS)}")
    kind, body = t[:-1].split("(", 1)
    kind = kind.strip()
    if kind == "static":
        return ScalerSpec("static", init=parse_number(body, "static scale"))
    if kind not in ("dynamic", "gradscaler"):
        raise ValueError(f"unknown scaler kind {kind!r}; allowed: {', '.join(KINDS)}")
    names = _KEYS[kind]
    base, base_name = (SCALER_PRESETS["torch"] if kind == "dynamic" else ScalerSpec("gradscaler")), None
    kw: dict = {}
    for arg in _split_args(body):
        if "=" not in arg:
            if arg in SCALER_PRESETS and kind == "dynamic":
                if base_name is not None:
                    raise ValueError(f"scaler {text!r} starts from two presets ({base_name}, {arg}); name one")
                base, base_name = SCALER_PRESETS[arg], arg
                continue
            raise ValueError(f"scaler argument {arg!r} must be key=value; keys: {', '.join(names)}")
        k, v = (s.strip() for s in arg.split("=", 1))
        if k not in names:
            raise ValueError(f"unknown scaler key {k!r} for {kind}; allowed: {', '.join(names)}")
        if k in kw:
            raise ValueError(f"scaler key {k!r} given twice in {text!r}; give each key once")
        if k in _WORDS:
            kw[k] = v
        elif k in ("interval", "hysteresis"):
            kw[k] = _whole(v, f"scaler {k}")
        else:
            kw[k] = parse_number(v, f"scaler {k}")
    return replace(base, kind=kind, **kw)


@dataclass(frozen=True)
class Decision:
    """One step of a scaler: the scale used, whether the gradients overflowed, whether the optimizer
    step was skipped, and the scale for the next step."""

    scale: float
    found_inf: bool
    skipped: bool
    next_scale: float
    event: str  # "hold", "grow", "backoff", "floor", "raise"


class Scaler:
    """Our own scaler for ``none``, ``static`` and ``dynamic`` specs (caps, floors, hysteresis, the store's
    precision, torch's refusal to grow to inf, DeepSpeed's late first growth).

    >>> s = Scaler(parse_scaler("dynamic(init=4,interval=1,max=8)"))
    >>> [s.update(False).next_scale for _ in range(3)]
    [8.0, 8.0, 8.0]
    >>> s = Scaler(parse_scaler("dynamic(init=2^126,interval=1)"))  # torch: never grows to inf
    >>> [format_number(s.update(f).next_scale) for f in (False, False, True, True)]
    ['2^127', '2^127', '2^126', '2^125']
    """

    def __init__(self, spec: ScalerSpec) -> None:
        if spec.kind == "gradscaler":
            raise ValueError("a gradscaler spec is driven by torch.amp.GradScaler, not by Scaler")
        self.spec = spec
        self.scale = spec.initial_scale
        self._good = 0
        self._due = self._first_due()
        self._hyst = spec.hysteresis

    def _first_due(self) -> int:
        """Good steps until the first growth after the start or an overflow."""
        return self.spec.interval + (self.spec.first_growth == "interval+1")

    def _store(self, x: float) -> float:
        return _stored(x, self.spec.min, self.spec.max, self.spec.store)

    def update(self, found_inf: bool) -> Decision:
        spec, s = self.spec, self.scale
        if spec.kind == "none":  # no scaler, no overflow check: the step is applied, inf and all
            return Decision(s, found_inf, False, s, "hold")
        if spec.kind != "dynamic":  # a static scaler still skips steps whose gradients overflowed
            return Decision(s, found_inf, found_inf, s, "hold")
        if not found_inf:
            self._good += 1
            if self._good >= self._due:
                self._good, self._due, self._hyst = 0, spec.interval, spec.hysteresis
                new = self._store(min(s * spec.growth, spec.max))
                if math.isinf(new) and spec.to_inf == "refuse":
                    new = s  # torch: "do not grow the scale past fp32 bounds to inf"; the count restarts
                self.scale = new
                return Decision(s, False, False, new, "grow" if new > s else "hold")
            return Decision(s, False, False, s, "hold")
        self._good, self._due = 0, self._first_due()
        self._hyst = max(self._hyst - 1, 0)  # reset only by growth, as in DeepSpeed and Megatron-LM
        if self._hyst > 0:
            return Decision(s, True, True, s, "hold")
        if s <= spec.min:
            if spec.floor == "raise":
                raise LossScaleFloorError(f"gradient overflow at the minimum loss scale {format_number(spec.min)}")
            return Decision(s, True, True, s, "floor")
        self.scale = self._store(max(s * spec.backoff, spec.min))
        return Decision(s, True, True, self.scale, "backoff")


@dataclass
class ScaleTrace:
    """The per-step record of a scaler: what every report and verdict about scaling reads."""

    spec: str
    scales: list[float] = field(default_factory=list)
    found_inf: list[bool] = field(default_factory=list)
    skipped: list[bool] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    raised: str | None = None

    def add(self, d: Decision) -> None:
        self.scales.append(d.scale)
        self.found_inf.append(d.found_inf)
        self.skipped.append(d.skipped)
        self.events.append(d.event)

    @property
    def steps(self) -> int:
        return len(self.scales)

    def summary(self) -> dict:
        n = self.steps
        finite = [s for s in self.scales if math.isfinite(s)]
        return {
            "scaler": self.spec,
            "steps": n,
            "skipped": int(sum(self.skipped)),
            "skip_rate": (sum(self.skipped) / n) if n else 0.0,
            "scale_min": min(self.scales) if n else None,
            "scale_max": max(self.scales) if n else None,
            "scale_final": self.scales[-1] if n else None,
            "scale_nonfinite": n - len(finite),
            "floor_steps": self.events.count("floor"),
            "raised": self.raised,
        }

    def as_dict(self, max_points: int = 512) -> dict:
        """Summary plus the scale trajectory (evenly thinned to at most ``max_points`` points)."""
        step = max(1, math.ceil(self.steps / max_points))
        return {**self.summary(), "trajectory": self.scales[::step],
                "trajectory_stride": step}
