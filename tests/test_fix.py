"""``check-model --fix``: plans found by search and verified by re-run, on models whose failure is known by
construction. Factories used through ``MODULE:FACTORY`` are defined here (pytest puts tests/ on sys.path)."""
from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.cli import main
from harness.core.execution import Execution
from harness.core.keep import to_storage
from harness.core.strategy import PRESETS, parse
from harness.models.fix import fix_model
from harness.models.fix_keep import callable_children, ddmin, param_share
from harness.models.model_check import check_model
from harness.models.plan import Plan, snippet
from harness.results import read_run
from test_diagnose import TwoScales  # the model whose gradients span 2^50, built for the diagnosis tests

CPU = torch.device("cpu")


# -- (a) one layer's activations overflow FP16 -------------------------------------------------------
class Scores(nn.Module):
    """Attention of one head: logits ``q(x) k(x)^T`` pass FP16's 65504 (q multiplies by 2^12, |x| >= 1.5,
    8 dims: each logit >= 8 * 1.5^2 * 2^12 = 73728), though q(x), k(x) and the output are in range."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
        with torch.no_grad():
            for lin, gain in ((self.q, 2.0**12), (self.k, 1.0)):
                lin.weight.copy_(torch.eye(8) * gain)
                lin.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.q(x) @ self.k(x).transpose(-1, -2)
        return torch.softmax(logits, dim=-1) @ self.v(x)


class AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        with torch.no_grad():  # the identity: the attention sees the batch as it is
            self.inp.weight.copy_(torch.eye(8))
            self.inp.bias.zero_()
        self.attn = Scores()
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.attn(self.inp(x)))


def attention() -> dict:
    torch.manual_seed(0)  # the same weights in every process that calls the factory
    x = 1.5 + torch.rand(6, 8, generator=torch.Generator().manual_seed(0))
    t = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    return {"model": AttnNet(), "batch": lambda i: (x, t),
            "loss": lambda m, b: (m(b[0]).float() - b[1]).pow(2).mean()}


def _fix(factory, strategies: list[str], tmp_path: Path, steps: int = 3):
    result = check_model(factory, strategies, steps=steps, device="cpu", out=tmp_path / "run")
    return result, fix_model(factory, result, "cpu")


@pytest.fixture(scope="module")
def attention_check(tmp_path_factory: pytest.TempPathFactory):
    """check-model's run of the attention model (shared: the two tests below search it differently)."""
    return check_model(attention, ["fp16", "bf16"], steps=3, device="cpu", out=tmp_path_factory.mktemp("attn") / "run")


def test_overflowing_attention_is_kept_in_fp32_and_nothing_else(attention_check) -> None:
    result = attention_check
    assert [r["outcome"] for r in result.records] == ["overflow", "pass"]
    rep = fix_model(attention, result, "cpu")
    (fix,) = rep.fixes
    assert fix.verified and fix.plan is not None
    assert fix.plan.keep_high_precision == ("attn",)  # the block whose own matmul overflows, not q, k or v
    assert (fix.plan.change, fix.plan.keep_format, parse(fix.plan.strategy_spec)) == ("keep", "fp32", PRESETS["fp16"])
    assert fix.record is not None and fix.record["outcome"] == "pass" and fix.record["strategy"] == "fp16+fix"
    # the re-run is a run directory of its own, judged like check-model's (same scenario name and reference)
    header, records = read_run(fix.run_dir)
    assert [r["outcome"] for r in records] == ["pass"] and records[0]["scenario"] == result.records[0]["scenario"]
    assert records[0]["metrics"]["final_loss_ref"] == result.records[0]["metrics"]["final_loss_ref"]
    assert "loss scaler: not tried: the forward pass overflows at `attn`" in fix.tried[0]
    text = rep.report()
    assert "keep `attn` in FP32" in text and "torch.autocast('cpu', enabled=False)" in text
    saved = json.loads((result.out / "fix.json").read_text())["fixes"]["fp16"]
    assert Plan.from_dict(saved["plan"]) == fix.plan and saved["verdict"]["outcome"] == "pass"


def test_without_a_diagnosis_delta_debugging_shrinks_to_the_attention(attention_check) -> None:
    """No diagnosis to start from: the top of the module tree is kept (that passes), ddmin drops ``inp`` and
    ``out``, and keeping only ``attn``'s children (without its own q k^T) overflows: ``attn`` stays."""
    result = copy.copy(attention_check)
    result.diagnoses = {}
    (fix,) = fix_model(attention, result, "cpu").fixes
    assert fix.verified and fix.plan is not None and fix.plan.keep_high_precision == ("attn",)
    keeps = [t for t in fix.tried if t.startswith("keep ")]
    assert keeps[0] == "keep `attn`, `inp`, `out` in FP32 (the rest as fp16) -> pass"
    assert any(t.startswith("keep `attn.k`, `attn.q`, `attn.v` in FP32") and "-> overflow" in t for t in keeps)


# -- (b) gradients that span more than FP16's range --------------------------------------------------
def two_scales() -> dict:
    """dL/d(a.weight) = 2^-40 in all 64 entries, dL/d(b.weight) = 2^10: a span of 2^50 (FP16 has 2^40)."""
    torch.manual_seed(0)  # the same weights in every process that calls the factory
    x1, x2 = torch.ones(1, 64), torch.full((1, 1), 2.0**10)

    def loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        ya, yb = m(*batch)
        return ya.float().sum() * 2.0**-40 + yb.float().sum()
    return {"model": TwoScales(), "batch": lambda i: (x1, x2), "loss": loss}


def test_gradients_wider_than_fp16_keep_the_large_one_out_with_the_window_as_reason(tmp_path: Path) -> None:
    result, rep = _fix(two_scales, ["fp16-dynamic"], tmp_path)
    assert result.window.empty
    (fix,) = rep.fixes
    assert fix.outcome == "stalled" and fix.verified and fix.plan is not None
    # b's 2^10 gradients in FP32: the scaler stays at 2^16, where a's 2^-40 are 2^-24, inside FP16
    assert fix.plan.keep_high_precision == ("b",)
    assert fix.tried[0].startswith("loss scaler: none to try (FP16 loss-scale window of the FP32 gradients: "
                                   "no single FP16 loss scale works")
    assert any("`a.weight` needs S >= 2^16" in n and "`b.weight` needs S <= 2^5" in n for n in fix.plan.notes)
    sc = fix.record["metrics"]["scaler"]
    assert (sc["skipped"], sc["scale_min"], sc["scale_max"]) == (0, 2.0**16, 2.0**16)


def tiny_gradients() -> dict:
    """Every gradient is 2^-36 (a, 64 entries): FP16 needs S > 2^11 (2^-36 * S above half of 2^-24); a
    static scale of 1024 flushes them all."""
    torch.manual_seed(0)  # the same weights in every process that calls the factory
    x, model = torch.ones(1, 64), nn.Sequential(nn.Linear(64, 1, bias=False))
    with torch.no_grad():  # y = 32 exactly: no cancellation in the loss for FP16 to blur
        model[0].weight.fill_(0.5)
    return {"model": model, "batch": lambda i: (x,),
            "loss": lambda m, b: m(b[0]).float().sum() * 2.0**-36}


@pytest.mark.slow  # each test here is a check-model run and a search (~6 s of CPU); the quick set keeps (a)-(c)
def test_a_static_scale_too_small_gets_the_scale_the_window_asks_for(tmp_path: Path) -> None:
    result, rep = _fix(tiny_gradients, ["fp16-static"], tmp_path)
    (fix,) = rep.fixes
    assert fix.outcome == "underflow" and fix.verified and fix.plan is not None
    assert fix.plan.change == "scaler" and fix.plan.keep_high_precision == ()
    lo2, hi2 = result.window.pow2
    assert lo2 == 2.0**12  # 2^-36 * 2^11 = 2^-25 ties to zero: the first power of two that works is 2^12
    s = parse(fix.plan.strategy_spec)
    mid = math.ldexp(1.0, round((math.log2(lo2) + math.log2(hi2)) / 2))
    assert (s.scaler.kind, s.scaler.init) == ("static", mid) and lo2 <= mid <= hi2
    assert fix.plan.notes[0].startswith("FP16 loss-scale window of the FP32 gradients: FP16 loss scales from 2^12")
    assert fix.plan.describe() == f"scaler: scaler init 2^10 -> {fix.plan.changed().split('-> ')[1]}"
    assert "S = " in snippet(fix.plan)


# -- (c) an FP8 model with one outlier layer ---------------------------------------------------------
class ThreeLinears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.first, self.mid, self.last = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        with torch.no_grad():
            for lin in (self.first, self.mid, self.last):
                lin.weight.copy_(torch.randn(16, 16, generator=g) * 0.25)
            # one outlier weight: per-tensor FP8 scaling (amax -> 448) puts the rest of mid's weight below half
            # of E4M3's smallest subnormal (0.25 * 448 / 2^20 = 2^-13.2 < 2^-10): they flush to zero. It
            # multiplies a feature that is always 0 (first's row 0 is zero, its bias -1, relu's gradient there
            # 0), so FP32 trains as if it were not there.
            self.mid.weight[0, 0] = 2.0**20
            self.first.weight[0].zero_()
            self.first.bias[0] = -1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.relu(self.mid(torch.relu(self.first(x)))))


def fp8_outlier() -> dict:
    torch.manual_seed(0)  # the same weights in every process that calls the factory
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
    return {"model": ThreeLinears(), "batch": lambda i: (x, t),
            "loss": lambda m, b: (m(b[0]).float() - b[1]).pow(2).mean(),
            "optimizer": lambda ps: torch.optim.SGD(ps, lr=1e-3)}


def test_fp8_outlier_layer_stays_in_bf16(tmp_path: Path) -> None:
    result, rep = _fix(fp8_outlier, ["fp8-tensorwise"], tmp_path)
    assert result.records[0]["outcome"] != "pass"
    (fix,) = rep.fixes
    assert fix.verified and fix.plan is not None
    assert (fix.plan.keep_high_precision, fix.plan.keep_format) == (("mid",), "bf16")
    assert fix.record["metrics"]["gemm_coverage"]["covered"] == 2  # first and last still ran in FP8
    # the search started from the layer whose per-tensor scaling flushes its weight: one run, no shrinking
    keeps = [t for t in fix.tried if t.startswith("keep ")]
    assert keeps == ["keep `mid` in BF16 (the rest as fp8-tensorwise) -> pass"]
    assert fix.plan.notes[1].startswith("per-tensor E4M3 scaling (amax -> 448) flushes 99.6% of `mid`'s weight")
    code = snippet(fix.plan)
    assert "convert_to_float8_training(model, module_filter_fn=module_filter_fn)" in code
    ns: dict = {}
    exec(code.split("from torchao")[0] + code[code.index("KEEP_BF16"):code.index("convert_to_float8_training(model")],
         ns)
    assert [ns["module_filter_fn"](None, n) for n in ("first", "mid", "mid.x", "last")] == [True, False, False, True]


# -- pure BF16 whose updates are absorbed (w + dw == w) ----------------------------------------------
def swamped() -> dict:
    """SGD at lr 1e-3 on weights near 0.3 and a LayerNorm near 1: most updates are below half a BF16 ulp of
    their weight, in every layer, so keeping some layers in FP32 is not enough."""
    torch.manual_seed(0)  # the same weights in every process that calls the factory
    g = torch.Generator().manual_seed(7)
    x, t = torch.randn(16, 8, generator=g), torch.randn(16, 2, generator=g)
    return {"model": nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)), "batch": lambda i: (x, t),
            "loss": lambda m, b: (m(b[0]).float() - b[1]).pow(2).mean(),
            "optimizer": lambda ps: torch.optim.SGD(ps, lr=1e-3)}


@pytest.mark.slow  # a check-model run and a search of 8 to 11 runs
def test_absorbed_updates_get_a_weight_update_plan(tmp_path: Path) -> None:
    result, rep = _fix(swamped, ["bf16-pure"], tmp_path)
    assert result.records[0]["metrics"]["updates_lost"] > 0.5
    (fix,) = rep.fixes
    assert fix.verified and fix.plan is not None and fix.plan.change == "optimizer"
    s = parse(fix.plan.strategy_spec)
    assert s.master or s.update in ("sr", "kahan")
    m = fix.record["metrics"]  # under update=sr|kahan an unchanged weight is no lost update (updates_unmoved)
    assert m.get("updates_lost", 0.0) < 0.01
    assert any(t.startswith("only keeping every parameter in FP32 passes") for t in fix.tried)
    assert fix.tried.index(next(t for t in fix.tried if t.startswith("optimizer:"))) > 0  # keep was tried first


def test_flushed_share_is_exact_at_half_the_smallest_subnormal() -> None:
    from harness.models.fp8_saturation import flushed_share
    # amax 448: no scaling; 2^-10 is exactly half of E4M3's smallest subnormal 2^-9 (ties to zero), 2^-9 stays
    t = torch.tensor([448.0, 2.0**-10, 2.0**-9, -2.0**-10, 0.0, float("inf")])
    assert flushed_share(t) == 2 / 4


# -- nothing to fix, nothing that works ---------------------------------------------------------------
def healthy() -> dict:
    torch.manual_seed(0)  # the same weights in every process that calls the factory
    g = torch.Generator().manual_seed(5)
    x, t = torch.randn(8, 4, generator=g), torch.randn(8, 2, generator=g)
    return {"model": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)), "batch": lambda i: (x, t),
            "loss": lambda m, b: (m(b[0]).float() - b[1]).pow(2).mean()}


def cancellation() -> dict:
    """The loss is the difference of the layer at x and at x + 2^-14: both round to the same FP16/BF16
    input, the difference is 0 and so are the gradients; only FP32 sees it (and keeping the one layer in
    FP32 is FP32 itself, no plan)."""
    torch.manual_seed(0)  # the same weights in every process that calls the factory
    g = torch.Generator().manual_seed(6)
    x = 1.0 + torch.rand(4, 4, generator=g)
    return {"model": nn.Sequential(nn.Linear(4, 4)), "batch": lambda i: (x,),
            "loss": lambda m, b: (m(b[0] + 2.0**-14) - m(b[0])).float().pow(2).sum() * 2.0**20}


def test_cli_nothing_to_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["check-model", "test_fix:healthy", "--strategy", "bf16", "--steps", "3", "--device", "cpu",
                 "--out", str(tmp_path / "run"), "--fix", "--plan-out", str(tmp_path / "plan.json")])
    assert code == 0
    assert "--fix: every strategy passed (or is unsupported here): nothing to fix" in capsys.readouterr().out
    assert json.loads((tmp_path / "plan.json").read_text())["fixes"] == {}


@pytest.mark.slow  # each test here is a check-model run and a search (~6 s of CPU); the quick set keeps (a)-(c)
def test_cli_nothing_passes_prints_no_plan(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["check-model", "test_fix:cancellation", "--strategy", "fp16", "--strategy", "bf16", "--steps", "2",
                 "--device", "cpu", "--out", str(tmp_path / "run"), "--fix", "--plan-out", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert code == 1  # as check-model's: the strategies failed
    assert "fix for fp16 (" in out and "fix for bf16 (" in out
    assert out.count("no verified fix found") == 2 and "apply it:" not in out
    plans = json.loads((tmp_path / "p.json").read_text())["fixes"]
    assert {k: (v["verified"], v["plan"], v["snippet"]) for k, v in plans.items()} == \
        {"fp16": (False, None, None), "bf16": (False, None, None)}
    assert any(t.startswith("format: compute fp16 -> bf16") and "-> pass" not in t for t in plans["fp16"]["tried"])


def test_cli_plan_out_needs_fix(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["check-model", "test_fix:healthy", "--plan-out", str(tmp_path / "p.json")])
    assert code == 2 and "--plan-out writes the plans --fix finds; add --fix" in capsys.readouterr().err


# -- the pieces ---------------------------------------------------------------------------------------
def test_ddmin_is_one_minimal_and_keeps_order() -> None:
    calls: list[tuple[str, ...]] = []

    def passes(s: tuple[str, ...]) -> bool:
        calls.append(s)
        return {"b", "g"} <= set(s)
    assert ddmin(list("abcdefgh"), passes) == ("b", "g")
    assert ddmin(["x"], passes) == ("x",) and ddmin(list("gb"), passes) == ("g", "b")
    assert len(calls) < 2 ** 8  # not the power set


def test_plan_round_trips_and_refuses_bad_values() -> None:
    p = Plan(str(PRESETS["bf16-pure"]), ("norm", "attn"), "fp32", ("why",), "bf16-pure", "keep")
    assert p.keep_high_precision == ("attn", "norm") and Plan.from_dict(json.loads(json.dumps(p.as_dict()))) == p
    with pytest.raises(ValueError, match="keep_format 'fp8' is not allowed"):
        Plan(str(PRESETS["fp16"]), ("a",), "fp8")
    with pytest.raises(ValueError, match="compute='fp17' is not allowed"):
        Plan("compute=fp17", ())


def test_the_module_tree_skips_containers_and_param_share_counts_entries() -> None:
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2, enable_nested_tensor=False)
    model = nn.Sequential(enc, nn.LayerNorm(8))
    assert callable_children(model) == ["0", "1"]
    assert callable_children(model, "0") == ["0.layers.0", "0.layers.1"]  # the ModuleList is never called itself
    total = sum(p.numel() for p in model.parameters())
    assert param_share(model, ("1",)) == 16 / total and param_share(model, ("0", "1")) == 1.0


@pytest.mark.parametrize("preset", ["fp16-pure", "bf16-pure"])
def test_pure_strategy_keeps_the_original_fp32_weights(preset: str) -> None:
    """A kept module of a cast strategy holds its FP32 weights, not the low-precision ones cast back; its
    output goes back to the strategy's format; the others are stored low."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    with torch.no_grad():
        model[1].weight[0, 0] = 1.0 + 2.0**-20  # not representable in FP16 or BF16
    original = model[1].weight.detach().clone()
    ex = Execution(PRESETS[preset], CPU).keeping(("1",))
    m = to_storage(model, ex)
    assert m[0].weight.dtype == ex.dtype and m[1].weight.dtype == torch.float32
    assert torch.equal(m[1].weight, original)
    assert m(torch.ones(2, 4, dtype=ex.dtype)).dtype == ex.dtype


def test_fp32_and_fp64_runs_keep_nothing() -> None:
    """The reference's runs are the unchanged model: a plan's reference is check-model's."""
    for s in (PRESETS["fp32"], parse("compute=fp64,apply=cast,params=fp64")):
        assert Execution(s, CPU).keeping(("a",)).keep_high == frozenset()
    assert Execution(PRESETS["fp16"], CPU).keeping(("a",)).keep_high == frozenset({"a"})


def per_process() -> dict:
    """Weights drawn from a seed that differs in every process: not the model check-model trained."""
    import os
    torch.manual_seed(os.getpid())
    x = torch.ones(2, 4)
    return {"model": nn.Sequential(nn.Linear(4, 4)), "batch": lambda i: (x,),
            "loss": lambda m, b: m(b[0]).float().pow(2).sum() * 2.0**-36}


@pytest.mark.slow  # each test here is a check-model run and a search (~6 s of CPU); the quick set keeps (a)-(c)
def test_a_factory_that_builds_another_model_is_not_searched(tmp_path: Path) -> None:
    result, rep = _fix(per_process, ["fp16-static"], tmp_path, steps=2)
    assert result.records[0]["outcome"] == "underflow"
    (fix,) = rep.fixes
    assert not fix.verified and fix.run_dir is None
    assert len(fix.tried) == 1 and fix.tried[0].startswith("not searched: the factory built another model here")


# -- on a GPU (the lead runs these there) ----------------------------------------------------------------
def _gpu_fix(target: str, strategy: str, tmp_path: Path) -> dict:
    """``check-model TARGET --fix`` on CUDA in a process of its own (this one may not start CUDA before
    check-model forks its workers); the plans it wrote."""
    import os
    import subprocess
    import sys
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    out = subprocess.run([sys.executable, "-m", "harness", "check-model", target, "--strategy", strategy, "--steps",
                          "3", "--device", "cuda", "--out", str(tmp_path / "run"), "--fix", "--plan-out",
                          str(tmp_path / "plan.json")], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 1, out.stdout + out.stderr  # the strategy as given fails
    return json.loads((tmp_path / "plan.json").read_text())["fixes"][strategy]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_overflowing_attention_is_kept_in_fp32(tmp_path: Path) -> None:
    fix = _gpu_fix("test_fix:attention", "fp16", tmp_path)
    assert fix["verified"] and fix["plan"]["keep_high_precision"] == ["attn"]
    assert fix["verdict"]["outcome"] == "pass" and fix["seconds_per_step"]["plan"] > 0


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a CUDA device with FP8 (sm_89 or later)")
def test_gpu_fp8_outlier_layer_stays_in_bf16(tmp_path: Path) -> None:
    fix = _gpu_fix("test_fix:fp8_outlier", "fp8-tensorwise", tmp_path)
    assert fix["verified"] and (fix["plan"]["keep_high_precision"], fix["plan"]["keep_format"]) == (["mid"], "bf16")
    assert "module_filter_fn" in fix["snippet"]


def test_kept_modules_run_their_gemms_natively_under_fp8() -> None:
    """A kept block's Linears are not routed, and a GEMM it routes by call runs natively too (no FP8
    rounding: bit for bit torch's BF16 product), counted as no emulated GEMM."""
    from harness.core.execution import route_linears
    ex = Execution(PRESETS["fp8-tensorwise"], CPU).keeping(("block",), "bf16")
    a = torch.tensor([[1.0 + 2.0**-6, 3.0]])  # 1 + 2^-6 is exact in BF16, not in E4M3 (3 mantissa bits)
    b = torch.tensor([[1.0], [2.0**-7]])
    with ex.native():
        assert torch.equal(ex.matmul(a, b), a @ b) and ex.emulated_gemms == 0
    assert not torch.equal(ex.matmul(a, b), a @ b) and ex.emulated_gemms == 1
    from harness.core.execution import gemm_coverage
    from harness.core.keep import to_storage
    ex = Execution(PRESETS["fp8-tensorwise"], CPU).keeping(("block",), "bf16")
    model = nn.Sequential()
    model.block, model.head = nn.Sequential(nn.Linear(2, 2)), nn.Linear(2, 2)
    model = to_storage(route_linears(model, ex), ex)
    with ex.autocast():
        model(torch.tensor([[1.0 + 2.0**-6, 3.0]]))
    assert ex.routed_keys == {"head"}  # only head ran in FP8; the kept block's Linear ran natively
    assert gemm_coverage(model, ex)["by_type"]["Linear"] == [1, 2]


@pytest.mark.parametrize("preset", ["fp16", "fp16-pure"])
def test_the_snippet_fixes_the_users_own_model(preset: str) -> None:
    """The snippet, run on the user's model in a plain autocast (or cast) forward, keeps the attention's
    logits out of FP16: finite where the same forward without it overflows."""
    x = attention()["batch"](0)[0]
    plan = Plan(str(PRESETS[preset]), ("attn",), "fp32", fixes=preset)
    code = snippet(plan, "cpu")
    outputs = []
    for apply_plan in (False, True):
        ns = {"model": attention()["model"]}
        if apply_plan:
            exec(code, ns)
        model = ns["model"]
        if preset == "fp16-pure":
            if not apply_plan:
                model.to(torch.float16)
            outputs.append(model(x.to(torch.float16)))
        else:
            with torch.autocast("cpu", dtype=torch.float16):
                outputs.append(model(x))
    assert not torch.isfinite(outputs[0]).all() and torch.isfinite(outputs[1]).all()
    if preset == "fp16-pure":  # the kept block hands the next layer its own dtype back
        assert outputs[1].dtype == torch.float16


def unseeded() -> dict:
    """Weights from the global RNG, which check-model's --seed sets before calling the factory."""
    x = torch.ones(2, 4)
    return {"model": nn.Sequential(nn.Linear(4, 4)), "batch": lambda i: (x,),
            "loss": lambda m, b: m(b[0]).float().pow(2).sum() * 2.0**-36}


@pytest.mark.slow  # a check-model run and a search
def test_the_search_trains_the_model_of_check_models_seed(tmp_path: Path) -> None:
    result = check_model(unseeded, ["fp16-static"], steps=2, device="cpu", out=tmp_path / "run", seed=3)
    assert result.records[0]["outcome"] == "underflow" and result.records[0]["params"] == {"steps": 2, "seed": 3}
    (fix,) = fix_model(unseeded, result, "cpu").fixes
    assert not fix.tried[0].startswith("not searched")  # the search built the same model (seed 3)
    assert fix.verified and fix.record["params"] == {"steps": 2, "seed": 3}


class Tied(nn.Module):
    """An embedding and an output head that share one weight (GPT-2's wte and lm_head)."""

    def __init__(self) -> None:
        super().__init__()
        self.wte, self.norm, self.head = nn.Embedding(8, 4), nn.LayerNorm(4), nn.Linear(4, 8, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.wte(ids)))


def test_a_kept_weight_keeps_the_modules_it_is_tied_to() -> None:
    from harness.core.keep import with_tied
    model = Tied()
    assert with_tied(model, ("wte",)) == {"wte", "head"} and with_tied(model, ("norm",)) == {"norm"}
    ex = Execution(PRESETS["bf16-pure"], CPU).keeping(("wte",))
    m = to_storage(model, ex)
    assert m.head.weight.dtype == torch.float32 and m.norm.weight.dtype == torch.bfloat16
    assert m(torch.tensor([[1, 2, 3]])).dtype == torch.bfloat16  # the head ran in FP32 on its tied weight
