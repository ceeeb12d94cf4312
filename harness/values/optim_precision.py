"""How a low-precision parameter takes its update (``update=sr|kahan``) and how the optimizer's states
are kept (``states=param|8bit``), for any torch optimizer: the harness's own implementation, the
oracle the library recipes (torchao, torch-optimi, bitsandbytes) are checked against.

:class:`PrecisionOptimizer` wraps the optimizer a scenario or a user built. With ``update=sr`` or
``kahan`` it keeps one FP32 buffer per BF16/FP16 parameter; each step copies the parameter into it
(exact), lets the optimizer step on it in FP32 and writes the result back:

- ``sr``: stochastic rounding, as torchao's ``_AdamW(bf16_stochastic_round=True)`` does it
  (:func:`fp32_to_bf16_sr`): round away from zero with probability (low 16 bits) / 2^16, so
  E[sr(x)] = x and an update below half an ulp moves the weight in expectation instead of never.
- ``kahan``: a compensation buffer in the parameter's dtype, as torch-optimi's ``kahan_sum`` keeps
  it (:func:`kahan_add_`): the update goes into the compensation, the compensation into the weight,
  and what the weight could not take stays in the compensation for the next step.

States stay in the parameter's format (``states=param``: the FP32 values the step computed are stored
rounded to BF16, as both libraries keep them), or in 8-bit blocks (``states=8bit``,
:mod:`harness.values.optim_states`: each state is quantized and read back after the step, so the next
step reads what an 8-bit state holds). The arithmetic of the step itself is the wrapped optimizer's,
in FP32.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

from .optim_states import UNSIGNED_STATES, quantizable, quantize_8bit, state_tensors

__all__ = ["optimizer_recipe", "fp32_to_bf16_sr", "kahan_add_", "PrecisionOptimizer",
           "CountingOptimizer", "update_acts"]


def optimizer_recipe(strategy) -> str | None:
    """The optimizer recipe a strategy asks for (``update=sr``, ``states=8bit``, both), None for none."""
    parts = ([f"update={strategy.update}"] if strategy.update != "nearest" else []) + \
            ([f"states={strategy.states}"] if strategy.states != "param" else [])
    return ",".join(parts) or None


def fp32_to_bf16_sr(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """x (FP32) stochastically rounded to BF16: truncated toward zero, then moved one BF16 ulp away from
    zero with probability (low 16 bits of x) / 2^16. torchao 0.18's ``_fp32_to_bf16_sr`` bit for bit
    given the same random stream (``torch.randint(0, 2^16)`` in int32), except that a NaN stays a NaN
    (truncating a NaN whose payload sits in the low bits would make it inf)."""
    bits = x.float().contiguous().view(torch.int32)
    rand = torch.randint(0, 1 << 16, x.shape, device=x.device, dtype=torch.int32, generator=generator)
    down = bits & -65536  # 0xFFFF0000 as a signed int32: the BF16 toward zero
    out = torch.where(rand < (bits & 0xFFFF), down + 0x10000, down).view(torch.float32).bfloat16()
    return torch.where(torch.isnan(x), x.bfloat16(), out)


def kahan_add_(p: torch.Tensor, comp: torch.Tensor, update: torch.Tensor) -> None:
    """``p += update`` with Kahan compensation, in torch-optimi's order and dtypes: the compensation
    (p's dtype) takes the update, p takes the compensation, and the compensation keeps what p lost."""
    comp.add_(update)
    before = p.detach().clone()
    p.add_(comp)
    comp.add_(before.sub_(p))


def update_acts(params: Iterable[torch.Tensor], groups: list[dict]) -> bool:
    """Whether a step can move a weight: some parameter has a non-zero gradient and some group a
    non-zero learning rate (an update recipe has something to round)."""
    if not any(float(g["lr"]) != 0 for g in groups):
        return False
    return any(p.grad is not None and bool(p.grad.ne(0).any()) for p in params)


class _Delegating:
    """What code outside the step sees of the wrapped optimizer: its groups, states and state dict."""

    inner: torch.optim.Optimizer

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups

    @property
    def state(self) -> dict:
        return self.inner.state

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None if set_to_none else (p.grad.zero_() if p.grad is not None else None)


class PrecisionOptimizer(_Delegating):
    """The optimizer ``make_opt`` builds, stepping under an update and a states recipe (module doc).

    ``generator`` draws the stochastic rounding (seed it from the case for runs that reproduce);
    ``on_step`` is called after every step in which the recipe acted (an update to round, or a state
    kept in 8 bits), so a run can tell a recipe that never applied from one that did."""

    def __init__(self, make_opt: Callable[[list], torch.optim.Optimizer], params: list[torch.Tensor],
                 update: str = "nearest", states: str = "param", generator: torch.Generator | None = None,
                 on_step: Callable[[], None] | None = None) -> None:
        self.params = list(params)
        self.update, self.states, self.generator, self.on_step = update, states, generator, on_step
        if update != "nearest":
            low = [p for p in self.params if p.dtype not in (torch.bfloat16, torch.float16)]
            if low:
                raise ValueError(f"update={update} rounds updates into BF16/FP16 parameters; got {low[0].dtype}")
            if update == "sr" and any(p.dtype != torch.bfloat16 for p in self.params):
                raise ValueError("update=sr is BF16 stochastic rounding; FP16 parameters need update=kahan")
        self.buffers = [p.detach().float().clone() for p in self.params] if update != "nearest" else None
        self.comps = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params] \
            if update == "kahan" else None
        self.inner = make_opt(self.buffers if self.buffers is not None else self.params)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> None:
        if closure is not None:
            raise ValueError("PrecisionOptimizer.step takes no closure: run the forward and backward first")
        acted = self.update != "nearest" and update_acts(self.params, self.inner.param_groups)
        if self.buffers is not None:
            for p, b in zip(self.params, self.buffers):
                b.copy_(p)  # BF16/FP16 -> FP32 is exact: the step starts from the weight as stored
                b.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        acted = self._store_states() or acted
        if self.buffers is not None:
            self._write_back()
        if acted and self.on_step is not None:
            self.on_step()

    def _store_states(self) -> bool:
        """Round each state to what it is kept in; True when a state was kept in 8 bits."""
        quantized = False
        if self.buffers is None and self.states == "param":
            return False  # the optimizer stepped on the parameters themselves: states are already theirs
        for p, q in zip(self.params, self.buffers if self.buffers is not None else self.params):
            for name, v in state_tensors(self.inner.state.get(q, {}), q):
                if self.states == "8bit":
                    quantized |= quantizable(v)
                    v.copy_(quantize_8bit(v, signed=name not in UNSIGNED_STATES))
                else:
                    v.copy_(v.to(p.dtype))  # states=param: stored as the parameter is
        return quantized

    def _write_back(self) -> None:
        assert self.buffers is not None
        for i, (p, b) in enumerate(zip(self.params, self.buffers)):
            if self.update == "sr":
                p.copy_(fp32_to_bf16_sr(b, self.generator))
            else:
                assert self.comps is not None
                kahan_add_(p, self.comps[i], b - p.float())  # the step's own update, exact in FP32 here


class CountingOptimizer(_Delegating):
    """A library's optimizer as it is, with the same ``on_step`` signal as :class:`PrecisionOptimizer`:
    called after every step in which ``acted(before)`` says the recipe acted (``before`` is whether the
    step had an update to round, taken before it)."""

    def __init__(self, inner: torch.optim.Optimizer, params: list[torch.Tensor],
                 acted: Callable[[bool], bool], on_step: Callable[[], None] | None = None) -> None:
        self.inner, self.params, self.acted, self.on_step = inner, list(params), acted, on_step

    def step(self, closure: Callable | None = None) -> None:
        before = update_acts(self.params, self.inner.param_groups)
        self.inner.step(closure)
        if self.acted(before) and self.on_step is not None:
            self.on_step()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)
