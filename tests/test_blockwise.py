"""Blockwise FP8 (DeepSeek-V3): tile and block scales, the modelled FP8 accumulator, promotion, autograd,
routing from Execution, the long-K scenario's mechanism, and the GPU paths (marked cuda)."""
from __future__ import annotations

import pytest
import torch

from harness.values import blockwise as bw
from harness.core.execution import Execution
from harness.core.strategy import PRESETS, parse, support
from harness.values.tensor_core_model import TensorCoreModel

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _e4m3_values(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Random E4M3 numbers (3 fraction bits, exponents -6..8, random signs), every 17th a subnormal."""
    sig = 1 + torch.randint(0, 8, shape, generator=g).float() / 8
    sign = torch.randint(0, 2, shape, generator=g).float() * 2 - 1
    x = (sign * sig * torch.exp2(torch.randint(-6, 8, shape, generator=g).float())).clamp(-448, 448)
    sub = sign * torch.randint(1, 8, shape, generator=g).float() * 2.0**-9
    return torch.where(torch.arange(x.numel()).reshape(shape) % 17 == 0, sub, x)


def _exact_operands(m: int, k: int, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (m x k), w (k x n), upstream gradient (m x n) whose every 1x128 tile, 128x1 tile and 128x128 block
    holds 3.5 * 2^j (power-of-two scales), with the second 128-row/column halves scaled by 2^-3 so that a
    factor applied to the wrong tile shows; every product sum fits the 14-bit accumulator per 128."""
    def make(r: int, c: int) -> torch.Tensor:
        base = torch.tensor([0.5, 1.0, 2.0])[torch.randint(0, 3, (r, c), generator=g)]
        base = base * (torch.randint(0, 2, (r, c), generator=g).float() * 2 - 1)
        base[::128, :] = 3.5
        base[:, ::128] = 3.5
        sr = torch.where(torch.arange(r) >= 128, 2.0**-3, 1.0)[:, None]
        sc = torch.where(torch.arange(c) >= 128, 2.0**-3, 1.0)[None, :]
        return base * sr * sc
    return make(m, k), make(k, n), make(m, n)


def test_block_scales_are_fmax_over_amax_per_tile() -> None:
    x = torch.ones(2, 256)
    x[0, 3], x[0, 200], x[1, 130] = 448.0, 3.5, -7.0
    assert bw.block_scales(x, 1, 128).tolist() == [[1.0, 128.0], [448.0, 64.0]]
    assert bw.block_scales(x.t(), 128, 128).tolist() == [[1.0], [64.0]]
    assert bw.block_scales(torch.zeros(1, 128), 1, 128).tolist() == [[1.0]]  # amax 0: scale 1, never inf


def test_one_outlier_costs_only_its_own_tile() -> None:
    """A 1000x channel flushes small values under one scale per tensor; a tile keeps the rest exact."""
    x = torch.full((1, 256), 2.0**-10)
    x[0, 0] = 1000.0
    q, d = bw.quantize_blocks(x, 1, 128)
    y = q * d.repeat_interleave(128, 1)
    assert y[0, 128:].eq(2.0**-10).all()  # the other tile: exact
    assert y[0, 1:128].eq(0).all()  # the outlier's tile: 2^-10 * 448/1000 is below E4M3's smallest subnormal


def test_nonfinite_input_stays_nonfinite_in_its_rows_only() -> None:
    a = torch.full((4, 256), 3.5)  # 448 / 3.5 = 2^7: exact scales
    b = torch.full((256, 8), 3.5)
    for bad in (float("inf"), float("nan")):
        a2 = a.clone()
        a2[1, 200] = bad
        y = bw.blockwise_matmul(a2, b, 128, torch.float32)
        assert y[1].isnan().all(), bad
        assert y[[0, 2, 3]].eq(256 * 12.25).all()


def test_unit_factors_and_no_promotion_are_the_tensor_core_model_itself() -> None:
    """blockwise_gemm works in float32 (exact for FP8 products); the model's own matmul in float64."""
    g = torch.Generator().manual_seed(0)
    a, b = _e4m3_values((6, 256), g), _e4m3_values((256, 5), g)
    model = bw.HOPPER_FP8
    ones_a, ones_b = torch.ones(6, 2), torch.ones(2, 5)
    got = bw.blockwise_gemm(a, ones_a, b, ones_b, promote=0)
    assert torch.equal(got, model.matmul(a, b, torch.zeros(6, 5)))
    per128 = model.matmul(a[:, :128], b[:128], torch.zeros(6, 5)) + model.matmul(a[:, 128:], b[128:], torch.zeros(6, 5))
    assert torch.equal(bw.blockwise_gemm(a, ones_a, b, ones_b, promote=128), per128)
    assert model == TensorCoreModel("fp8_e4m3", block=32, alignment_bits=14, accumulator_bits=14,
                                    alignment_reference="exponent_sum")


def test_promotion_keeps_products_the_14_bit_accumulator_loses_whole() -> None:
    """128 products of 12.25 make 1568 (exponent 10); with 14 bits kept the next tile's products of
    12.25 * 2^-10 (below 2^-3) are truncated away unless the partial sum is promoted first."""
    a = torch.cat([torch.full((1, 128), 3.5), torch.full((1, 128), 3.5 * 2.0**-10)], dim=1)
    b = torch.full((256, 1), 3.5)
    exact = 128 * 12.25 + 128 * 12.25 * 2.0**-10
    assert bw.blockwise_matmul(a, b, 128, torch.float32).item() == exact == 1569.53125
    assert bw.blockwise_matmul(a, b, 0, torch.float32).item() == 1568.0
    assert bw.blockwise_matmul(a, b, 256, torch.float32).item() == 1568.0  # one interval spanning both tiles


def test_an_interval_spanning_tiles_gives_each_product_its_own_tiles_factor() -> None:
    """promote=96: the interval [96, 192) holds products of tile 0 (factor 2^-14) and tile 1 (2^-11)."""
    a = torch.zeros(1, 256)
    a[0, 100], a[0, 150] = 3.5, 3.5 * 2.0**-3  # each tile's amax: scales 2^7 and 2^10
    b = torch.full((256, 1), 3.5)
    for promote in (96, 0, 128, 32):
        assert bw.blockwise_matmul(a, b, promote, torch.float32).item() == 12.25 + 12.25 / 8, promote


def test_forward_and_both_gradients_are_exact_where_every_step_is() -> None:
    g = torch.Generator().manual_seed(1)
    x, w, up = _exact_operands(256, 256, 256, g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = bw.blockwise_matmul(xr, wr, 128, torch.float32)
    (y * up).sum().backward()
    x64, w64, up64 = x.double(), w.double(), up.double()
    assert torch.equal(y.double(), x64 @ w64)
    assert torch.equal(xr.grad.double(), up64 @ w64.t())
    assert torch.equal(wr.grad.double(), x64.t() @ up64)


def test_without_promotion_the_same_gemm_errs() -> None:
    g = torch.Generator().manual_seed(1)
    x, w, _ = _exact_operands(32, 4096, 32, g)
    x, w = x.abs(), w.abs()  # same-sign sums: the truncation errors add up
    ref = x.double() @ w.double()
    err = {p: float(((bw.blockwise_matmul(x, w, p, torch.float32).double() - ref).abs() / ref).max()) for p in (0, 128)}
    assert err[128] == 0.0
    assert err[0] > 1e-2


def test_long_k_error_grows_without_promotion_and_stays_bounded_with_it() -> None:
    """The fp8_long_k scenario's mechanism: its inputs, K = 512..4096."""
    from suites.fp8_accumulation import _inputs, max_rel_err
    errs: dict[int, list[float]] = {0: [], 128: []}
    for k in (512, 1024, 2048, 4096):
        inp = _inputs({"K": k, "data": "same_sign"}, torch.Generator().manual_seed(k))
        ref = inp["a"].double() @ inp["b"].double()
        for p in errs:
            errs[p].append(max_rel_err(bw.blockwise_matmul(inp["a"], inp["b"], p, torch.float32), ref))
    assert errs[0] == sorted(errs[0]) and errs[0][-1] > 8 * errs[0][0] and errs[0][-1] > 2e-2
    assert max(errs[128]) < 1e-3 and max(errs[128]) < errs[0][0]


def test_execution_routes_the_recipe_and_names_the_emulation() -> None:
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(8, 256, generator=g), torch.randn(256, 16, generator=g)
    for spec, promote in (("fp8-blockwise", 128), ("compute=fp8,fp8=blockwise(0)", 0), ("compute=fp8,fp8=blockwise(64)", 64)):
        ex = Execution(parse(spec), CPU)
        assert ex.supported and ex.routes_gemms
        assert torch.equal(ex.matmul(a, b), bw.blockwise_matmul(a, b, promote, torch.bfloat16))
        assert any("accumulator modelled" in n for n in ex.emulation_notes())
    y0 = Execution(parse("compute=fp8,fp8=blockwise(0)"), CPU).matmul(a.abs(), b.abs(), out_dtype=torch.float32)
    y1 = Execution(PRESETS["fp8-blockwise"], CPU).matmul(a.abs(), b.abs(), out_dtype=torch.float32)
    assert not torch.equal(y0, y1)


def test_support_names_the_emulation_and_the_recipe_is_no_longer_unbuilt() -> None:
    ok, why, notes = support(PRESETS["fp8-blockwise"], CPU)
    assert ok and not why and "promoted to FP32 every 128 products" in notes[0]
    assert "never (promote=0)" in support(parse("compute=fp8,fp8=blockwise(0)"), CPU)[2][0]


# -- the GPU paths ----------------------------------------------------------------------------------------
@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("promote", [128, 64, 0])
def test_gpu_paths_agree_with_the_emulation_where_every_step_is_exact(promote: int) -> None:
    g = torch.Generator().manual_seed(3)
    x, w, up = _exact_operands(256, 256, 256, g)
    dev = torch.device("cuda")
    notes: set[str] = set()
    xr, wr = x.to(dev).requires_grad_(), w.to(dev).requires_grad_()
    y = bw.blockwise_matmul(xr, wr, promote, torch.float32, native=True, notes=notes)
    (y * up.to(dev)).sum().backward()
    x64, w64, up64 = x.double(), w.double(), up.double()
    if promote:  # exact on every path; without promotion the 14-bit sums of 256 products need not be
        assert torch.equal(y.double().cpu(), x64 @ w64), notes
        assert torch.equal(xr.grad.double().cpu(), up64 @ w64.t()), notes
        assert torch.equal(wr.grad.double().cpu(), x64.t() @ up64), notes
    else:
        assert torch.equal(y.cpu(), bw.blockwise_matmul(x, w, 0, torch.float32))
    assert notes  # which path ran is named
    if promote == 128:  # torch's blockwise GEMM, or the reason it was not used
        assert any("scaled_mm" in n for n in notes), notes


@cuda
@pytest.mark.cuda
def test_gpu_promotion_matches_the_modelled_accumulator_on_random_fp8() -> None:
    """The FP8 Tensor Cores inside each 64-product interval against the H200 model: within the truncation of
    two 32-product steps of a 14-bit accumulator (2 * 2^-13), whatever order cuBLAS sums in."""
    g = torch.Generator().manual_seed(4)
    a, b = _e4m3_values((64, 1024), g).abs(), _e4m3_values((1024, 64), g).abs()
    notes: set[str] = set()
    gpu = bw.blockwise_matmul(a.cuda(), b.cuda(), 64, torch.float32, native=True, notes=notes).cpu()
    cpu = bw.blockwise_matmul(a, b, 64, torch.float32)
    assert any("torch._scaled_mm per 64" in n for n in notes), notes
    assert ((gpu.double() - cpu.double()).abs() / cpu.double().abs()).max() <= 2.0**-12


@cuda
@pytest.mark.cuda
def test_long_k_scenario_records_scaled_mm_with_and_without_promotion() -> None:
    from suites.fp8_accumulation import _inputs, _run
    inp = _inputs({"K": 4096, "data": "same_sign"}, torch.Generator().manual_seed(0))
    out = _run(Execution(PRESETS["fp8-blockwise"], torch.device("cuda")), inp, {"K": 4096, "data": "same_sign"})
    errs = out.extra["scaled_mm_max_rel_err"]
    # measured, not judged: what cuBLAS does over long K, in its default mode and with fast accumulation
    assert set(errs) == {"one_gemm", "chunks_128", "one_gemm_fast_accum", "chunks_128_fast_accum"}
    assert all(0.0 <= e < 1.0 for e in errs.values()), errs
    assert out.extra["max_rel_err"] < 1e-2
    if torch.cuda.get_device_capability()[0] == 9:  # Hopper: the ~14-bit accumulator of DeepSeek-V3's report
        # fast accumulation over all of K loses what promotion every 128 products keeps (an H100 ran torchao's
        # tensorwise recipe, which uses it, to 7.8e-2 here); the default mode promotes by itself (5.5e-4)
        assert errs["one_gemm_fast_accum"] > 10 * errs["chunks_128_fast_accum"], errs
        assert errs["one_gemm"] <= 2 * errs["chunks_128"], errs


# -- the GPU paths' wiring, driven on the CPU (torch's CPU _scaled_mm accumulates in FP32) ------------------
def _layouts(x: torch.Tensor, w: torch.Tensor, up: torch.Tensor):
    """(qa, ga, a_rows, qb, gb, b_cols, exact) of the forward, input-gradient and weight-gradient GEMMs."""
    qx, gx = bw.quantize_blocks(x, 1, 128)
    qw, gw = bw.quantize_blocks(w, 128, 128)
    qg, gg = bw.quantize_blocks(up, 1, 128)
    qxt, gxt = bw.quantize_blocks(x.t(), 1, 128)
    qgt, ggt = bw.quantize_blocks(up, 128, 1)
    x64, w64, up64 = x.double(), w.double(), up.double()
    return [(qx, gx, 1, qw, gw, 128, x64 @ w64), (qg, gg, 1, qw.t(), gw.t(), 128, up64 @ w64.t()),
            (qxt, gxt, 1, qgt, ggt, 1, x64.t() @ up64)]


def test_native_paths_apply_each_tiles_factor(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.values import blockwise_native as bn
    monkeypatch.setattr(bn, "_BROKEN", {})
    monkeypatch.setattr(bn, "_CHECKED", set())
    x, w, up = _exact_operands(256, 256, 256, torch.Generator().manual_seed(5))
    for qa, ga, a_rows, qb, gb, b_cols, exact in _layouts(x, w, up):
        for promote in (128, 64):
            notes: set[str] = set()
            out = bn.native_gemm(qa, ga, a_rows, qb, gb, b_cols, promote, notes)
            assert out is not None and torch.equal(out.double(), exact), (b_cols, promote, notes)
    assert bn.native_gemm(*_layouts(x, w, up)[0][:6], 0, set()) is None  # no native GEMM leaves out promotion


def test_a_native_result_that_disagrees_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.values import blockwise_native as bn
    monkeypatch.setattr(bn, "_BROKEN", {})
    monkeypatch.setattr(bn, "_CHECKED", set())
    monkeypatch.setattr(bn.torch.nn.functional, "ScalingType", bn.torch.nn.functional.ScalingType, raising=False)
    monkeypatch.setattr(bn, "blockwise_scaled_mm", lambda qa, ga, qb, gb, b_cols: 2 * (qa @ qb))  # a wrong layout
    x, w, up = _exact_operands(256, 256, 256, torch.Generator().manual_seed(6))
    qa, ga, a_rows, qb, gb, b_cols, exact = _layouts(x, w, up)[0]
    notes: set[str] = set()
    out = bn.native_gemm(qa, ga, a_rows, qb, gb, b_cols, 128, notes)
    assert torch.equal(out.double(), exact)
    assert "disagrees" in bn._BROKEN["scaled_mm:128"] and any("not used" in n for n in notes), notes


@pytest.mark.parametrize("b_cols", [128, 1])
def test_blockwise_scale_layouts_pass_torchs_own_checks(b_cols: int) -> None:
    """torch's shape and stride checks of the blockwise GEMM (its meta kernel) accept the layouts the GPU
    path passes, K/128 = 3 included (128x128 scales padded to a multiple of 4 rows)."""
    from harness.values.blockwise_native import blockwise_scaled_mm
    if not hasattr(getattr(torch.nn.functional, "ScalingType", None), "BlockWise1x128"):
        pytest.skip(f"torch {torch.__version__} has no blockwise-scaled GEMM")
    meta = torch.device("meta")
    m, k, n = 256, 384, 256
    gb = torch.ones(3, n // 128 if b_cols == 128 else n, device=meta)
    out = blockwise_scaled_mm(torch.ones(m, k, device=meta), torch.ones(m, 3, device=meta),
                              torch.ones(k, n, device=meta), gb, b_cols)
    assert out.shape == (m, n) and out.dtype == torch.float32
