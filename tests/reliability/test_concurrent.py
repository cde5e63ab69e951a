"""One writer per run directory: a second trainer is refused with the holder named, a stale
lock (its process gone) is taken over, and a killed run's temporary folders are cleaned."""

import json
import subprocess
import sys

import pytest

from moekit.checkpoint import LOCK_FILE, RunLock
from moekit.training.loop import Trainer
from tests.reliability.conftest import tiny_config


def test_a_second_trainer_on_the_same_folder_is_refused(tmp_path, corpus):
    import dataclasses
    import os

    config = tiny_config(max_steps=2)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(corpus)))
    first = Trainer(config, tmp_path / "run", log=lambda _: None)
    try:
        with pytest.raises(ValueError, match=f"in use by process {os.getpid()} on "):
            Trainer(config, tmp_path / "run", resume=True, log=lambda _: None)
        assert (tmp_path / "run" / LOCK_FILE).is_file()  # the refusal did not take the first one's lock
    finally:
        first.release()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_two_cli_trainers_at_once_leave_one_loadable_run(tmp_path, corpus):
    cmd = [sys.executable, "-m", "moekit", "train", "--preset", "tiny", "--data", str(corpus), "--out",
           str(tmp_path / "run"), "--max-steps", "30", "--train.progress", "false"]
    a = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    b = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = [(p.wait(timeout=300), p.stderr.read()) for p in (a, b)]
    codes = sorted(code for code, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results  # exactly one trained
    refused = next(err for code, err in results if code != 0)
    assert "in use by process" in refused or "already holds a run" in refused, refused
    assert "Traceback" not in refused
    from moekit.checkpoint import load_trained

    model, _, config = load_trained(tmp_path / "run")
    assert config.train.max_steps == 30
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # one writer's metrics, no duplicates


def test_a_stale_lock_is_taken_over_and_a_live_foreign_one_is_not(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    (run / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    lock = RunLock(run).acquire()  # the process that held it is gone
    assert json.loads((run / LOCK_FILE).read_text())["pid"] != int(dead.stdout)
    lock.release()
    (run / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "another-host"}))
    with pytest.raises(ValueError, match="in use by process 1 on another-host"):
        RunLock(run).acquire()


def test_leftover_temporary_checkpoints_are_cleaned_at_the_next_start(run_dir):
    import dataclasses

    from moekit.checkpoint import load_config
    from moekit.training import train

    (run_dir / ".step_0000008.abc.tmp").mkdir()
    (run_dir / ".step_0000008.abc.tmp" / "model.safetensors").write_bytes(b"half")
    (run_dir / ".latest.xyz.tmp").write_text("step_00")
    config = load_config(run_dir)
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=7))
    train(config, run_dir, resume=True, log=lambda _: None)
    assert not list(run_dir.glob(".*.tmp"))


def test_a_lock_caught_between_its_creation_and_its_contents_names_its_writer(tmp_path):
    """A writer creates the lock, then writes its pid: a second writer reading in between
    waits for the contents and names the holder; a lock that stays empty is an unknown writer."""
    import os
    import threading

    lock = tmp_path / LOCK_FILE
    lock.touch()
    writer = threading.Timer(0.1, lambda: lock.write_text(json.dumps({"pid": os.getpid(), "host": "elsewhere"})))
    writer.start()
    with pytest.raises(ValueError, match=f"in use by process {os.getpid()} on elsewhere"):
        RunLock(tmp_path).acquire()
    writer.join()
    lock.write_text("")
    with pytest.raises(ValueError, match="in use by an unknown writer"):
        RunLock(tmp_path).acquire()
    assert lock.is_file()  # the refusal leaves the other writer's lock alone
