"""Low-precision experts: each format's codes and scales mean what they say (error bounds,
packing, a second quantisation changes nothing), products equal dequantise-then-matmul,
quantised models stay close to float and save, load and decode consistently, and bad
input is refused by name."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from moekit import kernels
from moekit.config import ModelConfig, MoEConfig
from moekit.data import ByteTokenizer
from moekit.inference import Decoder, KVCache, generate_batch
from moekit.interop import load_model, save_hf
from moekit.interop.hf import save_run
from moekit.models import Transformer
from moekit.models.quantize import quantize_model
from moekit.ops.lowp import get_format, round_rows_int8
from moekit.shrink import quantize_to
from tests.kernels.rebuild import run_with_flags
from tests.reliability.conftest import cli

FORMATS = ["bf16", "int8", "int4"]


def moe_model(d_ff=96, **moe) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                         moe=MoEConfig(d_model=64, d_ff=d_ff, num_experts=6, top_k=2, **moe))
    return Transformer(config).eval()


def test_int8_and_int4_codes_are_within_half_a_step():
    w = torch.randn(3, 40, 64) * torch.logspace(-2, 1, 64)  # widely varying magnitudes
    q8 = get_format("int8").quantize(w, 32)
    err = (get_format("int8").dequantize(q8, 32) - w).abs()
    assert q8["q"].dtype == torch.int8 and q8["q"].abs().max().item() == 127
    assert (err <= q8["scale"][..., None] / 2 + 1e-6).all()
    q4 = get_format("int4").quantize(w, 32)
    assert q4["q"].shape == (3, 40, 32) and q4["scale"].shape == (3, 40, 2)
    err = (get_format("int4").dequantize(q4, 32) - w).abs().view(3, 40, 2, 32)
    assert (err <= q4["scale"][..., None] / 2 + 1e-6).all()


def test_int4_packs_code_j_and_j_plus_half_a_group_in_one_byte():
    w = torch.tensor([[-7.0, 7.0, 0.0, 1.0]])  # scale 1 (group of 4): codes -7, 7, 0, 1 stored +8
    parts = get_format("int4").quantize(w, 4)
    assert parts["scale"].tolist() == [[1.0]]
    assert parts["q"].tolist() == [[1 | (8 << 4), 15 | (9 << 4)]]  # bytes (code 0, code 2), (code 1, code 3)
    assert torch.equal(get_format("int4").dequantize(parts, 4), w)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantizing_the_dequantized_weights_changes_nothing(fmt):
    f = get_format(fmt)
    parts = f.quantize(torch.randn(5, 24, 64), 32)
    again = f.quantize(f.dequantize(parts, 32), 32)
    for name, t in parts.items():
        assert torch.equal(again[name], t) if t.dtype != torch.float32 else torch.allclose(again[name], t, rtol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [1, 5, 40, 150])  # one call of the kernel, and calls of 64 rows
@pytest.mark.parametrize("group", [32, 64])
def test_products_equal_dequantize_then_matmul(fmt, rows, group):
    f = get_format(fmt)
    parts = f.quantize(torch.randn(48, 128), group)
    x = torch.randn(rows, 128)
    exact = x @ f.dequantize(parts, group).t()
    ref = (round_rows_int8(x) if fmt != "bf16" else x) @ f.dequantize(parts, group).t()  # int8/int4: q8 activations
    assert torch.equal(f.reference(x, parts, group), ref)
    assert (f.matmul(x, parts, group) - ref).abs().max().item() < 1e-4 * ref.abs().max().item()
    # rounding the activations to 255 levels moves a product by well under 1% of its scale
    assert (ref - exact).abs().max().item() < 0.01 * exact.abs().max().item()
    out = torch.randn(rows, 48)
    expected = out + 0.5 * ref
    f.matmul(x, parts, group, out=out, alpha=0.5)  # accumulates in place
    assert (out - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
    with kernels.enabled(False):
        assert (f.matmul(x, parts, group) - ref).abs().max().item() < 1e-4 * ref.abs().max().item()


def test_bf16_prefill_products_run_in_bfloat16():
    """Many rows (prefill) multiply in bf16: x and the product rounded to bf16, float32
    accumulation; within bf16's rounding of the float32 reference."""
    f = get_format("bf16")
    parts = f.quantize(torch.randn(48, 256), 32)
    x = torch.randn(80, 256)
    got = f.matmul(x, parts, 32, kernel=False)
    assert torch.equal(got, torch.nn.functional.linear(x.bfloat16(), parts["w"]).float())
    ref = f.reference(x, parts, 32)
    assert (got - ref).abs().max().item() < 0.02 * ref.abs().max().item()
    assert (got - ref).abs().max().item() > 0  # not the float32 path
    out = torch.randn(80, 48)
    assert torch.allclose(f.matmul(x, parts, 32, out=out.clone(), alpha=0.5, kernel=False), out + 0.5 * got)


def test_the_kernel_refuses_what_it_cannot_read():
    lib = kernels.load()
    if lib is None:
        pytest.skip(f"kernels not built here: {kernels.status()}")
    parts = get_format("int4").quantize(torch.randn(8, 64), 32)
    out = torch.empty(1, 8)
    with pytest.raises(ValueError, match="group_size 48"):
        kernels.rows_lowp(lib, "int4", parts["q"], parts["scale"], 48, torch.randn(1, 64), out)
    with pytest.raises(ValueError, match="x must have shape"):
        kernels.rows_lowp(lib, "int4", parts["q"], parts["scale"], 32, torch.randn(1, 63), out)
    with pytest.raises(ValueError, match="int8 codes must be a contiguous"):
        kernels.rows_lowp(lib, "int8", parts["q"], parts["scale"], 32, torch.randn(1, 64), out)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("what", ["experts", "all"])
def test_a_quantized_model_is_close_saves_loads_and_decodes(fmt, what, tmp_path):
    model = moe_model()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
    save_run(tmp_path / "run", model, ByteTokenizer(), {})
    said = quantize_to(tmp_path / "run", tmp_path / fmt, fmt, what=what)
    assert said.endswith(f"experts in {fmt}" if what == "experts" else f"experts, attention and head in {fmt}") or "groups" in said
    saved = load_model(tmp_path / fmt).model
    on_the_fly = load_model(tmp_path / "run", quantize=fmt, quantize_what=what).model
    if what == "all":
        from moekit.layers.quantized import QuantizedLinear

        assert isinstance(saved.lm_head, QuantizedLinear) and isinstance(saved.blocks[2].attn.wo, QuantizedLinear)
        assert saved.config.linear_format == fmt
    with torch.no_grad():
        got = saved(ids).logits
        assert torch.equal(got, on_the_fly(ids).logits)
        # the experts' outputs move by the format's rounding, not more
        float_experts = model.blocks[1].ffn.experts
        h = torch.randn(7, 64)
        tpe = torch.tensor([2, 0, 1, 3, 1, 0])
        y_f, y_q = float_experts(h, tpe), saved.blocks[1].ffn.experts(h, tpe)
        bound = {"bf16": 0.01, "int8": 0.02, "int4": 0.25}[fmt]  # ~ step / sqrt(12) a weight, through two products
        assert (y_q - y_f).norm() / y_f.norm() < bound
    assert saved.blocks[0].ffn.experts.w1_scale.dtype == torch.float32 if fmt != "bf16" else True
    # the decode step (the experts' one-row products) equals the full forward
    cache = KVCache.for_model(saved, 1, 32)
    with torch.no_grad():
        saved(ids[:1, :10], kv_cache=cache)
        step = Decoder(saved, cache).step(ids[0, 10:11])
        assert (step - saved(ids[:1, :11]).logits[:, -1]).abs().max().item() < 1e-4
    tokens = generate_batch(saved, [ids[0, :8].tolist()], 6, temperature=0).tokens
    assert len(tokens[0]) == 6
    assert (got - ref).abs().mean().item() < (0.05 if what == "experts" else 0.15) * ref.abs().mean().item()


def test_dtype_moves_keep_codes_and_scales():
    model = quantize_model(moe_model(), "int8")
    scale = model.blocks[0].ffn.experts.w1_scale.clone()
    model.to(torch.bfloat16)
    experts = model.blocks[0].ffn.experts
    assert experts.w1_scale.dtype == torch.float32 and torch.equal(experts.w1_scale, scale)
    assert experts.w1_q.dtype == torch.int8


def test_bad_input_is_refused(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        MoEConfig(d_model=64, d_ff=96, weight_format="int3")
    with pytest.raises(ValueError, match="do not divide the input width 96"):
        MoEConfig(d_model=64, d_ff=96, weight_format="int4", weight_group_size=64)
    with pytest.raises(ValueError, match="do not divide"):
        quantize_model(moe_model(), "int4", group_size=48)
    with pytest.raises(ValueError, match="dense model"):
        quantize_model(moe_model().__class__(ModelConfig(vocab_size=256, d_model=64, n_layers=1, n_heads=4,
                                                         dense=True, moe=MoEConfig(d_model=64, d_ff=96))), "int8")
    model = quantize_model(moe_model(), "int8")
    with pytest.raises(ValueError, match="already stored as int8"):
        quantize_model(model, "int4")
    with pytest.raises(ValueError, match="Hugging Face families hold float experts"):
        save_hf(model, tmp_path / "hf")
    save_run(tmp_path / "q", model, ByteTokenizer(), {})
    ckpt = next((tmp_path / "q").glob("step_*")) / "model.safetensors"
    state = load_file(str(ckpt))
    state.pop("blocks.2.ffn.experts.w2_scale")
    save_file(state, str(ckpt))
    with pytest.raises(ValueError, match=r"missing \['blocks\.2\.ffn\.experts\.w2_scale'\]"):
        load_model(tmp_path / "q")
    code, err = cli(capsys, "train", "--init", tmp_path / "q", "--out", tmp_path / "t", "--max-steps", "1")
    assert code != 0
    code, err = cli(capsys, "quantize", tmp_path / "q", tmp_path / "x", "--format", "int5")
    assert code != 0 and any("int5" in line for line in err)


PORTABLE_CHECK = """
import torch
from moekit import kernels
from moekit.ops.lowp import get_format
lib = kernels.load()
assert lib is not None, kernels.status()
for fmt in ("bf16", "int8", "int4"):
    f = get_format(fmt)
    for group in (32, 6):
        if fmt == "int4" or group == 32:
            parts = f.quantize(torch.randn(10, 96), group)
            x = torch.randn(3, 96)
            ref = f.reference(x, parts, group)
            got = kernels.rows_lowp(lib, fmt, parts[f.parts[0]], parts.get("scale"), group, x, torch.empty(3, 10))
            assert (got - ref).abs().max().item() < 1e-4 * ref.abs().max().item(), (fmt, group)
print(kernels.status())
print("ok")
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="-mno-avx2 is an x86 flag")
def test_the_portable_loops_give_the_same_numbers(tmp_path):
    """The plain-C branches of cpu_lowp.c (built without AVX2), and a group size the vector
    path does not take (6)."""
    if kernels.load() is None:
        pytest.skip(f"kernels not built here: {kernels.status()}")
    done = run_with_flags(tmp_path, "-mno-avx512f -mno-avx2", PORTABLE_CHECK)
    assert done.returncode == 0 and done.stdout.split("\n")[-2] == "ok", done.stderr[-2000:]
    assert "int8/int4 products: plain C loops" in done.stdout  # kernels.status() says which loops run
    done = subprocess.run([sys.executable, "-c", PORTABLE_CHECK], capture_output=True, text=True)  # the native build
    assert done.returncode == 0 and done.stdout.split("\n")[-2] == "ok", done.stderr[-2000:]
