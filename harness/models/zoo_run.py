"""``python -m harness zoo``: check-model on every zoo model (:mod:`harness.models.zoo`), one run directory
per model under ``--out``, a ``zoo.json`` that sums them up, and the table (text, or Markdown for the docs).

    python -m harness zoo --device cpu --out runs/zoo                   # every model, tiny sizes
    python -m harness zoo --model gpt2 --model llama-highlr --steps 16
    python -m harness zoo --size base --device cuda --out runs/zoo-h200
    python -m harness zoo --report runs/zoo-h200 --markdown docs/zoo-table.md   # the table of a finished zoo run

A model whose library is missing here is a row ``unsupported`` with the install line; it is not run.
``zoo.json`` is written after every model, and an ``--out`` that holds an interrupted zoo of the same
settings is completed: the models it judged are kept, the rest run (a model cut off midway runs again,
its partial run directory moved aside, not deleted).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from . import zoo
from ..results import InputError, check_new_out, read_header, write_json_atomic

__all__ = ["run_zoo", "zoo_table", "add_command", "ZOO_FILE"]

ZOO_FILE = "zoo.json"
ZOO_SCHEMA = 1


def _size_of(name: str, size: str) -> str:
    """Regimes exist at the tiny size only: they run there whatever ``--size`` says."""
    sizes = zoo.get(name).sizes
    return size if size in sizes else sizes[0]


def run_zoo(models: list[str] | None = None, strategies: list[str] | None = None, steps: int | None = None,
            device: str = "auto", size: str | None = None, seed: int = 0, out: Path | str | None = None,
            timeout: float | None = 600.0, progress: Callable[[str], None] | None = None,
            parallel: int | None = None) -> dict[str, Any]:
    """Run check-model on each zoo model (default: all); returns what ``zoo.json`` holds. ``parallel``: as
    check-model's (trainings at once on the device).

    ``size`` defaults to ``tiny`` on the CPU and ``base`` on CUDA. Each model's run directory is
    ``out/<model>``; ``out`` defaults to ``results/runs/zoo-<UTC time>-<device>``."""
    from ..run.engine import resolve_device
    from .model_check import check_model
    from .user_model import DEFAULT_STEPS, DEFAULT_STRATEGIES
    names = models or zoo.names()
    for n in names:
        zoo.get(n)  # an unknown name: one line before anything runs
    dev = resolve_device(device)
    size = size or ("tiny" if dev.type == "cpu" else "base")
    if size not in zoo.SIZES:
        raise ValueError(f"unknown size {size!r}; sizes: {', '.join(zoo.SIZES)}")
    check_new_out(out)
    root = Path(out) if out else Path("results/runs") / f"zoo-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{dev.type}"
    root.mkdir(parents=True, exist_ok=True)
    # the GPU's name comes from the first run's header: asking torch for it here would start CUDA in this
    # process, and check-model could then no longer fork its workers (every model would run unprotected)
    summary: dict[str, Any] = {"schema": ZOO_SCHEMA, "device": str(dev), "gpu": "", "torch": torch.__version__,
                               "size": size, "seed": seed, "steps": steps or DEFAULT_STEPS,
                               "strategies": list(strategies or DEFAULT_STRATEGIES), "models": []}
    earlier = _earlier(root, summary)
    # kept: the models the earlier run judged; an `unsupported` (a library missing then) or `error` row runs again
    done = {e["model"] for e in (earlier or {}).get("models", []) if e.get("outcome") in ("pass", "fail")}
    if earlier is not None:
        summary["gpu"] = earlier.get("gpu") or ""
        summary["models"] = [e for e in earlier["models"] if e["model"] in done or e["model"] not in names]
    for name in names:
        s = _size_of(name, size)
        if name in done:
            if progress:
                progress(f"{name}@{s}: done in the earlier run in {root}, kept")
            continue
        _move_aside(root / name, progress)
        entry: dict[str, Any] = {"model": name, "size": s, "library": zoo.get(name).library,
                                 "regime": zoo.get(name).regime, "description": zoo.get(name).description}
        why = zoo.unsupported(name, s, dev)
        if progress:
            progress(f"{name}@{s}" + (f": unsupported: {why}" if why else ""))
        if why:
            entry.update(outcome="unsupported", reason=why)
        else:
            t0 = time.perf_counter()
            try:
                res = check_model(f"zoo:{name}@{s}", strategies, steps or DEFAULT_STEPS, str(dev), root / name,
                                  timeout=timeout, seed=seed, parallel=parallel)
            except ValueError as exc:  # check-model refused the model (its FP32 step failed, a deadline): the
                # other models still run, and the row says why this one did not
                entry.update(outcome="error", reason=str(exc), seconds=time.perf_counter() - t0)
                summary["models"].append(entry)
                write_json_atomic(root / ZOO_FILE, summary)
                continue
            summary["gpu"] = summary["gpu"] or _gpu(res.out)
            entry.update(outcome=_outcome(res), run=name, seconds=time.perf_counter() - t0,
                         recommendation=res.recommendation, records=[_brief(r) for r in res.records],
                         diagnoses={k: d.lines() for k, d in res.diagnoses.items()})
            if entry["outcome"] == "unsupported":
                entry["reason"] = "no strategy ran here: " + "; ".join(sorted({r["reason"] for r in res.records}))
        summary["models"].append(entry)
        write_json_atomic(root / ZOO_FILE, summary)  # after every model: an interrupted zoo keeps what it did
    summary["out"] = str(root)
    return summary


#: What a zoo run must share with the one it completes.
SETTINGS = ("device", "size", "seed", "steps", "strategies")


def _earlier(root: Path, summary: dict[str, Any]) -> dict[str, Any] | None:
    """The ``zoo.json`` an interrupted zoo left in ``root``, None where there is none; InputError (one line)
    where it ran with other settings, whose models cannot be mixed with these."""
    if not (root / ZOO_FILE).exists():
        return None
    old = read_summary(root)
    other = [f"{k} {old.get(k)!r} there, {summary[k]!r} here" for k in SETTINGS if old.get(k) != summary[k]]
    if other:
        raise InputError(f"--out {root}: holds a zoo of other settings ({'; '.join(other)}); pass a new directory, "
                         "or the same settings to complete it")
    return old


def _move_aside(run_dir: Path, progress: Callable[[str], None] | None) -> None:
    """A model's run directory left by a zoo cut off during that model: renamed ``<name>.interrupted[-N]``
    (kept, never deleted), so that the model runs again into a new one."""
    if not (run_dir / "records.jsonl").exists() and not (run_dir / "run.json").exists():
        return
    n, dest = 0, run_dir.with_name(run_dir.name + ".interrupted")
    while dest.exists():
        n += 1
        dest = run_dir.with_name(f"{run_dir.name}.interrupted-{n}")
    run_dir.rename(dest)
    if progress:
        progress(f"{run_dir.name}: its run was cut off; moved to {dest.name}, running it again")


def _outcome(res: Any) -> str:
    """A model's row: ``fail`` where a strategy failed, ``pass`` where none failed and at least one was judged,
    ``unsupported`` where none ran (nothing was compared, so nothing passed)."""
    if res.failed:
        return "fail"
    return "pass" if any(r["outcome"] == "pass" for r in res.records) else "unsupported"


def _gpu(run_dir: Path) -> str:
    """The GPU a check-model run ran on, from its header ("" on the CPU)."""
    return (read_header(run_dir).get("environment") or {}).get("gpu") or ""


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    """What the zoo's table shows of a record: verdict, reason, margin, time, and the mechanism observed."""
    m = r.get("metrics") or {}
    sens = (r.get("reference") or {}).get("fp32_sensitivity") or {}
    out = {"strategy": r["strategy"], "outcome": r["outcome"], "reason": r["reason"], "margin": r.get("margin"),
           "seconds": r.get("seconds"), "loss_divergence": m.get("loss_divergence"),
           "updates_lost": m.get("updates_lost"), "chaotic": bool(sens.get("chaotic")), "final_loss": m.get("final_loss")}
    if m.get("observed"):
        out["observed"] = {k: {"first": v[0], "last": v[-1], "max": _max(v)} for k, v in m["observed"].items() if v}
    return out


def _max(v: list) -> float:
    vals = [float(x) for x in v]
    return math.nan if any(x != x for x in vals) else max(vals)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    x = float(x)
    return "nan" if x != x else f"{x:.3g}"


def _cell(rec: dict[str, Any]) -> str:
    margin = "" if rec.get("margin") is None else f" {float(rec['margin']):.2g}"
    secs = "" if rec.get("seconds") is None else f" ({float(rec['seconds']):.1f} s)"
    return f"{rec['outcome']}{margin}{' chaotic' if rec.get('chaotic') else ''}{secs}"


def zoo_table(summary: dict[str, Any]) -> str:
    """The zoo as Markdown: model x strategy -> verdict, margin (worst error / bound) and seconds; the
    regimes' mechanism (first and largest value observed per step, FP32 and each strategy); each model's
    recommendation."""
    strategies = summary["strategies"]
    lines = [f"Zoo on {summary.get('gpu') or summary['device']} (torch {summary['torch']}), {summary['steps']} updates, "
             f"seed {summary['seed']}. Cells: verdict, margin (worst error / its bound), seconds.", "",
             "| model | size | " + " | ".join(strategies) + " |", "|---|---|" + "---|" * len(strategies)]
    for e in summary["models"]:
        if e["outcome"] in ("unsupported", "error"):
            lines.append(f"| {e['model']} | {e['size']} | {e['outcome']}: {e['reason']} |" + " |" * (len(strategies) - 1))
            continue
        by = {r["strategy"]: r for r in e["records"]}
        lines.append(f"| {e['model']} | {e['size']} | " + " | ".join(_cell(by[s]) if s in by else "-"
                                                                      for s in strategies) + " |")
    mech = [e for e in summary["models"] if e.get("records") and any(r.get("observed") for r in e["records"])]
    if mech:
        lines += ["", "Mechanisms (per training step: first -> largest):", "",
                  "| model | regime | strategy | observed | final loss |", "|---|---|---|---|---|"]
        for e in mech:
            for r in e["records"]:
                obs = "; ".join(f"{k} {_fmt(v['first'])} -> {_fmt(v['max'])}" for k, v in (r.get("observed") or {}).items())
                lines.append(f"| {e['model']} | {e['regime']} | {r['strategy']} | {obs} | {_fmt(r.get('final_loss'))} |")
    lines += ["", "Recommendations:", ""]
    lines += [f"- {e['model']}: {e.get('recommendation') or e.get('reason', '')}" for e in summary["models"]]
    return "\n".join(lines) + "\n"


def read_summary(directory: Path | str) -> dict[str, Any]:
    """``zoo.json`` of a zoo run directory; ValueError (one line) where there is none or it is not one."""
    path = Path(directory) / ZOO_FILE
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{directory}: no {ZOO_FILE}; pass the --out directory of a `python -m harness zoo` run") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc.msg}, line {exc.lineno}); rerun the zoo") from None
    if not isinstance(summary, dict) or summary.get("schema") != ZOO_SCHEMA:
        raise ValueError(f"{path}: not a zoo summary of schema {ZOO_SCHEMA}; rerun the zoo")
    return summary


def add_command(subparsers: Any) -> None:
    """``python -m harness zoo [--model NAME]... [--strategy ...]... [--size tiny|base] [--steps N] ...``."""
    from ..cli import non_negative_int, out_dir, positive_int, seconds
    from .model_check import add_parallel
    p = subparsers.add_parser("zoo", help="check-model on real architectures (Hugging Face, timm, torchvision) "
                              "built from configs, and on their failure regimes")
    p.add_argument("--model", action="append", default=[], metavar="NAME", help="repeatable; default: every model "
                   "(python -m harness zoo --list)")
    p.add_argument("--strategy", action="append", default=[], metavar="NAME-or-SPEC", help="repeatable; default: "
                   "check-model's")
    p.add_argument("--size", default=None, choices=zoo.SIZES, help="default: tiny on the CPU, base on CUDA "
                   "(regimes always run tiny)")
    p.add_argument("--steps", type=positive_int, default=None, metavar="N", help="updates per strategy (default 32)")
    p.add_argument("--device", default="auto", metavar="cpu|cuda|auto")
    p.add_argument("--seed", type=non_negative_int, default=0, metavar="N", help="weights and data (default 0)")
    p.add_argument("--out", type=out_dir, default=None, metavar="DIR", help="one run directory per model under it; "
                   "a DIR an interrupted zoo of the same settings left is completed")
    p.add_argument("--timeout", type=seconds, default=600.0, metavar="SECONDS", help="as check-model's")
    add_parallel(p)
    p.add_argument("--list", action="store_true", help="list the models and whether each runs here")
    p.add_argument("--report", type=out_dir, default=None, metavar="DIR", help="print the table of a finished zoo "
                   "run (its zoo.json) instead of running")
    p.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="also write the table as Markdown")
    p.set_defaults(func=_cmd)


def _cmd(args: Any) -> int:
    if args.list:
        for n in zoo.names():
            m = zoo.get(n)
            why = zoo.library_missing(m.library)
            print(f"{n:22s} {m.library:12s} {', '.join(m.sizes):10s} {m.description}"
                  + (f" [unsupported here: {why}]" if why else ""))
        return 0
    if args.report is not None:
        summary = read_summary(args.report)
    else:
        def progress(what: str) -> None:
            print(f"zoo: {what}", file=sys.stderr)
        summary = run_zoo(args.model, args.strategy, args.steps, args.device, args.size, args.seed, args.out,
                          args.timeout or None, progress, args.parallel)
    text = zoo_table(summary)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    if "out" in summary:
        print(f"zoo run -> {summary['out']}")
    return 1 if any(e["outcome"] in ("fail", "error") for e in summary["models"]) and args.report is None else 0
