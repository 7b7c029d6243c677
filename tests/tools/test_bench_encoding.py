"""tools/bench_encoding.py's measurements on tiny caches built here: per-column bytes against
the shard files, log-prob errors and bucket losses of compact against plain caches."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longkd.cache import format as fmt
from longkd.tools import bench_encoding as bench
from tests.cache.test_column_codecs import logprob_error
from tests.helpers import build_cache, write_random_text

VOCAB, W = 300, 32


@pytest.fixture(scope="module")
def caches(tiny_model_dir, tmp_path_factory):
    teacher = tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=32, num_layers=1, seed=7)
    root = tmp_path_factory.mktemp("bench")
    data = write_random_text(root / "d.jsonl", samples=40, vocab=VOCAB, lengths=(5, 40), seed=3)
    made = {"teacher": teacher}
    for name, encoding in (("plain", "plain"), ("compact", "compact")):
        made[name] = build_cache(
            teacher, data, root / name, window=W, top_k=16, max_windows=6, encoding=encoding, temperature=0.3
        )
    return made


def test_column_bytes_account_for_the_shard_files(caches):
    for name in ("plain", "compact"):
        size, tokens = bench.cache_bytes(caches[name])
        assert tokens == 6 * W
        columns = bench.column_bytes(caches[name])
        assert {"ids", "input_ids", "target_logprob", "checksum"} <= set(columns)
        # each column alone carries its own per-batch framing, so the parts exceed the file a little
        assert 0.8 * size < sum(columns.values()) < 2.0 * size
    assert bench.column_bytes(caches["compact"])["ids"] < bench.column_bytes(caches["plain"])["ids"]


def test_compact_log_probs_are_within_1_128_nat_of_plain(caches):
    plain, compact = bench._windows(caches["plain"]), bench._windows(caches["compact"])
    errors = bench.logprob_errors(plain, compact)
    assert 0 < errors["max_logprob_error_all"] <= 1 / 128
    assert errors["max_target_error"] <= 1 / 128
    assert bench.logprob_errors(plain, plain)["max_logprob_error_all"] == 0


def test_logprob_errors_refuses_ids_the_plain_rows_lack(caches):
    plain, compact = bench._windows(caches["plain"]), bench._windows(caches["compact"])
    compact[0].ids[3, 0] = (int(compact[0].ids[3].max()) + 1) % VOCAB
    while compact[0].ids[3, 0] in plain[0].ids[3]:
        compact[0].ids[3, 0] = (compact[0].ids[3, 0] + 1) % VOCAB
    with pytest.raises(Exception, match="not among the plain ids"):
        bench.logprob_errors(plain, compact)


def test_bucket_losses_of_compact_rows_stay_close_to_plain(caches):
    plain, compact = bench._windows(caches["plain"]), bench._windows(caches["compact"])
    models = bench.students(caches["teacher"], plain)
    ref, got = bench.bucket_losses(models, plain), bench.bucket_losses(models, compact)
    assert set(ref) == {"untrained", "half-trained"}
    assert ref["half-trained"] < ref["untrained"]
    for name in ref:
        assert abs(got[name] - ref[name]) <= 1e-2 * ref[name]
    assert np.isfinite(bench.codec_decode_speed(caches["compact"], repeats=1))
    assert np.isfinite(bench.codec_encode_speed(caches["plain"], caches["compact"], repeats=1))


def test_long_windows_decode_to_the_cache_windows_concatenated(caches):
    windows = bench._windows(caches["compact"])
    codecs, batches = bench.long_windows(caches["compact"], window=3 * W)
    assert len(batches) == 2 and codecs.window == 3 * W
    for b, batch in enumerate(batches):
        got = codecs.decode(batch, 0, 3 * W)
        group = windows[3 * b : 3 * b + 3]
        np.testing.assert_array_equal(got["input_ids"], np.concatenate([g.input_ids for g in group]))
        np.testing.assert_array_equal(
            got["segment_starts"], np.concatenate([g.segment_starts + j * W for j, g in enumerate(group)])
        )
        ids = np.concatenate([g.ids for g in group])  # [3W, K], ascending within each row
        np.testing.assert_array_equal(got["ids"].reshape(ids.shape), ids)
        logprobs = np.concatenate([g.logprobs for g in group])
        np.testing.assert_allclose(got["logprobs"].reshape(ids.shape), logprobs, atol=1 / 128)
    assert np.isfinite(bench.long_window_decode_speed(caches["compact"], window=3 * W, repeats=1))
    with pytest.raises(Exception, match="too few"):
        bench.long_windows(caches["compact"], window=7 * W)


def test_curve_fit_errors_shrink_with_the_degree_and_vanish_on_exact_curves(caches):
    plain = bench._windows(caches["plain"])
    fits = bench.curve_fit_errors(plain, degrees=(1, 4))
    assert fits["1"]["coefficient_bpt"] == 4.0 and fits["4"]["coefficient_bpt"] == 10.0
    assert 0 < fits["4"]["mean_error"] < fits["1"]["mean_error"]
    # rows that are exactly a quadratic in log(1 + rank) fit with float16 rounding only
    k = plain[0].logprobs.shape[1]
    u = np.log1p(np.arange(k)) / np.log1p(k - 1)
    curve = -0.5 - 2.0 * u - 1.5 * u**2
    plain[0].logprobs[:] = curve
    exact = bench.curve_fit_errors(plain[:1], degrees=(2,))
    assert exact["2"]["max_error"] < 5e-3


def test_id_alternatives_measure_the_format_encoding_and_reorderings(caches):
    import dataclasses

    import zstandard

    from longkd.cache import encodings as enc

    plain = bench._windows(caches["plain"])
    got = bench.id_alternatives(plain, VOCAB)
    rows = [np.sort(w.ids, axis=1) for w in plain]
    counts = np.full(W, rows[0].shape[1])
    blobs = [enc.encode_ids(r.reshape(-1), counts, VOCAB, packing="bytes")[0] for r in rows]
    own = sum(len(zstandard.ZstdCompressor(level=3).compress(b)) for b in blobs)
    assert got["sorted_gaps"] == pytest.approx(own / (len(rows) * W))
    blobs = [enc.encode_dictionary_ids(r.reshape(-1), counts, VOCAB)[0] for r in rows]
    own = sum(len(zstandard.ZstdCompressor(level=3).compress(b)) for b in blobs)
    assert got["dictionary"] == pytest.approx(own / (len(rows) * W))
    assert 0 < got["window_dictionary_table"] < got["window_dictionary"]
    assert got["remap_sorted_gaps"] > 0 and got["sorted_gaps_same_half"] > 0
    # a window whose rows all hold the same ids: its dictionary order makes every row 0..K-1
    same = [dataclasses.replace(plain[0], ids=np.tile(rows[0][:1], (W, 1)))]
    assert bench.id_alternatives(same, VOCAB)["window_dictionary"] < got["window_dictionary"]


def test_logprob_alternatives_measure_every_grid_encoding(caches):
    """Every grid encoding is measured; on rows whose entries sit just above their smallest
    (as most of a top-k row's do), at depths that differ from row to row, grid-min's integers
    repeat from row to row and take fewer bytes than grid-max's, and grid-shift's coarse zone
    below p = 1e-4 saves on them. (A stored shift against a float32 tail: on real rows, in
    docs/benchmarks.md; these rows' tails are alike, which zstd finds.)"""
    import dataclasses

    plain = bench._windows(caches["plain"])
    got = bench.logprob_alternatives(plain, VOCAB)
    assert all(got[key] > 0 for key in ("grid_max", "grid_min", "grid_shift_fine", "grid_shift"))
    rng = np.random.default_rng()
    lp = rng.uniform(-14, -10, size=(W, 1)) + rng.uniform(0, 0.5, size=(W, 16))
    lp[:, 0] = np.log(1 - np.exp(lp[:, 1:]).sum(1) - 0.01)
    ids = np.tile(np.arange(16), (W, 1)).astype(np.int32)
    near_min = [dataclasses.replace(plain[0], ids=ids, logprobs=lp.astype(np.float32)) for _ in range(3)]
    sizes = bench.logprob_alternatives(near_min, VOCAB)
    assert sizes["grid_min"] < sizes["grid_max"]
    # every entry but the first lies below 1e-4: the coarser grid applies to them, and saves
    assert sizes["share_below_1e-4"] == pytest.approx(15 / 16)
    assert max(sizes["grid_shift"], sizes["grid_shift_coarse4"]) < sizes["grid_shift_fine"]
    assert sizes["grid_shift_coarse16"] > 0


def test_earlier_decode_speeds_time_both_encodings_of_the_same_rows(caches):
    speeds = bench.earlier_decode_speeds(caches["compact"], repeats=1)
    assert set(speeds) == {"current", "earlier"} and all(v > 0 for v in speeds.values())
    columns = json.loads((caches["compact"] / "manifest.json").read_text())["encoding"]["columns"]
    current, earlier = (bench.long_windows(caches["compact"], W, e) for e in (None, bench.earlier(columns)))
    assert current[0].names[fmt.LOGPROBS] == "grid-shift" and earlier[0].names[fmt.LOGPROBS] == "grid-min"
    for a, b in zip(current[1], earlier[1], strict=True):
        x, y = current[0].decode(a, 0, W), earlier[0].decode(b, 0, W)
        for column in x:  # the same rows: log-probs each within its encoding's bound
            if column == fmt.LOGPROBS:
                assert (np.abs(x[column] - y[column]) <= 2 * logprob_error(y[column], "grid-shift")).all()
            else:
                np.testing.assert_array_equal(x[column], y[column])
