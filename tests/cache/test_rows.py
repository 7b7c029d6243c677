"""The row codec (cache/rows.py): a window encoded as a record batch reads back column for column,
its dense view matches the teacher's rows, and shards written by another writer are located."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from longkd.cache import format as fmt
from longkd.cache.rows import (
    BadShard,
    ShardFile,
    UnreadableShard,
    check_schema,
    dense_rows,
    max_stored_id,
    read_columns,
    selection_rows,
    window_record_batch,
)
from longkd.cache.storage import Location
from longkd.errors import LongkdError
from tests.cache.test_format import make_sampled_rows, make_topk_rows, make_window


def test_every_selection_mode_has_rows():
    for mode, selection in fmt.SELECTIONS.items():
        assert selection_rows(mode).format is selection
        own = [f.name for f in selection.fields(fmt.LOGPROB_ENCODINGS["float32"])]
        assert fmt.shard_schema(mode).names[5:-2] == own
        assert fmt.shard_schema(mode, version=1).names[5:-1] == own
    with pytest.raises(LongkdError, match="unknown selection mode 'beam'"):
        selection_rows("beam")


@pytest.mark.parametrize("logprob_dtype", fmt.LOGPROB_DTYPES)
def test_topk_window_round_trips(logprob_dtype):
    rng = np.random.default_rng()
    w, vocab, k = int(rng.integers(8, 40)), 60, int(rng.integers(1, 7))
    window = make_window(rng, int(rng.integers(0, 1000)), w, vocab, length=w - int(rng.integers(0, 3)))
    rows = make_topk_rows(rng, window, vocab, k)
    batch = window_record_batch(window, rows, "topk", logprob_dtype)
    assert batch.schema.equals(fmt.shard_schema("topk", logprob_dtype))
    columns = read_columns(batch, 0, "topk")
    assert (columns.window_id, columns.length) == (window.window_id, window.length)
    np.testing.assert_array_equal(columns.input_ids, window.input_ids)
    np.testing.assert_array_equal(columns.segment_starts, window.segment_starts)
    expected_target = rows.target_logprob.copy()
    expected_target[window.length - 1 :] = np.nan
    np.testing.assert_array_equal(columns.target_logprob, expected_target)
    ids, logprobs, counts = dense_rows(columns, w, {"mode": "topk", "k": k})
    stored = rows.logprobs.astype(fmt.LOGPROB_ENCODINGS[logprob_dtype].value_type.to_pandas_dtype())
    np.testing.assert_array_equal(ids, rows.ids)
    np.testing.assert_array_equal(logprobs, stored.astype(np.float32))
    assert ids.dtype == np.int32 and logprobs.dtype == np.float32 and counts is None


def test_sampled_window_dense_view():
    rng = np.random.default_rng()
    w, vocab, draws = int(rng.integers(8, 40)), 40, int(rng.integers(1, 20))
    window = make_window(rng, 3, w, vocab)
    rows = make_sampled_rows(rng, window, vocab, draws)
    columns = read_columns(window_record_batch(window, rows, "sampled"), 0, "sampled")
    np.testing.assert_array_equal(columns.mode_columns[fmt.ROW_SPLITS], rows.row_splits)
    ids, logprobs, counts = dense_rows(columns, w, {"mode": "sampled", "draws": draws})
    per_row = np.diff(rows.row_splits)
    assert ids.shape == logprobs.shape == counts.shape == (w, per_row.max())
    for t in range(w):
        a, b = rows.row_splits[t], rows.row_splits[t + 1]
        np.testing.assert_array_equal(ids[t, : b - a], rows.ids[a:b])
        np.testing.assert_array_equal(counts[t, : b - a], rows.counts[a:b])
        np.testing.assert_allclose(np.exp(logprobs[t, : b - a]), rows.counts[a:b] / draws, rtol=1e-6)
        assert (ids[t, b - a :] == -1).all() and (counts[t, b - a :] == 0).all()
        assert np.isneginf(logprobs[t, b - a :]).all()


def test_encode_refuses_shapes_that_disagree_with_the_window():
    rng = np.random.default_rng()
    window = make_window(rng, 0, 16, 30)
    rows = make_topk_rows(rng, window, 30, 4)
    rows.logprobs = rows.logprobs[:, :3]
    with pytest.raises(ValueError, match="window 0: top-k ids"):
        window_record_batch(window, rows, "topk")


def _write_shard(path, batches: list[pa.RecordBatch]) -> None:
    with pa.ipc.new_file(str(path), batches[0].schema) as sink:
        for batch in batches:
            sink.write_batch(batch)


def test_shard_file_locates_rows_of_any_batching(tmp_path):
    """A foreign writer may put several windows in one record batch; counting finds each row."""
    rng = np.random.default_rng()
    windows = [make_window(rng, i, 12, 30) for i in range(7)]
    batches = [window_record_batch(win, make_topk_rows(rng, win, 30, 3), "topk") for win in windows]
    sizes = [2, 1, 4]  # windows per record batch
    cuts = np.cumsum([0, *sizes])
    merged = [
        pa.Table.from_batches(batches[lo:hi]).combine_chunks().to_batches()[0]
        for lo, hi in zip(cuts[:-1], cuts[1:])
    ]
    _write_shard(tmp_path / "s.arrow", merged)
    location = Location(tmp_path)
    for rows in (None, len(windows)):  # 3 batches, never 7: the file's batches are counted either way
        shard = ShardFile(location, "s.arrow", rows)
        for row in rng.permutation(len(windows)):
            batch, r = shard.locate(int(row))
            assert read_columns(batch, r, "topk").window_id == row
    one_per_batch = ShardFile(location, "s.arrow", rows=3)  # 3 rows, 3 batches: row r taken as batch r
    assert one_per_batch.locate(2)[0].num_rows == 4
    assert max_stored_id(location, "s.arrow") == max(
        int(read_columns(b, r, "topk").ids.max()) for b in merged for r in range(b.num_rows)
    )


def test_unreadable_shard_and_foreign_schema(tmp_path):
    (tmp_path / "junk.arrow").write_bytes(b"not arrow at all")
    location = Location(tmp_path)
    with pytest.raises(UnreadableShard, match="shard junk.arrow of .* is unreadable: .*longkd cache verify"):
        ShardFile(location, "junk.arrow")
    rng = np.random.default_rng()
    window = make_window(rng, 0, 8, 20)
    batch = window_record_batch(window, make_topk_rows(rng, window, 20, 2), "topk", "float16")
    check_schema(batch.schema, fmt.shard_schema("topk", "float16"))
    for other, needle in (
        (fmt.shard_schema("topk", "float32"),
         "column 5: expected logprobs: list<item: float>, found logprobs: list<item: halffloat> (8 columns"),
        (fmt.shard_schema("sampled", "float16"),
         "column 5: expected counts: list<item: uint16>, found logprobs"),
        (fmt.shard_schema("topk", "float16", version=1),
         "column 7: expected nothing, found checksum: uint64"),
    ):  # fmt: skip
        with pytest.raises(BadShard, match="schema differs from the cache's at ") as info:
            check_schema(batch.schema, other)
        assert needle in str(info.value) and "\n" not in str(info.value)
    _write_shard(tmp_path / "v2.arrow", [batch])
    with pytest.raises(UnreadableShard, match="v2.arrow of .* is unreadable: schema differs"):
        ShardFile(location, "v2.arrow", schema=fmt.shard_schema("topk", "float16", version=1))
