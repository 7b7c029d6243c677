"""The learning rate of each optimizer step: linear warmup, then cosine decay (or constant).

A student's rate depends only on its optimizer settings, its active phase and its own
counters, so several students in one run each follow their own schedule; with ``per_phase``
the warmup and the decay restart at every phase of the RoPE schedule (trainer/rope.py).

    from longkd.trainer.lr_schedule import lr_at
    lr = lr_at(cfg.optimizer, phase, step=10, tokens=40960, total_steps=1000,
               phase_start_step=0, phase_start_tokens=0)
"""

from __future__ import annotations

import math

from longkd.trainer.config import OptimizerConfig
from longkd.trainer.rope import Phase


def lr_at(
    opt: OptimizerConfig,
    phase: Phase,
    *,
    step: int,
    tokens: int,
    total_steps: int,
    phase_start_step: int,
    phase_start_tokens: int,
) -> float:
    """The learning rate for optimizer step ``step`` (0-based: the step about to be taken).

    Linear warmup over ``warmup_steps``, then cosine decay to ``min_lr_ratio`` x the base
    (or constant). The base is the phase's ``lr`` when it has one, else ``opt.lr``. With
    ``per_phase`` the warmup and the decay restart at each phase, the decay measured in the
    phase's own unit (steps or tokens) from where the phase started to its ``until``.

    Returns:
        The learning rate (a float).
    """
    base = phase.lr if phase.lr is not None else opt.lr
    if opt.per_phase:
        since = step - phase_start_step
        if phase.until_unit == "steps":
            span, done = phase.until - phase_start_step, step - phase_start_step
        else:
            span, done = phase.until - phase_start_tokens, tokens - phase_start_tokens
    else:
        since, span, done = step, total_steps, step
    if opt.warmup_steps and since < opt.warmup_steps:
        return base * (since + 1) / opt.warmup_steps
    if opt.lr_schedule == "constant":
        return base
    progress = min(max(done / max(span, 1), 0.0), 1.0)
    floor = base * opt.min_lr_ratio
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
