"""Atomic local writes (longkd/fileio.py): the old content or the whole new one, never a mix."""

from __future__ import annotations

import os

import pytest

from longkd.fileio import atomic_dir, atomic_file, write_bytes_atomic, write_text_atomic


def test_writes_replace_the_file_and_leave_no_temporary(tmp_path):
    data = os.urandom(int.from_bytes(os.urandom(2), "little") + 1)
    path = tmp_path / "blob.bin"
    path.write_bytes(b"old")
    write_bytes_atomic(path, data)
    assert path.read_bytes() == data
    write_text_atomic(tmp_path / "latest", "step-0000042\n")
    assert (tmp_path / "latest").read_text() == "step-0000042\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "latest"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"committed")
    with pytest.raises(RuntimeError, match="killed"), atomic_file(path, "wb") as f:
        f.write(b"half of the new")
        raise RuntimeError("killed")
    assert path.read_bytes() == b"committed"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_a_directory_appears_whole_and_replaces_an_older_one(tmp_path):
    final = tmp_path / "models" / "step-0000004"
    final.mkdir(parents=True)
    (final / "junk").write_text("from a killed run")
    with atomic_dir(final) as tmp:
        assert tmp.parent == final.parent and tmp.name.startswith(".tmp-") and not any(tmp.iterdir())
        (tmp / "weights").write_bytes(b"w")
        assert not (final / "weights").exists()  # nothing shows before the block ends
    assert sorted(p.name for p in final.iterdir()) == ["weights"]
    assert [p.name for p in final.parent.iterdir()] == ["step-0000004"]


def test_a_failed_directory_leaves_nothing_behind(tmp_path):
    final = tmp_path / "teacher-abc"
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt
    assert not final.exists() and list(tmp_path.iterdir()) == []
