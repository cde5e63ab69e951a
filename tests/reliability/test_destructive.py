"""Nothing destructive without proof of safety: a conversion never replaces its source, the
current directory, a parent, or a folder moekit did not write; replacement is write-new-then-
swap; --overwrite clears the old run's checkpoints."""

import pytest

from moekit.checkpoint import MARKER_FILE, load_trained
from moekit.interop import convert
from tests.reliability.conftest import cli, snapshot, tiny_config


def test_convert_into_its_own_source_is_refused_and_the_source_is_intact(run_dir, capsys):
    before = snapshot(run_dir)
    code, err = cli(capsys, "convert", run_dir, run_dir, "--overwrite")
    assert code != 0 and len(err) == 1 and "it is the source" in err[0]
    assert snapshot(run_dir) == before


def test_convert_into_the_current_directory_or_a_parent_is_refused(hf_dir, tmp_path, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in (".", "..", str(tmp_path)):
        code, err = cli(capsys, "convert", hf_dir, target, "--overwrite")
        assert code != 0 and len(err) == 1, err
        assert "current directory" in err[0] or "contains the source" in err[0], err
    assert (work / "notes.txt").read_text() == "mine"
    assert (hf_dir / "config.json").is_file()


def test_convert_into_or_beside_the_source_is_refused(run_dir, capsys):
    code, err = cli(capsys, "convert", run_dir, run_dir / "inside", "--overwrite")
    assert code != 0 and "inside the source" in err[0]
    assert not (run_dir / "inside").exists()


def test_convert_onto_a_file_or_a_foreign_folder_is_refused(run_dir, tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep")
    code, err = cli(capsys, "convert", run_dir, target, "--overwrite")
    assert code != 0 and len(err) == 1 and "is a file" in err[0]
    assert target.read_text() == "keep"
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "a.jpg").write_bytes(b"\xff\xd8")
    code, err = cli(capsys, "convert", run_dir, foreign, "--overwrite")
    assert code != 0 and "not a folder moekit wrote" in err[0]
    assert (foreign / "a.jpg").read_bytes() == b"\xff\xd8"


def test_a_moekit_export_is_replaced_whole(run_dir, hf_dir, tmp_path):
    (hf_dir / "stale.txt").write_text("from before")
    convert(run_dir, hf_dir, overwrite=True)
    assert not (hf_dir / "stale.txt").exists() and (hf_dir / MARKER_FILE).is_file()
    back = tmp_path / "back"
    convert(hf_dir, back)
    (back / "extra").write_text("x")
    convert(hf_dir, back, overwrite=True)  # a moekit run folder: replaced by swapping
    assert not (back / "extra").exists() and (back / MARKER_FILE).is_file()
    load_trained(back)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # nothing left beside


def test_train_onto_a_file_is_one_line(tmp_path, capsys, corpus):
    target = tmp_path / "out.txt"
    target.write_text("keep")
    code, err = cli(capsys, "train", "--preset", "tiny", "--data", corpus, "--out", target, "--max-steps", "1")
    assert code != 0 and len(err) == 1 and "is an existing file" in err[0]
    assert target.read_text() == "keep"


def test_overwrite_clears_the_old_run_s_checkpoints(run_dir, corpus):
    import dataclasses

    from moekit.training import train

    config = tiny_config(max_steps=2, checkpoint_every=1)
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, path=str(corpus)))
    with pytest.raises(ValueError, match="already holds a run"):
        train(config, run_dir, log=lambda _: None)
    train(config, run_dir, log=lambda _: None, overwrite=True)
    assert sorted(p.name for p in run_dir.glob("step_*")) == ["step_0000001", "step_0000002"]
    assert (run_dir / "latest").read_text().strip() == "step_0000002"


def test_overwrite_refuses_a_folder_moekit_did_not_write(tmp_path, monkeypatch):
    from moekit.checkpoint import clear_run

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "step_1").mkdir()  # looks like a run, is not one
    with pytest.raises(ValueError, match="not a folder moekit wrote"):
        clear_run(foreign)
    assert (foreign / "step_1").is_dir()
    monkeypatch.chdir(foreign)
    with pytest.raises(ValueError, match="current directory"):
        clear_run(".")
