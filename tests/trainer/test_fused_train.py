"""`loss.fused`: the trainer's losses through the LM head in token chunks.

Against the materialised path (``loss.fused: false``) on caches built by the real
`longkd cache build`: the same steps on llama, gemma2 (final-logit softcapping, tied
embeddings) and qwen2 students (weights after 3 AdamW steps within float32 rounding), a head
with a bias, activation checkpointing and bf16 autocast; a dispatch-mode hook over a whole
train step shows no [N, V] tensor larger than one chunk is built; a head that cannot be fused
falls back with one log line; bad input fails with one line. DDP and FSDP2 are in
test_distributed_train.py.
"""

from __future__ import annotations

import logging

import pytest
import torch
import yaml
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from longkd.cli import main
from longkd.errors import LongkdError
from longkd.trainer.config import parse_config
from longkd.trainer.loop import prepare, train
from longkd.trainer.losses import batch_losses
from longkd.trainer.students import Student, train_step
from tests.helpers import build_cache, write_random_text

VOCAB = 64
W = 32
# fp32 on CPU: both paths compute the same losses with different summation orders (chunked
# matmuls, fp64 row statistics), and AdamW's normalisation amplifies rounding a little.
ATOL = 1e-5
ARCHS = {
    "llama": {},
    "gemma2": {"tie_word_embeddings": True},  # tiny_config gives gemma2 a final-logit softcap
    "qwen2": {},
}


@pytest.fixture(scope="module")
def cache(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    data = write_random_text(root / "train.jsonl", samples=80, vocab=VOCAB, lengths=(5, 40), seed=4)
    teacher = tiny_model_dir("llama", vocab_size=VOCAB, hidden_size=64, max_position_embeddings=256)
    # built at T = 1.5, the students' temperature: the bucket loss needs the cache's
    return build_cache(
        teacher, data, root / "cache", "--temperature", "1.5", window=W, top_k=8, max_windows=24, batch_size=8
    )


def student(name, arch="llama", fused=True, **init):
    # hidden 16: no activation has the vocabulary's width (64), so the dispatch hook below
    # can tell logits from everything else by their last dimension.
    base = {"arch": arch, "hidden_size": 16, "num_layers": 2, "num_heads": 2, "seed": 3}
    base.update(ARCHS.get(arch, {}), **init)
    return {
        "name": name,
        "init": base,
        "optimizer": {"lr": 3e-3, "warmup_steps": 0},
        # T != 1 gives the CE its own softmax; skip_first_tokens masks rows inside windows;
        # without the T^2 factor, the bf16 comparison below keeps the trajectory it was sized on
        "loss": {
            "fused": fused,
            "ce_weight": 0.3,
            "temperature": 1.5,
            "skip_first_tokens": 1,
            "chunk_size": 24,
            "t2_scaling": False,
        },
    }


def config(cache, out, students, **top) -> dict:
    data = {"cache": str(cache), "out": str(out), "steps": 3, "batch_size": 4, "students": students}
    data.update(top)
    return data


def weights(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_fused_and_materialised_take_the_same_steps(cache, tmp_path, arch):
    students = [student("fused", arch), student("full", arch, fused=False)]
    result = train(parse_config(config(cache, tmp_path / "run", students)), progress=False)
    fused, full = result.students
    assert fused.fused and not full.fused
    model = fused.model
    if arch == "gemma2":  # what makes gemma2 the case to check
        assert (
            model.config.final_logit_softcapping
            and model.lm_head.weight is model.get_input_embeddings().weight
        )
    start = prepare(parse_config(config(cache, tmp_path / "init", students[:1]))).students[0]
    moved = max_diff(weights(fused.model), weights(start.model))
    diff = max_diff(weights(fused.model), weights(full.model))
    print(f"{arch}: max abs weight difference fused vs materialised after 3 steps: {diff:.3g}")
    assert moved > 1e-3 and diff < ATOL
    assert fused.last.kl == pytest.approx(full.last.kl, rel=1e-5)
    assert fused.last.ce == pytest.approx(full.last.ce, rel=1e-5)


def test_head_with_bias(cache, tmp_path):
    """A biased LM head: the fused loss and every gradient equal the materialised ones."""
    run = prepare(parse_config(config(cache, tmp_path / "run", [student("s")])))
    st = run.students[0]
    torch.manual_seed(0)
    head = nn.Linear(16, VOCAB, bias=True)
    nn.init.normal_(head.bias, std=0.5)
    st.model.lm_head = head
    batch = next(iter(run.stream))
    got = {}
    for fused in (True, False):
        st.fused = fused
        st.model.zero_grad(set_to_none=True)
        loss, kl, ce, _ = batch_losses(st, batch, mode="bucket", temperature=1.5, amp=None)
        loss.backward()
        got[fused] = (loss.detach(), kl, ce, {n: p.grad.clone() for n, p in st.model.named_parameters()})
    for a, b in zip(got[True][:3], got[False][:3]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    grads, ref = got[True][3], got[False][3]
    assert grads["lm_head.bias"].abs().sum() > 0
    for name in ref:
        torch.testing.assert_close(
            grads[name], ref[name], atol=1e-7, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


class _LargestLogits(TorchDispatchMode):
    """Records the largest output of any op whose last dimension is the vocabulary's."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_fused_step_builds_no_logits_beyond_a_chunk(cache, tmp_path):
    """A whole fused train step (forward, both losses, backward, AdamW) never builds a
    [.., V] tensor larger than one chunk; the materialised step does (the hook can see it).
    (The chunk is larger than the head's transpose W^T [d = 16, V], the one other such tensor.)"""
    chunk = 24
    largest = {}
    for fused in (True, False):
        s = student("s", fused=fused)
        s["loss"]["chunk_size"] = chunk
        run = prepare(parse_config(config(cache, tmp_path / f"run-{fused}", [s])))
        batch = next(iter(run.stream))
        spy = _LargestLogits(VOCAB)
        with spy:
            train_step(run.students[0], [batch], total_steps=3, mode="bucket", temperature=1.5, amp=None)
        largest[fused] = spy.largest
    rows = batch.input_ids.numel()
    assert largest[True] == chunk * VOCAB, largest  # the chunks are there, and nothing larger
    assert largest[False] >= rows * VOCAB, largest


class _ScaledHead(nn.Module):
    """An LM head that is not a plain linear layer (the fused path cannot know its forward)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    def forward(self, hidden):
        return 0.5 * self.linear(hidden)


def test_unfusable_head_falls_back_with_one_log_line(cache, tmp_path, caplog):
    run = prepare(parse_config(config(cache, tmp_path / "run", [student("s")])))
    st = run.students[0]
    model = st.model
    model.lm_head = _ScaledHead(model.lm_head)
    with caplog.at_level(logging.WARNING, logger="longkd.trainer.students"):
        fallback = Student(
            st.cfg, model=model, tokenizer=None, schedule=st.schedule, initial_rope=st.initial_rope,
            run_seed=0, device=st.device, out_dir=tmp_path / "s",
        )  # fmt: skip
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["s: loss.fused: its LM head is a _ScaledHead, not a plain torch.nn.Linear; "
                     "computing the full logits instead"], lines  # fmt: skip
    assert not fallback.fused
    batch = next(iter(run.stream))
    m = train_step(fallback, [batch], total_steps=3, mode="bucket", temperature=1.5, amp=None)
    assert m.loss > 0 and model.lm_head.linear.weight.grad is None  # stepped and zeroed


def test_activation_checkpointing_and_bf16(cache, tmp_path):
    """Activation checkpointing changes nothing in the fused path; under bf16 autocast the
    fused step stays close to the materialised one (both round the head's matmul to bf16)."""
    plain, ac = student("p"), student("p")
    ac["activation_checkpointing"] = True
    runs = {}
    for tag, s, precision in (
        ("fp32", plain, "fp32"),
        ("ac", ac, "fp32"),
        ("bf16", plain, "bf16"),
        ("bf16-full", student("p", fused=False), "bf16"),
    ):
        cfg = config(cache, tmp_path / tag, [s], precision=precision)
        runs[tag] = train(parse_config(cfg), progress=False).students[0]
    assert max_diff(weights(runs["ac"].model), weights(runs["fp32"].model)) < 1e-6
    assert runs["bf16"].last.kl == pytest.approx(runs["bf16-full"].last.kl, rel=2e-2)
    # bf16 rounding differs between the paths (the materialised loss reads bf16 logits, the
    # fused one rounds its chunks the same way but accumulates dW in fp32), and AdamW can turn a
    # rounding-level gradient into a full step: compare with the steps' size, per tensor.
    init = weights(prepare(parse_config(config(cache, tmp_path / "init", [plain]))).students[0].model)
    fused, full = weights(runs["bf16"].model), weights(runs["bf16-full"].model)
    for k in init:
        gap, update = (fused[k] - full[k]).norm(), (full[k] - init[k]).norm()
        assert gap <= 0.1 * update, (k, float(gap), float(update))


# ----------------------------------------------------------------------------- bad input


def cli_error(tmp_path, data, capsys) -> str:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    capsys.readouterr()
    code = main(["train", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("longkd: error: "), err
    return err


@pytest.mark.parametrize("chunk", [0, -4])
def test_chunk_size_must_be_positive(cache, tmp_path, capsys, chunk):
    s = student("s")
    s["loss"]["chunk_size"] = chunk
    err = cli_error(tmp_path, config(cache, tmp_path / "run", [s]), capsys)
    assert f"students[0].loss.chunk_size: must be >= 1, got {chunk}" in err


def test_student_vocabulary_below_the_cached_ids(tiny_model_dir, tmp_path, capsys):
    """A teacher whose embedding (96) is padded past its tokenizer (64) stores ids >= 64: a
    student with 64 embeddings is refused before any step, naming the id."""
    teacher = tiny_model_dir("llama", vocab_size=96, tokenizer_size=VOCAB, max_position_embeddings=64)
    data = write_random_text(tmp_path / "d.jsonl", samples=20, vocab=VOCAB, lengths=(5, 30), seed=1)
    cache = build_cache(teacher, data, tmp_path / "cache", window=W, top_k=8, max_windows=4)
    err = cli_error(tmp_path, config(cache, tmp_path / "run", [student("s", vocab_size=VOCAB)]), capsys)
    assert "the cache stores teacher id" in err and "student's vocab_size is 64" in err


def test_head_sharded_outside_its_forward_is_refused(cache, tmp_path):
    """An LM head sharded on its own (FSDP2 gathers it only inside the head's forward, which the
    fused path does not call): one line naming the placement and the fixes."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        run = prepare(parse_config(config(cache, tmp_path / "run", [student("s")])))
        st = run.students[0]
        fully_shard(st.model.lm_head)
        with pytest.raises(LongkdError) as info:
            batch_losses(st, next(iter(run.stream)), mode="bucket", temperature=1.5, amp=None)
    finally:
        dist.destroy_process_group()
    message = str(info.value)
    assert "\n" not in message
    assert "LM head's weight is a DTensor sharded as (Shard(dim=0),)" in message
    assert "set loss.fused: false" in message
