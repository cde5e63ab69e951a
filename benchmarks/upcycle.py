"""Sparse upcycling against its two alternatives, at equal extra compute.

Trains the ``small`` preset's dense baseline (one SwiGLU FFN of width 512) for ``--steps``
steps, then spends the same extra compute three ways:

(a) continue the dense model for ``--extra`` steps;
(b) upcycle it into the ``small`` preset's MoE shape (8 experts of width 256, top-2: the FFN
    cut into 2 slices, 4 replicas each, function-preserving) and continue for ``--extra``
    steps: the same active parameters, so the same compute per step as (a);
(c) train that MoE from scratch for ``--steps + --extra`` steps (its own schedule).

and, as a fourth row, copy upcycling (8 copies of the whole FFN, top-2: twice the FFN
compute per token) continued for as many steps as the extra compute buys it. Compute is
``6 x active parameters x tokens`` (matmul FLOPs, forward and backward). The continuation
phases (a), (b), (b') share one schedule (``--lr`` peak, 20 warmup steps, cosine to 10%).
Prints validation losses at equal compute and wall times, writes ``upcycle.json`` and a plot
of validation loss against compute.

    python benchmarks/upcycle.py                               # default corpus, ~25 min on 2 cores
    python benchmarks/upcycle.py --steps 100 --extra 100 --quick   # a quicker look
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from moekit.adapt import finetune_config, upcycle
from moekit.interop import load_model
from moekit.interop.hf import save_run
from moekit.models import count_model_params
from moekit.presets import preset
from moekit.training import train


def flops_per_step(config) -> float:
    """6 x active parameters (embeddings excluded, the LM head included) x tokens per step."""
    active = count_model_params(config.model).active - config.model.vocab_size * config.model.d_model
    return 6.0 * active * config.train.batch_size * config.train.seq_len * config.train.grad_accum


def curve(run: Path, per_step: float, offset: float = 0.0) -> list[tuple[float, float]]:
    """(compute, val loss) of every evaluation in ``run``'s metrics."""
    points = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "val_loss" in record:
            points.append((offset + record["step"] * per_step, record["val_loss"]))
    return points


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300, help="dense pre-training steps (the sunk cost)")
    ap.add_argument("--extra", type=int, default=300, help="extra steps of (a) and (b)")
    ap.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the continuations")
    ap.add_argument("--data", help="a text file or folder (default: the Python standard library sources)")
    ap.add_argument("--quick", action="store_true", help="smaller evaluations (eval_batches 5)")
    ap.add_argument("--out", default="upcycle.json")
    ap.add_argument("--plot", default="upcycle.png")
    args = ap.parse_args()

    base = preset("small")
    every = max(args.extra // 6, 10)
    train_fields = dict(progress=False, eval_every=every, checkpoint_every=10**9, log_every=every,
                        eval_batches=5 if args.quick else base.train.eval_batches)
    base = dataclasses.replace(base, data=dataclasses.replace(base.data, path=args.data),
                               train=dataclasses.replace(base.train, **train_fields))
    log = lambda s: print(f"    {s}", flush=True)  # noqa: E731
    results, curves = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dense_cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, dense=True),
                                        train=dataclasses.replace(base.train, max_steps=args.steps))
        print(f"--- dense pre-training: {args.steps} steps", flush=True)
        t0 = time.perf_counter()
        dense = train(dense_cfg, root / "dense", log=log)
        sunk = args.steps * flops_per_step(dense_cfg)
        curves["dense pre-training"] = curve(root / "dense", flops_per_step(dense_cfg))
        results["dense pre-training"] = {"val_loss": dense["val_loss"], "wall_s": time.perf_counter() - t0,
                                         "compute": sunk}
        source = load_model(root / "dense")
        moe_shape = base.model
        continuation = dataclasses.replace(base.train, lr=args.lr, warmup_steps=20, min_lr_ratio=0.1,
                                           weight_decay=base.train.weight_decay)
        extra_compute = args.extra * flops_per_step(dense_cfg)
        variants = {
            "(a) dense, continued": None,
            "(b) upcycled 8x256 top-2, continued": dict(num_experts=moe_shape.moe.num_experts,
                                                        top_k=moe_shape.moe.top_k, granularity=2),
            "(b') copy-upcycled 8x512 top-2, continued": dict(num_experts=8, top_k=2, granularity=1),
        }
        for i, (name, kw) in enumerate(variants.items()):
            start = root / f"variant{i}" / "start"
            model = source.model if kw is None else upcycle(source.model, **kw)
            save_run(start, model, source.tokenizer, {})
            cfg = finetune_config(start, dataclasses.replace(base, train=continuation))
            steps = max(1, round(extra_compute / flops_per_step(cfg)))
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps),
                                      data=dataclasses.replace(cfg.data, path=args.data))
            print(f"--- {name}: {steps} steps", flush=True)
            t0 = time.perf_counter()
            s = train(cfg, start.parent / "run", log=log)
            curves[name] = curve(start.parent / "run", flops_per_step(cfg), sunk)
            results[name] = {"val_loss": s["val_loss"], "steps": steps, "wall_s": time.perf_counter() - t0,
                             "compute": sunk + steps * flops_per_step(cfg)}
        scratch = dataclasses.replace(base, train=dataclasses.replace(base.train, max_steps=args.steps + args.extra))
        print(f"--- (c) MoE from scratch: {args.steps + args.extra} steps", flush=True)
        t0 = time.perf_counter()
        s = train(scratch, root / "scratch", log=log)
        curves["(c) MoE from scratch"] = curve(root / "scratch", flops_per_step(scratch))
        results["(c) MoE from scratch"] = {"val_loss": s["val_loss"], "steps": args.steps + args.extra,
                                           "wall_s": time.perf_counter() - t0,
                                           "compute": (args.steps + args.extra) * flops_per_step(scratch)}
    ref = results["(a) dense, continued"]["val_loss"]
    print(f"\n{'run':<44}{'val loss':>10}{'vs (a)':>9}{'compute TF':>12}{'wall s':>9}")
    for name, r in results.items():
        print(f"{name:<44}{r['val_loss']:>10.4f}{r['val_loss'] - ref:>+9.4f}{r['compute'] / 1e12:>12.1f}"
              f"{r['wall_s']:>9.0f}")
    payload = {"args": vars(args), "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "results": results, "curves": curves}
    Path(args.out).write_text(json.dumps(payload, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, points in curves.items():
            ax.plot([c / 1e12 for c, _ in points], [v for _, v in points], marker="o", ms=3, label=name)
        ax.set_xlabel("training compute (TFLOP, 6 x active params x tokens)")
        ax.set_ylabel("validation loss")
        ax.set_title("sparse upcycling vs continuing dense vs MoE from scratch")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")
    except ImportError:
        print("matplotlib not installed: no plot")


if __name__ == "__main__":
    main()
