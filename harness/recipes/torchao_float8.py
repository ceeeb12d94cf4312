"""torchao's float8 training recipes, driven through torchao itself (``lib=torchao``, ``fp8=tensorwise|rowwise|
rowwise_gw_hp``).

A model is converted with ``torchao.float8.convert_to_float8_training`` and the recipe's
``Float8LinearConfig.from_recipe_name``: every ``nn.Linear`` becomes a ``Float8Linear``; anything else
(Hugging Face ``Conv1D``, convolutions, functional projections) stays in high precision, and
:func:`harness.core.execution.gemm_coverage` says so. A scenario's functional GEMM (``Execution.matmul``)
runs through torchao's own autograd function, ``matmul_with_hp_or_float8_args``, so the library computes
it. :mod:`harness.values.fp8_rowwise` is the emulation both are checked against, bit for bit.

Imported only by a run whose strategy names ``lib=torchao`` (torchao is an optional dependency).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

from ..core.libraries import RecipeUnsupported

__all__ = ["RECIPE_NAMES", "config", "convert", "matmul"]

#: The harness's ``fp8=`` recipe -> torchao's ``Float8LinearRecipeName`` value.
RECIPE_NAMES = {"tensorwise": "tensorwise", "rowwise": "rowwise", "rowwise_gw_hp": "rowwise_with_gw_hp"}


@functools.lru_cache(maxsize=None)
def config(recipe: str) -> Any:
    """torchao's ``Float8LinearConfig`` for the harness's ``fp8=`` ``recipe``."""
    if recipe not in RECIPE_NAMES:
        raise ValueError(f"fp8={recipe} has no torchao float8 recipe; torchao runs {', '.join(RECIPE_NAMES)}")
    from torchao.float8 import Float8LinearConfig
    return Float8LinearConfig.from_recipe_name(RECIPE_NAMES[recipe])


@functools.lru_cache(maxsize=None)
def _mm_config(recipe: str) -> Any:
    """The ``LinearMMConfig`` a ``Float8Linear`` builds from the config (``float8_linear.Float8Linear.__init__``):
    fast accumulation in the output GEMM only, no emulation, no padding."""
    from torchao.float8.float8_training_tensor import LinearMMConfig, ScaledMMConfig
    c = config(recipe)
    return LinearMMConfig(*(ScaledMMConfig(c.emulate, g.use_fast_accum, False, c.pad_inner_dim)
                            for g in (c.gemm_config_output, c.gemm_config_grad_input, c.gemm_config_grad_weight)))


def matmul(a: torch.Tensor, b: torch.Tensor, recipe: str) -> torch.Tensor:
    """``a @ b`` with autograd through torchao's ``matmul_with_hp_or_float8_args`` (2-D ``b``; leading dims
    of ``a`` flattened). The result has ``a``'s dtype; run it outside autocast."""
    from torchao.float8.float8_linear import matmul_with_hp_or_float8_args
    lead = a.shape[:-1]
    out = matmul_with_hp_or_float8_args.apply(a.reshape(-1, a.shape[-1]), b, _mm_config(recipe), config(recipe))
    return out.reshape(*lead, b.shape[-1])


def _autocast_input(mod: torch.nn.Module, args: tuple) -> tuple | None:
    """``Float8Linear`` casts its input to the autocast dtype only under CUDA autocast; under CPU autocast
    do the same, so the CPU runs the recipe as the GPU does (else the high-precision weight-gradient GEMM
    of ``rowwise_with_gw_hp`` meets a BF16 gradient and an FP32 input and fails)."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.device.type == "cuda" or not torch.is_autocast_enabled(x.device.type):
        return None
    return (x.to(torch.get_autocast_dtype(x.device.type)), *args[1:])


def _check_rows(name: str, mod: torch.nn.Module, args: tuple) -> None:
    """On a GPU each GEMM of a converted layer is a ``torch._scaled_mm``
    (:func:`~harness.values.fp8_rowwise.fits_scaled_mm` says which shapes it takes), and its rows (the
    tokens of a batch) become the inner dimension of the weight-gradient GEMM. The layer filter can see
    only the widths; rows that do not fit fail inside torchao with a RuntimeError in the backward pass.
    Raised here instead, before the forward: the recipe cannot run this batch, which is what the user of
    torchao would meet, with what to change."""
    from ..values.fp8_rowwise import fits_scaled_mm
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] == 0:
        return
    rows = x.numel() // x.shape[-1]
    if not fits_scaled_mm(rows, mod.in_features, mod.out_features):
        raise RecipeUnsupported(
            f"torchao float8 on a GPU runs torch._scaled_mm, which takes only multiples of 16: `{name}` gets "
            f"{rows} rows (tokens of the batch); make batch x sequence a multiple of 16, or leave the layer "
            f"unconverted (module_filter_fn)")


def convert(model: torch.nn.Module, recipe: str, on_run: Callable[[str], None], gpu: bool = False,
            skip: Callable[[str], bool] = lambda fqn: False) -> torch.nn.Module:
    """``model`` with every ``nn.Linear`` converted by torchao for ``recipe`` (the root module too; for a
    ``gpu`` run only those whose widths are multiples of 16; none that ``skip(fqn)`` names, as a precision
    plan's ``module_filter_fn`` would); ``on_run(name)`` is called each time a converted layer runs its
    forward, for coverage."""
    from torchao.float8 import convert_to_float8_training
    from torchao.float8.float8_linear import Float8Linear

    from ..values.fp8_rowwise import fits_scaled_mm

    def fits(mod: torch.nn.Module, _fqn: str) -> bool:
        # torchao's documented filter: on a GPU, torch._scaled_mm takes only multiples of 16, so layers
        # with other widths stay nn.Linear (high precision; gemm_coverage counts them out)
        return not skip(_fqn) and (not gpu or fits_scaled_mm(16, mod.in_features, mod.out_features))
    model = convert_to_float8_training(model, config=config(recipe), module_filter_fn=fits)
    for name, mod in model.named_modules():
        if isinstance(mod, Float8Linear):
            if gpu:
                mod.register_forward_pre_hook(lambda m, a, _k=name or "linear": _check_rows(_k, m, a))
            mod.register_forward_pre_hook(_autocast_input)
            mod.register_forward_pre_hook(lambda _m, _a, _k=name or "linear": on_run(_k))
    return model
