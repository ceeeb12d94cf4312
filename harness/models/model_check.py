"""``python -m harness check-model MODULE:FACTORY`` and :func:`check_model`: a user's model trained under
each strategy against FP32 (:mod:`harness.models.user_model`), failures diagnosed layer by layer
(:mod:`harness.models.diagnose`), and one strategy recommended (:mod:`harness.models.recommend`).

>>> result = check_model("examples.third_party_model:factory", steps=8)  # doctest: +SKIP
>>> print(result.report()); result.exit_code  # doctest: +SKIP
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .diagnose import Diagnosis, diagnose as run_diagnosis, fp16_window, fp32_gradients, window_gradients
from ..run import refcache
from ..run.engine import RunConfig, resolve_device, run_matrix
from ..run.fanout import MAX_FANOUT, default_fanout
from .model_isolation import diagnosis, preflight, stand_in, worker_scenarios
from .recommend import recommend, window_sentence
from ..results import check_new_out, read_run, write_json_atomic
from ..core.scaling import format_number
from ..core.strategy import resolve
from ..run.supervisor import fork_safe_cuda_check, fork_usable
from .user_model import (DEFAULT_STEPS, DEFAULT_STRATEGIES, EXPECTED, deterministic_cublas, factory_of, load_spec,
                         model_scenario, target_module)
from ..judge.verdict import FAILURES
from ..judge.window import Window

__all__ = ["check_model", "CheckResult", "add_command"]


@dataclass
class CheckResult:
    """What :func:`check_model` found: the run directory, its records, diagnoses and a recommendation."""

    name: str
    steps: int
    out: Path
    records: list[dict[str, Any]]
    window: Window  # the FP16 loss-scale window of the FP32 gradients of update 0
    diagnoses: dict[str, Diagnosis] = field(default_factory=dict)
    recommendation: str = ""
    diagnosis_failures: dict[str, str] = field(default_factory=dict)  # strategy -> how its diagnosis failed
    seed: int = 0

    @property
    def failed(self) -> list[str]:
        return [r["strategy"] for r in self.records if r["outcome"] in FAILURES]

    @property
    def exit_code(self) -> int:
        """0 when every strategy passed (or is unsupported here), 1 when one failed."""
        return 1 if self.failed else 0

    def report(self) -> str:
        """The text ``check-model`` prints."""
        head = ["strategy", "verdict", "margin", "loss div.", "final/FP32", "drift", "upd. lost", "skipped",
                "loss scale", "GEMMs"]
        rows = [head] + [_row(r) for r in self.records]
        widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
        lines = [f"{self.name}: {self.steps} updates per strategy against FP32 -> {self.out}"]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines += [f"  {r['strategy']}: {r['reason']}" for r in self.records if _noted(r)]
        lines += _reference_lines(self.records)
        for label, d in self.diagnoses.items():
            lines.append(f"diagnosis of {label}:")
            lines += [f"  {line}" for line in d.lines()]
        lines += [f"diagnosis of {label}: {why}" for label, why in self.diagnosis_failures.items()]
        lines.append(f"FP16 loss-scale window (FP32 gradients of update 0): {window_sentence(self.window)}")
        lines.append(f"recommendation: {self.recommendation}")
        return "\n".join(lines)


def _g(m: dict, key: str, fmt: str = "{:.2g}") -> str:
    v = m.get(key)
    return "-" if v is None else (v if isinstance(v, str) else fmt.format(v))


def _row(r: dict[str, Any]) -> list[str]:
    m = r.get("metrics") or {}
    sc = m.get("scaler")
    if sc and sc.get("steps"):
        f = [format_number(float(sc[k])) for k in ("scale_min", "scale_max", "scale_final")]
        scale = f"{format_number(float(sc['trajectory'][0]))}->{f[2]} [{f[0]}..{f[1]}]"
        skipped = f"{sc['skipped']}/{sc['steps']}"
    else:
        scale, skipped = "-", "-"
    margin = r.get("margin")  # worst error / its bound, written by the engine
    return [r["strategy"], r["outcome"], "-" if margin is None else f"{float(margin):.2g}",
            _g(m, "loss_divergence"), _g(m, "final_loss_ratio", "{:.4g}"), _g(m, "rel_err"),
            _g(m, "updates_lost", "{:.2%}"), skipped, scale, _coverage(m.get("gemm_coverage"))]


def _coverage(cov: dict[str, Any] | None) -> str:
    """``11/11`` when every GEMM layer ran in the strategy's format, else ``1/11 (Conv1D 0/10)``."""
    if not cov:
        return "-"
    missed = " ".join(f"{t} {c}/{n}" for t, (c, n) in cov["by_type"].items() if c < n)
    return f"{cov['covered']}/{cov['total']}" + (f" ({missed})" if missed else "")


def _noted(r: dict[str, Any]) -> bool:
    """A record whose reason is printed under the table: a failure, or a pass with something to say (its
    bound set by FP32's own sensitivity, a chaotic run, GEMMs outside the judged format)."""
    return r["outcome"] != "pass" or any(w in r["reason"] for w in ("sensitivity", "chaotic", "GEMM layers"))


def _reference_lines(records: list[dict[str, Any]]) -> list[str]:
    """FP32's own error against FP64 and its sensitivity to one-ulp perturbations (one reference per
    model), and whether the runs could see bit-identical inputs."""
    ref = next((r.get("reference") for r in records if r.get("reference")), None)
    out = []
    if ref:
        sens = ref.get("fp32_sensitivity") or {}
        own = ", ".join(f"{k} {float(sens[k]):.2g}" for k in ("rel_err", "loss_divergence", "grad_rel_err")
                        if k in sens)
        out.append(f"reference: {ref['format'].upper()}; FP32 against FP64 {float(ref['fp32_vs_fp64']):.2g}"
                   + (f"; FP32 against itself from weights one ulp apart (largest of {sens['runs']}): {own}"
                      if own else "") + ("; CHAOTIC at this horizon" if sens.get("chaotic") else ""))
        zeros = sens.get("computational_zeros") or {}
        if zeros:
            top = ", ".join(f"`{k}` {v}" for k, v in sorted(zeros.items(), key=lambda kv: -kv[1])[:3])
            out.append(f"computational zeros (FP32 gradient entries with no significant bit, left out of the drift "
                       f"and the per-tensor underflow): {sum(zeros.values())}, most in {top}")
    note = next(((r.get("metrics") or {}).get("inputs_note") for r in records
                 if (r.get("metrics") or {}).get("inputs_identical") is False), None)
    if note:
        out.append(f"inputs not identical across runs: {note}")
    return out


def check_model(target: str | Callable[[], dict] | dict, strategies: list[str] | None = None,
                steps: int = DEFAULT_STEPS, device: str = "auto", out: Path | str | None = None,
                diagnose: bool = True, progress: Callable[[int, int, str], None] | None = None,
                timeout: float | None = 600.0, cache: str | Path | bool | None = None, seed: int = 0,
                parallel: int | None = None) -> CheckResult:
    """Train ``target``'s model under each strategy against FP32, diagnose failures, recommend one.

    ``target`` is ``"MODULE:FACTORY"``, a factory, or its dict (see the module doc). Strategies are
    preset names or specs (default :data:`DEFAULT_STRATEGIES`). Writes a run directory (``run.json``,
    ``records.jsonl`` in the ``run`` schema, family ``training``, plus ``diagnosis.json``) to ``out``
    or ``results/runs/<UTC time>-<device>/``. The factory, the training and the diagnosis run in
    worker processes (:mod:`harness.models.model_isolation`), each step under ``timeout`` seconds (None: no
    deadline). ``cache``: where the FP32/FP64 reference is kept across checks (a directory; False: not
    kept; None: ``MP_HARNESS_CACHE`` or ``~/.cache/mp-harness``, :mod:`harness.run.refcache`). ``seed``
    seeds the factory, the batches it draws from the global RNG and the training's randomness. ``parallel``:
    trainings at once on the device (the reference's FP32, FP64 and perturbed runs, each strategy's;
    :mod:`harness.run.fanout`; None: 4 on a GPU, 1 on the CPU); the records are the same either way, apart
    from timings (on the CPU the runs share the cores' threads, and FP32 sums split by the thread count). Bad
    input raises ValueError saying what was expected.
    """
    if parallel is not None and not 1 <= parallel <= MAX_FANOUT:
        raise ValueError(f"parallel must be 1 to {MAX_FANOUT} trainings at once, got {parallel}")
    with refcache.configured(cache):
        return _check_model(target, strategies, steps, device, out, diagnose, progress, timeout, seed, parallel)


def _check_model(target: str | Callable[[], dict] | dict, strategies: list[str] | None, steps: int, device: str,
                 out: Path | str | None, diagnose: bool, progress: Callable[[int, int, str], None] | None,
                 timeout: float | None, seed: int = 0, parallel: int | None = None) -> CheckResult:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_new_out(out)
    deterministic_cublas()
    fork_safe_cuda_check()
    _import_before_forking()
    dev = resolve_device(device)
    strats = resolve(list(strategies or DEFAULT_STRATEGIES))
    if not fork_usable(dev)[0]:  # the factory runs here: no deadline, no protection (see supervisor)
        return _check_in_process(target, strats, steps, dev, out, diagnose, progress, seed)
    name, window = preflight(target, dev, timeout, seed)
    imports = [target_module(target)] if isinstance(target, str) else []
    # one worker: a check is one case, judged in the worker that built the model, whose helpers run its
    # trainings at once (harness.run.fanout); a lone worker keeps the process's torch threads, so FP32 sums as
    # it always did
    cfg = RunConfig([stand_in(name, steps, seed)], strats, dev, out=Path(out) if out else None, imports=imports,
                    timeout=timeout, workers=1, fanout=parallel or default_fanout(dev))
    out_dir, _, _ = run_matrix(cfg, progress, init=worker_scenarios(target, steps, seed))
    _, records = read_run(out_dir)
    by_label = {s.label: s for s in strats}
    result = CheckResult(name, steps, Path(out_dir), records, window, seed=seed)
    if diagnose:  # an ``error`` record already carries its traceback: re-running it would raise again
        for r in records:
            if r["outcome"] in FAILURES and r["outcome"] != "error":
                d = diagnosis(target, by_label[r["strategy"]], dev, steps, timeout, seed)
                if isinstance(d, str):
                    result.diagnosis_failures[r["strategy"]] = d
                else:
                    d.verdict = r["reason"]  # the lines that explain this verdict (diagnose.Diagnosis.lines)
                    result.diagnoses[r["strategy"]] = d
    return _finish(result, records)


def _import_before_forking() -> None:
    """What every forked process (pre-flight, worker, diagnosis) would import again: ``torch._dynamo``, which
    the first ``optimizer.step()`` of a process imports (torch wraps optimizer methods in
    ``torch._disable_dynamo``); seconds each, once here."""
    import torch._dynamo  # noqa: F401


def _check_in_process(target: Any, strats: list, steps: int, dev: torch.device, out: Path | str | None,
                      diagnose: bool, progress: Callable[[int, int, str], None] | None, seed: int = 0) -> CheckResult:
    """:func:`check_model` where no worker can be forked: everything in this process."""
    try:
        spec = load_spec(target, seed=seed)
        ref_grads = fp32_gradients(spec, dev)
    except ValueError:
        raise
    except SystemExit as exc:
        raise ValueError(f"{target}: the model's module or factory called sys.exit({exc.code!r}); a factory must "
                         "return a dict, not end the process") from None
    except Exception as exc:
        raise ValueError(f"{spec.name}: one FP32 training step failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}); expected {EXPECTED}") from None
    ref_grads = window_gradients(spec, dev, ref_grads)
    imports = [target_module(target)] if isinstance(target, str) else []
    scenario = model_scenario(spec, steps)
    refcache.register(scenario.name, factory_of(target), spec)
    cfg = RunConfig([scenario], strats, dev, out=Path(out) if out else None, imports=imports, workers=0)
    out_dir, _, _ = run_matrix(cfg, progress)
    _, records = read_run(out_dir)
    by_label = {s.label: s for s in strats}
    result = CheckResult(spec.name, steps, Path(out_dir), records, fp16_window(ref_grads), seed=seed)
    if diagnose:
        for r in records:
            if r["outcome"] in FAILURES and r["outcome"] != "error":
                d = run_diagnosis(spec, by_label[r["strategy"]], dev, steps, ref_grads)
                d.verdict = r["reason"]
                result.diagnoses[r["strategy"]] = d
    return _finish(result, records)


def _finish(result: CheckResult, records: list[dict[str, Any]]) -> CheckResult:
    """The recommendation, and ``diagnosis.json`` next to the run's records."""
    result.recommendation = recommend(records, result.window, result.diagnoses)
    write_json_atomic(result.out / "diagnosis.json", {
        "model": result.name, "steps": result.steps, "seed": result.seed, "window": _small_window(result.window.as_dict()),
        "diagnoses": {k: d.as_dict() for k, d in result.diagnoses.items()},
        "diagnosis_failures": result.diagnosis_failures, "recommendation": result.recommendation})
    return result


def _small_window(w: dict[str, Any], keep: int = 64) -> dict[str, Any]:
    """The window for diagnosis.json: the ``keep`` tensors that need the largest scales, as in records."""
    if len(w["per_tensor"]) > keep:
        w["per_tensor"] = dict(sorted(w["per_tensor"].items(), key=lambda kv: -kv[1]["lo"])[:keep])
        w["per_tensor_truncated"] = True
    return w


def add_command(subparsers: Any) -> None:
    """``python -m harness check-model MODULE:FACTORY [--strategy ...]... [--steps N] [--device ...] [--out DIR]``."""
    from ..cli import non_negative_int, out_dir, positive_int, seconds
    p = subparsers.add_parser("check-model", help="train your own model under each strategy against FP32; "
                              "diagnose failures layer by layer; recommend a strategy")
    p.add_argument("target", metavar="MODULE:FACTORY", help="FACTORY() returns {model, batch, loss[, optimizer]}; "
                   "or zoo:NAME[@SIZE], a model of the zoo (python -m harness zoo)")
    p.add_argument("--strategy", action="append", default=[], metavar="NAME-or-SPEC",
                   help=f"repeatable; default: {', '.join(DEFAULT_STRATEGIES)}")
    p.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS, metavar="N", help="updates per strategy")
    p.add_argument("--device", default="auto", metavar="cpu|cuda|auto")
    p.add_argument("--out", type=out_dir, default=None, metavar="DIR")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="N",
                   help="seeds the factory's RNG, batches drawn from the global RNG and dropout (default 0)")
    p.add_argument("--no-diagnose", action="store_true", help="skip the per-layer diagnosis of failures")
    p.add_argument("--timeout", type=seconds, default=600.0, metavar="SECONDS",
                   help="deadline of each step in seconds, 0 to 604800: the factory and one FP32 step, each "
                        "strategy's training, each diagnosis; 0 disables it (default 600)")
    add_parallel(p)
    refcache.add_options(p)
    from .fix import add_arguments
    add_arguments(p)
    p.set_defaults(func=_cmd)


def add_parallel(p: Any) -> None:
    """``--parallel N`` (check-model and zoo)."""
    from ..cli import bounded_int
    p.add_argument("--parallel", type=bounded_int(1, MAX_FANOUT), default=None, metavar="N",
                   help="trainings of a check at once on the device: the reference's FP32, FP64 and perturbed "
                        "runs and each strategy's (default 4 on a GPU, whose small models leave it idle; 1 on "
                        f"the CPU; 1 to {MAX_FANOUT}); the same records as one at a time (checked on the CPU, "
                        "with one thread per process: the runs share the cores, so FP32 sums split as with "
                        "fewer threads than a check without helpers)")


def _cmd(args: Any) -> int:
    def progress(done: int, total: int, what: str) -> None:
        print(f"[{done}/{total}] {what}", file=sys.stderr)

    from .fix import check_arguments, run_fix
    check_arguments(args)
    result = check_model(args.target, args.strategy, args.steps, args.device, args.out, not args.no_diagnose,
                         progress if sys.stderr.isatty() else None, args.timeout or None,
                         refcache.from_options(args), args.seed, args.parallel)
    print(result.report())
    if args.fix:  # the exit code stays check-model's: the strategies as given still fail
        run_fix(args, result)
    return result.exit_code
