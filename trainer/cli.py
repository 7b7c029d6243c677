"""Subcommands of `longkd` that live in trainer/ (registered by longkd/cli.py).

    longkd train CONFIG [--resume] [--steps N] [--out DIR] [--device D] [--set key.path=value ...]

Everything that can be checked before training is (the cache, each student's tokenizer and
vocabulary, schedule windows against the cache window, rope types against the student's
architecture), so a bad config fails in seconds with one line, not after the first phase.
"""

from __future__ import annotations

import argparse

EPILOG = """\
example config (YAML; see examples/train.yaml for every key):

  cache: runs/cache                    # built by `longkd cache build`
  out: runs/train                      # each student writes runs/train/<name>/
  steps: 1000
  batch_size: 8                        # windows per step
  checkpoint_every: 200
  students:
    - name: phasewise
      init: runs/student-init          # a Hugging Face model directory
      schedule: {preset: phasewise, windows: [1024, 4096], until: [500, 1000], rope_type: yarn}
      loss: {mode: bucket, kd_weight: 1.0, ce_weight: 0.0}
      optimizer: {lr: 3.0e-4, warmup_steps: 50, lr_schedule: cosine}

  longkd train train.yaml --set students.phasewise.optimizer.lr=1e-4 --steps 50
  longkd train train.yaml --resume     # continue from the newest checkpoint of every student
"""


def register(sub: argparse._SubParsersAction) -> None:
    """Add this folder's subcommands to the top-level parser."""
    p = sub.add_parser(
        "train",
        help="distil one or more students from a cache",
        description="Distil every student in CONFIG from one teacher-logit cache, reading the cache once "
        "per step for all of them. Writes OUT/<student>/{checkpoints,metrics.jsonl,tb}.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("config", metavar="CONFIG", help="run config, YAML or TOML")
    p.add_argument(
        "--resume", action="store_true", help="continue from the latest checkpoint of every student"
    )
    p.add_argument("--steps", type=int, help="total optimizer steps (overrides the config's `steps`)")
    p.add_argument("--out", metavar="DIR", help="run directory (overrides the config's `out`)")
    p.add_argument("--device", help="torch device: auto (default), cpu, cuda, cuda:N")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set students.0.loss.mode=renorm (repeatable; YAML value)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_train)


def _overrides(args) -> list[str]:
    extra = list(args.overrides)
    if args.steps is not None:
        extra.append(f"steps={args.steps}")
    if args.out is not None:
        extra.append(f"out={args.out!s}")
    if args.device is not None:
        extra.append(f"device={args.device}")
    return extra


def format_summary(rows: list[dict]) -> str:
    """A plain-text table of :meth:`RunResult.summary` rows."""

    def fmt(v, spec=""):
        if v is None:
            return "-"
        return format(v, spec) if spec else str(v)

    header = ("student", "steps", "tokens", "loss", "kl", "ce", "tok/s", "checkpoint")
    table = [header] + [
        (
            r["student"],
            fmt(r["steps"]),
            fmt(r["tokens"]),
            fmt(r["loss"], ".4f"),
            fmt(r["kl"], ".4f"),
            fmt(r["ce"], ".4f"),
            fmt(r["tokens_per_s"], ".0f"),
            fmt(r["checkpoint"]),
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_train(args) -> int:
    from transformers.utils import logging as hf_logging

    from longkd.distributed import env_world
    from longkd.trainer.config import load_config
    from longkd.trainer.loop import train

    hf_logging.disable_progress_bar()  # one bar per checkpoint save would bury the training bar
    cfg = load_config(args.config, _overrides(args))
    result = train(cfg, resume=args.resume, progress=False if args.no_progress else None)
    if env_world()[0] != 0:  # under torchrun every rank returns here; rank 0 reports for all
        return 0
    print(f"trained {len(result.students)} student(s) to step {result.steps} in {result.seconds:.1f} s")
    print(format_summary(result.summary()))
    return 0
