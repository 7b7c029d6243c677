"""Pre-train the toy world's tiny long-context teacher and short-context student on CPU.

The demo needs a teacher that retrieves facts across its whole window W and a student that
retrieves within its short context S but not beyond it, so that distillation has something
to add. Both are tiny Llamas (``longkd/models.py``) trained from scratch here with a plain
torch loop (AdamW, linear warmup then cosine decay) on documents of ``tools/toy_world.py``:

- teacher: first S-token documents (induction forms fast there), then W-token documents
  (facts queried up to W tokens later), ``max_position_embeddings = W``, RoPE base 10,000;
  training stops early once a check probe set is retrieved at or above the recipe's target
  at every distance.
- student: S-token documents only, ``max_position_embeddings = S``, a small RoPE base; it
  learns retrieval within S and stays near chance beyond S.

Models are saved as Hugging Face directories (weights, config, the toy tokenizer) with
``metrics.json`` beside them (retrieval by distance, steps, time), and cached under a hash
of the recipe, so a second demo run loads them instead of training:

    from longkd.tools.toy_models import RECIPES, get_or_train
    teacher_dir = get_or_train("teacher", RECIPES["w256"], "~/.cache/longkd/toy")

docs/toy.md records the settings tried and the measured numbers behind the recipes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from longkd.errors import LongkdError
from longkd.fileio import atomic_dir
from longkd.models import tiny_config
from longkd.tools.toy_world import ProbeSet, ToyWorld, document, make_probes, retrieval_accuracy

KINDS = ("teacher", "student")
RECIPE_VERSION = 2  # bump when training code changes what a recipe produces
PROBE_LEAD = 16  # filler before each probe's fact (see make_probes)


@dataclass(frozen=True)
class ModelSpec:
    """A tiny Llama: sizes and RoPE base. ``attn_implementation`` ``sdpa`` is about twice as
    fast as ``eager`` for these shapes on CPU (docs/toy.md)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int | None = None
    rope_theta: float = 10000.0
    attn_implementation: str = "sdpa"


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings.

    Training runs at most ``max_steps``. The first ``short_steps`` read documents of S tokens
    even for the teacher (a curriculum: induction forms fast on short documents and then
    carries over to long ones, docs/toy.md); from ``min_steps`` on, and after the short
    steps, it is checked every ``check_every`` steps and stops once the check passes. Every
    batch holds about ``batch_tokens`` tokens (``batch_tokens // length`` documents). The loss
    weighs queried values by ``1 + answer_weight`` and repeated tokens by ``1 + copy_weight``.
    """

    max_steps: int = 1500
    min_steps: int = 100
    short_steps: int = 0
    check_every: int = 100
    batch_tokens: int = 2048
    lr: float = 3e-3
    warmup: int = 30
    final_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    answer_weight: float = 4.0
    copy_weight: float = 0.8
    seed: int = 0


@dataclass(frozen=True)
class ToyRecipe:
    """Everything that determines the pre-trained teacher and student.

    Attributes:
        name: label only (not hashed).
        world: the vocabulary layout.
        window: W, the teacher's context and longest probe.
        short: S, the student's context and longest short document.
        teacher, student: model specs.
        teacher_train, student_train: optimisation specs.
        target: retrieval accuracy the teacher must reach at every distance (and the student
            within S) to stop training.
        probes_per_distance: probes per distance in the saved metrics.
        check_per_distance: probes per distance in the early-stopping check.
    """

    name: str = "custom"
    world: ToyWorld = field(default_factory=ToyWorld)
    window: int = 256
    short: int = 64
    teacher: ModelSpec = field(default_factory=ModelSpec)
    student: ModelSpec = field(default_factory=ModelSpec)
    teacher_train: TrainSpec = field(default_factory=TrainSpec)
    student_train: TrainSpec = field(default_factory=TrainSpec)
    target: float = 0.95
    probes_per_distance: int = 128
    check_per_distance: int = 32

    def distances(self) -> list[int]:
        """Probe distances: powers of two from 4, S and its neighbours, up to the longest
        that fits in W (a probe of distance d is ``d + 2 + 16`` tokens long)."""
        top = self.window - 2 - PROBE_LEAD
        ds = {4, 8, 16, self.short_max_distance(), self.short + 16, self.short * 2}
        ds |= {top // 2, 3 * top // 4, top}
        d = 32
        while d < top:
            ds.add(d)
            d *= 2
        return sorted(x for x in ds if 3 <= x <= top)

    def short_max_distance(self) -> int:
        """The longest distance whose probe fits in the student's context S."""
        return self.short - 2 - PROBE_LEAD

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def recipe_hash(kind: str, recipe: ToyRecipe) -> str:
    """A short hash of what determines ``kind``'s weights (the other model's settings excluded)."""
    _check_kind(kind)
    d = recipe.to_dict()
    keep = {
        "version": RECIPE_VERSION,
        "kind": kind,
        "world": d["world"],
        "context": d["window"] if kind == "teacher" else d["short"],
        "model": d[kind],
        "train": d[f"{kind}_train"],
        "target": d["target"],
        "check_per_distance": d["check_per_distance"],
        "distances": recipe.distances(),
    }
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise LongkdError(f"toy model kind must be 'teacher' or 'student', got {kind!r}")


def build_model(spec: ModelSpec, world: ToyWorld, context: int, seed: int):
    """A freshly initialised tiny Llama for the toy vocabulary with ``max_position_embeddings = context``."""
    config = tiny_config(
        "llama",
        vocab_size=world.vocab_size,
        hidden_size=spec.hidden_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=context,
        rope_theta=spec.rope_theta,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=spec.attn_implementation).float()


def _lr_at(step: int, spec: TrainSpec) -> float:
    """Linear warmup to ``lr``, then cosine decay to ``lr * final_lr_ratio`` at ``max_steps``."""
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    frac = min(1.0, (step - spec.warmup) / max(1, spec.max_steps - spec.warmup))
    return spec.lr * (spec.final_lr_ratio + (1 - spec.final_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def _batch(recipe: ToyRecipe, length: int, rng: np.random.Generator,
           spec: TrainSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """``spec.batch_tokens // length`` training documents of exactly ``length`` tokens (one
    per row, so a model's context never exceeds ``length``) and per-target loss weights.

    Returns:
        ``ids`` Long[B, L] and ``weights`` float[B, L-1] for the targets ``ids[:, 1:]``: 1, plus
        ``answer_weight`` where the target is a queried value and ``copy_weight`` where it is
        predictable in a repeat. Without the extra weight the loss is dominated by
        unpredictable filler and retrieval forms later (docs/toy.md).
    """
    docs = [document(recipe.world, length, rng) for _ in range(max(1, spec.batch_tokens // length))]
    ids = torch.from_numpy(np.stack([d.input_ids for d in docs]))
    weights = torch.ones(ids.shape[0], ids.shape[1] - 1)
    for b, doc in enumerate(docs):
        for f in doc.facts:
            weights[b, f.answer_pos - 1] += spec.answer_weight  # row t predicts token t+1
        for c in doc.copies:
            weights[b, c.dst : c.dst + c.length - 1] += spec.copy_weight  # predicts dst+1 ..
    return ids, weights


def _weighted_loss(model, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy, weighted per target and normalised by the total weight."""
    logits = model(input_ids=ids).logits[:, :-1].float()  # [B, L-1, V]
    ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")  # [B, L-1]
    return (ce * weights).sum() / weights.sum()


def _check(kind: str, recipe: ToyRecipe, acc: dict[int, float]) -> bool:
    """The stopping rule: every distance (teacher) or every distance within S (student) at target."""
    limit = recipe.window if kind == "teacher" else recipe.short_max_distance()
    return all(a >= recipe.target for d, a in acc.items() if d <= limit)


def evaluate(model, recipe: ToyRecipe, per_distance: int, seed: int) -> dict[int, float]:
    """Retrieval by distance on fresh probes of the recipe (plain positions)."""
    return retrieval_accuracy(model, probe_set(recipe, per_distance, seed))


def probe_set(recipe: ToyRecipe, per_distance: int, seed: int) -> ProbeSet:
    """The recipe's probes: every distance of :meth:`ToyRecipe.distances`, each probe
    ``d + 18`` tokens long."""
    return make_probes(recipe.world, recipe.distances(), per_distance, lead=PROBE_LEAD, seed=seed)


def train(kind: str, recipe: ToyRecipe, out_dir: str | Path, progress: bool = True,
          device: str = "cpu") -> dict:
    """Train the teacher or the student of ``recipe`` and save it to ``out_dir``.

    Args:
        kind: ``"teacher"`` or ``"student"``.
        recipe: the settings.
        out_dir: the Hugging Face model directory to write (created; overwritten).
        progress: show a tqdm bar with the loss and the last check.
        device: torch device to train on (the saved weights are the same format).

    Returns:
        The metrics also written to ``out_dir/metrics.json``: ``retrieval`` (distance ->
        accuracy on fresh probes), ``steps``, ``train_seconds``, ``first_loss`` (mean of the
        first 10 steps) and ``final_loss`` (moving average) of the weighted loss, ``checks``,
        ``precondition`` (bool) and the recipe.

    Raises:
        LongkdError: an unknown ``kind``.
    """
    from tqdm.auto import tqdm

    _check_kind(kind)
    spec: ModelSpec = getattr(recipe, kind)
    tspec: TrainSpec = getattr(recipe, f"{kind}_train")
    context = recipe.window if kind == "teacher" else recipe.short
    model = build_model(spec, recipe.world, context, tspec.seed).to(device)
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tspec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tspec.lr,
        betas=(0.9, 0.95),
    )
    rng = np.random.default_rng(tspec.seed + 1)
    check_probes = probe_set(recipe, recipe.check_per_distance, seed=tspec.seed + 2)
    checks: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(total=tspec.max_steps, desc=f"toy {kind}", disable=not progress, leave=False)
    loss_ema = None
    first_losses: list[float] = []  # the start of the loss curve, for metrics.json
    step = 0
    while step < tspec.max_steps:
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, tspec)
        length = recipe.short if step < tspec.short_steps else context
        ids, weights = (t.to(device) for t in _batch(recipe, length, rng, tspec))
        loss = _weighted_loss(model, ids, weights)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        loss_ema = loss.item() if loss_ema is None else 0.9 * loss_ema + 0.1 * loss.item()
        if step <= 10:
            first_losses.append(loss.item())
        bar.update(1)
        if step >= max(tspec.min_steps, tspec.short_steps) and step % tspec.check_every == 0:
            acc = retrieval_accuracy(model, check_probes)
            checks.append({"step": step, "seconds": round(time.perf_counter() - t0, 1),
                           "loss": round(loss_ema, 4), "retrieval": {str(d): a for d, a in acc.items()}})
            bar.set_postfix(loss=f"{loss_ema:.3f}", retrieval=" ".join(f"{a:.2f}" for a in acc.values()))
            if _check(kind, recipe, acc):
                break
        elif step % 10 == 0:
            bar.set_postfix(loss=f"{loss_ema:.3f}")
    bar.close()
    train_seconds = time.perf_counter() - t0
    model.eval()
    acc = evaluate(model, recipe, recipe.probes_per_distance, seed=tspec.seed + 3)
    metrics = {
        "kind": kind,
        "hash": recipe_hash(kind, recipe),
        "context": context,
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "first_loss": round(sum(first_losses) / len(first_losses), 4),
        "final_loss": round(loss_ema, 4),
        "retrieval": {str(d): a for d, a in acc.items()},
        "chance": recipe.world.chance,
        "precondition": precondition(kind, recipe, acc),
        "checks": checks,
        "threads": torch.get_num_threads(),
        "recipe": recipe.to_dict(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.cpu().save_pretrained(out)
    recipe.world.tokenizer().save_pretrained(out)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


TEACHER_FLOOR = 0.9  # accuracy the teacher needs at every distance up to W
STUDENT_FLOOR = 0.9  # ... the student at every distance whose probe fits in S
STUDENT_CEILING_CHANCES = 3.0  # the student beyond S: at most this many times chance


def precondition_failures(kind: str, recipe: ToyRecipe, acc: dict[int, float]) -> list[str]:
    """What the demo relies on, and where ``acc`` (distance -> accuracy) misses it.

    Teacher: accuracy >= 0.9 at every distance up to W. Student: >= 0.9 at every distance
    whose probe fits in S, and <= 3 x chance at every distance beyond S (18.75% in the default
    world: 64 probes of a model at chance exceed 2 x chance at some distance too often).

    Returns:
        One phrase per miss, e.g. ``"71% at distance 238 (needs >= 90%)"``; empty when met.
    """
    _check_kind(kind)
    misses = []
    for d, a in sorted(acc.items()):
        if kind == "teacher" or d <= recipe.short_max_distance():
            floor = TEACHER_FLOOR if kind == "teacher" else STUDENT_FLOOR
            if a < floor:
                misses.append(f"{a:.0%} at distance {d} (needs >= {floor:.0%})")
        elif d > recipe.short:
            ceiling = STUDENT_CEILING_CHANCES * recipe.world.chance
            if a > ceiling:
                misses.append(f"{a:.0%} at distance {d} beyond S={recipe.short} (needs <= {ceiling:.1%}, "
                              f"{STUDENT_CEILING_CHANCES:g} x chance)")
    return misses


def precondition(kind: str, recipe: ToyRecipe, acc: dict[int, float]) -> bool:
    """Whether ``acc`` meets ``kind``'s precondition (see :func:`precondition_failures`)."""
    return not precondition_failures(kind, recipe, acc)


def check_precondition(kind: str, recipe: ToyRecipe, acc: dict[int, float]) -> None:
    """Raise when ``acc`` misses ``kind``'s precondition.

    Raises:
        LongkdError: naming every distance that misses it.
    """
    misses = precondition_failures(kind, recipe, acc)
    if misses:
        need = ("a teacher that uses its whole window W" if kind == "teacher"
                else "a student that retrieves within its context S and not beyond it")
        raise LongkdError(
            f"the toy {kind} retrieves {'; '.join(misses)}; the distillation demo needs {need} "
            "(docs/toy.md); --no-checks runs the pipeline anyway"
        )


def get_or_train(kind: str, recipe: ToyRecipe, cache_dir: str | Path, progress: bool = True,
                 device: str = "cpu") -> Path:
    """The model directory for ``kind`` under ``cache_dir``, training it first if absent.

    The directory is ``cache_dir/{kind}-{hash}``; it counts as present once its
    ``metrics.json`` exists (written last), and is built in a temporary sibling that is
    renamed into place, so an interrupted run leaves nothing that looks finished.

    Args:
        kind: ``"teacher"`` or ``"student"``.
        recipe: the settings (its hash names the directory).
        cache_dir: where trained models are kept.
        progress: show a progress bar while training.
        device: torch device to train on.

    Returns:
        The model directory (loadable with ``AutoModelForCausalLM`` / ``AutoTokenizer``).
    """
    _check_kind(kind)
    final = cached_model_dir(kind, recipe, cache_dir)
    if is_trained(kind, recipe, cache_dir):
        return final
    with atomic_dir(final) as tmp:  # replaces a stale partial directory (no metrics.json)
        train(kind, recipe, tmp, progress, device)
    return final


def cached_model_dir(kind: str, recipe: ToyRecipe, cache_dir: str | Path) -> Path:
    """Where :func:`get_or_train` keeps ``kind`` of ``recipe`` under ``cache_dir``."""
    return Path(cache_dir).expanduser() / f"{kind}-{recipe_hash(kind, recipe)}"


def is_trained(kind: str, recipe: ToyRecipe, cache_dir: str | Path) -> bool:
    """Whether :func:`get_or_train` would load ``kind`` instead of training it: its
    ``metrics.json``, written last, exists."""
    return (cached_model_dir(kind, recipe, cache_dir) / "metrics.json").is_file()


def _train_in_subprocess(kind: str, recipe: ToyRecipe, cache_dir: str, device: str) -> str:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # no bars from a process nobody watches
    torch.set_num_threads(1)
    return str(get_or_train(kind, recipe, cache_dir, progress=False, device=device))


def get_or_train_both(recipe: ToyRecipe, cache_dir: str | Path, progress: bool = True,
                      device: str = "cpu") -> dict[str, Path]:
    """The teacher and the student of ``recipe`` (see :func:`get_or_train`).

    When both must be trained on CPU and the machine has a second core, the student trains
    in a child process while the teacher trains here (one thread each): two tiny models gain
    more from two processes than from two threads each (docs/toy.md).

    Returns:
        ``{"teacher": dir, "student": dir}``.
    """
    missing = [k for k in KINDS if not is_trained(k, recipe, cache_dir)]
    if len(missing) < 2 or device != "cpu" or (os.cpu_count() or 1) < 2:
        return {k: get_or_train(k, recipe, cache_dir, progress, device) for k in KINDS}
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        student = pool.submit(_train_in_subprocess, "student", recipe, str(cache_dir), device)
        teacher = get_or_train("teacher", recipe, cache_dir, progress, device)
        return {"teacher": teacher, "student": Path(student.result())}


def load_metrics(model_dir: str | Path) -> dict:
    """The ``metrics.json`` saved beside a trained toy model."""
    path = Path(model_dir) / "metrics.json"
    if not path.is_file():
        raise LongkdError(f"{path} not found; train the toy model with get_or_train first")
    return json.loads(path.read_text())


# The settings behind docs/toy.md's measurements. The teacher spends its first steps on
# S-token documents (the curriculum), then reads W-token ones until it retrieves at every
# distance; the student only ever reads S-token documents.
# The student's RoPE base is small so that its slowest rotary pair turns about as far over
# its context S = 64 (36 degrees) as a 4k-context Llama 2's does over 4096 tokens (27): with
# base 10000 it turns 1 degree, the pair carries content free of position, and the student
# retrieves far beyond S (docs/toy.md).
_STUDENT = ModelSpec(rope_theta=200.0)
RECIPES: dict[str, ToyRecipe] = {
    "w256": ToyRecipe(
        name="w256", window=256, short=64, student=_STUDENT,
        teacher_train=TrainSpec(max_steps=1500, short_steps=600, seed=1),
        student_train=TrainSpec(max_steps=1500, min_steps=300),
    ),
    # 64 check probes: at 32 the window's edge (distance 494) passed the check by luck and
    # missed on the final probes (docs/toy.md).
    "w512": ToyRecipe(
        name="w512", window=512, short=64, student=_STUDENT, check_per_distance=64,
        teacher_train=TrainSpec(max_steps=3000, short_steps=600, seed=1),
        student_train=TrainSpec(max_steps=1500, min_steps=300),
    ),
}
