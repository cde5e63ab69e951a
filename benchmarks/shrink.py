"""Shrinking a trained MoE at inference: validation loss against experts kept for each
pruning score and for merging, and loss and speed against the dynamic-skipping threshold.

Prunes a trained moekit run (default: train the ``small`` preset for 600 steps first) to
8, 6, 4 and 2 experts per layer, scoring the experts by frequency, mean routing weight and
REAP on calibration text from the training split, merges them into as many
(``moekit.shrink.merge_experts``, the same calibration text), and evaluates each on held-out windows
of the validation split (the last 10% of the corpus, as training splits it). Then skips
chosen experts whose weight is below 0, 0.1, 0.2, 0.3 and reports the loss, the share of
expert slots computed and the forward tokens/s over the same windows (one window of
``seq_len`` tokens a call; each threshold timed twice, in alternation, the faster kept).

    moekit train --out runs/moe && python benchmarks/shrink.py --run runs/moe   # ~2 min after training
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from moekit.checkpoint import load_config
from moekit.data import load_text
from moekit.interop import load_model
from moekit.shrink import expert_scores, merge_experts, prune_experts, set_skip_below


def windows(ids: torch.Tensor, count: int, seq: int) -> torch.Tensor:
    step = max(1, (ids.numel() - seq - 1) // count)
    return torch.stack([ids[i * step: i * step + seq + 1] for i in range(count)])  # [count, seq + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a trained moekit MoE run")
    ap.add_argument("--keep", default="8,6,4,2")
    ap.add_argument("--calibration-tokens", type=int, default=32768)
    ap.add_argument("--eval-windows", type=int, default=64)
    ap.add_argument("--out", default="shrink.json")
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
    print(f"{'kept':>5}{'params':>10}" + "".join(f"{by:>12}" for by in ("frequency", "gate", "reap", "merged")))
    scores = {by: expert_scores(model, calib, by) for by in ("frequency", "gate", "reap")}
    for keep in (int(k) for k in args.keep.split(",")):
        row = {}
        for by, s in scores.items():
            pruned = prune_experts(model, keep, s, top_k=min(keep, model.config.moe.top_k))
            row[by] = loss(pruned)
            params = pruned.num_params().total
        row["merged"] = loss(merge_experts(model, keep, calib, top_k=min(keep, model.config.moe.top_k)))
        results[keep] = {**row, "params": params}
        print(f"{keep:>5}{params / 1e6:>9.2f}M" + "".join(f"{row[by]:>12.4f}" for by in (*scores, "merged")))
    import time

    from moekit.analysis.collect import moe_layers

    print(f"\n{'skip below':>10}{'val loss':>10}{'slots computed':>16}{'tokens/s':>10}{'speed':>8}")
    timings: dict[float, list[float]] = {}
    thresholds = (0.0, 0.1, 0.2, 0.3)
    for _ in range(2):  # alternate, so a slow spell of the machine hits every threshold
        for w in thresholds:
            set_skip_below(model, w)
            t0 = time.perf_counter()
            value = loss(model)
            timings.setdefault(w, []).append(time.perf_counter() - t0)
            results[f"skip {w}"] = {"val_loss": value}
    for w in thresholds:
        set_skip_below(model, w)
        computed = []
        hooks = [m.register_forward_hook(lambda _m, _i, out: computed.append(
            1.0 if out.routing.mask is None else float(out.routing.mask.float().mean()))) for _, m in moe_layers(model)]
        loss(model)
        for h in hooks:
            h.remove()
        tps = held.shape[0] * (held.shape[1] - 1) / min(timings[w])
        results[f"skip {w}"].update(slots=sum(computed) / len(computed), tokens_per_s=tps)
        r = results[f"skip {w}"]
        base_tps = results["skip 0.0"]["tokens_per_s"]
        print(f"{w:>10.1f}{r['val_loss']:>10.4f}{r['slots']:>16.3f}{tps:>10.0f}{tps / base_tps:>7.2f}x")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
