"""Optimizer-state precision: update=sr|kahan and states=8bit, the harness's own recipes against the
libraries (torchao 0.18, torch-optimi 0.3, bitsandbytes), the library replacement of a scenario's
optimizer, the unsupported and not-applicable records, and the BF16 swamping scenario's mechanism.

Factories used through check-model are defined here (``test_recipes_optim:swamped``).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from harness.core import libraries
from harness.core.execution import Execution
from harness.core.libraries import RecipeUnsupported
from harness.values.optim_precision import PrecisionOptimizer, fp32_to_bf16_sr, kahan_add_, optimizer_recipe
from harness.values.optim_states import dynamic_map, quantize, quantize_8bit
from harness.core.scenario import Case, discover, seed_generator
from harness.core.strategy import PRESETS, parse, support
from harness.run.engine import run_case
from harness.run.reference import ReferenceCache
from harness.run.training import make_optimizer

CPU = torch.device("cpu")
needs = {lib: pytest.mark.skipif(not libraries.installed(lib), reason=f"{lib} is not installed")
         for lib in libraries.LIBRARIES}


def _grid(n: int, lo: float, g: torch.Generator, bits: int = 7) -> torch.Tensor:
    """n positive values in [lo, 2*lo) with `bits` fraction bits: exact in BF16."""
    return (1.0 + torch.randint(0, 2**bits, (n,), generator=g).double() / 2**bits).float() * lo


# -- stochastic rounding ----------------------------------------------------------------------------------
def test_sr_is_torchaos_bit_for_bit_on_the_same_random_stream() -> None:
    from torchao.optim.quant_utils import _fp32_to_bf16_sr
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-20, 20, (4096,), generator=g).float())
    torch.manual_seed(11)
    theirs = _fp32_to_bf16_sr(x)
    ours = fp32_to_bf16_sr(x, torch.Generator().manual_seed(11))
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    assert not torch.equal(ours, x.bfloat16())  # it is not round to nearest


def test_sr_is_unbiased_and_rounds_up_as_often_as_torchao() -> None:
    """x = 1 + f * 2^-7 (f a fraction of a BF16 ulp at 1): rounded up with probability exactly f."""
    from torchao.optim.quant_utils import _fp32_to_bf16_sr
    fracs = torch.tensor([1 / 16, 1 / 4, 1 / 2, 3 / 4, 0.0])
    draws = 20000
    x = (1.0 + fracs * 2.0**-7).repeat(draws, 1)
    ours = fp32_to_bf16_sr(x, torch.Generator().manual_seed(0)).float()
    torch.manual_seed(1)
    theirs = _fp32_to_bf16_sr(x).float()
    for out in (ours, theirs):
        assert set(out.unique().tolist()) <= {1.0, 1.0 + 2.0**-7}  # never more than one ulp away
        up = (out > 1.0).double().mean(0)
        sigma = (fracs.double() * (1 - fracs.double()) / draws).sqrt()
        assert ((up - fracs.double()).abs() <= 5 * sigma + 1e-12).all(), (up, fracs)
        assert out[:, -1].eq(1.0).all()  # an exact BF16 value is never moved
    # E[sr(x)] = x: the mean of the draws is x within 5 sigma of the mean
    mean_err = (ours.double().mean(0) - x[0].double()).abs()
    assert (mean_err <= 5 * sigma * 2.0**-7 + 1e-12).all()
    up_ours, up_theirs = (ours > 1).double().mean(0), (theirs > 1).double().mean(0)
    assert ((up_ours - up_theirs).abs() <= 5 * math.sqrt(2) * sigma + 1e-12).all()


def test_sr_keeps_nan_and_inf() -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.0])
    out = fp32_to_bf16_sr(x, torch.Generator().manual_seed(0))
    assert out[0].isnan() and out[1] == math.inf and out[2] == -math.inf and out[3] == 3.0


# -- Kahan ------------------------------------------------------------------------------------------------
@needs["optimi"]
@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_kahan_is_optimis_sgd_bit_for_bit(momentum: float) -> None:
    """Weights in [1, 2), gradients and lr on a binary grid (every FP32 step exact): the emulation around
    torch's SGD and optimi's SGD(kahan_sum=True) hold the same weights and compensations, bit for bit, for
    300 steps, though each update is below half a BF16 ulp. With momentum they differ in one place: optimi
    steps with the momentum already rounded to BF16, the emulation (as torchao's optimizers) with the FP32
    value it then stores rounded; the weights then agree within 1% of the drift."""
    import optimi
    g = torch.Generator().manual_seed(5)
    w0 = _grid(512, 1.0, g).bfloat16()
    grads = [(_grid(512, 1.0, g) * torch.where(torch.rand(512, generator=g) < 0.3, -1.0, 1.0)).bfloat16()
             for _ in range(8)]
    ours_p, theirs_p = w0.clone(), w0.clone()
    ours = PrecisionOptimizer(lambda ps: torch.optim.SGD(ps, lr=2.0**-12, momentum=momentum), [ours_p], "kahan")
    theirs = optimi.SGD([theirs_p], lr=2.0**-12, momentum=momentum, kahan_sum=True, foreach=False, triton=False)
    for step in range(300):
        ours_p.grad, theirs_p.grad = grads[step % 8].clone(), grads[step % 8].clone()
        ours.step()
        theirs.step()
        if momentum == 0:
            assert torch.equal(ours_p.view(torch.int16), theirs_p.view(torch.int16)), step
            assert torch.equal(ours.comps[0].view(torch.int16),
                               theirs.state[theirs_p]["kahan_comp"].view(torch.int16)), step
    assert not torch.equal(ours_p, w0)  # the weights moved: the updates were not swamped
    drift = theirs_p.double() - w0.double()
    assert float((ours_p.double() - theirs_p.double()).norm() / drift.norm()) <= (0.0 if momentum == 0 else 0.01)


@needs["optimi"]
def test_kahan_adamw_follows_optimi_within_the_state_rounding() -> None:
    """AdamW is not bit for bit: optimi keeps BF16 states and rounds every operation of the step to BF16
    (debiased betas), the emulation runs torch's AdamW in FP32 and stores its states in BF16. The
    compensated weights follow FP32's drift within 1% (emulation) and 10% (optimi), each other within 10%."""
    import optimi
    g = torch.Generator().manual_seed(2)
    w0 = _grid(4096, 1.0, g)
    grads = [torch.randn(4096, generator=g) for _ in range(16)]
    p32, pk, po = w0.clone(), w0.bfloat16(), w0.bfloat16()
    ref = torch.optim.AdamW([p32], lr=2.0**-10, weight_decay=0.01)
    ours = PrecisionOptimizer(lambda ps: torch.optim.AdamW(ps, lr=2.0**-10, weight_decay=0.01), [pk], "kahan")
    theirs = optimi.AdamW([po], lr=2.0**-10, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, kahan_sum=True)
    for step in range(128):
        gr = grads[step % 16]
        p32.grad, pk.grad, po.grad = gr.clone(), gr.bfloat16(), gr.bfloat16()
        ref.step(), ours.step(), theirs.step()
    # the compensated weights p + c (what Kahan's sum tracks; the stored p is within half an ulp of it)
    d32 = p32 - w0
    dk = pk.float() + ours.comps[0].float() - w0
    do = po.float() + theirs.state[po]["kahan_comp"].float() - w0
    errs = [float((d - d32).norm() / d32.norm()) for d in (dk, do, dk - do + d32)]
    # measured: 0.4% and 6.1%: optimi's BF16 arithmetic (sqrt(v), + eps, m / denominator each rounded to BF16)
    # costs more than storing FP32 results in BF16
    assert errs[0] < 0.01 and errs[1] < 0.1 and errs[2] < 0.1, errs
    assert float((pk.float() - w0).norm()) > 0.5 * float(d32.norm())  # not stalled


def test_kahan_add_keeps_what_the_weight_cannot_take() -> None:
    p = torch.ones(1, dtype=torch.bfloat16)
    comp = torch.zeros_like(p)
    for _ in range(64):  # 64 updates of 2^-12: each below half an ulp (2^-8) at 1, together 2^-6
        kahan_add_(p, comp, torch.tensor([2.0**-12]))
    assert float(p) + float(comp) == 1 + 2.0**-6 and float(p) == 1 + 2.0**-6


# -- 8-bit states -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("signed", [True, False])
def test_8bit_quantization_is_torchaos_bit_for_bit(signed: bool) -> None:
    from torchao.optim.quant_utils import create_dynamic_map
    from torchao.optim.subclass_8bit import OptimState8bit
    assert torch.equal(dynamic_map(signed), torch.tensor(create_dynamic_map(signed), dtype=torch.float32))
    g = torch.Generator().manual_seed(9)
    x = torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(-30, 5, (64, 256), generator=g).float())
    x[3, 7], x[5, 1], x[9, :], x[11, 3] = float("nan"), float("inf"), 0.0, -float("inf")
    x = x if signed else x.abs()
    st = OptimState8bit.zeros(x.shape, signed, 256, "cpu", dtype=torch.float32)
    st.copy_(x)
    codes, scale = quantize(x, dynamic_map(signed))
    assert torch.allclose(scale, st.scale, rtol=0, atol=0, equal_nan=True)
    finite = torch.isfinite(x).view(64, 256).all(-1).repeat_interleave(256).view(x.shape)
    assert torch.equal(codes[finite], st.codes[finite])
    ours, theirs = quantize_8bit(x, signed), st.dequantize()
    assert torch.equal(ours.nan_to_num(7.0), theirs.nan_to_num(7.0))
    assert not torch.equal(ours[finite], x[finite])  # 8 bits lose something
    small = torch.randn(255 * 16)
    assert quantize_8bit(small, True) is small  # under 4096 entries a state stays as it is


@needs["torchao"]
def test_8bit_states_adamw_follow_torchaos_adamw8bit() -> None:
    """The emulation (torch's AdamW in FP32, states quantized after each step) against torchao's AdamW8bit:
    the quantization is the same, the arithmetic of the step differs (lerp against mul/addcmul for the
    second moment): the weights agree to 1e-3 of the drift after 32 steps, far inside the 8-bit error."""
    import torchao.optim as tao
    g = torch.Generator().manual_seed(4)
    w0 = torch.randn(64, 256, generator=g)
    grads = [torch.randn(64, 256, generator=g) for _ in range(8)]
    p32, pe, pt = w0.clone(), w0.clone(), w0.clone()
    ref = torch.optim.AdamW([p32], lr=1e-2)
    ours = PrecisionOptimizer(lambda ps: torch.optim.AdamW(ps, lr=1e-2), [pe], states="8bit")
    theirs = tao.AdamW8bit([pt], lr=1e-2)
    with torch.compiler.set_stance("force_eager"):
        for step in range(32):
            gr = grads[step % 8]
            p32.grad, pe.grad, pt.grad = gr.clone(), gr.clone(), gr.clone()
            ref.step(), ours.step(), theirs.step()
    d32, de, dt = p32 - w0, pe - w0, pt - w0
    assert float((de - dt).norm() / dt.norm()) < 1e-3
    err = float((de - d32).norm() / d32.norm())
    assert 1e-4 < err < 0.05  # the 8-bit states change the drift, within a few percent


# -- the library replaces the scenario's optimizer ---------------------------------------------------------
def _built(spec: str, make, params):
    ex = Execution(parse(spec), CPU)
    return ex, make_optimizer(ex, make, params)


@needs["torchao"]
def test_torchao_sr_takes_the_scenarios_hyperparameters() -> None:
    import torchao.optim as tao
    p = [torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))]
    ex, opt = _built("torchao-bf16-sr", lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.8, 0.95), eps=1e-6,
                                                                       weight_decay=0.1), p)
    inner = opt.inner.inner  # CountingOptimizer -> eager wrapper on the CPU -> torchao's optimizer
    assert isinstance(inner, tao._AdamW) and inner.bf16_stochastic_round
    grp = inner.param_groups[0]
    lr32 = float(torch.tensor(0.01, dtype=torch.float32))  # torchao keeps lr as an FP32 tensor
    assert (float(grp["lr"]), grp["betas"], grp["eps"], grp["weight_decay"]) == (lr32, (0.8, 0.95), 1e-6, 0.1)
    assert any("eagerly" in n for n in ex.notes)
    p[0].grad = torch.ones(8, dtype=torch.bfloat16)
    opt.step()
    assert ex.optimizer_recipe_steps == 1 and float(p[0].detach()[0]) != 1.0


@needs["optimi"]
@needs["bnb"]
def test_optimi_and_bnb_take_the_scenarios_hyperparameters() -> None:
    import bitsandbytes as bnb
    import optimi
    p = [torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))]
    _, opt = _built("optimi-bf16-kahan", lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9, weight_decay=0.01), p)
    assert isinstance(opt.inner, optimi.SGD)
    grp = opt.inner.param_groups[0]
    assert (grp["lr"], grp["momentum"], grp["weight_decay"], grp["kahan_sum"]) == (0.5, 0.9, 0.01, True)
    _, opt = _built("optimi-bf16-kahan", lambda ps: torch.optim.Adam(ps, lr=0.1, betas=(0.5, 0.6), eps=1e-3), p)
    grp = opt.inner.param_groups[0]
    assert isinstance(opt.inner, optimi.Adam) and (grp["beta1"], grp["beta2"], grp["eps"]) == (0.5, 0.6, 1e-3)
    q = [torch.nn.Parameter(torch.ones(4096))]
    _, opt = _built("bnb-bf16-8bit-states", lambda ps: torch.optim.AdamW(ps, lr=0.02, weight_decay=0.3), q)
    assert isinstance(opt.inner, bnb.optim.AdamW8bit)
    assert (opt.inner.param_groups[0]["lr"], opt.inner.param_groups[0]["weight_decay"]) == (0.02, 0.3)
    q[0].grad = torch.ones(4096)
    opt.step()
    assert opt.inner.state[q[0]]["state1"].dtype == torch.uint8


@needs["torchao"]
@pytest.mark.parametrize("spec, make, message", [
    ("torchao-bf16-sr", lambda ps: torch.optim.SGD(ps, lr=0.1), "torchao has no SGD"),
    ("torchao-bf16-sr", lambda ps: torch.optim.AdamW(ps, amsgrad=True), "amsgrad=True is not mapped"),
    ("torchao-bf16-8bit-states", lambda ps: torch.optim.Adam(ps, weight_decay=0.1), "L2 weight decay"),
    ("torchao-bf16-sr", lambda ps: torch.optim.RMSprop(ps), "RMSprop has no library equivalent"),
])
def test_an_optimizer_without_equivalent_is_unsupported(spec: str, make, message: str) -> None:
    dtype = PRESETS[spec].params
    p = [torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32))]
    with pytest.raises(RecipeUnsupported, match=message):
        _built(spec, make, p)


def test_support_reasons(monkeypatch) -> None:
    assert support(parse("bf16-pure,update=sr,lib=optimi"), CPU)[1] == \
        "lib=optimi has no sr recipe (libraries that have it: none, torchao)"
    assert "FP16 parameters: use update=kahan" in support(parse("fp16-pure,update=sr"), CPU)[1]
    assert support(parse("bf16-master,states=8bit"), CPU)[0]
    assert support(PRESETS["torchao-fp8-tensorwise"], CPU)[0]  # torchao's float8 recipes are driven too
    monkeypatch.setattr(libraries, "version", lambda lib: None)
    ok, why, _ = support(PRESETS["bnb-bf16-8bit-states"], CPU)
    assert not ok and why.startswith("bitsandbytes is not installed: pip install 'bitsandbytes>=")
    assert optimizer_recipe(PRESETS["bf16"]) is None and optimizer_recipe(PRESETS["bf16-sr"]) == "update=sr"


def test_a_state_of_a_torch_optimizer_is_kept_in_bf16_under_update_sr() -> None:
    p = torch.full((16,), 1.5, dtype=torch.bfloat16)
    opt = PrecisionOptimizer(lambda ps: torch.optim.Adam(ps, lr=1e-3), [p], "sr", generator=torch.Generator())
    p.grad = torch.full((16,), 1.0 + 2.0**-7, dtype=torch.bfloat16)
    opt.step()
    m = opt.state[opt.param_groups[0]["params"][0]]["exp_avg"]
    assert m.dtype == torch.float32 and torch.equal(m, m.bfloat16().float())  # FP32 storage, BF16 values
    assert float(m[0]) != 0.1 * (1.0 + 2.0**-7)  # the FP32 value was rounded


# -- the engine: records ----------------------------------------------------------------------------------
def _record(name: str, params: dict, strategy: str) -> dict:
    case = Case(discover().get(name), params, 0)
    inputs = case.scenario.inputs(params, seed_generator(case))
    rec, _ = run_case(case, PRESETS[strategy], CPU, inputs, _REFS)
    return rec


_REFS = ReferenceCache()


@pytest.mark.parametrize("strategy, outcome", [
    ("bf16-pure", "diverged"), ("bf16-sr", "pass"), ("bf16-kahan", "pass"), ("bf16-8bit-states", "pass"),
    ("optimi-bf16-kahan", "pass"), ("torchao-bf16-sr", "pass"), ("bnb-bf16-8bit-states", "pass")])
def test_bf16_update_swamping_records(strategy: str, outcome: str) -> None:
    lib = PRESETS[strategy].lib
    if lib != "none" and not libraries.installed(lib):
        pytest.skip(f"{lib} is not installed")
    rec = _record("bf16_update_swamping", {"log2_lr": -13}, strategy)
    assert rec["outcome"] == outcome, rec["reason"]
    m = rec["metrics"]
    if strategy == "bf16-pure":
        assert m["absorbed_frac"] == 1.0 and m["drift_ratio"] == 0.0 and m["rel_err"] == 1.0
        assert rec["expected"]["outcome"] == "diverged"
    elif PRESETS[strategy].update != "nearest":
        assert m["absorbed_frac"] > 0.9  # most steps leave the stored weight where it was ...
        assert abs(m["drift_ratio"] - 1) < 0.03  # ... and yet the weights follow FP32's drift


def test_a_scenario_without_optimizer_step_records_not_applicable() -> None:
    scen = discover().get("update_swamping")  # SGD: no state, so 8-bit states have nothing to act on
    rec = _record("update_swamping", scen.params("quick")[0], "bf16-8bit-states")
    assert rec["outcome"] == "unsupported" and rec["reason"].startswith("not applicable: scenario update_swamping")
    red = next(s for s in discover() if s.family == "reduction")
    rec = _record(red.name, red.params("quick")[0], "bf16-sr")
    assert rec["outcome"] == "unsupported"
    assert "takes no optimizer step that moves a weight, so update=sr has nothing to act on" in rec["reason"]


# -- the mechanism ----------------------------------------------------------------------------------------
def _sgd_drift(update: str, rows: int, steps: int = 256, dw: float = 2.0**-12) -> torch.Tensor:
    """Weights at 1 under a fixed SGD update dw < half a BF16 ulp (2^-8): the final drift per weight."""
    p = torch.ones(rows, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    opt = PrecisionOptimizer(lambda ps: torch.optim.SGD(ps, lr=dw), [p], update, generator=gen) \
        if update != "nearest" else torch.optim.SGD([p], lr=dw)
    for _ in range(steps):
        p.grad = torch.full_like(p, -1.0)
        opt.step()
    return p.double() - 1.0


def test_swamping_mechanism_stall_sr_unbiased_kahan_bounded() -> None:
    steps, dw = 256, 2.0**-12
    exact = steps * dw  # 2^-4: FP32 keeps every update
    assert torch.equal(_sgd_drift("nearest", 64), torch.zeros(64, dtype=torch.float64))  # w + dw == w: stall
    kahan = _sgd_drift("kahan", 64)
    assert float((kahan - exact).abs().max()) <= 2.0**-8  # within half a BF16 ulp of FP32's weight
    # SR: each weight ends a random walk of variance steps*dw*ulp around the exact drift; the error of the
    # mean over N weights shrinks like 1/sqrt(N)
    sigma = math.sqrt(steps * dw * 2.0**-7)
    errs = {}
    for n in (16, 4096):
        sr = _sgd_drift("sr", n)
        errs[n] = abs(float(sr.mean()) - exact)
        assert errs[n] <= 5 * sigma / math.sqrt(n)
    assert errs[4096] < errs[16] or errs[16] < 1e-9
    assert float(_sgd_drift("sr", 4096).std()) > 0.5 * sigma  # and it is a random walk, not a rounding trick


# -- check-model on a user's model ---------------------------------------------------------------------------
def swamped() -> dict:
    """A linear layer with weights in [1, 2) and a loss linear in them (a fixed gradient): AdamW's updates
    (lr 2^-9) sit below half a BF16 ulp (2^-8) of every weight."""
    g = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(256, 16, bias=False)
    with torch.no_grad():
        model.weight.copy_(_grid(4096, 1.0, g).view(16, 256))
    x = torch.ones(1, 256)
    return {"model": model, "batch": lambda i: (x,), "loss": lambda m, b: m(b[0]).float().sum(),
            "optimizer": lambda ps: torch.optim.AdamW(ps, lr=2.0**-9, weight_decay=0.0)}


def test_check_model_bf16_sr_and_kahan_pass_where_bf16_pure_stalls(tmp_path: Path) -> None:
    from harness.models.model_check import check_model
    res = check_model("test_recipes_optim:swamped", ["fp32", "bf16-pure", "bf16-sr", "bf16-kahan"], steps=128,
                      device="cpu", out=tmp_path / "run", diagnose=False)
    out = {r["strategy"]: r for r in res.records}
    assert {k: r["outcome"] for k, r in out.items()} == \
        {"fp32": "pass", "bf16-pure": "diverged", "bf16-sr": "pass", "bf16-kahan": "pass"}, \
        {k: r["reason"] for k, r in out.items()}
    assert out["bf16-pure"]["metrics"]["updates_lost"] > 0.99  # (a few BF16-rounded first steps reach half an ulp)
    assert out["bf16-kahan"]["metrics"]["updates_unmoved"] > 0.5 and "updates_lost" not in out["bf16-kahan"]["metrics"]


# -- CUDA: the libraries' GPU paths ----------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("strategy", ["bf16-sr", "bf16-kahan", "torchao-bf16-sr", "optimi-bf16-kahan",
                                      "bf16-8bit-states", "torchao-bf16-8bit-states", "bnb-bf16-8bit-states"])
def test_cuda_recipes_follow_fp32_on_bf16_swamping(strategy: str) -> None:
    lib = PRESETS[strategy].lib
    if lib != "none" and not libraries.installed(lib):
        pytest.skip(f"{lib} is not installed")
    case = Case(discover().get("bf16_update_swamping"), {"log2_lr": -13}, 0)
    inputs = case.scenario.inputs(case.params, seed_generator(case))
    dev = torch.device("cuda")
    rec, _ = run_case(case, PRESETS[strategy], dev, {k: v.to(dev) for k, v in inputs.items()}, ReferenceCache())
    assert rec["outcome"] == "pass", rec["reason"]
    assert abs(rec["metrics"]["drift_ratio"] - 1) < 0.03


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sr_and_8bit_match_torchao_on_the_gpu() -> None:
    from torchao.optim.quant_utils import _fp32_to_bf16_sr
    from torchao.optim.subclass_8bit import OptimState8bit
    dev = torch.device("cuda")
    x = torch.randn(64, 256, device=dev) * 3
    torch.cuda.manual_seed(5)
    theirs = _fp32_to_bf16_sr(x)
    ours = fp32_to_bf16_sr(x, torch.Generator(device=dev).manual_seed(5))
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))
    st = OptimState8bit.zeros(x.shape, True, 256, dev, dtype=torch.float32)
    st.copy_(x)
    assert torch.equal(quantize_8bit(x, True), st.dequantize())


def test_sr_runs_reproduce_from_the_case_seed_and_leave_the_global_stream_alone() -> None:
    scen = discover().get("bf16_update_swamping")
    params = {"log2_lr": -13}
    inputs = scen.inputs(params, seed_generator(Case(scen, params, 0)))

    def run(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed)  # as the engine seeds every run from its case
        out = scen.run(Execution(PRESETS["bf16-sr"], CPU), inputs, params)
        return out.value, torch.rand(4)  # the global stream after the run

    (a, after_a), (b, _), (c, _) = run(0), run(0), run(1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    torch.manual_seed(0)
    assert torch.equal(after_a, torch.rand(4))  # SR drew from a generator of its own
