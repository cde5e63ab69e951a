"""MoE layer speed: moekit's fast path against its reference, a dense FFN of equal active
FLOPs, and transformers' MixtralSparseMoeBlock, all measured in the same run.

    python benchmarks/moe_layer.py                 # full table (a few minutes on 2 cores)
    python benchmarks/moe_layer.py --quick         # fewer repetitions
    python benchmarks/moe_layer.py --system-malloc # glibc's defaults: freed memory goes back to the OS
    python benchmarks/moe_layer.py --experts 64 --tokens 4096 --neighbours 1 2   # busy machine only
    python benchmarks/moe_layer.py --tokens --neighbours --without-blocks 256 1024 4096  # blocked kernel on/off
    python benchmarks/moe_layer.py --tokens --neighbours --bf16-shapes 128:256 512:1024 1024:2048  # bfloat16 kernel on/off

The last table runs moekit's fine-grained layer (64 experts top-8) and the dense FFN with
0, 1 and 2 busy processes beside them (each a Python loop that keeps one core busy) and
prints the MoE-to-dense ratio with neighbours against the ratio on the quiet machine, which
the busy-machine goal holds within 10%.

Prints tokens/s for forward (eval, no grad) and forward+backward (train) and each
implementation's speed relative to the dense FFN of width ``top_k * d_ff`` (same active FLOPs
per token). The contenders run round-robin after a warm-up (at least 9 rounds); tokens/s is
the median over rounds, the ratio the median of the per-round ratios to the dense FFN's call
in the same round (paired, so that the machine's slow spells, which move its speed by 10-35%
here, cancel out). The last column is moekit's fast path against the faster of transformers'
two implementations in that row, paired the same way. The reference path, many times slower,
is timed on its own after each row.

Freed memory stays in the process for every contender (glibc's trim threshold raised, its
mmap threshold at 1 GiB), the reuse PyTorch's performance tuning guide gets from jemalloc or
tcmalloc, so that no contender's figure includes page faults. With glibc's defaults
(``--system-malloc``) blocks over 32 MB are mapped fresh and faulted in page by page on
every call, and freed heap memory goes back to the OS: a training step's weight gradients
(29-59 MB each here) cost 14,000-21,000 faults (15-30 ms) that some steps pay and others do
not, which swamps the forward+backward rows at small T; and the dense FFN's 59 MB
activations at T=4096 cost it about 57,000 faults (about 60 ms) a training step, which
moekit's per-expert blocks do not.
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import platform
import statistics
import time
from typing import Callable

import moekit  # noqa: F401  (before torch, as the moekit command does: moekit's OpenMP wait policy, moekit/_threads.py)
import torch
from torch import nn

from moekit import MoE, MoEConfig
from moekit.layers.experts import FeedForward
from moekit.layers.thresholds import THRESHOLDS

CASES = [
    ("8 experts top-2, d_ff 1792", dict(num_experts=8, top_k=2, d_ff=1792)),
    ("64 experts top-8, d_ff 224", dict(num_experts=64, top_k=8, d_ff=224)),
]
TOKENS = [1, 16, 256, 4096]
D_MODEL = 512
DENSE, FAST, REFERENCE = "dense FFN (equal active FLOPs)", "moekit fast", "moekit reference"


def keep_freed_memory() -> bool:
    """glibc: keep freed memory for reuse (``M_TRIM_THRESHOLD``) and serve blocks up to 1 GiB
    from the heap (``M_MMAP_THRESHOLD``; by default those over 32 MB are mapped fresh on each
    allocation). Returns whether it took."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def interleaved_times(steps: dict[str, Callable[[], None]], budget_s: float, min_rounds: int = 9,
                      max_rounds: int = 400) -> dict[str, list[float]]:
    """Seconds per call of each step, measured round-robin: one call of each per round, the
    order reversed every other round, so that drift in machine load hits every contender
    alike and none always runs right after the same other."""
    for fn in steps.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    rounds = 0
    while rounds < max_rounds and (rounds < min_rounds or time.perf_counter() - start < budget_s):
        for name, fn in (reversed(steps.items()) if rounds % 2 else steps.items()):
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def _spin() -> None:
    while True:  # a neighbour: one core kept busy
        pass


class BusyNeighbours:
    """``n`` processes that keep a core busy each while the ``with`` block runs."""

    def __init__(self, n: int):
        self.procs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(n)]

    def __enter__(self) -> BusyNeighbours:
        for p in self.procs:
            p.start()
        time.sleep(0.2)  # running before the first measurement
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.join()


def paired_ratio(baseline: list[float], times: list[float]) -> float:
    """Speed relative to the baseline: the median over rounds of the ratio of the two calls'
    times in the same round (a paired comparison: a slow spell that slows a whole round
    cancels out, where it would move one median and not the other)."""
    return statistics.median(b / t for b, t in zip(baseline, times))


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


def contenders(case: dict, transformers: bool = True) -> dict[str, nn.Module]:
    cfg = MoEConfig(d_model=D_MODEL, **case)
    fast = MoE(cfg)
    ref = MoE(MoEConfig(d_model=D_MODEL, implementation="reference", **case))
    ref.load_state_dict(fast.state_dict())
    out = {DENSE: FeedForward(D_MODEL, cfg.top_k * cfg.d_ff), FAST: fast, REFERENCE: ref}
    for impl in ("eager", "grouped_mm") if transformers else ():
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
    parser.add_argument("--experts", type=int, nargs="*", default=[c["num_experts"] for _, c in CASES],
                        help="which cases to run, by their number of experts")
    parser.add_argument("--no-transformers", action="store_true", help="leave transformers' blocks out")
    parser.add_argument("--neighbours", type=int, nargs="*", default=[1, 2],
                        help="busy processes beside the fine-grained layer in the last table (none: skip it)")
    parser.add_argument("--neighbour-tokens", type=int, nargs="*", default=[256, 4096],
                        help="tokens of the busy-machine table (forward+backward)")
    parser.add_argument("--reference-max-tokens", type=int, default=256,
                        help="skip the slow reference path above this many tokens")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc's allocator as it is (freed memory returned to the OS)")
    parser.add_argument("--bf16-shapes", nargs="*", default=[], type=shape_pair,
                        help="d_model:d_ff pairs of a table of 8 experts top-2 training in bfloat16 autocast (and "
                             "inference with bfloat16 weights) with the bfloat16 blocked kernel and without it")
    parser.add_argument("--bf16-tokens", type=int, nargs="*", default=[64, 4096], help="tokens of that table")
    parser.add_argument("--without-blocks", type=int, nargs="*", default=[],
                        help="tokens of a table pairing moekit's paths with the paths it takes with the blocked "
                             "kernel off (its thresholds at 0): what the blocked kernel brings")
    args = parser.parse_args()
    malloc = "system malloc" if args.system_malloc or not keep_freed_memory() else "freed memory kept"
    torch.manual_seed(0)
    budget = 0.6 if args.quick else 2.0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"float32, d_model {D_MODEL}, {malloc}")
    tables = [(title, case) for title, case in CASES if case["num_experts"] in args.experts]
    for title, case in tables if args.tokens else ():
        modules = contenders(case, transformers=not args.no_transformers)
        hf = [name for name in modules if name.startswith("transformers")]
        print(f"\n## {title}")
        print(f"| T | pass | {' | '.join(modules)} |" + (" moekit vs transformers' best |" if hf else ""))
        print("|---|---|" + "---|" * (len(modules) + bool(hf)))
        for T in args.tokens:
            for backward in (False, True):
                steps = {name: make_step(m, T, backward) for name, m in modules.items() if name != REFERENCE}
                times = interleaved_times(steps, budget * len(steps))
                if T <= args.reference_max_tokens:  # far slower than the rest: timed on its own, unpaired
                    times[REFERENCE] = interleaved_times({REFERENCE: make_step(modules[REFERENCE], T, backward)},
                                                         budget, min_rounds=3)[REFERENCE]
                dense = times[DENSE]
                cells = []
                for name in modules:
                    if name not in times:
                        cells.append("-")
                    elif name == DENSE:
                        cells.append(f"{T / statistics.median(dense):,.0f} tok/s")
                    else:
                        tps = T / statistics.median(times[name])
                        ratio = paired_ratio(dense, times[name]) if name != REFERENCE else tps * statistics.median(dense) / T
                        cells.append(f"{tps:,.0f} ({ratio:.2f}x)")
                if hf:
                    best = min(hf, key=lambda name: statistics.median(times[name]))
                    cells.append(f"{paired_ratio(times[best], times[FAST]):.2f}x {best.split()[1]}")
                print(f"| {T} | {'fwd+bwd' if backward else 'fwd'} | {' | '.join(cells)} |", flush=True)
    for case in tables if args.without_blocks else ():
        without_blocks_table(case, args.without_blocks, 2 * budget)
    if args.bf16_shapes:
        bf16_table(args.bf16_shapes, args.bf16_tokens, 2 * budget)
    if args.neighbours:
        busy_table(CASES[-1], args.neighbour_tokens, args.neighbours, 4 * budget)


def without_blocks(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the blocked kernel's thresholds at 0 for the call (the paths before it)."""
    names = ("blocks_max_rows", "blocks_max_rows_avx512")

    def run():
        saved = {name: THRESHOLDS[name] for name in names}
        THRESHOLDS.update({name: saved[name]._replace(value=0) for name in names})
        try:
            step()
        finally:
            THRESHOLDS.update(saved)

    return run


def without_blocks_table(case: tuple[str, dict], tokens: list[int], budget: float) -> None:
    """moekit's layer against itself with the blocked kernel off, paired per round, next to
    the dense FFN."""
    title, fields = case
    cfg = MoEConfig(d_model=D_MODEL, **fields)
    dense, moe = FeedForward(D_MODEL, cfg.top_k * cfg.d_ff), MoE(cfg)
    print(f"\n## {title}: with and without the blocked kernel")
    print("| T | pass | dense FFN | moekit | moekit without the blocked kernel | with / without |")
    print("|---|---|---|---|---|---|")
    for T in tokens:
        for backward in (False, True):
            step = make_step(moe, T, backward)
            times = interleaved_times({DENSE: make_step(dense, T, backward), "with": step,
                                       "without": without_blocks(step)}, 3 * budget)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            print(f"| {T} | {'fwd+bwd' if backward else 'fwd'} | {ms[DENSE]:,.1f} ms | {ms['with']:,.1f} ms "
                  f"({paired_ratio(times[DENSE], times['with']):.2f}x) | {ms['without']:,.1f} ms "
                  f"({paired_ratio(times[DENSE], times['without']):.2f}x) | "
                  f"{paired_ratio(times['without'], times['with']):.2f}x |", flush=True)


def shape_pair(text: str) -> tuple[int, int]:
    """``d_model:d_ff`` -> ``(d_model, d_ff)``, two even positive ints (argparse reports the rest)."""
    parts = text.split(":")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 and int(p) % 2 == 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected d_model:d_ff, two even positive ints (as 128:256), got {text!r}")
    return int(parts[0]), int(parts[1])


def without_bf16_kernel(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` with the bfloat16 blocked kernel reported absent for the call (oneDNN's path)."""
    from moekit import kernels

    def run():
        real = kernels.blocks_bf16
        kernels.blocks_bf16 = lambda: False
        try:
            step()
        finally:
            kernels.blocks_bf16 = real

    return run


def bf16_table(shapes: list[tuple[int, int]], tokens: list[int], budget: float) -> None:
    """8 experts top-2 at each (d_model, d_ff): training under bfloat16 autocast (float32
    weights) and inference of bfloat16 weights, with the bfloat16 blocked kernel and without
    it (oneDNN's products on padded segments), paired per round, next to the dense FFN."""
    print("\n## 8 experts top-2 in bfloat16: with and without the bfloat16 blocked kernel")
    print("| d_model | d_ff | T | pass | dense FFN | moekit | moekit without the kernel | with / without |")
    print("|---|---|---|---|---|---|---|---|")
    for d, f in shapes:
        cfg = MoEConfig(d_model=d, d_ff=f, num_experts=8, top_k=2)
        for T in tokens:
            for backward in (False, True):
                dense, moe = FeedForward(d, 2 * f), MoE(cfg)
                if not backward:  # inference of a bfloat16 model
                    dense, moe = dense.to(torch.bfloat16), moe.to(torch.bfloat16)
                steps = {}
                for name, m in ((DENSE, dense), ("with", moe)):
                    steps[name] = bf16_step(m, d, T, backward)
                steps["without"] = without_bf16_kernel(steps["with"])
                times = interleaved_times(steps, 3 * budget)
                ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
                print(f"| {d} | {f} | {T} | {'fwd+bwd' if backward else 'fwd'} | {ms[DENSE]:,.2f} ms | "
                      f"{ms['with']:,.2f} ms ({paired_ratio(times[DENSE], times['with']):.2f}x) | "
                      f"{ms['without']:,.2f} ms ({paired_ratio(times[DENSE], times['without']):.2f}x) | "
                      f"{paired_ratio(times['without'], times['with']):.2f}x |", flush=True)


def bf16_step(module: nn.Module, d: int, T: int, backward: bool) -> Callable[[], None]:
    """A call of ``module`` on ``[1, T, d]``: training under bfloat16 autocast, or inference on
    bfloat16 rows (the module's weights bfloat16)."""
    if not backward:
        x = torch.randn(1, T, d).to(torch.bfloat16)

        def step():
            module.eval()
            with torch.inference_mode():
                output_of(module, x)

        return step
    xg, grad = torch.randn(1, T, d, requires_grad=True), torch.randn(1, T, d)

    def step():
        module.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = output_of(module, xg)
        out.float().backward(grad)
        module.zero_grad(set_to_none=True)
        xg.grad = None

    return step


def busy_table(case: tuple[str, dict], tokens: list[int], neighbours: list[int], budget: float) -> None:
    """The fine-grained layer and the dense FFN, forward+backward, on a quiet machine and
    beside busy processes: the MoE-to-dense ratio each time, and its change from quiet."""
    title, fields = case
    cfg = MoEConfig(d_model=D_MODEL, **fields)
    modules = {DENSE: FeedForward(D_MODEL, cfg.top_k * cfg.d_ff), FAST: MoE(cfg)}
    print(f"\n## {title}, forward+backward beside busy processes")
    print("| T | busy processes | dense FFN | moekit fast | moekit / dense | change from quiet |")
    print("|---|---|---|---|---|---|")
    for T in tokens:
        steps = {name: make_step(m, T, True) for name, m in modules.items()}
        quiet = None
        for n in [0, *neighbours]:
            with BusyNeighbours(n):
                times = interleaved_times(steps, budget)
            ratio = paired_ratio(times[DENSE], times[FAST])
            quiet = ratio if quiet is None else quiet
            print(f"| {T} | {n} | {1e3 * statistics.median(times[DENSE]):,.0f} ms | "
                  f"{1e3 * statistics.median(times[FAST]):,.0f} ms | {ratio:.2f}x | {ratio / quiet - 1:+.0%} |", flush=True)


if __name__ == "__main__":
    main()
