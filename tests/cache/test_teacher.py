"""Tests for the teacher run: chunked head + selection against one plain full forward.

Every check builds a tiny real transformers model (tools/random_models.py), runs ``Teacher.run`` on
fresh random windows, and compares with ``log_softmax(model(input_ids, position_ids).logits
/ T)`` computed in one piece.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from longkd.cache.identity import config_sha256, tokenizer_fingerprint, weights_sha256
from longkd.cache.teacher import SelectionConfig, Teacher
from longkd.errors import LongkdError
from longkd.models import lm_head_logits

VOCAB = 96
TOL = 1e-5
ARCHS = {
    "llama": {},
    "qwen2": {},
    "gemma2": {},  # final_logit_softcapping=5.0
    "phi3": {"partial_rotary_factor": 0.5},
}


@pytest.fixture(scope="module")
def teachers(tiny_model_dir):
    """arch -> loaded Teacher (tokenizer smaller than the embedding, like a padded vocabulary)."""
    torch.set_num_threads(1)
    return {
        arch: Teacher.load(str(tiny_model_dir(arch, vocab_size=VOCAB, tokenizer_size=90, **cfg)))
        for arch, cfg in ARCHS.items()
    }


def _positions(width: int, starts: list[int], batch: int) -> torch.Tensor:
    """Long[B, W]: continuous when ``starts == [0]``, else restarting at each segment start."""
    pos = torch.arange(width)
    for s in starts[1:]:
        pos[s:] = torch.arange(width - s)
    return pos.unsqueeze(0).expand(batch, width).clone()


def _reference(model, ids: torch.Tensor, pos: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, W, V] fp32 log-probs from ONE full forward of the model."""
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    return torch.log_softmax(logits.float() / temperature, dim=-1)


def _check_topk(rows, ref: torch.Tensor, ids: torch.Tensor, k: int) -> None:
    batch, width, _ = ref.shape
    for b in range(batch):
        r = rows[b]
        assert r.mode == "topk" and r.ids.dtype == np.int32 and r.logprobs.dtype == np.float32
        assert r.ids.shape == (width, k) and r.logprobs.shape == (width, k)
        got_ids = torch.from_numpy(r.ids).long()
        got_lp = torch.from_numpy(r.logprobs)
        ref_vals, ref_ids = torch.topk(ref[b], k, dim=-1)
        # Values are the true top-k; ids index exactly those values (equal except for ties).
        torch.testing.assert_close(got_lp, ref_vals, atol=TOL, rtol=0)
        torch.testing.assert_close(ref[b].gather(-1, got_ids), got_lp, atol=TOL, rtol=0)
        assert (got_ids == ref_ids).float().mean() > 0.98
        assert bool((got_lp[:, :-1] >= got_lp[:, 1:]).all()), "log-probs must be descending"
        assert all(len(set(row)) == k for row in r.ids.tolist())
        # Tail mass is non-negative and equals the reference mass outside the stored ids.
        tail = 1.0 - got_lp.double().exp().sum(-1)
        outside = ref[b].double().exp().scatter(-1, got_ids, 0.0).sum(-1)
        assert bool((tail >= -1e-6).all())
        torch.testing.assert_close(tail, outside, atol=1e-5, rtol=0)
        # Row t holds log p(input_ids[t+1]); the last row has no next token.
        want = ref[b, :-1].gather(-1, ids[b, 1:, None]).squeeze(-1)
        assert r.target_logprob.dtype == np.float32 and r.target_logprob.shape == (width,)
        torch.testing.assert_close(torch.from_numpy(r.target_logprob[:-1]), want, atol=TOL, rtol=0)
        assert math.isnan(r.target_logprob[-1])


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize(
    "temperature, starts, chunk",
    [(1.0, [0], 10), (0.7, [0, 11, 25], 16), (2.0, [0, 5], 37)],
    ids=["T1-continuous-c10", "T0.7-reset-c16", "T2-reset-c37"],
)
def test_topk_matches_one_full_forward(teachers, arch, temperature, starts, chunk):
    teacher = teachers[arch]
    gen = torch.Generator().manual_seed(hash((arch, temperature, chunk)) % 2**31)
    ids = torch.randint(0, 90, (2, 37), generator=gen)
    pos = _positions(37, starts, 2)
    k = 7
    rows = teacher.run(
        ids, pos, [4, 9], SelectionConfig("topk", k=k), temperature=temperature, chunk_size=chunk
    )
    assert [r.window_id for r in rows] == [4, 9]
    _check_topk(rows, _reference(teacher.model, ids, pos, temperature), ids, k)


def test_full_vocabulary_topk_has_no_tail(teachers):
    teacher = teachers["llama"]
    ids = torch.randint(0, 90, (1, 9))
    rows = teacher.run(ids, _positions(9, [0], 1), [0], SelectionConfig("topk", k=VOCAB), chunk_size=4)
    _check_topk(rows, _reference(teacher.model, ids, _positions(9, [0], 1), 1.0), ids, VOCAB)
    np.testing.assert_allclose(np.exp(rows[0].logprobs.astype(np.float64)).sum(-1), 1.0, atol=1e-5)


def test_batch_of_two_equals_each_alone(teachers):
    teacher = teachers["qwen2"]
    ids = torch.randint(0, 90, (2, 29))
    pos = _positions(29, [0, 13], 2)
    sel = SelectionConfig("topk", k=5)
    both = teacher.run(ids, pos, [0, 1], sel, temperature=0.8, chunk_size=8)
    for b in range(2):
        alone = teacher.run(ids[b : b + 1], pos[b : b + 1], [b], sel, temperature=0.8, chunk_size=8)[0]
        np.testing.assert_allclose(both[b].logprobs, alone.logprobs, atol=TOL, rtol=0)
        np.testing.assert_allclose(both[b].target_logprob, alone.target_logprob, atol=TOL, rtol=0)
        assert (both[b].ids == alone.ids).mean() > 0.98


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_prefix_rows_equal_the_prefix_run(teachers, arch):
    teacher = teachers[arch]
    ids = torch.randint(0, 90, (1, 40))
    pos = _positions(40, [0], 1)
    sel = SelectionConfig("topk", k=6)
    full = teacher.run(ids, pos, [0], sel, chunk_size=12)[0]
    prefix_len = 17
    prefix = teacher.run(ids[:, :prefix_len], pos[:, :prefix_len], [0], sel, chunk_size=5)[0]
    np.testing.assert_allclose(full.logprobs[:prefix_len], prefix.logprobs, atol=TOL, rtol=0)
    assert (full.ids[:prefix_len] == prefix.ids).mean() > 0.98
    # The prefix's last row has no next token in the prefix; the long window's row does.
    np.testing.assert_allclose(full.target_logprob[: prefix_len - 1], prefix.target_logprob[:-1], atol=TOL)
    assert math.isnan(prefix.target_logprob[-1]) and not math.isnan(full.target_logprob[prefix_len - 1])


def test_sampled_rows_are_well_formed_and_batch_independent(teachers):
    teacher = teachers["phi3"]
    ids = torch.randint(0, 90, (3, 23))
    pos = _positions(23, [0], 3)
    draws = 40
    sel = SelectionConfig("sampled", draws=draws)
    rows = teacher.run(ids, pos, [10, 11, 12], sel, temperature=1.3, seed=7, chunk_size=6)
    ref = _reference(teacher.model, ids, pos, 1.3)
    for b, r in enumerate(rows):
        assert r.mode == "sampled" and r.logprobs is None
        assert r.ids.dtype == np.int32 and r.counts.dtype == np.uint16 and r.row_splits.dtype == np.int32
        assert r.row_splits.shape == (24,) and r.row_splits[0] == 0 and r.row_splits[-1] == len(r.ids)
        for t in range(23):
            lo, hi = r.row_splits[t], r.row_splits[t + 1]
            row_ids, row_counts = r.ids[lo:hi], r.counts[lo:hi]
            assert int(row_counts.sum()) == draws and (row_counts > 0).all()
            assert (np.diff(row_ids) > 0).all(), "ids unique and ascending"
            assert ((row_ids >= 0) & (row_ids < VOCAB)).all()
        want = ref[b, :-1].gather(-1, ids[b, 1:, None]).squeeze(-1)
        torch.testing.assert_close(torch.from_numpy(r.target_logprob[:-1]), want, atol=TOL, rtol=0)
        assert math.isnan(r.target_logprob[-1])
    # Window 11 draws the same alone, first in another batch, and after re-running.
    alone = teacher.run(ids[1:2], pos[1:2], [11], sel, temperature=1.3, seed=7, chunk_size=6)[0]
    other = teacher.run(ids[[1, 0]], pos[:2], [11, 99], sel, temperature=1.3, seed=7, chunk_size=6)[0]
    for r in (alone, other):
        for field in ("ids", "counts", "row_splits"):
            np.testing.assert_array_equal(getattr(r, field), getattr(rows[1], field))
    # The window id is part of the seed: the same tokens under another id draw differently.
    twins = teacher.run(ids[[1, 1]], pos[:2], [11, 12], sel, temperature=1.3, seed=7, chunk_size=6)
    np.testing.assert_array_equal(twins[0].counts, rows[1].counts)
    assert not np.array_equal(twins[1].counts, twins[0].counts) or not np.array_equal(
        twins[1].ids, twins[0].ids
    )
    reseeded = teacher.run(ids[1:2], pos[1:2], [11], sel, temperature=1.3, seed=8, chunk_size=6)[0]
    assert not np.array_equal(reseeded.counts, rows[1].counts) or not np.array_equal(
        reseeded.ids, rows[1].ids
    )


def _chi_square(counts: np.ndarray, p: np.ndarray, draws: int) -> tuple[float, int]:
    """Pearson chi-square over bins with expectation >= 5 (the rest pooled into one bin)."""
    expected = p * draws
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    keep = exp > 0
    stat = float((((obs - exp) ** 2)[keep] / exp[keep]).sum())
    return stat, int(keep.sum()) - 1


def test_sampled_frequencies_approach_p(teachers):
    teacher = teachers["gemma2"]
    draws, temperature = 20000, 0.25  # a low T makes the rows distinct enough to tell apart
    ids = torch.randint(0, 90, (1, 5))
    pos = _positions(5, [0], 1)
    r = teacher.run(
        ids, pos, [3], SelectionConfig("sampled", draws=draws), temperature=temperature, chunk_size=2
    )[0]
    p = _reference(teacher.model, ids, pos, temperature)[0].double().exp().numpy()  # [W, V]
    for t in range(5):
        lo, hi = r.row_splits[t], r.row_splits[t + 1]
        counts = np.zeros(VOCAB)
        counts[r.ids[lo:hi]] = r.counts[lo:hi]
        stat, dof = _chi_square(counts, p[t], draws)
        limit = dof + 6 * math.sqrt(2 * dof)  # about 6 standard deviations of the chi-square
        assert stat < limit, f"row {t}: chi-square {stat:.1f} over {dof} dof"
        assert np.abs(counts / draws - p[t]).max() < 0.02
        # The test has power: the neighbouring row's distribution or T=1 would be rejected.
        other = p[(t + 1) % 5]
        assert _chi_square(counts, other, draws)[0] > limit
        at_t1 = torch.softmax(torch.from_numpy(np.log(p[t])) * temperature, -1).numpy()
        assert _chi_square(counts, at_t1, draws)[0] > limit


def test_selection_validation(teachers):
    teacher = teachers["llama"]
    ids = torch.zeros(1, 4, dtype=torch.long)
    pos = _positions(4, [0], 1)
    with pytest.raises(LongkdError, match=f"--top-k 500 exceeds the teacher vocabulary {VOCAB}"):
        teacher.run(ids, pos, [0], SelectionConfig("topk", k=500))
    for draws in (0, 65536, None):
        with pytest.raises(LongkdError, match="--sample-draws"):
            SelectionConfig("sampled", draws=draws)
    SelectionConfig("sampled", draws=65535)
    with pytest.raises(LongkdError, match="--top-k"):
        SelectionConfig("topk", k=0)
    with pytest.raises(LongkdError, match="selection mode"):
        SelectionConfig("beam")
    with pytest.raises(LongkdError, match="--temperature"):
        teacher.run(ids, pos, [0], SelectionConfig("topk", k=2), temperature=0.0)
    with pytest.raises(LongkdError, match="window ids"):
        teacher.run(ids, pos, [0, 1], SelectionConfig("topk", k=2))
    with pytest.raises(LongkdError, match="position_ids"):
        teacher.run(ids, pos[:, :3], [0], SelectionConfig("topk", k=2))


def test_load_errors(tmp_path, tiny_model_dir):
    from transformers import AutoConfig

    from longkd.models import build_tiny_model, tiny_config

    missing = tmp_path / "nope"
    with pytest.raises(LongkdError, match=f"teacher path {missing} does not exist; pass a local model"):
        Teacher.load(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongkdError, match="no config.json"):
        Teacher.load(str(tmp_path / "empty"))
    AutoConfig.for_model("vit", hidden_size=32, num_hidden_layers=1).save_pretrained(tmp_path / "vit")
    with pytest.raises(LongkdError, match="'vit' model, which has no causal-LM class"):
        Teacher.load(str(tmp_path / "vit"))
    build_tiny_model(tiny_config("llama", vocab_size=32)).save_pretrained(tmp_path / "notok")
    with pytest.raises(LongkdError, match="tokenizer"):
        Teacher.load(str(tmp_path / "notok"))
    with pytest.raises(LongkdError, match="--dtype"):
        Teacher.load(str(tiny_model_dir("llama", vocab_size=VOCAB, tokenizer_size=90)), dtype="float64")


def test_identity_and_tokenizer_info(teachers, tiny_model_dir):
    from longkd.tools.random_models import build_word_tokenizer

    path = tiny_model_dir("llama", vocab_size=VOCAB, tokenizer_size=90)
    a, b = teachers["llama"], Teacher.load(str(path))
    ident = a.identity()
    assert ident == b.identity()
    assert ident["model_type"] == "llama" and ident["max_position_embeddings"] == 1024
    assert ident["dtype"] == "float32" and ident["revision"] is None
    assert ident["rope_parameters"]["rope_theta"] == 10000.0
    assert a.embedding_size == VOCAB and a.max_positions == 1024
    assert teachers["phi3"].identity()["rope_parameters"].get("partial_rotary_factor", 0.5) == 0.5
    # Weights hash sees a single changed value; config hash sees a changed setting.
    with torch.no_grad():
        b.model.model.norm.weight[3] += 1e-3
    assert weights_sha256(b.model) != ident["weights_sha256"]
    other = Teacher.load(str(tiny_model_dir("llama", vocab_size=VOCAB, tokenizer_size=90, rope_theta=5e5)))
    assert config_sha256(other.model.config) != ident["config_sha256"]

    info = a.tokenizer_info()
    assert info == {
        "fingerprint": tokenizer_fingerprint(build_word_tokenizer(90)),
        "size": 90,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }
    assert tokenizer_fingerprint(build_word_tokenizer(91)) != info["fingerprint"]


def _tiny_extra(arch: str, **cfg):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=4, **cfg,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize(
    "arch, cfg",
    [
        ("cohere", {"logit_scale": 0.37}),
        ("granite", {"logits_scaling": 4.0}),
        ("gemma2", {"final_logit_softcapping": 0.2, "head_dim": 8, "query_pre_attn_scalar": 8}),
    ],
)
def test_lm_head_logits_reproduces_model_forward(arch, cfg):
    model = _tiny_extra(arch, **cfg)
    ids = torch.randint(0, 60, (2, 11))
    with torch.no_grad():
        want = model(input_ids=ids, use_cache=False).logits
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
        got = lm_head_logits(model, hidden)
        plain = model.get_output_embeddings()(hidden)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        lm_head_logits(model, hidden, float32=True), want.float(), atol=1e-5, rtol=1e-5
    )
    assert (plain - want).abs().max() > 1e-2, "the post-processing must matter in this test"


def test_unknown_post_processing_is_refused(tiny_model_dir):
    teacher = Teacher.load(str(tiny_model_dir("llama", vocab_size=VOCAB, tokenizer_size=90)))
    teacher.model.config.final_logit_softcapping = 0.5  # llama's forward ignores it
    with pytest.raises(LongkdError, match="does not reproduce"):
        teacher.check_head()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_run_matches_reference(tiny_model_dir, dtype):
    path = str(tiny_model_dir("gemma2", vocab_size=VOCAB, tokenizer_size=90))
    teacher = Teacher.load(path, dtype=dtype, device="cuda")
    ids = torch.randint(0, 90, (2, 53))
    pos = _positions(53, [0, 20], 2)
    rows = teacher.run(ids, pos, [0, 1], SelectionConfig("topk", k=8), temperature=0.9, chunk_size=16)
    ref = _reference(teacher.model, ids.cuda(), pos.cuda(), 0.9).cpu()
    if dtype == "float32":
        _check_topk(rows, ref, ids, 8)
    else:  # the reference post-processes in bf16, the run in fp32: compare loosely
        for b in range(2):
            got = torch.from_numpy(rows[b].logprobs)
            torch.testing.assert_close(got, torch.topk(ref[b], 8).values, atol=0.05, rtol=0)
    sampled = teacher.run(ids, pos, [0, 1], SelectionConfig("sampled", draws=300), seed=3, chunk_size=16)
    alone = teacher.run(ids[1:], pos[1:], [1], SelectionConfig("sampled", draws=300), seed=3, chunk_size=16)[
        0
    ]
    for r in sampled:
        assert (np.add.reduceat(r.counts.astype(np.int64), r.row_splits[:-1]) == 300).all()
    np.testing.assert_array_equal(alone.ids, sampled[1].ids)
    np.testing.assert_array_equal(alone.counts, sampled[1].counts)
