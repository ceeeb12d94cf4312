"""check-model: the factory contract, its errors, the command line and the Python entry point.

Factories used through ``MODULE:FACTORY`` are defined here: pytest puts this directory on sys.path,
so ``test_check_model:overflow`` imports this module.
"""
from __future__ import annotations

import contextlib

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

import harness
from harness.cli import main
from harness.models.model_check import check_model
from harness.results import RECORD_FIELDS, read_run
from harness.models.user_model import load_spec

EXAMPLE = "examples.third_party_model:factory"


def overflow() -> dict:
    """``blocks.1`` multiplies by 2^16: inputs of magnitude >= 1.5 pass FP16's 65504."""
    model = nn.Sequential()
    model.blocks = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with torch.no_grad():
        for lin, gain in zip(model.blocks, (1.0, 2.0**16)):
            lin.weight.copy_(torch.eye(8) * gain)
            lin.bias.zero_()
    x = 1.5 + torch.rand(4, 8, generator=torch.Generator().manual_seed(0))
    return {"model": model, "batch": lambda i: (x,), "loss": lambda m, b: m(b[0]).float().pow(2).mean(),
            "optimizer": lambda ps: torch.optim.SGD(ps, lr=1e-12)}


def returns_list() -> list:
    return [nn.Linear(1, 1)]


def tensor_batch() -> dict:
    return {"model": nn.Linear(2, 1), "batch": lambda i: torch.ones(1, 2), "loss": lambda m, b: m(b[0]).sum()}


def vector_loss() -> dict:
    return {"model": nn.Linear(2, 3), "batch": lambda i: (torch.ones(1, 2),), "loss": lambda m, b: m(b[0])}


def no_loss() -> dict:
    return {"model": nn.Linear(2, 3), "batch": lambda i: (torch.ones(1, 2),), "los": None}


NOT_CALLABLE = 3


@pytest.mark.parametrize("target, message", [
    ("no_colon", "expected MODULE:FACTORY"),
    ("no_such_module_xyz:factory", "cannot import module 'no_such_module_xyz'"),
    ("test_check_model:missing", "has no 'missing'; callables there:"),
    ("test_check_model:NOT_CALLABLE", "is a int, not callable"),
    ("test_check_model:returns_list", "the factory returned list; expected a dict with keys model"),
    ("test_check_model:no_loss", "lacks loss; has unknown keys los"),
])
def test_bad_factories_say_what_was_expected(target: str, message: str) -> None:
    with pytest.raises(ValueError, match=None) as info:
        load_spec(target)
    assert message in str(info.value)


@pytest.mark.parametrize("target, message", [
    ("test_check_model:tensor_batch", "batch(0) returned Tensor; expected a tuple of inputs"),
    ("test_check_model:vector_loss", "loss(model, batch) returned a tensor of shape (1, 3)"),
    ("no_such_module_xyz:factory", "cannot import module"),
])
def test_cli_bad_input_is_one_line_and_exit_2(target: str, message: str, capsys, tmp_path: Path) -> None:
    assert main(["check-model", target, "--device", "cpu", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # bad input is caught before anything runs


def test_cli_bad_strategy_and_steps(capsys) -> None:
    assert main(["check-model", EXAMPLE, "--strategy", "fp17"]) == 2
    assert "unknown strategy 'fp17'" in capsys.readouterr().err
    assert main(["check-model", EXAMPLE, "--steps", "0"]) == 2
    assert "must be >= 1" in capsys.readouterr().err


def test_third_party_transformer_passes(capsys, tmp_path: Path) -> None:
    """torch.nn.TransformerEncoder, unchanged: exit 0, a run directory in the run schema, a recommendation."""
    out = tmp_path / "run"
    code = main(["check-model", EXAMPLE, "--strategy", "fp32", "--strategy", "bf16", "--steps", "3",
                 "--device", "cpu", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0, text
    header, records = read_run(out)
    assert [r["strategy"] for r in records] == ["fp32", "bf16"]
    for r in records:
        assert set(RECORD_FIELDS) <= set(r)
        assert (r["scenario"], r["family"], r["params"], r["outcome"]) == ("third_party_model-factory", "training",
                                                                          {"steps": 3}, "pass")
        assert {"loss_divergence", "final_loss_ratio", "rel_err", "updates_lost"} <= set(r["metrics"])
        assert "scaler" not in r["metrics"]  # neither strategy scales the loss
    fp32, bf16 = (r["metrics"] for r in records)
    # FP32 sits at FP32's rounding from the reference; BF16 moves orders of magnitude more, within its bound
    assert fp32["loss_divergence"] < 1e-6 and fp32["final_loss_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert 100 * fp32["loss_divergence"] < bf16["loss_divergence"] <= records[1]["bound"]
    assert 100 * fp32["rel_err"] < bf16["rel_err"] <= records[1]["bound"]
    assert header["config"]["imports"] == ["examples.third_party_model"]
    diag = json.loads((out / "diagnosis.json").read_text())
    assert diag["diagnoses"] == {} and diag["recommendation"].startswith("bf16: follows FP32's training")
    assert "recommendation: bf16: follows FP32's training" in text
    assert text.splitlines()[1].split() == ["strategy", "verdict", "margin", "loss", "div.", "final/FP32", "drift",
                                            "upd.", "lost", "skipped", "loss", "scale", "GEMMs"]


def test_a_failing_strategy_exits_1_and_is_diagnosed(capsys, tmp_path: Path) -> None:
    code = main(["check-model", "test_check_model:overflow", "--strategy", "fp32", "--strategy", "fp16-dynamic",
                 "--strategy", "bf16", "--steps", "4", "--device", "cpu", "--out", str(tmp_path / "run")])
    text = capsys.readouterr().out
    assert code == 1
    _, records = read_run(tmp_path / "run")
    outcomes = {r["strategy"]: r["outcome"] for r in records}
    assert outcomes == {"fp32": "pass", "fp16-dynamic": "stalled", "bf16": "pass"}
    scaler = records[1]["metrics"]["scaler"]  # the forward overflows at any scale: 2*4 attempts, all skipped
    assert (scaler["steps"], scaler["skipped"], scaler["scale_max"], scaler["scale_min"]) == (8, 8, 2**16, 2**9)
    assert "diagnosis of fp16-dynamic:" in text
    assert "forward: first non-finite output at `blocks.1` (update 0)" in text
    assert "recommendation: bf16: activations of `blocks.1` pass FP16's max 65504" in text


def test_python_entry_point(tmp_path: Path) -> None:
    assert harness.check_model is check_model
    result = harness.check_model(overflow, ["fp32", "fp16"], steps=2, device="cpu", out=tmp_path / "run")
    assert result.exit_code == 1 and result.failed == ["fp16"]
    d = result.diagnoses["fp16"]
    assert d.forward is not None and (d.forward.module, d.forward.cause) == ("blocks.1", "overflow")
    assert result.recommendation.startswith("bf16 (not tried here: add --strategy bf16): activations of `blocks.1`")
    assert result.out == tmp_path / "run" and (result.out / "records.jsonl").is_file()


def test_fp32_and_fp64_runs_on_cuda_take_the_math_attention_and_restore_it(monkeypatch) -> None:
    """The fused attention backward has no deterministic kernel (GPT-2's FP32 reference differed between two
    runs on an H100): the FP32 and FP64 runs take SDPA's math backend, reduced-precision runs keep the fused
    ones they train with, and the user's backend flags are restored. The CPU's attention is deterministic."""
    from harness.core.strategy import PRESETS
    from harness.core.execution import FP64, Execution
    from harness.models import user_model
    cuda = torch.backends.cuda
    fused = lambda: (cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled())  # noqa: E731
    assert fused() == (True, True, True)
    with user_model.reproducible(torch.device("cuda"), exact_attention=True):
        assert fused() == (False, False, True)
    assert fused() == (True, True, True)
    with user_model.reproducible(torch.device("cuda")):
        assert fused() == (True, True, True)
    with user_model.reproducible(torch.device("cpu"), exact_attention=True):
        assert fused() == (True, True, True)
    seen = []
    monkeypatch.setattr(user_model, "reproducible", lambda device, exact_attention=False: (
        seen.append(exact_attention), contextlib.nullcontext())[1])
    for ex in (Execution(PRESETS["fp32"], "cpu"), FP64("cpu"), Execution(PRESETS["bf16"], "cpu"),
               Execution(PRESETS["tf32"], "cpu")):
        user_model.training_kernels(ex)
    assert seen == [True, True, False, False]


def test_the_deterministic_kernels_are_asked_for_on_cuda_only_and_restored(monkeypatch) -> None:
    """check-model trains CUDA runs under torch's deterministic algorithms (FP32 must reproduce itself) and
    leaves the user's setting as it found it; the CPU's kernels are deterministic already, nothing is set."""
    from harness.models.user_model import deterministic_cublas, reproducible
    saved = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        with reproducible(torch.device("cpu")):
            assert not torch.are_deterministic_algorithms_enabled()
        with reproducible(torch.device("cuda")):
            assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        assert not torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)  # a user's own strict setting survives the run
        with reproducible(torch.device("cuda")):
            assert torch.is_deterministic_algorithms_warn_only_enabled()
        assert torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's own choice is kept
    deterministic_cublas()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
