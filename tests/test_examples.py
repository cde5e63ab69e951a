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
    """Over three seeds: a 4-unit MLP is too small for 10 digits, the MoE of four of them
    (combine, then one loss) beats it at every seed; the mixture objective trains, but with
    hard top-1 routing where it ends is seed-sensitive (measured 0.54-0.89), so it is held to
    learning only."""
    pytest.importorskip("sklearn")
    runs = [load("classic_moe_digits").run(epochs=300, hidden=4, num_experts=4, seed=s) for s in range(3)]
    single = [r["single expert"] for r in runs]
    moe = [r["MoE, combine then loss"] for r in runs]
    mixture = [r["MoE, mixture loss (Jacobs 1991)"] for r in runs]
    assert all(0.5 < s < 0.95 for s in single), single
    assert all(m > s for m, s in zip(moe, single)), (moe, single)
    assert sum(moe) / 3 > sum(single) / 3 + 0.1, (moe, single)
    assert all(m > 0.45 for m in mixture), mixture  # chance is 0.1


def test_the_readme_layer_example_runs():
    """The ten lines the README opens with run as written."""
    import re

    readme = (EXAMPLES.parent / "README.md").read_text()
    code = re.search(r"## The layer in ten lines\n\n```python\n(.*?)```", readme, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].output.shape == (4, 128, 512)
    assert int(scope["out"].stats.tokens_per_expert.sum()) == 4 * 128 * 2
