"""The command line: thin wrappers over library functions."""

import subprocess
import sys

import pytest

from moekit.cli import main
from moekit.layers.moe import count_params
from moekit import MoEConfig


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
