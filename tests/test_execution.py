"""Execution: activations and parameters in the strategy's formats, autocast and flags, GEMM routing."""
from __future__ import annotations

import math

import pytest
import torch

from harness.core.execution import FP64, Execution, route_linears
from harness.values.formats import quantize
from harness.core.strategy import parse

CPU = torch.device("cpu")


def ex_of(name: str) -> Execution:
    return Execution(parse(name), CPU)


def test_act_rounds_to_the_activation_format() -> None:
    x = torch.tensor([70000.0, 1e-8, 1 + 2**-11, 1 + 2**-8])
    y = ex_of("fp16").act(x)
    assert y.dtype == torch.float16 and y.float().tolist() == [math.inf, 0.0, 1.0, 1 + 2**-8]
    assert ex_of("bf16").act(x).dtype == torch.bfloat16 and ex_of("bf16").act(x).float().tolist()[3] == 1.0
    assert torch.equal(ex_of("fp32").act(x), x) and ex_of("tf32").act(x).dtype == torch.float32
    assert ex_of("fp8-tensorwise").act(x).dtype == torch.bfloat16  # FP8 recipes keep BF16 between layers
    ints = torch.tensor([1, 2])
    assert ex_of("fp16").act(ints).dtype == torch.int64


def test_param_storage_follows_the_strategy() -> None:
    w = torch.tensor([2049.0])
    p = ex_of("fp16-pure").param(w, requires_grad=True)
    assert p.dtype == torch.float16 and p.item() == 2048.0 and p.requires_grad and p.is_leaf
    assert ex_of("fp16").param(w).dtype == torch.float32  # autocast strategies keep FP32 parameters
    q = ex_of("fp32").param(w)
    q += 1
    assert w.item() == 2049.0  # a fresh copy


def test_autocast_region_runs_gemms_in_the_compute_format() -> None:
    a, b = torch.ones(2, 3), torch.ones(3, 2)
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)):
        with ex_of(name).autocast():
            assert (a @ b).dtype == dtype, name
    with ex_of("fp16-pure").autocast():  # cast strategies do not autocast: the tensors carry the format
        assert (a @ b).dtype == torch.float32


def test_gemm_flags_are_left_alone_on_the_cpu_and_restored_by_the_setter() -> None:
    from harness.core import execution
    m = torch.backends.cuda.matmul
    before = execution._flags()
    with ex_of("tf32").autocast():  # the flags steer cuBLAS only: a CPU execution does not touch them
        assert execution._flags() == before
    try:
        execution._set_flags(tf32=True, reduced=True)
        assert m.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert m.allow_fp16_reduced_precision_reduction and m.allow_bf16_reduced_precision_reduction
        execution._set_flags(tf32=False, reduced=False)
        assert not m.allow_tf32 and not m.allow_bf16_reduced_precision_reduction
    finally:
        execution._set_flags(**before)
    assert execution._flags() == before


def test_tf32_gemm_is_emulated_on_the_cpu_forward_and_backward() -> None:
    ex = ex_of("tf32")
    assert ex.emulation_notes() == ex.notes and "tf32 emulated" in ex.notes[0]
    a = torch.tensor([[1 + 2**-12, 3.0], [1.0, 1 + 2**-9]], requires_grad=True)
    b = torch.tensor([[1.0, 2**-13], [1 + 2**-11 + 2**-13, 1.0]], requires_grad=True)
    y = ex.matmul(a, b)
    qa, qb = quantize(a.detach(), "tf32"), quantize(b.detach(), "tf32")
    assert torch.equal(y, qa @ qb) and not torch.equal(y, a.detach() @ b.detach())
    g = torch.tensor([[1 + 2**-12, 1.0], [1.0, 1.0]])
    y.backward(g)
    qg = quantize(g, "tf32")
    assert torch.equal(a.grad, qg @ qb.T) and torch.equal(b.grad, qa.T @ qg)


def test_fp8_gemm_is_emulated_with_per_tensor_scales() -> None:
    ex = ex_of("fp8-tensorwise")
    assert "fp8 emulated" in ex.notes[0]
    eye = torch.eye(2)
    a = torch.tensor([[1.0, 2.0], [0.5, 4.0]])  # scale 448/4 = 112: 112, 224, 56, 448 are all E4M3 values
    y = ex.matmul(a, eye)
    assert y.dtype == torch.bfloat16 and torch.equal(y.float(), a)
    # 3*112 = 336 is the tie between 320 (even) and 352 in E4M3: the product keeps 320/112
    y = ex.matmul(torch.tensor([[3.0, 4.0]]), eye)
    assert y.float().tolist()[0] == [torch.tensor(320 / 112).to(torch.bfloat16).item(), 4.0]


def test_fp8_delayed_scaling_uses_the_amax_history() -> None:
    one = torch.tensor([[1.0]])
    for name, second in (("fp8-tensorwise", 4.0), ("fp8-delayed", 1.0)):
        ex = ex_of(name)
        ex.matmul(torch.tensor([[1.0]]), one, key="k")
        # delayed: the scale comes from the history (amax 1), so 4 * 448 saturates at 448 -> 1
        assert ex.matmul(torch.tensor([[4.0]]), one, key="k").float().item() == second, name


def test_delayed_scaling_forgets_amaxes_older_than_its_history() -> None:
    from harness.values.fp8 import E4M3, AmaxHistory
    hist = AmaxHistory(length=4)
    eight, one = torch.tensor(8.0), torch.tensor(1.0)
    first = float(hist.scale("k", eight, E4M3.max, delayed=True))
    assert first == 448 / 8  # an empty history: the current amax
    # four amaxes of 1 after the 8: the scale stays 448/8 while the 8 is among the last four ...
    assert [float(hist.scale("k", one, E4M3.max, delayed=True)) for _ in range(4)] == [448 / 8] * 4
    # ... and becomes 448/1 once it has left the ring buffer
    assert float(hist.scale("k", one, E4M3.max, delayed=True)) == 448.0


def test_unsupported_is_explicit_never_a_silent_downgrade() -> None:
    ex = ex_of("compute=fp16,reduction=reduced")
    assert not ex.supported and "needs cuBLAS" in ex.unsupported_reason
    assert ex_of("fp16").supported and ex_of("fp16").emulation_notes() == []


def test_fp64_execution_and_formats() -> None:
    ex = FP64(CPU)
    assert ex.dtype == torch.float64 and ex.param_dtype == torch.float64 and not ex.strategy.reduced
    assert ex_of("fp16-master").format.name == "fp16" and ex_of("fp16-master").strategy.reduced


def test_route_linears_sends_nn_linear_through_the_strategy_gemm() -> None:
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1.0]]))
    x = torch.tensor([[1 + 2**-12, 0.0]])
    assert lin(x).item() == 1 + 2**-12
    assert route_linears(lin, ex_of("fp32")) is lin and lin(x).item() == 1 + 2**-12  # native: untouched
    route_linears(lin, ex_of("tf32"))
    assert lin(x).item() == 1.0  # the TF32 GEMM rounds the input to 10 fraction bits


def test_a_native_fp8_gemm_of_unsupported_shape_is_counted_as_emulated() -> None:
    from harness.values.fp8 import AmaxHistory, fp8_matmul
    hist = AmaxHistory()
    a = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)  # 4 x 6 @ 6 x 8: no dimension of 16
    b = torch.linspace(0.5, 2.0, 48).reshape(6, 8)
    y = fp8_matmul(a, b, "mm", hist, delayed=False, native=True, out_dtype=torch.float32)
    assert hist.fallbacks == 1 and y.shape == (4, 8)
    emulated = fp8_matmul(a, b, "mm", hist, delayed=False, native=False, out_dtype=torch.float32)
    assert hist.fallbacks == 1  # the emulated path by request is not a fallback
    assert torch.equal(y, emulated)  # the fallback is exactly the emulation
    assert float((y - a @ b).norm() / (a @ b).norm()) < 2.0**-5  # E4M3 operands: u = 2^-4 each


def test_gemm_flag_restore_returns_each_of_the_four_flags() -> None:
    from harness.core import execution
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    before = execution._flags()
    try:  # a user's setting where the four differ: cuDNN TF32 on, cuBLAS TF32 off, only BF16 reduced
        m.allow_tf32, c.allow_tf32 = False, True
        m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction = False, True
        saved = execution._flags()
        execution._set_flags(tf32=True, reduced=True)
        execution._set_flags(**saved)
        assert (m.allow_tf32, c.allow_tf32) == (False, True)
        assert (m.allow_fp16_reduced_precision_reduction, m.allow_bf16_reduced_precision_reduction) == (False, True)
    finally:
        execution._set_flags(**before)


def test_the_record_names_fp8_gemms_that_fell_back() -> None:
    from harness.values.fp8 import fp8_matmul
    ex = ex_of("fp8-tensorwise")
    before = list(ex.emulation_notes())  # on the CPU: the strategy's own emulation note
    a = torch.linspace(-1.0, 1.0, 24).reshape(4, 6)
    fp8_matmul(a, torch.linspace(0.5, 2.0, 48).reshape(6, 8), "mm", ex.fp8_history, delayed=False, native=True,
               out_dtype=torch.float32)
    assert ex.emulation_notes() == before + ["1 FP8 GEMMs emulated: dimensions not multiples of 16, which "
                                             "torch._scaled_mm requires"]
