"""Generation speed: moekit's engine against transformers' ``generate`` on the same
random-weight Mixtral-format model, same machine, same run.

    python benchmarks/generate.py            # the full table (about 5 minutes on 2 cores)
    python benchmarks/generate.py --quick    # 32 new tokens, batch 1 only

The model (vocab 32000, hidden 512, intermediate 1408, 8 layers, 8 heads, 2 KV heads, 8
experts, top 2) is built once with transformers from a fixed seed and saved under
``--model-dir``. For each engine: prefill tokens/s of a 512-token prompt and decode
tokens/s of 128 new tokens, at batch 1 and batch 8, greedy. transformers runs each experts
implementation (``eager``, ``grouped_mm``, ``batched_mm``; ``batched_mm`` materialises
every expert's weights per token, so its prefill runs with ``grouped_mm`` and it is timed
on decoding only). moekit's greedy tokens are checked against transformers' first.

Decode is bound by reading the weights: the script prints the bytes read per decoded token
and the fraction of the machine's memory bandwidth (measured here as the fastest plain read
of 256 MiB: torch's dot product, or moekit's matrix-vector kernel where it is built) that
each engine reaches, and moekit's fraction of the issue's nominal 60 GB/s.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from moekit import kernels
from moekit.inference import generate_batch, prepare_for_inference
from moekit.interop import load_hf
from moekit.layers.thresholds import THRESHOLDS, threshold

SHAPE = dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
             max_position_embeddings=1024)


def make_model(path: Path) -> None:
    import transformers

    if (path / "config.json").is_file():
        return
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**SHAPE))
    model.save_pretrained(path)
    print(f"saved a random-weight Mixtral-format model to {path}")


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decoded token reads: attention, router and top_k experts per
    layer, the norms and the LM head (one embedding row, negligible, left out)."""
    total = sum(p.numel() * p.element_size() for name, p in model.named_parameters()
                if "experts." not in name and not name.startswith("embed."))
    for block in model.blocks:
        if block.is_moe:
            ex = block.ffn.experts
            per_expert = sum(p.numel() * p.element_size() for p in ex.parameters()) // ex.num_experts
            total += block.ffn.config.top_k * per_expert
    return total


def measure_bandwidth() -> float:
    """GB/s of the fastest plain read we find: a dot product of two 256 MiB vectors, or (where
    moekit's kernels are built) their matrix-vector product streaming a 256 MiB matrix."""
    x, y = torch.ones(64 * 2**20), torch.ones(64 * 2**20)
    torch.dot(x, y)
    best = 2 * x.numel() * 4 / min(_timed(lambda: torch.dot(x, y)) for _ in range(7)) / 1e9
    lib = kernels.load()
    if lib is not None:
        w, v, out = x.view(-1, 1024), torch.ones(1024), torch.empty(64 * 1024)
        kernels.rows(lib, w, v, out)
        best = max(best, w.numel() * 4 / min(_timed(lambda: kernels.rows(lib, w, v, out)) for _ in range(7)) / 1e9)
    return best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hf_run(model, prompts: torch.Tensor, new: int, impl: str) -> tuple[float, float, list[int]]:
    """(prefill s, decode s per step, greedy ids of row 0) with transformers' generate."""
    from transformers import DynamicCache

    kw = dict(do_sample=False, pad_token_id=0)
    model.set_experts_implementation("grouped_mm" if impl == "batched_mm" else impl)
    with torch.inference_mode():
        t0 = time.perf_counter()
        cache = DynamicCache(config=model.config)
        first = model.generate(prompts, max_new_tokens=1, min_new_tokens=1, past_key_values=cache, **kw)
        prefill = time.perf_counter() - t0
        model.set_experts_implementation(impl)
        t0 = time.perf_counter()  # continues from the prefilled cache: only decode steps run
        out = model.generate(first, max_new_tokens=new - 1, min_new_tokens=new - 1, past_key_values=cache, **kw)
        decode = (time.perf_counter() - t0) / (new - 1)
    return prefill, decode, out[0, prompts.shape[1]:].tolist()


def moekit_run(model, prompts: torch.Tensor, new: int) -> tuple[float, float, list[int]]:
    r = generate_batch(model, prompts.tolist(), new, temperature=0)
    return r.stats.prefill_s, r.stats.decode_s / r.stats.decode_steps, r.tokens[0]


def decode_paths(model, rounds: int = 200) -> None:
    """Which few-token MoE path to use, by measurement on layer 0 (prepared weights): the
    slot loop (each chosen expert on its row, no sorting), the sorted path (plan, gather,
    segments, scatter) and gathering the chosen experts' weights into one batched matmul."""
    import importlib

    import torch.nn.functional as F
    from moe_layer import interleaved_times

    d = importlib.import_module("moekit.layers.dispatch")  # the module (moekit.layers exports a function of that name)

    moe = model.blocks[0].ffn
    ex = moe.experts

    def gather(x, routing):
        idx = routing.indices.reshape(-1)  # [T, k] -> [T*k]
        gate_up = ex.fused_gate_up.index_select(0, idx)  # [T*k, d, 2f]: copies the chosen weights
        rows = x.repeat_interleave(routing.indices.shape[1], 0)[:, None]  # [T*k, 1, d]
        gate, up = torch.bmm(rows, gate_up).chunk(2, dim=-1)
        y = torch.bmm(F.silu(gate) * up, ex.w2.index_select(0, idx))[:, 0]  # [T*k, d]
        return (y.view(*routing.indices.shape, -1) * routing.weights[..., None]).sum(1)

    print(f"\nfew-token MoE paths (layer 0, microseconds per call, median of interleaved runs; the engine "
          f"takes the slot loop up to {threshold('unsorted_max_slots')} slots, then the sorted path):")
    print(f"{'tokens':>7}{'slot loop':>12}{'sorted':>12}{'gather':>12}")
    with torch.inference_mode():
        for T in (1, 2, 4, 8):
            x = torch.randn(T, moe.config.d_model)
            routing = moe.router(x)
            ref = d._dispatch_few(x, routing, ex, moe.config.num_experts)[0]
            saved = THRESHOLDS["unsorted_max_slots"]
            THRESHOLDS["unsorted_max_slots"] = saved._replace(value=0)
            try:
                assert torch.allclose(d.dispatch(x, routing, ex)[0], ref, atol=1e-4)
                assert torch.allclose(gather(x, routing), ref, atol=1e-4)
                times = interleaved_times({
                    "loop": lambda x=x, r=routing: d._dispatch_few(x, r, ex, moe.config.num_experts),
                    "sorted": lambda x=x, r=routing: d.dispatch(x, r, ex),
                    "gather": lambda x=x, r=routing: gather(x, r),
                }, budget_s=2.0, max_rounds=rounds)
                t = {name: statistics.median(ts) for name, ts in times.items()}
            finally:
                THRESHOLDS["unsorted_max_slots"] = saved
            print(f"{T:>7}{t['loop'] * 1e6:>12.0f}{t['sorted'] * 1e6:>12.0f}{t['gather'] * 1e6:>12.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default="/tmp/moekit-bench/mixtral-h512", type=Path)
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--hf-impls", default="eager,grouped_mm,batched_mm")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, batch 1, grouped_mm only, one round")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=3, help="runs of each engine, round-robin (median reported)")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.batches, args.hf_impls, args.rounds = 32, "1", "grouped_mm", 1
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    make_model(args.model_dir)
    gen = torch.Generator().manual_seed(0)
    warnings.filterwarnings("ignore")  # transformers' generation-config chatter
    ours = {dtype: prepare_for_inference(load_hf(args.model_dir, dtype=dtype))
            for dtype in (torch.float32, torch.bfloat16)}
    ours = {"float32": ours[torch.float32], "bfloat16": ours[torch.bfloat16]}
    theirs = transformers.MixtralForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    bandwidth = measure_bandwidth()
    per_token = weight_bytes_per_token(ours["float32"])
    limit = bandwidth * 1e9 / per_token
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads; "
          f"weights read per decoded token {per_token / 1e6:.0f} MB (float32); memory bandwidth {bandwidth:.0f} GB/s "
          f"(plain read) -> at most {limit:.0f} tokens/s; {kernels.status()}")
    prompt1 = torch.randint(0, SHAPE["vocab_size"], (1, args.prompt_len), generator=gen)
    with torch.inference_mode():  # bf16's logit error against float32
        ref = ours["float32"](prompt1).logits.float()
        bf = ours["bfloat16"](prompt1).logits.float()
        hf_ref = theirs(prompt1).logits.float()
        hf_bf = transformers.MixtralForCausalLM.from_pretrained(args.model_dir, dtype=torch.bfloat16).eval()(
            prompt1).logits.float()
    agree = (bf.argmax(-1) == ref.argmax(-1)).float().mean().item()
    print(f"moekit float32 vs transformers float32 logits: max |diff| {(ref - hf_ref).abs().max().item():.2g}")
    print(f"bfloat16 weights vs float32: max |logit diff| {(bf - ref).abs().max().item():.3g} (transformers' own "
          f"bfloat16: {(hf_bf - hf_ref).abs().max().item():.3g}; logits' std {ref.std().item():.3g}), "
          f"same argmax at {agree:.1%} of positions")

    for batch in [int(b) for b in args.batches.split(",")]:
        prompts = torch.randint(0, SHAPE["vocab_size"], (batch, args.prompt_len), generator=gen)
        engines = {f"transformers {impl}": (lambda impl=impl, p=prompts: hf_run(theirs, p, args.new_tokens, impl))
                   for impl in args.hf_impls.split(",")}
        engines.update({f"moekit {dtype}": (lambda m=m, p=prompts: moekit_run(m, p, args.new_tokens))
                        for dtype, m in ours.items()})
        runs: dict[str, list] = {name: [] for name in engines}
        for _ in range(args.rounds):  # round-robin, so drift in machine load hits every engine alike
            for name, run in engines.items():
                runs[name].append(run())
        results = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs), rs[0][2])
                   for name, rs in runs.items()}
        best_step = {name: min(r[1] for r in rs) for name, rs in runs.items()}
        ref_ids = next(v[2] for k, v in results.items() if k.startswith("transformers"))
        ours_ids = results["moekit float32"][2]
        same = ours_ids == ref_ids
        first_diff = next((i for i, (a, b) in enumerate(zip(ours_ids, ref_ids)) if a != b), None)
        hf_names = [k for k in results if k.startswith("transformers")]
        best_hf_decode = max(batch / results[k][1] for k in hf_names)
        best_hf_prefill = max(batch * args.prompt_len / results[k][0] for k in hf_names if "batched" not in k)
        print(f"\nbatch {batch}, {args.prompt_len}-token prompts, {args.new_tokens} new tokens, median of "
              f"{args.rounds} rounds: moekit float32 greedy tokens equal transformers': {same}"
              + ("" if same else f" (first difference at new token {first_diff})"))
        print(f"{'engine':<26}{'prefill tok/s':>14}{'vs best HF':>11}{'decode tok/s':>14}{'vs best HF':>11}"
              f"{'of bandwidth':>14}{'fastest round':>15}")
        for name, (prefill, step, _) in results.items():
            p, d = batch * args.prompt_len / prefill, batch / step
            pre, pre_ratio = (("(grouped_mm)", "") if "batched" in name else (f"{p:,.0f}", f"{p / best_hf_prefill:.2f}x"))
            share = f"{d / limit:.0%}" if batch == 1 and "bfloat16" not in name else ""
            print(f"{name:<26}{pre:>14}{pre_ratio:>11}{d:>14.1f}{d / best_hf_decode:>10.2f}x{share:>14}"
                  f"{batch / best_step[name]:>15.1f}")
        if batch == 1:  # the issue's figure: 225 MB per token against a nominal 60 GB/s
            nominal = 60e9 / per_token
            print(f"moekit float32 decode is {batch / results['moekit float32'][1] / nominal:.0%} of the "
                  f"{nominal:.0f} tokens/s a nominal 60 GB/s would allow")
    decode_paths(ours["float32"])

if __name__ == "__main__":
    main()
