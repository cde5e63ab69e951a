"""The examples run and show what they claim."""

import importlib.util
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_classic_moe_beats_single_expert_of_equal_size_on_digits():
    pytest.importorskip("sklearn")
    scores = load("classic_moe_digits").run(epochs=300, hidden=4, num_experts=4, seed=0)
    single = scores["single expert"]
    moe = scores["MoE, combine then loss"]
    mixture = scores["MoE, mixture loss (Jacobs 1991)"]
    assert 0.5 < single < 0.8, single  # a 4-unit MLP is too small for 10 digits
    assert moe > single + 0.15, (moe, single)
    assert mixture > single + 0.1, (mixture, single)
