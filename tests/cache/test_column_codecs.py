"""Format 3's column encodings (cache/column_codecs.py) through the row codec: a window stored
compact reads back as the same arrays as stored plain (log-probs within the grid, the tail
exact), damaged compact columns are one clear error, and the manifest's ``encoding.columns``
is validated. The bit-level round trips of each encoding are tests/cache/test_encodings.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest

from longkd.cache import encodings as enc
from longkd.cache import format as fmt
from longkd.cache.column_codecs import COARSE_FACTOR, LOGPROB_STEPS, ColumnCodecs, renormalise
from longkd.cache.encodings import decode_logprobs, encode_logprobs
from longkd.cache.manifest import load_manifest
from longkd.cache.reader import CacheReader
from longkd.cache.rows import BadShard, RowRules, dense_rows, read_columns, window_record_batch
from longkd.cache.storage import Location
from longkd.cache.verify import verify_cache
from longkd.cache.writer import ShardWriter
from longkd.errors import LongkdError
from tests.cache.test_format import finish_synthetic_cache, make_sampled_rows, make_topk_rows, make_window

GRID = 1 / 64  # target_logprob's grid: rounding <= GRID / 2
LOGPROB_ERROR = 1 / 128  # what longkd's grid log-probs read back within (snap_to_grid)
# grid-shift below p = 1e-4: the coarse grid's rounding (8 / 136) plus the row's shift (as
# much again where no entry of the row is above 1e-4), and the shift's own step
COARSE_ERROR = 2 * COARSE_FACTOR / (2 * LOGPROB_STEPS) + 2**-15
SHIFT_TAIL_ERROR = 2**-15 + 1e-6  # grid-shift's covered mass: relative, from the shift's step


def logprob_error(reference: np.ndarray, encoding: str) -> np.ndarray | float:
    """How far longkd's ``encoding`` log-probs read back from ``reference``'s (float[n])."""
    if encoding != "grid-shift":
        return LOGPROB_ERROR
    return np.where(reference >= np.log(enc.COARSE_BELOW_P), LOGPROB_ERROR, COARSE_ERROR)


def tail_error(encoding: str) -> float:
    """How far a row's tail ``1 - sum(exp)`` reads back from the teacher's under ``encoding``."""
    return SHIFT_TAIL_ERROR if encoding == "grid-shift" else 2e-6


def compact(mode: str, size: int, w: int, vocab: int) -> ColumnCodecs:
    return ColumnCodecs(mode, size, w, vocab, fmt.encoding_preset("compact", mode))


# Earlier compact encodings of ids and log-probs: format-3 caches written with them stay
# readable (the first compact preset, then dictionary with grid-min).
EARLIER_COMPACT = {
    "earlier": {fmt.IDS: "sorted-gaps", fmt.LOGPROBS: "grid-max"},
    "grid-min": {fmt.IDS: "dictionary", fmt.LOGPROBS: "grid-min"},
}


COMPACT_KINDS = ["compact", *EARLIER_COMPACT]


def stored_logprobs(encoding: str) -> str:
    """The log-prob encoding of ``compact`` or one of EARLIER_COMPACT."""
    return encodings_of(encoding, "topk")[fmt.LOGPROBS]


def encodings_of(encoding: str, mode: str) -> dict:
    """``plain``, ``compact``, or one of EARLIER_COMPACT: compact with its ids and log-probs."""
    if encoding in EARLIER_COMPACT:
        named = fmt.encoding_preset("compact", mode)
        return {column: EARLIER_COMPACT[encoding].get(column, name) for column, name in named.items()}
    return fmt.encoding_preset(encoding, mode)


def rules_for(mode: str, size: int, w: int, vocab: int, encoding: str) -> RowRules:
    key = fmt.selection_format(mode).size_key
    return RowRules(
        window=w,
        vocab=vocab,
        selection={"mode": mode, key: size},
        logprob_dtype="float32",
        version=3,
        encodings=encodings_of(encoding, mode),
    )


def both(window, rows, mode, size, w, vocab, encoding="compact"):
    """The window read back stored plain and stored ``encoding`` (each checked by every rule)."""
    out = []
    for name in ("plain", encoding):
        rules = rules_for(mode, size, w, vocab, name)
        batch = window_record_batch(window, rows, mode, "float32", rules.codecs)
        assert batch.schema.equals(rules.schema)
        columns = read_columns(batch, 0, mode, rules.codecs)
        rules.check_all(columns)
        out.append(columns)
    return out


def by_row(ids: np.ndarray, values: np.ndarray, splits: np.ndarray) -> list[dict]:
    return [dict(zip(ids[a:b].tolist(), values[a:b].tolist())) for a, b in zip(splits[:-1], splits[1:])]


def assert_same_window(plain, packed, splits, logprobs="grid-shift"):
    """Compact ``packed`` equals ``plain``: exact ids (as sets per row), counts, row splits,
    input ids and segment starts; log-probs (stored as ``logprobs``) and target log-probs
    within the grid; the tail ``1 - sum(exp)`` of every row as plain float32 gives it."""
    for name in (fmt.INPUT_IDS, fmt.SEGMENT_STARTS, fmt.IDS, fmt.TARGET_LOGPROB):
        assert packed.values(name).dtype == plain.values(name).dtype, name
    np.testing.assert_array_equal(packed.input_ids, plain.input_ids)
    np.testing.assert_array_equal(packed.segment_starts, plain.segment_starts)
    np.testing.assert_array_equal(np.isnan(packed.target_logprob), np.isnan(plain.target_logprob))
    np.testing.assert_allclose(packed.target_logprob, plain.target_logprob, atol=GRID / 2 + 1e-6)
    assert packed.entry_order == "id" and plain.entry_order == "rank"
    for name in plain.mode_columns:
        if name == fmt.ROW_SPLITS:
            np.testing.assert_array_equal(packed.mode_columns[name], plain.mode_columns[name])
            continue
        assert packed.mode_columns[name].dtype == plain.mode_columns[name].dtype
        want = by_row(plain.ids, plain.mode_columns[name], splits)
        got = by_row(packed.ids, packed.mode_columns[name], splits)
        for a, b in zip(want, got):
            assert a.keys() == b.keys()
            ids = np.array(list(a))
            assert list(b) == sorted(b), "compact rows are stored by ascending id"
            if name == fmt.LOGPROBS:
                got, ref = np.array([b[i] for i in ids]), np.array([a[i] for i in ids])
                assert (np.abs(got - ref) <= logprob_error(ref, logprobs)).all()
            else:
                assert [b[i] for i in ids] == [a[i] for i in ids]
    if fmt.LOGPROBS in plain.mode_columns:
        starts = np.asarray(splits[:-1], np.int64)
        tails = [
            1 - np.add.reduceat(np.exp(np.asarray(c.mode_columns[fmt.LOGPROBS], np.float64)), starts)
            for c in (plain, packed)
        ]
        np.testing.assert_allclose(tails[1], tails[0], rtol=0, atol=tail_error(logprobs))


def topk_splits(w, k):
    return np.arange(w + 1) * k


@pytest.mark.parametrize("encoding", COMPACT_KINDS)
@pytest.mark.parametrize("vocab,k", [(60, 5), (2, 2), (2, 1), (300, 300)])
def test_topk_compact_window_equals_plain(vocab, k, encoding):
    rng = np.random.default_rng()
    w = int(rng.integers(8, 40))
    window = make_window(
        rng, int(rng.integers(0, 1000)), w, max(vocab, 5), length=w - int(rng.integers(0, 3))
    )
    window.input_ids = np.minimum(window.input_ids, vocab - 1)
    rows = make_topk_rows(rng, window, vocab, k)
    plain, packed = both(window, rows, "topk", k, w, vocab, encoding)
    assert_same_window(plain, packed, topk_splits(w, k), stored_logprobs(encoding))
    ids, logprobs, counts = dense_rows(packed, w, {"mode": "topk", "k": k})
    assert ids.shape == logprobs.shape == (w, k) and counts is None


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_decoding_some_columns_gives_what_decoding_all_gives(mode):
    """``ColumnCodecs.decode(columns=...)``: each column alone, entry columns first included."""
    batch, rules = one_compact_batch(mode)
    length = int(batch.column(fmt.LENGTH)[0].as_py())
    everything = rules.codecs.decode(batch, 0, length)
    for column in everything:
        alone = rules.codecs.decode(batch, 0, length, (column,))
        assert list(alone) == [column]
        np.testing.assert_array_equal(alone[column], everything[column])


@pytest.mark.parametrize("encoding", COMPACT_KINDS)
def test_topk_adversarial_rows(encoding):
    """All-equal log-probs, ids 0 and V - 1 in every row, a row holding the whole mass, and
    V = 262,144."""
    rng = np.random.default_rng()
    vocab, w, k = 262_144, 6, 4
    window = make_window(rng, 3, w, vocab)
    window.input_ids[:2] = [0, vocab - 1]
    ids = np.stack(
        [np.r_[0, vocab - 1, rng.choice(np.arange(1, vocab - 1), 2, replace=False)] for _ in range(w)]
    )
    lp = np.full((w, k), np.log(0.25), np.float32)  # all equal, no tail
    lp[1] = [-1e-7, -30.0, -40.0, -50.0]  # almost all the mass on one entry
    lp[2] = [-1.5, -1.5, -1.5, -100.0]  # ties and a far entry (grid integer 6400)
    target = lp[:, 0].copy()
    rows = SimpleNamespace(ids=ids.astype(np.int32), logprobs=lp, target_logprob=target)
    plain, packed = both(window, rows, "topk", k, w, vocab, encoding)
    assert_same_window(plain, packed, topk_splits(w, k), stored_logprobs(encoding))


def test_grid_shift_holds_its_bounds_where_the_coarse_zone_carries_the_mass():
    """Rows built against the coarse zone: every entry below p = 1e-4 (a flat teacher), one
    entry just above 1e-4 among coarse ones that hold most of the covered mass, entries on
    both sides of the zone's start, peaked rows, and random rows of every spread. Entries of
    p >= 1e-4 read back within 1/128 nat, the others within the zone's bound, the tail within
    2^-15 of the covered mass."""
    from longkd.cache.column_codecs import ENCODINGS, WindowContext

    rng = np.random.default_rng()
    k, vocab = 48, 32000
    rows = [
        np.full(k, -np.log(vocab), np.float64),  # all below 1e-4 (uniform over V)
        np.r_[np.log(1.2e-4), np.full(k - 1, np.log(9e-5))],  # one just above 1e-4
        np.log(np.linspace(5e-5, 2e-4, k)),  # across the line
        np.r_[np.log(0.99), np.full(k - 1, -12.0)],  # peaked
        -9.2103 - np.arange(k) / 68 / 3,  # a third of a grid step apart, around F
    ]
    for spread in rng.uniform(0.5, 16, 60):
        logits = rng.normal(size=vocab) * spread
        rows.append(np.sort(logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max())[::-1][:k])
    x = np.stack(rows).astype(np.float32)
    w = x.shape[0]
    ctx = WindowContext(w, vocab, w, np.full(w, k))
    blob = ENCODINGS["grid-shift"].encode(x.reshape(-1), ctx)
    got = ENCODINGS["grid-shift"].decode(np.frombuffer(blob, np.uint8), ctx).reshape(w, k).astype(np.float64)
    ref = x.astype(np.float64)
    assert (np.abs(got - ref) <= logprob_error(ref, "grid-shift")).all()
    covered = np.exp(ref).sum(1)
    assert (np.abs(np.exp(got).sum(1) - covered) <= SHIFT_TAIL_ERROR * covered).all()


@pytest.mark.parametrize("encoding", COMPACT_KINDS)
@pytest.mark.parametrize("draws", [1, 16, 255, 300])
def test_sampled_compact_window_equals_plain(draws, encoding):
    rng = np.random.default_rng()
    w, vocab = int(rng.integers(8, 30)), 40
    window = make_window(rng, int(rng.integers(0, 1000)), w, vocab)
    rows = make_sampled_rows(rng, window, vocab, draws)  # draws=1: every row holds one entry
    plain, packed = both(window, rows, "sampled", draws, w, vocab, encoding)
    assert_same_window(plain, packed, rows.row_splits, stored_logprobs(encoding))
    dense_plain = dense_rows(plain, w, {"mode": "sampled", "draws": draws})
    dense_packed = dense_rows(packed, w, {"mode": "sampled", "draws": draws})
    for a, b in zip(dense_plain, dense_packed):
        assert a.shape == b.shape  # same entries per row, so the same padding


@pytest.mark.parametrize(
    "rules", [{"min_mass": 0.8}, {"min_prob": 0.02}, {"min_mass": 0.9, "min_prob": 0.01}]
)
@pytest.mark.parametrize("encoding", COMPACT_KINDS)
def test_adaptive_compact_window_equals_plain_and_keeps_its_rule(rules, encoding):
    """Ragged adaptive rows: entry counts from row_splits; verify's rule checks, in rank order
    and with the grid's allowance, pass on what the compact cache reads back."""
    from tests.cache.test_adaptive_rows import adaptive_from_topk

    rng = np.random.default_rng()
    vocab, k = 60, int(rng.integers(2, 12))
    selection = {"mode": "adaptive", "k": k, "min_mass": None, "min_prob": None, **rules}
    for _ in range(10):
        w = int(rng.integers(8, 40))
        window = make_window(rng, int(rng.integers(0, 1000)), w, vocab)
        _, rows = adaptive_from_topk(rng, window, vocab, k, **rules)
        out = []
        for name in ("plain", encoding):
            rules_ = RowRules(
                window=w,
                vocab=vocab,
                selection=selection,
                logprob_dtype="float32",
                version=3,
                encodings=encodings_of(name, "adaptive"),
            )
            batch = window_record_batch(window, rows, "adaptive", "float32", rules_.codecs)
            out.append(read_columns(batch, 0, "adaptive", rules_.codecs))
            rules_.check_all(out[-1])
        assert_same_window(*out, rows.row_splits, stored_logprobs(encoding))
        assert rules_.codecs.names[fmt.ROW_SPLITS] == "entry-counts"


def test_renormalise_reproduces_the_stored_tail():
    rng = np.random.default_rng()
    rows, k = 200, 64
    logits = rng.normal(size=(rows, 2000)) * rng.uniform(0.5, 6, size=(rows, 1))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = -np.sort(-lp, axis=1)[:, :k]
    counts = np.full(rows, k)
    grid, tail = decode_logprobs(encode_logprobs(top.reshape(-1), counts), counts)
    exact_tail = 1 - np.exp(top).sum(1)
    np.testing.assert_allclose(tail, exact_tail, rtol=1e-6, atol=1e-7)
    fixed = renormalise(grid, tail, counts).reshape(rows, k)
    got_tail = 1 - np.exp(fixed.astype(np.float64)).sum(1)
    np.testing.assert_allclose(got_tail, exact_tail, rtol=1e-5, atol=5e-7)
    # unrenormalised, the grid alone moves the tail by up to ~1/128 of the covered mass
    assert np.abs(1 - np.exp(grid.astype(np.float64)).reshape(rows, k).sum(1) - exact_tail).max() > 1e-4
    assert np.abs(fixed - top).max() <= GRID  # nearest rounding: up to twice the rounding error


@pytest.mark.parametrize("shape", ["flat", "peaked", "one-entry", "ragged-with-minus-inf", "all-equal"])
def test_snapped_rows_read_back_within_1_128_nat_with_their_exact_tail(shape):
    """Rows written through snap_to_grid decode, shift included, within 1/128 nat of every
    entry, and 1 - sum(exp) is the exact tail; nearest rounding misses 1/128 on peaked rows."""
    from longkd.cache.column_codecs import LOGPROB_STEPS, snap_to_grid

    rng = np.random.default_rng()
    rows, k, v = 300, 64, 5000
    logits = rng.normal(size=(rows, v)) * {"flat": 1.0, "all-equal": 0.0}.get(shape, 3.0)
    if shape in ("peaked", "one-entry"):
        logits[:, rng.integers(v)] += rng.uniform(6, 14, size=rows)
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = -np.sort(-lp, axis=1)[:, :k]
    counts = np.full(rows, k)
    if shape == "one-entry":
        counts[:] = 1
    if shape == "ragged-with-minus-inf":
        counts = rng.integers(0, k + 1, size=rows)
        top[:, -3:] = -np.inf
    flat = np.concatenate([top[r, : counts[r]] for r in range(rows)])
    snapped, tail = snap_to_grid(flat, counts)
    a = -snapped[np.isfinite(snapped)] * LOGPROB_STEPS
    np.testing.assert_array_equal(a, np.rint(a))  # grid points
    blob = encode_logprobs(snapped, counts, steps=LOGPROB_STEPS, tail=tail, packing="bytes")
    grid, stored_tail = decode_logprobs(blob, counts)
    got = renormalise(grid, stored_tail, counts)
    finite = np.isfinite(flat)
    np.testing.assert_array_equal(np.isfinite(got), finite)
    assert np.abs(got[finite].astype(np.float64) - flat[finite]).max(initial=0) <= LOGPROB_ERROR
    live = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])[live]
    got_tail = 1 - np.add.reduceat(np.exp(got.astype(np.float64)), starts)
    want_tail = 1 - np.add.reduceat(np.exp(flat), starts)
    np.testing.assert_allclose(got_tail, want_tail, rtol=0, atol=2e-6)
    if shape == "peaked":  # what the offsets are for: rounding to nearest misses the bound
        near, near_tail = decode_logprobs(encode_logprobs(flat, counts, steps=LOGPROB_STEPS), counts)
        assert np.abs(renormalise(near, near_tail, counts) - flat).max() > LOGPROB_ERROR


def test_renormalise_leaves_minus_inf_and_empty_rows():
    counts = np.array([3, 0, 2])
    lp = np.array([-1.0, -np.inf, -2.0, -np.inf, -np.inf], np.float32)
    grid, tail = decode_logprobs(encode_logprobs(lp, counts), counts)
    fixed = renormalise(grid, tail, counts)
    assert np.isneginf(fixed[[1, 3, 4]]).all() and np.isfinite(fixed[[0, 2]]).all()
    np.testing.assert_allclose(1 - np.exp(fixed[[0, 2]].astype(np.float64)).sum(), tail[0], atol=1e-7)


def test_worked_example_of_the_format():
    """docs/format.md "Worked example", byte for byte."""
    from longkd.cache.column_codecs import ENCODINGS, WindowContext

    def blob(name, values, w=1, counts=(4,)):
        ctx = WindowContext(window=w, vocab=32000, length=w, entry_counts=np.array(counts))
        return ENCODINGS[name].encode(np.asarray(values), ctx), ctx

    ids = np.array([17, 5, 31999, 300])
    logprobs = np.array([-0.2, -2.5, -3.02, -7.25], np.float32)
    order = np.argsort(ids)
    sorted_gaps = "82 04 00 00 00 05 0b 1a d2 00 00 01 7b"
    for name, want in (
        ("dictionary", sorted_gaps + " 81 04 00 00 00 00 00 00 00"),
        ("sorted-gaps", sorted_gaps),
    ):
        id_blob, ctx = blob(name, ids[order])
        assert id_blob.hex(" ") == want
        assert ENCODINGS[name].decode(np.frombuffer(id_blob, np.uint8), ctx).tolist() == [5, 17, 300, 31999]
    two, ctx2 = blob("dictionary", [5, 17, 300, 31999, 5, 17, 300, 1024], w=2, counts=(4, 4))
    assert two.hex(" ") == (
        "82 05 00 00 00 05 0b 1a d3 fe 00 00 01 02 78 81 08 00 00 00 00 00 00 01 00 00 00 00"
    )
    assert ENCODINGS["dictionary"].decode(np.frombuffer(two, np.uint8), ctx2).tolist() == [
        *(5, 17, 300, 31999),
        *(5, 17, 300, 1024),
    ]
    tail = " f4 01 00 00 00 c4 75 4b 3d"
    for name, want in (
        ("grid-min", "02 44 00 82 01 00 00 00 ed 01 82 04 00 00 00 43 df 00 1f 01 01 00 01" + tail),
        ("grid-max", "00 44 00 81 01 00 00 00 0e 82 04 00 00 00 9c 00 df c0 00 00 01 00" + tail),
    ):
        lp_blob, _ = blob(name, logprobs[order])
        assert lp_blob.hex(" ") == want
        got = ENCODINGS[name].decode(np.frombuffer(lp_blob, np.uint8), ctx)
        np.testing.assert_allclose(got, [-2.4944506, -0.20033298, -7.2444506, -3.0238624], rtol=0, atol=1e-7)
        exact_tail = 1 - np.exp(logprobs.astype(np.float64)).sum()
        assert abs(1 - np.exp(got.astype(np.float64)).sum() - exact_tail) < 1e-7
    five = np.array([-2.5, -0.2, -7.25, -11.25, -3.02], np.float32)  # ids 5, 17, 300, 1024, 31999
    shifted, ctx5 = blob("grid-shift", five, counts=(5,))
    assert shifted.hex(" ") == (
        "03 44 00 00 40 78 02 00 00 08 00 82 01 00 00 00 89 02"
        " 82 05 00 00 00 df 7b 9c 00 bb 01 02 00 00 01 81 01 00 00 00 b6"
    )
    got = ENCODINGS["grid-shift"].decode(np.frombuffer(shifted, np.uint8), ctx5)
    want = [-2.4944458, -0.20032816, -7.244446, -11.288564, -3.0238576]
    np.testing.assert_array_equal(got, np.array(want, np.float32))
    assert abs(1 - np.exp(got.astype(np.float64)).sum() - 0.04965572) < 1e-8
    assert (
        blob("grid", np.array([-0.2, -2.5, np.nan], np.float32), w=3)[0].hex(" ")
        == "40 00 08 03 00 00 00 0d a0 ff"
    )
    assert blob("ints", [17, 5, 31999], w=3)[0].hex(" ") == "82 03 00 00 00 11 05 ff 00 00 7c"
    assert blob("gaps", [0, 2], w=3)[0].hex(" ") == "01 01 00 00 00 01"
    splits, ctx = blob("entry-counts", [0, 2, 3, 6], w=3, counts=(2, 1, 3))
    assert splits.hex(" ") == "02 03 00 00 00 36"
    assert ENCODINGS["entry-counts"].decode(np.frombuffer(splits, np.uint8), ctx).tolist() == [0, 2, 3, 6]
    counts, _ = blob("minus-one", [40, 24, 64, 1, 2, 61], w=3, counts=(2, 1, 3))
    assert counts.hex(" ") == "81 06 00 00 00 27 17 3f 00 01 3c"


def top_rows_with_neginf(w: int, k: int, vocab: int, spread: tuple[float, float]):
    """``w`` top-k rows (float32[w, k], descending) of random softmaxes over ``vocab`` whose
    logits scale by a uniform draw from ``spread`` row by row, row 3 ending in four -inf; and
    the WindowContext that decodes them."""
    from longkd.cache.column_codecs import WindowContext

    rng = np.random.default_rng()
    logits = rng.normal(size=(w, vocab)) * rng.uniform(*spread, size=(w, 1))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.sort(lp, axis=1)[:, ::-1][:, :k].astype(np.float32)
    top[3, -4:] = -np.inf
    return top, WindowContext(w, vocab, w, np.full(w, k))


def test_grid_min_decodes_with_the_recipe_of_the_docs():
    """docs/format.md "grid-min and grid-max", followed with numpy alone on a window of peaked
    top-k rows with -inf entries: the same float32 values, bit for bit, as the codec."""
    from longkd.cache.column_codecs import ENCODINGS
    from tests.cache.test_encodings import docs_sections

    w, k = 40, 16
    top, ctx = top_rows_with_neginf(w, k, vocab=500, spread=(1, 6))
    data = np.frombuffer(ENCODINGS["grid-min"].encode(top.reshape(-1), ctx), np.uint8)

    assert data[0] == 2  # layout grid-min
    steps = int(data[1]) | int(data[2]) << 8
    (_, base), (kind, entries), (_, tail) = docs_sections(data, 3)
    sentinel = (1 << (8 * (kind - 0x80))) - 1  # the all-ones value of the entries' itemsize
    missing = (entries == sentinel).reshape(w, k)
    a = base[:, None] - entries.reshape(w, k)
    g = np.where(missing, np.float32(-np.inf), a.astype(np.float32) / np.float32(-steps)).astype(np.float32)
    m = np.exp(g).astype(np.float32).sum(axis=1, dtype=np.float64)
    want = np.minimum(1 - tail.astype(np.float64), 1)
    shift = np.where((m > 0) & (want > 0), np.log(want) - np.log(m), 0.0).astype(np.float32)
    spec = np.where(missing, g, g + shift[:, None])
    codec = ENCODINGS["grid-min"].decode(data, ctx).reshape(w, k)
    np.testing.assert_array_equal(spec.view(np.uint32), codec.view(np.uint32))


def test_grid_shift_decodes_with_the_recipe_of_the_docs():
    """docs/format.md "grid-shift", followed with numpy alone on a window of top-k rows that
    reach below p = 1e-4 (the coarse zone) with -inf entries: the same float32 values, bit for
    bit, as the codec."""
    from longkd.cache.column_codecs import ENCODINGS
    from tests.cache.test_encodings import docs_sections

    w, k = 40, 32
    top, ctx = top_rows_with_neginf(w, k, vocab=3000, spread=(2, 16))
    assert (np.isfinite(top) & (top < np.log(1e-4))).mean() > 0.1, "rows reach into the coarse zone"
    data = np.frombuffer(ENCODINGS["grid-shift"].encode(top.reshape(-1), ctx), np.uint8)

    assert data[0] == 3  # layout grid-shift
    steps, shift_steps, m = (int(data[i]) | int(data[i + 1]) << 8 for i in (1, 3, 9))
    zone = int(data[5:9].view("<u4")[0])
    (_, base), (kind, entries), (_, z) = docs_sections(data, 11)
    sentinel = (1 << (8 * (kind - 0x80))) - 1
    missing = (entries == sentinel).reshape(w, k)
    code = base[:, None] - entries.reshape(w, k)
    a = np.where(code > zone, zone + m * (code - zone), code)
    q = (z >> 1) ^ -(z & 1)
    g = a.astype(np.float32) / np.float32(-steps)
    spec = g + (q.astype(np.float32) / np.float32(shift_steps))[:, None]
    spec = np.where(missing, np.float32(-np.inf), spec).astype(np.float32)
    codec = ENCODINGS["grid-shift"].decode(data, ctx).reshape(w, k)
    np.testing.assert_array_equal(spec.view(np.uint32), codec.view(np.uint32))
    assert (a > zone).any() and ((a[a > zone] - zone) % m == 0).all()


# ----------------------------------------------------------------------------- damaged columns


def one_compact_batch(mode="topk", encoding="compact"):
    rng = np.random.default_rng()
    w, vocab, size = 16, 50, 5
    window = make_window(rng, 7, w, vocab)
    rows = (
        make_topk_rows(rng, window, vocab, size)
        if mode == "topk"
        else make_sampled_rows(rng, window, vocab, 9)
    )
    size = size if mode == "topk" else 9
    rules = rules_for(mode, size, w, vocab, encoding)
    return window_record_batch(window, rows, mode, "float32", rules.codecs), rules


def with_blob(batch: pa.RecordBatch, column: str, edit) -> pa.RecordBatch:
    blob = bytearray(batch.column(column)[0].as_py())
    edit(blob)
    arrays = [
        pa.array([bytes(blob)], pa.binary()) if n == column else batch.column(n) for n in batch.schema.names
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def set_byte(at, value):
    def edit(blob):
        blob[at] = value

    return edit


def places_count(value):
    """Set the value count of a dictionary blob's second section (the places)."""

    def edit(blob):
        at = enc.SECTION_HEADER + int.from_bytes(blob[1:5], "little") * (blob[0] - 0x80)
        blob[at + 1 : at + 5] = int(value).to_bytes(4, "little")

    return edit


@pytest.mark.parametrize(
    "column,edit,message",
    [
        (fmt.IDS, lambda b: b.pop(), r"ids \(dictionary\): .*'places' needs \d+ bytes"),
        (fmt.IDS, set_byte(0, 0x99), r"ids \(dictionary\): .*unknown kind 0x99"),
        (fmt.IDS, places_count(3), r"ids \(dictionary\): .*'places' holds 3 values, expected 80"),
        (fmt.IDS, lambda b: b.extend(b"\0"), r"ids \(dictionary\): .*1 bytes left"),
        (fmt.IDS, set_byte(-1, 0xFF), r"ids \(dictionary\): .*row 15: a place .* beyond the dictionary"),
        (fmt.IDS, set_byte(5, 60), r"ids \(dictionary\): .*: a dictionary id .* beyond the vocabulary of 50"),
        (fmt.LOGPROBS, set_byte(0, 7), r"logprobs \(grid-shift\): .*unknown layout"),
        (fmt.LOGPROBS, set_byte(0, 2), r"logprobs \(grid-shift\): .*layout 2 \(grid-min\) where grid-shift"),
        (fmt.LOGPROBS, set_byte(9, 200), r"logprobs \(grid-shift\): .*rounds by more than 0.125 nat"),
        (fmt.LOGPROBS, set_byte(6, 0), r"logprobs \(grid-shift\): .*starts above p = 0.0001"),
        (fmt.LOGPROBS, set_byte(4, 0), r"logprobs \(grid-shift\): .*zero shift steps"),
        (fmt.LOGPROBS, lambda b: b.pop(), r"logprobs \(grid-shift\): .*'row shifts' needs \d+ bytes"),
        (fmt.TARGET_LOGPROB, lambda b: b.clear(), r"target_logprob \(grid\): .*cut off"),
        (fmt.INPUT_IDS, set_byte(-1, 0xFF), r"input_ids \(ints\): .*not below 50"),
        (
            fmt.SEGMENT_STARTS,
            lambda b: b.__setitem__(slice(1, 5), b"\xe8\x03\0\0"),
            r"segment_starts \(gaps\)",
        ),
    ],
)
def test_damaged_compact_column_is_one_clear_error(column, edit, message):
    batch, rules = one_compact_batch()
    with pytest.raises(BadShard, match=message) as info:
        read_columns(with_blob(batch, column, edit), 0, "topk", rules.codecs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "encoding,column,edit,message",
    [
        ("earlier", fmt.IDS, lambda b: b.pop(), r"ids \(sorted-gaps\): .*needs \d+ bytes"),
        ("earlier", fmt.IDS, set_byte(1, 3), r"ids \(sorted-gaps\): .*holds 3 values, expected 80"),
        ("earlier", fmt.IDS, set_byte(-1, 0xFF), r"ids \(sorted-gaps\): .*row \d+.* beyond the vocabulary"),
        ("earlier", fmt.LOGPROBS, set_byte(0, 7), r"logprobs \(grid-max\): .*unknown layout"),
        (
            "earlier",
            fmt.LOGPROBS,
            set_byte(0, 2),
            r"logprobs \(grid-max\): .*layout 2 \(grid-min\) where grid-max",
        ),
        (
            "grid-min",
            fmt.LOGPROBS,
            set_byte(0, 0),
            r"logprobs \(grid-min\): .*layout 0 \(grid-max\) where grid-min",
        ),
        (
            "grid-min",
            fmt.LOGPROBS,
            lambda b: b.__setitem__(slice(-4, None), np.float32(2.0).tobytes()),
            "tail mass",
        ),
    ],
)
def test_damaged_earlier_compact_column_is_one_clear_error(encoding, column, edit, message):
    batch, rules = one_compact_batch(encoding=encoding)
    with pytest.raises(BadShard, match=message) as info:
        read_columns(with_blob(batch, column, edit), 0, "topk", rules.codecs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("column", [fmt.IDS, fmt.LOGPROBS, fmt.TARGET_LOGPROB, fmt.INPUT_IDS])
def test_a_flipped_payload_bit_fails_the_checksum(column):
    """A bit flipped in the middle of a blob (inside its values' payload) decodes to other
    values, which the checksum over the decoded values catches, or fails to decode."""
    batch, rules = one_compact_batch()
    middle = len(batch.column(column)[0].as_py()) // 2

    def flip(blob):
        blob[middle] ^= 0x01

    # a value pushed out of range (a grid-min entry above its base, a place or dictionary id
    # beyond its limit) is refused before the checksum is reached
    with pytest.raises(BadShard, match="checksum mismatch|lies above 0|beyond the"):
        rules.check_read(read_columns(with_blob(batch, column, flip), 0, "topk", rules.codecs))


@pytest.mark.parametrize("mode", ["topk", "sampled"])
def test_random_damage_is_a_bad_shard_or_caught_by_the_checksum(mode):
    """Random byte edits, cuts and extensions of every compact column: reading either refuses
    the window (BadShard, one line) or returns values whose checksum check passes only if they
    are the original ones; nothing else escapes (no IndexError, no MemoryError, no silently
    different numbers)."""
    batch, rules = one_compact_batch(mode)
    original = read_columns(batch, 0, mode, rules.codecs)
    rng = np.random.default_rng()
    for _ in range(150):
        column = str(rng.choice([c for c, name in rules.codecs.names.items() if name != fmt.PLAIN]))
        kind = rng.integers(3)

        def damage(blob, kind=kind):
            if kind == 0 or len(blob) < 2:  # one byte set to a random value
                blob[int(rng.integers(len(blob)))] = int(rng.integers(256))
            elif kind == 1:  # cut short
                del blob[int(rng.integers(len(blob))) :]
            else:  # bytes appended
                blob.extend(rng.integers(0, 256, int(rng.integers(1, 9))).astype(np.uint8).tobytes())

        try:
            got = read_columns(with_blob(batch, column, damage), 0, mode, rules.codecs)
            rules.check_read(got)
        except BadShard as bad:
            assert "\n" not in str(bad)
            continue
        for name in original.mode_columns:  # accepted: the same numbers as before the damage
            np.testing.assert_array_equal(got.mode_columns[name], original.mode_columns[name])
        np.testing.assert_array_equal(got.ids, original.ids)
        np.testing.assert_array_equal(got.target_logprob, original.target_logprob)


def test_damaged_sampled_columns():
    batch, rules = one_compact_batch("sampled")
    with pytest.raises(BadShard, match=r"row_splits \(entry-counts\)"):
        read_columns(with_blob(batch, fmt.ROW_SPLITS, lambda b: b.pop()), 0, "sampled", rules.codecs)
    with pytest.raises(BadShard, match=r"counts \(minus-one\)"):
        read_columns(with_blob(batch, fmt.COUNTS, set_byte(1, 1)), 0, "sampled", rules.codecs)


# ----------------------------------------------------------------------------- a cache


def write_compact_cache(out, n=4, w=16, vocab=50, k=5):
    rng = np.random.default_rng()
    loc = Location(out)
    codecs = compact("topk", k, w, vocab)
    writer = ShardWriter(loc, selection_mode="topk", codecs=codecs, shard_size=3000)
    for i in range(n):
        window = make_window(rng, i, w, vocab)
        writer.put(window, make_topk_rows(rng, window, vocab, k))
    encoding = {"ids": "int32", "logprobs": "float32", "compression": "zstd"}
    encoding["columns"] = codecs.manifest_entry()
    finish_synthetic_cache(
        loc, writer, w=w, vocab=vocab, selection={"mode": "topk", "k": k}, encoding=encoding, samples=n
    )
    return loc


def test_verify_names_the_window_and_row_of_a_damaged_compact_column(tmp_path):
    loc = write_compact_cache(tmp_path / "c")
    assert verify_cache(loc).ok
    manifest = load_manifest(loc)
    shard = manifest["shards"][0]["path"]
    table = pa.ipc.open_file(str(tmp_path / "c" / shard)).read_all()
    batches = table.to_batches()
    batches[1] = with_blob(batches[1], fmt.IDS, lambda b: b.pop())
    with pa.ipc.new_file(str(tmp_path / "c" / shard), table.schema) as sink:  # uncompressed
        for batch in batches:
            sink.write_batch(batch)
    data = (tmp_path / "c" / shard).read_bytes()
    import hashlib

    manifest["shards"][0].update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest["totals"]["bytes"] = sum(s["bytes"] for s in manifest["shards"])
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    result = verify_cache(loc)
    assert not result.ok
    assert "row 1: ids (dictionary)" in result.problem and "\n" not in result.problem
    with pytest.raises(LongkdError, match=r"window 1 in shard .* is damaged: ids \(dictionary\)"):
        CacheReader(loc).read_window(1)
    assert CacheReader(loc).read_window(0).ids.shape == (16, 5)


def test_max_stored_id_decodes_compact_ids(tmp_path):
    from longkd.cache.rows import max_stored_id

    loc = write_compact_cache(tmp_path / "c", vocab=300)
    reader = CacheReader(loc)
    want = max(int(reader.read_window(i).ids.max()) for i in range(reader.num_windows))
    got = [max_stored_id(loc, shard["path"]) for shard in reader.shards]
    assert max(got) == want and len(got) > 1
    assert max_stored_id(loc, reader.shards[0]["path"], reader.rules.codecs) == got[0]


@pytest.mark.parametrize(
    "columns,message",
    [
        ({"ids": "zigzag"}, r"encoding.columns.ids"),
        (
            {"ids": "grid-min"},
            "encoding 'grid-min' does not apply to ids; use one of plain, sorted-gaps, dictionary",
        ),
        ({"counts": "minus-one"}, "names column 'counts', which a topk cache does not have"),
        ({"weights": "plain"}, "names column 'weights'"),
    ],
)
def test_manifest_encoding_columns_are_checked(tmp_path, columns, message):
    loc = write_compact_cache(tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["encoding"]["columns"] = {**manifest["encoding"]["columns"], **columns}
    path.write_text(json.dumps(manifest))
    with pytest.raises(LongkdError, match=message):
        load_manifest(loc)


def test_manifest_compact_columns_need_format_3_and_float32(tmp_path):
    loc = write_compact_cache(tmp_path / "c")
    path = tmp_path / "c" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(LongkdError, match="encodings other than plain need format_version 3"):
        load_manifest(loc)
    manifest["encoding"]["logprobs"] = "float16"
    path.write_text(json.dumps(manifest))
    for grid in fmt.GRID_ENCODINGS:
        manifest["encoding"]["columns"]["logprobs"] = grid
        path.write_text(json.dumps(manifest))
        with pytest.raises(LongkdError, match=f"must be float32 with {grid}"):
            load_manifest(loc)


def test_compact_needs_float32_logprobs_at_build():
    from longkd.cache.build_settings import resolve_settings

    with pytest.raises(LongkdError, match="--logprob-dtype float16 applies to --encoding plain"):
        resolve_settings(
            {
                "teacher": "t",
                "data": "d",
                "out": "o",
                "window": 8,
                "encoding": "compact",
                "logprob_dtype": "float16",
            }
        )
