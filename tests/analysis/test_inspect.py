"""Collecting routing from real models, and the inspect report on a tiny trained model."""

import dataclasses
import json
from html.parser import HTMLParser

import pytest
import torch

from moekit import MoE
from moekit.analysis import (
    checkpoint_consistency,
    expert_similarity,
    inspect_model,
    jitter_consistency,
    routing_stats,
    token_routes,
    training_dynamics,
    windows,
)
from moekit.config import ModelConfig, MoEConfig
from moekit.models import Transformer
from moekit.presets import tiny
from moekit.training import train


def small_model(**moe):
    return Transformer(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=4, max_seq_len=32,
                                   moe=MoEConfig(d_model=32, d_ff=16, num_experts=4, top_k=2, **moe))).eval()


def test_routing_stats_match_the_models_own_outputs():
    model = small_model()
    tokens = torch.randint(0, 50, (6, 16))
    stats = routing_stats(model, windows(tokens.reshape(-1), None, 16, 4))
    with torch.no_grad():
        out = model(tokens)
    for s, layer_stats, logits in zip(stats, out.layer_stats, out.router_logits):
        assert s.tokens == 96 and s.tokens_per_expert == layer_stats.tokens_per_expert.tolist()
        probs = torch.softmax(logits, -1)
        assert s.top1_prob == pytest.approx(float(probs.max(-1).values.mean()), rel=1e-5)
        assert s.z_mean == pytest.approx(float(torch.logsumexp(logits, -1).mean()), rel=1e-5)
    routes = token_routes(model, tokens[0])
    assert len(routes) == 2 and len(routes[0]) == 16 and all(len(r) == 2 for r in routes[0])


def test_consistency_and_similarity():
    model = small_model()
    batches = [torch.randint(0, 50, (4, 16)) for _ in range(3)]
    same = checkpoint_consistency(model, model, batches)
    assert all(c == {"top1_kept": 1.0, "set_kept": 1.0} for c in same.values())
    none = jitter_consistency(model, batches, jitter=0.0)
    assert all(c["top1_kept"] == 1.0 for c in none.values())
    loud = jitter_consistency(model, batches, jitter=0.9)
    assert all(c["set_kept"] < 1.0 for c in loud.values())
    moe = model.blocks[0].ffn
    sim = expert_similarity(moe)
    assert sim.shape == (4, 4) and torch.allclose(sim.diagonal(), torch.ones(4))
    with torch.no_grad():
        moe.experts.w1[1] = moe.experts.w1[0]
        moe.experts.w3[1] = moe.experts.w3[0]
        moe.experts.w2[1] = moe.experts.w2[0]
    assert expert_similarity(moe)[0, 1] == pytest.approx(1.0)
    generic = MoE.from_experts([torch.nn.Linear(8, 8) for _ in range(3)], d_model=8)
    assert expert_similarity(generic).shape == (3, 3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    c = tiny()
    c = dataclasses.replace(c, data=dataclasses.replace(c.data, max_chars=60_000),
                            train=dataclasses.replace(c.train, max_steps=8, log_every=2, eval_every=8,
                                                      checkpoint_every=8, progress=False))
    train(c, run, log=lambda _: None)
    return run


def test_training_logs_balance_and_entropy_per_layer(trained):
    lines = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert all(len(r["router_entropy"]) == len(r["tokens_per_expert"]) == len(r["layer_max_over_mean"]) for r in lines)
    assert all(0 < e <= torch.log(torch.tensor(8.0)) + 1e-6 for r in lines for e in r["router_entropy"])
    dyn = training_dynamics(trained / "metrics.jsonl")
    assert dyn["steps"] == [2, 4, 6, 8] and dyn["layers"][0]["router_entropy"] == [r["router_entropy"][0] for r in lines]


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)

    def handle_data(self, data):
        self.text.append(data)


def test_inspect_writes_plots_report_and_json(trained, tmp_path, capsys):
    data = tmp_path / "domains"
    for name, text in {"code": "def f(x):\n    return x + 1\n" * 200, "prose": "The cat sat on the mat. " * 300,
                       "numbers": "3.14, 2.71, 1.41, 42\n" * 300}.items():
        (data / name).mkdir(parents=True)
        (data / name / "a.txt").write_text(text)
    out = tmp_path / "report"
    payload = inspect_model(trained, data=str(data), out=out, max_tokens=6000, seq_len=64, progress=False)
    printed = capsys.readouterr().out
    assert "routing per MoE layer" in printed and "balanced" in printed or "imbalanced" in printed
    for png in ("load.png", "coactivation.png", "specialisation.png", "dynamics.png", "tokens.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    parser = _Tags()
    parser.feed((out / "report.html").read_text())
    assert parser.tags.count("img") == 5 and "table" in parser.tags
    text = " ".join(parser.text)
    for section in ("Routing per layer", "Load per expert", "Specialisation", "Routing consistency"):
        assert section in text
    on_disk = json.loads((out / "inspect.json").read_text())
    assert on_disk == json.loads(json.dumps(payload))
    assert payload["labels"] == ["code", "numbers", "prose"]
    layer0 = on_disk["layers"][0]
    assert sum(map(sum, layer0["label_expert"])) == layer0["tokens"] * 2  # top-2: two slots per token
    assert 0.0 <= layer0["specialisation"] <= 1.0


def test_inspect_errors(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inspect_model(tmp_path / "nope", progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    config = json.loads((trained / "config.json").read_text())
    config["model"]["d_model"] = 48
    (broken / "config.json").write_text(json.dumps(config))
    step = next(trained.glob("step_*"))
    (broken / step.name).mkdir()
    (broken / step.name / "model.safetensors").write_bytes((step / "model.safetensors").read_bytes())
    (broken / "latest").write_text(step.name + "\n")
    with pytest.raises(ValueError, match="does not match the model"):
        inspect_model(broken, progress=False)
