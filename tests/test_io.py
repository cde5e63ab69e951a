"""moekit.io: a crash at any moment leaves the old version or the new one."""

import os
import stat

import pytest

from moekit import io


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.json"
    io.atomic_write_bytes(path, b"old")

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(io.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        io.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_files_get_the_umask_s_mode_and_the_umask_is_read_not_changed(tmp_path):
    mask = os.umask(0o027)
    try:
        assert io.process_umask() == 0o027
        io.atomic_write_bytes(tmp_path / "f", b"x")
        assert stat.S_IMODE((tmp_path / "f").stat().st_mode) == 0o640
        assert os.umask(0o027) == 0o027  # still what it was
    finally:
        os.umask(mask)


def test_a_staged_folder_replaces_the_old_one_only_when_complete(tmp_path):
    final = tmp_path / "model"
    with io.staged_dir(final) as tmp:
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    with pytest.raises(RuntimeError, match="half-way"):
        with io.staged_dir(final) as tmp:
            (tmp / "a").write_text("2")
            raise RuntimeError("half-way")
    assert (final / "a").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["model"]
    with io.staged_dir(final) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # swapped, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # nothing left beside it
