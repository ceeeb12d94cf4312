"""A third-party model for ``check-model``: ``torch.nn.TransformerEncoder``, used as torch ships it.

A causal language model (embedding, pre-norm ``TransformerEncoderLayer`` stack, linear head) learning
token sequences drawn from a fixed sparse Markov chain, with cross-entropy and AdamW. Only the
factory below is ours; the model is torch's, unchanged::

    python -m harness check-model examples.third_party_model:factory                 # small, CPU
    python -m harness check-model examples.third_party_model:large --device cuda     # d_model 1024, 8 layers
    MP_HARNESS_EXAMPLE_SIZE=large python -m harness check-model examples.third_party_model:factory --device cuda

Sizes are in :data:`SIZES`; ``factory(size=...)`` or ``MP_HARNESS_EXAMPLE_SIZE`` picks one. Dropout is 0:
with dropout on, masks drawn in FP16 and FP32 kernels can differ on a GPU, and the comparison would
measure the masks instead of the precision.
"""
from __future__ import annotations

import os

import torch
from torch import nn
from torch.nn import functional as F

SIZES = {
    "small": {"d_model": 64, "layers": 2, "heads": 4, "seq": 32, "batch": 8, "vocab": 128},
    "large": {"d_model": 1024, "layers": 8, "heads": 16, "seq": 256, "batch": 8, "vocab": 8192},
}
ENV = "MP_HARNESS_EXAMPLE_SIZE"


class CausalLM(nn.Module):
    """Embedding + ``nn.TransformerEncoder`` (causal mask) + linear head."""

    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, seq: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=tokens.device)
        x = self.embed(tokens) + self.pos[:t]
        return self.head(self.norm(self.encoder(x, mask=mask, is_causal=True)))


def _successors(vocab: int, successors: int = 4) -> torch.Tensor:
    """The Markov chain: each token is followed by one of ``successors`` fixed tokens, uniformly."""
    return torch.randint(0, vocab, (vocab, successors), generator=torch.Generator().manual_seed(1))


def factory(size: str | None = None) -> dict:
    """The check-model factory: ``model``, ``batch(step)``, ``loss(model, batch)``, ``optimizer(params)``."""
    size = size or os.environ.get(ENV, "small")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r} (from {ENV} or factory(size=...)); sizes: {', '.join(SIZES)}")
    c = SIZES[size]
    torch.manual_seed(0)
    model = CausalLM(c["vocab"], c["d_model"], c["layers"], c["heads"], c["seq"])
    nxt = _successors(c["vocab"])

    def batch(step: int) -> tuple:
        g = torch.Generator().manual_seed(1000 + step)
        choice = torch.randint(0, nxt.shape[1], (c["batch"], c["seq"]), generator=g)
        tokens = torch.empty(c["batch"], c["seq"] + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, c["vocab"], (c["batch"],), generator=g)
        for i in range(c["seq"]):
            tokens[:, i + 1] = nxt[tokens[:, i], choice[:, i]]
        return (tokens,)

    def loss(m: nn.Module, b: tuple) -> torch.Tensor:
        (tokens,) = b
        logits = m(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))

    return {"model": model, "batch": batch, "loss": loss,
            "optimizer": lambda params: torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)}


def large() -> dict:
    """``factory("large")``: d_model 1024, 8 layers, 16 heads, sequences of 256 tokens, batch 8."""
    return factory("large")
