"""Expert offloading: decode speed, cache hit rate and prefetch accuracy under a memory
budget, against the same model with every expert resident, in the same run.

Builds a Mixtral-format model with random weights whose experts are several times the
smaller budgets (default: 8 layers of 8 experts, d_model 1024, d_ff 3584: 2.8 GB of
experts), saves it, then greedily decodes the same prompt with the experts resident and
offloaded under 12.5%, 25%, 50% and 100% of the experts' bytes: LRU with each token's
top-k guesses prefetched, with only the surest one, without prefetch, and LFU with top-k. ``--run`` repeats the measurement on a trained moekit run,
whose routing has structure (random weights route almost at random), with a prompt from
its validation text. Each configuration decodes twice in alternation with the resident
model; the ratio is its faster run against the faster of those two resident runs (this VM's
speed drifts over minutes, so each ratio compares runs made side by side).

Reads come from the OS page cache once a file has been read (the file was just written):
this measures the cache and prefetch against host-memory copies, the case of experts in
a RAM disk or a fast NVMe drive's cache. ``--cold`` drops each range from the page cache
after reading it (``posix_fadvise``), so every miss reads the disk.

    python benchmarks/offload.py                      # ~4 min with the 2.8 GB model
    python benchmarks/offload.py --run runs/moe       # add a trained run (--run is repeatable)
    python benchmarks/offload.py --no-random --run runs/moe --run runs/moe8l   # trained runs only
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch

from moekit.config import ModelConfig, MoEConfig
from moekit.inference import generate_batch
from moekit.interop import load_model, save_hf
from moekit.models import Transformer

CONFIGS = [("lru", True), ("lru", 1), ("lru", False), ("lfu", True)]  # prefetch: top_k guesses, the surest one, none


def build_random(path: Path, d_model: int, d_ff: int, layers: int, experts: int) -> None:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=32000, d_model=d_model, n_layers=layers, n_heads=d_model // 128, n_kv_heads=2,
                         max_seq_len=512, moe=MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=experts, top_k=2))
    save_hf(Transformer(config), path)


def cold_reads(offload) -> None:
    """Make every read of ``offload``'s cache come from the disk: drop the files' pages after
    each read."""
    read = offload.cache.read

    def read_cold(layer, e):
        out = read(layer, e)
        for fd in offload.source._fds.values():
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return out

    offload.cache.read = read_cold


def decode(model, prompt: list[int], new: int):
    return generate_batch(model, [prompt], new, temperature=0)


def measure(path: Path, prompt: list[int], new: int, fractions: list[float], cold: bool) -> list[dict]:
    resident = load_model(path).model
    total = sum(p.numel() * p.element_size() for b in resident.blocks if b.is_moe for p in b.ffn.experts.parameters())
    first = decode(resident, prompt, new)
    ref_tokens, base = first.tokens, [first.stats.decode_tokens_per_s]
    rows = []
    for fraction in fractions:
        for policy, prefetch in CONFIGS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # 100%: nothing is offloaded, as intended
                model = load_model(path, expert_memory=int(total * fraction), policy=policy, prefetch=prefetch).model
            offload = model.expert_offload
            if cold:
                cold_reads(offload)
            runs, paired = [], []
            for _ in range(2):
                out = decode(model, prompt, new)
                assert out.tokens == ref_tokens, "the offloaded model generated other tokens"
                runs.append(out.stats)
                paired.append(decode(resident, prompt, new).stats.decode_tokens_per_s)
            base += paired
            best = max(runs, key=lambda s: s.decode_tokens_per_s)
            s = best.offload
            rows.append({"budget": fraction, "policy": policy, "prefetch": "top-1" if prefetch is not True and prefetch == 1 else prefetch,
                         "tok_s": best.decode_tokens_per_s,
                         "resident_tok_s": max(paired),
                         "hit_rate": s.hit_rate, "prefetch_accuracy": s.prefetch_accuracy if prefetch else None,
                         "mib_per_token": s.bytes_read / max(1, best.decode_steps) / 2**20,
                         "wait_s_per_token": s.wait_s / max(1, best.decode_steps)})
            offload.close()
            del model
    resident_tok_s = max(base)
    print(f"  resident: {resident_tok_s:.1f} tok/s at best (experts {total / 1e9:.2f} GB); each ratio is against "
          f"the resident runs interleaved with that configuration's")
    print(f"  {'budget':>7} {'policy':>6} {'prefetch':>8} {'tok/s':>7} {'ratio':>6} {'hit rate':>8} "
          f"{'prefetch acc':>12} {'MiB/token':>9} {'wait ms/tok':>11}")
    for r in rows:
        r["ratio"] = r["tok_s"] / r["resident_tok_s"]  # against the resident runs interleaved with its own
        acc = "-" if r["prefetch_accuracy"] is None else f"{r['prefetch_accuracy']:.1%}"
        shown = {True: "top-k", False: "no"}.get(r["prefetch"], r["prefetch"])
        print(f"  {r['budget']:>7.1%} {r['policy']:>6} {shown:>8} {r['tok_s']:>7.1f} "
              f"{r['ratio']:>6.2f} {r['hit_rate']:>8.1%} {acc:>12} {r['mib_per_token']:>9.1f} "
              f"{1000 * r['wait_s_per_token']:>11.2f}")
    return [{"resident_tok_s": resident_tok_s, "expert_bytes": total}, *rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--d-ff", type=int, default=3584)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--budgets", default="0.125,0.25,0.5,1.0", help="fractions of the experts' bytes")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--run", action="append", default=[], help="also measure this trained moekit run (repeatable)")
    ap.add_argument("--no-random", action="store_true", help="measure the trained runs only")
    ap.add_argument("--cold", action="store_true", help="every miss reads the disk, not the page cache")
    ap.add_argument("--dir", help="where to write the random model (default: a temporary folder)")
    ap.add_argument("--out", default="offload.json")
    args = ap.parse_args()
    fractions = [float(f) for f in args.budgets.split(",")]
    results = {"threads": torch.get_num_threads(), "cold": args.cold}
    if not args.no_random:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            path = Path(tmp) / "mixtral-random"
            t0 = time.perf_counter()
            build_random(path, args.d_model, args.d_ff, args.layers, args.experts)
            print(f"random Mixtral-format model ({args.layers} layers x {args.experts} experts, d_model "
                  f"{args.d_model}, d_ff {args.d_ff}) written in {time.perf_counter() - t0:.0f}s")
            prompt = torch.randint(0, 32000, (32,), generator=torch.Generator().manual_seed(0)).tolist()
            results["random"] = measure(path, prompt, args.new_tokens, fractions, args.cold)
    for run in args.run:
        from moekit.checkpoint import load_config
        from moekit.data import load_text

        config = load_config(run)
        tokenizer = load_model(run).tokenizer
        text = load_text(config.data.path, config.data.suffixes, config.data.max_chars)
        val = text[int(len(text) * (1 - config.data.val_fraction)):]
        prompt = [int(i) for i in tokenizer.encode(val[1000:1400])][:64]
        print(f"trained run {run} ({config.model.n_layers} layers)")
        results[f"trained {run}"] = measure(Path(run), prompt, args.new_tokens, fractions, args.cold)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
