"""WindowStream and WindowBatch on real caches built by `longkd cache build` from tiny teachers.

Orders are checked as permutations with the documented shard / buffer structure; resumption
against an uninterrupted run; batch contents against ``CacheReader.read_window``; prefix and
mask semantics against loops written out by hand.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from longkd.cache.reader import CacheReader
from longkd.errors import LongkdError
from longkd.models import tiny_config
from longkd.tools.random_models import build_word_tokenizer
from longkd.trainer.stream import IGNORE_INDEX, WindowBatch, WindowStream, check_student_compatible
from tests.helpers import build_cache, write_random_text

VOCAB = 96
W = 32


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # ids below 90: the padded teacher's tokenizer has 90 entries
    path = tmp_path_factory.mktemp("stream-data") / "train.jsonl"
    return write_random_text(path, samples=140, vocab=90, lengths=(3, 30), seed=0)


def build(teacher, data, out, *extra, window=W, windows=40):
    flags = {"window": window, "max_windows": windows, "batch_size": 8, "shard_size": "12KB"}
    return str(build_cache(teacher, data, out, *extra, **flags))


@pytest.fixture(scope="module")
def caches(tiny_model_dir, data_file, tmp_path_factory):
    teacher = tiny_model_dir("llama", vocab_size=VOCAB, max_position_embeddings=64)
    padded = tiny_model_dir("llama", seed=1, vocab_size=100, tokenizer_size=90, max_position_embeddings=64)
    root = tmp_path_factory.mktemp("stream-caches")
    return {
        "teacher": teacher,
        "padded_teacher": padded,
        "a": build(teacher, data_file, root / "a", "--top-k", "8"),
        "a2": build(teacher, data_file, root / "a2", "--top-k", "8", "--shuffle", "--seed", "3", windows=10),
        "sampled": build(teacher, data_file, root / "s", "--sample-draws", "16", windows=12),
        "short": build(teacher, data_file, root / "w16", "--top-k", "8", window=16, windows=4),
        "padded": build(padded, data_file, root / "p", "--top-k", "8", windows=6),
    }


def take(stream, n):
    it = iter(stream)
    out = [next(it) for _ in range(n)]
    it.close()
    return out


def same(a: WindowBatch, b: WindowBatch) -> bool:
    """Bitwise equal batches (NaN equal to NaN: target_logprob is NaN at the last row)."""
    fields = WindowBatch.__dataclass_fields__
    return all(torch.equal(getattr(a, f).nan_to_num(1.0), getattr(b, f).nan_to_num(1.0)) for f in fields)


def test_cache_has_several_shards(caches):
    reader = CacheReader(caches["a"])
    assert reader.num_windows == 40 and len(reader.shards) >= 4


def test_epoch_order_is_deterministic_and_structured(caches):
    reader = CacheReader(caches["a"])
    n = reader.num_windows
    s1 = WindowStream(caches["a"], batch_size=4, seed=7, shuffle_buffer=8)
    s1b = WindowStream(caches["a"], batch_size=4, seed=7, shuffle_buffer=8)
    s2 = WindowStream(caches["a"], batch_size=4, seed=8, shuffle_buffer=8)
    o0, o1 = s1.epoch_order(0), s1.epoch_order(1)
    assert np.array_equal(o0, s1b.epoch_order(0)) and np.array_equal(o1, s1b.epoch_order(1))
    assert sorted(o0.tolist()) == list(range(n)) and sorted(o1.tolist()) == list(range(n))
    assert not np.array_equal(o0, o1)
    assert not np.array_equal(o0, s2.epoch_order(0))

    # shuffle_buffer=1: whole shards in a permuted order, each shard's windows ascending
    shards = [list(range(s["first_window"], s["last_window"] + 1)) for s in reader.shards]
    flat = WindowStream(caches["a"], batch_size=4, seed=7, shuffle_buffer=1).epoch_order(0).tolist()
    runs, i = [], 0
    while i < n:
        run = next(s for s in shards if s[0] == flat[i])
        assert flat[i : i + len(run)] == run
        runs.append(run[0])
        i += len(run)
    assert sorted(runs) == [s[0] for s in shards]
    # buffer 8: each block of 8 is a permutation of the same block of that shard order
    seq = [w for first in runs for w in next(s for s in shards if s[0] == first)]
    for lo in range(0, n, 8):
        assert sorted(o0[lo : lo + 8].tolist()) == sorted(seq[lo : lo + 8])
    assert not np.array_equal(o0, np.array(seq))  # and really permuted within blocks

    plain = WindowStream(caches["a"], batch_size=4, shuffle=False)
    assert plain.epoch_order(0).tolist() == list(range(n)) == plain.epoch_order(3).tolist()


def test_every_window_once_per_epoch_across_the_boundary(caches):
    stream = WindowStream(caches["a"], batch_size=3, seed=1, shuffle_buffer=16)
    n = stream.windows_per_epoch  # 40, not a multiple of 3
    seen = torch.cat([b.window_ids for b in take(stream, 3 * n // 3 + 1)]).tolist()
    assert seen[:n] == stream.epoch_order(0).tolist()
    assert seen[n : 2 * n] == stream.epoch_order(1).tolist()
    assert seen[2 * n : 3 * n] == stream.epoch_order(2).tolist()[: len(seen) - 2 * n]


def test_workers_give_the_same_stream(caches):
    ref = take(WindowStream(caches["a"], batch_size=5, seed=3, shuffle_buffer=8), 12)
    par = take(
        WindowStream(caches["a"], batch_size=5, seed=3, shuffle_buffer=8, num_workers=2, prefetch_factor=3),
        12,
    )
    assert all(same(a, b) for a, b in zip(ref, par))


@pytest.mark.parametrize("stop", [4, 13, 14])  # 13 * 3 = 39: batch 13 straddles the epoch boundary
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_equals_uninterrupted_run(caches, stop, workers):
    uninterrupted = take(WindowStream(caches["a"], batch_size=3, seed=5, shuffle_buffer=8), stop + 4)
    first = WindowStream(caches["a"], batch_size=3, seed=5, shuffle_buffer=8, num_workers=workers)
    got = take(first, stop)  # workers have prefetched beyond `stop`; the state must not count them
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] * 40 + state["position"] == 3 * stop
    assert state["seed"] == 5 and state["windows_per_epoch"] == 40
    second = WindowStream(caches["a"], batch_size=3, seed=5, shuffle_buffer=8, num_workers=workers)
    second.load_state_dict(state)
    got += take(second, 4)
    assert all(same(a, b) for a, b in zip(got, uninterrupted))
    ids = torch.cat([b.window_ids for b in got]).tolist()
    assert len(set(ids[:40])) == len(ids[:40])  # no duplicate within epoch 0
    if len(ids) >= 40:
        assert sorted(ids[:40]) == list(range(40))  # and no gap


def test_resume_with_other_settings_refused(caches):
    state = WindowStream(caches["a"], batch_size=3, seed=5).state_dict()
    with pytest.raises(LongkdError, match="seed"):
        WindowStream(caches["a"], batch_size=3, seed=6).load_state_dict(state)
    with pytest.raises(LongkdError, match="windows_per_epoch"):
        WindowStream(caches["a2"], batch_size=3, seed=5).load_state_dict(state)
    with pytest.raises(LongkdError, match="malformed"):
        WindowStream(caches["a"], batch_size=3, seed=5).load_state_dict({"epoch": 0})
    with pytest.raises(LongkdError, match="batch_size"):
        WindowStream(caches["a"], batch_size=0)


def check_against_reader(batch, readers, offsets):
    for i, pool_index in enumerate(batch.window_ids.tolist()):
        cache = max(c for c, off in enumerate(offsets) if off <= pool_index)
        win = readers[cache].read_window(pool_index - offsets[cache])
        k = win.ids.shape[1]
        assert win.window_id == pool_index - offsets[cache]
        assert batch.input_ids[i].tolist() == win.input_ids.tolist()
        assert batch.position_ids[i].tolist() == win.position_ids.tolist()
        assert int(batch.lengths[i]) == win.length
        s = len(win.segment_starts)
        assert batch.segment_starts[i, :s].tolist() == win.segment_starts.tolist()
        assert (batch.segment_starts[i, s:] == -1).all()
        assert batch.ids[i, :, :k].tolist() == win.ids.tolist()
        assert (batch.ids[i, :, k:] == -1).all()
        np.testing.assert_array_equal(batch.teacher_logprobs[i, :, :k].numpy(), win.logprobs)
        assert torch.isneginf(batch.teacher_logprobs[i, :, k:]).all()
        np.testing.assert_array_equal(batch.next_token_logprob[i].numpy(), win.target_logprob)
    assert batch.input_ids.dtype == batch.ids.dtype == batch.position_ids.dtype == torch.int64
    assert batch.teacher_logprobs.dtype == batch.next_token_logprob.dtype == torch.float32


def test_batches_equal_reader_windows_topk_and_pool(caches):
    readers = [CacheReader(caches["a"]), CacheReader(caches["a2"])]
    stream = WindowStream([caches["a"], caches["a2"]], batch_size=7, seed=2, shuffle_buffer=16)
    assert stream.windows_per_epoch == 50
    batches = take(stream, 8)
    for batch in batches:
        check_against_reader(batch, readers, [0, 40])
    assert sorted(torch.cat([b.window_ids for b in batches]).tolist()[:50]) == list(range(50))


def test_batches_equal_reader_windows_sampled(caches):
    reader = CacheReader(caches["sampled"])
    batches = take(WindowStream(caches["sampled"], batch_size=4, seed=0), 3)
    for batch in batches:
        check_against_reader(batch, [reader], [0])
        # log(counts / draws) over the kept entries: each row's probabilities sum to 1
        probs = batch.teacher_logprobs.exp().sum(-1)
        torch.testing.assert_close(probs, torch.ones_like(probs))
    assert any((b.ids == -1).any() for b in batches)  # rows of fewer unique ids are padded


def random_batch(seed, b=4, w=20):
    """A WindowBatch with hand-picked lengths and segment starts (values random)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.tensor([[0, 5, 9, -1], [0, 1, 2, 12], [0, -1, -1, -1], [0, 16, -1, -1]])
    lengths = torch.tensor([w, w, 13, w])
    return WindowBatch(
        input_ids=torch.randint(4, 90, (b, w), generator=g),
        position_ids=torch.arange(w).repeat(b, 1),
        lengths=lengths,
        segment_starts=starts,
        ids=torch.randint(0, 90, (b, w, 3), generator=g),
        teacher_logprobs=-torch.rand(b, w, 3, generator=g),
        next_token_logprob=-torch.rand(b, w, generator=g),
        window_ids=torch.arange(b),
    )


@pytest.mark.parametrize("skip", [0, 1, 3])
def test_loss_mask_and_next_tokens_by_hand(skip):
    batch = random_batch(skip)
    mask = batch.loss_mask(skip)
    nxt = batch.next_tokens(skip)
    for i in range(4):
        starts = [s for s in batch.segment_starts[i].tolist() if s >= 0]
        length = int(batch.lengths[i])
        for t in range(batch.window):
            want = t < length - 1 and not any(s <= t < s + skip for s in starts)
            assert bool(mask[i, t]) == want, (i, t)
            assert int(nxt[i, t]) == (int(batch.input_ids[i, t + 1]) if want else IGNORE_INDEX)
    assert mask.dtype == torch.bool and mask.shape == (4, batch.window)
    assert not mask[:, -1].any()


def test_prefix_by_hand():
    batch = random_batch(11)
    p = 10
    pre = batch.prefix(p)
    assert pre.window == p
    assert torch.equal(pre.input_ids, batch.input_ids[:, :p])
    assert torch.equal(pre.position_ids, batch.position_ids[:, :p])
    assert torch.equal(pre.ids, batch.ids[:, :p]) and torch.equal(
        pre.teacher_logprobs, batch.teacher_logprobs[:, :p]
    )
    assert torch.equal(pre.next_token_logprob, batch.next_token_logprob[:, :p])
    assert pre.lengths.tolist() == [10, 10, 10, 10]
    assert pre.segment_starts.tolist() == [[0, 5, 9], [0, 1, 2], [0, -1, -1], [0, -1, -1]]
    mask = pre.loss_mask(1)
    assert mask[0].nonzero().flatten().tolist() == [1, 2, 3, 4, 6, 7, 8]
    assert mask[1].nonzero().flatten().tolist() == [3, 4, 5, 6, 7, 8]
    assert pre.prefix(p) is pre
    short = batch.prefix(15)
    assert short.lengths.tolist() == [15, 15, 13, 15]
    with pytest.raises(LongkdError, match="prefix length"):
        batch.prefix(batch.window + 1)


def test_prefix_of_real_cache_batch(caches):
    batch = take(WindowStream(caches["a"], batch_size=4, seed=0), 1)[0]
    pre = batch.prefix(12)
    for i in range(4):
        kept = [s for s in batch.segment_starts[i].tolist() if 0 <= s < 12]
        assert [s for s in pre.segment_starts[i].tolist() if s >= 0] == kept
    assert pre.next_tokens()[:, :11].tolist() == batch.input_ids[:, 1:12].tolist()
    assert (pre.next_tokens()[:, 11] == IGNORE_INDEX).all()


def test_pool_mismatch_refused(caches):
    with pytest.raises(LongkdError, match="window"):
        WindowStream([caches["a"], caches["short"]], batch_size=2)
    with pytest.raises(LongkdError, match="selection"):
        WindowStream([caches["a"], caches["sampled"]], batch_size=2)
    with pytest.raises(LongkdError, match="tokenizer fingerprint"):
        WindowStream([caches["a"], caches["padded"]], batch_size=2)


def test_check_student_compatible(caches):
    from transformers import AutoTokenizer

    reader = CacheReader(caches["a"])
    tok = AutoTokenizer.from_pretrained(caches["teacher"])
    check_student_compatible(reader, tiny_config("qwen2", vocab_size=VOCAB), tok)
    check_student_compatible(reader.manifest, tiny_config("llama", vocab_size=128), tok)  # padded is fine
    with pytest.raises(LongkdError, match="tokenizer fingerprint"):
        check_student_compatible(
            reader, tiny_config("llama", vocab_size=VOCAB), build_word_tokenizer(VOCAB + 1)
        )
    with pytest.raises(LongkdError, match="smaller than the cache's tokenizer"):
        check_student_compatible(caches["a"], tiny_config("llama", vocab_size=VOCAB - 1))

    # teacher embedding 100 over a 90-token tokenizer: the ids actually stored decide
    padded = CacheReader(caches["padded"])
    top = max(int(w.ids.max()) for w in padded.iter_windows())
    assert top >= 90  # a random teacher puts some top-k mass on its padded rows
    check_student_compatible(padded, tiny_config("llama", vocab_size=top + 1))
    with pytest.raises(LongkdError, match=f"teacher id {top}"):
        check_student_compatible(padded, tiny_config("llama", vocab_size=top))
    with pytest.raises(LongkdError, match="pass the CacheReader"):
        check_student_compatible(padded.manifest, tiny_config("llama", vocab_size=95))


@pytest.mark.gpu
def test_pinned_batches_move_to_cuda(caches):
    stream = WindowStream(caches["a"], batch_size=2, pin_memory=True, num_workers=1)
    batch = take(stream, 1)[0]
    assert batch.input_ids.is_pinned()
    moved = batch.to("cuda", non_blocking=True)
    assert moved.ids.is_cuda and torch.equal(moved.ids.cpu(), batch.ids)
