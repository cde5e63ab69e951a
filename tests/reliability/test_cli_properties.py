"""Property: any argument list either runs or exits with one line and a non-zero code; never
a traceback, never a changed file outside --out. And any config dict either builds or is a
ValueError."""

import os

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moekit.config import RunConfig
from tests.reliability.conftest import cli, snapshot

VALUES = st.sampled_from(["0", "-1", "1", "2", "3", "7", "1e9", "nan", "inf", "-inf", "true", "yes", "none", "[1, 2]",
                          "abc", "", "0.5", "topk", "switch", "gelu", "bfloat16", "cpu", "cuda", "1e-3", "4096",
                          "100000", "10000000"])
FIELDS = st.sampled_from(["model.num_experts", "model.top_k", "model.d_model", "model.n_layers", "model.n_heads",
                          "model.router", "model.expert", "model.dense_layers", "model.max_seq_len", "model.d_ff",
                          "model.capacity_factor", "model.router_jitter", "train.lr", "train.batch_size",
                          "train.seq_len", "train.dtype", "train.device", "train.grad_clip", "train.grad_accum",
                          "data.tokenizer", "data.val_fraction", "model.nonexistent", "train.warmup_steps"])
FLAGS = st.lists(st.sampled_from([[], ["--dense"], ["--preset", "nope"], ["--config", "."], ["--resume", "nowhere"],
                                  ["--max-steps", "0"], ["--max-steps", "x"], ["--time-budget", "nan"],
                                  ["--model.top_k"], ["--unknown-flag"]]), max_size=2)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(overrides=st.lists(st.tuples(FIELDS, VALUES), max_size=3), flags=FLAGS)
def test_train_arguments_run_or_fail_in_one_line(tmp_path_factory, capsys, overrides, flags):
    work = tmp_path_factory.mktemp("cli")
    (work / "corpus.txt").write_text("hello world, def f(x): return x\n" * 300)
    before = snapshot(work)
    argv = ["train", "--preset", "tiny", "--data", work / "corpus.txt", "--out", work / "out", "--max-steps", "1",
            "--train.eval_batches", "1", "--train.progress", "false"]
    for field, value in overrides:
        argv += [f"--{field}", value]
    for flag in flags:
        argv += flag
    cwd = os.getcwd()
    os.chdir(work)
    try:
        code, err = cli(capsys, *argv)
    finally:
        os.chdir(cwd)
    if code != 0:
        assert len(err) == 1 and "Traceback" not in err[0], err
    after = {k: v for k, v in snapshot(work).items() if not k.startswith("out/") and not k.startswith("out\\")}
    assert after == before  # nothing changed outside --out


@settings(max_examples=200, deadline=None)
@given(section=st.sampled_from(["model", "data", "train", "parallel", "bogus"]),
       field=st.sampled_from(["num_experts", "n_layers", "d_model", "lr", "batch_size", "path", "ep", "moe",
                              "dense_layers", "tokenizer", "max_steps"]),
       value=st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=True), st.text(max_size=5), st.none(),
                       st.booleans(), st.lists(st.integers(-2, 5), max_size=3), st.dictionaries(st.text(max_size=3),
                                                                                                 st.integers())))
def test_config_dicts_build_or_raise_value_error(section, field, value):
    try:
        RunConfig.from_dict({section: {field: value}})
    except ValueError:
        pass
