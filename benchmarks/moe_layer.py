"""MoE layer speed: moekit's fast path against its reference, a dense FFN of equal active
FLOPs, and transformers' MixtralSparseMoeBlock, all measured in the same run.

    python benchmarks/moe_layer.py                 # full table (a few minutes on 2 cores)
    python benchmarks/moe_layer.py --quick         # fewer repetitions
    python benchmarks/moe_layer.py --system-malloc # glibc's defaults: freed memory goes back to the OS

Prints tokens/s for forward (eval, no grad) and forward+backward (train) and each
implementation's ratio to the dense FFN of width ``top_k * d_ff`` (same active FLOPs per
token). Median of the repetitions after a warm-up, the contenders measured round-robin.

Freed memory stays in the process (glibc's trim threshold raised, its mmap threshold fixed at
32 MB, for every contender alike), the reuse PyTorch's performance tuning guide gets from
jemalloc or tcmalloc: with glibc's defaults a training step's weight gradients (29-59 MB
each here) are handed back to the OS when ``zero_grad`` frees them and faulted in again,
page by page, by the next backward: 14,000-21,000 page faults per step, 15-30 ms, which some
steps pay and others do not and which swamp the forward+backward rows at small T.
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import time
from typing import Callable

import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.layers.experts import FeedForward

CASES = [
    ("8 experts top-2, d_ff 1792", dict(num_experts=8, top_k=2, d_ff=1792)),
    ("64 experts top-8, d_ff 224", dict(num_experts=64, top_k=8, d_ff=224)),
]
TOKENS = [1, 16, 256, 4096]
D_MODEL = 512


def keep_freed_memory() -> bool:
    """glibc: keep freed memory for reuse (``M_TRIM_THRESHOLD``) and serve blocks up to 32 MB
    from the heap (``M_MMAP_THRESHOLD``; larger ones are mapped fresh, as by default).
    Returns whether it took."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 32 << 20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def interleaved_medians(steps: dict[str, Callable[[], None]], budget_s: float, min_rounds: int = 5,
                        max_rounds: int = 400) -> dict[str, float]:
    """Median seconds per call of each step, measured round-robin (one call of each per
    round) so that drift in machine load hits every contender alike."""
    for fn in steps.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return {name: statistics.median(ts) for name, ts in times.items()}


def hf_block(moe: MoE, impl: str) -> nn.Module | None:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    c = moe.config
    cfg = MixtralConfig(hidden_size=c.d_model, intermediate_size=c.d_ff, num_local_experts=c.num_experts,
                        num_experts_per_tok=c.top_k, experts_implementation=impl)
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():  # the same weights as moekit's layer, in transformers' layout
        block.gate.weight.copy_(moe.router.gate.weight)
        e = moe.experts
        block.experts.gate_up_proj.copy_(torch.cat([e.w1, e.w3], dim=2).transpose(1, 2))
        block.experts.down_proj.copy_(e.w2.transpose(1, 2))
    return block


def contenders(case: dict) -> dict[str, nn.Module]:
    cfg = MoEConfig(d_model=D_MODEL, **case)
    fast = MoE(cfg)
    ref = MoE(MoEConfig(d_model=D_MODEL, implementation="reference", **case))
    ref.load_state_dict(fast.state_dict())
    out = {"dense FFN (equal active FLOPs)": FeedForward(D_MODEL, cfg.top_k * cfg.d_ff), "moekit fast": fast,
           "moekit reference": ref}
    for impl in ("eager", "grouped_mm"):
        block = hf_block(fast, impl)
        if block is not None:
            out[f"transformers {impl}"] = block
    return out


def output_of(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    y = module(x)
    if isinstance(module, MoE):  # training includes moekit's auxiliary losses
        return y.output + y.aux_loss if torch.is_grad_enabled() else y.output
    return y


def make_step(module: nn.Module, T: int, backward: bool) -> Callable[[], None]:
    x = torch.randn(1, T, D_MODEL)
    if not backward:

        def step():
            module.eval()
            with torch.inference_mode():
                output_of(module, x)

        return step
    xg = x.clone().requires_grad_(True)
    grad = torch.randn(1, T, D_MODEL)

    def step():
        module.train()
        output_of(module, xg).backward(grad)
        module.zero_grad(set_to_none=True)
        xg.grad = None

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter time budget per measurement")
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    parser.add_argument("--reference-max-tokens", type=int, default=256,
                        help="skip the slow reference path above this many tokens")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's allocator as it is (freed memory returned to the OS)")
    args = parser.parse_args()
    malloc = "system malloc" if args.system_malloc or not keep_freed_memory() else "freed memory kept"
    torch.manual_seed(0)
    budget = 0.6 if args.quick else 2.0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"float32, d_model {D_MODEL}, {malloc}")
    for title, case in CASES:
        modules = contenders(case)
        print(f"\n## {title}")
        print(f"| T | pass | {' | '.join(modules)} |")
        print("|---|---|" + "---|" * len(modules))
        for T in args.tokens:
            for backward in (False, True):
                steps = {name: make_step(m, T, backward) for name, m in modules.items()
                         if not (name == "moekit reference" and T > args.reference_max_tokens)}
                secs = interleaved_medians(steps, budget * len(steps))
                dense = T / secs[next(iter(modules))]
                cells = []
                for name in modules:
                    if name not in secs:
                        cells.append("-")
                    elif name == next(iter(modules)):
                        cells.append(f"{dense:,.0f} tok/s")
                    else:
                        tps = T / secs[name]
                        cells.append(f"{tps:,.0f} ({tps / dense:.2f}x)")
                print(f"| {T} | {'fwd+bwd' if backward else 'fwd'} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
