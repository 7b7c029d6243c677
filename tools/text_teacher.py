"""A small teacher trained on real text, so that cache benchmarks measure peaked distributions.

A random-weight teacher spreads its probability almost evenly over the vocabulary, the worst
case for compressing a cache and unlike any real teacher. This module trains a small Llama and
a 32,000-id byte-level BPE tokenizer on text every machine here has without downloads: the
sources and docstrings of Python's standard library (``sysconfig.get_paths()["stdlib"]``,
``*.py``, ``site-packages`` excluded). Files are split into training and held-out sets by a
hash of their relative path, so the split is the same on every machine with the same Python.

The model trains on CPU with AdamW (linear warmup, cosine decay) on random windows of the
concatenated training files, and is saved as a Hugging Face model directory with its tokenizer
(``AutoModelForCausalLM`` / ``AutoTokenizer`` load it, ``longkd cache build --teacher DIR``
accepts it) beside ``metrics.json``: held-out loss and the mean entropy of its next-token
distributions on held-out windows. It is cached under a hash of its settings, and a run that
is interrupted resumes from its last checkpoint. It is for benchmarks, not for CI:

    python -m longkd.tools.text_teacher --out ~/.cache/longkd/text-teacher --threads 2   # ~70 min on 2 cores
    python -m longkd.tools.text_teacher --out DIR --steps 20 --vocab-size 500 --max-files 8
    python -m longkd.tools.text_teacher --out DIR --device cuda --steps 20000 --batch 16   # longer, on a GPU

    from longkd.tools.text_teacher import TextTeacherSpec, get_or_train
    teacher_dir = get_or_train(TextTeacherSpec(), "~/.cache/longkd/text-teacher")
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from longkd.errors import LongkdError
from longkd.fileio import atomic_dir, write_text_atomic

SPEC_VERSION = 1  # bump when the code changes what a spec produces
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
STATE_NAME = "train-state.pt"
CHECKPOINT_EVERY = 100  # steps between checkpoints of an unfinished run


@dataclass(frozen=True)
class TextTeacherSpec:
    """Everything that determines the trained teacher (its hash names the cache directory).

    Attributes:
        vocab_size: BPE vocabulary, the three special tokens included.
        hidden_size, num_layers, num_heads, intermediate_size: the Llama's sizes.
        context: training window and ``max_position_embeddings``.
        steps: optimizer steps.
        batch: windows per step.
        lr, warmup, final_lr_ratio, weight_decay: AdamW with linear warmup then cosine decay
            to ``lr * final_lr_ratio``.
        heldout_percent: share of files (by a hash of their path) held out.
        max_files: use only the first this many files of each split, sorted by path
            (0: all); small values make quick test runs.
        heldout_windows: held-out windows of ``context`` tokens for the metrics.
        seed: initialisation and batch sampling.
    """

    vocab_size: int = 32000
    hidden_size: int = 128
    num_layers: int = 6
    num_heads: int = 4
    intermediate_size: int = 512
    context: int = 512
    steps: int = 1100
    batch: int = 8
    lr: float = 3e-3
    warmup: int = 50
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    heldout_percent: int = 5
    max_files: int = 0
    heldout_windows: int = 32
    seed: int = 0

    def digest(self) -> str:
        """A short hash of the settings and the Python version (whose stdlib is the corpus)."""
        keep = {"version": SPEC_VERSION, "python": sysconfig.get_python_version(), **dataclasses.asdict(self)}
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------- corpus


def corpus_files(spec: TextTeacherSpec) -> tuple[list[Path], list[Path]]:
    """The standard library's ``*.py`` files, split into (training, held-out).

    A file is held out when the first byte of the sha256 of its path relative to the stdlib,
    times 100 / 256, is below ``heldout_percent``; both lists are sorted by path.

    Raises:
        LongkdError: the stdlib holds no such files (an unusual Python install).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _stdlib_sources(str(root))
    train, held = [], []
    for path in files:
        bucket = hashlib.sha256(path.relative_to(root).as_posix().encode()).digest()[0] * 100 // 256
        (held if bucket < spec.heldout_percent else train).append(path)
    if not train or not held:
        raise LongkdError(
            f"found too few *.py files under {root} to train a text teacher; use another Python"
        )
    if spec.max_files:
        train, held = train[: spec.max_files], held[: max(1, spec.max_files // 4)]
    return train, held


@functools.lru_cache(maxsize=2)
def _stdlib_sources(root: str) -> list[Path]:
    """Every ``*.py`` under ``root``, sorted, ``site-packages`` and ``__pycache__`` pruned."""
    found = []
    for folder, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in ("site-packages", "__pycache__")]
        found.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(found)


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int):
    """A byte-level BPE tokenizer of ``vocab_size`` ids trained on ``files``.

    Returns:
        A ``PreTrainedTokenizerFast``: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, no BOS added.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator((_read(p) for p in files), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )


def token_stream(tokenizer, files: list[Path]) -> np.ndarray:
    """The files' tokens concatenated, each file followed by EOS: int32[N]."""
    encoded = tokenizer([_read(p) for p in files], add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(ids + [EOS_ID], dtype=np.int32) for ids in encoded])


# ----------------------------------------------------------------------------- model


def build_model(spec: TextTeacherSpec):
    """A freshly initialised Llama for ``spec`` (tied embeddings, sdpa attention, fp32)."""
    from transformers import AutoModelForCausalLM

    from longkd.models import tiny_config

    config = tiny_config(
        "llama",
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.context,
        tie_word_embeddings=True,
    )
    torch.manual_seed(spec.seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").float()


def _lr_at(step: int, spec: TextTeacherSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = min(1.0, (step - spec.warmup) / max(1, spec.steps - spec.warmup))
    return spec.lr * (spec.final_lr_ratio + (1 - spec.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _batch(stream: np.ndarray, spec: TextTeacherSpec, step: int) -> torch.Tensor:
    """``spec.batch`` random windows of ``spec.context`` tokens, drawn from (seed, step) so a
    resumed run reads the same batches: Long[B, context]."""
    rng = np.random.default_rng([spec.seed, step])
    starts = rng.integers(0, len(stream) - spec.context, size=spec.batch)
    return torch.from_numpy(np.stack([stream[s : s + spec.context] for s in starts]).astype(np.int64))


def heldout_windows(stream: np.ndarray, spec: TextTeacherSpec) -> torch.Tensor:
    """Up to ``spec.heldout_windows`` evenly spaced, non-overlapping held-out windows: Long[n, context]."""
    n = min(spec.heldout_windows, len(stream) // spec.context)
    if n < 1:
        raise LongkdError(
            f"the held-out files hold {len(stream)} tokens, fewer than one window of {spec.context}"
        )
    step = len(stream) // n
    return torch.from_numpy(
        np.stack([stream[i * step : i * step + spec.context] for i in range(n)]).astype(np.int64)
    )


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, chunk: int = 4) -> dict:
    """Held-out next-token cross-entropy and the mean entropy of the model's predictions.

    Args:
        model: the causal LM.
        windows: Long[n, T] token windows.
        chunk: windows per forward.

    Returns:
        ``{"heldout_loss": nats, "mean_entropy": nats, "median_entropy": nats,
        "top1_mass": mean max probability, "positions": n * (T - 1)}`` over every row that
        predicts a token inside its window.
    """
    model.eval()
    losses, entropies, top1 = [], [], []
    for i in range(0, len(windows), chunk):
        ids = windows[i : i + chunk].to(next(model.parameters()).device)
        logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)  # [b, T-1, V]
        losses.append(-logp.gather(-1, ids[:, 1:, None]).squeeze(-1).flatten())
        entropies.append(-(logp.exp() * logp).sum(-1).flatten())
        top1.append(logp.max(-1).values.exp().flatten())
    loss, entropy = torch.cat(losses), torch.cat(entropies)
    return {
        "heldout_loss": round(loss.mean().item(), 4),
        "mean_entropy": round(entropy.mean().item(), 4),
        "median_entropy": round(entropy.median().item(), 4),
        "top1_mass": round(torch.cat(top1).mean().item(), 4),
        "positions": int(loss.numel()),
    }


# ----------------------------------------------------------------------------- training


def train(
    spec: TextTeacherSpec, out_dir: str | Path, progress: bool = True, threads: int = 1, device: str = "cpu"
) -> dict:
    """Train the teacher of ``spec`` in ``out_dir`` and save it there.

    A checkpoint (``train-state.pt``: model, optimizer, step, elapsed time) is written to
    ``out_dir`` every :data:`CHECKPOINT_EVERY` steps and the run resumes from one it finds;
    the tokenizer saved in ``out_dir`` is reused likewise. The checkpoint is deleted when the model is saved.

    Args:
        spec: the settings.
        out_dir: the Hugging Face model directory to fill.
        progress: show a tqdm bar with the loss.
        threads: torch threads.
        device: torch device to train on (the saved model is the same either way).

    Returns:
        The metrics also written to ``out_dir/metrics.json`` (see :func:`evaluate`, plus
        ``steps``, ``train_seconds``, ``train_tokens``, ``corpus`` sizes, ``parameters``,
        ``first_loss``/``final_loss`` (training), ``spec``).
    """
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_files, held_files = corpus_files(spec)
    if (out / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(out)
    else:
        tokenizer = train_tokenizer(train_files, spec.vocab_size)
        tokenizer.save_pretrained(out)
    if len(tokenizer) != spec.vocab_size:
        raise LongkdError(
            f"the corpus yields a tokenizer of {len(tokenizer)} ids, not vocab_size {spec.vocab_size}; "
            "use more files or a smaller --vocab-size"
        )
    train_stream, held_stream = token_stream(tokenizer, train_files), token_stream(tokenizer, held_files)
    if len(train_stream) <= spec.context:
        raise LongkdError(
            f"the training files hold {len(train_stream)} tokens, fewer than --context {spec.context}"
        )
    held = heldout_windows(held_stream, spec)

    model = build_model(spec).to(device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    step, elapsed, losses = 0, 0.0, []
    state_path = out / STATE_NAME
    if state_path.is_file():
        # weights_only: tensors and plain numbers only, so a tampered file runs no code
        state = torch.load(state_path, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed, losses = state["step"], state["elapsed"], state["losses"]
    model.train()
    bar = tqdm(total=spec.steps, initial=step, desc="text teacher", disable=not progress, mininterval=5)
    t0 = time.perf_counter() - elapsed
    while step < spec.steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, spec)
        ids = _batch(train_stream, spec, step).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        losses.append(round(loss.item(), 4))
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}", refresh=False)
        if step % CHECKPOINT_EVERY == 0 and step < spec.steps:
            state = {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "step": step,
                "elapsed": time.perf_counter() - t0,
                "losses": losses,
            }
            torch.save(state, out / (STATE_NAME + ".part"))
            (out / (STATE_NAME + ".part")).replace(state_path)
    bar.close()
    train_seconds = time.perf_counter() - t0
    metrics = {
        **evaluate(model, held),
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "train_tokens": step * spec.batch * spec.context,
        "threads": threads,
        "device": device,
        "corpus": {
            "train_files": len(train_files),
            "heldout_files": len(held_files),
            "train_tokens": int(len(train_stream)),
            "heldout_tokens": int(len(held_stream)),
        },
        "parameters": sum(p.numel() for p in model.parameters()),
        "first_loss": float(np.mean(losses[:10])),
        "final_loss": float(np.mean(losses[-50:])),
        "loss_curve": losses[:: max(1, len(losses) // 50)],
        "spec": dataclasses.asdict(spec),
        "python": sysconfig.get_python_version(),
    }
    model.cpu().save_pretrained(out)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    state_path.unlink(missing_ok=True)
    return metrics


def cached_dir(spec: TextTeacherSpec, cache_dir: str | Path) -> Path:
    """Where :func:`get_or_train` keeps the teacher of ``spec`` under ``cache_dir``."""
    return Path(cache_dir).expanduser() / f"text-teacher-{spec.digest()}"


def get_or_train(
    spec: TextTeacherSpec,
    cache_dir: str | Path,
    progress: bool = True,
    threads: int = 1,
    device: str = "cpu",
) -> Path:
    """The teacher directory of ``spec`` under ``cache_dir``, training it first if absent.

    Training happens in ``<dir>.partial`` (where an interrupted run resumes) and the finished
    directory is renamed into place; a directory counts as present once it holds
    ``metrics.json``.

    Returns:
        The model directory (loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``).
    """
    final = cached_dir(spec, cache_dir)
    if (final / "metrics.json").is_file():
        return final
    partial = final.with_name(final.name + ".partial")
    train(spec, partial, progress, threads, device)
    with atomic_dir(final) as tmp:
        tmp.rmdir()
        partial.rename(tmp)
    return final


def load_metrics(model_dir: str | Path) -> dict:
    """The ``metrics.json`` saved beside a trained text teacher."""
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        raise LongkdError(
            f"{path} not found; train the text teacher with `python -m longkd.tools.text_teacher`"
        )
    return json.loads(path.read_text())


def main(argv: list[str] | None = None) -> int:
    defaults = TextTeacherSpec()
    p = argparse.ArgumentParser(
        prog="python -m longkd.tools.text_teacher", description=__doc__.split("\n\n")[0]
    )
    p.add_argument(
        "--out", required=True, help="cache directory; the teacher is saved in OUT/text-teacher-HASH"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: faster than 2 on a busy 2-core machine)",
    )
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    for f in dataclasses.fields(TextTeacherSpec):
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"default {getattr(defaults, f.name)}",
        )
    args = p.parse_args(argv)
    spec = TextTeacherSpec(**{f.name: getattr(args, f.name) for f in dataclasses.fields(TextTeacherSpec)})
    path = get_or_train(
        spec, args.out, progress=not args.no_progress, threads=args.threads, device=args.device
    )
    metrics = load_metrics(path)
    print(path)
    print(
        json.dumps(
            {
                k: metrics[k]
                for k in (
                    "heldout_loss",
                    "mean_entropy",
                    "median_entropy",
                    "top1_mass",
                    "steps",
                    "train_seconds",
                    "parameters",
                )
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
