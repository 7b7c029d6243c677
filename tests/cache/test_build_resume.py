"""`longkd cache build` killed at any write point finishes, rerun with the same command, to the
bytes of an uninterrupted build; a rerun refuses data that changed since the build started; a
full disk at the manifest is one line and leaves nothing behind.

The write points are enumerated from a real build (tests/faults.py): build.json, each
shard's temporary file opened, complete and renamed, the progress ledger, the manifest, and
the resume's own recovery writes. Each kill is a real SIGKILL of a forked child at that point.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

import pytest

from longkd import fileio
from longkd.cli import main
from tests.faults import kill_at, leftovers, write_points
from tests.helpers import cache_build_argv, one_torch_thread, write_random_text

VOCAB = 64
FLAGS = {"window": 32, "top_k": 4, "batch_size": 2, "shard_size": "6KB", "max_windows": 16}


@pytest.fixture(autouse=True)
def one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(autouse=True)
def no_fsync(monkeypatch):
    """fsync guards against power cuts; a killed process loses nothing the kernel holds."""
    monkeypatch.setattr(os, "fsync", lambda fd: None)


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Teacher, data (fresh each session) and the uninterrupted reference cache."""
    teacher = tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=32, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("build-kills")
    data = write_random_text(root / "train.jsonl", samples=60, vocab=VOCAB, lengths=(3, 30), seed=None)
    reference = root / "reference"
    with one_torch_thread():
        assert main(cache_build_argv(teacher, data, reference, **FLAGS)) == 0
    assert len(shards(reference)) >= 3, "shards too large for the kill points to mean anything"
    return teacher, data, reference


def shards(cache) -> list[dict]:
    manifest = json.loads((cache / "manifest.json").read_text())
    return manifest["shards"]


def build(teacher, data, out):
    return lambda: main(cache_build_argv(teacher, data, out, **FLAGS))


def assert_same_cache(out, reference) -> None:
    """Same manifest (but its time), same shard bytes, no stray file, no temporary."""
    a, b = (json.loads((c / "manifest.json").read_text()) for c in (out, reference))
    a.pop("created"), b.pop("created")
    assert a == b
    for shard in b["shards"]:
        assert (out / shard["path"]).read_bytes() == (reference / shard["path"]).read_bytes()
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        os.path.basename(s["path"]) for s in b["shards"]
    )
    assert leftovers(out) == []


def test_every_write_point_of_a_build_resumes(setup, tmp_path):
    teacher, data, reference = setup
    record = tmp_path / "record"
    points = write_points(build(teacher, data, record), record)
    by_path = {}
    for p in points:
        by_path.setdefault(p.path, []).append(p)
    second = [p for p in points if "shard-00000-000001" in p.path]  # opened, complete, renamed
    ledger = next(p for p in points[second[-1].index + 1 :] if p.path == "progress/rank-00000.jsonl")
    chosen = [
        *by_path["build.json"],
        *by_path["shards/.tmp-shard-00000-000000.arrow.part"],
        *second,
        ledger,
        *by_path["manifest.json"],
    ]
    shown = [str(p) for p in chosen]
    assert [p.label for p in second] == ["file-opened", "file-written", "file-moved"], shown
    assert len(chosen) == 7, shown
    for point in chosen:
        out = tmp_path / f"killed-{point.index}"
        kill_at(build(teacher, data, out), point, out)
        assert not (out / "manifest.json").exists() or point.path == "manifest.json"
        assert build(teacher, data, out)() == 0, point
        assert_same_cache(out, reference)


def killed_mid_build(setup, out) -> None:
    """A build killed just after its second shard entered the ledger (two shards to keep)."""
    teacher, data, _ = setup
    record = out.parent / f"record-{out.name}"
    points = write_points(build(teacher, data, record), record)
    ledger = [p for p in points if p.path == "progress/rank-00000.jsonl"]
    kill_at(build(teacher, data, out), points[ledger[1].index + 1], out)
    assert len((out / "progress" / "rank-00000.jsonl").read_text().splitlines()) == 2


def complete_shards(out) -> list[str]:
    return sorted(p.name for p in (out / "shards").iterdir() if not p.name.startswith(".tmp-"))


def test_every_write_point_of_the_recovery_resumes(setup, tmp_path):
    """The rerun's own writes before it computes anything new: a stray temporary shard removed,
    the ledger rewritten. Killed at each, the next rerun still finishes the same cache."""
    teacher, data, reference = setup
    base = tmp_path / "base"
    killed_mid_build(setup, base)
    (base / "shards" / ".tmp-shard-00000-000002.arrow.part").write_bytes(b"half a shard")
    record = tmp_path / "record-rerun"
    shutil.copytree(base, record)
    points = write_points(build(teacher, data, record), record)
    first_new = next(i for i, p in enumerate(points) if p.label == "file-opened")
    recovery = points[:first_new]
    assert {p.label for p in recovery} == {"removed", "file-written"}, [str(p) for p in recovery]
    for point in recovery:
        out = tmp_path / f"killed-{point.index}"
        shutil.copytree(base, out)
        kill_at(build(teacher, data, out), point, out)
        assert build(teacher, data, out)() == 0
        assert_same_cache(out, reference)


def test_a_kill_before_build_json_is_in_place_starts_afresh(setup, tmp_path, capsys):
    teacher, data, reference = setup
    out = tmp_path / "out"
    out.mkdir()
    (out / f".tmp-{'0' * 32}-build.json").write_text('{"half": ')  # what the kill left
    assert build(teacher, data, out)() == 0
    assert "not a longkd cache" not in capsys.readouterr().err
    assert_same_cache(out, reference)


def test_changed_data_is_refused_on_resume(setup, tmp_path, capsys):
    teacher, data, reference = setup
    out = tmp_path / "out"
    killed_mid_build(setup, out)
    before = complete_shards(out)
    original = data.read_text()
    rows = original.splitlines()
    first = json.loads(rows[0])
    first["text"] = " ".join(reversed(first["text"].split())) + " t5"
    try:
        for edited in ([json.dumps(first), *rows[1:]], rows[:3]):  # one sample changed; the data cut short
            data.write_text("\n".join(edited) + "\n")
            assert build(teacher, data, out)() == 2
            err = capsys.readouterr().err.strip().splitlines()[-1]
            assert err.startswith(f"longkd: error: --data {data} changed since this build started: "), err
            assert "restore the data the build started with, or build into a new --out" in err
            assert complete_shards(out) == before
    finally:
        data.write_text(original)
    assert build(teacher, data, out)() == 0
    assert_same_cache(out, reference)


def test_a_full_disk_at_the_manifest_is_one_line_and_leaves_nothing(setup, tmp_path, monkeypatch, capsys):
    teacher, data, reference = setup
    out = tmp_path / "out"
    real_open = open

    class FullDisk:
        """A file whose writes fail as on a full disk (the file itself was created)."""

        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.handle.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_on_full_disk(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        return FullDisk(handle) if str(path).endswith("-manifest.json") else handle

    monkeypatch.setattr(fileio, "open", open_on_full_disk, raising=False)
    assert build(teacher, data, out)() == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        f"longkd: error: writing {out}/manifest.json failed ([Errno 28] No space left on device); the "
        "shards are kept: free space (or fix permissions) and rerun the same command to finish the cache"
    )
    assert not (out / "manifest.json").exists() and leftovers(out) == []
    monkeypatch.undo()
    assert build(teacher, data, out)() == 0
    assert_same_cache(out, reference)
