"""The decode loop: prefill the prompt into a preallocated KV cache, then one token per
step. Batches of prompts of different lengths are left-padded (each sequence keeps its own
RoPE positions and never attends to padding); generation stops per sequence at a stop
token; ``on_token`` streams each step's ids.

:func:`generate_batch` is the engine (lists of ids in, lists out, with timings);
:func:`generate` is the tensor shorthand for equal-length prompts.
"""

from __future__ import annotations

import copy
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from moekit.inference.decode import Decoder
from moekit.inference.expert_cache import OffloadStats
from moekit.inference.kv_cache import KVCache
from moekit.inference.sampling import check_sampling, sample_next


@dataclass
class GenerationStats:
    """Timings of one :func:`generate_batch` call.

    Attributes:
        batch: sequences generated together.
        prompt_tokens: prompt tokens over the batch (padding excluded).
        new_tokens: generated tokens over the batch (after a sequence stops, none).
        prefill_s: seconds of the prompt's forward.
        decode_s: seconds of the decode steps.
        decode_steps: decode forwards (the first new token comes from the prefill).
        peak_memory_bytes: the process's peak resident memory (CPU), or the peak allocated
            CUDA memory when the model is on a GPU.
        offload: with offloaded experts (``load_model(..., expert_memory=...)``), the expert
            cache's counters over the decode steps (hit rate, prefetch accuracy, bytes read).
    """

    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    decode_steps: int
    peak_memory_bytes: int
    offload: OffloadStats | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second over the batch during decoding (steps x batch / time)."""
        return self.decode_steps * self.batch / self.decode_s if self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.3f}s ({self.prefill_tokens_per_s:,.0f} tok/s); "
                f"decode {self.decode_steps} steps x batch {self.batch} in {self.decode_s:.3f}s "
                f"({self.decode_tokens_per_s:,.1f} tok/s); peak memory {self.peak_memory_bytes / 2**20:,.0f} MiB"
                + (f"\n{self.offload.summary(self.decode_steps * self.batch)}" if self.offload is not None else ""))


@dataclass
class GenerationOutput:
    """``tokens``: the new ids of each sequence (ending with its stop token if it met one)."""

    tokens: list[list[int]]
    stats: GenerationStats


def _check_causal(model) -> None:
    if not model.causal:
        routers = sorted({type(b.ffn.router).__name__ for b in model.blocks if b.is_moe and not b.ffn.router.causal})
        raise ValueError(
            f"this model cannot generate: its router ({', '.join(routers)}) chooses tokens per expert across "
            "the whole sequence, so a token's output depends on later tokens. Train with a token-choice "
            "router (topk, switch, noisy_topk, sigmoid_bias, ...) to generate."
        )


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _check_generation_fits(model, batch: int, max_new_tokens: int, device: torch.device) -> None:
    """Refuse, before allocating, a KV cache and output buffer that cannot fit."""
    from moekit.budget import check_fits

    cfg = model.config
    element = next(model.parameters()).element_size()
    cache = 2 * cfg.n_layers * batch * cfg.kv_heads * cfg.max_seq_len * cfg.dim_per_head * element
    check_fits(f"generating {max_new_tokens:,} tokens for {batch} prompt(s) (KV cache and buffers)",
               cache + 16 * batch * max_new_tokens, str(device))


@torch.inference_mode()
def generate_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    on_token: Callable[[torch.Tensor], None] | None = None,
    pad_id: int = 0,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` after each prompt.

    Args:
        prompts: one list of ids per sequence; different lengths are left-padded.
        temperature, top_k, top_p: see :func:`sample_next` (``temperature=0``: greedy).
        seed: seeds the sampling (``None``: the global RNG).
        stop_ids: a sequence ends after producing one of these.
        on_token: called with each step's ids ``[B]`` (streaming).
        pad_id: the id fed for padding (never attended to; any valid id).

    Max-length guard: a prompt longer than ``max_seq_len`` keeps its last ``max_seq_len``
    tokens. When prompt plus new tokens exceed ``max_seq_len``, equal-length prompts
    restart the cache from the most recent half of the context; padded batches raise.
    """
    _check_causal(model)
    check_sampling(temperature, top_k, top_p)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty id lists")
    cfg = model.config
    max_len = cfg.max_seq_len
    prompts = [list(p)[-max_len:] for p in prompts]
    bad = [i for p in prompts for i in p if not 0 <= int(i) < cfg.vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the vocabulary 0..{cfg.vocab_size - 1}")
    device = next(model.parameters()).device
    _check_generation_fits(model, len(prompts), max_new_tokens, device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    B, S = len(prompts), max(len(p) for p in prompts)
    padded = any(len(p) != S for p in prompts)
    if padded and S + max_new_tokens > max_len:
        raise ValueError(f"prompt ({S} tokens after padding) + max_new_tokens ({max_new_tokens}) exceeds "
                         f"max_seq_len={max_len}; padded batches cannot slide the context: generate fewer tokens")
    tokens = torch.full((B, S), pad_id, dtype=torch.long)
    real = torch.zeros(B, min(max_len, S + max_new_tokens), dtype=torch.bool)
    for b, p in enumerate(prompts):
        tokens[b, S - len(p):] = torch.tensor(p, dtype=torch.long)
        real[b, S - len(p):] = True
    tokens, real = tokens.to(device), real.to(device)
    positions = (real[:, :S].long().cumsum(1) - 1).clamp(min=0) if padded else None  # [B, S]
    was_training = model.training
    model.eval()
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = torch.full((B, max_new_tokens), -1, dtype=torch.long, device=device)
    steps = 0
    try:
        t0 = time.perf_counter()
        cache = KVCache.for_model(model, B, real.shape[1])
        logits = model(tokens, kv_cache=cache, positions=positions, key_mask=real[:, :S] if padded else None,
                       last_only=True).logits[:, -1]
        prefill_s = time.perf_counter() - t0
        offload = getattr(model, "expert_offload", None)
        offload_start = copy.copy(offload.stats) if offload is not None else None
        t0 = time.perf_counter()
        decoder = Decoder(model, cache)
        history = tokens  # equal-length prompts only: the context to restart from
        pos = positions[:, -1:] if padded else None
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p, generator)  # [B]
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out[:, i] = torch.where(done, torch.full_like(nxt, -1), nxt)
            if on_token is not None:
                on_token(out[:, i])
            if stops.numel():
                done = done | torch.isin(nxt, stops)
            if i == max_new_tokens - 1 or bool(done.all()):
                break
            if not padded:
                history = torch.cat([history[:, -max_len:], nxt[:, None]], 1)
            if cache.length >= cache.max_len:  # full (equal-length prompts only): keep the recent half
                cache = KVCache.for_model(model, B, max_len)
                logits = model(history[:, -(max_len // 2):], kv_cache=cache, last_only=True).logits[:, -1]
                decoder = Decoder(model, cache)
            else:
                key_mask = real[:, : cache.length + 1] if padded else None
                pos = pos + 1 if padded else None
                logits = decoder.step(nxt, None if pos is None else pos[:, 0], key_mask)
            steps += 1
        decode_s = time.perf_counter() - t0
    finally:
        model.train(was_training)
    rows = [[t for t in row if t >= 0] for row in out.tolist()]
    stats = GenerationStats(B, sum(len(p) for p in prompts), sum(map(len, rows)), prefill_s, decode_s, steps,
                            _peak_memory(device), None if offload is None else offload.stats - offload_start)
    return GenerationOutput(rows, stats)


def generate(
    model,
    prompt: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Continue equal-length prompts ``[B, S]`` (ids) by ``max_new_tokens``; returns the new
    ids ``[B, N]``. See :func:`generate_batch` for stop tokens, padding and streaming."""
    if prompt.dim() != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [batch, seq] ids with seq >= 1, got shape {tuple(prompt.shape)}")
    result = generate_batch(model, prompt.tolist(), max_new_tokens, temperature, top_k, top_p, seed)
    return torch.tensor(result.tokens, dtype=torch.long, device=prompt.device).view(prompt.shape[0], -1)
