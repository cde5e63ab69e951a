"""Low-precision experts: decode speed against float32 in the same run, and what each
format costs in validation loss and routing.

Speed: the random-weight Mixtral-format model of ``benchmarks/generate.py`` (vocab 32000,
d_model 512, 8 layers, 8 experts top-2, d_ff 1408), its experts in float32, bf16, int8 and
int4 (attention, router and head float32), and with ``-all`` the attention projections and
LM head in the same format (the router stays float32), greedy decoding of ``--new-tokens`` after a
64-token prompt at batch 1 and batch 8, each format timed twice in alternation with
float32, each timed run right after an untimed one of the same model (llama-bench's warm-up:
the weights of the model being timed in the caches as a serving process has them; faster
run kept); and prefill of one 512-token prompt (best of 3). Printed: tokens/s, the ratio to float32, bytes of weights read
per decoded token and that times tokens/s as a fraction of the read bandwidth measured in
the same run.

Quality (``--run``, a trained moekit run; repeatable): validation loss of each format on
held-out windows of the validation split, and how often a token's chosen experts (the
top-k set, per layer) differ from float32's.

    python benchmarks/quantize.py --run runs/moe      # about 3 minutes on 2 cores
    python benchmarks/quantize.py --llama-build /tmp/llama/build   # llama.cpp in the same run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from generate import make_model, measure_bandwidth  # noqa: E402

from moekit.inference import generate_batch  # noqa: E402
from moekit.interop import load_model  # noqa: E402

# llama.cpp (llama-bench, batch 1) on this machine type, from issue 18: the anchors of the -all rows,
# whole models in one format, as GGUF files are (the router aside: 8 x 512 weights); with
# --llama-build, measured in the same run instead (benchmarks/llama_bench.py), q4_0 beside int4
LLAMA_CPP = {"float32": ("f32", 128.0), "bf16-all": ("f16", 283.0), "int8-all": ("q8_0", 408.0)}
LLAMA_PAIRS = {"float32": "f32", "bf16-all": "f16", "int8-all": "q8_0", "int4-all": "q4_0"}
FORMATS = ["float32", "bf16", "int8", "int4", "bf16-all", "int8-all", "int4-all"]  # -all: attention and head too


def bytes_per_token(model) -> int:
    """Weights one decoded token reads: everything but the embedding and the routed experts,
    plus top_k experts per MoE layer (parameters and the quantised experts' buffers)."""
    total = sum(t.numel() * t.element_size() for n, t in [*model.named_parameters(), *model.named_buffers()]
                if ".ffn.experts." not in n and not n.startswith(("embed.", "rope.")))
    for block in model.blocks:
        if block.is_moe:
            ex = block.ffn.experts
            size = sum(t.numel() * t.element_size() for t in [*ex.parameters(), *ex.buffers()])
            total += block.ffn.config.top_k * size // ex.num_experts
    return total


def load(path: Path, fmt: str):
    if fmt == "float32":
        return load_model(path).model
    name, _, what = fmt.partition("-")
    return load_model(path, quantize=name, quantize_what=what or "experts").model


def llama_cpp(path: Path, build: Path, new: int, work: Path) -> dict[str, tuple[str, float]]:
    """llama-bench's batch-1 speed of the model as GGUF (written under ``work``) in each paired
    format, measured now."""
    from llama_bench import bench, prepare

    files = prepare(path, build, work, [*LLAMA_PAIRS.values(), "bf16"])
    measured = {fmt: (name, bench(build, files[name], new)) for fmt, name in LLAMA_PAIRS.items()}
    bf16 = bench(build, files["bf16"], new)
    print(f"llama.cpp (llama-bench tg{new}, 2 threads, measured in this run): "
          + ", ".join(f"{name} {tps:.1f}" for name, tps in measured.values()) + f", bf16 {bf16:.1f} tok/s")
    return measured


def speed(path: Path, new: int, batches: list[int], bandwidth: float, llama: dict | None = None) -> list[dict]:
    anchors = llama or LLAMA_CPP
    models = {fmt: load(path, fmt) for fmt in FORMATS}
    rows = []
    for batch in batches:
        prompts = torch.randint(0, 32000, (batch, 64), generator=torch.Generator().manual_seed(batch)).tolist()
        best = dict.fromkeys(FORMATS, 0.0)
        for _ in range(2):
            for fmt in FORMATS:
                generate_batch(models[fmt], prompts, new, temperature=0)  # a warm-up run first, as llama-bench's
                stats = generate_batch(models[fmt], prompts, new, temperature=0).stats
                best[fmt] = max(best[fmt], stats.decode_tokens_per_s)
        for fmt in FORMATS:
            read = bytes_per_token(models[fmt])
            steps_per_s = best[fmt] / batch  # each step reads the weights once for the whole batch
            rows.append({"batch": batch, "format": fmt, "tok_s": best[fmt], "ratio": best[fmt] / best["float32"],
                         "mb_per_token": read / 1e6, "bandwidth_fraction": read * steps_per_s / 1e9 / bandwidth})
    prompt = torch.randint(0, 32000, (1, 512), generator=torch.Generator().manual_seed(0)).tolist()
    prefill = {fmt: 512 / min(generate_batch(models[fmt], prompt, 1, temperature=0).stats.prefill_s for _ in range(3))
               for fmt in FORMATS}
    print("prefill, one 512-token prompt: " + ", ".join(
        f"{fmt} {tps:,.0f} tok/s ({tps / prefill['float32']:.2f}x)" for fmt, tps in prefill.items()))
    for r in rows:
        r["prefill_tok_s"] = prefill[r["format"]]
    print(f"decode, {new} new tokens (read bandwidth {bandwidth:.1f} GB/s)")
    print(f"  {'batch':>5} {'format':>8} {'tok/s':>8} {'vs fp32':>8} {'MB/step':>8} {'of bandwidth':>12} "
          f"{'vs llama.cpp':>12}")
    for r in rows:
        anchor = anchors.get(r["format"]) if r["batch"] == 1 else None
        versus = f"{r['tok_s'] / anchor[1]:>11.2f}x" if anchor else ""
        print(f"  {r['batch']:>5} {r['format']:>8} {r['tok_s']:>8.1f} {r['ratio']:>7.2f}x {r['mb_per_token']:>8.1f} "
              f"{r['bandwidth_fraction']:>12.0%} {versus}")
        if anchor:
            r["llama_cpp"] = {"format": anchor[0], "tok_s": anchor[1]}
    if llama is None:
        print("  vs llama.cpp: the same model converted to GGUF, llama-bench tg128 at batch 1 on this machine type (the\n"
              "  2-core AVX-512 Xeon), quoted from issue 18, not run here: " +
              ", ".join(f"{name} {tps:g} tok/s" for name, tps in LLAMA_CPP.values()))
    else:
        print("  vs llama.cpp: llama-bench on the same model as GGUF, measured in this run (above)")
    return rows


def quality(run: str, windows: int) -> list[dict]:
    from moekit.checkpoint import load_config
    from moekit.data import load_text

    config = load_config(run)
    base = load(Path(run), "float32")
    tokenizer = load_model(run).tokenizer
    text = load_text(config.data.path, config.data.suffixes, config.data.max_chars)
    ids = torch.as_tensor(tokenizer.encode(text).astype("int64"))
    val, seq = ids[int(ids.numel() * (1 - config.data.val_fraction)):], config.train.seq_len
    step = (val.numel() - seq - 1) // windows
    held = torch.stack([val[i * step: i * step + seq + 1] for i in range(windows)])  # [windows, seq + 1]

    def evaluate(model):
        chosen = []
        hooks = [b.ffn.router.register_forward_hook(lambda m, a, out: chosen.append(out.indices.sort(-1).values))
                 for b in model.blocks if b.is_moe]
        with torch.no_grad():
            loss = float(sum(model(w[None, :-1], w[None, 1:]).loss for w in held) / len(held))
        for h in hooks:
            h.remove()
        return loss, torch.cat([c.reshape(-1, c.shape[-1]) for c in chosen])

    ref_loss, ref_chosen = evaluate(base)
    rows = []
    for fmt in FORMATS:
        loss, chosen = (ref_loss, ref_chosen) if fmt == "float32" else evaluate(load(Path(run), fmt))
        changed = (chosen != ref_chosen).any(-1).float().mean().item()
        rows.append({"format": fmt, "val_loss": loss, "ppl_increase": (torch.tensor(loss - ref_loss).exp().item() - 1),
                     "routing_changed": changed})
    print(f"quality of {run} ({windows} validation windows of {seq} tokens)")
    print(f"  {'format':>8} {'val loss':>9} {'ppl vs fp32':>11} {'routing changed':>15}")
    for r in rows:
        print(f"  {r['format']:>8} {r['val_loss']:>9.4f} {r['ppl_increase']:>+10.2%} {r['routing_changed']:>15.2%}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", default=[], help="a trained moekit run to measure quality on")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--model-dir", help="where the random Mixtral-format model is kept (default: a temporary folder)")
    ap.add_argument("--llama-build", type=Path,
                    help="a llama.cpp build (bin/llama-bench, bin/llama-quantize; the gguf package installed): "
                         "llama.cpp timed in the same run (benchmarks/llama_bench.py)")
    ap.add_argument("--out", default="quantize.json")
    args = ap.parse_args()
    results = {"threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.model_dir or tmp) / "mixtral-mini"
        make_model(path)
        llama = llama_cpp(path, args.llama_build, args.new_tokens, Path(tmp) / "gguf") if args.llama_build else None
        results["speed"] = speed(path, args.new_tokens, [int(b) for b in args.batches.split(",")], measure_bandwidth(),
                                 llama)
    results["quality"] = {run: quality(run, args.windows) for run in args.run}
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
