"""The text teacher's pipeline end to end at tiny settings: corpus split, BPE tokenizer,
training, held-out metrics, the cache directory, resuming, and `longkd cache build` on it."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from longkd.tools import text_teacher as tt
from tests.helpers import build_cache, read_manifest

TINY = tt.TextTeacherSpec(
    vocab_size=500,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    context=64,
    steps=6,
    batch=2,
    warmup=2,
    max_files=6,
    heldout_windows=3,
)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return tt.get_or_train(TINY, tmp_path_factory.mktemp("text-teacher"), progress=False)


def test_corpus_split_is_deterministic_and_disjoint():
    spec = tt.TextTeacherSpec()
    train, held = tt.corpus_files(spec)
    assert (train, held) == tt.corpus_files(spec)
    assert not set(train) & set(held)
    assert 0.02 < len(held) / (len(train) + len(held)) < 0.10  # about heldout_percent = 5
    assert all(p.suffix == ".py" and "site-packages" not in p.parts for p in train + held)


def test_trains_saves_and_loads(teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert teacher_dir.name == f"text-teacher-{TINY.digest()}"
    assert not (teacher_dir / tt.STATE_NAME).exists()
    metrics = tt.load_metrics(teacher_dir)
    assert metrics["steps"] == 6 and metrics["spec"] == dataclasses.asdict(TINY)
    assert metrics["positions"] == 3 * 63
    assert 0 < metrics["mean_entropy"] <= np.log(500) + 1e-3
    assert metrics["heldout_loss"] > 0 and metrics["first_loss"] > 0
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    assert len(tokenizer) == model.config.vocab_size == 500
    text = "def f(x):\n    return x + 1\n"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    # the metrics are what evaluate() gives on the same held-out windows
    stream = tt.token_stream(tokenizer, tt.corpus_files(TINY)[1])
    again = tt.evaluate(model.float(), tt.heldout_windows(stream, TINY))
    assert again["heldout_loss"] == pytest.approx(metrics["heldout_loss"], abs=1e-3)
    assert again["mean_entropy"] == pytest.approx(metrics["mean_entropy"], abs=1e-3)


def test_cached_run_does_not_train_again(teacher_dir, monkeypatch):
    monkeypatch.setattr(tt, "train", lambda *a, **k: pytest.fail("trained again"))
    assert tt.get_or_train(TINY, teacher_dir.parent, progress=False) == teacher_dir


def test_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    spec = dataclasses.replace(TINY, steps=4)
    straight = tt.train(spec, tmp_path / "straight", progress=False)
    real_batch = tt._batch

    def batch_or_stop(stream, spec, step):
        if step == 3:  # killed during the fourth step, after the checkpoint of step 2
            raise KeyboardInterrupt
        return real_batch(stream, spec, step)

    monkeypatch.setattr(tt, "CHECKPOINT_EVERY", 2)
    monkeypatch.setattr(tt, "_batch", batch_or_stop)
    with pytest.raises(KeyboardInterrupt):
        tt.train(spec, tmp_path / "resumed", progress=False)
    assert torch.load(tmp_path / "resumed" / tt.STATE_NAME, weights_only=False)["step"] == 2
    monkeypatch.setattr(tt, "_batch", real_batch)
    resumed = tt.train(spec, tmp_path / "resumed", progress=False)
    assert resumed["steps"] == 4 and not (tmp_path / "resumed" / tt.STATE_NAME).exists()
    assert resumed["heldout_loss"] == pytest.approx(straight["heldout_loss"], abs=1e-4)


def test_cache_build_accepts_it(teacher_dir, tmp_path):
    data = tmp_path / "data.jsonl"
    with data.open("w") as f:
        for text in (
            "import os\nprint(os.sep)\n",
            "class A:\n    pass\n" * 5,
            "x = [i * i for i in range(9)]\n",
        ):
            f.write(json.dumps({"text": text}) + "\n")
    cache = build_cache(teacher_dir, data, tmp_path / "cache", window=32, top_k=8)
    manifest = read_manifest(cache)
    assert manifest["vocab"]["embedding_size"] == 500 and manifest["window"] == 32
    assert manifest["totals"]["windows"] >= 1
