"""`longkd cache build --tensor-parallel N` under real torchrun (CPU, gloo), and `--device-map auto`.

A tiny Llama whose vocabulary (251 logits, a tokenizer of 240) splits unevenly over 2 ranks.
Checked against a one-process build and against the teacher's exact distributions computed
here: 4 processes in 2 groups of 2 give the one-process top-k (ids equal except where
log-probs tie within 1e-6, log-probs within 1e-5); 2 processes in one group draw samples that
follow the exact distributions (a Kolmogorov-Smirnov test on the randomised probability
integral transform of every draw, fixed seeds); a rank killed mid-build and the same command
rerun give the bytes of the uninterrupted build. Layouts that cannot work are one line each,
before anything is written.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from longkd.cache.reader import CacheReader
from longkd.cli import main
from tests.cache.test_column_codecs import logprob_error
from tests.helpers import (
    cache_build_argv,
    ledger_lines,
    one_torch_thread,
    run_torchrun,
    torchrun,
    worker_pid,
    write_random_text,
)

VOCAB, TOKENIZER = 251, 240
TOPK_WINDOWS = 16
SAMPLED_WINDOWS = 96
DRAWS = 16
# A random tiny teacher's logits spread by about 0.2; at T = 0.05 its distributions are peaked, as
# a trained teacher's are, so that a draw from the wrong one shows.
SAMPLED_T = 0.05


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    """Teacher, data and the one-process top-k cache."""
    teacher = tiny_model_dir(
        "llama", vocab_size=VOCAB, tokenizer_size=TOKENIZER, hidden_size=64, num_layers=2,
        max_position_embeddings=256, seed=3,
    )  # fmt: skip
    root = tmp_path_factory.mktemp("tp")
    data = write_random_text(root / "train.jsonl", samples=900, vocab=TOKENIZER, lengths=(5, 80), seed=5)
    reference = root / "one-process"
    with one_torch_thread():
        assert main(build_args(teacher, data, reference)) == 0
    return teacher, data, reference


def assert_same_logprobs(got: np.ndarray, want: np.ndarray) -> None:
    """Two builds of one teacher's compact cache: each holds its log-probs within the
    encoding's bound of the teacher's, and float noise in the logits can round a row
    differently (its shift, or its grid points), so they agree within twice that bound."""
    assert (np.abs(got - want) <= 2 * logprob_error(want, "grid-shift") + 1e-5).all()


def build_args(teacher, data, out, **changes):
    flags = {"window": 128, "top_k": 8, "shard_size": "12KB", "max_windows": TOPK_WINDOWS, **changes}
    if "sample_draws" in flags:
        flags["top_k"] = None
    return cache_build_argv(teacher, data, out, **flags)


def sampled_args(teacher, data, out):
    return build_args(
        teacher,
        data,
        out,
        sample_draws=DRAWS,
        temperature=SAMPLED_T,
        max_windows=SAMPLED_WINDOWS,
        shard_size="16KB",
        tensor_parallel=2,
    )


def exact_logprobs(teacher, reader: CacheReader, temperature: float = 1.0) -> torch.Tensor:
    """[windows, W, V] the teacher's log-probs at T on the cache's windows (one process, whole vocabulary)."""
    from longkd.cache.teacher import Teacher

    model = Teacher.load(str(teacher)).model
    out = []
    with torch.inference_mode(), one_torch_thread():
        for window in reader.iter_windows():
            ids = torch.from_numpy(window.input_ids.astype(np.int64))[None]
            pos = torch.from_numpy(window.position_ids)[None]
            logits = model(input_ids=ids, position_ids=pos).logits[0].float()
            out.append(torch.log_softmax(logits / temperature, -1))
    return torch.stack(out)


def compare_topk(cache, reference, exact: torch.Tensor) -> dict:
    """Assert the cache holds the reference's top-k up to ties; the differences, measured."""
    a, b = CacheReader(cache), CacheReader(reference)
    assert a.num_windows == b.num_windows
    assert a.manifest["teacher"] == b.manifest["teacher"], "the same teacher identity (weights hash)"
    assert a.manifest["dataset"] == b.manifest["dataset"] and a.manifest["packing"] == b.manifest["packing"]
    stats = {"max_logprob_diff": 0.0, "max_target_diff": 0.0, "ids_differing": 0, "entries": 0}
    for x, y in zip(a.iter_windows(), b.iter_windows(), strict=True):
        assert x.window_id == y.window_id
        np.testing.assert_array_equal(x.input_ids, y.input_ids)
        np.testing.assert_array_equal(x.segment_starts, y.segment_starts)
        assert_same_logprobs(x.logprobs, y.logprobs)
        np.testing.assert_allclose(x.target_logprob, y.target_logprob, rtol=0, atol=1e-5, equal_nan=True)
        differ = x.ids != y.ids
        if differ.any():  # only ties: the id taken instead holds the same log-prob in the teacher
            rows, cols = np.nonzero(differ)
            theirs = exact[x.window_id][rows, x.ids[rows, cols]].numpy()
            np.testing.assert_allclose(theirs, y.logprobs[rows, cols], rtol=0, atol=1e-6)
        stats["max_logprob_diff"] = max(
            stats["max_logprob_diff"], float(np.abs(x.logprobs - y.logprobs).max())
        )
        target = np.abs(x.target_logprob - y.target_logprob)[:-1]
        stats["max_target_diff"] = max(stats["max_target_diff"], float(target.max()))
        stats["ids_differing"] += int(differ.sum())
        stats["entries"] += differ.size
    return stats


@pytest.mark.slow
def test_two_groups_of_two_give_the_one_process_topk(setup, tmp_path, capsys):
    teacher, data, reference = setup
    out = tmp_path / "tp4"
    code, stdout, err = run_torchrun(build_args(teacher, data, out, tensor_parallel=2), nproc=4)
    assert code == 0, err[-3000:]
    assert "tensor parallel: 2 group(s) of 2 ranks, the LM head split by vocabulary" in stdout
    assert f"wrote {out}: {TOPK_WINDOWS} windows" in stdout
    assert "rank 3 (tensor-parallel group 1): 8 windows" in stdout
    stats = compare_topk(out, reference, exact_logprobs(teacher, CacheReader(reference)))
    print(f"tensor parallel 2x2 vs one process: {stats}")

    # Each group's first rank wrote its windows, named by the group: shard-00000-* and shard-00001-*.
    reader = CacheReader(out)
    groups = [int(Path(s["path"]).name.split("-")[1]) for s in reader.shards]
    assert groups == sorted(groups) and set(groups) == {0, 1}
    assert all(s["stride"] == 2 and s["first_window"] % 2 == g for s, g in zip(reader.shards, groups))
    assert sorted(p.name for p in (out / "progress").iterdir()) == ["rank-00000.jsonl", "rank-00001.jsonl"]
    build = json.loads((out / "build.json").read_text())["settings"]
    assert (build["tensor_parallel"], build["world"]) == (2, 2)
    capsys.readouterr()
    assert main(["cache", "verify", str(out)]) == 0


# ------------------------------------------------------------------ sampled


@pytest.fixture(scope="module")
def sampled_tp(setup, tmp_path_factory):
    """An uninterrupted 2-process, one-group sampled build."""
    teacher, data, _ = setup
    out = tmp_path_factory.mktemp("tp-sampled") / "cache"
    code, _, err = run_torchrun(sampled_args(teacher, data, out))
    assert code == 0, err[-3000:]
    return out


def pit_ks(reader: CacheReader, exact: torch.Tensor, seed: int) -> tuple[float, int]:
    """Kolmogorov-Smirnov distance from uniform of the randomised probability integral transform
    of every cached draw under the teacher's exact distribution of its row, and the number of
    draws. The transform of a draw from p is exactly uniform on [0, 1)."""
    rng = np.random.default_rng(seed)
    values = []
    for window in reader.iter_windows():
        p = exact[window.window_id].double().exp().numpy()  # [W, V]
        cdf = np.cumsum(p, axis=-1)
        rows = np.repeat(np.arange(p.shape[0])[:, None], window.ids.shape[1], axis=1)
        keep = window.counts > 0
        rows, ids, counts = rows[keep], window.ids[keep], window.counts[keep].astype(np.int64)
        rows, ids = np.repeat(rows, counts), np.repeat(ids, counts)
        values.append(cdf[rows, ids] - p[rows, ids] * rng.random(ids.shape[0]))
    u = np.sort(np.concatenate(values))
    n = u.shape[0]
    return float(max((np.arange(1, n + 1) / n - u).max(), (u - np.arange(n) / n).max())), n


@pytest.mark.slow
def test_one_group_draws_follow_the_teacher(setup, sampled_tp, capsys):
    teacher, _, _ = setup
    reader = CacheReader(sampled_tp)
    assert main(["cache", "verify", str(sampled_tp)]) == 0
    for window in reader.iter_windows(range(5)):
        assert (window.counts.sum(-1) == DRAWS).all()
    exact = exact_logprobs(teacher, reader, SAMPLED_T)
    distance, n = pit_ks(reader, exact, seed=0)
    assert n == SAMPLED_WINDOWS * 128 * DRAWS
    limit = math.sqrt(-0.5 * math.log(1e-4 / 2)) / math.sqrt(n)  # Kolmogorov, level 1e-4
    print(f"sampled, tensor parallel 2: KS distance {distance:.5f} over {n} draws (limit {limit:.5f})")
    assert distance < limit
    # The statistic sees a wrong split between the shards: the first rank's ids 1.1 times as likely.
    shifted = exact.clone()
    shifted[..., : -(-VOCAB // 2)] += math.log(1.1)
    wrong, _ = pit_ks(reader, torch.log_softmax(shifted, -1), seed=0)
    print(f"against shard masses off by 10%: KS distance {wrong:.5f}")
    assert wrong > 3 * limit


@pytest.mark.slow
def test_killed_rank_resumes_to_the_uninterrupted_bytes(setup, sampled_tp, tmp_path):
    teacher, data, _ = setup
    out = tmp_path / "killed"
    args = sampled_args(teacher, data, out)
    seed = int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    victim, target = int(rng.integers(0, 2)), int(rng.integers(1, 4))
    log = (tmp_path / "killed.log").open("w+")
    proc = torchrun(args, stdout=log, stderr=subprocess.STDOUT)
    killed = None
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if ledger_lines(out, 0) >= target:  # the group's first rank writes the ledger
            killed = worker_pid(proc.pid, victim)
            if killed is not None:
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.005)
    proc.wait(timeout=120)
    log.seek(0)
    assert killed is not None, f"the build finished before the kill (seed {seed}): {log.read()[-2000:]}"
    assert proc.returncode != 0 and not (out / "manifest.json").exists()
    kept = ledger_lines(out, 0)
    whole = CacheReader(sampled_tp)
    assert target <= kept < len(whole.shards), f"seed {seed}"

    code, stdout, err = run_torchrun(args)
    assert code == 0, err[-3000:]
    assert f"resuming {out}: {kept} shards" in stdout
    resumed = CacheReader(out)
    fields = ("path", "rows", "bytes", "sha256", "first_window", "last_window", "stride")
    assert [{k: s[k] for k in fields} for s in resumed.shards] == [
        {k: s[k] for k in fields} for s in whole.shards
    ]
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(
        Path(s["path"]).name for s in whole.shards
    )
    assert main(["cache", "verify", str(out)]) == 0


# ------------------------------------------------------------------ one process


def test_device_map_auto_builds_the_same_cache(setup, tmp_path):
    """On a machine without GPUs accelerate places everything on the CPU: the same bytes."""
    teacher, data, _ = setup
    plain, mapped = tmp_path / "plain", tmp_path / "mapped"
    with one_torch_thread():
        assert main(build_args(teacher, data, plain, max_windows=4)) == 0
        assert main(build_args(teacher, data, mapped, max_windows=4, device_map="auto")) == 0
    a, b = CacheReader(plain), CacheReader(mapped)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    assert a.manifest["teacher"] == b.manifest["teacher"]


def _gpt2_teacher(root: Path) -> Path:
    """A tiny GPT-2, an architecture without a tensor-parallel plan in transformers."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from longkd.tools.random_models import build_word_tokenizer

    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=256)
    GPT2LMHeadModel(config).save_pretrained(root)
    build_word_tokenizer(64).save_pretrained(root)
    return root


def test_layouts_that_cannot_work_are_one_line_before_writing(setup, tmp_path, capsys, monkeypatch):
    teacher, data, _ = setup
    out = tmp_path / "never"
    cases = [
        (
            build_args(teacher, data, out, tensor_parallel=2),
            "--tensor-parallel 2 does not divide the 1 processes of this job (WORLD_SIZE); start a "
            "multiple of 2 processes with torchrun --nproc-per-node",
        ),
        (
            build_args(teacher, data, out, tensor_parallel=3),
            "--tensor-parallel 3 does not divide the teacher's num_attention_heads (4); choose N among "
            "the divisors of both head counts",
        ),
        (
            build_args(_gpt2_teacher(tmp_path / "gpt2"), data, out, tensor_parallel=2),
            "has no tensor-parallel plan in transformers, so --tensor-parallel 2 cannot split it; use "
            "--device-map auto",
        ),
        (
            build_args(teacher, data, out, tensor_parallel=2, device_map="auto"),
            "--device-map auto and --tensor-parallel exclude each other; choose one",
        ),
        (
            build_args(teacher, data, out, device_map="auto", device="cpu"),
            "--device-map auto places the teacher itself; leave out --device",
        ),
        (
            build_args(teacher, data, out, tensor_parallel=0),
            "--tensor-parallel must be positive, got 0",
        ),
    ]
    capsys.readouterr()  # the GPT-2's save
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("longkd: error: ") and "\n" not in err and message in err, err
        assert not out.exists()

    with monkeypatch.context() as env:  # a torchrun job of 2 processes on this machine
        for name, value in (
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("LOCAL_RANK", "0"),
            ("LOCAL_WORLD_SIZE", "2"),
        ):
            env.setenv(name, value)
        assert main(build_args(teacher, data, out, device_map="auto")) == 2
    assert (
        "job starts 2 processes on it; use one process per machine (--nproc-per-node 1)"
        in capsys.readouterr().err
    )
    assert not out.exists()

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a)
    )
    assert main(build_args(teacher, data, out, device_map="auto")) == 2
    assert capsys.readouterr().err.strip() == (
        "longkd: error: --device-map auto needs the accelerate package, which is not installed: "
        "pip install accelerate (or pip install 'longkd[multi-gpu]')"
    )
    assert not out.exists()


def test_a_build_started_before_tensor_parallel_existed_resumes(setup, tmp_path, capsys):
    """Its build.json has no tensor_parallel setting: one teacher per rank, as --tensor-parallel 1."""
    teacher, data, _ = setup
    out = tmp_path / "old"
    with one_torch_thread():
        assert main(build_args(teacher, data, out, max_windows=4)) == 0
        record = json.loads((out / "build.json").read_text())
        del record["settings"]["tensor_parallel"]
        (out / "build.json").write_text(json.dumps(record))
        (out / "manifest.json").unlink()
        capsys.readouterr()
        assert main(build_args(teacher, data, out, max_windows=4)) == 0
    assert "resuming" in capsys.readouterr().out
    assert main(["cache", "verify", str(out)]) == 0


@pytest.mark.slow
def test_one_group_cuts_adaptive_rows_as_one_process(setup, tmp_path):
    """Adaptive rows are cut from the merged top-K, so a tensor-parallel build keeps the rows a
    one-process build keeps (up to log-prob ties at a cut)."""
    teacher, data, _ = setup
    rules = {"top_k": 16, "min_mass": 0.9, "temperature": SAMPLED_T, "max_windows": 8}  # peaked rows
    reference, out = tmp_path / "one-process", tmp_path / "tp2"
    with one_torch_thread():
        assert main(build_args(teacher, data, reference, **rules)) == 0
    code, _, err = run_torchrun(build_args(teacher, data, out, tensor_parallel=2, **rules))
    assert code == 0, err[-3000:]
    assert main(["cache", "verify", str(out)]) == 0
    kept = same = 0
    for x, y in zip(CacheReader(out).iter_windows(), CacheReader(reference).iter_windows(), strict=True):
        x_entries, y_entries = (x.ids >= 0).sum(1), (y.ids >= 0).sum(1)
        assert 1 <= x_entries.min() and x_entries.max() <= 16 and x_entries.mean() < 15, "rows are cut"
        rows = x_entries == y_entries
        kept, same = kept + rows.size, same + int(rows.sum())
        width = min(x.ids.shape[1], y.ids.shape[1])
        live = (x.ids[rows, :width] >= 0) & (x.ids[rows, :width] == y.ids[rows, :width])
        assert_same_logprobs(x.logprobs[rows, :width][live], y.logprobs[rows, :width][live])
    assert same >= 0.99 * kept, f"only {same} of {kept} rows keep as many entries as one process"
