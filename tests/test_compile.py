"""compile=yes: a model trained through torch.compile (harness.recipes.torch_compile), its records next to
the eager ones, and where it cannot run."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.core.execution import Execution
from harness.core.scenario import Case, discover
from harness.core.strategy import parse, support
from harness.recipes import torch_compile
from harness.run.engine import run_case
from harness.run.reference import ReferenceCache

#: 1 + 2^-7 is a BF16 number; 1 + 2^-7 + 256 is not (BF16's spacing at 256 is 2): eager mode rounds the sum
#: to 258 and gets 2 back, a fused kernel keeps it in FP32 and gets 1 + 2^-7 back.
X = 1 + 2**-7


class Shift(nn.Module):
    """y = ((x + 256) - 256) * w: two roundings in eager BF16, none inside one compiled kernel."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x + 256) - 256) * self.w


def test_compile_is_a_strategy_key_that_runs_on_this_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    s = parse("bf16,compile=yes")
    assert s.compile and s.label == "bf16,compile=yes" and str(parse(str(s))) == str(s)
    ok, why, _ = support(s, torch.device("cpu"))
    assert ok == (shutil.which("g++") is not None or shutil.which("c++") is not None), why
    monkeypatch.setattr(torch_compile.shutil, "which", lambda _: None)
    ok, why, _ = support(s, torch.device("cpu"))
    assert not ok and why.startswith("compile=yes: Inductor needs a C++ compiler")
    assert support(parse("bf16"), torch.device("cpu"))[0]  # eager strategies never ask for a compiler


def test_the_compiled_forward_fuses_what_eager_rounds() -> None:
    """Eager BF16 returns 2 for (1+2^-7 + 256) - 256; the compiled kernel 1+2^-7 (one rounding, at the end);
    the compile is counted and timed, and a second model starts from a reset cache."""
    m = Shift().to(torch.bfloat16)
    x = torch.full((4,), X, dtype=torch.bfloat16)
    assert m(x).tolist() == [2.0] * 4
    stats = torch_compile.compile_model(m)
    y = m(x)
    assert y.tolist() == [X] * 4 and [n for n, _ in m.named_parameters()] == ["w"]
    y.float().sum().backward()
    assert stats.models == 1 and stats.compilations >= 1 and stats.seconds > 0
    m2 = Shift().to(torch.bfloat16)
    again = torch_compile.compile_model(m2)
    assert m2(x).tolist() == [X] * 4 and again.compilations >= 1 and stats.compilations == stats.compilations


def test_a_scenario_that_trains_no_model_is_not_judged_as_compiled() -> None:
    """A functional scenario runs no compiled code: its compile=yes record is unsupported with the reason,
    never the eager result under the compiled name."""
    s = discover().get("softmax_long")
    case = Case(s, s.params("quick")[0], 0)
    from harness.run.engine import case_inputs
    inputs, exc = case_inputs(case, torch.device("cpu"))
    assert exc is None
    rec, _ = run_case(case, parse("bf16,compile=yes"), torch.device("cpu"), inputs, ReferenceCache())
    assert rec["outcome"] == "unsupported" and "trains no model" in rec["reason"]
    assert rec["strategy_spec"].endswith("compile=yes") and "compile" not in rec


def _shift_model() -> dict:
    torch.manual_seed(0)
    x = torch.full((8, 4), X)
    return {"model": Shift(), "batch": lambda i: (x,),
            "loss": lambda m, b: (m(b[0]).float() - 1).pow(2).mean(),
            "optimizer": lambda ps: torch.optim.SGD(ps, lr=0.01)}


@pytest.mark.slow
def test_check_model_records_compiled_and_eager_side_by_side(tmp_path: Path) -> None:
    """check-model takes compile=yes on a user's model unchanged; the compiled record names itself, keeps its
    compile cost apart, and its outcome differs from the eager twin's: eager BF16 (inputs and weights cast,
    FP32 master weights) rounds x + 256 and moves the weight the wrong way, the fused kernel follows FP32."""
    from harness.models.model_check import check_model
    result = check_model(_shift_model, ["bf16-master", "bf16-master,compile=yes"], steps=4, device="cpu",
                         out=tmp_path / "run", diagnose=False)
    eager, compiled = result.records
    assert compiled["strategy"] == "bf16-master,compile=yes" and compiled["strategy_spec"].endswith("compile=yes")
    assert compiled["compile"]["models"] == 1 and compiled["compile"]["compilations"] >= 1
    assert compiled["compile"]["seconds"] > 0 and "compile" not in eager
    assert eager["outcome"] == "diverged" and compiled["outcome"] == "pass", (eager["reason"], compiled["reason"])


def test_execution_starts_uncompiled() -> None:
    ex = Execution(parse("bf16,compile=yes"), "cpu")
    assert ex.compile_stats is None and ex.supported == (torch_compile.missing_reason(ex.device) is None)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_a_compiled_model_runs_through_inductor_and_triton(tmp_path: Path) -> None:
    """On a GPU: compile=yes is supported where Triton is, and the compiled record of the shift model passes
    where the eager one diverges, as on the CPU (Triton kernels keep intermediates in FP32 too)."""
    from harness.models.model_check import check_model
    assert torch_compile.missing_reason(torch.device("cuda")) is None
    result = check_model(_shift_model, ["bf16-master", "bf16-master,compile=yes"], steps=4, device="cuda",
                         out=tmp_path / "run", diagnose=False)
    eager, compiled = result.records
    assert compiled["compile"]["compilations"] >= 1 and compiled["compile"]["seconds"] > 0
    assert eager["outcome"] == "diverged" and compiled["outcome"] == "pass", (eager["reason"], compiled["reason"])
