"""MXFP8, MXFP4, NVFP4: bit for bit against torchao's quantization (the library path), known values (powers
of two, outliers, saturation, E8M0 edges, E2M1 ties, NaN and inf injected), the GEMM with both gradients,
routing from Execution, and the GPU (marked cuda)."""
from __future__ import annotations

import warnings

import pytest
import torch

from conftest import same_bits
from harness.values import mx
from harness.core.execution import Execution
from harness.core.strategy import PRESETS, support

CPU = torch.device("cpu")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
E2M1_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


@pytest.fixture(scope="module")
def torchao_mx():
    """torchao's MX and NVFP4 quantizers, dequantized to FP32: ``f(x, recipe) -> tensor``."""
    pytest.importorskip("torchao")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.prototype.mx_formats.mx_tensor import MXTensor
        from torchao.prototype.mx_formats.nvfp4_tensor import NVFP4Tensor, per_tensor_amax_to_scale

    def quantize(x: torch.Tensor, recipe: str) -> torch.Tensor:
        if recipe == "nvfp4":
            t = NVFP4Tensor.to_nvfp4(x, per_tensor_scale=per_tensor_amax_to_scale(x.abs().max()))
            return t.dequantize(torch.float32)
        dt = torch.float8_e4m3fn if recipe == "mxfp8" else torch.float4_e2m1fn_x2
        return MXTensor.to_mx(x, dt, 32).dequantize(torch.float32)
    return quantize


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous().view(torch.int32)




@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4", "nvfp4"])
def test_bit_for_bit_with_torchao_on_random_blocks(recipe: str, torchao_mx) -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(4):
        # rows 2^-40 .. 2^40 apart, one 10^4 outlier, a zero block and exact ties
        x = torch.randn(16, 128, generator=g) * torch.exp2(torch.randint(-40, 40, (16, 1), generator=g).float())
        x[0, 5], x[3, 32:64], x[5, :8] = 1e4, 0.0, torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])
        assert torch.equal(_bits(mx.quantize(x, recipe)), _bits(torchao_mx(x, recipe))), (recipe, trial)


def test_e2m1_rounds_to_nearest_even_and_saturates(torchao_mx) -> None:
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0])
    assert mx.round_e2m1(ties).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -2.0, -4.0]
    assert mx.round_e2m1(torch.tensor([5.5, 6.0, 7.0, 1e30, -1e30])).tolist() == [6.0, 6.0, 6.0, 6.0, -6.0]
    grid = torch.tensor(E2M1_GRID)
    assert torch.equal(mx.round_e2m1(grid), grid) and torch.equal(mx.round_e2m1(-grid), -grid)
    assert mx.round_e2m1(torch.tensor([float("nan")])).isnan().all()
    # every multiple of 1/64 in [-8, 8] as torchao's E2M1 cast rounds it
    from torchao.prototype.custom_fp_utils import _f32_to_floatx_unpacked, _floatx_unpacked_to_f32
    dense = torch.arange(-512, 513).float() / 64
    ref = _floatx_unpacked_to_f32(_f32_to_floatx_unpacked(dense, 2, 1), 2, 1)
    assert torch.equal(mx.round_e2m1(dense), ref)


def test_powers_of_two_are_exact_in_every_recipe() -> None:
    x = torch.exp2(-torch.arange(32).float() % 9).reshape(1, 32)  # 1 .. 2^-8 in one block
    assert torch.equal(mx.quantize(x, "mxfp8"), x)
    small = torch.exp2(-torch.arange(32).float() % 2).reshape(1, 32)  # 1 and 0.5: E2M1 holds them
    assert torch.equal(mx.quantize(small, "mxfp4"), small)
    assert torch.equal(mx.quantize(small[:, :16], "nvfp4"), small[:, :16])


def test_one_huge_outlier_costs_only_its_own_block() -> None:
    x = torch.ones(1, 64)
    x[0, 0] = 1e4  # floor(log2 1e4) = 13
    q8, q4 = mx.quantize(x, "mxfp8"), mx.quantize(x, "mxfp4")
    assert q8[0, 1:].eq(1.0).all()  # 1 / 2^(13-8) = 2^-5 is an E4M3 normal: kept
    assert q8[0, 0].item() == 10240.0  # 1e4 / 2^5 = 312.5 -> 320 (E4M3 spacing 32 in [256, 448]) -> 320 * 2^5
    assert q4[0, 1:32].eq(0.0).all() and q4[0, 32:].eq(1.0).all()  # 1 / 2^11 rounds to 0 in E2M1; next block exact
    assert q4[0, 0].item() == 8192.0  # 1e4 / 2^11 = 4.88 -> 4 (spacing 2) -> 4 * 2^11


def test_floor_scale_saturates_the_top_of_a_block() -> None:
    """FLOOR takes 2^floor(log2 amax): amax 480 keeps scale 2^0, and 480 > 448 saturates (OCP's known cost)."""
    assert mx.quantize(torch.full((1, 32), 480.0), "mxfp8")[0, 0].item() == 448.0
    assert mx.quantize(torch.full((1, 32), 7.5), "mxfp4")[0, 0].item() == 6.0


def test_e8m0_scale_edges() -> None:
    def biased(amax: float, emax: int = 8) -> int:
        return int(mx.mx_scale_exponents(torch.tensor([[amax, 0.0]]), emax)[0])
    assert biased(1.0) == 127 - 8
    assert biased(448.0) == 127 and biased(3.0e38) == 127 + 127 - 8
    assert biased(2.0**-118) == 1 and biased(2.0**-119) == 0 and biased(0.0) == 0 and biased(1e-45) == 0
    assert biased(float("nan")) == 255 and biased(float("inf")) == 128 + 127 - 8
    assert biased(6.0, emax=2) == 127  # E2M1: floor(log2 6) - 2 = 0


def test_smallest_scale_is_used_both_ways_unlike_torchao(torchao_mx) -> None:
    """A block whose scale is E8M0's 2^-127 is exact here; torchao divides by 2^-126 and multiplies by 2^-127."""
    x = torch.full((1, 32), 2.0**-120)
    assert torch.equal(mx.quantize(x, "mxfp8"), x)
    assert torch.equal(torchao_mx(x, "mxfp8"), x / 2)


@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4", "nvfp4"])
@pytest.mark.parametrize("pos", [0, 7, 15])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_stay_non_finite_bit_for_bit_with_torchao(recipe: str, pos: int, bad: float, torchao_mx) -> None:
    x = torch.full((2, 64), 1.5)
    x[1, pos] = bad
    q = mx.quantize(x, recipe)
    assert same_bits(q, torchao_mx(x, recipe))
    block = mx.NVFP4_BLOCK if recipe == "nvfp4" else mx.MX_BLOCK
    if recipe == "nvfp4":  # the tensor scale is non-finite: every value
        assert q.isnan().all()
    elif bad != bad:  # NaN: E8M0's NaN scale, the whole block
        assert q[1, :block].isnan().all() and q[1, block:].eq(1.5).all() and q[0].eq(1.5).all()
    else:  # inf: scale 2^(128 - emax), the inf survives and its neighbours flush to 0
        assert q[1, pos].item() == bad and q[1, :block].isfinite().sum() == block - 1
        assert q[1, :block].nan_to_num(posinf=0.0, neginf=0.0).eq(0).all() and q[1, block:].eq(1.5).all()


def test_nvfp4_known_values_and_zero_tensor(torchao_mx) -> None:
    # tensor amax 2688 * 2^-4 = 168: tensor scale 2^-4; block 0 reaches 448 * 2^-4 per E2M1 unit
    b0 = torch.tensor(E2M1_GRID * 2) * (448 * 2.0**-4)
    b1 = torch.tensor(E2M1_GRID * 2) * 2.0**-4  # amax 6 * 2^-4: block scale 1
    x = torch.cat([b0, b1]).reshape(1, 32)
    assert torch.equal(mx.quantize(x, "nvfp4"), x) and torch.equal(torchao_mx(x, "nvfp4"), x)
    z = torch.zeros(1, 16)
    assert torch.equal(mx.quantize(z, "nvfp4"), z)
    assert torchao_mx(z, "nvfp4").isnan().all()  # torchao: tensor scale 0, 0/0


def _exact_mx_operands(m: int, k: int, n: int, g: torch.Generator):
    """Values in E2M1's grid times 2^j per 32-block along both dims, every block with amax 6 * 2^j: exact
    under mxfp8 and mxfp4 along either dimension (power-of-two scales)."""
    def make(r: int, c: int) -> torch.Tensor:
        v = torch.tensor([0.5, 1.0, 1.5, 2.0, 3.0, 4.0])[torch.randint(0, 6, (r, c), generator=g)]
        v = v * (torch.randint(0, 2, (r, c), generator=g).float() * 2 - 1)
        v[::32, :] = 6.0
        v[:, ::32] = 6.0
        return v * torch.exp2(-(torch.arange(r) // 32).float())[:, None] * torch.exp2(-(torch.arange(c) // 32).float())
    return make(m, k), make(k, n), make(m, n)


@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4"])
def test_gemm_and_gradients_exact_where_quantization_is(recipe: str) -> None:
    x, w, up = _exact_mx_operands(64, 96, 64, torch.Generator().manual_seed(1))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = mx.mx_matmul(xr, wr, recipe, torch.float32)
    (y * up).sum().backward()
    assert torch.equal(y, x @ w)
    assert torch.equal(xr.grad, up @ w.t()) and torch.equal(wr.grad, x.t() @ up)


def test_gradients_are_quantized_along_their_reduction_dimension() -> None:
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(64, 64, generator=g), torch.randn(64, 64, generator=g)
    up = torch.randn(64, 64, generator=g)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (mx.mx_matmul(xr, wr, "mxfp4", torch.float32) * up).sum().backward()
    q = mx.quantize
    assert torch.equal(xr.grad, q(up, "mxfp4") @ q(w, "mxfp4").t())
    assert torch.equal(wr.grad, q(x.t().contiguous(), "mxfp4") @ q(up.t().contiguous(), "mxfp4").t())
    assert not torch.equal(wr.grad, x.t() @ up)


@pytest.mark.parametrize("name", ["mxfp8", "mxfp4", "nvfp4"])
def test_execution_routes_the_recipe_and_support_names_the_emulation(name: str) -> None:
    ex = Execution(PRESETS[name], CPU)
    assert ex.supported and ex.routes_gemms
    a, b = torch.randn(4, 64), torch.randn(64, 8)
    assert torch.equal(ex.matmul(a, b), mx.mx_matmul(a, b, name, torch.bfloat16))
    assert ex.emulated_gemms == 1
    ok, why, notes = support(PRESETS[name], CPU)
    assert ok and "emulated" in notes[0] and "Blackwell" in notes[0]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("recipe", ["mxfp8", "mxfp4", "nvfp4"])
def test_gpu_quantization_is_torchaos_on_the_gpu_bit_for_bit(recipe: str, torchao_mx) -> None:
    """On the GPU the emulation is torchao's there, bit for bit. MXFP8 and MXFP4 are also the CPU's (power-
    of-two scales); NVFP4 is not: CUDA divides by a Python number as a multiply by its FP32 reciprocal
    (``div_true_kernel_cuda``), and both torchao and this code divide the amaxes by 6 and by 448 * 6 so: on an
    H100 values moved by one ulp against the CPU's. torchao and the emulation agree per device: that is the
    oracle."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(-20, 20, (64, 1), generator=g).float())
    gpu = mx.quantize(x.cuda(), recipe)
    assert same_bits(gpu, torchao_mx(x.cuda(), recipe))
    cpu = mx.quantize(x, recipe)
    if recipe == "nvfp4":  # a scale one ulp off can move an element across an E2M1 rounding boundary: rare
        close = (gpu.cpu() - cpu).abs() <= 2.0**-21 * cpu.abs()
        assert close.float().mean() >= 0.99 and not torch.equal(gpu.cpu(), cpu)
    else:
        assert torch.equal(_bits(gpu.cpu()), _bits(cpu))
    notes = support(PRESETS[recipe], torch.device("cuda"))[2]
    assert any("Blackwell" in n for n in notes)
