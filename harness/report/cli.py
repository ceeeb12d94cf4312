"""``python -m harness report DIR [DIR2] [--html FILE] [--markdown FILE] [--asv DIR]``.

Prints the tables of a run (or the comparison of two runs) and writes them as Markdown and as a
self-contained HTML page with the plots. Reads run files only.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..results import InputError, RunRecords, read_header
from .compare import Run, compare_tables
from .markdown import render_markdown
from .separation import separation_tables
from .tables import (Table, environment_table, failure_table, family_table, format_comparison_table,
                     margin_table, outcome_table, render_text, summarize)

__all__ = ["add_command", "load_runs", "run_tables"]


def load_runs(dirs: list[Path]) -> list[Run]:
    """(label, header, records) per run directory; labels are the directory names, made distinct. The
    records are a :class:`RunRecords`: each pass streams the file again, nothing is held."""
    runs: list[Run] = []
    for d in dirs:
        runs.append((Path(d).resolve().name or str(d), read_header(d), RunRecords(d)))
    if len(runs) == 2 and runs[0][0] == runs[1][0]:
        runs = [(f"{tag}: {r[0]}", r[1], r[2]) for tag, r in zip("AB", runs)]
    return runs


def run_tables(run: Run) -> list[Table]:
    """The tables of one run, in report order, from one pass over its records (a second one where the run
    has FP8/FP4 recipes to tell apart: :mod:`harness.report.separation`)."""
    _, header, records = run
    sm = summarize(records)
    recipes = [s for s, f in sm.formats.items() if f in ("fp8", "fp4")]
    return [environment_table(header, sm), failure_table(sm), family_table(sm), format_comparison_table(sm),
            outcome_table(sm), margin_table(sm), *(separation_tables(records) if len(recipes) > 1 else [])]


def add_command(sub: Any) -> None:
    p = sub.add_parser("report", help="tables and plots from a run, or the comparison of two runs")
    p.set_defaults(func=_cmd_report)
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR", help="one run directory, or two to compare")
    p.add_argument("--html", type=Path, metavar="FILE", help="write a self-contained HTML page with the plots")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write the tables as Markdown")
    p.add_argument("--asv", type=Path, metavar="DIR", help="asv results directory to chart in the HTML page")


def _out(path: Path, flag: str) -> Path:
    if path.exists() and path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; pass a file name such as report.{flag.strip('-')[:4]}")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _cmd_report(args: argparse.Namespace) -> int:
    if len(args.dirs) > 2:
        raise InputError(f"report takes one run directory or two to compare, got {len(args.dirs)}")
    runs = load_runs(args.dirs)
    if len(runs) == 2:
        sections = [(None, compare_tables(*runs)), *((f"run {r[0]}", run_tables(r)) for r in runs)]
        title = f"mp-harness: {runs[0][0]} against {runs[1][0]}"
    else:
        sections = [(None, run_tables(runs[0]))]
        title = f"mp-harness report: {runs[0][0]}"
    print("\n\n".join(render_text(t) for t in sections[0][1]))
    if args.markdown:
        _out(args.markdown, "--markdown").write_text(render_markdown(title, sections), encoding="utf-8")
        print(f"wrote {args.markdown}")
    if args.html:
        try:
            import matplotlib  # noqa: F401  (the plots need it; say so in one line)
        except ImportError:
            raise InputError("--html draws its plots with matplotlib, which is not installed: "
                             "pip install 'mp-harness[report]'") from None
        from .html import write_html
        # the plots draw every record (points, histograms): the HTML page holds the run in memory
        write_html(_out(args.html, "--html"), [(r[0], r[1], list(r[2])) for r in runs], args.asv)
        print(f"wrote {args.html}")
    return 0
