"""Realistic models for ``check-model`` and its benchmark (``bench/check_model.py``): GPT-2 and a LLaMA from
HuggingFace ``transformers`` configs, ViT-B/16 from ``timm``, all randomly initialised (no download).

Each factory takes ``size`` (``tiny``: seconds on a CPU, for tests; ``full``: the real sizes) or reads it
from ``MP_HARNESS_HF_SIZE``::

    python -m harness check-model examples.hf_models:gpt2                            # tiny, CPU
    MP_HARNESS_HF_SIZE=full python -m harness check-model examples.hf_models:gpt2 --device cuda   # 124M, 8x256

``transformers`` and ``timm`` are imported only by the factory that needs them. Dropout is 0 everywhere:
masks drawn in FP16 and FP32 kernels can differ on a GPU (see ``examples/third_party_model.py``).
"""
from __future__ import annotations

import os

import torch
from torch.nn import functional as F

ENV = "MP_HARNESS_HF_SIZE"

#: GPT-2 124M is the ``full`` GPT-2 (batch 8 x 256 tokens); the LLaMA ``full`` has about 150M parameters.
GPT2 = {"tiny": {"n_embd": 32, "n_layer": 2, "n_head": 2, "vocab": 96, "seq": 16, "batch": 4},
        "full": {"n_embd": 768, "n_layer": 12, "n_head": 12, "vocab": 50257, "seq": 256, "batch": 8}}
LLAMA = {"tiny": {"hidden": 32, "layers": 2, "heads": 4, "ffn": 64, "vocab": 96, "seq": 16, "batch": 4},
         "full": {"hidden": 768, "layers": 12, "heads": 12, "ffn": 2560, "vocab": 32000, "seq": 256, "batch": 8}}
VIT = {"tiny": {"img": 32, "patch": 16, "dim": 32, "depth": 2, "heads": 2, "classes": 10, "batch": 4},
       "full": {"img": 224, "patch": 16, "dim": 768, "depth": 12, "heads": 12, "classes": 1000, "batch": 32}}


def _size(size: str | None, table: dict) -> dict:
    size = size or os.environ.get(ENV, "tiny")
    if size not in table:
        raise ValueError(f"unknown size {size!r} (from {ENV} or size=...); sizes: {', '.join(table)}")
    return table[size]


def _tokens(vocab: int, batch: int, seq: int):
    def batch_at(step: int) -> tuple:
        g = torch.Generator().manual_seed(1000 + step)
        return (torch.randint(0, vocab, (batch, seq), generator=g),)
    return batch_at


def _lm_loss(m: torch.nn.Module, b: tuple) -> torch.Tensor:
    (tokens,) = b
    logits = m(input_ids=tokens).logits[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))


def _adamw(params: list) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)


def gpt2(size: str | None = None) -> dict:
    """GPT-2 (``GPT2LMHeadModel`` from a config, random init) on random tokens, AdamW."""
    from transformers import GPT2Config, GPT2LMHeadModel
    c = _size(size, GPT2)
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=c["vocab"], n_positions=max(c["seq"], 1024 if c["n_embd"] >= 768 else c["seq"]),
                     n_embd=c["n_embd"], n_layer=c["n_layer"], n_head=c["n_head"], resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=c["vocab"] - 1, eos_token_id=c["vocab"] - 1)
    return {"model": GPT2LMHeadModel(cfg), "batch": _tokens(c["vocab"], c["batch"], c["seq"]), "loss": _lm_loss,
            "optimizer": _adamw}


def llama(size: str | None = None) -> dict:
    """A LLaMA (``LlamaForCausalLM`` from a config, random init, untied head) on random tokens, AdamW."""
    from transformers import LlamaConfig, LlamaForCausalLM
    c = _size(size, LLAMA)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], intermediate_size=c["ffn"],
                      num_hidden_layers=c["layers"], num_attention_heads=c["heads"], num_key_value_heads=c["heads"],
                      max_position_embeddings=max(c["seq"], 2048 if c["hidden"] >= 768 else c["seq"]),
                      tie_word_embeddings=False, attention_dropout=0.0)
    return {"model": LlamaForCausalLM(cfg), "batch": _tokens(c["vocab"], c["batch"], c["seq"]), "loss": _lm_loss,
            "optimizer": _adamw}


def vit(size: str | None = None) -> dict:
    """ViT-B/16 (``timm``'s ``VisionTransformer``, random init) on random images and labels, AdamW."""
    from timm.models.vision_transformer import VisionTransformer
    c = _size(size, VIT)
    torch.manual_seed(0)
    model = VisionTransformer(img_size=c["img"], patch_size=c["patch"], num_classes=c["classes"],
                              embed_dim=c["dim"], depth=c["depth"], num_heads=c["heads"], drop_rate=0.0)

    def batch(step: int) -> tuple:
        g = torch.Generator().manual_seed(1000 + step)
        return (torch.randn(c["batch"], 3, c["img"], c["img"], generator=g),
                torch.randint(0, c["classes"], (c["batch"],), generator=g))

    def loss(m: torch.nn.Module, b: tuple) -> torch.Tensor:
        x, y = b
        return F.cross_entropy(m(x).float(), y)

    return {"model": model, "batch": batch, "loss": loss, "optimizer": _adamw}
