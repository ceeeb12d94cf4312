"""``python -m harness.distributed check`` (under torchrun: the real collectives against the simulation)
and ``python -m harness.distributed merge DIR`` (a sharded run that did not finish)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch.distributed as dist

from .collectives import CHECK_NUMEL, check_collectives
from .group import init_group, launched
from .sharding import merge_run


def _cmd_check(args: argparse.Namespace) -> int:
    from ..run.engine import resolve_device
    if not launched():
        raise ValueError("check compares real collectives across ranks: start it with torchrun, e.g. "
                         "torchrun --nproc-per-node 2 -m harness.distributed check")
    g = init_group(resolve_device(args.device), cuda_collectives=True)
    try:
        rows = check_collectives(g, args.numel, args.seed)
    finally:
        dist.destroy_process_group()
    if g.rank == 0:
        print(f"{'op':15s} {'dtype':5s} {'world':>5s} {'bitwise':>8s} {'ulp':>5s} {'err real':>9s} {'err sim':>9s} "
              f"{'bound':>9s} agree ok")
        for r in rows:
            print(f"{r['op']:15s} {r['dtype']:5s} {r['world']:5d} {r['bitwise_equal']:8.4f} "
                  f"{r['max_ulp_diff']:5.1f} {r['rel_err_real']:9.2e} {r['rel_err_sim']:9.2e} {r['bound']:9.2e} "
                  f"{r['ranks_agree']!s:5s} {r['ok']}")
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] and r["ranks_agree"] is not False for r in rows) else 1


def _cmd_merge(args: argparse.Namespace) -> int:
    counts = merge_run(args.dir)
    print(f"{args.dir}: {counts['merged']} records merged from {counts['shard_files']} shard files, "
          f"{counts['lost_records']} lost to a dead rank (error records), {counts['missing_records']} missing"
          + (f" (run `python -m harness run --resume {args.dir}`)" if counts["missing_records"] else ""))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m harness.distributed check`` (under torchrun) or ``merge DIR``; bad input: one line, exit 2."""
    from ..cli import UsageError, Parser, positive_int
    p = Parser(prog="python -m harness.distributed", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", parser_class=Parser)
    sub.required = True
    c = sub.add_parser("check", help="real collectives against the ring simulation (under torchrun, >= 2 ranks)")
    c.set_defaults(func=_cmd_check)
    c.add_argument("--device", default="auto", metavar="cpu|cuda|auto")
    c.add_argument("--numel", type=positive_int, default=CHECK_NUMEL, metavar="N")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--json", default=None, metavar="FILE")
    m = sub.add_parser("merge", help="fold the shard files of an interrupted sharded run into its records")
    m.set_defaults(func=_cmd_merge)
    m.add_argument("dir", type=Path, metavar="DIR")
    try:
        args = p.parse_args(argv)
        return args.func(args)
    except (UsageError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

