"""Does a sparse MoE learn more than a dense model of the same compute per token?

Trains the dense baseline (one SwiGLU FFN of width ``top_k * d_ff``) and the MoE (8 experts,
top-2, same active parameters) from the same seed on the same data, twice:

1. for the same number of optimizer steps, and
2. for the same wall-clock training budget (the schedule decays over the budget),

then prints params total/active, tokens/s, final validation loss and the difference, and a
sample of text from each model of the equal-time pair. The two models of a pair train in
the same process, taking turns of ``--block`` steps (20, about 5 s), and each counts only
its own steps' time: load on this shared machine then slows both alike (sequential runs
moved by 10-20%), and each run's losses are exactly those of a run of its own (each trainer
keeps its own RNG state). Turns of one step were measured to cost the MoE 3-5% against the
dense model (0.85-0.86x vs 0.88-0.92x in 70 s trials): every switch evicts the caches, and
the MoE's working set (weights and AdamW state, 41 MB against 13 MB) refills them slower.

    python benchmarks/moe_vs_dense.py                      # default corpus, ~17 min on 2 cores
    python benchmarks/moe_vs_dense.py --steps 100 --time-budget 60   # a quicker look
    python benchmarks/moe_vs_dense.py --data ../shared/data/tinyshakespeare.txt
    python benchmarks/moe_vs_dense.py --dtype bfloat16     # training speed in float32 and bfloat16

``--dtype bfloat16`` runs only the speed table: the dense model and the MoE, each in float32
and in bfloat16 (autocast), ``--dtype-steps`` steps each (80), the four taking turns, and
prints tokens/s, the validation loss after those steps, and the MoE's bfloat16 speed against
its float32 speed and against the dense model's bfloat16 speed, the last also per turn (the
two runs of one turn see the same machine; the median of those ratios is what a busy host's
slow spells move least). On a CPU without bfloat16
arithmetic (no AVX-512 BF16 or AMX) bfloat16 products are emulated: it says so and runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from moekit.inference import generate
from moekit.presets import preset
from moekit.training import Trainer
from moekit.checkpoint import load_trained


def run_pair(configs: dict, root: Path, mode: str, block: int, turns: dict | None = None) -> dict:
    """Train the configs round-robin, ``block`` optimizer steps each in turn, until each is done.
    ``turns``: filled with each config's training seconds per turn (paired ratios, below)."""
    trainers = {}
    for name, config in configs.items():
        print(f"--- equal {mode}: {name}", flush=True)
        trainers[name] = Trainer(config, root / f"{mode}-{name}", log=lambda s: print(f"    {s}", flush=True))
    try:
        while not all(tr.done for tr in trainers.values()):
            for name, tr in trainers.items():
                before = tr.train_s
                for _ in range(block):
                    if tr.done:
                        break
                    tr.step()
                if turns is not None and tr.train_s > before:
                    turns.setdefault(name, []).append(tr.train_s - before)
    finally:
        for tr in trainers.values():
            tr.close()
    return {name: tr.finish() for name, tr in trainers.items()}


def sample(out: Path, prompt: str, n: int) -> str:
    model, tok, _ = load_trained(out)
    ids = torch.as_tensor(tok.encode(prompt), dtype=torch.long)[None]
    return prompt + tok.decode(generate(model, ids, n, temperature=0.8, top_k=50, seed=0)[0].tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib sources)")
    p.add_argument("--steps", type=int, default=600, help="steps of the equal-steps pair")
    p.add_argument("--time-budget", type=float, default=300.0, help="seconds of training of the equal-time pair")
    p.add_argument("--block", type=int, default=20,
                   help="steps each model runs before the other takes its turn (1 = strict alternation)")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--sample-tokens", type=int, default=300)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="bfloat16: only the float32-vs-bfloat16 training speed table")
    p.add_argument("--dtype-steps", type=int, default=80, help="steps per run of the dtype table")
    p.add_argument("--d-model", type=int, default=None, help="override the preset's d_model (wider shapes)")
    args = p.parse_args()

    base = preset(args.preset)
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, path=args.data),
                               train=dataclasses.replace(base.train, progress=False, eval_every=10**9,
                                                         checkpoint_every=10**9, log_every=50))
    if args.d_model:
        base = dataclasses.replace(base, model=dataclasses.replace(base.model, d_model=args.d_model))
    root = Path(args.out or tempfile.mkdtemp(prefix="moe_vs_dense_"))
    if args.dtype == "bfloat16":
        dtype_table(base, root, args.dtype_steps, args.block)
        return
    rows = {}
    for mode in ("steps", "time"):
        train_cfg = dataclasses.replace(base.train, max_steps=args.steps)
        if mode == "time":
            train_cfg = dataclasses.replace(base.train, max_steps=10**7, time_budget=args.time_budget)
        configs = {name: dataclasses.replace(base, model=dataclasses.replace(base.model, dense=name == "dense"),
                                             train=train_cfg) for name in ("dense", "moe")}
        for name, summary in run_pair(configs, root, mode, args.block).items():
            rows[(mode, name)] = summary

    m = base.model.moe
    print(f"\nmoekit MoE vs dense, preset {args.preset} ({m.num_experts} experts, top-{m.top_k}), "
          f"data {args.data or 'stdlib'}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    header = f"{'run':<22}{'params total':>14}{'active':>12}{'steps':>8}{'tokens/s':>11}{'val loss':>10}"
    print(header)
    print("-" * len(header))
    for (mode, name), s in rows.items():
        label = f"equal {mode}: {name}"
        print(f"{label:<22}{s['params_total']:>14,}{s['params_active']:>12,}{s['steps']:>8}"
              f"{s['tokens_per_s']:>11,.0f}{s['val_loss']:>10.4f}")
    for mode in ("steps", "time"):
        d, e = rows[(mode, "dense")], rows[(mode, "moe")]
        print(f"equal {mode}: MoE val loss - dense val loss = {e['val_loss'] - d['val_loss']:+.4f} "
              f"({'MoE better' if e['val_loss'] < d['val_loss'] else 'dense better'})")
    ratio = (rows[("steps", "moe")]["tokens_per_s"] + rows[("time", "moe")]["tokens_per_s"]) / (
        rows[("steps", "dense")]["tokens_per_s"] + rows[("time", "dense")]["tokens_per_s"])
    print(f"MoE tokens/s / dense tokens/s = {ratio:.3f}")
    for name in ("dense", "moe"):
        print(f"\n--- sample, equal time, {name} (temperature 0.8, top-k 50):")
        print(sample(root / f"time-{name}", args.prompt, args.sample_tokens))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]}-{k[1]}": v for k, v in rows.items()}, indent=2))
    print(f"\nruns kept in {root}")


def dtype_table(base, root: Path, steps: int, block: int) -> None:
    """Dense and MoE, float32 and bfloat16, ``steps`` steps each, taking turns: tokens/s,
    validation loss, and the two ratios the bfloat16 goal names."""
    from moekit.training.machine import native_bf16

    if native_bf16() is False:
        print("note: this CPU has no bfloat16 arithmetic; its bfloat16 products are emulated (slow)")
    train_cfg = dataclasses.replace(base.train, max_steps=steps, eval_every=10**9)
    configs = {f"{name} {dtype}": dataclasses.replace(
        base, model=dataclasses.replace(base.model, dense=name == "dense"),
        train=dataclasses.replace(train_cfg, dtype=dtype))
        for dtype in ("float32", "bfloat16") for name in ("dense", "moe")}
    turns: dict = {}
    rows = run_pair(configs, root, "dtype", block, turns)
    m = base.model
    print(f"\ntraining speed by dtype, preset with d_model {m.d_model}, {m.moe.num_experts} experts top-{m.moe.top_k}, "
          f"{steps} steps each, {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(f"{'run':<18}{'tokens/s':>11}{'val loss':>10}")
    for name, s in rows.items():
        print(f"{name:<18}{s['tokens_per_s']:>11,.0f}{s['val_loss']:>10.4f}")
    tps = {name: s["tokens_per_s"] for name, s in rows.items()}
    print(f"MoE bfloat16 / MoE float32 = {tps['moe bfloat16'] / tps['moe float32']:.2f}x; "
          f"MoE bfloat16 / dense bfloat16 = {tps['moe bfloat16'] / tps['dense bfloat16']:.2f}x; "
          f"dense bfloat16 / dense float32 = {tps['dense bfloat16'] / tps['dense float32']:.2f}x")
    # the same turn's two runs saw the same machine: their ratio is free of its drift between turns
    paired = sorted(d / m for d, m in zip(turns["dense bfloat16"], turns["moe bfloat16"]))
    print(f"MoE bfloat16 / dense bfloat16 per turn of {block} steps: median {statistics.median(paired):.2f}x "
          f"(from {paired[0]:.2f}x to {paired[-1]:.2f}x over {len(paired)} turns)")


if __name__ == "__main__":
    main()
