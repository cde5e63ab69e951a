"""Memory of fine-tuning in full against LoRA: trainable parameters, AdamW state and peak RSS.

For each model (the ``small`` preset's MoE, and a 100M+ parameter MoE: d_model 512, 8
layers, 8 experts of width 1024, top-2) a random-weight base run is written, then
``train --init`` runs ``--steps`` steps on the default corpus three ways: full fine-tuning,
LoRA rank 8 on attention and experts, and the same with the router trained in full. Each
run is its own process, so its peak resident memory (``ru_maxrss``) is its own.

    python benchmarks/lora_memory.py            # ~3 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

SIZES = {
    "small": {},
    "moe-110m": dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, moe=dict(d_model=512, d_ff=1024,
                                                                                   num_experts=8, top_k=2)),
}
MODES = {"full": {}, "lora r8": dict(rank=8), "lora r8 + router": dict(rank=8, trainable="router")}


def worker(size: str, mode: str, root: Path, steps: int) -> dict:
    import torch

    from moekit.adapt import finetune_config
    from moekit.config import LoRAConfig, ModelConfig
    from moekit.data import ByteTokenizer
    from moekit.interop.hf import save_run
    from moekit.models import Transformer
    from moekit.presets import preset
    from moekit.training import train

    base = root / f"base-{size}"
    if not base.exists():
        model_fields = {**preset("small").model.to_dict(), **SIZES[size]}
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_dict(model_fields))
        save_run(base, model, ByteTokenizer(), {})
        del model
    c = preset("finetune")
    fields = dict(max_steps=steps, progress=False, eval_every=10**9, checkpoint_every=10**9, eval_batches=1,
                  batch_size=8, seq_len=256)
    settings = dict(MODES[mode])
    trainable = settings.pop("trainable", None)
    c = dataclasses.replace(c, data=dataclasses.replace(c.data, max_chars=300_000),
                            train=dataclasses.replace(c.train, trainable=trainable, **fields),
                            lora=LoRAConfig(**settings) if settings else LoRAConfig())
    out = root / f"run-{size}-{mode.replace(' ', '_').replace('+', 'plus')}"
    summary = train(finetune_config(base, c), out, log=lambda _: None)
    from moekit.checkpoint import latest_checkpoint, load_state

    named = load_state(latest_checkpoint(out))["optimizer"]["named"]
    state_bytes = sum(t.numel() * t.element_size() for s in named.values() for k, t in s.items() if k != "step")
    return {"params_total": summary["params_total"], "params_trainable": summary["params_trainable"],
            "optimizer_state_mb": state_bytes / 2**20, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "tokens_per_s": summary["tokens_per_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default="lora_memory.json")
    ap.add_argument("--worker", nargs=3, metavar=("SIZE", "MODE", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], Path(args.worker[2]), args.steps)))
        return
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in SIZES:
            for mode in MODES:
                run = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", size, mode, tmp],
                                     capture_output=True, text=True, check=True)
                results[f"{size} / {mode}"] = r = json.loads(run.stdout.strip().splitlines()[-1])
                print(f"{size:<10}{mode:<18}{r['params_total'] / 1e6:>9.2f}M total {r['params_trainable'] / 1e6:>9.3f}M "
                      f"trainable {r['optimizer_state_mb']:>9.1f} MB AdamW state {r['peak_rss_mb']:>8.0f} MB peak RSS "
                      f"{r['tokens_per_s']:>8.0f} tok/s", flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
