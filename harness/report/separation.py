"""Which scenario separates which FP8/FP4 recipes: for every pair of such strategies in a run, the cases
where their outcomes differ.

A strategy's recipe is read from its record's ``strategy_spec`` (``compute=fp8|fp4`` and ``fp8=RECIPE``);
strategies of the same recipe that differ only in how it runs (``lib=``, ``compile=``) are *implementations*
of one recipe: the emulation is their oracle, so their outcomes should agree, and a case where they differ
is flagged as a disagreement. Two different recipes that no case tells apart are flagged as indistinguishable:
the run has no scenario where the choice between them matters.

Cases are compared per (case, seed) where both strategies have a judged record (``unsupported`` is not
judged). One pass over the records; memory holds one small outcome code per FP8/FP4 record.
This module imports nothing of the harness but the report's own modules and :mod:`harness.results`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Iterable

from ..results import OUTCOMES
from .tables import Table

__all__ = ["spec_value", "recipe_of", "Separation", "separate", "separation_tables", "LOW_PRECISION"]

#: The compute formats whose strategies are recipes with scales (``fp8=`` names the recipe).
LOW_PRECISION = ("fp8", "fp4")
#: Spec keys that say how a recipe runs, not which recipe it is (absent: the harness's own, eager).
IMPLEMENTATION_KEYS = ("lib", "compile")
#: The harness's own per-tensor recipes, older than the library presets and not torchao's of the same name:
#: torchao's tensorwise quantizes the input after casting it to BF16, adds the bias in BF16 and, on a GPU,
#: accumulates its forward GEMM with fast accumulation (harness.core.execution.Execution.torchao_style). A
#: library's recipe of one of these names is another recipe, not an implementation of the own one.
OWN_RECIPES = ("fp8=tensorwise", "fp8=delayed")
#: Separating cases listed per pair in the table (the count says how many there are in all).
SHOWN = 3


def spec_value(spec: str, key: str) -> str | None:
    """The value of ``key`` in a strategy spec (``None`` if absent); commas inside parentheses (a scaler's
    arguments, ``blockwise(128)``) stay with their value.

    >>> spec_value("compute=fp8,apply=autocast,fp8=blockwise(128),lib=torchao", "fp8")
    'blockwise(128)'
    """
    depth, part, parts = 0, [], []
    for ch in spec:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            parts.append("".join(part))
            part = []
        else:
            part.append(ch)
    parts.append("".join(part))
    for p in parts:
        k, sep, v = p.partition("=")
        if sep and k.strip() == key:
            return v.strip()
    return None


def recipe_of(record: dict[str, Any]) -> tuple[str, str] | None:
    """(recipe, implementation) of an FP8/FP4 record, e.g. ``("fp8=rowwise", "lib=torchao")``,
    ``("fp8=tensorwise", "own")`` or ``("fp8=tensorwise (torchao's)", "lib=torchao")`` (:data:`OWN_RECIPES`);
    None for any other strategy."""
    spec = str(record.get("strategy_spec", ""))
    if spec_value(spec, "compute") not in LOW_PRECISION:
        return None
    recipe = f"{spec_value(spec, 'compute')}={spec_value(spec, 'fp8') or '?'}"
    how = [f"{k}={v}" for k in IMPLEMENTATION_KEYS if (v := spec_value(spec, k)) is not None]
    lib = spec_value(spec, "lib")
    if lib not in (None, "none") and recipe in OWN_RECIPES:
        recipe = f"{recipe} ({lib}'s)"
    return recipe, ",".join(how) or "own"


_CODE = {o: i for i, o in enumerate(OUTCOMES)}


@dataclass
class Separation:
    """Per FP8/FP4 strategy its recipe and implementation, and per (case, seed) each one's outcome code."""

    recipes: dict[str, tuple[str, str]] = field(default_factory=dict)
    outcomes: dict[tuple[str, int], dict[str, int]] = field(default_factory=dict)

    def add(self, r: dict[str, Any]) -> None:
        rec = recipe_of(r)
        if rec is None:
            return
        self.recipes.setdefault(r["strategy"], rec)
        key = (str(r.get("case") or r["scenario"]), int(r.get("seed", 0)))
        self.outcomes.setdefault(key, {})[r["strategy"]] = _CODE[r["outcome"]]

    def pair(self, a: str, b: str) -> tuple[int, list[tuple[str, str, str]]]:
        """(cases both judged, [(case, outcome of a, outcome of b)] where they differ), in case order."""
        judged, differ = 0, []
        unsupported = _CODE["unsupported"]
        for (case, seed), per in sorted(self.outcomes.items()):
            oa, ob = per.get(a), per.get(b)
            if oa is None or ob is None or unsupported in (oa, ob):
                continue
            judged += 1
            if oa != ob:
                differ.append((case if seed == 0 else f"{case}#{seed}", OUTCOMES[oa], OUTCOMES[ob]))
        return judged, differ

    def same_recipe(self, a: str, b: str) -> bool:
        return self.recipes[a][0] == self.recipes[b][0]


def separate(records: Iterable[dict[str, Any]]) -> Separation:
    """A :class:`Separation` of ``records`` (one pass)."""
    sep = Separation()
    for r in records:
        sep.add(r)
    return sep


def _shown(differ: list[tuple[str, str, str]]) -> str:
    cells = [f"{case} ({oa} / {ob})" for case, oa, ob in differ[:SHOWN]]
    more = len(differ) - SHOWN
    return "; ".join(cells) + (f"; and {more} more" if more > 0 else "")


def separation_tables(records: Iterable[dict[str, Any]] | Separation) -> list[Table]:
    """The pair table and the summary of pairs that need attention; no tables with fewer than two FP8/FP4
    strategies in the run."""
    sep = records if isinstance(records, Separation) else separate(records)
    # FP8 before FP4, then by recipe, the harness's own implementation (the oracle) before the libraries'
    names = sorted(sep.recipes, key=lambda s: (sep.recipes[s][0].startswith("fp4"), sep.recipes[s][0],
                                               sep.recipes[s][1] != "own", s))
    if len(names) < 2:
        return []
    rows, flagged = [], []
    for a, b in combinations(names, 2):
        judged, differ = sep.pair(a, b)
        same = sep.same_recipe(a, b)
        kind = f"same recipe ({sep.recipes[a][0]})" if same else "different recipes"
        cases = f"{len(differ)}/{judged}" if judged else "-"
        shown = (_shown(differ) if differ else "no case judged for both" if not judged
                 else "none: they agree" if same else "none: indistinguishable")
        rows.append([a, b, kind, cases, shown])
        if not same and not differ:
            flagged.append([a, b, "no scenario separates them" if judged else "never both judged",
                            f"{judged} cases judged for both"])
        elif same and differ:
            flagged.append([a, b, "implementations of one recipe disagree", f"{len(differ)} of {judged}: "
                            + _shown(differ)])
    pairs = Table("Which scenario separates which recipes", ["strategy A", "strategy B", "pair", "cases differing",
                                                             "separating cases (A / B)"], rows,
                  "FP8/FP4 strategies (compute=fp8|fp4) grouped by recipe (the spec's fp8=); a case separates a pair "
                  "where their outcomes differ, over the cases judged for both (unsupported ones are not)")
    note = (f"{sum(f[2] == 'no scenario separates them' for f in flagged)} pairs of different recipes that no case "
            f"separates; {sum(f[2].startswith('implementations') for f in flagged)} same-recipe pairs that disagree")
    summary = Table("Recipe pairs to look at", ["strategy A", "strategy B", "finding", "evidence"], flagged,
                    note if flagged else "every pair of different recipes is separated by at least one case, and "
                    "every implementation agrees with its recipe's other implementations")
    return [pairs, summary]
