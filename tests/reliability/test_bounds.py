"""Every size is bounded before allocating: absurd values are refused at parse time with the
allowed range; sizes within range that cannot fit are refused with the estimate and the
machine's memory, before anything is allocated or written."""

import json
import time

import pytest

from moekit.budget import available_bytes
from moekit.config import ModelConfig, MoEConfig, RunConfig
from tests.reliability.conftest import cli


@pytest.mark.parametrize("cls, fields, message", [
    (ModelConfig, {"n_layers": 10_000_000}, "n_layers must be in 1..4,096"),
    (ModelConfig, {"max_seq_len": 10**11}, "max_seq_len must be in 1..4,194,304"),
    (ModelConfig, {"vocab_size": 2**40}, "vocab_size must be in"),
    (MoEConfig, {"d_model": 8, "d_ff": 8, "num_experts": 100_000}, "num_experts must be in 1..16,384"),
])
def test_absurd_sizes_are_refused_at_once(cls, fields, message):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        cls(**fields)
    assert time.perf_counter() - start < 1.0


def test_a_hugging_face_config_claiming_huge_sizes_is_refused(hf_dir):
    from moekit.interop import load_hf

    config = json.loads((hf_dir / "config.json").read_text())
    for fields, message in (({"num_hidden_layers": 10_000_000}, "n_layers must be in"),
                            ({"max_position_embeddings": 10**11}, "max_seq_len must be in")):
        (hf_dir / "config.json").write_text(json.dumps({**config, **fields}))
        with pytest.raises(ValueError, match=message):
            load_hf(hf_dir)


def test_the_cli_refuses_a_huge_expert_count_in_one_line(tmp_path, capsys, corpus):
    code, err = cli(capsys, "train", "--preset", "tiny", "--data", corpus, "--out", tmp_path / "run",
                    "--model.num_experts", "100000")
    assert code != 0 and len(err) == 1 and "num_experts must be in 1..16,384" in err[0]
    assert not (tmp_path / "run").exists()


def test_a_model_that_cannot_fit_is_refused_before_any_write(tmp_path, capsys, corpus):
    free = available_bytes()
    assert free is not None
    # 4 layers of 16,384 experts of width 65,536 at d_model 4096: far beyond any memory
    code, err = cli(capsys, "train", "--preset", "tiny", "--data", corpus, "--out", tmp_path / "run",
                    "--model.d_model", "4096", "--model.n_heads", "32", "--model.num_experts", "16384",
                    "--model.d_ff", "65536", "--model.top_k", "2")
    assert code != 0 and len(err) == 1 and "out of memory" in err[0] and "GB available" in err[0], err
    assert not (tmp_path / "run").exists()


def test_a_huge_batch_is_refused_with_the_estimate(tmp_path, capsys, corpus):
    code, err = cli(capsys, "train", "--preset", "tiny", "--data", corpus, "--out", tmp_path / "run",
                    "--train.batch_size", "1000000")
    assert code != 0 and len(err) == 1 and "needs about" in err[0], err


def test_generation_buffers_are_estimated_first(run_dir):
    from moekit.checkpoint import load_trained
    from moekit.inference import generate_batch

    model, _, _ = load_trained(run_dir)
    with pytest.raises(MemoryError, match="generating 1,000,000,000,000 tokens.*needs about"):
        generate_batch(model, [[1, 2, 3]], 10**12)
    with pytest.raises(ValueError, match="max_new_tokens must be an int"):
        generate_batch(model, [[1, 2, 3]], 2.5)


@pytest.mark.parametrize("field, value", [("temperature", "nan"), ("temperature", "inf"), ("top_p", "nan"),
                                          ("temperature", "-1"), ("top_p", "1.5"), ("top_k", "0")])
def test_generation_arguments_are_checked_before_any_output(run_dir, capsys, field, value):
    code, err = cli(capsys, "generate", "--model", run_dir, "--prompt", "def ", f"--{field.replace('_', '-')}", value)
    out = capsys.readouterr().out
    assert code != 0 and len(err) == 1 and field in err[0], err
    assert out == ""  # nothing printed before the refusal


def test_run_config_dicts_refuse_only_with_value_errors():
    with pytest.raises(ValueError, match="unknown"):
        RunConfig.from_dict({"model": {"n_layer": 3}})
