"""Synthetic, seeded training data for the zoo (:mod:`harness.models.zoo`): small enough to draw on the fly,
structured enough that the loss falls within a few updates.

* Token ids come from a sparse Markov chain: each token is followed by one of ``successors`` fixed
  tokens, uniformly, so a model that learns the table reaches a loss of ``log(successors)`` (from
  ``log(vocab)`` at initialisation).
* Masked-LM batches mask 15% of such a sequence (BERT's rate); the context predicts the masked ids.
* Sequence-to-sequence batches ask for the chain's continuation of the encoder's input.
* Images carry a class-dependent low-frequency pattern under Gaussian noise: a linear probe on the
  pixels separates the classes, a convolution or a patch embedding finds them quickly.

Every batch is a pure function of ``(seed, step)``: it draws from a generator of its own, never the
global RNG, so every strategy's run (and the FP64 reference) sees the same numbers.

>>> chain = MarkovChain(vocab=16, seed=0)
>>> chain.tokens(batch=2, length=5, seed=0, step=3).shape
torch.Size([2, 5])
"""
from __future__ import annotations

import math

import torch

__all__ = ["MarkovChain", "masked", "seq2seq", "images", "MASK_RATE", "IGNORE"]

MASK_RATE = 0.15  # BERT's share of masked positions
IGNORE = -100  # the label torch's cross-entropy (and Hugging Face's losses) skip


def _generator(seed: int, step: int, salt: int) -> torch.Generator:
    # distinct, reproducible streams per (seed, step, purpose): a batch never depends on the RNG's history
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + salt) % (2**63))


class MarkovChain:
    """A fixed sparse transition table over ``vocab`` ids (ids ``reserved`` and above are never emitted:
    they are free for a mask token)."""

    def __init__(self, vocab: int, seed: int, successors: int = 4, reserved: int | None = None) -> None:
        top = vocab if reserved is None else reserved
        if top < 2:
            raise ValueError(f"a Markov chain needs at least 2 token ids, got {top}")
        self.top = top
        self.next = torch.randint(0, top, (top, successors), generator=_generator(seed, -1, 1))

    @property
    def floor(self) -> float:
        """The loss a model that learned the table reaches: the chain's entropy per token, ``log(successors)``."""
        return math.log(self.next.shape[1])

    def tokens(self, batch: int, length: int, seed: int, step: int) -> torch.Tensor:
        """``batch`` sequences of ``length`` ids (int64), a pure function of ``(seed, step)``."""
        g = _generator(seed, step, 2)
        choice = torch.randint(0, self.next.shape[1], (batch, length), generator=g)
        out = torch.empty(batch, length, dtype=torch.long)
        out[:, 0] = torch.randint(0, self.top, (batch,), generator=g)
        for i in range(1, length):
            out[:, i] = self.next[out[:, i - 1], choice[:, i]]
        return out


def masked(chain: MarkovChain, batch: int, length: int, seed: int, step: int, mask_id: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids with :data:`MASK_RATE` of positions replaced by ``mask_id``, labels: the original id at
    masked positions, :data:`IGNORE` elsewhere). At least one position per batch is masked."""
    ids = chain.tokens(batch, length, seed, step)
    pick = torch.rand(batch, length, generator=_generator(seed, step, 3)) < MASK_RATE
    pick[0, length // 2] = True  # never an empty loss
    labels = torch.where(pick, ids, torch.full_like(ids, IGNORE))
    return ids.masked_fill(pick, mask_id), labels


def seq2seq(chain: MarkovChain, batch: int, length: int, seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder ids, target ids): a chain of ``2*length`` split in half; the target continues the input."""
    ids = chain.tokens(batch, 2 * length, seed, step)
    return ids[:, :length].contiguous(), ids[:, length:].contiguous()


def images(classes: int, batch: int, size: int, seed: int, step: int, channels: int = 3, noise: float = 1.0
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images ``(batch, channels, size, size)`` in FP32, labels): each class adds its own fixed pattern
    (a random 4x4 grid upsampled to ``size``, unit RMS) to Gaussian noise of standard deviation ``noise``."""
    grid = torch.randn(classes, channels, 4, 4, generator=_generator(seed, -1, 4))
    pattern = torch.nn.functional.interpolate(grid, size=(size, size), mode="bilinear", align_corners=False)
    pattern = pattern / pattern.pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt()
    g = _generator(seed, step, 5)
    labels = torch.randint(0, classes, (batch,), generator=g)
    x = pattern[labels] + noise * torch.randn(batch, channels, size, size, generator=g)
    return x, labels
