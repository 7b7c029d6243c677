"""Killed at any write point, longkd/fileio.py leaves the old file or directory or the new one
whole, plus ``.tmp-`` leftovers that :func:`remove_temporaries` clears; ``check_out_dir``
refuses an output directory that cannot be made."""

from __future__ import annotations

import os

import pytest

from longkd import fileio
from longkd.errors import LongkdError
from tests.faults import kill_at, leftovers, write_points


def replace_dir(final):
    def command():
        with fileio.atomic_dir(final) as tmp:
            (tmp / "weights").write_text("new")
            (tmp / "config").write_text("new")

    return command


def test_a_directory_killed_at_every_point_is_old_or_new(tmp_path):
    record = tmp_path / "record" / "step-0000002"
    record.mkdir(parents=True)
    points = write_points(replace_dir(record), record.parent)
    assert [p.label for p in points] == ["dir-filled", "dir-moved-aside", "dir-swapped"]
    for point in points:
        final = tmp_path / f"killed-{point.index}" / "step-0000002"
        final.mkdir(parents=True)
        (final / "weights").write_text("old")
        kill_at(replace_dir(final), point, final.parent)
        if final.exists():
            contents = {p.name: p.read_text() for p in final.iterdir()}
            assert contents in ({"weights": "old"}, {"weights": "new", "config": "new"}), point
        else:
            assert point.label == "dir-moved-aside"  # the old one aside, the new one not yet in place
        fileio.remove_temporaries(final.parent)
        assert leftovers(final.parent) == []


def test_a_file_killed_before_its_rename_keeps_the_old_one(tmp_path):
    path = tmp_path / "latest"
    path.write_text("step-0000001\n")
    points = write_points(lambda: fileio.write_text_atomic(path, "step-0000002\n"), tmp_path)
    assert [(p.label, p.path) for p in points] == [("file-written", "latest")]
    path.write_text("step-0000001\n")
    kill_at(lambda: fileio.write_text_atomic(path, "step-0000002\n"), points[0], tmp_path)
    assert path.read_text() == "step-0000001\n"
    (temp,) = (p for p in tmp_path.iterdir() if p.name != "latest")
    assert fileio.is_temp_of(temp.name, "latest".__eq__) and temp.read_text() == "step-0000002\n"


def test_remove_temporaries_takes_only_what_it_is_told(tmp_path):
    names = [f".tmp-{'a' * 32}-build.json", f".tmp-{'b' * 32}-notes.txt", ".tmp-mine", "data.jsonl"]
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / ".tmp-step-0000004-abcd").mkdir()
    removed = fileio.remove_temporaries(tmp_path, lambda n: fileio.is_temp_of(n, "build.json".__eq__))
    assert removed == [names[0]]
    assert fileio.remove_temporaries(tmp_path) == sorted([names[1], ".tmp-mine", ".tmp-step-0000004-abcd"])
    assert [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
    assert fileio.remove_temporaries(tmp_path / "missing") == []


def test_check_out_dir(tmp_path, monkeypatch):
    fileio.check_out_dir(tmp_path / "new" / "deeper", "--out")  # creatable: fine
    fileio.check_out_dir(tmp_path, "--out")  # an existing directory: fine
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    message = rf"^--out {blocker} is a file, not a directory; choose another --out$"
    with pytest.raises(LongkdError, match=message):
        fileio.check_out_dir(blocker, "--out")
    with pytest.raises(LongkdError, match=rf"^out {blocker}/a/b is below {blocker}, a file, not a directory"):
        fileio.check_out_dir(blocker / "a" / "b", "out")
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    message = rf"^--out {tmp_path}/x: {tmp_path} is not writable; choose another --out$"
    with pytest.raises(LongkdError, match=message):
        fileio.check_out_dir(tmp_path / "x", "--out")
