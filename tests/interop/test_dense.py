"""The dense families (Llama, Mistral, Qwen2), held to transformers like the MoE ones: logits
within 1e-4, the same greedy tokens, and moekit's own dense models saved for transformers."""

import json

import pytest
import torch
import transformers

from moekit.config import ModelConfig
from moekit.inference import generate
from moekit.interop import choose_family, convert, load_hf, load_model, save_hf
from moekit.models import Transformer

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=40, max_position_embeddings=64, initializer_range=0.1, attn_implementation="eager",
              eos_token_id=None, bos_token_id=None, pad_token_id=None)
DENSE = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6, head_dim=12)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
}


def hf_dense(family: str, **extra):
    config_cls, model_cls, kw = DENSE[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**{**COMMON, **kw, **extra})).eval()
    with torch.no_grad():  # random biases: a zero bias would hide a missing one
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


@pytest.fixture(scope="module")
def saved_dense(tmp_path_factory):
    out = {}
    for family in DENSE:
        d = tmp_path_factory.mktemp(family)
        model = hf_dense(family)
        model.save_pretrained(d)
        out[family] = (model, d)
    return out


@pytest.mark.parametrize("family", list(DENSE))
def test_dense_logits_and_greedy_generation_match_transformers(saved_dense, family):
    hf, path = saved_dense[family]
    ours = load_hf(path)
    assert ours.config.dense and all(not b.is_moe for b in ours.blocks)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() < 1e-4
    prompt = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 5:]
    assert torch.equal(generate(ours, prompt, 20, temperature=0), expected)


@pytest.mark.parametrize("family", list(DENSE))
def test_dense_models_save_back_to_their_family(saved_dense, family, tmp_path):
    hf, path = saved_dense[family]
    assert save_hf(load_hf(path), tmp_path / "out") == family  # recognised from the features
    again = getattr(transformers, DENSE[family][1]).from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - again(ids).logits).abs().max().item() < 1e-5


def test_a_moekit_dense_model_saves_as_llama_and_converts_both_ways(tmp_path):
    torch.manual_seed(0)
    ours = Transformer(ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                                   dense=True, dense_d_ff=48)).eval()
    assert choose_family(ours.config).model_type == "llama"
    save_hf(ours, tmp_path / "hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() < 1e-5
    convert(tmp_path / "hf", tmp_path / "run")
    back = load_model(tmp_path / "run")
    with torch.no_grad():
        assert torch.equal(back.model(ids).logits, ours(ids).logits)


def test_dense_configs_that_moekit_cannot_compute_are_refused(saved_dense, tmp_path):
    _, path = saved_dense["llama"]
    config = json.loads((path / "config.json").read_text())
    for extra, message in (({"mlp_bias": True}, "mlp_bias=true is not supported for llama"),
                           ({"pretraining_tp": 2}, "pretraining_tp=2"),
                           ({"hidden_act": "gelu"}, "hidden_act 'gelu'")):
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps({**config, **extra}))
        (d / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
        with pytest.raises(ValueError, match=message):
            load_hf(d)
    with pytest.raises(ValueError, match="cannot be saved as mixtral: a dense model"):
        save_hf(load_hf(path), tmp_path / "x", model_type="mixtral")
    assert not (tmp_path / "x").exists()
