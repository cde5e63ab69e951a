"""The warnings training gives about the machine: bfloat16 without bfloat16 arithmetic, more
threads than cores; said once, and the run goes on."""

import dataclasses

import torch

from moekit.training import machine, train
from tests.training.test_train import config

CPU = torch.device("cpu")


def test_bf16_arithmetic_is_read_from_the_cpu_flags():
    assert machine.native_bf16({"avx2", "fma", "avx512f"}) is False
    assert machine.native_bf16({"avx512f", "avx512_bf16"}) is True
    assert machine.native_bf16({"amx_bf16"}) is True
    assert machine.native_bf16({"asimd", "bf16"}) is True  # Arm
    flags = machine.cpu_flags()
    assert flags is None or isinstance(flags, set) and flags  # Linux: this machine's own


def test_bfloat16_on_a_cpu_without_it_warns_and_float32_does_not():
    (message,) = machine.machine_warnings(CPU, "bfloat16", threads=2, cores=2, flags={"avx2", "fma"})
    assert "without bfloat16 arithmetic" in message and "train.dtype float32" in message
    assert machine.machine_warnings(CPU, "bfloat16", threads=2, cores=2, flags={"avx512_bf16"}) == []
    assert machine.machine_warnings(CPU, "float32", threads=2, cores=2, flags={"avx2"}) == []
    assert machine.machine_warnings(torch.device("cuda"), "bfloat16", threads=64, cores=2, flags=set()) == []


def test_more_threads_than_cores_warns_with_the_setting_to_change(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "8")
    (message,) = machine.machine_warnings(CPU, "float32", threads=8, cores=2, flags=set())
    assert "8 threads on 2 available cores" in message and "OMP_NUM_THREADS=8" in message
    assert "set OMP_NUM_THREADS=2" in message
    assert machine.machine_warnings(CPU, "float32", threads=2, cores=2, flags=set()) == []
    assert machine.machine_warnings(CPU, "float32", threads=1, cores=2, flags=set()) == []
    assert 1 <= machine.available_cores() <= (__import__("os").cpu_count() or 1)


def test_training_says_it_once_and_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "native_bf16", lambda flags=None: False)
    lines = []
    c = config(max_steps=2, checkpoint_every=2, eval_every=2)
    c = dataclasses.replace(c, train=dataclasses.replace(c.train, dtype="bfloat16"))
    summary = train(c, tmp_path, log=lines.append)
    assert summary["steps"] == 2
    warned = [ln for ln in lines if "without bfloat16 arithmetic" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: ")
