"""The reference a case is judged against: the scenario under FP32 with TF32 off.

Computed once per (scenario, params, seed, device) and reused by every strategy. The same case is
also run in FP64; where FP32's own error against FP64 exceeds its bound (FP32 is then not
trustworthy for this case), FP64 becomes the reference and the record says so.

On devices in :data:`RERUN_DEVICES` (CUDA: atomics, split-K and autotuned kernels may add in another
order on every run) FP32 runs twice from the same seed (a training case first reruns its first few updates
only, and the rest where they differ: :func:`_probe_rerun`). Where the two differ the reference is marked
``nondeterministic`` with the spread (``fp32_rerun_diff``, the worst relative error between the two):
the spread becomes a floor of every strategy's bound, and the gate does not compare error growth of
such cases, so run-to-run noise is reported as what it is rather than flapping the gate.

A reference nothing can be judged against sets ``Reference.unjudged`` to the reason, and every strategy
of the case gets an ``error`` record with it (the engine does not run them): an output that is not a
floating-point tensor, has no entries, or is missing altogether (``metrics.output_problems``), or that
holds inf/NaN under FP32 and FP64 where the scenario declared no ``nonfinite_reference``
(``metrics.nonfinite_parts`` says which value, gradient tensor or loss step). A declared one is kept,
and ``check["nonfinite"]`` says where it is.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..core.execution import FP64, Execution
from ..values.formats import FORMATS
from ..judge import sensitivity
from . import refcache
from ..judge.metrics import compare, nonfinite_parts, output_problems
from ..results import ERROR_METRICS
from ..core.scenario import Case, Output, seed_global
from ..core.strategy import PRESETS
from ..judge.tolerance import bound, describe
from ..judge.window import scale_window

__all__ = ["Reference", "compute_reference", "ReferenceCache"]


@dataclass
class Reference:
    output: Output
    format: str  # "fp32" or "fp64"
    check: dict[str, Any] = field(default_factory=dict)
    window: dict[str, Any] | None = None  # FP16 loss-scale window of the reference gradients
    unjudged: str | None = None  # why nothing can be judged against this reference (see module doc)


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """cuDNN's deterministic algorithms, no autotuning, for the reference runs only (restored after)."""
    c = torch.backends.cudnn
    saved = (c.deterministic, c.benchmark)
    c.deterministic, c.benchmark = True, False
    try:
        yield
    finally:
        c.deterministic, c.benchmark = saved


#: Devices whose FP32 reference is computed twice to detect nondeterministic kernels (see module doc).
RERUN_DEVICES: tuple[str, ...] = ("cuda",)


def _worst(m: dict[str, Any]) -> float:
    return max((m.get(k, 0.0) for k in ERROR_METRICS), default=0.0)


#: Metrics of FP32 against FP64 that make FP64 the reference whatever the error: inf/NaN in FP32 where FP64
#: is finite, or something else than FP64's inf/NaN where FP64 has one.
_FP32_UNTRUSTED = ("nonfinite", "grad_nonfinite", "loss_nonfinite", "nonfinite_mismatch", "grad_nonfinite_mismatch",
                   "loss_nonfinite_mismatch")


def _unjudged_nonfinite(out: Output, fmt: str, declared: str | None, check: dict[str, Any]) -> str | None:
    """The ``unjudged`` reason of a reference holding inf/NaN without a declaration (None where it is finite
    or declared; a declared one is noted in ``check``)."""
    parts = nonfinite_parts(out)
    if not parts:
        return None
    if declared:
        check["nonfinite"] = f"{'; '.join(parts)} (declared: {declared})"
        return None
    under = "FP32 and FP64" if fmt == "fp32" else "FP64, which replaced FP32"
    return (f"reference not finite under {under}: {'; '.join(parts)}; nothing can be judged against it (a scenario "
            "that means this declares nonfinite_reference='why')")


#: A run of a case's reference: (FP64 instead of FP32, the perturbation's seed or None, params that replace the
#: case's or None, which copy: 1 is the rerun of the same run). :func:`reference_keys` lists a case's.
RefKey = tuple


def reference_run(case: Case, inputs: dict, device: torch.device, key: RefKey) -> Output:
    """One run of the reference: the scenario under FP32 (FP64) with TF32 off, global randomness seeded as
    before each strategy's run."""
    fp64, perturb, params, _ = key
    seed_global(case.seed, device)  # as before each strategy's run: global randomness is the same
    ex = FP64(device) if fp64 else Execution(PRESETS["fp32"], device)
    with _deterministic():  # FP32 flags (TF32 off) for the whole run, as a strategy's own
        return case.scenario.execute(ex, inputs, dict(params) if params else case.params, perturb)


def reference_keys(case: Case, device: torch.device) -> list[RefKey]:
    """The runs :func:`compute_reference` makes of ``case`` where they all run (a reference whose FP32 output
    cannot be judged stops after the first; a training rerun whose first updates differ adds a full one)."""
    s, p = case.scenario, case.params
    keys: list[RefKey] = [(False, None, None, 0), (True, None, None, 0)]
    if s.perturbed is not None:
        keys += [(False, k, None, 0) for k in range(sensitivity.RUNS)]
    if device.type in RERUN_DEVICES:
        steps = p.get("steps")
        if s.perturbed is not None and isinstance(steps, int) and steps > RERUN_PROBE_STEPS:
            keys.append((False, None, _probe_params(p), 0))
        else:
            keys.append((False, None, None, 1))
    return keys


def _probe_params(p: dict) -> tuple:
    return tuple({**p, "steps": RERUN_PROBE_STEPS}.items())


def compute_reference(case: Case, inputs: dict, device: torch.device, runs: Any = None) -> Reference:
    """FP32 reference (TF32 off), checked against FP64, and on :data:`RERUN_DEVICES` against itself.
    ``runs`` (:class:`harness.run.fanout.Helpers`): where the runs of :func:`reference_keys` were started
    at once; a run it does not hold runs here."""
    s, p = case.scenario, case.params

    def run(key: RefKey) -> Output:
        got = runs.reference(key) if runs is not None else None
        return got if got is not None else reference_run(case, inputs, device, key)

    out32 = run((False, None, None, 0))
    problems = output_problems(out32)
    if problems:  # no value of FP64 can make this comparable: the FP64 run is not needed
        return Reference(out32, "fp32", {}, None, f"the reference output cannot be judged: {'; '.join(problems)}")
    out64 = run((True, None, None, 0))
    sens = None
    if s.perturbed is not None:  # training: FP32's own spread under one-ulp perturbations (harness.judge.sensitivity);
        # first, as it marks the computational zeros every later comparison leaves out
        sens = sensitivity.measure(lambda k: run((False, k, None, 0)), out32, out64)
    fp32 = FORMATS["fp32"]
    m = compare(out32, out64, fp32)
    n = s.n(p)
    b = bound(fp32, n, out64.kappa)
    worst = _worst(m)
    check: dict[str, Any] = {"fp32_vs_fp64": worst, "bound": b}
    if device.type in RERUN_DEVICES:
        probe = _probe_rerun(s, p, out32, lambda q: run((False, None, q, 0)))
        if probe is not None:
            check.update(nondeterministic=False, fp32_rerun_diff=0.0, fp32_rerun=probe)
        else:
            again = compare(run((False, None, None, 1)), out32, fp32)
            spread = _worst(again)
            check["nondeterministic"] = bool(spread != 0 or any(again.get(k) for k in _FP32_UNTRUSTED))
            check["fp32_rerun_diff"] = spread
    if sens is not None:
        check["fp32_sensitivity"] = sens
    window = _window(out32)
    if worst > b or any(m.get(k) for k in _FP32_UNTRUSTED):
        check["reason"] = (f"fp32 rel_err {worst:.2e} > {b:.2e} = {describe(fp32, n, out64.kappa)}: "
                           "FP64 is the reference")
        ref = Reference(out64, "fp64", check, window)
    else:
        ref = Reference(out32, "fp32", check, window)
    ref.unjudged = _unjudged_nonfinite(ref.output, ref.format, s.nonfinite_reference, check)
    return ref


#: Updates of a training reference that run again first (see :func:`_probe_rerun`).
RERUN_PROBE_STEPS = 4


def _probe_rerun(s: Any, p: dict, out32: Output, run_with: Callable[[tuple], Output]) -> str | None:
    """The rerun of a training reference, cut short where it can be: its first :data:`RERUN_PROBE_STEPS`
    updates run again, and if their losses and the first update's gradients come out bit for bit as the
    reference's, the rest would too (each later update starts from the same weights and runs the same
    kernels on the same batch: kernels that add in another order do so at every call, and show in the first
    updates already), so the full rerun is not run; the check says so (the returned note). None where it must
    run in full: not a training case (no ``steps``, no perturbed runs), too few steps to save any, or any
    difference (the full rerun then measures the spread at the horizon judged)."""
    steps = p.get("steps")
    if s.perturbed is None or not isinstance(steps, int) or steps <= RERUN_PROBE_STEPS or not out32.losses:
        return None
    k = RERUN_PROBE_STEPS
    short = run_with(_probe_params(p))
    same = (short.losses == out32.losses[:k] and short.extra.get("updates") == k
            and set(short.grads or {}) == set(out32.grads or {})
            and all(torch.equal(short.grads[n], g) for n, g in (out32.grads or {}).items()))  # type: ignore[index]
    if not same:
        return None
    return (f"the first {k} of {steps} updates ran again and came out bit for bit the same (losses and the first "
            "update's gradients): every later update starts from the same weights and runs the same kernels, so "
            "the rest was not rerun")


MAX_WINDOW_TENSORS = 64


def _window(out: Output) -> dict[str, Any] | None:
    if not out.grads:
        return None
    w = scale_window(out.grads).as_dict()
    w["log2_hist"] = log2_histogram(out.grads)
    if len(w["per_tensor"]) > MAX_WINDOW_TENSORS:  # keep records small for large models
        keep = sorted(w["per_tensor"].items(), key=lambda kv: -kv[1]["lo"])[:MAX_WINDOW_TENSORS]
        w["per_tensor"] = dict(keep)
        w["per_tensor_truncated"] = True
    return w


#: Formats whose ranges a gradient histogram is drawn against (recorded with it: reports import no torch).
HIST_FORMATS = ("fp16", "bf16", "fp8_e4m3", "fp8_e5m2")


def log2_histogram(grads: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Counts of the non-zero finite gradient entries per binade ``floor(log2|g|)`` (all tensors pooled),
    the zero count, and the ranges of :data:`HIST_FORMATS`: what the gradient histogram of a report draws."""
    a = torch.cat([g.detach().abs().double().reshape(-1) for g in grads.values()])
    a = a[torch.isfinite(a)]
    nz = a[a > 0]
    ranges = {f: {"smallest": FORMATS[f].smallest, "min_normal": FORMATS[f].min_normal, "max": FORMATS[f].max}
              for f in HIST_FORMATS}
    if nz.numel() == 0:
        return {"lo": 0, "counts": [], "zeros": int(a.numel()), "formats": ranges}
    e = torch.frexp(nz).exponent.long() - 1  # exact floor(log2|g|): |g| = m * 2^exponent, m in [0.5, 1)
    lo = int(e.min())
    counts = torch.bincount(e - lo).tolist()
    return {"lo": lo, "counts": counts, "zeros": int(a.numel() - nz.numel()), "formats": ranges}


class ReferenceCache:
    """References by case key and device, with counts of computations and reuses and the seconds spent.
    A user model's reference is also kept on disk (:mod:`harness.run.refcache`); one read from there
    counts as reused.

    A reference that fails is remembered too: every strategy of that case gets the same error
    without recomputing it."""

    def __init__(self) -> None:
        self._refs: dict[tuple[str, str], Reference | Exception] = {}
        self.computed = 0
        self.reused = 0
        self.seconds = 0.0

    def computes(self, case: Case, device: torch.device) -> bool:
        """Whether :meth:`get` would compute ``case``'s reference (held neither here nor on disk)."""
        if (case.key, str(device)) in self._refs:
            return False
        disk = refcache.lookup(case, device)
        return disk is None or not disk.path.is_file()

    def get(self, case: Case, inputs: dict, device: torch.device, runs: Any = None) -> Reference:
        """``case``'s reference: held, read from disk, or computed (``runs``: see :func:`compute_reference`)."""
        key = (case.key, str(device))
        if key in self._refs:
            self.reused += 1
            hit = self._refs[key]
            if isinstance(hit, Exception):
                raise RuntimeError(f"the reference of this case failed: {type(hit).__name__}: {hit}")
            return hit
        t0 = time.perf_counter()
        disk = refcache.lookup(case, device)  # a user model's reference, kept on disk across runs
        ref = disk.load(device) if disk is not None else None
        if ref is not None:
            self.reused += 1
            self.seconds += time.perf_counter() - t0
            self._refs[key] = ref
            return ref
        try:
            ref = compute_reference(case, inputs, device, runs)
        except Exception as exc:
            self._refs[key] = exc
            raise
        finally:
            self.computed += 1
            self.seconds += time.perf_counter() - t0
        if disk is not None:
            disk.store(ref)
        self._refs[key] = ref
        return ref

    def drop(self, case: Case, device: torch.device) -> None:
        self._refs.pop((case.key, str(device)), None)
