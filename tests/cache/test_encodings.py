"""Compact column encodings: round trips within the grid, adversarial rows, corrupt blobs.

Every encoding is checked against plain numpy references on fresh random rows (ragged and
fixed-K, vocabularies from 2 to 262,144) and on the rows that break naive code: all-equal
log-probs, -inf entries, one entry, k = V, ids 0 and V - 1, empty rows. Corrupt blobs must
raise LongkdError. The numpy recipes of docs/format.md ("Column encodings") decode the sections.
"""

from __future__ import annotations

import numpy as np
import pytest

from longkd.cache import encodings as enc
from longkd.errors import LongkdError

LAYOUTS = enc.LOGPROB_LAYOUTS
PACKINGS = enc.PACKINGS


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def random_rows(rng, rows: int, vocab: int, cap: int, ragged: bool, scale: float = 3.0):
    """Rows of distinct ids in rank order with their log-probs over the full vocabulary.

    Returns:
        ids int32[n], logprobs float32[n] (descending per row), counts int64[rows].
    """
    logits = rng.normal(size=(rows, vocab)) * scale
    lp = log_softmax(logits)
    top = np.argsort(-lp, axis=1, kind="stable")[:, :cap]
    counts = rng.integers(0, cap + 1, size=rows) if ragged else np.full(rows, cap)
    ids = enc.ragged_from_dense(top, counts).astype(np.int32)
    logprobs = enc.ragged_from_dense(np.take_along_axis(lp, top, 1), counts).astype(np.float32)
    return ids, logprobs, counts


def sort_rows_by_id(ids, logprobs, counts):
    rows = np.repeat(np.arange(len(counts)), counts)
    order = np.lexsort((ids, rows))
    return ids[order], logprobs[order]


def reference_tail(logprobs, counts):
    out = np.ones(len(counts))
    for r, (a, b) in enumerate(zip(enc.row_starts(counts), enc.row_starts(counts) + counts)):
        out[r] = 1.0 - np.exp(logprobs[a:b].astype(np.float64)).sum()
    return out


def check_logprobs(values, counts, layout, steps, packing):
    """Encode and decode; every entry within half a grid step, -inf exact, tail exact in float32
    (``grid-shift``: no tail, each row moved by its random stored shift instead)."""
    shifts, moved = None, np.zeros(values.shape)
    if layout == "grid-shift":
        shifts = np.random.default_rng(len(counts)).integers(-400, 400, len(counts))
        shifts[0] = -(2**20)  # far beyond a real row's shift: still exact
        moved = np.repeat(shifts / enc.DEFAULT_SHIFT_STEPS, counts)
    blob = enc.encode_logprobs(values, counts, layout=layout, steps=steps, packing=packing, shifts=shifts)
    got, tail = enc.decode_logprobs(blob, counts)
    assert got.shape == values.shape and got.dtype == np.float32
    neginf = np.isneginf(values)
    np.testing.assert_array_equal(np.isneginf(got), neginf)
    err = np.abs(got[~neginf].astype(np.float64) - moved[~neginf] - values[~neginf])
    assert err.size == 0 or err.max() <= 0.5 / steps + 1e-6 * max(1, np.abs(values[~neginf]).max())
    if layout == "grid-shift":
        assert tail is None
    else:
        np.testing.assert_allclose(tail, reference_tail(values, counts).astype(np.float32), rtol=0, atol=1e-7)
    return got


# ----------------------------------------------------------------------------- bit packing


def test_pack_bits_is_lsb_first():
    # 1, 2, 3 at 2 bits: 01 | 10 << 2 | 11 << 4 -> 0b00111001
    assert enc.pack_bits(np.array([1, 2, 3]), 2).tobytes() == bytes([0b00111001])
    # 9 bits: 0x1FF then 1 -> bytes ff 03 00 (value 1 starts at bit 9)
    assert enc.pack_bits(np.array([0x1FF, 1]), 9).tobytes() == bytes([0xFF, 0x03, 0x00])


@pytest.mark.parametrize("width", list(range(0, 33)))
def test_pack_bits_round_trip(width):
    rng = np.random.default_rng(width)
    for n in (0, 1, 7, 8, 9, 1000, enc.FEW_PACKED_VALUES, enc.FEW_PACKED_VALUES + 1, 5000):
        top = (1 << width) - 1
        values = rng.integers(0, top + 1, size=n, dtype=np.uint64) if width else np.zeros(n, np.uint64)
        if n:
            values[0] = top
        packed = enc.pack_bits(values, width)
        assert packed.size == -(-n * width // 8)
        np.testing.assert_array_equal(enc.unpack_bits(packed, n, width), values)


def test_pack_bits_refuses_what_does_not_fit():
    with pytest.raises(LongkdError, match="do not fit 3 unsigned bits"):
        enc.pack_bits(np.array([8]), 3)
    with pytest.raises(LongkdError, match="outside 0..32"):
        enc.pack_bits(np.array([1]), 33)
    with pytest.raises(LongkdError, match="need 2"):
        enc.unpack_bits(np.zeros(3, np.uint8), 3, 5)


def test_shuffle_bytes_round_trip():
    rng = np.random.default_rng(1)
    for size in (1, 2, 4):
        values = rng.integers(0, 1 << (8 * size), size=257, dtype=np.uint64)
        data = enc.shuffle_bytes(values, size)
        assert data[: values.size].tolist() == (values & 0xFF).tolist()  # plane 0: the low bytes
        np.testing.assert_array_equal(enc.unshuffle_bytes(data, values.size, size), values)


# ----------------------------------------------------------------------------- ids


@pytest.mark.parametrize("vocab", [2, 3, 1000, 32000, 262144])
@pytest.mark.parametrize("packing", PACKINGS)
def test_ids_round_trip_random_rows(vocab, packing):
    rng = np.random.default_rng(vocab)
    ids, logprobs, counts = random_rows(rng, 40, min(vocab, 4096), cap=min(vocab, 64), ragged=True)
    ids = ids * (vocab // min(vocab, 4096))  # spread over the whole vocabulary, still distinct
    for width in ("max", "vocab"):
        blob, order = enc.encode_ids(ids, counts, vocab, packing=packing, width=width)
        got = enc.decode_ids(blob, counts, vocab)
        expected, _ = sort_rows_by_id(ids, logprobs, counts)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(ids[order], expected)


def adversarial_id_rows(vocab: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k = V (every id, reversed), ids 0 and V - 1 alone, an empty row, one entry: ``(ids,
    counts, the rows sorted)``."""
    rows = [
        np.arange(vocab)[::-1],
        np.array([vocab - 1, 0]),
        np.array([], int),
        np.array([vocab - 1]),
        np.array([0]),
    ]
    return np.concatenate(rows), np.array([len(r) for r in rows]), np.concatenate([np.sort(r) for r in rows])


@pytest.mark.parametrize("vocab", [2, 262144])
def test_ids_adversarial_rows(vocab):
    ids, counts, expected = adversarial_id_rows(vocab)
    for packing in PACKINGS:
        blob, order = enc.encode_ids(ids, counts, vocab, packing=packing)
        got = enc.decode_ids(blob, counts, vocab)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(ids[order], got)


def docs_sections(data: np.ndarray, pos: int) -> list[tuple[int, np.ndarray]]:
    """Every section of a blob from byte ``pos`` to its end as ``(kind, values)``, read as
    docs/format.md "Sections" says with numpy alone: byte-shuffled integers (int64) and float32
    (the kinds longkd's compact ids and log-probs write)."""
    out = []
    while pos < data.size:
        kind, n = int(data[pos]), int.from_bytes(data[pos + 1 : pos + 5].tobytes(), "little")
        size = 4 if kind == 0xF4 else kind - 0x80
        payload = data[pos + 5 : pos + 5 + n * size]
        if kind == 0xF4:
            out.append((kind, payload.view("<f4")))
        else:
            out.append((kind, payload.reshape(size, n).T.copy().view(f"<u{size}").ravel().astype(np.int64)))
        pos += 5 + n * size
    assert pos == data.size
    return out


@pytest.mark.parametrize("vocab", [2, 3, 1000, 32000, 262144])
def test_dictionary_ids_round_trip_random_rows(vocab):
    """The dictionary encoding gives what sorted gaps give: each row's ids ascending, in the
    same stored order; rows drawn from a few ids (as a window's top-k rows are) and from the
    whole vocabulary."""
    rng = np.random.default_rng()
    for spread in (1, vocab // min(vocab, 4096)):
        ids, logprobs, counts = random_rows(rng, 40, min(vocab, 4096), cap=min(vocab, 64), ragged=True)
        ids = ids * spread
        blob, order = enc.encode_dictionary_ids(ids, counts, vocab)
        got = enc.decode_dictionary_ids(blob, counts, vocab)
        expected, _ = sort_rows_by_id(ids, logprobs, counts)
        np.testing.assert_array_equal(got, expected)
        np.testing.assert_array_equal(ids[order], expected)
        _, sorted_order = enc.encode_ids(ids, counts, vocab)
        np.testing.assert_array_equal(order, sorted_order)


@pytest.mark.parametrize("vocab", [2, 262144])
def test_dictionary_ids_adversarial_rows(vocab):
    ids, counts, expected = adversarial_id_rows(vocab)
    blob, order = enc.encode_dictionary_ids(ids, counts, vocab)
    got = enc.decode_dictionary_ids(blob, counts, vocab)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(ids[order], got)  # and windows without entries, or rows:
    for counts in (np.zeros(3, int), np.zeros(0, int)):
        empty, _ = enc.encode_dictionary_ids(np.array([], int), counts, vocab)
        assert enc.decode_dictionary_ids(empty, counts, vocab).size == 0


def test_dictionary_ids_beyond_the_dense_mask():
    """Vocabularies above DENSE_DICTIONARY_MAX find the dictionary by sorting: same blob."""
    rng = np.random.default_rng()
    counts = rng.integers(0, 9, size=30)
    ids = np.concatenate([rng.choice(5000, c, replace=False) * 200 for c in counts])  # < 2**20
    big, order = enc.encode_dictionary_ids(ids, counts, 2**26)
    np.testing.assert_array_equal(enc.decode_dictionary_ids(big, counts, 2**26), ids[order])
    dense, _ = enc.encode_dictionary_ids(ids, counts, enc.DENSE_DICTIONARY_MAX)
    assert big == dense


def test_dictionary_ids_decode_with_numpy_alone():
    """docs/format.md "dictionary": two sections of sorted gaps, the second indexing the first."""
    rng = np.random.default_rng()
    vocab, w, k = 32000, 30, 16
    ids = np.stack([rng.choice(300, k, replace=False) * 100 for _ in range(w)]).reshape(-1)
    blob, _ = enc.encode_dictionary_ids(ids, np.full(w, k), vocab)
    (_, table), (_, places) = docs_sections(np.frombuffer(blob, np.uint8), 0)
    dictionary = np.cumsum(table + (np.arange(table.size) > 0))
    rows = np.cumsum(places.reshape(w, k) + (np.arange(k) > 0), axis=1)
    np.testing.assert_array_equal(dictionary[rows], np.sort(ids.reshape(w, k), axis=1))


@pytest.mark.parametrize("k", [1, 16, 40, 50, 64])
def test_sorted_gaps_decode_as_running_sums_in_every_width(k):
    """Fixed rows of K sorted gaps decode to ``cumsum(row) + arange(K)`` whether 16-bit lanes
    apply (values below 2**16, 8- or 16-bit gaps) or not; a row that reaches the vocabulary
    (or, damaged, sums past 2**16, where 16-bit lanes would wrap) is named, never wrapped."""
    rng = np.random.default_rng()
    for vocab in (65536, 40000, 70000):
        for top, itemsize in ((255, 1), (900, 2), (4000, 2), (65535, 2)):
            gaps = rng.integers(0, top + 1, (30, k))
            gaps[rng.random(30) < 0.3] = 0  # rows far below the vocabulary beside large ones
            want = np.cumsum(gaps, axis=1) + np.arange(k)
            blob = enc._section_ints(gaps, "bytes")
            assert blob[0] == enc.KIND_SHUFFLED[itemsize]
            if want.max() < vocab:
                np.testing.assert_array_equal(enc.decode_ids(blob, np.full(30, k), vocab), want.reshape(-1))
            else:
                row = int(np.argmax(want.max(axis=1) >= vocab))
                with pytest.raises(LongkdError, match=f"row {row}: an id decodes to {want[row].max()}"):
                    enc.decode_ids(blob, np.full(30, k), vocab)


def test_ids_refuse_bad_rows():
    with pytest.raises(LongkdError, match="repeats within a row"):
        enc.encode_ids(np.array([3, 3]), np.array([2]), 10)
    with pytest.raises(LongkdError, match="leave the vocabulary"):
        enc.encode_ids(np.array([10]), np.array([1]), 10)
    with pytest.raises(LongkdError, match="sum to 3, not 2"):
        enc.encode_ids(np.array([1, 2]), np.array([3]), 10)


def test_frequency_remap_ranks_the_most_frequent_first():
    rng = np.random.default_rng(2)
    vocab = 500
    ids = rng.zipf(1.3, size=5000) % vocab
    rank_of_id = enc.frequency_remap(ids, vocab)
    np.testing.assert_array_equal(np.sort(rank_of_id), np.arange(vocab))
    freq = np.bincount(ids, minlength=vocab)
    by_rank = np.argsort(rank_of_id)
    assert (np.diff(freq[by_rank]) <= 0).all()
    assert rank_of_id[np.argmax(freq)] == 0


# ----------------------------------------------------------------------------- log-probs


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("steps", [64, 128, 1024])
def test_logprobs_round_trip_random_rows(layout, packing, steps):
    rng = np.random.default_rng(steps)
    ids, logprobs, counts = random_rows(rng, 50, 3000, cap=64, ragged=True, scale=rng.uniform(0.5, 6))
    if layout != "grid-delta":  # any order: the order encode_ids stores
        _, logprobs = sort_rows_by_id(ids, logprobs, counts)
    check_logprobs(logprobs, counts, layout, steps, packing)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("packing", PACKINGS)
def test_logprobs_adversarial_rows(layout, packing):
    uniform = np.full(262144, -np.log(262144), np.float32)  # k = V, all equal
    rows = [
        uniform,
        np.array([0.0], np.float32),  # one entry holding all the mass
        np.array([-0.5, -np.inf, -np.inf], np.float32),  # -inf after a finite entry
        np.array([-np.inf, -np.inf], np.float32),  # nothing but -inf
        np.array([], np.float32),  # an empty row
        np.log(np.array([0.5, 0.5], np.float32)),  # V = 2, k = V
        np.array([-1e-7, -80.0, -3000.0], np.float32),  # tiny and huge magnitudes
    ]
    counts = np.array([len(r) for r in rows])
    got = check_logprobs(np.concatenate(rows), counts, layout, 64, packing)
    assert np.isneginf(got[counts[0] + 2 : counts[0] + 5]).all()


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("factor", [2, 8, 16])
def test_grid_shift_coarse_zone_rounds_beyond_its_start(packing, factor):
    """Beyond F the codes are a grid ``factor`` times coarser: every value reads back on a
    point of ``F + factor * j`` (within ``(factor + 1) / (2 * steps)``), values up to F on
    the fine grid, -inf exact; codes and grid integers are each other's inverse."""
    rng = np.random.default_rng()
    steps = 64
    zone = int(np.ceil(-np.log(enc.COARSE_BELOW_P) * steps)) + int(rng.integers(0, 50))
    counts = rng.integers(0, 33, 40)
    logprobs = rng.uniform(-25, -4, int(counts.sum())).astype(np.float32)  # both sides of F
    logprobs[rng.random(logprobs.size) < 0.02] = -np.inf
    shifts = rng.integers(-300, 300, len(counts))
    blob = enc.encode_logprobs(
        logprobs, counts, "grid-shift", steps, packing, shifts=shifts, coarse_from=zone, coarse_factor=factor
    )
    got, tail = enc.decode_logprobs(blob, counts)
    assert tail is None
    finite = np.isfinite(logprobs)
    np.testing.assert_array_equal(np.isneginf(got), ~finite)
    a = np.rint(-got[finite].astype(np.float64) * steps + np.repeat(shifts, counts)[finite] * steps / 2**14)
    x = -logprobs[finite].astype(np.float64) * steps
    coarse = x > zone + 0.5
    assert coarse.any() and (~coarse).any()
    assert (np.abs(a - x)[~coarse] <= 0.5 + 1e-3).all()
    # rounded to the fine grid, then to the coarse one (snap_to_grid rounds once, from x)
    assert (np.abs(a - x)[coarse] <= (factor + 1) / 2 + 1e-3).all() and (
        (a[coarse] - zone) % factor == 0
    ).all()
    grid = rng.integers(0, 5000, 1000)
    on_grid = np.where(grid > zone, zone + factor * ((grid - zone) // factor), grid)
    np.testing.assert_array_equal(
        enc.fine_grid(enc.coarse_codes(on_grid, zone, factor), zone, factor), on_grid
    )


@pytest.mark.parametrize("layout", ["grid-min", "grid-shift"])
def test_grid_table_decodes_the_bits_of_the_arithmetic(layout, monkeypatch):
    """Decoding through grid_table gives the float32 bits of ``-fine_grid(code) / steps`` plus
    the shift computed entry by entry (what GRID_TABLE_MAX = 0 forces), fixed and ragged rows."""
    rng = np.random.default_rng()
    for ragged in (False, True):
        _, logprobs, counts = random_rows(rng, 40, 3000, cap=64, ragged=ragged, scale=rng.uniform(1, 8))
        logprobs[rng.random(logprobs.size) < 0.01] = -np.inf
        extra = {}
        if layout == "grid-shift":
            extra = {"shifts": rng.integers(-999, 999, 40), "coarse_from": 700, "coarse_factor": 8}
        blob = enc.encode_logprobs(logprobs, counts, layout, 68, "bytes", **extra)
        table, tail = enc.decode_logprobs(blob, counts)
        monkeypatch.setattr(enc, "GRID_TABLE_MAX", 0)
        arithmetic, same_tail = enc.decode_logprobs(blob, counts)
        monkeypatch.undo()
        assert table.tobytes() == arithmetic.tobytes()
        assert (tail is None) == (same_tail is None)
        assert tail is None or tail.tobytes() == same_tail.tobytes()


def test_grid_shift_refuses_a_coarse_zone_a_reader_could_not_trust():
    values, counts, shifts = np.array([-1.0, -12.0], np.float32), np.array([2]), np.array([0])
    for zone, factor, why in ((500, 8, "starts above p = 0.0001"), (700, 32, "rounds by more than")):
        with pytest.raises(LongkdError, match=why):
            enc.encode_logprobs(
                values, counts, "grid-shift", 64, shifts=shifts, coarse_from=zone, coarse_factor=factor
            )
    with pytest.raises(LongkdError, match="one shift per row"):
        enc.encode_logprobs(values, counts, "grid-shift", 64)


def test_zigzag_round_trips_signed_integers():
    values = np.r_[0, -1, 1, -2, 2, np.random.default_rng().integers(-(2**40), 2**40, 100)]
    assert enc.zigzag(values[:5]).tolist() == [0, 1, 2, 3, 4]
    np.testing.assert_array_equal(enc.unzigzag(enc.zigzag(values)), values)


def test_grid_delta_refuses_unsorted_rows():
    with pytest.raises(LongkdError, match="descending"):
        enc.encode_logprobs(np.array([-2.0, -1.0], np.float32), np.array([2]), layout="grid-delta")
    with pytest.raises(LongkdError, match="descending"):
        enc.encode_logprobs(np.array([-np.inf, -1.0], np.float32), np.array([2]), layout="grid-delta")


def test_logprobs_refuse_nan_and_positive():
    with pytest.raises(LongkdError, match="not a log-probability"):
        enc.encode_logprobs(np.array([np.nan], np.float32), np.array([1]))
    with pytest.raises(LongkdError, match="not a log-probability"):
        enc.encode_logprobs(np.array([0.1], np.float32), np.array([1]))


def test_target_logprob_round_trip():
    rng = np.random.default_rng(3)
    values = -rng.exponential(3.0, size=300).astype(np.float32)
    values[250:] = np.nan
    values[0] = 0.0
    for packing in PACKINGS:
        got = enc.decode_target_logprob(enc.encode_target_logprob(values, steps=128, packing=packing), 300)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(values))
        assert np.nanmax(np.abs(got - values)) <= 0.5 / 128 + 1e-6
    with pytest.raises(LongkdError, match="infinite"):
        enc.encode_target_logprob(np.array([-np.inf]))


# ----------------------------------------------------------------------------- integers and rows


@pytest.mark.parametrize("vocab", [2, 32000, 262144])
def test_input_ids_at_the_vocabulary_width(vocab):
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab, size=1024)
    ids[:2] = [0, vocab - 1]
    width = enc.bits_for(vocab - 1)
    blob = enc.encode_uints(ids, width=width)
    assert len(blob) == enc.SECTION_HEADER + -(-1024 * width // 8)
    np.testing.assert_array_equal(enc.decode_uints(blob, 1024, "input_ids", limit=vocab), ids)


@pytest.mark.parametrize("draws", [1, 64, 255, 1000])
def test_sampled_counts_round_trip(draws):
    rng = np.random.default_rng(draws)
    counts = rng.integers(1, draws + 1, size=500)
    for packing in PACKINGS:
        blob = enc.encode_uints(counts, packing=packing, offset=1)
        if packing == "bytes" and draws <= 256:
            assert blob[0] == enc.KIND_SHUFFLED[1]  # one byte a count
        np.testing.assert_array_equal(
            enc.decode_uints(blob, 500, "counts", offset=1, limit=draws + 1), counts
        )
    with pytest.raises(LongkdError, match="below the encoding's offset"):
        enc.encode_uints(np.array([0]), offset=1)


def test_segment_starts_round_trip():
    starts = np.array([0, 1, 2, 100, 1023])
    np.testing.assert_array_equal(
        enc.decode_segment_starts(enc.encode_segment_starts(starts, 1024), 1024), starts
    )
    np.testing.assert_array_equal(enc.decode_segment_starts(enc.encode_segment_starts([0], 1), 1), [0])
    with pytest.raises(LongkdError, match="beyond the window's length 1000"):
        enc.decode_segment_starts(enc.encode_segment_starts(starts, 1024), 1000)
    with pytest.raises(LongkdError, match="start at 0"):
        enc.encode_segment_starts(np.array([1, 2]), 10)


def reference_entry_counts(lp, cap, min_mass, min_prob):
    out = []
    for row in lp:
        p = np.exp(row.astype(np.float64))
        n = cap
        if min_mass is not None:
            n = min(n, next((i + 1 for i in range(len(p)) if p[: i + 1].sum() >= min_mass), len(p)))
        if min_prob is not None:
            n = min(n, int((p >= min_prob).sum()))
        out.append(max(1, min(n, int(np.isfinite(row).sum()))))
    return np.array(out)


@pytest.mark.parametrize("rules", [(0.999, None), (None, 1e-3), (0.99, 1e-4), (None, None)])
def test_select_entry_counts_matches_reference(rules):
    rng = np.random.default_rng(4)
    lp = np.sort(log_softmax(rng.normal(size=(200, 500)) * rng.uniform(0.5, 8, size=(200, 1))), axis=1)[
        :, ::-1
    ]
    lp = lp[:, :64].astype(np.float32)
    lp[0, 3:] = -np.inf
    got = enc.select_entry_counts(lp, cap=48, min_mass=rules[0], min_prob=rules[1])
    np.testing.assert_array_equal(got, reference_entry_counts(lp, 48, *rules))
    assert got[0] <= 3 and got.min() >= 1 and got.max() <= 48
    flat = enc.ragged_from_dense(lp, got)
    np.testing.assert_array_equal(enc.dense_from_ragged(flat, got, 64, -np.inf)[:, :1], lp[:, :1])
    with pytest.raises(LongkdError, match="min_mass"):
        enc.select_entry_counts(lp, min_mass=1.5)


def test_rank_order_reconstructs_rows_sorted_by_id():
    rng = np.random.default_rng(5)
    ids, logprobs, counts = random_rows(rng, 30, 2000, cap=16, ragged=True)
    blob, order = enc.encode_ids(ids, counts, 2000)
    stored_ids = enc.decode_ids(blob, counts, 2000)
    stored_lp, _ = enc.decode_logprobs(enc.encode_logprobs(logprobs[order], counts, steps=4096), counts)
    back = enc.rank_order(stored_lp, stored_ids, counts)
    np.testing.assert_array_equal(stored_ids[back], ids)  # distinct log-probs: the original order


# ----------------------------------------------------------------------------- corrupt blobs


def test_corrupt_blobs_raise():
    rng = np.random.default_rng(6)
    ids, logprobs, counts = random_rows(rng, 8, 1000, cap=8, ragged=False)
    id_blob, order = enc.encode_ids(ids, counts, 1000)
    lp_blob = enc.encode_logprobs(logprobs[order], counts)
    cases = [
        (lambda: enc.decode_ids(id_blob[:-1], counts, 1000), "needs .* bytes"),
        (lambda: enc.decode_ids(id_blob + b"\0", counts, 1000), "1 bytes left"),
        (lambda: enc.decode_ids(id_blob[:3], counts, 1000), "cut off"),
        (lambda: enc.decode_ids(id_blob, counts[:-1], 1000), "holds 64 values, expected 56"),
        (lambda: enc.decode_ids(bytes([40]) + id_blob[1:], counts, 1000), "unknown kind"),
        (lambda: enc.decode_ids(id_blob, counts, 500), "beyond the vocabulary of 500"),
        (lambda: enc.decode_logprobs(b"", counts), "empty"),
        (lambda: enc.decode_logprobs(bytes([7]) + lp_blob[1:], counts), "unknown layout"),
        (lambda: enc.decode_logprobs(lp_blob[:1] + b"\0\0" + lp_blob[3:], counts), "zero grid steps"),
        (lambda: enc.decode_logprobs(lp_blob[:-4] + np.float32(np.nan).tobytes(), counts), "tail mass"),
        (lambda: enc.decode_logprobs(lp_blob[:-4] + np.float32(1.5).tobytes(), counts), "tail mass"),
        (lambda: enc.decode_logprobs(lp_blob[:-1], counts), "needs 32 bytes"),
        (lambda: enc.decode_uints(enc.encode_uints(np.array([5, 9])), 2, "counts", limit=9), "not below 9"),
        (
            lambda: enc.decode_logprobs(lp_blob, counts, layout="grid-min"),
            r"layout 0 \(grid-max\) where grid-min",
        ),
    ]
    dict_blob, _ = enc.encode_dictionary_ids(ids, counts, 1000)
    table_end = enc.SECTION_HEADER + int.from_bytes(dict_blob[1:5], "little") * (dict_blob[0] - 0x80)
    last_place = bytearray(dict_blob)
    last_place[-1] = 0xFF  # the last row's last gap: beyond the dictionary
    cases += [
        (lambda: enc.decode_dictionary_ids(dict_blob[:-1], counts, 1000), "section 'places' needs .* bytes"),
        (lambda: enc.decode_dictionary_ids(dict_blob[:3], counts, 1000), "section 'dictionary' is cut off"),
        (lambda: enc.decode_dictionary_ids(dict_blob[:table_end], counts, 1000), "'places' is cut off"),
        (lambda: enc.decode_dictionary_ids(dict_blob + b"\0", counts, 1000), "1 bytes left"),
        (lambda: enc.decode_dictionary_ids(dict_blob, counts[:-1], 1000), "holds 64 values, expected 56"),
        (
            lambda: enc.decode_dictionary_ids(dict_blob, counts, 500),
            "a dictionary id decodes to .* beyond the vocabulary of 500",
        ),
        (
            lambda: enc.decode_dictionary_ids(bytes(last_place), counts, 1000),
            "row 7: a place decodes to .* beyond the dictionary",
        ),
    ]
    min_blob = bytearray(enc.encode_logprobs(logprobs[order], counts, layout="grid-min", packing="bytes"))
    entries = 3 + enc.SECTION_HEADER + 8 * (min_blob[3] - 0x80)  # layout, steps, then the row bases
    assert min_blob[entries] == 0x81 or min_blob[entries] == 0x82
    min_blob[entries + enc.SECTION_HEADER + 5] = 0xFE  # row 0's entry 5: far below the row's smallest
    cases.append((lambda: enc.decode_logprobs(bytes(min_blob), counts), "row 0: an entry lies above 0"))
    for call, message in cases:
        with pytest.raises(LongkdError, match=message):
            call()


@pytest.mark.parametrize("packing", ["bits", "bytes"])
def test_huge_id_gaps_are_refused_not_wrapped(packing):
    """Gaps whose sums overflow 32 bits (a damaged blob) name the row, in fixed and ragged rows."""
    for counts in (np.array([2, 2]), np.array([3, 1])):
        gaps = np.array([1, 2**31, 2**31 - 1, 2**31 + 5])
        blob = enc._section_ints(gaps, packing)
        with pytest.raises(LongkdError, match="row 0: an id decodes to .* beyond the vocabulary"):
            enc.decode_ids(blob, counts, 262144)


# ----------------------------------------------------------------------------- docs/format.md


def test_sections_decode_with_the_numpy_recipes_of_the_docs():
    rng = np.random.default_rng(7)
    for width in (1, 5, 15, 18, 32):
        values = rng.integers(0, 1 << width, size=77, dtype=np.uint64)
        payload = np.frombuffer(enc.encode_uints(values, width=width)[enc.SECTION_HEADER :], np.uint8)
        bits = np.unpackbits(payload, bitorder="little")[: 77 * width].reshape(77, width)
        np.testing.assert_array_equal(
            bits.astype(np.uint64) @ (np.uint64(1) << np.arange(width, dtype=np.uint64)), values
        )
    values = rng.integers(0, 60000, size=77)
    blob = enc.encode_uints(values, packing="bytes")
    assert blob[0] == 0x82
    payload = np.frombuffer(blob[enc.SECTION_HEADER :], np.uint8)
    np.testing.assert_array_equal(payload.reshape(2, 77).T.copy().view("<u2").ravel(), values)
