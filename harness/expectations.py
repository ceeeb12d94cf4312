"""The expected-outcome table (scenario case x strategy), generated from the registry's ``Expect`` entries.

Every scenario declares which strategies it expects to fail and why; a case no entry matches is
expected to pass, and a strategy the device cannot run is ``unsupported``. This module renders that
declaration, for one tier's parameters on one device, as Markdown::

    python -m harness.expectations > docs/expected.md          # regenerate (the project's own suites)
    python -m harness.expectations --check docs/expected.md    # exit 1 if the file is stale
    python -m harness.expectations --import mypkg.scenarios    # include a user's scenarios

It states what the suites claim; tests compare the claim with actual outcomes.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Iterable, Sequence

import torch

from .cli import Parser
from .core.scenario import FAMILIES, TIERS, Scenario, case_id, discover
from .core.strategy import PRESETS, Strategy, support

__all__ = ["expected_outcome", "expected_rows", "render", "main", "CODES"]

#: Short cell codes (a 13-column table must stay readable).
CODES = {"pass": "·", "diverged": "div", "overflow": "ovf", "underflow": "unf", "scale_exhausted": "exh",
         "stalled": "stall", "unsupported": "n/a", "error": "err"}


def expected_outcome(s: Scenario, params: dict, strategy: Strategy, device: str = "cpu") -> tuple[str, str]:
    """(outcome, reason) the scenario declares for this case: an ``Expect`` entry, ``unsupported`` where the
    device cannot run the strategy or the scenario, else ``pass``."""
    if device not in s.devices:
        return "unsupported", f"scenario runs on {', '.join(s.devices)} only"
    if device == "cpu":  # the CUDA answer depends on the GPU: only CPU support is a pure function
        ok, why, _ = support(strategy, torch.device("cpu"))
        if not ok:
            return "unsupported", why
    e = s.expected(strategy.label, params, device)
    return (e.outcome, e.reason) if e else ("pass", "")


def expected_rows(scenarios: Iterable[Scenario], strategies: Sequence[Strategy], tier: str = "quick",
                  device: str = "cpu") -> list[tuple[Scenario, str, list[tuple[str, str]]]]:
    """(scenario, case id, [(outcome, reason) per strategy]) for every case of the tier."""
    return [(s, case_id(s.name, p), [expected_outcome(s, p, st, device) for st in strategies])
            for s in scenarios for p in s.params(tier)]


def _order(scenarios: Iterable[Scenario]) -> list[Scenario]:
    return sorted(scenarios, key=lambda s: (FAMILIES.index(s.family), s.name))


def _summary(rows: list, strategies: Sequence[Strategy]) -> list[str]:
    head = "| family | " + " | ".join(st.label for st in strategies) + " |"
    out = [head, "|---|" + "---:|" * len(strategies)]
    for fam in FAMILIES:
        fam_rows = [cells for s, _, cells in rows if s.family == fam]
        if not fam_rows:
            continue
        counts = []
        for j in range(len(strategies)):
            judged = [c[j][0] for c in fam_rows if c[j][0] != "unsupported"]
            counts.append(f"{sum(o != 'pass' for o in judged)}/{len(judged)}" if judged else "n/a")
        out.append(f"| {fam} | " + " | ".join(counts) + " |")
    return out


def render(scenarios: Iterable[Scenario], strategies: Sequence[Strategy] | None = None, tier: str = "quick",
           device: str = "cpu") -> str:
    """The Markdown document: a summary of expected failures per family, then per family a table of
    cases x strategies and the declared reasons."""
    if tier not in TIERS:
        raise ValueError(f"unknown tier {tier!r}; tiers: {', '.join(TIERS)}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; use cpu or cuda")
    strategies = list(strategies if strategies is not None else PRESETS.values())
    ordered = _order(scenarios)
    rows = expected_rows(ordered, strategies, tier, device)
    legend = ", ".join(f"`{c}` {o}" for o, c in CODES.items())
    lines = ["# Expected outcomes", "",
             f"What each scenario declares for every strategy preset: the {tier} tier's cases on the {device.upper()}. "
             "A case no `Expect` entry matches is expected to pass. Generated from the scenario registry by "
             "`python -m harness.expectations > docs/expected.md`; do not edit by hand (tests compare this file "
             "with the registry, and the declarations with actual outcomes). An optimizer recipe (`update=`, "
             "`states=`) that never acts in a run (no optimizer step, or no state of 4096 entries) is recorded "
             "`unsupported` (not applicable) whatever is declared here: only running tells.", "",
             f"Cells: {legend}.", "", "## Expected failures per family", "",
             *_summary(rows, strategies), ""]
    for fam in FAMILIES:
        fam_rows = [r for r in rows if r[0].family == fam]
        if not fam_rows:
            continue
        lines += [f"## {fam}", "", "| case | " + " | ".join(st.label for st in strategies) + " |",
                  "|---|" + ":-:|" * len(strategies)]
        for _, cid, cells in fam_rows:
            lines.append(f"| `{cid}` | " + " | ".join(CODES[o] for o, _ in cells) + " |")
        lines.append("")
        for s in (s for s in ordered if s.family == fam):
            lines.append(f"- **{s.name}**: {s.description.splitlines()[0]}")
            reasons = {}
            for r in (r for r in fam_rows if r[0] is s):
                for st, (o, why) in zip(strategies, r[2]):
                    if o != "pass":
                        reasons.setdefault((o, why), []).append(st.label)
            for (o, why), names in reasons.items():
                lines.append(f"  - {', '.join(dict.fromkeys(names))}: `{o}`, {why}")
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _own_suites(reg: Iterable[Scenario]) -> list[Scenario]:
    return [s for s in reg if getattr(s.run, "__module__", "").startswith("suites.")]


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(prog="python -m harness.expectations",
                description="Render the expected-outcome table (Markdown) from the scenario registry")
    p.add_argument("--tier", default="quick", choices=TIERS)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="also render the scenarios this module registers")
    p.add_argument("--check", type=Path, metavar="FILE", help="exit 1 if FILE differs from the generated text")
    try:
        args = p.parse_args(argv)
        reg = discover(args.imports)
        text = render(list(reg) if args.imports else _own_suites(reg), tier=args.tier, device=args.device)
    except ValueError as exc:  # UsageError included: one line, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check is None:
        sys.stdout.write(text)
        return 0
    if not args.check.is_file():
        print(f"error: {args.check}: no such file; generate it with python -m harness.expectations > {args.check}",
              file=sys.stderr)
        return 2
    if args.check.read_text() != text:
        print(f"{args.check} is stale: regenerate it with python -m harness.expectations > {args.check}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
