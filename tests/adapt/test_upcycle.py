"""Sparse upcycling: the upcycled model computes the dense model's function at init (every
router init, fast path and reference, copy and fine-grained with shared experts), and the
variants that cannot preserve it are the ones the docs say."""

import pytest
import torch
import transformers

from moekit.adapt import function_preserving, upcycle, upcycle_to
from moekit.adapt.upcycle import centroids
from moekit.config import ModelConfig
from moekit.data import ByteTokenizer
from moekit.interop import load_model, save_hf
from moekit.models import Transformer
from tests.reliability.conftest import cli


def dense_model(**kw) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                         dense=True, dense_d_ff=48, **kw)
    return Transformer(config).eval()


def set_implementation(model: Transformer, impl: str) -> None:
    for block in model.blocks:
        if block.is_moe:
            block.ffn.config.implementation = impl


CASES = [dict(), dict(num_experts=4, top_k=1),  # copies: any top_k
         dict(num_experts=8, top_k=2, granularity=2),  # 4 replicas of 2 slices, one replica a token
         dict(num_experts=8, top_k=4, granularity=4),
         dict(num_experts=6, top_k=2, granularity=3, shared_experts=1)]  # 1 shared slice, 3 replicas of 2


@pytest.mark.parametrize("kw", CASES)
@pytest.mark.parametrize("router_init", ["random", "hidden"])
def test_upcycled_model_starts_at_the_dense_function(kw, router_init):
    dense = dense_model()
    ids = torch.randint(0, 64, (2, 24))
    calibration = torch.randint(0, 64, (4, 32)) if router_init == "hidden" else None
    moe = upcycle(dense, router_init=router_init, calibration=calibration, **kw)
    assert function_preserving(moe.config)
    assert all(b.is_moe for b in moe.blocks)
    with torch.no_grad():
        expected = dense(ids).logits
        for impl in ("fast", "reference"):
            set_implementation(moe, impl)
            out = moe(ids)
            assert (out.logits - expected).abs().max().item() < 1e-5, impl
            assert out.router_logits[0].argmax(-1).unique().numel() > 1  # the routers really route


def test_the_dense_model_is_untouched_and_the_copies_are_independent():
    dense = dense_model()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    moe = upcycle(dense, num_experts=4, top_k=2)
    with torch.no_grad():
        moe.blocks[0].ffn.experts.w1[0].add_(1.0)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())
    w1 = moe.blocks[1].ffn.experts.w1
    assert torch.equal(w1[0], w1[3]) and torch.equal(w1[0], dense.blocks[1].ffn.w1.weight.t())


def test_variants_that_change_the_function():
    dense = dense_model()
    ids = torch.randint(0, 64, (2, 24))
    with torch.no_grad():
        expected = dense(ids).logits
        noisy = upcycle(dense, noise=0.1)
        assert (noisy(ids).logits - expected).abs().max().item() > 1e-3
        w1 = noisy.blocks[0].ffn.experts.w1
        assert not torch.equal(w1[0], w1[1])  # the copies can diverge
        partial = upcycle(dense, num_experts=8, top_k=1, granularity=2)  # a token sees one of two slices
        assert not function_preserving(partial.config)
        assert (partial(ids).logits - expected).abs().max().item() > 1e-3


def test_hidden_router_rows_are_unit_centroids_of_the_hidden_states():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    points = centres.repeat_interleave(50, 0) + 0.1 * torch.randn(150, 3, generator=gen)
    rows = centroids(points, 3, gen)
    assert torch.allclose(rows.norm(dim=1), torch.ones(3))
    centred = centres - centres.mean(0)
    expected = centred / centred.norm(dim=1, keepdim=True)
    # each true (centred) cluster direction is found, whatever the order
    assert (rows @ expected.t()).max(0).values.min() > 0.99


def test_an_upcycled_llama_saves_as_mixtral_with_the_llamas_logits(tmp_path):
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, initializer_range=0.1)).eval()
    llama.save_pretrained(tmp_path / "llama")
    print(upcycle_to(tmp_path / "llama", tmp_path / "run", num_experts=4, top_k=2))
    moe = load_model(tmp_path / "run").model
    save_hf(moe, tmp_path / "mixtral")
    mixtral = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "mixtral", attn_implementation="eager",
                                                              experts_implementation="eager").eval()
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (mixtral(ids).logits - llama(ids).logits).abs().max().item() < 1e-4
    shared = upcycle(load_model(tmp_path / "llama").model, num_experts=4, top_k=2, granularity=3, shared_experts=1)
    assert save_hf(shared, tmp_path / "qwen2_moe") == "qwen2_moe"  # the gated shared expert
    qwen = transformers.Qwen2MoeForCausalLM.from_pretrained(tmp_path / "qwen2_moe", attn_implementation="eager",
                                                            experts_implementation="eager").eval()
    with torch.no_grad():
        # Qwen2-MoE always has q/k/v biases (written as zeros): the Llama's function still
        assert (qwen(ids).logits - llama(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("kw, message", [
    (dict(granularity=5), "granularity 5 does not divide the FFN width 48"),
    (dict(num_experts=5, granularity=2), r"num_experts \(5\) must be a multiple of the routed slices"),
    (dict(granularity=2, shared_experts=2), "shared_experts must be in 0..granularity-1"),
    (dict(top_k=9), r"top_k must be in 1..num_experts \(1..8\)"),
    (dict(router_init="hidden"), "needs calibration tokens"),
    (dict(router_init="kmeans"), "router_init must be one of"),
])
def test_bad_upcycling_arguments_name_the_problem(kw, message):
    with pytest.raises(ValueError, match=message):
        upcycle(dense_model(), **kw)


def test_the_cli_refuses_without_writing(tmp_path, capsys):
    dense = dense_model()
    save_hf(dense, tmp_path / "llama")
    moe_dir = tmp_path / "moe"
    code, err = cli(capsys, "upcycle", str(tmp_path / "llama"), str(moe_dir), "--granularity", "5")
    assert code == 1 and "does not divide" in err[0] and not moe_dir.exists()
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    code, err = cli(capsys, "upcycle", str(tmp_path / "llama"), str(moe_dir), "--router-init", "hidden",
                    "--calibration", str(empty))
    assert code == 1 and "has no tokenizer.json" in err[0] and not moe_dir.exists()
    save_hf(dense, tmp_path / "with_tokenizer", tokenizer=ByteTokenizer())
    code, err = cli(capsys, "upcycle", str(tmp_path / "with_tokenizer"), str(moe_dir), "--router-init", "hidden",
                    "--calibration", str(empty))
    assert code == 1 and "is empty" in err[0] and not moe_dir.exists()
    code, err = cli(capsys, "upcycle", str(tmp_path / "llama"), str(moe_dir), "--num-experts", "4")
    assert code == 0 and load_model(moe_dir).model.config.moe.num_experts == 4
    code, err = cli(capsys, "upcycle", str(moe_dir), str(tmp_path / "again"))
    assert code == 1 and "starts from a dense model" in err[0] and not (tmp_path / "again").exists()
