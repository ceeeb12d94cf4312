"""Command line: ``python -m harness list|strategies|run ...`` (see README)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

from . import exits
from .results_schema import InputError

__all__ = ["main", "Parser", "UsageError", "positive_int", "seconds", "out_dir", "non_negative_int"]


class UsageError(InputError):
    """Bad input on the command line: one line on stderr and exit 2."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one :class:`UsageError` line (the caller exits 2), no usage dump."""

    def error(self, message: str) -> None:
        raise UsageError(f"{self.prog}: {message} (see --help)")


def _whole_at_least(text: str, least: int) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be >= {least}, got {v}")
    return v


def bounded_int(least: int, most: int) -> Callable[[str], int]:
    """A whole number from ``least`` to ``most`` (``--parallel``)."""
    def parse(text: str) -> int:
        v = _whole_at_least(text, least)
        if v > most:
            raise argparse.ArgumentTypeError(f"must be {least} to {most}, got {v}")
        return v
    return parse


def positive_int(text: str) -> int:
    """A count of at least 1 (``--seeds``, ``--steps``)."""
    return _whole_at_least(text, 1)


#: The longest ``--timeout`` (a week): a deadline the process's interval timer and the clock can hold.
MAX_TIMEOUT = 7 * 86400.0


def seconds(text: str) -> float:
    """A ``--timeout``: seconds from 0 (no deadline) to :data:`MAX_TIMEOUT`."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= v <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"must be a number of seconds from 0 (no deadline) to {MAX_TIMEOUT:g} "
                                         f"(a week), got {text}")
    return v


def out_dir(text: str) -> Path:
    """An ``--out``: a directory path; an empty one would be the current directory (the repository)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; pass the directory the run is written to, e.g. --out runs/a")
    return Path(text)


def non_negative_int(text: str) -> int:
    """A count of at least 0 (``--workers``)."""
    return _whole_at_least(text, 0)


def _parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    p = Parser(prog="python -m harness", description="Numerical-robustness harness for mixed-precision training")
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    sub.required = True
    ls = sub.add_parser("list", help="scenarios: name, family, description, parameter grid")
    ls.set_defaults(func=_cmd_list)
    ls.add_argument("--json", action="store_true")
    ls.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    st = sub.add_parser("strategies", help="strategy presets, who computes each (own or a library and its version) "
                                          "and their canonical spec strings")
    st.set_defaults(func=_cmd_strategies)
    st.add_argument("--json", action="store_true")
    r = sub.add_parser("run", help="run the scenario x strategy matrix")
    r.set_defaults(func=_cmd_run)
    r.add_argument("--scenario", action="append", default=[], metavar="GLOB",
                   help="scenario names or globs (repeatable; default: all)")
    r.add_argument("--family", action="append", default=[], metavar="F", help="families (repeatable; default: all)")
    r.add_argument("--strategy", action="append", default=[], metavar="NAME-or-SPEC",
                   help="preset names or spec strings (repeatable; default: every preset)")
    r.add_argument("--device", default=None, metavar="cpu|cuda|auto", help="auto: cuda when present (default)")
    r.add_argument("--seeds", type=positive_int, default=None, metavar="N", help="seeds per case (default 1)")
    r.add_argument("--tier", default=None, metavar="quick|full|recipes|all",
                   help="parameter grid and default strategies (default quick; docs/scenarios.md)")
    r.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module that registers scenarios of your own (repeatable)")
    r.add_argument("--out", type=out_dir, default=None, metavar="DIR",
                   help="run directory (default results/runs/<UTC time>-<device>)")
    r.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    r.add_argument("--timeout", type=seconds, default=None, metavar="SECONDS",
                   help="per (case, strategy) deadline, 0 to 604800; 0 disables it (default 600)")
    r.add_argument("--workers", type=non_negative_int, default=None, metavar="N",
                   help="worker processes that run the cases (default: 1 on a GPU, one per CPU core up to 4 on the CPU; 0: in this process, unprotected)")
    r.add_argument("--max-records", type=positive_int, default=None, metavar="N",
                   help="refuse a matrix of more records (default 1,000,000)")
    r.add_argument("--resume", type=out_dir, default=None, metavar="DIR",
                   help="complete an interrupted run: run exactly the cases missing from DIR "
                        "(a new --timeout, --workers or --max-records applies to the rest)")
    for mod in _command_modules(argv):
        importlib.import_module(mod).add_command(sub)
    if next((a for a in argv if not a.startswith("-")), None) not in VIEW_COMMANDS:
        _add_stand_ins(sub, argv)
    return p


def _cmd_list(args: argparse.Namespace) -> int:
    from . import listing
    kept = None if args.imports else listing.load(args.json)  # no torch import where the listing is kept
    if kept is None:
        text, as_json = _listing(args.imports)
        if not args.imports:
            listing.store(text, as_json)
        kept = as_json if args.json else text
    print(kept)
    return 0


def _listing(imports: list[str]) -> tuple[str, str]:
    """``list``'s two outputs, text and ``--json``, from the discovered scenarios."""
    from .core.scenario import discover
    items = [s.summary() for s in discover(imports)]
    lines = []
    for s in items:
        grid = ", ".join(f"{k}={v}" for k, v in s["grid"].items())
        lines.append(f"{s['name']:28s} {s['family']:15s} {s['description'].splitlines()[0]}")
        lines.append(f"{'':28s} {'':15s} grid: {grid}")
    return "\n".join(lines), json.dumps(items, indent=1, default=str)


def _cmd_strategies(args: argparse.Namespace) -> int:
    from .core.strategy import PRESETS
    rows = [{"name": n, "spec": str(s), "library": _library(s.lib)} for n, s in PRESETS.items()]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    name_w = max(len(r["name"]) for r in rows)
    lib_w = max(len(r["library"]) for r in rows if not r["library"].startswith("not installed"))
    for r in rows:
        print(f"{r['name']:{name_w}s}  {r['library']:{lib_w}s}  {r['spec']}")
    return 0


def _library(lib: str) -> str:
    """Who computes a strategy's recipe: ``own`` (the harness, the oracle), ``torchao 0.18.0``, or
    ``not installed: pip install ...``."""
    from .core.libraries import LIBRARIES, missing_reason, version
    if lib == "none":
        return "own"
    why = missing_reason(lib)
    if why:
        return f"not installed: {LIBRARIES[lib].install}" if version(lib) is None else why
    return f"{LIBRARIES[lib].dist} {version(lib)}"


def _progress_bar(console: Any):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    prog = Progress(TextColumn("{task.description}", style="cyan"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TextColumn("{task.fields[case]}"), console=console, transient=True)
    return prog


def _run_config(args: argparse.Namespace):
    from dataclasses import replace
    from .run.engine import MAX_RECORDS, RunConfig, resume_config, select_matrix
    from .results import check_new_out
    limit = args.max_records or MAX_RECORDS
    if args.resume is not None:
        given = [f for f, v in (("--scenario", args.scenario), ("--family", args.family), ("--strategy", args.strategy),
                                ("--import", args.imports), ("--out", args.out), ("--tier", args.tier),
                                ("--seeds", args.seeds), ("--device", args.device)) if v]
        if given:
            raise UsageError(f"--resume takes the matrix ({', '.join(given)}) from the run directory, so the records "
                             f"stay one run; drop {', '.join(given)} (--timeout, --workers and --max-records may "
                             "change)")
        cfg = resume_config(args.resume)
        cfg = replace(cfg, timeout=cfg.timeout if args.timeout is None else (args.timeout or None),
                      workers=args.workers, max_records=limit)
        return cfg, True
    scenarios, strategies, device = select_matrix(args.tier or "quick", args.device or "auto", args.strategy,
                                                  args.imports, args.scenario, args.family)
    check_new_out(args.out, resumable=True)
    timeout = 600.0 if args.timeout is None else args.timeout
    return RunConfig(scenarios, strategies, device, seeds=args.seeds or 1, tier=args.tier or "quick", out=args.out,
                     imports=args.imports, timeout=timeout or None, workers=args.workers, max_records=limit), False


def _cmd_run(args: argparse.Namespace) -> int:
    from . import distributed
    from .run.engine import run_matrix
    from .report.tables import render_failure_table
    cfg, resume = _run_config(args)
    runner = distributed.run_sharded if distributed.launched() else run_matrix  # torchrun: ranks share the cases
    from rich.console import Console
    console = Console(stderr=True)
    show = not args.quiet and console.is_terminal and distributed.is_leader()
    if show:
        with _progress_bar(console) as prog:
            task = prog.add_task("run", total=None, case="")
            result = runner(cfg, lambda d, t, c: prog.update(task, completed=d, total=t, case=c), resume=resume)
    else:
        result = runner(cfg, resume=resume)
    if result is None:  # a torchrun rank other than 0: rank 0 writes and prints the run
        return 0
    out, summary, stats = result
    if not args.quiet:
        text = render_failure_table(summary.by_strategy, summary.by_family,
                                    console=Console() if sys.stdout.isatty() else None)
        if not sys.stdout.isatty():
            print(text)
    print(f"{stats['records']} records in {stats['wall_seconds']:.1f} s "
          f"({stats['references_computed']} references computed, {stats['references_reused']} reused) -> {out}")
    return 0


#: Modules that add a subcommand: each defines ``add_command(subparsers)`` and sets ``func`` on its
#: parser (``func(args) -> exit code``; raise ``results.InputError``, or ValueError/TypeError from a ``raise``
#: in harness code, for bad input: :mod:`harness.exits`).
COMMAND_MODULES: tuple[str, ...] = ("harness.report.cli", "harness.gate", "harness.models.model_check",
                                     "harness.models.zoo_run")
#: The command each view module adds: ``report`` and ``gate`` are pure functions of run files and must run
#: where torch is absent (a laptop with runs copied from a GPU box), so only their own module is imported.
VIEW_COMMANDS = {"report": "harness.report.cli", "gate": "harness.gate"}


def _command_modules(argv: Sequence[str]) -> tuple[str, ...]:
    """The modules whose commands the parser needs for ``argv``: the view's own for ``report``/``gate``
    (no torch), the one that defines the command otherwise (:func:`command_index`), and every module
    whose commands cannot be read without importing it. The other commands get a stand-in parser with
    their help line (:func:`_add_stand_ins`): ``--help`` lists them all without importing torch."""
    command = next((a for a in argv if not a.startswith("-")), None)
    if command in VIEW_COMMANDS:
        return (VIEW_COMMANDS[command],)
    index = command_index()
    unread = tuple(m for m in COMMAND_MODULES if m not in {mod for mod, _ in index.values()})
    return unread + ((index[command][0],) if command in index else ())


def command_index() -> dict[str, tuple[str, str]]:
    """``{command: (module, help line)}`` of :data:`COMMAND_MODULES`, read from their source (``ast``), not
    imported: importing ``check-model``'s module imports torch, seconds that ``--help`` and ``list`` need
    not pay. A module whose ``add_parser`` calls are not literal is left out (and imported)."""
    import ast
    import importlib.util
    out: dict[str, tuple[str, str]] = {}
    for mod in COMMAND_MODULES:
        spec = importlib.util.find_spec(mod)
        try:
            tree = ast.parse(Path(spec.origin).read_text()) if spec and spec.origin else None
        except (OSError, SyntaxError):
            tree = None
        found = {}
        for node in ast.walk(tree) if tree else ():
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_parser":
                name = node.args[0] if node.args else None
                helps = [k.value for k in node.keywords if k.arg == "help"]
                if not (isinstance(name, ast.Constant) and len(helps) == 1 and isinstance(helps[0], ast.Constant)):
                    found = {}
                    break
                found[name.value] = (mod, helps[0].value)
        out.update(found)
    return out


def _add_stand_ins(sub: Any, argv: Sequence[str]) -> None:
    """A parser with only its help line for each command of :func:`command_index` not imported for ``argv``."""
    command = next((a for a in argv if not a.startswith("-")), None)
    for name, (_, help_line) in command_index().items():
        if name != command and name not in sub.choices:
            sub.add_parser(name, help=help_line)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
    print(f"warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    # supervisor.fork_safe_cuda_check, before any CUDA check (workers are forked from this process), without
    # importing torch here: report and gate must run where torch is absent
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    with warnings.catch_warnings():  # a warning (e.g. a torn record line skipped) is one line too
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    """Run a command and map what it raised to one line and an exit code (:mod:`harness.exits`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser(argv).parse_args(argv)
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted: records written so far are kept", file=sys.stderr)
        return exits.INTERRUPTED
    except Exception as exc:  # noqa: BLE001  (every exception becomes one line and a documented code)
        return _report_exception(exc, argv)


def _report_exception(exc: Exception, argv: list[str]) -> int:
    if exits.is_system_failure(exc):
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        what = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        print(f"error: the system failed{where}: {what}; free space or memory, then run again "
              "(an interrupted run completes with `run --resume DIR`)", file=sys.stderr)
        return exits.SYSTEM
    if exits.is_bad_input(exc):
        if isinstance(exc, OSError):  # a path given that cannot be read or written (permissions, a folder for a file)
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"error: {where}{exc.strerror or exc}; check the path and its permissions", file=sys.stderr)
        else:  # bad names, specs, numbers, files
            print(f"error: {exc}", file=sys.stderr)
        return exits.BAD_INPUT
    path = exits.write_crash_report(exc, argv)
    where = f"traceback in {path}" if path else "traceback above"
    print(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (a fault of the "
          f"harness, not of your input; {where}; please report it)", file=sys.stderr)
    return exits.INTERNAL
