"""torchao's float8 training recipes (lib=torchao) against the harness's own emulation (the oracle), bit for bit.

The same model, data and gradient run twice: once converted by torchao (``convert_to_float8_training``,
or its ``matmul_with_hp_or_float8_args`` for a functional GEMM), once through
:mod:`harness.values.fp8_rowwise`. Every output and gradient must agree in every bit, and the comparison
must fail when the oracle is wrong in one detail (scale rounding, gradient format, the high-precision
weight-gradient GEMM).
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.core import libraries
from harness.values import fp8_rowwise
from harness.core.execution import Execution, gemm_coverage, route_linears
from harness.values.formats import FORMATS
from harness.values.fp8_rowwise import RECIPES, recipe_matmul, scale_of
from harness.core.strategy import PRESETS, parse, support

pytest.importorskip("torchao.float8")
from torchao.float8 import Float8LinearConfig  # noqa: E402

from harness.recipes import torchao_float8  # noqa: E402

CPU = torch.device("cpu")
RECIPE_NAMES = ("tensorwise", "rowwise", "rowwise_gw_hp")
#: torchao on the CPU runs torch._scaled_mm; the bit-for-bit tests need it to be torch's dequantize-then-GEMM
#: (a CPU whose oneDNN has FP8 kernels accumulates otherwise: there they are skipped, and say why)
exact_cpu = pytest.mark.skipif(not fp8_rowwise.cpu_scaled_mm_is_emulation(),
                               reason="torch._scaled_mm on this CPU is not the dequantize-then-GEMM fallback")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 16))
    with torch.no_grad():  # columns of the weights a thousand times apart, so per-column scales matter
        for lin in m[::2]:
            lin.weight.mul_(torch.logspace(-1.5, 1.5, lin.weight.shape[1]))
    return m


def batch(step: int = 0, device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows six orders of magnitude apart (a per-tensor scale flushes the small ones) and a weighting of
    the output whose rows are as uneven, so gradients are too."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(64, 32, generator=g) * torch.logspace(-3, 3, 64)[:, None]
    r = torch.randn(64, 16, generator=g) * torch.logspace(-4, 0, 64)[:, None]
    return x.to(device), r.to(device)


def oracle(model: nn.Module, recipe: str) -> nn.Module:
    """``model`` with each ``nn.Linear`` run as a ``Float8Linear`` is under autocast: the input in BF16,
    the recipe's GEMMs from the oracle, the bias added in the output's dtype."""
    for mod in model.modules():
        if isinstance(mod, nn.Linear):
            def fwd(x, _m=mod):
                with torch.autocast("cpu", enabled=False):
                    y = recipe_matmul(x.to(torch.bfloat16), _m.weight.t(), recipe, native=False)
                    return y + _m.bias.to(y.dtype)
            mod.forward = fwd  # type: ignore[method-assign]
    return model


def torchao_model(model: nn.Module, recipe: str) -> nn.Module:
    return torchao_float8.convert(model, recipe, lambda _k: None)


def grads_of(model: nn.Module, step: int = 0) -> list[torch.Tensor]:
    """The output and every parameter's gradient of one forward/backward under CPU autocast (BF16)."""
    x, r = batch(step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    (y.float() * r).sum().backward()
    return [y.detach()] + [p.grad for p in model.parameters()]


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for i, (p, q) in enumerate(zip(a, b)):
        assert p.dtype == q.dtype and torch.equal(p, q), f"tensor {i}: {(p.float() - q.float()).abs().max()}"


def differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> list[int]:
    return [i for i, (p, q) in enumerate(zip(a, b)) if not torch.equal(p, q)]


@exact_cpu
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_torchao_model_matches_the_oracle_bit_for_bit(recipe: str) -> None:
    base = mlp()
    got = grads_of(torchao_model(copy.deepcopy(base), recipe))
    want = grads_of(oracle(copy.deepcopy(base), recipe))
    assert_bitwise(got, want)
    bf16 = grads_of(copy.deepcopy(base))  # and the recipe is not plain BF16: FP8 moved every tensor but the
    assert differs(got, bf16) == list(range(len(got) - 1))  # last bias's gradient (dy itself, no GEMM)


#: Which of (output, w0, b0, w1, b1, w2, b2) move when the oracle gets one detail wrong (the last bias's
#: gradient is dy itself: no GEMM touches it).
@exact_cpu
@pytest.mark.parametrize("recipe,wrong,moved", [
    # scales not rounded to powers of two: every FP8 operand changes
    ("rowwise", {"pow2": False}, [0, 1, 2, 3, 4, 5]),
    ("rowwise_gw_hp", {"pow2": False}, [0, 1, 2, 3, 4, 5]),
    # weight gradients in FP8 instead of high precision: exactly the three weight gradients
    ("rowwise_gw_hp", {"grad_weight": RECIPES["rowwise"].grad_weight}, [1, 3, 5]),
    # tensorwise gradients in E4M3 (as the row-wise recipes) instead of E5M2: every gradient a GEMM makes
    ("tensorwise", {"grad_input": (fp8_rowwise._T4, fp8_rowwise._T4),
                    "grad_weight": (fp8_rowwise._T4, fp8_rowwise._T4)}, [1, 2, 3, 4, 5]),
    # the weight in the grad-input GEMM per column instead of per tensor: the layers below the last
    # (b1's gradient, a BF16 sum, absorbs the change here)
    ("rowwise_gw_hp", {"grad_input": RECIPES["rowwise"].grad_input}, [1, 2, 3]),
])
def test_the_comparison_fails_when_the_oracle_is_wrong(monkeypatch, recipe: str, wrong: dict,
                                                       moved: list[int]) -> None:
    base = mlp()
    got = grads_of(torchao_model(copy.deepcopy(base), recipe))
    monkeypatch.setitem(RECIPES, recipe, dataclasses.replace(RECIPES[recipe], **wrong))
    assert differs(got, grads_of(oracle(copy.deepcopy(base), recipe))) == moved


def test_rowwise_scales_are_powers_of_two_per_row_and_tensorwise_ones_are_not() -> None:
    x, _ = batch()
    e4m3 = FORMATS["fp8_e4m3"]
    s = scale_of(x, e4m3, -1, pow2=True)
    assert s.shape == (64, 1) and torch.equal(torch.frexp(s).mantissa, torch.full_like(s, 0.5))
    exact = scale_of(x, e4m3, -1, pow2=False)
    assert torch.all(s <= exact) and torch.all(exact < 2 * s)  # rounded down, by less than a factor 2
    assert scale_of(x, e4m3, None, pow2=False).item() == pytest.approx(448.0 / x.abs().max().item(), rel=1e-7)
    assert scale_of(torch.zeros(2, 2), e4m3, None, pow2=False).item() == pytest.approx(448.0 / 1e-12)  # EPS


@exact_cpu
def test_rowwise_keeps_the_small_rows_that_tensorwise_flushes() -> None:
    """Rows 10^6 apart: one scale for the tensor flushes 388 of the 2048 inputs to zero (4 rows entirely),
    one per row none; the forward output's worst row error drops from 0.69 to 0.27 (docs/recipes.md)."""
    x, r = batch()
    xb = x.to(torch.bfloat16)
    flushed = {}
    for name in ("tensorwise", "rowwise"):
        q, _ = fp8_rowwise._cast(xb, RECIPES[name].output[0], True, RECIPES[name].pow2)
        zero = (q.float() == 0) & (xb != 0)
        flushed[name] = (int(zero.sum()), int(zero.all(dim=1).sum()))
    assert flushed == {"tensorwise": (388, 4), "rowwise": (0, 0)}
    base = mlp()
    ref = base(x).double()
    worst = {}
    for name in ("tensorwise", "rowwise"):
        y = grads_of(torchao_model(copy.deepcopy(base), name))[0].double()
        worst[name] = ((y - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert worst["rowwise"] == pytest.approx(0.266, abs=5e-3) and worst["tensorwise"] == pytest.approx(0.686, abs=5e-3)


@exact_cpu
@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_gw_hp"])
def test_harness_strategies_own_and_torchao_train_identically(recipe: str) -> None:
    """The harness's own fp8=rowwise* (route_linears) and lib=torchao: three AdamW steps, same bits."""
    name = recipe.replace("_", "-")
    params = []
    for preset in (f"fp8-{name}", f"torchao-fp8-{name}"):
        ex = Execution(PRESETS[preset], CPU)
        model = route_linears(copy.deepcopy(mlp()), ex)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        for step in range(3):
            x, r = batch(step)
            with ex.autocast():
                loss = (model(x).float() * r).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        cov = gemm_coverage(model, ex)
        assert cov["by_type"] == {"Linear": [3, 3]} and ex.emulated_gemms == 9, preset
        params.append([p.detach().clone() for p in model.parameters()])
    assert_bitwise(params[0], params[1])
    assert differs(params[0], [p.detach() for p in mlp().parameters()]) == list(range(6))


@exact_cpu
def test_tensorwise_torchao_trains_as_its_oracle() -> None:
    params = []
    for model in (torchao_model(mlp(), "tensorwise"), oracle(mlp(), "tensorwise")):
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        for step in range(3):
            opt.zero_grad()
            grads_of(model, step)
            opt.step()
        params.append([p.detach().clone() for p in model.parameters()])
    assert_bitwise(params[0], params[1])


@exact_cpu
@pytest.mark.parametrize("recipe", ["rowwise", "rowwise_gw_hp"])
def test_functional_matmul_goes_through_torchao(monkeypatch, recipe: str) -> None:
    """Execution.matmul of lib=torchao calls torchao's autograd function; the own strategy the oracle;
    both give the same bits (a 3-D left operand, both operands with gradients)."""
    name = recipe.replace("_", "-")
    g = torch.Generator().manual_seed(3)
    a0 = torch.randn(2, 32, 48, generator=g) * torch.logspace(-2, 2, 32)[:, None]
    b0 = torch.randn(48, 16, generator=g) * torch.logspace(-2, 2, 16)
    dy = torch.randn(2, 32, 16, generator=g)
    calls = []
    real = torchao_float8.matmul
    monkeypatch.setattr(torchao_float8, "matmul", lambda *a: calls.append(a[2]) or real(*a))
    out = []
    for preset in (f"fp8-{name}", f"torchao-fp8-{name}"):
        ex = Execution(PRESETS[preset], CPU)
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        with ex.autocast():
            y = ex.matmul(a, b, key="probe")
        y.backward(dy.to(y.dtype))
        assert y.dtype == torch.bfloat16 and ex.routed_keys == {"probe"}
        out.append([y.detach(), a.grad, b.grad])
    assert calls == [recipe]
    assert_bitwise(out[0], out[1])


@exact_cpu
def test_records_name_the_library_and_its_version() -> None:
    v = libraries.version("torchao")
    ok, why, notes = support(PRESETS["torchao-fp8-rowwise"], CPU)
    assert ok and why == "" and notes == [f"torchao {v} float8 rowwise; torch._scaled_mm on the CPU: FP8 inputs "
                                          "dequantized, FP32 GEMM"]
    assert Execution(PRESETS["fp8-rowwise-gw-hp"], CPU).emulation_notes() == [
        "own float8 rowwise_gw_hp (torchao's recipe); emulated on the CPU: FP8 inputs dequantized, FP32 GEMM"]
    # the own tensorwise and delayed paths keep their notes (existing records do not change)
    assert support(PRESETS["fp8-tensorwise"], CPU)[2] == support(PRESETS["fp8-delayed"], CPU)[2] == [
        "fp8 emulated on the CPU: GEMM inputs cast to e4m3/e5m2 with per-tensor scales, FP32 accumulation"]
    assert torchao_float8.config("rowwise_gw_hp") == Float8LinearConfig.from_recipe_name("rowwise_with_gw_hp")


def test_strategies_command_names_torchao_and_its_version(capsys) -> None:
    from harness.cli import main
    assert main(["strategies"]) == 0
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()}
    for name in ("torchao-fp8-tensorwise", "torchao-fp8-rowwise", "torchao-fp8-rowwise-gw-hp"):
        assert rows[name][1:3] == ["torchao", libraries.version("torchao")] and rows[name][-1] == str(PRESETS[name])
    assert rows["fp8-rowwise"][1] == rows["fp8-rowwise-gw-hp"][1] == "own"


def test_missing_torchao_is_unsupported_with_the_install_line(monkeypatch) -> None:
    from harness.cli import _library
    monkeypatch.setattr(libraries, "version", lambda lib: None)
    for name in ("torchao-fp8-tensorwise", "torchao-fp8-rowwise", "torchao-fp8-rowwise-gw-hp"):
        ok, why, _ = support(PRESETS[name], CPU)
        assert not ok and why == ("torchao is not installed: pip install 'torchao>=0.18' "
                                  "(or pip install 'mp-harness[recipes]')"), name
    assert support(PRESETS["fp8-rowwise"], CPU)[0]  # the own recipe needs no library
    assert _library("torchao") == "not installed: pip install 'torchao>=0.18'" and _library("none") == "own"
    monkeypatch.setattr(libraries, "version", lambda lib: "0.17.0")
    assert support(PRESETS["torchao-fp8-rowwise"], CPU)[1] == "torchao 0.17.0 is older than 0.18: pip install " \
                                                              "'torchao>=0.18'"


def test_the_install_line_names_an_extra_that_exists() -> None:
    """missing_reason says ``pip install 'mp-harness[recipes]'``: the extra installs every library at
    the minimum version the harness supports."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())
    recipes = extras["project"]["optional-dependencies"]["recipes"]
    assert recipes == [f"{lib.dist}>={lib.minimum}" for lib in libraries.LIBRARIES.values()]


def test_only_torchao_float8_recipes_are_lifted() -> None:
    assert support(parse("compute=fp8,fp8=delayed,lib=torchao"), CPU)[1] == "lib=torchao has no implementation yet"
    assert support(parse("compute=fp8,fp8=blockwise(128),lib=torchao"), CPU)[1] == "lib=torchao has no implementation yet"
    for name in ("fp8-rowwise", "fp8-rowwise-gw-hp", "torchao-fp8-tensorwise"):
        assert support(PRESETS[name], CPU)[0], name
    # every operand of the row-wise recipes is E4M3: that is the format they are judged by
    assert PRESETS["fp8-rowwise"].format.name == PRESETS["torchao-fp8-rowwise-gw-hp"].format.name == "fp8_e4m3"
    assert PRESETS["torchao-fp8-tensorwise"].format.name == "fp8_e5m2"


@exact_cpu
def test_the_cpu_scaled_mm_scales_before_the_gemm_so_an_exact_fp8_cancellation_leaves_a_residue() -> None:
    """deep_narrow_vanishing at depth 24, layer 13, unit 30 (measured): identical E4M3 inputs over the batch
    and E5M2 gradients that sum to exactly 0. The FP8 products sum exactly (the own path, and a GPU that
    scales after accumulating: 0); torch._scaled_mm on the CPU, and with it torchao there and the
    emulation of it, scales each operand first and keeps a residue of ~1e-15."""
    qg = torch.tensor([[-16384.0, 12288.0, -2048.0, -10240.0, 5120.0, 6144.0, -1024.0, 6144.0]]).to(torch.float8_e5m2)
    qa = torch.full((8, 16), 352.0).to(torch.float8_e4m3fn)
    sg, sa = torch.tensor(947271565312.0), torch.tensor(570.5870361328125)
    assert torch.equal(qg.float() @ qa.float(), torch.zeros(1, 16))
    cpu = torch._scaled_mm(qg, qa.t().contiguous().t(), scale_a=sg.reciprocal(), scale_b=sa.reciprocal(),
                           out_dtype=torch.float32)
    emulated = fp8_rowwise._gemm(qg, sg, qa, sa, torch.float32, fast_accum=True, native=False)
    assert torch.equal(cpu, emulated) and emulated.abs().max().item() == pytest.approx(1.33e-15, rel=1e-2)


def test_the_cpu_probe_tells_another_arithmetic_apart(monkeypatch) -> None:
    """The probe that decides the CPU notes (and these tests' skips) fails for a GEMM that scales after
    accumulating, as a oneDNN FP8 kernel or a GPU does."""
    def post_scaled(qa, ia, qb, ib):
        return (qa.float() @ qb.float()) * (ia * ib)
    fp8_rowwise.cpu_scaled_mm_is_emulation.cache_clear()
    monkeypatch.setattr(fp8_rowwise, "_dequantized_mm", post_scaled)
    try:
        assert fp8_rowwise.cpu_scaled_mm_is_emulation() is False
    finally:
        fp8_rowwise.cpu_scaled_mm_is_emulation.cache_clear()


def test_library_presets_carry_the_declarations_of_the_recipe_they_run() -> None:
    from harness.core.scenario import Expect
    e = Expect(("fp8*",), "diverged", "BF16 activations")
    assert e.applies("torchao-fp8-rowwise", {}, "cpu") and e.applies("fp8-rowwise", {}, "cpu")
    assert not Expect(("fp8-tensorwise",), "pass", "").applies("torchao-fp8-rowwise", {}, "cpu")
    assert not e.applies("bf16", {}, "cpu") and not e.applies("torchaofp8", {}, "cpu")


def test_on_a_gpu_torchao_converts_only_widths_that_scaled_mm_takes() -> None:
    """torch._scaled_mm on a GPU needs multiples of 16: a Linear(24, 32) stays high precision there (torchao's
    documented module filter); on the CPU torchao converts it."""
    from torchao.float8.float8_linear import Float8Linear
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 24), nn.Linear(24, 32))
    kinds = [type(m) for m in torchao_float8.convert(copy.deepcopy(model), "rowwise", print, gpu=True)]
    assert kinds == [Float8Linear, nn.Linear, nn.Linear]
    kinds = [type(m) for m in torchao_float8.convert(copy.deepcopy(model), "rowwise", print, gpu=False)]
    assert kinds == [Float8Linear] * 3


def test_on_a_gpu_a_row_count_scaled_mm_refuses_is_named_before_torchao_fails() -> None:
    """The layer filter sees only widths; the rows (tokens of a batch) are the inner dimension of the
    weight-gradient GEMM, and torchao fails in the backward pass on 120 of them (seen on an H100:
    ``Expected trailing dimension of mat1 to be divisible by 16 but got mat1 shape: (16x120)``)."""
    from harness.core.libraries import RecipeUnsupported
    model = torchao_float8.convert(nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 32)), "tensorwise", print, gpu=True)
    with pytest.raises(RecipeUnsupported, match=r"`0` gets 120 rows .* multiple of 16"):
        model(torch.randn(8, 15, 32))
    assert model(torch.randn(8, 16, 32)).shape == (8, 16, 32)  # 128 rows: the check lets it through
    cpu = torchao_float8.convert(nn.Sequential(nn.Linear(32, 64)), "tensorwise", print, gpu=False)
    assert cpu(torch.randn(120, 32)).shape == (120, 64)  # the CPU's torchao takes any rows


def test_check_model_records_the_refused_rows_as_unsupported(monkeypatch, capsys, tmp_path: Path) -> None:
    """Through check-model, with the GPU's check forced on the CPU: the record is ``unsupported`` with the
    reason (it was an ``error`` with torchao's RuntimeError), and the other strategies still ran."""
    (tmp_path / "rows120.py").write_text(
        "import torch\nfrom torch import nn\n\n"
        "def factory():\n"
        "    torch.manual_seed(0)\n"
        "    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))\n"
        "    def batch(step):\n"
        "        return (torch.randn(120, 32, generator=torch.Generator().manual_seed(step)),)\n"
        "    return {'model': model, 'batch': batch, 'loss': lambda m, b: m(b[0]).square().mean(),\n"
        "            'optimizer': lambda p: torch.optim.AdamW(p, lr=1e-3)}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real = torchao_float8.convert
    monkeypatch.setattr(torchao_float8, "convert",
                        lambda model, recipe, on_run, gpu=False, skip=lambda f: False: real(model, recipe, on_run, True, skip))
    from harness.cli import main
    from harness.results import read_run
    code = main(["check-model", "rows120:factory", "--strategy", "bf16", "--strategy", "torchao-fp8-tensorwise",
                 "--steps", "2", "--device", "cpu", "--no-cache", "--out", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert code in (0, 1), text
    rec = {r["strategy"]: r for r in read_run(tmp_path / "run")[1]}
    assert rec["torchao-fp8-tensorwise"]["outcome"] == "unsupported", rec["torchao-fp8-tensorwise"]["reason"]
    assert "120 rows" in rec["torchao-fp8-tensorwise"]["reason"]
    assert rec["bf16"]["outcome"] == "pass"


def test_gpt2_coverage_says_conv1d_stayed_in_high_precision() -> None:
    """GPT-2's attention and MLP are Hugging Face Conv1D, which torchao does not convert: only the LM head
    (an nn.Linear) runs in FP8, and the coverage and the verdict's note say so."""
    transformers = pytest.importorskip("transformers")
    from harness.judge.verdict import _coverage_note
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(cfg)
    ex = Execution(PRESETS["torchao-fp8-rowwise"], CPU)
    model = route_linears(model, ex)
    tokens = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))
    with ex.autocast():
        loss = model(tokens, labels=tokens).loss
    loss.backward()
    assert torch.isfinite(loss)
    cov = gemm_coverage(model, ex)
    assert cov["by_type"] == {"Conv1D": [0, 8], "Linear": [1, 1]} and (cov["covered"], cov["total"]) == (1, 9)
    assert _coverage_note(cov).startswith("only 1 of 9 GEMM layers ran in fp8_e4m3 (not: Conv1D 0/8)")


def test_own_rowwise_routes_conv1d_and_keeps_bf16_activations() -> None:
    """The own row-wise recipes run GPT-2's Conv1D in FP8 too (torchao does not), and add every bias in
    the output's dtype, so activations stay BF16 as with Float8Linear; the own tensorwise path keeps its
    old promotion to the FP32 bias (its records stay as they were)."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    x = torch.randn(4, 8, 32)
    for preset, dtype in (("fp8-rowwise", torch.bfloat16), ("fp8-tensorwise", torch.float32)):
        ex = Execution(PRESETS[preset], CPU)
        model = route_linears(nn.Sequential(pytorch_utils.Conv1D(48, 32), nn.Linear(48, 16)), ex)
        with ex.autocast():
            y0 = model[0](x)
            y = model[1](y0)
        assert (y0.dtype, y.dtype) == (dtype, dtype), preset
        assert gemm_coverage(model, ex)["by_type"] == {"Conv1D": [1, 1], "Linear": [1, 1]}


def test_check_model_accepts_torchao_rowwise_on_a_third_party_model(capsys, tmp_path: Path) -> None:
    """torch's TransformerEncoder unchanged: torchao converts its feed-forward Linears and the head; the
    attention projections (nn.MultiheadAttention calls them functionally) stay in BF16, and the record says so."""
    from harness.cli import main
    from harness.results import read_run
    out = tmp_path / "run"
    code = main(["check-model", "examples.third_party_model:factory", "--strategy", "fp32", "--strategy",
                 "torchao-fp8-rowwise", "--steps", "2", "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    assert code in (0, 1), text
    _, records = read_run(out)
    rec = {r["strategy"]: r for r in records}["torchao-fp8-rowwise"]
    assert rec["outcome"] != "error" and rec["outcome"] != "unsupported", rec["reason"]
    assert rec["emulated"][0].startswith(f"torchao {libraries.version('torchao')} float8 rowwise")
    cov = rec["metrics"]["gemm_coverage"]
    assert cov["by_type"] == {"Linear": [5, 7], "MultiheadAttention.in_proj": [0, 2]}
    assert "only 5 of 9 GEMM layers ran in fp8_e4m3" in rec["reason"]


# -- on a GPU: the native row-wise path and torchao's, same kernels, same bits --------------------
@pytest.mark.cuda
@pytest.mark.parametrize("recipe", RECIPE_NAMES)
def test_cuda_torchao_matches_the_native_oracle(recipe: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) < (8, 9):
        pytest.skip("needs FP8 Tensor Cores (sm_89+)")
    if recipe != "tensorwise" and fp8_rowwise.rowwise_native(str(dev)):
        pytest.skip(fp8_rowwise.rowwise_native(str(dev)))
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(256, 128, generator=g) * torch.logspace(-3, 3, 256)[:, None]).to(dev, torch.bfloat16)
    w = (torch.randn(128, 64, generator=g) * torch.logspace(-1, 1, 64)).to(dev)
    dy = torch.randn(256, 64, generator=g).to(dev, torch.bfloat16)
    res = {}
    for how in ("torchao", "native", "emulated"):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        if how == "torchao":
            y = torchao_float8.matmul(a, b, recipe)
        else:
            y = recipe_matmul(a, b, recipe, native=how == "native")
        y.backward(dy)
        res[how] = [y.detach(), a.grad, b.grad]
    assert_bitwise(res["torchao"], res["native"])
    for n, e in zip(res["native"], res["emulated"]):  # Tensor Core accumulation order: BF16-level agreement
        torch.testing.assert_close(n.float(), e.float(), rtol=2**-7, atol=1e-3 * e.float().abs().max().item())


@pytest.mark.cuda
def test_cuda_execution_runs_rowwise_natively_with_notes() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    if torch.cuda.get_device_capability(dev) < (8, 9):
        pytest.skip("needs FP8 Tensor Cores (sm_89+)")
    why = fp8_rowwise.rowwise_native(str(dev))
    ex = Execution(PRESETS["fp8-rowwise"], dev)
    assert ex.supported and ex._native_fp8 == (why is None)
    assert ex.emulation_notes()[0] == "own float8 rowwise (torchao's recipe)"
    ok, reason, notes = support(PRESETS["torchao-fp8-rowwise"], dev)
    assert (ok, reason) == ((True, "") if why is None else (False, why))
    if why is not None:
        return
    m = route_linears(mlp().to(dev), Execution(PRESETS["torchao-fp8-rowwise"], dev))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = m(torch.randn(64, 32, device=dev))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["fp8-rowwise", "torchao-fp8-rowwise", "torchao-fp8-rowwise-gw-hp"])
def test_cuda_shapes_scaled_mm_refuses_run_the_emulation_and_say_so(preset: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dev = torch.device("cuda")
    ex = Execution(PRESETS[preset], dev)
    if not ex.supported:
        pytest.skip(ex.unsupported_reason)
    g = torch.Generator().manual_seed(9)
    a0, b0 = torch.randn(40, 24, generator=g), torch.randn(24, 8, generator=g)
    a, b = a0.to(dev).requires_grad_(), b0.to(dev).requires_grad_()
    y = ex.matmul(a, b)
    y.float().sum().backward()
    recipe = PRESETS[preset].recipe
    a2, b2 = a0.to(torch.bfloat16).requires_grad_(), b0.clone().requires_grad_()
    want = recipe_matmul(a2, b2, recipe, native=False)
    want.float().sum().backward()
    assert_bitwise([y.detach().cpu(), a.grad.cpu(), b.grad.cpu()], [want.detach(), a2.grad.to(torch.float32), b2.grad])
    assert ex.emulation_notes()[-1] == ("1 FP8 GEMMs emulated: dimensions not multiples of 16, which "
                                        "torch._scaled_mm requires")


@pytest.mark.cuda
def test_cuda_scaled_mm_keeps_the_exact_fp8_cancellation() -> None:
    """The GPU counterpart of the CPU residue above: _scaled_mm accumulates the FP8 products, then scales:
    exactly 0 (so on a GPU torchao's tensorwise loses that unit too, as the own path does)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs a CUDA device with FP8 Tensor Cores")
    row = [-16384.0, 12288.0, -2048.0, -10240.0, 5120.0, 6144.0, -1024.0, 6144.0] + [0.0] * 8
    qg = torch.tensor([row] * 16, device="cuda").to(torch.float8_e5m2)
    qa = torch.full((16, 16), 352.0, device="cuda").to(torch.float8_e4m3fn)
    sg, sa = torch.tensor(947271565312.0, device="cuda"), torch.tensor(570.5870361328125, device="cuda")
    out = fp8_rowwise._gemm(qg, sg, qa, sa, torch.bfloat16, fast_accum=False, native=True)
    assert torch.equal(out.float(), torch.zeros(16, 16, device="cuda"))
