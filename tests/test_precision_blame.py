"""Precision blamed only for what precision did, and a reference that sees the same data.

FP32's own sensitivity to one-ulp perturbations (harness.judge.sensitivity), computational zeros, chaotic
runs, the per-tensor underflow rule, GEMM coverage (HF Conv1D routed), and bit-identical batches for
the FP64 reference. Factories used through check-model are defined here.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from harness.values.emulation import tf32_matmul
from harness.core.execution import Execution, FP64, gemm_coverage, route_linears
from harness.values.formats import FORMATS
from harness.judge.metrics import compare
from harness.models.model_check import check_model
from harness.models.recommend import recommend
from harness.core.scenario import Output
from harness.judge.sensitivity import CHAOTIC, FACTOR, computational_zeros, floors
from harness.core.strategy import PRESETS, parse
from harness.run.training import Trainer
from harness.models.user_model import ModelSpec, RNG_NOTE, _dtype, _perturb, load_spec, train_trajectory
from harness.judge.tolerance import bound
from harness.judge.verdict import judge
from harness.judge.window import scale_window

CPU = torch.device("cpu")
FP16 = FORMATS["fp16"]


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 4))


def randn_batches() -> dict:
    """A healthy 3-layer MLP whose batches are drawn with torch.randn(generator=...) inside ``batch``."""
    torch.manual_seed(0)

    def batch(step: int) -> tuple:
        g = torch.Generator().manual_seed(step)
        return torch.randn(32, 16, generator=g), torch.randn(32, 4, generator=g)

    return {"model": _mlp(), "batch": batch, "loss": lambda m, b: F.mse_loss(m(b[0]), b[1]),
            "optimizer": lambda ps: torch.optim.SGD(ps, lr=0.05)}


# -- the reference sees the same data --------------------------------------------------------------
def test_randn_batches_give_the_fp64_reference_the_same_numbers(tmp_path: Path) -> None:
    """Drawn under FP64's default dtype, randn gives other numbers (FP32 vs FP64 was 0.86); drawn once
    in the factory's dtype and converted, FP32's error against FP64 is rounding."""
    spec = load_spec(randn_batches)
    with _dtype(torch.float64):
        assert not torch.equal(randn_batches()["batch"](0)[0].float(), spec.batch_at(0)[0])  # the old way
        x64 = spec.batch_at(0)[0]
    assert x64.dtype == torch.float32 and torch.equal(x64, randn_batches()["batch"](0)[0])
    result = check_model(randn_batches, ["fp32", "fp16"], steps=4, device="cpu", out=tmp_path / "run",
                         diagnose=False)
    ref = result.records[0]["reference"]
    assert ref["fp32_vs_fp64"] < 2e-5  # rounding over 4 SGD steps (drawn under FP64's dtype it was 0.86)
    assert [r["outcome"] for r in result.records] == ["pass", "pass"]
    assert all(r["metrics"]["inputs_identical"] is True for r in result.records)


def _global_rng_batch(step: int) -> tuple:
    return (torch.randn(4, 8),)  # the global RNG, no generator: what a run consumed must not matter


def test_batches_from_the_global_rng_are_drawn_once_from_their_own_stream() -> None:
    lin = nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.5))  # dropout consumes the global RNG in every run
    spec = ModelSpec("g", lin, _global_rng_batch, lambda m, b: m(b[0]).pow(2).mean())
    a = train_trajectory(Execution(PRESETS["fp32"]), spec, 3)
    torch.randn(1000)  # whatever happened to the global RNG in between
    b = train_trajectory(Execution(PRESETS["fp32"]), spec, 3, seed=0)
    assert torch.equal(a.value, b.value) and sorted(spec.drawn) == [0, 1, 2]
    first = spec.batch_at(0)[0]
    first.mul_(0)  # a loss that writes into its batch changes no later run's
    assert spec.batch_at(0)[0].abs().sum() > 0
    fresh = ModelSpec("g", lin, _global_rng_batch, spec.loss)
    for step in (0, 1):  # the same stream in every process, drawn in step order as runs draw it
        assert torch.equal(fresh.batch_at(step)[0], spec.batch_at(step)[0])


def test_randomness_inside_the_model_is_recorded_as_not_identical() -> None:
    x = torch.ones(4, 8)
    loss = lambda m, b: m(b[0]).pow(2).mean()  # noqa: E731
    plain = ModelSpec("p", nn.Linear(8, 8), lambda i: (x,), loss)
    drop = ModelSpec("d", nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.25)), lambda i: (x,), loss)
    noisy = ModelSpec("n", nn.Linear(8, 8), lambda i: (x,), lambda m, b: (m(b[0]) + torch.randn(4, 8)).pow(2).mean())
    out = {s.name: train_trajectory(Execution(PRESETS["fp32"]), s, 2).extra for s in (plain, drop, noisy)}
    assert out["p"]["inputs_identical"] is True and "inputs_note" not in out["p"]
    for k in ("d", "n"):
        assert out[k]["inputs_identical"] is False and out[k]["inputs_note"] == RNG_NOTE


# -- a tensor that loses all its gradients -----------------------------------------------------------
class AuxModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(64, 256)
        self.head = nn.Linear(256, 64)
        self.aux_head = nn.Linear(256, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.trunk(x))
        return self.head(h), self.aux_head(h)


def aux_head() -> dict:
    """The auxiliary head's loss term is 2^-30: its gradients, ~2^-30 * |h|, are below FP16's 2^-24."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 64, generator=g), torch.randn(16, 64, generator=g)

    def loss(m: nn.Module, b: tuple) -> torch.Tensor:
        main, aux = m(b[0])
        return F.mse_loss(main.float(), b[1]) + 2.0**-30 * aux.float().sum()

    return {"model": AuxModel(), "batch": lambda i: (x, y), "loss": loss,
            "optimizer": lambda ps: torch.optim.SGD(ps, lr=0.01)}


def test_a_tensor_that_loses_all_its_gradients_fails_naming_it(tmp_path: Path) -> None:
    result = check_model(aux_head, ["fp32", "fp16"], steps=2, device="cpu", out=tmp_path / "run", diagnose=False)
    fp32, fp16 = result.records
    assert fp32["outcome"] == "pass"
    m = fp16["metrics"]
    assert m["grad_underflow_by_tensor"]["aux_head.weight"] == 1.0 == m["grad_underflow_by_tensor"]["aux_head.bias"]
    assert 0.0077 < m["grad_underflow_frac"] < 0.01  # 257 of ~33,000 non-zero gradients: within the pooled budget
    assert fp16["outcome"] == "underflow"
    assert fp16["reason"].startswith("gradient of `aux_head.") and "100% of its non-zero values" in fp16["reason"]
    assert "1 more tensors beyond the budget" in fp16["reason"]


def test_per_tensor_rule_in_the_verdict() -> None:
    m = {"grad_underflow_frac": 0.002, "grad_underflow_by_tensor": {"big": 0.001, "aux": 0.5}, "rel_err": 0.0}
    v = judge(m, FP16, n=4)
    assert v.outcome == "underflow" and v.reason.startswith("gradient of `aux`: 50% of its non-zero values")
    m["grad_underflow_by_tensor"] = {"big": 0.001, "aux": 0.0078125}  # 2^-7 < 1%: within the budget
    assert judge(m, FP16, n=4).outcome == "pass"


# -- FP32's own sensitivity, computational zeros, chaos -------------------------------------------
def test_perturbation_moves_every_weight_exactly_one_ulp() -> None:
    for preset in ("fp32", "bf16-master"):  # one ulp of the storage format; a master copy moves with its weight
        trainer = Trainer(Execution(PRESETS[preset]), nn.Linear(64, 64))
        before = trainer.params[0].detach().clone()
        _perturb(trainer, 0)
        after = trainer.params[0].detach()
        up = after > before
        inf = torch.where(up, math.inf, -math.inf).to(before.dtype)
        assert torch.equal(after, torch.nextafter(before, inf)) and 0.4 < up.float().mean() < 0.6
        if trainer.master is not None:
            assert torch.equal(trainer.master[0], after.float())


def testcomputational_zeros_are_entries_with_no_significant_bit() -> None:
    g32 = {"w": torch.tensor([1.0, 2.0**-30, 0.0, 0.0, -0.5])}
    other = {"w": torch.tensor([1.0 + 2.0**-20, -(2.0**-30), 0.0, 2.0**-40, -0.5 + 2.0**-3])}
    zeros = computational_zeros(Output(grads=g32), [Output(grads=other)])
    # moved by its own size: no significant bit; 0 in every run: an exact zero; moved by 1/4 of it: kept
    assert zeros.tolist() == [False, True, False, True, False]
    ref = Output(value=torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0]), grads=g32, extra={"computational_zeros": zeros})
    cand = Output(value=torch.tensor([1.0, 9.0, 1.0, -7.0, 1.5]), grads={"w": torch.tensor([1.0, 0, 0, 0, -0.5])})
    m = compare(cand, ref, FP16)
    assert m["rel_err"] == 0.5 / math.sqrt(3) and m["rel_err_all"] > 5 and m["computational_zeros"] == 2
    assert m["grad_underflow_by_tensor"] == {}  # the lost 2^-30 was rounding noise of a zero gradient


def _sens(chaotic: bool, **errs: float) -> dict:
    return {"runs": 3, "chaotic": chaotic, **errs}


def test_sensitivity_floors_each_metric_and_chaos_is_not_judged() -> None:
    b16 = bound(FP16, 66)  # lambda*sqrt(66)*2^-11, about 1.74e-2
    sens = _sens(False, rel_err=0.015625, loss_divergence=1e-7, grad_rel_err=1e-7)
    assert floors(sens) == {"rel_err": 0.03125, "loss_divergence": 2e-7, "grad_rel_err": 2e-7}
    v = judge({"rel_err": 0.025, "loss_divergence": 1e-3, "grad_rel_err": 1e-3}, FP16, n=66, sensitivity=sens)
    assert v.outcome == "pass" and "within FP32's own sensitivity for rel_err" in v.reason
    assert v.bound == 0.03125 and v.reason.startswith("rel_err 2.50e-02 <= 3.12e-02")
    v = judge({"rel_err": 0.0375, "loss_divergence": 1e-3}, FP16, n=66, sensitivity=sens)
    assert v.outcome == "diverged" and v.reason.startswith("rel_err 3.75e-02 > 3.12e-02 = 2 x FP32's own sensitivity")
    v = judge({"rel_err": 1e-3, "loss_divergence": 0.0234}, FP16, n=66, sensitivity=sens)
    assert v.outcome == "diverged" and v.bound == b16  # a metric FP32 reproduces keeps its format bound
    chaos = _sens(True, rel_err=0.5, loss_divergence=0.0625, grad_rel_err=1e-6)
    v = judge({"rel_err": 1.25, "loss_divergence": 0.25, "grad_rel_err": 0.015}, FP16, n=66, sensitivity=chaos)
    assert v.outcome == "pass" and "not judged (chaotic): rel_err 1.25e+00, loss_divergence 2.50e-01" in v.reason
    assert "; chaotic: FP32 itself, from weights one ulp apart, reaches rel_err 0.5, loss_divergence 0.062" in v.reason
    assert v.bound == b16  # the margin is grad_rel_err's, the one metric judged
    v = judge({"rel_err": 1.25, "grad_rel_err": 0.03}, FP16, n=66, sensitivity=chaos)  # gradients at the same weights
    assert v.outcome == "diverged" and v.reason.startswith("grad_rel_err 3.00e-02 >") and "chaotic" in v.reason
    v = judge({"rel_err": 1.25, "loss_divergence": 0.25}, FP16, n=66, sensitivity=chaos)  # nothing else compared
    assert v.outcome == "unsupported" and v.reason.startswith("not judged: the run is too chaotic") and v.margin is None
    assert CHAOTIC == 0.1 and FACTOR == 2.0


def _record(strategy: str, outcome: str, sens: dict) -> dict:
    return {"strategy": strategy, "strategy_spec": str(PRESETS[strategy]), "outcome": outcome, "reason": "",
            "metrics": {"loss_divergence": 0.25}, "bound": 0.1, "reference": {"fp32_sensitivity": sens}}


def test_a_chaotic_run_is_not_blamed_on_reduced_precision() -> None:
    window = scale_window({"w": torch.tensor([2.0**-10, 1.0])})
    chaos = _sens(True, rel_err=0.5, loss_divergence=0.09)
    recs = [_record("fp32", "pass", chaos), _record("fp16", "diverged", chaos), _record("bf16", "diverged", chaos)]
    line = recommend(recs, window, {})
    assert line.startswith("none can be judged at this horizon (chaotic: FP32 itself") and "fewer --steps" in line
    assert "every reduced-precision strategy tried failed" not in line
    calm = _sens(False, rel_err=1e-6, loss_divergence=1e-7)
    recs = [_record("fp32", "pass", calm), _record("fp16", "diverged", calm), _record("bf16", "diverged", calm)]
    assert recommend(recs, window, {}).startswith("fp32: every reduced-precision strategy tried failed")
    # nothing reduced was judged (unsupported here): no strategy failed, so none is said to have
    recs = [_record("fp32", "pass", calm), _record("torchao-fp8-rowwise", "unsupported", calm)]
    assert recommend(recs, window, {}) == ("fp32: no reduced-precision strategy was judged here (torchao-fp8-rowwise: "
                                           "unsupported); check again with one that runs on this device")


def test_resnet18_with_sgd_is_chaotic_not_a_precision_failure(tmp_path: Path) -> None:
    """torchvision's ResNet-18 layout (a quarter of the channels), SGD lr 0.005 momentum 0.9, 8 steps:
    FP32 started one ulp away drifts ~0.5, as far as FP16 does; the record says chaotic, FP16 passes."""
    from examples.resnet18 import factory
    result = check_model(functools.partial(factory, width=16), ["fp32", "fp16", "bf16"], steps=8, device="cpu",
                         out=tmp_path / "run", diagnose=False)
    sens = result.records[0]["reference"]["fp32_sensitivity"]
    assert sens["chaotic"] and sens["rel_err"] >= CHAOTIC and sens["grad_rel_err"] < 1e-4
    for r in result.records:
        assert r["outcome"] == "pass", r["reason"]
        assert "not judged (chaotic): rel_err" in r["reason"] and "chaotic: FP32 itself" in r["reason"]
    assert result.records[1]["metrics"]["rel_err"] > sens["rel_err"] / 10  # FP16 moves as far as FP32 from one ulp
    assert "every reduced-precision strategy tried failed" not in result.recommendation
    assert "chaotic: FP32 itself" in result.recommendation and "CHAOTIC at this horizon" in result.report()


# -- GEMM coverage ---------------------------------------------------------------------------------
class Conv1D(nn.Module):
    """Hugging Face's Conv1D as transformers.pytorch_utils writes it: x @ W + b, W of shape (in, out)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, generator=torch.Generator().manual_seed(3)))
        self.bias = nn.Parameter(torch.full((nf,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.addmm(self.bias, x.reshape(-1, x.size(-1)), self.weight)
        return out.reshape(*x.shape[:-1], self.nf)


def test_conv1d_is_routed_through_the_strategys_gemm() -> None:
    ex = Execution(PRESETS["tf32"], CPU)  # TF32 on the CPU: emulated GEMMs, the routed path
    model = route_linears(nn.Sequential(Conv1D(4, 8)), ex)
    x = 1.0 + torch.arange(48.0).reshape(2, 3, 8) * 2.0**-12  # bits TF32's 10-bit mantissa drops
    y = model(x)
    w, b = model[0].weight, model[0].bias
    assert torch.equal(y, (tf32_matmul(x.reshape(-1, 8), w) + b).reshape(2, 3, 4))
    assert not torch.equal(y, x @ w + b)
    assert gemm_coverage(model, ex) == {"format": "tf32", "covered": 1, "total": 1, "by_type": {"Conv1D": [1, 1]}}


class _BatchedWeights(nn.Module):
    """A Linear and a product with a batched (3-D) parameter, which the FP8 GEMM (2-D operands) cannot take."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 8, 8) / 3)
        self.head = nn.Linear(3 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((x @ self.w).flatten(1))


def test_a_strategy_that_covered_some_gemms_says_so(tmp_path: Path) -> None:
    def model() -> dict:
        torch.manual_seed(0)
        x = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(0))
        return {"model": _BatchedWeights(), "batch": lambda i: (x,), "loss": lambda m, b: m(b[0]).float().pow(2).mean()}

    result = check_model(model, ["fp32", "fp8-tensorwise"], steps=2, device="cpu", out=tmp_path / "run",
                         diagnose=False)
    fp32, fp8 = result.records
    assert fp32["metrics"]["gemm_coverage"]["covered"] == 1 and "GEMM layers" not in fp32["reason"]
    assert fp8["judged_format"].startswith("fp8") and fp8["metrics"]["gemm_coverage"] == {
        "format": "fp8_e5m2", "covered": 1, "total": 2, "by_type": {"Linear": [1, 1], "matmul (functional)": [0, 1]}}
    assert "only 1 of 2 GEMM layers ran in fp8_e5m2 (not: matmul (functional) 0/1)" in fp8["reason"]
    assert "1/2 (matmul (functional) 0/1)" in result.report()


# -- Hugging Face GPT-2 ----------------------------------------------------------------------------
def gpt2() -> dict:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)

    def batch(step: int) -> tuple:
        return (torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(step)),)

    return {"model": model, "batch": batch, "loss": lambda m, b: m(input_ids=b[0], labels=b[0]).loss,
            "optimizer": lambda ps: torch.optim.AdamW(ps, lr=1e-3)}


def test_gpt2_verdicts_do_not_depend_on_the_horizon(tmp_path: Path) -> None:
    """A healthy GPT-2: the same verdicts at 2, 8 and 32 updates. AdamW's first steps on the key biases
    (their gradient is 0 in exact arithmetic; softmax ignores them) are computational zeros, left out of
    the drift; FP8 covers all 9 GEMM layers (8 of them Conv1D)."""
    pytest.importorskip("transformers")
    strategies = ["fp32", "fp16-dynamic", "fp16-gradscaler", "bf16", "fp8-tensorwise"]
    verdicts = {}
    for steps in (2, 8, 32):
        result = check_model(gpt2, strategies, steps=steps, device="cpu", out=tmp_path / f"run{steps}", diagnose=False)
        verdicts[steps] = [r["outcome"] for r in result.records]
        zeros = result.records[0]["reference"]["fp32_sensitivity"]["computational_zeros"]
        assert zeros == {"transformer.h.0.attn.c_attn.bias": 32, "transformer.h.1.attn.c_attn.bias": 32}
        # the FP16 window leaves the key biases' noise out: it was empty ("span 2^44"), set by 1.4e-14
        assert not result.window.empty and "c_attn.bias" not in str(result.window.lo_tensor)
        fp8 = result.records[-1]
        assert fp8["judged_format"].startswith("fp8")
        assert fp8["metrics"]["gemm_coverage"]["by_type"] == {"Conv1D": [8, 8], "Linear": [1, 1]}
    assert verdicts[2] == verdicts[8] == verdicts[32] == ["pass"] * 5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpt2_on_cuda_fp8_covers_conv1d_and_verdicts_hold(tmp_path: Path) -> None:
    """On a GPU: the perturbed FP32 runs (deterministic kernels) and FP8 through torch._scaled_mm for every
    Conv1D (GPT-2's shapes here are multiples of 16); the verdicts agree at 2 and 8 updates."""
    pytest.importorskip("transformers")
    strategies = ["fp32", "fp16-dynamic", "bf16", "fp8-tensorwise"]
    verdicts = {}
    for steps in (2, 8):
        result = check_model(gpt2, strategies, steps=steps, device="cuda", out=tmp_path / f"run{steps}",
                             diagnose=False)
        verdicts[steps] = [r["outcome"] for r in result.records]
        sens = result.records[0]["reference"]["fp32_sensitivity"]
        assert not sens["chaotic"] and sens["grad_rel_err"] < 1e-5
        fp8 = result.records[-1]
        assert fp8["metrics"]["gemm_coverage"]["by_type"] == {"Conv1D": [8, 8], "Linear": [1, 1]}
        assert all(r["metrics"]["inputs_identical"] is True for r in result.records)
    assert verdicts[2] == verdicts[8] == ["pass"] * 4


def test_the_table_shows_the_margin_and_the_coverage() -> None:
    from harness.models.model_check import _row
    cov = {"format": "fp8_e5m2", "covered": 1, "total": 11, "by_type": {"Conv1D": [0, 10], "Linear": [1, 1]}}
    row = _row({"strategy": "fp8-tensorwise", "outcome": "pass", "margin": 0.375, "metrics": {"gemm_coverage": cov}})
    assert row[2] == "0.38" and row[-1] == "1/11 (Conv1D 0/10)"
    assert _row({"strategy": "fp32", "outcome": "pass", "metrics": {}})[2] == "-"  # a record without a margin
