"""Failure regimes as zoo variants: the published small-scale proxies of large-model instabilities and the
precision failures the harness exists for, each on a real architecture, each with its mechanism in its
record (``metrics["observed"]``: a number per training step).

* ``llama-highlr`` / ``llama-highlr-qknorm``: attention-logit growth at a high learning rate (Wortsman et
  al. 2023, "Small-scale proxies for large-scale Transformer training instabilities"; Dehghani et al.
  2023): the largest attention logit ``max |q.k|/sqrt(d)`` climbs step after step until the softmax
  saturates. It happens in FP32 as well: the instability is the optimisation's, not precision's, and
  the verdicts must not blame precision for it. The fix, QK-layernorm, normalises q and k per head
  (Qwen3's architecture is LLaMA's with exactly that added): the logits stay bounded.
* Output-logit divergence (Wortsman et al. sec. 3.2, fixed by a z-loss) is not a variant: at the tiny
  size and a CPU horizon (up to 400 updates, learning rates up to 1.0) neither the divergence nor its fix
  shows (docs/zoo.md). The logit regimes still record ``output_log_z`` and ``output_logit_max`` per step.
* ``llama-smallinit``: gradients that need more range than FP16 has: every projection weight starts at
  LLaMA's init x 2^-9 (std 0.02 -> 3.9e-5, as schemes that shrink the init of deep or residual layers do).
  The attention logits start near 0 and the key/query projections' gradients fall so far below the
  embedding's (at the tiny size the gradients span 2^43, FP16 has 2^40) that no FP16 loss scale keeps
  both: the window is empty; BF16 has the range.
* ``llama-outliers``: outlier features (Dettmers et al. 2022, LLM.int8()): two channels of the activations
  entering layer 0's MLP are 2^20 times the others, as the few huge hidden dimensions of large LMs are.
  The model computes what LLaMA computes (the RMSNorm gain of those channels is multiplied by 2^20 and the
  gate/up projections' weights on them divided by it, and kept where they are: see
  :func:`_freeze_outlier_columns`), so FP32 and BF16 train as before; per-tensor FP8
  scales the whole input by its outlier and flushes the other channels; FP16 overflows (2^20 > 65504).
  The record shows ``mlp_in_amax`` and ``mlp_in_median`` (of |x| entering that MLP) per step.
* ``gpt2-qk1000``: activations past FP16's 65504: one attention block's query and key weights scaled
  x1000 make its attention logits overflow FP16 in the forward pass (BF16 keeps FP32's range).

Attention logits are read through an attention implementation of Hugging Face's interface that computes
``q k^T * scale`` once more, without gradient, before handing over to the model's own eager attention.
"""
from __future__ import annotations

import sys
from typing import Any

import torch

from .zoo import LM, ZooModel, causal_lm, gpt2_config, llama_config, register

__all__ = ["PROBE", "observe_logits", "observe_mlp_input", "HIGH_LR", "QK_GAIN", "SMALL_INIT", "OUTLIER_CHANNELS",
           "OUTLIER_GAIN"]

#: The attention implementation name the regimes register with Hugging Face.
PROBE = "harness_logit_probe"
#: The learning rate of the high-LR regimes: 100x the tiny LMs' 3e-3 (Wortsman et al. sweep to 3e-1).
HIGH_LR = 3e-1
#: Query/key gain of ``gpt2-qk1000``.
QK_GAIN = 1000.0
#: Gain on the initial projection weights of ``llama-smallinit``.
SMALL_INIT = 2.0 ** -9
#: ``llama-outliers``: the outlier channels of layer 0's MLP input and their size against the others.
OUTLIER_CHANNELS = (3, 17)
OUTLIER_GAIN = 2.0 ** 20


def _probe_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs: Any) -> Any:
    """The model's own eager attention, after noting its largest |logit| on ``module``."""
    s = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.no_grad():
        big = float((torch.matmul(query, key.transpose(-1, -2)) * s).abs().max().float())
    prev = getattr(module, "harness_logit_max", 0.0)
    module.harness_logit_max = big if big != big or big > prev else prev  # NaN sticks: it is the news
    eager = sys.modules[type(module).__module__].eager_attention_forward
    return eager(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def _register_probe() -> None:
    from transformers import AttentionInterface
    AttentionInterface.register(PROBE, _probe_attention)


def observe_logits(model: torch.nn.Module) -> dict[str, float]:
    """The largest attention logit (over layers and heads) and the largest |output logit| of the latest
    forward pass; resets the attention modules' maxima for the next one."""
    att = []
    for m in model.modules():
        if hasattr(m, "harness_logit_max"):
            att.append(m.harness_logit_max)
            m.harness_logit_max = 0.0
    out = {"attn_logit_max": max(att, key=lambda v: (v != v, v)) if att else float("nan")}
    if hasattr(model, "harness_output_logit_max"):
        out["output_logit_max"] = model.harness_output_logit_max
        out["output_log_z"] = model.harness_log_z
    return out


def _observed(d: dict) -> dict:
    d["model"].harness_output_logit_max = d["model"].harness_log_z = 0.0  # written by zoo.note_logits
    d["observe"] = observe_logits
    return d


def _llama_highlr(size: str, seed: int, qknorm: bool = False) -> dict:
    import transformers
    _register_probe()
    c = LM[size]
    cls = ("Qwen3Config", "Qwen3ForCausalLM") if qknorm else ("LlamaConfig", "LlamaForCausalLM")
    cfg = llama_config(size, cls[0], attn_implementation=PROBE, **({"head_dim": c["width"] // c["heads"],
                                                                   "use_sliding_window": False} if qknorm else {}))
    model = getattr(transformers, cls[1])(cfg)
    return _observed(causal_lm(model, cfg.vocab_size, c["seq"], c["batch"], seed, HIGH_LR))


def _llama_smallinit(size: str, seed: int) -> dict:
    import transformers
    c = LM[size]
    cfg = llama_config(size)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # attention and MLP projections; the embedding and the output head keep their init
        for name, p in model.named_parameters():
            if p.dim() == 2 and not name.startswith(("model.embed_tokens", "lm_head")):
                p.mul_(SMALL_INIT)
    return causal_lm(model, cfg.vocab_size, c["seq"], c["batch"], seed, c["lr"])


def _note_mlp_input(module: torch.nn.Module, args: tuple) -> None:
    with torch.no_grad():
        x = args[0].detach().abs().float()
        module.harness_in_amax, module.harness_in_median = float(x.max()), float(x.median())


def observe_mlp_input(model: torch.nn.Module) -> dict[str, float]:
    """The largest and the median |x| entering layer 0's MLP in the latest forward pass."""
    mlp = model.model.layers[0].mlp
    return {"mlp_in_amax": mlp.harness_in_amax, "mlp_in_median": mlp.harness_in_median}


def _llama_outliers(size: str, seed: int) -> dict:
    import transformers
    c = LM[size]
    cfg = llama_config(size)
    model = transformers.LlamaForCausalLM(cfg)
    layer = model.model.layers[0]
    with torch.no_grad():  # the same function: gain x G on the channels, their weights in the next GEMMs / G
        for ch in OUTLIER_CHANNELS:
            layer.post_attention_layernorm.weight[ch] *= OUTLIER_GAIN
            layer.mlp.gate_proj.weight[:, ch] /= OUTLIER_GAIN
            layer.mlp.up_proj.weight[:, ch] /= OUTLIER_GAIN
    layer.mlp.harness_in_amax = layer.mlp.harness_in_median = 0.0
    layer.mlp.register_forward_pre_hook(_note_mlp_input)  # a module-level function: survives the deep copies
    d = causal_lm(model, cfg.vocab_size, c["seq"], c["batch"], seed, c["lr"])
    layer.mlp.register_forward_pre_hook(_freeze_outlier_columns)
    d["observe"] = observe_mlp_input
    return d


def _freeze_outlier_columns(module: torch.nn.Module, args: tuple) -> None:
    """Zero the gradient of the outlier channels' weights (this forward's backward only): Adam moves each
    weight by about the learning rate whatever its size, and weights 2^20 below their neighbours would
    change by many times themselves at every step (FP32 itself turns chaotic within 32 updates). Frozen,
    the outliers persist, as outlier features do in trained LMs. A forward pre-hook of the MLP, so that it
    survives the deep copies of the model and a library that swaps the projections for its own modules
    (torchao's float8 training keeps their weight parameters)."""
    if not torch.is_grad_enabled():
        return
    for proj in (module.gate_proj, module.up_proj):
        if proj.weight.requires_grad:
            _mask_once(proj.weight)


def _mask_once(w: torch.Tensor) -> None:
    handle: list[Any] = []

    def mask(grad: torch.Tensor) -> torch.Tensor:
        handle.pop().remove()
        grad = grad.clone()
        grad[:, list(OUTLIER_CHANNELS)] = 0
        return grad
    handle.append(w.register_hook(mask))


def _gpt2_qk1000(size: str, seed: int) -> dict:
    import transformers
    _register_probe()
    c = LM[size]
    cfg = gpt2_config(size, attn_implementation=PROBE)
    model = transformers.GPT2LMHeadModel(cfg)
    w = c["width"]
    with torch.no_grad():  # c_attn holds [q | k | v] along its output dimension (Conv1D: weight is (in, out))
        model.transformer.h[0].attn.c_attn.weight[:, : 2 * w] *= QK_GAIN
    return _observed(causal_lm(model, c["vocab"], c["seq"], c["batch"], seed, c["lr"]))


TINY = ("tiny",)
for _m in (
    ZooModel("llama-highlr", "transformers", "causal LM", f"tiny LLaMA at lr {HIGH_LR:g}: attention-logit growth "
             "(in FP32 too)", _llama_highlr, TINY, regime="attention-logit growth"),
    ZooModel("llama-highlr-qknorm", "transformers", "causal LM", f"tiny LLaMA with QK-RMSNorm (Qwen3) at lr "
             f"{HIGH_LR:g}: the logits stay bounded", lambda size, seed: _llama_highlr(size, seed, qknorm=True), TINY,
             regime="attention-logit growth, fixed by QK-layernorm"),
    ZooModel("llama-smallinit", "transformers", "causal LM", "tiny LLaMA whose projection weights start x2^-9: "
             "gradients wider than FP16's range", _llama_smallinit, TINY, regime="gradients wider than FP16's range"),
    ZooModel("llama-outliers", "transformers", "causal LM", "tiny LLaMA with two outlier feature channels "
             "(x2^20) entering layer 0's MLP: per-tensor FP8 flushes the rest", _llama_outliers, TINY,
             regime="outlier features (FP8 per-tensor scaling)"),
    ZooModel("gpt2-qk1000", "transformers", "causal LM", f"tiny GPT-2 whose first block's q/k weights are scaled "
             f"x{QK_GAIN:g}: attention logits past FP16's 65504", _gpt2_qk1000, TINY,
             regime="activations past FP16's max"),
):
    register(_m)
