"""Training from an adaptive cache (rows of 1..K entries): the batch is padded to its widest
row, the loss is the bucket loss of the top-K rows cut by the same rule, and a run trains."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from longkd.cache.reader import CacheReader
from longkd.trainer.config import parse_config
from longkd.trainer.dataset import CacheDataset, collate_windows
from longkd.trainer.loop import prepare, run_loop
from longkd.trainer.losses import batch_losses
from tests.cache.test_adaptive_rows import reference_counts
from tests.trainer import test_train as base

teacher_dir = base.teacher_dir  # the peaked tiny teacher of the training tests (about 2 nats)
K = base.VOCAB  # the whole vocabulary: only the rule cuts rows
MIN_MASS, MIN_PROB = 0.9, 0.02  # at most 49 entries a row reach p >= 0.02, so every row is cut


@pytest.fixture(scope="module")
def caches(teacher_dir, tmp_path_factory):
    """The same windows of one teacher as a top-K cache and as an adaptive one."""
    root = tmp_path_factory.mktemp("adaptive")
    data = base.write_data(root / "d.jsonl", 60, seed=None)
    # plain: cut_top_k takes each row's first entries, which needs rank order
    topk = base.make_cache(teacher_dir, data, root / "topk", 8, "--top-k", str(K), "--encoding", "plain")
    adaptive = base.make_cache(
        teacher_dir,
        data,
        root / "adaptive",
        8,
        "--top-k",
        str(K),
        "--min-mass",
        str(MIN_MASS),
        "--min-prob",
        str(MIN_PROB),
        "--encoding",
        "plain",  # compared entry by entry, in rank order, with the cut top-K rows
    )
    return {"topk": topk, "adaptive": adaptive}


def cut_top_k(reader: CacheReader, window_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-K rows of ``window_ids`` with every entry past the rule's count made padding:
    ids long [B, W, K] (-1), log-probs float32 [B, W, K] (-inf)."""
    ids, logprobs = [], []
    for i in window_ids:
        w = reader.read_window(int(i))
        keep = np.arange(K) < reference_counts(w.logprobs, K, MIN_MASS, MIN_PROB)[:, None]
        ids.append(np.where(keep, w.ids, -1))
        logprobs.append(np.where(keep, w.logprobs, -np.inf))
    return torch.from_numpy(np.stack(ids).astype(np.int64)), torch.from_numpy(np.stack(logprobs))


def test_adaptive_loss_is_the_bucket_loss_of_the_cut_top_k_rows(caches, tmp_path):
    s = base.student(seed=3)
    s["loss"] = {"kd_weight": 1.0, "ce_weight": 0.0}
    run = prepare(parse_config(base.config(caches["adaptive"], tmp_path / "run", [s], batch_size=4)))
    assert run.modes == {"s": "bucket"}  # the default for an adaptive cache, as for top-k
    st = run.students[0]
    batch = next(iter(run.stream))
    ids, logprobs = cut_top_k(CacheReader(caches["topk"]), batch.window_ids)
    widths = (ids >= 0).sum(-1)  # [B, W] entries per row
    assert batch.ids.shape[-1] == int(widths.max()) < K  # padded to the batch's widest row only
    np.testing.assert_array_equal(batch.ids.numpy(), ids[..., : batch.ids.shape[-1]].numpy())
    np.testing.assert_array_equal(
        batch.teacher_logprobs.numpy(), logprobs[..., : batch.ids.shape[-1]].numpy()
    )
    _, kl, _, n = batch_losses(st, batch, mode="bucket", temperature=1.0, amp=None, cache_temperature=1.0)
    st.model.eval()
    with torch.no_grad():
        logits = st.model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits
    b, w = batch.input_ids.shape
    mask = (torch.arange(w)[None] < batch.lengths[:, None] - 1).reshape(-1)
    want = base.bucket_kl_direct(
        logits.reshape(b * w, -1), ids.reshape(b * w, K), logprobs.reshape(b * w, K), mask, 1.0
    )
    assert n == int(mask.sum())
    assert float(kl) == pytest.approx(float(want), rel=1e-5)
    # The cut rows' tails are real: the adaptive loss differs from the full top-K loss.
    full_ids, full_lp = cut_top_k_full(CacheReader(caches["topk"]), batch.window_ids)
    full = base.bucket_kl_direct(
        logits.reshape(b * w, -1), full_ids.reshape(b * w, K), full_lp.reshape(b * w, K), mask, 1.0
    )
    assert float(full) != pytest.approx(float(want), rel=1e-3)


def cut_top_k_full(reader: CacheReader, window_ids) -> tuple[torch.Tensor, torch.Tensor]:
    """The uncut top-K rows of ``window_ids``: ids long [B, W, K], log-probs float32 [B, W, K]."""
    windows = [reader.read_window(int(i)) for i in window_ids]
    ids = np.stack([w.ids for w in windows]).astype(np.int64)
    return torch.from_numpy(ids), torch.from_numpy(np.stack([w.logprobs for w in windows]))


def test_public_dataset_pads_adaptive_rows_to_the_batch(caches):
    dataset = CacheDataset(str(caches["adaptive"]), batch_size=4, shuffle=False)
    assert dataset.loss_mode == "bucket" and dataset.selection["mode"] == "adaptive"
    items = list(zip(range(4), iter(dataset), strict=False))
    batch = collate_windows([item for _, item in items])
    widest = max(int((item.window.ids >= 0).sum(-1).max()) for _, item in items)
    assert batch["teacher_ids"].shape == (4, base.W, widest)
    assert ((batch["teacher_ids"] < 0) == torch.isinf(batch["teacher_logprobs"])).all()


def test_a_run_trains_from_an_adaptive_cache(caches, tmp_path):
    s = base.student()
    run = prepare(parse_config(base.config(caches["adaptive"], tmp_path / "run", [s], steps=3)))
    result = run_loop(run, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(m["kl"]) and m["kl"] > 0 for m in lines)
    assert result.students[0].step == 3
