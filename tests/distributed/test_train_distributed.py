"""The language model trained with 2 processes (ep=2) against one process on the same global
batch, and checkpoints moved between layouts (2 -> 1 and 1 -> 2 processes)."""

import dataclasses
import json
import os
import shutil

import pytest

from moekit.config import ParallelConfig
from moekit.presets import tiny
from tests.distributed.test_expert_parallel import run_ranks

pytestmark = pytest.mark.distributed
STEPS = 6


def config(ep: int = 1):
    c = tiny()
    return dataclasses.replace(
        c, data=dataclasses.replace(c.data, max_chars=40_000),
        train=dataclasses.replace(c.train, max_steps=STEPS, log_every=1, checkpoint_every=2, keep_checkpoints=5,
                                  eval_every=3, eval_batches=2, progress=False),
        parallel=ParallelConfig(ep=ep))


def _train_rank(rank, world, out, ep, resume):
    from moekit.training import train

    os.environ["WORLD_SIZE"] = str(world)  # what torchrun sets
    train(config(ep), out, resume=resume, log=lambda _: None, distributed=True)


def losses(run):
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["train_loss"] for r in lines], [r["val_loss"] for r in lines if "val_loss" in r]


def rewind(run, step: int) -> None:
    """Make ``run`` look as if it had been killed right after checkpoint ``step``."""
    for later in run.glob("step_*"):
        if int(later.name.split("_")[1]) > step:
            shutil.rmtree(later)
    (run / "latest").write_text(f"step_{step:07d}\n")


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    from moekit.training import train

    out = tmp_path_factory.mktemp("single")
    train(config(), out, log=lambda _: None)
    return out


def test_two_processes_ep2_train_like_one(one_process, tmp_path):
    run_ranks(2, _train_rank, tmp_path, 2, False)
    (a_train, a_val), (b_train, b_val) = losses(one_process), losses(tmp_path)
    assert len(b_train) == len(a_train) == STEPS
    assert b_train == pytest.approx(a_train, rel=2e-4) and b_val == pytest.approx(a_val, rel=2e-4)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["parallel_ep"] == 2
    # the checkpoint holds every expert: it loads in one process for generation
    from moekit.checkpoint import load_trained

    model, _, _ = load_trained(tmp_path)
    assert model.blocks[0].ffn.experts.w1.shape[0] == 4


def test_resume_two_process_checkpoint_in_one_process_and_back(one_process, tmp_path):
    two = tmp_path / "two"
    run_ranks(2, _train_rank, two, 2, False)
    rewind(two, 2)
    from moekit.training import train

    train(config(), two, resume=True, log=lambda _: None)  # 2 processes -> 1
    assert losses(two)[0] == pytest.approx(losses(one_process)[0], rel=2e-4)
    one = tmp_path / "one"
    shutil.copytree(one_process, one)
    rewind(one, 4)
    run_ranks(2, _train_rank, one, 2, True)  # 1 process -> 2
    assert losses(one)[0] == pytest.approx(losses(one_process)[0], rel=2e-4)


def test_torchrun_launches_moekit_train(tmp_path):
    import subprocess
    import sys

    from tests.distributed.test_expert_parallel import _free_port

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "moekit", "train", "--preset", "tiny", "--parallel.ep", "2", "--out", str(out),
           "--max-steps", "3", "--no-progress", "--data.max_chars", "40000"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("summary:") == 1  # one process reports
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["processes"] == 2 and summary["parallel_ep"] == 2
    cmd[6] = str(_free_port())
    bad = subprocess.run([*cmd[:7], "-m", "moekit", "train", "--preset", "tiny", "--parallel.ep", "3",
                          "--out", str(tmp_path / "bad"), "--max-steps", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode != 0 and "parallel.ep must divide the world size 2" in bad.stderr
