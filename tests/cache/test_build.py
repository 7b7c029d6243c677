"""`longkd cache build` end to end on a tiny real teacher and a real datasets JSONL file.

Each cache is compared with what the Teacher computes in memory on the same packed windows,
so the build pipeline (packing, batching, writer, reader) cannot silently change values.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from longkd.cli import main
from tests.cache.test_column_codecs import logprob_error, tail_error
from tests.helpers import cache_build_argv, fail_writes_after, write_random_text

VOCAB = 128
W = 64


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir):
    return tiny_model_dir("llama", vocab_size=VOCAB, max_position_embeddings=256)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # An extra column the build must ignore.
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_random_text(path, samples=40, vocab=VOCAB, lengths=(3, 50), seed=0, fields={"other": 1})


def build(teacher_dir, data_file, out, *extra):
    """A small build; plain columns (whose Arrow lists these tests read) unless ``extra`` names
    an encoding."""
    encoding = None if "--encoding" in extra else "plain"
    return main(
        cache_build_argv(
            teacher_dir, data_file, out, *extra, window=W, max_windows=5, batch_size=2, encoding=encoding
        )
    )


def expected_rows(teacher_dir, data_file, *, selection, batch_size=2, max_windows=5, temperature=1.0, seed=0):
    """Pack the same data and run the Teacher in memory, batched as the build does."""
    from longkd.cache.data import load_samples
    from longkd.cache.packing import Packer, PackingConfig, position_ids_for
    from longkd.cache.teacher import Teacher

    teacher = Teacher.load(str(teacher_dir), device="cpu")
    tok = teacher.tokenizer
    samples = load_samples(str(data_file), tokenizer=tok, text_field="text")
    packer = Packer(PackingConfig(window=W, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id))
    windows = []
    for window in packer.pack(samples):
        if window.window_id >= max_windows:
            break
        windows.append(window)
    rows = []
    for i in range(0, len(windows), batch_size):
        batch = windows[i : i + batch_size]
        ids = torch.from_numpy(np.stack([w.input_ids for w in batch]).astype(np.int64))
        pos = torch.from_numpy(np.stack([position_ids_for(W, w.segment_starts, "continuous") for w in batch]))
        rows += teacher.run(
            ids,
            pos.long(),
            [w.window_id for w in batch],
            selection,
            temperature=temperature,
            seed=seed,
            chunk_size=1024,
        )
    return windows, rows


def test_topk_window_equals_in_memory(teacher_dir, data_file, tmp_path, capsys):
    from longkd.cache.reader import CacheReader
    from longkd.cache.teacher import SelectionConfig

    assert build(teacher_dir, data_file, tmp_path / "c", "--top-k", "8") == 0
    out = capsys.readouterr().out
    assert "packing:" in out and "wrote" in out and "5 windows" in out
    reader = CacheReader(tmp_path / "c")
    assert reader.num_windows == 5 and reader.selection == {"mode": "topk", "k": 8}
    windows, rows = expected_rows(teacher_dir, data_file, selection=SelectionConfig(mode="topk", k=8))
    for window, row in zip(windows, rows, strict=True):
        got = reader.read_window(window.window_id)
        assert got.window_id == window.window_id and got.length == window.length
        np.testing.assert_array_equal(got.input_ids, window.input_ids)
        np.testing.assert_array_equal(got.segment_starts, window.segment_starts)
        np.testing.assert_array_equal(got.ids, row.ids)
        np.testing.assert_array_equal(got.logprobs, row.logprobs)
        np.testing.assert_array_equal(got.target_logprob, row.target_logprob)
        np.testing.assert_array_equal(got.position_ids, np.arange(W))
    m = reader.manifest
    assert m["vocab"]["embedding_size"] == VOCAB and m["window"] == W
    assert m["totals"]["tokens"] == 5 * W and m["packing"]["stats"]["efficiency"] > 0
    assert len(m["dataset"]["fingerprint"]) == 64 and m["dataset"]["samples"] > 0
    assert main(["cache", "verify", str(tmp_path / "c")]) == 0
    assert "ok: 1 shards, 5 windows verified" in capsys.readouterr().out


def test_sampled_build(teacher_dir, data_file, tmp_path):
    from longkd.cache.reader import CacheReader
    from longkd.cache.teacher import SelectionConfig

    assert build(teacher_dir, data_file, tmp_path / "c", "--sample-draws", "32", "--seed", "3") == 0
    reader = CacheReader(tmp_path / "c")
    assert reader.selection == {"mode": "sampled", "draws": 32}
    windows, rows = expected_rows(
        teacher_dir, data_file, selection=SelectionConfig(mode="sampled", draws=32), seed=3, batch_size=1
    )
    for window, row in zip(windows, rows, strict=True):
        got = reader.read_window(window.window_id)
        assert np.all(got.counts.astype(int).sum(axis=1) == 32)
        # Draws are seeded from (seed, window_id), so batching does not change them.
        splits = row.row_splits
        for t in range(W):
            n = splits[t + 1] - splits[t]
            np.testing.assert_array_equal(got.ids[t, :n], row.ids[splits[t] : splits[t + 1]])
            np.testing.assert_array_equal(got.counts[t, :n], row.counts[splits[t] : splits[t + 1]])
        np.testing.assert_allclose(got.target_logprob, row.target_logprob, rtol=1e-5, atol=1e-6)
    assert main(["cache", "verify", str(tmp_path / "c")]) == 0


def test_float16_encoding_roundtrip(teacher_dir, data_file, tmp_path, capsys):
    from longkd.cache.reader import CacheReader

    assert build(teacher_dir, data_file, tmp_path / "f32", "--top-k", "16") == 0
    assert build(teacher_dir, data_file, tmp_path / "f16", "--top-k", "16", "--logprob-dtype", "float16") == 0
    a, b = CacheReader(tmp_path / "f32"), CacheReader(tmp_path / "f16")
    assert b.manifest["encoding"]["logprobs"] == "float16"
    for i in range(a.num_windows):
        x, y = a.read_window(i), b.read_window(i)
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_array_equal(y.logprobs, x.logprobs.astype(np.float16).astype(np.float32))
        np.testing.assert_allclose(y.logprobs, x.logprobs, rtol=2**-11, atol=1e-7)
    assert b.manifest["totals"]["bytes"] < a.manifest["totals"]["bytes"]
    assert main(["cache", "verify", str(tmp_path / "f16")]) == 0
    capsys.readouterr()
    assert main(["cache", "info", str(tmp_path / "f16"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["windows"] == 5 and info["window"] == W and info["selection"] == {"mode": "topk", "k": 16}
    assert info["bytes_per_token"] == pytest.approx(info["bytes_on_disk"] / info["tokens"])
    assert main(["cache", "info", str(tmp_path / "f16")]) == 0
    text = capsys.readouterr().out
    assert "bytes per token:" in text and "packing efficiency:" in text


@pytest.mark.parametrize(
    "selection", [("--top-k", "16"), ("--sample-draws", "24"), ("--top-k", "16", "--min-prob", "0.009")]
)
def test_compact_build_equals_plain_and_trains(teacher_dir, data_file, tmp_path, capsys, selection):
    """A compact cache verifies, reads back as the plain cache of the same build (ids as sets
    per row, log-probs within 1/128 nat where p >= 1e-4 and the coarse zone's bound below,
    the tail within the shift's step, counts exact), inspects and trains."""
    import yaml

    from longkd.cache.reader import CacheReader

    assert build(teacher_dir, data_file, tmp_path / "plain", *selection) == 0
    assert build(teacher_dir, data_file, tmp_path / "compact", *selection, "--encoding", "compact") == 0
    assert main(["cache", "verify", str(tmp_path / "compact")]) == 0
    a, b = CacheReader(tmp_path / "plain"), CacheReader(tmp_path / "compact")
    assert b.manifest["format_version"] == 3 and b.manifest["encoding"]["columns"]["ids"] == "dictionary"
    assert set(a.manifest["encoding"]["columns"].values()) == {"plain"}
    assert b.manifest["totals"]["bytes"] < a.manifest["totals"]["bytes"]
    if "--min-prob" in selection:  # adaptive: ragged rows, entry counts from row_splits
        assert (
            b.selection["mode"] == "adaptive"
            and b.manifest["encoding"]["columns"]["row_splits"] == "entry-counts"
        )
        assert any((a.read_window(i).ids < 0).any() for i in range(a.num_windows))
    for i in range(a.num_windows):
        x, y = a.read_window(i), b.read_window(i)
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.segment_starts, y.segment_starts)
        np.testing.assert_allclose(y.target_logprob, x.target_logprob, rtol=0, atol=1 / 128 + 1e-6)
        assert x.ids.shape == y.ids.shape and y.ids.dtype == np.int32 and y.logprobs.dtype == np.float32
        for t in range(W):
            keep = x.ids[t] >= 0
            order = np.argsort(x.ids[t][keep])
            np.testing.assert_array_equal(y.ids[t][keep], x.ids[t][keep][order])  # by id
            ref = x.logprobs[t][keep][order]
            assert (np.abs(y.logprobs[t][keep] - ref) <= logprob_error(ref, "grid-shift")).all()
            if x.counts is not None:
                np.testing.assert_array_equal(y.counts[t][keep], x.counts[t][keep][order])
        tails = [1 - np.exp(w.logprobs.astype(np.float64)).sum(1) for w in (x, y)]
        np.testing.assert_allclose(tails[1], tails[0], rtol=0, atol=tail_error("grid-shift"))
    views = []
    for cache in (tmp_path / "plain", tmp_path / "compact"):
        capsys.readouterr()
        args = ["--window", "1", "--at", "5", "--top", "100", "--json"]
        assert main(["cache", "inspect", str(cache), *args]) == 0
        view = json.loads(capsys.readouterr().out)
        views.append({c["id"]: c["logprob"] for c in view["candidates"]})
        ranked = [c["logprob"] for c in view["candidates"]]
        assert ranked == sorted(ranked, reverse=True)  # rank order, whatever the stored order
    assert views[0].keys() == views[1].keys()
    assert max(abs(views[0][i] - views[1][i]) for i in views[0]) <= 1 / 64
    assert main(["cache", "inspect", str(tmp_path / "compact"), "--json"]) == 0
    run = {
        "cache": str(tmp_path / "compact"),
        "out": str(tmp_path / "run"),
        "steps": 1,
        "batch_size": 2,
        "students": [
            {"name": "s", "init": {"arch": "llama", "hidden_size": 32, "num_layers": 2, "num_heads": 2}}
        ],
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(run))
    assert main(["train", str(tmp_path / "train.yaml"), "--no-progress", "--device", "cpu"]) == 0
    assert "trained 1 student(s) to step 1" in capsys.readouterr().out


def test_config_file_and_override(teacher_dir, data_file, tmp_path, capsys):
    from longkd.cache.reader import CacheReader

    cfg = tmp_path / "build.yaml"
    cfg.write_text(
        f"teacher: {teacher_dir}\ndata: {data_file}\nwindow: 32\ntop-k: 4\nmax_windows: 3\n"
        f"position-mode: reset\nout: {tmp_path / 'ignored'}\n"
    )
    assert main(["cache", "build", "--config", str(cfg), "--out", str(tmp_path / "c"), "--top-k", "6"]) == 0
    reader = CacheReader(tmp_path / "c")
    assert reader.window == 32 and reader.num_windows == 3 and reader.selection["k"] == 6
    assert reader.position_mode == "reset"
    w = reader.read_window(1)
    assert np.all(w.position_ids[w.segment_starts] == 0)
    assert not (tmp_path / "ignored").exists()
    toml = tmp_path / "build.toml"
    toml.write_text(f'teacher = "{teacher_dir}"\nwindow_size = 32\n')
    capsys.readouterr()
    assert main(["cache", "build", "--config", str(toml), "--data", "x", "--out", str(tmp_path / "d")]) == 2
    assert "unknown key 'window_size'" in capsys.readouterr().err


def test_finished_cache_rerun_says_complete(teacher_dir, data_file, tmp_path, capsys):
    assert build(teacher_dir, data_file, tmp_path / "c", "--top-k", "4") == 0
    before = (tmp_path / "c" / "manifest.json").read_text()
    capsys.readouterr()
    assert build(teacher_dir, data_file, tmp_path / "c", "--top-k", "4") == 0
    assert "already complete" in capsys.readouterr().out
    assert (tmp_path / "c" / "manifest.json").read_text() == before


def _fails(capsys, args) -> str:
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    # The message is the last line (model loading may draw a progress bar before it).
    last = err.splitlines()[-1]
    assert last.startswith("longkd: error: ") and "Traceback" not in err
    return last


def test_errors_leave_no_manifest(teacher_dir, data_file, tmp_path, capsys):
    base = ["cache", "build", "--window", str(W), "--max-windows", "2"]
    ok_t, ok_d = ["--teacher", str(teacher_dir)], ["--data", str(data_file)]
    cases = [
        ([*base, "--teacher", str(tmp_path / "no-model"), *ok_d], "no-model"),
        ([*base, *ok_t, "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        ([*base, *ok_t, *ok_d, "--text-field", "body"], "body"),
        (["cache", "build", "--window", "512", *ok_t, *ok_d], "max_position_embeddings 256"),
        ([*base, *ok_t, *ok_d, "--top-k", "500"], "--top-k 500 exceeds"),
        ([*base, *ok_t, *ok_d, "--shard-size", "huge"], "shard size"),
    ]
    for i, (args, needle) in enumerate(cases):
        out = tmp_path / f"o{i}"
        err = _fails(capsys, [*args, "--out", str(out)])
        assert needle in err, err
        assert not (out / "manifest.json").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("mine")
    err = _fails(capsys, [*base, *ok_t, *ok_d, "--out", str(occupied)])
    assert "is not a longkd cache" in err and (occupied / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in occupied.iterdir()) == ["notes.txt"]


def test_cli_subprocess_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "longkd", "cache", "verify", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_disk_full_mid_build(teacher_dir, data_file, tmp_path, capsys, monkeypatch):
    """An OSError(ENOSPC) in the writer thread ends the build with one line and no manifest."""
    fail_writes_after(monkeypatch, 30_000)
    out = tmp_path / "c"
    err = _fails(capsys, cache_build_argv(teacher_dir, data_file, out, window=W, top_k=32, shard_size="8KB"))
    assert "writing shard shards/shard-00000-" in err and "[Errno 28] No space left on device" in err
    assert not (out / "manifest.json").exists()
    assert not [p for p in (out / "shards").iterdir() if not p.name.startswith("shard-")]


def test_compact_build_resumes_to_the_same_bytes(teacher_dir, data_file, tmp_path, capsys, monkeypatch):
    """A compact build stopped by a full disk resumes (re-reading the kept shards' compact
    input_ids and segment_starts) to the bytes of an uninterrupted one; another --encoding
    on the same --out is refused."""
    flags = dict(window=W, top_k=8, shard_size="4KB", encoding="compact", max_windows=12)
    reference, out = tmp_path / "reference", tmp_path / "c"
    assert main(cache_build_argv(teacher_dir, data_file, reference, **flags)) == 0
    fail_writes_after(monkeypatch, 9_000)
    assert "No space left on device" in _fails(capsys, cache_build_argv(teacher_dir, data_file, out, **flags))
    monkeypatch.undo()
    kept = sorted(p.name for p in (out / "shards").iterdir())
    assert kept and not (out / "manifest.json").exists()
    err = _fails(capsys, cache_build_argv(teacher_dir, data_file, out, **{**flags, "encoding": "plain"}))
    assert "encoding" in err
    assert main(cache_build_argv(teacher_dir, data_file, out, **flags)) == 0
    assert "resuming" in capsys.readouterr().out
    a, b = (
        json.loads((out / "manifest.json").read_text()),
        json.loads((reference / "manifest.json").read_text()),
    )
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]] and len(a["shards"]) > 2


def test_streaming_and_input_ids_give_identical_shards(teacher_dir, tmp_path):
    """Text, streamed text and pre-tokenized ids of the same samples pack and cache identically."""
    data = tmp_path / "both.jsonl"
    write_random_text(data, samples=30, vocab=VOCAB, lengths=(3, 40), seed=7, ids_field="ids")
    variants = {"text": [], "streaming": ["--streaming"], "ids": ["--input-ids-field", "ids"]}
    manifests = {}
    for name, extra in variants.items():
        assert build(teacher_dir, data, tmp_path / name, "--top-k", "4", *extra) == 0
        manifests[name] = json.loads((tmp_path / name / "manifest.json").read_text())
    for name in ("streaming", "ids"):
        a, b = manifests["text"], manifests[name]
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]], name
        assert a["dataset"]["fingerprint"] == b["dataset"]["fingerprint"]
        assert a["packing"]["stats"] == b["packing"]["stats"]
