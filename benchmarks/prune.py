"""Validation loss against experts kept, for each pruning score.

Prunes a trained moekit run (default: train the ``small`` preset for 600 steps first) to
8, 6, 4 and 2 experts per layer, scoring the experts by frequency, mean routing weight and
REAP on calibration text from the training split, and evaluates each on held-out windows
of the validation split (the last 10% of the corpus, as training splits it).

    moekit train --out runs/moe && python benchmarks/prune.py --run runs/moe   # ~1 min after training
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moekit.checkpoint import load_config
from moekit.data import load_text
from moekit.interop import load_model
from moekit.shrink import expert_scores, prune_experts


def windows(ids: torch.Tensor, count: int, seq: int) -> torch.Tensor:
    step = max(1, (ids.numel() - seq - 1) // count)
    return torch.stack([ids[i * step: i * step + seq + 1] for i in range(count)])  # [count, seq + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained moekit MoE run")
    ap.add_argument("--keep", default="8,6,4,2")
    ap.add_argument("--calibration-tokens", type=int, default=32768)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--out", default="prune.json")
    args = ap.parse_args()
    config = load_config(args.run)
    loaded = load_model(args.run)
    model = loaded.model
    text = load_text(config.data.path, config.data.suffixes, config.data.max_chars)
    ids = torch.as_tensor(loaded.tokenizer.encode(text).astype("int64"))
    split = int(ids.numel() * (1 - config.data.val_fraction))
    seq = config.train.seq_len
    calib = ids[: args.calibration_tokens // seq * seq].view(-1, seq)  # [B, seq] from the training split
    held = windows(ids[split:], args.eval_windows, seq)

    def loss(m) -> float:
        with torch.no_grad():
            return float(sum(m(w[None, :-1], w[None, 1:]).loss for w in held) / len(held))

    E = model.config.moe.num_experts
    full = loss(model)
    results = {"full": full}
    print(f"full model ({E} experts, top-{model.config.moe.top_k}): val loss {full:.4f}")
    print(f"{'kept':>5}{'params':>10}" + "".join(f"{by:>12}" for by in ("frequency", "gate", "reap")))
    scores = {by: expert_scores(model, calib, by) for by in ("frequency", "gate", "reap")}
    for keep in (int(k) for k in args.keep.split(",")):
        row = {}
        for by, s in scores.items():
            pruned = prune_experts(model, keep, s, top_k=min(keep, model.config.moe.top_k))
            row[by] = loss(pruned)
            params = pruned.num_params().total
        results[keep] = {**row, "params": params}
        print(f"{keep:>5}{params / 1e6:>9.2f}M" + "".join(f"{row[by]:>12.4f}" for by in scores))
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
