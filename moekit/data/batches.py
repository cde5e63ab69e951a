"""Token streams, the train/validation split, and deterministic batches.

The batch of optimizer step ``s`` (micro-batch ``m``) is drawn with a generator seeded from
``(seed, s, m)`` alone, so a resumed run sees exactly the batches an uninterrupted one
would: the data position is the step counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TokenSplits:
    """``train`` and ``val`` 1-D token tensors (the last ``val_fraction`` is validation)."""

    train: torch.Tensor
    val: torch.Tensor

    @classmethod
    def from_tokens(cls, tokens: np.ndarray, val_fraction: float, seq_len: int) -> TokenSplits:
        n_val = int(len(tokens) * val_fraction)
        need = seq_len + 1
        if n_val < need or len(tokens) - n_val < need:
            raise ValueError(
                f"the corpus has {len(tokens)} tokens: too few for a train and a validation split of at "
                f"least {need} tokens each (seq_len {seq_len}, val_fraction {val_fraction}); use more text"
            )
        t = torch.from_numpy(np.array(tokens))  # a writable copy
        return cls(train=t[: len(t) - n_val], val=t[len(t) - n_val:])


def _windows(stream: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + torch.arange(seq_len + 1)  # [B, S+1]
    chunk = stream[idx].long()
    return chunk[:, :-1], chunk[:, 1:]  # inputs, next-token targets, each [B, S]


def train_batch(stream: torch.Tensor, batch_size: int, seq_len: int, seed: int, step: int, micro: int = 0):
    """Random windows of ``stream`` for ``(step, micro)``; the same arguments give the same batch."""
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + step * 65_537 + micro) % (1 << 63))
    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=g)
    return _windows(stream, starts, seq_len)


def eval_batches(stream: torch.Tensor, n_batches: int, batch_size: int, seq_len: int):
    """``n_batches`` fixed batches of windows spread evenly over ``stream`` (same every call)."""
    n = n_batches * batch_size
    starts = torch.linspace(0, len(stream) - seq_len - 1, n).long()
    for b in range(n_batches):
        yield _windows(stream, starts[b * batch_size:(b + 1) * batch_size], seq_len)
