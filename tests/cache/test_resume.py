"""Resuming an interrupted `longkd cache build` gives the same bytes as an uninterrupted run.

A build runs in a subprocess with small shards and is SIGKILLed at a random point after at
least one shard is complete; rerunning the same command must finish a cache whose every shard
sha256 and every window equal those of a build that was never interrupted.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from longkd.cli import main
from tests.helpers import cache_build_argv, one_torch_thread, read_manifest, write_random_text

VOCAB = 256
WINDOWS = 120


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Teacher, data and a reference (uninterrupted) cache."""
    teacher = tiny_model_dir(
        "llama", vocab_size=VOCAB, hidden_size=64, num_layers=2, max_position_embeddings=256
    )
    root = tmp_path_factory.mktemp("resume")
    data = write_random_text(root / "train.jsonl", samples=500, vocab=VOCAB, lengths=(5, 80), seed=5)
    reference = root / "reference"
    with one_torch_thread():  # as every build in this file (see one_thread)
        assert main(build_args(teacher, data, reference)) == 0
    return teacher, data, reference


@pytest.fixture(autouse=True)
def one_thread():
    """Every build here (in-process and subprocess) uses one torch thread, so float results
    cannot differ with the thread count, and the shared CPU stays usable."""
    with one_torch_thread():
        yield


def build_args(teacher, data, out, **changes):
    """argv of the build the tests here run; ``changes`` override its flags (``window=64``)."""
    flags = {"window": 128, "top_k": 8, "batch_size": 3, "shard_size": "12KB", "max_windows": WINDOWS}
    return cache_build_argv(teacher, data, out, **{**flags, **changes})


def shard_records(cache):
    m = read_manifest(cache)
    return [
        {k: s[k] for k in ("path", "rows", "tokens", "bytes", "sha256", "first_window")} for s in m["shards"]
    ]


def assert_same_cache(cache, reference):
    from longkd.cache.reader import CacheReader

    assert shard_records(cache) == shard_records(reference)
    for shard in shard_records(reference):
        assert (cache / shard["path"]).read_bytes() == (reference / shard["path"]).read_bytes()
    a, b = CacheReader(cache), CacheReader(reference)
    assert a.num_windows == b.num_windows == WINDOWS
    for x, y in zip(a.iter_windows(), b.iter_windows(), strict=True):
        for name in ("input_ids", "segment_starts", "ids", "logprobs", "target_logprob"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{name} {x.window_id}")
    ma, mb = a.manifest, b.manifest
    assert ma["dataset"] == mb["dataset"] and ma["packing"] == mb["packing"] and ma["totals"] == mb["totals"]
    assert sorted(p.name for p in (cache / "shards").iterdir()) == sorted(
        os.path.basename(s["path"]) for s in shard_records(reference)
    )


def ledger_lines(out) -> int:
    try:
        return len((out / "progress" / "rank-00000.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted(setup, tmp_path, capsys):
    teacher, data, reference = setup
    n_shards = len(shard_records(reference))
    assert n_shards >= 6, "shards too large for a meaningful kill point"
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    # Kill in the first half: the writer thread lags the teacher, so a late kill can land after the
    # manifest is written, which would not test resume at all.
    target = int(rng.integers(1, n_shards // 2))  # kill after this many completed shards (and a bit)
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "longkd", *build_args(teacher, data, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if ledger_lines(out) >= target:
            time.sleep(float(rng.uniform(0.0, 0.01)))
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (
        f"build finished before the kill (seed {seed}, target {target})"
    )
    assert not (out / "manifest.json").exists()
    done = ledger_lines(out)
    assert 1 <= done < n_shards, f"seed {seed}"

    # A different setting on the same --out is refused, naming it; nothing is touched.
    before = sorted(p.name for p in (out / "shards").iterdir())
    assert main(build_args(teacher, data, out, window=64)) == 2
    err = capsys.readouterr().err
    assert "holds a cache built with window=128; this run asks for window=64" in err
    assert main(build_args(teacher, data, out, temperature=2.0)) == 2
    assert "temperature=1.0; this run asks for temperature=2.0" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "shards").iterdir()) == before

    assert main(build_args(teacher, data, out)) == 0
    assert f"resuming {out}: {done} shards" in capsys.readouterr().out
    assert_same_cache(out, reference)


def test_resume_drops_damaged_and_unlisted_shards(setup, tmp_path, capsys):
    """Ledger entries whose file changed are recomputed; files the ledger does not list are deleted."""
    teacher, data, reference = setup
    out = tmp_path / "partial"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()
    records = shard_records(reference)
    # Keep the ledger's first 4 entries; damage the 3rd, leave a stray finished shard and a temp file.
    lines = (out / "progress" / "rank-00000.jsonl").read_text().splitlines()[:4]
    (out / "progress" / "rank-00000.jsonl").write_text("\n".join(lines) + "\n")
    damaged = out / records[2]["path"]
    damaged.write_bytes(damaged.read_bytes()[:-10] + b"0123456789")
    (out / "shards" / ".tmp-shard-00000-000009.arrow.part").write_bytes(b"partial")
    assert main(build_args(teacher, data, out)) == 0
    assert f"resuming {out}: 2 shards" in capsys.readouterr().out
    assert_same_cache(out, reference)


def test_other_directory_refused(setup, tmp_path, capsys):
    teacher, data, _ = setup
    out = tmp_path / "x"
    out.mkdir()
    (out / "results.csv").write_text("a,b\n")
    assert main(build_args(teacher, data, out)) == 2
    assert "is not a longkd cache" in capsys.readouterr().err
    assert not (out / "build.json").exists()
