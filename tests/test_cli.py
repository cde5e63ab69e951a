"""The command line: thin wrappers over library functions."""

import json
import re
import subprocess
import sys

import pytest

from moekit import MoEConfig
from moekit.cli import main
from moekit.layers.moe import count_params


def test_help_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "moekit", "--help"], capture_output=True, text=True, check=True)
    assert "params" in out.stdout


def test_params_default_is_a_mixtral_layer(capsys):
    assert main(["params", "--layers", "32"]) == 0
    text = capsys.readouterr().out
    c = count_params(MoEConfig(d_model=4096, d_ff=14336, num_experts=8, top_k=2))
    assert f"{c.total:,}" in text and f"{c.active * 32:,}" in text


def test_params_overrides_and_errors(capsys):
    main(["params", "--moe.num_experts", "16", "--moe.router", "hash"])
    c = count_params(MoEConfig(d_model=4096, d_ff=14336, num_experts=16, top_k=2, router="hash"))
    assert f"{c.total:,}" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="top_k must be in 1..num_experts"):
        main(["params", "--moe.top_k", "9"])
    with pytest.raises(SystemExit, match="valid --moe fields: d_model, d_ff"):
        main(["params", "--moe.bogus", "1"])


def run_cli(*args, check=True):
    return subprocess.run([sys.executable, "-m", "moekit", *args], capture_output=True, text=True, check=check)


def test_train_and_generate_end_to_end_in_a_subprocess(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--preset", "tiny", "--out", str(out), "--max-steps", "6", "--no-progress",
                "--model.num_experts", "8", "--train.lr", "2e-3", "--data.max_chars", "50000")
    assert "done: 6 steps" in r.stdout and "moekit generate --model" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["moe"]["num_experts"] == 8 and saved["train"]["lr"] == 2e-3
    g = run_cli("generate", "--checkpoint", str(out), "--prompt", "import ", "--max-new-tokens", "20", "--seed", "1")
    assert g.stdout.startswith("import ") and len(g.stdout.encode()) >= len("import ") + 1
    # to Hugging Face and back: the same text, greedy, from either directory
    c = run_cli("convert", str(out), str(tmp_path / "hf"))
    assert "wrote a mixtral Hugging Face directory" in c.stdout
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    greedy = ("--prompt", "def f(", "--max-new-tokens", "12", "--temperature", "0")
    a = run_cli("generate", "--model", str(out), *greedy)
    b = run_cli("generate", "--model", str(tmp_path / "hf"), *greedy, "--stats")
    assert a.stdout == b.stdout and a.stdout.startswith("def f(")
    assert "prefill 6 tokens" in b.stderr and "decode 11 steps" in b.stderr and "peak memory" in b.stderr
    assert "cpu kernels" in b.stderr
    exists = run_cli("convert", str(out), str(tmp_path / "hf"), check=False)
    assert exists.returncode != 0 and "not empty" in exists.stderr
    again = run_cli("train", "--preset", "tiny", "--out", str(out), "--max-steps", "6", check=False)
    assert again.returncode != 0 and "already holds a run" in again.stderr
    # resuming may extend the run but not change the model
    bad = run_cli("train", "--resume", str(out), "--model.d_model", "32", check=False)
    assert bad.returncode != 0 and "cannot change ['model.d_model'] when resuming" in bad.stderr
    more = run_cli("train", "--resume", str(out), "--max-steps", "8", "--no-progress")
    assert "resumed from" in more.stdout and "done: 8 steps" in more.stdout


def test_dense_flag_trains_the_baseline(tmp_path):
    from moekit.cli import build_parser, build_run_config, split_overrides

    rest, overrides = split_overrides(["train", "--dense", "--preset", "tiny", "--train.seed", "3"])
    config = build_run_config(build_parser().parse_args(rest), overrides)
    assert config.model.dense and config.train.seed == 3


def test_config_errors_name_the_field_and_the_allowed_values(tmp_path, capsys):
    cases = [
        (["--model.bogus", "1"], "unknown field model.bogus; valid model fields are .*'num_experts'"),
        (["--train.lr", "fast"], "train.lr expects a float, got 'fast'"),
        (["--model.router", "magic"], "router must be one of"),
        (["--train.seq_len", "999"], r"train.seq_len \(999\) must be <= model.max_seq_len \(64\)"),
        (["--optim.lr", "1"], "unrecognized arguments: --optim.lr"),
        (["--data", str(tmp_path / "missing")], "does not exist"),
        (["--model.moe.top_k", "9"], "top_k must be in 1..num_experts"),
    ]
    for extra, message in cases:
        with pytest.raises(SystemExit) as exc:
            main(["train", "--preset", "tiny", "--out", str(tmp_path / "x"), *extra])
        assert exc.value.code != 0
        text = f"{exc.value.code} {capsys.readouterr().err}"  # SystemExit(message), or argparse on stderr
        assert re.search(message, text), (message, text)


def test_toml_config_file(tmp_path):
    from moekit.cli import build_parser, build_run_config, split_overrides

    path = tmp_path / "run.toml"
    path.write_text('[model]\nn_layers = 3\ntie_embeddings = true\n[model.moe]\nrouter = "sigmoid_bias"\n'
                    "num_experts = 16\n[train]\nlr = 1e-3\ntime_budget = 60\n")
    rest, overrides = split_overrides(["train", "--preset", "tiny", "--config", str(path), "--train.lr", "5e-4"])
    config = build_run_config(build_parser().parse_args(rest), overrides)
    assert config.model.n_layers == 3 and config.model.tie_embeddings
    assert config.model.moe.router == "sigmoid_bias" and config.model.moe.num_experts == 16
    assert config.train.lr == 5e-4 and config.train.time_budget == 60.0  # the command line wins
    path.write_text("[modle]\nx = 1\n")
    with pytest.raises(SystemExit, match=r"unknown section\(s\) \['modle'\]"):
        main(["train", "--preset", "tiny", "--config", str(path)])
    path.write_text("[model\n")
    with pytest.raises(SystemExit, match="not valid TOML"):
        main(["train", "--preset", "tiny", "--config", str(path)])


def test_params_of_the_mixtral_preset(capsys):
    assert main(["params", "--preset", "mixtral-8x7b"]) == 0
    text = capsys.readouterr().out
    assert "46,702,792,704  (46.7B)" in text and "12,879,925,248  (12.9B)" in text


def test_streamed_text_equals_the_whole_decode_at_bounded_cost(capsys):
    """The CLI's stream prints exactly the decoded text (multi-byte characters split across
    tokens included), and each token decodes a window of bounded length."""
    from moekit.cli import _Stream
    from moekit.data import load_tokenizer

    tok = load_tokenizer("byte", None)
    ids = tok.encode("naïve café — 東京 " * 40)
    seen = []

    class Counting:
        def decode(self, part):
            seen.append(len(part))
            return tok.decode(part)

    stream = _Stream(Counting(), "P:")
    for i in ids:
        stream([i])
    stream.finish()
    assert capsys.readouterr().out == "P:" + tok.decode(ids) + "\n"
    assert max(seen) <= _Stream.CONTEXT + 4  # a UTF-8 character is at most 4 bytes: never the whole text
