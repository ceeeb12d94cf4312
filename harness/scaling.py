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
            else S = max(S * backoff, min)
        good_steps = 0
    else:
        good_steps += 1
        if good_steps == interval: S = min(S * growth, max); good_steps = 0; hysteresis_left = hysteresis

Specs print and parse: ``none``, ``static(1024)``,
``dynamic(init=65536,growth=2,backoff=0.5,interval=2000,min=0,max=inf,hysteresis=1,floor=stall)``,
``gradscaler(init=65536,growth=2,backoff=0.5,interval=2000)`` (drives the real torch.amp.GradScaler).
Named policies of known implementations are in :data:`SCALER_PRESETS`.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, fields, replace

__all__ = ["ScalerSpec", "Decision", "Scaler", "LossScaleFloorError", "ScaleTrace", "SCALER_PRESETS",
           "parse_scaler", "format_number", "parse_number"]

KINDS = ("none", "static", "dynamic", "gradscaler")
FLOORS = ("stall", "raise")


def _f32(x: float) -> float:
    """``x`` rounded to FP32, as the scale tensor of torch's GradScaler holds it (inf past 2^128,
    subnormal and then zero below 2^-126)."""
    if math.isinf(x) or math.isnan(x):
        return x
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _f32_within(x: float, lo: float, hi: float) -> float:
    """``x`` in FP32, kept inside [lo, hi] when rounding to FP32 would step past a bound that FP32
    cannot represent exactly (max=0.3 must not become 0.30000001)."""
    f = _f32(x)
    if f > hi or f < lo:
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
    t = text.strip()
    try:
        if "^" in t:
            base, exp = t.split("^", 1)
            return math.pow(float(base), float(exp))  # real or ValueError, unlike ** (complex for (-2)^0.5)
        return float(t)
    except OverflowError:
        raise ValueError(f"{what}: {text!r} is too large for a float (use inf for no limit)") from None
    except ValueError:
        raise ValueError(f"{what}: {text!r} is not a number (use e.g. 65536, 2^16, 0.5, inf)") from None


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

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown scaler kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if not (self.init > 0 and math.isfinite(self.init)):
            raise ValueError(f"loss scale must be a finite number > 0, got {format_number(self.init)}")
        if self.kind in ("dynamic", "gradscaler"):
            if not self.growth > 1:
                raise ValueError(f"scaler growth must be > 1, got {self.growth}")
            if not 0 < self.backoff < 1:
                raise ValueError(f"scaler backoff must be in (0, 1), got {self.backoff}")
            for k in ("interval", "hysteresis"):
                if getattr(self, k) < 1:
                    raise ValueError(f"scaler {k} must be a whole number >= 1, got {getattr(self, k)}")
            if not 0 <= self.min <= self.init <= self.max:
                raise ValueError(f"scaler needs 0 <= min <= init <= max, got min={format_number(self.min)} "
                                 f"init={format_number(self.init)} max={format_number(self.max)}")
        if self.floor not in FLOORS:
            raise ValueError(f"scaler floor must be one of {', '.join(FLOORS)}, got {self.floor!r}")

    def __str__(self) -> str:
        if self.kind == "none":
            return "none"
        if self.kind == "static":
            return f"static({format_number(self.init)})"
        keys = ["init", "growth", "backoff", "interval"]
        if self.kind == "dynamic":
            keys += ["min", "max", "hysteresis", "floor"]
        parts = []
        for k in keys:
            v = getattr(self, k)
            parts.append(f"{k}={v if isinstance(v, str) else format_number(v)}")
        return f"{self.kind}({','.join(parts)})"

    @property
    def initial_scale(self) -> float:
        """The scale the first step uses: ``init`` in FP32, or 1 without a scaler."""
        return _f32(self.init) if self.kind != "none" else 1.0

    @property
    def dynamic(self) -> bool:
        return self.kind in ("dynamic", "gradscaler")


SCALER_PRESETS: dict[str, ScalerSpec] = {
    # torch.amp.GradScaler's defaults: no cap, no floor.
    "torch": ScalerSpec("dynamic", init=2.0**16, growth=2, backoff=0.5, interval=2000),
    # apex's amp caps the scale at 2^24.
    "apex": ScalerSpec("dynamic", init=2.0**16, growth=2, backoff=0.5, interval=2000, max=2.0**24),
    # DeepSpeed: hysteresis 2, floor 1, raise when it overflows at the floor.
    "deepspeed": ScalerSpec("dynamic", init=2.0**16, growth=2, backoff=0.5, interval=1000, min=1,
                            hysteresis=2, floor="raise"),
    # Megatron-LM: init 2^32, hysteresis 2, floor 1, keeps skipping at the floor.
    "megatron": ScalerSpec("dynamic", init=2.0**32, growth=2, backoff=0.5, interval=1000, min=1,
                           hysteresis=2, floor="stall"),
}


def _split_args(body: str) -> list[str]:
    return [a.strip() for a in body.split(",") if a.strip()]


def parse_scaler(text: str) -> ScalerSpec:
    """Parse a scaler spec (see module doc); a bare preset name (``torch``, ``apex``...) is allowed."""
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
    names = {f.name for f in fields(ScalerSpec)} - {"kind"}
    if kind == "gradscaler":
        names -= {"min", "max", "hysteresis", "floor"}
    base = SCALER_PRESETS["torch"] if kind == "dynamic" else ScalerSpec("gradscaler")
    kw: dict = {}
    for arg in _split_args(body):
        if "=" not in arg:
            if arg in SCALER_PRESETS and kind == "dynamic":
                base = SCALER_PRESETS[arg]
                continue
            raise ValueError(f"scaler argument {arg!r} must be key=value; keys: {', '.join(sorted(names))}")
        k, v = (s.strip() for s in arg.split("=", 1))
        if k not in names:
            raise ValueError(f"unknown scaler key {k!r} for {kind}; allowed: {', '.join(sorted(names))}")
        if k == "floor":
            kw[k] = v
        elif k in ("interval", "hysteresis"):
            num = parse_number(v, f"scaler {k}")
            if num != int(num):
                raise ValueError(f"scaler {k} must be a whole number, got {v!r}")
            kw[k] = int(num)
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
    """Our own scaler for ``none``, ``static`` and ``dynamic`` specs (caps, floors, hysteresis).

    >>> s = Scaler(parse_scaler("dynamic(init=4,interval=1,max=8)"))
    >>> [s.update(False).next_scale for _ in range(3)]
    [8.0, 8.0, 8.0]
    """

    def __init__(self, spec: ScalerSpec) -> None:
        if spec.kind == "gradscaler":
            raise ValueError("a gradscaler spec is driven by torch.amp.GradScaler, not by Scaler")
        self.spec = spec
        self.scale = spec.initial_scale
        self._good = 0
        self._hyst = spec.hysteresis

    def update(self, found_inf: bool) -> Decision:
        spec, s = self.spec, self.scale
        if spec.kind == "none":  # no scaler, no overflow check: the step is applied, inf and all
            return Decision(s, found_inf, False, s, "hold")
        if spec.kind != "dynamic":  # a static scaler still skips steps whose gradients overflowed
            return Decision(s, found_inf, found_inf, s, "hold")
        if not found_inf:
            self._good += 1
            if self._good >= spec.interval:
                self._good, self._hyst = 0, spec.hysteresis
                self.scale = _f32_within(min(s * spec.growth, spec.max), spec.min, spec.max)
                return Decision(s, False, False, self.scale, "grow" if self.scale > s else "hold")
            return Decision(s, False, False, s, "hold")
        self._good = 0
        self._hyst = max(self._hyst - 1, 0)  # reset only by growth, as in DeepSpeed and Megatron-LM
        if self._hyst > 0:
            return Decision(s, True, True, s, "hold")
        if s <= spec.min:
            if spec.floor == "raise":
                raise LossScaleFloorError(f"gradient overflow at the minimum loss scale {format_number(spec.min)}")
            return Decision(s, True, True, s, "floor")
        self.scale = _f32_within(max(s * spec.backoff, spec.min), spec.min, spec.max)
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
