"""Hugging Face interop, held to transformers itself: tiny random models of every supported
family are built and saved by transformers, loaded by moekit, and compared (logits, router
choices, greedy generation), then saved by moekit and reloaded by transformers."""

import json

import pytest
import torch
import transformers

from moekit.config import ModelConfig, MoEConfig
from moekit.inference import generate
from moekit.interop import (
    SafetensorsDir,
    choose_family,
    convert,
    load_hf,
    load_model,
    save_hf,
)
from moekit.models import Transformer

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, initializer_range=0.1, attn_implementation="eager",
              experts_implementation="eager", eos_token_id=None, bos_token_id=None, pad_token_id=None)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=24, num_local_experts=4,
                                                           num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        intermediate_size=40, moe_intermediate_size=24, shared_expert_intermediate_size=16, num_experts=4,
        num_experts_per_tok=2, mlp_only_layers=[1], norm_topk_prob=False)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        intermediate_size=40, moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2, head_dim=12,
        norm_topk_prob=True, decoder_sparse_step=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                                      clip_qkv=0.5)),
}


def hf_model(family: str, **extra):
    config_cls, model_cls, kw = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**{**COMMON, **kw, **extra})
    return getattr(transformers, model_cls)(config).eval()


def hf_class(family: str):
    return getattr(transformers, FAMILIES[family][1])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (the transformers model, the directory it saved itself to)."""
    out = {}
    for family in FAMILIES:
        d = tmp_path_factory.mktemp(family)
        model = hf_model(family)
        model.save_pretrained(d)
        out[family] = (model, d)
    return out


def router_choices(router_logits: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(torch.softmax(router_logits.float(), -1), k, dim=-1).indices.sort(-1).values


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_router_choices_and_greedy_generation_match_transformers(saved, family):
    hf, path = saved[family]
    ours = load_hf(path)
    ids = torch.randint(0, VOCAB, (2, 13))
    with torch.no_grad():
        theirs = hf(ids, output_router_logits=True)
        mine = ours(ids)
    assert (theirs.logits - mine.logits).abs().max().item() < 1e-4
    moe_layers = [i for i, r in enumerate(mine.router_logits) if r is not None]
    assert len(moe_layers) == len(theirs.router_logits) >= 1
    k = hf.config.num_experts_per_tok
    for theirs_r, i in zip(theirs.router_logits, moe_layers):
        assert torch.equal(router_choices(theirs_r, k), router_choices(mine.router_logits[i], k))
    prompt = torch.randint(0, VOCAB, (1, 5))
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[:, 5:]
    assert torch.equal(generate(ours, prompt, 20, temperature=0), expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_by_moekit_reloads_in_transformers_with_the_same_logits(saved, family, tmp_path):
    hf, path = saved[family]
    written = save_hf(load_hf(path), tmp_path / "out")
    assert written == family  # the family is recognised from the model's features
    again = hf_class(family).from_pretrained(tmp_path / "out", attn_implementation="eager",
                                             experts_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert (hf(ids).logits - again(ids).logits).abs().max().item() < 1e-5


def test_fused_expert_layout_and_4x_rope_theta_config_load_the_same(saved, tmp_path):
    from safetensors.torch import save_file

    hf, path = saved["olmoe"]
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}  # transformers 5 in memory: fused experts
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    config = json.loads((path / "config.json").read_text())
    theta = config.pop("rope_parameters")["rope_theta"]
    config["rope_theta"] = theta  # the 4.x spelling
    (tmp_path / "config.json").write_text(json.dumps(config))
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert (load_hf(tmp_path)(ids).logits - hf(ids).logits).abs().max().item() < 1e-4


def test_sharded_checkpoints_load_and_save(saved, tmp_path):
    hf, _ = saved["mixtral"]
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    ours = load_hf(tmp_path / "hf")
    save_hf(ours, tmp_path / "ours", max_shard_bytes=30_000)
    index = json.loads((tmp_path / "ours" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again = hf_class("mixtral").from_pretrained(tmp_path / "ours", attn_implementation="eager",
                                                experts_implementation="eager").eval()
    ids = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, again(ids).logits, atol=1e-5)


def test_mixtral_sliding_window_matches_transformers(tmp_path):
    hf = hf_model("mixtral", sliding_window=4)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.sliding_window == 4
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max().item() < 1e-4


def small_moekit(**kw) -> Transformer:
    moe = kw.pop("moe", {})
    config = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, **kw,
                         moe=MoEConfig(**{"d_model": 32, "d_ff": 24, "num_experts": 4, "top_k": 2, **moe}))
    return Transformer(config).eval()


@pytest.mark.parametrize("kw, family", [({}, "mixtral"), ({"moe": {"renormalize": False}, "qk_norm": "head"}, "qwen3_moe"),
                                        ({"moe": {"num_shared_experts": 1, "shared_expert_gate": True},
                                          "first_dense_layers": 1}, "qwen2_moe"),
                                        ({"moe": {"router": "switch", "top_k": 1}, "qk_norm": "full"}, "olmoe")])
def test_moekit_models_save_for_transformers(kw, family, tmp_path):
    ours = small_moekit(**kw)
    assert save_hf(ours, tmp_path) == family
    theirs = hf_class(family).from_pretrained(tmp_path, attn_implementation="eager",
                                              experts_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert (ours(ids).logits - theirs(ids).logits).abs().max().item() < 1e-5
    with torch.no_grad():  # and back: the same model
        assert torch.equal(load_hf(tmp_path)(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("kw, message", [
    ({"moe": {"router": "expert_choice"}}, "router 'expert_choice'"),
    ({"moe": {"expert": "gelu"}}, "expert 'gelu'"),
    ({"moe": {"capacity_factor": 1.0}}, "capacity_factor"),
    ({"moe": {"renormalize": False}}, "not renormalised"),
    ({"moe": {"num_shared_experts": 1}}, "without shared_expert_gate"),
])
def test_what_a_family_cannot_express_is_an_error(kw, message):
    with pytest.raises(ValueError, match=message):
        choose_family(small_moekit(**kw).config)


def test_an_explicit_family_that_cannot_hold_the_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot be saved as olmoe.*qk_norm"):
        save_hf(small_moekit(), tmp_path / "x", model_type="olmoe")
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*mixtral"):
        save_hf(small_moekit(), tmp_path / "x", model_type="gpt2")
    with pytest.raises(ValueError, match=r"cannot be saved as llama: an MoE model is saved as one of \['mixtral'"):
        save_hf(small_moekit(), tmp_path / "x", model_type="llama")
    assert not (tmp_path / "x").exists()


def test_bad_checkpoints_get_errors_that_name_the_problem(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved["mixtral"]
    config = json.loads((path / "config.json").read_text())
    state = load_file(str(path / "model.safetensors"))

    def write(cfg, tensors, name="model.safetensors"):
        d = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(cfg))
        if tensors is not None:
            save_file(tensors, str(d / name))
        return d

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'.*'llama', 'mistral', 'mixtral', 'olmoe', 'qwen2', 'qwen2_moe', 'qwen3_moe'"):
        load_hf(write({**config, "model_type": "gpt2"}, state))
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    with pytest.raises(ValueError, match=rf"missing {key} \(expected shape \[32, 24\]\)"):
        load_hf(write(config, {k: v for k, v in state.items() if k != key}))
    with pytest.raises(ValueError, match=r"unexpected 1 tensor\(s\): \['model.layers.0.extra.weight'\]"):
        load_hf(write(config, {**state, "model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model.norm.weight has shape \[31\], expected \[32\]"):
        load_hf(write(config, {**state, "model.norm.weight": torch.zeros(31)}))
    with pytest.raises(ValueError, match="hidden_act 'gelu' is not supported"):
        load_hf(write({**config, "hidden_act": "gelu"}, state))
    with pytest.raises(ValueError, match="rope_type 'yarn' is not supported"):
        load_hf(write({**config, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, state))
    damaged = write(config, None)
    (damaged / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes()[:5000])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_hf(damaged)
    pickled = write(config, None)
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(FileNotFoundError, match="does not unpickle"):
        load_hf(pickled)


def test_lazy_reader_reads_shapes_without_loading(saved):
    _, path = saved["qwen3_moe"]
    lazy = SafetensorsDir(path)
    assert lazy.shape("model.embed_tokens.weight") == (VOCAB, 32)
    assert "model.layers.0.self_attn.q_norm.weight" in lazy


def test_byte_tokenizer_round_trips_through_tokenizer_json(tmp_path):
    from moekit.data import ByteTokenizer

    save_hf(small_moekit(), tmp_path / "hf", tokenizer=ByteTokenizer())
    loaded = load_model(tmp_path / "hf")
    text = "def f(x):\n    return x ** 2  # café, 東京 ✓"
    assert loaded.tokenizer.encode(text).tolist() == list(text.encode("utf-8"))
    assert loaded.tokenizer.decode(list(text.encode("utf-8"))) == text
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "hf" / "tokenizer.json"))
    assert fast(text)["input_ids"] == list(text.encode("utf-8"))


def test_convert_both_directions(saved, tmp_path):
    hf, path = saved["qwen2_moe"]
    msg = convert(path, tmp_path / "run")
    assert "moekit run directory" in msg
    loaded = load_model(tmp_path / "run")
    assert loaded.source == "moekit"
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        assert (loaded.model(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
    assert "qwen2_moe" in convert(tmp_path / "run", tmp_path / "back")
    with pytest.raises(FileExistsError, match="not empty"):
        convert(tmp_path / "run", tmp_path / "back")
    again = hf_class("qwen2_moe").from_pretrained(tmp_path / "back", attn_implementation="eager",
                                                  experts_implementation="eager").eval()
    with torch.no_grad():
        assert (again(ids).logits - hf(ids).logits).abs().max().item() < 1e-4
