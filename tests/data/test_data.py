"""Tokenizers, corpora, splits and batches."""

import numpy as np
import pytest
import torch

from moekit.data import (
    BPETokenizer,
    ByteTokenizer,
    TokenSplits,
    eval_batches,
    load_text,
    stdlib_files,
    train_batch,
)


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    text = "def f(x):\n    return 'héllo ✓'\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_bpe_tokenizer_trains_saves_and_loads(tmp_path):
    text = "the quick brown fox jumps over the lazy dog\n" * 200 + "def function(argument):\n    pass\n" * 200
    tok = BPETokenizer.train(text, vocab_size=300)
    assert tok.vocab_size == 300
    ids = tok.encode(text)
    assert len(ids) < len(text.encode()) / 2  # merges compress repeated text
    assert tok.decode(ids) == text
    tok.save(tmp_path)
    again = BPETokenizer.load(tmp_path)
    assert np.array_equal(again.encode(text), ids)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(ValueError, match="cannot read the BPE tokenizer"):
        BPETokenizer.load(tmp_path)


def test_default_corpus_is_the_stdlib_and_deterministic():
    files = stdlib_files()
    assert len(files) > 500 and all(f.suffix == ".py" for f in files)
    assert not any("site-packages" in f.parts for f in files)
    a = load_text(max_chars=100_000)
    assert len(a) == 100_000 and a == load_text(max_chars=100_000)


def test_folder_corpus_filters_suffixes_and_names_a_bad_file(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("beta\n")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    assert load_text(str(tmp_path)) == "alpha\n\n\nbeta\n"
    assert load_text(str(tmp_path / "a.txt")) == "alpha\n"
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"bad\.txt is not UTF-8"):
        load_text(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no text files"):
        load_text(str(tmp_path), suffixes=".rst")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        load_text(str(tmp_path / "empty"))


def test_validation_split_is_the_last_fraction():
    tokens = np.arange(1000, dtype=np.int32)
    s = TokenSplits.from_tokens(tokens, 0.1, seq_len=16)
    assert s.train.tolist() == list(range(900)) and s.val.tolist() == list(range(900, 1000))
    with pytest.raises(ValueError, match="too few"):
        TokenSplits.from_tokens(tokens[:100], 0.1, seq_len=16)


def test_batches_are_deterministic_per_step_and_shifted_by_one():
    stream = torch.arange(10_000)
    x, y = train_batch(stream, 4, 32, seed=0, step=7)
    assert x.shape == y.shape == (4, 32) and x.dtype == torch.long
    assert torch.equal(y, x + 1)  # targets are the next tokens
    x2, _ = train_batch(stream, 4, 32, seed=0, step=7)
    assert torch.equal(x, x2)
    assert not torch.equal(x, train_batch(stream, 4, 32, seed=0, step=8)[0])
    assert not torch.equal(x, train_batch(stream, 4, 32, seed=1, step=7)[0])
    assert not torch.equal(x, train_batch(stream, 4, 32, seed=0, step=7, micro=1)[0])
    evals = list(eval_batches(stream, 3, 2, 32))
    assert len(evals) == 3 and all(torch.equal(a[0], b[0]) for a, b in zip(evals, eval_batches(stream, 3, 2, 32)))
    assert int(evals[-1][1].max()) == 9_999  # the windows reach the end of the split
