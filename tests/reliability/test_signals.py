"""Ctrl-C and kill -9 during training: Ctrl-C prints one line naming where to resume from;
after either, resuming gives the losses of an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time

import pytest


def _cmd(corpus, out, steps):
    return [sys.executable, "-m", "moekit", "train", "--preset", "tiny", "--data", str(corpus), "--out", str(out),
            "--max-steps", str(steps), "--train.checkpoint_every", "2", "--train.log_every", "1",
            "--train.eval_every", "100", "--train.progress", "false"]


def _losses(run):
    return {r["step"]: r["train_loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("whole") / "run"
    subprocess.run(_cmd(corpus, out, 16), check=True, capture_output=True, timeout=300)
    return _losses(out)


def _interrupt_after_a_checkpoint(corpus, out, sig):
    proc = subprocess.Popen(_cmd(corpus, out, 16), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        latest = out / "latest"
        if latest.is_file() and latest.read_text().strip() >= "step_0000004":
            break
        time.sleep(0.05)
    proc.send_signal(sig)
    code = proc.wait(timeout=120)
    return code, proc.stderr.read()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill -9"])
def test_an_interrupted_run_resumes_to_the_same_losses(tmp_path, corpus, uninterrupted, sig):
    out = tmp_path / "run"
    code, err = _interrupt_after_a_checkpoint(corpus, out, sig)
    if sig == signal.SIGINT and code == 130:
        lines = [line for line in err.splitlines() if line.strip() and "moekit train" in line]
        assert len(lines) == 1 and f"moekit train --resume {out}" in lines[0], err
        assert "Traceback" not in err
    elif code == 0:
        pytest.skip("the run finished before the signal arrived")
    assert not (out / ".lock").exists() or sig == signal.SIGKILL  # Ctrl-C gives the lock back
    resume = [sys.executable, "-m", "moekit", "train", "--resume", str(out), "--max-steps", "16",
              "--train.progress", "false"]
    done = subprocess.run(resume, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]  # a stale lock from kill -9 is taken over
    got = _losses(out)
    assert sorted(got) == sorted(uninterrupted)
    for step, loss in uninterrupted.items():
        assert got[step] == pytest.approx(loss, abs=1e-6), step
