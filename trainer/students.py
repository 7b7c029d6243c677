"""One student of a run: its model, optimizer, phase state, counters and private RNG.

Several students share one window stream (trainer/loop.py), so everything a student's result
depends on lives here and nowhere global: its weights, its AdamW state, the phase it is in,
and its torch RNG state (dropout), which is swapped in around every step it takes. A student
trained next to others therefore gives bitwise the same weights as one trained alone.
:func:`train_step` is one optimizer step of one student on the batches the loop hands it;
its learning rate comes from trainer/lr_schedule.py, its loss from trainer/losses.py, and a
student's starting model and tokenizer from trainer/student_init.py.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from longkd.errors import LongkdError
from longkd.trainer import checkpoint as ckpt
from longkd.trainer.config import StudentConfig
from longkd.trainer.losses import batch_losses, fused_head_problem
from longkd.trainer.lr_schedule import lr_at
from longkd.trainer.rope import Phase

log = logging.getLogger(__name__)


@dataclass
class StepMetrics:
    """What one optimizer step of one student produced (one metrics.jsonl line)."""

    step: int
    phase: str
    window: int
    lr: float
    loss: float
    kl: float
    ce: float
    grad_norm: float
    tokens: int
    tokens_per_s: float

    def to_dict(self) -> dict:
        return dict(self.__dict__)


class Student:
    """A student being trained: model, optimizer, phase and RNG state, counters.

    Attributes:
        name: the student's name (its folder under the run directory).
        cfg: its :class:`StudentConfig`.
        model: the transformers model (fp32 master weights).
        tokenizer: its tokenizer or None.
        schedule: its phases (trainer/rope.py).
        initial_rope: the rope the model started with, restored by phases without one.
        optimizer: AdamW over the model's parameters.
        fused: whether its losses run through the LM head in chunks (``loss.fused`` and a head
            that allows it).
        step: optimizer steps taken; tokens: tokens trained on.
        phase: index of the phase whose rope is in force (-1 before the first step).
        phase_start_step, phase_start_tokens: counters when that phase began (per-phase LR).
        out_dir: ``out/<name>``.
    """

    def __init__(
        self,
        cfg: StudentConfig,
        *,
        model,
        tokenizer,
        schedule: list[Phase],
        initial_rope,
        run_seed: int,
        device: torch.device,
        out_dir: Path,
    ):
        self.name = cfg.name
        self.cfg = cfg
        self.model = model.to(device)
        self.tokenizer = tokenizer
        self.schedule = schedule
        self.initial_rope = initial_rope
        self.device = device
        self.out_dir = out_dir
        self.step = 0
        self.tokens = 0
        self.phase = -1
        self.phase_start_step = 0
        self.phase_start_tokens = 0
        self.last: StepMetrics | None = None
        self.train_seconds = 0.0
        self.session_tokens_per_s: float | None = None  # set at the end of a run
        opt = cfg.optimizer
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                # norms and biases are not decayed: weight decay on a gain pulls it towards 0
                (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": opt.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            [g for g in groups if g["params"]],
            lr=opt.lr,
            betas=opt.betas,
            eps=opt.eps,
            foreach=device.type == "cuda",
        )
        seed = cfg.seed if cfg.seed is not None else run_seed
        # private RNG states: swapped in around each step so students never share randomness
        self.cpu_rng = torch.Generator().manual_seed(seed).get_state()
        self.cuda_rng = None
        if device.type == "cuda":
            g = torch.Generator(device=device).manual_seed(seed)
            self.cuda_rng = g.get_state()
        if cfg.activation_checkpointing:
            # transformers 5 renamed gradient_checkpointing_enable; take whichever this version has
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                kwargs = {"use_reentrant": False}
                self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.body = self.model.get_decoder()
        # loss.fused: the losses through the LM head in token chunks (trainer/losses.py)
        self.fused = cfg.loss.fused
        problem = fused_head_problem(self.model) if self.fused else None
        if problem is not None:
            log.warning("%s: loss.fused: %s; computing the full logits instead", self.name, problem)
            self.fused = False
        if cfg.compile:
            self.body = torch.compile(self.body)
        # under torchrun: the trainer/distributed.py Parallel whose DDP / FSDP wrapper runs the forward
        self.parallel = None

    # ------------------------------------------------------------------ RNG

    @contextlib.contextmanager
    def own_rng(self):
        """Run the block with this student's RNG state in the global torch generators."""
        cpu = torch.get_rng_state()
        torch.set_rng_state(self.cpu_rng)
        cuda = None
        if self.cuda_rng is not None:
            cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        try:
            yield
        finally:
            self.cpu_rng = torch.get_rng_state()
            torch.set_rng_state(cpu)
            if cuda is not None:
                self.cuda_rng = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(cuda, self.device)

    def rng_state(self) -> dict:
        return {"cpu": self.cpu_rng.clone(), "cuda": None if self.cuda_rng is None else self.cuda_rng.clone()}

    def load_rng_state(self, state: dict) -> None:
        self.cpu_rng = state["cpu"].clone()
        if self.cuda_rng is not None and state.get("cuda") is not None:
            self.cuda_rng = state["cuda"].clone()

    # ------------------------------------------------------------------ resume

    def restore_from(self, path: Path, *, weights: dict, optimizer_state: dict, trainer_state: dict) -> None:
        """Put this student back where its checkpoint left it: the phase's rope, the weights,
        the AdamW state, its RNG state and its counters.

        Args:
            path: the checkpoint directory (for messages).
            weights: the model's state dict; tied weights may be missing from it.
            optimizer_state: the AdamW state dict.
            trainer_state: ``trainer_state.pt``: ``counters`` (step, tokens, phase, phase
                starts) and ``rng``.

        Raises:
            LongkdError: weights that do not match the model.
        """
        from longkd.trainer.rope import apply_phase

        c = trainer_state["counters"]
        self.phase = -1
        if c["phase"] >= 0:
            phase = self.schedule[c["phase"]]
            if phase.rope_parameters is not None:
                apply_phase(self.model, phase, self.initial_rope)
            self.phase = c["phase"]
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        tied = bool(getattr(self.model.config, "tie_word_embeddings", False))
        if unexpected or (missing and not tied):
            first = (missing + unexpected)[0]
            raise LongkdError(f"checkpoint {path} does not match student {self.name!r}'s model ({first})")
        if missing:
            self.model.tie_weights()
        self.optimizer.load_state_dict(optimizer_state)
        self.load_rng_state(trainer_state["rng"])
        self.step, self.tokens = c["step"], c["tokens"]
        self.phase_start_step, self.phase_start_tokens = c["phase_start_step"], c["phase_start_tokens"]

    # ------------------------------------------------------------------ phases

    def enter_phase(self, index: int) -> bool:
        """Put phase ``index``'s rope in force if it is not already. Returns True on a change."""
        from longkd.trainer.rope import apply_phase, describe

        if index == self.phase:
            return False
        phase = self.schedule[index]
        first = self.phase < 0
        # at the very start a phase without rope keeps the model exactly as loaded
        if not (first and phase.rope_parameters is None):
            apply_phase(self.model, phase, self.initial_rope)
        self.phase = index
        self.phase_start_step, self.phase_start_tokens = self.step, self.tokens
        log.info("%s: step %d: %s", self.name, self.step, describe(phase))
        return True

    def counters(self) -> dict:
        """JSON-able counters saved with a checkpoint."""
        phase = self.schedule[self.phase] if self.phase >= 0 else None
        return {
            "step": self.step,
            "tokens": self.tokens,
            "phase": self.phase,
            "phase_name": None if phase is None else phase.name,
            "window": None if phase is None else phase.window,
            "phase_start_step": self.phase_start_step,
            "phase_start_tokens": self.phase_start_tokens,
            "rope_parameters": self.model.config.rope_parameters,
            "time": time.time(),
        }


# ----------------------------------------------------------------------------- one step


def _nan_error(student: Student, step: int, what: str) -> LongkdError:
    steps = ckpt.checkpoint_steps(student.out_dir / "checkpoints")
    kept = (
        f"the last good checkpoint is {student.out_dir / 'checkpoints' / ckpt.step_name(steps[-1])}"
        if steps
        else "no checkpoint was written yet"
    )
    advice = "lower the learning rate or check the cache"
    pinned = os.environ.get("ATEN_CPU_CAPABILITY")
    if student.cfg.compile and pinned and torch.device(student.device).type == "cpu":
        advice += (
            f"; or unset ATEN_CPU_CAPABILITY (now {pinned}) or set compile: false: torch.compile on "
            "the CPU with it set gave NaN losses on a CPU with AVX-512"
        )
    return LongkdError(f"student {student.name!r}: {what} at step {step}; stopped ({kept}); {advice}")


def _clip_and_step(student: Student, step_no: int) -> torch.Tensor:
    """Clip the accumulated gradients, then take the optimizer step.

    Returns:
        The gradient norm before clipping (a scalar tensor).

    Raises:
        LongkdError: a non-finite gradient norm (the gradients are dropped, no step is taken).
    """
    opt = student.cfg.optimizer
    params = [p for g in student.optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, opt.clip_grad_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP: a replicated DTensor
        norm = norm.full_tensor()
    if not torch.isfinite(norm):
        student.optimizer.zero_grad(set_to_none=True)
        raise _nan_error(student, step_no, f"gradient norm is {float(norm)}")
    student.optimizer.step()
    student.optimizer.zero_grad(set_to_none=True)
    return norm


def train_step(
    student: Student,
    batches: list,
    *,
    total_steps: int,
    mode: str,
    temperature: float,
    amp: torch.dtype | None,
    cache_temperature: float | None = None,
) -> StepMetrics:
    """One optimizer step of one student over ``batches`` (gradient accumulation).

    The phase for this step is chosen from the student's counters before the step; on a phase
    change its rope is put in force first. All randomness (dropout) comes from the student's
    own RNG state. ``cache_temperature`` is the cache's T_c (None: equal to ``temperature``).

    Raises:
        LongkdError: a non-finite loss or gradient norm, naming the student and the step.
    """
    from longkd.trainer.rope import active_phase

    index = active_phase(student.schedule, student.step, student.tokens)
    student.enter_phase(index)
    phase = student.schedule[index]
    lr = lr_at(
        student.cfg.optimizer,
        phase,
        step=student.step,
        tokens=student.tokens,
        total_steps=total_steps,
        phase_start_step=student.phase_start_step,
        phase_start_tokens=student.phase_start_tokens,
    )
    for group in student.optimizer.param_groups:
        group["lr"] = lr
    start = time.perf_counter()
    sums = [0.0, 0.0, 0.0]
    tokens = 0
    step_no = student.step + 1
    student.model.train()
    with student.own_rng():
        for batch in batches:
            cut = batch.prefix(phase.window) if phase.window < batch.input_ids.shape[1] else batch
            loss, kl, ce, n = batch_losses(
                student, cut, mode=mode, temperature=temperature, amp=amp, cache_temperature=cache_temperature
            )
            value = float(loss.detach())
            if student.parallel is not None:  # means over the global batch, as in one process
                loss, value, kl, ce = student.parallel.global_mean(loss, kl, ce, n)
            if not math.isfinite(value):
                student.optimizer.zero_grad(set_to_none=True)
                raise _nan_error(student, step_no, f"loss is {value}")
            (loss / len(batches)).backward()
            sums[0] += value / len(batches)
            sums[1] += float(kl) / len(batches)
            sums[2] += float(ce) / len(batches)
            tokens += int(cut.lengths.clamp(max=cut.input_ids.shape[1]).sum())
        if student.parallel is not None:
            tokens = student.parallel.sum_int(tokens)  # schedules counting tokens see the global count
        norm = _clip_and_step(student, step_no)
    seconds = time.perf_counter() - start
    student.train_seconds += seconds
    student.step = step_no
    student.tokens += tokens
    student.last = StepMetrics(
        step=step_no,
        phase=phase.name,
        window=phase.window,
        lr=lr,
        loss=sums[0],
        kl=sums[1],
        ce=sums[2],
        grad_norm=float(norm),
        tokens=student.tokens,
        tokens_per_s=tokens / max(seconds, 1e-9),
    )
    return student.last
