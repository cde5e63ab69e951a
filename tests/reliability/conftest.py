"""Shared pieces of the reliability suite: a tiny trained run, a tiny Hugging Face export,
and the CLI run in-process with its exit code and stderr."""

import dataclasses

import pytest
import torch

from moekit.cli import main
from moekit.presets import tiny
from moekit.training import train

TEXT = "def f(x):\n    return x + 1\n\nclass A:\n    pass\n" * 400


def tiny_config(**train_fields):
    c = tiny()
    fields = dict(max_steps=6, log_every=1, checkpoint_every=2, eval_every=3, eval_batches=1, progress=False)
    fields.update(train_fields)
    return dataclasses.replace(c, data=dataclasses.replace(c.data, max_chars=20_000),
                               train=dataclasses.replace(c.train, **fields))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture
def run_dir(tmp_path, corpus):
    """A run trained for 6 steps (checkpoints at 2, 4, 6)."""
    config = tiny_config()
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(corpus)))
    out = tmp_path / "run"
    train(config, out, log=lambda _: None)
    return out


@pytest.fixture
def hf_dir(run_dir, tmp_path):
    from moekit.interop import convert

    out = tmp_path / "hf"
    convert(run_dir, out)
    return out


def cli(capsys, *argv):
    """``moekit ARGV`` in this process: (exit code, stderr lines). A traceback fails the test
    by raising out of here."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=__import__("sys").stderr)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


def snapshot(folder):
    """Every file below ``folder`` with its bytes' hash."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def same_logits(a, b):
    tokens = torch.randint(0, a.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return torch.allclose(a(tokens).logits, b(tokens).logits, atol=1e-6)
