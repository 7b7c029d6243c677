"""`torchrun -m longkd cache build` with 2 CPU ranks (gloo) gives the cache one process gives.

Real torchrun (``python -m torch.distributed.run --standalone --nproc-per-node 2``) in a
subprocess, a tiny real Llama teacher, real Arrow shards. Checked: a 2-rank cache built to a
``file://`` URI equals a 1-process cache window by window (top-k); a rank SIGKILLed mid-build
then a rerun of the same command completes a cache equal to the 1-process one (sampled
mode, whose draws are seeded per window); ranks started with different settings are refused
before anything is written; the window index and the ledger merge on interleaved shards; an
unreachable object store is one clear error.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from longkd.cache.distributed import merge_shards
from longkd.cache.reader import CacheReader, WindowIndex
from longkd.cli import main
from longkd.distributed import Group, env_world
from longkd.errors import LongkdError
from tests.helpers import (
    cache_build_argv,
    ledger_lines,
    one_torch_thread,
    run_torchrun,
    torchrun,
    worker_pid,
    write_random_text,
)

VOCAB = 256
WINDOWS = 40
KILL_WINDOWS = 240


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Teacher, data, and 1-process reference caches (top-k and sampled)."""
    teacher = tiny_model_dir(
        "llama", vocab_size=VOCAB, hidden_size=64, num_layers=2, max_position_embeddings=256
    )
    root = tmp_path_factory.mktemp("dist")
    data = write_random_text(root / "train.jsonl", samples=1200, vocab=VOCAB, lengths=(5, 80), seed=11)
    refs = {"topk": root / "ref-topk", "sampled": root / "ref-sampled"}
    with one_torch_thread():  # the torchrun workers run with OMP_NUM_THREADS=1 too
        assert main(build_args(teacher, data, refs["topk"])) == 0
        sampled = {"sample_draws": 16, "max_windows": KILL_WINDOWS, "shard_size": "24KB"}
        assert main(build_args(teacher, data, refs["sampled"], **sampled)) == 0
    return teacher, data, refs


def build_args(teacher, data, out, **changes):
    """argv of the build the tests here run; ``changes`` override its flags (``top_k=4``)."""
    flags = {
        "window": 128,
        "top_k": 8,
        "batch_size": 1,  # same forward shapes on every rank, so results are bit-identical
        "shard_size": "12KB",
        "max_windows": WINDOWS,
        **changes,
    }
    if "sample_draws" in flags:
        flags["top_k"] = None  # the two selections exclude each other
    return cache_build_argv(teacher, data, out, **flags)


def assert_same_windows(cache, reference, n):
    a, b = CacheReader(cache), CacheReader(reference)
    assert a.num_windows == b.num_windows == n
    got = 0
    for x, y in zip(a.iter_windows(), b.iter_windows(), strict=True):
        assert x.window_id == y.window_id == got
        for name in ("input_ids", "segment_starts", "ids", "logprobs", "target_logprob"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{name} {x.window_id}")
        if y.counts is not None:
            np.testing.assert_array_equal(x.counts, y.counts)
        got += 1
    # random access by window id, in a fresh order
    for i in np.random.default_rng().permutation(n)[:10]:
        assert a.read_window(int(i)).window_id == int(i)
        np.testing.assert_array_equal(a.read_window(int(i)).ids, b.read_window(int(i)).ids)
    ma, mb = a.manifest, b.manifest
    assert ma["dataset"] == mb["dataset"] and ma["packing"] == mb["packing"]
    assert (
        ma["totals"]["windows"] == mb["totals"]["windows"]
        and ma["totals"]["tokens"] == mb["totals"]["tokens"]
    )
    return a


def cache_path(uri_or_path) -> Path:
    return Path(str(uri_or_path).removeprefix("file://"))


@pytest.mark.slow
def test_two_ranks_to_file_uri_equal_one_process(setup, tmp_path, capsys):
    teacher, data, refs = setup
    uri = f"file://{tmp_path}/two"
    code, out, err = run_torchrun(build_args(teacher, data, uri))
    assert code == 0, err[-3000:]
    assert f"wrote {uri}: {WINDOWS} windows" in out and "rank 1: 20 windows" in out

    reader = assert_same_windows(uri, refs["topk"], WINDOWS)
    shards = reader.shards
    ranks = [int(Path(s["path"]).name.split("-")[1]) for s in shards]
    assert ranks == sorted(ranks) and set(ranks) == {0, 1}, "shards are listed rank-major"
    assert all(s["stride"] == 2 and s["first_window"] % 2 == r for s, r in zip(shards, ranks))
    for i, s in enumerate(shards):
        ids = reader.shard_windows(i)
        assert ids.tolist() == list(range(s["first_window"], s["last_window"] + 1, 2))
    on_disk = sorted(p.name for p in (cache_path(uri) / "shards").iterdir())
    assert on_disk == sorted(Path(s["path"]).name for s in shards), "no stray or temporary shard files"
    build = json.loads((cache_path(uri) / "build.json").read_text())
    assert build["settings"]["world"] == 2 and "rank" not in build["settings"]

    # verify and info take the URI
    assert main(["cache", "verify", uri]) == 0
    assert f"ok: {len(shards)} shards, {WINDOWS} windows verified" in capsys.readouterr().out
    # a rank's shards missing from the manifest: verify names the gap
    m = json.loads((cache_path(uri) / "manifest.json").read_text())
    m["shards"] = [s for s in m["shards"] if "-00001-" not in s["path"]]
    for key, name in (("windows", "rows"), ("tokens", "tokens"), ("bytes", "bytes")):
        m["totals"][key] = sum(s[name] for s in m["shards"])  # consistent, so verify reaches the ids
    (cache_path(uri) / "manifest.json").write_text(json.dumps(m))
    assert main(["cache", "verify", uri]) == 1
    assert (
        "window ids 0 mod 2 end at 38, but the shards hold 20 windows (ids missing" in capsys.readouterr().err
    )


@pytest.mark.slow
def test_rank_killed_then_rerun_completes(setup, tmp_path):
    teacher, data, refs = setup
    out = tmp_path / "killed"
    args = build_args(teacher, data, out, sample_draws=16, max_windows=KILL_WINDOWS, shard_size="24KB")
    log = (tmp_path / "killed.log").open("w+")
    proc = torchrun(args, stdout=log, stderr=subprocess.STDOUT)
    seed = int.from_bytes(os.urandom(4), "little")
    target = int(np.random.default_rng(seed).integers(1, 4))
    killed = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if ledger_lines(out, 1) >= target and ledger_lines(out, 0) >= 1:
            killed = worker_pid(proc.pid, 1)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait(timeout=120)
    log.seek(0)
    err = log.read()
    assert killed is not None, f"build finished before the kill (seed {seed}): {err[-2000:]}"
    assert proc.returncode != 0
    assert not (out / "manifest.json").exists()
    kept = {r: ledger_lines(out, r) for r in (0, 1)}
    assert kept[1] >= target and sum(kept.values()) < len(CacheReader(refs["sampled"]).shards)

    code, stdout, err = run_torchrun(args)
    assert code == 0, err[-3000:]
    assert f"resuming {out}: {kept[0]} shards" in stdout
    reader = assert_same_windows(out, refs["sampled"], KILL_WINDOWS)
    on_disk = sorted(p.name for p in (out / "shards").iterdir())
    assert on_disk == sorted(Path(s["path"]).name for s in reader.shards), "nothing left over or doubled"
    assert main(["cache", "verify", str(out)]) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_different_settings_refused_before_writing(setup, tmp_path):
    """Two ranks started by hand, rank 1 with another --top-k: both refuse, nothing written."""
    teacher, data, _ = setup
    out = tmp_path / "mixed"
    port = str(_free_port())
    procs = []
    for rank, k in ((0, 8), (1, 4)):
        env = {
            **os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        cmd = [sys.executable, "-m", "longkd", *build_args(teacher, data, out, top_k=k)]
        procs.append(
            subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (_, err) in zip(procs, results):
        assert proc.returncode == 2, err[-2000:]
        line = [x for x in err.splitlines() if x.startswith("longkd: error:")]
        assert line == [
            "longkd: error: ranks disagree on settings selection.k: rank 0 has 8, rank 1 has 4; "
            "start every rank with the same command (nothing was written)"
        ], err[-2000:]
    assert not out.exists()


# ----------------------------------------------------------------- fast unit checks


def _entries(world: int, total: int, per_shard: int) -> list[list[dict]]:
    """Ledger entries of ``world`` ranks writing windows r, r+world, ... in shards of per_shard."""
    out = []
    for r in range(world):
        ids = list(range(r, total, world))
        chunks = [ids[i : i + per_shard] for i in range(0, len(ids), per_shard)]
        out.append([
            {"path": f"shards/shard-{r:05d}-{j:06d}.arrow", "rows": len(c), "tokens": 1, "bytes": 1,
             "sha256": "0", "first_window": c[0], "last_window": c[-1], "stride": world}
            for j, c in enumerate(chunks)
        ])  # fmt: skip
    return out


@pytest.mark.parametrize("world,total,per_shard", [(1, 7, 3), (2, 9, 2), (3, 10, 1), (4, 3, 5), (3, 13, 4)])
def test_window_index_on_interleaved_shards(world, total, per_shard):
    per_rank = _entries(world, total, per_shard)
    merged = merge_shards(per_rank)
    assert [e["path"] for e in merged] == [e["path"] for rank in per_rank for e in rank]
    index = WindowIndex(merged)
    assert index.total == total
    seen = {}
    for s in range(len(merged)):
        for row, w in enumerate(index.shard_windows(s)):
            seen[int(w)] = (s, row)
    assert sorted(seen) == list(range(total))
    for w in np.random.default_rng(world).permutation(total):
        assert index.locate(int(w)) == seen[int(w)]
    with pytest.raises(IndexError):
        index.locate(total)
    # the same shards in another listed order locate the same way
    shuffled = [merged[i] for i in np.random.default_rng(0).permutation(len(merged))]
    again = WindowIndex(shuffled)
    assert all(shuffled[again.locate(w)[0]] is merged[seen[w][0]] for w in range(total))


def test_merge_refuses_missing_or_doubled_windows():
    per_rank = _entries(2, 12, 2)
    with pytest.raises(LongkdError, match="window ids missing or repeated"):
        merge_shards([per_rank[0][:1] + per_rank[0][2:], per_rank[1]])
    with pytest.raises(LongkdError, match=r"windows 0 mod 2 number 6, expected 5 of 10 windows"):
        merge_shards([per_rank[0], per_rank[1][:-1]])
    with pytest.raises(LongkdError, match="missing or repeated"):
        merge_shards([per_rank[0], per_rank[1] + per_rank[1][-1:]])
    with pytest.raises(LongkdError, match="mix strides"):
        merge_shards([per_rank[0], [{**e, "stride": 1} for e in per_rank[1]]])


def test_single_process_group_is_a_no_op(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert env_world() == (0, 1, 0)
    group = Group("cpu")
    assert (group.rank, group.world, group.owns) == (0, 1, False)
    group.agree({"settings": {"k": 1}})
    assert group.all_gather(3) == [3] and group.rank0(lambda: 5) == 5
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(LongkdError, match="RANK=2 WORLD_SIZE=2 LOCAL_RANK=2 are inconsistent"):
        env_world()
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(LongkdError, match="must be integers"):
        env_world()


def test_unreachable_object_store_is_one_line_error(capsys, tmp_path):
    """No network needed: the endpoint is a closed local port."""
    uri = "s3://nonexistent-bucket/cache?endpoint_override=127.0.0.1:9&scheme=http&region=us-east-1"
    assert main(["cache", "verify", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"longkd: error: cannot open {uri}: ") and "\n" not in err
    assert main(["cache", "verify", "nosuchscheme://bucket/cache"]) == 2
    assert "cannot open nosuchscheme://bucket/cache" in capsys.readouterr().err
