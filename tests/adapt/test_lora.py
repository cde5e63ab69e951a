"""LoRA: adapters start at the base model's function, the grouped expert path equals the
per-expert reference in outputs and gradients, merging keeps the function, adapters save
and load on their own, and training changes only what it should."""

import dataclasses

import pytest
import torch
import transformers

from moekit.adapt.lora import ADAPTER_FILE, attach_lora, has_adapters, load_adapters, merge_lora, save_adapters
from moekit.checkpoint import latest_checkpoint, load_state
from moekit.config import LoRAConfig, ModelConfig, MoEConfig
from moekit.interop import load_model, save_hf
from moekit.models import Transformer
from moekit.training import train
from tests.reliability.conftest import cli, tiny_config

ALL = LoRAConfig(rank=4, alpha=8.0, targets="attention,experts,ffn")


def moe_model(seed=0, **kw) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32,
                         **{"n_kv_heads": 2, "first_dense_layers": 1, **kw},
                         moe=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2, num_shared_experts=1))
    return Transformer(config).eval()


def force_grouped(model: Transformer, grouped: bool | None) -> None:
    for block in model.blocks:
        if block.is_moe:
            block.ffn.experts.use_grouped_mm = grouped


def randomise_b(model: Transformer, seed=1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name and name.endswith(".b"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def test_adapters_start_at_the_base_function():
    model = moe_model()
    ids = torch.randint(0, 64, (2, 16))
    force_grouped(model, True)
    with torch.no_grad():
        base = model(ids).logits
        attach_lora(model, ALL)
        assert torch.equal(model(ids).logits, base)  # B = 0 adds exact zeros on the same path
        force_grouped(model, None)
        assert (model(ids).logits - base).abs().max().item() < 1e-6


def test_grouped_expert_adapters_equal_the_per_expert_reference_in_outputs_and_gradients():
    model = moe_model()
    attach_lora(model, ALL)
    randomise_b(model)
    ids = torch.randint(0, 64, (2, 16))
    results = {}
    for grouped in (True, False):
        force_grouped(model, grouped)
        model.zero_grad()
        out = model(ids).logits
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if ".experts.adapters." in n}
        results[grouped] = (out.detach(), grads)
    assert results[True][1] and (results[True][0] - results[False][0]).abs().max().item() < 1e-5
    for name, g in results[True][1].items():
        assert torch.allclose(g, results[False][1][name], atol=1e-6), name
    assert model.blocks[1].ffn.experts.choose_path(torch.zeros(8, 32), model.blocks[1].ffn.experts.weights()) \
        == "lora_loop"  # forced off: the reference


def test_merging_keeps_the_function_and_saves_for_transformers(tmp_path):
    model = moe_model()
    config = dataclasses.replace(model.config, first_dense_layers=0,  # a Mixtral: no dense layer, no shared expert
                                 moe=dataclasses.replace(model.config.moe, num_shared_experts=0))
    torch.manual_seed(0)
    model = Transformer(config).eval()
    attach_lora(model, ALL)
    randomise_b(model)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        adapted = model(ids).logits
        merge_lora(model)
        assert not has_adapters(model)
        assert (model(ids).logits - adapted).abs().max().item() < 1e-5
    save_hf(model, tmp_path / "hf")
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                             experts_implementation="eager").eval()
    with torch.no_grad():
        assert (theirs(ids).logits - adapted).abs().max().item() < 1e-4


def test_adapters_save_alone_and_load_onto_the_base(tmp_path):
    model = moe_model()
    attach_lora(model, ALL)
    randomise_b(model)
    ids = torch.randint(0, 64, (1, 12))
    file = save_adapters(model, tmp_path, ALL)
    assert file.name == ADAPTER_FILE
    base = moe_model()
    assert load_adapters(base, tmp_path) == ALL
    with torch.no_grad():
        assert torch.equal(base(ids).logits, model(ids).logits)
    other = moe_model(n_kv_heads=4)
    with pytest.raises(ValueError, match="does not fit this model"):
        load_adapters(other, file)
    assert not has_adapters(other)  # nothing half-attached


def test_bad_lora_requests_name_the_problem():
    dense = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dense=True))
    with pytest.raises(ValueError, match="no MoE layers"):
        attach_lora(dense, LoRAConfig(rank=4, targets="experts"))
    with pytest.raises(ValueError, match="targets must be a comma-separated list of"):
        LoRAConfig(rank=4, targets="mlp")
    with pytest.raises(ValueError, match="lora.rank is 0"):
        attach_lora(dense, LoRAConfig())
    model = moe_model()
    attach_lora(model, ALL)
    with pytest.raises(ValueError, match="already has adapters"):
        attach_lora(model, ALL)


def test_lora_training_moves_only_the_adapters_and_the_router(tmp_path, corpus, capsys):
    config = tiny_config(max_steps=4, trainable="router")
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(corpus)),
                                 lora=LoRAConfig(rank=4, targets="attention,experts"))
    base = tmp_path / "base"
    base_config = tiny_config(max_steps=2)
    train(dataclasses.replace(base_config, data=dataclasses.replace(base_config.data, path=str(corpus))), base,
          log=lambda _: None)
    from moekit.adapt.finetune import finetune_config

    ft = finetune_config(base, config)  # the model from the base run; lora and train from config
    summary = train(ft, tmp_path / "lora", log=lambda _: None)
    assert (tmp_path / "lora" / ADAPTER_FILE).is_file()
    named = load_state(latest_checkpoint(tmp_path / "lora"))["optimizer"]["named"]
    with_state = sorted(n for n, s in named.items() if s)
    assert with_state and all(".adapters." in n or ".router." in n for n in with_state)
    assert summary["params_trainable"] == sum(s["exp_avg"].numel() for s in named.values() if s)
    before = load_model(base).model.state_dict()
    tuned = load_model(tmp_path / "lora").model  # merged on load
    assert not has_adapters(tuned)
    for name, value in tuned.state_dict().items():
        changed = not torch.equal(value, before[name])
        adapted = ".attn.w" in name or ".experts.w" in name or ".router." in name
        assert changed == adapted, name
    code, err = cli(capsys, "train", "--init", str(base), "--data", str(corpus), "--out", str(tmp_path / "x"),
                    "--lora.rank", "4", "--lora.targets", "ffn", "--max-steps", "1", "--no-progress")
    assert code == 1 and "reaches no layer of this model" in err[-1] and not (tmp_path / "x").exists()
