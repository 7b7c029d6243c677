"""`longkd cache inspect` on real caches built from a tiny teacher.

Every statistic is recomputed here straight from the shard files (pyarrow, numpy), without
longkd's reader, and compared with what :func:`inspect_cache` reports.
"""

from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pyarrow as pa
import pytest

from longkd.errors import LongkdError
from longkd.tools.inspect_cache import SEGMENT_EDGES, inspect_cache, register_inspect, show_position
from tests.helpers import build_cache, write_random_text

VOCAB = 64
W = 32


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir):
    # A larger initialisation makes the rows peaked, so top-8 leaves a real tail.
    return tiny_model_dir("llama", vocab_size=VOCAB, max_position_embeddings=128, initializer_range=0.2)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # ~260 tokens: 8 windows of 32, the last one padded; some samples split
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_random_text(path, samples=12, vocab=VOCAB, lengths=(3, 40), seed=1)


def _build(teacher_dir, data_file, out, *extra):
    # plain: the hand computations below read the Arrow lists directly
    encoding = None if "--encoding" in extra else "plain"
    return build_cache(
        teacher_dir, data_file, out, *extra, window=W, batch_size=4, tail="pad", encoding=encoding
    )


@pytest.fixture(scope="module")
def topk_cache(teacher_dir, data_file, tmp_path_factory):
    return _build(teacher_dir, data_file, tmp_path_factory.mktemp("c") / "topk", "--top-k", "8")


@pytest.fixture(scope="module")
def adaptive_cache(teacher_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "adaptive"
    return _build(teacher_dir, data_file, out, "--top-k", "8", "--min-mass", "0.6", "--min-prob", "0.02")


@pytest.fixture(scope="module")
def sampled_cache(teacher_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("c") / "sampled"
    return _build(teacher_dir, data_file, out, "--sample-draws", "16", "--position-mode", "reset")


def _rows(cache) -> list[dict]:
    """Every window of the cache as plain Python/numpy values, read with pyarrow only."""
    manifest = json.loads((cache / "manifest.json").read_text())
    out = []
    for shard in manifest["shards"]:
        table = pa.ipc.open_file(str(cache / shard["path"])).read_all()
        for i, row in enumerate(table.to_pylist()):
            row = {k: np.asarray(v) if isinstance(v, list) else v for k, v in row.items()}
            row["raw_bytes"] = table.slice(i, 1).nbytes
            out.append(row)
    return out


def _by_hand(cache, indices) -> dict[str, np.ndarray]:
    """Per-row statistics of the given windows, computed from the Arrow columns directly."""
    manifest = json.loads((cache / "manifest.json").read_text())
    sel = manifest["selection"]
    acc = {k: [] for k in ("t", "offset", "entropy", "top1", "covered", "entries", "nll", "stored")}
    rows = _rows(cache)
    for index in indices:
        r = rows[index]
        starts = list(r["segment_starts"])
        for t in range(r["length"] - 1):
            if sel["mode"] == "topk":
                k = sel["k"]
                ids = r["ids"][t * k : (t + 1) * k]
                p = np.exp(r["logprobs"][t * k : (t + 1) * k].astype(np.float64))
                tail = max(0.0, 1.0 - p.sum())
                dist = np.append(p, tail)
                covered = min(1.0, p.sum())
            elif sel["mode"] == "adaptive":
                lo, hi = r["row_splits"][t], r["row_splits"][t + 1]
                ids = r["ids"][lo:hi]
                p = np.exp(r["logprobs"][lo:hi].astype(np.float64))
                dist = np.append(p, max(0.0, 1.0 - p.sum()))
                covered = min(1.0, p.sum())
            else:
                lo, hi = r["row_splits"][t], r["row_splits"][t + 1]
                ids = r["ids"][lo:hi]
                p = r["counts"][lo:hi].astype(np.float64) / sel["draws"]
                dist, covered = p, 1.0
            dist = dist[dist > 0]
            acc["t"].append(t)
            acc["offset"].append(t - max(s for s in starts if s <= t))
            acc["entropy"].append(-(dist * np.log(dist)).sum())
            acc["top1"].append(p.max())
            acc["covered"].append(covered)
            acc["entries"].append(len(ids))
            acc["nll"].append(-float(r["target_logprob"][t]))
            acc["stored"].append(float(r["input_ids"][t + 1] in set(ids.tolist())))
    return {k: np.asarray(v, dtype=np.float64) for k, v in acc.items()}


def _check_group(entry: dict, hand: dict, sel: np.ndarray) -> None:
    assert entry["rows"] == int(sel.sum())
    pairs = (("entropy", "entropy"), ("top1", "top1"), ("covered", "covered"), ("entries", "entries"),
             ("target_nll", "nll"), ("target_stored", "stored"))  # fmt: skip
    for key, name in pairs:
        if sel.any():
            assert entry[key] == pytest.approx(hand[name][sel].mean(), rel=1e-6, abs=1e-9), key
        else:
            assert entry[key] is None


@pytest.mark.parametrize("which", ["topk", "sampled", "adaptive"])
def test_statistics_equal_hand_computation(which, topk_cache, sampled_cache, adaptive_cache):
    cache = {"topk": topk_cache, "sampled": sampled_cache, "adaptive": adaptive_cache}[which]
    manifest = json.loads((cache / "manifest.json").read_text())
    n = manifest["totals"]["windows"]
    result = inspect_cache(str(cache), sample_windows=100, buckets=8)
    assert result["sample"]["windows"] == list(range(n))
    hand = _by_hand(cache, range(n))
    rows = _rows(cache)
    assert rows[-1]["length"] < W  # the padded last window is in the sample, its tail rows masked
    _check_group(result["overall"], hand, np.ones(len(hand["t"]), dtype=bool))
    assert len(result["by_position"]) == 8
    for b, entry in enumerate(result["by_position"]):
        assert (entry["start"], entry["end"]) == (4 * b, 4 * b + 4)
        _check_group(entry, hand, (hand["t"] >= 4 * b) & (hand["t"] < 4 * b + 4))
    edges = list(SEGMENT_EDGES) + [np.inf]
    for b, entry in enumerate(result["by_segment_offset"]):
        _check_group(entry, hand, (hand["offset"] >= edges[b]) & (hand["offset"] < edges[b + 1]))
    if which == "topk":
        assert 0.2 < result["overall"]["covered"] < 0.999  # top-8 of 64 leaves a real tail
        assert "k+1 bucket" in result["definitions"]["entropy"]
        assert result["overall"]["entries"] == 8
    elif which == "adaptive":
        assert 1 <= result["overall"]["entries"] < 8  # the rule cut rows short
        assert min(hand["entries"]) < max(hand["entries"])
        assert "1..k a row" in result["definitions"]["entropy"]
    else:
        assert result["overall"]["covered"] == 1.0
    s = result["summary"]
    disk = sum((cache / sh["path"]).stat().st_size for sh in manifest["shards"])
    raw = sum(r["raw_bytes"] for r in rows)
    tokens = sum(r["length"] for r in rows)
    assert s["raw_bytes_exact"] and s["raw_bytes"] == raw and s["bytes_on_disk"] == disk
    assert s["tokens"] == tokens and s["windows"] == n and s["window"] == W
    assert s["bytes_per_token_disk"] == pytest.approx(disk / tokens)
    assert s["bytes_per_token_raw"] == pytest.approx(raw / tokens)
    assert s["compression_ratio"] == pytest.approx(raw / disk)
    assert s["teacher"] == manifest["teacher"]["name_or_path"] and s["model_type"] == "llama"
    assert s["embedding_size"] == VOCAB and s["selection"] == manifest["selection"]
    assert s["packing_stats"]["split_samples"] == manifest["packing"]["stats"]["split_samples"]
    counts = sum(result["histograms"]["top1"]["counts"])
    assert counts == len(hand["t"]) == sum(result["histograms"]["entropy"]["counts"])


def test_sample_is_deterministic_and_used(topk_cache):
    a = inspect_cache(str(topk_cache), sample_windows=3, seed=5, buckets=2)
    b = inspect_cache(str(topk_cache), sample_windows=3, seed=5, buckets=2)
    assert a == b
    indices = a["sample"]["windows"]
    assert len(set(indices)) == 3 and indices == sorted(indices)
    hand = _by_hand(topk_cache, indices)
    _check_group(a["overall"], hand, np.ones(len(hand["t"]), dtype=bool))
    assert not a["summary"]["raw_bytes_exact"]


def test_show_position(topk_cache, sampled_cache):
    rows = _rows(topk_cache)
    r, at = rows[2], 20
    got = show_position(str(topk_cache), 2, at, top=5, context=6)
    assert got["context"]["ids"] == r["input_ids"][at - 5 : at + 1].tolist()

    def word(i):  # the word tokenizer's token for id i (data ids are >= 4, EOS is 2)
        return f"t{i}" if i >= 4 else "</s>"

    assert got["context"]["tokens"] == [word(i) for i in got["context"]["ids"]]
    nid = int(r["input_ids"][at + 1])
    assert got["next"]["id"] == nid and got["next"]["token"] == word(nid)
    assert got["next"]["prob"] == pytest.approx(np.exp(r["target_logprob"][at]))
    ids, lps = r["ids"][at * 8 : at * 8 + 8], r["logprobs"][at * 8 : at * 8 + 8]
    order = np.argsort(-lps, kind="stable")
    assert [c["id"] for c in got["candidates"]] == ids[order][:5].tolist()
    assert [c["prob"] for c in got["candidates"]] == pytest.approx(np.exp(lps[order][:5]).tolist())
    expected_rank = int(np.flatnonzero(ids[order] == nid)[0]) + 1 if nid in ids else None
    assert got["next"]["rank"] == expected_rank
    assert got["tail_mass"] == pytest.approx(1 - np.exp(lps.astype(np.float64)).sum(), abs=1e-6)

    # The padded last window: a row past the real tokens has no true next token.
    last = len(rows) - 1
    got = show_position(str(topk_cache), last, rows[last]["length"] - 1)
    assert got["next"] is None
    # Sampled caches show counts; reset positions give the position id inside the segment.
    s = _rows(sampled_cache)[1]
    got = show_position(str(sampled_cache), 1, 10, top=100)
    lo, hi = s["row_splits"][10], s["row_splits"][11]
    assert sorted((c["id"], c["count"]) for c in got["candidates"]) == sorted(
        zip(s["ids"][lo:hi].tolist(), s["counts"][lo:hi].tolist())
    )
    assert got["position_id"] == got["segment_offset"] == 10 - max(x for x in s["segment_starts"] if x <= 10)


def test_show_position_of_an_adaptive_cache(adaptive_cache):
    r = _rows(adaptive_cache)[3]
    for at in range(W):
        got = show_position(str(adaptive_cache), 3, at, top=100)
        lo, hi = r["row_splits"][at], r["row_splits"][at + 1]
        assert [c["id"] for c in got["candidates"]] == r["ids"][lo:hi].tolist()  # rank order, no padding
        lps = r["logprobs"][lo:hi].astype(np.float64)
        assert got["tail_mass"] == pytest.approx(1 - np.exp(lps).sum(), abs=1e-6)


def test_show_position_without_tokenizer(topk_cache, tmp_path):
    copy = tmp_path / "moved"
    shutil.copytree(topk_cache, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["teacher"]["name_or_path"] = str(tmp_path / "gone")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    got = show_position(str(copy), 0, 3)
    assert got["context"]["tokens"] is None and got["context"]["text"] is None
    assert got["context"]["ids"] == _rows(topk_cache)[0]["input_ids"][:4].tolist()
    assert "showing ids" in got["tokenizer"]


def _cli(argv) -> int:
    parser = argparse.ArgumentParser(prog="longkd cache")
    register_inspect(parser.add_subparsers(dest="cache_command"))
    args = parser.parse_args(["inspect", *argv])
    return args.func(args)


def test_adaptive_cache_terminal_view_and_plot(adaptive_cache, tmp_path, capsys):
    assert _cli([str(adaptive_cache), "--plot", str(tmp_path / "a.png")]) == 0
    text = capsys.readouterr().out
    assert "adaptive top-k 8 (min mass 0.6, min prob 0.02) (float32 log-probs)" in text
    header = next(line for line in text.splitlines() if "entropy (nats)" in line)
    assert " entries " in header
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_cli_json_plot_html(topk_cache, tmp_path, capsys):
    png, page = tmp_path / "out" / "stats.png", tmp_path / "out" / "report.html"
    assert _cli([str(topk_cache), "--json", "--plot", str(png), "--html", str(page)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data == json.loads(json.dumps(inspect_cache(str(topk_cache))))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    html = page.read_text()
    assert "data:image/png;base64," in html and "<table>" in html and "By position in the window" in html
    assert 'src="http' not in html  # self-contained

    assert _cli([str(topk_cache), "--window", "1", "--at", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["at"] == 4
    assert _cli([str(topk_cache)]) == 0
    text = capsys.readouterr().out
    assert "compression ratio" in text and "by offset from the start of the packed segment" in text
    assert _cli([str(topk_cache), "--window", "1", "--at", "4"]) == 0
    assert "true next token" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, words",
    [
        (["{bad}"], "not a finished longkd cache"),
        (["{cache}", "--window", "1"], "--window and --at"),
        (["{cache}", "--window", "999", "--at", "0"], "out of range"),
        (["{cache}", "--window", "0", "--at", str(W)], "out of range"),
        (["{cache}", "--windows", "0"], "--windows"),
        (["{cache}", "--window", "0", "--at", "1", "--plot", "x.png"], "--plot"),
    ],
)
def test_bad_input_is_one_line_error(argv, words, topk_cache, tmp_path):
    argv = [a.format(bad=tmp_path, cache=topk_cache) for a in argv]
    with pytest.raises(LongkdError) as err:
        _cli(argv)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_damaged_window_stops_or_is_skipped(topk_cache, tmp_path, capsys):
    from tests.cache.test_fault_injection import bad_checksum, rewrite_shard

    cache = tmp_path / "cache"
    shutil.copytree(topk_cache, cache)
    shard = json.loads((cache / "manifest.json").read_text())["shards"][0]["path"]
    rewrite_shard(cache, shard, bad_checksum(3), resign_rows=False)
    with pytest.raises(LongkdError, match=f"window 3 in shard {shard} .* is damaged: checksum mismatch"):
        _cli([str(cache), "--json"])
    with pytest.raises(LongkdError, match="window 3 in shard"):
        _cli([str(cache), "--window", "3", "--at", "0"])
    assert _cli([str(cache), "--json", "--skip-damaged"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["sample"]["damaged"] == [3] and 3 not in data["sample"]["windows"]
    assert captured.err.strip() == "longkd: skipped 1 damaged windows: [3]"
    clean = inspect_cache(str(topk_cache), sample_windows=1000)
    assert data["sample"]["rows"] < clean["sample"]["rows"]
