"""Fine-tuning from a model that exists (``train.init``): from Hugging Face directories of an
MoE and a dense family with their own tokenizer, with only some parameters training, the
balancing loss on and logged, exact resume, and back to the source family with the
fine-tuned logits."""

import dataclasses
import json

import pytest
import torch
import transformers

from moekit.adapt.finetune import finetune_config, freeze, parameter_group
from moekit.checkpoint import latest_checkpoint, load_state
from moekit.config import ModelConfig, MoEConfig, PARAMETER_GROUPS
from moekit.interop import convert, load_model
from moekit.interop.hf import byte_tokenizer
from moekit.models import Transformer
from moekit.training import train
from tests.reliability.conftest import TEXT, cli


def hf_dir(tmp_path, family="mixtral"):
    torch.manual_seed(0)
    common = dict(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=64, initializer_range=0.05)
    if family == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **common, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2, router_aux_loss_coef=0.0))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common, intermediate_size=48))
    path = tmp_path / family
    model.save_pretrained(path)
    byte_tokenizer().save(str(path / "tokenizer.json"))  # 256 ids: fewer than the model's 260, as Qwen's are
    return path


def short(config, steps=4, **train):
    fields = dict(max_steps=steps, batch_size=2, seq_len=32, log_every=1, eval_every=2, eval_batches=1,
                  checkpoint_every=2, progress=False, warmup_steps=1, lr=1e-3, **train)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, **fields))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "code.txt"
    path.write_text(TEXT)
    return path


def test_every_parameter_has_a_group_and_freezing_follows_it():
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, max_seq_len=32, qk_norm="head",
                         first_dense_layers=1, moe=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2,
                                                             num_shared_experts=1, shared_expert_gate=True))
    model = Transformer(config)
    groups = {name: parameter_group(name) for name, _ in model.named_parameters()}
    assert set(groups.values()) == set(PARAMETER_GROUPS)
    assert groups["blocks.1.ffn.router.gate.weight"] == "router"
    assert groups["blocks.1.ffn.shared_experts.gate.weight"] == "router"
    assert groups["blocks.1.ffn.experts.w1"] == groups["blocks.0.ffn.w1.weight"] == "experts"
    assert groups["blocks.0.attn.q_norm.weight"] == "attention" and groups["blocks.0.attn_norm.weight"] == "norms"
    on, total = freeze(model, "router,attention")
    assert on == sum(p.numel() for n, p in model.named_parameters() if groups[n] in ("router", "attention"))
    assert total == sum(p.numel() for p in model.parameters())
    assert all(p.requires_grad == (groups[n] in ("router", "attention")) for n, p in model.named_parameters())
    freeze(model, "all_but_embeddings")
    assert not model.embed.weight.requires_grad and model.blocks[0].attn.wq.weight.requires_grad
    with pytest.raises(ValueError, match="trainable must be 'all'.*'experts'"):
        freeze(model, "experts,mlp")


def test_finetune_an_hf_moe_trains_what_was_chosen_and_converts_back(tmp_path, corpus):
    source = hf_dir(tmp_path)
    config = finetune_config(source)
    assert config.model.moe.aux_loss_coef == 0.01  # the source had none: balancing is still on
    config = short(dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(corpus))),
                   trainable="experts,router")
    logs = []
    summary = train(config, tmp_path / "run", log=logs.append)
    assert any("balancing: aux_loss_coef 0.01" in line for line in logs)
    assert summary["params_trainable"] < summary["params_total"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(line["aux_loss"] > 0 for line in lines if "aux_loss" in line)

    before = load_model(source).model.state_dict()
    after = load_model(tmp_path / "run").model.state_dict()
    for name, value in after.items():
        same = torch.equal(value, before[name])
        assert same == (parameter_group(name) not in ("experts", "router")), name
    named = load_state(latest_checkpoint(tmp_path / "run"))["optimizer"]["named"]
    assert all(bool(state) == (parameter_group(name) in ("experts", "router")) for name, state in named.items())

    assert "mixtral" in convert(tmp_path / "run", tmp_path / "back")
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager",
                                                             experts_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert (theirs(ids).logits - load_model(tmp_path / "run").model(ids).logits).abs().max().item() < 1e-4


def test_a_finetuned_dense_model_resumes_exactly(tmp_path, corpus):
    source = hf_dir(tmp_path, "qwen2")
    config = finetune_config(source)
    assert config.model.dense and config.data.tokenizer == "bpe"  # the source's tokenizer.json
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(corpus)))
    full = train(short(config, 4), tmp_path / "full", log=lambda _: None)
    train(short(config, 2), tmp_path / "part", log=lambda _: None)
    resumed = train(short(config, 4), tmp_path / "part", resume=True, log=lambda _: None)
    assert resumed["val_loss"] == full["val_loss"] and resumed["train_loss"] == full["train_loss"]
    assert load_model(tmp_path / "full").model.config.vocab_size == 260  # the model's own, not the tokenizer's
    assert "qwen2" in convert(tmp_path / "full", tmp_path / "hf")


def test_bad_init_sources_are_refused_before_anything_is_written(tmp_path, corpus, capsys):
    source = hf_dir(tmp_path)
    foreign = tmp_path / "gpt2"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    out = tmp_path / "out"
    for argv, message in (
        (["--init", str(foreign)], "unsupported model_type 'gpt2'"),
        (["--init", str(tmp_path / "missing")], "does not exist"),
        (["--init", str(source), "--dense"], "--dense does not apply with --init"),
        (["--init", str(source), "--train.trainable", "heads"], "trainable must be"),
        (["--init", str(source), "--model.d_model", "64"], "differs from that of train.init"),
    ):
        code, err = cli(capsys, "train", *argv, "--data", str(corpus), "--out", str(out), "--no-progress",
                        "--max-steps", "1")
        assert code == 1 and message in err[-1], err
        assert not out.exists()
