"""The family table: every supported model_type has one adapter, the CLI offers exactly
those, and a family defined outside moekit (one class, registered) reads and writes models
with nothing else changed."""

from typing import Any

import pytest
import torch

from moekit.cli import build_parser
from moekit.config import ModelConfig, MoEConfig
from moekit.interop import FAMILIES, load_hf, register_family, save_hf
from moekit.interop.families import Family
from moekit.interop.families.mixtral import Mixtral
from moekit.models import Transformer


def test_the_table_holds_the_seven_families_and_the_cli_offers_them():
    assert sorted(FAMILIES) == ["llama", "mistral", "mixtral", "olmoe", "qwen2", "qwen2_moe", "qwen3_moe"]
    assert sorted(name for name, f in FAMILIES.items() if f.dense) == ["llama", "mistral", "qwen2"]
    assert all(isinstance(f, Family) and f.model_type == name for name, f in FAMILIES.items())
    convert = build_parser()._subparsers._group_actions[0].choices["convert"]
    (model_type,) = [a for a in convert._actions if a.dest == "model_type"]
    assert model_type.choices == sorted(FAMILIES)


class ToyMixtral(Mixtral):
    """Mixtral's layout under another name, with one field of its own in config.json."""

    model_type = "toy_mixtral"
    architecture = "ToyMixtralForCausalLM"
    choose_order = 10_000  # never chosen unless asked for

    def write_config(self, config: ModelConfig, hf: dict[str, Any]) -> None:
        super().write_config(config, hf)
        hf["toy_experts"] = config.moe.num_experts

    def read_config(self, hf, model, moe) -> None:
        super().read_config(hf, model, moe)
        if hf["toy_experts"] != hf["num_local_experts"]:
            raise ValueError("toy_experts must equal num_local_experts")


@pytest.fixture
def toy_family():
    register_family(ToyMixtral)
    yield FAMILIES["toy_mixtral"]
    del FAMILIES["toy_mixtral"]


def test_a_family_defined_in_one_class_round_trips(toy_family, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32,
                         moe=MoEConfig(d_model=32, d_ff=48, num_experts=4, top_k=2))
    model = Transformer(config).eval()
    assert save_hf(model, tmp_path / "toy", model_type="toy_mixtral") == "toy_mixtral"
    import json

    written = json.loads((tmp_path / "toy" / "config.json").read_text())
    assert written["model_type"] == "toy_mixtral" and written["toy_experts"] == 4
    back = load_hf(tmp_path / "toy")
    tokens = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(tokens).logits, model(tokens).logits, atol=1e-6, rtol=1e-6)
    written["toy_experts"] = 3
    (tmp_path / "toy" / "config.json").write_text(json.dumps(written))
    with pytest.raises(ValueError, match="toy_experts must equal num_local_experts"):
        load_hf(tmp_path / "toy")
