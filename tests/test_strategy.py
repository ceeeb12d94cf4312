"""Strategies: presets and the grammar round-trip, malformed specs name what is wrong, device support."""
from __future__ import annotations

import itertools
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from harness.core.scaling import ScalerSpec
from harness.core.strategy import (APPLY, COMPUTE, FP8_RECIPES, PARAMS, PRESETS, REDUCTION, Strategy, parse, resolve,
                              support)

CONTRACT = ("fp32", "tf32", "fp16", "fp16-static", "fp16-dynamic", "fp16-gradscaler", "fp16-pure", "fp16-master",
            "bf16", "bf16-pure", "bf16-master", "fp8-tensorwise", "fp8-delayed")


def test_preset_names_are_the_contract() -> None:
    assert tuple(PRESETS)[:len(CONTRACT)] == CONTRACT  # the recipes added later follow the contract's names
    assert all(p.name == n for n, p in PRESETS.items())


def test_specs_written_before_the_optional_keys_read_the_same() -> None:
    # lib, update, states and compile print only where they differ from their default
    assert "lib=" not in str(PRESETS["fp8-tensorwise"]) and "compile" not in str(PRESETS["bf16"])
    assert str(PRESETS["torchao-fp8-rowwise"]).endswith(",fp8=rowwise,lib=torchao")
    assert parse(str(PRESETS["fp8-tensorwise"]) + ",lib=none") is PRESETS["fp8-tensorwise"]


def test_a_preset_takes_overrides() -> None:
    s = parse("fp8-rowwise,compile=yes")
    assert s.compile and s.fp8 == "rowwise" and s.label == "fp8-rowwise,compile=yes"
    assert parse(str(s)) == s and str(s).endswith("fp8=rowwise,compile=yes")
    assert parse("fp8-rowwise,compile=no") is PRESETS["fp8-rowwise"]  # an override that changes nothing
    with pytest.raises(ValueError, match="given twice"):
        parse("bf16,compile=yes,compile=no")
    with pytest.raises(ValueError, match="unknown strategy key"):
        parse("bf16,compiled=yes")


def test_blockwise_promotion_interval_is_a_spec_parameter() -> None:
    assert PRESETS["fp8-blockwise"].promote == 128 and PRESETS["fp8-blockwise"].recipe == "blockwise"
    assert parse("compute=fp8,fp8=blockwise(0)").promote == 0
    assert parse("compute=fp8,fp8=blockwise") is PRESETS["fp8-blockwise"]
    for bad in ("compute=fp8,fp8=blockwise(x)", "compute=fp8,fp8=rowwise(4)", "compute=fp8,fp8=mxfp4",
                "compute=fp4,fp8=rowwise", "compute=bf16,params=fp32,update=sr"):
        with pytest.raises(ValueError):
            parse(bad)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_round_trips_and_keeps_its_name(name: str) -> None:
    p = PRESETS[name]
    text = str(p)
    back = parse(text)
    assert back == p and back.name == name  # a spec equal to a preset is that preset
    assert str(back) == text and parse(name) is p


def test_canonical_spec_strings() -> None:
    assert str(PRESETS["fp32"]) == "compute=fp32,apply=autocast,params=fp32,master=no,scaler=none,reduction=fp32,fp8=none"
    assert str(PRESETS["fp16-static"]) == ("compute=fp16,apply=autocast,params=fp32,master=no,scaler=static(2^10),"
                                           "reduction=fp32,fp8=none")
    assert str(PRESETS["bf16-master"]).startswith("compute=bf16,apply=cast,params=bf16,master=yes,scaler=none")
    assert PRESETS["fp16-gradscaler"].scaler.kind == "gradscaler"


def _all_strategies() -> list[Strategy]:
    scalers = [ScalerSpec("none"), ScalerSpec("static", init=1024), ScalerSpec("dynamic", interval=7, hysteresis=2),
               ScalerSpec("gradscaler", init=2.0**10)]
    out = []
    for c, a, p, m, s, r, f, x in itertools.product(COMPUTE, APPLY, PARAMS, (False, True), scalers, REDUCTION,
                                                    FP8_RECIPES + ("blockwise(0)",),
                                                    (("none", "nearest", "param", False), ("torchao", "sr", "8bit", True),
                                                     ("optimi", "kahan", "param", True))):
        try:
            out.append(Strategy(c, a, p, m, s, r, f, *x))
        except ValueError:
            pass
    return out


def test_the_grammar_round_trips_every_valid_combination() -> None:
    every = _all_strategies()
    assert len(every) > 300
    for s in every:
        text = str(s)
        back = parse(text)
        assert back == s and str(back) == text, text


def test_apply_cast_defaults_params_to_the_compute_format() -> None:
    assert parse("compute=bf16,apply=cast") == PRESETS["bf16-pure"]
    assert parse("compute=fp8,apply=cast,fp8=delayed").params == "bf16"


def test_derived_properties() -> None:
    assert (PRESETS["fp8-delayed"].format.name, PRESETS["fp8-delayed"].activation_format) == ("fp8_e5m2", "bf16")
    assert (PRESETS["tf32"].format.name, PRESETS["tf32"].activation_format) == ("tf32", "fp32")
    assert [PRESETS[n].reduced for n in ("fp32", "tf32", "bf16")] == [False, True, True]
    assert PRESETS["fp16"].label == "fp16" and parse("compute=fp16,scaler=static(8)").label.startswith("compute=fp16")


BAD = [
    ("fp61", "unknown strategy 'fp61'; did you mean fp16"),
    ("compte=fp16", "unknown strategy key 'compte' (did you mean compute?)"),
    ("compute=fp16,compute=bf16", "strategy key 'compute' given twice"),
    ("compute=fp12", "strategy compute='fp12' is not allowed; choose one of fp64, fp32, tf32, fp16, bf16, fp8"),
    ("compute=fp16,apply=jit", "strategy apply='jit' is not allowed"),
    ("compute=fp16,master=maybe", "master='maybe': use yes or no"),
    ("compute=fp16,master=yes", "master=yes keeps FP32 copies"),
    ("compute=fp16,apply=cast,params=bf16", "apply=cast stores parameters in the compute format: set params=fp16"),
    ("compute=fp16,fp8=delayed", "compute=fp8 needs an fp8 recipe"),
    ("compute=fp8", "compute=fp8 needs an fp8 recipe"),
    ("compute=fp16,scaler=static(-1)", "loss scale must be a number from 2^-149 to 3.4e38 (FP32's range: the "
                                       "scale multiplies an FP32 loss), got -1"),
    ("compute=fp16,scaler=dynamic(interval=inf)", "scaler interval must be a whole number from 1 to 2^31-1, got 'inf'"),
    ("compute=fp16,scaler=gradscaler(init=2^200)", "scaler init must be a number from 2^-149 to 3.4e38"),
    ("compute=fp16,scaler=dynamic(init=2^10,init=2^20)", "scaler key 'init' given twice"),
    ("compute=fp16,scaler=static(1)),(", "unbalanced parentheses in strategy spec 'compute=fp16,scaler=static(1)),('"),
    ("compute=fp16),scaler=(static(1", "unbalanced parentheses"),
    ("compute=fp16,scaler=static(1", "unbalanced parentheses in strategy spec 'compute=fp16,scaler=static(1'"),
    ("compute=fp16,scaler=static(1))", "unbalanced parentheses"),
    ("compute=fp16,fast", "strategy spec part 'fast' must be key=value"),
    ("compute=fp16,scaler=dynamic(speed=2)", "unknown scaler key 'speed'"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[b[0] for b in BAD])
def test_malformed_specs_name_the_bad_value(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse(text)


def test_resolve_defaults_to_every_preset_and_drops_duplicates() -> None:
    assert resolve([]) == list(PRESETS.values())
    got = resolve(["fp16", "compute=fp16", "bf16", "fp16"])
    assert [s.label for s in got] == ["fp16", "bf16"]


def test_cpu_support_names_emulation_and_refuses_reduced_reductions() -> None:
    cpu = torch.device("cpu")
    assert support(PRESETS["fp16"], cpu) == (True, "", [])
    ok, why, notes = support(PRESETS["tf32"], cpu)
    assert ok and why == "" and notes == ["tf32 emulated on the CPU: GEMM inputs rounded to 10 fraction bits, "
                                          "FP32 accumulation"]
    ok, _, notes = support(PRESETS["fp8-tensorwise"], cpu)
    assert ok and "fp8 emulated on the CPU" in notes[0]
    ok, why, _ = support(parse("compute=fp16,reduction=reduced"), cpu)
    assert not ok and "reduction=reduced needs cuBLAS" in why
    ok, why, _ = support(PRESETS["fp32"], torch.device("meta"))
    assert not ok and "device type 'meta' is not supported" in why


def test_master_weights_need_16_bit_parameters() -> None:
    with pytest.raises(ValueError, match="needs params=fp16 or bf16"):
        parse("compute=fp64,apply=cast,params=fp64,master=yes")


def test_tensor_core_support_names_the_format_and_the_capability_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from harness.core.strategy import support, tensor_core_support
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (7, 5))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Tesla T4")
    assert tensor_core_support("fp16", "cuda") is None and tensor_core_support("fp32", "cuda") is None
    assert tensor_core_support("bf16", "cuda") == "Tesla T4 (sm_75) has no BF16 Tensor Cores (needs sm_80+)"
    assert tensor_core_support("tf32", "cuda") == "Tesla T4 (sm_75) has no TF32 Tensor Cores (needs sm_80+)"
    # FP8 on a pre-Ampere GPU is refused for FP8, not for BF16; the probes' format name works too
    assert tensor_core_support("fp8", "cuda") == "Tesla T4 (sm_75) has no FP8 Tensor Cores (needs sm_89+)"
    assert tensor_core_support("fp8_e4m3", "cuda") == tensor_core_support("fp8", "cuda")
    ok, why, _ = support(parse("fp8-tensorwise"), torch.device("cuda"))
    assert not ok and "FP8 Tensor Cores (needs sm_89+)" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    assert tensor_core_support("bf16", "cuda") is None
    assert tensor_core_support("fp8", "cuda") == "Tesla T4 (sm_80) has no FP8 Tensor Cores (needs sm_89+)"


_GOOD_SCALERS = ("none", "torch", "apex", "deepspeed", "deepspeed-0.17.0", "megatron", "static(2^10)",
                 "dynamic(apex,interval=8)", "dynamic(min=-0)", "gradscaler(interval=7)")
_BAD_SCALERS = ("static(nan)", "static(1e400)", "dynamic(interval=inf)", "dynamic(hysteresis=nan)",
                "dynamic(init=2^10,init=2^20)", "gradscaler(init=2^200)", "dynamic(interval=2.5)",
                "gradscaler(interval=2^31)", "static(", "dynamic(interval=-inf)", "dynamic(growth=1e400)")
_VALUES = {"compute": COMPUTE, "apply": APPLY, "params": PARAMS, "master": ("yes", "no", "maybe", ""),
           "reduction": REDUCTION, "fp8": FP8_RECIPES}


@given(parts=st.lists(st.sampled_from(list(_VALUES)).flatmap(lambda k: st.sampled_from(_VALUES[k]).map(
    lambda v: f"{k}={v}")), max_size=8),
       scaler=st.sampled_from(_GOOD_SCALERS + _BAD_SCALERS), at=st.integers(0, 8),
       junk=st.sampled_from(["", "", "", ",", "(", ")", ")(", ",,", "=", "compute"]))
def test_any_spec_is_a_strategy_that_round_trips_or_one_value_error(parts: list[str], scaler: str, at: int,
                                                                     junk: str) -> None:
    """Over the grammar (repeated keys, hostile scaler values, stray brackets): either a strategy whose
    string parses back to it, or a ValueError of one line; never another exception, never a bad value
    or a repeated key accepted."""
    parts.insert(min(at, len(parts)), f"scaler={scaler}")
    text = ",".join(parts) + junk
    try:
        s = parse(text)
    except ValueError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert scaler not in _BAD_SCALERS
    assert len({p.split("=", 1)[0] for p in parts}) == len(parts)  # a repeated key never parses
    assert parse(str(s)) == s
