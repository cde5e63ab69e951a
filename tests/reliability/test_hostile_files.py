"""Everything loaded is checked against what will use it, and paths read from files never
leave their folder: crafted indexes, stray shards, a ``latest`` that points away, optimizer
state from another model, malformed training state, configs asking for unsupported math."""

import json
import shutil
import warnings

import pytest
import torch

from moekit.checkpoint import STATE_FILE, latest_checkpoint, load_trained
from moekit.interop import load_hf
from moekit.interop.safetensors_io import INDEX_FILE, SafetensorsDir
from tests.reliability.conftest import same_logits

pytestmark = pytest.mark.filterwarnings("error::UserWarning")


def shard(hf_dir, index):
    (hf_dir / INDEX_FILE).write_text(json.dumps(index))


@pytest.mark.parametrize("name", ["../other/model.safetensors", "/etc/passwd", "../../etc/passwd", "sub/x.safetensors",
                                  "..", "model.bin"])
def test_an_index_cannot_name_a_file_outside_its_folder(hf_dir, tmp_path, name):
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(hf_dir / "model.safetensors", other / "model.safetensors")
    keys = list(SafetensorsDir(hf_dir))
    shard(hf_dir, {"weight_map": dict.fromkeys(keys, name)})
    with pytest.raises(ValueError, match="a shard must be a .safetensors file in the index's own folder"):
        SafetensorsDir(hf_dir)


@pytest.mark.parametrize("index", [[1, 2], {"weight_map": ["a"]}, {"weight_map": {"a": 3}}, {"nothing": {}}])
def test_an_index_of_the_wrong_shape_is_named(hf_dir, index):
    shard(hf_dir, index)
    with pytest.raises(ValueError, match="needs a \"weight_map\" object"):
        SafetensorsDir(hf_dir)
    (hf_dir / INDEX_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        SafetensorsDir(hf_dir)


def test_a_stray_shard_is_reported_and_not_merged(hf_dir):
    model = load_hf(hf_dir)
    keys = list(SafetensorsDir(hf_dir))
    shard(hf_dir, {"weight_map": dict.fromkeys(keys, "model.safetensors")})
    from safetensors.torch import save_file

    save_file({"model.embed_tokens.weight": torch.zeros(3)}, str(hf_dir / "zz-stray.safetensors"))
    with pytest.warns(UserWarning, match=r"\['zz-stray.safetensors'\] not named by"):
        again = load_hf(hf_dir)
    assert same_logits(model, again)


def test_several_shards_without_an_index_are_refused(hf_dir):
    shutil.copy(hf_dir / "model.safetensors", hf_dir / "copy.safetensors")
    with pytest.raises(ValueError, match="holds 2 .safetensors files"):
        SafetensorsDir(hf_dir)


@pytest.mark.parametrize("pointer", ["../elsewhere", "/etc", "step_0000004/../../x", "step_12"])
def test_latest_cannot_point_outside_the_run(run_dir, pointer):
    (run_dir / "latest").write_text(pointer)
    with pytest.raises(ValueError, match="must name a step_NNNNNNN folder"):
        latest_checkpoint(run_dir)


def _resume(run_dir):
    import dataclasses

    from moekit.checkpoint import load_config
    from moekit.training import train

    config = load_config(run_dir)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=8))
    return train(config, run_dir, resume=True, log=lambda _: None)


def _edit_state(run_dir, edit):
    where = latest_checkpoint(run_dir)
    state = torch.load(where / STATE_FILE, weights_only=True)
    edit(state)
    torch.save(state, where / STATE_FILE)


def test_optimizer_state_of_another_shape_is_refused_before_use(run_dir):
    metrics = (run_dir / "metrics.jsonl").read_text()

    def other_shapes(state):
        named = state["optimizer"]["named"]
        name = next(n for n in named if n.endswith("experts.w1"))
        named[name]["exp_avg"] = torch.zeros(3, 5, 7)

    _edit_state(run_dir, other_shapes)
    with pytest.raises(ValueError, match=r"experts.w1.exp_avg has shape \[3, 5, 7\].*the model's parameter has \["):
        _resume(run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing lost


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("rng"), r"it lacks \['rng'\]"),
    (lambda s: s.update(step="abc"), "step must be an int >= 0"),
    (lambda s: s.update(train_seconds=float("nan")), "train_seconds must be a finite number"),
    (lambda s: s.update(rng={"cpu": torch.zeros(3)}), "rng must map 'cpu'"),
    (lambda s: s["optimizer"]["named"].pop(next(iter(s["optimizer"]["named"]))), "it belongs to another model"),
    (lambda s: s.update(optimizer=[1, 2]), "not a {parameter name: state} mapping"),
], ids=["missing key", "malformed step", "nan seconds", "bad rng", "missing parameter", "not a mapping"])
def test_a_malformed_training_state_is_named_and_loses_nothing(run_dir, edit, message):
    metrics = (run_dir / "metrics.jsonl").read_text()
    latest = (run_dir / "latest").read_text()
    _edit_state(run_dir, edit)
    with pytest.raises(ValueError, match=message):
        _resume(run_dir)
    assert (run_dir / "metrics.jsonl").read_text() == metrics
    assert (run_dir / "latest").read_text() == latest


def test_a_resumed_run_still_loads(run_dir):
    _resume(run_dir)
    model, _, _ = load_trained(run_dir)
    assert model.config.n_layers > 0


@pytest.mark.parametrize("fields, message", [
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
      "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_type 'yarn' is not supported"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear' is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1"),
    ({"hidden_act": "gelu", "rope_scaling": {"rope_type": "dynamic"}}, "rope_type 'dynamic'.*; hidden_act 'gelu'"),
])
def test_config_fields_that_change_the_math_are_refused(hf_dir, fields, message):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, **fields}))
    with pytest.raises(ValueError, match=message):
        load_hf(hf_dir)


def test_a_checkpoint_holding_inf_weights_is_never_written(run_dir, monkeypatch):
    """The NaN guard: a checkpoint is good only if its weights are finite."""
    from moekit.training import TrainingDiverged
    from moekit.training.loop import Trainer

    real = Trainer.save

    def poisoned(self, at_step):  # weights that went bad without the loss showing it yet
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("inf"))
        return real(self, at_step)

    monkeypatch.setattr(Trainer, "save", poisoned)
    latest = (run_dir / "latest").read_text()
    with pytest.raises(TrainingDiverged, match=f"weights .* became nan .*the last good checkpoint is .*{latest.strip()}"):
        _resume(run_dir)
    assert (run_dir / "latest").read_text() == latest
    with warnings.catch_warnings():
        model, _, _ = load_trained(run_dir)
    assert all(torch.isfinite(p).all() for p in model.parameters())
