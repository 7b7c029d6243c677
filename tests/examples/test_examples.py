"""The worked examples in examples/ run on a tiny random teacher and student, on CPU.

The cache is built by the real ``longkd cache build``; teacher and student are saved by
``longkd.tools.random_models``. What each example must show: the plain loop's first loss is
``longkd train``'s first logged loss on the same first batch; the Hugging Face Trainer's loss
falls over its steps and a run resumed from one of its checkpoints trains on the same windows
(and losses) as the uninterrupted run; datasets, polars and DuckDB read the same top
candidates as longkd's own reader, from a cache with float16 log-probs.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml

from longkd.cache.reader import CacheReader
from longkd.cli import main as longkd_main
from tests.helpers import build_cache, write_random_text

ROOT = Path(__file__).resolve().parents[2]
VOCAB = 64
W = 32


def example(name: str):
    """Import examples/<name>.py (a script, not a package module)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from longkd.tools.random_models import save_tiny_model

    root = tmp_path_factory.mktemp("examples")
    # a larger init scale gives the random teacher peaked distributions a student can learn
    teacher = save_tiny_model(
        root / "teacher", vocab_size=VOCAB, max_position_embeddings=64, initializer_range=0.3
    )
    student = save_tiny_model(
        root / "student", vocab_size=VOCAB, hidden_size=32, num_heads=2, seed=1, max_position_embeddings=W
    )
    data = write_random_text(root / "data.jsonl", samples=200, vocab=VOCAB, lengths=(5, 40), seed=0)
    cache = build_cache(
        teacher, data, root / "cache", window=W, top_k=8, max_windows=40, batch_size=8, shard_size="8KB"
    )
    return {"root": root, "teacher": teacher, "student": student, "data": data, "cache": str(cache)}


def test_plain_loop_first_loss_is_longkd_trains(setup):
    losses = example("plain_loop").main(setup["cache"], str(setup["student"]), steps=3, batch_size=4)
    config = {
        "cache": setup["cache"],
        "out": str(setup["root"] / "train"),
        "steps": 1,
        "batch_size": 4,
        "seed": 0,
        "device": "cpu",
        "students": [{"name": "s", "init": str(setup["student"])}],
    }
    path = setup["root"] / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    assert longkd_main(["train", str(path), "--no-progress"]) == 0
    logged = json.loads((setup["root"] / "train" / "s" / "metrics.jsonl").read_text().splitlines()[0])
    difference = abs(losses[0] - logged["loss"])
    print(f"plain loop {losses[0]!r} vs longkd train {logged['loss']!r}: difference {difference:.3g}")
    assert difference <= 2**-23 * abs(logged["loss"])  # float32 rounding
    assert len(losses) == 3 and losses[1] != losses[0]


@pytest.mark.slow
def test_hf_trainer_learns_and_resumes_on_the_same_windows(setup):
    hf = example("hf_trainer")
    out = setup["root"] / "hf"
    steps, half = 12, 6
    run = hf.main(setup["cache"], str(setup["student"]), out / "a", steps=steps, save_steps=half)
    losses = run["losses"]
    assert len(losses) == steps and len(run["windows"]) == steps
    first, last = sum(losses[:4]) / 4, sum(losses[-4:]) / 4
    print(f"Trainer loss, mean of the first 4 steps {first:.4f}, of the last 4 {last:.4f}")
    assert last < first - 0.03, losses
    checkpoint = out / "a" / f"checkpoint-{half}"
    assert (checkpoint / hf.STATE_FILE).exists()
    resumed = hf.main(
        setup["cache"], str(setup["student"]), out / "b", steps=steps, save_steps=half, resume=str(checkpoint)
    )
    assert resumed["windows"][0] == run["windows"][half]  # the same next window...
    assert resumed["windows"] == run["windows"][half:]  # ...and every one after it
    assert resumed["losses"][half:] == pytest.approx(losses[half:], rel=1e-5)  # and the same training


def test_arrow_tools_read_the_same_top_candidates(setup):
    pytest.importorskip("polars")
    pytest.importorskip("duckdb")
    cache = build_cache(
        setup["teacher"],
        setup["data"],
        setup["root"] / "f16",
        window=W,
        top_k=8,
        max_windows=12,
        shard_size="8KB",
        logprob_dtype="float16",
        encoding="plain",  # what generic Arrow tools read without longkd's decoders
    )
    window, at = 7, 19
    got = example("read_with_arrow_tools").main(
        str(cache), window, at, cache_dir=str(setup["root"] / "hf-cache")
    )
    row = CacheReader(str(cache)).read_window(window)
    want = list(zip(row.ids[at].tolist(), row.logprobs[at].tolist()))
    assert len(want) == 8 and want == sorted(want, key=lambda e: -e[1])
    for tool in ("datasets", "polars", "duckdb"):
        assert [(int(i), float(p)) for i, p in got[tool]] == want, tool
