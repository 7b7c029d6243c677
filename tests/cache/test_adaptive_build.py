"""`longkd cache build --min-mass / --min-prob` end to end on a tiny real teacher: the adaptive
cache verifies, its rows are the top-K build's rows cut by the rule, resume compares the rule,
`cache info` reports the entries per row, and bad flags are one line with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from longkd.cache.build_settings import resolve_settings
from longkd.cache.reader import CacheReader
from longkd.cli import main
from longkd.errors import LongkdError
from tests.cache.test_adaptive_rows import reference_counts
from tests.helpers import cache_build_argv, read_manifest, write_random_text

VOCAB = 128
W = 32
K = 16
# The tiny random teacher is nearly flat (top-16 mass about 0.16, probabilities near 1/128), so
# these rules cut rows at many different lengths.
RULES = {
    "mass": {"min_mass": 0.1},
    "prob": {"min_prob": 0.0095},
    "both": {"min_mass": 0.12, "min_prob": 0.009},
}


@pytest.fixture(scope="module")
def teacher_dir(tiny_model_dir):
    return tiny_model_dir("llama", vocab_size=VOCAB, max_position_embeddings=128)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    return write_random_text(path, samples=30, vocab=VOCAB, lengths=(3, 30), seed=None)


@pytest.fixture(scope="module")
def topk_cache(teacher_dir, data_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("topk") / "c"
    assert main(build_argv(teacher_dir, data_file, out)) == 0
    return out


def build_argv(teacher_dir, data_file, out, *extra, **flags):
    # plain columns: the comparisons below take rows in rank order
    flags = {"window": W, "max_windows": 4, "batch_size": 2, "top_k": K, "encoding": "plain", **flags}
    return cache_build_argv(teacher_dir, data_file, out, *extra, **flags)


@pytest.mark.parametrize("rule", list(RULES))
def test_adaptive_rows_are_the_top_k_rows_cut_by_the_rule(teacher_dir, data_file, topk_cache, tmp_path, rule):
    rules = RULES[rule]
    out = tmp_path / "adaptive"
    assert main(build_argv(teacher_dir, data_file, out, **rules)) == 0
    assert main(["cache", "verify", str(out)]) == 0
    selection = {"mode": "adaptive", "k": K, "min_mass": None, "min_prob": None, **rules}
    assert read_manifest(out)["selection"] == selection
    topk, adaptive = CacheReader(topk_cache), CacheReader(out)
    assert adaptive.num_windows == topk.num_windows == 4
    lengths = []
    for i in range(topk.num_windows):
        full, cut = topk.read_window(i), adaptive.read_window(i)
        counts = reference_counts(full.logprobs, K, rules.get("min_mass"), rules.get("min_prob"))
        np.testing.assert_array_equal((cut.ids >= 0).sum(axis=1), counts)
        keep = np.arange(K) < counts[:, None]
        kmax = counts.max()
        np.testing.assert_array_equal(cut.ids, np.where(keep, full.ids, -1)[:, :kmax])
        np.testing.assert_array_equal(cut.logprobs, np.where(keep, full.logprobs, -np.inf)[:, :kmax])
        np.testing.assert_array_equal(cut.target_logprob, full.target_logprob)
        np.testing.assert_array_equal(cut.input_ids, full.input_ids)
        lengths.append(counts)
    lengths = np.concatenate(lengths)
    assert lengths.min() < lengths.max()  # the rule cut rows at different lengths
    assert read_manifest(out)["totals"]["bytes"] < read_manifest(topk_cache)["totals"]["bytes"]


def test_float16_adaptive_build_verifies(teacher_dir, data_file, tmp_path):
    out = tmp_path / "f16"
    assert main(build_argv(teacher_dir, data_file, out, logprob_dtype="float16", **RULES["both"])) == 0
    assert main(["cache", "verify", str(out)]) == 0


def test_resume_compares_the_adaptive_rule(teacher_dir, data_file, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(build_argv(teacher_dir, data_file, out, min_mass=0.1)) == 0
    capsys.readouterr()
    assert main(build_argv(teacher_dir, data_file, out, min_mass=0.1)) == 0
    assert "already complete" in capsys.readouterr().out
    for flags in ({"min_mass": 0.2}, {"min_mass": 0.1, "min_prob": 0.01}, {}):
        assert main(build_argv(teacher_dir, data_file, out, **flags)) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"longkd: error: --out {out} holds a cache built with selection=")
        assert "\n" not in err


def test_cache_info_reports_the_entries_per_row(teacher_dir, data_file, topk_cache, tmp_path, capsys):
    out = tmp_path / "c"
    assert main(build_argv(teacher_dir, data_file, out, **RULES["prob"])) == 0
    capsys.readouterr()
    assert main(["cache", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    reader = CacheReader(out)
    stored = sum(int((reader.read_window(i).ids >= 0).sum()) for i in range(reader.num_windows))
    assert info["entries_sampled_windows"] == 4
    assert info["mean_entries_per_row"] == pytest.approx(stored / (4 * W))
    assert 1 <= info["mean_entries_per_row"] < K
    assert main(["cache", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "adaptive top-k 16 (min prob 0.0095) (float32 log-probs)" in text
    assert f"entries per row:    {stored / (4 * W):.2f} (mean over 4 windows)" in text
    assert main(["cache", "info", str(topk_cache), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["mean_entries_per_row"], info["entries_sampled_windows"]) == (K, 0)


@pytest.mark.parametrize(
    "flags,needle",
    [
        ({"min_mass": 1.5}, r"--min-mass must lie in (0, 1] (for example 0.999), got 1.5"),
        ({"min_mass": 0}, r"--min-mass must lie in (0, 1]"),
        ({"min_prob": 1}, r"--min-prob must lie in (0, 1) (for example 1e-4), got 1.0"),
        ({"min_prob": -0.1}, r"--min-prob must lie in (0, 1)"),
        ({"top_k": None, "sample_draws": 8, "min_prob": 0.01}, "they do not go with --sample-draws"),
        ({"top_k": None, "sample_draws": 8, "min_mass": 0.9}, "they do not go with --sample-draws"),
    ],
)
def test_bad_adaptive_flags_are_one_line_and_exit_2(teacher_dir, data_file, tmp_path, capsys, flags, needle):
    out = tmp_path / "c"
    assert main(build_argv(teacher_dir, data_file, out, **flags)) == 2
    err = capsys.readouterr().err
    assert err.startswith("longkd: error: ") and err.count("\n") == 1 and needle in err, err
    assert not out.exists()  # refused before anything is written


def test_selection_flags_on_the_command_line_replace_the_config_files():
    base = {"teacher": "t", "data": "d", "out": "o", "window": 8}
    config = {"top_k": 32, "min_mass": 0.99}
    assert resolve_settings(base, config).selection == {
        "mode": "adaptive", "k": 32, "min_mass": 0.99, "min_prob": None
    }  # fmt: skip
    assert resolve_settings({**base, "top_k": 8}, config).selection == {"mode": "topk", "k": 8}
    assert resolve_settings({**base, "min_prob": 1e-4}, config).selection == {
        "mode": "adaptive", "k": 64, "min_mass": None, "min_prob": 1e-4
    }  # fmt: skip
    assert resolve_settings({**base, "sample_draws": 4}, config).selection == {"mode": "sampled", "draws": 4}
    with pytest.raises(LongkdError, match="--min-mass must be a number, got 'high'"):
        resolve_settings(base, {"min_mass": "high"})
