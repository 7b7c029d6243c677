"""Packing: windows against a per-token reference packer, token accounting, positions, config errors."""

from __future__ import annotations

import numpy as np
import pytest

from longkd.cache.packing import Packer, PackingConfig, PackingStats, position_ids_for
from longkd.errors import LongkdError

EOS, PAD = 2, 0


def random_samples(rng, n, max_len, vocab=500, empty_every=7):
    """Random token-id samples of random lengths, some empty (ids >= 4 so EOS/PAD never collide)."""
    out = []
    for i in range(n):
        length = 0 if i % empty_every == 3 else int(rng.integers(1, max_len + 1))
        out.append(rng.integers(4, vocab, size=length).tolist())
    return out


def reference_pack(samples, cfg: PackingConfig):
    """A per-token packer written independently of the numpy one.

    Returns (windows as (ids, length, starts) tuples, stream of kept tokens, truncated-away count).
    """
    stream, flags, cut = [], [], 0
    for s in samples:
        s = list(s)
        if not s:
            continue
        cap = cfg.max_sample_tokens
        if cap is not None and len(s) > cap:
            if cfg.overflow == "split":
                pieces = [s[i : i + cap] for i in range(0, len(s), cap)]
            else:
                cut += len(s) - cap
                pieces = [s[:cap]]
        else:
            pieces = [s]
        if cfg.add_eos and cfg.eos_id is not None:
            pieces[-1] = pieces[-1] + [cfg.eos_id]
        for piece in pieces:
            for k, tok in enumerate(piece):
                stream.append(tok)
                flags.append(k == 0)
    W = cfg.window
    windows = []
    for begin in range(0, len(stream), W):
        ids = stream[begin : begin + W]
        if len(ids) < W and cfg.tail == "drop":
            break
        starts = [0] + [j for j in range(1, len(ids)) if flags[begin + j]]
        windows.append((ids + [cfg.pad_id] * (W - len(ids)), len(ids), starts))
    return windows, stream, cut


CONFIGS = [
    dict(window=16),
    dict(window=16, tail="pad"),
    dict(window=7, max_sample_tokens=5, overflow="split"),
    dict(window=7, max_sample_tokens=5, overflow="truncate", tail="pad"),
    dict(window=32, add_eos=False),
    dict(window=9, max_sample_tokens=1, overflow="split", tail="pad", pad_id=3),
    dict(window=2, max_sample_tokens=40, overflow="truncate"),
]


@pytest.mark.parametrize("kwargs", CONFIGS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_matches_reference_and_accounts_for_every_token(kwargs):
    rng = np.random.default_rng()  # fresh inputs each run: the reference decides what is right
    samples = random_samples(rng, n=int(rng.integers(20, 60)), max_len=int(rng.integers(1, 50)))
    cfg = PackingConfig(eos_id=EOS, **kwargs)
    packer = Packer(cfg)
    got = list(packer.pack(samples))
    want, stream, cut = reference_pack(samples, cfg)
    W = cfg.window

    assert [w.window_id for w in got] == list(range(len(want)))
    for w, (ids, length, starts) in zip(got, want, strict=True):
        assert w.input_ids.dtype == np.int32 and w.input_ids.shape == (W,)
        assert w.segment_starts.dtype == np.int32
        np.testing.assert_array_equal(w.input_ids, ids)
        assert w.length == length
        np.testing.assert_array_equal(w.segment_starts, starts)
        assert w.segment_starts[0] == 0 and np.all(np.diff(w.segment_starts) > 0)
        assert w.segment_starts[-1] < w.length

    # No token lost or duplicated: the windows' real tokens are the stream's prefix, the rest dropped.
    real = np.concatenate([w.input_ids[: w.length] for w in got]) if got else np.empty(0, np.int32)
    np.testing.assert_array_equal(real, stream[: len(real)])
    s = packer.stats
    n_eos = sum(1 for x in samples if x) if cfg.uses_eos else 0
    assert s.samples == len(samples) and s.empty_samples == sum(1 for x in samples if not x)
    assert s.sample_tokens == sum(len(x) for x in samples) and s.eos_tokens == n_eos
    assert s.packed_tokens == len(real) and s.dropped_tokens == cut + len(stream) - len(real)
    assert s.packed_tokens + s.dropped_tokens == s.sample_tokens + s.eos_tokens
    assert s.pad_tokens == sum(W - w.length for w in got) and s.windows == len(got)
    if got:
        assert s.efficiency == pytest.approx(s.packed_tokens / (len(got) * W))
    if cfg.tail == "drop":
        assert all(w.length == W for w in got) and s.pad_tokens == 0


def test_stream_with_eos_reconstructs_input():
    """Without a cap, windows + dropped tail are exactly the samples joined by EOS."""
    rng = np.random.default_rng()
    samples = random_samples(rng, 50, 30)
    packer = Packer(PackingConfig(window=13, eos_id=EOS))
    windows = list(packer.pack(samples))
    expected = [t for x in samples if x for t in [*x, EOS]]
    joined = np.concatenate([w.input_ids for w in windows]).tolist()
    tail = expected[len(joined) :]
    assert joined + tail == expected
    assert len(tail) == packer.stats.dropped_tokens < 13


def test_segments_continuation_and_starts():
    cfg = PackingConfig(window=4, eos_id=EOS, tail="pad", pad_id=PAD)
    windows = list(Packer(cfg).pack([[10, 11, 12], [20], [], [30, 31, 32, 33, 34]]))
    ids = [w.input_ids.tolist() for w in windows]
    # stream: 10 11 12 E | 20 E | 30 31 32 33 34 E
    assert ids == [[10, 11, 12, EOS], [20, EOS, 30, 31], [32, 33, 34, EOS]]
    assert [w.segment_starts.tolist() for w in windows] == [[0], [0, 2], [0]]
    assert [w.length for w in windows] == [4, 4, 4]


def test_split_vs_truncate_counts():
    sample = list(range(100, 107))  # 7 tokens, cap 3
    split = Packer(PackingConfig(window=12, max_sample_tokens=3, overflow="split", eos_id=EOS, tail="pad"))
    (w,) = list(split.pack([sample, [5]]))
    assert w.input_ids[: w.length].tolist() == [100, 101, 102, 103, 104, 105, 106, EOS, 5, EOS]
    assert w.segment_starts.tolist() == [0, 3, 6, 8]  # each chunk is its own segment
    assert split.stats.split_samples == 1 and split.stats.truncated_samples == 0
    assert split.stats.dropped_tokens == 0 and split.stats.pad_tokens == 2

    trunc = Packer(PackingConfig(window=12, max_sample_tokens=3, overflow="truncate", eos_id=EOS, tail="pad"))
    (w,) = list(trunc.pack([sample, [5]]))
    assert w.input_ids[: w.length].tolist() == [100, 101, 102, EOS, 5, EOS]
    assert w.segment_starts.tolist() == [0, 4]
    assert trunc.stats.truncated_samples == 1 and trunc.stats.split_samples == 0
    assert trunc.stats.dropped_tokens == 4 and trunc.stats.packed_tokens == 6


def test_tail_drop_vs_pad():
    samples = [[7] * 5, [8] * 3]  # 10 tokens with EOS into windows of 4
    drop = Packer(PackingConfig(window=4, eos_id=EOS))
    assert len(list(drop.pack(samples))) == 2
    assert drop.stats.dropped_tokens == 2 and drop.stats.pad_tokens == 0
    pad = Packer(PackingConfig(window=4, eos_id=EOS, tail="pad", pad_id=1))
    windows = list(pad.pack(samples))
    assert len(windows) == 3 and windows[-1].length == 2
    assert windows[-1].input_ids.tolist() == [8, EOS, 1, 1]
    assert pad.stats.pad_tokens == 2 and pad.stats.dropped_tokens == 0
    assert pad.stats.efficiency == pytest.approx(10 / 12)
    # An exact fit leaves no tail to pad.
    exact = Packer(PackingConfig(window=5, eos_id=EOS, tail="pad"))
    assert [w.length for w in exact.pack([[9] * 4, [9] * 4])] == [5, 5]


def test_no_eos_without_id_or_when_disabled():
    for cfg in (PackingConfig(window=4), PackingConfig(window=4, eos_id=EOS, add_eos=False)):
        packer = Packer(cfg)
        windows = list(packer.pack([[5, 6], [7, 8, 9], [10, 11, 12]]))
        assert [w.input_ids.tolist() for w in windows] == [[5, 6, 7, 8], [9, 10, 11, 12]]
        assert [w.segment_starts.tolist() for w in windows] == [[0, 2], [0, 1]]
        assert packer.stats.eos_tokens == 0


def test_deterministic_and_input_types():
    rng = np.random.default_rng()
    samples = random_samples(rng, 40, 25)
    cfg = PackingConfig(window=11, max_sample_tokens=8, eos_id=EOS, tail="pad")
    a = list(Packer(cfg).pack(samples))
    packer = Packer(cfg)
    # Same ids as a generator of arrays / tuples: same windows.
    b = list(packer.pack(np.asarray(x, dtype=np.int64) if i % 2 else tuple(x) for i, x in enumerate(samples)))
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.window_id == y.window_id and x.length == y.length
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.segment_starts, y.segment_starts)
    # A second pack() call starts fresh stats and window ids.
    again = list(packer.pack(samples))
    assert again[0].window_id == 0 and packer.stats.windows == len(a)


def test_lazy_consumption_and_partial_stats():
    pulled = []

    def source():
        for i in range(1000):
            pulled.append(i)
            yield [4 + i % 50] * 3  # 4 tokens with EOS: one window of 8 per two samples

    packer = Packer(PackingConfig(window=8, eos_id=EOS))
    stats_before = packer.stats
    it = packer.pack(source())
    assert packer.stats is not stats_before and packer.stats.windows == 0
    first = [next(it) for _ in range(3)]
    assert [w.window_id for w in first] == [0, 1, 2]
    assert len(pulled) == 6  # the window is handed out before the next sample is read
    assert packer.stats.samples == 6 and packer.stats.packed_tokens == 24


def test_positions_continuous_and_reset():
    rng = np.random.default_rng()
    W = 50
    for _ in range(20):
        inner = np.sort(rng.choice(np.arange(1, W), size=int(rng.integers(0, 10)), replace=False))
        starts = np.concatenate([[0], inner]).astype(np.int32)
        cont = position_ids_for(W, starts, "continuous")
        assert cont.dtype == np.int64 and cont.tolist() == list(range(W))
        reset = position_ids_for(W, starts, "reset")
        want, p = [], -1
        for t in range(W):
            p = 0 if t in set(starts.tolist()) else p + 1
            want.append(p)
        assert reset.dtype == np.int64 and reset.tolist() == want


def test_positions_of_packed_windows():
    cfg = PackingConfig(window=6, eos_id=EOS, position_mode="reset", tail="pad")
    windows = list(Packer(cfg).pack([[5, 5], [6, 6, 6, 6, 6], [7]]))
    # stream: 5 5 E 6 6 6 | 6 6 E 7 E [pad]
    got = [position_ids_for(6, w.segment_starts, cfg.position_mode).tolist() for w in windows]
    assert got == [[0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 1, 2]]


@pytest.mark.parametrize(
    "starts", [[], [1, 2], [0, 3, 3], [0, 5, 2], [0, 50]], ids=["empty", "no0", "dup", "down", "beyond"]
)
def test_positions_reject_bad_starts(starts):
    with pytest.raises(LongkdError, match="segment_starts"):
        position_ids_for(50, starts, "reset")


def test_positions_reject_bad_mode():
    with pytest.raises(LongkdError, match="position_mode"):
        position_ids_for(8, [0], "absolute")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(window=1), "window"),
        (dict(window=0), "window"),
        (dict(window=8.0), "window"),
        (dict(window=8, max_sample_tokens=0), "max_sample_tokens"),
        (dict(window=8, overflow="wrap"), "overflow"),
        (dict(window=8, position_mode="absolute"), "position_mode"),
        (dict(window=8, tail="keep"), "tail"),
        (dict(window=8, pad_id=-1), "pad_id"),
        (dict(window=8, eos_id=-2), "eos_id"),
        (dict(window=8, add_eos="yes"), "add_eos"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(LongkdError, match=match):
        PackingConfig(**kwargs)


@pytest.mark.parametrize(
    "bad, match",
    [
        ([1.5, 2.0], "integer token ids"),
        ([[1, 2], [3, 4]], "1-D"),
        ([3, -1], "outside"),
        ("t4 t5", "integer"),
    ],
)
def test_bad_samples_raise(bad, match):
    with pytest.raises(LongkdError, match=match):
        list(Packer(PackingConfig(window=4)).pack([[4, 5], bad]))


def test_stats_dict_and_summary():
    packer = Packer(PackingConfig(window=4, max_sample_tokens=2, overflow="truncate", eos_id=EOS))
    list(packer.pack([[9, 9, 9], [], [8]]))
    d = packer.stats.to_dict()
    for key in (
        "samples", "sample_tokens", "packed_tokens", "dropped_tokens", "pad_tokens",
        "split_samples", "truncated_samples", "efficiency", "empty_samples", "windows",
    ):  # fmt: skip
        assert key in d
    assert d["samples"] == 3 and d["empty_samples"] == 1 and d["truncated_samples"] == 1
    assert d["packed_tokens"] == 4 and d["dropped_tokens"] == 2 and d["windows"] == 1
    assert d["efficiency"] == 1.0
    line = packer.stats.summary()
    assert "\n" not in line and "3 samples" in line and "1 windows" in line and "100.00%" in line
    assert PackingStats(window=8).efficiency == 0.0


def test_large_stream_is_fast():
    """A few million tokens pack in well under a second's worth of per-token work."""
    import time

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 3000, size=2000)
    samples = [rng.integers(4, 50_000, size=n, dtype=np.int32) for n in lengths]
    packer = Packer(PackingConfig(window=4096, max_sample_tokens=1024, eos_id=EOS))
    start = time.perf_counter()
    count = sum(1 for _ in packer.pack(samples))
    elapsed = time.perf_counter() - start
    s = packer.stats
    assert count == s.windows and s.packed_tokens + s.dropped_tokens == s.sample_tokens + s.eos_tokens
    assert elapsed < 2.0, f"packing {s.sample_tokens} tokens took {elapsed:.2f}s"
