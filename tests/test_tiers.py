"""Tiers: quick and full grids, and the default strategies of each tier (the full tier keeps the contract's
presets so that the default GPU run stays within its time budget; ``recipes`` and ``all`` add the rest)."""
from __future__ import annotations

import pytest

from harness.core.scenario import TIERS, discover
from harness.core.strategy import CONTRACT_PRESETS, PRESETS, tier_presets
from harness.run.engine import select_matrix


def test_each_tier_has_its_default_strategies() -> None:
    assert TIERS == ("quick", "full", "recipes", "all")
    assert tier_presets("quick") == tier_presets("all") == list(PRESETS)
    assert tier_presets("full") == list(CONTRACT_PRESETS) and set(CONTRACT_PRESETS) <= set(PRESETS)
    recipes = tier_presets("recipes")
    assert recipes[0] == "bf16" and {"fp8-tensorwise", "fp8-delayed", "fp8-rowwise", "fp8-blockwise", "mxfp8",
                                     "mxfp4", "nvfp4", "torchao-fp8-rowwise"} <= set(recipes)
    assert all(PRESETS[n].compute in ("fp8", "fp4") for n in recipes[1:])


@pytest.mark.parametrize("tier", TIERS)
def test_select_matrix_uses_the_tiers_strategies_unless_given(tier: str) -> None:
    _, chosen, _ = select_matrix(tier, "cpu", [])
    assert [s.name for s in chosen] == tier_presets(tier)
    _, given, _ = select_matrix(tier, "cpu", ["bf16"])
    assert [s.name for s in given] == ["bf16"]


def test_the_grids_quick_or_full_and_an_unknown_tier() -> None:
    s = discover().get("fp8_amax_spike")
    assert s.params("quick") == [{"log2_spike": 8}]
    assert s.params("full") == s.params("recipes") == s.params("all") == [{"log2_spike": 4}, {"log2_spike": 8}]
    with pytest.raises(ValueError, match="unknown tier 'huge'; tiers: quick, full, recipes, all"):
        select_matrix("huge", "cpu", [])
