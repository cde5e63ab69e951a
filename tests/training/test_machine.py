"""The warnings training gives about the machine: bfloat16 without bfloat16 arithmetic, more
threads than cores, a wait policy that spins; said once, and the run goes on. And the wait
policy moekit chooses (moekit/_threads.py)."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from moekit import _threads
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


@pytest.mark.parametrize("setting, warned", [
    ({"OMP_WAIT_POLICY": "ACTIVE"}, "OMP_WAIT_POLICY=ACTIVE"),
    ({"GOMP_SPINCOUNT": "infinite"}, "GOMP_SPINCOUNT=infinite"),
    ({"GOMP_SPINCOUNT": "1000000"}, "GOMP_SPINCOUNT=1000000"),
    ({"OMP_WAIT_POLICY": "passive"}, None),
    ({"GOMP_SPINCOUNT": "10000"}, None),
    ({}, None),
])
def test_a_spinning_wait_policy_of_the_users_warns(setting, warned):
    got = machine.machine_warnings(CPU, "float32", threads=2, cores=2, flags=set(), environ=setting)
    if warned is None:
        assert got == []
    else:
        (message,) = got
        assert message.startswith(warned) and "spin" in message and f"{_threads.SPIN_COUNT} rounds" in message


def test_the_wait_policy_is_chosen_before_torch_loads_and_never_over_the_users():
    env = {}
    assert _threads.choose_wait_policy(env, modules={}) and env == {"GOMP_SPINCOUNT": _threads.SPIN_COUNT}
    for users in ({"OMP_WAIT_POLICY": "active"}, {"GOMP_SPINCOUNT": "5"}):
        env = dict(users)
        assert not _threads.choose_wait_policy(env, modules={}) and env == users
    env = {}
    assert not _threads.choose_wait_policy(env, modules={"torch": torch}) and env == {}  # libgomp read it already
    # a fresh process: importing moekit first sets it for torch's libgomp; a user's setting stands
    code = "import os, moekit, torch; print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'))"
    clean = {k: v for k, v in os.environ.items() if k not in _threads.USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [_threads.SPIN_COUNT, "None"]
    out = subprocess.run([sys.executable, "-c", code], env=dict(clean, OMP_WAIT_POLICY="passive"),
                         capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "passive"]


def test_training_says_it_once_and_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(machine, "native_bf16", lambda flags=None: False)
    lines = []
    c = config(max_steps=2, checkpoint_every=2, eval_every=2)
    c = dataclasses.replace(c, train=dataclasses.replace(c.train, dtype="bfloat16"))
    summary = train(c, tmp_path, log=lines.append)
    assert summary["steps"] == 2
    warned = [ln for ln in lines if "without bfloat16 arithmetic" in ln]
    assert len(warned) == 1 and warned[0].startswith("warning: ")
