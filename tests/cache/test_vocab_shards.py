"""The vocabulary-sharded top-k, logsumexp, target and sampling against the unsharded torch ops.

Random logits with many exact ties, -inf entries (whole rows and whole shards too), shard
widths that do not divide the vocabulary (and empty shards), and k larger than a shard. The
shards are simulated in one process: each gets its slice of the logits, as a tensor-parallel
rank would, and the merge sees only what the ranks would exchange.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longkd.cache import vocab_shards as vs


def chunk_widths(vocab: int, shards: int) -> list[int]:
    """The widths torch's Shard(0) gives (torch.chunk sizes, then empty shards)."""
    step = -(-vocab // shards)
    return [max(0, min(step, vocab - i * step)) for i in range(shards)]


def random_logits(gen: torch.Generator, rows: int, vocab: int) -> torch.Tensor:
    """Logits on a coarse grid (many exact ties), some -inf, one row entirely -inf but one id."""
    logits = torch.randint(-6, 4, (rows, vocab), generator=gen).float() * 0.5
    logits[torch.rand(rows, vocab, generator=gen) < 0.2] = -math.inf
    logits[0, 1:] = -math.inf
    logits[0, 0] = 0.0
    return logits


def sharded_topk(logits, widths, k):
    offsets = vs.shard_offsets(widths)
    parts = [vs.local_topk(logits[:, offsets[i] : offsets[i + 1]], k, offsets[i]) for i in range(len(widths))]
    values = torch.stack([p[0] for p in parts], dim=-2)  # [rows, N, k]
    ids = torch.stack([p[1] for p in parts], dim=-2)
    return vs.merge_topk(values, ids, k)


CASES = [  # (vocab, widths), k values are chosen per case below
    (37, chunk_widths(37, 2)),
    (37, chunk_widths(37, 4)),
    (10, chunk_widths(10, 4)),  # 3, 3, 3, 1
    (5, chunk_widths(5, 4)),  # 2, 2, 1, 0: an empty shard
    (64, [40, 0, 7, 17]),
    (50, [50]),
]


@pytest.mark.parametrize("vocab,widths", CASES)
def test_topk_logsumexp_and_target_equal_unsharded(vocab, widths):
    assert sum(widths) == vocab
    gen = torch.Generator().manual_seed(int.from_bytes(np.random.default_rng().bytes(4), "little"))
    logits = random_logits(gen, 300, vocab)
    offsets = vs.shard_offsets(widths)
    for k in sorted({1, 3, min(vocab, max(widths) + 2), vocab}):
        values, ids = sharded_topk(logits, widths, k)
        want = torch.topk(logits, k, dim=-1).values
        assert torch.equal(values, want), f"k={k}"
        # With ties the ids may differ from torch.topk's; they must be k distinct real ids holding
        # exactly those values.
        assert (ids >= 0).all() and (ids < vocab).all()
        assert all(len(set(row.tolist())) == k for row in ids)
        assert torch.equal(logits.gather(-1, ids), values)

    lse = torch.stack(
        [torch.logsumexp(logits[:, offsets[i] : offsets[i + 1]], -1) for i in range(len(widths))], dim=-1
    )
    torch.testing.assert_close(vs.merge_logsumexp(lse), torch.logsumexp(logits, -1), rtol=0, atol=1e-6)

    target = torch.randint(0, vocab, (300,), generator=gen)
    owned = torch.stack(
        [
            vs.owned_value(logits[:, offsets[i] : offsets[i + 1]], target, offsets[i])
            for i in range(len(widths))
        ],
        dim=-1,
    )
    assert torch.equal(vs.merge_owned(owned), logits.gather(-1, target[:, None])[:, 0])


def test_padding_never_beats_a_real_minus_inf():
    """A shard narrower than k pads with -inf; the full top-k then needs real -inf ids."""
    logits = torch.tensor([[2.0, -math.inf, -math.inf, 1.0, -math.inf, -math.inf, -math.inf]])
    values, ids = sharded_topk(logits, [1, 2, 4], k=6)
    assert values.tolist()[0][:2] == [2.0, 1.0] and values[0, 2:].isneginf().all()
    assert (ids >= 0).all() and len(set(ids[0].tolist())) == 6
    with_pad = vs.local_topk(logits[:, :1], 3, offset=0)
    assert with_pad[1].tolist() == [[0, vs.PAD_ID, vs.PAD_ID]] and with_pad[0][0, 1:].isneginf().all()


def test_shard_offsets():
    assert vs.shard_offsets([3, 3, 3, 1]) == [0, 3, 6, 9, 10]
    assert vs.shard_offsets([]) == [0]
    with pytest.raises(ValueError):
        vs.shard_offsets([2, -1])


# ------------------------------------------------------------------ sampling


def sharded_draws(logits, widths, draws, seed, *, equal_masses=False):
    """Every shard's draws for every row (generators as one window's would be), merged."""
    offsets = vs.shard_offsets(widths)
    parts = [logits[:, offsets[i] : offsets[i + 1]] for i in range(len(widths))]
    lse = torch.stack([torch.logsumexp(p, -1) for p in parts], dim=-1)
    shard_lse = torch.zeros_like(lse) if equal_masses else lse
    counts = vs.shard_draw_counts(shard_lse, draws, torch.Generator().manual_seed(seed))
    mine = [
        vs.draws_within_shard(
            parts[i], lse[:, i], counts[:, i], draws, offsets[i], torch.Generator().manual_seed(seed + 1 + i)
        )
        for i in range(len(widths))
    ]
    return vs.merge_draws(torch.stack(mine, dim=-2))


def pit_ks(ids: torch.Tensor, probs: torch.Tensor, seed: int) -> float:
    """Kolmogorov-Smirnov distance from uniform of the randomised probability integral transform
    of draws ``ids`` [rows, D] under ``probs`` [rows, V]: uniform iff the draws follow probs."""
    p = probs.double().numpy()
    cdf = np.cumsum(p, axis=-1)
    rows = np.repeat(np.arange(p.shape[0]), ids.shape[1])
    flat = ids.reshape(-1).numpy()
    u = cdf[rows, flat] - p[rows, flat] * np.random.default_rng(seed).random(flat.shape[0])
    u = np.sort(u)
    n = u.shape[0]
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max()))


def ks_limit(n: int, alpha: float = 1e-4) -> float:
    """The asymptotic Kolmogorov critical distance at level alpha."""
    return math.sqrt(-0.5 * math.log(alpha / 2)) / math.sqrt(n)


@pytest.mark.parametrize("widths", [chunk_widths(37, 2), chunk_widths(37, 4), [20, 0, 17]])
def test_sharded_draws_follow_the_full_distribution(widths):
    gen = torch.Generator().manual_seed(7)
    rows, draws = 2000, 16
    logits = torch.randn(rows, 37, generator=gen) * 2.0
    logits[torch.rand(rows, 37, generator=gen) < 0.1] = -math.inf
    logits[:, 3] = 1.0  # every row keeps some mass
    ids = sharded_draws(logits, widths, draws, seed=11)
    assert ids.shape == (rows, draws) and (ids >= 0).all()
    assert (ids[:, 1:] >= ids[:, :-1]).all(), "sorted per row"
    probs = torch.softmax(logits, -1)
    assert probs.gather(-1, ids).gt(0).all(), "no draw of a -inf id"
    assert pit_ks(ids, probs, seed=3) < ks_limit(ids.numel())
    # The same statistic rejects a sampler that ignores the shards' masses.
    wrong = sharded_draws(logits, widths, draws, seed=11, equal_masses=True)
    assert pit_ks(wrong, probs, seed=3) > 3 * ks_limit(ids.numel())


def test_draw_counts_per_shard():
    lse = torch.tensor([[0.0, -math.inf, 0.0], [-math.inf, 1.0, -math.inf]])
    counts = vs.shard_draw_counts(lse, 100, torch.Generator().manual_seed(0))
    assert counts.sum(-1).tolist() == [100, 100]
    assert counts[0, 1] == 0 and counts[1].tolist() == [0, 100, 0]
    assert 30 < counts[0, 0] < 70
    # a shard whose row is all -inf draws nothing there (and does not fail)
    logits = torch.tensor([[-math.inf, -math.inf], [0.0, 1.0]])
    got = vs.draws_within_shard(logits, torch.logsumexp(logits, -1), torch.tensor([0, 5]), 5, offset=10)
    assert (got[0] == vs.PAD_ID).all() and ((got[1] >= 10) & (got[1] <= 11)).all()
    empty = vs.draws_within_shard(torch.empty(2, 0), torch.full((2,), -math.inf), torch.zeros(2), 4)
    assert (empty == vs.PAD_ID).all()
