"""Shard writer, manifest and reader on synthetic teacher rows (no model needed).

Rows are built from random logits with numpy, written through the real background writer
into real Arrow IPC files, and read back through CacheReader; every column must round-trip.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from longkd.cache import format as fmt
from longkd.cache import writer as writer_mod
from longkd.cache.ledger import read_ledger
from longkd.cache.manifest import build_manifest, check_shard_path, load_manifest, write_manifest
from longkd.cache.reader import CacheReader
from longkd.cache.rows import expand_sampled
from longkd.cache.storage import Location
from longkd.cache.writer import ShardWriter, parse_size
from longkd.errors import LongkdError
from tests.helpers import fail_writes_after


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def make_window(rng, window_id: int, w: int, vocab: int, length: int | None = None):
    length = w if length is None else length
    ids = rng.integers(4, vocab, size=w).astype(np.int32)
    ids[length:] = 0
    cuts = np.sort(rng.choice(np.arange(1, max(length, 2)), size=min(2, length - 1), replace=False))
    starts = np.concatenate([[0], cuts]).astype(np.int32)
    return SimpleNamespace(window_id=window_id, input_ids=ids, length=length, segment_starts=starts)


def make_topk_rows(rng, window, vocab: int, k: int):
    w = window.input_ids.shape[0]
    lp = log_softmax(rng.normal(size=(w, vocab)) * 3).astype(np.float32)
    order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    target = np.take_along_axis(lp, np.roll(window.input_ids, -1)[:, None].astype(np.int64), axis=1)[:, 0]
    target[w - 1] = np.nan
    return SimpleNamespace(
        ids=order.astype(np.int32), logprobs=np.take_along_axis(lp, order, axis=1), target_logprob=target
    )


def make_sampled_rows(rng, window, vocab: int, draws: int):
    w = window.input_ids.shape[0]
    p = np.exp(log_softmax(rng.normal(size=(w, vocab)) * 2))
    ids, counts, splits = [], [], [0]
    for t in range(w):
        hits = np.bincount(rng.choice(vocab, size=draws, p=p[t]), minlength=vocab)
        nz = np.flatnonzero(hits)
        nz = nz[np.argsort(-hits[nz], kind="stable")]
        ids.append(nz)
        counts.append(hits[nz])
        splits.append(splits[-1] + len(nz))
    target = np.log(p[np.arange(w), np.roll(window.input_ids, -1)]).astype(np.float32)
    target[w - 1] = np.nan
    return SimpleNamespace(
        ids=np.concatenate(ids).astype(np.int32),
        counts=np.concatenate(counts).astype(np.uint16),
        row_splits=np.asarray(splits, dtype=np.int32),
        target_logprob=target,
    )


def finish_synthetic_cache(loc, writer, *, w, vocab, selection, encoding=None, samples=0):
    """Close ``writer`` and write the manifest of a synthetic cache (one place for the fields
    a test does not care about); returns the shard entries."""
    shards = writer.close()
    write_manifest(
        loc,
        build_manifest(
            teacher={"name_or_path": "synthetic"},
            tokenizer={"fingerprint": "x", "size": vocab},
            embedding_size=vocab,
            window=w,
            packing={"position_mode": "continuous", "stats": {"efficiency": 1.0}},
            selection=selection,
            temperature=1.0,
            encoding=encoding or {"ids": "int32", "logprobs": "float32", "compression": "zstd"},
            dataset={"source": "synthetic", "fingerprint": "y", "samples": samples},
            shards=[s.to_dict() for s in shards],
        ),
    )
    return shards


def write_synthetic_cache(
    out, *, n=6, w=32, vocab=50, k=5, mode="topk", draws=16, logprob_dtype="float32", shard_size=4000, seed=0
):
    """Write ``n`` random windows as a finished cache; return (location, windows, rows)."""
    rng = np.random.default_rng(seed)
    loc = Location(out)
    writer = ShardWriter(loc, selection_mode=mode, logprob_dtype=logprob_dtype, shard_size=shard_size)
    windows, rows = [], []
    for i in range(n):
        win = make_window(rng, i, w, vocab, length=w if i < n - 1 else w - 7)
        r = (
            make_topk_rows(rng, win, vocab, k)
            if mode == "topk"
            else make_sampled_rows(rng, win, vocab, draws)
        )
        writer.put(win, r)
        windows.append(win)
        rows.append(r)
    selection = {"mode": "topk", "k": k} if mode == "topk" else {"mode": "sampled", "draws": draws}
    encoding = {"ids": "int32", "logprobs": logprob_dtype, "compression": "zstd", "compression_level": 1}
    finish_synthetic_cache(loc, writer, w=w, vocab=vocab, selection=selection, encoding=encoding, samples=n)
    return loc, windows, rows


@pytest.mark.parametrize(
    "text,expected",
    [
        ("256MB", 256 * 10**6),
        ("1GB", 10**9),
        ("512KiB", 512 * 1024),
        ("1000", 1000),
        (4096, 4096),
        ("1.5kb", 1500),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "12XB", "-5MB", "0", 0, "lots"])
def test_parse_size_rejects(bad):
    with pytest.raises(LongkdError, match="size"):
        parse_size(bad)


def test_schema_columns():
    topk = fmt.shard_schema("topk", "float16")
    assert topk.names == [
        "window_id",
        "length",
        "input_ids",
        "segment_starts",
        "ids",
        "logprobs",
        "target_logprob",
        "checksum",
    ]
    assert topk.field("checksum").type == pa.uint64()
    assert fmt.shard_schema("topk", "float16", version=1).names == topk.names[:-1]
    assert topk.field("logprobs").type == pa.list_(pa.float16())
    sampled = fmt.shard_schema("sampled")
    assert "counts" in sampled.names and "row_splits" in sampled.names and "logprobs" not in sampled.names
    with pytest.raises(LongkdError, match="selection mode"):
        fmt.shard_schema("beam")


def test_topk_roundtrip_multiple_shards(tmp_path):
    loc, windows, rows = write_synthetic_cache(tmp_path / "c", n=7)
    manifest = load_manifest(loc)
    assert len(manifest["shards"]) >= 3, "shard_size 4000 should roll over several times"
    # Ledger and manifest agree; sha256 computed on the fly equals the file's.
    ledger = read_ledger(loc, 0)
    assert [s.to_dict() for s in ledger] == manifest["shards"]
    for shard in manifest["shards"]:
        data = (tmp_path / "c" / shard["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == shard["sha256"]
        assert len(data) == shard["bytes"] and data[:6] == b"ARROW1"
    assert not [p for p in (tmp_path / "c" / "shards").iterdir() if not p.name.startswith("shard-")]

    reader = CacheReader(tmp_path / "c")
    assert reader.num_windows == 7 and reader.window == 32
    # Random access order.
    for index in np.random.default_rng(1).permutation(7):
        got, win, r = reader.read_window(int(index)), windows[index], rows[index]
        assert got.window_id == index and got.length == win.length
        np.testing.assert_array_equal(got.input_ids, win.input_ids)
        np.testing.assert_array_equal(got.segment_starts, win.segment_starts)
        np.testing.assert_array_equal(got.ids, r.ids)
        np.testing.assert_array_equal(got.logprobs, r.logprobs)
        expected_target = r.target_logprob.copy()
        expected_target[win.length - 1 :] = np.nan  # the writer enforces the padded-row rule
        np.testing.assert_array_equal(got.target_logprob, expected_target)
        np.testing.assert_array_equal(got.position_ids, np.arange(32))
        assert got.counts is None
    assert [w.window_id for w in reader.iter_windows()] == list(range(7))
    assert reader.shard_of(6)[0] == len(reader.shards) - 1


def test_float16_logprobs(tmp_path):
    _, _, rows = write_synthetic_cache(tmp_path / "c", logprob_dtype="float16")
    reader = CacheReader(tmp_path / "c")
    assert reader.manifest["encoding"]["logprobs"] == "float16"
    for i, r in enumerate(rows):
        got = reader.read_window(i)
        assert got.logprobs.dtype == np.float32
        np.testing.assert_array_equal(got.logprobs, r.logprobs.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(got.logprobs, r.logprobs, rtol=1e-3, atol=1e-3)


def test_sampled_roundtrip(tmp_path):
    _, windows, rows = write_synthetic_cache(tmp_path / "c", mode="sampled", draws=16)
    reader = CacheReader(tmp_path / "c")
    for i, r in enumerate(rows):
        got = reader.read_window(i)
        w = windows[i].input_ids.shape[0]
        per_row = np.diff(r.row_splits)
        assert got.ids.shape == (w, per_row.max())
        for t in range(w):
            a, b = r.row_splits[t], r.row_splits[t + 1]
            n = b - a
            np.testing.assert_array_equal(got.ids[t, :n], r.ids[a:b])
            np.testing.assert_array_equal(got.counts[t, :n], r.counts[a:b])
            np.testing.assert_allclose(got.logprobs[t, :n], np.log(r.counts[a:b] / 16.0), rtol=1e-6)
            assert np.all(got.ids[t, n:] == -1) and np.all(got.counts[t, n:] == 0)
            assert np.all(np.isneginf(got.logprobs[t, n:]))
        assert np.all(got.counts.sum(axis=1) == 16)


def test_expand_sampled_empty_rows():
    ids, lp, counts = expand_sampled(
        np.array([7, 3, 9], np.int32), np.array([2, 1, 3], np.uint16), np.array([0, 2, 2, 3], np.int32), 3
    )
    np.testing.assert_array_equal(ids, [[7, 3], [-1, -1], [9, -1]])
    np.testing.assert_array_equal(counts, [[2, 1], [0, 0], [3, 0]])
    assert lp[2, 0] == 0.0 and np.isneginf(lp[1]).all()


@pytest.mark.parametrize(
    "path", ["../x.arrow", "/etc/passwd", "shards/../../x.arrow", "s3://b/x", "a\\..\\b", "."]
)
def test_manifest_rejects_paths_outside(path):
    with pytest.raises(LongkdError, match="inside the cache directory"):
        check_shard_path(path, "cache")


def test_manifest_escape_rejected_on_load(tmp_path):
    loc, _, _ = write_synthetic_cache(tmp_path / "c", n=2)
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    m["shards"][0]["path"] = "../outside.arrow"
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(LongkdError, match="outside.arrow"):
        CacheReader(tmp_path / "c")


def test_manifest_version_and_keys(tmp_path):
    loc, _, _ = write_synthetic_cache(tmp_path / "c", n=2)
    path = tmp_path / "c" / "manifest.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "format_version": 4}))
    with pytest.raises(LongkdError, match="newer longkd"):
        load_manifest(loc)
    del m["window"]
    path.write_text(json.dumps(m))
    with pytest.raises(LongkdError, match="lacks window"):
        load_manifest(loc)


def test_reader_refuses_unfinished(tmp_path):
    (tmp_path / "c" / "shards").mkdir(parents=True)
    with pytest.raises(LongkdError, match=r"not a finished longkd cache \(no manifest.json\); rerun"):
        CacheReader(tmp_path / "c")
    with pytest.raises(LongkdError, match="does not exist"):
        CacheReader(tmp_path / "nowhere")


def test_file_uri(tmp_path):
    write_synthetic_cache(tmp_path / "c", n=2)
    reader = CacheReader(f"file://{tmp_path / 'c'}")
    assert reader.read_window(1).window_id == 1


def test_write_error_becomes_longkd_error(tmp_path, monkeypatch):
    """A disk-full error in the writer thread surfaces in the producer, naming the shard."""
    fail_writes_after(monkeypatch, 9000)
    rng = np.random.default_rng(0)
    loc = Location(tmp_path / "c")
    writer = ShardWriter(loc, selection_mode="topk", shard_size=4000)
    with pytest.raises(LongkdError) as info:
        for i in range(40):
            win = make_window(rng, i, 32, 50)
            writer.put(win, make_topk_rows(rng, win, 50, 5))
        writer.close()
    message = str(info.value)
    assert "shards/shard-00000-" in message and "No space left on device" in message and "\n" not in message
    writer.abort()
    # Completed shards stay (resume keeps them); the failed one's temporary file is gone.
    names = sorted(p.name for p in (tmp_path / "c" / "shards").iterdir())
    assert names and all(n.startswith("shard-") for n in names)
    assert len(read_ledger(loc, 0)) == len(names)
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_back_pressure(tmp_path, monkeypatch):
    """With the thread stalled, put() blocks once the bounded queue is full."""
    gate = threading.Event()
    real_write = writer_mod._HashingFile.write

    def slow_write(self, data):
        gate.wait()
        return real_write(self, data)

    monkeypatch.setattr(writer_mod._HashingFile, "write", slow_write)
    rng = np.random.default_rng(0)
    items = []
    for i in range(6):
        win = make_window(rng, i, 16, 30)
        items.append((win, make_topk_rows(rng, win, 30, 3)))
    writer = ShardWriter(Location(tmp_path / "c"), selection_mode="topk", queue_size=2)
    done = []

    def produce():
        for win, rows in items:
            writer.put(win, rows)
            done.append(win.window_id)

    producer = threading.Thread(target=produce)
    producer.start()
    time.sleep(0.5)
    # One item in the stalled thread, two in the queue: the producer is stuck on the fourth.
    assert producer.is_alive() and len(done) <= 3
    gate.set()
    producer.join(timeout=20)
    assert len(done) == 6
    (shard,) = writer.close()
    assert shard.rows == 6 and shard.first_window == 0 and shard.last_window == 5
