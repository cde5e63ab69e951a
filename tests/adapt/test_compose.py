"""Composition (frankenMoE) and the Branch-Train-MiX recipe, on tiny models trained here on
two clearly different kinds of text (Python code, and plain English prose made from a word
list): the composed model routes each domain mostly to its own expert in most layers, with a
loss near the seed's and far below the other domain's branch on each domain; with its router trained on the mixture (Branch-Train-MiX)
its loss on each domain is within 0.25 nats of the domain's source model."""

import dataclasses
import random
import re
import sysconfig
import warnings
from pathlib import Path

import pytest
import torch

from moekit.adapt import compose, finetune_config
from moekit.adapt.compose import degenerate_layers
from moekit.analysis.collect import token_routes
from moekit.config import ModelConfig
from moekit.interop import load_model
from moekit.models import Transformer
from moekit.presets import tiny
from moekit.training import train
from tests.reliability.conftest import cli

WORDS = ("the a an old young small great river city house garden road king woman man child friend letter morning "
         "evening night summer winter light water bread story song walked carried found told heard saw remembered "
         "opened wrote loved left brought slowly quietly often never always again together beside across under "
         "through after before while because and but so then there here every quiet bright dark warm cold long "
         "short happy tired gentle strange early late many few little much").split()
MARGIN = 0.25  # nats: the router-trained composed model's loss on a domain over its source model's
NEAR_SEED = 0.05  # nats: the training-free composed model's loss on a domain over the seed's, at most


def prose(n_chars: int) -> str:
    rng, out = random.Random(1), []
    while sum(map(len, out)) < n_chars:
        s = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14)))
        out.append(s[0].upper() + s[1:] + rng.choice(".!?.."))
    return " ".join(out)[:n_chars]


def code(n_chars: int) -> str:
    parts, root = [], Path(sysconfig.get_paths()["stdlib"])
    for p in sorted(root.glob("[a-f]*.py")):
        text = re.sub(r'(?s)""".*?"""', "", p.read_text(errors="ignore"))  # code, not its docs
        parts.append("\n".join(line for line in text.splitlines() if not line.strip().startswith("#")))
        if sum(map(len, parts)) > n_chars:
            break
    return "\n\n".join(parts)[:n_chars]


def config(path: Path, steps: int, **train):
    c = tiny()
    fields = dict(max_steps=steps, progress=False, eval_every=10_000, checkpoint_every=10_000, **train)
    return dataclasses.replace(c, model=dataclasses.replace(c.model, n_layers=4),
                               data=dataclasses.replace(c.data, path=str(path), max_chars=None),
                               train=dataclasses.replace(c.train, **fields))


def windows(text: str) -> torch.Tensor:
    return torch.as_tensor(list(text.encode()[: 64 * 32])).view(-1, 64)  # bytes -> [32, 64]


@pytest.fixture(scope="module")
def btx(tmp_path_factory):
    """Branch-Train: a dense seed on the mixture, then one copy per domain with only its FFNs
    trained (so the base's attention stays right for every expert)."""
    d = tmp_path_factory.mktemp("btx")
    texts = {"code": code(200_000), "prose": prose(200_000)}
    for name, text in texts.items():
        (d / f"{name}.txt").write_text(text)
    (d / "mix.txt").write_text(texts["code"][:100_000] + "\n\n" + texts["prose"][:100_000])
    seed = config(d / "mix.txt", 300)
    train(dataclasses.replace(seed, model=dataclasses.replace(seed.model, dense=True)), d / "seed", log=lambda _: None)
    for name in texts:
        branch = config(d / f"{name}.txt", 300, lr=3e-3, warmup_steps=5, trainable="experts")
        train(finetune_config(d / "seed", branch), d / name, log=lambda _: None)
    models = {name: load_model(d / name).model for name in ("seed", *texts)}
    held = {name: windows(text[-5000:]) for name, text in texts.items()}
    prompts = [windows(texts[name][:3000]) for name in ("code", "prose")]
    return d, models, held, prompts


def own_expert_share(model, tokens: torch.Tensor, expert: int) -> list[float]:
    """Per MoE layer, the share of tokens whose likeliest expert is ``expert`` (analysis.token_routes)."""
    shares = {}
    for row in tokens:
        for layer, routes in token_routes(model, row).items():
            shares.setdefault(layer, []).extend(r[0] == expert for r in routes)
    return [sum(v) / len(v) for _, v in sorted(shares.items())]


def loss(model, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(tokens[:, :-1], tokens[:, 1:]).loss)


def test_hidden_gates_route_each_domain_to_its_expert_within_a_margin_of_its_loss(btx):
    _, m, held, prompts = btx
    composed = compose(m["seed"], [m["code"], m["prose"]], prompts, top_k=2, gate="hidden")
    random_gate = compose(m["seed"], [m["code"], m["prose"]], top_k=2, gate="random")
    for expert, name in enumerate(("code", "prose")):
        shares = own_expert_share(composed, held[name], expert)
        assert sum(s > 0.55 for s in shares) >= 3, (name, shares)  # most of the 4 layers
        assert sum(shares) / 4 > sum(own_expert_share(random_gate, held[name], expert)) / 4 + 0.05
        # near the seed and far below the other domain's branch: how much of the branch's gain
        # survives training-free gates depends on how well a domain's mean hidden state
        # separates its tokens, which moves with the machine's float rounding in training
        # (below the seed on the AVX2 VM and the Intel AVX-512 machine, 0.01 nats above it on
        # the AMD AVX-512 one, while the other branch is 0.4 nats above); the margin to the
        # source is held after the router is trained (the next test)
        ours, seed = loss(composed, held[name]), loss(m["seed"], held[name])
        other = loss(m[("prose", "code")[expert]], held[name])
        assert ours < seed + NEAR_SEED and ours < other - 0.2, (name, ours, seed, other)


def test_experts_are_the_branches_ffns_and_the_rest_is_the_base(btx):
    _, m, _, prompts = btx
    composed = compose(m["seed"], [m["code"], m["prose"]], prompts, gate="cheap_embed")
    block = composed.blocks[2]
    assert torch.equal(block.ffn.experts.w1[1], m["prose"].blocks[2].ffn.w1.weight.t())
    assert torch.equal(block.attn.wq.weight, m["seed"].blocks[2].attn.wq.weight)
    rows = block.ffn.router.gate.weight
    assert torch.allclose(rows.norm(dim=1), torch.ones(2)) and torch.equal(rows, composed.blocks[0].ffn.router.gate.weight)
    averaged = compose(m["seed"], [m["code"], m["prose"]], gate="random", attention="average")
    mean = (m["code"].blocks[0].attn.wo.weight + m["prose"].blocks[0].attn.wo.weight) / 2
    assert torch.equal(averaged.blocks[0].attn.wo.weight, mean)


def test_branch_train_mix_router_training_sharpens_the_routing(btx, tmp_path):
    d, m, held, prompts = btx
    composed = compose(m["seed"], [m["code"], m["prose"]], prompts, top_k=2, gate="hidden")
    from moekit.interop.hf import save_run

    save_run(tmp_path / "composed", composed, None, {})
    mix = finetune_config(tmp_path / "composed", config(d / "mix.txt", 300, lr=1e-2, warmup_steps=5,
                                                      trainable="router"))
    train(mix, tmp_path / "mixed", log=lambda _: None)
    tuned = load_model(tmp_path / "mixed").model
    before = own_expert_share(composed, held["prose"], 1)
    after = own_expert_share(tuned, held["prose"], 1)
    assert sum(after) > sum(before) and min(after) > 0.75, (before, after)
    assert loss(tuned, held["prose"]) < loss(composed, held["prose"])
    for name in ("code", "prose"):  # Branch-Train-MiX keeps each branch's gain within the margin
        tuned_loss, source = loss(tuned, held[name]), loss(m[name], held[name])
        assert tuned_loss < source + MARGIN and tuned_loss < loss(m["seed"], held[name]), (name, tuned_loss, source)


def test_degenerate_gates_are_reported():
    rows = [torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[1.0, 0.001], [1.0, 0.0]])]
    assert [layer for layer, _ in degenerate_layers(rows)] == [1]
    torch.manual_seed(0)
    base = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dense=True))
    same = torch.zeros(2, 8, dtype=torch.long)
    with pytest.warns(UserWarning, match="router rows nearly collinear"):
        compose(base, [base, base], [same, same.clone()])


def test_mismatched_models_and_bad_prompts_are_refused_before_writing(tmp_path, capsys):
    from moekit.interop import save_hf

    def dense(**kw):
        fields = {**dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=32, dense=True), **kw}
        return Transformer(ModelConfig(**fields))

    with pytest.raises(ValueError, match="expert 0 has d_model=48, the base 32.*expert 1 has n_layers=3"):
        compose(dense(), [dense(d_model=48), dense(n_layers=3)], gate="random")
    with pytest.raises(ValueError, match="expert 0 has vocab_size=80"):
        compose(dense(), [dense(vocab_size=80), dense()], gate="random")
    from moekit.data import ByteTokenizer

    for name in ("base", "a", "b"):
        save_hf(dense(vocab_size=256), tmp_path / name, tokenizer=ByteTokenizer())
    save_hf(dense(vocab_size=256, d_model=64), tmp_path / "wide", tokenizer=ByteTokenizer())
    (tmp_path / "p.txt").write_text("some text " * 50)
    (tmp_path / "empty.txt").write_text("")
    out = tmp_path / "out"
    common = ["compose", str(out), "--base", str(tmp_path / "base")]
    for argv, message in (
        (["--expert", str(tmp_path / "a"), "--prompts", str(tmp_path / "p.txt"),
          "--expert", str(tmp_path / "wide"), "--prompts", str(tmp_path / "p.txt")], "expert 1 has d_model=64"),
        (["--expert", str(tmp_path / "a"), "--prompts", str(tmp_path / "p.txt"),
          "--expert", str(tmp_path / "b"), "--prompts", str(tmp_path / "empty.txt")], "is empty"),
        (["--expert", str(tmp_path / "a"), "--prompts", str(tmp_path / "p.txt"), "--expert", str(tmp_path / "b")],
         "one --prompts FILE per --expert"),
        (["--expert", str(tmp_path / "a"), "--gate", "random"], "at least 2 expert models"),
    ):
        code_, err = cli(capsys, *common, *argv)
        assert code_ == 1 and message in err[-1], err
        assert not out.exists()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code_, _ = cli(capsys, *common, "--expert", str(tmp_path / "a"), "--prompts", str(tmp_path / "p.txt"),
                       "--expert", str(tmp_path / "b"), "--prompts", str(tmp_path / "p.txt"))
    assert code_ == 0 and load_model(out).model.config.moe.num_experts == 2
