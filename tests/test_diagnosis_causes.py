"""What real models showed: the diagnosis explains an absorbed-updates verdict per tensor; the module that made
inf from finite inputs is named, not its child; a forward overflow is the first cause; gradients no format
holds are no evidence of needing range."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.models.diagnose import Diagnosis, NonFinite, diagnose, fp16_window, lost_updates, negligible_floor
from harness.models.recommend import gradient_span, recommend
from harness.core.strategy import PRESETS
from harness.models.user_model import load_spec

CPU = torch.device("cpu")


class Normed(nn.Module):
    """A LayerNorm (weights 1.0) before a Linear whose weights are 2^-6: AdamW's first step moves every
    entry by lr = 2^-10, which BF16 rounds away at 1.0 (half an ulp is 2^-8) and keeps at 2^-6."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8, bias=False)
        with torch.no_grad():
            self.proj.weight.fill_(2.0**-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def normed_factory() -> dict:
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)  # a linear loss: no gradient near 0
    return {"model": Normed(), "batch": lambda i: (x,), "loss": lambda m, b: (m(b[0]).float() * c).mean(),
            "optimizer": lambda ps: torch.optim.AdamW(ps, lr=2.0**-10, weight_decay=0.0)}


def test_lost_updates_per_tensor() -> None:
    lost = lost_updates(load_spec(normed_factory), PRESETS["bf16-pure"], CPU, steps=1)
    assert lost == {"norm.weight": 1.0}  # every entry of the weights at 1.0, no entry of the others
    assert lost_updates(load_spec(normed_factory), PRESETS["fp32"], CPU, steps=1) == {}


def test_diagnosis_of_absorbed_updates_names_the_tensors_and_nothing_else() -> None:
    d = diagnose(load_spec(normed_factory), PRESETS["bf16-pure"], CPU, steps=2)
    assert d.lost_updates == {"norm.weight": 1.0} and d.weight_size == {"norm.weight": 1.0}
    d.verdict = "updates: 50% of (update, weight) pairs with a gradient left the weight unchanged (w + dw == w)"
    d.underflow = {"proj.weight": 0.25}  # an unrelated finding must not be printed under this verdict
    assert d.lines() == ["no inf/NaN in any module's output or gradient",
                         "updates absorbed (w + dw == w) per tensor, of its entries with a gradient: "
                         "`norm.weight` 100% (mean |w| 1)"]
    d.verdict = "gradient: 2% of non-zero values flushed to zero > budget 1%"
    assert d.lines()[-1].startswith("underflow: gradients non-zero in FP32 and zero here: `proj.weight` 25%")
    assert d.as_dict()["lost_updates"] == {"norm.weight": 1.0}


# -- the module whose own code overflowed ---------------------------------------------------------------------
class Attention(nn.Module):
    """q @ k^T is no module: it overflows FP16 inside this module's forward, and ``out`` receives inf."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(4, 4)
        self.out = nn.Linear(4, 4)
        with torch.no_grad():
            self.q.weight.copy_(torch.eye(4) * 2.0**8)
            self.q.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q(x)  # |q| <= 2^9: finite in FP16
        return self.out(q @ q.transpose(-1, -2))  # entries up to 4 * 2^18: past 65504


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = Attention()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(x)


def test_first_non_finite_module_is_the_one_that_made_it() -> None:
    x = 1 + torch.rand(4, 4, generator=torch.Generator().manual_seed(0))
    spec = load_spec({"model": Net(), "batch": lambda i: (x,), "loss": lambda m, b: m(b[0]).float().mean()})
    d = diagnose(spec, PRESETS["fp16"], CPU, steps=1)
    assert d.forward is not None
    assert (d.forward.module, d.forward.cause) == ("attn", "overflow")
    assert "its child `attn.out` received them non-finite" in d.forward.detail


# -- the recommendation ---------------------------------------------------------------------------------------
def test_forward_overflow_comes_before_an_empty_window() -> None:
    """Both causes present: the overflow is reported, not the gradient span."""
    grads = {"a": torch.full((64,), 2.0**-40), "b": torch.full((1,), 2.0**10)}
    w = fp16_window(grads)
    assert w.empty
    over = NonFinite("forward", "h.0.attn", "output", 0, 0, 1.0, "overflow", "")
    records = [{"strategy": s, "strategy_spec": str(PRESETS[s]), "outcome": o, "metrics": {}, "bound": 0.1}
               for s, o in (("fp16", "overflow"), ("bf16", "pass"))]
    line = recommend(records, w, {"fp16": Diagnosis("fp16", over, None)})
    assert line.startswith("bf16: activations of `h.0.attn` pass FP16's max 65504 in the forward pass")
    assert "gradients span" not in line


def test_gradients_no_format_holds_leave_the_window() -> None:
    """1e-43 (behind a saturated softmax) is below BF16's smallest subnormal 2^-133: no reduced format holds
    it, so it does not stretch the span the gradients need."""
    assert negligible_floor() == 2.0**-133
    base = {"w": torch.tensor([2.0**-10, 2.0**-2]), "b": torch.tensor([2.0**-4])}
    noisy = {"w": torch.tensor([2.0**-10, 2.0**-2, 1e-43, 1e-43]), "b": torch.tensor([2.0**-4])}
    assert gradient_span(fp16_window(noisy)) == gradient_span(fp16_window(base)) == pytest.approx(8.0)
    assert not fp16_window(noisy).empty
    kept = {"w": torch.tensor([2.0**-10, 2.0**-2, 2.0**-132]), "b": torch.tensor([2.0**-4])}  # BF16 holds 2^-132
    assert gradient_span(fp16_window(kept)) > 100
