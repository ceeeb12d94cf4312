"""What Hugging Face, timm and torchvision users naturally pass: model output objects, plain functions with
nested or Module arguments, batches with tensors nested in dicts and lists."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from harness.core.batches import clone, to_device
from harness.models.model_check import check_model
from harness.pytest_plugin import assert_robust


def test_batches_are_walked_to_any_depth() -> None:
    ids, x = torch.tensor([[1, 2]]), torch.tensor([0.1, 3.0])
    batch = ({"input_ids": ids, "extra": [x, (x, "tag")]}, 7)
    out = to_device(batch, "cpu", torch.bfloat16)
    assert out[1] == 7 and out[0]["extra"][1][1] == "tag"
    assert out[0]["input_ids"].dtype == torch.int64 and torch.equal(out[0]["input_ids"], ids)
    assert out[0]["extra"][0].dtype == out[0]["extra"][1][0].dtype == torch.bfloat16
    assert out[0]["extra"][0].tolist() == [0.10009765625, 3.0]  # rounded to BF16
    copy = clone(batch)
    copy[0]["extra"][0][0] = 5.0
    assert float(x[0]) == pytest.approx(0.1)  # a loss that writes into its batch changes no other run's


class DictModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 2)

    def forward(self, inputs: dict) -> torch.Tensor:
        return self.lin(inputs["x"]) + inputs["shift"][0]


def dict_batch_factory() -> dict:
    torch.manual_seed(0)
    x, shift = torch.randn(8, 4), torch.randn(1, 2)
    return {"model": DictModel(), "batch": lambda i: ({"x": x, "shift": [shift]},),
            "loss": lambda m, b: m(b[0]).float().pow(2).mean()}


def test_check_model_casts_tensors_nested_in_a_dict_batch(tmp_path: Path) -> None:
    res = check_model(dict_batch_factory, ["fp32", "bf16-pure"], steps=2, device="cpu", out=tmp_path / "r")
    fp32, pure = res.records
    assert fp32["outcome"] == "pass"
    # it trains (before, the FP32 tensors inside the dict met BF16 weights: an `error` record, "mixed dtype");
    # what it is judged on is BF16's own problem, lost updates
    assert pure["outcome"] != "error" and pure["metrics"]["updates"] == 2, pure["reason"][:300]


def test_plain_function_with_nested_and_module_arguments() -> None:
    """The FP64 reference casts every floating argument, however deep, and stores Module arguments in FP64."""
    g = torch.Generator().manual_seed(0)
    x, w1, w2 = (torch.randn(4, 8, generator=g), torch.randn(8, 8, generator=g), torch.randn(8, 8, generator=g))
    rec = assert_robust(lambda a, ws: a @ ws[0] @ ws[1], (x, [w1, w2]), "bf16", n=16)
    assert rec["outcome"] == "pass" and "fp32_vs_fp64" in rec["reference"]
    torch.manual_seed(0)
    rec = assert_robust(lambda lin, a: lin(a), (nn.Linear(8, 8), x), "bf16", n=8)
    assert rec["outcome"] == "pass" and rec["metrics"]["rel_err"] > 0


def test_hugging_face_model_output() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    rec = assert_robust(model, {"input_ids": ids}, "bf16", n=32)  # the logits are judged
    assert rec["outcome"] == "pass" and rec["metrics"]["numel"] == 2 * 16 * 64
    rec = assert_robust(model, {"input_ids": ids, "labels": ids}, "bf16", n=32, loss=lambda out: out.loss, steps=2)
    assert rec["outcome"] == "pass" and rec["metrics"]["loss_steps"] == 2


def test_an_output_with_nothing_to_judge_is_one_clear_error() -> None:
    with pytest.raises(Exception, match="fn returned a str with no floating tensor to judge"):
        assert_robust(lambda a: "text", (torch.ones(2),), "bf16")
