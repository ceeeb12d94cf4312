"""What ``check-model`` costs against the training it checks, in one process on one device.

1. ``bare``: per strategy, the user's own loop on the same model (``route_linears`` applied, so an FP8
   strategy's GEMMs are the same), the factory's optimizer, ``torch.amp.GradScaler`` where the strategy
   scales the loss: forward under autocast, backward, step; timed per update.
2. ``harness``: :func:`harness.models.user_model.train_trajectory` (what check-model runs per strategy)
   on the same model, timed per update. Both per-update times are differences of two runs, ``--steps``
   and ``--steps // 10`` updates, so the fixed costs (the model's copy, the first kernels) cancel.
   The ratio harness / bare is printed per strategy; the goal is <= 1.2.
3. ``check-model`` itself (unless ``--no-check``), with a fresh reference cache, then again with it
   warm (or once with ``--cache DIR``: cold where DIR is empty, warm where a run filled it): where its
   seconds go (start-up of a fresh process, pre-flight, the reference, each
   strategy, the diagnosis, the rest). ``--parallel N``: its trainings N at once (harness.run.fanout).

Models (the zoo's GPT-2, LLaMA and ViT, :mod:`harness.models.zoo`, and ``examples/third_party_model.py``;
transformers/timm imported only for the model selected): ``--model example|gpt2|llama|vit --size tiny|full``::

    python bench/check_model.py --model example --steps 8 --device cpu           # seconds, as the test runs it
    python bench/check_model.py --model gpt2 --size full --steps 1000 --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from harness.core.execution import Execution, route_linears  # noqa: E402
from harness.core.strategy import resolve  # noqa: E402
from harness.models.user_model import (DEFAULT_STRATEGIES, ModelSpec, deterministic_cublas, load_spec,  # noqa: E402
                                       train_trajectory, training_kernels)
from harness.core.batches import to_device  # noqa: E402
from harness.run.timing import sync  # noqa: E402

TARGETS = {"example": "examples.third_party_model:factory", "gpt2": "zoo:gpt2", "llama": "zoo:llama",
           "vit": "zoo:vit"}
#: The example's size comes from its environment variable; a zoo model's is part of its target (``@tiny``,
#: ``@base``: GPT-2 124M, a LLaMA of about 134M, ViT-B/16; harness.models.zoo).
EXAMPLE_SIZE = ("MP_HARNESS_EXAMPLE_SIZE", {"tiny": "small", "full": "large"})


def bare_loop(spec: ModelSpec, ex: Execution, steps: int, deterministic: bool = False) -> float:
    """Seconds of ``steps`` updates of the textbook loop under ``ex``'s strategy (synchronised at the end);
    ``deterministic``: under the deterministic kernels check-model trains with (:func:`reproducible`)."""
    with training_kernels(ex) if deterministic else contextlib.nullcontext():
        return _bare_loop(spec, ex, steps)


def _bare_loop(spec: ModelSpec, ex: Execution, steps: int) -> float:
    import copy
    dev = ex.device
    model = route_linears(copy.deepcopy(spec.model), ex).to(dev, ex.param_dtype)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = spec.optimizer(params)
    use_gs = ex.strategy.scaler.kind != "none"
    gs = torch.amp.GradScaler(dev.type, init_scale=ex.strategy.scaler.init, enabled=use_gs)
    batches = [spec.batch_at(i) for i in range(steps)]  # drawn before the clock, as the harness's are
    sync(dev)
    t = time.perf_counter()
    for cpu in batches:  # to the device each update, from pinned memory without a wait (a DataLoader's pin_memory)
        b = tuple(to_device(x, dev) if isinstance(x, torch.Tensor) else x for x in cpu)
        opt.zero_grad(set_to_none=True)
        with ex.autocast():
            loss = spec.loss_at(model, b)
        with ex.gemm_flags():
            gs.scale(loss).backward()
        gs.step(opt)
        gs.update()
    sync(dev)
    return time.perf_counter() - t


def harness_loop(spec: ModelSpec, ex: Execution, steps: int, deterministic: bool = True) -> float:
    """Seconds of :func:`train_trajectory` over ``steps`` updates (what check-model runs per strategy;
    ``deterministic=False``: with torch's default kernels instead)."""
    sync(ex.device)
    t = time.perf_counter()
    train_trajectory(ex, spec, steps, deterministic=deterministic)
    sync(ex.device)
    return time.perf_counter() - t


def per_update(run: Callable[[int], float], steps: int) -> float:
    """Seconds per update: (time of ``steps`` - time of ``steps // 10``) / the difference."""
    short = max(1, steps // 10)
    return (run(steps) - run(short)) / (steps - short)


def interleaved(loops: dict[str, Callable[[int], float]], steps: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per update of each loop, ``repeats`` times, the loops taking turns within each repeat (so a
    drift of the machine, clocks or another process, falls on all of them alike); each warmed up first."""
    short = max(1, steps // 10)
    for run in loops.values():
        run(short)  # first kernels, allocator
    times: dict[str, list[float]] = {k: [] for k in loops}
    for _ in range(repeats):
        for k, run in loops.items():
            times[k].append(per_update(run, steps))
    return times


def _ratios(num: list[float], den: list[float]) -> list[float]:
    """The ratio within each repeat (the two loops timed side by side)."""
    return [a / b for a, b in zip(num, den)]


def _paired(num: list[float], den: list[float]) -> float:
    """The median over repeats of the ratio within each repeat."""
    return statistics.median(_ratios(num, den))


def step_ratios(spec: ModelSpec, strategies: list, device: torch.device, steps: int, repeats: int,
                kernels: bool = False) -> list[dict]:
    """Per strategy: the bare loop's and the harness's per-update times (medians over ``repeats``) and their
    ratio (the median of the ratios within each repeat); with ``kernels``, on CUDA, also both under the
    other kernels (the bare loop under the deterministic ones, the harness's under torch's defaults)."""
    rows = []
    for s in strategies:
        ex = Execution(s, device)
        if not ex.supported:
            rows.append({"strategy": s.label, "unsupported": ex.unsupported_reason})
            continue
        loops = {"bare": lambda n: bare_loop(spec, Execution(s, device), n),
                 "harness": lambda n: harness_loop(spec, Execution(s, device), n)}
        if kernels and device.type == "cuda":  # where the deterministic kernels differ from torch's defaults
            loops["det"] = lambda n: bare_loop(spec, Execution(s, device), n, True)
            loops["free"] = lambda n: harness_loop(spec, Execution(s, device), n, False)
        t = interleaved(loops, steps, repeats)
        ms = {k: statistics.median(v) * 1e3 for k, v in t.items()}
        ratios = _ratios(t["harness"], t["bare"])
        row = {"strategy": s.label, "bare_ms": ms["bare"], "harness_ms": ms["harness"],
               "ratio": statistics.median(ratios), "repeats": repeats, "ratio_spread": [min(ratios), max(ratios)]}
        if "det" in t:
            row.update(bare_det_ms=ms["det"], harness_default_kernels_ms=ms["free"],
                       ratio_same_kernels=_paired(t["harness"], t["det"]),
                       ratio_default_kernels=_paired(t["free"], t["bare"]))
        rows.append(row)
    return rows


def profile_steps(spec: ModelSpec, strategy: Any, device: torch.device, steps: int = 3, top: int = 12) -> dict:
    """The kernels (by self device time) of ``steps`` updates of the bare loop, the bare loop under the
    deterministic kernels, and check-model's step: which kernels the harness's step adds or replaces. Each
    loop is profiled at ``steps + 1`` updates and at 1, and the difference is kept, so that building the
    model (its copy to the device, one transfer per parameter) cancels as it does in the timings."""
    runs = {"bare": lambda n: bare_loop(spec, Execution(strategy, device), n),
            "bare, deterministic kernels": lambda n: bare_loop(spec, Execution(strategy, device), n, True),
            "harness": lambda n: harness_loop(spec, Execution(strategy, device), n)}
    out: dict[str, list[dict]] = {}
    for name, run in runs.items():
        run(1)  # warm-up
        long, short = _kernel_times(run, steps + 1, device), _kernel_times(run, 1, device)
        diff = {k: (ms - short.get(k, (0.0, 0))[0], calls - short.get(k, (0.0, 0))[1])
                for k, (ms, calls) in long.items()}
        per_update = {k: v for k, v in diff.items() if v[1] > 0}  # called in the updates, not only in the set-up
        events = sorted(per_update.items(), key=lambda kv: -kv[1][0])[:top]
        out[name] = [{"kernel": k[:90], "ms": ms, "calls": calls} for k, (ms, calls) in events]
    return out


def _kernel_times(run: Callable[[int], float], n: int, device: torch.device) -> dict[str, tuple[float, int]]:
    """Per kernel (or operator, on the CPU): self time in ms and calls, over one ``run(n)``."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    with profile(activities=acts) as prof:
        run(n)
    return {e.key: (getattr(e, attr, 0.0) / 1e3, e.count) for e in prof.key_averages()}


def _spread(r: dict) -> str:
    """The lowest and highest ratio of the repeats, where there were several."""
    lo, hi = r["ratio_spread"]
    return f" [{lo:.2f}-{hi:.2f} over {r['repeats']} repeats]" if r["repeats"] > 1 else ""


def _kernels(r: dict) -> str:
    """The deterministic kernels' share of a row (CUDA only)."""
    if "bare_det_ms" not in r:
        return ""
    return (f"\n  {'':18s} bare, deterministic kernels {r['bare_det_ms']:8.2f} ms (ratio to it "
            f"{r['ratio_same_kernels']:.3f}); harness, default kernels {r['harness_default_kernels_ms']:8.2f} ms "
            f"(ratio {r['ratio_default_kernels']:.3f})")


def start_up_seconds() -> float:
    """A fresh interpreter importing what ``check-model`` imports before its work."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import harness.cli, harness.models.model_check"], cwd=ROOT, env=env,
                   check=True)
    return time.perf_counter() - t


def check_model_seconds(target: str, strategies: list[str], steps: int, device: str, cache: Path,
                        parallel: int | None = None) -> dict[str, Any]:
    """Where one ``check_model`` call's seconds go (pre-flight and diagnosis timed by wrapping them)."""
    from harness.models import model_check
    spent = {"preflight": 0.0, "diagnosis": 0.0}

    def timed(name: str, fn: Callable) -> Callable:
        def wrapper(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                spent[name] += time.perf_counter() - t
        return wrapper

    saved = model_check.preflight, model_check.diagnosis
    model_check.preflight, model_check.diagnosis = timed("preflight", saved[0]), timed("diagnosis", saved[1])
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.perf_counter()
            res = model_check.check_model(target, strategies, steps, device, Path(tmp) / "run", timeout=None,
                                          cache=cache, parallel=parallel)  # no deadline: a long reference is
            # what is measured
            total = time.perf_counter() - t
            run = json.loads((res.out / "run.json").read_text())
    finally:
        model_check.preflight, model_check.diagnosis = saved
    stats = run["summary"]
    per = {r["strategy"]: r["seconds"] for r in res.records}
    ref = float(stats.get("seconds_in_references", 0.0))
    out = {"total": total, **spent, "reference": ref, "references_computed": stats.get("references_computed"),
           "strategies": per, "verdicts": {r["strategy"]: r["outcome"] for r in res.records},
           "isolation": stats.get("isolation")}
    out["rest"] = total - spent["preflight"] - spent["diagnosis"] - sum(per.values())
    return out


def check_part(a: argparse.Namespace, target: str, labels: list[str], res: dict[str, Any]) -> None:
    """check-model itself, cold then warm (or once with ``--cache``): where its seconds go."""
    res["start_up"] = start_up_seconds()
    with tempfile.TemporaryDirectory() as tmp:
        cache = a.cache or Path(tmp)
        for run in (("given cache",) if a.cache else ("cold cache", "warm cache")):
            c = check_model_seconds(target, labels, a.steps, a.device, cache, a.parallel)
            res[run] = c
            strat = ", ".join(f"{k} {v:.1f}" for k, v in c["strategies"].items())
            print(f"check-model, {run}: {c['total']:.1f} s = pre-flight {c['preflight']:.1f} + strategies "
                  f"({strat}; the first includes the reference {c['reference']:.1f}, "
                  f"{c['references_computed']} computed) + diagnosis {c['diagnosis']:.1f} + rest "
                  f"{c['rest']:.1f}; a fresh process's start-up {res['start_up']:.1f} s comes on top; {c['isolation']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=tuple(TARGETS), default="example")
    ap.add_argument("--size", choices=("tiny", "full"), default="tiny")
    ap.add_argument("--steps", type=int, default=8, help="updates per timed run (>= 2)")
    ap.add_argument("--strategy", action="append", default=[],
                    help=f"repeatable; default {', '.join(DEFAULT_STRATEGIES)}")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=None,
                    help="timed runs of each loop, taking turns (default 3 on CUDA, 1 on the CPU); the ratio is "
                         "the median of the ratios within each")
    ap.add_argument("--no-check", action="store_true", help="only the step ratios, not check-model itself")
    ap.add_argument("--kernels", action="store_true",
                    help="on CUDA also time both loops under the other kernels: the deterministic kernels' share "
                         "(on an H100 it was none: results/h100/round5)")
    ap.add_argument("--no-ratios", action="store_true", help="only check-model, not the step ratios")
    ap.add_argument("--profile", action="store_true",
                    help="also the top kernels of 3 updates of the bare loop and the harness's step (first strategy)")
    ap.add_argument("--cache", type=Path, default=None, metavar="DIR",
                    help="run check-model once with this reference cache (cold if empty, warm if filled); "
                         "default: a fresh one, cold then warm")
    ap.add_argument("--parallel", type=int, default=None, metavar="N",
                    help="check-model's trainings at once (default: check-model's, 4 on a GPU, 1 on the CPU)")
    ap.add_argument("--json", type=Path, default=None, metavar="FILE")
    a = ap.parse_args(argv)
    if a.steps < 2:
        ap.error("--steps must be >= 2")
    if a.repeats is not None and a.repeats < 1:
        ap.error("--repeats must be >= 1")
    if a.parallel is not None and not 1 <= a.parallel <= 16:
        ap.error("--parallel must be 1 to 16")
    target = TARGETS[a.model]
    if a.model == "example":
        os.environ[EXAMPLE_SIZE[0]] = EXAMPLE_SIZE[1][a.size]
    else:
        target += "@" + ("base" if a.size == "full" else "tiny")
    deterministic_cublas()  # as check-model does, before any CUDA work
    dev = torch.device(a.device)
    labels = a.strategy or list(DEFAULT_STRATEGIES)
    try:
        spec = load_spec(target)
    except ValueError as exc:  # e.g. timm not installed for --model vit
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n_params = sum(p.numel() for p in spec.model.parameters())
    res: dict[str, Any] = {"model": a.model, "size": a.size, "params": n_params, "steps": a.steps,
                           "device": str(dev), "gpu": None, "torch": str(torch.__version__)}
    print(f"{target} ({a.model} {a.size}, {n_params / 1e6:.1f}M parameters) on {a.device}, {a.steps} updates")
    if not a.no_check:  # first: CUDA must not have started in this process, or check-model cannot fork workers
        check_part(a, target, labels, res)
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
        print(f"GPU: {res['gpu']}")
    res["steps_ratio"] = [] if a.no_ratios else step_ratios(spec, resolve(labels), dev, a.steps,
                                                                      a.repeats or (3 if dev.type == "cuda" else 1),
                                                                      a.kernels)
    for r in res["steps_ratio"]:
        print(f"  {r['strategy']:18s} " + (f"unsupported: {r['unsupported']}" if "unsupported" in r else
                                           f"bare {r['bare_ms']:8.2f} ms  harness {r['harness_ms']:8.2f} ms  "
                                           f"ratio {r['ratio']:.3f}" + _spread(r) + _kernels(r)))
    if a.profile:
        res["profile"] = profile_steps(spec, resolve(labels)[0], dev)
        for name, rows in res["profile"].items():
            print(f"top kernels, {name} (3 updates, {labels[0]}):")
            for k in rows:
                print(f"  {k['ms']:9.2f} ms {k['calls']:6d}x  {k['kernel']}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
