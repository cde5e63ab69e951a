"""Sampling and a simple decode loop with a KV cache (enough to see what a model learned;
batching, streaming and speed come with the inference engine)."""

from __future__ import annotations

import torch

from moekit.inference.kv_cache import KVCache


def sample_next(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Next ids ``[B]`` from last-position ``logits`` ``[B, V]``.

    ``temperature == 0`` is greedy; ``top_k`` keeps only the ``k`` likeliest tokens.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 or None, got {top_k}")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """Continue ``prompt`` ``[B, S]`` (ids) by ``max_new_tokens``; returns only the new ids ``[B, N]``.

    When the context reaches ``max_seq_len`` the cache restarts from the last half of it.
    A model whose router is not causal (expert choice) is refused: its outputs for a token
    depend on the other tokens in the batch, so it cannot decode one token at a time.
    """
    if not model.causal:
        routers = sorted({type(b.ffn.router).__name__ for b in model.blocks if b.is_moe and not b.ffn.router.causal})
        raise ValueError(
            f"this model cannot generate: its router ({', '.join(routers)}) chooses tokens per expert across "
            "the whole sequence, so a token's output depends on later tokens. Train with a token-choice "
            "router (topk, switch, noisy_topk, sigmoid_bias, ...) to generate."
        )
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, seq] ids with seq >= 1, got shape {tuple(prompt.shape)}")
    max_len = model.config.max_seq_len
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    history = prompt.to(device)  # [B, S + generated so far]
    cache = KVCache.for_model(model, history.shape[0])
    logits = model(history[:, -max_len:], kv_cache=cache).logits[:, -1]
    start = history.shape[1]
    for i in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, generator)  # [B]
        history = torch.cat([history, nxt[:, None]], 1)
        if i == max_new_tokens - 1:
            break
        if cache.length >= max_len:  # full: restart from the recent half of the context
            cache = KVCache.for_model(model, history.shape[0])
            logits = model(history[:, -(max_len // 2):], kv_cache=cache).logits[:, -1]
        else:
            logits = model(nxt[:, None], kv_cache=cache).logits[:, -1]
    model.train(was_training)
    return history[:, start:]
