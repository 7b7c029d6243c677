"""Mass-adaptive selection on synthetic rows: the selection rule against a plain loop, the
adaptive row codec, what `longkd cache verify` checks of adaptive rows, and the manifest's
adaptive selection (no model needed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longkd.cache import encodings as enc
from longkd.cache import format as fmt
from longkd.cache.manifest import load_manifest
from longkd.cache.reader import CacheReader
from longkd.cache.rows import dense_rows, read_columns, window_record_batch
from longkd.cache.storage import Location
from longkd.cache.teacher import SelectionConfig, TeacherRows, adaptive_rows
from longkd.cache.verify import verify_cache
from longkd.cache.writer import ShardWriter
from longkd.errors import LongkdError
from tests.cache.test_format import finish_synthetic_cache, log_softmax, make_topk_rows, make_window


def reference_counts(logprobs: np.ndarray, k: int, min_mass, min_prob) -> np.ndarray:
    """The rule written as a loop over each row's entries, largest first: keep the entry, stop
    once the kept mass reaches min_mass; stop before an entry below min_prob (never before the
    first) or of probability 0; at most k."""
    counts = []
    for row in np.exp(logprobs.astype(np.float64)):
        n, covered = 0, 0.0
        for p in row[:k]:
            if n and (p == 0 or (min_prob is not None and p < min_prob)):
                break
            n, covered = n + 1, covered + p
            if min_mass is not None and covered >= min_mass:
                break
        counts.append(n)
    return np.array(counts)


def sorted_rows(rng, rows: int, vocab: int, scale) -> np.ndarray:
    """float32 [rows, vocab] log-probs of random distributions, descending within each row."""
    lp = log_softmax(rng.normal(size=(rows, vocab)) * scale)
    return -np.sort(-lp, axis=1).astype(np.float32)


RULES = [(0.999, None), (0.9, None), (None, 1e-3), (None, 0.05), (0.99, 1e-4), (0.5, 0.01), (1.0, None)]


@pytest.mark.parametrize("min_mass,min_prob", RULES)
def test_select_rule_matches_the_plain_loop_on_random_rows(min_mass, min_prob):
    rng = np.random.default_rng()
    k = int(rng.integers(1, 80))
    lp = sorted_rows(rng, 300, 200, rng.uniform(0.3, 8, size=(300, 1)))
    got = enc.select_entry_counts(lp, cap=k, min_mass=min_mass, min_prob=min_prob)
    np.testing.assert_array_equal(got, reference_counts(lp, k, min_mass, min_prob))
    assert got.min() >= 1 and got.max() <= k


@pytest.mark.parametrize("min_mass,min_prob", RULES)
def test_select_rule_matches_the_plain_loop_on_adversarial_rows(min_mass, min_prob):
    k = 64
    equal = np.full((1, k), np.log(1 / k), np.float32)  # all entries alike: the mass grows slowly
    dominant = np.log(np.concatenate([[0.9995], np.full(k - 1, 0.0005 / (k - 1))]))[None]  # one sure entry
    tiny_first = np.log(np.full((1, k), 1e-5))  # even the first entry is below every min_prob
    cut = np.concatenate([np.log([0.6, 0.3]), np.full(k - 2, -np.inf)])[None]  # -inf after two entries
    steps = np.log(np.geomspace(0.5, 1e-9, k))[None]  # crosses each threshold somewhere
    halves = np.log(np.full((1, k), 0.5) ** np.arange(1, k + 1))  # covered mass 1 - 2^-n, exactly
    lp = np.concatenate([equal, dominant, tiny_first, cut, steps, halves]).astype(np.float32)
    got = enc.select_entry_counts(lp, cap=k, min_mass=min_mass, min_prob=min_prob)
    np.testing.assert_array_equal(got, reference_counts(lp, k, min_mass, min_prob))
    assert got[3] <= 2  # never beyond the finite entries
    if min_prob is not None:
        assert got[2] == 1
    if min_mass in (0.999, 0.9) and min_prob is None:
        assert got[1] == 1
        # covered mass after n halves is 1 - 2^-n: 0.999 takes 10 entries, 0.9 takes 4
        assert got[5] == {0.999: 10, 0.9: 4}[min_mass]


def test_select_rule_keeps_at_most_k_and_at_least_one():
    rng = np.random.default_rng()
    lp = sorted_rows(rng, 50, 100, 0.1)  # flat rows: no rule stops early
    assert (enc.select_entry_counts(lp, cap=7, min_mass=0.999) == 7).all()
    assert (enc.select_entry_counts(lp, cap=7, min_prob=0.9) == 1).all()
    np.testing.assert_array_equal(enc.select_entry_counts(lp[:, :1], cap=1, min_mass=0.1), np.ones(50))


def adaptive_from_topk(rng, window, vocab, k, counts_fn=None, **rules):
    """Adaptive rows cut from random top-k rows, as the teacher cuts them; ``counts_fn`` may
    change the per-row entry counts (to break the rule)."""
    topk = make_topk_rows(rng, window, vocab, k)
    topk = TeacherRows(window_id=window.window_id, mode="topk", ids=topk.ids, logprobs=topk.logprobs,
                       target_logprob=topk.target_logprob)  # fmt: skip
    rows = adaptive_rows(topk, SelectionConfig("adaptive", k=k, **rules))
    if counts_fn is not None:
        counts = counts_fn(np.diff(rows.row_splits).copy(), topk)
        rows.ids = enc.ragged_from_dense(topk.ids, counts)
        rows.logprobs = enc.ragged_from_dense(topk.logprobs, counts)
        rows.row_splits = np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)
    return topk, rows


@pytest.mark.parametrize("logprob_dtype", fmt.LOGPROB_DTYPES)
def test_adaptive_window_round_trips_as_the_cut_top_k_rows(logprob_dtype):
    rng = np.random.default_rng()
    w, vocab, k = int(rng.integers(8, 40)), 60, int(rng.integers(2, 12))
    window = make_window(rng, int(rng.integers(0, 1000)), w, vocab, length=w - int(rng.integers(0, 3)))
    topk, rows = adaptive_from_topk(rng, window, vocab, k, min_mass=0.8, min_prob=0.01)
    counts = np.diff(rows.row_splits)
    batch = window_record_batch(window, rows, "adaptive", logprob_dtype)
    assert batch.schema.equals(fmt.shard_schema("adaptive", logprob_dtype))
    assert batch.schema.names[4:7] == ["ids", "logprobs", "row_splits"]
    columns = read_columns(batch, 0, "adaptive")
    ids, logprobs, none = dense_rows(columns, w, {"mode": "adaptive", "k": k, "min_mass": 0.8})
    assert none is None and ids.shape == logprobs.shape == (w, counts.max())
    stored = topk.logprobs.astype(fmt.LOGPROB_ENCODINGS[logprob_dtype].value_type.to_pandas_dtype())
    for t in range(w):
        n = counts[t]
        np.testing.assert_array_equal(ids[t, :n], topk.ids[t, :n])
        np.testing.assert_array_equal(logprobs[t, :n], stored[t, :n].astype(np.float32))
        assert (ids[t, n:] == -1).all() and (logprobs[t, n:] == -np.inf).all()


def write_adaptive_cache(out, rows_fn, *, w=16, vocab=40, k=8, selection=None, logprob_dtype="float32"):
    """A one-window adaptive cache whose rows come from ``rows_fn(rng, window)``."""
    rng = np.random.default_rng()
    loc = Location(out)
    writer = ShardWriter(loc, selection_mode="adaptive", logprob_dtype=logprob_dtype)
    window = make_window(rng, 0, w, vocab)
    rows = rows_fn(rng, window)
    writer.put(window, rows)
    finish_synthetic_cache(
        loc,
        writer,
        w=w,
        vocab=vocab,
        selection=selection or {"mode": "adaptive", "k": k, "min_mass": 0.9, "min_prob": None},
        encoding={"logprobs": logprob_dtype},
        samples=1,
    )
    return out


def first_row(counts, test) -> int:
    """The first row whose entry count passes ``test`` (the test's precondition: one exists)."""
    rows = np.flatnonzero(test(counts))
    assert rows.size, counts
    return int(rows[0])


@pytest.mark.parametrize("logprob_dtype", fmt.LOGPROB_DTYPES)
def test_verify_accepts_adaptive_rows_and_every_reader_reads_them(tmp_path, logprob_dtype):
    k = 8
    for i, rules in enumerate([{"min_mass": 0.9}, {"min_prob": 0.02}, {"min_mass": 0.95, "min_prob": 0.01}]):
        selection = {"mode": "adaptive", "k": k, "min_mass": None, "min_prob": None, **rules}
        made = {}

        def rows(rng, window, rules=rules, made=made):
            made["topk"], made["rows"] = adaptive_from_topk(rng, window, 40, k, **rules)
            return made["rows"]

        out = write_adaptive_cache(
            tmp_path / f"c{i}", rows, k=k, selection=selection, logprob_dtype=logprob_dtype
        )
        result = verify_cache(out)
        assert result.ok, result.problem
        window = CacheReader(out).read_window(0)
        counts = np.diff(made["rows"].row_splits)
        assert 1 <= counts.min() and counts.max() <= k and counts.min() < k  # some rows were cut
        np.testing.assert_array_equal((window.ids >= 0).sum(axis=1), counts)


def test_verify_names_the_first_broken_adaptive_rule(tmp_path):
    k, mass = 8, {"min_mass": 0.9}

    def kept_mass(counts, topk, less=0):
        """Each row's mass over its first ``counts - less`` entries."""
        probs = np.exp(topk.logprobs.astype(np.float64))
        return (probs * (np.arange(k) < (counts - less)[:, None])).sum(axis=1)

    # Each mutation picks a row clear of the rounding allowance (1e-4), so it must be caught.
    def past_the_mass(rng, window):
        def extend(c, topk):  # one entry more on a row that already covers min_mass
            return _bump(c, (c < k) & (kept_mass(c, topk) > 0.91), +1)

        return adaptive_from_topk(rng, window, 40, k, extend, **mass)[1]

    def short_of_the_mass(rng, window):
        def shorten(c, topk):  # one entry fewer, leaving the row short of min_mass
            return _bump(c, (c >= 2) & (kept_mass(c, topk, less=1) < 0.89), -1)

        return adaptive_from_topk(rng, window, 40, k, shorten, **mass)[1]

    def below_min_prob(rng, window):
        def extend(c, topk):  # the entry the rule left out, below min_prob
            probs = np.exp(topk.logprobs.astype(np.float64))
            room = (c < k) & (probs[np.arange(len(c)), np.minimum(c, k - 1)] < 0.019)
            return _bump(c, room, +1)

        return adaptive_from_topk(rng, window, 40, k, extend, min_prob=0.02)[1]

    def ascending(rng, window):
        rows = adaptive_from_topk(rng, window, 40, k, **mass)[1]
        t = first_row(np.diff(rows.row_splits), lambda c: c >= 2)
        s = rows.row_splits[t]
        rows.logprobs[s : s + 2] = rows.logprobs[s : s + 2][::-1].copy()
        return rows

    def repeated_id(rng, window):
        rows = adaptive_from_topk(rng, window, 40, k, **mass)[1]
        t = first_row(np.diff(rows.row_splits), lambda c: c >= 2)
        rows.ids[rows.row_splits[t] + 1] = rows.ids[rows.row_splits[t]]
        return rows

    def mass_above_one(rng, window):
        rows = adaptive_from_topk(rng, window, 40, k, **mass)[1]
        t = first_row(np.diff(rows.row_splits), lambda c: c >= 2)
        rows.logprobs[rows.row_splits[t]] = 0.0  # with the rest of row t the mass exceeds 1
        return rows

    prob_rule = {"mode": "adaptive", "k": k, "min_mass": None, "min_prob": 0.02}
    cases = [
        (past_the_mass, None, "keeps entries after its covered mass reached min_mass=0.9"),
        (short_of_the_mass, None, "cover only"),
        (below_min_prob, prob_rule, "keeps an entry of probability below min_prob=0.02"),
        (ascending, None, "logprobs not descending"),
        (repeated_id, None, "an id repeats within a row"),
        (mass_above_one, None, "(probabilities sum above 1)"),
    ]
    for i, (fn, selection, needle) in enumerate(cases):
        result = verify_cache(write_adaptive_cache(tmp_path / f"c{i}", fn, k=k, selection=selection))
        assert not result.ok and needle in result.problem, (fn.__name__, result.problem)
        assert result.problem.startswith("shard shards/shard-00000-000000.arrow: window 0: ")


def _bump(counts: np.ndarray, where: np.ndarray, step: int) -> np.ndarray:
    """``counts`` with the first row where ``where`` holds moved by ``step``."""
    counts[first_row(counts, lambda _: where)] += step
    return counts


@pytest.mark.parametrize(
    "counts_fn,needle",
    [
        (lambda c: np.where(np.arange(len(c)) == 3, 0, c), "give every row at least one entry"),
        (lambda c: np.where(np.arange(len(c)) == 2, 9, c), "a row holds 9 entries, more than k=8"),
    ],
)
def test_every_read_checks_the_adaptive_row_lengths(tmp_path, counts_fn, needle):
    k = 8

    def rows(rng, window):
        def change(c, topk):
            topk.ids = np.concatenate([topk.ids, (topk.ids[:, :1] + 1) % 40], axis=1)  # a 9th entry
            topk.logprobs = np.concatenate([topk.logprobs, topk.logprobs[:, -1:] - 1], axis=1)
            return counts_fn(c)

        return adaptive_from_topk(rng, window, 40, k, change, min_mass=0.9)[1]

    out = write_adaptive_cache(tmp_path / "c", rows, k=k)
    with pytest.raises(LongkdError, match=needle):
        CacheReader(out).read_window(0)
    assert needle in verify_cache(out).problem


@pytest.mark.parametrize(
    "change,needle",
    [
        ({"min_mass": 1.5}, "selection.min_mass is 1.5, expected a finite number above 0 and at most 1"),
        ({"min_mass": 0}, "selection.min_mass is 0, expected a finite number above 0"),
        ({"min_prob": 1}, "selection.min_prob is 1, expected a finite number above 0 and below 1"),
        ({"min_mass": None, "min_prob": None}, "adaptive selection has neither min_mass nor min_prob"),
        ({"k": 41}, "selection.k 41 with window 16 and vocabulary 40 is impossible"),
    ],
)
def test_manifest_checks_the_adaptive_selection(tmp_path, change, needle):
    out = write_adaptive_cache(
        tmp_path / "c", lambda rng, w: adaptive_from_topk(rng, w, 40, 8, min_mass=0.9)[1]
    )
    assert load_manifest(Location(out))["selection"] == {
        "mode": "adaptive",
        "k": 8,
        "min_mass": 0.9,
        "min_prob": None,
    }
    path = out / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["selection"].update(change)
    path.write_text(json.dumps(manifest))
    with pytest.raises(LongkdError, match=needle):
        load_manifest(Location(out))


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        ({"mode": "adaptive", "k": 8}, "adaptive selection needs --min-mass or --min-prob"),
        ({"mode": "topk", "k": 8, "min_mass": 0.9}, "need the adaptive selection, not 'topk'"),
        ({"mode": "adaptive", "k": 8, "min_mass": 0.0}, r"--min-mass must lie in \(0, 1\]"),
        ({"mode": "adaptive", "k": 8, "min_prob": 1.0}, r"--min-prob must lie in \(0, 1\)"),
        ({"mode": "adaptive", "k": 0, "min_prob": 0.5}, "--top-k must be a positive integer"),
    ],
)
def test_selection_config_refuses_bad_adaptive_rules(kwargs, needle):
    with pytest.raises(LongkdError, match=needle):
        SelectionConfig(**kwargs)


def test_adaptive_rows_are_the_first_entries_of_the_top_k_rows():
    rng = np.random.default_rng()
    w, k = 30, 16
    lp = log_softmax(rng.normal(size=(w, 100)) * rng.uniform(0.5, 5, size=(w, 1))).astype(np.float32)
    order = np.argsort(-lp, axis=1, kind="stable")[:, :k]
    top_lp, target = np.take_along_axis(lp, order, axis=1), np.zeros(w, np.float32)
    topk = TeacherRows(3, "topk", ids=order.astype(np.int32), logprobs=top_lp, target_logprob=target)
    rows = adaptive_rows(topk, SelectionConfig("adaptive", k=k, min_mass=0.95, min_prob=1e-3))
    counts = reference_counts(topk.logprobs, k, 0.95, 1e-3)
    np.testing.assert_array_equal(np.diff(rows.row_splits), counts)
    assert rows.row_splits[0] == 0 and rows.row_splits.dtype == np.int32 and rows.mode == "adaptive"
    for t in range(w):
        part = slice(rows.row_splits[t], rows.row_splits[t + 1])
        np.testing.assert_array_equal(rows.ids[part], topk.ids[t, : counts[t]])
        np.testing.assert_array_equal(rows.logprobs[part], topk.logprobs[t, : counts[t]])
    assert rows.target_logprob is topk.target_logprob and rows.window_id == 3
