"""Expert pruning: keeping every expert is the identity, a pruned model equals the full one
with the dropped experts' router logits at -inf, the scores mean what they say, and the
result saves for transformers."""

import json

import pytest
import torch
import transformers

from moekit.config import ModelConfig, MoEConfig
from moekit.data import ByteTokenizer
from moekit.interop import load_model, save_hf
from moekit.models import Transformer
from moekit.shrink import expert_scores, prune_experts
from tests.reliability.conftest import cli


def moe_model(first_dense_layers=1, **moe) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, max_seq_len=64,
                         first_dense_layers=first_dense_layers, moe=MoEConfig(**{"d_model": 32, "d_ff": 16, "num_experts": 6,
                                                                "top_k": 2, **moe}))
    return Transformer(config).eval()


def test_keeping_every_expert_is_the_identity():
    model = moe_model(num_shared_experts=1)
    ids = torch.randint(0, 256, (2, 24))
    scores = expert_scores(model, ids, "reap")
    with torch.no_grad():
        assert torch.equal(prune_experts(model, 6, scores)(ids).logits, model(ids).logits)


@pytest.mark.parametrize("by", ["frequency", "gate", "reap"])
def test_a_pruned_model_equals_the_full_one_with_dropped_logits_masked(by):
    model = moe_model()
    ids = torch.randint(0, 256, (4, 32))
    scores = expert_scores(model, ids, by)
    pruned = prune_experts(model, 3, scores)
    for layer, s in scores.items():
        kept = sorted(s.topk(3).indices.tolist())
        router = model.blocks[layer].ffn.router
        mask = torch.full((6,), float("-inf"))
        mask[kept] = 0.0
        router.gate_logits = lambda x, f=router.gate_logits, mask=mask: f(x) + mask  # the masked reference
        assert torch.equal(pruned.blocks[layer].ffn.router.gate.weight, model.blocks[layer].ffn.router.gate.weight[kept])
    with torch.no_grad():
        assert (pruned(ids).logits - model(ids).logits).abs().max().item() < 1e-5
    assert pruned.config.moe.num_experts == 3 and pruned.num_params().total < model.num_params().total


def test_scores_mean_what_they_say():
    model = moe_model()
    ids = torch.randint(0, 256, (4, 32))
    tokens = ids.numel()
    freq, gate = expert_scores(model, ids, "frequency"), expert_scores(model, ids, "gate")
    for layer in freq:
        assert freq[layer].sum().item() == tokens * 2  # every token's two slots
        assert abs(gate[layer].sum().item() - 1.0) < 1e-5  # renormalised weights: one per token
    with torch.no_grad():
        model.blocks[2].ffn.experts.w2[4].zero_()  # an expert whose output is always zero
    reap = expert_scores(model, ids, "reap")
    assert reap[2][4].item() == 0.0 and freq[2][4].item() > 0 and (reap[2] > 0).sum() >= 4


def test_a_pruned_mixtral_loads_in_transformers(tmp_path):
    model = moe_model(first_dense_layers=0)  # a Mixtral
    ids = torch.randint(0, 256, (2, 16))
    pruned = prune_experts(model, {i: [0, 2, 5] for i in range(3)}, top_k=1)
    save_hf(pruned, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["num_local_experts"] == 3
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager",
                                                             experts_implementation="eager").eval()
    with torch.no_grad():
        assert (theirs(ids).logits - pruned(ids).logits).abs().max().item() < 1e-4


def test_bad_pruning_requests_name_the_problem(tmp_path, capsys):
    model = moe_model()
    ids = torch.randint(0, 256, (2, 16))
    scores = expert_scores(model, ids)
    with pytest.raises(ValueError, match=r"keep must be in 1..num_experts \(1..6\)"):
        prune_experts(model, 0, scores)
    with pytest.raises(ValueError, match=r"top_k \(2\) must be in 1..1"):
        prune_experts(model, 1, scores)
    with pytest.raises(ValueError, match="pruning supports the"):
        prune_experts(moe_model(router="hash"), 3, scores)
    with pytest.raises(ValueError, match="by must be one of"):
        expert_scores(model, ids, "usage")
    save_hf(moe_model(first_dense_layers=0), tmp_path / "hf", tokenizer=ByteTokenizer())
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "text.txt").write_text("def f(x):\n    return x\n" * 40)
    out = tmp_path / "out"
    for argv, message in ((["--keep", "1", "--data", str(tmp_path / "text.txt")], "pass --top-k 1"),
                          (["--keep", "9", "--data", str(tmp_path / "text.txt")], "--keep must be in 1..6"),
                          (["--keep", "3", "--data", str(tmp_path / "empty.txt")], "is empty")):
        code, err = cli(capsys, "prune", str(tmp_path / "hf"), str(out), *argv)
        assert code == 1 and message in err[-1], err
        assert not out.exists()
    code, _ = cli(capsys, "prune", str(tmp_path / "hf"), str(out), "--keep", "3", "--by", "reap", "--data",
                  str(tmp_path / "text.txt"))
    assert code == 0 and load_model(out).model.config.moe.num_experts == 3
