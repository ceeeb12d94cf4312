"""Every GEMM a model runs reaches the FP8 / emulated-TF32 path (harness.core.gemm_routing), bit for bit
against a hand-written emulation, and the coverage says what ran in the compute format."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.core.execution import Execution, gemm_coverage, route_gemms
from harness.values.formats import quantize
from harness.values.fp8 import E4M3, E5M2, quantize_fp8
from harness.core.strategy import parse


class Mixed(nn.Module):
    """Conv2d, nn.MultiheadAttention (functional in-projection and SDPA), Linear, and a functional matmul
    with a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=True)
        self.lin = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(4, 3) / 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).flatten(2).transpose(1, 2)
        a, _ = self.mha(h, h, h, need_weights=False)
        return self.lin(a) @ self.w


def _model_and_input() -> tuple[Mixed, torch.Tensor]:
    torch.manual_seed(0)
    return Mixed(), torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))


def _fp8(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Hand-written tensorwise FP8 GEMM: E4M3 operands scaled by 448/amax, FP32 products (autocast off:
    an FP8 GEMM accumulates in FP32), BF16 out."""
    with torch.autocast("cpu", enabled=False):
        return _fp8_gemm(a, b)


def _fp8_gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    sa, sb = E4M3.max / a.detach().abs().max().float(), E4M3.max / b.detach().abs().max().float()
    qa, qb = quantize_fp8(a, E4M3, sa).float(), quantize_fp8(b, E4M3, sb).float()
    return ((qa.reshape(-1, qa.shape[-1]) @ qb) / (sa * sb)).to(torch.bfloat16).reshape(*a.shape[:-1], b.shape[-1])


def _fp8_conv(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    sx, sw = E4M3.max / x.abs().max().float(), E4M3.max / w.abs().max().float()
    with torch.autocast("cpu", enabled=False):
        y = F.conv2d(quantize_fp8(x, E4M3, sx).float(), quantize_fp8(w, E4M3, sw).float(), None, 1, 1)
    return (y / (sx * sw)).to(torch.bfloat16)


def _t(x: torch.Tensor) -> torch.Tensor:
    return quantize(x, "tf32")


def _by_hand(m: Mixed, x: torch.Tensor, strategy: str) -> torch.Tensor:
    """The model's forward written out, every GEMM emulated by hand (FP8: under BF16 autocast as the
    strategy runs the rest of the forward; TF32: FP32 with operands rounded, SDPA's math decomposition)."""
    fp8 = strategy == "fp8-tensorwise"
    mm = _fp8 if fp8 else (lambda a, b: _t(a) @ _t(b))
    conv = _fp8_conv if fp8 else (lambda a, b: F.conv2d(_t(a), _t(b), None, 1, 1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fp8):
        h = (conv(x, m.conv.weight) + m.conv.bias.reshape(-1, 1, 1)).flatten(2).transpose(1, 2)
        b, t, e = h.shape
        hq = h.transpose(0, 1)  # MHA runs sequence-first
        proj = mm(hq, m.mha.in_proj_weight.t()) + m.mha.in_proj_bias
        q, k, v = proj.unflatten(-1, (3, e)).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
        q, k, v = (z.view(t, b * 2, e // 2).transpose(0, 1).view(b, 2, t, e // 2) for z in (q, k, v))
        if fp8:  # the attention products are outside the FP8 recipe: torch's own SDPA under autocast
            att = F.scaled_dot_product_attention(q, k, v)
        else:
            s = (_t(q) @ _t(k.transpose(-2, -1))) * (1.0 / math.sqrt(e // 2))
            att = _t(torch.softmax(s, dim=-1)) @ _t(v)
        att = att.permute(2, 0, 1, 3).contiguous().view(b * t, e)
        a = (mm(att, m.mha.out_proj.weight.t()) + m.mha.out_proj.bias).view(t, b, e).transpose(0, 1)
        return mm(mm(a, m.lin.weight.t()) + m.lin.bias, m.w)


@pytest.mark.parametrize("strategy", ["fp8-tensorwise", "tf32"])
def test_every_gemm_of_a_model_is_routed_bit_for_bit(strategy: str) -> None:
    m, x = _model_and_input()
    ex = Execution(parse(strategy), "cpu")
    routed = route_gemms(copy.deepcopy(m), ex)
    with ex.autocast():
        y = routed(x)
    expected = _by_hand(m, x, strategy)
    assert y.dtype == expected.dtype and torch.equal(y, expected)
    native = m(x)  # the same model in FP32: the emulation did change the numbers
    assert not torch.equal(y.float(), native)
    cov = gemm_coverage(routed, ex)
    assert cov["covered"] == cov["total"] == (5 if strategy == "fp8-tensorwise" else 6)
    assert cov["by_type"]["Conv2d"] == [1, 1] and cov["by_type"]["MultiheadAttention.in_proj"] == [1, 1]
    assert cov["by_type"]["Linear"] == [2, 2] and cov["by_type"]["matmul (functional)"] == [1, 1]
    if strategy == "fp8-tensorwise":  # attention products: outside the recipe, listed apart
        assert cov["outside_recipe"] == {"attention (SDPA)": 1} and "convolutions" in cov["scope"]
    else:
        assert cov["by_type"]["attention (SDPA)"] == [1, 1] and "outside_recipe" not in cov


def test_fp8_convolution_backward_is_the_hand_written_emulation() -> None:
    """dL/dW of an FP8 conv: the E5M2 gradient (scale 57344/amax) against the E4M3 input, in FP32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(2, 2, 5, 5, generator=torch.Generator().manual_seed(2))
    t = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    ex = Execution(parse("fp8-tensorwise"), "cpu")
    routed = route_gemms(copy.deepcopy(conv), ex)
    with ex.autocast():
        y = routed(x)
    (y.float() * t).sum().backward()
    g = t.to(torch.bfloat16)  # the gradient reaching the GEMM's BF16 output
    sx, sg = E4M3.max / x.abs().max(), E5M2.max / g.abs().max().float()
    sw = E4M3.max / conv.weight.detach().abs().max()
    qx, qg = quantize_fp8(x, E4M3, sx).float(), quantize_fp8(g, E5M2, sg).float()
    qw = quantize_fp8(conv.weight.detach(), E4M3, sw).float()
    gw = torch.nn.grad.conv2d_weight(qx, conv.weight.shape, qg, padding=1) / (sg * sx)
    assert torch.equal(routed.weight.grad, gw)
    assert torch.equal(routed.bias.grad, t.sum(dim=(0, 2, 3)))
    x2 = x.clone().requires_grad_()
    with ex.autocast():
        y2 = routed(x2)
    (y2.float() * t).sum().backward()
    gx = torch.nn.grad.conv2d_input(x.shape, qw, qg, padding=1) / (sg * sw)
    assert torch.equal(x2.grad, gx)


def test_delayed_scaling_keeps_one_history_per_call_site() -> None:
    """fp8-delayed: each GEMM of the forward has its own key, the same one on every step."""
    m, x = _model_and_input()
    ex = Execution(parse("fp8-delayed"), "cpu")
    routed = route_gemms(copy.deepcopy(m), ex)
    for _ in range(2):
        with ex.autocast():
            routed(x)
    assert set(ex.gemm_sites) == {"conv", "mha", "mha.out_proj", "lin", "w", "sdpa"}
    assert {k.split(".")[0] for k in ex.fp8_history._h} == {"conv", "mha", "lin", "w"}
    assert ex.emulated_gemms == 2 * 5


def test_a_recipe_without_a_convolution_leaves_it_uncovered_not_run_as_another() -> None:
    """A recipe whose convolution is not defined (rowwise here) reports the conv as not covered."""
    m, x = _model_and_input()
    ex = Execution(parse("fp8-rowwise"), "cpu")
    routed = route_gemms(copy.deepcopy(m), ex)
    with ex.autocast():
        routed(x)
    cov = gemm_coverage(routed, ex)
    assert cov["by_type"]["Conv2d"] == [0, 1] and cov["covered"] == cov["total"] - 1
    assert "conv" not in ex.routed_keys


def test_native_strategies_leave_the_model_alone() -> None:
    m, x = _model_and_input()
    ex = Execution(parse("bf16"), "cpu")
    assert route_gemms(m, ex) is m and "forward" not in vars(m)
    assert gemm_coverage(m, ex)["covered"] == gemm_coverage(m, ex)["total"] == 4


def test_attention_products_are_routed_under_tf32_and_left_in_bf16_under_fp8() -> None:
    """bmm of two activations (MHA with attention weights): TF32 rounds them, FP8 lists them apart."""
    m, x = _model_and_input()
    for name, expect in (("tf32", {"bmm (activations)": [2, 2]}), ("fp8-tensorwise", {})):
        ex = Execution(parse(name), "cpu")
        routed = route_gemms(copy.deepcopy(m.mha), ex)
        h = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(4))
        with ex.autocast():
            routed(h, h, h)  # need_weights=True: bmm, softmax, bmm
        cov = gemm_coverage(routed, ex)
        assert {k: v for k, v in cov["by_type"].items() if "bmm" in k} == expect
        assert cov.get("outside_recipe", {}) == ({} if name == "tf32" else {"bmm (activations)": 2})


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_every_gemm_is_covered_and_the_fp8_convolution_is_noted() -> None:
    """On a GPU: F.linear and the functional matmul through torch._scaled_mm (dimensions multiples of 16),
    the convolution as the FP32 emulation of an FP8 one, named in the record's notes; gradients reach
    every parameter."""
    torch.manual_seed(0)
    m = nn.ModuleDict({"conv": nn.Conv2d(1, 16, 3, padding=1), "mha": nn.MultiheadAttention(16, 2, batch_first=True),
                       "lin": nn.Linear(16, 16)}).cuda()
    w = nn.Parameter(torch.randn(16, 16, device="cuda") / 4)

    class Big(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m, self.w = m, w

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.m["conv"](x).flatten(2).transpose(1, 2)
            a, _ = self.m["mha"](h, h, h, need_weights=False)
            return self.m["lin"](a) @ self.w

    ex = Execution(parse("fp8-tensorwise"), "cuda")
    routed = route_gemms(Big(), ex)
    with ex.autocast():
        y = routed(torch.randn(4, 1, 4, 4, device="cuda"))
    y.float().sum().backward()
    cov = gemm_coverage(routed, ex)
    assert cov["covered"] == cov["total"] == 5 and torch.isfinite(y).all()
    assert any("convolution" in n for n in ex.emulation_notes())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in routed.parameters())
