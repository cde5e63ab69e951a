"""The training loop: outputs, resume equivalence, the NaN guard, checkpoints."""

import dataclasses
import json

import pytest
import torch

from moekit.models import Transformer
from moekit.presets import tiny
from moekit.training import TrainingDiverged, loop, lr_at, train
from moekit import checkpoint as ckpt
from moekit.analysis.health import health_warnings, max_over_mean


def config(**train_fields):
    c = tiny()
    fields = dict(max_steps=12, log_every=1, checkpoint_every=4, eval_every=6, progress=False)
    fields.update(train_fields)
    return dataclasses.replace(c, data=dataclasses.replace(c.data, max_chars=60_000),
                               train=dataclasses.replace(c.train, **fields))


def quiet(_):
    pass


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_everything_and_learns(tmp_path):
    summary = train(config(), tmp_path, log=quiet)
    for key in ("val_loss", "steps", "tokens_seen", "wall_s", "params_total", "params_active"):
        assert key in summary
    assert summary["steps"] == 12 and summary["tokens_seen"] == 12 * 4 * 64
    assert summary == json.loads((tmp_path / "summary.json").read_text())
    assert summary["val_loss"] < 5.0  # an untrained model scores about log(256) = 5.55
    m = metrics(tmp_path)
    assert [r["step"] for r in m] == list(range(1, 13))
    first = m[0]
    for key in ("train_loss", "tokens_per_s", "lr", "aux_loss", "tokens_per_expert"):
        assert key in first
    assert len(first["tokens_per_expert"]) == 2 and sum(first["tokens_per_expert"][0]) == 4 * 64 * 2
    assert "val_loss" in m[5] and "val_loss" in m[-1]
    assert (tmp_path / "latest").read_text().strip() == "step_0000012"
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_0000008", "step_0000012"]  # keep 2
    # the weights reload into an identical model
    model, tok, cfg = ckpt.load_trained(tmp_path)
    assert tok.vocab_size == 256 and cfg.model == config().model
    assert model.num_params().total == summary["params_total"]


def test_resume_after_a_crash_gives_the_same_losses(tmp_path, monkeypatch):
    straight, crashed = tmp_path / "a", tmp_path / "b"
    train(config(), straight, log=quiet)
    real = loop.train_batch

    def crash_at_step_10(stream, b, s, seed, step, micro=0):
        if step == 10:
            raise KeyboardInterrupt  # a kill: nothing after the step-8 checkpoint survives
        return real(stream, b, s, seed, step, micro)

    monkeypatch.setattr(loop, "train_batch", crash_at_step_10)
    with pytest.raises(KeyboardInterrupt):
        train(config(), crashed, log=quiet)
    monkeypatch.setattr(loop, "train_batch", real)
    assert (crashed / "latest").read_text().strip() == "step_0000008"
    (crashed / ".step_0000012.x.tmp").mkdir()  # a half-written checkpoint folder is ignored
    summary = train(config(), crashed, resume=True, log=quiet)
    a, b = metrics(straight), metrics(crashed)
    assert [r["step"] for r in b] == list(range(1, 13))  # lines logged after step 8 were replaced
    for ra, rb in zip(a, b):
        assert ra["train_loss"] == rb["train_loss"] and ra.get("val_loss") == rb.get("val_loss")
    assert summary["tokens_seen"] == 12 * 4 * 64


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = Transformer.forward
    calls = {"n": 0}

    def poisoned(self, tokens, targets=None, **kw):
        out = real(self, tokens, targets, **kw)
        calls["n"] += 1
        if self.training and calls["n"] > 6:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match=r"became nan at step 7.*last good checkpoint is .*step_0000004"):
        train(config(), tmp_path, log=quiet)
    good = ckpt.latest_checkpoint(tmp_path)
    assert good.name == "step_0000004"
    model = Transformer(config().model)
    ckpt.load_weights(model, good)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_time_budget_stops_and_evaluates(tmp_path):
    summary = train(config(max_steps=10_000, time_budget=0.5), tmp_path, log=quiet)
    assert summary["stopped"] == "time_budget" and 0 < summary["steps"] < 10_000
    assert summary["train_s"] >= 0.5 and "val_loss" in metrics(tmp_path)[-1]


def test_checkpoint_errors_are_clear(tmp_path):
    train(config(max_steps=4), tmp_path, log=quiet)
    where = ckpt.latest_checkpoint(tmp_path)
    other = Transformer(dataclasses.replace(config().model, d_model=32, moe={"d_ff": 64, "num_experts": 4}))
    with pytest.raises(ValueError, match="does not match the model: .*embed.weight: checkpoint"):
        ckpt.load_weights(other, where)
    (where / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        ckpt.load_weights(Transformer(config().model), where)
    (where / "state.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read as a moekit training state"):
        ckpt.load_state(where)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.latest_checkpoint(tmp_path / "x")


def test_device_errors_are_clear():
    assert loop.resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="train.device must be"):
        loop.resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device"):
            loop.resolve_device("cuda")


def test_schedule_warmup_cosine_and_time():
    t = config(max_steps=110, warmup_steps=10).train
    assert lr_at(t, 0) == pytest.approx(t.lr / 10) and lr_at(t, 9) == pytest.approx(t.lr)
    assert lr_at(t, 10) == pytest.approx(t.lr)
    assert lr_at(t, 60) == pytest.approx(t.lr * (t.min_lr_ratio + 1) / 2)  # halfway down the cosine
    assert lr_at(t, 110) == pytest.approx(t.lr * t.min_lr_ratio)
    timed = dataclasses.replace(t, time_budget=100.0)
    assert lr_at(timed, 20, train_seconds=50.0) == pytest.approx(t.lr * (t.min_lr_ratio + 1) / 2)


def test_health_flags_starving_and_collapsing_experts():
    balanced = torch.tensor([100, 98, 103, 99])
    assert health_warnings([balanced], [0]) == []
    starving = torch.tensor([200, 195, 3, 202])
    (key, message), = health_warnings([starving], [3])
    assert key == (3, "starving", 2) and "layer 3 expert 2 is starving" in message
    collapsed = torch.tensor([900, 50, 30, 20])
    kinds = {k[1] for k, _ in health_warnings([collapsed], [0])}
    assert kinds == {"collapse", "starving"}
    assert max_over_mean([balanced, collapsed]) == pytest.approx(3.6)


def test_bpe_tokenizer_is_saved_beside_the_checkpoint_and_reused(tmp_path):
    c = config(max_steps=4)
    c = dataclasses.replace(c, data=dataclasses.replace(c.data, tokenizer="bpe", bpe_vocab_size=300))
    train(c, tmp_path, log=quiet)
    assert (tmp_path / "tokenizer.json").is_file()
    model, tok, cfg = ckpt.load_trained(tmp_path)
    assert tok.kind == "bpe" and tok.vocab_size == 300 and cfg.model.vocab_size == 300
    assert model.embed.weight.shape == (300, 64)
    text = "def main():\n    return 0\n"
    assert tok.decode(tok.encode(text)) == text
    summary = train(dataclasses.replace(c, train=dataclasses.replace(c.train, max_steps=6)), tmp_path,
                    resume=True, log=quiet)
    assert summary["steps"] == 6


def test_interleaved_trainers_match_separate_runs(tmp_path):
    from moekit.training import Trainer

    jitter = dataclasses.replace(config(max_steps=6), model=dataclasses.replace(
        config().model, moe=dataclasses.replace(config().model.moe, router="noisy_topk", router_jitter=0.1)))
    dense = dataclasses.replace(config(max_steps=6), model=dataclasses.replace(config().model, dense=True))
    alone = {name: train(c, tmp_path / f"alone-{name}", log=quiet) for name, c in (("moe", jitter), ("dense", dense))}
    trainers = {name: Trainer(c, tmp_path / f"pair-{name}", log=quiet) for name, c in (("moe", jitter), ("dense", dense))}
    while not all(tr.done for tr in trainers.values()):
        for tr in trainers.values():
            tr.step()
    for name, tr in trainers.items():
        tr.close()
        assert tr.finish()["val_loss"] == alone[name]["val_loss"]  # the random router saw the same draws


def test_resume_after_kill_9_of_the_cli(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    args = ["--preset", "tiny", "--max-steps", "150", "--no-progress", "--train.log_every", "1",
            "--train.checkpoint_every", "10", "--train.eval_every", "50", "--data.max_chars", "60000"]
    cmd = [sys.executable, "-m", "moekit", "train"]
    subprocess.run([*cmd, *args, "--out", str(tmp_path / "a")], check=True, capture_output=True)
    run = tmp_path / "b"
    proc = subprocess.Popen([*cmd, *args, "--out", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        latest = run / "latest"
        if latest.exists() and latest.read_text().strip() >= "step_0000030":
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = (run / "latest").read_text().strip()
    assert killed_at < "step_0000150", "the run finished before it could be killed"
    subprocess.run([*cmd, "--resume", str(run), "--no-progress"], check=True, capture_output=True)
    a, b = metrics(tmp_path / "a"), metrics(run)
    assert [r["step"] for r in b] == [r["step"] for r in a]
    assert [r.get("train_loss") for r in b] == [r.get("train_loss") for r in a]
    assert [r.get("val_loss") for r in b] == [r.get("val_loss") for r in a]


@pytest.mark.parametrize("router", ["topk", "noisy_topk", "switch", "sampling", "sigmoid_bias", "expert_choice",
                                    "hash", "sinkhorn"])
def test_every_router_trains_in_the_model(router):
    from moekit.config import ModelConfig, MoEConfig

    top_k = 1 if router == "switch" else 2
    model = Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16,
                                    moe=MoEConfig(d_model=32, d_ff=32, num_experts=4, top_k=top_k, router=router)))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, 64, (8, 16))
    losses = []
    for _ in range(15):
        out = model(tokens[:, :-1], tokens[:, 1:])
        (out.loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0] - 0.5  # it memorises the fixed batch whatever the router


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path):
    eager = train(config(max_steps=3, eval_every=100), tmp_path / "eager", log=quiet)
    compiled = train(config(max_steps=3, eval_every=100, compile=True), tmp_path / "compiled", log=quiet)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], abs=2e-3)
    assert [r.get("train_loss") for r in metrics(tmp_path / "compiled")] == pytest.approx(
        [r.get("train_loss") for r in metrics(tmp_path / "eager")], abs=2e-3)


def test_health_warnings_come_once_per_occurrence():
    window = loop._Window(1, 4)
    warned, said = set(), []
    starving, balanced = torch.tensor([200, 195, 3, 202]), torch.tensor([100, 98, 103, 99])
    for load in (starving, starving, balanced, starving):  # starts, lasts, recovers, comes back
        window.reset()
        window.add([load])
        loop._warn_health(window, [0], warned, said.append)
    assert len(said) == 2 and all("layer 0 expert 2 is starving" in s for s in said)
