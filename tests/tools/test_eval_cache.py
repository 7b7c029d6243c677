"""Teacher-free eval (KL and perplexity by position) against hand-computed references.

Caches are built with the real CLI from a tiny teacher; the references run the student's own
``forward`` on the windows (read with pyarrow, positions derived here) and compute the KL and
the cross-entropy with numpy, independently of longkd's loss code.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from longkd.errors import LongkdError
from longkd.tools.eval_cache import format_kl, kl_by_position, plot_kl
from tests.helpers import build_cache, write_random_text

VOCAB = 64
W = 32


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir):
    return tiny_model_dir("llama", vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.2)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_random_text(path, samples=20, vocab=VOCAB, lengths=(3, 30), seed=2)


def _build(teacher_dir, data_file, out, *extra):
    # plain: the references below read the Arrow lists directly
    encoding = None if "--encoding" in extra else "plain"
    return build_cache(
        teacher_dir, data_file, out, *extra, window=W, batch_size=3, max_windows=6, encoding=encoding
    )


@pytest.fixture(scope="module")
def full_cache(teacher_dir, data_file, tmp_path_factory):
    """Top-k with k = V: the whole distribution is stored."""
    return _build(teacher_dir, data_file, tmp_path_factory.mktemp("c") / "full", "--top-k", str(VOCAB))


@pytest.fixture(scope="module")
def top8_cache(teacher_dir, data_file, tmp_path_factory):
    return _build(teacher_dir, data_file, tmp_path_factory.mktemp("c") / "top8", "--top-k", "8")


@pytest.fixture(scope="module")
def adaptive_cache(teacher_dir, data_file, tmp_path_factory):
    """Rows of 1..16 entries, cut at 0.7 of the mass or below p = 0.02."""
    out = tmp_path_factory.mktemp("c") / "adaptive"
    return _build(teacher_dir, data_file, out, "--top-k", "16", "--min-mass", "0.7", "--min-prob", "0.02")


@pytest.fixture(scope="module")
def sampled_reset_cache(teacher_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "sampled"
    return _build(teacher_dir, data_file, out, "--sample-draws", "16", "--position-mode", "reset")


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """A different random model, saved like a trainer checkpoint with scaled (linear x2) RoPE."""
    from longkd.tools.random_models import save_tiny_model

    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    out = tmp_path_factory.mktemp("student")
    return save_tiny_model(
        out, arch="qwen2", seed=7, vocab_size=VOCAB, max_position_embeddings=20, rope_parameters=rope
    )


def _windows(cache) -> list[dict]:
    manifest = json.loads((cache / "manifest.json").read_text())
    out = []
    for shard in manifest["shards"]:
        out += pa.ipc.open_file(str(cache / shard["path"])).read_all().to_pylist()
    return out


def _positions(row, reset: bool) -> np.ndarray:
    pos = np.arange(W)
    if reset:
        for t in range(W):
            pos[t] = t - max(s for s in row["segment_starts"] if s <= t)
    return pos


def _reference(model_dir, cache, indices, *, prefix=W, selection="topk", reset=False) -> dict:
    """Per-row (t, kl, ce) of the model on the windows, from the model's own forward and numpy.

    The KL compares the cached teacher with the student at the cache's temperature T, as the
    training loss does; the cross-entropy is the student's own, at T = 1.
    """
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    manifest = json.loads((cache / "manifest.json").read_text())
    rows = _windows(cache)
    out = {"t": [], "kl": [], "ce": []}
    for i in indices:
        r = rows[i]
        ids = torch.tensor([r["input_ids"][:prefix]])
        pos = torch.from_numpy(_positions(r, reset)[None, :prefix])
        with torch.no_grad():
            # use_cache=False as the teacher ran: with no cache and no attention mask, transformers
            # reads reset position ids as packed samples and masks attention across them.
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
            ce_logq = torch.log_softmax(logits[0].double(), -1).numpy()
            logq = torch.log_softmax(logits[0].double() / manifest["temperature"], -1).numpy()
        for t in range(min(prefix, r["length"] - 1)):
            if selection in ("topk", "adaptive"):
                k = manifest["selection"]["k"]
                lo, hi = (t * k, (t + 1) * k) if selection == "topk" else r["row_splits"][t : t + 2]
                tid = np.asarray(r["ids"][lo:hi])
                p = np.exp(np.asarray(r["logprobs"][lo:hi], dtype=np.float64))
                q = np.exp(logq[t, tid])
                tail, qtail = max(1 - p.sum(), 0.0), 1 - q.sum()
                kl = (p * (np.log(p) - logq[t, tid])).sum()
                # k = V leaves only rounding in the tail (then 1 - Q is rounding too): skip it there.
                kl += tail * (np.log(tail) - np.log(qtail)) if tail > 1e-6 else 0.0
            else:
                lo, hi = r["row_splits"][t], r["row_splits"][t + 1]
                tid = np.asarray(r["ids"][lo:hi])
                p = np.asarray(r["counts"][lo:hi], dtype=np.float64) / manifest["selection"]["draws"]
                kl = (p * (np.log(p) - logq[t, tid])).sum()
            out["t"].append(t)
            out["kl"].append(kl)
            out["ce"].append(-ce_logq[t, r["input_ids"][t + 1]])
    return {k: np.asarray(v) for k, v in out.items()}


def _check(result, ref, edges):
    assert result["rows"] == len(ref["t"])
    for entry, lo, hi in zip(result["by_position"], edges[:-1], edges[1:]):
        sel = (ref["t"] >= lo) & (ref["t"] < hi)
        assert (entry["start"], entry["end"], entry["rows"]) == (lo, hi, int(sel.sum()))
        assert entry["kl"] == pytest.approx(ref["kl"][sel].mean(), rel=1e-4, abs=1e-7)
        assert entry["ce"] == pytest.approx(ref["ce"][sel].mean(), rel=1e-5)
        assert entry["perplexity"] == pytest.approx(np.exp(ref["ce"][sel].mean()), rel=1e-5)


def test_teacher_against_itself_is_zero(teacher_dir, full_cache):
    result = kl_by_position(str(teacher_dir), str(full_cache), windows=3, buckets=4, batch_size=2)
    assert result["windows"] == [3, 4, 5]  # the last 3 windows are the held-out default
    assert result["rows"] == 3 * (W - 1)
    for entry in result["by_position"]:
        assert abs(entry["kl"]) < 1e-5, entry
        # The student's CE at T=1 on the true tokens is the teacher's own NLL.
        assert entry["ce"] == pytest.approx(entry["teacher_nll"], rel=1e-5)
    assert not result["extrapolation"] and result["max_positions"] == 128
    ref = _reference(teacher_dir, full_cache, [3, 4, 5])
    _check(result, ref, [0, 8, 16, 24, 32])


def test_other_model_matches_reference(student_dir, full_cache, top8_cache, tmp_path):
    for cache in (full_cache, top8_cache):
        result = kl_by_position(str(student_dir), str(cache), windows=4, buckets=4, batch_size=3)
        ref = _reference(student_dir, cache, [2, 3, 4, 5])
        _check(result, ref, [0, 8, 16, 24, 32])
        assert all(e["kl"] > 1e-3 for e in result["by_position"])
    # Beyond max_position_embeddings = 20 the buckets are marked as extrapolation.
    assert [e["extrapolation"] for e in result["by_position"]] == [False, False, True, True]
    assert result["extrapolation"] and result["max_positions"] == 20
    text = format_kl(result)
    assert "extrapolation" in text and "24-31" in text
    png = plot_kl(result, tmp_path / "kl.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_adaptive_cache_matches_reference(student_dir, adaptive_cache, tmp_path, capsys):
    from longkd.cli import main

    rows = _windows(adaptive_cache)
    entries = np.concatenate([np.diff(r["row_splits"]) for r in rows[2:]])
    assert entries.min() < entries.max() <= 16  # rows of different lengths
    result = kl_by_position(str(student_dir), str(adaptive_cache), windows=4, buckets=4, batch_size=3)
    assert result["selection"]["mode"] == "adaptive" and result["mode"] == "bucket"
    ref = _reference(student_dir, adaptive_cache, [2, 3, 4, 5], selection="adaptive")
    _check(result, ref, [0, 8, 16, 24, 32])
    argv = ["eval", str(student_dir), "--task", "cache-kl", "--cache", str(adaptive_cache), "--windows", "4",
            "--buckets", "4", "--out", str(tmp_path / "eval"), "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["overall"]["kl"] == pytest.approx(result["overall"]["kl"], rel=1e-6)
    assert (tmp_path / "eval" / "results.md").is_file()


def test_temperature(student_dir, teacher_dir, data_file, tmp_path):
    cache = _build(teacher_dir, data_file, tmp_path / "t2", "--top-k", "8", "--temperature", "2.0")
    result = kl_by_position(str(student_dir), str(cache), windows=2, buckets=2)
    assert result["temperature"] == 2.0
    _check(result, _reference(student_dir, cache, [4, 5]), [0, 16, 32])


def test_prefix_window_and_loaded_model(student_dir, top8_cache):
    model = AutoModelForCausalLM.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    result = kl_by_position(model, str(top8_cache), indices=[0, 5], window=12, buckets=3, batch_size=1)
    assert result["window"] == 12 and result["cache_window"] == W and result["windows"] == [0, 5]
    _check(result, _reference(student_dir, top8_cache, [0, 5], prefix=12), [0, 4, 8, 12])
    assert not result["extrapolation"]


def test_sampled_cache_with_reset_positions(student_dir, sampled_reset_cache):
    result = kl_by_position(str(student_dir), str(sampled_reset_cache), windows=2, buckets=2, mode="sampled")
    ref = _reference(student_dir, sampled_reset_cache, [4, 5], selection="sampled", reset=True)
    _check(result, ref, [0, 16, 32])
    for entry in result["by_position"]:
        assert entry["max_position_id"] < W


def test_teacher_nll_matches_cache_on_reset_positions(teacher_dir, sampled_reset_cache):
    """The eval runs the model as the teacher ran (same positions, same per-segment attention),
    so the teacher's own cross-entropy equals the cached target log-probs."""
    result = kl_by_position(str(teacher_dir), str(sampled_reset_cache), windows=2, buckets=2, mode="sampled")
    for entry in result["by_position"]:
        assert entry["ce"] == pytest.approx(entry["teacher_nll"], rel=1e-5)


def test_bad_input(tmp_path, teacher_dir, full_cache, tiny_model_dir):
    with pytest.raises(LongkdError, match="not a finished longkd cache"):
        kl_by_position(str(teacher_dir), str(tmp_path))
    with pytest.raises(LongkdError, match="no config.json"):
        kl_by_position(str(tmp_path), str(full_cache))
    small = tiny_model_dir("llama", vocab_size=32)
    with pytest.raises(LongkdError, match="logits"):
        kl_by_position(str(small), str(full_cache))
    with pytest.raises(LongkdError, match="window"):
        kl_by_position(str(teacher_dir), str(full_cache), window=W + 1)
    with pytest.raises(LongkdError, match="outside"):
        kl_by_position(str(teacher_dir), str(full_cache), indices=[99])
