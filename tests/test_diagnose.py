"""Per-layer diagnosis on models whose failure is known by construction."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harness.models.diagnose import LayerProbe, diagnose, fp16_window, fp32_gradients
from harness.models.recommend import gradient_span, recommend, window_sentence
from harness.core.strategy import PRESETS, parse
from harness.models.user_model import load_spec

CPU = torch.device("cpu")


# -- a layer that overflows in FP16 -----------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, gain: float) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(8) * gain)
            self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class Encoder(nn.Module):
    """``encoder.layers.1.proj`` multiplies by 2^16: inputs of magnitude >= 1 pass 65504 in FP16."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([Block(1.0), Block(2.0**16), Block(1.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.encoder.layers:
            x = layer(x)
        return x


def overflow_factory() -> dict:
    x = 1.5 + torch.rand(4, 8, generator=torch.Generator().manual_seed(0))  # |x| in [1.5, 2.5)
    return {"model": Encoder(), "batch": lambda i: (x,), "loss": lambda m, b: m(b[0]).float().pow(2).mean()}


def test_forward_overflow_names_the_layer() -> None:
    spec = load_spec(overflow_factory)
    d = diagnose(spec, PRESETS["fp16"], CPU, steps=4)
    assert d.forward is not None
    assert (d.forward.module, d.forward.cause, d.forward.update) == ("encoder.layers.1.proj", "overflow", 0)
    assert "32 of 32 values inf/NaN" in d.forward.detail  # every input >= 1.5, times 2^16 > 65504
    assert d.backward is None  # backward events after a forward overflow are consequences, not looked for
    assert d.attempts == 1  # the run stops at the first forward overflow


def test_no_overflow_in_bf16() -> None:
    d = diagnose(load_spec(overflow_factory), PRESETS["bf16"], CPU, steps=2)
    assert d.forward is None and d.backward is None


def test_weights_written_non_finite_are_the_cause() -> None:
    """A weight that holds NaN: the module is named and the cause is its weights, not an overflow."""
    def factory() -> dict:
        m = Encoder()
        with torch.no_grad():
            m.encoder.layers[2].proj.weight[0, 0] = float("nan")
        x = torch.ones(2, 8)
        return {"model": m, "batch": lambda i: (x,), "loss": lambda mod, b: mod(b[0]).sum()}
    d = diagnose(load_spec(factory), PRESETS["bf16"], CPU, steps=1)
    assert d.forward is not None
    assert (d.forward.module, d.forward.cause) == ("encoder.layers.2.proj", "weights")


# -- gradients wider than FP16's range: the window is empty ---------------------------------------
class TwoScales(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(64, 1, bias=False)
        self.b = nn.Linear(1, 1, bias=False)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a(x1), self.b(x2)


def two_scales_factory() -> dict:
    """dL/d(a.weight) = 2^-40 in all 64 entries, dL/d(b.weight) = 2^10: a span of 2^50."""
    x1, x2 = torch.ones(1, 64), torch.full((1, 1), 2.0**10)

    def loss(m: nn.Module, batch: tuple) -> torch.Tensor:
        ya, yb = m(*batch)
        return ya.float().sum() * 2.0**-40 + yb.float().sum()
    return {"model": TwoScales(), "batch": lambda i: (x1, x2), "loss": loss}


def test_empty_window_names_both_tensors() -> None:
    spec = load_spec(two_scales_factory)
    ref = fp32_gradients(spec, CPU)
    assert float(ref["a.weight"].abs().max()) == 2.0**-40 and float(ref["b.weight"]) == 2.0**10
    w = fp16_window(ref)
    assert w.empty
    assert (w.lo_tensor, w.hi_tensor) == ("a.weight", "b.weight")
    assert w.lo == 2.0**15  # 2^-40 * S must pass half of 2^-24 (at S = 2^15 it ties to zero)
    assert w.hi == 65520.0 / 2.0**10  # 2^10 * S must stay below 65520, where FP16 rounds to inf
    assert gradient_span(w) == 50.0
    text = window_sentence(w)
    assert text.startswith("no single FP16 loss scale works")
    assert "`a.weight` needs S >= 2^16" in text and "`b.weight` needs S <= 2^5" in text
    assert "pull 2^11 apart" in text


def test_dynamic_scaler_loses_the_small_tensor() -> None:
    """fp16-dynamic backs off from 2^16 until S*2^10 fits (S = 2^5); then a's 2^-35 flush to zero."""
    spec = load_spec(two_scales_factory)
    ref = fp32_gradients(spec, CPU)
    d = diagnose(spec, PRESETS["fp16-dynamic"], CPU, steps=12, ref_grads=ref)
    assert d.underflow == {"a.weight": 1.0}
    assert d.backward is not None
    assert (d.backward.module, d.backward.what, d.backward.scale) == ("b", "gradient at the output", 2.0**16)
    assert d.attempts == 11 + 12  # 2^16 .. 2^6 overflow (11 skips, each retried), then 12 updates at 2^5


def test_recommendation_for_an_empty_window() -> None:
    spec = load_spec(two_scales_factory)
    w = fp16_window(fp32_gradients(spec, CPU))
    records = [{"strategy": s, "strategy_spec": str(PRESETS[s]), "outcome": o, "metrics": {}, "bound": 0.1}
               for s, o in (("fp16-dynamic", "underflow"), ("bf16", "pass"))]
    line = recommend(records, w, {})
    assert line.startswith("bf16: gradients span 2^50, wider than FP16's 2^40: no single FP16 loss scale works")


def test_recommendation_names_every_other_strategy_that_passed() -> None:
    """Where only FP8 recipes passed, the line names the first and says the others passed too (it said
    'the only reduced-precision strategy that passed' whatever their number)."""
    w = fp16_window(fp32_gradients(load_spec(overflow_factory), CPU))
    assert not w.empty  # (an empty window names a strategy for that reason first)
    outcomes = (("fp16-dynamic", "underflow"), ("bf16", "diverged"), ("fp8-rowwise", "pass"), ("fp8-blockwise", "pass"))
    records = [{"strategy": s, "strategy_spec": str(PRESETS[s]), "outcome": o, "metrics": {}, "bound": 0.1}
               for s, o in outcomes]
    line = recommend(records, w, {})
    assert line.startswith("fp8-rowwise: ") and "as did fp8-blockwise" in line and "the only" not in line
    alone = recommend(records[:3], w, {})
    assert alone.startswith("fp8-rowwise: the only reduced-precision strategy that passed")


def test_param_gradient_overflow() -> None:
    """dW = sum over 2^10 rows of x * dy = 2^10 * 2^7 = 2^17 overflows FP16; dy = 1 and dx stay finite."""
    x = torch.full((2**10, 1), 2.0**7)

    def factory() -> dict:
        lin = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            lin.weight.fill_(0.5)
        return {"model": nn.Sequential(lin), "batch": lambda i: (x,), "loss": lambda m, b: m(b[0]).float().sum()}
    d = diagnose(load_spec(factory), PRESETS["fp16"], CPU, steps=2)
    assert d.backward is not None
    assert (d.backward.module, d.backward.what, d.backward.update) == ("0", "gradient of parameter 0.weight", 0)
    # without a scaler nothing checks for overflow: the inf update is applied, and the next forward pass
    # finds the module's own weight non-finite
    assert d.forward is not None and (d.forward.module, d.forward.cause, d.forward.update) == ("0", "weights", 1)


def test_hooks_are_removed_and_the_model_untouched() -> None:
    model = Encoder()
    probe = LayerProbe()
    probe.attach(model)
    assert sum(len(m._forward_hooks) for m in model.modules()) == len(list(model.modules()))
    probe.detach()
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0
    assert all(not p._backward_hooks for p in model.parameters())
    spec = load_spec(overflow_factory)  # diagnose works on a deep copy: the user's model gets no hooks
    diagnose(spec, PRESETS["fp16"], CPU, steps=1)
    assert sum(len(m._forward_hooks) for m in spec.model.modules()) == 0


def test_inplace_relu_cnn_is_diagnosed() -> None:
    """A CNN written with plain torch, in-place ReLUs included: tensor hooks survive in-place ops."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    spec = load_spec({"model": model, "batch": lambda i: (x, y),
                      "loss": lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1])})
    d = diagnose(spec, parse("compute=fp16,scaler=static(2^30)"), CPU, steps=1)
    assert d.forward is None and d.backward is not None  # 2^30 * dL/dlogits passes 65504 at the logits
    assert d.backward.module == "7" and d.backward.scale == 2.0**30
    assert math.isfinite(float(spec.model[0].weight.detach().sum()))


@pytest.mark.parametrize("strategy", ["fp32", "bf16"])
def test_clean_run_reports_nothing(strategy: str) -> None:
    d = diagnose(load_spec(two_scales_factory), PRESETS[strategy], CPU, steps=1)
    assert (d.forward, d.backward, d.underflow) == (None, None, {})
    assert d.lines()[0] == "no inf/NaN in any module's output or gradient"


def test_a_tied_weight_is_named_after_its_first_owner_and_says_it_is_shared() -> None:
    """GPT-2 ties its embedding to its output head: ``named_parameters`` names the weight once, after the
    embedding; the probe named the module after the last holder (the head), beside the embedding's name."""
    from harness.models.diagnose import parameter_owners

    class Tied(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte = torch.nn.Embedding(8, 4)
            self.mid = torch.nn.Linear(4, 4)
            self.head = torch.nn.Linear(4, 8, bias=False)
            self.head.weight = self.wte.weight

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.head(self.mid(self.wte(ids)))

    m = Tied()
    owners = parameter_owners(m)
    assert owners[id(m.wte.weight)] == ["wte", "head"] and owners[id(m.mid.weight)] == ["mid"]
    assert [n for n, _ in m.named_parameters()][0] == "wte.weight"
    m.wte.weight.register_hook(lambda g: g * float("inf"))  # registered first, so it runs before the probe's
    probe = LayerProbe()
    probe.attach(m)
    try:
        m(torch.tensor([[1, 2, 3]])).sum().backward()
    finally:
        probe.detach()
    assert probe.backward is not None and probe.backward.module == "wte"
    assert probe.backward.what == "gradient of parameter wte.weight (tied: also `head`'s)"
