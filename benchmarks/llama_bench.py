"""llama.cpp as a contender in the decode benchmarks: the same Mixtral-format model written as
GGUF files (f32, then f16, bf16, q8_0 and q4_0 by ``llama-quantize``) and timed by ``llama-bench``
(token generation at batch 1, no prompt), in the same run as moekit.

Needs a llama.cpp build with ``llama-bench`` and ``llama-quantize`` (for example the tree that
the ``llama-cpp-python`` source package vendors: ``cmake -S vendor/llama.cpp -B build -G Ninja
-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON && cmake --build build --target llama-bench
llama-quantize``) and its ``gguf`` Python package (``pip install vendor/llama.cpp/gguf-py``);
neither is a dependency of moekit. The GGUF file is written here from the safetensors weights
(not by ``convert_hf_to_gguf.py``, which wants a tokenizer: this model has none): the llama
architecture with experts, tensors as llama.cpp names them, a placeholder vocabulary of the
model's size. q and k keep Hugging Face's row order (the converter permutes them for
llama.cpp's RoPE): the work per token is the same, the logits are not compared.

    python benchmarks/llama_bench.py --llama-build /tmp/llama/build --model-dir /tmp/qmodel/mixtral-mini
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

import torch
from safetensors.torch import load_file

LLAMA_TYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}


def write_gguf(hf_dir: Path, out: Path) -> Path:
    """The Mixtral-format model in ``hf_dir`` (config.json, model.safetensors) as a float32 GGUF file."""
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    state = load_file(str(hf_dir / "model.safetensors"))
    L, E = cfg["num_hidden_layers"], cfg["num_local_experts"]
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_name("moekit-mixtral-bench")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_block_count(L)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(H)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_dimension_count(d // H)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 1e6)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_expert_count(E)
    w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    V = cfg["vocab_size"]
    w.add_tokenizer_model("llama")
    w.add_token_list([f"<t{i}>".encode() for i in range(V)])
    w.add_token_scores([0.0] * V)
    w.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(V)])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def put(name: str, t: torch.Tensor) -> None:
        w.add_tensor(name, t.float().contiguous().numpy())

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    put("output.weight", state["lm_head.weight"])
    for i in range(L):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"])
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("output", "o_proj")):
            put(f"blk.{i}.attn_{ours}.weight", state[p + f"self_attn.{theirs}.weight"])
        put(f"blk.{i}.ffn_gate_inp.weight", state[p + "block_sparse_moe.gate.weight"])
        for ours, theirs in (("gate", "w1"), ("down", "w2"), ("up", "w3")):
            put(f"blk.{i}.ffn_{ours}_exps.weight",
                torch.stack([state[p + f"block_sparse_moe.experts.{e}.{theirs}.weight"] for e in range(E)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def prepare(hf_dir: Path, build: Path, work: Path, formats: list[str]) -> dict[str, Path]:
    """GGUF files of the model in each of ``formats`` (keys of LLAMA_TYPES), under a folder of
    ``work`` named after the model's weights file (path, size, time), so a file written for
    another model, or an older copy of this one, is never reused."""
    weights = (hf_dir / "model.safetensors").resolve()
    st = weights.stat()
    work = work / hashlib.sha256(f"{weights}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "model-f32.gguf"
    if not f32.exists():  # each file written beside and renamed: an interrupted run leaves none half-written
        write_gguf(hf_dir, f32.with_suffix(".part"))
        f32.with_suffix(".part").replace(f32)
    files = {"f32": f32}
    for fmt in formats:
        path = work / f"model-{fmt}.gguf"
        if fmt != "f32" and not path.exists():
            subprocess.run([str(build / "bin" / "llama-quantize"), str(f32), str(path.with_suffix(".part")),
                            LLAMA_TYPES[fmt]], check=True, capture_output=True)
            path.with_suffix(".part").replace(path)
        files[fmt] = path
    return files


def bench(build: Path, model: Path, new_tokens: int = 128, threads: int = 2, reps: int = 3) -> float:
    """llama-bench's token-generation speed (tok/s, batch 1, no prompt) of ``model``."""
    done = subprocess.run([str(build / "bin" / "llama-bench"), "-m", str(model), "-p", "0", "-n", str(new_tokens),
                           "-t", str(threads), "-r", str(reps), "-o", "json"],
                          check=True, capture_output=True, text=True)
    return float(json.loads(done.stdout)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-build", type=Path, required=True, help="llama.cpp build folder (bin/llama-bench)")
    ap.add_argument("--model-dir", type=Path, required=True, help="a Mixtral-format model folder")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moekit-bench/gguf"))
    ap.add_argument("--formats", default="f32,f16,bf16,q8_0,q4_0")
    args = ap.parse_args()
    formats = args.formats.split(",")
    files = prepare(args.model_dir, args.llama_build, args.work, formats)
    for fmt in formats:
        print(f"llama.cpp {fmt:>5}: {bench(args.llama_build, files[fmt]):7.1f} tok/s")


if __name__ == "__main__":
    main()
