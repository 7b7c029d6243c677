"""The public dataset API (trainer/dataset.py, reached as ``longkd.CacheDataset``) on real caches.

Caches come from the real ``longkd cache build`` of a tiny random teacher. Batches are checked
against the trainer's own ``WindowStream`` (same windows, same tensors, prefix and mask
semantics); resume against an uninterrupted run, with DataLoader workers; two gloo ranks with
two workers each must together read every window once per epoch; bad inputs give one line.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader

from longkd.errors import LongkdError
from longkd.models import tiny_config
from longkd.trainer.dataset import CacheDataset, CacheReadError, check_model_fits, collate_windows
from longkd.trainer.stream import WindowStream
from tests.helpers import build_cache, write_random_text

VOCAB = 64
W = 32
WINDOWS = 44  # not a multiple of the batch sizes below: batches straddle the epoch boundary


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return tiny_model_dir("llama", vocab_size=VOCAB, max_position_embeddings=64)


@pytest.fixture(scope="module")
def caches(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("api-caches")
    data = write_random_text(root / "data.jsonl", samples=220, vocab=VOCAB, lengths=(3, 30), seed=None)
    flags = {"window": W, "batch_size": 8, "shard_size": "8KB"}
    return {
        "topk": str(build_cache(teacher, data, root / "topk", top_k=8, max_windows=WINDOWS, **flags)),
        "sampled": str(
            build_cache(teacher, data, root / "sampled", sample_draws=16, max_windows=10, **flags)
        ),
    }


def loader(dataset, workers=0, **kwargs):
    return DataLoader(
        dataset, batch_size=dataset.batch_size, collate_fn=collate_windows, num_workers=workers, **kwargs
    )


def take(dataset, n, workers=0, mark=True, **kwargs):
    """The first ``n`` batches of a fresh DataLoader over ``dataset``, marked consumed."""
    out = []
    for batch in loader(dataset, workers, **kwargs):
        out.append(batch)
        if mark:
            dataset.mark_consumed(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("cache", ["topk", "sampled"])
@pytest.mark.parametrize("prefix", [None, 13])
def test_batches_are_the_trainers_batches(caches, cache, prefix):
    """Same windows in the same order as WindowStream, and the same tensors after the prefix cut."""
    skip = 2
    dataset = CacheDataset(caches[cache], batch_size=3, seed=4, shuffle_buffer=8, prefix=prefix)
    stream = WindowStream(caches[cache], batch_size=3, seed=4, shuffle_buffer=8)
    collate = functools.partial(collate_windows, skip_first_tokens=skip)
    got = []
    for batch in DataLoader(dataset, batch_size=3, collate_fn=collate):
        got.append(batch)
        if len(got) == 17:  # 51 windows: past the end of an epoch (44 or 10 windows)
            break
    for batch, ref in zip(got, stream):
        ref = ref.prefix(prefix or W)
        p = prefix or W
        assert batch["input_ids"].shape == (3, p)
        assert torch.equal(batch["window_ids"], ref.window_ids)
        assert torch.equal(batch["input_ids"], ref.input_ids)
        assert torch.equal(batch["position_ids"], ref.position_ids)
        assert torch.equal(batch["teacher_ids"], ref.ids)
        assert torch.equal(batch["teacher_logprobs"], ref.teacher_logprobs)
        assert torch.equal(batch["loss_mask"], ref.loss_mask(skip))
        # labels written out: the next token where trained, -100 elsewhere
        want = torch.full((3, p), -100)
        want[:, :-1] = ref.input_ids[:, 1:]
        want[~ref.loss_mask(skip)] = -100
        assert torch.equal(batch["labels"], want)
        assert not batch["loss_mask"][:, -1].any()  # the last row predicts a token outside the prefix
    seen = torch.cat([b["window_ids"] for b in got]).tolist()
    n = dataset.windows_per_epoch
    epochs = [dataset.epoch_order(e).tolist() for e in range(len(seen) // n + 1)]
    assert all(sorted(order) == list(range(n)) for order in epochs)
    assert seen == sum(epochs, [])[: len(seen)]
    assert torch.cat([b["stream_offsets"] for b in got]).tolist() == list(range(51))


def test_loss_mode_and_temperature_follow_the_cache(caches):
    topk, sampled = CacheDataset(caches["topk"], batch_size=2), CacheDataset(caches["sampled"], batch_size=2)
    assert (topk.loss_mode, sampled.loss_mode) == ("bucket", "sampled")
    assert topk.temperature == 1.0 and topk.selection == {"mode": "topk", "k": 8}
    assert topk.windows_per_epoch == WINDOWS


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop", [5, 14])  # 14 * 3 = 42 of 44: the next batch straddles the epoch end
def test_resume_equals_uninterrupted_run(caches, workers, stop):
    make = functools.partial(CacheDataset, caches["topk"], batch_size=3, seed=7, shuffle_buffer=8)
    uninterrupted = [b["window_ids"].tolist() for b in take(make(), stop + 4)]
    first = make()
    got = [
        b["window_ids"].tolist() for b in take(first, stop, workers, prefetch_factor=4 if workers else None)
    ]
    state = json.loads(json.dumps(first.state_dict()))  # workers prefetched more; only marked batches count
    assert state["epoch"] * WINDOWS + state["position"] == 3 * stop
    second = make()
    second.load_state_dict(state)
    got += [b["window_ids"].tolist() for b in take(second, 4, workers)]
    assert got == uninterrupted


def test_iterating_again_continues_after_the_marked_batches(caches):
    dataset = CacheDataset(caches["topk"], batch_size=4, seed=1)
    order = dataset.epoch_order(0).tolist()
    a = take(dataset, 2)
    b = take(dataset, 1, mark=False)  # not marked: the next iteration gives it again
    c = take(dataset, 1)
    ids = [x["window_ids"].tolist() for x in a + b + c]
    assert ids == [order[0:4], order[4:8], order[8:12], order[8:12]]


def test_mark_consumed_refuses_old_batches_and_skips_ahead(caches):
    dataset = CacheDataset(caches["topk"], batch_size=2, seed=0)
    batches = take(dataset, 3, mark=False)
    dataset.mark_consumed(batches[1])  # batch 0 skipped: the position moves past batch 1
    assert dataset.state_dict()["position"] == 4
    with pytest.raises(LongkdError, match="before the position"):
        dataset.mark_consumed(batches[0])
    with pytest.raises(LongkdError, match="stream_offsets"):
        dataset.mark_consumed({"input_ids": batches[2]["input_ids"]})


def test_other_dataloader_batch_size_is_refused(caches):
    dataset = CacheDataset(caches["topk"], batch_size=4)
    with pytest.raises(LongkdError, match="batch_size=dataset.batch_size"):
        next(iter(DataLoader(dataset, batch_size=3, collate_fn=collate_windows)))
    with pytest.raises(LongkdError, match="batch_size=dataset.batch_size"):
        next(iter(DataLoader(dataset, batch_size=None, collate_fn=collate_windows)))


def test_bad_settings_are_one_line(caches):
    cases = [
        (dict(batch_size=0), "batch_size"),
        (dict(batch_size=2, prefix=W + 1), "prefix"),
        (dict(batch_size=2, rank=2, world=2), "rank"),
        (dict(batch_size=2, rank=0), "both rank and world"),
    ]
    for kwargs, words in cases:
        with pytest.raises(LongkdError, match=words) as err:
            CacheDataset(caches["topk"], **kwargs)
        assert "\n" not in str(err.value)
    with pytest.raises(LongkdError, match="seed"):
        CacheDataset(caches["topk"], batch_size=2, seed=1).load_state_dict(
            CacheDataset(caches["topk"], batch_size=2, seed=2).state_dict()
        )


# ----------------------------------------------------------------------------- bad caches


def test_unfinished_cache_is_one_line(caches, tmp_path):
    unfinished = tmp_path / "unfinished"
    shutil.copytree(caches["topk"], unfinished)
    (unfinished / "manifest.json").unlink()  # a build writes it last, only on success
    with pytest.raises(LongkdError) as err:
        CacheDataset(str(unfinished), batch_size=2)
    message = str(err.value)
    assert "\n" not in message and "no manifest.json" in message and "longkd cache build" in message


def test_model_that_does_not_fit_gets_the_trainers_line(caches, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from longkd.tools.random_models import build_word_tokenizer, save_tiny_model
    from longkd.trainer.config import parse_config
    from longkd.trainer.loop import prepare

    dataset = CacheDataset(caches["topk"], batch_size=2)
    check_model_fits(dataset, tiny_config("llama", vocab_size=VOCAB), build_word_tokenizer(VOCAB))  # fits
    # the teacher's tokenizer, an embedding 8 rows short of it
    small = save_tiny_model(
        tmp_path / "small",
        vocab_size=VOCAB - 8,
        tokenizer_size=VOCAB,
        hidden_size=16,
        num_heads=2,
        num_layers=1,
    )
    with pytest.raises(LongkdError) as api_err:
        check_model_fits(
            caches["topk"], AutoModelForCausalLM.from_pretrained(small), AutoTokenizer.from_pretrained(small)
        )
    config = {
        "cache": caches["topk"],
        "out": str(tmp_path / "run"),
        "steps": 1,
        "batch_size": 2,
        "device": "cpu",
        "students": [{"name": "s", "init": str(small)}],
    }
    with pytest.raises(LongkdError) as train_err:
        prepare(parse_config(config))
    assert "\n" not in str(api_err.value) and "vocab_size 56" in str(api_err.value)
    assert str(train_err.value) == f"students[0] (s): {api_err.value}"  # the trainer's line
    with pytest.raises(LongkdError, match="tokenizer fingerprint"):
        check_model_fits(dataset, tiny_config("llama", vocab_size=VOCAB), build_word_tokenizer(VOCAB + 1))


def _damage(cache, tmp_path, name, how):
    out = tmp_path / name
    shutil.copytree(cache, out)
    manifest = json.loads((out / "manifest.json").read_text())
    shard = out / manifest["shards"][1]["path"]
    data = bytearray(shard.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:  # one byte changed in place: the file may still decode
        data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    return str(out), manifest["shards"][1]["path"]


@pytest.mark.parametrize("workers", [0, 2])
def test_truncated_shard_is_one_line_while_reading(caches, tmp_path, workers):
    cache, shard = _damage(caches["topk"], tmp_path, "truncated", "truncate")
    # the shard's size differs from the manifest's: refused as soon as the cache is opened
    with pytest.raises(LongkdError) as err:
        take(CacheDataset(cache, batch_size=4, shuffle=False), 10, workers)
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    assert shard in message and "truncated" in message and "longkd cache verify" in message


def test_changed_byte_is_caught_by_verify(caches, tmp_path):
    cache, shard = _damage(caches["topk"], tmp_path, "flipped", "flip")
    with pytest.raises(CacheReadError) as err:
        CacheDataset(cache, batch_size=4, verify=True)
    message = str(err.value)
    assert "\n" not in message and shard in message and "sha256" in message
    CacheDataset(caches["topk"], batch_size=4, verify=True)  # an intact cache passes


# ----------------------------------------------------------------------------- ranks x workers


def _rank_main(rank, world, cache, rendezvous, out_dir, batches, stop):
    """One gloo rank: ``stop`` batches with 2 DataLoader workers, then the rest from a resumed dataset."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        make = functools.partial(CacheDataset, cache, batch_size=5, seed=3, shuffle_buffer=8)
        first = make()  # rank and world from the process group
        assert (first.rank, first.world) == (rank, world)
        seen = [b["window_ids"].tolist() for b in take(first, stop, workers=2)]
        second = make()
        second.load_state_dict(first.state_dict())
        seen += [b["window_ids"].tolist() for b in take(second, batches - stop, workers=2)]
        (out_dir / f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_with_two_workers_read_each_window_once_per_epoch(caches, tmp_path):
    """Rank r's batch b is the r-th slice of global batch b; resumed mid-epoch after ``stop`` batches."""
    import torch.multiprocessing as mp

    world, batches, stop = 2, 9, 4  # 9 global batches of 2 x 5 = 90 windows: two epochs of 44 and a bit
    env_before = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(
            _rank_main,
            args=(world, caches["topk"], str(tmp_path / "rendezvous"), tmp_path, batches, stop),
            nprocs=world,
        )
    finally:
        if env_before is None:
            os.environ.pop("OMP_NUM_THREADS")
        else:
            os.environ["OMP_NUM_THREADS"] = env_before
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert all(len(batch) == 5 for seen in ranks for batch in seen) and all(len(s) == batches for s in ranks)
    flat = [w for b in range(batches) for r in range(world) for w in ranks[r][b]]
    assert sorted(flat[:WINDOWS]) == list(range(WINDOWS))  # epoch 0: every window once
    assert sorted(flat[WINDOWS : 2 * WINDOWS]) == list(range(WINDOWS))  # epoch 1 too
    one = CacheDataset(caches["topk"], batch_size=10, seed=3, shuffle_buffer=8, rank=0, world=1)
    assert flat == sum((one.epoch_order(e).tolist() for e in range(3)), [])[:90]  # one process's order


# ----------------------------------------------------------------------------- the front door


def test_import_longkd_is_cheap_and_hands_out_the_api():
    code = (
        "import sys, longkd\n"
        "before = sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules)\n"
        "from longkd import CacheDataset, SparseKLLoss, collate_windows, check_model_fits\n"
        "from longkd import sparse_kl_loss, fused_sparse_kl_loss, CacheReadError, LongkdError\n"
        "import longkd.trainer.dataset as d, longkd.trainer.loss_api as l, longkd.errors as e\n"
        "assert CacheDataset is d.CacheDataset and SparseKLLoss is l.SparseKLLoss\n"
        "assert LongkdError is e.LongkdError and issubclass(CacheReadError, LongkdError)\n"
        "assert set(longkd.__all__) <= set(dir(longkd))\n"
        "try:\n    longkd.NoSuchThing\nexcept AttributeError:\n    pass\n"
        "else:\n    raise SystemExit('no error')\n"
        "print(before)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
