"""Does a sparse MoE learn more than a dense model of the same compute per token?

Trains the dense baseline (one SwiGLU FFN of width ``top_k * d_ff``) and the MoE (8 experts,
top-2, same active parameters) from the same seed on the same data, twice:

1. for the same number of optimizer steps, and
2. for the same wall-clock training budget (the schedule decays over the budget),

then prints params total/active, tokens/s, final validation loss and the difference, and a
sample of text from each model of the equal-time pair.

    python benchmarks/moe_vs_dense.py                      # default corpus, ~13 min on 2 cores
    python benchmarks/moe_vs_dense.py --steps 100 --time-budget 60   # a quicker look
    python benchmarks/moe_vs_dense.py --data ../shared/data/tinyshakespeare.txt
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
from pathlib import Path

import torch

from moekit.inference import generate
from moekit.presets import preset
from moekit.training import train
from moekit.training.checkpoint import load_trained


def run(config, out: Path, label: str) -> dict:
    print(f"--- {label}", flush=True)
    return train(config, out, log=lambda s: print(f"    {s}", flush=True))


def sample(out: Path, prompt: str, n: int) -> str:
    model, tok, _ = load_trained(out)
    ids = torch.as_tensor(tok.encode(prompt), dtype=torch.long)[None]
    return prompt + tok.decode(generate(model, ids, n, temperature=0.8, top_k=50, seed=0)[0].tolist())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--data", default=None, help="text file or folder (default: the Python stdlib sources)")
    p.add_argument("--steps", type=int, default=600, help="steps of the equal-steps pair")
    p.add_argument("--time-budget", type=float, default=180.0, help="seconds of training of the equal-time pair")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--sample-tokens", type=int, default=300)
    p.add_argument("--out", default=None, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()

    base = preset(args.preset)
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, path=args.data),
                               train=dataclasses.replace(base.train, progress=False, eval_every=10**9,
                                                         checkpoint_every=10**9, log_every=50))
    root = Path(args.out or tempfile.mkdtemp(prefix="moe_vs_dense_"))
    rows = {}
    for mode in ("steps", "time"):
        for dense in (True, False):
            name = "dense" if dense else "moe"
            train_cfg = dataclasses.replace(base.train, max_steps=args.steps)
            if mode == "time":
                train_cfg = dataclasses.replace(base.train, max_steps=10**7, time_budget=args.time_budget)
            config = dataclasses.replace(base, model=dataclasses.replace(base.model, dense=dense), train=train_cfg)
            out = root / f"{mode}-{name}"
            rows[(mode, name)] = run(config, out, f"equal {mode}: {name}")

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
    print(f"MoE tokens/s / dense tokens/s = {ratio:.2f}")
    for name in ("dense", "moe"):
        print(f"\n--- sample, equal time, {name} (temperature 0.8, top-k 50):")
        print(sample(root / f"time-{name}", args.prompt, args.sample_tokens))
    if args.json:
        Path(args.json).write_text(json.dumps({f"{k[0]}-{k[1]}": v for k, v in rows.items()}, indent=2))
    print(f"\nruns kept in {root}")


if __name__ == "__main__":
    main()
