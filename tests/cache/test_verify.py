"""`longkd cache verify` catches damaged files and broken invariants, naming the first bad shard."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from longkd.cache.storage import Location
from longkd.cache.verify import verify_cache
from longkd.cache.writer import ShardWriter
from longkd.cli import main
from tests.cache.test_format import finish_synthetic_cache
from tests.helpers import build_cache, read_manifest, write_random_text


@pytest.fixture(scope="module")
def built_cache(tiny_model_dir, tmp_path_factory):
    """A real 6-window cache in 6 shards (W=32, top-k 4) built through the CLI."""
    root = tmp_path_factory.mktemp("verify")
    teacher = tiny_model_dir("llama", vocab_size=96, max_position_embeddings=128)
    data = write_random_text(root / "d.jsonl", samples=20, vocab=96, lengths=20, seed=1)
    out = build_cache(teacher, data, root / "cache", window=32, top_k=4, max_windows=6, shard_size=1)
    assert len(read_manifest(out)["shards"]) == 6  # shard size 1 byte: one window per shard
    return out


@pytest.fixture
def cache(built_cache, tmp_path):
    copy = tmp_path / "cache"
    shutil.copytree(built_cache, copy)
    return copy


def run_verify(capsys, path):
    code = main(["cache", "verify", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_clean_cache_passes(cache, capsys):
    code, out, _ = run_verify(capsys, cache)
    assert code == 0 and out.strip() == "ok: 6 shards, 6 windows verified"


def test_flipped_byte(cache, capsys):
    shard = cache / "shards" / "shard-00000-000001.arrow"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    code, _, err = run_verify(capsys, cache)
    assert code == 1
    assert "shard shards/shard-00000-000001.arrow: sha256 mismatch (file changed or corrupted)" in err


def test_truncated_file(cache, capsys):
    shard = cache / "shards" / "shard-00000-000002.arrow"
    shard.write_bytes(shard.read_bytes()[:-100])
    code, _, err = run_verify(capsys, cache)
    assert code == 1 and "shard shards/shard-00000-000002.arrow: size is" in err and "truncated" in err


def test_missing_shard(cache, capsys):
    (cache / "shards" / "shard-00000-000004.arrow").unlink()
    code, _, err = run_verify(capsys, cache)
    assert code == 1 and "shard shards/shard-00000-000004.arrow: missing" in err


def test_manifest_path_escape(cache, capsys):
    m = json.loads((cache / "manifest.json").read_text())
    m["shards"][3]["path"] = "../../etc/passwd"
    (cache / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_verify(capsys, cache)
    assert code == 1 and "'../../etc/passwd' is not a relative path inside the cache directory" in err


def test_manifest_hash_edited_to_match_still_checked(cache, capsys):
    """Replacing a shard with another valid shard (hash updated) breaks window-id contiguity."""
    m = json.loads((cache / "manifest.json").read_text())
    m["shards"][2] = {**m["shards"][3], "first_window": 2, "last_window": 2}
    for key, name in (("windows", "rows"), ("tokens", "tokens"), ("bytes", "bytes")):
        m["totals"][key] = sum(s[name] for s in m["shards"])  # a consistent edit
    (cache / "manifest.json").write_text(json.dumps(m))
    code, _, err = run_verify(capsys, cache)
    assert code == 1 and "shards/shard-00000-000003.arrow: row 0 has window_id 3, expected 2" in err


def test_unfinished_cache_is_an_error(cache, capsys):
    (cache / "manifest.json").unlink()
    code, _, err = run_verify(capsys, cache)
    assert code == 2 and "not a finished longkd cache" in err


def _synthetic(tmp_path, rows_fn, mode="topk", w=8, vocab=20, k=3, draws=4):
    """A one-window cache whose rows come from ``rows_fn`` (for invariant checks)."""
    loc = Location(tmp_path / "syn")
    writer = ShardWriter(loc, selection_mode=mode)
    window = SimpleNamespace(
        window_id=0,
        input_ids=np.arange(w, dtype=np.int32) + 4,
        length=w,
        segment_starts=np.array([0], np.int32),
    )
    writer.put(window, rows_fn(w, vocab, k, draws))
    selection = {"mode": mode, "k": k} if mode == "topk" else {"mode": mode, "draws": draws}
    finish_synthetic_cache(loc, writer, w=w, vocab=vocab, selection=selection, samples=1)
    return verify_cache(tmp_path / "syn")


def _good_topk(w, vocab, k, draws):
    lp = np.log(np.array([0.5, 0.3, 0.1], np.float32))
    return SimpleNamespace(
        ids=np.tile(np.array([3, 7, 9], np.int32), (w, 1)),
        logprobs=np.tile(lp, (w, 1)),
        target_logprob=np.full(w, -1.0, np.float32),
    )


def test_invariants_topk(tmp_path):
    assert _synthetic(tmp_path / "a", _good_topk).ok

    def ascending(*a):
        r = _good_topk(*a)
        r.logprobs = r.logprobs[:, ::-1].copy()
        return r

    def out_of_vocab(*a):
        r = _good_topk(*a)
        r.ids[5, 1] = 20
        return r

    def mass_above_one(*a):
        r = _good_topk(*a)
        r.logprobs[2] = np.log([0.6, 0.5, 0.1])
        return r

    def positive(*a):
        r = _good_topk(*a)
        r.logprobs[0, 0] = 0.01
        return r

    def nan_target(*a):
        r = _good_topk(*a)
        r.target_logprob[3] = np.nan
        return r

    for i, (fn, needle) in enumerate(
        [
            (ascending, "row 0: logprobs not descending"),
            (out_of_vocab, "ids outside [0, 20)"),
            (mass_above_one, "row 2: tail mass"),
            (positive, "logprobs above 0"),
            (nan_target, "target_logprob not finite"),
        ]
    ):
        result = _synthetic(tmp_path / f"b{i}", fn)
        assert not result.ok and needle in result.problem, result.problem
        assert result.problem.startswith("shard shards/shard-00000-000000.arrow: window 0: ")


def test_invariants_sampled(tmp_path):
    def good(w, vocab, k, draws):
        return SimpleNamespace(
            ids=np.tile(np.array([2, 5], np.int32), w),
            counts=np.tile(np.array([3, 1], np.uint16), w),
            row_splits=np.arange(0, 2 * w + 1, 2, dtype=np.int32),
            target_logprob=np.full(w, -0.5, np.float32),
        )

    assert _synthetic(tmp_path / "a", good, mode="sampled").ok

    def short_counts(*a):
        r = good(*a)
        r.counts[5] = 2
        return r

    def repeated(*a):
        r = good(*a)
        r.ids[3] = 2
        return r

    result = _synthetic(tmp_path / "b", short_counts, mode="sampled")
    assert not result.ok and "row 2: counts sum to 5, expected draws=4" in result.problem
    result = _synthetic(tmp_path / "c", repeated, mode="sampled")
    assert not result.ok and "an id repeats within a row" in result.problem
